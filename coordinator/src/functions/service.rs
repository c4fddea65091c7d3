//! The function service: deploys, calls and their reads, node events and outputs of
//! function containers, the scaling step of each reconcile pass, and the router task that
//! carries inputs, cancels, drains, starts and stops to nodes.
//!
//! The live [`State`] sits behind one mutex; every transition's [`Changes`] are written to
//! the store under it (so the store never runs behind the state), and what must reach a
//! node goes to the router as [`Outbound`] messages, sent from their own tasks.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gantry_shared::calls::{
    AppendRequest, AppendView, CallRequest, CallRequestError, CallState, CallView, InputResult,
    InputState, InputView, LeasedInput, MAX_OUTSTANDING, OutputOrder, OutputsPage, PhaseTimings,
};
use gantry_shared::chunks::StreamPage;
use gantry_shared::functions::{
    AppManifest, AppView, DeploymentView, FunctionSpec, FunctionView, ManifestValidationError,
    VersionSummary, WebSpec, WebVia,
};
use gantry_shared::protocol::{
    AttemptSpec, ChunkItem, Command, CommandReply, Event, FunctionRuntime, OutputItem, Readiness,
    WebRuntime, batches,
};
use gantry_shared::secrets::SecretUse;
use gantry_shared::{AppName, CallId, FunctionName, Generation, InputId, NodeId, Owner, WarmId};
use sha2::{Digest, Sha256};
use tokio::sync::{Notify, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::FunctionKey;
use super::autoscale::{self, Observed};
use super::chunks::{Chunks, Pushed};
use super::clock::{Clock, SystemClock};
use super::metrics::InputMetrics;
use super::state::{Changes, Delivery, InputRecord, State, WarmPhase, WarmRecord};
use crate::nodes::liveness::{Liveness, NodeStatus};
use crate::placement::{Never, Request, Unplaceable};
use crate::reconcile::{Held, NodeLink, engine};
use crate::store::StoreError;
use crate::store::functions::{AppRecord, CallRecord, FunctionStore};
use crate::store::node_admin::AdminMode;

/// Calls whose count of ended inputs is kept in memory at once.
const DONE_CACHE: usize = 10_000;

/// The longest one call request waits for its outputs; clients ask again.
pub const MAX_CALL_WAIT: Duration = Duration::from_secs(55);
/// How long a draining or cancelled container gets before it is stopped.
pub const DRAIN_GRACE: Duration = Duration::from_secs(30);
/// How long past an input's deadline the coordinator waits for its agent's own timeout
/// report before it gives the container up.
pub const DEADLINE_GRACE: Duration = Duration::from_secs(30);
/// How long past a container's startup timeout the coordinator waits for its agent to
/// report it ready or failed before it gives the container up.
pub const STARTUP_GRACE: Duration = Duration::from_secs(60);
/// How long a fenced container's stop, or a draining one's drain, stands before it goes
/// again while the container remains: the first may have been lost with a node session
/// or timed out while the node was paused (a drain or stop is idempotent on the node).
/// A new session of the node sends them again at once.
pub const RESEND_AFTER: Duration = crate::reconcile::link::COMMAND_TIMEOUT;

#[derive(Debug, thiserror::Error)]
pub enum FunctionServiceError {
    #[error("{0}")]
    Manifest(#[from] ManifestValidationError),
    #[error("{0}")]
    Call(#[from] CallRequestError),
    #[error("{what} not found")]
    NotFound { what: String },
    #[error("{message}")]
    Conflict { message: String },
    /// Too much outstanding for now: ask again later.
    #[error("{message}")]
    Busy { message: String },
    #[error(
        "idempotency key `{key}` was used with a different request body; use a new key for a new call"
    )]
    IdempotencyKeyReused { key: String },
    /// A secret the manifest names, at `field`.
    #[error("{field}: {error}")]
    Secret {
        field: String,
        error: crate::secrets::SecretStoreError,
    },
    /// A volume the manifest names, at `field`.
    #[error("{field}: {error}")]
    Volume {
        field: String,
        error: crate::volumes::VolumeUseError,
    },
    #[error(transparent)]
    Store(StoreError),
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<StoreError> for FunctionServiceError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::IdempotencyMismatch { key } => {
                FunctionServiceError::IdempotencyKeyReused { key }
            }
            e => FunctionServiceError::Store(e),
        }
    }
}

/// Something a node must hear, carried by the router.
#[derive(Debug)]
pub enum Outbound {
    Deliver(Delivery),
    Start {
        node: NodeId,
        spec: AttemptSpec,
        /// The secrets the container gets: their values go into `spec` only as it is sent.
        secrets: Vec<SecretUse>,
    },
    Cancel {
        node: NodeId,
        warm: WarmId,
        input: InputId,
    },
    Drain {
        node: NodeId,
        warm: WarmId,
        /// Its node is being preempted: the container hears this deadline (unix ms).
        preempt_deadline_ms: Option<u64>,
    },
    /// Stop a container taken off its node (a fence) or given up on.
    Stop {
        node: NodeId,
        warm: WarmId,
    },
}

#[derive(Clone)]
pub struct FunctionService {
    inner: Arc<Inner>,
}

struct Inner {
    store: FunctionStore,
    state: Mutex<State>,
    /// Unbounded: one message per lease, container start, drain or stop, each bounded by
    /// the live inputs and containers; a bound would make a transition under the state's
    /// lock wait on the network.
    outbound: mpsc::UnboundedSender<Outbound>,
    /// Wakes the reconciler (new demand, a container gone).
    reconcile: Arc<Notify>,
    /// Bumped whenever an input of some call ends: long polls wait on it.
    calls: watch::Sender<u64>,
    /// Inputs' streamed chunks, in memory only (locked after `state` when both are).
    chunks: Mutex<Chunks>,
    /// Bumped whenever a chunk is kept: stream readers wait on it (and on `calls`).
    streamed: watch::Sender<u64>,
    /// Wakes web requests waiting for a container: one became ready or went, or a request
    /// ended.
    web_changed: Notify,
    /// The last stop of each fenced container and drain of each draining one: the node
    /// session it went on and when (see [`RESEND_AFTER`]).
    resent: Mutex<HashMap<WarmId, (usize, u64)>>,
    /// Per call, how many of its inputs ended so far (the next `done_seq`); a cache of
    /// the store's count, filled on first use.
    done: Mutex<HashMap<CallId, u32>>,
    /// Appends to open maps, one at a time (each checks and extends a call's inputs).
    appends: tokio::sync::Mutex<()>,
    metrics: InputMetrics,
    shutdown: CancellationToken,
    /// Where the time comes from (the simulation's is virtual).
    clock: Arc<dyn Clock>,
}

impl FunctionService {
    /// Opens the functions' state from the store. Returns the service and the receiving
    /// end of its outbound messages, for [`run_router`].
    pub fn open(
        store: FunctionStore,
        reconcile: Arc<Notify>,
        shutdown: CancellationToken,
    ) -> Result<(Self, mpsc::UnboundedReceiver<Outbound>), FunctionServiceError> {
        Self::open_with_clock(store, reconcile, shutdown, Arc::new(SystemClock))
    }

    /// [`FunctionService::open`], reading the time from `clock` (the simulation's).
    pub fn open_with_clock(
        store: FunctionStore,
        reconcile: Arc<Notify>,
        shutdown: CancellationToken,
        clock: Arc<dyn Clock>,
    ) -> Result<(Self, mpsc::UnboundedReceiver<Outbound>), FunctionServiceError> {
        let limits = super::chunks::ChunkLimits::default();
        let mut specs = BTreeMap::new();
        let mut active = BTreeMap::new();
        for app in store.apps()? {
            active.insert(app.app.clone(), app.active);
            for d in &app.deployments {
                for (name, spec) in &d.manifest.functions {
                    specs.insert(
                        FunctionKey {
                            app: app.app.clone(),
                            version: d.version,
                            function: name.clone(),
                        },
                        spec.clone(),
                    );
                }
            }
        }
        let mut state = State::restore(specs, store.live_inputs()?, store.all_warm()?);
        state.active = active;
        let (tx, rx) = mpsc::unbounded_channel();
        Ok((
            Self {
                inner: Arc::new(Inner {
                    store,
                    state: Mutex::new(state),
                    outbound: tx,
                    reconcile,
                    calls: watch::channel(0).0,
                    chunks: Mutex::new(Chunks::new(limits)),
                    streamed: watch::channel(0).0,
                    web_changed: Notify::new(),
                    resent: Mutex::default(),
                    done: Mutex::default(),
                    appends: tokio::sync::Mutex::new(()),
                    metrics: InputMetrics::default(),
                    shutdown,
                    clock,
                }),
            },
            rx,
        ))
    }

    /// Registers the inputs' metrics for `/metrics`.
    pub fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        self.inner.metrics.register(registry);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn now(&self) -> u64 {
        self.inner.clock.now_ms()
    }

    fn chunks(&self) -> std::sync::MutexGuard<'_, Chunks> {
        self.inner.chunks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes a transition's changes and sends what it hands to nodes. Called with the
    /// state locked, so records reach the store in the order the state changed.
    fn apply(&self, mut changes: Changes) -> Result<(), FunctionServiceError> {
        let store = &self.inner.store;
        let mut done = Vec::new();
        for i in changes
            .inputs
            .iter_mut()
            .filter(|i| i.state.is_terminal() && i.done_seq.is_none())
        {
            let seq = self.next_done(&i.call)?;
            i.done_seq = Some(seq);
            done.push((i.call.clone(), seq, i.index));
        }
        store.put_inputs(changes.inputs.iter())?;
        // After the inputs: a reader of the order finds each one's end already written.
        for (call, seq, index) in done {
            store.put_done(&call, seq, index)?;
        }
        let now = self.now();
        for i in changes.inputs.iter().filter(|i| i.state.is_terminal()) {
            self.inner.metrics.ended(i);
            // Its stream takes no more chunks: it had them all (they travel before the
            // answer).
            self.chunks().end(&i.id, now);
        }
        store.put_warm(changes.warm.iter())?;
        for id in &changes.warm_gone {
            store.remove_warm(id)?;
        }
        for d in changes.deliveries {
            let _ = self.inner.outbound.send(Outbound::Deliver(d));
        }
        for (node, warm, input) in changes.cancels {
            let _ = self
                .inner
                .outbound
                .send(Outbound::Cancel { node, warm, input });
        }
        if !changes.calls.is_empty() {
            self.inner.calls.send_modify(|v| *v += 1);
        }
        if !changes.warm.is_empty() || !changes.warm_gone.is_empty() {
            // A container became ready (or went): waiting web requests look again.
            self.inner.web_changed.notify_waiters();
        }
        Ok(())
    }

    /// The next `done_seq` of `call` (called with the state locked, so the count and the
    /// store agree).
    fn next_done(&self, call: &CallId) -> Result<u32, FunctionServiceError> {
        let mut done = self.inner.done.lock().unwrap_or_else(|e| e.into_inner());
        // A cache: forgetting every entry now and then bounds it, and an entry comes back
        // from the store's count.
        if done.len() >= DONE_CACHE && !done.contains_key(call) {
            done.clear();
        }
        let n = match done.entry(call.clone()) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(self.inner.store.done_count(call)?)
            }
        };
        let seq = *n;
        *n += 1;
        Ok(seq)
    }

    // ---- deployments ----

    /// The function versions that mount volume `name`: the ones new calls go to, and
    /// older ones that still have containers or inputs to run (`function app/fn (version
    /// 3)`).
    pub fn volume_users(&self, name: &gantry_shared::volumes::VolumeName) -> Vec<String> {
        let state = self.lock();
        let live: std::collections::BTreeSet<&FunctionKey> = state.warm().map(|w| &w.key).collect();
        state
            .specs
            .iter()
            .filter(|(key, spec)| {
                spec.volumes.values().any(|u| u.name == *name)
                    && (state.active.get(&key.app) == Some(&Some(key.version))
                        || live.contains(key)
                        || state.queued(key) > 0)
            })
            .map(|(key, _)| format!("function {key}"))
            .collect()
    }

    /// Records a new immutable version of the app and points new calls at it. Inputs in
    /// flight finish on the version they started on; the old version's containers drain.
    pub fn deploy(
        &self,
        mut manifest: AppManifest,
    ) -> Result<DeploymentView, FunctionServiceError> {
        manifest.validate()?;
        for (name, f) in &manifest.functions {
            self.inner
                .store
                .secrets()
                .check_exist(&f.secrets)
                .map_err(|e| FunctionServiceError::Secret {
                    field: format!("functions.{name}.secrets"),
                    error: e,
                })?;
        }
        // Where each volume lives goes into the version, recorded while no volume can be
        // deleted.
        let volumes = self.inner.store.volumes();
        let _uses = volumes.uses();
        for (name, f) in manifest.functions.iter_mut() {
            volumes
                .resolve(&mut f.volumes)
                .map_err(|e| FunctionServiceError::Volume {
                    field: format!("functions.{name}.volumes"),
                    error: e,
                })?;
        }
        let store = &self.inner.store;
        let mut state = self.lock();
        let mut record = store.app(&manifest.app)?.unwrap_or(AppRecord {
            app: manifest.app.clone(),
            deployments: Vec::new(),
            active: None,
        });
        let version = record
            .deployments
            .iter()
            .map(|d| d.version)
            .max()
            .unwrap_or(0)
            + 1;
        let deployment = DeploymentView {
            app: manifest.app.clone(),
            version,
            created_at_ms: self.now(),
            manifest,
        };
        for (name, spec) in &deployment.manifest.functions {
            state.specs.insert(
                FunctionKey {
                    app: deployment.app.clone(),
                    version,
                    function: name.clone(),
                },
                spec.clone(),
            );
        }
        record.deployments.push(deployment.clone());
        record.active = Some(version);
        store.put_app(&record)?;
        store.commit()?;
        state.active.insert(record.app.clone(), Some(version));
        drop(state);
        tracing::info!(app = %deployment.app, version, "deployed");
        self.inner.reconcile.notify_one();
        Ok(deployment)
    }

    /// Points new calls at `version` (default: the one before the active one).
    pub fn rollback(
        &self,
        app: &AppName,
        version: Option<u64>,
    ) -> Result<AppView, FunctionServiceError> {
        let store = &self.inner.store;
        {
            // The version's volumes must still be where it recorded them.
            let volumes = store.volumes();
            let _uses = volumes.uses();
            let mut state = self.lock();
            let mut record = self.app_record(app)?;
            let target = match version {
                Some(v) => v,
                None => {
                    let active = record.active.unwrap_or(u64::MAX);
                    record
                        .deployments
                        .iter()
                        .map(|d| d.version)
                        .filter(|v| *v < active)
                        .max()
                        .ok_or_else(|| FunctionServiceError::Conflict {
                            message: format!(
                                "app `{app}` has no version before {active} to roll back to"
                            ),
                        })?
                }
            };
            let Some(deployment) = record.deployment(target) else {
                return Err(FunctionServiceError::NotFound {
                    what: format!("version {target} of app `{app}`"),
                });
            };
            for f in deployment.manifest.functions.values() {
                for u in f.volumes.values() {
                    let now = volumes.get(&u.name)?;
                    if now
                        .as_ref()
                        .is_none_or(|v| v.deleting || Some(&v.backend) != u.backend.as_ref())
                    {
                        return Err(FunctionServiceError::Conflict {
                            message: format!(
                                "version {target} of app `{app}` mounts volume `{}`, which has \
                                 been deleted (or made again elsewhere) since; deploy a new \
                                 version instead",
                                u.name
                            ),
                        });
                    }
                }
            }
            record.active = Some(target);
            store.put_app(&record)?;
            store.commit()?;
            state.active.insert(app.clone(), Some(target));
        }
        self.inner.reconcile.notify_one();
        self.app(app)
    }

    /// Stops the app: new calls are refused; inputs already accepted finish and its
    /// containers drain.
    pub fn stop(&self, app: &AppName) -> Result<AppView, FunctionServiceError> {
        {
            let mut state = self.lock();
            let mut record = self.app_record(app)?;
            record.active = None;
            self.inner.store.put_app(&record)?;
            self.inner.store.commit()?;
            state.active.insert(app.clone(), None);
        }
        self.inner.reconcile.notify_one();
        self.app(app)
    }

    fn app_record(&self, app: &AppName) -> Result<AppRecord, FunctionServiceError> {
        self.inner
            .store
            .app(app)?
            .ok_or_else(|| FunctionServiceError::NotFound {
                what: format!("app `{app}` (deploy it with `gantry deploy`)"),
            })
    }

    pub fn apps(&self) -> Result<Vec<AppView>, FunctionServiceError> {
        let records = self.inner.store.apps()?;
        let state = self.lock();
        Ok(records
            .iter()
            .map(|r| app_view(r, &state, &self.inner.metrics, self.now()))
            .collect())
    }

    pub fn app(&self, app: &AppName) -> Result<AppView, FunctionServiceError> {
        let record = self.app_record(app)?;
        let state = self.lock();
        Ok(app_view(&record, &state, &self.inner.metrics, self.now()))
    }

    // ---- web endpoints ----

    /// The functions of active versions that run on a schedule.
    pub fn scheduled(
        &self,
    ) -> Vec<(
        AppName,
        FunctionName,
        gantry_shared::schedules::ScheduleSpec,
    )> {
        let state = self.lock();
        state
            .specs
            .iter()
            .filter(|(k, _)| state.active.get(&k.app).copied().flatten() == Some(k.version))
            .filter_map(|(k, spec)| {
                let schedule = spec.schedule.clone()?;
                Some((k.app.clone(), k.function.clone(), schedule))
            })
            .collect()
    }

    /// Web endpoint `label` of `app`'s active version, if it has one.
    pub fn web_endpoint(&self, app: &AppName, label: &str) -> Option<WebEndpoint> {
        let state = self.lock();
        let version = state.active.get(app).copied().flatten()?;
        state
            .specs
            .iter()
            .filter(|(k, _)| &k.app == app && k.version == version)
            .find_map(|(key, spec)| {
                let web = spec.web.as_ref()?;
                (web.label_for(&key.function) == label).then(|| WebEndpoint {
                    key: key.clone(),
                    spec: spec.clone(),
                    web: web.clone(),
                })
            })
    }

    /// A ready container of `endpoint` for one request that arrived at `arrived_ms` (unix
    /// ms; not one of `skip`): the one with the fewest requests in flight below
    /// `max_concurrency`. With none free the request waits (the autoscaler sees it as
    /// demand and starts containers) until `deadline`; beyond `max_pending` waiting it is
    /// refused at once. The lease says where the wait went, as an input's timings do.
    pub async fn web_acquire(
        &self,
        endpoint: &WebEndpoint,
        arrived_ms: u64,
        deadline: tokio::time::Instant,
        skip: &[WarmId],
    ) -> Result<WebLease, WebWaitError> {
        let key = &endpoint.key;
        let mut waiting = false;
        let result = loop {
            let changed = self.inner.web_changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            {
                let mut state = self.lock();
                let candidates = state.ready_of(key);
                let taken = state
                    .web
                    .take(&candidates, endpoint.web.max_concurrency, skip);
                if let Some((warm, node)) = taken {
                    let timings = state.wait_phases(&warm, arrived_ms, self.now());
                    break Ok(WebLease {
                        service: self.clone(),
                        warm,
                        node,
                        timings,
                    });
                }
                if !waiting {
                    if !state.web.wait(key, endpoint.web.max_pending) {
                        return Err(WebWaitError::TooMany {
                            waiting: endpoint.web.max_pending,
                        });
                    }
                    waiting = true;
                    // New demand: the scaling pass starts what it wants.
                    self.inner.reconcile.notify_one();
                }
            }
            tokio::select! {
                _ = changed => {}
                _ = tokio::time::sleep_until(deadline) => break Err(WebWaitError::Timeout),
                _ = self.inner.shutdown.cancelled() => break Err(WebWaitError::Timeout),
            }
        };
        if waiting {
            self.lock().web.unwait(key);
        }
        result
    }

    /// A web request to `key` ended with `status` after `timings` (its wait, from its
    /// lease, and its run): into the metrics and the recent window (`gantry functions`),
    /// as an input would.
    pub fn web_request_ended(&self, key: &FunctionKey, timings: &PhaseTimings, status: u16) {
        self.inner
            .metrics
            .web_request_ended(key, timings, status, self.now());
    }

    /// The time by the service's clock (unix ms).
    pub fn now_ms(&self) -> u64 {
        self.now()
    }

    /// A web request on `warm` ended.
    fn web_done(&self, warm: &WarmId) {
        let now = self.now();
        self.lock().web_done(warm, now);
        self.inner.web_changed.notify_waiters();
    }

    // ---- calls ----

    /// Accepts a call of the app's active version, durably, and hands its inputs to free
    /// slots. With `wait`, returns once every input ended or after [`MAX_CALL_WAIT`].
    pub async fn call(
        &self,
        app: &AppName,
        function: &FunctionName,
        request: CallRequest,
        idempotency_key: Option<String>,
    ) -> Result<(CallView, bool), FunctionServiceError> {
        let (wait, open) = (request.wait, request.open);
        // What the call means: its function and inputs (not whether the caller waits), so
        // a retry that no longer waits is the same call, and a key reused on another
        // function is refused.
        let canonical = hex::encode(Sha256::digest(
            serde_json::to_vec(&(app, function, &request.input, &request.inputs, open))
                .map_err(|e| FunctionServiceError::Internal(e.to_string()))?,
        ));
        let payloads = request.into_inputs()?;
        let record = self.app_record(app)?;
        let version = record.active.ok_or_else(|| FunctionServiceError::Conflict {
            message: format!(
                "app `{app}` is stopped; deploy it again or roll back (`gantry apps rollback {app}`)"
            ),
        })?;
        let deployment = record
            .deployment(version)
            .ok_or_else(|| FunctionServiceError::Internal("active version missing".into()))?;
        if !deployment.manifest.functions.contains_key(function) {
            let names: Vec<&str> = deployment
                .manifest
                .functions
                .keys()
                .map(|f| f.as_str())
                .collect();
            return Err(FunctionServiceError::NotFound {
                what: format!(
                    "function `{function}` in app `{app}` (version {version} has: {})",
                    names.join(", ")
                ),
            });
        }
        if let Some(web) = deployment
            .manifest
            .functions
            .get(function)
            .and_then(|f| f.web.as_ref())
        {
            return Err(FunctionServiceError::Conflict {
                message: format!(
                    "function `{function}` is a web endpoint: send it HTTP requests through the ingress at /{app}/{}/",
                    web.label_for(function)
                ),
            });
        }
        let key = FunctionKey {
            app: app.clone(),
            version,
            function: function.clone(),
        };
        let id = CallId::from_sequence(self.inner.store.next_id()?);
        let now = self.now();
        let inputs: Vec<InputRecord> = payloads
            .into_iter()
            .enumerate()
            .map(|(i, payload)| {
                InputRecord::new(
                    InputId::of(&id, i as u32),
                    id.clone(),
                    i as u32,
                    key.clone(),
                    payload,
                    now,
                )
            })
            .collect();
        let call = CallRecord {
            id: id.clone(),
            key: key.clone(),
            created_at_ms: now,
            inputs: inputs.len() as u32,
            cancelled: false,
            open,
        };
        let store = self.inner.store.clone();
        let (call_id, created) = {
            let stored_inputs = inputs.clone();
            let stored_call = call.clone();
            let key = idempotency_key.clone();
            let outcome = tokio::task::spawn_blocking(move || {
                store.create_call(
                    &stored_call,
                    &stored_inputs,
                    key.as_deref().map(|k| (k, canonical.as_str())),
                )
            })
            .await
            .map_err(|e| FunctionServiceError::Internal(e.to_string()))??;
            match outcome {
                Ok(()) => (id, true),
                Err(earlier) => (earlier, false),
            }
        };
        if created {
            {
                let mut state = self.lock();
                let changes = state.accept(inputs, now);
                self.apply(changes)?;
            }
            // New demand: let the reconciler scale now rather than at its next pass.
            self.inner.reconcile.notify_one();
        }
        let view = if wait {
            self.wait_call(&call_id, MAX_CALL_WAIT).await?
        } else {
            self.call_view(&call_id)?
        };
        Ok((view, created))
    }

    fn call_record(&self, id: &CallId) -> Result<CallRecord, FunctionServiceError> {
        self.inner
            .store
            .call(id)?
            .ok_or_else(|| FunctionServiceError::NotFound {
                what: format!("call `{id}`"),
            })
    }

    /// The call as it is now.
    pub fn call_view(&self, id: &CallId) -> Result<CallView, FunctionServiceError> {
        let call = self.call_record(id)?;
        let inputs = self.inner.store.inputs_of(id)?;
        Ok(call_view(&call, &inputs))
    }

    /// Adds inputs to an open map (closing it with `close`). Waits (up to
    /// [`MAX_CALL_WAIT`]) while the map holds too many outstanding inputs to take them all;
    /// `Busy` after that. A request sent again with the same `start` and inputs is answered
    /// as before (`true`: it was a replay).
    pub async fn append(
        &self,
        id: &CallId,
        request: AppendRequest,
    ) -> Result<(AppendView, bool), FunctionServiceError> {
        request.checked_inputs()?;
        let n = request.inputs.len() as u32;
        let deadline = tokio::time::Instant::now() + MAX_CALL_WAIT;
        let mut changed = self.inner.calls.subscribe();
        loop {
            changed.borrow_and_update();
            let guard = self.inner.appends.lock().await;
            let mut call = self.call_record(id)?;
            if request.start < call.inputs || (request.start == call.inputs && n == 0 && !call.open)
            {
                // Sent before: the same inputs at the same places (a lost answer).
                let stored = self
                    .inner
                    .store
                    .inputs_from(id, request.start, n as usize, |_| true)?;
                let same = request.start.saturating_add(n) <= call.inputs
                    && stored.len() == request.inputs.len()
                    && stored
                        .iter()
                        .zip(&request.inputs)
                        .all(|(s, p)| &s.payload == p)
                    && (!request.close || !call.open);
                if !same {
                    return Err(FunctionServiceError::Conflict {
                        message: format!(
                            "call `{id}` already holds inputs {}..{} and these differ; the next input goes at `start` {}",
                            request.start,
                            call.inputs.min(request.start.saturating_add(n)),
                            call.inputs
                        ),
                    });
                }
                return Ok((self.append_view(&call), true));
            }
            if call.cancelled {
                return Err(FunctionServiceError::Conflict {
                    message: format!(
                        "call `{id}` was cancelled; it takes no more inputs: start a new map"
                    ),
                });
            }
            if !call.open {
                return Err(FunctionServiceError::Conflict {
                    message: format!(
                        "call `{id}` is closed with {} inputs; start a new map for more",
                        call.inputs
                    ),
                });
            }
            if call.inputs.checked_add(n).is_none() {
                return Err(FunctionServiceError::Conflict {
                    message: format!(
                        "call `{id}` holds {} inputs, the most one map can; start a new map for more",
                        call.inputs
                    ),
                });
            }
            if request.start > call.inputs {
                return Err(FunctionServiceError::Conflict {
                    message: format!(
                        "call `{id}` holds {} inputs, so the next goes at `start` {}, not {}",
                        call.inputs, call.inputs, request.start
                    ),
                });
            }
            let outstanding = self.lock().open_inputs(id);
            if outstanding + n <= MAX_OUTSTANDING {
                let now = self.now();
                let inputs: Vec<InputRecord> = request
                    .inputs
                    .iter()
                    .enumerate()
                    .map(|(i, payload)| {
                        let index = request.start + i as u32;
                        InputRecord::new(
                            InputId::of(id, index),
                            id.clone(),
                            index,
                            call.key.clone(),
                            payload.clone(),
                            now,
                        )
                    })
                    .collect();
                call.inputs += n;
                call.open = !request.close;
                let store = self.inner.store.clone();
                let (stored_call, stored_inputs) = (call.clone(), inputs.clone());
                tokio::task::spawn_blocking(move || {
                    store.append_inputs(&stored_call, &stored_inputs)
                })
                .await
                .map_err(|e| FunctionServiceError::Internal(e.to_string()))??;
                {
                    let mut state = self.lock();
                    let mut changes = state.accept(inputs, now);
                    // A long poll on the call wakes: it may have just been closed.
                    changes.calls.insert(id.clone());
                    self.apply(changes)?;
                }
                drop(guard);
                self.inner.reconcile.notify_one();
                return Ok((self.append_view(&call), false));
            }
            drop(guard);
            tokio::select! {
                r = changed.changed() => if r.is_err() { break },
                _ = tokio::time::sleep_until(deadline) => break,
                _ = self.inner.shutdown.cancelled() => break,
            }
        }
        Err(FunctionServiceError::Busy {
            message: format!(
                "call `{id}` holds {} inputs that have not ended (at most {MAX_OUTSTANDING}); send these {n} again once some have",
                self.lock().open_inputs(id)
            ),
        })
    }

    fn append_view(&self, call: &CallRecord) -> AppendView {
        AppendView {
            call: call.id.clone(),
            inputs: call.inputs,
            outstanding: self.lock().open_inputs(&call.id),
            open: call.open,
        }
    }

    /// A page of the call's results from `from` on, in `order` (at most `limit`), waiting
    /// up to `wait` for the first one.
    pub async fn outputs(
        &self,
        id: &CallId,
        from: u32,
        order: OutputOrder,
        limit: usize,
        wait: Duration,
    ) -> Result<OutputsPage, FunctionServiceError> {
        let deadline = tokio::time::Instant::now() + wait.min(MAX_CALL_WAIT);
        let mut changed = self.inner.calls.subscribe();
        loop {
            changed.borrow_and_update();
            let call = self.call_record(id)?;
            let page = self.outputs_page(&call, from, order, limit.max(1))?;
            if !page.results.is_empty() || page.done {
                return Ok(page);
            }
            tokio::select! {
                r = changed.changed() => if r.is_err() { return Ok(page) },
                _ = tokio::time::sleep_until(deadline) => return Ok(page),
                _ = self.inner.shutdown.cancelled() => return Ok(page),
            }
        }
    }

    fn outputs_page(
        &self,
        call: &CallRecord,
        from: u32,
        order: OutputOrder,
        limit: usize,
    ) -> Result<OutputsPage, FunctionServiceError> {
        let store = &self.inner.store;
        let ended: Vec<InputRecord> = match order {
            OutputOrder::Input => {
                store.inputs_from(&call.id, from, limit, |i| i.state.is_terminal())?
            }
            OutputOrder::Completion => {
                let mut out = Vec::new();
                for index in store.done_since(&call.id, from, limit)? {
                    if let Some(i) = store.input(&call.id, index)? {
                        out.push(i);
                    }
                }
                out
            }
        };
        let next = from.saturating_add(ended.len() as u32);
        Ok(OutputsPage {
            results: ended.iter().map(input_view).collect(),
            next,
            done: !call.open && next >= call.inputs,
        })
    }

    /// The call once every input ended, or as it is after `wait` (at most
    /// [`MAX_CALL_WAIT`]) or at shutdown.
    pub async fn wait_call(
        &self,
        id: &CallId,
        wait: Duration,
    ) -> Result<CallView, FunctionServiceError> {
        let deadline = tokio::time::Instant::now() + wait.min(MAX_CALL_WAIT);
        let mut changed = self.inner.calls.subscribe();
        loop {
            changed.borrow_and_update();
            // The live count, not the store: a map's reader is woken by every input that
            // ends anywhere, and reads the call's inputs only once they all ended (and an
            // open map was closed).
            if self.lock().open_inputs(id) == 0 && !self.call_record(id)?.open {
                return self.call_view(id);
            }
            tokio::select! {
                r = changed.changed() => if r.is_err() { break },
                _ = tokio::time::sleep_until(deadline) => break,
                _ = self.inner.shutdown.cancelled() => break,
            }
        }
        self.call_view(id)
    }

    /// A page of the chunks input `index` of call `id` streamed, from place `from` on,
    /// waiting up to `wait` (at most [`MAX_CALL_WAIT`]) for a first chunk or the input's end.
    pub async fn stream(
        &self,
        id: &CallId,
        index: u32,
        from: u64,
        wait: Duration,
    ) -> Result<StreamPage, FunctionServiceError> {
        let deadline = tokio::time::Instant::now() + wait.min(MAX_CALL_WAIT);
        let mut ended_rx = self.inner.calls.subscribe();
        let mut streamed_rx = self.inner.streamed.subscribe();
        let call = self.call_record(id)?;
        if index >= call.inputs {
            return Err(FunctionServiceError::NotFound {
                what: format!("input {index} of call `{id}` (it has {})", call.inputs),
            });
        }
        let input = InputId::of(id, index);
        loop {
            ended_rx.borrow_and_update();
            streamed_rx.borrow_and_update();
            // Its end first, then its chunks: an input that ended had every chunk here.
            let ended = self
                .inner
                .store
                .input(id, index)?
                .is_some_and(|i| i.state.is_terminal());
            let page = self.chunks().read(&input, from, ended);
            if !page.chunks.is_empty() || page.done {
                return Ok(page);
            }
            tokio::select! {
                r = ended_rx.changed() => if r.is_err() { return Ok(page) },
                r = streamed_rx.changed() => if r.is_err() { return Ok(page) },
                _ = tokio::time::sleep_until(deadline) => return Ok(page),
                _ = self.inner.shutdown.cancelled() => return Ok(page),
            }
        }
    }

    /// Cancels a call: queued inputs are dropped, running ones are told through their
    /// container's events and stopped after a grace.
    /// An open map is closed too.
    pub async fn cancel(&self, id: &CallId) -> Result<CallView, FunctionServiceError> {
        {
            // No append rewrites the call's record meanwhile.
            let _appends = self.inner.appends.lock().await;
            let mut state = self.lock();
            let mut call = self.call_record(id)?;
            let ended = state.open_inputs(id) == 0;
            if !call.cancelled && (!ended || call.open) {
                call.cancelled = true;
                call.open = false;
                self.inner.store.put_call(&call)?;
                let mut changes = state.cancel(id, self.now());
                // A long poll on the call wakes: it may have just ended.
                changes.calls.insert(id.clone());
                self.apply(changes)?;
                self.inner.store.commit()?;
            }
        }
        self.call_view(id)
    }

    // ---- nodes ----

    /// An event of a function container, from its node (durable at the next
    /// [`FunctionService::commit`]).
    pub fn on_event(&self, event: &Event) -> Result<(), FunctionServiceError> {
        let Some(warm) = event.owner().warm() else {
            return Ok(());
        };
        let now = self.now();
        let mut state = self.lock();
        let Some(record) = state.warm_of(warm).cloned() else {
            return Ok(());
        };
        let changes = match event {
            Event::Started {
                at_ms, image_ms, ..
            } => state.started(warm, *at_ms, *image_ms),
            Event::Ready { at_ms, .. } => state.ready(warm, *at_ms, now),
            Event::Waiting { message, .. } => {
                tracing::warn!(container = %warm, function = %record.key, %message, "function container waits");
                Changes::default()
            }
            Event::InitFailed { message, .. } => {
                tracing::warn!(container = %warm, function = %record.key, %message, "function container failed its setup");
                state.container_setup_failed(warm, message, now)
            }
            Event::StartFailed {
                message, failure, ..
            } => {
                tracing::warn!(container = %warm, function = %record.key, %message, "function container did not start");
                let mut c = state.container_ended(warm, message, false, now);
                let more = state.setup_failed(&record.key, message, failure.is_user_error(), now);
                c.inputs.extend(more.inputs);
                c.calls.extend(more.calls);
                c
            }
            Event::Exited { cause, message, .. } => {
                if record.phase == WarmPhase::Fenced {
                    state.forget(warm)
                } else {
                    // Only its own end counts against its setup: not one the platform
                    // caused (its host crashed under it, Gantry stopped it).
                    let never_ready =
                        matches!(record.phase, WarmPhase::Placed | WarmPhase::Started)
                            && !cause.ended_by_gantry()
                            && !record.setup_failed;
                    let why = format!("its container ended ({message})");
                    let mut c = if cause.ended_by_gantry() {
                        state.container_lost(warm, &why, false, now)
                    } else {
                        state.container_ended(warm, &why, false, now)
                    };
                    if never_ready {
                        let more = state.setup_failed(
                            &record.key,
                            &format!("the container exited before it was ready ({message})"),
                            false,
                            now,
                        );
                        c.inputs.extend(more.inputs);
                        c.calls.extend(more.calls);
                    }
                    c
                }
            }
        };
        self.apply(changes)?;
        drop(state);
        self.inner.reconcile.notify_one();
        Ok(())
    }

    /// Makes what events wrote durable (before the node's batch is acknowledged).
    pub fn commit(&self) -> Result<(), FunctionServiceError> {
        Ok(self.inner.store.commit()?)
    }

    /// Chunks that running inputs streamed, from `node`, in order: kept (in memory) when
    /// they come from the input's current lease, dropped otherwise. Called before the
    /// same batch's answers.
    pub fn on_chunks(&self, node: &NodeId, chunks: Vec<ChunkItem>) {
        if chunks.is_empty() {
            return;
        }
        let mut kept = false;
        {
            // Under the state's lock: an input that ends meanwhile (a timeout, its
            // container lost) ends its stream first, and takes no chunk after.
            let state = self.lock();
            let mut streams = self.chunks();
            for c in chunks {
                let current = c.owner.warm().is_some_and(|warm| {
                    state
                        .input(&c.input)
                        .and_then(|i| i.lease.as_ref())
                        .is_some_and(|l| {
                            &l.node == node && &l.warm == warm && l.attempt == c.attempt
                        })
                });
                if current {
                    kept |= streams.push(&c.input, c.attempt, c.seq, c.payload) == Pushed::Kept;
                }
            }
        }
        if kept {
            self.inner.streamed.send_modify(|v| *v += 1);
        }
    }

    /// Containers' answers to inputs from `node`, in order (each recorded once; a stale
    /// answer is ignored), durable together before this returns: one commit per batch.
    pub fn on_outputs(
        &self,
        node: &NodeId,
        outputs: Vec<OutputItem>,
    ) -> Result<(), FunctionServiceError> {
        let mut changed = false;
        {
            let mut state = self.lock();
            let now = self.now();
            for o in outputs {
                let Some(warm) = o.owner.warm() else {
                    continue;
                };
                // Only the node the input is leased to answers for it.
                let from_lease_node = state
                    .input(&o.input)
                    .and_then(|i| i.lease.as_ref())
                    .is_some_and(|l| &l.node == node);
                if !from_lease_node {
                    continue;
                }
                let changes = state.answered(warm, &o.input, o.attempt, o.result, now);
                changed |= !changes.inputs.is_empty();
                self.apply(changes)?;
            }
        }
        if changed {
            // The answers (outputs, errors, retries) are durable before the agent hears
            // `Noted` and forgets them. No scaling pass is woken: an answer only frees a
            // slot, which `answered` fills at once; idle containers are drained by the
            // periodic pass, after their window.
            self.inner.store.commit()?;
        }
        Ok(())
    }

    /// A command to a container failed: the container counts as ended, and what it held
    /// goes back to the queue. `gone`: its node said it does not run it; otherwise (no
    /// answer, a refusal) it may still run there, so it stays as a fence until its node
    /// confirms it stopped.
    pub fn delivery_failed(
        &self,
        warm: &WarmId,
        why: &str,
        gone: bool,
    ) -> Result<(), FunctionServiceError> {
        let mut state = self.lock();
        if state
            .warm_of(warm)
            .is_none_or(|w| w.phase == WarmPhase::Fenced)
        {
            return Ok(());
        }
        tracing::warn!(container = %warm, %why, "function container unreachable; re-queueing its inputs");
        let changes = state.container_ended(warm, why, !gone, self.now());
        self.apply(changes)?;
        drop(state);
        self.inner.reconcile.notify_one();
        Ok(())
    }

    /// A fenced container's node says it no longer runs it.
    pub fn stopped(&self, warm: &WarmId) -> Result<(), FunctionServiceError> {
        let mut state = self.lock();
        if state
            .warm_of(warm)
            .is_some_and(|w| w.phase == WarmPhase::Fenced)
        {
            let changes = state.forget(warm);
            self.apply(changes)?;
        }
        Ok(())
    }

    // ---- scaling (a step of the reconcile pass) ----

    /// What function containers hold, per node: the jobs' placement counts it.
    pub fn held(&self) -> BTreeMap<NodeId, Held> {
        let mut held = BTreeMap::new();
        self.lock().add_held(&mut held);
        held
    }

    /// The scaling step: containers on nodes that went down are taken off (their inputs go
    /// back to the queue), overdue ones given up, each version scaled toward what its
    /// demand wants (placing new containers over `held`: what jobs and fences hold), idle
    /// ones drained, and fenced ones stopped where their node is back.
    pub fn scale(
        &self,
        statuses: &[NodeStatus],
        mut held: BTreeMap<NodeId, Held>,
        sessions: &BTreeMap<NodeId, usize>,
        now: u64,
    ) -> Result<(), FunctionServiceError> {
        let store = &self.inner.store;
        self.chunks().expire(now);
        let mut state = self.lock();
        let status = |node: &NodeId| statuses.iter().find(|s| &s.id == node);
        // Containers on nodes that are down, or given up on.
        let down: Vec<WarmId> = state
            .warm()
            .filter(|w| w.phase != WarmPhase::Fenced)
            .filter(|w| status(&w.node).is_none_or(|s| s.liveness == Liveness::Down))
            .map(|w| w.id.clone())
            .collect();
        for id in down {
            tracing::warn!(container = %id, "function container's node is down; re-queueing its inputs");
            let changes = state.container_lost(&id, "its node went down", true, now);
            self.apply(changes)?;
        }
        // Containers that never became ready although their agent should have said so
        // (its startup timeout) long ago: given up, and stopped.
        let stuck: Vec<WarmId> = state
            .warm()
            .filter(|w| matches!(w.phase, WarmPhase::Placed | WarmPhase::Started))
            .filter(|w| {
                let startup = state
                    .specs
                    .get(&w.key)
                    .map_or(0, |s| s.startup_timeout().as_millis() as u64);
                now.saturating_sub(w.placed_at_ms) > startup + STARTUP_GRACE.as_millis() as u64
            })
            .map(|w| w.id.clone())
            .collect();
        for id in stuck {
            tracing::warn!(container = %id, "function container never became ready; giving it up");
            // Fenced: stopped below.
            let changes = state.container_ended(&id, "it never became ready", true, now);
            self.apply(changes)?;
        }
        // Leases from before a restart go out again once their node is connected.
        for d in state.take_redeliveries(|n| sessions.contains_key(n)) {
            let _ = self.inner.outbound.send(Outbound::Deliver(d));
        }
        let overdue = state.overdue(now, DEADLINE_GRACE.as_millis() as u64);
        for id in overdue {
            // Fenced: stopped below.
            let changes = state.container_ended(&id, "an input ran past its deadline", true, now);
            self.apply(changes)?;
        }
        // Containers on nodes being drained or preempted finish and go (their drains are
        // sent below).
        let leaving: Vec<WarmId> = state
            .warm()
            .filter(|w| matches!(w.phase, WarmPhase::Ready | WarmPhase::Started))
            .filter(|w| status(&w.node).is_some_and(|s| s.admin.is_some()))
            .map(|w| w.id.clone())
            .collect();
        for id in leaving {
            let changes = state.drain(&id);
            self.apply(changes)?;
        }
        // A version whose container no node could ever hold (even empty, every GPU
        // healthy) fails its queued inputs saying why, instead of queueing them forever.
        // Judged only when every joined node has described itself.
        if statuses
            .iter()
            .all(|s| crate::reconcile::node_info(s).is_some())
        {
            let mut empty = engine(statuses, &BTreeMap::new(), true);
            let waiting: Vec<FunctionKey> = state
                .specs
                .keys()
                .filter(|k| state.queued(k) > 0)
                .cloned()
                .collect();
            for key in waiting {
                let Some(spec) = state.specs.get(&key).cloned() else {
                    continue;
                };
                let mut never = None;
                for r in requests(&spec) {
                    match empty.place(&r) {
                        Ok(a) => {
                            empty.release(&a, &r);
                            never = None;
                            break;
                        }
                        Err(why)
                            if why.is_never()
                                && !matches!(why, Unplaceable::Never(Never::NoNodes)) =>
                        {
                            never.get_or_insert(why.to_string());
                        }
                        Err(_) => {
                            never = None;
                            break;
                        }
                    }
                }
                if let Some(why) = never {
                    let message = format!(
                        "no node could ever hold one of its containers: {why}; ask for less or add a larger node"
                    );
                    let changes = state.setup_failed(&key, &message, true, now);
                    self.apply(changes)?;
                }
            }
        }
        // Each version toward what it wants, around what jobs, fences and the containers
        // already placed hold.
        state.add_held(&mut held);
        let mut engine = engine(statuses, &held, false);
        let mut starts = Vec::new();
        for key in state.specs.keys().cloned().collect::<Vec<FunctionKey>>() {
            // Retries whose delay has passed go to free slots (no other transition may
            // come along to hand them out).
            if state.queued(&key) > 0 {
                let changes = state.dispatch(&key, now);
                self.apply(changes)?;
            }
            let current = state.is_current(&key);
            let Some(spec) = state.specs.get(&key).cloned() else {
                continue;
            };
            // Web requests count as inputs: waiting ones as queued, ones in flight as
            // running.
            let mut obs = Observed {
                queued: state.queued(&key) as u32 + state.web.waiting(&key),
                running: state.running(&key) as u32 + state.web_running(&key),
                current,
                ..Observed::default()
            };
            for w in state.warm().filter(|w| w.key == key) {
                match w.phase {
                    WarmPhase::Placed | WarmPhase::Started => obs.starting += 1,
                    WarmPhase::Ready => {
                        obs.ready
                            .push((w.id.clone(), state.busy(&w.id), w.idle_since_ms))
                    }
                    WarmPhase::Draining | WarmPhase::Fenced => {}
                }
            }
            if !current
                && obs.queued == 0
                && obs.running == 0
                && obs.starting == 0
                && obs.ready.is_empty()
            {
                continue;
            }
            let decision = autoscale::decide(&spec, &obs, now);
            for id in decision.drain {
                tracing::info!(container = %id, function = %key, "draining an idle container");
                let changes = state.drain(&id);
                self.apply(changes)?;
            }
            for _ in 0..decision.start {
                if !state.may_start(&key, now) {
                    tracing::debug!(function = %key, "backing off before the next start");
                    break;
                }
                let placed = requests(&spec)
                    .iter()
                    .find_map(|r| engine.place(r).ok().map(|a| (r.clone(), a)));
                let Some((req, assignment)) = placed else {
                    tracing::debug!(function = %key, "no room for another container");
                    break;
                };
                let Some(member) = assignment.members.first() else {
                    break;
                };
                let warm = WarmId::from_sequence(store.next_id()?);
                let record = WarmRecord {
                    id: warm.clone(),
                    key: key.clone(),
                    node: member.node.clone(),
                    gpus: member.gpus.clone(),
                    cpu_millis: req.cpu_millis,
                    memory_bytes: req.memory_bytes,
                    max_inputs: spec.max_inputs,
                    phase: WarmPhase::Placed,
                    placed_at_ms: now,
                    started_at_ms: None,
                    image_ms: None,
                    ready_at_ms: None,
                    idle_since_ms: now,
                    setup_failed: false,
                };
                let h = held.entry(member.node.clone()).or_default();
                h.cpu_millis += req.cpu_millis;
                h.memory_bytes += req.memory_bytes;
                h.gpus.extend(member.gpus.iter().copied());
                tracing::info!(container = %warm, function = %key, node = %member.node, "starting a function container");
                let changes = state.placed(record.clone());
                self.apply(changes)?;
                starts.push(Outbound::Start {
                    node: member.node.clone(),
                    spec: start_spec(&key, &spec, &record),
                    secrets: spec.secrets.clone(),
                });
            }
        }
        // A node hears of a container only once its placement is durable: a restarted
        // coordinator knows every container it started.
        let mut sent = self.inner.resent.lock().unwrap_or_else(|e| e.into_inner());
        if !starts.is_empty() {
            store.commit()?;
            for start in starts {
                if let Outbound::Start { node, spec, .. } = &start
                    && let (Some(warm), Some(&session)) = (spec.owner.warm(), sessions.get(node))
                {
                    sent.insert(warm.clone(), (session, now));
                }
                let _ = self.inner.outbound.send(start);
            }
        }
        // Containers whose last message may not have arrived get it again where their
        // node is up and connected. A placed one's start, in each new session of its node
        // (the coordinator restarted, or the session it went on ended; a node ignores a
        // start it took). A fenced one's stop and a draining one's drain at once, in each
        // new session, and every RESEND_AFTER while they remain (a message lost with a
        // session or timed out on a paused node would otherwise leave the container
        // running for ever).
        sent.retain(|id, _| {
            state.warm_of(id).is_some_and(|w| {
                matches!(
                    w.phase,
                    WarmPhase::Placed | WarmPhase::Fenced | WarmPhase::Draining
                )
            })
        });
        let resend_ms = RESEND_AFTER.as_millis() as u64;
        for w in state.warm() {
            let node = status(&w.node).filter(|s| s.liveness != Liveness::Down);
            let (Some(node), Some(&session)) = (node, sessions.get(&w.node)) else {
                continue;
            };
            let last = sent.get(&w.id).copied();
            let due = match w.phase {
                WarmPhase::Placed => last.is_none_or(|(s, _)| s != session),
                _ => last.is_none_or(|(s, at)| s != session || now.saturating_sub(at) >= resend_ms),
            };
            if !due {
                continue;
            }
            let msg = match w.phase {
                WarmPhase::Placed => {
                    let Some(spec) = state.specs.get(&w.key) else {
                        continue;
                    };
                    Outbound::Start {
                        node: w.node.clone(),
                        spec: start_spec(&w.key, spec, w),
                        secrets: spec.secrets.clone(),
                    }
                }
                WarmPhase::Fenced => Outbound::Stop {
                    node: w.node.clone(),
                    warm: w.id.clone(),
                },
                // On a preempted node it hears the node's deadline (the drain's grace if
                // the notice names none).
                WarmPhase::Draining => Outbound::Drain {
                    node: w.node.clone(),
                    warm: w.id.clone(),
                    preempt_deadline_ms: node
                        .admin
                        .as_ref()
                        .filter(|a| a.mode == AdminMode::Preempt)
                        .map(|a| {
                            a.deadline_ms
                                .unwrap_or(now + DRAIN_GRACE.as_millis() as u64)
                        }),
                },
                _ => continue,
            };
            sent.insert(w.id.clone(), (session, now));
            let _ = self.inner.outbound.send(msg);
        }
        Ok(())
    }
}

/// What one container of `spec` asks of a node, for each acceptable GPU choice in order.
fn requests(spec: &gantry_shared::functions::FunctionSpec) -> Vec<Request> {
    let options = spec.gpu_options();
    if options.is_empty() {
        return vec![request(spec, 0, None)];
    }
    options
        .iter()
        .map(|o| request(spec, o.count, o.model.clone()))
        .collect()
}

/// What one container of `spec` asks of a node.
fn request(
    spec: &gantry_shared::functions::FunctionSpec,
    gpus: u32,
    model: Option<String>,
) -> Request {
    let (pin, shared_volumes) =
        gantry_shared::volumes::placement_needs(&spec.volumes).unwrap_or_default();
    Request {
        nodes: 1,
        cpu_millis: spec.cpu.value().0,
        memory_bytes: spec.memory.value().0,
        gpus,
        gpu_models: model.into_iter().collect(),
        min_gpu_memory_bytes: 0,
        selector: Default::default(),
        spot: true,
        // Two local volumes on different nodes are refused at deploy.
        pin,
        shared_volumes,
    }
}

/// The start of a warm container.
fn start_spec(
    key: &FunctionKey,
    spec: &gantry_shared::functions::FunctionSpec,
    warm: &WarmRecord,
) -> AttemptSpec {
    let mut env: Vec<(String, String)> = spec
        .env
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    env.push(("GANTRY_APP".into(), key.app.to_string()));
    env.push(("GANTRY_FUNCTION".into(), key.function.to_string()));
    env.push(("GANTRY_VERSION".into(), key.version.to_string()));
    env.push(("GANTRY_CONTAINER".into(), warm.id.to_string()));
    AttemptSpec {
        owner: Owner::Function(warm.id.clone()),
        generation: Generation(1),
        image: spec.image.clone(),
        command: spec.command.clone(),
        env,
        cpu_millis: warm.cpu_millis,
        memory_bytes: warm.memory_bytes,
        gpus: warm.gpus.clone(),
        timeout_ms: None,
        secrets: Vec::new(),
        volumes: gantry_shared::volumes::attaches(&spec.volumes),
        code: spec.mounts.clone(),
        function: Some(FunctionRuntime {
            // A web endpoint's container holds up to its `max_concurrency` requests.
            max_inputs: spec
                .web
                .as_ref()
                .map_or(spec.max_inputs, |w| w.max_concurrency),
            startup_timeout_ms: spec.startup_timeout().as_millis() as u64,
            timeout_ms: spec.timeout().as_millis() as u64,
            web: spec.web.as_ref().map(|w| match w.via {
                WebVia::Port => WebRuntime::Port {
                    port: w.port(),
                    // Checked at deploy.
                    readiness: w.probe().unwrap_or(Readiness::Tcp),
                },
                WebVia::RuntimeApi => WebRuntime::RuntimeApi,
            }),
        }),
    }
}

fn app_view(record: &AppRecord, state: &State, metrics: &InputMetrics, now: u64) -> AppView {
    let mut functions = Vec::new();
    for key in state.specs.keys().filter(|k| k.app == record.app) {
        let current = record.active == Some(key.version);
        let mut v = FunctionView {
            name: key.function.clone(),
            version: key.version,
            starting: 0,
            idle: 0,
            busy: 0,
            draining: 0,
            queued: state.queued(key) as u32 + state.web.waiting(key),
            running: state.running(key) as u32 + state.web_running(key),
            desired: 0,
            ended_last_minute: 0,
            p50_ms: None,
            p99_ms: None,
        };
        let recent = metrics.recent(key, now);
        v.ended_last_minute = recent.ended;
        v.p50_ms = recent.p50_ms;
        v.p99_ms = recent.p99_ms;
        for w in state.warm().filter(|w| &w.key == key) {
            match w.phase {
                WarmPhase::Placed | WarmPhase::Started => v.starting += 1,
                WarmPhase::Ready if state.busy(&w.id) > 0 => v.busy += 1,
                WarmPhase::Ready => v.idle += 1,
                WarmPhase::Draining => v.draining += 1,
                WarmPhase::Fenced => {}
            }
        }
        if let Some(spec) = state.specs.get(key) {
            v.desired = autoscale::desired(spec, v.queued + v.running, current);
        }
        let has_any = v.starting + v.idle + v.busy + v.draining + v.queued + v.running > 0
            || recent.ended > 0;
        if current || has_any {
            functions.push(v);
        }
    }
    AppView {
        app: record.app.clone(),
        active_version: record.active,
        versions: record
            .deployments
            .iter()
            .map(|d| VersionSummary {
                version: d.version,
                created_at_ms: d.created_at_ms,
                functions: d.manifest.functions.keys().cloned().collect(),
            })
            .collect(),
        functions,
    }
}

fn input_view(i: &InputRecord) -> InputView {
    let (output, error) = match (&i.result, i.state) {
        (Some(InputResult::Output(p)), InputState::Succeeded) => (Some(p.clone()), None),
        (Some(InputResult::Error(e)), InputState::Failed) => (None, Some(e.clone())),
        _ => (None, None),
    };
    InputView {
        index: i.index,
        id: i.id.clone(),
        state: i.state,
        attempt: i.attempt,
        output,
        error,
        container: i.last.as_ref().map(|(w, _)| w.clone()),
        node: i.last.as_ref().map(|(_, n)| n.clone()),
        timings: i.timings.clone(),
    }
}

fn call_view(call: &CallRecord, inputs: &[InputRecord]) -> CallView {
    let mut succeeded = 0;
    let mut failed = 0;
    let mut cancelled = 0;
    for i in inputs {
        match i.state {
            InputState::Succeeded => succeeded += 1,
            InputState::Failed => failed += 1,
            InputState::Cancelled => cancelled += 1,
            _ => {}
        }
    }
    let ended = succeeded + failed + cancelled;
    let state = if ended < call.inputs || call.open {
        CallState::Running
    } else if call.cancelled {
        CallState::Cancelled
    } else if failed > 0 {
        CallState::Failed
    } else {
        CallState::Succeeded
    };
    CallView {
        id: call.id.clone(),
        app: call.key.app.clone(),
        function: call.key.function.clone(),
        version: call.key.version,
        state,
        created_at_ms: call.created_at_ms,
        inputs: call.inputs,
        succeeded,
        failed,
        open: call.open,
        results: inputs.iter().map(input_view).collect(),
    }
}

/// A function version serving a web endpoint, as the ingress routes to it.
#[derive(Debug, Clone)]
pub struct WebEndpoint {
    pub key: FunctionKey,
    pub spec: FunctionSpec,
    pub web: WebSpec,
}

/// A web request's container: its request counts as in flight there until this drops.
pub struct WebLease {
    service: FunctionService,
    pub warm: WarmId,
    pub node: NodeId,
    /// Where the request's wait for it went (queued, and the container's cold start).
    pub timings: PhaseTimings,
}

impl Drop for WebLease {
    fn drop(&mut self) {
        self.service.web_done(&self.warm);
    }
}

/// Why a web request got no container.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WebWaitError {
    #[error("{waiting} requests already wait for a container of this endpoint")]
    TooMany { waiting: u32 },
    #[error("no container of this endpoint became free in time")]
    Timeout,
}

/// Carries [`Outbound`] messages to nodes until `cancel`, each from its own task; what a
/// node answers goes back to the service (a delivery that found no container, a fence
/// that is gone). The deliveries waiting together for one container go as one `Deliver`.
pub async fn run_router<L: NodeLink>(
    service: FunctionService,
    link: L,
    mut rx: mpsc::UnboundedReceiver<Outbound>,
    cancel: CancellationToken,
) {
    let tasks = TaskTracker::new();
    loop {
        let first = tokio::select! {
            _ = cancel.cancelled() => break,
            m = rx.recv() => match m { Some(m) => m, None => break },
        };
        let mut waiting = vec![first];
        while waiting.len() < ROUTER_GATHER {
            match rx.try_recv() {
                Ok(m) => waiting.push(m),
                Err(_) => break,
            }
        }
        for msg in gather_deliveries(waiting) {
            let service = service.clone();
            let link = link.clone();
            tasks.spawn(async move { send(&service, &link, msg).await });
        }
    }
    tasks.close();
    let _ = tokio::time::timeout(Duration::from_secs(1), tasks.wait()).await;
}

/// Most messages the router takes from its queue before it sends.
const ROUTER_GATHER: usize = 4096;

/// A message the router sends: deliveries for one container gathered in order.
// Moved once from the queue to its send; a box would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
enum Send {
    Deliver {
        node: NodeId,
        warm: WarmId,
        inputs: Vec<LeasedInput>,
    },
    Other(Outbound),
}

/// Gathers the deliveries among `waiting` by container (in their order, in batches a
/// frame holds); every other message keeps its place.
fn gather_deliveries(waiting: Vec<Outbound>) -> Vec<Send> {
    let mut out = Vec::new();
    let mut by_warm: BTreeMap<WarmId, (NodeId, Vec<LeasedInput>)> = BTreeMap::new();
    for msg in waiting {
        match msg {
            Outbound::Deliver(d) => {
                by_warm
                    .entry(d.warm)
                    .or_insert_with(|| (d.node, Vec::new()))
                    .1
                    .push(d.input);
            }
            other => out.push(Send::Other(other)),
        }
    }
    for (warm, (node, inputs)) in by_warm {
        for batch in batches(inputs, |i| i.payload.bytes.len()) {
            out.push(Send::Deliver {
                node: node.clone(),
                warm: warm.clone(),
                inputs: batch,
            });
        }
    }
    out
}

/// Hands `inputs` to container `warm` on `node`; a container its node no longer runs (or
/// that the command did not reach) counts as ended.
async fn deliver<L: NodeLink>(
    service: &FunctionService,
    link: &L,
    node: NodeId,
    warm: WarmId,
    inputs: Vec<LeasedInput>,
) -> Result<(), FunctionServiceError> {
    let cmd = Command::Deliver {
        owner: Owner::Function(warm.clone()),
        generation: Generation(1),
        inputs,
    };
    match link.exchange(&node, cmd).await {
        Ok(CommandReply::Accepted) => Ok(()),
        Ok(CommandReply::NotRunning) => {
            service.delivery_failed(&warm, "its node no longer runs it", true)
        }
        Ok(other) => service.delivery_failed(&warm, &format!("its node answered {other:?}"), false),
        Err(e) => service.delivery_failed(&warm, &e, false),
    }
}

async fn send<L: NodeLink>(service: &FunctionService, link: &L, msg: Send) {
    let grace_ms = DRAIN_GRACE.as_millis() as u64;
    let owner = |w: &WarmId| Owner::Function(w.clone());
    let msg = match msg {
        Send::Deliver { node, warm, inputs } => {
            if let Err(e) = deliver(service, link, node, warm, inputs).await {
                tracing::error!(error = %e, "recording a node's answer failed");
            }
            return;
        }
        Send::Other(msg) => msg,
    };
    let result = match msg {
        Outbound::Deliver(d) => deliver(service, link, d.node, d.warm, vec![d.input]).await,
        Outbound::Start {
            node,
            mut spec,
            secrets,
        } => {
            let warm = spec.owner.warm().cloned();
            match service.inner.store.secrets().resolve(&secrets) {
                Ok(values) => spec.secrets = values,
                Err(e) => {
                    let Some(w) = warm else { return };
                    let why = format!("its start was not sent: {e}");
                    if let Err(e) = service.delivery_failed(&w, &why, true) {
                        tracing::error!(error = %e, "cannot record a start not sent");
                    }
                    return;
                }
            }
            match (link.exchange(&node, Command::Start(spec)).await, warm) {
                (Ok(CommandReply::Accepted), _) | (_, None) => Ok(()),
                // Refused: the node did not take it, so nothing runs there.
                (Ok(other), Some(w)) => {
                    service.delivery_failed(&w, &format!("its start was refused: {other:?}"), true)
                }
                // No answer: it may have started; stopped once the node is reachable.
                (Err(e), Some(w)) => service.delivery_failed(
                    &w,
                    &format!("its start did not reach {node}: {e}"),
                    false,
                ),
            }
        }
        Outbound::Cancel { node, warm, input } => {
            let cmd = Command::CancelInput {
                owner: owner(&warm),
                generation: Generation(1),
                input,
                grace_ms,
            };
            link.exchange(&node, cmd).await.map(|_| ()).or(Ok(()))
        }
        Outbound::Drain {
            node,
            warm,
            preempt_deadline_ms,
        } => {
            let cmd = Command::Drain {
                owner: owner(&warm),
                generation: Generation(1),
                grace_ms: preempt_deadline_ms.map_or(grace_ms, |d| d.saturating_sub(service.now())),
                preempt_deadline_ms,
            };
            match link.exchange(&node, cmd).await {
                Ok(CommandReply::NotRunning) => {
                    service.delivery_failed(&warm, "it is no longer running", true)
                }
                _ => Ok(()),
            }
        }
        Outbound::Stop { node, warm } => {
            let cmd = Command::Stop {
                owner: owner(&warm),
                generation: Generation(1),
                grace_ms: 0,
            };
            match link.exchange(&node, cmd).await {
                Ok(CommandReply::NotRunning) => service.stopped(&warm),
                _ => Ok(()),
            }
        }
    };
    if let Err(e) = result {
        tracing::error!(error = %e, "recording a node's answer failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gantry_shared::calls::Payload;

    fn delivery(node: &str, warm: &str, n: u32) -> Outbound {
        let call = CallId::new("c-1").expect("call");
        Outbound::Deliver(Delivery {
            node: NodeId::new(node).expect("node"),
            warm: WarmId::new(warm).expect("warm"),
            input: LeasedInput {
                id: InputId::of(&call, n),
                call,
                attempt: 1,
                deadline_ms: 1,
                payload: Payload::text("x"),
            },
        })
    }

    #[test]
    fn deliveries_are_gathered_per_container_in_order() {
        let waiting = vec![
            delivery("n1", "w-1", 0),
            delivery("n2", "w-2", 1),
            Outbound::Drain {
                node: NodeId::new("n1").expect("node"),
                warm: WarmId::new("w-3").expect("warm"),
                preempt_deadline_ms: None,
            },
            delivery("n1", "w-1", 2),
            delivery("n1", "w-1", 3),
        ];
        let sends = gather_deliveries(waiting);
        let shape: Vec<String> = sends
            .iter()
            .map(|s| match s {
                Send::Deliver { node, warm, inputs } => format!(
                    "{node}/{warm}:{}",
                    inputs
                        .iter()
                        .map(|i| i.id.as_str().rsplit('-').next().unwrap_or("").to_string())
                        .collect::<Vec<_>>()
                        .join(",")
                ),
                Send::Other(o) => format!("{o:?}")
                    .split_whitespace()
                    .next()
                    .unwrap_or("")
                    .into(),
            })
            .collect();
        assert_eq!(
            shape,
            [
                "Drain",
                "n1/w-1:00000000,00000002,00000003",
                "n2/w-2:00000001"
            ]
        );
    }
}
