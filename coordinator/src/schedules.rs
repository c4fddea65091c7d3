//! Schedules: functions of active app versions whose manifest has a `schedule` (called
//! with an empty input each tick) and job templates (`POST /v1/schedules`, submitted each
//! tick). One record per schedule in sled (tree `schedules`: the next run and the last),
//! so a restarted coordinator knows what it missed: a schedule whose next run passed while
//! it was down runs once (at most one catch-up) and then keeps to its times. Each tick's
//! call or job carries the idempotency key `schedule:<schedule>:<tick>`, so a coordinator
//! that dies between starting a run and recording it does not start it twice.
//!
//! [`decide`] is the whole decision (pure, tested with a clock the test sets); the service
//! reads the state, acts, and records.

use std::time::Duration;

use gantry_shared::api::JobSpec;
use gantry_shared::calls::{CallRequest, CallState, Payload};
use gantry_shared::schedules::{
    CreateJobSchedule, LastRun, Overlap, ScheduleSpec, ScheduleTarget, ScheduleView,
};
use gantry_shared::{AppName, CallId, FunctionName, JobId};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::functions::FunctionService;
use crate::jobs::service::JobService;
use crate::store::Store;

/// How often the service looks for due schedules.
const TICK: Duration = Duration::from_millis(250);

#[derive(Debug, thiserror::Error)]
pub enum ScheduleServiceError {
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    /// A secret the job template names.
    #[error(transparent)]
    Secret(crate::secrets::SecretStoreError),
    /// A volume the job template names.
    #[error(transparent)]
    Volume(crate::volumes::VolumeUseError),
    #[error("schedule `{name}` not found")]
    NotFound { name: String },
    #[error("schedules store: {0}")]
    Db(#[from] sled::Error),
    #[error("schedules store: {0}")]
    Store(String),
    #[error("schedules store: corrupt record: {0}")]
    Corrupt(#[from] serde_json::Error),
}

/// One schedule, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct ScheduleRecord {
    target: ScheduleTarget,
    spec: ScheduleSpec,
    /// A job schedule's template.
    #[serde(default)]
    job: Option<JobSpec>,
    next_run_ms: Option<u64>,
    #[serde(default)]
    last_run: Option<LastRun>,
    /// The call or job the last run that started started (a skipped tick keeps it): what
    /// `overlap = "skip"` waits for.
    #[serde(default)]
    started: Option<String>,
}

/// What a schedule does at `now`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tick {
    /// Not due.
    Wait,
    /// Start a run.
    Run,
    /// Due, but the run before is still going and overlap is `skip`.
    Skip,
}

/// The decision for a schedule whose next run is `next_run_ms`, at `now`.
pub fn decide(next_run_ms: Option<u64>, overlap: Overlap, running: bool, now: u64) -> Tick {
    match next_run_ms {
        Some(next) if next <= now => match (running, overlap) {
            (true, Overlap::Skip) => Tick::Skip,
            _ => Tick::Run,
        },
        _ => Tick::Wait,
    }
}

/// The schedules of this coordinator. Cheap to clone.
#[derive(Clone)]
pub struct ScheduleService {
    store: Store,
    functions: FunctionService,
    jobs: JobService,
}

fn job_key(name: &str) -> String {
    format!("job/{name}")
}

fn function_key(app: &AppName, function: &FunctionName) -> String {
    format!("fn/{app}/{function}")
}

impl ScheduleService {
    pub fn new(store: Store, functions: FunctionService, jobs: JobService) -> Self {
        Self {
            store,
            functions,
            jobs,
        }
    }

    fn tree(&self) -> Result<sled::Tree, ScheduleServiceError> {
        self.store
            .schedules_tree()
            .map_err(|e| ScheduleServiceError::Store(e.to_string()))
    }

    /// Creates or replaces a job schedule (its template naming only secrets and volumes
    /// that exist);
    /// its first run is its first tick from `now`.
    pub fn put_job(
        &self,
        req: CreateJobSchedule,
        now: u64,
    ) -> Result<ScheduleView, ScheduleServiceError> {
        let schedule = req.validate().map_err(|e| ScheduleServiceError::Invalid {
            field: e.field,
            message: e.message,
        })?;
        self.store
            .secrets()
            .check_exist(&req.job.secrets)
            .map_err(ScheduleServiceError::Secret)?;
        // Checked now; each run's job finds where its volumes are as it is submitted.
        self.store
            .volumes()
            .resolve(&mut req.job.volumes.clone())
            .map_err(ScheduleServiceError::Volume)?;
        let key = job_key(&req.name);
        let last_run = self.get(&key)?.and_then(|r| r.last_run);
        // (A replaced schedule starts over: runs of the old one do not hold it back.)
        let rec = ScheduleRecord {
            target: ScheduleTarget::Job { name: req.name },
            spec: req.schedule,
            job: Some(req.job),
            next_run_ms: schedule.next_after(now),
            last_run,
            started: None,
        };
        self.put(&key, &rec)?;
        Ok(view(rec))
    }

    pub fn delete_job(&self, name: &str) -> Result<(), ScheduleServiceError> {
        if self.tree()?.remove(job_key(name))?.is_none() {
            return Err(ScheduleServiceError::NotFound {
                name: name.to_owned(),
            });
        }
        self.tree()?.flush()?;
        Ok(())
    }

    /// Every schedule with its next and last run.
    pub fn list(&self) -> Result<Vec<ScheduleView>, ScheduleServiceError> {
        self.tree()?
            .iter()
            .values()
            .map(|v| Ok(view(serde_json::from_slice(&v?)?)))
            .collect()
    }

    fn get(&self, key: &str) -> Result<Option<ScheduleRecord>, ScheduleServiceError> {
        match self.tree()?.get(key)? {
            Some(v) => Ok(Some(serde_json::from_slice(&v)?)),
            None => Ok(None),
        }
    }

    fn put(&self, key: &str, rec: &ScheduleRecord) -> Result<(), ScheduleServiceError> {
        self.tree()?.insert(key, serde_json::to_vec(rec)?)?;
        self.tree()?.flush()?;
        Ok(())
    }

    /// Keeps a record for every scheduled function of an active version (a changed
    /// schedule starts over from `now`; a function no longer scheduled loses its record).
    fn sync_functions(&self, now: u64) -> Result<(), ScheduleServiceError> {
        let scheduled = self.functions.scheduled();
        let mut wanted = std::collections::BTreeSet::new();
        for (app, function, spec) in scheduled {
            let key = function_key(&app, &function);
            wanted.insert(key.clone());
            let existing = self.get(&key)?;
            if existing.as_ref().is_some_and(|r| r.spec == spec) {
                continue;
            }
            // Checked at deploy.
            let Ok(schedule) = spec.parse() else { continue };
            let rec = ScheduleRecord {
                target: ScheduleTarget::Function {
                    app: app.to_string(),
                    function: function.to_string(),
                },
                spec,
                job: None,
                next_run_ms: schedule.next_after(now),
                last_run: existing.as_ref().and_then(|r| r.last_run.clone()),
                started: existing.and_then(|r| r.started),
            };
            self.put(&key, &rec)?;
        }
        for key in self.tree()?.scan_prefix("fn/").keys() {
            let key = key?;
            if !wanted.contains(String::from_utf8_lossy(&key).as_ref()) {
                self.tree()?.remove(&key)?;
            }
        }
        Ok(())
    }

    /// One look at every schedule at `now`: due ones run (or are skipped) and get their
    /// next time.
    pub async fn pass(&self, now: u64) -> Result<(), ScheduleServiceError> {
        self.sync_functions(now)?;
        let tree = self.tree()?;
        let records: Vec<(String, sled::IVec, ScheduleRecord)> = tree
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                let rec = serde_json::from_slice(&v)?;
                Ok((String::from_utf8_lossy(&k).into_owned(), v, rec))
            })
            .collect::<Result<_, ScheduleServiceError>>()?;
        for (key, read, mut rec) in records {
            let Some(due) = rec.next_run_ms.filter(|n| *n <= now) else {
                continue;
            };
            let running = self.running(&rec);
            let tick = decide(rec.next_run_ms, rec.spec.overlap, running, now);
            rec.last_run = Some(match tick {
                Tick::Wait => continue,
                Tick::Skip => LastRun {
                    at_ms: now,
                    id: None,
                    skipped: Some("the run before was still going".into()),
                },
                Tick::Run => {
                    let run = self.start(&key, &rec, due).await;
                    if run.id.is_some() {
                        rec.started = run.id.clone();
                    }
                    run
                }
            });
            // One run for however many ticks passed (a catch-up after downtime), then on.
            rec.next_run_ms = rec.spec.parse().ok().and_then(|s| s.next_after(now));
            tracing::info!(schedule = %key, last = ?rec.last_run, next_ms = ?rec.next_run_ms, "schedule ticked");
            // Only over the record as read: one replaced or deleted meanwhile (the API)
            // stays as it was made.
            let written =
                tree.compare_and_swap(&key, Some(read), Some(serde_json::to_vec(&rec)?))?;
            if written.is_err() {
                tracing::info!(schedule = %key, "schedule changed while it ticked; its new form stands");
            }
            tree.flush()?;
        }
        Ok(())
    }

    /// Whether the schedule's last started run is still going.
    fn running(&self, rec: &ScheduleRecord) -> bool {
        let Some(id) = rec.started.as_deref() else {
            return false;
        };
        match rec.target {
            ScheduleTarget::Function { .. } => CallId::new(id)
                .ok()
                .and_then(|id| self.functions.call_view(&id).ok())
                .is_some_and(|c| c.state == CallState::Running),
            ScheduleTarget::Job { .. } => JobId::new(id)
                .ok()
                .and_then(|id| self.jobs.get(&id).ok())
                .is_some_and(|j| !j.state.is_terminal()),
        }
    }

    /// Starts the run of the tick due at `due`.
    async fn start(&self, key: &str, rec: &ScheduleRecord, due: u64) -> LastRun {
        let idempotency = Some(format!("schedule:{key}:{due}"));
        let started = match (&rec.target, &rec.job) {
            (ScheduleTarget::Function { app, function }, _) => {
                match (
                    AppName::new(app.clone()),
                    FunctionName::new(function.clone()),
                ) {
                    (Ok(app), Ok(function)) => {
                        let request = CallRequest {
                            input: Some(Payload::new(Payload::DEFAULT_CONTENT_TYPE, Vec::new())),
                            inputs: Vec::new(),
                            wait: false,
                            open: false,
                        };
                        self.functions
                            .call(&app, &function, request, idempotency)
                            .await
                            .map(|(call, _)| call.id.to_string())
                            .map_err(|e| e.to_string())
                    }
                    _ => Err("the schedule names no function".to_owned()),
                }
            }
            (ScheduleTarget::Job { .. }, Some(job)) => self
                .jobs
                .submit(job.clone(), idempotency)
                .await
                .map(|(job, _)| job.id.to_string())
                .map_err(|e| e.to_string()),
            (ScheduleTarget::Job { .. }, None) => Err("the schedule has no job template".into()),
        };
        match started {
            Ok(id) => LastRun {
                at_ms: due,
                id: Some(id),
                skipped: None,
            },
            Err(e) => {
                tracing::warn!(schedule = %key, error = %e, "a scheduled run could not start");
                LastRun {
                    at_ms: due,
                    id: None,
                    skipped: Some(e),
                }
            }
        }
    }
}

fn view(rec: ScheduleRecord) -> ScheduleView {
    ScheduleView {
        target: rec.target,
        schedule: rec.spec,
        next_run_ms: rec.next_run_ms,
        last_run: rec.last_run,
    }
}

/// Runs passes until `cancel`.
pub async fn run(service: ScheduleService, cancel: CancellationToken) {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(TICK) => {}
        }
        if let Err(e) = service.pass(gantry_shared::now_ms()).await {
            tracing::error!(error = %e, "schedules pass failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_due_tick_runs_or_skips_an_overlap_and_a_late_one_runs_once() {
        assert_eq!(decide(Some(100), Overlap::Skip, false, 99), Tick::Wait);
        assert_eq!(decide(None, Overlap::Skip, false, 1_000), Tick::Wait);
        assert_eq!(decide(Some(100), Overlap::Skip, false, 100), Tick::Run);
        assert_eq!(decide(Some(100), Overlap::Skip, true, 100), Tick::Skip);
        assert_eq!(decide(Some(100), Overlap::Allow, true, 100), Tick::Run);
        // Down from 100 to 10,000 with a 1 s period: one run at 10,000, then the next
        // tick from there (not the nine missed ones).
        let spec: ScheduleSpec = toml::from_str("period = \"1s\"").expect("spec");
        let s = spec.parse().expect("schedule");
        assert_eq!(decide(Some(100), spec.overlap, false, 10_000), Tick::Run);
        assert_eq!(s.next_after(10_000), Some(11_000));
    }
}
