//! The cluster's gossip key on the agent: a node gets it at join and keeps it with its
//! identity. A node that joined before gossip was authenticated has none: before it starts
//! gossiping it says hello once (without a gossip address yet) and keeps the key the
//! welcome carries ([`learn`]). Every later welcome is compared with the key in use
//! ([`compare`]): the coordinator's key changes only if its `gossip.key` was replaced, and
//! then the new one is stored and used from this agent's next start.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use gantry_shared::GossipKey;
use tokio_util::sync::CancellationToken;

use super::DaemonError;
use super::session::{MAX_BACKOFF, fatal};
use crate::control::{self, HelloInfo, NodeIdentity, Session};

fn identity_dir(state_dir: &Path) -> std::path::PathBuf {
    state_dir.join("identity")
}

/// `identity` with the cluster's gossip key, and the key: as stored, or learned from the
/// coordinator (retrying with backoff until it answers) and stored. `None`: cancelled
/// first.
pub(super) async fn learn(
    mut identity: NodeIdentity,
    coordinator: SocketAddr,
    hello: HelloInfo,
    state_dir: &Path,
    cancel: &CancellationToken,
) -> Result<Option<(NodeIdentity, GossipKey)>, DaemonError> {
    if let Some(key) = identity.gossip_key.clone() {
        return Ok(Some((identity, key)));
    }
    tracing::info!(
        "this node joined before gossip was authenticated; asking the coordinator for the \
         cluster's gossip key"
    );
    let hello = HelloInfo {
        gossip: None,
        ..hello
    };
    let mut backoff = Duration::from_millis(200);
    loop {
        let session = tokio::select! {
            _ = cancel.cancelled() => return Ok(None),
            s = control::connect(coordinator, &identity, hello) => s,
        };
        match session.map(|s| s.gossip_key()) {
            Ok(Some(key)) => {
                identity.gossip_key = Some(key.clone());
                identity.save(&identity_dir(state_dir))?;
                tracing::info!("stored the cluster's gossip key with the node's identity");
                return Ok(Some((identity, key)));
            }
            // A welcome always carries the key; connect returns only after one.
            Ok(None) => {}
            Err(e) if fatal(&e) => return Err(e.into()),
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "cannot reach the coordinator")
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return Ok(None),
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// After a welcome: if the coordinator's key is not the one this agent gossips with, store
/// it (used from the next start) and say so loudly; until then this node's gossip is
/// dropped by the others.
pub(super) fn compare(session: &Session, identity: &NodeIdentity, state_dir: &Path) {
    let Some(key) = session.gossip_key() else {
        return;
    };
    if identity.gossip_key.as_ref() == Some(&key) {
        return;
    }
    let stored = NodeIdentity {
        gossip_key: Some(key),
        ..identity.clone()
    };
    match stored.save(&identity_dir(state_dir)) {
        Ok(()) => tracing::error!(
            "the cluster's gossip key has changed (the coordinator's gossip.key was replaced); \
             the new key is stored, restart this agent to gossip with it \
             (`systemctl restart gantry-agent`: its work keeps running)"
        ),
        Err(e) => tracing::error!(
            error = %e,
            "the cluster's gossip key has changed and the new one cannot be stored"
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use gantry_shared::{ClusterId, NodeId};

    use super::*;

    /// An identity as `join` stored it before gossip keys.
    fn identity() -> NodeIdentity {
        NodeIdentity {
            node: NodeId::new("n1").expect("id"),
            cluster: ClusterId::new("c1").expect("id"),
            cert_pem: "cert".into(),
            key_pem: "key".into(),
            ca_pem: "ca".into(),
            registry_token: "t".into(),
            gossip_key: None,
        }
    }

    #[test]
    fn an_identity_stored_before_gossip_keys_loads_without_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut old = serde_json::to_value(identity()).expect("json");
        old.as_object_mut().expect("object").remove("gossip_key");
        std::fs::write(dir.path().join("identity.json"), old.to_string()).expect("write");
        let loaded = NodeIdentity::load(dir.path()).expect("load");
        assert_eq!(loaded.gossip_key, None);
        // Stored again with the key: readable by its owner only.
        let key = GossipKey::from_bytes([4; 32]);
        NodeIdentity {
            gossip_key: Some(key.clone()),
            ..loaded
        }
        .save(dir.path())
        .expect("save");
        assert_eq!(
            NodeIdentity::load(dir.path()).expect("load").gossip_key,
            Some(key)
        );
        let mode = std::fs::metadata(dir.path().join("identity.json"))
            .expect("file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
