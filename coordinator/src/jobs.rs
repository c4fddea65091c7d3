//! Job state transitions, apart from I/O: what an event from a node does to a job.

use gantry_shared::api::{Job, JobState};
use gantry_shared::protocol::Event;

/// Start failures that are not the job's fault before the job is given up.
const MAX_NODE_START_FAILURES: usize = 3;

/// Applies `event` to `job`. Events for another generation than the job's current
/// attempt, and repeats of an event already applied, change nothing (agents replay
/// events after reconnecting; exactly-once is per node sequence number, and this makes a
/// duplicate harmless even across a lost acknowledgement).
pub fn apply(job: &mut Job, event: &Event, now_ms: u64) {
    let Some(attempt) = job.attempts.last_mut() else {
        return;
    };
    // An attempt is finished once it has a reason (start failure or exit).
    if attempt.generation != event.generation() || attempt.reason.is_some() {
        return;
    }
    match event {
        Event::Started { at_ms, .. } => {
            attempt.started_at_ms = Some(*at_ms);
            if job.state == JobState::Pending || job.state == JobState::Running {
                job.state = JobState::Running;
                job.reason = Some(format!("running on {}", attempt.node));
            }
        }
        Event::StartFailed {
            message,
            user_error,
            ..
        } => {
            attempt.reason = Some(format!("start failed: {message}"));
            let node = attempt.node.clone();
            // The node's fault (not the job's): place it again, up to a limit, without
            // counting against the job's retries.
            let node_failures = job
                .attempts
                .iter()
                .filter(|a| {
                    a.started_at_ms.is_none()
                        && a.reason
                            .as_deref()
                            .is_some_and(|r| r.starts_with("start failed"))
                })
                .count();
            if job.state.is_terminal() {
            } else if !*user_error && node_failures < MAX_NODE_START_FAILURES {
                job.state = JobState::Pending;
                job.reason = Some(format!("re-placing: start failed on {node}: {message}"));
            } else {
                job.state = JobState::Failed;
                job.reason = Some(if *user_error {
                    format!("start failed: {message}")
                } else {
                    format!("start failed on {node}: {message}")
                });
            }
        }
        Event::Exited {
            exit_code,
            signal,
            reason,
            ..
        } => {
            attempt.exit_code = Some(exit_code.unwrap_or_else(|| 128 + signal.unwrap_or(0)));
            attempt.reason = Some(reason.clone());
            if job.state.is_terminal() {
                // Cancelled meanwhile: keep the user's decision, record how it ended.
            } else if *exit_code == Some(0) {
                job.state = JobState::Succeeded;
                job.reason = None;
            } else {
                let failures = job
                    .attempts
                    .iter()
                    .filter(|a| a.exit_code.is_some_and(|c| c != 0))
                    .count() as u32;
                let code = job.attempts.last().and_then(|a| a.exit_code).unwrap_or(-1);
                if failures <= job.spec.retries {
                    job.state = JobState::Pending;
                    job.reason = Some(format!(
                        "retrying: attempt exited with {code} ({reason}); {} of {} retries used",
                        failures, job.spec.retries
                    ));
                } else {
                    job.state = JobState::Failed;
                    job.reason = Some(format!("exited with {code} ({reason})"));
                }
            }
        }
    }
    job.updated_at_ms = now_ms;
}

/// The exit code a finished job reports: its last attempt's.
pub fn exit_code(job: &Job) -> Option<i32> {
    job.attempts.last().and_then(|a| a.exit_code)
}

#[cfg(test)]
mod tests {
    use super::*;
    use gantry_shared::api::Attempt;
    use gantry_shared::{JobId, NodeId};

    fn job(retries: u32) -> Job {
        let spec = serde_json::from_value(
            serde_json::json!({"name": "t", "image": "busybox", "retries": retries}),
        )
        .expect("spec");
        Job {
            id: JobId::from_sequence(1),
            spec,
            state: JobState::Running,
            reason: None,
            created_at_ms: 0,
            updated_at_ms: 0,
            attempts: vec![Attempt {
                generation: 1,
                node: NodeId::new("n").expect("id"),
                gpus: vec![],
                rank: 0,
                started_at_ms: None,
                exit_code: None,
                reason: None,
            }],
        }
    }

    fn exited(generation: u64, code: i32) -> Event {
        Event::Exited {
            job: JobId::from_sequence(1),
            generation,
            exit_code: Some(code),
            signal: None,
            reason: "exited".into(),
            at_ms: 1,
        }
    }

    #[test]
    fn success_and_failure() {
        let mut j = job(0);
        apply(&mut j, &exited(1, 0), 5);
        assert_eq!((j.state, exit_code(&j)), (JobState::Succeeded, Some(0)));
        let mut j = job(0);
        apply(&mut j, &exited(1, 3), 5);
        assert_eq!((j.state, exit_code(&j)), (JobState::Failed, Some(3)));
    }

    #[test]
    fn retries_send_the_job_back_to_pending() {
        let mut j = job(1);
        apply(&mut j, &exited(1, 1), 5);
        assert_eq!(j.state, JobState::Pending);
        assert!(j.reason.as_deref().unwrap_or("").contains("1 of 1 retries"));
    }

    #[test]
    fn stale_and_repeated_events_change_nothing() {
        let mut j = job(0);
        apply(&mut j, &exited(7, 1), 5);
        assert_eq!(j.state, JobState::Running, "another generation");
        apply(&mut j, &exited(1, 0), 5);
        let once = j.clone();
        apply(&mut j, &exited(1, 9), 6);
        assert_eq!(j, once, "a replayed exit is ignored");
    }

    #[test]
    fn cancelled_stays_cancelled() {
        let mut j = job(0);
        j.state = JobState::Cancelled;
        apply(&mut j, &exited(1, 137), 5);
        assert_eq!((j.state, exit_code(&j)), (JobState::Cancelled, Some(137)));
    }
}
