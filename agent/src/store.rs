//! The agent's local store (sled): image records and container records. What must survive
//! an agent restart lives here; what the shim learns (exit status, logs) lives in files the
//! shim writes atomically, because only one process may open the sled database.
//!
//! The one-shot `gantry-agent run` opens the store in the background
//! ([`LocalStore::open_in_background`]): sled's open fsyncs as it recovers, and the
//! container's start does not need the store until its record is written.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

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
    #[error("the agent database at {path} did not open: {message}")]
    OpenedBefore { path: PathBuf, message: String },
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
    inner: Arc<Opening>,
}

/// The database, once open, and the thread opening it until then.
struct Opening {
    path: PathBuf,
    db: OnceLock<sled::Db>,
    /// Held while the opening thread is joined, so every caller waits for the one open.
    thread: Mutex<Option<std::thread::JoinHandle<Result<sled::Db, StoreError>>>>,
    /// Why the open failed, for the callers after the first, which got the error itself.
    failed: OnceLock<String>,
}

/// One sled tree of JSON values keyed by string.
#[derive(Clone)]
pub struct Table {
    name: &'static str,
    store: LocalStore,
    tree: OnceLock<sled::Tree>,
}

impl LocalStore {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = open_db(path)?;
        Ok(Self::with(path, OnceLock::from(db), None))
    }

    /// Starts opening the database at `path` on its own thread and returns at once; the
    /// first use of a table waits for it. Another process holding the database (a running
    /// agent) is refused here, before anything is started.
    pub fn open_in_background(path: &Path) -> Result<Self, StoreError> {
        check_unlocked(path)?;
        let owned = path.to_owned();
        let thread = std::thread::Builder::new()
            .name("gantry-store-open".into())
            .spawn(move || open_db(&owned))
            .map_err(|e| StoreError::OpenedBefore {
                path: path.to_owned(),
                message: format!("cannot start a thread to open it: {e}"),
            })?;
        Ok(Self::with(path, OnceLock::new(), Some(thread)))
    }

    fn with(
        path: &Path,
        db: OnceLock<sled::Db>,
        thread: Option<std::thread::JoinHandle<Result<sled::Db, StoreError>>>,
    ) -> Self {
        Self {
            inner: Arc::new(Opening {
                path: path.to_owned(),
                db,
                thread: Mutex::new(thread),
                failed: OnceLock::new(),
            }),
        }
    }

    /// Whether the database is open (a background open has finished).
    pub fn is_open(&self) -> bool {
        self.inner.db.get().is_some()
    }

    /// The database, waiting for a background open.
    fn db(&self) -> Result<&sled::Db, StoreError> {
        if let Some(db) = self.inner.db.get() {
            return Ok(db);
        }
        let mut thread = self
            .inner
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(handle) = thread.take() {
            let opened = handle.join().unwrap_or_else(|_| {
                Err(StoreError::OpenedBefore {
                    path: self.inner.path.clone(),
                    message: "the thread opening it panicked".into(),
                })
            });
            match opened {
                Ok(db) => {
                    let _ = self.inner.db.set(db);
                }
                Err(e) => {
                    let _ = self.inner.failed.set(e.to_string());
                    return Err(e);
                }
            }
        }
        drop(thread);
        self.inner.db.get().ok_or_else(|| StoreError::OpenedBefore {
            path: self.inner.path.clone(),
            message: self
                .inner
                .failed
                .get()
                .cloned()
                .unwrap_or_else(|| "unknown error".into()),
        })
    }

    pub fn table(&self, name: &'static str) -> Result<Table, StoreError> {
        let tree = OnceLock::new();
        if let Some(db) = self.inner.db.get() {
            let _ = tree.set(db.open_tree(name)?);
        }
        Ok(Table {
            name,
            store: self.clone(),
            tree,
        })
    }
}

/// Refuses a database another process holds (sled's own lock on its `db` file), without
/// holding it.
fn check_unlocked(path: &Path) -> Result<(), StoreError> {
    let file = match std::fs::File::open(path.join("db")) {
        Ok(f) => f,
        // Not created yet: nobody holds it.
        Err(_) => return Ok(()),
    };
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(_unlocked_on_drop) => Ok(()),
        Err((_, errno)) => Err(StoreError::Open {
            path: path.to_owned(),
            source: sled::Error::Io(std::io::Error::from(errno)),
        }),
    }
}

/// Opens (and recovers) the database at `path` and checks its layout.
fn open_db(path: &Path) -> Result<sled::Db, StoreError> {
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
    Ok(db)
}

impl Table {
    /// Whether using the table would not wait for a background open.
    pub fn is_ready(&self) -> bool {
        self.tree.get().is_some() || self.store.is_open()
    }

    /// The tree, once the database is open (waiting for a background open).
    fn tree(&self) -> Result<&sled::Tree, StoreError> {
        if let Some(tree) = self.tree.get() {
            return Ok(tree);
        }
        let tree = self.store.db()?.open_tree(self.name)?;
        Ok(self.tree.get_or_init(|| tree))
    }

    pub fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StoreError> {
        self.tree()?
            .get(key)?
            .map(|v| self.decode(key, &v))
            .transpose()
    }

    /// Inserts and flushes: a record is durable when this returns.
    pub fn put<T: Serialize>(&self, key: &str, value: &T) -> Result<(), StoreError> {
        self.put_unflushed(key, value)?;
        self.tree()?.flush()?;
        Ok(())
    }

    /// Inserts without waiting for disk; pair with [`Table::flush`].
    pub fn put_unflushed<T: Serialize>(&self, key: &str, value: &T) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(value).map_err(|source| StoreError::Decode {
            tree: self.name,
            key: key.to_owned(),
            source,
        })?;
        self.tree()?.insert(key, bytes)?;
        Ok(())
    }

    /// Waits until everything inserted so far is on disk.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.tree()?.flush_async().await?;
        Ok(())
    }

    pub fn remove(&self, key: &str) -> Result<(), StoreError> {
        self.tree()?.remove(key)?;
        self.tree()?.flush()?;
        Ok(())
    }

    pub fn list<T: DeserializeOwned>(&self) -> Result<Vec<(String, T)>, StoreError> {
        self.tree()?
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
        self.tree()?
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
    fn a_background_open_serves_tables_when_done_and_is_refused_while_held() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = LocalStore::open_in_background(dir.path()).expect("open");
        let t = s.table("things").expect("tree");
        // Every user waits for the one open, from any thread.
        let other = {
            let s = s.clone();
            std::thread::spawn(move || s.table("things").expect("tree").put("b", &2u32))
        };
        t.put("a", &1u32).expect("put");
        other.join().expect("thread").expect("put");
        assert!(s.is_open());
        assert_eq!(t.keys().expect("keys"), ["a", "b"]);
        // Held by this process's open: another background open is refused at once.
        let err = LocalStore::open_in_background(dir.path())
            .err()
            .expect("must fail while held");
        assert!(err.to_string().contains("--state-dir"), "{err}");
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
