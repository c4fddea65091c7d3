//! This host's local state opened as one value: the database, the image store and the
//! container runtime over a state directory. The daemon and every one-shot command open it
//! the same way; only the shim pool, the pull settings and whether GPUs are simulated
//! differ.

use std::path::{Path, PathBuf};

use crate::gpu::GpuConfig;
use crate::image::{ImageError, ImageStore, PullConfig};
use crate::runtime::{Runtime, RuntimeConfig, RuntimeError};
use crate::store::{LocalStore, StoreError};

/// What differs between the daemon's host and a one-shot command's.
#[derive(Debug, Clone, Default)]
pub struct HostConfig {
    /// How images are pulled (registries spoken to over plain HTTP).
    pub pull: PullConfig,
    /// Shims started ahead of time: the daemon keeps some, a one-shot command would only
    /// start them to exit.
    pub shim_pool: usize,
    /// The GPUs are simulated: nothing is injected into containers.
    pub simulated_gpus: bool,
    /// Where real GPUs' devices, driver files and CDI specs are.
    pub gpu: GpuConfig,
    /// For a one-shot `run`: the store opens in the background while the container starts
    /// (its image is found in the records' files), and containers earlier agents left are
    /// left for the next agent to re-adopt.
    pub quick_start: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("creating state directory {}", path.display())]
    StateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("locating the gantry-agent binary for shims")]
    Exe(#[source] std::io::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
}

/// The local store, images and runtime of one state directory.
pub struct Host {
    pub images: ImageStore,
    pub runtime: Runtime,
    pub store: LocalStore,
}

impl Host {
    /// Opens (creating what is missing) the state under `state_dir`; the runtime re-adopts
    /// the containers an earlier agent left. Shims are this very binary.
    pub async fn open(state_dir: &Path, config: HostConfig) -> Result<Self, HostError> {
        std::fs::create_dir_all(state_dir).map_err(|source| HostError::StateDir {
            path: state_dir.to_owned(),
            source,
        })?;
        let db = state_dir.join("db");
        let store = match config.quick_start {
            true => LocalStore::open_in_background(&db)?,
            false => LocalStore::open(&db)?,
        };
        let images = ImageStore::open(&state_dir.join("images"), &store, config.pull)?;
        let exe = std::env::current_exe().map_err(HostError::Exe)?;
        let runtime_config = RuntimeConfig {
            shim_pool: config.shim_pool,
            simulated_gpus: config.simulated_gpus,
            gpu: config.gpu,
            readopt: !config.quick_start,
            ..RuntimeConfig::new(state_dir, exe)
        };
        let runtime = Runtime::open(runtime_config, images.clone(), &store).await?;
        Ok(Self {
            images,
            runtime,
            store,
        })
    }
}
