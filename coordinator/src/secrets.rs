//! Secrets, encrypted at rest: each secret's values are one AES-256-GCM ciphertext in sled
//! (tree `secrets`, the secret's name as associated data, a random 96-bit nonce per
//! write), under a key kept in its own file (`secrets.key_file`, 0600, made on the first
//! start). A canary encrypted with the key (tree `secrets_meta`) tells a wrong key from a
//! right one at start, before anything is written. Values leave this module only as
//! [`SecretDelivery`]s for the agent that starts a container, and never print.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use gantry_shared::secrets::{
    CreateSecret, SecretDelivery, SecretError, SecretName, SecretUse, SecretValues, SecretView,
};
use serde::{Deserialize, Serialize};

/// What the canary decrypts to.
const CANARY: &[u8] = b"gantry secrets key check v1";
const CANARY_KEY: &str = "canary";

#[derive(Debug, thiserror::Error)]
pub enum SecretStoreError {
    #[error(
        "the secrets key file {path} cannot be read: {source}; restore it, or point \
         `secrets.key_file` in coordinator.toml at it"
    )]
    ReadKey {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the secrets key file {path} does not hold a key (64 hexadecimal digits); restore \
         the file this coordinator's secrets were written with"
    )]
    BadKey { path: PathBuf },
    #[error(
        "the secrets key file {path} is missing, but secrets are stored: they cannot be read \
         without it; restore the key file (it is backed up with the state directory unless \
         `secrets.key_file` points elsewhere)"
    )]
    MissingKey { path: PathBuf },
    #[error(
        "the secrets key in {path} does not decrypt the stored secrets (another key file?); \
         restore the key they were written with"
    )]
    WrongKey { path: PathBuf },
    #[error("cannot create the secrets key file {path}: {source}")]
    CreateKey {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("secret `{name}` cannot be decrypted (its record is damaged)")]
    Damaged { name: String },
    #[error(
        "secret `{name}` does not exist; create it with `gantry secret create {name} KEY=VALUE`"
    )]
    NotFound { name: String },
    #[error(
        "secret `{name}` exists; pass `replace` (`gantry secret create --force`) to replace it"
    )]
    Exists { name: String },
    #[error(transparent)]
    Invalid(#[from] SecretError),
    #[error("secrets store: {0}")]
    Db(#[from] sled::Error),
    #[error("secrets store: corrupt record: {0}")]
    Corrupt(#[from] serde_json::Error),
    #[error("cannot read random bytes: {0}")]
    Random(String),
    #[error("secrets are not available in this process (their key was not loaded)")]
    NotOpen,
}

/// One secret as stored: its keys in clear (the API lists them), its values sealed.
#[derive(Serialize, Deserialize)]
struct Sealed {
    keys: Vec<String>,
    nonce: String,
    ciphertext: String,
    created_at_ms: u64,
    updated_at_ms: u64,
}

/// The secrets once opened, as the rest of the coordinator reaches them (through its
/// [`Store`](crate::store::Store)); uses of no secret need none.
#[derive(Clone, Default)]
pub struct Secrets(std::sync::Arc<std::sync::OnceLock<SecretStore>>);

impl Secrets {
    pub(crate) fn set(&self, store: SecretStore) {
        let _ = self.0.set(store);
    }

    pub fn store(&self) -> Result<&SecretStore, SecretStoreError> {
        self.0.get().ok_or(SecretStoreError::NotOpen)
    }

    /// Refuses uses of secrets that do not exist.
    pub fn check_exist(&self, uses: &[SecretUse]) -> Result<(), SecretStoreError> {
        match uses.is_empty() {
            true => Ok(()),
            false => self.store()?.check_exist(uses),
        }
    }

    /// The values of `uses`.
    pub fn resolve(&self, uses: &[SecretUse]) -> Result<Vec<SecretDelivery>, SecretStoreError> {
        match uses.is_empty() {
            true => Ok(Vec::new()),
            false => self.store()?.resolve(uses),
        }
    }
}

/// The secrets of this coordinator. Cheap to clone.
#[derive(Clone)]
pub struct SecretStore {
    tree: sled::Tree,
    cipher: Aes256Gcm,
}

impl SecretStore {
    /// Opens the secrets in `tree` with the key in `key_file`, making the key (and the
    /// canary) when neither a key nor any secret exists yet. A missing key file while
    /// secrets exist, or a key that does not open them, is refused before anything is
    /// written.
    pub fn open(
        tree: sled::Tree,
        meta: sled::Tree,
        key_file: &Path,
    ) -> Result<Self, SecretStoreError> {
        let canary = meta.get(CANARY_KEY)?;
        let key = match std::fs::read_to_string(key_file) {
            Ok(text) => parse_key(&text).ok_or_else(|| SecretStoreError::BadKey {
                path: key_file.to_owned(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if canary.is_some() || !tree.is_empty() {
                    return Err(SecretStoreError::MissingKey {
                        path: key_file.to_owned(),
                    });
                }
                create_key(key_file)?
            }
            Err(source) => {
                return Err(SecretStoreError::ReadKey {
                    path: key_file.to_owned(),
                    source,
                });
            }
        };
        let store = Self {
            tree,
            cipher: Aes256Gcm::new(&key.into()),
        };
        let wrong = || SecretStoreError::WrongKey {
            path: key_file.to_owned(),
        };
        match canary {
            Some(sealed) => {
                let sealed: Sealed = serde_json::from_slice(&sealed)?;
                if store.open_sealed(CANARY_KEY, &sealed).as_deref() != Some(CANARY) {
                    return Err(wrong());
                }
            }
            None => {
                // Secrets from before the canary: the key must open the first of them.
                if let Some(first) = store.tree.iter().next() {
                    let (name, sealed) = first?;
                    let sealed: Sealed = serde_json::from_slice(&sealed)?;
                    if store
                        .open_sealed(&String::from_utf8_lossy(&name), &sealed)
                        .is_none()
                    {
                        return Err(wrong());
                    }
                }
                let sealed = store.seal(CANARY_KEY, CANARY, Vec::new(), 0, 0)?;
                meta.insert(CANARY_KEY, serde_json::to_vec(&sealed)?)?;
                meta.flush()?;
            }
        }
        Ok(store)
    }

    /// Creates (or, with `replace`, replaces) a secret; true when it is new. Durable when
    /// this returns.
    pub fn create(
        &self,
        req: CreateSecret,
        now_ms: u64,
    ) -> Result<(SecretView, bool), SecretStoreError> {
        let values = SecretValues::new(req.values)?;
        let name = req.name;
        let existing = self.sealed(&name)?;
        if existing.is_some() && !req.replace {
            return Err(SecretStoreError::Exists {
                name: name.to_string(),
            });
        }
        let created_at_ms = existing.as_ref().map_or(now_ms, |s| s.created_at_ms);
        let plain = serde_json::to_vec(&values)?;
        let keys = values.keys().map(str::to_owned).collect();
        let sealed = self.seal(name.as_str(), &plain, keys, created_at_ms, now_ms)?;
        self.tree
            .insert(name.as_str(), serde_json::to_vec(&sealed)?)?;
        self.tree.flush()?;
        Ok((view(name, &sealed), existing.is_none()))
    }

    /// Every secret, by name: names and keys only.
    pub fn list(&self) -> Result<Vec<SecretView>, SecretStoreError> {
        self.tree
            .iter()
            .map(|kv| {
                let (name, sealed) = kv?;
                let sealed: Sealed = serde_json::from_slice(&sealed)?;
                let name = SecretName::new(String::from_utf8_lossy(&name).into_owned())?;
                Ok(view(name, &sealed))
            })
            .collect()
    }

    /// Deletes a secret; false when there was none. Containers started with it keep what
    /// they got; later starts that name it fail.
    pub fn delete(&self, name: &SecretName) -> Result<bool, SecretStoreError> {
        let gone = self.tree.remove(name.as_str())?.is_some();
        self.tree.flush()?;
        Ok(gone)
    }

    /// Refuses uses of secrets that do not exist (at submission and deploy).
    pub fn check_exist(&self, uses: &[SecretUse]) -> Result<(), SecretStoreError> {
        for u in uses {
            if !self.tree.contains_key(u.name.as_str())? {
                return Err(SecretStoreError::NotFound {
                    name: u.name.to_string(),
                });
            }
        }
        Ok(())
    }

    /// The values of `uses`, for the agent that starts a container with them.
    pub fn resolve(&self, uses: &[SecretUse]) -> Result<Vec<SecretDelivery>, SecretStoreError> {
        uses.iter()
            .map(|u| {
                let sealed = self
                    .sealed(&u.name)?
                    .ok_or_else(|| SecretStoreError::NotFound {
                        name: u.name.to_string(),
                    })?;
                let damaged = || SecretStoreError::Damaged {
                    name: u.name.to_string(),
                };
                let plain = self
                    .open_sealed(u.name.as_str(), &sealed)
                    .ok_or_else(damaged)?;
                let values: BTreeMap<String, String> =
                    serde_json::from_slice(&plain).map_err(|_| damaged())?;
                Ok(SecretDelivery {
                    name: u.name.clone(),
                    mount: u.mount,
                    values: SecretValues::new(values).map_err(|_| damaged())?,
                })
            })
            .collect()
    }

    fn sealed(&self, name: &SecretName) -> Result<Option<Sealed>, SecretStoreError> {
        match self.tree.get(name.as_str())? {
            Some(bytes) => Ok(Some(serde_json::from_slice(&bytes)?)),
            None => Ok(None),
        }
    }

    fn seal(
        &self,
        name: &str,
        plain: &[u8],
        keys: Vec<String>,
        created_at_ms: u64,
        updated_at_ms: u64,
    ) -> Result<Sealed, SecretStoreError> {
        let mut nonce = [0u8; 12];
        getrandom::fill(&mut nonce).map_err(|e| SecretStoreError::Random(e.to_string()))?;
        let ciphertext = self
            .cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plain,
                    aad: name.as_bytes(),
                },
            )
            .map_err(|_| SecretStoreError::Damaged {
                name: name.to_owned(),
            })?;
        Ok(Sealed {
            keys,
            nonce: hex::encode(nonce),
            ciphertext: hex::encode(ciphertext),
            created_at_ms,
            updated_at_ms,
        })
    }

    /// The plaintext of `sealed`, if this key (and `name`) open it.
    fn open_sealed(&self, name: &str, sealed: &Sealed) -> Option<Vec<u8>> {
        let nonce = hex::decode(&sealed.nonce).ok().filter(|n| n.len() == 12)?;
        let ciphertext = hex::decode(&sealed.ciphertext).ok()?;
        self.cipher
            .decrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: &ciphertext,
                    aad: name.as_bytes(),
                },
            )
            .ok()
    }
}

fn view(name: SecretName, sealed: &Sealed) -> SecretView {
    SecretView {
        name,
        keys: sealed.keys.clone(),
        created_at_ms: sealed.created_at_ms,
        updated_at_ms: sealed.updated_at_ms,
    }
}

fn parse_key(text: &str) -> Option<[u8; 32]> {
    hex::decode(text.trim()).ok()?.try_into().ok()
}

/// A new random key in a new file, readable by its owner only.
fn create_key(path: &Path) -> Result<[u8; 32], SecretStoreError> {
    let err = |source| SecretStoreError::CreateKey {
        path: path.to_owned(),
        source,
    };
    let mut key = [0u8; 32];
    getrandom::fill(&mut key).map_err(|e| SecretStoreError::Random(e.to_string()))?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(err)?;
    writeln!(f, "{}", hex::encode(key)).map_err(err)?;
    f.sync_all().map_err(err)?;
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn create(name: &str, pairs: &[(&str, &str)], replace: bool) -> CreateSecret {
        CreateSecret {
            name: SecretName::new(name).expect("name"),
            values: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            replace,
        }
    }

    fn open(db: &sled::Db, key: &Path) -> Result<SecretStore, SecretStoreError> {
        SecretStore::open(
            db.open_tree("secrets").expect("tree"),
            db.open_tree("secrets_meta").expect("tree"),
            key,
        )
    }

    #[test]
    fn values_are_sealed_listed_by_key_and_resolved_for_a_start() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = sled::open(dir.path().join("db")).expect("db");
        let key = dir.path().join("secrets.key");
        let s = open(&db, &key).expect("open");
        assert_eq!(
            std::fs::metadata(&key).expect("key").permissions().mode() & 0o777,
            0o600
        );
        let (v, new) = s
            .create(create("db", &[("PASSWORD", "hunter2-plain")], false), 10)
            .expect("create");
        assert!(new);
        assert_eq!(v.keys, ["PASSWORD"]);
        // Sealed: the value is nowhere in the database's records.
        for tree in db.tree_names() {
            for kv in db.open_tree(tree).expect("tree").iter() {
                let (_, value) = kv.expect("kv");
                assert!(!String::from_utf8_lossy(&value).contains("hunter2-plain"));
            }
        }
        assert!(matches!(
            s.create(create("db", &[("X", "y")], false), 11),
            Err(SecretStoreError::Exists { .. })
        ));
        let (v, new) = s
            .create(create("db", &[("PASSWORD", "new-plain")], true), 12)
            .expect("replace");
        assert_eq!((new, v.created_at_ms, v.updated_at_ms), (false, 10, 12));
        let uses = [SecretUse {
            name: SecretName::new("db").expect("name"),
            mount: gantry_shared::secrets::SecretMount::Files,
        }];
        let got = s.resolve(&uses).expect("resolve");
        let pairs: Vec<_> = got[0].values.iter().collect();
        assert_eq!(pairs, [("PASSWORD", "new-plain")]);
        assert_eq!(s.list().expect("list").len(), 1);
        assert!(s.delete(&uses[0].name).expect("delete"));
        assert!(matches!(
            s.check_exist(&uses),
            Err(SecretStoreError::NotFound { .. })
        ));
    }

    #[test]
    fn a_missing_or_wrong_key_is_refused_and_changes_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = sled::open(dir.path().join("db")).expect("db");
        let key = dir.path().join("secrets.key");
        let s = open(&db, &key).expect("open");
        s.create(create("db", &[("A", "b")], false), 1)
            .expect("create");
        let right = std::fs::read(&key).expect("key");

        std::fs::remove_file(&key).expect("rm");
        let e = open(&db, &key).err().expect("missing key refused");
        assert!(matches!(e, SecretStoreError::MissingKey { .. }), "{e}");
        assert!(!key.exists(), "no new key made over stored secrets");

        std::fs::write(&key, format!("{}\n", "ab".repeat(32))).expect("wrong key");
        let e = open(&db, &key).err().expect("wrong key refused");
        assert!(e.to_string().contains("does not decrypt"), "{e}");
        std::fs::write(&key, "not a key").expect("bad key");
        assert!(matches!(
            open(&db, &key),
            Err(SecretStoreError::BadKey { .. })
        ));

        // The right key opens everything as it was.
        std::fs::write(&key, right).expect("restore");
        let s = open(&db, &key).expect("reopen");
        let uses = [SecretUse {
            name: SecretName::new("db").expect("name"),
            mount: gantry_shared::secrets::SecretMount::Env,
        }];
        assert_eq!(s.resolve(&uses).expect("resolve").len(), 1);
    }
}
