//! What goes into a container for its assigned GPUs: device nodes, the driver's
//! user-space files (bind-mounted read-only), environment and hooks.
//!
//! Two ways to learn them, in order:
//! 1. A CDI spec of kind `nvidia.com/gpu` in the configured directories ([`super::cdi`]):
//!    the device named `N` for GPU `N` plus the spec's own edits, as written by
//!    `nvidia-ctk cdi generate`. Its hooks are handed to the OCI runtime unless
//!    `gpu.cdi_hooks` is off.
//! 2. Otherwise the host itself: `/dev/nvidiaN`, `nvidiactl` and the UVM devices (numbers
//!    read with stat(), never assumed), and the driver's libraries found through the
//!    linker cache or, failing that, fixed directories ([`super::driver`]). They are mounted
//!    into one container directory, [`CONTAINER_LIB_DIR`], which is added to
//!    `LD_LIBRARY_PATH` so the loader finds them whatever the image's distribution.
//!
//! Simulated GPUs inject nothing but their indices.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::cdi::{self, CdiError, Registry};
use super::driver::{self, Found};
use super::edits::NodeProblem;
pub use super::edits::{DeviceNode, Hook, HookStage, Mount};
use super::ldcache::LdCache;

/// Where driver libraries found on the host (not through CDI) appear in a container: the
/// directory nvidia-docker used, which CUDA images already list in `LD_LIBRARY_PATH`.
pub const CONTAINER_LIB_DIR: &str = "/usr/local/nvidia/lib64";
/// Where driver programs (`nvidia-smi`) appear in a container: on every image's `PATH`.
pub const CONTAINER_BIN_DIR: &str = "/usr/bin";

/// Devices and driver files for one container's GPUs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GpuInjection {
    /// Host GPU indices, in the order given (container ordinal `i` is `indices[i]`).
    pub indices: Vec<u32>,
    pub devices: Vec<DeviceNode>,
    /// Driver libraries and programs, read-only.
    pub mounts: Vec<Mount>,
    /// Environment from a CDI spec, in order (a later value for a name wins).
    pub env: Vec<(String, String)>,
    /// OCI hooks from a CDI spec (`nvidia-ctk hook update-ldcache`, ...).
    pub hooks: Vec<Hook>,
    /// Container directories appended to `LD_LIBRARY_PATH`: the loader finds the driver
    /// there without a cache update inside the container.
    pub library_path: Vec<PathBuf>,
    /// Where all this came from, for logs.
    pub source: DriverSource,
    /// The GPUs are simulated: no devices or driver files, and the container is told so.
    pub simulated: bool,
}

/// Where a container's GPU edits came from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum DriverSource {
    /// No GPUs.
    #[default]
    None,
    Simulated,
    /// CDI spec files; `hooks_skipped` hooks were left out (`gpu.cdi_hooks = false`).
    Cdi {
        specs: Vec<PathBuf>,
        hooks_skipped: usize,
    },
    /// The host's devices and driver files, found as `found` says.
    Host {
        found: Found,
        libraries: usize,
    },
}

impl std::fmt::Display for DriverSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::None => f.write_str("none"),
            Self::Simulated => f.write_str("simulated GPUs (nothing injected)"),
            Self::Cdi {
                specs,
                hooks_skipped,
            } => {
                let names: Vec<String> = specs.iter().map(|p| p.display().to_string()).collect();
                write!(f, "CDI spec {}", names.join(", "))?;
                if *hooks_skipped > 0 {
                    write!(f, " ({hooks_skipped} hooks skipped: gpu.cdi_hooks is off)")?;
                }
                Ok(())
            }
            Self::Host { found, libraries } => {
                write!(f, "{found}, {libraries} driver libraries")
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error(
        "GPU {index} was requested but {path} does not exist: this host has no such NVIDIA \
         device (is the driver loaded? `nvidia-smi -L` lists the GPUs); request only GPUs \
         the host has, or none"
    )]
    NoDevice { index: u32, path: PathBuf },
    #[error("{path} is not a character device; check the NVIDIA driver installation")]
    NotCharDevice { path: PathBuf },
    #[error("GPU {index} is listed twice; each GPU can be assigned once")]
    Duplicate { index: u32 },
    #[error(transparent)]
    Cdi(#[from] CdiError),
}

/// Where the agent looks for the GPUs' device nodes, driver files and CDI specs (the
/// `[gpu]` section of the agent's configuration).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GpuConfig {
    /// The device directory; only tests point it elsewhere.
    #[serde(skip, default = "default_dev")]
    pub dev: PathBuf,
    /// CDI spec directories, lowest priority first: a spec of kind `nvidia.com/gpu` there
    /// says what GPU containers get, and wins over looking for the driver.
    pub cdi_dirs: Vec<PathBuf>,
    /// Hand a CDI spec's hooks to the OCI runtime (they update the container's linker
    /// cache and create the driver's symlinks). Off: they are skipped, the libraries'
    /// directories go on `LD_LIBRARY_PATH` and their linker-cache names are mounted too.
    pub cdi_hooks: bool,
    /// The dynamic linker's cache, which says where the driver's libraries are.
    pub ld_cache: PathBuf,
    /// Searched for driver libraries when the linker cache is missing, unreadable or
    /// lists none.
    pub lib_dirs: Vec<PathBuf>,
    /// Searched, in order, for driver programs (`nvidia-smi`).
    pub bin_dirs: Vec<PathBuf>,
}

fn default_dev() -> PathBuf {
    "/dev".into()
}

impl Default for GpuConfig {
    fn default() -> Self {
        let triplet = if cfg!(target_arch = "aarch64") {
            "aarch64-linux-gnu"
        } else {
            "x86_64-linux-gnu"
        };
        Self {
            dev: default_dev(),
            cdi_dirs: cdi::DEFAULT_DIRS.map(PathBuf::from).to_vec(),
            cdi_hooks: true,
            ld_cache: "/etc/ld.so.cache".into(),
            lib_dirs: vec![
                format!("/usr/lib/{triplet}").into(),
                "/usr/lib64".into(),
                format!("/lib/{triplet}").into(),
                "/usr/local/nvidia/lib64".into(),
                "/usr/lib".into(),
            ],
            bin_dirs: ["/usr/bin", "/usr/local/bin", "/usr/local/nvidia/bin"]
                .map(PathBuf::from)
                .to_vec(),
        }
    }
}

/// Simulated GPUs: only the indices (checked for repeats), never a device.
pub fn simulated(indices: &[u32]) -> Result<GpuInjection, GpuError> {
    check_unique(indices)?;
    let simulated = !indices.is_empty();
    Ok(GpuInjection {
        indices: indices.to_vec(),
        simulated,
        source: if simulated {
            DriverSource::Simulated
        } else {
            DriverSource::None
        },
        ..GpuInjection::default()
    })
}

/// Resolves what to inject for `indices`. Empty `indices` inject nothing.
pub fn injection(indices: &[u32], cfg: &GpuConfig) -> Result<GpuInjection, GpuError> {
    if indices.is_empty() {
        return Ok(GpuInjection::default());
    }
    check_unique(indices)?;
    let registry = Registry::load(&cfg.cdi_dirs)?;
    if registry.is_empty() {
        from_host(indices, cfg)
    } else {
        from_cdi(indices, &registry, cfg)
    }
}

/// Where GPU containers' driver files would come from now, for the agent's start-up log.
pub fn probe(cfg: &GpuConfig) -> Result<DriverSource, GpuError> {
    let registry = Registry::load(&cfg.cdi_dirs)?;
    if !registry.is_empty() {
        return Ok(DriverSource::Cdi {
            specs: registry.files(),
            hooks_skipped: 0,
        });
    }
    let files = driver::discover(&cfg.ld_cache, &cfg.lib_dirs, &cfg.bin_dirs);
    Ok(DriverSource::Host {
        libraries: files.libraries.len(),
        found: files.found,
    })
}

fn check_unique(indices: &[u32]) -> Result<(), GpuError> {
    let mut seen = std::collections::BTreeSet::new();
    match indices.iter().find(|&&i| !seen.insert(i)) {
        Some(&index) => Err(GpuError::Duplicate { index }),
        None => Ok(()),
    }
}

fn from_cdi(
    indices: &[u32],
    registry: &Registry,
    cfg: &GpuConfig,
) -> Result<GpuInjection, GpuError> {
    let edits = registry.edits(indices)?;
    let mut mounts = edits.mounts;
    let mut library_path = Vec::new();
    let (hooks, hooks_skipped) = if cfg.cdi_hooks {
        (edits.hooks, 0)
    } else {
        let skipped = edits.hooks.len();
        if skipped > 0 {
            tracing::info!(
                specs = ?edits.specs,
                hooks = skipped,
                "CDI hooks skipped (gpu.cdi_hooks is off); driver libraries go on LD_LIBRARY_PATH under their linker-cache names instead"
            );
        }
        library_path = library_dirs(&mounts);
        mounts.extend(cache_names(&mounts, &cfg.ld_cache));
        (Vec::new(), skipped)
    };
    Ok(GpuInjection {
        indices: indices.to_vec(),
        devices: edits.devices,
        mounts,
        env: edits.env,
        hooks,
        library_path,
        source: DriverSource::Cdi {
            specs: edits.specs,
            hooks_skipped,
        },
        simulated: false,
    })
}

fn from_host(indices: &[u32], cfg: &GpuConfig) -> Result<GpuInjection, GpuError> {
    let mut devices = Vec::new();
    for &index in indices {
        devices.push(device(cfg, &format!("nvidia{index}"), index)?);
    }
    // Control devices: nvidiactl is required, the UVM ones are present once nvidia-uvm loads.
    devices.push(device(cfg, "nvidiactl", indices[0])?);
    for name in ["nvidia-uvm", "nvidia-uvm-tools"] {
        match device(cfg, name, indices[0]) {
            Ok(d) => devices.push(d),
            Err(GpuError::NoDevice { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    let files = driver::discover(&cfg.ld_cache, &cfg.lib_dirs, &cfg.bin_dirs);
    if files.libraries.is_empty() {
        tracing::warn!(found = %files.found, "no NVIDIA driver library found; CUDA will not work in GPU containers (install the driver, run ldconfig, or set gpu.lib_dirs)");
    }
    let into = |dir: &str, host: &PathBuf| Mount {
        host: host.clone(),
        container: Path::new(dir).join(host.file_name().unwrap_or_default()),
    };
    let mut mounts: Vec<Mount> = files
        .libraries
        .iter()
        .map(|l| into(CONTAINER_LIB_DIR, l))
        .collect();
    mounts.extend(files.binaries.iter().map(|b| into(CONTAINER_BIN_DIR, b)));
    let library_path = if files.libraries.is_empty() {
        Vec::new()
    } else {
        vec![PathBuf::from(CONTAINER_LIB_DIR)]
    };
    Ok(GpuInjection {
        indices: indices.to_vec(),
        devices,
        mounts,
        env: Vec::new(),
        hooks: Vec::new(),
        library_path,
        source: DriverSource::Host {
            libraries: files.libraries.len(),
            found: files.found,
        },
        simulated: false,
    })
}

/// `/dev/<name>` of the host as the container's `/dev/<name>`.
fn device(cfg: &GpuConfig, name: &str, index: u32) -> Result<DeviceNode, GpuError> {
    let path = cfg.dev.join(name);
    DeviceNode::stat(&path, Path::new("/dev").join(name)).map_err(|p| match p {
        NodeProblem::Missing => GpuError::NoDevice { index, path },
        NodeProblem::NotCharDevice => GpuError::NotCharDevice { path },
    })
}

fn is_library(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("lib") && n.contains(".so"))
}

/// The container directories holding mounted libraries.
fn library_dirs(mounts: &[Mount]) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    for m in mounts.iter().filter(|m| is_library(&m.container)) {
        if let Some(dir) = m
            .container
            .parent()
            .filter(|d| !dirs.iter().any(|x| x == d))
        {
            dirs.push(dir.to_owned());
        }
    }
    dirs
}

/// What a skipped `update-ldcache` / `create-symlinks` hook would have provided: each
/// mounted library also under the names the host's linker cache gives the same file
/// (`libcuda.so.1` for `libcuda.so.550.54.14`), next to it. None without a cache.
fn cache_names(mounts: &[Mount], ld_cache: &Path) -> Vec<Mount> {
    let cache = match LdCache::read(ld_cache) {
        Ok(c) => c,
        Err(e) => {
            tracing::info!(error = %e, "no linker cache to name CDI libraries by; only their own names are mounted");
            return Vec::new();
        }
    };
    let mut out: Vec<Mount> = Vec::new();
    for m in mounts.iter().filter(|m| is_library(&m.container)) {
        let (Ok(real), Some(dir), Some(name)) = (
            std::fs::canonicalize(&m.host),
            m.container.parent(),
            m.container.file_name().and_then(|n| n.to_str()),
        ) else {
            continue;
        };
        // Only names of the same library (`libcuda.so*` for `libcuda.so.550.54.14`).
        let stem = name.find(".so").map_or(name, |i| &name[..i + 3]);
        for entry in cache.find(&[stem]) {
            if std::fs::canonicalize(&entry.path).ok().as_ref() != Some(&real) {
                continue;
            }
            let container = dir.join(&entry.name);
            let taken = mounts.iter().chain(&out).any(|x| x.container == container);
            if !taken {
                out.push(Mount {
                    host: m.host.clone(),
                    container,
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests;
