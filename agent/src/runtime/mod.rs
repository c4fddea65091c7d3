//! The container runtime API the rest of the agent calls: start, stop, wait, status, list,
//! logs and remove, plus re-adoption of running containers after an agent restart.
//!
//! Each container is run by its own shim process (`shim.rs`), which outlives the agent.
//! The agent side is async and never calls libcontainer: it prepares the container
//! directory (OCI spec, shim config), starts the shim and waits for its ready line, then
//! watches the shim through a pidfd and reads the exit record the shim leaves behind.
//! Records of containers live in the local store (sled); exit status lives in the
//! container directory because the shim writes it.

mod adopt;
pub mod cgroup;
pub mod logs;
mod pool;
mod secrets;
pub mod shim;
pub mod spec;
mod types;

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gantry_shared::{ContainerId, Resources};
use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;
use tokio::sync::watch;

pub use logs::Stream;
pub use pool::{Forked, PreforkedShim, prefork};
pub use shim::files;
pub use types::*;

use crate::fsutil::{self, Durability};
use crate::gpu::{self, GpuConfig, GpuError};
use crate::image::{ImageError, ImageStore};
use crate::store::{LocalStore, StoreError, Table};

/// How long a shim that missed `start_timeout` still gets to finish its attempt before
/// the start is rolled back.
const REPORT_GRACE: Duration = Duration::from_secs(10);

/// Settings of the runtime.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Holds `containers/<id>/` and libcontainer's state (`libcontainer/`).
    pub state_dir: PathBuf,
    /// The binary run in shim mode (the agent binary itself).
    pub shim_binary: PathBuf,
    /// Per-stream log size at which a container's log rotates.
    pub log_cap_bytes: u64,
    /// How long to wait for a shim to report the container started.
    pub start_timeout: Duration,
    /// Where to find NVIDIA devices, driver files and CDI specs.
    pub gpu: GpuConfig,
    /// This host's GPUs are simulated: assigned indices set the visibility variables but
    /// no device is injected (there is none).
    pub simulated_gpus: bool,
    /// Parent of the containers' cgroups (`gantry/<hash of the state directory>`).
    pub cgroup_parent: String,
    /// Shims kept started ahead of time to cut container start latency (0: none, which
    /// suits one-shot processes such as the operator commands).
    pub shim_pool: usize,
    /// Re-adopt (or roll back) what earlier agents left at open. Off only for a one-shot
    /// `run`, which starts one new container and leaves the rest to the next agent.
    pub readopt: bool,
    /// Where a starting container's secrets (and its spec, which holds them) are written:
    /// a directory on a tmpfs, refused otherwise. The spec goes once the container runs,
    /// the files it mounts once it ends.
    pub secrets_dir: PathBuf,
}

impl RuntimeConfig {
    pub fn new(state_dir: impl Into<PathBuf>, shim_binary: impl Into<PathBuf>) -> Self {
        let state_dir = state_dir.into();
        let cgroup_parent = cgroup::parent_for(&state_dir);
        Self {
            secrets_dir: PathBuf::from("/dev/shm/gantry-secrets")
                .join(cgroup_parent.trim_start_matches("gantry/")),
            cgroup_parent,
            state_dir,
            shim_binary: shim_binary.into(),
            log_cap_bytes: 64 << 20,
            start_timeout: Duration::from_secs(60),
            gpu: GpuConfig::default(),
            simulated_gpus: false,
            shim_pool: 2,
            readopt: true,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("cannot hold a container's secrets in {path}: {message}")]
    Secrets { path: PathBuf, message: String },
    #[error(transparent)]
    Spec(#[from] spec::SpecError),
    #[error(transparent)]
    Gpu(#[from] GpuError),
    #[error("container `{id}` already exists; pick another id or remove it first")]
    Exists { id: ContainerId },
    #[error("no container `{id}` on this host")]
    NotFound { id: ContainerId },
    #[error("container `{id}` is still running; stop it before removing it")]
    StillRunning { id: ContainerId },
    #[error("container `{id}` failed to start: {message}")]
    StartFailed {
        id: ContainerId,
        message: String,
        user_error: bool,
    },
    #[error("runtime I/O error at {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> RuntimeError + '_ {
    move |source| RuntimeError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The persistent record of a container.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ContainerRecord {
    id: ContainerId,
    image: String,
    image_digest: String,
    gpus: Vec<u32>,
    /// What the container was given (absent in records written before this was kept).
    #[serde(default)]
    resources: Option<Resources>,
    /// The cluster attempt it runs (owner and generation), for the agent daemon; `None`
    /// for containers started by hand.
    #[serde(default)]
    attempt: Option<gantry_shared::AttemptRef>,
    /// Set once the shim reported; `None` while starting.
    started_at_ms: Option<u64>,
    exit: Option<ExitRecord>,
}

impl ContainerRecord {
    fn status(&self) -> ContainerStatus {
        let state = match &self.exit {
            Some(e) => ContainerState::Exited(e.clone()),
            None => ContainerState::Running {
                started_at_ms: self.started_at_ms.unwrap_or(0),
            },
        };
        ContainerStatus {
            id: self.id.clone(),
            image: self.image.clone(),
            image_digest: self.image_digest.clone(),
            gpus: self.gpus.clone(),
            resources: self.resources.clone(),
            attempt: self.attempt.clone(),
            state,
        }
    }
}

/// A live container the runtime tracks: its record and a channel that fires on exit.
struct Tracked {
    record: Mutex<ContainerRecord>,
    exit: watch::Sender<Option<ExitRecord>>,
}

/// The runtime. Cheap to clone.
#[derive(Clone)]
pub struct Runtime {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: RuntimeConfig,
    images: ImageStore,
    table: Table,
    host: spec::HostFacts,
    containers: Mutex<HashMap<ContainerId, Arc<Tracked>>>,
    pool: Arc<pool::ShimPool>,
}

impl Runtime {
    /// Opens the runtime and re-adopts every container a previous agent left: running
    /// ones are watched again, ones that exited meanwhile get their exit collected, and
    /// ones whose shim vanished are torn down and recorded as `shim_lost`.
    pub async fn open(
        cfg: RuntimeConfig,
        images: ImageStore,
        store: &LocalStore,
    ) -> Result<Self, RuntimeError> {
        for d in [
            cfg.state_dir.join("containers"),
            cfg.state_dir.join("libcontainer"),
        ] {
            std::fs::create_dir_all(&d).map_err(io_err(&d))?;
        }
        let nofile_hard =
            nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
                .map(|(_, hard)| hard)
                .unwrap_or(1024);
        let resolv_files = ["/etc/resolv.conf", "/etc/hosts"]
            .into_iter()
            .filter(|f| Path::new(f).is_file())
            .collect();
        let pool = pool::ShimPool::new(cfg.shim_binary.clone(), cfg.shim_pool);
        let rt = Self {
            inner: Arc::new(Inner {
                cfg,
                images,
                table: store.table("containers")?,
                host: spec::HostFacts {
                    nofile_hard,
                    resolv_files,
                },
                containers: Mutex::default(),
                pool,
            }),
        };
        if rt.inner.cfg.readopt {
            rt.readopt().await?;
        }
        rt.inner.pool.refill();
        Ok(rt)
    }

    /// Hands the runtime a shim forked before this process started threads; the next
    /// start uses it instead of spawning one.
    pub fn give_shim(&self, shim: PreforkedShim) {
        if let Some(idle) = shim.into_idle() {
            self.inner.pool.give(idle);
        }
    }

    /// The container's cgroup path, relative to the hierarchy roots.
    pub fn cgroup_path(&self, id: &ContainerId) -> String {
        cgroup::container_path(&self.inner.cfg.cgroup_parent, id.as_str())
    }

    /// What a container kept with `keep_upper` wrote (its overlay upper directory).
    pub fn upper_dir(&self, id: &ContainerId) -> PathBuf {
        self.container_dir(id).join(files::UPPER)
    }

    fn container_dir(&self, id: &ContainerId) -> PathBuf {
        self.inner
            .cfg
            .state_dir
            .join("containers")
            .join(id.as_str())
    }

    fn tracked(&self, id: &ContainerId) -> Result<Arc<Tracked>, RuntimeError> {
        self.lock()
            .get(id)
            .cloned()
            .ok_or_else(|| RuntimeError::NotFound { id: id.clone() })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ContainerId, Arc<Tracked>>> {
        self.inner
            .containers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Starts a container and returns once its process runs (or failed to start, in which
    /// case nothing of it is left on the host).
    pub async fn start(&self, req: ContainerRequest) -> Result<ContainerStatus, RuntimeError> {
        let id = req.id.clone().unwrap_or_else(ContainerId::generate);
        if req.secrets.is_empty() {
            return self.start_as(id, req, None).await;
        }
        // Secrets go to memory only: the spec (which holds the variables) is gone once the
        // container runs, the files it mounts once it ends.
        let memory = secrets::SecretsDir::create(&self.inner.cfg.secrets_dir, &id)?;
        let mut req = req;
        match memory.write(&req.secrets) {
            Ok(binds) => req.binds.extend(binds),
            Err(e) => {
                memory.remove();
                return Err(e);
            }
        }
        let result = self
            .start_as(id.clone(), req, Some(memory.spec_path()))
            .await;
        match &result {
            Ok(_) => memory.remove_spec(),
            Err(_) => memory.remove(),
        }
        let _ = std::fs::remove_file(self.container_dir(&id).join(files::SPEC));
        result
    }

    /// [`Runtime::start`] with the spec at `spec_at` (on memory, for secrets; linked from
    /// the container's directory) instead of in the container's directory.
    async fn start_as(
        &self,
        id: ContainerId,
        req: ContainerRequest,
        spec_at: Option<PathBuf>,
    ) -> Result<ContainerStatus, RuntimeError> {
        let image = self.inner.images.get(&req.image)?;
        let layers = self.inner.images.layer_dirs(&image)?;
        let gpus = if self.inner.cfg.simulated_gpus {
            gpu::inject::simulated(&req.gpus)?
        } else {
            gpu::injection(&req.gpus, &self.inner.cfg.gpu)?
        };
        if !req.gpus.is_empty() {
            tracing::info!(container = %id, gpus = ?req.gpus, driver = %gpus.source, "GPU edits");
        }
        let dir = self.container_dir(&id);
        let cgroup_path = self.cgroup_path(&id);
        let built = spec::build(&spec::SpecInput {
            id: &id,
            rootfs: &dir.join(files::ROOTFS),
            image_name: &image.name,
            image: &image.config,
            request: &req,
            gpus: &gpus,
            host: &self.inner.host,
            cgroup_path: &cgroup_path,
        })?;
        if !built.stripped_env.is_empty() {
            tracing::warn!(container = %id, vars = ?built.stripped_env, "dropped user-set GPU visibility variables; Gantry sets them from the assigned GPUs");
        }
        let record = ContainerRecord {
            id: id.clone(),
            image: image.name.clone(),
            image_digest: image.digest.clone(),
            gpus: req.gpus.clone(),
            resources: Some(req.resources.clone()),
            attempt: req.attempt.clone(),
            started_at_ms: None,
            exit: None,
        };
        let tracked = {
            let mut map = self.lock();
            if map.contains_key(&id) || dir.exists() {
                return Err(RuntimeError::Exists { id });
            }
            let t = Arc::new(Tracked {
                record: Mutex::new(record.clone()),
                exit: watch::channel(None).0,
            });
            map.insert(id.clone(), t.clone());
            t
        };
        let shim_cfg = ShimConfig {
            id: id.clone(),
            layers,
            libcontainer_root: self.inner.cfg.state_dir.join("libcontainer"),
            cgroup_path: cgroup_path.clone(),
            log_cap_bytes: self.inner.cfg.log_cap_bytes,
            timeout: req.timeout,
            stop_grace: req.stop_grace,
            user: req.user.clone().or_else(|| image.config.user.clone()),
            keep_upper: req.keep_upper,
        };
        let result = self
            .launch(&dir, &record, (&built.spec, spec_at.as_deref()), &shim_cfg)
            .await;
        self.inner.pool.refill();
        match result {
            Ok(ready) => {
                let mut rec = lock_record(&tracked);
                rec.started_at_ms = Some(ready.started_at_ms);
                // The container runs whatever happens here; its exit is persisted later.
                if let Err(e) = self.inner.table.put(id.as_str(), &*rec) {
                    tracing::error!(container = %id, error = %e, "cannot record start time");
                }
                let status = rec.status();
                drop(rec);
                self.watch(tracked, ready.pidfd, dir);
                Ok(status)
            }
            Err(e) => {
                // A shim that reported failure has cleaned up and removed its shim.pid;
                // one that timed out or vanished may have left a container behind.
                if dir.join(files::SHIM_PID).exists() {
                    self.roll_back(&dir).await;
                } else if let Err(rm) = fsutil::remove_dir_all_if_exists(&dir) {
                    tracing::error!(dir = %dir.display(), error = %rm, "cannot remove failed container");
                }
                self.lock().remove(&id);
                let _ = self.inner.table.remove(id.as_str());
                Err(e)
            }
        }
    }

    async fn launch(
        &self,
        dir: &Path,
        record: &ContainerRecord,
        (spec, spec_at): (&oci_spec::runtime::Spec, Option<&Path>),
        shim_cfg: &ShimConfig,
    ) -> Result<Launched, RuntimeError> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        // Process durability is enough: after a host crash there is no container to find.
        match spec_at {
            None => fsutil::write_json_atomic(&dir.join(files::SPEC), spec, Durability::Process)
                .map_err(io_err(dir))?,
            Some(at) => {
                fsutil::write_json_private(at, spec, Durability::Process).map_err(io_err(at))?;
                std::os::unix::fs::symlink(at, dir.join(files::SPEC)).map_err(io_err(dir))?;
            }
        }
        fsutil::write_json_atomic(&dir.join(files::SHIM_CONFIG), shim_cfg, Durability::Process)
            .map_err(io_err(dir))?;
        let binary = &self.inner.cfg.shim_binary;
        let ready_r = match self.inner.pool.take().map(|idle| idle.assign(dir)) {
            Some(Ok(ready)) => ready,
            Some(Err(e)) => {
                tracing::warn!(error = %e, "pre-started shim died while idle; spawning one");
                pool::spawn_for(binary, dir).map_err(io_err(binary))?
            }
            None => pool::spawn_for(binary, dir).map_err(io_err(binary))?,
        };
        // Recorded and flushed while the shim starts the container (and, for a one-shot
        // `run`, once the store it opens meanwhile is open): if the agent dies before the
        // flush lands, the restarted agent finds a directory without a record and rolls
        // the never-acknowledged start back (see `readopt`).
        self.inner.table.put_unflushed(record.id.as_str(), record)?;
        self.inner.table.flush().await?;
        let timeout = self.inner.cfg.start_timeout;
        let mut report = std::pin::pin!(read_line(ready_r));
        let line = match tokio::time::timeout(timeout, &mut report).await {
            Ok(line) => line.map_err(io_err(dir))?,
            Err(_) => {
                // Let the shim finish its attempt (report or die) before the caller rolls
                // the start back, so the roll-back does not race a shim still mounting.
                let _ = tokio::time::timeout(REPORT_GRACE, &mut report).await;
                return Err(RuntimeError::StartFailed {
                    id: record.id.clone(),
                    message: format!(
                        "shim did not report within {timeout:?}; see {}/shim.log",
                        dir.display()
                    ),
                    user_error: false,
                });
            }
        };
        let ready: ShimReady =
            serde_json::from_str(&line).map_err(|_| RuntimeError::StartFailed {
                id: record.id.clone(),
                message: format!(
                    "shim exited without reporting; see {}/shim.log",
                    dir.display()
                ),
                user_error: false,
            })?;
        match ready {
            ShimReady::Started {
                shim,
                started_at_ms,
                ..
            } => {
                let pidfd = match open_shim(shim) {
                    Some(fd) => Some(fd),
                    // The container ended at once: its shim recorded the exit and left.
                    None if dir.join(files::EXIT).is_file() => None,
                    None => {
                        return Err(RuntimeError::StartFailed {
                            id: record.id.clone(),
                            message: "shim vanished right after starting the container".into(),
                            user_error: false,
                        });
                    }
                };
                Ok(Launched {
                    pidfd,
                    started_at_ms,
                })
            }
            ShimReady::Failed { error, user_error } => Err(RuntimeError::StartFailed {
                id: record.id.clone(),
                message: error,
                user_error,
            }),
        }
    }

    /// Waits on the shim's pidfd in a task; on exit, collects the exit record.
    fn watch(&self, tracked: Arc<Tracked>, pidfd: Option<OwnedFd>, dir: PathBuf) {
        let rt = self.clone();
        tokio::spawn(async move {
            if let Some(pidfd) = pidfd {
                exited(pidfd).await;
            }
            // The shim writes exit.json before it exits; without one it died abnormally.
            let exit = match fsutil::read_json::<ExitRecord>(&dir.join(files::EXIT)) {
                Ok(Some(e)) => e,
                _ => rt.cleanup_lost(&dir).await,
            };
            rt.finish(&tracked, exit);
        });
    }

    fn finish(&self, tracked: &Tracked, exit: ExitRecord) {
        let mut rec = lock_record(tracked);
        secrets::SecretsDir::remove_for(&self.inner.cfg.secrets_dir, &rec.id);
        rec.exit = Some(exit.clone());
        if let Err(e) = self.inner.table.put(rec.id.as_str(), &*rec) {
            tracing::error!(container = %rec.id, error = %e, "cannot persist exit");
        }
        drop(rec);
        tracked.exit.send_replace(Some(exit));
    }

    /// Asks the container to stop: SIGTERM, then SIGKILL after `grace` (zero: SIGKILL
    /// now). Returns once it has exited.
    pub async fn stop(
        &self,
        id: &ContainerId,
        grace: Duration,
    ) -> Result<ExitRecord, RuntimeError> {
        let tracked = self.tracked(id)?;
        if tracked.exit.borrow().is_none() {
            self.control(id, &format!("stop {}\n", grace.as_millis()))?;
        }
        self.wait(id).await
    }

    /// Sends a signal to the container's main process.
    pub fn signal(&self, id: &ContainerId, signal: i32) -> Result<(), RuntimeError> {
        self.control(id, &format!("signal {signal}\n"))
    }

    fn control(&self, id: &ContainerId, cmd: &str) -> Result<(), RuntimeError> {
        let path = self.container_dir(id).join(files::CONTROL);
        write_control(&path, cmd).map_err(io_err(&path))
    }

    /// Waits for the container to exit.
    pub async fn wait(&self, id: &ContainerId) -> Result<ExitRecord, RuntimeError> {
        let mut rx = self.tracked(id)?.exit.subscribe();
        let exit = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| RuntimeError::NotFound { id: id.clone() })?;
        // `wait_for` returned, so the value is `Some`.
        exit.clone()
            .ok_or_else(|| RuntimeError::NotFound { id: id.clone() })
    }

    pub fn status(&self, id: &ContainerId) -> Result<ContainerStatus, RuntimeError> {
        let tracked = self.tracked(id)?;
        let status = lock_record(&tracked).status();
        Ok(status)
    }

    pub fn list(&self) -> Vec<ContainerStatus> {
        let mut all: Vec<ContainerStatus> = self
            .lock()
            .values()
            .map(|t| lock_record(t).status())
            .collect();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        all
    }

    /// The container's directory (logs live there).
    pub fn log_dir(&self, id: &ContainerId) -> Result<PathBuf, RuntimeError> {
        self.tracked(id)?;
        Ok(self.container_dir(id))
    }

    /// All retained output of one stream.
    pub fn logs(&self, id: &ContainerId, stream: Stream) -> Result<Vec<u8>, RuntimeError> {
        let dir = self.log_dir(id)?;
        logs::read_all(&dir, stream).map_err(io_err(&dir))
    }

    /// Follows a stream: awaits `sink` with each new chunk until the container has exited
    /// and its output is drained, or until `sink` returns false.
    pub async fn follow<F: std::future::Future<Output = bool>>(
        &self,
        id: &ContainerId,
        stream: Stream,
        mut sink: impl FnMut(Vec<u8>) -> F,
    ) -> Result<(), RuntimeError> {
        let dir = self.log_dir(id)?;
        let mut rx = self.tracked(id)?.exit.subscribe();
        let mut f = logs::Follower::new(&dir, stream);
        let mut buf = Vec::new();
        loop {
            let done = rx.borrow_and_update().is_some();
            f.poll(&mut buf).await.map_err(io_err(&dir))?;
            // The sink may wait (backpressure) and may end the follow (false).
            if !buf.is_empty() && !sink(std::mem::take(&mut buf)).await {
                return Ok(());
            }
            if done {
                return Ok(());
            }
            tokio::select! {
                _ = rx.changed() => {}
                _ = tokio::time::sleep(Duration::from_millis(25)) => {}
            }
        }
    }

    /// Removes an exited container's directory and record.
    pub fn remove(&self, id: &ContainerId) -> Result<(), RuntimeError> {
        let tracked = self.tracked(id)?;
        if tracked.exit.borrow().is_none() {
            return Err(RuntimeError::StillRunning { id: id.clone() });
        }
        let dir = self.container_dir(id);
        fsutil::remove_dir_all_if_exists(&dir).map_err(io_err(&dir))?;
        secrets::SecretsDir::remove_for(&self.inner.cfg.secrets_dir, id);
        self.inner.table.remove(id.as_str())?;
        self.lock().remove(id);
        Ok(())
    }
}

struct Launched {
    /// The shim, to watch; `None` when it had already ended (the container exited at once
    /// and its exit is recorded).
    pidfd: Option<OwnedFd>,
    started_at_ms: u64,
}

fn lock_record(t: &Tracked) -> std::sync::MutexGuard<'_, ContainerRecord> {
    t.record.lock().unwrap_or_else(|e| e.into_inner())
}

/// Resolves once the process behind `pidfd` has exited (a pidfd polls readable then).
async fn exited(pidfd: OwnedFd) {
    // SAFETY: the AsyncFd owns the OwnedFd, which stays open and unchanged until the
    // AsyncFd is dropped at the end of this function.
    match unsafe { AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE) } {
        Ok(fd) => {
            let _ = fd.readable().await;
        }
        Err(e) => {
            let (fd, error) = e.into_parts();
            tracing::warn!(%error, "pidfd cannot be registered; polling it");
            loop {
                let mut fds = [nix::poll::PollFd::new(
                    fd.as_fd(),
                    nix::poll::PollFlags::POLLIN,
                )];
                if nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO).unwrap_or(0) > 0 {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Writes one command to a shim's control FIFO. A FIFO nobody reads (ENXIO on a
/// non-blocking open) or a missing one means the shim is gone: nothing to tell it.
fn write_control(path: &Path, cmd: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
    {
        Ok(mut f) => f.write_all(cmd.as_bytes()),
        Err(e)
            if e.raw_os_error() == Some(libc::ENXIO)
                || e.kind() == std::io::ErrorKind::NotFound =>
        {
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// Reads the shim's one-line report (empty if it exited without one).
async fn read_line(fd: OwnedFd) -> std::io::Result<String> {
    use tokio::io::AsyncBufReadExt;
    let pipe = tokio::net::unix::pipe::Receiver::from_owned_fd(fd)?;
    let mut line = String::new();
    tokio::io::BufReader::new(pipe).read_line(&mut line).await?;
    Ok(line)
}

/// A pidfd on the shim named by `shim`, if that exact process is still alive.
fn open_shim(shim: ShimPid) -> Option<OwnedFd> {
    let fd = fsutil::pidfd_open(shim.pid).ok()?;
    // Opened first, checked second: if the start time still matches, the pidfd refers to
    // the shim and not to a process that reused its pid.
    fsutil::process_alive_since(shim.pid, shim.start_time).then_some(fd)
}

fn open_shim_from(dir: &Path) -> Option<OwnedFd> {
    let shim: ShimPid = fsutil::read_json(&dir.join(files::SHIM_PID))
        .ok()
        .flatten()?;
    open_shim(shim)
}
