//! The runtime's records: what a caller asks for, what the shim is told, and what the shim
//! reports back on disk. All of it is plain serde data so it can be written atomically and
//! read by a restarted agent.

use std::path::PathBuf;
use std::time::Duration;

use gantry_shared::{ContainerId, Resources};
use serde::{Deserialize, Serialize};

/// Which network namespace a container gets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NetworkMode {
    /// The host's network (what multi-node NCCL jobs need today).
    #[default]
    Host,
    /// A fresh network namespace with only loopback.
    Isolated,
}

/// A request to run one container.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContainerRequest {
    /// Chosen by the caller (the coordinator names containers after attempts) or generated.
    pub id: Option<ContainerId>,
    /// Image name as imported or pulled.
    pub image: String,
    /// Replaces the image's entrypoint (and then its cmd too, as Docker does).
    pub entrypoint: Option<Vec<String>>,
    /// Replaces the image's cmd.
    pub command: Option<Vec<String>>,
    /// `(KEY, VALUE)` pairs layered over the image's env. `NVIDIA_*` keys are stripped.
    pub env: Vec<(String, String)>,
    pub workdir: Option<String>,
    /// `user`, `uid`, `user:group` or `uid:gid`, resolved inside the image.
    pub user: Option<String>,
    pub resources: Resources,
    /// Host GPU indices assigned to this container.
    pub gpus: Vec<u32>,
    pub network: NetworkMode,
    /// Size of the container's /dev/shm (NCCL and dataloaders use it heavily).
    pub shm_bytes: u64,
    /// Wall-clock limit; the shim stops the container (SIGTERM, grace, SIGKILL) after it.
    #[serde(with = "humantime_serde")]
    pub timeout: Option<Duration>,
    /// Grace between SIGTERM and SIGKILL when the timeout fires.
    #[serde(with = "humantime_serde")]
    pub stop_grace: Duration,
    /// The cluster attempt this container runs, kept in its record; `None` for a
    /// container started by hand.
    #[serde(default)]
    pub attempt: Option<gantry_shared::AttemptRef>,
    /// Host directories the agent itself mounts (a function container's runtime API
    /// socket, its volumes); never taken from a user, whose host mounts are refused.
    #[serde(default)]
    pub binds: Vec<BindMount>,
    /// Secrets, as environment variables or files under `/run/secrets/NAME/`: written to
    /// memory only (the runtime's secrets directory, a tmpfs) and gone from the host once
    /// the container runs. Never serialized.
    #[serde(skip)]
    pub secrets: Vec<gantry_shared::secrets::SecretDelivery>,
    /// Keep what the container wrote (its overlay upper directory) after it exits, until
    /// it is removed: an image build's step packs it into a layer.
    #[serde(default)]
    pub keep_upper: bool,
}

/// A host directory bind-mounted into a container, `nosuid,nodev`, and `noexec` unless
/// `exec` (a volume: programs and environments kept in it run).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BindMount {
    pub source: PathBuf,
    /// Absolute path inside the container.
    pub destination: String,
    pub read_only: bool,
    #[serde(default)]
    pub exec: bool,
}

impl ContainerRequest {
    pub const DEFAULT_SHM: u64 = 64 << 20;

    pub fn new(image: impl Into<String>) -> Self {
        Self {
            id: None,
            image: image.into(),
            entrypoint: None,
            command: None,
            env: Vec::new(),
            workdir: None,
            user: None,
            resources: Resources::default(),
            gpus: Vec::new(),
            network: NetworkMode::Host,
            shm_bytes: Self::DEFAULT_SHM,
            timeout: None,
            stop_grace: Duration::from_secs(10),
            attempt: None,
            binds: Vec::new(),
            secrets: Vec::new(),
            keep_upper: false,
        }
    }
}

/// Why a container ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExitReason {
    /// The process exited by itself (any code).
    Exited,
    /// A signal killed it that nobody at Gantry sent.
    Signaled,
    /// The kernel's OOM killer killed it at the memory limit.
    OomKilled,
    /// Stopped on request.
    Stopped,
    /// Stopped because it ran past its timeout.
    TimedOut,
    /// Its shim disappeared without recording an exit (killed, host trouble); the
    /// container was torn down by the agent.
    ShimLost,
}

/// What the shim writes to `exit.json` when the container is gone and cleaned up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitRecord {
    pub reason: ExitReason,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub oom_killed: bool,
    /// Unix milliseconds.
    pub started_at_ms: u64,
    pub finished_at_ms: u64,
    /// Set when tearing down (cgroup, mount) failed; the agent retries cleanup.
    pub cleanup_error: Option<String>,
}

impl ExitRecord {
    /// The record for a container whose shim vanished without writing one.
    pub fn shim_lost(cleanup_error: Option<String>) -> Self {
        Self {
            reason: ExitReason::ShimLost,
            exit_code: None,
            signal: None,
            oom_killed: false,
            started_at_ms: 0,
            finished_at_ms: now_ms(),
            cleanup_error,
        }
    }

    /// The shell convention: the exit code, or 128 + signal.
    pub fn code(&self) -> i32 {
        self.exit_code
            .unwrap_or_else(|| 128 + self.signal.unwrap_or(0))
    }
}

/// The shim's instructions, written by the agent to `shim.json` before it starts the shim.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShimConfig {
    pub id: ContainerId,
    /// Unpacked image layers, bottom first (overlay lower dirs).
    pub layers: Vec<PathBuf>,
    /// libcontainer's state root.
    pub libcontainer_root: PathBuf,
    /// The container's cgroup, relative to the hierarchy roots.
    pub cgroup_path: String,
    /// Log file size at which it is rotated (one rotated file is kept).
    pub log_cap_bytes: u64,
    #[serde(with = "humantime_serde")]
    pub timeout: Option<Duration>,
    #[serde(with = "humantime_serde")]
    pub stop_grace: Duration,
    /// Unresolved user spec from the request or image, resolved by the shim against the
    /// image's /etc/passwd and /etc/group.
    pub user: Option<String>,
    /// Leave the writable layer (`upper/`) at teardown: an image build packs it.
    #[serde(default)]
    pub keep_upper: bool,
}

/// What the shim writes to `shim.pid` once it has detached: enough to find it again and
/// know it is still the same process after an agent restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShimPid {
    pub pid: i32,
    pub start_time: u64,
}

/// The shim's one-line answer on its ready pipe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShimReady {
    Started {
        shim: ShimPid,
        init_pid: i32,
        started_at_ms: u64,
    },
    Failed {
        error: String,
        user_error: bool,
    },
}

/// A container's state as the runtime reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum ContainerState {
    Running { started_at_ms: u64 },
    Exited(ExitRecord),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContainerStatus {
    pub id: ContainerId,
    pub image: String,
    pub image_digest: String,
    pub gpus: Vec<u32>,
    /// Limits it runs with (`None` for containers recorded by an older agent).
    pub resources: Option<Resources>,
    /// The cluster attempt it runs; `None` for a container started by hand.
    #[serde(default)]
    pub attempt: Option<gantry_shared::AttemptRef>,
    pub state: ContainerState,
}

pub use gantry_shared::now_ms;
