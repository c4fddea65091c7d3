//! Small filesystem helpers shared by the agent and the shim: atomic writes (the shim's
//! exit record must never be seen half-written) and a process-liveness handle (pidfd).

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

/// How much a write must survive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Survives a process crash (rename is atomic), not a host crash. For files that only
    /// matter while the host stays up: a host crash takes the containers with it.
    Process,
    /// Also survives power loss: fsync of the file and of its directory.
    Host,
}

/// Writes `bytes` to `path` atomically: a temp file in the same directory, then rename.
/// Readers see the old content or the new, never a prefix.
pub fn write_atomic(path: &Path, bytes: &[u8], durability: Durability) -> io::Result<()> {
    write_atomic_as(path, bytes, durability, None)
}

/// [`write_atomic`] with the file's permissions set to `mode` before it gets its name.
fn write_atomic_as(
    path: &Path,
    bytes: &[u8],
    durability: Durability,
    mode: Option<u32>,
) -> io::Result<()> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let mut f = File::create(&tmp)?;
    if let Some(mode) = mode {
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(fs::Permissions::from_mode(mode))?;
    }
    f.write_all(bytes)?;
    if durability == Durability::Host {
        f.sync_all()?;
    }
    drop(f);
    fs::rename(&tmp, path)?;
    if durability == Durability::Host {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Serializes `value` as JSON and writes it atomically.
pub fn write_json_atomic<T: serde::Serialize>(
    path: &Path,
    value: &T,
    durability: Durability,
) -> io::Result<()> {
    write_json_as(path, value, durability, None)
}

/// [`write_json_atomic`] for secrets: the file is readable and writable by its owner only
/// (0600), also when it replaces one that was not.
pub fn write_json_private<T: serde::Serialize>(
    path: &Path,
    value: &T,
    durability: Durability,
) -> io::Result<()> {
    write_json_as(path, value, durability, Some(0o600))
}

fn write_json_as<T: serde::Serialize>(
    path: &Path,
    value: &T,
    durability: Durability,
    mode: Option<u32>,
) -> io::Result<()> {
    let bytes = serde_json::to_vec_pretty(value).map_err(io::Error::other)?;
    write_atomic_as(path, &bytes, durability, mode)
}

/// Reads a JSON file; `Ok(None)` when it does not exist.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> io::Result<Option<T>> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {e}", path.display()),
            )
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Opens a pidfd for `pid`: readable once the process exits, and immune to pid reuse once
/// opened. Works for processes that are not our children (re-adopted shims).
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Sends `signal` through a pidfd (no pid-reuse race).
pub fn pidfd_send_signal(fd: &OwnedFd, signal: i32) -> io::Result<()> {
    // SAFETY: plain syscall on a valid pidfd; null siginfo and zero flags are allowed.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            signal,
            std::ptr::null::<u8>(),
            0,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// The kernel's start time of `pid` (field 22 of /proc/PID/stat, clock ticks since boot).
/// A pid plus its start time names one process for good, surviving pid reuse.
pub fn process_start_time(pid: i32) -> io::Result<u64> {
    stat_fields(pid)?
        .get(19)
        .and_then(|f| f.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("bad /proc/{pid}/stat")))
}

/// True when `pid` is the process that started at `start_time` and has not exited
/// (a zombie waiting to be reaped counts as exited).
pub fn process_alive_since(pid: i32, start_time: u64) -> bool {
    let Ok(fields) = stat_fields(pid) else {
        return false;
    };
    let running = !matches!(fields.first().map(String::as_str), Some("Z" | "X" | "x"));
    running && fields.get(19).and_then(|f| f.parse::<u64>().ok()) == Some(start_time)
}

/// Fields of /proc/PID/stat after the command name: index 0 is the state (field 3).
fn stat_fields(pid: i32) -> io::Result<Vec<String>> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    Ok(rest.split_whitespace().map(str::to_owned).collect())
}

/// Removes a directory tree, treating "already gone" as success.
pub fn remove_dir_all_if_exists(path: &Path) -> io::Result<()> {
    match fs::remove_dir_all(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_content() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("x.json");
        write_json_atomic(&p, &vec![1, 2], Durability::Host).expect("write");
        write_json_atomic(&p, &vec![3], Durability::Process).expect("write");
        let v: Option<Vec<i32>> = read_json(&p).expect("read");
        assert_eq!(v, Some(vec![3]));
        assert_eq!(
            fs::read_dir(dir.path()).expect("ls").count(),
            1,
            "no temp file left"
        );
    }

    #[test]
    fn read_json_missing_is_none() {
        let dir = tempfile::tempdir().expect("tempdir");
        let v: Option<u32> = read_json(&dir.path().join("nope")).expect("read");
        assert_eq!(v, None);
    }

    #[test]
    fn start_time_of_self_is_stable() {
        let me = std::process::id() as i32;
        let a = process_start_time(me).expect("stat");
        assert_eq!(a, process_start_time(me).expect("stat"));
        assert!(process_start_time(i32::MAX).is_err());
        assert!(process_alive_since(me, a));
        assert!(!process_alive_since(me, a + 1));
    }
}
