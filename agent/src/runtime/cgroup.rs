//! The few cgroup facts the runtime reads itself (libcontainer creates and removes the
//! cgroups): where a container's cgroup lives and how many OOM kills it saw.
//!
//! Each runtime (state directory) gets its own parent, `gantry/<8 hex>`, so two agents on
//! one host (as `gantry dev` runs them) never share a container's cgroup.

use std::path::{Path, PathBuf};

const ROOT: &str = "/sys/fs/cgroup";

/// The cgroup parent of the runtime whose state lives in `state_dir`.
pub fn parent_for(state_dir: &Path) -> String {
    use sha2::{Digest, Sha256};
    let canonical = std::fs::canonicalize(state_dir).unwrap_or_else(|_| state_dir.to_owned());
    let hash = hex::encode(Sha256::digest(canonical.as_os_str().as_encoded_bytes()));
    format!("gantry/{}", &hash[..8])
}

/// The cgroup path (relative to each hierarchy's root) of a container.
pub fn container_path(parent: &str, id: &str) -> String {
    format!("{parent}/{id}")
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
pub fn oom_kills(rel: &str) -> Option<u64> {
    let (file, key) = if memory_is_v1() {
        (
            PathBuf::from(ROOT)
                .join("memory")
                .join(rel)
                .join("memory.oom_control"),
            "oom_kill",
        )
    } else {
        (
            PathBuf::from(ROOT).join(rel).join("memory.events"),
            "oom_kill",
        )
    };
    let text = std::fs::read_to_string(file).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.trim().parse().ok())
}

/// Every directory that holds the cgroup `rel`, in any hierarchy (for leak checks
/// and for tearing down after a lost shim).
pub fn existing_dirs(rel: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let direct = PathBuf::from(ROOT).join(rel);
    if direct.is_dir() {
        out.push(direct);
    }
    if let Ok(entries) = std::fs::read_dir(ROOT) {
        for e in entries.flatten() {
            let p = e.path().join(rel);
            if p.is_dir() && !out.contains(&p) {
                out.push(p);
            }
        }
    }
    out
}

/// Pids still in the cgroup `rel`, in any hierarchy.
pub fn pids(rel: &str) -> Vec<i32> {
    let mut pids: Vec<i32> = existing_dirs(rel)
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
