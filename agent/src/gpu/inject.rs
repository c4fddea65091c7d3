//! What the host offers to inject an assigned GPU into a container: the NVIDIA device
//! nodes (numbers read with stat(), never assumed) and the driver's user-space files to
//! bind-mount read-only. Simulated GPUs inject nothing but their indices.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// A character device to create in the container and allow in its device cgroup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceNode {
    pub path: PathBuf,
    pub major: u64,
    pub minor: u64,
}

/// Devices and driver files for one container's GPUs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GpuInjection {
    /// Host GPU indices, in the order given (container ordinal `i` is `indices[i]`).
    pub indices: Vec<u32>,
    pub devices: Vec<DeviceNode>,
    /// Host files bind-mounted read-only at the same path (driver libraries, nvidia-smi).
    pub driver_files: Vec<PathBuf>,
    /// The GPUs are simulated: no devices or driver files, and the container is told so.
    pub simulated: bool,
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
}

/// Where to look on the host. The real host uses [`HostPaths::default`]; tests point it at
/// a directory of their own device nodes.
#[derive(Debug, Clone)]
pub struct HostPaths {
    pub dev: PathBuf,
    pub lib_dirs: Vec<PathBuf>,
    pub bin_dirs: Vec<PathBuf>,
}

impl Default for HostPaths {
    fn default() -> Self {
        Self {
            dev: "/dev".into(),
            lib_dirs: [
                "/usr/lib/x86_64-linux-gnu",
                "/usr/lib64",
                "/lib/x86_64-linux-gnu",
                "/usr/lib",
            ]
            .map(PathBuf::from)
            .to_vec(),
            bin_dirs: ["/usr/bin", "/usr/local/bin"].map(PathBuf::from).to_vec(),
        }
    }
}

/// Driver user-space libraries a CUDA workload needs (what nvidia-container-cli mounts).
const DRIVER_LIB_PREFIXES: &[&str] = &[
    "libcuda.so",
    "libnvidia-ml.so",
    "libnvidia-ptxjitcompiler.so",
    "libnvidia-nvvm.so",
    "libnvidia-cfg.so",
    "libnvidia-gpucomp.so",
    "libnvidia-allocator.so",
    "libcudadebugger.so",
];
const DRIVER_BINARIES: &[&str] = &["nvidia-smi", "nvidia-debugdump"];

/// Simulated GPUs: only the indices (checked for repeats), never a device.
pub fn simulated(indices: &[u32]) -> Result<GpuInjection, GpuError> {
    let mut seen = std::collections::BTreeSet::new();
    if let Some(&index) = indices.iter().find(|&&i| !seen.insert(i)) {
        return Err(GpuError::Duplicate { index });
    }
    Ok(GpuInjection {
        indices: indices.to_vec(),
        simulated: !indices.is_empty(),
        ..GpuInjection::default()
    })
}

/// Resolves what to inject for `indices`. Empty `indices` inject nothing.
pub fn injection(indices: &[u32], host: &HostPaths) -> Result<GpuInjection, GpuError> {
    if indices.is_empty() {
        return Ok(GpuInjection::default());
    }
    let mut seen = std::collections::BTreeSet::new();
    let mut devices = Vec::new();
    for &index in indices {
        if !seen.insert(index) {
            return Err(GpuError::Duplicate { index });
        }
        let path = host.dev.join(format!("nvidia{index}"));
        devices.push(char_device(&path).ok_or(GpuError::NoDevice {
            index,
            path: path.clone(),
        })??);
    }
    // Control devices: nvidiactl is required, the UVM ones are present once nvidia-uvm loads.
    let ctl = host.dev.join("nvidiactl");
    devices.push(char_device(&ctl).ok_or(GpuError::NoDevice {
        index: indices[0],
        path: ctl,
    })??);
    for name in ["nvidia-uvm", "nvidia-uvm-tools"] {
        if let Some(d) = char_device(&host.dev.join(name)) {
            devices.push(d?);
        }
    }
    let mut driver_files = Vec::new();
    for dir in &host.lib_dirs {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if DRIVER_LIB_PREFIXES.iter().any(|p| name.starts_with(p)) {
                driver_files.push(e.path());
            }
        }
    }
    for dir in &host.bin_dirs {
        for name in DRIVER_BINARIES {
            let p = dir.join(name);
            if p.is_file() {
                driver_files.push(p);
            }
        }
    }
    driver_files.sort();
    driver_files.dedup();
    Ok(GpuInjection {
        indices: indices.to_vec(),
        devices,
        driver_files,
        simulated: false,
    })
}

/// `None` when the path does not exist.
fn char_device(path: &Path) -> Option<Result<DeviceNode, GpuError>> {
    let meta = std::fs::metadata(path).ok()?;
    if !meta.file_type().is_char_device() {
        return Some(Err(GpuError::NotCharDevice {
            path: path.to_owned(),
        }));
    }
    let rdev = meta.rdev();
    Some(Ok(DeviceNode {
        path: PathBuf::from("/dev").join(path.file_name().unwrap_or_default()),
        major: libc::major(rdev) as u64,
        minor: libc::minor(rdev) as u64,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::stat::{Mode, SFlag, makedev, mknod};

    fn fake_host(gpus: u32) -> (tempfile::TempDir, HostPaths) {
        let dir = tempfile::tempdir().expect("tempdir");
        let dev = dir.path().join("dev");
        let lib = dir.path().join("lib");
        std::fs::create_dir_all(&dev).expect("mkdir");
        std::fs::create_dir_all(&lib).expect("mkdir");
        for i in 0..gpus {
            mknod(
                &dev.join(format!("nvidia{i}")),
                SFlag::S_IFCHR,
                Mode::from_bits_truncate(0o666),
                makedev(195, i as u64),
            )
            .expect("mknod (needs root)");
        }
        mknod(
            &dev.join("nvidiactl"),
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o666),
            makedev(195, 255),
        )
        .expect("mknod");
        std::fs::write(lib.join("libcuda.so.550.54"), b"").expect("write");
        std::fs::write(lib.join("libc.so.6"), b"").expect("write");
        let host = HostPaths {
            dev,
            lib_dirs: vec![lib],
            bin_dirs: vec![],
        };
        (dir, host)
    }

    #[test]
    fn injects_assigned_devices_with_real_numbers() {
        let (_d, host) = fake_host(4);
        let inj = injection(&[2, 0], &host).expect("inject");
        let got: Vec<_> = inj
            .devices
            .iter()
            .map(|d| (d.path.display().to_string(), d.major, d.minor))
            .collect();
        assert_eq!(
            got,
            vec![
                ("/dev/nvidia2".into(), 195, 2),
                ("/dev/nvidia0".into(), 195, 0),
                ("/dev/nvidiactl".into(), 195, 255)
            ]
        );
        assert_eq!(
            inj.driver_files.len(),
            1,
            "only driver libraries: {:?}",
            inj.driver_files
        );
    }

    #[test]
    fn missing_gpu_is_a_clear_error() {
        let (_d, host) = fake_host(1);
        let err = injection(&[3], &host).expect_err("no nvidia3");
        assert!(err.to_string().contains("GPU 3 was requested"), "{err}");
        assert!(matches!(
            injection(&[0, 0], &host),
            Err(GpuError::Duplicate { index: 0 })
        ));
    }

    #[test]
    fn no_gpus_inject_nothing() {
        let host = HostPaths {
            dev: "/nonexistent".into(),
            lib_dirs: vec![],
            bin_dirs: vec![],
        };
        assert_eq!(injection(&[], &host).expect("ok"), GpuInjection::default());
    }
}
