//! Starting shims, and a small pool of pre-started ones.
//!
//! Spawning the agent binary in shim mode (exec, dynamic linking, the detaching fork) is
//! a few milliseconds of every container start. A pooled shim has done all of that ahead
//! of time and waits, detached, for a container directory on its stdin; starting a
//! container then costs one pipe write. Idle shims exit when their stdin closes, which
//! happens when the pool drops them or the agent dies, so they never outlive the agent
//! without a container. The pool refills in the background after each start.
//!
//! A one-shot `gantry-agent run` keeps no pool: it forks its one shim from itself at the
//! very start, while it is still single-threaded ([`prefork`]), so the shim is ready by
//! the time the store is open and costs neither an exec nor dynamic linking.

use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// A shim that has detached and waits for its container directory.
pub(super) struct IdleShim {
    assign: std::fs::File,
    ready: OwnedFd,
}

impl IdleShim {
    /// Hands the shim its container directory; returns the pipe its ready line arrives on.
    /// Fails (EPIPE) if the shim died while idle.
    pub(super) fn assign(mut self, dir: &Path) -> std::io::Result<OwnedFd> {
        let mut line = dir.as_os_str().as_encoded_bytes().to_vec();
        line.push(b'\n');
        self.assign.write_all(&line)?;
        Ok(self.ready)
    }
}

/// A shim [`prefork`] started from this process, for [`super::Runtime::give_shim`].
/// Dropped unused, it closes the shim's stdin and the shim exits.
pub struct PreforkedShim {
    idle: Option<IdleShim>,
    /// The forked process, which only forks the detached shim and exits; reaped when this
    /// is dropped.
    launcher: nix::unistd::Pid,
}

impl PreforkedShim {
    pub(super) fn into_idle(mut self) -> Option<IdleShim> {
        self.idle.take()
    }
}

impl Drop for PreforkedShim {
    /// The launcher exits right after its one fork, long before the caller is done
    /// opening its store, so the wait returns at once.
    fn drop(&mut self) {
        if let Err(e) = nix::sys::wait::waitpid(self.launcher, None) {
            tracing::warn!(error = %e, "reaping the pre-forked shim's launcher");
        }
    }
}

/// What [`prefork`] returns in each of the two processes.
pub enum Forked {
    /// The calling process, with a shim waiting for its container directory.
    Agent(PreforkedShim),
    /// The forked process has run shim mode to its end: exit with this code.
    Shim(i32),
}

/// Forks a pooled shim (`shim --pooled`, without the exec) from this process. Only for a
/// process that has not started any thread yet: the shim goes on to call libcontainer,
/// which forks, and a fork of a multi-threaded process could inherit locks held by
/// threads that do not exist in the child. Refused (`EBUSY`) when threads exist, and
/// (`EBADF`) when this process was started without stdin, stdout or stderr; the caller
/// then lets the runtime spawn its shim.
pub fn prefork() -> std::io::Result<Forked> {
    let threads = std::fs::read_dir("/proc/self/task")?.count();
    if threads != 1 {
        return Err(std::io::Error::from_raw_os_error(libc::EBUSY));
    }
    let (assign_r, assign_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let (ready_r, ready_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let null = std::fs::OpenOptions::new().write(true).open("/dev/null")?;
    // A descriptor that took the place of a closed standard one would be overwritten
    // while the child moves the pipes into place.
    if [assign_r.as_raw_fd(), ready_w.as_raw_fd(), null.as_raw_fd()]
        .iter()
        .any(|fd| *fd <= libc::STDERR_FILENO)
    {
        return Err(std::io::Error::from_raw_os_error(libc::EBADF));
    }
    // SAFETY: this process has a single thread (checked above), so the child is a
    // complete copy and may run any code.
    match unsafe { nix::unistd::fork() }? {
        nix::unistd::ForkResult::Parent { child } => Ok(Forked::Agent(PreforkedShim {
            idle: Some(IdleShim {
                assign: std::fs::File::from(assign_w),
                ready: ready_r,
            }),
            launcher: child,
        })),
        nix::unistd::ForkResult::Child => {
            // The descriptors `spawn_pooled` gives an exec'd shim: the assignment pipe as
            // stdin, the ready pipe as stdout, stderr to /dev/null (the shim logs to its
            // container directory once assigned). The agent's ends are closed, so the
            // shim sees EOF on stdin when the agent goes away without assigning it.
            drop((assign_w, ready_r));
            let moved = [
                (assign_r.as_raw_fd(), libc::STDIN_FILENO),
                (ready_w.as_raw_fd(), libc::STDOUT_FILENO),
                (null.as_raw_fd(), libc::STDERR_FILENO),
            ]
            .into_iter()
            .try_for_each(|(fd, to)| nix::unistd::dup2(fd, to).map(drop));
            drop((assign_r, ready_w, null));
            if moved.is_err() {
                // The agent reads EOF on the ready pipe: "shim exited without reporting".
                return Ok(Forked::Shim(2));
            }
            // SAFETY: prctl with a NUL-terminated name, so that `ps` shows a shim.
            unsafe { libc::prctl(libc::PR_SET_NAME, c"gantry-shim".as_ptr(), 0, 0, 0) };
            Ok(Forked::Shim(super::shim::main(
                super::shim::Assignment::Later,
            )))
        }
    }
}

pub(super) struct ShimPool {
    binary: PathBuf,
    size: usize,
    idle: Mutex<Vec<IdleShim>>,
    refilling: AtomicBool,
}

impl ShimPool {
    pub(super) fn new(binary: PathBuf, size: usize) -> Arc<Self> {
        Arc::new(Self {
            binary,
            size,
            idle: Mutex::default(),
            refilling: AtomicBool::new(false),
        })
    }

    /// Adds a shim started elsewhere (see [`prefork`]); it is used before pooled ones.
    pub(super) fn give(&self, shim: IdleShim) {
        self.idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(shim);
    }

    pub(super) fn take(&self) -> Option<IdleShim> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop()
    }

    /// Tops the pool up in the background (one refill task at a time).
    pub(super) fn refill(self: &Arc<Self>) {
        if self.size == 0 || self.refilling.swap(true, Ordering::AcqRel) {
            return;
        }
        let pool = self.clone();
        tokio::spawn(async move {
            while pool.idle.lock().unwrap_or_else(|e| e.into_inner()).len() < pool.size {
                match spawn_pooled(&pool.binary).await {
                    Ok(shim) => pool
                        .idle
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(shim),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot pre-start a shim; starts will spawn their own");
                        break;
                    }
                }
            }
            pool.refilling.store(false, Ordering::Release);
        });
    }
}

/// Spawns a shim for `dir` and returns the pipe its ready line arrives on. The first
/// shim process (which only forks the detached one) is reaped in the background, so the
/// caller's report deadline covers the whole start.
pub(super) fn spawn_for(binary: &Path, dir: &Path) -> std::io::Result<OwnedFd> {
    let (ready, child) = spawn(binary, |cmd| {
        cmd.arg(dir).stdin(Stdio::null());
    })?;
    tokio::spawn(wait(child));
    Ok(ready)
}

async fn spawn_pooled(binary: &Path) -> std::io::Result<IdleShim> {
    let (assign_r, assign_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let (ready, child) = spawn(binary, |cmd| {
        cmd.arg("--pooled").stdin(std::fs::File::from(assign_r));
    })?;
    wait(child).await;
    Ok(IdleShim {
        assign: std::fs::File::from(assign_w),
        ready,
    })
}

/// No pre_exec hook, so std can spawn with vfork semantics (cheap from a large,
/// multi-threaded agent); the ready pipe travels as the shim's stdout.
fn spawn(
    binary: &Path,
    args: impl FnOnce(&mut tokio::process::Command),
) -> std::io::Result<(OwnedFd, tokio::process::Child)> {
    let (ready_r, ready_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let mut cmd = tokio::process::Command::new(binary);
    cmd.arg("shim")
        .stdout(std::fs::File::from(ready_w))
        .stderr(Stdio::null());
    args(&mut cmd);
    let child = cmd.spawn()?;
    Ok((ready_r, child))
}

async fn wait(mut child: tokio::process::Child) {
    if let Err(e) = child.wait().await {
        tracing::warn!(error = %e, "waiting for the shim's launcher process");
    }
}
