//! One-time, expiring join tokens, and the register of joined nodes. The store keeps the
//! token id, a SHA-256 of its secret and its expiry; redeeming one marks it used and
//! registers the node name in one transaction, so a token admits exactly one node even
//! when two agents race with it, and a node name is never given out twice.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use gantry_shared::NodeId;
use gantry_shared::protocol::JoinToken;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};

#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error(
        "join token is unknown to this coordinator; create one with `gantry-coordinator token create`"
    )]
    Unknown,
    #[error("join token was already used; each token admits one node, create a new one")]
    Used,
    #[error("join token expired; create a new one with `gantry-coordinator token create --ttl 1h`")]
    Expired,
    #[error(
        "join token is for another cluster (its CA hash differs); use a token printed by this cluster's coordinator"
    )]
    OtherCluster,
    #[error(
        "node name `{node}` is already joined to this cluster; join this host with another \
         `--node` name (every host needs its own)"
    )]
    NodeTaken { node: NodeId },
    #[error("join token store: {0}")]
    Store(#[from] sled::Error),
    #[error("join token record is corrupt: {0}")]
    Corrupt(#[from] serde_json::Error),
    #[error("cannot read random bytes for a token: {0}")]
    Random(#[from] std::io::Error),
}

#[derive(Debug, Serialize, Deserialize)]
struct StoredToken {
    secret_sha256: String,
    expires_unix: u64,
    used: bool,
}

/// A node admitted to the cluster.
#[derive(Debug, Serialize, Deserialize)]
struct JoinedNode {
    joined_unix: u64,
}

/// Join tokens and joined nodes in the coordinator's sled database.
#[derive(Clone)]
pub struct JoinTokens {
    tree: sled::Tree,
    nodes: sled::Tree,
    ca_sha256: String,
}

impl JoinTokens {
    pub(super) fn new(tree: sled::Tree, nodes: sled::Tree, ca_sha256: String) -> Self {
        Self {
            tree,
            nodes,
            ca_sha256,
        }
    }

    /// Every node that ever joined, by name.
    pub fn joined(&self) -> Result<Vec<NodeId>, JoinError> {
        let mut out = Vec::new();
        for kv in self.nodes.iter() {
            let (k, _) = kv?;
            if let Ok(id) = NodeId::new(String::from_utf8_lossy(&k).into_owned()) {
                out.push(id);
            }
        }
        Ok(out)
    }

    /// Creates a token valid for `ttl`; durable when this returns.
    pub fn create(&self, ttl: Duration) -> Result<JoinToken, JoinError> {
        let token = JoinToken {
            id: hex::encode(random::<8>()?),
            secret: hex::encode(random::<16>()?),
            ca_sha256: self.ca_sha256.clone(),
        };
        let stored = StoredToken {
            secret_sha256: hash(&token.secret),
            expires_unix: now_unix() + ttl.as_secs(),
            used: false,
        };
        self.tree
            .insert(token.id.as_bytes(), serde_json::to_vec(&stored)?)?;
        self.tree.flush()?;
        Ok(token)
    }

    /// Redeems `token` at most once, registering `node`; a name already joined is
    /// refused without using the token.
    pub fn redeem(&self, token: &JoinToken, node: &NodeId) -> Result<(), JoinError> {
        self.redeem_at(token, node, now_unix())
    }

    fn redeem_at(&self, token: &JoinToken, node: &NodeId, now: u64) -> Result<(), JoinError> {
        if token.ca_sha256 != self.ca_sha256 {
            return Err(JoinError::OtherCluster);
        }
        let abort = ConflictableTransactionError::Abort;
        let result = (&self.tree, &self.nodes).transaction(|(tokens, nodes)| {
            let Some(old) = tokens.get(token.id.as_bytes())? else {
                return Err(abort(JoinError::Unknown));
            };
            let mut stored: StoredToken =
                serde_json::from_slice(&old).map_err(|e| abort(JoinError::Corrupt(e)))?;
            // Compare hashes, not secrets: the stored side never holds the secret.
            if stored.secret_sha256 != hash(&token.secret) {
                return Err(abort(JoinError::Unknown));
            }
            if stored.used {
                return Err(abort(JoinError::Used));
            }
            if now >= stored.expires_unix {
                return Err(abort(JoinError::Expired));
            }
            if nodes.get(node.as_str().as_bytes())?.is_some() {
                return Err(abort(JoinError::NodeTaken { node: node.clone() }));
            }
            stored.used = true;
            let token_bytes =
                serde_json::to_vec(&stored).map_err(|e| abort(JoinError::Corrupt(e)))?;
            let node_bytes = serde_json::to_vec(&JoinedNode { joined_unix: now })
                .map_err(|e| abort(JoinError::Corrupt(e)))?;
            tokens.insert(token.id.as_bytes(), token_bytes)?;
            nodes.insert(node.as_str().as_bytes(), node_bytes)?;
            Ok(())
        });
        match result {
            Ok(()) => {
                self.tree.flush()?;
                Ok(())
            }
            Err(TransactionError::Abort(e)) => Err(e),
            Err(TransactionError::Storage(e)) => Err(e.into()),
        }
    }
}

fn hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `N` bytes from the kernel's CSPRNG.
fn random<const N: usize>() -> std::io::Result<[u8; N]> {
    let mut buf = [0u8; N];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut buf)?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str) -> NodeId {
        NodeId::new(name).expect("node id")
    }

    fn tokens() -> (tempfile::TempDir, JoinTokens) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = crate::store::Store::open(dir.path()).expect("store");
        let tokens = store.join_tokens("a".repeat(64)).expect("tokens");
        (dir, tokens)
    }

    #[test]
    fn a_token_admits_one_node() {
        let (_d, t) = tokens();
        let token = t.create(Duration::from_secs(60)).expect("create");
        assert_eq!(JoinToken::parse(&token.to_string()), Ok(token.clone()));
        assert!(t.redeem(&token, &node("n1")).is_ok());
        assert!(matches!(
            t.redeem(&token, &node("n2")),
            Err(JoinError::Used)
        ));
        assert_eq!(t.joined().expect("joined"), [node("n1")]);
    }

    #[test]
    fn a_node_name_is_given_out_once_and_the_token_survives() {
        let (_d, t) = tokens();
        let first = t.create(Duration::from_secs(60)).expect("create");
        t.redeem(&first, &node("gpu-1")).expect("first");
        let second = t.create(Duration::from_secs(60)).expect("create");
        let err = t.redeem(&second, &node("gpu-1")).expect_err("taken");
        assert!(err.to_string().contains("already joined"), "{err}");
        // The refused join did not use the token up.
        t.redeem(&second, &node("gpu-2"))
            .expect("second token still valid");
    }

    #[test]
    fn expired_forged_and_foreign_tokens_are_refused() {
        let (_d, t) = tokens();
        let token = t.create(Duration::from_secs(60)).expect("create");
        assert!(matches!(
            t.redeem_at(&token, &node("n"), now_unix() + 61),
            Err(JoinError::Expired)
        ));
        let forged = JoinToken {
            secret: "0".repeat(32),
            ..token.clone()
        };
        assert!(matches!(
            t.redeem(&forged, &node("n")),
            Err(JoinError::Unknown)
        ));
        let foreign = JoinToken {
            ca_sha256: "b".repeat(64),
            ..token.clone()
        };
        assert!(matches!(
            t.redeem(&foreign, &node("n")),
            Err(JoinError::OtherCluster)
        ));
        let unknown = JoinToken {
            id: "f".repeat(16),
            ..token
        };
        assert!(matches!(
            t.redeem(&unknown, &node("n")),
            Err(JoinError::Unknown)
        ));
    }

    #[test]
    fn racing_redemptions_admit_exactly_one() {
        let (_d, t) = tokens();
        let token = t.create(Duration::from_secs(60)).expect("create");
        let results: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|i| {
                    let (t, token) = (&t, &token);
                    s.spawn(move || t.redeem(token, &node(&format!("n{i}"))))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("thread"))
                .collect()
        });
        assert_eq!(
            results.iter().filter(|r| r.is_ok()).count(),
            1,
            "{results:?}"
        );
    }
}
