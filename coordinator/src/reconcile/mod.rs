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
//!    engine's queue (`placement::queue::schedule`, pure), over the placeable nodes of the
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
use gantry_shared::{EndCause, Generation, JobId, NodeId, Owner};
use tokio_util::sync::CancellationToken;

use crate::jobs;
use crate::jobs::ranks;
use crate::nodes::Nodes;
use crate::nodes::admin::AdminMode;
use crate::nodes::liveness::{Cluster, Liveness, NodeStatus};
use crate::placement::queue::{self, Pending};
use crate::placement::{Assignment, Engine, NodeInfo, Request};
use crate::store::{Fence, Store, StoreError};

mod place;

pub use place::{Held, engine, ledger, node_info, place_pending, request};

const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
/// Grace between SIGTERM and SIGKILL when a job is cancelled or its generation failed.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// How long GPUs of an attempt stopped for a GPU fault stay out of placement on the
/// coordinator's own word (gossip says it within a second).
const FAULT_HOLD_MS: u64 = 30_000;

/// A member's identity across passes: job, generation, node.
type MemberKey = (JobId, Generation, NodeId);

/// What became of a command sent by its own task, for the next pass.
enum Outcome {
    /// A start the node did not take, or did not answer.
    Undelivered {
        job: JobId,
        node: NodeId,
        generation: Generation,
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
        let current = job.current_members();
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
                    if let Some(a) = j
                        .attempts
                        .iter_mut()
                        .find(|a| a.generation == generation && a.node == node && a.is_live())
                    {
                        let reason = format!("not delivered to {}: {error}", a.node);
                        a.end(EndCause::NotDelivered, reason, now_ms());
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
                    tracing::info!(%job, %node, %generation, "stopping a member taken off its node");
                }
                Ok(CommandReply::NotRunning) => {
                    tracing::info!(%job, %node, %generation, "a member taken off its node is not running there");
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
        let mut taken: BTreeMap<jobs::Eviction, Vec<(NodeId, Generation)>> = BTreeMap::new();
        for m in job.live_members() {
            if let Some(&(why, grace)) = evicting.get(&m.node) {
                tracing::warn!(job = %job.id, node = %m.node, generation = %m.generation, ?why, "member taken off its node");
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
                    owner: Owner::Job(job),
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
        let current = job.current_members();
        for m in current
            .iter()
            .filter(|m| m.is_live() && m.started_at_ms.is_none())
        {
            let key = (job.id.clone(), m.generation, m.node.clone());
            unconfirmed.insert(key.clone());
            let Some(session) = nodes.get(&m.node) else {
                continue;
            };
            if passes.delivered.insert((key, session.conn.stable_id())) {
                tracing::info!(job = %job.id, node = %m.node, generation = %m.generation, "sending an unconfirmed start again");
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
        for m in job.live_members() {
            let key = (job.id.clone(), m.generation, m.node.clone());
            stoppable.insert(key.clone());
            if !passes.stopping.insert(key.clone()) {
                continue;
            }
            let stop = Command::Stop {
                owner: Owner::Job(job.id.clone()),
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
        owner: Owner::Job(job.id.clone()),
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
            .as_ref()
            .map(|t| t.value().as_millis() as u64),
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
