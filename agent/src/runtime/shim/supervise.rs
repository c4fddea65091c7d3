//! Supervising a started container: one `poll` loop over its output pipes, the control
//! FIFO, a pidfd of its init and the timeout/kill deadlines, until init exits; then the
//! remaining output is drained and the exit is classified.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::signal::Signal;
use nix::sys::wait::{WaitStatus, waitpid};

use super::super::cgroup;
use super::super::logs::{CappedLog, Stream};
use super::super::types::{ExitReason, ExitRecord, now_ms};
use super::Started;
use super::teardown::teardown;
use crate::fsutil;

/// What the supervision loop is waiting for besides output.
struct Deadlines {
    timeout_at: Option<Instant>,
    kill_at: Option<Instant>,
    reason: Option<ExitReason>,
}

pub(super) fn supervise(dir: &Path, s: Started) -> ExitRecord {
    let cap = s.cfg.log_cap_bytes;
    let mut logs = [
        CappedLog::create(dir.join(Stream::Stdout.file_name()), cap),
        CappedLog::create(dir.join(Stream::Stderr.file_name()), cap),
    ];
    let pidfd = fsutil::pidfd_open(s.init_pid.as_raw()).ok();
    let mut dl = Deadlines {
        timeout_at: s.cfg.timeout.map(|t| Instant::now() + t),
        kill_at: None,
        reason: None,
    };
    let mut open = [true, true];
    let mut control_buf = Vec::new();
    let status = loop {
        let now = Instant::now();
        if dl.timeout_at.is_some_and(|t| now >= t) && dl.reason.is_none() {
            tracing::info!("timeout reached; stopping container");
            request_stop(&s, &mut dl, s.cfg.stop_grace, ExitReason::TimedOut);
        }
        if dl.kill_at.is_some_and(|t| now >= t) {
            let _ = nix::sys::signal::kill(s.init_pid, Signal::SIGKILL);
            dl.kill_at = None;
        }
        let next = [dl.timeout_at.filter(|_| dl.reason.is_none()), dl.kill_at]
            .into_iter()
            .flatten()
            .min();
        let wait_ms = next
            .map(|t| t.saturating_duration_since(now).as_millis().min(60_000) as u16)
            .unwrap_or(u16::MAX);
        let mut fds = vec![
            PollFd::new(s.control.as_fd(), PollFlags::POLLIN),
            PollFd::new(
                s.stdout.as_fd(),
                if open[0] {
                    PollFlags::POLLIN
                } else {
                    PollFlags::empty()
                },
            ),
            PollFd::new(
                s.stderr.as_fd(),
                if open[1] {
                    PollFlags::POLLIN
                } else {
                    PollFlags::empty()
                },
            ),
        ];
        if let Some(p) = &pidfd {
            fds.push(PollFd::new(p.as_fd(), PollFlags::POLLIN));
        }
        match nix::poll::poll(&mut fds, PollTimeout::from(wait_ms)) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => tracing::warn!(error = %e, "poll"),
        }
        let ready: Vec<bool> = fds
            .iter()
            .map(|f| f.revents().is_some_and(|r| !r.is_empty()))
            .collect();
        drop(fds);
        if ready[0] {
            for cmd in read_commands(&s.control, &mut control_buf) {
                handle_command(&s, &mut dl, &cmd);
            }
        }
        for (i, fd) in [&s.stdout, &s.stderr].into_iter().enumerate() {
            if ready[i + 1] && open[i] {
                open[i] = copy_once(fd.as_fd(), logs[i].as_mut().ok());
            }
        }
        let exited = if pidfd.is_some() {
            ready.get(3).copied().unwrap_or(false)
        } else {
            true
        };
        if exited {
            match waitpid(s.init_pid, Some(nix::sys::wait::WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => {}
                Ok(status) => break Some(status),
                Err(e) => {
                    tracing::error!(error = %e, "waitpid on container init");
                    break None;
                }
            }
            if pidfd.is_none() {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    };
    drain(&s, &mut open, &mut logs);
    let oom_kills = cgroup::oom_kills(&s.cfg.cgroup_path).unwrap_or(0);
    let (exit_code, signal) = match status {
        Some(WaitStatus::Exited(_, code)) => (Some(code), None),
        Some(WaitStatus::Signaled(_, sig, _)) => (None, Some(sig as i32)),
        _ => (None, None),
    };
    let failed = signal == Some(libc::SIGKILL) || exit_code.is_some_and(|c| c != 0);
    let reason = match dl.reason {
        Some(r) => r,
        None if oom_kills > 0 && failed => ExitReason::OomKilled,
        None if signal.is_some() => ExitReason::Signaled,
        None => ExitReason::Exited,
    };
    let started_at_ms = s.started_at_ms;
    let cleanup_error = teardown(dir, Some(s.container)).err();
    tracing::info!(?reason, ?exit_code, ?signal, oom_kills, "container exited");
    ExitRecord {
        reason,
        exit_code,
        signal,
        oom_killed: oom_kills > 0,
        started_at_ms,
        finished_at_ms: now_ms(),
        cleanup_error,
    }
}

fn request_stop(s: &Started, dl: &mut Deadlines, grace: Duration, reason: ExitReason) {
    if dl.reason.is_none() {
        dl.reason = Some(reason);
    }
    if grace.is_zero() {
        let _ = nix::sys::signal::kill(s.init_pid, Signal::SIGKILL);
        return;
    }
    let _ = nix::sys::signal::kill(s.init_pid, Signal::SIGTERM);
    let kill_at = Instant::now() + grace;
    dl.kill_at = Some(dl.kill_at.map_or(kill_at, |k| k.min(kill_at)));
}

/// Control protocol, one command per line: `stop <grace-ms>` or `signal <number>`.
fn handle_command(s: &Started, dl: &mut Deadlines, cmd: &str) {
    let mut parts = cmd.split_whitespace();
    match (
        parts.next(),
        parts.next().and_then(|n| n.parse::<u64>().ok()),
    ) {
        (Some("stop"), Some(ms)) => {
            request_stop(s, dl, Duration::from_millis(ms), ExitReason::Stopped)
        }
        (Some("signal"), Some(n)) => match Signal::try_from(n as i32) {
            Ok(sig) => {
                let _ = nix::sys::signal::kill(s.init_pid, sig);
            }
            Err(_) => tracing::warn!(cmd, "unknown signal"),
        },
        _ => tracing::warn!(cmd, "unknown control command"),
    }
}

fn read_commands(control: &File, buf: &mut Vec<u8>) -> Vec<String> {
    let mut chunk = [0u8; 512];
    loop {
        match (&*control).read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => break,
        }
    }
    let mut out = Vec::new();
    while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
        let line: Vec<u8> = buf.drain(..=pos).collect();
        out.push(String::from_utf8_lossy(&line).trim().to_owned());
    }
    out
}

/// Copies what is readable now into the log. Returns false at EOF.
fn copy_once(fd: BorrowedFd<'_>, log: Option<&mut CappedLog>) -> bool {
    let mut buf = [0u8; 64 * 1024];
    match nix::unistd::read(fd.as_raw_fd(), &mut buf) {
        Ok(0) => false,
        Ok(n) => {
            if let Some(log) = log
                && let Err(e) = log.write(&buf[..n])
            {
                tracing::warn!(error = %e, "writing container log");
            }
            true
        }
        Err(nix::errno::Errno::EINTR | nix::errno::Errno::EAGAIN) => true,
        Err(_) => false,
    }
}

/// After the container's init is gone: collect the rest of its output (bounded).
fn drain(s: &Started, open: &mut [bool; 2], logs: &mut [std::io::Result<CappedLog>; 2]) {
    let until = Instant::now() + Duration::from_secs(2);
    while open.iter().any(|o| *o) && Instant::now() < until {
        let pipes = [&s.stdout, &s.stderr];
        let mut fds: Vec<PollFd> = pipes
            .iter()
            .zip(open.iter())
            .map(|(fd, o)| {
                PollFd::new(
                    fd.as_fd(),
                    if *o {
                        PollFlags::POLLIN
                    } else {
                        PollFlags::empty()
                    },
                )
            })
            .collect();
        if nix::poll::poll(&mut fds, PollTimeout::from(100u16)).unwrap_or(0) == 0 {
            break;
        }
        let ready: Vec<bool> = fds
            .iter()
            .map(|f| f.revents().is_some_and(|r| !r.is_empty()))
            .collect();
        drop(fds);
        for (i, fd) in [&s.stdout, &s.stderr].into_iter().enumerate() {
            if ready[i] && open[i] {
                open[i] = copy_once(fd.as_fd(), logs[i].as_mut().ok());
            }
        }
    }
}
