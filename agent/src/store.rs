//! The agent's local store (sled): image records and container records. What must survive
//! an agent restart lives here; what the shim learns (exit status, logs) lives in files the
//! shim writes atomically, because only one process may open the sled database.

use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Bumped when the layout of keys or values changes incompatibly.
const LAYOUT_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "cannot open the agent database at {path}: {source}; if another gantry-agent uses this \
         state directory, stop it or pass a different --state-dir"
    )]
    Open { path: PathBuf, source: sled::Error },
    #[error(
        "agent database at {path} has layout version {found}, this agent understands {LAYOUT_VERSION}; use a matching gantry-agent or move the state directory aside"
    )]
    Layout { path: PathBuf, found: u32 },
    #[error("agent database error: {0}")]
    Db(#[from] sled::Error),
    #[error("corrupt record `{key}` in tree `{tree}`: {source}")]
    Decode {
        tree: &'static str,
        key: String,
        source: serde_json::Error,
    },
}

/// Typed trees over one sled database.
#[derive(Clone)]
pub struct LocalStore {
    db: sled::Db,
}

/// One sled tree of JSON values keyed by string.
#[derive(Clone)]
pub struct Table {
    name: &'static str,
    tree: sled::Tree,
}

impl LocalStore {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(path)
            .open()
            .map_err(|source| StoreError::Open {
                path: path.to_owned(),
                source,
            })?;
        match db.get("layout_version")? {
            None => {
                db.insert("layout_version", &LAYOUT_VERSION.to_be_bytes())?;
                db.flush()?;
            }
            Some(v) => {
                let found = v.as_ref().try_into().map(u32::from_be_bytes).unwrap_or(0);
                if found != LAYOUT_VERSION {
                    return Err(StoreError::Layout {
                        path: path.to_owned(),
                        found,
                    });
                }
            }
        }
        Ok(Self { db })
    }

    pub fn table(&self, name: &'static str) -> Result<Table, StoreError> {
        Ok(Table {
            name,
            tree: self.db.open_tree(name)?,
        })
    }
}

impl Table {
    pub fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StoreError> {
        self.tree
            .get(key)?
            .map(|v| self.decode(key, &v))
            .transpose()
    }

    /// Inserts and flushes: a record is durable when this returns.
    pub fn put<T: Serialize>(&self, key: &str, value: &T) -> Result<(), StoreError> {
        self.put_unflushed(key, value)?;
        self.tree.flush()?;
        Ok(())
    }

    /// Inserts without waiting for disk; pair with [`Table::flush`].
    pub fn put_unflushed<T: Serialize>(&self, key: &str, value: &T) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(value).map_err(|source| StoreError::Decode {
            tree: self.name,
            key: key.to_owned(),
            source,
        })?;
        self.tree.insert(key, bytes)?;
        Ok(())
    }

    /// Waits until everything inserted so far is on disk.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.tree.flush_async().await?;
        Ok(())
    }

    pub fn remove(&self, key: &str) -> Result<(), StoreError> {
        self.tree.remove(key)?;
        self.tree.flush()?;
        Ok(())
    }

    pub fn list<T: DeserializeOwned>(&self) -> Result<Vec<(String, T)>, StoreError> {
        self.tree
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                let key = String::from_utf8_lossy(&k).into_owned();
                let value = self.decode(&key, &v)?;
                Ok((key, value))
            })
            .collect()
    }

    /// The keys, in order (nothing decoded).
    pub fn keys(&self) -> Result<Vec<String>, StoreError> {
        self.tree
            .iter()
            .keys()
            .map(|k| Ok(String::from_utf8_lossy(&k?).into_owned()))
            .collect()
    }

    fn decode<T: DeserializeOwned>(&self, key: &str, v: &[u8]) -> Result<T, StoreError> {
        serde_json::from_slice(v).map_err(|source| StoreError::Decode {
            tree: self.name,
            key: key.to_owned(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let s = LocalStore::open(dir.path()).expect("open");
            let t = s.table("things").expect("tree");
            t.put("a", &1u32).expect("put");
            t.put("b", &2u32).expect("put");
            t.remove("a").expect("remove");
        }
        // sled releases its file lock from a background thread after the drop; a real
        // restart is a new process, here we wait for the lock (bounded).
        let s = (0..100)
            .find_map(|_| {
                LocalStore::open(dir.path()).ok().or_else(|| {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                    None
                })
            })
            .expect("reopen");
        let t = s.table("things").expect("tree");
        assert_eq!(t.get::<u32>("a").expect("get"), None);
        assert_eq!(t.list::<u32>().expect("list"), vec![("b".to_owned(), 2)]);
    }

    #[test]
    fn second_open_is_refused_with_advice() {
        let dir = tempfile::tempdir().expect("tempdir");
        let _s = LocalStore::open(dir.path()).expect("open");
        let err = LocalStore::open(dir.path())
            .err()
            .expect("must fail while locked");
        assert!(err.to_string().contains("--state-dir"), "{err}");
    }
}
