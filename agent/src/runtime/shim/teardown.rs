//! Tearing a container down, after a normal exit or for a shim that was lost.

use std::fs::{self, File};
use std::io::{BufRead, BufReader};
use std::path::Path;

use libcontainer::container::Container;
use nix::mount::MntFlags;
use nix::sys::signal::Signal;
use nix::unistd::Pid;

use super::super::cgroup;
use super::super::types::{ExitRecord, ShimConfig};
use super::{files, init_tracing};
use crate::fsutil::{self, Durability};

/// Removes everything the container held on the host: libcontainer state and cgroups,
/// the rootfs mount, the writable layer and the control FIFO. Idempotent.
pub(super) fn teardown(dir: &Path, container: Option<Container>) -> Result<(), String> {
    let mut errors = Vec::new();
    let cfg: Option<ShimConfig> = fsutil::read_json(&dir.join(files::SHIM_CONFIG))
        .ok()
        .flatten();
    let container = container.or_else(|| {
        let c = cfg.as_ref()?;
        Container::load(c.libcontainer_root.join(c.id.as_str())).ok()
    });
    if let Some(mut c) = container
        && let Err(e) = c.delete(true)
    {
        errors.push(format!("deleting container: {e}"));
    }
    if let Some(cfg) = &cfg {
        // A lost shim's container may still have processes; libcontainer's delete kills
        // them when its state exists, this catches the rest.
        for pid in cgroup::pids(&cfg.cgroup_path) {
            let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        for d in cgroup::existing_dirs(&cfg.cgroup_path) {
            let _ = fs::remove_dir(&d);
        }
        let _ = fsutil::remove_dir_all_if_exists(&cfg.libcontainer_root.join(cfg.id.as_str()));
    }
    let rootfs = dir.join(files::ROOTFS);
    if is_mountpoint(&rootfs)
        && let Err(e) = nix::mount::umount2(&rootfs, MntFlags::MNT_DETACH)
    {
        errors.push(format!("unmounting {}: {e}", rootfs.display()));
    }
    // An image build's step keeps what its container wrote, for the agent to pack.
    let keep_upper = cfg.as_ref().is_some_and(|c| c.keep_upper);
    for d in [files::ROOTFS, files::UPPER, files::WORK] {
        if d == files::UPPER && keep_upper {
            continue;
        }
        if let Err(e) = fsutil::remove_dir_all_if_exists(&dir.join(d)) {
            errors.push(format!("removing {d}: {e}"));
        }
    }
    let _ = fs::remove_file(dir.join(files::CONTROL));
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}

/// True when `path` is a mount point in this mount namespace.
pub fn is_mountpoint(path: &Path) -> bool {
    let Ok(f) = File::open("/proc/self/mountinfo") else {
        return false;
    };
    let target = path.to_string_lossy();
    BufReader::new(f)
        .lines()
        .map_while(Result::ok)
        .any(|l| l.split(' ').nth(4) == Some(&*target))
}

/// `gantry-agent shim --cleanup DIR`: tear down after a shim that died without recording
/// an exit, and record the loss. Run by the agent; never calls into a running shim.
pub fn cleanup_lost(dir: &Path) -> i32 {
    init_tracing(dir);
    let cleanup_error = teardown(dir, None).err();
    let record = ExitRecord::shim_lost(cleanup_error);
    match fsutil::write_json_atomic(&dir.join(files::EXIT), &record, Durability::Host) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("gantry-agent shim --cleanup: cannot write exit record: {e}");
            1
        }
    }
}
