//! The host's GPU inventory, kept current by a watcher thread.
//!
//! A [`GpuSource`] is the edge to the hardware: NVML on real hosts
//! ([`crate::gpu::nvml::NvmlSource`]) or the simulation declared in configuration
//! ([`crate::gpu::simulated::SimulatedSource`]). [`Inventory::start`] discovers the GPUs,
//! then a dedicated thread (NVML's event wait blocks) waits for health events and polls
//! throttling, and publishes every change on a watch channel.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use gantry_shared::gossip::GpuInfo;
use tokio::sync::watch;

use super::health::{self, Throttle};

/// Something that happened to one GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthEvent {
    Xid(u64),
    DoubleBitEcc,
}

#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    #[error(
        "NVML is not available ({reason}): this host reports no real GPUs. Install the NVIDIA \
         driver (it provides libnvidia-ml.so.1), or declare simulated GPUs for a test host"
    )]
    NoNvml { reason: String },
    #[error("NVML failed while {action}: {reason}")]
    Nvml { action: String, reason: String },
    #[error("simulated GPU spec `{spec}`: {reason}")]
    BadSpec { spec: String, reason: String },
    #[error("cannot read simulated GPU faults from {path}: {source}")]
    Faults {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// The edge to the GPUs. Implementations block; they run on the inventory's own thread.
pub trait GpuSource: Send + 'static {
    /// `nvml` or `simulated`, for logs.
    fn kind(&self) -> &'static str;
    /// The GPUs, healthy unless known otherwise.
    fn discover(&mut self) -> Result<Vec<GpuInfo>, InventoryError>;
    /// Waits up to `timeout` for health events; returns them by GPU index.
    fn wait_events(&mut self, timeout: Duration) -> Vec<(u32, HealthEvent)>;
    /// Current throttle reasons of a GPU (`None` when it cannot be read).
    fn throttle(&mut self, index: u32) -> Option<Throttle>;
}

/// How often temperature and throttle reasons are polled.
pub const POLL_INTERVAL: Duration = Duration::from_secs(5);

/// The inventory and its watcher. Dropping it stops the thread (within one event wait).
pub struct Inventory {
    rx: watch::Receiver<Vec<GpuInfo>>,
    handle: InventoryHandle,
    stop: Arc<AtomicBool>,
}

/// Sets a GPU's health from outside the watcher: marks restored after a restart, an
/// operator's clear. Cheap to clone.
#[derive(Clone)]
pub struct InventoryHandle {
    tx: Option<Arc<watch::Sender<Vec<GpuInfo>>>>,
}

impl InventoryHandle {
    /// Sets GPU `index`'s health; false if there is no such GPU or nothing changed.
    pub fn set_health(&self, index: u32, health: gantry_shared::gossip::GpuHealth) -> bool {
        let Some(tx) = &self.tx else { return false };
        tx.send_if_modified(|gpus| match gpus.iter_mut().find(|g| g.index == index) {
            Some(g) if g.health != health => {
                tracing::warn!(index, uuid = %g.uuid, health = %health.to_compact(), "GPU health set");
                g.health = health;
                true
            }
            _ => false,
        })
    }
}

impl Inventory {
    /// Discovers the GPUs and starts watching them.
    pub fn start(mut source: impl GpuSource) -> Result<Self, InventoryError> {
        let gpus = source.discover()?;
        tracing::info!(kind = source.kind(), gpus = gpus.len(), "GPU inventory");
        let (tx, rx) = watch::channel(gpus);
        let tx = Arc::new(tx);
        let stop = Arc::new(AtomicBool::new(false));
        let (stopping, sender) = (stop.clone(), tx.clone());
        std::thread::Builder::new()
            .name("gpu-health".into())
            .spawn(move || watch_loop(source, &sender, &stopping))
            .map_err(|e| InventoryError::Nvml {
                action: "starting the GPU health thread".into(),
                reason: e.to_string(),
            })?;
        Ok(Self {
            rx,
            handle: InventoryHandle { tx: Some(tx) },
            stop,
        })
    }

    /// No GPUs at all (a CPU-only node).
    pub fn empty() -> Self {
        let (_tx, rx) = watch::channel(Vec::new());
        Self {
            rx,
            handle: InventoryHandle { tx: None },
            stop: Arc::new(AtomicBool::new(true)),
        }
    }

    pub fn handle(&self) -> InventoryHandle {
        self.handle.clone()
    }

    pub fn current(&self) -> Vec<GpuInfo> {
        self.rx.borrow().clone()
    }

    /// Changes as they happen.
    pub fn subscribe(&self) -> watch::Receiver<Vec<GpuInfo>> {
        self.rx.clone()
    }
}

impl Drop for Inventory {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Applies one event to the list; true if a GPU's health changed.
pub fn apply(gpus: &mut [GpuInfo], index: u32, event: HealthEvent) -> bool {
    let Some(gpu) = gpus.iter_mut().find(|g| g.index == index) else {
        tracing::warn!(index, ?event, "health event for a GPU not in the inventory");
        return false;
    };
    let next = match event {
        HealthEvent::Xid(xid) => match health::after_xid(xid) {
            Some(h) => h,
            None => {
                tracing::info!(index, xid, "application Xid; the GPU stays healthy");
                return false;
            }
        },
        HealthEvent::DoubleBitEcc => health::after_double_bit_ecc(),
    };
    // The first critical fault is the one an operator needs to see.
    if gpu.health.is_unhealthy() || gpu.health == next {
        return false;
    }
    tracing::warn!(index, uuid = %gpu.uuid, health = %next.to_compact(), "GPU marked unhealthy");
    gpu.health = next;
    true
}

fn watch_loop(mut source: impl GpuSource, tx: &watch::Sender<Vec<GpuInfo>>, stop: &AtomicBool) {
    let mut last_poll = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let events = source.wait_events(Duration::from_millis(250));
        // Throttling is read outside the update, so the channel is never held across NVML.
        let throttles: Vec<(u32, Throttle)> = if last_poll.elapsed() >= POLL_INTERVAL {
            last_poll = Instant::now();
            let indices: Vec<u32> = tx.borrow().iter().map(|g| g.index).collect();
            indices
                .into_iter()
                .filter_map(|i| source.throttle(i).map(|t| (i, t)))
                .collect()
        } else {
            Vec::new()
        };
        tx.send_if_modified(|gpus| {
            let mut changed = false;
            for &(index, event) in &events {
                changed |= apply(gpus, index, event);
            }
            for &(index, t) in &throttles {
                if let Some(g) = gpus.iter_mut().find(|g| g.index == index) {
                    let next = health::after_poll(&g.health, t);
                    if next != g.health {
                        tracing::info!(index, health = %next.to_compact(), "GPU health changed");
                        g.health = next;
                        changed = true;
                    }
                }
            }
            changed
        });
    }
}
