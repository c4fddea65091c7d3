//! The shim: `gantry-agent shim DIR` (or `shim --pooled`, which waits for DIR on stdin),
//! one per container, single-threaded, no tokio.
//!
//! It is the only code that calls libcontainer (which forks). Started by the agent with a
//! ready pipe as its stdout, it forks once and lets its parent exit, so it belongs to no
//! agent process and survives agent restarts; then it mounts the overlay rootfs, creates
//! and starts the container, and reports one JSON line on the ready pipe. `supervise`
//! then runs the container to its end and `teardown` removes what it held; the exit record
//! is written last. `shim --cleanup DIR` tears down after a lost shim.

mod supervise;
mod teardown;

use std::fs::{self, File};
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use libcontainer::container::Container;
use libcontainer::container::builder::ContainerBuilder;
use libcontainer::syscall::syscall::SyscallType;
use nix::fcntl::OFlag;
use nix::mount::MsFlags;
use nix::unistd::{ForkResult, Pid};

use super::spec::resolve_user;
use super::types::{ShimConfig, ShimPid, ShimReady, now_ms};
use crate::fsutil::{self, Durability};

/// The shim reports on its stdout (as containerd's shims print their address there),
/// which the agent connects to a pipe; afterwards stdout points at /dev/null.
const READY_FD: i32 = libc::STDOUT_FILENO;

/// Files in a container directory.
pub mod files {
    pub const SHIM_CONFIG: &str = "shim.json";
    pub const SHIM_PID: &str = "shim.pid";
    pub const EXIT: &str = "exit.json";
    pub const CONTROL: &str = "control";
    pub const SPEC: &str = "config.json";
    pub const ROOTFS: &str = "rootfs";
    pub const UPPER: &str = "upper";
    pub const WORK: &str = "work";
}

#[derive(Debug, thiserror::Error)]
enum ShimError {
    /// The image's user database has no such user or group: the user can fix the request.
    #[error(transparent)]
    User(#[from] super::spec::UserError),
    #[error("{path} is missing; the agent writes it before starting the shim")]
    Missing { path: PathBuf },
    #[error("image has no layers; pull or import it again")]
    NoLayers,
    #[error("libcontainer started the container but reported no pid")]
    NoPid,
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Sys { what: String, source: nix::Error },
    #[error("container runtime: {0}")]
    Container(#[from] libcontainer::error::LibcontainerError),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ShimError {
    let what = what.into();
    move |source| ShimError::Io { what, source }
}

fn sys(what: impl Into<String>) -> impl FnOnce(nix::Error) -> ShimError {
    let what = what.into();
    move |source| ShimError::Sys { what, source }
}

/// Where a shim learns its container directory.
pub enum Assignment<'a> {
    /// Given on the command line: the agent started this shim for one container.
    Now(&'a Path),
    /// Read from stdin once the agent needs a shim: a pre-started (pooled) shim. EOF on
    /// stdin means the agent no longer needs it (or died), and the shim exits.
    Later,
}

/// Entry point of shim mode. Returns the process exit code.
pub fn main(assignment: Assignment<'_>) -> i32 {
    // Take the ready pipe off stdout and leave /dev/null there, so nothing else (the
    // container's helpers, a panic) can write into it.
    let ready = match take_ready_pipe() {
        Ok(fd) => fd,
        Err(e) => {
            eprintln!(
                "gantry-agent shim: stdout is not the agent's ready pipe ({e}); the shim is started by the agent, not by hand"
            );
            return 2;
        }
    };
    // Detach: the parent returns at once (the agent reaps it); the child carries on in its
    // own session, so signals to the agent's process group never reach it.
    // SAFETY: the shim is single-threaded here; the child only continues this code.
    match unsafe { nix::unistd::fork() } {
        Ok(ForkResult::Parent { .. }) => return 0,
        Ok(ForkResult::Child) => {}
        Err(e) => {
            report(
                ready,
                &ShimReady::Failed {
                    error: format!("fork: {e}"),
                    user_error: false,
                },
            );
            return 1;
        }
    }
    let _ = nix::unistd::setsid();
    // Orphaned helpers (libcontainer's intermediate) are reparented to us, not to init.
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    let assigned;
    let dir = match assignment {
        Assignment::Now(dir) => dir,
        Assignment::Later => match wait_for_assignment() {
            Some(d) => {
                assigned = d;
                assigned.as_path()
            }
            None => return 0,
        },
    };
    init_tracing(dir);
    let started = match start(dir) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "container failed to start");
            if let Err(cleanup) = teardown(dir, None) {
                tracing::error!(error = %cleanup, "cleanup after failed start");
            }
            let _ = fs::remove_file(dir.join(files::SHIM_PID));
            let user_error = matches!(e, ShimError::User(_)) || is_user_error(&e);
            report(
                ready,
                &ShimReady::Failed {
                    error: describe(&e),
                    user_error,
                },
            );
            return 1;
        }
    };
    report(
        ready,
        &ShimReady::Started {
            shim: started.shim,
            init_pid: started.init_pid.as_raw(),
            started_at_ms: started.started_at_ms,
        },
    );
    let record = supervise(dir, started);
    if let Err(e) = fsutil::write_json_atomic(&dir.join(files::EXIT), &record, Durability::Host) {
        tracing::error!(error = %e, "cannot write exit record");
        return 1;
    }
    0
}

/// A pooled shim blocks here until the agent writes a container directory and closes its
/// end of stdin. `None`: the agent closed stdin without assigning anything.
fn wait_for_assignment() -> Option<PathBuf> {
    let mut line = String::new();
    let n = std::io::stdin().read_line(&mut line).ok()?;
    let dir = PathBuf::from(line.trim_end_matches('\n'));
    (n > 0 && dir.is_absolute()).then_some(dir)
}

/// The shim logs to `shim.log` in the container directory, through its own descriptor
/// and through fd 2 (for panics). Processes libcontainer forks from the shim get fd 2
/// replaced by the container's stderr, so their messages would otherwise reach the user;
/// the tracing writer's own descriptor is closed in them at exec.
///
/// A plain level, not an EnvFilter: parsing filter directives compiles regexes, which
/// costs milliseconds on every container start.
fn init_tracing(dir: &Path) {
    let Ok(file) = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(dir.join("shim.log"))
    else {
        return;
    };
    let _ = nix::unistd::dup2(file.as_raw_fd(), libc::STDERR_FILENO);
    let _ = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::INFO)
        .with_ansi(false)
        .with_writer(std::sync::Mutex::new(file))
        .try_init();
}

fn take_ready_pipe() -> nix::Result<OwnedFd> {
    let is_pipe =
        nix::sys::stat::fstat(READY_FD).map(|st| st.st_mode & libc::S_IFMT == libc::S_IFIFO)?;
    if !is_pipe {
        return Err(nix::errno::Errno::ENOTSUP);
    }
    let ready = nix::fcntl::fcntl(READY_FD, nix::fcntl::F_DUPFD_CLOEXEC(3))?;
    let null = nix::fcntl::open(
        "/dev/null",
        OFlag::O_WRONLY | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )?;
    nix::unistd::dup2(null, READY_FD)?;
    let _ = nix::unistd::close(null);
    // SAFETY: F_DUPFD_CLOEXEC returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(ready) })
}

/// libcontainer reports a missing executable as a validation error; that is the user's.
fn is_user_error(e: &ShimError) -> bool {
    let s = e.to_string();
    s.contains("not found in $PATH") || s.contains("does not have correct permissions")
}

fn describe(e: &ShimError) -> String {
    let s = e.to_string();
    // libcontainer says "... executable 'NAME' not found in $PATH"; keep the useful part.
    match s.find("executable '") {
        Some(i) if s.contains("not found in $PATH") => format!(
            "{}: the command does not exist in the image; check the image's contents and the command you passed",
            &s[i..]
        ),
        _ => s,
    }
}

fn report(ready: OwnedFd, msg: &ShimReady) {
    let mut f = File::from(ready);
    let mut line = serde_json::to_vec(msg).unwrap_or_default();
    line.push(b'\n');
    let _ = f.write_all(&line);
}

struct Started {
    shim: ShimPid,
    container: Container,
    init_pid: Pid,
    started_at_ms: u64,
    stdout: OwnedFd,
    stderr: OwnedFd,
    control: File,
    cfg: ShimConfig,
}

fn start(dir: &Path) -> Result<Started, ShimError> {
    let cfg: ShimConfig = fsutil::read_json(&dir.join(files::SHIM_CONFIG))
        .map_err(io("reading shim.json"))?
        .ok_or_else(|| ShimError::Missing {
            path: dir.join(files::SHIM_CONFIG),
        })?;
    let me = nix::unistd::getpid().as_raw();
    let shim = ShimPid {
        pid: me,
        start_time: fsutil::process_start_time(me).map_err(io("reading own start time"))?,
    };
    fsutil::write_json_atomic(&dir.join(files::SHIM_PID), &shim, Durability::Process)
        .map_err(io("writing shim.pid"))?;

    let t0 = Instant::now();
    let rootfs = dir.join(files::ROOTFS);
    mount_rootfs(dir, &cfg.layers)?;
    let mounted = t0.elapsed();
    if let Some(user) = &cfg.user {
        set_user(dir, &rootfs, user)?;
    }

    let (out_r, out_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(sys("pipe"))?;
    let (err_r, err_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(sys("pipe"))?;
    let devnull = File::open("/dev/null").map_err(io("opening /dev/null"))?;
    let control_path = dir.join(files::CONTROL);
    let _ = fs::remove_file(&control_path);
    nix::unistd::mkfifo(
        &control_path,
        nix::sys::stat::Mode::from_bits_truncate(0o600),
    )
    .map_err(sys("mkfifo control"))?;
    // Read-write so the FIFO never reports EOF when a writer goes away.
    let control = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(&control_path)
        .map_err(io("opening control fifo"))?;

    let mut container = ContainerBuilder::new(cfg.id.to_string(), SyscallType::Linux)
        .with_root_path(&cfg.libcontainer_root)?
        .with_stdin(OwnedFd::from(devnull))
        .with_stdout(out_w)
        .with_stderr(err_w)
        .validate_id()?
        .as_init(dir)
        .with_systemd(false)
        .with_detach(true)
        .build()?;
    let created = t0.elapsed();
    container.start()?;
    let started_at_ms = now_ms();
    let init_pid = container.pid().ok_or(ShimError::NoPid)?;
    tracing::info!(
        id = %cfg.id,
        pid = init_pid.as_raw(),
        mount_us = mounted.as_micros() as u64,
        create_us = created.as_micros() as u64,
        start_us = t0.elapsed().as_micros() as u64,
        "container started"
    );
    Ok(Started {
        shim,
        container,
        init_pid,
        started_at_ms,
        stdout: out_r,
        stderr: err_r,
        control,
        cfg,
    })
}

/// Mounts the overlay: image layers as lower dirs (top layer first), the container's own
/// upper and work dirs. Lower dirs are given relative to their common parent (we chdir
/// there) so images with many layers fit in the one-page mount data limit.
fn mount_rootfs(dir: &Path, layers: &[PathBuf]) -> Result<(), ShimError> {
    for d in [files::ROOTFS, files::UPPER, files::WORK] {
        fs::create_dir_all(dir.join(d)).map_err(io(format!("creating {d}")))?;
    }
    let parent = layers.first().and_then(|l| l.parent()).map(Path::to_owned);
    let relative = parent
        .as_ref()
        .is_some_and(|p| layers.iter().all(|l| l.parent() == Some(p)));
    let lower: Vec<String> = layers
        .iter()
        .rev()
        .map(|l| {
            if relative {
                l.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            } else {
                l.display().to_string()
            }
        })
        .collect();
    if lower.is_empty() {
        return Err(ShimError::NoLayers);
    }
    let data = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.join(":"),
        dir.join(files::UPPER).display(),
        dir.join(files::WORK).display()
    );
    let cwd = std::env::current_dir().map_err(io("getcwd"))?;
    if let (true, Some(p)) = (relative, &parent) {
        nix::unistd::chdir(p).map_err(sys(format!("chdir {}", p.display())))?;
    }
    let r = nix::mount::mount(
        Some("overlay"),
        &dir.join(files::ROOTFS),
        Some("overlay"),
        MsFlags::empty(),
        Some(data.as_str()),
    );
    let _ = nix::unistd::chdir(&cwd);
    r.map_err(sys("mounting overlay rootfs"))
}

fn set_user(dir: &Path, rootfs: &Path, user: &str) -> Result<(), ShimError> {
    let read = |p: &str| fs::read_to_string(rootfs.join(p)).unwrap_or_default();
    let resolved = resolve_user(user, &read("etc/passwd"), &read("etc/group"))?;
    // A container with secrets has its spec on memory (config.json links there): the
    // rewrite stays there too.
    let spec_path = fs::canonicalize(dir.join(files::SPEC)).map_err(io("finding config.json"))?;
    let mut spec: serde_json::Value = fsutil::read_json(&spec_path)
        .map_err(io("reading config.json"))?
        .ok_or_else(|| ShimError::Missing {
            path: spec_path.clone(),
        })?;
    spec["process"]["user"] = serde_json::json!({
        "uid": resolved.uid, "gid": resolved.gid, "additionalGids": resolved.additional_gids,
    });
    fsutil::write_json_atomic(&spec_path, &spec, Durability::Process)
        .map_err(io("writing config.json"))
}

use supervise::supervise;
use teardown::teardown;
pub use teardown::{cleanup_lost, is_mountpoint};
