//! A starting container's secrets on the host: a directory per container under the
//! runtime's secrets directory, which must be on a tmpfs (memory), holding the container's
//! spec (its environment carries the secrets used as variables) and the files of those
//! used as files, bind-mounted read-only at `/run/secrets/NAME`. The runtime removes the
//! spec as soon as the container runs (the variables are in its process by then) and the
//! rest when it ends (or its start failed): the files stay on memory as long as the
//! container reads them, and nothing of the secrets stays on the host after it.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use gantry_shared::ContainerId;
use gantry_shared::secrets::{FILES_DIR, SecretDelivery, SecretMount};

use super::RuntimeError;
use super::types::BindMount;
use crate::fsutil::{self, Durability};

pub(super) struct SecretsDir {
    dir: PathBuf,
}

impl SecretsDir {
    /// Makes container `id`'s directory under `root`, refusing a `root` not on memory.
    pub(super) fn create(root: &Path, id: &ContainerId) -> Result<Self, RuntimeError> {
        let err = |source: std::io::Error| RuntimeError::Secrets {
            path: root.to_owned(),
            message: source.to_string(),
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(root)
            .map_err(err)?;
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o700)).map_err(err)?;
        let fs = nix::sys::statfs::statfs(root).map_err(|e| err(e.into()))?;
        let kind = fs.filesystem_type();
        if kind != nix::sys::statfs::TMPFS_MAGIC {
            return Err(RuntimeError::Secrets {
                path: root.to_owned(),
                message: "it is not on a tmpfs, and secrets are never written to disk; \
                          mount a tmpfs there or choose a directory on one"
                    .into(),
            });
        }
        let dir = root.join(id.as_str());
        // Left by a start that died half-way: nothing in it is of use.
        fsutil::remove_dir_all_if_exists(&dir).map_err(err)?;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(err)?;
        Ok(Self { dir })
    }

    /// Where the container's spec goes.
    pub(super) fn spec_path(&self) -> PathBuf {
        self.dir.join("config.json")
    }

    /// Writes the secrets used as files; returns their mounts.
    pub(super) fn write(&self, secrets: &[SecretDelivery]) -> Result<Vec<BindMount>, RuntimeError> {
        let err = |source: std::io::Error| RuntimeError::Secrets {
            path: self.dir.clone(),
            message: source.to_string(),
        };
        let mut binds = Vec::new();
        for secret in secrets.iter().filter(|s| s.mount == SecretMount::Files) {
            let dir = self.dir.join("files").join(secret.name.as_str());
            // Readable inside the container by whatever user it runs as; the root above
            // is the agent's alone on the host.
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(&dir)
                .map_err(err)?;
            for (key, value) in secret.values.iter() {
                let path = dir.join(key);
                fsutil::write_atomic(&path, value.as_bytes(), Durability::Process).map_err(err)?;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o444))
                    .map_err(err)?;
            }
            binds.push(BindMount {
                source: dir,
                destination: format!("{FILES_DIR}/{}", secret.name),
                read_only: true,
                exec: false,
            });
        }
        Ok(binds)
    }

    /// The container runs: its spec, which holds the variables, goes.
    pub(super) fn remove_spec(&self) {
        if let Err(e) = std::fs::remove_file(self.spec_path()) {
            tracing::error!(dir = %self.dir.display(), error = %e, "cannot remove a container's spec");
        }
    }

    /// Container `id` ended: whatever of its secrets is left under `root` goes.
    pub(super) fn remove_for(root: &Path, id: &ContainerId) {
        Self {
            dir: root.join(id.as_str()),
        }
        .remove();
    }

    /// Removes everything of it from the host.
    pub(super) fn remove(&self) {
        if let Err(e) = fsutil::remove_dir_all_if_exists(&self.dir) {
            tracing::error!(dir = %self.dir.display(), error = %e, "cannot remove a container's secrets");
        }
    }
}
