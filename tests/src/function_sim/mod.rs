//! The functions layer in one process on a virtual clock: the real coordinator pieces (the
//! store, the [`Reconciler`] with a [`FunctionService`], the service's router) over a
//! [`ChannelLink`] to hundreds of fake agents that follow the agent's contract for function
//! containers (see [`agent`]), with faults to their hosts (crash, partition, stall) on
//! demand. The driver moves time in steps; each step heals faults that are over, lets the
//! containers progress, hands the coordinator the agents' answers and events, makes a
//! reconcile pass when the service asked for one (new demand, a container gone) or every
//! half second as the real loop does, and answers every command the pass and the router
//! sent. It checks at every step that no node holds more than it has and no container
//! more inputs than its `max_inputs`.
//!
//! The service reads the same virtual time ([`FunctionService::open_with_clock`]), so
//! deadlines, retries, start backoffs and scale-down windows run on it. Used by the
//! `function_sim` test and by `gantry-bench functions-sim`. Simulated GPUs say so
//! (`GpuInfo::simulated`).

mod agent;

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};

use gantry_coordinator::functions::FunctionService;
use gantry_coordinator::functions::clock::Clock;
use gantry_coordinator::functions::service::run_router;
use gantry_coordinator::nodes::liveness::{Liveness, NodeStatus};
use gantry_coordinator::reconcile::link::Delivered;
use gantry_coordinator::reconcile::{ChannelLink, Reconciler};
use gantry_coordinator::store::Store;
use gantry_coordinator::store::node_admin::{AdminMode, AdminState};
use gantry_shared::calls::{CallRequest, CallView, Payload};
use gantry_shared::functions::{AppManifest, FunctionView};
use gantry_shared::gossip::{AgentGossip, GpuInfo, NodeResources};
use gantry_shared::protocol::NodeCapacity;
use gantry_shared::{AppName, CallId, FunctionName, InputId, NodeId, WarmId};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use agent::{Agent, Shape};
pub use agent::{FLAKY, Fault};

/// A faulted node is suspect this long, then down (the real view takes about 1.7 s).
pub const DOWN_AFTER_MS: u64 = 2_000;
/// The real reconcile loop's pass when nothing woke it.
pub const PASS_EVERY_MS: u64 = 500;
/// Where the virtual clock starts (unix ms; any time will do).
const EPOCH_MS: u64 = 1_000_000;

/// The simulation's time, shared with the function service.
#[derive(Debug, Clone, Default)]
pub struct VirtualClock(Arc<AtomicU64>);

impl VirtualClock {
    fn set(&self, now: u64) {
        self.0.store(now, Ordering::SeqCst);
    }
}

impl Clock for VirtualClock {
    fn now_ms(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// The simulated cluster and its timing.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Seeds every draw (start delays and run times depend on it and the container's or
    /// input's id only).
    pub seed: u64,
    pub nodes: usize,
    /// What each node offers.
    pub cpu_millis: u64,
    pub memory_bytes: u64,
    /// Simulated GPUs per node.
    pub gpus: u32,
    /// Virtual time per step.
    pub step_ms: u64,
    /// A container's start to its `ready`.
    pub start_ms: Range<u64>,
    /// An input's lease to its answer.
    pub run_ms: Range<u64>,
}

impl SimConfig {
    /// 250 nodes of 8 cores, 32 GiB and no GPU; steps of 50 ms; containers ready 50–500 ms
    /// after their start; inputs answered after 50–1,000 ms.
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            nodes: 250,
            cpu_millis: 8_000,
            memory_bytes: 32 << 30,
            gpus: 0,
            step_ms: 50,
            start_ms: 50..500,
            run_ms: 50..1_000,
        }
    }
}

/// What the driver saw, for the checks of a test.
#[derive(Debug, Default)]
pub struct SimStats {
    /// Containers started on nodes.
    pub starts: usize,
    /// Per drain for scale-down: how long its container had been idle (ms).
    pub drained_idle_ms: Vec<u64>,
    /// Per drain for a preemption: the node, the deadline told and the grace (ms).
    pub preempt_drains: Vec<(NodeId, u64, u64)>,
    /// Answers the containers produced, per input: container and attempt.
    pub produced: HashMap<InputId, Vec<(WarmId, u32)>>,
    /// Broken invariants, with the time.
    pub violations: Vec<String>,
    /// Reconcile passes made.
    pub passes: u64,
}

/// A function's containers and inputs as its service reports them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Placed and not gone: starting, ready or draining.
    pub placed: u32,
    /// Ready (idle or busy).
    pub ready: u32,
    pub queued: u32,
    pub running: u32,
}

impl From<&FunctionView> for Counts {
    fn from(v: &FunctionView) -> Self {
        Counts {
            placed: v.starting + v.idle + v.busy + v.draining,
            ready: v.idle + v.busy,
            queued: v.queued,
            running: v.running,
        }
    }
}

pub struct FunctionSim {
    config: SimConfig,
    shape: Shape,
    now: u64,
    clock: VirtualClock,
    agents: Vec<Agent>,
    index: HashMap<NodeId, usize>,
    link: ChannelLink,
    commands: mpsc::UnboundedReceiver<Delivered>,
    /// The coordinator's service and reconciler (`None` only inside a restart, while the
    /// old ones close the store).
    service: Option<FunctionService>,
    reconciler: Option<Reconciler<ChannelLink>>,
    /// The service's wake-up for the reconciler.
    wake: Arc<Notify>,
    last_pass: Option<u64>,
    sessions: usize,
    cancel: CancellationToken,
    router: tokio::task::JoinHandle<()>,
    pub stats: SimStats,
    /// Keeps the store's directory.
    _dir: tempfile::TempDir,
}

impl FunctionSim {
    /// A cluster of `config.nodes` healthy nodes and an empty coordinator. Call inside a
    /// tokio runtime (the router is a task); the store goes to `/dev/shm` where there is
    /// one, since the simulation measures decisions, not the disk.
    pub fn new(config: SimConfig) -> Self {
        let shm = std::path::Path::new("/dev/shm");
        let dir = if shm.is_dir() {
            tempfile::tempdir_in(shm).or_else(|_| tempfile::tempdir())
        } else {
            tempfile::tempdir()
        }
        .expect("a directory for the simulation's store");
        let store = Store::open(&dir.path().join("db")).expect("store");
        let clock = VirtualClock::default();
        clock.set(EPOCH_MS);
        let wake = Arc::new(Notify::new());
        let cancel = CancellationToken::new();
        let (service, outbound) = FunctionService::open_with_clock(
            store.functions().expect("function store"),
            wake.clone(),
            cancel.clone(),
            Arc::new(clock.clone()),
        )
        .expect("function service");
        let (link, commands) = ChannelLink::new();
        let agents: Vec<Agent> = (0..config.nodes)
            .map(|i| {
                let id = NodeId::new(format!("fsim-{i:04}")).expect("node id");
                link.connect(&id, i + 1);
                Agent::new(id, i + 1)
            })
            .collect();
        let index = agents
            .iter()
            .enumerate()
            .map(|(i, a)| (a.id.clone(), i))
            .collect();
        let router = tokio::spawn(run_router(
            service.clone(),
            link.clone(),
            outbound,
            cancel.clone(),
        ));
        let reconciler = Reconciler::new(store, link.clone(), Some(service.clone()));
        Self {
            shape: Shape {
                seed: config.seed,
                start_ms: config.start_ms.clone(),
                run_ms: config.run_ms.clone(),
            },
            sessions: config.nodes,
            config,
            now: EPOCH_MS,
            clock,
            agents,
            index,
            link,
            commands,
            service: Some(service),
            reconciler: Some(reconciler),
            wake,
            last_pass: None,
            cancel,
            router,
            stats: SimStats::default(),
            _dir: dir,
        }
    }

    /// Virtual time (unix ms).
    pub fn now(&self) -> u64 {
        self.now
    }

    pub fn service(&self) -> &FunctionService {
        self.service.as_ref().expect("the coordinator runs")
    }

    pub fn deploy(&self, manifest: AppManifest) {
        self.service().deploy(manifest).expect("deployed");
    }

    /// Calls `function` of `app` with `inputs` (a map), without waiting; returns the call.
    pub async fn map(&self, app: &AppName, function: &FunctionName, inputs: &[Payload]) -> CallId {
        let request: CallRequest =
            serde_json::from_value(serde_json::json!({"inputs": inputs, "wait": false}))
                .expect("call request");
        let (view, _) = self
            .service()
            .call(app, function, request, None)
            .await
            .expect("call accepted");
        view.id
    }

    pub fn call_view(&self, call: &CallId) -> CallView {
        self.service().call_view(call).expect("call")
    }

    /// The active version of `function` as the service reports it.
    pub fn counts(&self, app: &AppName, function: &FunctionName) -> Counts {
        let view = self.service().app(app).expect("app");
        view.functions
            .iter()
            .filter(|f| &f.name == function && Some(f.version) == view.active_version)
            .map(Counts::from)
            .next()
            .unwrap_or_default()
    }

    /// Nodes where the service still accounts for a container (fenced ones included).
    pub fn nodes_held(&self) -> usize {
        self.service().held().len()
    }

    /// Containers running on the nodes (those of crashed hosts are dead).
    pub fn containers_running(&self) -> usize {
        self.agents.iter().map(|a| a.containers.len()).sum()
    }

    /// Containers running on node `i`.
    pub fn containers_on(&self, i: usize) -> usize {
        self.agents[i].containers.len()
    }

    pub fn nodes(&self) -> usize {
        self.agents.len()
    }

    /// Whether node `i` has a fault now.
    pub fn faulted(&self, i: usize) -> bool {
        self.agents[i].fault.is_some()
    }

    /// Whether any node has a fault now.
    pub fn any_fault(&self) -> bool {
        self.agents.iter().any(|a| a.fault.is_some())
    }

    /// Node `i` gets `fault` from now for `ms`: its session goes at once.
    pub fn fault(&mut self, i: usize, fault: Fault, ms: u64) {
        let agent = &mut self.agents[i];
        if agent.fault.is_some() {
            return;
        }
        agent.fail(fault, self.now, self.now + ms);
        self.link.disconnect(&agent.id);
    }

    /// Node `i` gets a spot-interruption notice: it goes away at `deadline_ms`.
    pub fn preempt(&mut self, i: usize, deadline_ms: u64) {
        self.agents[i].preempted = Some((self.now, deadline_ms));
    }

    /// Node `i`'s id.
    pub fn node_id(&self, i: usize) -> &NodeId {
        &self.agents[i].id
    }

    /// The coordinator is killed right after its next reconcile pass, before the router
    /// sent anything that pass decided (starts, deliveries, drains are lost with it), and
    /// starts again from its store: every node opens a new session.
    pub async fn crash_coordinator_after_a_pass(&mut self) {
        self.advance();
        self.pass(true);
        // The router has not run since the pass (nothing awaited): aborted, it sends none
        // of what the pass queued, and the old service records nothing more.
        self.cancel.cancel();
        let old_router = std::mem::replace(&mut self.router, tokio::spawn(async {}));
        old_router.abort();
        let _ = old_router.await;
        assert!(
            self.commands.try_recv().is_err(),
            "nothing of the last pass reached the link"
        );
        // The old service and reconciler close the store (sled holds a lock on it).
        let db = self._dir.path().join("db");
        let (wake, cancel) = (Arc::new(Notify::new()), CancellationToken::new());
        self.reconciler = None;
        self.service = None;
        let (service, outbound) = {
            let store = Store::open(&db).expect("the store again");
            let (service, outbound) = FunctionService::open_with_clock(
                store.functions().expect("function store"),
                wake.clone(),
                cancel.clone(),
                Arc::new(self.clock.clone()),
            )
            .expect("function service after a restart");
            self.reconciler = Some(Reconciler::new(
                store,
                self.link.clone(),
                Some(service.clone()),
            ));
            (service, outbound)
        };
        self.router = tokio::spawn(run_router(
            service.clone(),
            self.link.clone(),
            outbound,
            cancel.clone(),
        ));
        (self.service, self.wake, self.cancel) = (Some(service), wake, cancel);
        self.last_pass = None;
        for a in &mut self.agents {
            if a.reachable() {
                self.sessions += 1;
                a.session = self.sessions;
                self.link.connect(&a.id, self.sessions);
            }
        }
    }

    /// One step of virtual time.
    pub async fn step(&mut self) {
        self.advance();
        self.pass(false);
        self.exchange().await;
        self.check();
    }

    /// Moves time one step: faults that are over heal, containers progress, the agents'
    /// reports reach the coordinator.
    fn advance(&mut self) {
        self.now += self.config.step_ms;
        self.clock.set(self.now);
        let now = self.now;
        for i in 0..self.agents.len() {
            if self.agents[i]
                .fault
                .is_some_and(|(_, _, until)| until <= now)
            {
                self.sessions += 1;
                let agent = &mut self.agents[i];
                agent.heal(now, self.sessions);
                self.link.connect(&agent.id, self.sessions);
            }
        }
        for a in &mut self.agents {
            a.progress(now);
        }
        self.deliver_reports();
    }

    /// A reconcile pass if the service asked for one or one is due (or `now`).
    fn pass(&mut self, now_anyway: bool) {
        let now = self.now;
        let due = now_anyway || self.last_pass.is_none_or(|t| now >= t + PASS_EVERY_MS);
        if take_wake(&self.wake) || due {
            let statuses: Vec<NodeStatus> = self
                .agents
                .iter()
                .map(|a| status(a, &self.config, now))
                .collect();
            self.reconciler
                .as_mut()
                .expect("the coordinator runs")
                .pass(&statuses, now)
                .expect("reconcile pass");
            self.last_pass = Some(now);
            self.stats.passes += 1;
        }
    }

    /// Steps until `done` holds (checked after each step) or `limit_ms` of virtual time
    /// passed; returns whether it held.
    pub async fn step_until(&mut self, limit_ms: u64, mut done: impl FnMut(&Self) -> bool) -> bool {
        let end = self.now + limit_ms;
        while self.now < end {
            self.step().await;
            if done(self) {
                return true;
            }
        }
        false
    }

    /// The reachable agents' answers (one batch per node, as the agent sends them), then
    /// their events, made durable with one commit before any is acknowledged.
    fn deliver_reports(&mut self) {
        let service = self.service.as_ref().expect("the coordinator runs");
        for a in self.agents.iter_mut().filter(|a| a.reachable()) {
            if !a.outputs.is_empty() {
                let outputs = std::mem::take(&mut a.outputs);
                for o in &outputs {
                    if let Some(w) = o.owner.warm() {
                        self.stats
                            .produced
                            .entry(o.input.clone())
                            .or_default()
                            .push((w.clone(), o.attempt));
                    }
                }
                service
                    .on_outputs(&a.id, outputs)
                    .expect("outputs recorded");
            }
        }
        let mut acked = Vec::new();
        for (i, a) in self.agents.iter().enumerate() {
            if a.reachable() && !a.events.is_empty() {
                for e in &a.events {
                    self.service().on_event(e).expect("event recorded");
                }
                acked.push(i);
            }
        }
        self.service().commit().expect("commit");
        for i in acked {
            self.agents[i].events.clear();
        }
    }

    /// Lets the router and the command tasks run and answers what they sent, until a few
    /// rounds bring nothing new (an answer can make the service send more).
    async fn exchange(&mut self) {
        let mut quiet = 0;
        for _ in 0..64 {
            for _ in 0..4 {
                tokio::task::yield_now().await;
            }
            if self.answer_commands() == 0 {
                quiet += 1;
                if quiet == 3 {
                    break;
                }
            } else {
                quiet = 0;
            }
        }
    }

    /// Answers every command that arrived; an unreachable node drops it (its sender sees an
    /// error at once, as from a dead session).
    fn answer_commands(&mut self) -> usize {
        let mut n = 0;
        while let Ok(d) = self.commands.try_recv() {
            n += 1;
            let Some(&i) = self.index.get(&d.node) else {
                continue;
            };
            let agent = &mut self.agents[i];
            if !agent.reachable() {
                continue;
            }
            let (reply, noted) = agent.handle(d.command, self.now, &self.shape);
            self.stats.starts += usize::from(noted.started);
            self.stats.drained_idle_ms.extend(noted.drained_idle_ms);
            if let Some((deadline, grace)) = noted.preempt {
                self.stats
                    .preempt_drains
                    .push((d.node.clone(), deadline, grace));
            }
            if let Some(v) = noted.violation {
                self.stats.violations.push(format!("t={}: {v}", self.now));
            }
            let _ = d.reply.send(reply);
        }
        n
    }

    fn check(&mut self) {
        let c = &self.config;
        for a in &self.agents {
            if let Some(v) = a.overcommitted(c.cpu_millis, c.memory_bytes, c.gpus) {
                self.stats.violations.push(format!("t={}: {v}", self.now));
            }
        }
    }

    /// Stops the router.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        let _ = self.router.await;
    }
}

/// Whether the service asked for a pass since the last look (takes the wake-up).
fn take_wake(wake: &Notify) -> bool {
    let notified = pin!(wake.notified());
    matches!(
        notified.poll(&mut Context::from_waker(Waker::noop())),
        Poll::Ready(())
    )
}

/// Node `a` as the cluster view reports it at `now`.
fn status(a: &Agent, c: &SimConfig, now: u64) -> NodeStatus {
    let liveness = match a.fault {
        None => Liveness::Up,
        Some((_, since, _)) if now < since + DOWN_AFTER_MS => Liveness::Suspect,
        Some(_) => Liveness::Down,
    };
    let capacity = NodeCapacity {
        cpu_millis: c.cpu_millis,
        memory_bytes: c.memory_bytes,
        gpus: c.gpus,
        shared_volumes: false,
    };
    let n = a.session as u32;
    NodeStatus {
        id: a.id.clone(),
        liveness,
        reason: "",
        since_ms: 0,
        last_seen_ms: Some(now),
        connected: a.reachable(),
        capacity: Some(capacity),
        gossip: Some(AgentGossip {
            addr: std::net::IpAddr::from([10, (n >> 16) as u8, (n >> 8) as u8, n as u8]),
            labels: BTreeMap::new(),
            resources: NodeResources {
                cpu_millis: capacity.cpu_millis,
                free_cpu_millis: capacity.cpu_millis,
                memory_bytes: capacity.memory_bytes,
                free_memory_bytes: capacity.memory_bytes,
            },
            free_gpus: Vec::new(),
            gpus: (0..c.gpus)
                .map(|g| GpuInfo::simulated(a.id.as_str(), g, "H100-80GB", 80 << 30))
                .collect(),
            images: Default::default(),
        }),
        gossip_error: None,
        admin: a.preempted.map(|(since_ms, deadline)| AdminState {
            mode: AdminMode::Preempt,
            since_ms,
            deadline_ms: Some(deadline),
        }),
    }
}
