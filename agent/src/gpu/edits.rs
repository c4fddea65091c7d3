//! The pieces a GPU adds to a container, whichever way they were found (a CDI spec, the
//! linker cache, fixed directories): device nodes, read-only bind mounts of driver files,
//! and OCI hooks. Plain values; the runtime's spec builder turns them into the OCI spec.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// A character device to create in the container and allow in its device cgroup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceNode {
    /// Where it appears in the container.
    pub path: PathBuf,
    pub major: u64,
    pub minor: u64,
}

/// Why a host path is not a usable device node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeProblem {
    Missing,
    NotCharDevice,
}

impl DeviceNode {
    /// The character device at `host`, numbers read with stat() (never assumed), to appear
    /// at `container`.
    pub fn stat(host: &Path, container: PathBuf) -> Result<Self, NodeProblem> {
        let meta = std::fs::metadata(host).map_err(|_| NodeProblem::Missing)?;
        if !meta.file_type().is_char_device() {
            return Err(NodeProblem::NotCharDevice);
        }
        let rdev = meta.rdev();
        Ok(Self {
            path: container,
            major: libc::major(rdev) as u64,
            minor: libc::minor(rdev) as u64,
        })
    }
}

/// A host file or directory bind-mounted read-only (nosuid, nodev) into the container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub host: PathBuf,
    pub container: PathBuf,
}

/// When an OCI hook runs (the OCI runtime spec's hook names, which CDI uses too).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookStage {
    Prestart,
    CreateRuntime,
    CreateContainer,
    StartContainer,
    Poststart,
    Poststop,
}

impl HookStage {
    pub const ALL: [Self; 6] = [
        Self::Prestart,
        Self::CreateRuntime,
        Self::CreateContainer,
        Self::StartContainer,
        Self::Poststart,
        Self::Poststop,
    ];

    /// The name in the OCI spec's `hooks` object (and in a CDI spec's `hookName`).
    pub fn oci_name(self) -> &'static str {
        match self {
            Self::Prestart => "prestart",
            Self::CreateRuntime => "createRuntime",
            Self::CreateContainer => "createContainer",
            Self::StartContainer => "startContainer",
            Self::Poststart => "poststart",
            Self::Poststop => "poststop",
        }
    }

    pub fn from_oci_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.oci_name() == name)
    }
}

/// A program the OCI runtime (libcontainer) runs at `stage`, with the container's state on
/// its stdin: `nvidia-ctk hook update-ldcache` and the like, from a CDI spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hook {
    pub stage: HookStage,
    /// A host path.
    pub path: PathBuf,
    /// The full argv, `args[0]` included (the OCI convention).
    pub args: Vec<String>,
    pub env: Vec<String>,
    /// Seconds; the runtime's default when absent.
    pub timeout: Option<u32>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_reads_real_numbers_and_refuses_the_rest() {
        let null = DeviceNode::stat(Path::new("/dev/null"), "/dev/nvidia0".into()).expect("null");
        assert_eq!((null.major, null.minor), (1, 3));
        assert_eq!(null.path, PathBuf::from("/dev/nvidia0"));
        assert_eq!(
            DeviceNode::stat(Path::new("/nonexistent"), "/dev/x".into()),
            Err(NodeProblem::Missing)
        );
        assert_eq!(
            DeviceNode::stat(Path::new("/"), "/dev/x".into()),
            Err(NodeProblem::NotCharDevice)
        );
    }

    #[test]
    fn hook_names_round_trip() {
        for s in HookStage::ALL {
            assert_eq!(HookStage::from_oci_name(s.oci_name()), Some(s));
        }
        assert_eq!(HookStage::from_oci_name("prestop"), None);
    }
}
