//! Attempts on this node: taking a start (fencing stale generations), starting (GPU health,
//! image resolution, volumes and code mounts, early stops), stopping, watching, reporting
//! each end through the outbox, resuming after an agent restart, and collecting old exited
//! containers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use gantry_shared::image_name::is_qualified;
use gantry_shared::now_ms;
use gantry_shared::protocol::{AttemptSpec, CommandReply, Event, Refusal, RefusalCode, WebRuntime};
use gantry_shared::{
    AttemptRef, ContainerId, CpuMillis, EndCause, Generation, Owner, Resources, StartFailure,
};
use tokio::sync::Notify;

use super::functions::Functions;
use super::generations::Generations;
use super::gpus::GpuGuard;
use super::outbox::Outbox;
use crate::code::{CODE_REPO, CodeCache, RegistryBlobs};
use crate::control::ClusterRegistry;
use crate::image::{ImageStore, RegistryAuth, Scheme};
use crate::invoke::{self, FunctionServer};
use crate::runtime::{
    BindMount, ContainerRequest, ContainerState, ExitReason, ExitRecord, NetworkMode, Runtime,
    RuntimeError,
};
use crate::volumes::Volumes;
use gantry_shared::volumes::FailureKind;

/// Exited attempts whose output is kept on the node.
const KEEP_EXITED: usize = 100;

/// The longest a start waits for an unreachable registry (also bounded by the attempt's
/// own timeout): a coordinator restart takes seconds; a registry away for longer than this
/// is reported and the work placed again.
pub const PULL_RETRY_FOR: Duration = Duration::from_secs(600);

pub(super) struct Attempts {
    runtime: Runtime,
    images: ImageStore,
    /// The cluster registry and its token from the current session, for unqualified
    /// image names.
    registry: Mutex<Option<(ClusterRegistry, String)>>,
    outbox: Outbox,
    /// Highest generation taken per owner: commands for older ones are refused, and a
    /// repeated start of the same one is a no-op.
    generations: Generations,
    /// Tells the gossip publisher that containers changed.
    changed: Arc<Notify>,
    /// GPU health before a start, and the fault an exit is reported with.
    gpus: Arc<GpuGuard>,
    /// Stops that arrived while their container was still starting (image resolution, or
    /// before the shim reported), with their grace: `start` honours them once it can.
    early_stops: Mutex<HashMap<ContainerId, Duration>>,
    /// Function containers' runtime API servers.
    functions: Arc<Functions>,
    /// Where the volumes containers mount are on this host.
    volumes: Volumes,
    /// Code mounts' trees, assembled from registry blobs.
    code: CodeCache,
}

impl Attempts {
    pub(super) fn new(
        runtime: Runtime,
        images: ImageStore,
        outbox: Outbox,
        generations: Generations,
        gpus: Arc<GpuGuard>,
        functions: Arc<Functions>,
        (volumes, code): (Volumes, CodeCache),
    ) -> Self {
        Self {
            runtime,
            images,
            registry: Mutex::new(None),
            outbox,
            generations,
            changed: Arc::new(Notify::new()),
            gpus,
            early_stops: Mutex::default(),
            functions,
            volumes,
            code,
        }
    }

    /// Notified whenever a container starts or exits.
    pub(super) fn changed(&self) -> Arc<Notify> {
        self.changed.clone()
    }

    /// The cluster registry of the current session and its token, if it has one.
    pub(super) fn set_registry(&self, registry: Option<(ClusterRegistry, String)>) {
        *self.registry.lock().unwrap_or_else(PoisonError::into_inner) = registry;
    }

    /// After a restart: watch re-adopted attempts again and report exits that happened
    /// while no agent ran.
    pub(super) fn resume(self: &Arc<Self>) {
        for c in self.runtime.list() {
            let Some(attempt) = c.attempt else {
                continue;
            };
            match c.state {
                ContainerState::Running { .. } if attempt.owner.warm().is_some() => {
                    // Its runtime API server ended with the agent before, and what it had
                    // delivered is gone with it: stop it, and the coordinator leases its
                    // inputs again when it sees the end.
                    tracing::warn!(
                        container = %c.id,
                        "a function container survived an agent restart without its runtime \
                         API; stopping it (its inputs are leased again)"
                    );
                    let (rt, id) = (self.runtime.clone(), c.id.clone());
                    tokio::spawn(async move { rt.stop(&id, Duration::ZERO).await });
                    self.clone().watch(c.id, attempt);
                }
                ContainerState::Running { .. } => self.clone().watch(c.id, attempt),
                ContainerState::Exited(exit) => {
                    if !self.generations.is_done(&attempt.owner, attempt.generation) {
                        self.report_exit(&c.id, attempt, &exit);
                    }
                }
            }
        }
        // Runtime API directories a previous agent left (the stopped containers' go with
        // their ends).
        self.functions.invoke().sweep(|_| false);
        // Starts taken by an agent that died before the container existed.
        for (owner, generation) in self.generations.unfinished() {
            let exists = owner
                .container_id(generation)
                .is_some_and(|id| self.runtime.status(&id).is_ok());
            if !exists {
                tracing::warn!(%owner, %generation, "start lost while the agent was down");
                self.finish(Event::StartFailed {
                    owner,
                    generation,
                    message: "the agent stopped while starting it".into(),
                    failure: StartFailure::Node,
                });
            }
        }
    }

    /// The coordinator's start of `spec`: refused for a generation older than one taken
    /// here, a no-op for the one taken (its events tell what became of it); a newer one is
    /// taken, fences older generations of the same owner still running, and starts.
    pub(super) fn take_start(self: &Arc<Self>, spec: AttemptSpec) -> CommandReply {
        let (owner, generation) = (spec.owner.clone(), spec.generation);
        let unavailable = |e: crate::store::StoreError| {
            CommandReply::Refused(Refusal::new(RefusalCode::Unavailable, e.to_string()))
        };
        let known = match self.generations.known(&owner) {
            Ok(g) => g,
            Err(e) => return unavailable(e),
        };
        if generation < known {
            return CommandReply::Refused(Refusal::new(
                RefusalCode::StaleGeneration,
                format!(
                    "{owner} is at generation {known} on this node; generation {generation} is stale"
                ),
            ));
        }
        // This generation was taken before (running, starting or finished): its events
        // tell the coordinator what became of it.
        if generation == known {
            return CommandReply::Accepted;
        }
        let Some(id) = owner.container_id(generation) else {
            return CommandReply::Refused(Refusal::new(
                RefusalCode::Unavailable,
                format!("{owner} does not fit a container id"),
            ));
        };
        if let Err(e) = self.generations.take(&owner, generation) {
            return unavailable(e);
        }
        // Fence older generations of the same owner still running here.
        for old in self.runtime.list() {
            let older = old
                .attempt
                .as_ref()
                .is_some_and(|a| a.owner == owner && a.generation < generation);
            if older && matches!(old.state, ContainerState::Running { .. }) {
                let rt = self.runtime.clone();
                tokio::spawn(async move { rt.stop(&old.id, Duration::ZERO).await });
            }
        }
        let attempts = self.clone();
        tokio::spawn(async move { attempts.start(id, spec).await });
        CommandReply::Accepted
    }

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
                if self.generations.is_starting(owner, generation) {
                    self.early_stop(&id, Some(grace));
                    CommandReply::Accepted
                } else {
                    // Never taken here: its start may still be on its way (commands travel
                    // on streams of their own, and a stop can overtake a start delayed by a
                    // cut-off network). Marked ended, so that start is a no-op when it
                    // comes: the sender takes this answer to mean it will never run.
                    if let Err(e) = self.generations.done(owner, generation) {
                        tracing::warn!(%owner, %generation, error = %e, "cannot fence a start that has not arrived");
                    }
                    CommandReply::NotRunning
                }
            }
        }
    }

    /// Records an early stop (`Some`) or takes the one recorded (`None`).
    fn early_stop(&self, id: &ContainerId, grace: Option<Duration>) -> Option<Duration> {
        let mut stops = self
            .early_stops
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match grace {
            Some(g) => stops.insert(id.clone(), g),
            None => stops.remove(id),
        }
    }

    /// The image name to run, and how long getting it took in ms (0 when it was here): a
    /// local image as is; a fully qualified one pulled from its registry if missing; an
    /// unqualified one from the cluster's embedded registry. A registry that cannot be
    /// reached now (see [`ImageError::is_transient`]) is the platform's fault: the pull is
    /// tried again with backoff until the attempt's timeout or [`PULL_RETRY_FOR`], whichever
    /// comes first, and the history says what it waits for; a stop ends the wait.
    pub(super) fn images(&self) -> &ImageStore {
        &self.images
    }

    /// Where to pull `name` from and how: a short name from the embedded registry, with
    /// its scheme and token as the coordinator gave them last (`None` before it did).
    pub(super) fn locate(&self, name: &str) -> Option<(String, RegistryAuth, Scheme)> {
        if is_qualified(name) {
            return Some((name.to_owned(), RegistryAuth::Anonymous, Scheme::Auto));
        }
        let (registry, token) = self
            .registry
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()?;
        let scheme = if registry.tls {
            Scheme::Https
        } else {
            Scheme::Http
        };
        Some((
            format!("{}/{name}", registry.address),
            RegistryAuth::Basic("node".into(), token),
            scheme,
        ))
    }

    async fn resolve_image(
        &self,
        id: &ContainerId,
        spec: &AttemptSpec,
    ) -> Result<(String, u64), (StartFailure, String)> {
        let name = spec.image.as_str();
        if self.images.get(name).is_ok() {
            return Ok((name.to_owned(), 0));
        }
        let bound = spec
            .timeout_ms
            .map_or(PULL_RETRY_FOR, Duration::from_millis)
            .min(PULL_RETRY_FOR);
        let started = Instant::now();
        let mut delay = Duration::from_millis(250);
        let mut told = false;
        loop {
            let own_registry = !is_qualified(name);
            let Some((reference, auth, scheme)) = self.locate(name) else {
                return Ok((name.to_owned(), 0)); // the start reports it missing
            };
            if self.images.get(&reference).is_ok() {
                return Ok((reference, 0));
            }
            let pulling = Instant::now();
            let e = match self.images.pull_from(&reference, &auth, scheme).await {
                Ok(_) => return Ok((reference, pulling.elapsed().as_millis() as u64)),
                Err(e) => e,
            };
            if !e.is_transient(own_registry) {
                return Err((StartFailure::Image, e.to_string()));
            }
            if started.elapsed() + delay > bound {
                return Err((
                    StartFailure::Registry,
                    format!("gave up after {:?} of retries: {e}", started.elapsed()),
                ));
            }
            if !told {
                told = true;
                tracing::warn!(container = %id, error = %e, "image registry unreachable; retrying");
                let waiting = Event::Waiting {
                    owner: spec.owner.clone(),
                    generation: spec.generation,
                    message: format!("waiting for its image (retrying): {e}"),
                };
                if let Err(err) = self.outbox.push(waiting) {
                    tracing::error!(container = %id, error = %err, "cannot record an event");
                }
                self.changed.notify_one();
            }
            // A stop that arrived meanwhile ends the wait (the start reports it).
            if self.has_early_stop(id) {
                return Ok((reference, 0));
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }

    /// Adds the mounts of the spec's volumes to `req` (a sized local volume's filesystem
    /// is mounted on the host first if it is not). A volume whose files are gone fails
    /// the start for good (trying again here cannot help); trouble mounting it is the
    /// node's.
    async fn mount_volumes(
        &self,
        spec: &AttemptSpec,
        req: &mut ContainerRequest,
    ) -> Result<(), (StartFailure, String)> {
        if spec.volumes.is_empty() {
            return Ok(());
        }
        let (volumes, attaches) = (self.volumes.clone(), spec.volumes.clone());
        let binds = tokio::task::spawn_blocking(move || {
            attaches
                .iter()
                .map(|a| {
                    let source = volumes.source(a).map_err(|e| {
                        let failure = match e.kind {
                            FailureKind::NotFound => StartFailure::Spec,
                            _ => StartFailure::Node,
                        };
                        (failure, format!("volume `{}` at {}: {e}", a.name, a.path))
                    })?;
                    Ok(BindMount {
                        source,
                        destination: a.path.to_string(),
                        read_only: false,
                        exec: true,
                    })
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .await
        .map_err(|e| (StartFailure::Node, e.to_string()))??;
        req.binds.extend(binds);
        Ok(())
    }

    /// Adds read-only mounts of the spec's code trees to `req`, assembling on this node the
    /// ones it lacks from the cluster registry's blobs; returns how long that took in ms.
    /// A blob the registry does not have fails the start for good; an unreachable
    /// registry is [`StartFailure::Registry`] (placed again).
    async fn mount_code(
        &self,
        spec: &AttemptSpec,
        req: &mut ContainerRequest,
    ) -> Result<u64, (StartFailure, String)> {
        if spec.code.is_empty() {
            return Ok(0);
        }
        let started = Instant::now();
        let source = RegistryBlobs {
            images: self.images.clone(),
            place: self.locate(CODE_REPO),
        };
        for mount in &spec.code {
            let tree = self.code.tree(mount, &source).await.map_err(|e| {
                (
                    e.failure(),
                    format!("code mount at {}: {e}", mount.path.as_str()),
                )
            })?;
            req.binds.push(BindMount {
                source: tree,
                destination: mount.path.as_str().to_owned(),
                read_only: true,
                exec: true,
            });
        }
        Ok(started.elapsed().as_millis() as u64)
    }

    /// Whether a stop for `id` arrived before its start got that far (kept for the start).
    fn has_early_stop(&self, id: &ContainerId) -> bool {
        self.early_stops
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains_key(id)
    }

    async fn start(self: Arc<Self>, id: ContainerId, spec: AttemptSpec) {
        // The coordinator may not have heard yet (gossip lags) that a GPU failed.
        let bad = self.gpus.unhealthy_among(&spec.gpus);
        if !bad.is_empty() {
            self.start_failed(&spec, StartFailure::Node, bad.join(", "));
            return;
        }
        let (image, mut image_ms) = match self.resolve_image(&id, &spec).await {
            Ok(resolved) => resolved,
            Err((failure, message)) => {
                self.start_failed(&spec, failure, message);
                return;
            }
        };
        if self.early_stop(&id, None).is_some() {
            self.start_failed(&spec, StartFailure::Node, "stopped before it started");
            return;
        }
        let mut req = ContainerRequest::new(image);
        req.id = Some(id.clone());
        req.command = (!spec.command.is_empty()).then(|| spec.command.clone());
        req.env = spec.env.clone();
        req.secrets = spec.secrets.clone();
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
        if let Err((failure, message)) = self.mount_volumes(&spec, &mut req).await {
            self.start_failed(&spec, failure, message);
            return;
        }
        // Fetching code counts as getting the image.
        match self.mount_code(&spec, &mut req).await {
            Ok(ms) => image_ms += ms,
            Err((failure, message)) => {
                self.start_failed(&spec, failure, message);
                return;
            }
        }
        let server = match &spec.function {
            Some(function) => match self.serve_function(&id, &attempt, function, &mut req) {
                Ok(server) => Some(server),
                Err(message) => {
                    self.start_failed(&spec, StartFailure::Node, message);
                    return;
                }
            },
            None => None,
        };
        match self.runtime.start(req).await {
            Ok(_) => {
                // Started goes out before anything the watcher reports.
                let started = Event::Started {
                    owner: spec.owner.clone(),
                    generation: spec.generation,
                    at_ms: now_ms(),
                    image_ms,
                };
                if let Err(e) = self.outbox.push(started) {
                    tracing::error!(container = %id, error = %e, "cannot record an event");
                }
                if let Some(server) = server {
                    // Its `ready` (or setup failure) goes out after `Started`.
                    server.started().await;
                    if let Some(web) = spec.function.as_ref().and_then(|f| f.web.as_ref()) {
                        self.functions.serve_web(&id, &server, web).await;
                    }
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
                if server.is_some() {
                    self.functions.close(&id, &attempt).await;
                }
                let failure = match &e {
                    RuntimeError::StartFailed {
                        user_error: true, ..
                    }
                    | RuntimeError::Spec(_)
                    | RuntimeError::Gpu(_) => StartFailure::Spec,
                    RuntimeError::Image(_) => StartFailure::Image,
                    _ => StartFailure::Node,
                };
                self.start_failed(&spec, failure, e.to_string());
            }
        }
    }

    /// Serves a function container's runtime API: binds its socket, mounts its directory
    /// at `/run/gantry` and tells it where through its env.
    fn serve_function(
        &self,
        id: &ContainerId,
        attempt: &AttemptRef,
        function: &gantry_shared::protocol::FunctionRuntime,
        req: &mut ContainerRequest,
    ) -> Result<Arc<FunctionServer>, String> {
        let server = self
            .functions
            .open(id, attempt.clone(), function)
            .map_err(|e| e.to_string())?;
        req.env.extend(invoke::container_env(function));
        // A web endpoint's server gets its own network namespace (so every container of
        // it may listen on the same port), reached by the agent from inside.
        if let Some(WebRuntime::Port { port, .. }) = &function.web {
            req.network = NetworkMode::Isolated;
            req.env.push(("PORT".to_owned(), port.to_string()));
        }
        req.binds.push(BindMount {
            source: self.functions.invoke().dir(id),
            destination: invoke::CONTAINER_DIR.to_owned(),
            read_only: false,
            exec: false,
        });
        Ok(server)
    }

    fn watch(self: Arc<Self>, id: ContainerId, attempt: AttemptRef) {
        tokio::spawn(async move {
            if let Ok(exit) = self.runtime.wait(&id).await {
                if attempt.owner.warm().is_some() {
                    // Its server stops and its answers go out before its end does.
                    self.functions.close(&id, &attempt).await;
                }
                self.changed.notify_one();
                self.report_exit(&id, attempt, &exit);
            }
        });
    }

    /// Queues the exit; the container (and its output) stays until garbage collection.
    fn report_exit(&self, id: &ContainerId, attempt: AttemptRef, exit: &ExitRecord) {
        let cause = match (self.gpus.fault_of(id), exit.reason) {
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

    /// Records the end of an attempt: its event goes to the outbox and its mark is done.
    /// False if the event could not be recorded (it is found again after a restart).
    /// Reports that `spec` could not be started, and why.
    fn start_failed(&self, spec: &AttemptSpec, failure: StartFailure, message: impl Into<String>) {
        self.finish(Event::StartFailed {
            owner: spec.owner.clone(),
            generation: spec.generation,
            message: message.into(),
            failure,
        });
    }

    fn finish(&self, event: Event) -> bool {
        let (owner, generation) = (event.owner().clone(), event.generation());
        if let Err(e) = self.outbox.push(event) {
            tracing::error!(%owner, error = %e, "cannot record an event");
            return false;
        }
        if let Err(e) = self.generations.done(&owner, generation) {
            tracing::warn!(%owner, error = %e, "cannot mark an attempt done");
        }
        true
    }

    /// Keeps the output of the newest exited attempts (for `gantry logs`) and removes the
    /// containers beyond [`KEEP_EXITED`].
    fn collect_garbage(&self) {
        let mut exited: Vec<(u64, ContainerId)> = self
            .runtime
            .list()
            .into_iter()
            .filter(|c| c.attempt.is_some())
            .filter_map(|c| match c.state {
                ContainerState::Exited(e) => Some((e.finished_at_ms, c.id)),
                ContainerState::Running { .. } => None,
            })
            .collect();
        exited.sort();
        let excess = exited.len().saturating_sub(KEEP_EXITED);
        for (_, id) in exited.into_iter().take(excess) {
            match self.runtime.remove(&id) {
                // Two exits collecting at once: the other one removed it.
                Ok(()) | Err(RuntimeError::NotFound { .. }) => {}
                Err(e) => {
                    tracing::warn!(container = %id, error = %e, "cannot remove an old container")
                }
            }
        }
    }
}
