//! Images: a content-addressed layer cache on disk plus image records in the local store.
//!
//! Layout under the images directory:
//! - `layers/sha256/<hex>/` — one unpacked layer per blob digest, shared by every image that
//!   uses it; it appears (by rename) only once fully unpacked and digest-verified.
//! - `tmp/` — downloads and half-unpacked layers; cleared at open.
//! - `records/` — a copy of the image records as files, for lookups while the store opens
//!   (`records.rs`).
//!
//! Images are read-only: containers stack these directories as overlayfs lower layers.

pub mod pack;
mod pull;
mod records;
mod unpack;

use std::collections::HashMap;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use gantry_shared::image_name::with_default_tag;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::fsutil;
use crate::store::{LocalStore, StoreError, Table};
pub use pull::{CaFileError, PullConfig, RegistryAuth, Scheme, pem_roots, read_roots};
pub use unpack::Compression;

/// PATH for images that do not set one (the value Docker uses): an imported image gets it
/// written into its config, and a container whose image has none runs with it.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What an image's config says about how to run it (the OCI image config's `config`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    /// `KEY=VALUE` pairs.
    pub env: Vec<String>,
    pub workdir: Option<String>,
    pub user: Option<String>,
}

/// A named image: its layers (bottom first) and run config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    pub name: String,
    /// Manifest digest for pulled images; digest of the imported tarball otherwise.
    pub digest: String,
    /// Where it came from: the registry reference, or `import:<path>`.
    pub source: String,
    /// Layer blob digests (`sha256:<hex>`), bottom layer first.
    pub layers: Vec<String>,
    pub config: ImageConfig,
    /// Unix seconds when this record was written.
    pub created: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(
        "image `{name}` is not on this host; pull it (`gantry-agent image pull REF`) or import it (`gantry-agent image import DIR --name NAME`)"
    )]
    NotFound { name: String },
    #[error("blob {digest} is not in the registry of `{reference}`")]
    BlobNotFound { reference: String, digest: String },
    #[error(
        "`{reference}` is not a valid image reference ({reason}); use e.g. `registry.example.com/team/train:v1`"
    )]
    BadReference { reference: String, reason: String },
    #[error(
        "registry refused access to `{reference}` ({message}); pass credentials that may pull it (`--username` and `--password`, or `--token`; or GANTRY_REGISTRY_USER / GANTRY_REGISTRY_PASSWORD / GANTRY_REGISTRY_TOKEN)"
    )]
    Unauthorized { reference: String, message: String },
    #[error(
        "image name `{name}` is not valid: use letters, digits, `.`, `_`, `-`, `/` and an optional `:tag`"
    )]
    BadName { name: String },
    #[error(
        "cannot reach registry for `{reference}`: {message}; check the address, network and credentials"
    )]
    Registry { reference: String, message: String },
    #[error(
        "layer {digest} of `{reference}` does not match its digest (got {actual}); the registry served corrupt or tampered data — nothing was stored, fix the registry and pull again"
    )]
    DigestMismatch {
        reference: String,
        digest: String,
        actual: String,
    },
    #[error(
        "layer {digest} of `{reference}` has media type `{media_type}`, which Gantry cannot unpack; supported: OCI/Docker tar, tar+gzip and tar+zstd layers"
    )]
    UnsupportedMediaType {
        reference: String,
        digest: String,
        media_type: String,
    },
    #[error("image config of `{reference}` is invalid: {source}")]
    BadConfig {
        reference: String,
        source: serde_json::Error,
    },
    #[error("cannot import {path}: {reason}")]
    Import { path: PathBuf, reason: String },
    #[error("cannot unpack layer {path}: {source}")]
    Unpack { path: PathBuf, source: io::Error },
    #[error(
        "layer tarball {blob} has an entry `{entry}` outside the layer (absolute path or `..`); refusing to unpack it"
    )]
    UnsafePath { blob: PathBuf, entry: PathBuf },
    #[error("image store I/O error at {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl ImageError {
    /// Whether trying again later may succeed: the registry was unreachable, timed out or
    /// failed (5xx), or (`own_registry`: the cluster's embedded one, which restarts with
    /// its coordinator) refused the node's token. A missing image, a bad reference or
    /// corrupt data will not get better by waiting.
    pub fn is_transient(&self, own_registry: bool) -> bool {
        match self {
            ImageError::Registry { .. } => true,
            ImageError::Unauthorized { .. } => own_registry,
            _ => false,
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ImageError + '_ {
    move |source| ImageError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The image cache. Cheap to clone; all clones share the layer locks, so two pulls of the
/// same layer at once download it once.
#[derive(Clone)]
pub struct ImageStore {
    inner: Arc<Inner>,
}

struct Inner {
    root: PathBuf,
    table: Table,
    files: records::RecordFiles,
    /// Records found in the files (not the store), to check once the store is open.
    from_files: Mutex<Vec<ImageRecord>>,
    pull: PullConfig,
    /// One async lock per layer digest being fetched (single flight).
    layer_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Layer blobs fetched from registries since open (tests and metrics read it).
    downloads: AtomicU64,
}

impl ImageStore {
    pub fn open(root: &Path, store: &LocalStore, pull: PullConfig) -> Result<Self, ImageError> {
        let tmp = root.join("tmp");
        fsutil::remove_dir_all_if_exists(&tmp).map_err(io_err(&tmp))?;
        for dir in [root.join("layers/sha256"), tmp] {
            std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        }
        let files = records::RecordFiles::open(root).map_err(io_err(&root.join("records")))?;
        let table = store.table("images")?;
        if table.is_ready() {
            // Records written before the files existed (or a file lost in a host crash).
            for (_, rec) in table.list::<ImageRecord>()? {
                if let Err(e) = files.put(&rec) {
                    tracing::warn!(image = %rec.name, error = %e, "cannot file an image record");
                }
            }
        }
        Ok(Self {
            inner: Arc::new(Inner {
                root: root.to_owned(),
                table,
                files,
                from_files: Mutex::default(),
                pull,
                layer_locks: Mutex::default(),
                downloads: AtomicU64::new(0),
            }),
        })
    }

    /// Looks an image up by the name it was imported or pulled under. Short names also
    /// match with `:latest`, and the normalized registry form (`docker.io/library/…`).
    /// While the store is still opening, its copy in files is looked at first.
    pub fn get(&self, name: &str) -> Result<ImageRecord, ImageError> {
        if !self.inner.table.is_ready()
            && let Some(rec) = candidates(name).find_map(|key| self.inner.files.get(&key))
        {
            let mut found = self
                .inner
                .from_files
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            found.push(rec.clone());
            return Ok(rec);
        }
        for key in candidates(name) {
            if let Some(rec) = self.inner.table.get::<ImageRecord>(&key)? {
                return Ok(rec);
            }
        }
        Err(ImageError::NotFound {
            name: name.to_owned(),
        })
    }

    /// Checks the records found in the files against the store (waiting for it to open):
    /// the names whose store record differs (a file left stale by a crash), each file now
    /// rewritten from the store.
    pub fn stale_files(&self) -> Result<Vec<String>, ImageError> {
        let found: Vec<ImageRecord> = std::mem::take(
            &mut *self
                .inner
                .from_files
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        );
        let mut stale = Vec::new();
        for rec in found {
            let stored: Option<ImageRecord> = self.inner.table.get(&rec.name)?;
            if stored.as_ref() == Some(&rec) {
                continue;
            }
            tracing::warn!(image = %rec.name, "an image record's file differed from the store");
            if let Some(stored) = &stored
                && let Err(e) = self.inner.files.put(stored)
            {
                tracing::warn!(image = %rec.name, error = %e, "cannot file an image record");
            }
            stale.push(rec.name);
        }
        Ok(stale)
    }

    /// The names of every image held, nothing decoded (what gossip publishes).
    pub fn names(&self) -> Result<Vec<String>, ImageError> {
        Ok(self.inner.table.keys()?)
    }

    pub fn list(&self) -> Result<Vec<ImageRecord>, ImageError> {
        Ok(self
            .inner
            .table
            .list()?
            .into_iter()
            .map(|(_, v)| v)
            .collect())
    }

    /// Unpacked layer directories of `image`, bottom layer first.
    pub fn layer_dirs(&self, image: &ImageRecord) -> Result<Vec<PathBuf>, ImageError> {
        image
            .layers
            .iter()
            .map(|d| {
                let dir = self.layer_dir(d)?;
                if dir.is_dir() {
                    Ok(dir)
                } else {
                    Err(ImageError::Import {
                        path: dir,
                        reason: format!("layer {d} of image `{}` is missing from the cache; pull or import the image again", image.name),
                    })
                }
            })
            .collect()
    }

    /// Layer blobs fetched from registries since this store was opened.
    pub fn downloads(&self) -> u64 {
        self.inner.downloads.load(Ordering::Relaxed)
    }

    fn layer_dir(&self, digest: &str) -> Result<PathBuf, ImageError> {
        let hex = digest
            .strip_prefix("sha256:")
            .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
            .ok_or_else(|| ImageError::BadReference {
                reference: digest.to_owned(),
                reason: "only sha256 layer digests are supported".into(),
            })?;
        Ok(self.inner.root.join("layers/sha256").join(hex))
    }

    fn tmp_path(&self, what: &str) -> PathBuf {
        let n = gantry_shared::ContainerId::generate();
        self.inner.root.join("tmp").join(format!("{what}-{n}"))
    }

    fn layer_lock(&self, digest: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self
            .inner
            .layer_locks
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        locks.entry(digest.to_owned()).or_default().clone()
    }

    /// Unpacks an already-verified blob into the cache under `digest` (idempotent).
    async fn install_layer(
        &self,
        digest: &str,
        blob: PathBuf,
        compression: Compression,
    ) -> Result<(), ImageError> {
        let dest = self.layer_dir(digest)?;
        if dest.is_dir() {
            return Ok(());
        }
        let staging = self.tmp_path("layer");
        let work = staging.clone();
        let result = tokio::task::spawn_blocking(move || -> Result<(), ImageError> {
            std::fs::create_dir_all(&work).map_err(io_err(&work))?;
            unpack::unpack_layer(&blob, compression, &work)?;
            std::fs::rename(&work, &dest).map_err(io_err(&dest))
        })
        .await
        .unwrap_or_else(|e| {
            Err(ImageError::Io {
                path: staging.clone(),
                source: io::Error::other(e),
            })
        });
        if result.is_err() {
            let _ = fsutil::remove_dir_all_if_exists(&staging);
        }
        result
    }

    fn put_record(&self, rec: &ImageRecord) -> Result<(), ImageError> {
        self.inner.table.put(&rec.name, rec)?;
        // The store has it: a file that cannot be written only makes early lookups slower.
        if let Err(e) = self.inner.files.put(rec) {
            tracing::warn!(image = %rec.name, error = %e, "cannot file an image record");
        }
        Ok(())
    }

    /// Imports a root filesystem (a directory, or a tarball optionally gzip/zstd
    /// compressed) as a one-layer image called `name` with run defaults `config`
    /// (PATH is added when `config.env` lacks it).
    pub async fn import(
        &self,
        source: &Path,
        name: &str,
        config: ImageConfig,
    ) -> Result<ImageRecord, ImageError> {
        let name = validate_name(name)?;
        let meta = std::fs::metadata(source).map_err(|e| ImageError::Import {
            path: source.to_owned(),
            reason: format!("{e}; pass an existing directory or tarball"),
        })?;
        let (blob, compression, owned_blob) = if meta.is_dir() {
            let blob = self.tmp_path("import.tar");
            let (src, dst) = (source.to_owned(), blob.clone());
            tokio::task::spawn_blocking(move || tar_directory(&src, &dst))
                .await
                .map_err(|e| ImageError::Io {
                    path: blob.clone(),
                    source: io::Error::other(e),
                })?
                .map_err(|e| ImageError::Import {
                    path: source.to_owned(),
                    reason: e.to_string(),
                })?;
            (blob, Compression::None, true)
        } else {
            let c = Compression::sniff(source).map_err(io_err(source))?;
            (source.to_owned(), c, false)
        };
        let result = self
            .import_blob(&blob, compression, &name, source, config)
            .await;
        if owned_blob {
            let _ = std::fs::remove_file(&blob);
        }
        result
    }

    async fn import_blob(
        &self,
        blob: &Path,
        compression: Compression,
        name: &str,
        source: &Path,
        mut config: ImageConfig,
    ) -> Result<ImageRecord, ImageError> {
        let digest = {
            let blob = blob.to_owned();
            tokio::task::spawn_blocking(move || sha256_file(&blob))
                .await
                .map_err(|e| ImageError::Io {
                    path: source.to_owned(),
                    source: io::Error::other(e),
                })?
                .map_err(io_err(source))?
        };
        let lock = self.layer_lock(&digest);
        let _guard = lock.lock().await;
        self.install_layer(&digest, blob.to_owned(), compression)
            .await?;
        let rec = ImageRecord {
            name: name.to_owned(),
            digest: digest.clone(),
            source: format!("import:{}", source.display()),
            layers: vec![digest],
            config: {
                if !config.env.iter().any(|e| e.starts_with("PATH=")) {
                    config.env.insert(0, format!("PATH={DEFAULT_PATH}"));
                }
                config
            },
            created: unix_now(),
        };
        self.put_record(&rec)?;
        Ok(rec)
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The names `name` may be stored under, in the order [`ImageStore::get`] tries them.
/// Lazy: the last one needs the full reference grammar, a regex that takes tens of
/// milliseconds to compile (once per process, so in every `gantry-agent run`), and is
/// only worked out when the plain names missed (`index.docker.io/…`, `docker.io/busybox`).
fn candidates(name: &str) -> impl Iterator<Item = String> + '_ {
    let parsed = std::iter::once_with(|| name.parse::<oci_client::Reference>().ok());
    gantry_shared::image_name::local_candidates(name)
        .into_iter()
        .chain(parsed.flatten().map(|r| r.whole()))
}

fn validate_name(name: &str) -> Result<String, ImageError> {
    let ok = !name.is_empty()
        && name.len() <= 255
        && !name.starts_with(['/', '.', '-', ':'])
        && !name.contains("..")
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-/:@".contains(c));
    if ok {
        Ok(with_default_tag(name))
    } else {
        Err(ImageError::BadName {
            name: name.to_owned(),
        })
    }
}

fn sha256_file(path: &Path) -> io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    io::copy(&mut f, &mut h)?;
    Ok(format!("sha256:{}", hex::encode(h.finalize())))
}

/// Writes `dir` as an uncompressed tarball (owners, modes and mtimes kept).
fn tar_directory(dir: &Path, out: &Path) -> io::Result<()> {
    let file = std::fs::File::create(out)?;
    let mut b = tar::Builder::new(io::BufWriter::new(file));
    b.follow_symlinks(false);
    b.mode(tar::HeaderMode::Complete);
    b.append_dir_all(".", dir)?;
    b.into_inner()?.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The coordinator judges a short image name by the names gossip lists
    /// (`image_name::local_candidates`); the lookup here must try the same ones.
    #[test]
    fn short_names_are_looked_up_as_the_coordinator_expects() {
        let digest = format!("sha256:{}", "ab".repeat(32));
        for name in [
            "busybox".to_owned(),
            "busybox:1.36".into(),
            "team/x".into(),
            "team/x:v1".into(),
            format!("x@{digest}"),
        ] {
            let mut here: Vec<String> = candidates(&name).collect();
            here.dedup();
            assert_eq!(
                here,
                gantry_shared::image_name::local_candidates(&name),
                "{name}"
            );
        }
    }

    /// A store opened in the background at `db`, once the last process's lock is gone
    /// (sled releases it from a thread after the drop).
    fn reopen_in_background(db: &Path) -> LocalStore {
        (0..100)
            .find_map(|_| {
                LocalStore::open_in_background(db).ok().or_else(|| {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                    None
                })
            })
            .expect("reopen")
    }

    #[tokio::test]
    async fn while_the_store_opens_records_come_from_their_files_and_are_checked_after() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (db, root, rootfs) = (
            dir.path().join("db"),
            dir.path().join("images"),
            dir.path().join("rootfs"),
        );
        std::fs::create_dir_all(&rootfs).expect("rootfs");
        std::fs::write(rootfs.join("hello"), "hi").expect("file");
        let imported = {
            let store = LocalStore::open(&db).expect("store");
            let images = ImageStore::open(&root, &store, PullConfig::default()).expect("images");
            images
                .import(&rootfs, "x", ImageConfig::default())
                .await
                .expect("import")
        };

        // Found in its file before the store has opened; the store agrees.
        let store = reopen_in_background(&db);
        let images = ImageStore::open(&root, &store, PullConfig::default()).expect("images");
        assert!(!store.is_open());
        assert_eq!(images.get("x").expect("found"), imported);
        assert!(!store.is_open(), "the lookup did not wait for the store");
        assert!(images.stale_files().expect("checked").is_empty());
        assert!(store.is_open());
        drop((images, store));

        // A file that differs from the store (left by a crash) is found stale after the
        // start, and rewritten from the store.
        let files = records::RecordFiles::open(&root).expect("files");
        let mut wrong = imported.clone();
        wrong.digest = format!("sha256:{}", "00".repeat(32));
        std::fs::write(
            root.join("records")
                .join(format!("{}.json", hex::encode(Sha256::digest(b"x:latest")))),
            serde_json::to_vec(&wrong).expect("json"),
        )
        .expect("tamper");
        assert_eq!(files.get("x:latest"), Some(wrong.clone()));
        let store = reopen_in_background(&db);
        let images = ImageStore::open(&root, &store, PullConfig::default()).expect("images");
        assert_eq!(images.get("x").expect("found"), wrong);
        assert_eq!(images.stale_files().expect("checked"), ["x:latest"]);
        assert_eq!(files.get("x:latest"), Some(imported));
    }

    #[test]
    fn names_are_validated() {
        assert!(validate_name("team/train:v1").is_ok());
        for bad in ["", "../x", "/abs", "a b", "x;rm"] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }
}
