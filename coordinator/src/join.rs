//! One-time, expiring join tokens. The store keeps the token id, a SHA-256 of its secret
//! and its expiry; redeeming one marks it used in the same atomic step, so a token can
//! admit exactly one node even when two agents race with it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use gantry_shared::protocol::JoinToken;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

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

/// Join tokens in the coordinator's sled database.
#[derive(Clone)]
pub struct JoinTokens {
    tree: sled::Tree,
    ca_sha256: String,
}

impl JoinTokens {
    pub fn open(db: &sled::Db, ca_sha256: String) -> Result<Self, sled::Error> {
        Ok(Self {
            tree: db.open_tree("join_tokens")?,
            ca_sha256,
        })
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

    /// Redeems `token` at most once.
    pub fn redeem(&self, token: &JoinToken) -> Result<(), JoinError> {
        self.redeem_at(token, now_unix())
    }

    fn redeem_at(&self, token: &JoinToken, now: u64) -> Result<(), JoinError> {
        if token.ca_sha256 != self.ca_sha256 {
            return Err(JoinError::OtherCluster);
        }
        loop {
            let Some(old) = self.tree.get(token.id.as_bytes())? else {
                return Err(JoinError::Unknown);
            };
            let mut stored: StoredToken = serde_json::from_slice(&old)?;
            // Compare hashes, not secrets: the stored side never holds the secret.
            if stored.secret_sha256 != hash(&token.secret) {
                return Err(JoinError::Unknown);
            }
            if stored.used {
                return Err(JoinError::Used);
            }
            if now >= stored.expires_unix {
                return Err(JoinError::Expired);
            }
            stored.used = true;
            let new = serde_json::to_vec(&stored)?;
            match self
                .tree
                .compare_and_swap(token.id.as_bytes(), Some(old), Some(new))?
            {
                Ok(()) => {
                    self.tree.flush()?;
                    return Ok(());
                }
                Err(_) => continue, // raced with another redemption: look again
            }
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

    fn tokens() -> (tempfile::TempDir, JoinTokens) {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = sled::open(dir.path()).expect("db");
        (dir, JoinTokens::open(&db, "a".repeat(64)).expect("tokens"))
    }

    #[test]
    fn a_token_admits_one_node() {
        let (_d, t) = tokens();
        let token = t.create(Duration::from_secs(60)).expect("create");
        assert_eq!(JoinToken::parse(&token.to_string()), Ok(token.clone()));
        assert!(t.redeem(&token).is_ok());
        assert!(matches!(t.redeem(&token), Err(JoinError::Used)));
    }

    #[test]
    fn expired_forged_and_foreign_tokens_are_refused() {
        let (_d, t) = tokens();
        let token = t.create(Duration::from_secs(60)).expect("create");
        assert!(matches!(
            t.redeem_at(&token, now_unix() + 61),
            Err(JoinError::Expired)
        ));
        let forged = JoinToken {
            secret: "0".repeat(32),
            ..token.clone()
        };
        assert!(matches!(t.redeem(&forged), Err(JoinError::Unknown)));
        let foreign = JoinToken {
            ca_sha256: "b".repeat(64),
            ..token.clone()
        };
        assert!(matches!(t.redeem(&foreign), Err(JoinError::OtherCluster)));
        let unknown = JoinToken {
            id: "f".repeat(16),
            ..token
        };
        assert!(matches!(t.redeem(&unknown), Err(JoinError::Unknown)));
    }

    #[test]
    fn racing_redemptions_admit_exactly_one() {
        let (_d, t) = tokens();
        let token = t.create(Duration::from_secs(60)).expect("create");
        let results: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8).map(|_| s.spawn(|| t.redeem(&token))).collect();
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
