//! Volumes: named directory trees that outlive containers, mounted into jobs' and
//! functions' containers at a path they choose. A volume is **local** (a directory under
//! one agent's state directory, optionally a loop-mounted ext4 image of a fixed size;
//! everything that mounts it runs on that node) or **shared** (a directory under a host
//! path every node declares alike, such as an NFS or CephFS mount; no affinity). Here:
//! names and paths, checked where they enter, how a spec names a volume, the records the
//! API shows, and the control messages an agent serves volumes by.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::ids::NodeId;

/// Volumes one job or function mounts at most.
pub const MAX_MOUNTS: usize = 16;
/// The smallest size a local volume may be given (an ext4 filesystem with its journal
/// needs a few MiB of its own).
pub const MIN_SIZE_BYTES: u64 = 16 << 20;
/// Entries one listing returns at most; a longer one says it was cut short.
pub const MAX_LIST_ENTRIES: usize = 10_000;
/// The longest path inside a volume, in bytes.
pub const MAX_PATH_BYTES: usize = 4096;

/// Container paths a volume may not cover: the kernel's and Gantry's own.
const RESERVED_MOUNTS: [&str; 5] = ["/proc", "/sys", "/dev", "/run/secrets", "/run/gantry"];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VolumeError {
    #[error(
        "volume name `{0}` is not valid: 1 to 63 lowercase letters, digits, `-`, `_` and \
         `.`, starting with a letter or digit"
    )]
    BadName(String),
    #[error("mount path `{path}` is not valid: {why}")]
    BadMountPath { path: String, why: &'static str },
    #[error(
        "mount path `{0}` is Gantry's or the kernel's (/proc, /sys, /dev, /run/secrets, \
         /run/gantry); mount the volume somewhere else, such as /data"
    )]
    ReservedMountPath(String),
    #[error("at most {MAX_MOUNTS} volumes per job or function; this mounts {0}")]
    TooManyMounts(usize),
    #[error("path `{path}` in a volume is not valid: {why}")]
    BadPath { path: String, why: &'static str },
    #[error(
        "a volume's size is at least 16M (its filesystem needs room of its own); {0} bytes \
         is too small"
    )]
    TooSmall(u64),
}

/// A volume's name, checked where it enters (it names a directory on agents).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct VolumeName(String);

impl VolumeName {
    pub fn new(name: impl Into<String>) -> Result<Self, VolumeError> {
        let name = name.into();
        let ok = (1..=63).contains(&name.len())
            && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.".contains(c));
        if ok {
            Ok(Self(name))
        } else {
            Err(VolumeError::BadName(name))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Where a volume appears in a container: an absolute path of plain components.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct MountPath(String);

impl MountPath {
    pub fn new(path: impl Into<String>) -> Result<Self, VolumeError> {
        let path = path.into();
        let bad = |why| VolumeError::BadMountPath {
            path: path.clone(),
            why,
        };
        if !path.starts_with('/') {
            return Err(bad("it must be absolute, such as /data"));
        }
        if path == "/" {
            return Err(bad("a volume cannot cover the whole root filesystem"));
        }
        if path.len() > 1024 || path.chars().any(char::is_control) {
            return Err(bad("at most 1024 bytes, no control characters"));
        }
        if path[1..]
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
        {
            return Err(bad("no empty, `.` or `..` components and no trailing `/`"));
        }
        if RESERVED_MOUNTS
            .iter()
            .any(|r| path == *r || path.strip_prefix(r).is_some_and(|s| s.starts_with('/')))
        {
            return Err(VolumeError::ReservedMountPath(path));
        }
        Ok(Self(path))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A path inside a volume, relative to its root: plain components joined by `/`, the
/// empty path being the root. A leading `/` is accepted and means the same.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct VolumePath(String);

impl VolumePath {
    pub fn new(path: impl Into<String>) -> Result<Self, VolumeError> {
        let raw = path.into();
        let bad = |why| VolumeError::BadPath {
            path: raw.clone(),
            why,
        };
        if raw.len() > MAX_PATH_BYTES || raw.chars().any(|c| c == '\0') {
            return Err(bad("at most 4096 bytes, no NUL"));
        }
        let mut parts = Vec::new();
        for c in raw.split('/').filter(|c| !c.is_empty() && *c != ".") {
            if c == ".." {
                return Err(bad("`..` would leave the volume"));
            }
            parts.push(c);
        }
        Ok(Self(parts.join("/")))
    }

    /// The volume's root.
    pub fn root() -> Self {
        Self(String::new())
    }

    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    /// Relative to the volume's root (`""` for the root itself).
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The last component, if not the root.
    pub fn file_name(&self) -> Option<&str> {
        self.0.rsplit('/').next().filter(|s| !s.is_empty())
    }

    /// `self/name`.
    pub fn join(&self, name: &str) -> Result<Self, VolumeError> {
        Self::new(format!("{}/{name}", self.0))
    }
}

/// `TryFrom<String>` (through `new`, whose error is `$e`), `Into<String>` and `Display` for
/// a checked string newtype: serde reads it with `try_from = "String"`.
macro_rules! string_newtype {
    ($t:ty, $e:ty) => {
        impl TryFrom<String> for $t {
            type Error = $e;
            fn try_from(s: String) -> Result<Self, Self::Error> {
                Self::new(s)
            }
        }
        impl From<$t> for String {
            fn from(n: $t) -> String {
                n.0
            }
        }
        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}
pub(crate) use string_newtype;
string_newtype!(VolumeName, VolumeError);
string_newtype!(MountPath, VolumeError);
string_newtype!(VolumePath, VolumeError);

/// Where a volume's files live.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case", tag = "backend")]
pub enum VolumeBackend {
    /// Under one node's state directory: what mounts it runs on that node. With a size,
    /// an ext4 image of that size, loop-mounted: a writer past it gets `ENOSPC`.
    Local {
        #[schema(value_type = String)]
        node: NodeId,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        size_bytes: Option<u64>,
    },
    /// Under the host path every node declares alike (`[volumes] shared_path`): any node
    /// with one may run what mounts it.
    Shared,
}

impl VolumeBackend {
    /// The node a local volume pins its users to.
    pub fn node(&self) -> Option<&NodeId> {
        match self {
            Self::Local { node, .. } => Some(node),
            Self::Shared => None,
        }
    }
}

/// A volume, as the coordinator records it and the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Volume {
    #[schema(value_type = String)]
    pub name: VolumeName,
    #[serde(flatten)]
    pub backend: VolumeBackend,
    pub created_at_ms: u64,
    /// Being deleted: nothing new may mount it (a delete interrupted by a coordinator
    /// restart is finished by deleting it again).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deleting: bool,
}

/// `GET /v1/volumes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VolumeList {
    pub volumes: Vec<Volume>,
}

/// `POST /v1/volumes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateVolume {
    #[schema(value_type = String)]
    pub name: VolumeName,
    /// A shared volume (on the nodes' `shared_path`); otherwise local to one node.
    #[serde(default)]
    pub shared: bool,
    /// The node a local volume lives on; the coordinator picks one when absent.
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub node: Option<NodeId>,
    /// A local volume's size limit (`10G`); without one it may fill its node's disk.
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub size: Option<crate::Parsed<crate::MemoryBytes>>,
}

/// A job's or function's volume: `"NAME"`, or the table the coordinator records, which
/// also says where the volume lives (filled in at submit or deploy; a value sent in is
/// replaced).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(from = "VolumeUseForm", into = "VolumeUseForm")]
pub struct VolumeUse {
    #[schema(value_type = String)]
    pub name: VolumeName,
    pub backend: Option<VolumeBackend>,
}

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum VolumeUseForm {
    Name(VolumeName),
    Table {
        name: VolumeName,
        #[serde(default, flatten)]
        backend: Option<VolumeBackend>,
    },
}

impl From<VolumeUseForm> for VolumeUse {
    fn from(f: VolumeUseForm) -> Self {
        match f {
            VolumeUseForm::Name(name) => Self {
                name,
                backend: None,
            },
            VolumeUseForm::Table { name, backend } => Self { name, backend },
        }
    }
}

impl From<VolumeUse> for VolumeUseForm {
    fn from(u: VolumeUse) -> Self {
        match u.backend {
            None => VolumeUseForm::Name(u.name),
            backend => VolumeUseForm::Table {
                name: u.name,
                backend,
            },
        }
    }
}

/// `volumes = { "/data" = "NAME" }` on a job or function.
pub type VolumeMounts = BTreeMap<MountPath, VolumeUse>;

/// Checks a job's or function's volumes: not too many.
pub fn check_mounts(mounts: &VolumeMounts) -> Result<(), VolumeError> {
    if mounts.len() > MAX_MOUNTS {
        return Err(VolumeError::TooManyMounts(mounts.len()));
    }
    Ok(())
}

/// What placement needs of a job's or function's volumes: the one node its local volumes
/// pin it to, and whether it needs a node with shared volume storage. `Err` names two
/// local volumes on different nodes (nothing could mount both).
pub fn placement_needs(mounts: &VolumeMounts) -> Result<(Option<NodeId>, bool), String> {
    let mut pin: Option<(&NodeId, &VolumeName)> = None;
    let mut shared = false;
    for u in mounts.values() {
        match &u.backend {
            Some(VolumeBackend::Local { node, .. }) => match pin {
                Some((other, first)) if other != node => {
                    return Err(format!(
                        "local volumes `{first}` (on node {other}) and `{}` (on node {node}) \
                         live on different nodes; no container can mount both",
                        u.name
                    ));
                }
                _ => pin = Some((node, &u.name)),
            },
            Some(VolumeBackend::Shared) => shared = true,
            None => {}
        }
    }
    Ok((pin.map(|(n, _)| n.clone()), shared))
}

/// One volume mount of a container, as its agent needs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeAttach {
    pub path: MountPath,
    pub name: VolumeName,
    pub backend: VolumeBackend,
}

/// The mounts of a spec whose backends the coordinator filled in (those it did not are
/// left out; submit and deploy refuse them).
pub fn attaches(mounts: &VolumeMounts) -> Vec<VolumeAttach> {
    mounts
        .iter()
        .filter_map(|(path, u)| {
            Some(VolumeAttach {
                path: path.clone(),
                name: u.name.clone(),
                backend: u.backend.clone()?,
            })
        })
        .collect()
}

/// What a listing entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
    Other,
}

/// One entry of `gantry volume ls`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VolumeEntry {
    /// Relative to the volume's root.
    pub path: String,
    pub kind: EntryKind,
    pub size_bytes: u64,
    /// Last modified (unix ms).
    pub modified_ms: u64,
}

/// `GET /v1/volumes/NAME/ls`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VolumeListing {
    pub entries: Vec<VolumeEntry>,
    /// More entries exist than the listing returns ([`MAX_LIST_ENTRIES`]).
    pub truncated: bool,
}

/// What the coordinator asks of the agent that holds a volume's files
/// (`Command::Volume`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "op")]
pub enum VolumeOp {
    /// Make the volume (its directory, and for a sized local one its filesystem). Done
    /// again for a volume that exists as asked is fine.
    Create,
    /// Remove the volume and everything in it (unmounted first). Refused `Busy` while a
    /// container has it mounted.
    Delete,
    /// The entries under `path` (a file: itself), all the way down with `recursive`.
    List { path: VolumePath, recursive: bool },
    /// After a `File` reply, the rest of the stream is the file's bytes.
    Read { path: VolumePath },
    /// The rest of the request stream is the file's bytes; it replaces `path` (creating
    /// its parent directories) only once all of them arrived.
    Write { path: VolumePath },
    /// Remove a file, or a directory with everything in it.
    Remove { path: VolumePath },
}

/// An agent's answer to a volume request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum VolumeReply {
    Done,
    Listing(VolumeListing),
    /// A file of `size_bytes` bytes follows.
    File {
        size_bytes: u64,
    },
    Failed(VolumeFailure),
}

/// Why a volume request failed; `message` says what to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct VolumeFailure {
    pub kind: FailureKind,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// The volume, or the path in it, does not exist.
    NotFound,
    /// The path is a directory where a file was meant, or the other way round, or leads
    /// out of the volume (a symbolic link pointing outside).
    BadPath,
    /// The volume is full.
    NoSpace,
    /// A container has it mounted.
    Busy,
    /// The node cannot serve volumes of this kind (no shared path, no mkfs.ext4).
    Unsupported,
    /// Anything else the filesystem said.
    Io,
}

impl VolumeFailure {
    pub fn new(kind: FailureKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_directory_safe() {
        for ok in ["data", "llama-3.1_weights", "0"] {
            assert!(VolumeName::new(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".", "..", "-x", "Data", "a/b", "a b", &"x".repeat(64)] {
            assert!(VolumeName::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn mount_paths_are_absolute_plain_and_not_reserved() {
        for ok in ["/data", "/root/.cache/huggingface", "/process", "/devices"] {
            assert!(MountPath::new(ok).is_ok(), "{ok}");
        }
        for bad in ["data", "/", "/data/", "/a//b", "/a/../etc", "/./a"] {
            assert!(
                matches!(MountPath::new(bad), Err(VolumeError::BadMountPath { .. })),
                "{bad:?}"
            );
        }
        for reserved in ["/proc", "/sys/fs", "/dev", "/run/secrets/x", "/run/gantry"] {
            assert!(
                matches!(
                    MountPath::new(reserved),
                    Err(VolumeError::ReservedMountPath(_))
                ),
                "{reserved:?}"
            );
        }
    }

    #[test]
    fn volume_paths_stay_inside() {
        assert_eq!(VolumePath::new("/a//b/./c").expect("ok").as_str(), "a/b/c");
        assert!(VolumePath::new("/").expect("root").is_root());
        assert_eq!(VolumePath::new("a/b").expect("ok").file_name(), Some("b"));
        assert_eq!(VolumePath::root().file_name(), None);
        for bad in ["../x", "a/../../b", "a/..", "a\0b"] {
            assert!(VolumePath::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn uses_read_as_a_name_or_a_table_and_keep_their_backend() {
        let mounts: VolumeMounts =
            toml::from_str("\"/data\" = \"weights\"\n\"/ckpt\" = { name = \"ckpt\" }\n")
                .expect("parses");
        assert!(mounts.values().all(|u| u.backend.is_none()));
        let node = NodeId::new("n1").expect("node");
        let resolved = VolumeUse {
            name: VolumeName::new("weights").expect("name"),
            backend: Some(VolumeBackend::Local {
                node: node.clone(),
                size_bytes: Some(1 << 30),
            }),
        };
        let json = serde_json::to_string(&resolved).expect("json");
        assert_eq!(
            serde_json::from_str::<VolumeUse>(&json).expect("back"),
            resolved
        );
        assert_eq!(
            serde_json::to_value(VolumeUse {
                backend: None,
                ..resolved.clone()
            })
            .expect("json"),
            serde_json::json!("weights")
        );
        // A bad mount path is refused as the map is read.
        assert!(toml::from_str::<VolumeMounts>("\"data\" = \"w\"\n").is_err());
    }

    #[test]
    fn placement_needs_pin_to_one_node_or_refuse() {
        let local = |n: &str, v: &str| VolumeUse {
            name: VolumeName::new(v).expect("name"),
            backend: Some(VolumeBackend::Local {
                node: NodeId::new(n).expect("node"),
                size_bytes: None,
            }),
        };
        let shared = VolumeUse {
            name: VolumeName::new("s").expect("name"),
            backend: Some(VolumeBackend::Shared),
        };
        let path = |p: &str| MountPath::new(p).expect("path");
        let mut m = VolumeMounts::new();
        assert_eq!(placement_needs(&m), Ok((None, false)));
        m.insert(path("/a"), local("n1", "a"));
        m.insert(path("/s"), shared);
        assert_eq!(
            placement_needs(&m),
            Ok((Some(NodeId::new("n1").expect("node")), true))
        );
        m.insert(path("/b"), local("n1", "b"));
        assert!(placement_needs(&m).is_ok());
        m.insert(path("/c"), local("n2", "c"));
        let err = placement_needs(&m).expect_err("two nodes");
        assert!(err.contains("different nodes"), "{err}");
    }
}
