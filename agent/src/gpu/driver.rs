//! Finding the NVIDIA driver's user-space files on the host when there is no CDI spec:
//! through the dynamic linker's cache first (where `ldconfig` recorded the libraries,
//! wherever the distribution or the installer put them), then in a list of directories
//! when the cache is missing, unreadable or knows no driver library.

use std::path::{Path, PathBuf};

use super::ldcache::LdCache;

/// Driver libraries a CUDA workload needs: nvidia-container-toolkit's `compute` and
/// `utility` capabilities (Gantry's default), matched as name prefixes.
pub const LIBRARIES: &[&str] = &[
    // utility
    "libnvidia-ml.so",
    "libnvidia-cfg.so",
    "libnvidia-nscq.so",
    // compute
    "libcuda.so",
    "libcudadebugger.so",
    "libnvidia-ptxjitcompiler.so",
    "libnvidia-fatbinaryloader.so",
    "libnvidia-nvvm.so",
    "libnvidia-gpucomp.so",
    "libnvidia-allocator.so",
    "libnvidia-pkcs11.so",
    "libnvidia-pkcs11-openssl3.so",
];

/// Driver programs: the same capabilities' binaries.
pub const BINARIES: &[&str] = &[
    "nvidia-smi",
    "nvidia-debugdump",
    "nvidia-persistenced",
    "nvidia-cuda-mps-control",
    "nvidia-cuda-mps-server",
];

/// Why the fixed directories were searched instead of the linker cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fallback {
    /// The host has no cache file (no glibc, or `ldconfig` never ran).
    NoCache,
    /// The cache could not be read or parsed; `error` says how, for people.
    BadCache { error: String },
    /// The cache lists no driver library (the driver is installed outside the
    /// directories `ldconfig` knows).
    NoDriverInCache,
}

impl std::fmt::Display for Fallback {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NoCache => f.write_str("no linker cache"),
            Self::BadCache { error } => write!(f, "unusable linker cache: {error}"),
            Self::NoDriverInCache => f.write_str("the linker cache lists no NVIDIA library"),
        }
    }
}

/// Where the driver files were found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    LdCache { path: PathBuf },
    FixedDirs { why: Fallback },
}

impl std::fmt::Display for Found {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::LdCache { path } => write!(f, "linker cache {}", path.display()),
            Self::FixedDirs { why } => write!(f, "fixed directories ({why})"),
        }
    }
}

/// The driver's files on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriverFiles {
    pub found: Found,
    /// Host paths, one per file name (the first found wins), in discovery order.
    pub libraries: Vec<PathBuf>,
    pub binaries: Vec<PathBuf>,
}

/// Finds the driver's libraries through the cache at `ld_cache`, else in `lib_dirs`, and
/// its programs in `bin_dirs`.
pub fn discover(ld_cache: &Path, lib_dirs: &[PathBuf], bin_dirs: &[PathBuf]) -> DriverFiles {
    let why = match LdCache::read(ld_cache) {
        Ok(cache) => {
            let libraries = from_cache(&cache);
            if !libraries.is_empty() {
                return DriverFiles {
                    found: Found::LdCache {
                        path: ld_cache.to_owned(),
                    },
                    libraries,
                    binaries: binaries(bin_dirs),
                };
            }
            Fallback::NoDriverInCache
        }
        Err(e) if e.is_missing() => Fallback::NoCache,
        Err(e) => {
            tracing::warn!(error = %e, "falling back to fixed directories for the NVIDIA driver");
            Fallback::BadCache {
                error: e.to_string(),
            }
        }
    };
    DriverFiles {
        found: Found::FixedDirs { why },
        libraries: from_dirs(lib_dirs),
        binaries: binaries(bin_dirs),
    }
}

/// The cache's driver entries for this host's ABI that exist, plus the file each resolves
/// to (`libcuda.so.1` -> `libcuda.so.550.54.14`), one per file name.
fn from_cache(cache: &LdCache) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in cache.find(LIBRARIES) {
        if !entry.path.exists() {
            tracing::debug!(path = %entry.path.display(), "stale linker cache entry skipped");
            continue;
        }
        push_unique(&mut out, entry.path.clone());
        if let Ok(real) = std::fs::canonicalize(&entry.path) {
            push_unique(&mut out, real);
        }
    }
    out
}

/// Files in `dirs` named like a driver library, one per file name (earlier dirs win).
fn from_dirs(dirs: &[PathBuf]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        let mut here: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                let name = file_name(p);
                LIBRARIES.iter().any(|l| name.starts_with(l))
            })
            .collect();
        here.sort();
        for p in here {
            push_unique(&mut out, p);
        }
    }
    out
}

fn binaries(dirs: &[PathBuf]) -> Vec<PathBuf> {
    BINARIES
        .iter()
        .filter_map(|name| dirs.iter().map(|d| d.join(name)).find(|p| p.is_file()))
        .collect()
}

fn push_unique(out: &mut Vec<PathBuf>, path: PathBuf) {
    let name = file_name(&path);
    if !out.iter().any(|p| file_name(p) == name) {
        out.push(path);
    }
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::ldcache::tests::{cache_bytes, native_flags};

    fn touch(p: &Path) {
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(p, b"").expect("write");
    }

    #[test]
    fn cache_finds_driver_outside_the_usual_dirs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let lib = dir.path().join("usr/local/nvidia/lib64");
        touch(&lib.join("libcuda.so.550.54.14"));
        std::os::unix::fs::symlink("libcuda.so.550.54.14", lib.join("libcuda.so.1"))
            .expect("symlink");
        touch(&lib.join("libnvidia-ml.so.1"));
        touch(&lib.join("libc.so.6"));
        let bin = dir.path().join("bin");
        touch(&bin.join("nvidia-smi"));
        let s = |p: PathBuf| p.display().to_string();
        let cuda1 = s(lib.join("libcuda.so.1"));
        let ml = s(lib.join("libnvidia-ml.so.1"));
        let libc = s(lib.join("libc.so.6"));
        let gone = s(lib.join("libnvidia-cfg.so.1"));
        let native = native_flags();
        let cache = dir.path().join("ld.so.cache");
        std::fs::write(
            &cache,
            cache_bytes(
                &[
                    (native, "libcuda.so.1", &cuda1, 0),
                    (native, "libnvidia-ml.so.1", &ml, 0),
                    (native, "libc.so.6", &libc, 0),
                    (native, "libnvidia-cfg.so.1", &gone, 0),
                ],
                None,
            ),
        )
        .expect("write");
        let files = discover(
            &cache,
            &[dir.path().join("nowhere")],
            std::slice::from_ref(&bin),
        );
        assert_eq!(files.found, Found::LdCache { path: cache });
        let names: Vec<String> = files.libraries.iter().map(|p| file_name(p)).collect();
        assert_eq!(
            names,
            ["libcuda.so.1", "libcuda.so.550.54.14", "libnvidia-ml.so.1"],
            "the soname, the file it resolves to; no libc, no stale entry"
        );
        assert_eq!(files.binaries, vec![bin.join("nvidia-smi")]);
    }

    #[test]
    fn falls_back_to_fixed_dirs_and_says_why() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        touch(&a.join("libcuda.so.1"));
        touch(&b.join("libcuda.so.1"));
        touch(&b.join("libnvidia-ml.so.1"));
        touch(&b.join("libcudart.so.12"));
        let dirs = [a.clone(), b.clone()];
        let cache = dir.path().join("ld.so.cache");

        let files = discover(&cache, &dirs, &[]);
        assert_eq!(
            files.found,
            Found::FixedDirs {
                why: Fallback::NoCache
            }
        );
        assert_eq!(
            files.libraries,
            vec![a.join("libcuda.so.1"), b.join("libnvidia-ml.so.1")],
            "first directory wins a name; libcudart is the image's, not the driver's"
        );

        std::fs::write(&cache, b"garbage").expect("write");
        let files = discover(&cache, &dirs, &[]);
        let Found::FixedDirs {
            why: Fallback::BadCache { error },
        } = &files.found
        else {
            panic!("{:?}", files.found);
        };
        assert!(error.contains(&cache.display().to_string()), "{error}");
        assert_eq!(files.libraries.len(), 2);

        let libc = b.join("libc.so.6").display().to_string();
        std::fs::write(
            &cache,
            cache_bytes(&[(native_flags(), "libc.so.6", &libc, 0)], None),
        )
        .expect("write");
        assert_eq!(
            discover(&cache, &dirs, &[]).found,
            Found::FixedDirs {
                why: Fallback::NoDriverInCache
            }
        );
    }
}
