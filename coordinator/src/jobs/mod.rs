//! Job state transitions, apart from I/O: what an event from a node does to a job.
//!
//! A job's attempts are the members of its generations: a gang of N nodes has N per
//! generation (ranks 0..N-1), a plain job one. A generation succeeds when every member
//! exited 0; it fails as soon as one member fails (exits non-zero, or cannot start), and the
//! job goes back to pending (within its retries) or fails. Members still running then are
//! stopped by the scheduler, which places the next generation only once they have ended,
//! so two generations of a job never run at once.

pub mod ranks;
pub mod service;

use gantry_shared::api::{Job, JobState};
use gantry_shared::protocol::Event;
use gantry_shared::{EndCause, Generation, NodeId};

/// Start failures that are not the job's fault before the job is given up.
const MAX_NODE_START_FAILURES: usize = 3;

/// Applies `event`, reported by `node`, to `job`. Events for another generation than the
/// newest, for a member that already ended, and repeats change nothing (agents replay
/// events after reconnecting; exactly-once is per node sequence number, and this makes a
/// duplicate harmless even across a lost acknowledgement).
pub fn apply(job: &mut Job, node: &NodeId, event: &Event, now_ms: u64) {
    // A member taken off its node (lost, preempted, drained, not delivered) reporting how
    // it really ended: kept for the history; nothing else changes.
    if let Event::Exited {
        generation,
        exit_code,
        signal,
        at_ms,
        ..
    } = event
        && let Some(m) = job.attempts.iter_mut().find(|a| {
            a.generation == *generation && &a.node == node && !a.is_live() && a.exit_code.is_none()
        })
    {
        m.exit_code = Some(exit_code.unwrap_or_else(|| 128 + signal.unwrap_or(0)));
        m.ended_at_ms = Some(*at_ms);
        return;
    }
    let generation = job.generation();
    if event.generation() != generation {
        return;
    }
    let gang = job
        .attempts
        .iter()
        .filter(|a| a.generation == generation)
        .count()
        > 1;
    let Some(member) = job
        .attempts
        .iter_mut()
        .find(|a| a.generation == generation && &a.node == node && a.is_live())
    else {
        return;
    };
    let rank = member.rank;
    let who = if gang {
        format!("rank {rank} on {node}")
    } else {
        node.to_string()
    };
    let others = if gang {
        "; stopping the other members"
    } else {
        ""
    };
    match event {
        // Only function containers say ready or fail their setup.
        Event::Ready { .. } | Event::InitFailed { .. } => {}
        Event::Waiting { message, .. } => {
            if job.state == JobState::Running {
                job.reason = Some(format!("starting on {who}: {message}"));
            }
        }
        Event::Started { at_ms, .. } => {
            member.started_at_ms = Some(*at_ms);
            if job.state == JobState::Running {
                job.reason = Some(running_reason(job));
            }
        }
        Event::StartFailed {
            message, failure, ..
        } => {
            member.end(
                EndCause::StartFailed(*failure),
                format!("start failed: {message}"),
                now_ms,
            );
            let user_error = failure.is_user_error();
            if job.state != JobState::Running {
                // Already failing (a sibling's fault) or finished.
            } else if !user_error && node_start_failures(job) < MAX_NODE_START_FAILURES {
                job.state = JobState::Pending;
                job.reason = Some(format!(
                    "re-placing: start failed on {who}: {message}{others}"
                ));
            } else {
                job.state = JobState::Failed;
                job.reason = Some(if user_error {
                    format!("start failed: {message}{others}")
                } else {
                    format!("start failed on {who}: {message}{others}")
                });
            }
        }
        Event::Exited {
            exit_code,
            signal,
            cause,
            message,
            at_ms,
            ..
        } => {
            let code = exit_code.unwrap_or_else(|| 128 + signal.unwrap_or(0));
            member.exit_code = Some(code);
            member.end(*cause, message.clone(), *at_ms);
            let reason = message;
            if job.state != JobState::Running {
                // Cancelled, failed, or stopping after a sibling failed: record only.
            } else if matches!(cause, EndCause::GpuFault(_)) {
                // The node stopped it because its GPU failed: not the job's fault.
                job.state = JobState::Pending;
                job.reason = Some(format!(
                    "re-placing: a GPU of {who} failed ({reason}; not counted against retries){others}"
                ));
            } else if *cause == EndCause::ShimLost {
                // Its supervisor died without recording an exit: the host crashed or was
                // killed under it, which is not the job's fault either.
                job.state = JobState::Pending;
                job.reason = Some(format!(
                    "re-placing: {who} lost the container (host crash; not counted against retries){others}"
                ));
            } else if code == 0 {
                let members = job.current_members();
                if members.iter().all(|a| a.exit_code == Some(0)) {
                    job.state = JobState::Succeeded;
                    job.reason = None;
                } else {
                    let done = members.iter().filter(|a| a.exit_code == Some(0)).count();
                    job.reason = Some(format!(
                        "{done} of {} members finished; waiting for the others",
                        members.len()
                    ));
                }
            } else {
                job.failures += 1;
                let what = format!("{who} exited with {code} ({reason})");
                if job.failures <= job.spec.retries {
                    let delay = job.spec.backoff.delay_ms(job.failures);
                    job.state = JobState::Pending;
                    job.not_before_ms = Some(now_ms + delay);
                    job.reason = Some(format!(
                        "retrying in {}: {what}; {} of {} retries used{others}",
                        human_ms(delay),
                        job.failures,
                        job.spec.retries
                    ));
                } else {
                    job.state = JobState::Failed;
                    job.reason = Some(format!("{what}{others}"));
                }
            }
        }
    }
    job.updated_at_ms = now_ms;
}

/// Why members were taken from their node (never the job's fault).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Eviction {
    /// The node is down.
    Lost,
    /// The node is being preempted (spot interruption).
    Preempted,
    /// The node's drain deadline passed.
    Drained,
}

impl Eviction {
    fn cause(self) -> EndCause {
        match self {
            Self::Lost => EndCause::Lost,
            Self::Preempted => EndCause::Preempted,
            Self::Drained => EndCause::Drained,
        }
    }

    fn member_reason(self, node: &NodeId) -> String {
        match self {
            Self::Lost => format!("lost: node {node} is down"),
            Self::Preempted => format!("preempted: node {node} is being preempted"),
            Self::Drained => format!("drained: node {node} reached its drain deadline"),
        }
    }

    fn job_reason(self, nodes: &str) -> String {
        let what = match self {
            Self::Lost => "is down",
            Self::Preempted => "is being preempted",
            Self::Drained => "reached its drain deadline",
        };
        format!("re-placing: node {nodes} {what} (not counted against retries)")
    }
}

/// Declares `members` (node, generation) ended by `why`: a running job goes back to
/// pending without counting against its retries (its other members are then stopped); a
/// finished one only records it.
pub fn evict(job: &mut Job, members: &[(NodeId, Generation)], why: Eviction, now_ms: u64) {
    let mut nodes = Vec::new();
    for a in job.attempts.iter_mut().filter(|a| a.is_live()) {
        if members
            .iter()
            .any(|(n, g)| *n == a.node && *g == a.generation)
        {
            let reason = why.member_reason(&a.node);
            a.end(why.cause(), reason, now_ms);
            nodes.push(a.node.to_string());
        }
    }
    if nodes.is_empty() {
        return;
    }
    if job.state == JobState::Running {
        job.state = JobState::Pending;
        job.reason = Some(why.job_reason(&nodes.join(", ")));
    }
}

/// `1.5s`, `2m`.
fn human_ms(ms: u64) -> String {
    if ms < 60_000 {
        format!("{}s", (ms as f64 / 1000.0 * 10.0).round() / 10.0)
    } else {
        format!("{}m", (ms as f64 / 60_000.0 * 10.0).round() / 10.0)
    }
}

fn running_reason(job: &Job) -> String {
    let members = job.current_members();
    let started = members.iter().filter(|a| a.started_at_ms.is_some()).count();
    let nodes: Vec<String> = members.iter().map(|a| a.node.to_string()).collect();
    if started == members.len() {
        format!("running on {}", nodes.join(", "))
    } else {
        format!(
            "starting on {}: {started} of {} members running",
            nodes.join(", "),
            members.len()
        )
    }
}

/// Members, in any generation, that never started because of their node.
fn node_start_failures(job: &Job) -> usize {
    job.attempts
        .iter()
        .filter(|a| a.started_at_ms.is_none() && matches!(a.cause, Some(EndCause::StartFailed(_))))
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use gantry_shared::api::Attempt;
    use gantry_shared::{GpuFault, JobId, NodeId, Owner, StartFailure};

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
            attempts: vec![member(1, "n", 0)],
            failures: 0,
            not_before_ms: None,
        }
    }

    fn member(generation: u64, node: &str, rank: u32) -> Attempt {
        Attempt {
            generation: Generation(generation),
            node: NodeId::new(node).expect("id"),
            gpus: vec![],
            rank,
            address: None,
            master_addr: None,
            master_port: None,
            started_at_ms: None,
            exit_code: None,
            cause: None,
            reason: None,
            ended_at_ms: None,
        }
    }

    fn gang(retries: u32) -> Job {
        let mut j = job(retries);
        j.attempts = vec![member(1, "a", 0), member(1, "b", 1)];
        j
    }

    fn n(name: &str) -> NodeId {
        NodeId::new(name).expect("id")
    }

    fn exited(generation: u64, code: i32) -> Event {
        Event::Exited {
            owner: Owner::Job(JobId::from_sequence(1)),
            generation: Generation(generation),
            exit_code: Some(code),
            signal: None,
            cause: EndCause::Exited,
            message: "exited".into(),
            at_ms: 1,
        }
    }

    #[test]
    fn success_and_failure() {
        let mut j = job(0);
        apply(&mut j, &n("n"), &exited(1, 0), 5);
        assert_eq!((j.state, j.exit_code()), (JobState::Succeeded, Some(0)));
        let mut j = job(0);
        apply(&mut j, &n("n"), &exited(1, 3), 5);
        assert_eq!((j.state, j.exit_code()), (JobState::Failed, Some(3)));
    }

    #[test]
    fn retries_send_the_job_back_to_pending_after_its_backoff() {
        let mut j = job(1);
        apply(&mut j, &n("n"), &exited(1, 1), 5);
        assert_eq!(j.state, JobState::Pending);
        let why = j.reason.clone().unwrap_or_default();
        assert!(why.contains("1 of 1 retries"), "{why}");
        assert!(why.starts_with("retrying in 1s"), "{why}");
        assert_eq!(j.not_before_ms, Some(5 + 1_000));
    }

    #[test]
    fn stale_and_repeated_events_change_nothing() {
        let mut j = job(0);
        apply(&mut j, &n("n"), &exited(7, 1), 5);
        assert_eq!(j.state, JobState::Running, "another generation");
        apply(&mut j, &n("n"), &exited(1, 0), 5);
        let once = j.clone();
        apply(&mut j, &n("n"), &exited(1, 9), 6);
        assert_eq!(j, once, "a replayed exit is ignored");
    }

    #[test]
    fn a_gang_succeeds_when_every_member_exited_zero() {
        let mut j = gang(0);
        apply(&mut j, &n("a"), &exited(1, 0), 5);
        assert_eq!(j.state, JobState::Running);
        assert!(j.reason.as_deref().unwrap_or("").contains("1 of 2 members"));
        apply(&mut j, &n("b"), &exited(1, 0), 6);
        assert_eq!((j.state, j.exit_code()), (JobState::Succeeded, Some(0)));
    }

    #[test]
    fn one_failing_member_fails_the_generation_once() {
        let mut j = gang(1);
        apply(&mut j, &n("b"), &exited(1, 3), 5);
        assert_eq!(j.state, JobState::Pending);
        let why = j.reason.clone().unwrap_or_default();
        assert!(why.contains("rank 1 on b exited with 3"), "{why}");
        assert!(why.contains("stopping the other members"), "{why}");
        // The sibling Gantry stops is recorded but is not another failure.
        let stopped = Event::Exited {
            owner: Owner::Job(JobId::from_sequence(1)),
            generation: Generation(1),
            exit_code: None,
            signal: Some(15),
            cause: EndCause::Stopped,
            message: "stopped".into(),
            at_ms: 6,
        };
        apply(&mut j, &n("a"), &stopped, 6);
        assert_eq!((j.state, j.failures), (JobState::Pending, 1));
        assert_eq!(j.live_members().count(), 0);
        assert_eq!(
            j.exit_code(),
            Some(3),
            "the failing member's code, not the stop's"
        );
    }

    #[test]
    fn a_member_start_failure_re_places_the_whole_gang() {
        let mut j = gang(0);
        let failed = Event::StartFailed {
            owner: Owner::Job(JobId::from_sequence(1)),
            generation: Generation(1),
            message: "disk full".into(),
            failure: StartFailure::Node,
        };
        apply(&mut j, &n("a"), &failed, 5);
        assert_eq!(j.state, JobState::Pending);
        assert_eq!(
            j.live_members().count(),
            1,
            "rank 1 still runs until stopped"
        );
        assert_eq!(j.failures, 0, "the node's fault is not the job's");
    }

    #[test]
    fn a_lost_member_re_places_without_using_a_retry() {
        let mut j = gang(0);
        evict(&mut j, &[(n("b"), Generation(1))], Eviction::Lost, 6);
        assert_eq!((j.state, j.failures), (JobState::Pending, 0));
        assert!(j.reason.as_deref().unwrap_or("").contains("node b is down"));
        assert_eq!(
            j.live_members().count(),
            1,
            "rank 0 is stopped by the scheduler"
        );
        // A late exit from the lost member changes nothing but its history.
        apply(&mut j, &n("b"), &exited(1, 137), 7);
        assert_eq!(j.state, JobState::Pending);
        let b = j.attempts.iter().find(|a| a.node == n("b")).expect("b");
        assert_eq!((b.exit_code, b.ended_at_ms), (Some(137), Some(1)));
        assert!(b.reason.as_deref().unwrap_or("").starts_with("lost:"));
    }

    #[test]
    fn a_gpu_fault_re_places_without_using_a_retry() {
        let mut j = job(0);
        let fault = Event::Exited {
            owner: Owner::Job(JobId::from_sequence(1)),
            generation: Generation(1),
            exit_code: None,
            signal: Some(9),
            cause: EndCause::GpuFault(GpuFault::Xid(79)),
            message: "gpu_xid_79".into(),
            at_ms: 3,
        };
        apply(&mut j, &n("n"), &fault, 4);
        assert_eq!((j.state, j.failures), (JobState::Pending, 0));
        assert!(j.reason.as_deref().unwrap_or("").contains("gpu_xid_79"));
    }

    #[test]
    fn a_container_lost_with_its_host_re_places_without_using_a_retry() {
        let mut j = job(0);
        let lost = Event::Exited {
            owner: Owner::Job(JobId::from_sequence(1)),
            generation: Generation(1),
            exit_code: None,
            signal: None,
            cause: EndCause::ShimLost,
            message: "shim_lost".into(),
            at_ms: 3,
        };
        apply(&mut j, &n("n"), &lost, 4);
        assert_eq!((j.state, j.failures), (JobState::Pending, 0));
        assert!(j.reason.as_deref().unwrap_or("").contains("host crash"));
        // An exit the job made itself still counts.
        let mut j = job(0);
        apply(&mut j, &n("n"), &exited(1, 3), 4);
        assert_eq!((j.state, j.failures), (JobState::Failed, 1));
    }

    #[test]
    fn cancelled_stays_cancelled() {
        let mut j = job(0);
        j.state = JobState::Cancelled;
        apply(&mut j, &n("n"), &exited(1, 137), 5);
        assert_eq!((j.state, j.exit_code()), (JobState::Cancelled, Some(137)));
    }
}
