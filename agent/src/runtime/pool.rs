//! Starting shims, and a small pool of pre-started ones.
//!
//! Spawning the agent binary in shim mode (exec, dynamic linking, the detaching fork) is
//! a few milliseconds of every container start. A pooled shim has done all of that ahead
//! of time and waits, detached, for a container directory on its stdin; starting a
//! container then costs one pipe write. Idle shims exit when their stdin closes, which
//! happens when the pool drops them or the agent dies, so they never outlive the agent
//! without a container. The pool refills in the background after each start.

use std::io::Write;
use std::os::fd::OwnedFd;
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
