//! The job service: what the API does with jobs. Submission (refusing a job no node could
//! ever hold), reads, the long poll on a job, cancellation, and a job's output fetched
//! from the node that ran it.

use std::time::Duration;

use futures_util::stream::BoxStream;
use gantry_shared::api::{Job, JobSpec, JobState};
use gantry_shared::protocol::{self, Command, CommandReply};
use gantry_shared::{Generation, JobId, Owner, now_ms};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::nodes::Nodes;
use crate::nodes::liveness::Cluster;
use crate::placement::{Never, Unplaceable};
use crate::reconcile;
use crate::store::{JobFilter, Store, StoreError};
use crate::volumes::VolumeUseError;

/// The longest a long poll on a job waits.
pub const MAX_JOB_WAIT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum JobServiceError {
    #[error("the job can never run here: {message}; ask for less or add a larger node")]
    NeverFits { message: String },
    #[error("{what} not found")]
    NotFound { what: String },
    #[error(
        "idempotency key `{key}` was used with a different request body; use a new key for a new job"
    )]
    IdempotencyKeyReused { key: String },
    #[error("{message}")]
    Unavailable { message: String },
    /// A secret the job names (does not exist).
    #[error(transparent)]
    Secret(crate::secrets::SecretStoreError),
    /// A volume the job names (does not exist, is being deleted, or two local volumes
    /// on different nodes).
    #[error(transparent)]
    Volume(VolumeUseError),
    /// The store failed: not the caller's doing.
    #[error(transparent)]
    Store(StoreError),
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<StoreError> for JobServiceError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound { id } => JobServiceError::NotFound {
                what: format!("job `{id}`"),
            },
            StoreError::IdempotencyMismatch { key } => {
                JobServiceError::IdempotencyKeyReused { key }
            }
            e => JobServiceError::Store(e),
        }
    }
}

/// A job's output as it arrives: stdout and stderr interleaved.
pub type Output = BoxStream<'static, Vec<u8>>;

#[derive(Clone)]
pub struct JobService {
    store: Store,
    cluster: Cluster,
    nodes: Nodes,
    /// Ends long polls when the coordinator shuts down.
    shutdown: CancellationToken,
}

impl JobService {
    pub fn new(store: Store, cluster: Cluster, nodes: Nodes, shutdown: CancellationToken) -> Self {
        Self {
            store,
            cluster,
            nodes,
            shutdown,
        }
    }

    /// Accepts a job, durably, unless no node could ever hold it. With an idempotency key,
    /// a replay of the same spec returns the job created first (`false`).
    /// The store jobs live in.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// A volume service over the same store, cluster and sessions.
    pub fn volume_service(
        &self,
        functions: crate::functions::FunctionService,
    ) -> crate::volumes::VolumeService {
        crate::volumes::VolumeService::new(
            self.store.clone(),
            self.cluster.clone(),
            self.nodes.clone(),
            functions,
        )
    }

    /// The secrets jobs may name.
    pub fn secrets(&self) -> &crate::secrets::Secrets {
        self.store.secrets()
    }

    pub async fn submit(
        &self,
        spec: JobSpec,
        idempotency_key: Option<String>,
    ) -> Result<(Job, bool), JobServiceError> {
        let service = self.clone();
        let (job, created) =
            tokio::task::spawn_blocking(move || service.accept(spec, idempotency_key))
                .await
                .map_err(|e| JobServiceError::Internal(e.to_string()))??;
        if created {
            // Let the reconciler place it now rather than at its next pass.
            self.nodes.changed.notify_one();
        }
        Ok((job, created))
    }

    /// [`JobService::submit`]'s checks and write: the volumes it names are resolved (where
    /// each lives goes into the spec) and the job recorded while no volume can be deleted.
    fn accept(
        &self,
        mut spec: JobSpec,
        idempotency_key: Option<String>,
    ) -> Result<(Job, bool), JobServiceError> {
        let volumes = self.store.volumes();
        let _uses = volumes.uses();
        volumes
            .resolve(&mut spec.volumes)
            .map_err(JobServiceError::Volume)?;
        if spec.nodes > 1
            && let Some(local) = spec
                .volumes
                .values()
                .find(|u| u.backend.as_ref().is_some_and(|b| b.node().is_some()))
        {
            return Err(JobServiceError::Volume(VolumeUseError::Gang {
                name: local.name.clone(),
                nodes: spec.nodes,
            }));
        }
        self.check_fits(&spec)?;
        self.store
            .secrets()
            .check_exist(&spec.secrets)
            .map_err(JobServiceError::Secret)?;
        // Compare what the spec means, not its bytes: reformatted JSON is the same request.
        let canonical = hex::encode(Sha256::digest(
            serde_json::to_vec(&spec).map_err(|e| JobServiceError::Internal(e.to_string()))?,
        ));
        Ok(self.store.create_job(
            spec,
            now_ms(),
            idempotency_key.as_deref().map(|k| (k, canonical.as_str())),
        )?)
    }

    /// Larger than every known node even when empty: it would never run. Only judged when
    /// every joined node has described itself: right after a coordinator restart, or while
    /// a node is away, the cluster is larger than what the view knows. A cluster without
    /// nodes yet takes jobs: nodes may join.
    fn check_fits(&self, spec: &JobSpec) -> Result<(), JobServiceError> {
        let probe = Job {
            id: JobId::from_sequence(0),
            spec: spec.clone(),
            state: JobState::Pending,
            reason: None,
            created_at_ms: 0,
            updated_at_ms: 0,
            attempts: Vec::new(),
            failures: 0,
            not_before_ms: None,
        };
        let statuses = self.cluster.statuses();
        let described = statuses.iter().all(|s| reconcile::node_info(s).is_some());
        let mut empty = reconcile::engine(&statuses, &Default::default(), true);
        if described
            && let Err(why) = empty.place(&reconcile::request(&probe))
            && why.is_never()
            && !matches!(why, Unplaceable::Never(Never::NoNodes))
        {
            return Err(JobServiceError::NeverFits {
                message: why.to_string(),
            });
        }
        Ok(())
    }

    pub fn get(&self, id: &JobId) -> Result<Job, JobServiceError> {
        Ok(self.store.job(id)?)
    }

    /// A page of at most `limit` jobs in submission order (only those in `state`, after
    /// the job `after`), and whether more follow.
    pub fn list(
        &self,
        state: Option<JobState>,
        after: Option<JobId>,
        limit: usize,
    ) -> Result<(Vec<Job>, bool), JobServiceError> {
        Ok(self.store.jobs(&JobFilter {
            state,
            after,
            limit,
        })?)
    }

    /// The job once it changed after `since` (its `updated_at_ms` moves on every change),
    /// or as it is after `wait` (at most [`MAX_JOB_WAIT`]) or at shutdown. Waits on the
    /// store's commits.
    pub async fn changed_since(
        &self,
        id: &JobId,
        since: u64,
        wait: Duration,
    ) -> Result<Job, JobServiceError> {
        let deadline = tokio::time::Instant::now() + wait.min(MAX_JOB_WAIT);
        loop {
            let changed = self.store.changed().notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let job = self.store.job(id)?;
            if job.updated_at_ms > since {
                return Ok(job);
            }
            tokio::select! {
                _ = &mut changed => {}
                _ = tokio::time::sleep_until(deadline) => return Ok(job),
                _ = self.shutdown.cancelled() => return Ok(job),
            }
        }
    }

    /// Cancels a job; a finished one is returned unchanged.
    pub fn cancel(&self, id: &JobId) -> Result<Job, JobServiceError> {
        let now = now_ms();
        let job = self.store.update_job(id, |job| {
            if !job.state.is_terminal() {
                job.state = JobState::Cancelled;
                job.reason = Some("cancelled by request".into());
                job.updated_at_ms = now;
            }
        })?;
        self.nodes.changed.notify_one();
        Ok(job)
    }

    /// The output of one member (`rank`) of one generation (default: the newest), from the
    /// node that ran it; with `follow`, until its container exits.
    pub async fn output(
        &self,
        id: &JobId,
        generation: Option<Generation>,
        rank: u32,
        follow: bool,
    ) -> Result<Output, JobServiceError> {
        let job = self.store.job(id)?;
        let generation = generation.or_else(|| job.attempts.last().map(|a| a.generation));
        let attempt = job
            .attempts
            .iter()
            .find(|a| Some(a.generation) == generation && a.rank == rank)
            .ok_or_else(|| JobServiceError::NotFound {
                what: format!(
                    "output of job {} (no such attempt yet: {})",
                    job.id,
                    job.reason.clone().unwrap_or_default()
                ),
            })?;
        let session =
            self.nodes
                .get(&attempt.node)
                .ok_or_else(|| JobServiceError::Unavailable {
                    message: format!(
                        "node {} is not connected; its output is on it",
                        attempt.node
                    ),
                })?;
        let cmd = Command::Logs {
            owner: Owner::Job(job.id.clone()),
            generation: attempt.generation,
            follow,
        };
        let (reply, rx) = crate::control::command(&session.conn, &cmd)
            .await
            .map_err(|e| JobServiceError::Unavailable {
                message: format!("cannot fetch output from {}: {e}", attempt.node),
            })?;
        match reply {
            CommandReply::Accepted => {}
            CommandReply::Refused(r) => {
                return Err(JobServiceError::NotFound {
                    what: format!("output of job {} (the node says: {})", job.id, r.message),
                });
            }
            CommandReply::NotRunning => {
                return Err(JobServiceError::NotFound {
                    what: format!("output of job {} on {}", job.id, attempt.node),
                });
            }
        }
        // Log chunks: a stream byte, a 4-byte length, the bytes; the output is the bytes.
        let chunks = futures_util::stream::unfold(rx, |mut rx| async move {
            let mut head = [0u8; 5];
            rx.read_exact(&mut head).await.ok()?;
            let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
            if len > protocol::MAX_FRAME {
                return None;
            }
            let mut data = vec![0u8; len];
            rx.read_exact(&mut data).await.ok()?;
            Some((data, rx))
        });
        Ok(Box::pin(chunks))
    }
}
