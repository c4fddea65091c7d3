//! `gantry-agent serve` assembled: from the settings ([`AgentConfig`], the configuration
//! file with the flags over it) to a running daemon. Discovers the GPUs (NVML or a simulated spec),
//! opens the host's store, images, runtime (re-adopting containers) and volumes, resolves the
//! coordinator, works out what the node offers, tells systemd it is ready and runs the
//! daemon until shutdown.

use std::path::Path;

use gantry_shared::protocol::NodeCapacity;
use tokio_util::sync::CancellationToken;

use crate::config::AgentConfig;
use crate::control::{NodeIdentity, ResolveError};
use crate::daemon::DaemonError;
use crate::gpu::inventory::{Inventory, InventoryError};
use crate::gpu::nvml::NvmlSource;
use crate::gpu::simulated::SimulatedSource;
use crate::host::{Host, HostConfig, HostError};
use crate::image::{CaFileError, PullConfig, pem_roots, read_roots};

/// Shims the daemon keeps started ahead of time.
const SHIM_POOL: usize = 2;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Gpu(#[from] InventoryError),
    #[error(transparent)]
    Host(#[from] HostError),
    #[error(
        "no coordinator address: run `gantry-agent join --coordinator HOST:PORT --token TOKEN` (it records it in the configuration file) or pass --coordinator"
    )]
    NoCoordinator,
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    #[error("reading /proc/meminfo (pass --memory)")]
    Memory(#[source] MemInfoError),
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    #[error(transparent)]
    RegistryCa(#[from] CaFileError),
    #[error(transparent)]
    Volumes(#[from] crate::volumes::VolumesError),
}

/// Why the host's memory is unknown.
#[derive(Debug, thiserror::Error)]
pub enum MemInfoError {
    #[error(transparent)]
    Read(#[from] std::io::Error),
    #[error("no MemTotal in /proc/meminfo")]
    NoMemTotal,
}

/// Runs the daemon with `config` until `shutdown` fires. Containers are left running.
pub async fn run(config: AgentConfig, shutdown: CancellationToken) -> Result<(), ServeError> {
    let state_dir = &config.state_dir;
    // The GPUs: discovered before the runtime, which must know if they are real.
    let identity = NodeIdentity::load(&state_dir.join("identity")).ok();
    let node = identity
        .as_ref()
        .map(|i| i.node.to_string())
        .unwrap_or_else(|| "local".into());
    let inventory = gpu_inventory(state_dir, config.simulate_gpus.as_deref(), &node)?;
    let host = Host::open(
        state_dir,
        HostConfig {
            pull: pull_config(&config, identity.as_ref())?,
            shim_pool: SHIM_POOL,
            simulated_gpus: config.simulate_gpus.is_some(),
            gpu: config.gpu.clone(),
            quick_start: false,
        },
    )
    .await?;
    let coordinator = config
        .coordinator
        .as_deref()
        .ok_or(ServeError::NoCoordinator)?;
    let addr = crate::control::resolve(coordinator).await?;
    let inventory = inventory.unwrap_or_else(Inventory::empty);
    if config.simulate_gpus.is_none() && !inventory.current().is_empty() {
        // Which driver files GPU containers get, said once at start (and per container).
        match crate::gpu::inject::probe(&config.gpu) {
            Ok(source) => {
                tracing::info!(driver = %source, "NVIDIA driver files for GPU containers")
            }
            Err(e) => {
                tracing::error!(error = %e, "GPU containers cannot start until this is fixed")
            }
        }
    }
    let cpu_millis = config.cpus.map(|c| c.0).unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get() as u64 * 1000)
            .unwrap_or(1000)
    });
    let memory_bytes = match config.memory {
        Some(m) => m,
        None => host_memory().map_err(ServeError::Memory)?,
    };
    let volumes = crate::volumes::Volumes::open(
        &state_dir.join("volumes"),
        config.volumes.shared_path.as_deref(),
    )?;
    let capacity = NodeCapacity {
        cpu_millis,
        memory_bytes,
        gpus: inventory.current().len() as u32,
        shared_volumes: volumes.has_shared(),
    };
    println!("agent serving; coordinator {addr}");
    // systemd (Type=notify): started; containers of an earlier run are re-adopted by now.
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    crate::daemon::run(
        &config,
        addr,
        capacity,
        (&host, &volumes),
        &inventory,
        shutdown,
    )
    .await?;
    Ok(())
}

/// How the daemon pulls: besides the system's roots it trusts the cluster CA (the
/// embedded registry's certificate may come from it; only the coordinator holds a server
/// certificate from it) and `registry.ca_file`.
fn pull_config(
    config: &AgentConfig,
    identity: Option<&NodeIdentity>,
) -> Result<PullConfig, CaFileError> {
    let mut extra_roots = match &config.registry.ca_file {
        Some(path) => read_roots(path)?,
        None => Vec::new(),
    };
    if let Some(identity) = identity {
        // Parsed at join already; a CA that fails here fails the control session too.
        extra_roots.extend(pem_roots(identity.ca_pem.as_bytes()).unwrap_or_default());
    }
    Ok(PullConfig {
        extra_roots,
        ..PullConfig::default()
    })
}

/// The GPUs to offer: the simulated spec if given, else NVML's; a host without NVML
/// offers none and says why.
pub fn gpu_inventory(
    state_dir: &Path,
    simulate: Option<&str>,
    node: &str,
) -> Result<Option<Inventory>, InventoryError> {
    if let Some(spec) = simulate {
        let source = SimulatedSource::new(spec, node, state_dir)?;
        return Ok(Some(Inventory::start(source)?));
    }
    match NvmlSource::open() {
        Ok(source) => Ok(Some(Inventory::start(source)?)),
        Err(e @ InventoryError::NoNvml { .. }) => {
            eprintln!("gantry-agent: {e}");
            tracing::warn!(error = %e, "no real GPUs");
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// The host's total memory, from /proc/meminfo.
pub fn host_memory() -> Result<u64, MemInfoError> {
    let text = std::fs::read_to_string("/proc/meminfo")?;
    let kb: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or(MemInfoError::NoMemTotal)?;
    Ok(kb * 1024)
}
