//! The scheduling loop. Each pass:
//! 0. takes the live members off nodes that are down (*lost*), being preempted, or past
//!    their drain deadline: their job goes back to pending (not counted against its
//!    retries), their siblings are stopped, and a fence is recorded so the node stops them
//!    as soon as it is reachable (`fence_returning`; SIGTERM and a grace bounded by a
//!    preemption's deadline, or at once for a node that was down);
//! 1. sends again every start a node has not confirmed, once per session of that node;
//! 2. stops the members still running of jobs that are no longer running (cancelled, or
//!    whose generation failed because one gang member failed);
//! 3. hands the pending jobs whose previous generation has fully ended to the placement
//!    engine's queue (`engine::queue::schedule`, pure), over the placeable nodes of the
//!    cluster view and the ledger of live members;
//! 4. records each placement (every member of the new generation, with its rank,
//!    address and rank 0's `MASTER_PORT`) before any node hears of it, then sends each
//!    member its start with the rank environment (`ranks`).
//!
//! It wakes when nodes connect or change, jobs are submitted, or events arrive, and every
//! half second. Commands to nodes (starts, stops, fences) go out from their own tasks and
//! are never awaited by the pass: a node that died unnoticed holds up only its own
//! commands (until the QUIC idle timeout or the command timeout), never the placement of
//! other work. What came of them (a start not delivered, a stop that did not go out, a
//! fence's answer) comes back as an [`Outcome`] and is applied at the start of a pass.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::time::Duration;

use gantry_shared::api::{Attempt, Job, JobState};
use gantry_shared::now_ms;
use gantry_shared::protocol::{AttemptSpec, Command, CommandReply};
use gantry_shared::{CpuMillis, JobId, NodeId, parse_memory};
use tokio_util::sync::CancellationToken;

use crate::admin::AdminMode;
use crate::cluster::{Cluster, Liveness, NodeStatus};
use crate::engine::queue::{self, Pending};
use crate::engine::{Assignment, Engine, NodeInfo, Request};
use crate::jobs;
use crate::nodes::Nodes;
use crate::ranks;
use crate::store::{Fence, Store, StoreError};

const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
/// Grace between SIGTERM and SIGKILL when a job is cancelled or its generation failed.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// How long GPUs of an attempt stopped for a GPU fault stay out of placement on the
/// coordinator's own word (gossip says it within a second).
const FAULT_HOLD_MS: u64 = 30_000;

/// A member's identity across passes: job, generation, node.
type MemberKey = (JobId, u64, NodeId);

/// What became of a command sent by its own task, for the next pass.
enum Outcome {
    /// A start the node did not take, or did not answer.
    Undelivered {
        job: JobId,
        node: NodeId,
        generation: u64,
        error: String,
    },
    /// A stop of a member of a finished job did not go out: the next pass tries again.
    StopFailed(MemberKey),
    /// The node's answer to the stop of a member taken off it.
    Fenced {
        key: MemberKey,
        reply: Result<CommandReply, String>,
    },
}

/// The scheduler's memory between passes, and where command tasks report.
struct Passes {
    /// Stops sent for members of jobs that are no longer running.
    stopping: HashSet<MemberKey>,
    /// Starts sent, per node session: a node that reconnects gets unconfirmed starts
    /// again (agents treat a repeated start of the same generation as a no-op).
    delivered: HashSet<(MemberKey, usize)>,
    /// Fence stops sent, per node session.
    fenced: HashSet<(MemberKey, usize)>,
    outcomes: tokio::sync::mpsc::UnboundedSender<Outcome>,
}

pub async fn run(store: Store, nodes: Nodes, cluster: Cluster, cancel: CancellationToken) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut passes = Passes {
        stopping: HashSet::new(),
        delivered: HashSet::new(),
        fenced: HashSet::new(),
        outcomes: tx,
    };
    let mut outcomes = Vec::new();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = nodes.changed.notified() => {}
            Some(o) = rx.recv() => outcomes.push(o),
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        while let Ok(o) = rx.try_recv() {
            outcomes.push(o);
        }
        if let Err(e) = tick(&store, &nodes, &cluster, &mut passes, &mut outcomes) {
            tracing::error!(error = %e, "scheduling pass failed");
        }
    }
}

/// What a job asks of each of its nodes.
pub fn request(job: &Job) -> Request {
    let r = &job.spec.resources;
    // Validated at submission; should a stored spec not parse, ask for a core and 512 MiB.
    Request {
        nodes: job.spec.nodes,
        cpu_millis: r.cpu.parse::<CpuMillis>().map(|c| c.0).unwrap_or(1000),
        memory_bytes: parse_memory(&r.memory).unwrap_or(512 << 20),
        gpus: r.gpus,
        gpu_models: r.gpu_types.clone(),
        min_gpu_memory_bytes: r
            .gpu_memory
            .as_deref()
            .and_then(|m| parse_memory(m).ok())
            .unwrap_or(0),
        selector: job.spec.selector.clone(),
        spot: job.spec.spot,
    }
}

/// A node as the engine sees it. Only the GPUs the node declared on its session count.
pub fn node_info(s: &NodeStatus) -> Option<NodeInfo> {
    let capacity = s.capacity?;
    let gossip = s.gossip.as_ref()?;
    Some(NodeInfo {
        id: s.id.clone(),
        cpu_millis: capacity.cpu_millis,
        memory_bytes: capacity.memory_bytes,
        labels: gossip.labels.clone(),
        gpus: gossip
            .gpus
            .iter()
            .filter(|g| g.index < capacity.gpus)
            .cloned()
            .collect(),
    })
}

/// The ledger: per node, what live members of `jobs` hold, and what members taken off a
/// node but not yet known to have stopped there (`fences`) still hold.
pub fn ledger<'a>(
    jobs: impl IntoIterator<Item = &'a Job>,
    fences: &[(NodeId, JobId, u64, Fence)],
) -> BTreeMap<NodeId, Held> {
    let now = now_ms();
    let mut held: BTreeMap<NodeId, Held> = BTreeMap::new();
    for (node, job, _, fence) in fences {
        let h = held.entry(node.clone()).or_default();
        h.cpu_millis += fence.cpu_millis;
        h.memory_bytes += fence.memory_bytes;
        h.gpus.extend(fence.gpus.iter().copied());
        h.jobs.insert(job.clone());
    }
    for job in jobs {
        let r = request(job);
        // A GPU an agent stopped an attempt for (`gpu_xid_79`) is avoided at once, for
        // FAULT_HOLD: gossip marks it unhealthy a few rounds later (and an operator's
        // clear must not be held up for long).
        for m in job.attempts.iter().filter(|m| {
            m.reason.as_deref().is_some_and(|r| r.starts_with("gpu_"))
                && m.ended_at_ms
                    .is_some_and(|t| now.saturating_sub(t) < FAULT_HOLD_MS)
        }) {
            let h = held.entry(m.node.clone()).or_default();
            h.faulty.extend(m.gpus.iter().copied());
        }
        for m in jobs::live(job) {
            let h = held.entry(m.node.clone()).or_default();
            h.cpu_millis += r.cpu_millis;
            h.memory_bytes += r.memory_bytes;
            h.gpus.extend(m.gpus.iter().copied());
            if m.rank == 0
                && let Some(p) = m.master_port
            {
                h.ports.insert(p);
            }
            h.jobs.insert(job.id.clone());
        }
    }
    held
}

/// What live members hold on one node.
#[derive(Debug, Clone, Default)]
pub struct Held {
    pub cpu_millis: u64,
    pub memory_bytes: u64,
    pub gpus: BTreeSet<u32>,
    /// `MASTER_PORT`s of generations whose rank 0 is here.
    pub ports: BTreeSet<u16>,
    /// GPUs the node stopped an attempt for because they failed (until gossip says so).
    pub faulty: BTreeSet<u32>,
    pub jobs: BTreeSet<JobId>,
}

/// An engine over the placeable nodes of `statuses` with `held` reserved; with `as_built`,
/// over every node whose capacity is known, as if all were up and every GPU healthy (what
/// the cluster could ever offer: GPU health can be cleared, nodes come back).
pub fn engine(statuses: &[NodeStatus], held: &BTreeMap<NodeId, Held>, as_built: bool) -> Engine {
    let nodes: Vec<NodeInfo> = statuses
        .iter()
        .filter(|s| as_built || s.placeable())
        .filter_map(node_info)
        .map(|mut n| {
            if as_built {
                for g in &mut n.gpus {
                    g.health = gantry_shared::gossip::GpuHealth::Healthy;
                }
            }
            n
        })
        .collect();
    Engine::new(
        nodes,
        held.iter().map(|(id, h)| {
            (
                id.clone(),
                h.cpu_millis,
                h.memory_bytes,
                h.gpus.union(&h.faulty).copied().collect::<Vec<u32>>(),
            )
        }),
    )
}

fn tick(
    store: &Store,
    nodes: &Nodes,
    cluster: &Cluster,
    passes: &mut Passes,
    outcomes: &mut Vec<Outcome>,
) -> Result<(), StoreError> {
    apply_outcomes(store, passes, std::mem::take(outcomes))?;
    let statuses = cluster.statuses();
    evict(store, &statuses)?;
    fence_returning(store, nodes, &statuses, passes)?;
    let active = store.active_jobs()?;
    resend_unconfirmed(&active, nodes, passes);
    stop_leftovers(&active, nodes, passes);
    let placed = place_pending(store, &statuses, &active)?;
    for job in &placed {
        let current = jobs::current(job);
        for m in &current {
            let key = (job.id.clone(), m.generation, m.node.clone());
            if let Some(session) = nodes.get(&m.node) {
                passes.delivered.insert((key, session.conn.stable_id()));
            }
            spawn_start(nodes, &passes.outcomes, job, &current, m);
        }
    }
    Ok(())
}

/// Sends a member its start from a task of its own; a failure comes back as
/// [`Outcome::Undelivered`].
fn spawn_start(
    nodes: &Nodes,
    outcomes: &tokio::sync::mpsc::UnboundedSender<Outcome>,
    job: &Job,
    members: &[&Attempt],
    member: &Attempt,
) {
    let command = start_command(job, members, member);
    let (nodes, outcomes) = (nodes.clone(), outcomes.clone());
    let (job, node, generation) = (job.id.clone(), member.node.clone(), member.generation);
    tokio::spawn(async move {
        if let Err(error) = send(&nodes, &node, &command).await {
            let _ = outcomes.send(Outcome::Undelivered {
                job,
                node,
                generation,
                error,
            });
        }
    });
}

/// Applies what became of the commands sent since the last pass (one commit).
fn apply_outcomes(
    store: &Store,
    passes: &mut Passes,
    outcomes: Vec<Outcome>,
) -> Result<(), StoreError> {
    let mut wrote = false;
    for outcome in outcomes {
        match outcome {
            Outcome::Undelivered {
                job,
                node,
                generation,
                error,
            } => {
                tracing::warn!(%job, %node, error = %error, "start not delivered; the job waits again");
                let updated = store.update_job_deferred(&job, |j| {
                    if let Some(a) = j.attempts.iter_mut().find(|a| {
                        a.generation == generation && a.node == node && a.reason.is_none()
                    }) {
                        a.reason = Some(format!("not delivered to {}: {error}", a.node));
                        if j.state == JobState::Running {
                            j.state = JobState::Pending;
                            j.reason = Some("waiting: a chosen node did not take the job".into());
                        }
                    }
                })?;
                // The start may have arrived although its reply did not: the node stops
                // it (or says it never had it) before the job's next generation runs.
                if let Some(m) = updated
                    .attempts
                    .iter()
                    .find(|a| a.generation == generation && a.node == node)
                {
                    store.add_fence(&node, &job, generation, &fence(&updated, m, 0))?;
                }
                wrote = true;
            }
            Outcome::StopFailed(key) => {
                passes.stopping.remove(&key);
            }
            Outcome::Fenced {
                key: (job, generation, node),
                reply,
            } => match reply {
                // Its end arrives as an event, which settles the fence.
                Ok(CommandReply::Accepted) => {
                    tracing::info!(%job, %node, generation, "stopping a member taken off its node");
                }
                Ok(CommandReply::NotRunning) => {
                    tracing::info!(%job, %node, generation, "a member taken off its node is not running there");
                    store.remove_fence(&node, &job, generation)?;
                }
                Ok(CommandReply::Refused(r)) => {
                    tracing::warn!(%job, %node, error = %r.message, "could not fence a member yet")
                }
                Err(e) => tracing::warn!(%job, %node, error = %e, "could not fence a member yet"),
            },
        }
    }
    if wrote {
        store.commit()?;
    }
    Ok(())
}

/// One placement pass, without talking to nodes: hands the pending jobs to the engine's
/// queue, records every new generation (members with ranks, addresses and rank 0's
/// `MASTER_PORT`) and every changed waiting reason, and makes it all durable with one
/// commit. Returns the placed jobs, whose members' starts are to be sent.
pub fn place_pending(
    store: &Store,
    statuses: &[NodeStatus],
    active: &[Job],
) -> Result<Vec<Job>, StoreError> {
    let fences = store.all_fences()?;
    let mut held = ledger(active, &fences);
    // Members taken off a node that is still reachable (preempted, drained) run out their
    // grace before the next generation starts: never two generations at once where it can
    // be avoided. A node that is down cannot be waited for; its fence stops the member
    // when it returns.
    let mut stopping: BTreeMap<&JobId, BTreeSet<&NodeId>> = BTreeMap::new();
    for (node, job, _, _) in &fences {
        let down = statuses
            .iter()
            .find(|s| &s.id == node)
            .is_none_or(|s| s.liveness == Liveness::Down);
        if !down {
            stopping.entry(job).or_default().insert(node);
        }
    }
    let mut queue: Vec<Pending> = Vec::new();
    let mut wrote = false;
    let now = now_ms();
    for job in active.iter().filter(|j| j.state == JobState::Pending) {
        // Backing off before a retry (its reason says for how long).
        if job.not_before_ms.is_some_and(|t| t > now) {
            continue;
        }
        // A job whose previous generation still has members running waits for them.
        if jobs::live(job).next().is_some() {
            let reason = format!(
                "waiting for the members of attempt {} to stop",
                jobs::generation(job)
            );
            wrote |= note_reason(store, job, &reason)?;
            continue;
        }
        if let Some(nodes) = stopping.get(&job.id) {
            let nodes: Vec<&str> = nodes.iter().map(|n| n.as_str()).collect();
            let reason = format!(
                "waiting for attempt {} to stop on {} (taken off the node)",
                jobs::generation(job),
                nodes.join(", ")
            );
            wrote |= note_reason(store, job, &reason)?;
            continue;
        }
        queue.push(Pending {
            job: job.id.clone(),
            priority: job.spec.priority,
            seq: job_seq(&job.id),
            request: request(job),
        });
    }
    let mut placed = Vec::new();
    if !queue.is_empty() {
        let mut engine = engine(statuses, &held, false);
        let decisions = queue::schedule(&mut engine, &queue);
        let by_id: BTreeMap<&JobId, &Job> = active.iter().map(|j| (&j.id, j)).collect();
        for (id, decision) in decisions {
            let Some(job) = by_id.get(&id) else { continue };
            match decision {
                Err(why) => wrote |= note_reason(store, job, &format!("waiting: {why}"))?,
                Ok(assignment) => {
                    wrote = true;
                    if let Some(job) = record(store, statuses, &mut held, job, &assignment)? {
                        placed.push(job);
                    }
                }
            }
        }
    }
    if wrote {
        // Recorded before any node hears of it: the ledger is authoritative.
        store.commit()?;
    }
    Ok(placed)
}

/// Records the new generation of `job` (not yet durable); `None` if the job changed
/// meanwhile (cancelled) or no `MASTER_PORT` is free on rank 0's node.
fn record(
    store: &Store,
    statuses: &[NodeStatus],
    held: &mut BTreeMap<NodeId, Held>,
    job: &Job,
    assignment: &Assignment,
) -> Result<Option<Job>, StoreError> {
    let Some(rank0) = assignment.members.first() else {
        return Ok(None);
    };
    let address = |node: &NodeId| {
        statuses
            .iter()
            .find(|s| &s.id == node)
            .and_then(|s| s.gossip.as_ref())
            .map(|g| g.addr.to_string())
    };
    // Distributed work gets a rank-0 port: gangs, and GPU jobs (one node's GPUs talk over
    // it too). A node holds at most one per GPU plus its gangs' rank 0s, so the range
    // lasts; plain CPU jobs, which can be thousands per node, get none.
    let port = if job.spec.nodes > 1 || job.spec.resources.gpus > 0 {
        let used = held
            .get(&rank0.node)
            .map(|h| h.ports.clone())
            .unwrap_or_default();
        let Some(port) = ranks::allocate_port(&used) else {
            let reason = format!(
                "waiting: every MASTER_PORT ({}–{}) on {} is in use",
                ranks::MASTER_PORTS.start(),
                ranks::MASTER_PORTS.end(),
                rank0.node
            );
            note_reason(store, job, &reason)?;
            return Ok(None);
        };
        Some(port)
    } else {
        None
    };
    let generation = jobs::generation(job) + 1;
    let master_addr = address(&rank0.node);
    let members: Vec<Attempt> = assignment
        .members
        .iter()
        .enumerate()
        .map(|(rank, m)| Attempt {
            generation,
            node: m.node.clone(),
            gpus: m.gpus.clone(),
            rank: rank as u32,
            address: address(&m.node),
            master_addr: port.and(master_addr.clone()),
            master_port: port,
            started_at_ms: None,
            exit_code: None,
            reason: None,
            ended_at_ms: None,
        })
        .collect();
    let node_list: Vec<String> = members.iter().map(|m| m.node.to_string()).collect();
    let job = store.update_job_deferred(&job.id, |j| {
        if j.state == JobState::Pending && jobs::live(j).next().is_none() {
            j.attempts.extend(members.iter().cloned());
            j.state = JobState::Running;
            j.reason = Some(format!("starting on {}", node_list.join(", ")));
        }
    })?;
    if jobs::generation(&job) != generation {
        return Ok(None); // cancelled meanwhile
    }
    let r = request(&job);
    for m in &members {
        let h = held.entry(m.node.clone()).or_default();
        h.cpu_millis += r.cpu_millis;
        h.memory_bytes += r.memory_bytes;
        h.gpus.extend(m.gpus.iter().copied());
        h.jobs.insert(job.id.clone());
    }
    if let Some(port) = port {
        held.entry(rank0.node.clone())
            .or_default()
            .ports
            .insert(port);
    }
    Ok(Some(job))
}

/// Takes the live members off nodes that are down (lost), being preempted, or past their
/// drain deadline: their jobs go back to pending (not counted against retries), and a
/// fence makes the node stop them — at once, or with SIGTERM and a grace bounded by the
/// preemption's deadline.
fn evict(store: &Store, statuses: &[NodeStatus]) -> Result<(), StoreError> {
    let now = now_ms();
    let mut evicting: BTreeMap<&NodeId, (jobs::Eviction, u64)> = BTreeMap::new();
    for s in statuses {
        let admin = s.admin.as_ref();
        let until_deadline = admin
            .and_then(|a| a.deadline_ms)
            .map(|d| d.saturating_sub(now));
        let grace = (STOP_GRACE.as_millis() as u64).min(until_deadline.unwrap_or(u64::MAX));
        if s.liveness == Liveness::Down {
            evicting.insert(&s.id, (jobs::Eviction::Lost, 0));
        } else if admin.is_some_and(|a| a.mode == AdminMode::Preempt) {
            evicting.insert(&s.id, (jobs::Eviction::Preempted, grace));
        } else if admin.is_some_and(|a| a.mode == AdminMode::Drain) && until_deadline == Some(0) {
            evicting.insert(&s.id, (jobs::Eviction::Drained, grace));
        }
    }
    if evicting.is_empty() {
        return Ok(());
    }
    let mut wrote = false;
    for job in store.active_jobs()? {
        let mut taken: BTreeMap<jobs::Eviction, Vec<(NodeId, u64)>> = BTreeMap::new();
        for m in jobs::live(&job) {
            if let Some(&(why, grace)) = evicting.get(&m.node) {
                tracing::warn!(job = %job.id, node = %m.node, generation = m.generation, ?why, "member taken off its node");
                store.add_fence(&m.node, &job.id, m.generation, &fence(&job, m, grace))?;
                taken
                    .entry(why)
                    .or_default()
                    .push((m.node.clone(), m.generation));
            }
        }
        for (why, members) in taken {
            store.update_job_deferred(&job.id, |j| jobs::evict(j, &members, why, now))?;
            wrote = true;
        }
    }
    if wrote {
        store.commit()?;
    }
    Ok(())
}

/// Stops, on each connected node that is not down, the members taken off it (lost while
/// it was down, preempted, drained): once per session, each from its own task; a fence is
/// forgotten when the node reports the member's end or says it does not run it. A node
/// the view calls down is skipped: its session is most likely dead.
fn fence_returning(
    store: &Store,
    nodes: &Nodes,
    statuses: &[NodeStatus],
    passes: &mut Passes,
) -> Result<(), StoreError> {
    let mut current = HashSet::new();
    for node in store.fenced_nodes()? {
        let down = statuses
            .iter()
            .find(|s| s.id == node)
            .is_none_or(|s| s.liveness == Liveness::Down);
        let Some(session) = nodes.get(&node).filter(|_| !down) else {
            continue;
        };
        for (job, generation, Fence { grace_ms, .. }) in store.fences(&node)? {
            let member = (job.clone(), generation, node.clone());
            let key = (member.clone(), session.conn.stable_id());
            current.insert(key.clone());
            if !passes.fenced.insert(key) {
                continue;
            }
            let (nodes, outcomes, node) = (nodes.clone(), passes.outcomes.clone(), node.clone());
            tokio::spawn(async move {
                let stop = Command::Stop {
                    job,
                    generation,
                    grace_ms,
                };
                let reply = exchange(&nodes, &node, &stop).await;
                let _ = outcomes.send(Outcome::Fenced { key: member, reply });
            });
        }
    }
    passes.fenced.retain(|k| current.contains(k));
    Ok(())
}

/// Sends again the starts nodes have not confirmed, once per session of the node.
fn resend_unconfirmed(active: &[Job], nodes: &Nodes, passes: &mut Passes) {
    let mut unconfirmed: HashSet<MemberKey> = HashSet::new();
    for job in active.iter().filter(|j| j.state == JobState::Running) {
        let current = jobs::current(job);
        for m in current
            .iter()
            .filter(|m| m.reason.is_none() && m.started_at_ms.is_none())
        {
            let key = (job.id.clone(), m.generation, m.node.clone());
            unconfirmed.insert(key.clone());
            let Some(session) = nodes.get(&m.node) else {
                continue;
            };
            if passes.delivered.insert((key, session.conn.stable_id())) {
                tracing::info!(job = %job.id, node = %m.node, generation = m.generation, "sending an unconfirmed start again");
                spawn_start(nodes, &passes.outcomes, job, &current, m);
            }
        }
    }
    // Forget what no longer needs remembering, so the set stays as small as the live work.
    passes.delivered.retain(|(k, _)| unconfirmed.contains(k));
}

/// Stops the members still running of jobs that are not running any more.
fn stop_leftovers(active: &[Job], nodes: &Nodes, passes: &mut Passes) {
    let mut stoppable: HashSet<MemberKey> = HashSet::new();
    for job in active.iter().filter(|j| j.state != JobState::Running) {
        for m in jobs::live(job) {
            let key = (job.id.clone(), m.generation, m.node.clone());
            stoppable.insert(key.clone());
            if !passes.stopping.insert(key.clone()) {
                continue;
            }
            let stop = Command::Stop {
                job: job.id.clone(),
                generation: m.generation,
                grace_ms: STOP_GRACE.as_millis() as u64,
            };
            let (nodes, outcomes) = (nodes.clone(), passes.outcomes.clone());
            tokio::spawn(async move {
                let node = key.2.clone();
                if let Err(e) = send(&nodes, &node, &stop).await {
                    tracing::warn!(job = %key.0, %node, error = %e, "could not ask the node to stop a member");
                    let _ = outcomes.send(Outcome::StopFailed(key));
                }
            });
        }
    }
    passes.stopping.retain(|k| stoppable.contains(k));
}

/// Records why a pending job waits, if that changed (not yet durable); true if it wrote.
fn note_reason(store: &Store, job: &Job, reason: &str) -> Result<bool, StoreError> {
    if job.reason.as_deref() == Some(reason) {
        return Ok(false);
    }
    store.update_job_deferred(&job.id, |j| {
        if j.state == JobState::Pending {
            j.reason = Some(reason.to_owned());
        }
    })?;
    Ok(true)
}

/// Submission order from the job id (`j-<16 hex>` from sled's monotonic counter).
fn job_seq(id: &JobId) -> u64 {
    id.as_str()
        .strip_prefix("j-")
        .and_then(|h| u64::from_str_radix(h, 16).ok())
        .unwrap_or(u64::MAX)
}

fn start_command(job: &Job, members: &[&Attempt], member: &Attempt) -> Command {
    let r = request(job);
    let mut env: Vec<(String, String)> = job
        .spec
        .env
        .iter()
        .filter(|(k, _)| !ranks::is_rank_var(k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    env.extend(ranks::env(job, members, member));
    Command::Start(AttemptSpec {
        job: job.id.clone(),
        generation: member.generation,
        image: job.spec.image.clone(),
        command: job.spec.command.clone(),
        env,
        cpu_millis: r.cpu_millis,
        memory_bytes: r.memory_bytes,
        gpus: member.gpus.clone(),
        timeout_ms: job
            .spec
            .timeout
            .as_deref()
            .and_then(|t| humantime::parse_duration(t).ok())
            .map(|d| d.as_millis() as u64),
    })
}

/// Sends one command to a node on a stream of its session and reads the reply.
async fn exchange(nodes: &Nodes, node: &NodeId, command: &Command) -> Result<CommandReply, String> {
    let session = nodes
        .get(node)
        .ok_or_else(|| format!("node {node} is not connected"))?;
    let exchange = crate::control::command(&session.conn, command);
    Ok(tokio::time::timeout(COMMAND_TIMEOUT, exchange)
        .await
        .map_err(|_| format!("no reply within {COMMAND_TIMEOUT:?}"))??
        .0)
}

/// [`exchange`], for commands whose only success is `Accepted`.
async fn send(nodes: &Nodes, node: &NodeId, command: &Command) -> Result<(), String> {
    match exchange(nodes, node, command).await? {
        CommandReply::Accepted => Ok(()),
        CommandReply::Refused(r) => Err(r.message),
        CommandReply::NotRunning => Err(format!("node {node} does not run it")),
    }
}

/// What a member taken off its node holds there until it is known to have stopped.
fn fence(job: &Job, member: &Attempt, grace_ms: u64) -> Fence {
    let r = request(job);
    Fence {
        grace_ms,
        cpu_millis: r.cpu_millis,
        memory_bytes: r.memory_bytes,
        gpus: member.gpus.clone(),
    }
}
