//! Code mounts on this node: the trees of files a function's containers get read-only,
//! assembled from blobs of the cluster's embedded registry and cached by content under
//! the state directory:
//!
//! ```text
//! code/blobs/<hex>         one file per blob digest (0444), checked against its SHA-256
//!                          before it is renamed into place
//! code/trees/<mount key>/  one tree per `CodeMount::key`: files 0444 (hard links to their
//!                          blob) or 0555 (executable: copies), directories 0555
//! code/tmp/                blobs being fetched and trees being assembled (cleared at open)
//! ```
//!
//! A tree is assembled once, in `tmp/`, and renamed into place whole, under a lock per key,
//! so containers of one version starting at once share it and none sees half of it. Blobs
//! come through a [`BlobSource`]: the registry ([`RegistryBlobs`]) or, in tests, anything
//! else. Nothing removes old trees or blobs yet.

use std::collections::HashMap;
use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use futures_util::StreamExt;
use gantry_shared::StartFailure;
use gantry_shared::code::{BlobDigest, CodeMount, CodePath};
use sha2::{Digest, Sha256};

use crate::fsutil::remove_dir_all_if_exists;
use crate::image::{ImageError, ImageStore, RegistryAuth, Scheme};

/// Blobs fetched at once for one tree.
const CONCURRENT_FETCHES: usize = 8;

/// The repository code blobs are fetched through (the embedded registry serves every blob
/// from every repository; clients upload them under this name).
pub const CODE_REPO: &str = "gantry-code";

#[derive(Debug, thiserror::Error)]
pub enum CodeError {
    #[error(
        "file `{path}` ({digest}) is not in the cluster's registry; upload it again \
         (`POST /v2/{CODE_REPO}/blobs/uploads/?digest={digest}`) and deploy"
    )]
    Missing { path: CodePath, digest: BlobDigest },
    #[error("cannot fetch file `{path}` ({digest}): {source}")]
    Fetch {
        path: CodePath,
        digest: BlobDigest,
        #[source]
        source: Box<ImageError>,
    },
    #[error(
        "blob {digest} came with other content (sha256:{actual}); nothing was kept, fix the \
         registry's storage"
    )]
    Corrupt { digest: BlobDigest, actual: String },
    #[error("code cache I/O at {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl CodeError {
    /// Whose the failed start is: a missing blob the deployer's, an unreachable registry
    /// the platform's (placed again), anything else the node's.
    pub fn failure(&self) -> StartFailure {
        match self {
            CodeError::Missing { .. } => StartFailure::Spec,
            CodeError::Fetch { source, .. } if source.is_transient(true) => StartFailure::Registry,
            _ => StartFailure::Node,
        }
    }
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> CodeError + '_ {
    move |source| CodeError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Where blobs come from.
pub trait BlobSource: Send + Sync {
    /// Writes blob `digest` to a new file at `dest`. A blob the source does not have is
    /// [`ImageError::BlobNotFound`]. The cache checks the content, and removes `dest` on
    /// any error.
    fn fetch(
        &self,
        digest: &BlobDigest,
        dest: &Path,
    ) -> impl Future<Output = Result<(), ImageError>> + Send;
}

/// Blobs from the cluster's embedded registry, reached as the agent pulls short image
/// names (`Attempts::locate`); `None` while the coordinator has not said where it is.
pub struct RegistryBlobs {
    pub images: ImageStore,
    pub place: Option<(String, RegistryAuth, Scheme)>,
}

impl BlobSource for RegistryBlobs {
    async fn fetch(&self, digest: &BlobDigest, dest: &Path) -> Result<(), ImageError> {
        let Some((reference, auth, scheme)) = &self.place else {
            return Err(ImageError::Registry {
                reference: CODE_REPO.to_owned(),
                message: "the coordinator has not said where the cluster's registry is yet".into(),
            });
        };
        let io = |source| ImageError::Io {
            path: dest.to_owned(),
            source,
        };
        let file = tokio::fs::File::create(dest).await.map_err(io)?;
        let mut out = tokio::io::BufWriter::new(file);
        self.images
            .pull_blob_from(reference, auth, *scheme, digest.as_str(), &mut out)
            .await?;
        out.into_inner().sync_all().await.map_err(io)
    }
}

/// The node's code cache. Cheap to clone; clones share the locks.
#[derive(Clone)]
pub struct CodeCache {
    inner: Arc<Inner>,
}

struct Inner {
    root: PathBuf,
    /// One async lock per tree key and per blob being made (single flight).
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl CodeCache {
    /// Opens (making them) `root`'s directories and clears what an earlier run left in
    /// `tmp/`.
    pub fn open(root: PathBuf) -> Result<Self, CodeError> {
        let tmp = root.join("tmp");
        if tmp.exists() {
            make_writable(&tmp);
            remove_dir_all_if_exists(&tmp).map_err(io_at(&tmp))?;
        }
        for dir in ["blobs", "trees", "tmp"] {
            let dir = root.join(dir);
            std::fs::create_dir_all(&dir).map_err(io_at(&dir))?;
        }
        Ok(Self {
            inner: Arc::new(Inner {
                root,
                locks: Mutex::default(),
            }),
        })
    }

    fn lock(&self, key: String) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self
            .inner
            .locks
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        locks.entry(key).or_default().clone()
    }

    fn tmp_path(&self, what: &str) -> PathBuf {
        let n = gantry_shared::ContainerId::generate();
        self.inner.root.join("tmp").join(format!("{what}-{n}"))
    }

    fn blob_path(&self, digest: &BlobDigest) -> PathBuf {
        self.inner.root.join("blobs").join(digest.hex())
    }

    /// The directory of `mount`'s tree, assembled first if this node has not yet: its
    /// missing blobs are fetched from `source`.
    pub async fn tree(
        &self,
        mount: &CodeMount,
        source: &impl BlobSource,
    ) -> Result<PathBuf, CodeError> {
        let key = mount.key();
        let dest = self.inner.root.join("trees").join(&key);
        if dest.is_dir() {
            return Ok(dest);
        }
        let lock = self.lock(format!("tree:{key}"));
        let _guard = lock.lock().await;
        if dest.is_dir() {
            return Ok(dest);
        }
        // A plain loop rather than stream combinators with closures: those make the future
        // not provably `Send` for every lifetime when a start runs in a spawned task.
        let mut pending = mount.digests().into_iter();
        let mut running = futures_util::stream::FuturesUnordered::new();
        loop {
            while running.len() < CONCURRENT_FETCHES {
                let Some(digest) = pending.next() else { break };
                running.push(self.blob(mount, digest, source));
            }
            match running.next().await {
                Some(fetched) => fetched?,
                None => break,
            }
        }
        let (this, mount, tmp) = (self.clone(), mount.clone(), self.tmp_path("tree"));
        let placed = dest.clone();
        tokio::task::spawn_blocking(move || {
            let result = this.assemble(&mount, &tmp, &placed);
            if result.is_err() {
                make_writable(&tmp);
                let _ = remove_dir_all_if_exists(&tmp);
            }
            result
        })
        .await
        .map_err(|e| CodeError::Io {
            path: dest.clone(),
            source: io::Error::other(e.to_string()),
        })??;
        Ok(dest)
    }

    /// Makes sure blob `digest` is here, fetching and checking it if not.
    async fn blob(
        &self,
        mount: &CodeMount,
        digest: &BlobDigest,
        source: &impl BlobSource,
    ) -> Result<(), CodeError> {
        let path = self.blob_path(digest);
        if path.is_file() {
            return Ok(());
        }
        let lock = self.lock(format!("blob:{}", digest.hex()));
        let _guard = lock.lock().await;
        if path.is_file() {
            return Ok(());
        }
        let file = || {
            mount
                .files
                .iter()
                .find(|f| &f.digest == digest)
                .map(|f| f.path.clone())
                .unwrap_or_else(|| CodePath::new(digest.hex()).expect("a hex digest is a path"))
        };
        let tmp = self.tmp_path("blob");
        let result = async {
            source.fetch(digest, &tmp).await.map_err(|e| match e {
                ImageError::BlobNotFound { .. } => CodeError::Missing {
                    path: file(),
                    digest: digest.clone(),
                },
                source => CodeError::Fetch {
                    path: file(),
                    digest: digest.clone(),
                    source: Box::new(source),
                },
            })?;
            let (checked, expect) = (tmp.clone(), digest.clone());
            tokio::task::spawn_blocking(move || check_and_place(&checked, &expect, &path))
                .await
                .map_err(|e| CodeError::Io {
                    path: tmp.clone(),
                    source: io::Error::other(e.to_string()),
                })?
        }
        .await;
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }

    /// Builds `mount`'s tree at `tmp` from blobs that are all here, then renames it to
    /// `dest`.
    fn assemble(&self, mount: &CodeMount, tmp: &Path, dest: &Path) -> Result<(), CodeError> {
        std::fs::create_dir(tmp).map_err(io_at(tmp))?;
        let mut dirs = vec![tmp.to_owned()];
        for f in &mount.files {
            for parent in f.path.parents() {
                let dir = tmp.join(parent);
                if !dir.is_dir() {
                    std::fs::create_dir(&dir).map_err(io_at(&dir))?;
                    dirs.push(dir);
                }
            }
            let (blob, target) = (self.blob_path(&f.digest), tmp.join(f.path.as_str()));
            if f.executable {
                std::fs::copy(&blob, &target).map_err(io_at(&target))?;
                std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o555))
                    .map_err(io_at(&target))?;
                std::fs::File::open(&target)
                    .and_then(|f| f.sync_all())
                    .map_err(io_at(&target))?;
            } else {
                std::fs::hard_link(&blob, &target).map_err(io_at(&target))?;
            }
        }
        for dir in dirs.iter().rev() {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o555))
                .map_err(io_at(dir))?;
        }
        std::fs::rename(tmp, dest).map_err(io_at(dest))?;
        if let Some(trees) = dest.parent() {
            std::fs::File::open(trees)
                .and_then(|d| d.sync_all())
                .map_err(io_at(trees))?;
        }
        Ok(())
    }
}

/// Checks the fetched file at `tmp` against `digest`, makes it read-only and durable, and
/// renames it to `dest`.
fn check_and_place(tmp: &Path, digest: &BlobDigest, dest: &Path) -> Result<(), CodeError> {
    let mut file = std::fs::File::open(tmp).map_err(io_at(tmp))?;
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = file.read(&mut buf).map_err(io_at(tmp))?;
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
    }
    let actual = hex::encode(hash.finalize());
    if actual != digest.hex() {
        return Err(CodeError::Corrupt {
            digest: digest.clone(),
            actual,
        });
    }
    file.sync_all().map_err(io_at(tmp))?;
    std::fs::set_permissions(tmp, std::fs::Permissions::from_mode(0o444)).map_err(io_at(tmp))?;
    std::fs::rename(tmp, dest).map_err(io_at(dest))
}

/// Gives the owner write access to every directory under `root` again, so a tree that
/// was made read-only can be removed.
fn make_writable(root: &Path) {
    let Ok(meta) = std::fs::symlink_metadata(root) else {
        return;
    };
    if !meta.is_dir() {
        return;
    }
    let _ = std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755));
    if let Ok(entries) = std::fs::read_dir(root) {
        for e in entries.flatten() {
            make_writable(&e.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::os::unix::fs::MetadataExt;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use gantry_shared::code::CodeFile;
    use gantry_shared::volumes::MountPath;

    use super::*;

    /// Blobs from memory; `corrupt` serves other bytes for every digest.
    #[derive(Default)]
    struct Memory {
        blobs: BTreeMap<BlobDigest, Vec<u8>>,
        corrupt: bool,
        fetches: AtomicUsize,
    }

    impl Memory {
        fn add(&mut self, bytes: &[u8]) -> BlobDigest {
            let d = BlobDigest::of(bytes);
            self.blobs.insert(d.clone(), bytes.to_vec());
            d
        }
    }

    impl BlobSource for Memory {
        async fn fetch(&self, digest: &BlobDigest, dest: &Path) -> Result<(), ImageError> {
            self.fetches.fetch_add(1, Ordering::SeqCst);
            let Some(bytes) = self.blobs.get(digest) else {
                return Err(ImageError::BlobNotFound {
                    reference: "memory".into(),
                    digest: digest.to_string(),
                });
            };
            let bytes = match self.corrupt {
                true => b"tampered".to_vec(),
                false => bytes.clone(),
            };
            std::fs::write(dest, bytes).map_err(|source| ImageError::Io {
                path: dest.to_owned(),
                source,
            })
        }
    }

    fn file(path: &str, digest: &BlobDigest, executable: bool) -> CodeFile {
        CodeFile {
            path: CodePath::new(path).expect("path"),
            digest: digest.clone(),
            executable,
        }
    }

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).expect("stat").mode() & 0o7777
    }

    fn entries(dir: &Path) -> usize {
        std::fs::read_dir(dir).expect("ls").count()
    }

    #[tokio::test]
    async fn a_tree_is_assembled_once_with_read_only_modes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = CodeCache::open(dir.path().join("code")).expect("open");
        let mut source = Memory::default();
        let app = source.add(b"print('hi')\n");
        let run = source.add(b"#!/bin/sh\necho run\n");
        let mount = CodeMount {
            path: MountPath::new("/root").expect("mount"),
            files: vec![
                file("app.py", &app, false),
                file("pkg/sub/same.py", &app, false),
                file("bin/run", &run, true),
            ],
        };
        let tree = cache.tree(&mount, &source).await.expect("tree");
        assert_eq!(tree, dir.path().join("code/trees").join(mount.key()));
        assert_eq!(
            std::fs::read(tree.join("app.py")).expect("read"),
            b"print('hi')\n"
        );
        assert_eq!(
            std::fs::read(tree.join("pkg/sub/same.py")).expect("read"),
            b"print('hi')\n"
        );
        assert_eq!(mode(&tree.join("app.py")), 0o444);
        assert_eq!(mode(&tree.join("bin/run")), 0o555);
        for d in ["", "pkg", "pkg/sub", "bin"] {
            assert_eq!(mode(&tree.join(d)), 0o555, "{d}");
        }
        // Plain files are the blob itself; executables are copies.
        let blob = |d: &BlobDigest| dir.path().join("code/blobs").join(d.hex());
        let ino = |p: &Path| std::fs::metadata(p).expect("stat").ino();
        assert_eq!(ino(&tree.join("app.py")), ino(&blob(&app)));
        assert_ne!(ino(&tree.join("bin/run")), ino(&blob(&run)));
        assert_eq!(mode(&blob(&app)), 0o444);
        assert_eq!(
            source.fetches.load(Ordering::SeqCst),
            2,
            "one fetch per blob"
        );

        // Again, and listed in another order: the same tree, nothing fetched.
        let mut again = mount.clone();
        again.files.reverse();
        assert_eq!(cache.tree(&again, &source).await.expect("tree"), tree);
        assert_eq!(source.fetches.load(Ordering::SeqCst), 2);
        assert_eq!(entries(&dir.path().join("code/tmp")), 0);

        // Another tree sharing a blob fetches only what it lacks.
        let extra = source.add(b"more");
        let other = CodeMount {
            path: MountPath::new("/opt").expect("mount"),
            files: vec![file("a", &app, false), file("b", &extra, false)],
        };
        cache.tree(&other, &source).await.expect("tree");
        assert_eq!(source.fetches.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn concurrent_starts_share_one_assembly() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = CodeCache::open(dir.path().join("code")).expect("open");
        let mut source = Memory::default();
        let files = (0..50)
            .map(|i| {
                file(
                    &format!("m/f{i}"),
                    &source.add(format!("{i}").as_bytes()),
                    false,
                )
            })
            .collect();
        let mount = CodeMount {
            path: MountPath::new("/root").expect("mount"),
            files,
        };
        let (a, b) = tokio::join!(cache.tree(&mount, &source), cache.tree(&mount, &source));
        assert_eq!(a.expect("a"), b.expect("b"));
        assert_eq!(source.fetches.load(Ordering::SeqCst), 50);
        assert_eq!(entries(&dir.path().join("code/trees")), 1);
    }

    #[tokio::test]
    async fn a_corrupt_or_missing_blob_is_refused_and_nothing_is_left() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = CodeCache::open(dir.path().join("code")).expect("open");
        let mut source = Memory {
            corrupt: true,
            ..Memory::default()
        };
        let d = source.add(b"real");
        let mount = CodeMount {
            path: MountPath::new("/root").expect("mount"),
            files: vec![file("x/y.py", &d, false)],
        };
        let e = cache.tree(&mount, &source).await.expect_err("corrupt");
        assert!(matches!(e, CodeError::Corrupt { .. }), "{e}");
        assert_eq!(e.failure(), StartFailure::Node);
        for sub in ["blobs", "trees", "tmp"] {
            assert_eq!(entries(&dir.path().join("code").join(sub)), 0, "{sub}");
        }

        let empty = Memory::default();
        let e = cache.tree(&mount, &empty).await.expect_err("missing");
        assert!(matches!(e, CodeError::Missing { .. }), "{e}");
        assert_eq!(e.failure(), StartFailure::Spec);
        assert!(e.to_string().contains("`x/y.py`"), "{e}");
        assert!(e.to_string().contains(d.as_str()), "{e}");
        assert_eq!(entries(&dir.path().join("code/tmp")), 0);

        let store = crate::store::LocalStore::open(&dir.path().join("db")).expect("store");
        let images = ImageStore::open(
            &dir.path().join("images"),
            &store,
            crate::image::PullConfig::default(),
        )
        .expect("images");
        let nowhere = RegistryBlobs {
            images,
            place: None,
        };
        let e = cache.tree(&mount, &nowhere).await.expect_err("no registry");
        assert_eq!(e.failure(), StartFailure::Registry, "{e}");
    }

    #[test]
    fn open_clears_what_a_crash_left() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("code");
        let half = root.join("tmp/tree-x/sub");
        std::fs::create_dir_all(&half).expect("mkdir");
        std::fs::set_permissions(&half, std::fs::Permissions::from_mode(0o555)).expect("chmod");
        CodeCache::open(root.clone()).expect("open");
        assert_eq!(entries(&root.join("tmp")), 0);
    }
}
