//! The volumes whose files this node holds: local volumes under the state directory, and
//! shared ones under the operator's `[volumes] shared_path` (the same filesystem on every
//! node that declares it). [`Volumes`] makes and removes them, gives the runtime the host
//! directory a container's mount comes from, and reads and writes their files for the
//! coordinator ([`files`]); [`serve`] answers `Command::Volume` streams.
//!
//! A local volume `NAME` is the directory `volumes/NAME/`: its files are in `data/`. With a
//! size it also holds `fs.img`, a sparse ext4 image of that size loop-mounted on `data/`
//! ([`mounts`]), so a writer past the size gets `ENOSPC`; the mount is made at create and
//! again at agent start if the host rebooted. A shared volume is `SHARED_PATH/NAME/`.
//! Every path inside a volume is resolved beneath its root (`cap-std`): a symbolic link
//! a container left that points outside is refused, not followed.

use std::path::{Path, PathBuf};

use gantry_shared::volumes::{FailureKind, VolumeAttach, VolumeBackend, VolumeFailure, VolumeName};

pub mod files;
pub mod mounts;
pub mod serve;

/// A local volume's files, inside its directory.
const DATA: &str = "data";
/// A sized local volume's filesystem image, inside its directory.
const IMAGE: &str = "fs.img";

/// The volumes of this node. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Volumes {
    local_root: PathBuf,
    shared_root: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum VolumesError {
    #[error("cannot create the volumes directory {}: {source}", path.display())]
    LocalRoot {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "[volumes] shared_path {} is not a directory ({source}); mount the shared \
         filesystem there, or remove shared_path from agent.toml",
        path.display()
    )]
    SharedRoot {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl Volumes {
    /// Volumes under `local_root` (created if missing) and, when the node declares one,
    /// `shared_root` (which must exist). Sized local volumes whose filesystem is not
    /// mounted (the host rebooted) are mounted again; one that cannot be is logged and
    /// fails the containers that mount it.
    pub fn open(local_root: &Path, shared_root: Option<&Path>) -> Result<Self, VolumesError> {
        std::fs::create_dir_all(local_root).map_err(|source| VolumesError::LocalRoot {
            path: local_root.to_owned(),
            source,
        })?;
        if let Some(shared) = shared_root {
            match std::fs::metadata(shared) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    return Err(VolumesError::SharedRoot {
                        path: shared.to_owned(),
                        source: std::io::Error::from_raw_os_error(libc::ENOTDIR),
                    });
                }
                Err(source) => {
                    return Err(VolumesError::SharedRoot {
                        path: shared.to_owned(),
                        source,
                    });
                }
            }
        }
        let volumes = Self {
            local_root: local_root.to_owned(),
            shared_root: shared_root.map(Path::to_owned),
        };
        volumes.remount();
        Ok(volumes)
    }

    /// Whether this node declares shared volume storage.
    pub fn has_shared(&self) -> bool {
        self.shared_root.is_some()
    }

    /// Mounts every sized local volume whose filesystem is not mounted.
    fn remount(&self) {
        let Ok(entries) = std::fs::read_dir(&self.local_root) else {
            return;
        };
        for entry in entries.flatten() {
            let dir = entry.path();
            let name = entry.file_name();
            if name.to_string_lossy().starts_with('.') || !dir.join(IMAGE).exists() {
                continue;
            }
            if let Err(e) = mounts::ensure_mounted(&dir.join(IMAGE), &dir.join(DATA)) {
                tracing::error!(volume = %name.to_string_lossy(), error = %e, "cannot mount a volume's filesystem");
            }
        }
    }

    /// The directory of a local volume.
    fn local_dir(&self, name: &VolumeName) -> PathBuf {
        self.local_root.join(name.as_str())
    }

    fn shared_root(&self) -> Result<&Path, VolumeFailure> {
        self.shared_root.as_deref().ok_or_else(|| {
            VolumeFailure::new(
                FailureKind::Unsupported,
                "this node declares no shared volume storage ([volumes] shared_path in agent.toml)",
            )
        })
    }

    /// Where a volume's files are on this host; a sized local volume's filesystem is
    /// mounted first if it is not (the host rebooted since).
    pub fn root(
        &self,
        name: &VolumeName,
        backend: &VolumeBackend,
    ) -> Result<PathBuf, VolumeFailure> {
        match backend {
            VolumeBackend::Shared => {
                let dir = self.shared_root()?.join(name.as_str());
                if !dir.is_dir() {
                    return Err(missing(name));
                }
                Ok(dir)
            }
            VolumeBackend::Local { .. } => self.local_data(name),
        }
    }

    /// A local volume's `data/`, its filesystem mounted.
    fn local_data(&self, name: &VolumeName) -> Result<PathBuf, VolumeFailure> {
        let dir = self.local_dir(name);
        let data = dir.join(DATA);
        if !data.is_dir() {
            return Err(missing(name));
        }
        if dir.join(IMAGE).exists() {
            mounts::ensure_mounted(&dir.join(IMAGE), &data).map_err(io_failure)?;
        }
        Ok(data)
    }

    /// The host directory a container's mount of `attach` comes from.
    pub fn source(&self, attach: &VolumeAttach) -> Result<PathBuf, VolumeFailure> {
        self.root(&attach.name, &attach.backend)
    }

    /// Makes a volume. Making one that exists as asked again is fine; one that exists
    /// with another size is refused.
    pub fn create(&self, name: &VolumeName, backend: &VolumeBackend) -> Result<(), VolumeFailure> {
        match backend {
            VolumeBackend::Shared => {
                let dir = self.shared_root()?.join(name.as_str());
                match std::fs::create_dir(&dir) {
                    Ok(()) => Ok(()),
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => {
                        Ok(())
                    }
                    Err(e) => Err(io_failure(e)),
                }
            }
            VolumeBackend::Local { size_bytes, .. } => self.create_local(name, *size_bytes),
        }
    }

    fn create_local(&self, name: &VolumeName, size: Option<u64>) -> Result<(), VolumeFailure> {
        let dir = self.local_dir(name);
        if dir.join(DATA).is_dir() {
            let has = std::fs::metadata(dir.join(IMAGE)).ok().map(|m| m.len());
            if has != size {
                return Err(VolumeFailure::new(
                    FailureKind::BadPath,
                    format!(
                        "volume `{name}` already exists on this node with another size; \
                         delete it first"
                    ),
                ));
            }
            return self.local_data(name).map(drop);
        }
        // Made aside and renamed into place, so a half-made volume is never found.
        let staging = self.local_root.join(format!(".{name}.creating"));
        let _ = std::fs::remove_dir_all(&staging);
        let made = (|| {
            std::fs::create_dir_all(staging.join(DATA)).map_err(io_failure)?;
            if let Some(size) = size {
                mounts::make_filesystem(&staging.join(IMAGE), size)?;
            }
            std::fs::rename(&staging, &dir).map_err(io_failure)
        })();
        if let Err(e) = made {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(e);
        }
        if size.is_some()
            && let Err(e) = mounts::ensure_mounted(&dir.join(IMAGE), &dir.join(DATA))
        {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(io_failure(e));
        }
        Ok(())
    }

    /// Removes a volume and its files (unmounting its filesystem first). A volume that
    /// is not here is already removed.
    pub fn delete(&self, name: &VolumeName, backend: &VolumeBackend) -> Result<(), VolumeFailure> {
        let dir = match backend {
            VolumeBackend::Shared => self.shared_root()?.join(name.as_str()),
            VolumeBackend::Local { .. } => {
                let dir = self.local_dir(name);
                let data = dir.join(DATA);
                if mounts::is_mounted(&data) {
                    mounts::unmount(&data).map_err(|e| match e.raw_os_error() {
                        Some(libc::EBUSY) => VolumeFailure::new(
                            FailureKind::Busy,
                            format!(
                                "volume `{name}` is in use on this node; stop what mounts it first"
                            ),
                        ),
                        _ => io_failure(e),
                    })?;
                }
                dir
            }
        };
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_failure(e)),
        }
    }
}

fn missing(name: &VolumeName) -> VolumeFailure {
    VolumeFailure::new(
        FailureKind::NotFound,
        format!(
            "volume `{name}` is not on this node (its files are gone); delete it and create it again"
        ),
    )
}

/// An I/O error as a failure: `ENOSPC` is the volume being full.
pub(crate) fn io_failure(e: std::io::Error) -> VolumeFailure {
    match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => {
            VolumeFailure::new(FailureKind::NoSpace, format!("the volume is full: {e}"))
        }
        _ => VolumeFailure::new(FailureKind::Io, e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use gantry_shared::NodeId;

    use super::*;

    fn local(size: Option<u64>) -> VolumeBackend {
        VolumeBackend::Local {
            node: NodeId::new("n1").expect("node"),
            size_bytes: size,
        }
    }

    fn mounted_under(dir: &Path) -> bool {
        let table = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
        table.contains(&*dir.to_string_lossy())
    }

    // Needs root (a loop mount), as the agent does.
    #[test]
    fn a_sized_volume_is_its_own_filesystem_and_stops_a_writer_at_its_size() {
        let tmp = tempfile::tempdir().expect("tmp");
        let volumes = Volumes::open(&tmp.path().join("volumes"), None).expect("open");
        let name = VolumeName::new("small").expect("name");
        let size = 16 << 20;
        volumes.create(&name, &local(Some(size))).expect("create");
        // Again as asked: fine; with another size: refused.
        volumes
            .create(&name, &local(Some(size)))
            .expect("create again");
        assert!(volumes.create(&name, &local(Some(size * 2))).is_err());
        let root = volumes.root(&name, &local(Some(size))).expect("root");
        assert!(mounts::is_mounted(&root));
        let mut file = std::fs::File::create(root.join("big")).expect("create");
        let chunk = vec![7u8; 1 << 20];
        let full = (0..64)
            .map(|_| file.write_all(&chunk).and_then(|()| file.sync_data()))
            .find_map(Result::err)
            .expect("the volume fills up");
        assert_eq!(io_failure(full).kind, FailureKind::NoSpace);
        drop(file);
        // Unmounted (the host rebooted): found and mounted again, files kept.
        mounts::unmount(&root).expect("umount");
        let volumes = Volumes::open(&tmp.path().join("volumes"), None).expect("reopen");
        assert!(mounts::is_mounted(&root));
        assert!(root.join("big").exists());
        volumes.delete(&name, &local(Some(size))).expect("delete");
        assert!(!tmp.path().join("volumes/small").exists());
        assert!(!mounted_under(tmp.path()), "no mount is left behind");
        // Deleting what is gone is done already.
        volumes
            .delete(&name, &local(Some(size)))
            .expect("delete again");
    }

    #[test]
    fn shared_volumes_need_a_shared_path() {
        let tmp = tempfile::tempdir().expect("tmp");
        let name = VolumeName::new("s").expect("name");
        let none = Volumes::open(&tmp.path().join("volumes"), None).expect("open");
        assert!(!none.has_shared());
        assert_eq!(
            none.create(&name, &VolumeBackend::Shared)
                .expect_err("no path")
                .kind,
            FailureKind::Unsupported
        );
        let missing = tmp.path().join("nfs");
        assert!(matches!(
            Volumes::open(&tmp.path().join("volumes"), Some(&missing)),
            Err(VolumesError::SharedRoot { .. })
        ));
        std::fs::create_dir(&missing).expect("mkdir");
        let shared = Volumes::open(&tmp.path().join("volumes"), Some(&missing)).expect("open");
        shared
            .create(&name, &VolumeBackend::Shared)
            .expect("create");
        assert_eq!(
            shared.root(&name, &VolumeBackend::Shared).expect("root"),
            missing.join("s")
        );
        shared
            .delete(&name, &VolumeBackend::Shared)
            .expect("delete");
        assert!(!missing.join("s").exists());
        assert_eq!(
            shared
                .root(&name, &VolumeBackend::Shared)
                .expect_err("gone")
                .kind,
            FailureKind::NotFound
        );
    }
}
