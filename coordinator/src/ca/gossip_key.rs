//! The cluster's gossip key on the coordinator's disk: `gossip.key` beside the CA (base64,
//! mode 0600). Made from /dev/urandom by the first start that finds none (a new cluster,
//! or one created before gossip was authenticated), read by every start after, so it lives
//! as long as the cluster.

use std::path::Path;

use gantry_shared::GossipKey;

use super::{CaError, write_private};

const FILE: &str = "gossip.key";

/// Loads the gossip key from `dir`, or makes one.
pub(super) fn load_or_create(dir: &Path) -> Result<GossipKey, CaError> {
    let path = dir.join(FILE);
    let io = |source| CaError::Io {
        path: path.clone(),
        source,
    };
    if !path.exists() {
        let mut bytes = [0u8; GossipKey::LEN];
        std::io::Read::read_exact(
            &mut std::fs::File::open("/dev/urandom").map_err(io)?,
            &mut bytes,
        )
        .map_err(io)?;
        let key = GossipKey::from_bytes(bytes);
        write_private(&path, format!("{}\n", key.to_base64()).as_bytes()).map_err(io)?;
        tracing::info!(path = %path.display(), "made the cluster's gossip key");
        return Ok(key);
    }
    let text = std::fs::read_to_string(&path).map_err(io)?;
    GossipKey::parse(&text).map_err(|source| CaError::GossipKey { path, source })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn made_once_private_then_reloaded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = load_or_create(dir.path()).expect("make");
        let b = load_or_create(dir.path()).expect("reload");
        assert_eq!(a, b);
        let mode = std::fs::metadata(dir.path().join(FILE))
            .expect("file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let other = tempfile::tempdir().expect("tempdir");
        assert_ne!(load_or_create(other.path()).expect("make"), a, "random");
    }

    #[test]
    fn a_damaged_key_is_refused_not_replaced() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(FILE), "c2hvcnQ=\n").expect("write");
        let e = load_or_create(dir.path()).expect_err("damaged");
        assert!(matches!(e, CaError::GossipKey { .. }), "{e}");
        assert!(e.to_string().contains("restore it from backup"), "{e}");
    }
}
