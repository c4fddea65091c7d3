//! Re-adoption: what a (re)started agent does with the containers a previous agent left
//! behind. Running ones are watched again, ones that exited meanwhile get their exit
//! collected, ones whose shim vanished are torn down, and directories whose start was
//! never recorded are rolled back.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gantry_shared::ContainerId;
use tokio::sync::watch;

use super::{
    ContainerRecord, ExitRecord, Runtime, RuntimeError, Tracked, exited, files, io_err,
    lock_record, open_shim_from, write_control,
};
use crate::fsutil;

impl Runtime {
    /// Runs `shim --cleanup` for a container whose shim died without an exit record.
    pub(super) async fn cleanup_lost(&self, dir: &Path) -> ExitRecord {
        tracing::warn!(dir = %dir.display(), "shim lost; tearing the container down");
        let status = tokio::process::Command::new(&self.inner.cfg.shim_binary)
            .arg("shim")
            .arg("--cleanup")
            .arg(dir)
            .status()
            .await;
        if let Err(e) = status {
            tracing::error!(error = %e, "cannot run shim --cleanup");
        }
        fsutil::read_json(&dir.join(files::EXIT))
            .ok()
            .flatten()
            .unwrap_or_else(|| {
                ExitRecord::shim_lost(Some("shim --cleanup did not complete".into()))
            })
    }

    pub(super) async fn readopt(&self) -> Result<(), RuntimeError> {
        let records: Vec<(String, ContainerRecord)> = self.inner.table.list()?;
        let known: std::collections::HashSet<String> =
            records.iter().map(|(k, _)| k.clone()).collect();
        for (_, mut rec) in records {
            let dir = self.container_dir(&rec.id);
            let tracked = Arc::new(Tracked {
                record: Mutex::new(rec.clone()),
                exit: watch::channel(rec.exit.clone()).0,
            });
            self.lock().insert(rec.id.clone(), tracked.clone());
            if rec.exit.is_some() {
                continue;
            }
            if let Ok(Some(exit)) = fsutil::read_json::<ExitRecord>(&dir.join(files::EXIT)) {
                tracing::info!(container = %rec.id, "collected exit that happened while the agent was down");
                if rec.started_at_ms.is_none() {
                    rec.started_at_ms = Some(exit.started_at_ms);
                    lock_record(&tracked).started_at_ms = Some(exit.started_at_ms);
                }
                self.finish(&tracked, exit);
            } else if let Some(pidfd) = open_shim_from(&dir) {
                tracing::info!(container = %rec.id, "re-adopted running container");
                self.watch(tracked, Some(pidfd), dir);
            } else {
                let exit = self.cleanup_lost(&dir).await;
                self.finish(&tracked, exit);
            }
        }
        // Directories without a record: the agent died inside `start`, before the record
        // reached disk, so nobody was ever told this container exists. Roll it back.
        let containers = self.inner.cfg.state_dir.join("containers");
        for e in std::fs::read_dir(&containers)
            .map_err(io_err(&containers))?
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            if !known.contains(&name) {
                tracing::warn!(dir = %e.path().display(), "rolling back a container whose start was never acknowledged");
                self.roll_back(&e.path()).await;
            }
        }
        Ok(())
    }

    /// Kills whatever a container directory still runs and removes it: for starts that
    /// were never acknowledged, and for starts that failed after the shim was launched.
    pub(super) async fn roll_back(&self, dir: &Path) {
        if let Some(id) = dir
            .file_name()
            .and_then(|n| ContainerId::new(n.to_string_lossy()).ok())
        {
            super::secrets::SecretsDir::remove_for(&self.inner.cfg.secrets_dir, &id);
        }
        if let Some(pidfd) = open_shim_from(dir) {
            // A supervising shim stops its container on request; a shim still inside
            // libcontainer's create does not read the FIFO yet and is killed.
            let _ = write_control(&dir.join(files::CONTROL), "stop 0\n");
            let stopped = match pidfd.try_clone() {
                Ok(fd) => tokio::time::timeout(Duration::from_secs(10), exited(fd))
                    .await
                    .is_ok(),
                Err(_) => false,
            };
            if !stopped {
                let _ = fsutil::pidfd_send_signal(&pidfd, libc::SIGKILL);
                let _ = tokio::time::timeout(Duration::from_secs(10), exited(pidfd)).await;
            }
        }
        if !dir.join(files::EXIT).exists() {
            self.cleanup_lost(dir).await;
        }
        if let Err(e) = fsutil::remove_dir_all_if_exists(dir) {
            tracing::error!(dir = %dir.display(), error = %e, "cannot remove rolled-back container");
        }
    }
}
