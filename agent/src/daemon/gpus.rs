//! GPU faults: marks that outlive restarts, an operator's clear, and stopping attempts on
//! a GPU that failed.

use super::*;

impl Agent {
    /// Marks GPUs unhealthy again that were before the agent restarted.
    pub(super) fn restore_gpu_marks(&self) {
        let marks = self.gpu_marks.list::<GpuFault>().unwrap_or_default();
        let gpus = self.gpus.borrow().clone();
        for (uuid, fault) in marks {
            if let Some(g) = gpus.iter().find(|g| g.uuid == uuid) {
                self.inventory
                    .set_health(g.index, gantry_shared::gossip::GpuHealth::Unhealthy(fault));
            }
        }
    }

    /// An operator's clear: the GPU is healthy again and its mark forgotten.
    pub(super) fn clear_gpu(&self, index: u32) -> CommandReply {
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
        if let Err(e) = self.gpu_marks.remove(&gpu.uuid) {
            return CommandReply::Refused(Refusal::new(RefusalCode::Unavailable, e.to_string()));
        }
        self.inventory
            .set_health(index, gantry_shared::gossip::GpuHealth::Healthy);
        tracing::warn!(index, uuid = %gpu.uuid, "GPU cleared by an operator");
        CommandReply::Accepted
    }

    /// When a GPU turns unhealthy, stops (at once) every attempt holding it; its exit is
    /// reported with the GPU's fault as its cause, which the coordinator does not count
    /// against the job's retries.
    pub(super) async fn stop_on_gpu_faults(
        self: Arc<Self>,
        mut gpus: tokio::sync::watch::Receiver<Vec<gantry_shared::gossip::GpuInfo>>,
        cancel: CancellationToken,
    ) {
        let unhealthy =
            |gpus: &[gantry_shared::gossip::GpuInfo]| -> std::collections::BTreeMap<u32, GpuFault> {
                gpus.iter()
                    .filter_map(|g| match g.health {
                        gantry_shared::gossip::GpuHealth::Unhealthy(f) => Some((g.index, f)),
                        _ => None,
                    })
                    .collect()
            };
        let mut known = unhealthy(&gpus.borrow());
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                changed = gpus.changed() => if changed.is_err() { return },
            }
            let current = gpus.borrow_and_update().clone();
            let now = unhealthy(&current);
            for (index, fault) in now.iter().filter(|(i, _)| !known.contains_key(i)) {
                if let Some(g) = current.iter().find(|g| g.index == *index)
                    && let Err(e) = self.gpu_marks.put(&g.uuid, fault)
                {
                    tracing::error!(error = %e, "cannot record an unhealthy GPU");
                }
                for c in self.runtime.list() {
                    if !matches!(c.state, ContainerState::Running { .. }) || !c.gpus.contains(index)
                    {
                        continue;
                    }
                    tracing::warn!(container = %c.id, gpu = index, %fault, "stopping an attempt whose GPU failed");
                    if let Err(e) = self.gpu_faults.put(c.id.as_str(), fault) {
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
