//! The coordinator's durable state in sled, and the only code that opens its trees. This
//! module: jobs (with their idempotency keys, the index of active jobs and each node's
//! applied event sequence) and fences, which change together in one transaction when a
//! node reports a member's end. Beside it, one module per other kind of record: `tokens`
//! (API tokens and roles), `joins` (one-time join tokens, joined nodes), `node_admin`
//! (drain and preempt). Every write that the API acknowledges is flushed first. The layout
//! is versioned; an incompatible database is refused at open.

pub mod functions;
pub mod joins;
pub mod node_admin;
pub mod tokens;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use gantry_shared::api::{Job, JobSpec, JobState};
use gantry_shared::protocol::{Event, SequencedEvent};
use gantry_shared::{Generation, JobId, NodeId, Owner};
use serde::{Deserialize, Serialize};
use sled::Transactional;

/// Bumped when keys or values change incompatibly.
pub const LAYOUT_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "cannot open the coordinator database at {path}: {source}; if another coordinator uses this state directory, stop it or pass another --state-dir"
    )]
    Open { path: PathBuf, source: sled::Error },
    #[error(
        "coordinator database at {path} has layout version {found}, this coordinator understands {LAYOUT_VERSION}; run a matching version or restore a backup"
    )]
    Layout { path: PathBuf, found: u32 },
    #[error("database: {0}")]
    Db(#[from] sled::Error),
    #[error("corrupt record: {0}")]
    Corrupt(#[from] serde_json::Error),
    #[error(
        "idempotency key `{key}` was used with a different request body; use a new key for a new job"
    )]
    IdempotencyMismatch { key: String },
    #[error("job `{id}` not found")]
    NotFound { id: JobId },
}

/// A member its node may still run although the coordinator took it off: how to stop it,
/// and what it holds there until it is known to have ended.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fence {
    /// SIGTERM-to-SIGKILL grace for the stop.
    pub grace_ms: u64,
    pub cpu_millis: u64,
    pub memory_bytes: u64,
    pub gpus: Vec<u32>,
}

#[derive(Serialize, Deserialize)]
struct IdempotencyRecord {
    job: JobId,
    body_sha256: String,
}

/// The coordinator's database.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    jobs: sled::Tree,
    idempotency: sled::Tree,
    /// The jobs the reconciler still has work on (see [`needs_scheduler`]), as last
    /// written, in submission order: its passes neither scan finished jobs nor parse stored
    /// ones. Built at open from `jobs`; every write of a job goes through [`Store::index`].
    active: std::sync::Arc<std::sync::Mutex<std::collections::BTreeMap<JobId, Job>>>,
    /// Members taken off their node (lost, preempted, drained, start not delivered) that
    /// the node may still run: `<node>/<job>/<generation>` → [`Fence`]. Each is stopped
    /// when the node is reachable and forgotten once the node reports it ended (an event)
    /// or says it does not run it; until then it holds its resources there.
    fences: sled::Tree,
    commits: std::sync::Arc<GroupCommit>,
    /// The secrets, once opened with their key ([`Store::open_secrets`]).
    secrets: crate::secrets::Secrets,
    /// The volumes jobs and functions may mount.
    volumes: crate::volumes::VolumeStore,
    /// Woken after every commit: long polls (`GET /v1/jobs/{id}?changed_since=`) wait on it.
    changed: std::sync::Arc<tokio::sync::Notify>,
}

/// Every change moves `updated_at_ms` forward (now, or one past the last value when the
/// clock has not moved), so it doubles as the job's version for long polls.
fn bump(job: &mut Job, before: &Job) {
    job.updated_at_ms = gantry_shared::now_ms().max(before.updated_at_ms + 1);
}

/// A fence record; ones written before fences held resources are the grace alone (8 bytes).
fn decode_fence(value: &[u8]) -> Result<Fence, StoreError> {
    match <[u8; 8]>::try_from(value) {
        Ok(grace) => Ok(Fence {
            grace_ms: u64::from_be_bytes(grace),
            ..Fence::default()
        }),
        Err(_) => Ok(serde_json::from_slice(value)?),
    }
}

fn fence_key(node: &NodeId, job: &JobId, generation: Generation) -> String {
    format!("{node}/{job}/{generation}")
}

/// Group commit: writers that need their writes durable share fsyncs. A writer waits for
/// a flush that started after its write; while one flush runs, everyone who wrote
/// meanwhile waits and the next flush covers them all, so N concurrent submissions cost
/// about two fsyncs, not N.
#[derive(Default)]
struct GroupCommit {
    state: std::sync::Mutex<CommitState>,
    done: std::sync::Condvar,
}

#[derive(Default)]
struct CommitState {
    /// Flushes started so far; a flush's ticket is the count when it started.
    started: u64,
    /// The latest finished flush's ticket, and whether it failed.
    finished: u64,
    failed: Option<String>,
    running: bool,
}

impl GroupCommit {
    /// Returns once everything written before the call is on disk.
    fn commit(&self, db: &sled::Db) -> Result<(), StoreError> {
        let lock = || self.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut st = lock();
        // A flush running now may have started before our write: we need the next one.
        let needed = st.started + 1;
        loop {
            if st.finished >= needed {
                return match &st.failed {
                    Some(e) => Err(StoreError::Db(sled::Error::Io(std::io::Error::other(
                        e.clone(),
                    )))),
                    None => Ok(()),
                };
            }
            if st.running {
                st = self.done.wait(st).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            st.running = true;
            st.started += 1;
            let ticket = st.started;
            drop(st);
            let result = db.flush();
            st = lock();
            st.running = false;
            st.finished = ticket;
            st.failed = result.as_ref().err().map(|e| e.to_string());
            self.done.notify_all();
        }
    }
}

/// A job the scheduler still has to place, watch or stop: not finished, or finished
/// (cancelled, or failed by one gang member) with members that have not ended yet.
pub fn needs_scheduler(job: &Job) -> bool {
    !job.state.is_terminal() || job.live_members().next().is_some()
}

/// Which jobs to list.
#[derive(Debug, Clone, Default)]
pub struct JobFilter {
    pub state: Option<JobState>,
    /// Start after this job id (the page token).
    pub after: Option<JobId>,
    pub limit: usize,
}

impl Store {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(path)
            .open()
            .map_err(|source| StoreError::Open {
                path: path.to_owned(),
                source,
            })?;
        match db.get("layout_version")? {
            None => {
                db.insert("layout_version", &LAYOUT_VERSION.to_be_bytes())?;
                db.flush()?;
            }
            Some(v) => {
                let found = v.as_ref().try_into().map(u32::from_be_bytes).unwrap_or(0);
                if found != LAYOUT_VERSION {
                    return Err(StoreError::Layout {
                        path: path.to_owned(),
                        found,
                    });
                }
            }
        }
        let store = Self {
            jobs: db.open_tree("jobs")?,
            idempotency: db.open_tree("idempotency")?,
            active: Default::default(),
            fences: db.open_tree("fences")?,
            commits: Default::default(),
            secrets: Default::default(),
            volumes: crate::volumes::VolumeStore::new(db.open_tree("volumes")?),
            changed: Default::default(),
            db,
        };
        store.rebuild_active()?;
        Ok(store)
    }

    fn rebuild_active(&self) -> Result<(), StoreError> {
        // Databases written before the index lived in memory kept it as a tree.
        self.db.drop_tree("active_jobs")?;
        for kv in self.jobs.iter() {
            let (_, v) = kv?;
            self.index(&serde_json::from_slice::<Job>(&v)?, &v)?;
        }
        Ok(())
    }

    /// Keeps the active jobs current after `job` was written as `written`. Writers racing
    /// on one job may get here out of order, so what counts is the job as stored now, read
    /// under the lock: the last writer's call sees the last write (and parses it only when
    /// it is not the caller's own).
    fn index(&self, job: &Job, written: &[u8]) -> Result<(), StoreError> {
        let mut active = self.active.lock().unwrap_or_else(|e| e.into_inner());
        let Some(bytes) = self.jobs.get(job.id.as_str())? else {
            active.remove(&job.id);
            return Ok(());
        };
        let stored = if bytes.as_ref() == written {
            job.clone()
        } else {
            serde_json::from_slice(&bytes)?
        };
        if needs_scheduler(&stored) {
            active.insert(stored.id.clone(), stored);
        } else {
            active.remove(&stored.id);
        }
        Ok(())
    }

    /// Remembers that `node` may still run `job`'s `generation`, which was taken from it,
    /// and must stop it (durable at the next commit).
    pub fn add_fence(
        &self,
        node: &NodeId,
        job: &JobId,
        generation: Generation,
        fence: &Fence,
    ) -> Result<(), StoreError> {
        self.fences
            .insert(fence_key(node, job, generation), serde_json::to_vec(fence)?)?;
        Ok(())
    }

    /// What `node` must stop when it is reachable.
    pub fn fences(&self, node: &NodeId) -> Result<Vec<(JobId, Generation, Fence)>, StoreError> {
        let mut out = Vec::new();
        for (n, job, generation, fence) in self.scan_fences(format!("{node}/"))? {
            if &n == node {
                out.push((job, generation, fence));
            }
        }
        Ok(out)
    }

    /// Every fence: `(node, job, generation, fence)`.
    pub fn all_fences(&self) -> Result<Vec<(NodeId, JobId, Generation, Fence)>, StoreError> {
        self.scan_fences(String::new())
    }

    fn scan_fences(
        &self,
        prefix: String,
    ) -> Result<Vec<(NodeId, JobId, Generation, Fence)>, StoreError> {
        let mut out = Vec::new();
        for kv in self.fences.scan_prefix(prefix) {
            let (key, value) = kv?;
            let key = String::from_utf8_lossy(&key);
            let mut parts = key.splitn(3, '/');
            if let (Some(Ok(node)), Some(Ok(job)), Some(Ok(generation))) = (
                parts.next().map(NodeId::new),
                parts.next().map(JobId::new),
                parts.next().map(|g| g.parse().map(Generation)),
            ) {
                out.push((node, job, generation, decode_fence(&value)?));
            }
        }
        Ok(out)
    }

    /// Nodes with fences.
    pub fn fenced_nodes(&self) -> Result<std::collections::BTreeSet<NodeId>, StoreError> {
        let mut out = std::collections::BTreeSet::new();
        for key in self.fences.iter().keys() {
            let key = key?;
            let key = String::from_utf8_lossy(&key);
            if let Some(node) = key.split('/').next().and_then(|n| NodeId::new(n).ok()) {
                out.insert(node);
            }
        }
        Ok(out)
    }

    /// The node does not run it (any more): forget the fence.
    pub fn remove_fence(
        &self,
        node: &NodeId,
        job: &JobId,
        generation: Generation,
    ) -> Result<(), StoreError> {
        self.fences.remove(fence_key(node, job, generation))?;
        self.commit()
    }

    /// The jobs the scheduler still has work on, in submission order.
    pub fn active_jobs(&self) -> Result<Vec<Job>, StoreError> {
        let active = self.active.lock().unwrap_or_else(|e| e.into_inner());
        Ok(active.values().cloned().collect())
    }

    /// API tokens and their roles.
    pub fn api_tokens(&self) -> Result<tokens::ApiTokens, StoreError> {
        Ok(tokens::ApiTokens::new(self.db.open_tree("api_tokens")?))
    }

    /// One-time join tokens and the register of joined nodes; `ca_sha256` is the cluster
    /// CA's hash that tokens carry.
    pub fn join_tokens(&self, ca_sha256: String) -> Result<joins::JoinTokens, StoreError> {
        Ok(joins::JoinTokens::new(
            self.db.open_tree("join_tokens")?,
            self.db.open_tree("nodes")?,
            ca_sha256,
        ))
    }

    /// Apps, calls, inputs and warm containers.
    /// Opens the secrets with the key in `key_file` (made on the first start); a missing
    /// or wrong key is refused and changes nothing.
    pub fn open_secrets(&self, key_file: &Path) -> Result<(), crate::secrets::SecretStoreError> {
        let store = crate::secrets::SecretStore::open(
            self.db.open_tree("secrets")?,
            self.db.open_tree("secrets_meta")?,
            key_file,
        )?;
        self.secrets.set(store);
        Ok(())
    }

    /// The volumes jobs and functions may mount.
    pub fn volumes(&self) -> &crate::volumes::VolumeStore {
        &self.volumes
    }

    /// The secrets (usable once [`Store::open_secrets`] succeeded).
    pub fn secrets(&self) -> &crate::secrets::Secrets {
        &self.secrets
    }

    /// The schedules' records (`crate::schedules`).
    pub fn schedules_tree(&self) -> Result<sled::Tree, StoreError> {
        Ok(self.db.open_tree("schedules")?)
    }

    pub fn functions(&self) -> Result<functions::FunctionStore, StoreError> {
        functions::FunctionStore::open(self.clone())
    }

    /// Nodes' drain and preempt states.
    pub fn node_admin(&self) -> Result<node_admin::NodeAdmin, StoreError> {
        Ok(node_admin::NodeAdmin::new(self.db.open_tree("node_admin")?))
    }

    /// Writes everything to disk (at shutdown).
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }

    /// Records a new job, durably. With an idempotency key, a replay of the same body
    /// returns the job created first (`false`); a different body is refused.
    pub fn create_job(
        &self,
        spec: JobSpec,
        now_ms: u64,
        idempotency: Option<(&str, &str)>,
    ) -> Result<(Job, bool), StoreError> {
        let id = JobId::from_sequence(self.db.generate_id()?);
        let job = Job {
            failures: 0,
            not_before_ms: None,
            id,
            spec,
            state: JobState::Pending,
            reason: Some("waiting for capacity".into()),
            created_at_ms: now_ms,
            updated_at_ms: now_ms,
            attempts: Vec::new(),
        };
        let job_bytes = serde_json::to_vec(&job)?;
        let idem = idempotency
            .map(|(key, body_sha256)| {
                let rec = IdempotencyRecord {
                    job: job.id.clone(),
                    body_sha256: body_sha256.to_owned(),
                };
                serde_json::to_vec(&rec).map(|bytes| (key, bytes))
            })
            .transpose()?;
        // One transaction: either the job and its key are both stored, or (a replay) the
        // key's earlier record comes back and nothing is written.
        let earlier: Option<sled::IVec> = (&self.jobs, &self.idempotency)
            .transaction(|(jobs, keys)| {
                if let Some((key, bytes)) = &idem {
                    if let Some(earlier) = keys.get(key)? {
                        return Ok(Some(earlier));
                    }
                    keys.insert(*key, bytes.clone())?;
                }
                jobs.insert(job.id.as_str(), job_bytes.clone())?;
                Ok(None)
            })
            .map_err(
                |e: sled::transaction::TransactionError<std::convert::Infallible>| match e {
                    sled::transaction::TransactionError::Storage(e) => StoreError::Db(e),
                    sled::transaction::TransactionError::Abort(never) => match never {},
                },
            )?;
        match (earlier, idempotency) {
            (Some(bytes), Some((key, body_sha256))) => {
                let rec: IdempotencyRecord = serde_json::from_slice(&bytes)?;
                if rec.body_sha256 != body_sha256 {
                    return Err(StoreError::IdempotencyMismatch {
                        key: key.to_owned(),
                    });
                }
                Ok((self.job(&rec.job)?, false))
            }
            _ => {
                self.index(&job, &job_bytes)?;
                self.commit()?;
                Ok((job, true))
            }
        }
    }

    pub fn job(&self, id: &JobId) -> Result<Job, StoreError> {
        let bytes = self
            .jobs
            .get(id.as_str())?
            .ok_or_else(|| StoreError::NotFound { id: id.clone() })?;
        Ok(serde_json::from_slice(&bytes)?)
    }

    /// Jobs in submission order, starting after `filter.after`; returns the page and
    /// whether more follow.
    pub fn jobs(&self, filter: &JobFilter) -> Result<(Vec<Job>, bool), StoreError> {
        let start = filter
            .after
            .as_ref()
            .map(|a| format!("{}\u{0}", a.as_str()))
            .unwrap_or_default();
        let mut out = Vec::new();
        for kv in self.jobs.range(start.as_bytes()..) {
            let (_, v) = kv?;
            let job: Job = serde_json::from_slice(&v)?;
            if filter.state.is_some_and(|s| s != job.state) {
                continue;
            }
            if out.len() == filter.limit {
                return Ok((out, true));
            }
            out.push(job);
        }
        Ok((out, false))
    }

    /// Applies a node's events at most once each, durably: in one transaction, the jobs
    /// change and the node's applied sequence number advances. Returns the highest
    /// sequence number now applied (what to acknowledge).
    /// The highest of `node`'s events applied (0 before any).
    pub fn node_events_applied(&self, node: &NodeId) -> Result<u64, StoreError> {
        let seqs = self.db.open_tree("node_event_seq")?;
        Ok(seqs
            .get(node.as_str().as_bytes())?
            .and_then(|v| v.as_ref().try_into().ok().map(u64::from_be_bytes))
            .unwrap_or(0))
    }

    pub fn apply_node_events(
        &self,
        node: &NodeId,
        events: &[SequencedEvent],
        apply: impl Fn(&mut Job, &Event),
    ) -> Result<u64, StoreError> {
        let applied = self.apply_node_events_deferred(node, events, apply)?;
        self.commit()?;
        Ok(applied)
    }

    /// [`Store::apply_node_events`], durable at the next [`Store::commit`] (for a caller
    /// that applies several nodes' events and commits once before acknowledging any).
    pub fn apply_node_events_deferred(
        &self,
        node: &NodeId,
        events: &[SequencedEvent],
        apply: impl Fn(&mut Job, &Event),
    ) -> Result<u64, StoreError> {
        let seqs = self.db.open_tree("node_event_seq")?;
        let key = node.as_str().as_bytes();
        let applied = self.node_events_applied(node)?;
        // A replay of something already applied is skipped.
        let fresh: Vec<&SequencedEvent> = events.iter().filter(|e| e.seq > applied).collect();
        let Some(last) = fresh.iter().map(|e| e.seq).max() else {
            return Ok(applied);
        };
        let abort = |err: serde_json::Error| {
            sled::transaction::ConflictableTransactionError::Abort(err.to_string())
        };
        let written: BTreeMap<JobId, (Job, Vec<u8>)> = (&self.jobs, &seqs, &self.fences)
            .transaction(|(jobs, seqs, fences)| {
                // Each job is read once and written once, whatever number of its events
                // the batch holds; events apply in their order.
                let mut touched: BTreeMap<JobId, (Job, Job)> = BTreeMap::new();
                for e in &fresh {
                    // A function container's events are the functions domain's.
                    let Owner::Job(id) = e.event.owner() else {
                        continue;
                    };
                    // The node reports this member's end: a fence on it is settled.
                    if matches!(e.event, Event::Exited { .. } | Event::StartFailed { .. }) {
                        fences.remove(fence_key(node, id, e.event.generation()).as_bytes())?;
                    }
                    if !touched.contains_key(id) {
                        let Some(bytes) = jobs.get(id.as_str())? else {
                            continue;
                        };
                        let job: Job = serde_json::from_slice(&bytes).map_err(abort)?;
                        touched.insert(id.clone(), (job.clone(), job));
                    }
                    if let Some((_, job)) = touched.get_mut(id) {
                        apply(job, &e.event);
                    }
                }
                let mut written = BTreeMap::new();
                for (id, (before, mut job)) in touched {
                    if job != before {
                        bump(&mut job, &before);
                        let bytes = serde_json::to_vec(&job).map_err(abort)?;
                        jobs.insert(id.as_str(), bytes.clone())?;
                        written.insert(id, (job, bytes));
                    }
                }
                seqs.insert(key, &last.to_be_bytes())?;
                Ok(written)
            })
            .map_err(|err| match err {
                sled::transaction::TransactionError::Storage(e) => StoreError::Db(e),
                sled::transaction::TransactionError::Abort(reason) => {
                    StoreError::Corrupt(serde_json::Error::io(std::io::Error::other(reason)))
                }
            })?;
        for (job, bytes) in written.values() {
            self.index(job, bytes)?;
        }
        Ok(last)
    }

    /// Applies `change` to a job atomically and durably.
    pub fn update_job(&self, id: &JobId, change: impl Fn(&mut Job)) -> Result<Job, StoreError> {
        let job = self.update_job_deferred(id, change)?;
        self.commit()?;
        Ok(job)
    }

    /// Makes every write so far durable (shared with concurrent callers: group commit).
    pub fn commit(&self) -> Result<(), StoreError> {
        self.commits.commit(&self.db)?;
        self.changed.notify_waiters();
        Ok(())
    }

    /// Fires after each commit (register with `notified()` before reading what you wait on).
    pub fn changed(&self) -> &tokio::sync::Notify {
        &self.changed
    }

    /// Applies `change` to a job atomically; durable at the next [`Store::commit`] (the
    /// scheduler records a whole pass, then commits once).
    pub fn update_job_deferred(
        &self,
        id: &JobId,
        change: impl Fn(&mut Job),
    ) -> Result<Job, StoreError> {
        loop {
            let old = self
                .jobs
                .get(id.as_str())?
                .ok_or_else(|| StoreError::NotFound { id: id.clone() })?;
            let mut job: Job = serde_json::from_slice(&old)?;
            let before = job.clone();
            change(&mut job);
            if job != before {
                bump(&mut job, &before);
            }
            let new = serde_json::to_vec(&job)?;
            if self
                .jobs
                .compare_and_swap(id.as_str(), Some(old), Some(new.clone()))?
                .is_ok()
            {
                self.index(&job, &new)?;
                return Ok(job);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str) -> JobSpec {
        serde_json::from_value(serde_json::json!({"name": name, "image": "busybox"})).expect("spec")
    }

    /// Opens the store again right after dropping it: sled's background flusher may hold
    /// the database's file lock for a moment after the last handle is dropped.
    fn reopen(path: &Path) -> Store {
        (0..100)
            .find_map(|_| {
                Store::open(path).ok().or_else(|| {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                    None
                })
            })
            .expect("reopen")
    }

    #[test]
    fn concurrent_commits_share_flushes_and_all_return() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Store::open(dir.path()).expect("open");
        std::thread::scope(|scope| {
            for t in 0..8 {
                let s = &s;
                scope.spawn(move || {
                    for i in 0..25 {
                        s.create_job(spec(&format!("t{t}-{i}")), 1, None)
                            .expect("create");
                    }
                });
            }
        });
        let st = s.commits.state.lock().expect("lock");
        assert!(!st.running);
        assert!(st.started <= 200, "{} flushes", st.started);
        drop(st);
        drop(s);
        let s = reopen(dir.path());
        assert_eq!(s.active_jobs().expect("active").len(), 200);
    }

    #[test]
    fn jobs_survive_reopen_and_page_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ids: Vec<JobId> = {
            let s = Store::open(dir.path()).expect("open");
            (0..5)
                .map(|i| {
                    s.create_job(spec(&format!("j{i}")), 1, None)
                        .expect("create")
                        .0
                        .id
                })
                .collect()
        };
        // sled releases its file lock from a background thread after the drop; a real
        // restart is a new process, here we wait for the lock (bounded).
        let s = reopen(dir.path());
        let (page, more) = s
            .jobs(&JobFilter {
                limit: 2,
                ..Default::default()
            })
            .expect("list");
        assert_eq!(
            page.iter().map(|j| j.id.clone()).collect::<Vec<_>>(),
            ids[..2]
        );
        assert!(more);
        let (page, more) = s
            .jobs(&JobFilter {
                limit: 10,
                after: Some(ids[1].clone()),
                ..Default::default()
            })
            .expect("list");
        assert_eq!(page.len(), 3);
        assert!(!more);
    }

    #[test]
    fn only_live_work_is_in_the_active_index() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Store::open(dir.path()).expect("open");
        let a = s.create_job(spec("a"), 1, None).expect("create").0.id;
        let b = s.create_job(spec("b"), 1, None).expect("create").0.id;
        s.update_job(&a, |j| j.state = JobState::Succeeded)
            .expect("update");
        let ids = |s: &Store| {
            s.active_jobs()
                .expect("active")
                .into_iter()
                .map(|j| j.id)
                .collect::<Vec<_>>()
        };
        assert_eq!(ids(&s), std::slice::from_ref(&b));
        // An older version of a job indexed late (a racing writer) does not bring it back.
        let stale = s.job(&b).expect("b");
        s.update_job(&b, |j| j.state = JobState::Cancelled)
            .expect("cancel");
        let stale_bytes = serde_json::to_vec(&stale).expect("json");
        s.index(&stale, &stale_bytes).expect("index");
        assert!(ids(&s).is_empty());
        let c = s.create_job(spec("c"), 1, None).expect("create").0.id;
        // Rebuilt from the jobs at open.
        drop(s);
        let s = reopen(dir.path());
        assert_eq!(ids(&s), [c]);
    }

    #[test]
    fn idempotency_keys_replay_or_refuse() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Store::open(dir.path()).expect("open");
        let (a, created) = s
            .create_job(spec("a"), 1, Some(("k1", "hash-a")))
            .expect("create");
        assert!(created);
        let (b, created) = s
            .create_job(spec("a"), 2, Some(("k1", "hash-a")))
            .expect("replay");
        assert!(!created);
        assert_eq!(a, b);
        assert!(matches!(
            s.create_job(spec("other"), 3, Some(("k1", "hash-b"))),
            Err(StoreError::IdempotencyMismatch { .. })
        ));
        let (all, _) = s
            .jobs(&JobFilter {
                limit: 10,
                ..Default::default()
            })
            .expect("list");
        assert_eq!(all.len(), 1, "nothing half-written by the refused request");
    }
}
