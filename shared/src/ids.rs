//! Newtype identifiers. Ids end up in paths, cgroup names and hostnames, so they are
//! validated once at the edge and can be trusted everywhere after.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Why a string is not a valid id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{kind} id is empty; use 1 to {max} characters from [a-z0-9-]")]
    Empty { kind: &'static str, max: usize },
    #[error("{kind} id `{id}` is longer than {max} characters; use a shorter name")]
    TooLong {
        kind: &'static str,
        id: String,
        max: usize,
    },
    #[error(
        "{kind} id `{id}` contains `{ch}`; use only lowercase letters, digits and `-`, \
         not starting or ending with `-`"
    )]
    BadChar {
        kind: &'static str,
        id: String,
        ch: char,
    },
}

/// Containers are named by their id on the host: the id is the libcontainer id, part of the
/// cgroup path, the state directory name and the container's hostname (max 63, a DNS label).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ContainerId(String);

impl ContainerId {
    pub const MAX_LEN: usize = 63;

    pub fn new(id: impl Into<String>) -> Result<Self, IdError> {
        let id = id.into();
        validate_label("container", &id, Self::MAX_LEN)?;
        Ok(Self(id))
    }

    /// A fresh random id (`c-` plus 16 hex digits) for containers the caller did not name.
    pub fn generate() -> Self {
        Self(format!("c-{:016x}", random_u64()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A host in the cluster, named by its operator (`gpu-node-17`). The node's certificate
/// carries it as a DNS name, so it obeys DNS label rules (max 63).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct NodeId(String);

impl NodeId {
    pub const MAX_LEN: usize = 63;

    pub fn new(id: impl Into<String>) -> Result<Self, IdError> {
        let id = id.into();
        validate_label("node", &id, Self::MAX_LEN)?;
        Ok(Self(id))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Names one cluster; every control-plane handshake carries it so an agent can never
/// join the wrong cluster by a typo in an address.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ClusterId(String);

impl ClusterId {
    pub const MAX_LEN: usize = 63;

    pub fn new(id: impl Into<String>) -> Result<Self, IdError> {
        let id = id.into();
        validate_label("cluster", &id, Self::MAX_LEN)?;
        Ok(Self(id))
    }

    /// A fresh id (`gantry-` plus 16 hex digits).
    pub fn generate() -> Self {
        Self(format!("gantry-{:016x}", random_u64()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Generates `Display`, `FromStr` and the string conversions serde uses for an id type.
macro_rules! string_id {
    ($t:ty) => {
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.pad(&self.0)
            }
        }

        impl FromStr for $t {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::new(s)
            }
        }

        impl TryFrom<String> for $t {
            type Error = IdError;
            fn try_from(s: String) -> Result<Self, Self::Error> {
                Self::new(s)
            }
        }

        impl From<$t> for String {
            fn from(id: $t) -> Self {
                id.0
            }
        }
    };
}

string_id!(ContainerId);
string_id!(NodeId);
string_id!(ClusterId);

fn validate_label(kind: &'static str, id: &str, max: usize) -> Result<(), IdError> {
    if id.is_empty() {
        return Err(IdError::Empty { kind, max });
    }
    if id.len() > max {
        return Err(IdError::TooLong {
            kind,
            id: id.to_owned(),
            max,
        });
    }
    let bad = id
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
        .or_else(|| id.starts_with('-').then_some('-'))
        .or_else(|| id.ends_with('-').then_some('-'));
    match bad {
        Some(ch) => Err(IdError::BadChar {
            kind,
            id: id.to_owned(),
            ch,
        }),
        None => Ok(()),
    }
}

/// 64 random bits from the standard library's per-process random hasher seed mixed with
/// the clock; ids need uniqueness, not cryptographic strength.
fn random_u64() -> u64 {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    if let Ok(d) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        h.write_u128(d.as_nanos());
    }
    h.write_u32(std::process::id());
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_dns_labels() {
        assert!(ContainerId::new("train-7").is_ok());
        assert!(ContainerId::new("a").is_ok());
    }

    #[test]
    fn rejects_paths_and_uppercase() {
        for bad in ["", "../etc", "A", "-x", "x-", "a/b", &"x".repeat(64)] {
            assert!(ContainerId::new(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn generated_ids_are_valid_and_distinct() {
        let a = ContainerId::generate();
        let b = ContainerId::generate();
        assert_ne!(a, b);
        assert!(ContainerId::new(a.as_str()).is_ok());
    }

    #[test]
    fn node_and_cluster_ids_are_labels() {
        assert!(NodeId::new("gpu-node-17").is_ok());
        assert!(NodeId::new("gpu_node").is_err());
        let c = ClusterId::generate();
        assert_eq!(ClusterId::new(c.as_str()), Ok(c));
    }

    #[test]
    fn deserializing_validates() {
        let r: Result<ContainerId, _> = serde_json::from_str("\"../x\"");
        assert!(r.is_err());
    }
}
