//! Attempts: starting (image resolution, early stops), stopping, watching, reporting exits.

use super::*;

impl Agent {
    /// Stops `generation` of `owner` if it runs or is starting here: `Accepted`, and its
    /// end is reported as an event; `NotRunning` if it exited already or this node never
    /// had it (no event follows).
    pub(super) fn stop(
        &self,
        owner: &Owner,
        generation: Generation,
        grace: Duration,
    ) -> CommandReply {
        let Some(id) = owner.container_id(generation) else {
            return CommandReply::NotRunning;
        };
        match self.runtime.status(&id).map(|s| s.state) {
            Ok(ContainerState::Exited(_)) => CommandReply::NotRunning,
            Ok(ContainerState::Running { started_at_ms }) => {
                if started_at_ms == 0 {
                    // The shim has not reported yet and cannot take the stop: `start`
                    // applies it once the container runs.
                    self.early_stop(&id, Some(grace));
                }
                let rt = self.runtime.clone();
                tokio::spawn(async move { rt.stop(&id, grace).await });
                CommandReply::Accepted
            }
            Err(_) => {
                let starting = self
                    .generations
                    .get::<Mark>(owner.key())
                    .ok()
                    .flatten()
                    .is_some_and(|m| m.generation == generation && !m.done);
                if starting {
                    self.early_stop(&id, Some(grace));
                    CommandReply::Accepted
                } else {
                    CommandReply::NotRunning
                }
            }
        }
    }

    /// Records an early stop (`Some`) or takes the one recorded (`None`).
    pub(super) fn early_stop(&self, id: &ContainerId, grace: Option<Duration>) -> Option<Duration> {
        let mut stops = self
            .early_stops
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match grace {
            Some(g) => stops.insert(id.clone(), g),
            None => stops.remove(id),
        }
    }

    /// The image name to run: a local image as is; a fully qualified one pulled from its
    /// registry if missing; an unqualified one from the cluster's embedded registry.
    pub(super) async fn resolve_image(&self, name: &str) -> Result<String, String> {
        if self.images.get(name).is_ok() {
            return Ok(name.to_owned());
        }
        let (reference, auth) = if is_qualified(name) {
            (name.to_owned(), RegistryAuth::Anonymous)
        } else {
            let registry = self
                .registry
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            match registry {
                Some((addr, token)) => (
                    format!("{addr}/{name}"),
                    RegistryAuth::Basic("node".into(), token),
                ),
                None => return Ok(name.to_owned()), // the start reports it missing
            }
        };
        if self.images.get(&reference).is_err() {
            self.images
                .pull(&reference, &auth)
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok(reference)
    }

    pub(super) async fn start(self: Arc<Self>, id: ContainerId, spec: AttemptSpec) {
        // The coordinator may not have heard yet (gossip lags) that a GPU failed.
        let bad: Vec<String> = self
            .gpus
            .borrow()
            .iter()
            .filter(|g| spec.gpus.contains(&g.index) && g.health.is_unhealthy())
            .map(|g| format!("GPU {} is {}", g.index, g.health.to_compact()))
            .collect();
        if !bad.is_empty() {
            self.finish(Event::StartFailed {
                owner: spec.owner,
                generation: spec.generation,
                message: bad.join(", "),
                failure: StartFailure::Node,
            });
            return;
        }
        let image = match self.resolve_image(&spec.image).await {
            Ok(image) => image,
            Err(message) => {
                self.finish(Event::StartFailed {
                    owner: spec.owner,
                    generation: spec.generation,
                    message,
                    failure: StartFailure::Image,
                });
                return;
            }
        };
        if self.early_stop(&id, None).is_some() {
            self.finish(Event::StartFailed {
                owner: spec.owner,
                generation: spec.generation,
                message: "stopped before it started".into(),
                failure: StartFailure::Node,
            });
            return;
        }
        let mut req = ContainerRequest::new(image);
        req.id = Some(id.clone());
        req.command = (!spec.command.is_empty()).then(|| spec.command.clone());
        req.env = spec.env.clone();
        req.resources = Resources {
            cpu: CpuMillis(spec.cpu_millis),
            memory_bytes: spec.memory_bytes,
            pids: Resources::DEFAULT_PIDS,
        };
        req.gpus = spec.gpus.clone();
        req.timeout = spec.timeout_ms.map(Duration::from_millis);
        let attempt = AttemptRef {
            owner: spec.owner.clone(),
            generation: spec.generation,
        };
        req.attempt = Some(attempt.clone());
        match self.runtime.start(req).await {
            Ok(_) => {
                // Started goes out before anything the watcher reports.
                let started = Event::Started {
                    owner: spec.owner.clone(),
                    generation: spec.generation,
                    at_ms: now_ms(),
                };
                if let Err(e) = self.outbox.push(started) {
                    tracing::error!(container = %id, error = %e, "cannot record an event");
                }
                self.changed.notify_one();
                if let Some(grace) = self.early_stop(&id, None) {
                    let rt = self.runtime.clone();
                    let id = id.clone();
                    tokio::spawn(async move { rt.stop(&id, grace).await });
                }
                self.watch(id, attempt);
            }
            Err(e) => {
                let failure = match &e {
                    RuntimeError::StartFailed {
                        user_error: true, ..
                    }
                    | RuntimeError::Spec(_)
                    | RuntimeError::Gpu(_) => StartFailure::Spec,
                    RuntimeError::Image(_) => StartFailure::Image,
                    _ => StartFailure::Node,
                };
                self.finish(Event::StartFailed {
                    owner: spec.owner,
                    generation: spec.generation,
                    message: e.to_string(),
                    failure,
                });
            }
        }
    }

    pub(super) fn watch(self: Arc<Self>, id: ContainerId, attempt: AttemptRef) {
        tokio::spawn(async move {
            if let Ok(exit) = self.runtime.wait(&id).await {
                self.changed.notify_one();
                self.report_exit(&id, attempt, &exit);
            }
        });
    }

    /// Queues the exit; the container (and its output) stays until garbage collection.
    pub(super) fn report_exit(&self, id: &ContainerId, attempt: AttemptRef, exit: &ExitRecord) {
        let fault = self.gpu_faults.get::<GpuFault>(id.as_str()).ok().flatten();
        let cause = match (fault, exit.reason) {
            (Some(fault), _) => EndCause::GpuFault(fault),
            (None, ExitReason::Exited) => EndCause::Exited,
            (None, ExitReason::Signaled) => EndCause::Signaled,
            (None, ExitReason::OomKilled) => EndCause::Oom,
            (None, ExitReason::Stopped) => EndCause::Stopped,
            (None, ExitReason::TimedOut) => EndCause::Timeout,
            (None, ExitReason::ShimLost) => EndCause::ShimLost,
        };
        let event = Event::Exited {
            owner: attempt.owner,
            generation: attempt.generation,
            exit_code: exit.exit_code,
            signal: exit.signal,
            cause,
            message: cause.label(),
            at_ms: exit.finished_at_ms,
        };
        if self.finish(event) {
            self.collect_garbage();
        }
    }
}
