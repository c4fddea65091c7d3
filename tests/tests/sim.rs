//! The real coordinator (job store, reconciler, placement, job transitions) against
//! hundreds of fake agents in one process, on a virtual clock, with a seeded schedule of
//! faults: hosts that crash (their containers die; on return the agent reports them lost),
//! partitions (containers keep running, events wait, the session is gone) and stalls
//! (nothing on the host moves). The fake agents follow the agent's contract: a start per
//! generation, stale generations refused, a stop answered `not_running` when nothing runs,
//! events sequenced and replayed until acknowledged.
//!
//! Checked at every step: no GPU is held by two containers on a node, and no job runs two
//! generations on nodes that have been healthy for a while (fencing settled). At the end:
//! every job ended as its kind must, and nothing runs.
//!
//! `GANTRY_SIM_SEED=N` replays a run (the seed is printed); `GANTRY_SIM_NODES` and
//! `GANTRY_SIM_JOBS` size it (500 nodes, 10,000 jobs by default).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Instant;

use gantry_coordinator::jobs;
use gantry_coordinator::nodes::liveness::{Liveness, NodeStatus};
use gantry_coordinator::reconcile::link::Delivered;
use gantry_coordinator::reconcile::{ChannelLink, Reconciler};
use gantry_coordinator::store::Store;
use gantry_shared::api::{JobSpec, JobState};
use gantry_shared::gossip::{AgentGossip, GpuInfo, NodeResources};
use gantry_shared::protocol::{Command, CommandReply, Event, NodeCapacity, SequencedEvent};
use gantry_shared::{EndCause, Generation, JobId, NodeId, Owner};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde_json::json;

/// Virtual time per step.
const STEP_MS: u64 = 100;
/// A faulted node is suspect this long, then down (the real view takes about 1.7 s).
const DOWN_AFTER_MS: u64 = 2_000;
/// A node healthy for this long has had its fences delivered and obeyed.
const SETTLED_MS: u64 = 3_000;
/// Enough that the cluster is busy but rarely full: a full cluster makes every pass
/// explain why each waiting job waits, which measures the engine, not the reconciler.
const GPUS_PER_NODE: u32 = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Exits 0.
    Ok,
    /// Two nodes with one GPU each; every member exits 0.
    Gang,
    /// Exits 1 in its first generation, 0 after (one retry).
    FailOnce,
    /// Always exits 7 (one retry, then failed with 7).
    Fail,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Crash,
    Partition,
    Stall,
}

struct Container {
    gpus: Vec<u32>,
    ends_at: u64,
    exit: i32,
    /// Set by a stop: the exit is reported as stopped.
    stopped: bool,
}

struct FakeAgent {
    id: NodeId,
    /// A fault and when it ends; `since` is when it began.
    fault: Option<(Fault, u64, u64)>,
    /// When it last became healthy.
    healthy_since: u64,
    session: usize,
    marks: HashMap<JobId, Generation>,
    running: BTreeMap<(JobId, Generation), Container>,
    outbox: Vec<SequencedEvent>,
    next_seq: u64,
}

impl FakeAgent {
    fn push(&mut self, event: Event) {
        self.next_seq += 1;
        self.outbox.push(SequencedEvent {
            seq: self.next_seq,
            event,
        });
    }

    fn reachable(&self) -> bool {
        self.fault.is_none()
    }

    /// `failures`: how many generations of the job failed so far, as the coordinator
    /// counted them (a job that fails once fails in its first generation that runs to its
    /// end, wherever earlier ones were lost).
    fn handle(
        &mut self,
        command: Command,
        now: u64,
        failures: impl Fn(&JobId) -> u32,
    ) -> CommandReply {
        match command {
            Command::Start(spec) => {
                let Some(job) = spec.owner.job().cloned() else {
                    return CommandReply::Refused(gantry_shared::protocol::Refusal::new(
                        gantry_shared::protocol::RefusalCode::Unavailable,
                        "the simulated agents run jobs only",
                    ));
                };
                let mark = self.marks.get(&job).copied().unwrap_or_default();
                if spec.generation < mark {
                    return CommandReply::Refused(gantry_shared::protocol::Refusal::new(
                        gantry_shared::protocol::RefusalCode::StaleGeneration,
                        "stale",
                    ));
                }
                if spec.generation == mark {
                    return CommandReply::Accepted;
                }
                self.marks.insert(job.clone(), spec.generation);
                // Older generations of the job still here are stopped at once.
                for (_, c) in self
                    .running
                    .iter_mut()
                    .filter(|((j, g), _)| *j == job && *g < spec.generation)
                {
                    c.ends_at = now;
                    c.stopped = true;
                }
                let env: HashMap<&str, &str> = spec
                    .env
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                let ms: u64 = env
                    .get("SIM_MS")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(500);
                let exit = match env.get("SIM_KIND").copied() {
                    Some("fail") => 7,
                    Some("fail_once") if failures(&job) == 0 => 1,
                    _ => 0,
                };
                self.running.insert(
                    (job.clone(), spec.generation),
                    Container {
                        gpus: spec.gpus.clone(),
                        ends_at: now + ms,
                        exit,
                        stopped: false,
                    },
                );
                self.push(Event::Started {
                    owner: spec.owner,
                    generation: spec.generation,
                    at_ms: now,
                    image_ms: 0,
                });
                CommandReply::Accepted
            }
            Command::Stop {
                owner,
                generation,
                grace_ms,
            } => {
                let Some(job) = owner.job().cloned() else {
                    return CommandReply::NotRunning;
                };
                match self.running.get_mut(&(job, generation)) {
                    Some(c) => {
                        c.ends_at = c.ends_at.min(now + grace_ms.min(300));
                        c.stopped = true;
                        CommandReply::Accepted
                    }
                    None => CommandReply::NotRunning,
                }
            }
            _ => CommandReply::Accepted,
        }
    }

    /// Containers whose time has come exit.
    fn progress(&mut self, now: u64) {
        let done: Vec<(JobId, Generation)> = self
            .running
            .iter()
            .filter(|(_, c)| c.ends_at <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for key in done {
            let Some(c) = self.running.remove(&key) else {
                continue;
            };
            let (exit_code, signal, cause) = if c.stopped {
                (None, Some(15), EndCause::Stopped)
            } else {
                (Some(c.exit), None, EndCause::Exited)
            };
            self.push(Event::Exited {
                owner: Owner::Job(key.0),
                generation: key.1,
                exit_code,
                signal,
                cause,
                message: cause.label(),
                at_ms: now,
            });
        }
    }

    fn status(&self, now: u64) -> NodeStatus {
        let liveness = match self.fault {
            None => Liveness::Up,
            Some((_, since, _)) if now < since + DOWN_AFTER_MS => Liveness::Suspect,
            Some(_) => Liveness::Down,
        };
        let capacity = NodeCapacity {
            cpu_millis: 8_000,
            memory_bytes: 64 << 30,
            gpus: GPUS_PER_NODE,
            shared_volumes: false,
        };
        let n = self.session as u32;
        NodeStatus {
            id: self.id.clone(),
            liveness,
            reason: "",
            since_ms: 0,
            last_seen_ms: Some(now),
            connected: self.reachable(),
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
                gpus: (0..GPUS_PER_NODE)
                    .map(|g| GpuInfo::simulated(self.id.as_str(), g, "H100-80GB", 80 << 30))
                    .collect(),
                images: Default::default(),
            }),
            gossip_error: None,
            admin: None,
        }
    }
}

fn env_number(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

fn spec(kind: Kind, rng: &mut StdRng) -> JobSpec {
    // Half end within a fault's length, half outlive it: a node that comes back still runs
    // them, and only its fences stop them.
    let ms = if rng.random_bool(0.5) {
        rng.random_range(200..3_000u64)
    } else {
        rng.random_range(3_000..10_000u64)
    }
    .to_string();
    let (name, nodes, gpus, retries) = match kind {
        Kind::Ok => ("ok", 1, rng.random_range(0..=1u32), 0),
        Kind::Gang => ("gang", 2, 1, 0),
        Kind::FailOnce => ("fail_once", 1, 0, 1),
        Kind::Fail => ("fail", 1, 0, 1),
    };
    let cpu = if gpus > 0 { "1" } else { "100m" };
    serde_json::from_value(json!({
        "name": name, "image": "sim",
        "env": {"SIM_KIND": name, "SIM_MS": ms},
        "nodes": nodes, "retries": retries, "backoff": {"initial": "200ms"},
        "resources": {"cpu": cpu, "memory": "256M", "gpus": gpus},
    }))
    .expect("spec")
}

fn kind(rng: &mut StdRng) -> Kind {
    match rng.random_range(0..20) {
        0..=13 => Kind::Ok,
        14..=15 => Kind::Gang,
        16..=17 => Kind::FailOnce,
        _ => Kind::Fail,
    }
}

struct Sim {
    now: u64,
    agents: Vec<FakeAgent>,
    link: ChannelLink,
    commands: tokio::sync::mpsc::UnboundedReceiver<Delivered>,
    store: Store,
    sessions: usize,
    violations: Vec<String>,
}

impl Sim {
    /// Answers every command that arrived; an unreachable node drops it (the sender sees
    /// an error at once, as a dead session gives).
    fn deliver_commands(&mut self) {
        let index: HashMap<NodeId, usize> = self
            .agents
            .iter()
            .enumerate()
            .map(|(i, a)| (a.id.clone(), i))
            .collect();
        while let Ok(d) = self.commands.try_recv() {
            let Some(&i) = index.get(&d.node) else {
                continue;
            };
            let agent = &mut self.agents[i];
            if !agent.reachable() {
                continue;
            }
            let store = &self.store;
            let failures = |job: &JobId| store.job(job).map(|j| j.failures).unwrap_or(0);
            let reply = agent.handle(d.command, self.now, failures);
            let _ = d.reply.send(reply);
        }
    }

    /// Every reachable agent's events, applied as the control plane does, made durable
    /// with one commit before any is acknowledged.
    fn deliver_events(&mut self) {
        let now = self.now;
        let mut acks = Vec::new();
        for (i, agent) in self.agents.iter().enumerate() {
            if !agent.reachable() || agent.outbox.is_empty() {
                continue;
            }
            let node = &agent.id;
            let upto = self
                .store
                .apply_node_events_deferred(node, &agent.outbox, |job, event| {
                    jobs::apply(job, node, event, now)
                })
                .expect("events applied");
            acks.push((i, upto));
        }
        self.store.commit().expect("commit");
        for (i, upto) in acks {
            self.agents[i].outbox.retain(|e| e.seq > upto);
        }
    }

    fn fault(&mut self, i: usize, fault: Fault, until: u64) {
        let now = self.now;
        let agent = &mut self.agents[i];
        agent.fault = Some((fault, now, until));
        self.link.disconnect(&agent.id);
        if fault == Fault::Crash {
            // The host's processes die with it; its disk (marks, outbox, container
            // records) survives.
            for c in agent.running.values_mut() {
                c.ends_at = u64::MAX;
            }
        }
    }

    fn heal(&mut self, i: usize) {
        let now = self.now;
        self.sessions += 1;
        let session = self.sessions;
        let agent = &mut self.agents[i];
        let Some((fault, since, _)) = agent.fault.take() else {
            return;
        };
        match fault {
            Fault::Crash => {
                // The restarted agent finds containers whose shims are gone.
                let lost: Vec<(JobId, Generation)> = agent.running.keys().cloned().collect();
                agent.running.clear();
                for (job, generation) in lost {
                    agent.push(Event::Exited {
                        owner: Owner::Job(job),
                        generation,
                        exit_code: None,
                        signal: None,
                        cause: EndCause::ShimLost,
                        message: EndCause::ShimLost.label(),
                        at_ms: now,
                    });
                }
            }
            // Nothing on the host moved while it was stopped.
            Fault::Stall => {
                for c in agent.running.values_mut() {
                    c.ends_at = c.ends_at.saturating_add(now - since);
                }
            }
            Fault::Partition => {}
        }
        agent.session = session;
        agent.healthy_since = now;
        self.link.connect(&agent.id, session);
    }

    fn check(&mut self) {
        for a in &self.agents {
            let mut held = BTreeSet::new();
            for ((job, g), c) in &a.running {
                for gpu in &c.gpus {
                    if !held.insert(*gpu) {
                        self.violations.push(format!(
                            "t={} GPU {gpu} of {} held twice (job {job} generation {g})",
                            self.now, a.id
                        ));
                    }
                }
            }
        }
        let mut generations: HashMap<&JobId, BTreeSet<Generation>> = HashMap::new();
        for a in self
            .agents
            .iter()
            .filter(|a| a.fault.is_none() && self.now >= a.healthy_since + SETTLED_MS)
        {
            for ((job, g), c) in &a.running {
                if !c.stopped {
                    generations.entry(job).or_default().insert(*g);
                }
            }
        }
        for (job, gs) in generations.into_iter().filter(|(_, gs)| gs.len() > 1) {
            self.violations.push(format!(
                "t={} job {job} runs generations {gs:?} on settled nodes",
                self.now
            ));
        }
    }
}

#[tokio::test(flavor = "current_thread")]
async fn the_coordinator_survives_a_seeded_schedule_of_faults_across_hundreds_of_nodes() {
    let seed = env_number("GANTRY_SIM_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    let nodes = env_number("GANTRY_SIM_NODES").unwrap_or(500) as usize;
    let total = env_number("GANTRY_SIM_JOBS").unwrap_or(10_000) as usize;
    eprintln!("sim seed: {seed} (replay with GANTRY_SIM_SEED={seed}); {nodes} nodes, {total} jobs");
    let mut rng = StdRng::seed_from_u64(seed);
    let started = Instant::now();

    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(&dir.path().join("db")).expect("store");
    let (link, commands) = ChannelLink::new();
    let agents: Vec<FakeAgent> = (0..nodes)
        .map(|i| {
            let id = NodeId::new(format!("sim-{i:04}")).expect("id");
            link.connect(&id, i + 1);
            FakeAgent {
                id,
                fault: None,
                healthy_since: 0,
                session: i + 1,
                marks: HashMap::new(),
                running: BTreeMap::new(),
                outbox: Vec::new(),
                next_seq: 0,
            }
        })
        .collect();
    let mut sim = Sim {
        now: 1_000_000,
        agents,
        link: link.clone(),
        commands,
        store: store.clone(),
        sessions: nodes,
        violations: Vec::new(),
    };
    for a in &mut sim.agents {
        a.healthy_since = sim.now;
    }
    let mut reconciler = Reconciler::new(store.clone(), link, None);

    let mut kinds: HashMap<JobId, Kind> = HashMap::new();
    let per_step = 100;
    let mut submitted = 0;
    let mut faults = 0;
    let mut steps = 0u64;
    let max_steps = 5_000;
    loop {
        steps += 1;
        assert!(
            steps < max_steps,
            "seed {seed}: not done after {max_steps} steps ({} jobs still active)",
            store.active_jobs().map(|j| j.len()).unwrap_or(0)
        );
        sim.now += STEP_MS;
        // Submissions, a batch per step, with group commit across writers.
        if submitted < total {
            let batch: Vec<(Kind, JobSpec)> = (0..per_step.min(total - submitted))
                .map(|_| {
                    let k = kind(&mut rng);
                    (k, spec(k, &mut rng))
                })
                .collect();
            submitted += batch.len();
            let created: Vec<(Kind, JobId)> = std::thread::scope(|s| {
                let handles: Vec<_> = batch
                    .chunks(per_step.div_ceil(8))
                    .map(|chunk| {
                        let store = &store;
                        s.spawn(move || {
                            chunk
                                .iter()
                                .map(|(k, spec)| {
                                    let (job, _) = store
                                        .create_job(spec.clone(), 0, None)
                                        .expect("job created");
                                    (*k, job.id)
                                })
                                .collect::<Vec<_>>()
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .flat_map(|h| h.join().expect("writer"))
                    .collect()
            });
            kinds.extend(created.into_iter().map(|(k, id)| (id, k)));
        }
        // Faults while jobs are still arriving, then only healing.
        if submitted < total && rng.random_range(0..4) == 0 {
            let i = rng.random_range(0..nodes);
            if sim.agents[i].fault.is_none() {
                let fault = [Fault::Crash, Fault::Partition, Fault::Stall][rng.random_range(0..3)];
                let until = sim.now + rng.random_range(1_000..6_000);
                sim.fault(i, fault, until);
                faults += 1;
            }
        }
        for i in 0..nodes {
            if sim.agents[i]
                .fault
                .is_some_and(|(_, _, until)| until <= sim.now)
            {
                sim.heal(i);
            }
        }
        for a in sim.agents.iter_mut() {
            match a.fault {
                None | Some((Fault::Partition, _, _)) => a.progress(sim.now),
                _ => {}
            }
        }
        sim.deliver_events();
        let statuses: Vec<NodeStatus> = sim.agents.iter().map(|a| a.status(sim.now)).collect();
        reconciler.pass(&statuses, sim.now).expect("pass");
        // Let the command tasks hand their commands over, answer them, and let the
        // answers come back.
        for _ in 0..3 {
            tokio::task::yield_now().await;
            sim.deliver_commands();
        }
        tokio::task::yield_now().await;
        sim.check();
        if submitted == total
            && sim
                .agents
                .iter()
                .all(|a| a.fault.is_none() && a.running.is_empty())
            && store.active_jobs().expect("active").is_empty()
        {
            break;
        }
    }
    assert!(
        sim.violations.is_empty(),
        "seed {seed}: {} violations, first: {:#?}",
        sim.violations.len(),
        &sim.violations[..sim.violations.len().min(5)]
    );
    let mut wrong = Vec::new();
    for (id, kind) in &kinds {
        let job = store.job(id).expect("job");
        let ok = match kind {
            Kind::Ok | Kind::Gang => job.state == JobState::Succeeded,
            Kind::FailOnce => job.state == JobState::Succeeded && job.failures == 1,
            Kind::Fail => job.state == JobState::Failed && job.exit_code() == Some(7),
        };
        if !ok {
            wrong.push(format!("{kind:?} {id}: {:?} ({:?})", job.state, job.reason));
        }
    }
    assert!(
        wrong.is_empty(),
        "seed {seed}: {} jobs ended wrongly, e.g. {:#?}",
        wrong.len(),
        &wrong[..wrong.len().min(5)]
    );
    eprintln!(
        "sim: {total} jobs on {nodes} nodes with {faults} faults in {steps} steps ({:.1} s of virtual time) took {:.1} s",
        (steps * STEP_MS) as f64 / 1000.0,
        started.elapsed().as_secs_f64()
    );
}
