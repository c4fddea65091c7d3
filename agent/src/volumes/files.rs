//! A volume's files, for `gantry volume ls|get|put|rm`. Every path is resolved beneath
//! the volume's root with `cap-std`: `..` and symbolic links that lead out of it (a
//! container may have left one pointing at `/etc`) are refused, not followed, so the
//! agent, which runs as root, only ever touches the volume. Writes go to a temporary file
//! beside their target and replace it only once complete.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use cap_std::fs::Dir;
use gantry_shared::volumes::{
    EntryKind, FailureKind, MAX_LIST_ENTRIES, VolumeEntry, VolumeFailure, VolumeListing, VolumePath,
};

/// Opens a volume's root for resolving paths beneath it.
fn open_root(root: &Path) -> Result<Dir, VolumeFailure> {
    Dir::open_ambient_dir(root, cap_std::ambient_authority()).map_err(super::io_failure)
}

/// A failure at `path`: missing, outside, or what the filesystem said.
fn at(path: &VolumePath, e: io::Error) -> VolumeFailure {
    let shown = if path.is_root() { "/" } else { path.as_str() };
    match e.kind() {
        io::ErrorKind::NotFound => VolumeFailure::new(
            FailureKind::NotFound,
            format!("`{shown}` is not in the volume"),
        ),
        // cap-std's answer to a path (a symbolic link) that leads out of the root.
        io::ErrorKind::PermissionDenied => VolumeFailure::new(
            FailureKind::BadPath,
            format!("`{shown}` leads out of the volume (a symbolic link?); it is not followed"),
        ),
        _ => match e.raw_os_error() {
            Some(libc::EISDIR) => VolumeFailure::new(
                FailureKind::BadPath,
                format!("`{shown}` is a directory; name a file in it"),
            ),
            Some(libc::ENOTDIR) => VolumeFailure::new(
                FailureKind::BadPath,
                format!("a component of `{shown}` is a file, not a directory"),
            ),
            Some(libc::ELOOP) => VolumeFailure::new(
                FailureKind::BadPath,
                format!("`{shown}` is a symbolic link loop"),
            ),
            _ => {
                let mut f = super::io_failure(e);
                f.message = format!("`{shown}`: {}", f.message);
                f
            }
        },
    }
}

fn entry(path: String, meta: &cap_std::fs::Metadata) -> VolumeEntry {
    let ft = meta.file_type();
    let kind = if ft.is_symlink() {
        EntryKind::Symlink
    } else if ft.is_dir() {
        EntryKind::Dir
    } else if ft.is_file() {
        EntryKind::File
    } else {
        EntryKind::Other
    };
    let modified_ms = meta
        .modified()
        .ok()
        .and_then(|t| t.into_std().duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis() as u64);
    VolumeEntry {
        path,
        kind,
        size_bytes: if kind == EntryKind::File {
            meta.len()
        } else {
            0
        },
        modified_ms,
    }
}

/// The entries under `path` (a file: itself), sorted by path, at most
/// [`MAX_LIST_ENTRIES`]; all the way down with `recursive` (symbolic links are listed,
/// never followed).
pub fn list(
    root: &Path,
    path: &VolumePath,
    recursive: bool,
) -> Result<VolumeListing, VolumeFailure> {
    let dir = open_root(root)?;
    let target = if path.is_root() {
        Path::new(".")
    } else {
        Path::new(path.as_str())
    };
    let meta = dir.symlink_metadata(target).map_err(|e| at(path, e))?;
    if !meta.is_dir() {
        return Ok(VolumeListing {
            entries: vec![entry(path.as_str().to_owned(), &meta)],
            truncated: false,
        });
    }
    let mut entries = Vec::new();
    let mut truncated = false;
    let mut pending = vec![path.clone()];
    'walk: while let Some(current) = pending.pop() {
        let sub = if current.is_root() {
            dir.try_clone().map_err(|e| at(&current, e))?
        } else {
            dir.open_dir(current.as_str())
                .map_err(|e| at(&current, e))?
        };
        for item in sub.entries().map_err(|e| at(&current, e))? {
            let item = item.map_err(|e| at(&current, e))?;
            let name = item.file_name().to_string_lossy().into_owned();
            let Ok(child) = current.join(&name) else {
                continue;
            };
            let meta = item.metadata().map_err(|e| at(&child, e))?;
            if entries.len() == MAX_LIST_ENTRIES {
                truncated = true;
                break 'walk;
            }
            if recursive && meta.is_dir() {
                pending.push(child.clone());
            }
            entries.push(entry(child.as_str().to_owned(), &meta));
        }
    }
    entries.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(VolumeListing { entries, truncated })
}

/// Opens a file for reading, with its size.
pub fn open(root: &Path, path: &VolumePath) -> Result<(std::fs::File, u64), VolumeFailure> {
    if path.is_root() {
        return Err(at(path, io::Error::from_raw_os_error(libc::EISDIR)));
    }
    let file = open_root(root)?
        .open(path.as_str())
        .map_err(|e| at(path, e))?;
    let meta = file.metadata().map_err(|e| at(path, e))?;
    if meta.is_dir() {
        return Err(at(path, io::Error::from_raw_os_error(libc::EISDIR)));
    }
    Ok((file.into_std(), meta.len()))
}

/// Removes a file, a symbolic link (not what it points at) or a directory and all in it.
pub fn remove(root: &Path, path: &VolumePath) -> Result<(), VolumeFailure> {
    if path.is_root() {
        return Err(VolumeFailure::new(
            FailureKind::BadPath,
            "name a path in the volume; `gantry volume delete` removes the whole volume",
        ));
    }
    let dir = open_root(root)?;
    let meta = dir
        .symlink_metadata(path.as_str())
        .map_err(|e| at(path, e))?;
    if meta.is_dir() {
        dir.remove_dir_all(path.as_str())
    } else {
        dir.remove_file(path.as_str())
    }
    .map_err(|e| at(path, e))
}

/// A file being written: a temporary file beside the target that [`Upload::commit`]
/// renames over it. Dropped without a commit, the temporary file is removed.
pub struct Upload {
    parent: Dir,
    temp: PathBuf,
    name: String,
    path: VolumePath,
    file: Option<std::fs::File>,
    committed: bool,
}

impl Upload {
    /// Starts writing `path` (its parent directories are made).
    pub fn begin(root: &Path, path: &VolumePath) -> Result<Self, VolumeFailure> {
        let Some(name) = path.file_name().map(str::to_owned) else {
            return Err(VolumeFailure::new(
                FailureKind::BadPath,
                "name a file to write, not the volume's root",
            ));
        };
        let dir = open_root(root)?;
        let parent_path = Path::new(path.as_str())
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        dir.create_dir_all(parent_path).map_err(|e| at(path, e))?;
        let parent = dir.open_dir(parent_path).map_err(|e| at(path, e))?;
        if parent.symlink_metadata(&name).is_ok_and(|m| m.is_dir()) {
            return Err(at(path, io::Error::from_raw_os_error(libc::EISDIR)));
        }
        // Unique per upload (two uploads of one file at once each write their own), and
        // never an existing file.
        static UPLOADS: AtomicU64 = AtomicU64::new(0);
        let temp = PathBuf::from(format!(
            ".{name}.gantry-upload-{}-{}",
            std::process::id(),
            UPLOADS.fetch_add(1, Ordering::Relaxed)
        ));
        let file = parent
            .open_with(
                &temp,
                cap_std::fs::OpenOptions::new().write(true).create_new(true),
            )
            .map_err(|e| at(path, e))?
            .into_std();
        Ok(Self {
            parent,
            temp,
            name,
            path: path.clone(),
            file: Some(file),
            committed: false,
        })
    }

    /// The temporary file, to write the bytes into.
    pub fn file(&mut self) -> Result<std::fs::File, VolumeFailure> {
        self.file
            .take()
            .ok_or_else(|| VolumeFailure::new(FailureKind::Io, "the upload's file was taken"))
    }

    /// Makes the written bytes durable and puts them in place.
    pub fn commit(mut self, file: std::fs::File) -> Result<(), VolumeFailure> {
        file.sync_all().map_err(|e| at(&self.path, e))?;
        drop(file);
        self.parent
            .rename(&self.temp, &self.parent, &self.name)
            .map_err(|e| at(&self.path, e))?;
        self.committed = true;
        Ok(())
    }

    /// A write error as a failure at this upload's path.
    pub fn failure(&self, e: io::Error) -> VolumeFailure {
        at(&self.path, e)
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        if !self.committed {
            let _ = self.parent.remove_file(&self.temp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn path(p: &str) -> VolumePath {
        VolumePath::new(p).expect("path")
    }

    #[test]
    fn write_list_read_and_remove_inside_the_root() {
        let tmp = tempfile::tempdir().expect("tmp");
        let root = tmp.path();
        let mut up = Upload::begin(root, &path("models/a/weights.bin")).expect("begin");
        let mut f = up.file().expect("file");
        f.write_all(b"0123456789").expect("write");
        // Nothing is in place before the commit.
        assert!(!root.join("models/a/weights.bin").exists());
        up.commit(f).expect("commit");
        assert_eq!(
            std::fs::read(root.join("models/a/weights.bin")).expect("read"),
            b"0123456789"
        );
        let all = list(root, &VolumePath::root(), true).expect("list");
        let paths: Vec<_> = all.entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["models", "models/a", "models/a/weights.bin"]);
        assert_eq!(all.entries[2].size_bytes, 10);
        assert_eq!(all.entries[2].kind, EntryKind::File);
        let top = list(root, &VolumePath::root(), false).expect("list");
        assert_eq!(top.entries.len(), 1);
        let (mut file, size) = open(root, &path("/models/a/weights.bin")).expect("open");
        let mut back = String::new();
        file.read_to_string(&mut back).expect("read");
        assert_eq!((back.as_str(), size), ("0123456789", 10));
        assert_eq!(
            open(root, &path("models")).expect_err("dir").kind,
            FailureKind::BadPath
        );
        remove(root, &path("models")).expect("rm");
        assert!(
            list(root, &VolumePath::root(), true)
                .expect("list")
                .entries
                .is_empty()
        );
        assert_eq!(
            remove(root, &path("models")).expect_err("gone").kind,
            FailureKind::NotFound
        );
    }

    #[test]
    fn an_abandoned_upload_leaves_nothing() {
        let tmp = tempfile::tempdir().expect("tmp");
        let mut up = Upload::begin(tmp.path(), &path("x")).expect("begin");
        up.file().expect("file").write_all(b"half").expect("write");
        drop(up);
        assert_eq!(std::fs::read_dir(tmp.path()).expect("dir").count(), 0);
    }

    #[test]
    fn links_out_of_the_volume_are_not_followed() {
        let tmp = tempfile::tempdir().expect("tmp");
        let outside = tmp.path().join("outside");
        std::fs::create_dir(&outside).expect("mkdir");
        std::fs::write(outside.join("secret"), b"host file").expect("write");
        let root = tmp.path().join("vol");
        std::fs::create_dir(&root).expect("mkdir");
        // What a container could leave behind: absolute and relative escapes.
        std::os::unix::fs::symlink(outside.join("secret"), root.join("abs")).expect("link");
        std::os::unix::fs::symlink("../outside", root.join("rel")).expect("link");
        for p in ["abs", "rel/secret"] {
            assert_eq!(
                open(&root, &path(p)).expect_err(p).kind,
                FailureKind::BadPath,
                "{p}"
            );
        }
        assert!(Upload::begin(&root, &path("rel/new")).is_err());
        assert!(!outside.join("new").exists());
        // Removing the link removes the link only.
        remove(&root, &path("abs")).expect("rm link");
        assert!(outside.join("secret").exists());
        // Listing shows links as links.
        let l = list(&root, &VolumePath::root(), true).expect("list");
        assert_eq!(l.entries.len(), 1);
        assert_eq!(l.entries[0].kind, EntryKind::Symlink);
    }
}
