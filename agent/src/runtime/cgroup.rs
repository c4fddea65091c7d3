//! The few cgroup facts the runtime reads itself (libcontainer creates and removes the
//! cgroups): where a container's cgroup lives and how many OOM kills it saw.

use std::path::{Path, PathBuf};

const ROOT: &str = "/sys/fs/cgroup";

/// The cgroup path (relative to each hierarchy's root) of a container.
pub fn container_path(id: &str) -> String {
    format!("gantry/{id}")
}

/// True when the memory controller is on a v1 hierarchy (legacy or hybrid layout), which
/// is how libcontainer then manages it.
fn memory_is_v1() -> bool {
    Path::new(ROOT)
        .join("memory")
        .join("memory.limit_in_bytes")
        .exists()
}

/// OOM kills recorded in the container's memory cgroup (v1 `memory.oom_control`, v2
/// `memory.events`); `None` if the cgroup is gone or the kernel does not count them.
pub fn oom_kills(id: &str) -> Option<u64> {
    let rel = container_path(id);
    let (file, key) = if memory_is_v1() {
        (
            PathBuf::from(ROOT)
                .join("memory")
                .join(&rel)
                .join("memory.oom_control"),
            "oom_kill",
        )
    } else {
        (
            PathBuf::from(ROOT).join(&rel).join("memory.events"),
            "oom_kill",
        )
    };
    let text = std::fs::read_to_string(file).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.trim().parse().ok())
}

/// Every directory that holds this container's cgroup, in any hierarchy (for leak checks
/// and for tearing down after a lost shim).
pub fn existing_dirs(id: &str) -> Vec<PathBuf> {
    let rel = container_path(id);
    let mut out = Vec::new();
    let direct = PathBuf::from(ROOT).join(&rel);
    if direct.is_dir() {
        out.push(direct);
    }
    if let Ok(entries) = std::fs::read_dir(ROOT) {
        for e in entries.flatten() {
            let p = e.path().join(&rel);
            if p.is_dir() && !out.contains(&p) {
                out.push(p);
            }
        }
    }
    out
}

/// Pids still in the container's cgroups.
pub fn pids(id: &str) -> Vec<i32> {
    let mut pids: Vec<i32> = existing_dirs(id)
        .iter()
        .filter_map(|d| std::fs::read_to_string(d.join("cgroup.procs")).ok())
        .flat_map(|s| {
            s.lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect::<Vec<_>>()
        })
        .collect();
    pids.sort_unstable();
    pids.dedup();
    pids
}
