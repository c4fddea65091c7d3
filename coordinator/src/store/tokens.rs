//! API bearer tokens with roles. Only a SHA-256 of each token is stored; the token itself
//! is shown once, when it is created (the admin token on the coordinator's first start).

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// What a token may do. Each role includes the ones below it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Read jobs, logs and nodes.
    Reader,
    /// Also submit and cancel jobs.
    Submitter,
    /// Also manage nodes and tokens.
    Admin,
}

impl Role {
    pub fn allows(self, required: Role) -> bool {
        self >= required
    }
}

#[derive(Serialize, Deserialize)]
struct StoredToken {
    role: Role,
    name: String,
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("token store: {0}")]
    Store(#[from] sled::Error),
    #[error("token record is corrupt: {0}")]
    Corrupt(#[from] serde_json::Error),
    #[error("cannot read random bytes for a token: {0}")]
    Random(#[from] std::io::Error),
}

#[derive(Clone)]
pub struct ApiTokens {
    tree: sled::Tree,
}

impl ApiTokens {
    pub(super) fn new(tree: sled::Tree) -> Self {
        Self { tree }
    }

    /// Creates a token; the returned string is the only copy.
    pub fn create(&self, role: Role, name: &str) -> Result<String, TokenError> {
        let mut secret = [0u8; 24];
        std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut secret)?;
        let token = format!("gat_{}", hex::encode(secret));
        let record = StoredToken {
            role,
            name: name.to_owned(),
        };
        self.tree
            .insert(hash(&token), serde_json::to_vec(&record)?)?;
        self.tree.flush()?;
        Ok(token)
    }

    /// On a coordinator's first start: creates the admin token and returns it, once.
    pub fn bootstrap_admin(&self) -> Result<Option<String>, TokenError> {
        if !self.tree.is_empty() {
            return Ok(None);
        }
        self.create(Role::Admin, "admin").map(Some)
    }

    /// The role of a presented token, if it is one of ours.
    pub fn role(&self, token: &str) -> Result<Option<Role>, TokenError> {
        Ok(self.identify(token)?.map(|(role, _)| role))
    }

    /// The role and name of `token`, if it is one.
    pub fn identify(&self, token: &str) -> Result<Option<(Role, String)>, TokenError> {
        match self.tree.get(hash(token))? {
            Some(v) => {
                let t = serde_json::from_slice::<StoredToken>(&v)?;
                Ok(Some((t.role, t.name)))
            }
            None => Ok(None),
        }
    }

    /// Removes every token named `name` (durably); returns how many there were.
    pub fn revoke(&self, name: &str) -> Result<usize, TokenError> {
        let mut removed = 0;
        for kv in self.tree.iter() {
            let (key, value) = kv?;
            if serde_json::from_slice::<StoredToken>(&value)?.name == name {
                self.tree.remove(key)?;
                removed += 1;
            }
        }
        self.tree.flush()?;
        Ok(removed)
    }
}

fn hash(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_nest() {
        assert!(Role::Admin.allows(Role::Submitter));
        assert!(Role::Submitter.allows(Role::Reader));
        assert!(!Role::Reader.allows(Role::Submitter));
    }

    #[test]
    fn tokens_are_stored_hashed_and_admin_bootstraps_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = crate::store::Store::open(dir.path()).expect("store");
        let t = store.api_tokens().expect("tokens");
        let admin = t
            .bootstrap_admin()
            .expect("bootstrap")
            .expect("first start creates it");
        assert_eq!(t.bootstrap_admin().expect("again"), None);
        assert_eq!(t.role(&admin).expect("role"), Some(Role::Admin));
        assert_eq!(t.role("gat_nope").expect("role"), None);
        // The plaintext is not in the database.
        for kv in t.tree.iter() {
            let (k, v) = kv.expect("kv");
            assert!(
                !String::from_utf8_lossy(&k).contains(&admin)
                    && !String::from_utf8_lossy(&v).contains(&admin)
            );
        }
        // Rotation: a second admin token, then the first one revoked by name.
        let next = t.create(Role::Admin, "admin-2").expect("create");
        assert_eq!(t.revoke("admin").expect("revoke"), 1);
        assert_eq!(t.role(&admin).expect("lookup"), None);
        assert_eq!(
            t.identify(&next).expect("lookup"),
            Some((Role::Admin, "admin-2".into()))
        );
        assert_eq!(t.revoke("admin").expect("again"), 0);
    }
}
