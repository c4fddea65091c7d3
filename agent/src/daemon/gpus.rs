//! The GPU guard: GPU faults seen by the inventory stop the attempts holding that GPU,
//! marks that keep a failed GPU unhealthy across agent restarts until an operator clears
//! it (tree `gpu_marks`), and the fault each stopped container's exit is reported with
//! (tree `gpu_faults`).

use std::collections::BTreeMap;
use std::time::Duration;

use gantry_shared::gossip::{GpuHealth, GpuInfo};
use gantry_shared::protocol::{CommandReply, Refusal, RefusalCode};
use gantry_shared::{ContainerId, GpuFault};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::gpu::inventory::{Inventory, InventoryHandle};
use crate::runtime::{ContainerState, Runtime};
use crate::store::{LocalStore, StoreError, Table};

pub(super) struct GpuGuard {
    runtime: Runtime,
    /// The GPUs and their health: no attempt starts on an unhealthy one.
    gpus: watch::Receiver<Vec<GpuInfo>>,
    /// Sets GPU health (restored marks, an operator's clear).
    inventory: InventoryHandle,
    /// GPUs marked unhealthy, by UUID, with the reason: they stay unhealthy across agent
    /// restarts until an operator clears them.
    marks: Table,
    /// Containers stopped because one of their GPUs failed, with the fault their exit is
    /// reported with; persisted so a restart keeps it.
    faults: Table,
}

impl GpuGuard {
    pub(super) fn open(
        store: &LocalStore,
        inventory: &Inventory,
        runtime: Runtime,
    ) -> Result<Self, StoreError> {
        Ok(Self {
            runtime,
            gpus: inventory.subscribe(),
            inventory: inventory.handle(),
            marks: store.table("gpu_marks")?,
            faults: store.table("gpu_faults")?,
        })
    }

    /// Marks GPUs unhealthy again that were before the agent restarted.
    pub(super) fn restore_marks(&self) {
        let marks = self.marks.list::<GpuFault>().unwrap_or_default();
        let gpus = self.gpus.borrow().clone();
        for (uuid, fault) in marks {
            if let Some(g) = gpus.iter().find(|g| g.uuid == uuid) {
                self.inventory
                    .set_health(g.index, GpuHealth::Unhealthy(fault));
            }
        }
    }

    /// Why the GPUs among `indices` that are unhealthy are (`GPU 1 is xid-79`), none if all
    /// are healthy. The coordinator may not have heard yet (gossip lags) that a GPU failed.
    pub(super) fn unhealthy_among(&self, indices: &[u32]) -> Vec<String> {
        self.gpus
            .borrow()
            .iter()
            .filter(|g| indices.contains(&g.index) && g.health.is_unhealthy())
            .map(|g| format!("GPU {} is {}", g.index, g.health.to_compact()))
            .collect()
    }

    /// The fault that stopped container `id`, if a GPU fault did.
    pub(super) fn fault_of(&self, id: &ContainerId) -> Option<GpuFault> {
        self.faults.get::<GpuFault>(id.as_str()).ok().flatten()
    }

    /// An operator's clear: the GPU is healthy again and its mark forgotten.
    pub(super) fn clear(&self, index: u32) -> CommandReply {
        let Some(gpu) = self
            .gpus
            .borrow()
            .iter()
            .find(|g| g.index == index)
            .cloned()
        else {
            return CommandReply::Refused(Refusal::new(
                RefusalCode::Unavailable,
                format!("this node has no GPU {index}"),
            ));
        };
        if let Err(e) = self.marks.remove(&gpu.uuid) {
            return CommandReply::Refused(Refusal::new(RefusalCode::Unavailable, e.to_string()));
        }
        self.inventory.set_health(index, GpuHealth::Healthy);
        tracing::warn!(index, uuid = %gpu.uuid, "GPU cleared by an operator");
        CommandReply::Accepted
    }

    /// Until `cancel`: when a GPU turns unhealthy, stops (at once) every attempt holding
    /// it; its exit is reported with the GPU's fault as its cause, which the coordinator
    /// does not count against the job's retries.
    pub(super) async fn stop_on_faults(&self, cancel: CancellationToken) {
        let unhealthy = |gpus: &[GpuInfo]| -> BTreeMap<u32, GpuFault> {
            gpus.iter()
                .filter_map(|g| match g.health {
                    GpuHealth::Unhealthy(f) => Some((g.index, f)),
                    _ => None,
                })
                .collect()
        };
        let mut gpus = self.gpus.clone();
        // What is unhealthy now (restored marks included) is known already.
        let mut known = unhealthy(&gpus.borrow_and_update());
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                changed = gpus.changed() => if changed.is_err() { return },
            }
            let current = gpus.borrow_and_update().clone();
            let now = unhealthy(&current);
            for (index, fault) in now.iter().filter(|(i, _)| !known.contains_key(i)) {
                if let Some(g) = current.iter().find(|g| g.index == *index)
                    && let Err(e) = self.marks.put(&g.uuid, fault)
                {
                    tracing::error!(error = %e, "cannot record an unhealthy GPU");
                }
                for c in self.runtime.list() {
                    if !matches!(c.state, ContainerState::Running { .. }) || !c.gpus.contains(index)
                    {
                        continue;
                    }
                    tracing::warn!(container = %c.id, gpu = index, %fault, "stopping an attempt whose GPU failed");
                    if let Err(e) = self.faults.put(c.id.as_str(), fault) {
                        tracing::error!(error = %e, "cannot record a GPU fault");
                    }
                    let rt = self.runtime.clone();
                    tokio::spawn(async move { rt.stop(&c.id, Duration::ZERO).await });
                }
            }
            known = now;
        }
    }
}
