//! One reconciliation pass as a pure decision: from a [`Snapshot`] of the cluster (node
//! statuses, the active jobs, the fences, the nodes' sessions, the time) and the
//! reconciler's [`Memory`] of what it already sent, the [`Action`]s that bring what runs
//! toward what should run. No I/O: the executor (`execute.rs`) writes the store and sends
//! the commands, and unit tests drive this directly.
//!
//! In order, a pass
//! 1. takes the live members off nodes that are down (*lost*), being preempted, or past
//!    their drain deadline: their job goes back to pending (not counted against its
//!    retries) and a fence is recorded so the node stops them once it is reachable
//!    (SIGTERM and a grace bounded by a preemption's deadline, or at once for a node that
//!    was down);
//! 2. sends each fence to its node, once per session, if the node is connected and not
//!    down;
//! 3. sends again every start a node has not confirmed, once per session of that node;
//! 4. stops the members still running of jobs that are no longer running (cancelled, or
//!    whose generation failed because one gang member failed);
//! 5. hands the pending jobs whose previous generation has fully ended to the placement
//!    engine's queue over the placeable nodes and the ledger, and records each placement
//!    (every member of the new generation, with its rank, address and rank 0's
//!    `MASTER_PORT`) and every changed waiting reason; each placed member's start follows.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::time::Duration;

use gantry_shared::api::{Attempt, Job, JobState};
use gantry_shared::protocol::{AttemptSpec, Command};
use gantry_shared::secrets::SecretUse;
use gantry_shared::{Generation, JobId, NodeId, Owner};

use super::place::{Held, add_held, engine, job_seq, ledger, request};
use crate::jobs::{self, Eviction, ranks};
use crate::nodes::liveness::{Liveness, NodeStatus};
use crate::placement::queue::{self, Pending};
use crate::store::Fence;
use crate::store::node_admin::AdminMode;

/// Grace between SIGTERM and SIGKILL when a job is cancelled or its generation failed.
pub const STOP_GRACE: Duration = Duration::from_secs(10);

/// A member's identity across passes: job, generation, node.
pub type MemberKey = (JobId, Generation, NodeId);

/// What one pass looks at.
pub struct Snapshot<'a> {
    /// Unix ms: the only clock a decision reads.
    pub now_ms: u64,
    pub statuses: &'a [NodeStatus],
    /// The jobs with work left, in submission order.
    pub jobs: Vec<Job>,
    /// `(node, job, generation, fence)`: members taken off a node, not yet known stopped.
    pub fences: Vec<(NodeId, JobId, Generation, Fence)>,
    /// Connected nodes and their session ids.
    pub sessions: BTreeMap<NodeId, usize>,
    /// What function containers hold, per node: jobs are placed around them.
    pub warm: BTreeMap<NodeId, Held>,
}

/// What the reconciler remembers between passes about commands it sent. Rebuilt empty
/// after a coordinator restart, which only means each is sent once more.
#[derive(Debug, Default)]
pub struct Memory {
    /// Stops sent for members of jobs that are no longer running.
    pub stopping: HashSet<MemberKey>,
    /// Starts sent, per node session: a node that reconnects gets unconfirmed starts
    /// again (agents treat a repeated start of the same generation as a no-op).
    pub delivered: HashSet<(MemberKey, usize)>,
    /// Fence stops sent, per node session.
    pub fenced: HashSet<(MemberKey, usize)>,
}

/// One step toward what should run.
// A pass's actions are made and consumed once each; boxing the start would only add an
// allocation per start.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Record that `node` may still run this member and must stop it (store).
    AddFence {
        node: NodeId,
        job: JobId,
        generation: Generation,
        fence: Fence,
    },
    /// Take these members off their nodes (store: `jobs::evict`).
    Evict {
        job: JobId,
        members: Vec<(NodeId, Generation)>,
        why: Eviction,
    },
    /// Record why a pending job waits (store).
    NoteReason { job: JobId, reason: String },
    /// Record a new generation of a pending job (store), before any node hears of it.
    Place { job: JobId, members: Vec<Attempt> },
    /// Send a member's node a command: a start, a stop, or a fence's stop.
    Send {
        member: MemberKey,
        command: Command,
        kind: SendKind,
        /// The secrets a start's container gets: their values go into the command just
        /// before it is sent (never into the plan, the store or a log).
        secrets: Vec<SecretUse>,
    },
}

/// Why a command is sent, which says what to do when it fails.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendKind {
    /// A member's start; `placed` when the same pass placed it (it is sent only if the
    /// placement was recorded).
    Start { placed: bool },
    /// The stop of a member of a job that is no longer running.
    Stop,
    /// The stop of a member taken off its node.
    Fence,
}

impl Action {
    fn send(member: MemberKey, command: Command, kind: SendKind) -> Self {
        Action::Send {
            member,
            command,
            kind,
            secrets: Vec::new(),
        }
    }

    /// A member's start, with the secrets of its job.
    fn start(member: MemberKey, job: &Job, command: Command, placed: bool) -> Self {
        Action::Send {
            member,
            command,
            kind: SendKind::Start { placed },
            secrets: job.spec.secrets.clone(),
        }
    }
}

/// Decides one pass. Updates `memory` with what the actions send.
pub fn plan(mut snap: Snapshot<'_>, memory: &mut Memory) -> Vec<Action> {
    let mut actions = Vec::new();
    evict(&mut snap, &mut actions);
    fence_returning(&snap, memory, &mut actions);
    resend_unconfirmed(&snap, memory, &mut actions);
    stop_leftovers(&snap, memory, &mut actions);
    place_pending(&mut snap, Some(memory), &mut actions);
    actions
}

/// Only the placement step (5), for passes that do nothing else (the schedule benchmark).
/// Also returns the snapshot's jobs as the plan leaves them (placed ones running, with
/// their new generation).
pub fn plan_placements(mut snap: Snapshot<'_>) -> (Vec<Action>, Vec<Job>) {
    let mut actions = Vec::new();
    place_pending(&mut snap, None, &mut actions);
    (actions, snap.jobs)
}

/// Step 1: members on nodes that are down, preempted or past their drain deadline.
fn evict(snap: &mut Snapshot<'_>, actions: &mut Vec<Action>) {
    let now = snap.now_ms;
    let mut evicting: BTreeMap<&NodeId, (Eviction, u64)> = BTreeMap::new();
    for s in snap.statuses {
        let admin = s.admin.as_ref();
        let until_deadline = admin
            .and_then(|a| a.deadline_ms)
            .map(|d| d.saturating_sub(now));
        let grace = (STOP_GRACE.as_millis() as u64).min(until_deadline.unwrap_or(u64::MAX));
        if s.liveness == Liveness::Down {
            evicting.insert(&s.id, (Eviction::Lost, 0));
        } else if admin.is_some_and(|a| a.mode == AdminMode::Preempt) {
            evicting.insert(&s.id, (Eviction::Preempted, grace));
        } else if admin.is_some_and(|a| a.mode == AdminMode::Drain) && until_deadline == Some(0) {
            evicting.insert(&s.id, (Eviction::Drained, grace));
        }
    }
    if evicting.is_empty() {
        return;
    }
    for job in &mut snap.jobs {
        let mut taken: BTreeMap<Eviction, Vec<(NodeId, Generation)>> = BTreeMap::new();
        for m in job.live_members() {
            if let Some(&(why, grace)) = evicting.get(&m.node) {
                tracing::warn!(job = %job.id, node = %m.node, generation = %m.generation, ?why, "member taken off its node");
                let fence = fence(job, m, grace);
                snap.fences
                    .push((m.node.clone(), job.id.clone(), m.generation, fence.clone()));
                actions.push(Action::AddFence {
                    node: m.node.clone(),
                    job: job.id.clone(),
                    generation: m.generation,
                    fence,
                });
                taken
                    .entry(why)
                    .or_default()
                    .push((m.node.clone(), m.generation));
            }
        }
        for (why, members) in taken {
            jobs::evict(job, &members, why, now);
            actions.push(Action::Evict {
                job: job.id.clone(),
                members,
                why,
            });
        }
    }
}

/// Step 2: fences to their nodes, once per session, if connected and not down.
fn fence_returning(snap: &Snapshot<'_>, memory: &mut Memory, actions: &mut Vec<Action>) {
    let mut current = HashSet::new();
    for (node, job, generation, fence) in &snap.fences {
        let down = snap
            .statuses
            .iter()
            .find(|s| &s.id == node)
            .is_none_or(|s| s.liveness == Liveness::Down);
        let Some(&session) = snap.sessions.get(node).filter(|_| !down) else {
            continue;
        };
        let member = (job.clone(), *generation, node.clone());
        let key = (member.clone(), session);
        current.insert(key.clone());
        if !memory.fenced.insert(key) {
            continue;
        }
        let stop = Command::Stop {
            owner: Owner::Job(job.clone()),
            generation: *generation,
            grace_ms: fence.grace_ms,
        };
        actions.push(Action::send(member, stop, SendKind::Fence));
    }
    memory.fenced.retain(|k| current.contains(k));
}

/// Step 3: starts nodes have not confirmed, once per session of the node.
fn resend_unconfirmed(snap: &Snapshot<'_>, memory: &mut Memory, actions: &mut Vec<Action>) {
    let mut unconfirmed: HashSet<MemberKey> = HashSet::new();
    for job in snap.jobs.iter().filter(|j| j.state == JobState::Running) {
        let current = job.current_members();
        for m in current
            .iter()
            .filter(|m| m.is_live() && m.started_at_ms.is_none())
        {
            let key = (job.id.clone(), m.generation, m.node.clone());
            unconfirmed.insert(key.clone());
            let Some(&session) = snap.sessions.get(&m.node) else {
                continue;
            };
            if memory.delivered.insert((key.clone(), session)) {
                tracing::info!(job = %job.id, node = %m.node, generation = %m.generation, "sending an unconfirmed start again");
                let start = start_command(job, &current, m);
                actions.push(Action::start(key, job, start, false));
            }
        }
    }
    // Forget what no longer needs remembering, so the set stays as small as the live work.
    memory.delivered.retain(|(k, _)| unconfirmed.contains(k));
}

/// Step 4: members still running of jobs that are not running any more.
fn stop_leftovers(snap: &Snapshot<'_>, memory: &mut Memory, actions: &mut Vec<Action>) {
    let mut stoppable: HashSet<MemberKey> = HashSet::new();
    for job in snap.jobs.iter().filter(|j| j.state != JobState::Running) {
        for m in job.live_members() {
            let key = (job.id.clone(), m.generation, m.node.clone());
            stoppable.insert(key.clone());
            if !memory.stopping.insert(key.clone()) {
                continue;
            }
            let stop = Command::Stop {
                owner: Owner::Job(job.id.clone()),
                generation: m.generation,
                grace_ms: STOP_GRACE.as_millis() as u64,
            };
            actions.push(Action::send(key, stop, SendKind::Stop));
        }
    }
    memory.stopping.retain(|k| stoppable.contains(k));
}

/// Step 5: placement of the pending jobs whose previous generation has fully ended.
/// With `memory`, each placed member's start follows its placement.
fn place_pending(
    snap: &mut Snapshot<'_>,
    mut memory: Option<&mut Memory>,
    actions: &mut Vec<Action>,
) {
    let now = snap.now_ms;
    let mut held = ledger(&snap.jobs, &snap.fences, now);
    add_held(&mut held, &snap.warm);
    // Members taken off a node that is still reachable (preempted, drained) run out their
    // grace before the next generation starts: never two generations at once where it can
    // be avoided. A node that is down cannot be waited for; its fence stops the member
    // when it returns.
    let mut stopping: BTreeMap<JobId, BTreeSet<NodeId>> = BTreeMap::new();
    for (node, job, _, _) in &snap.fences {
        let down = snap
            .statuses
            .iter()
            .find(|s| &s.id == node)
            .is_none_or(|s| s.liveness == Liveness::Down);
        if !down {
            stopping
                .entry(job.clone())
                .or_default()
                .insert(node.clone());
        }
    }
    let mut queue: Vec<Pending> = Vec::new();
    let mut notes: Vec<(usize, String)> = Vec::new();
    for (i, job) in snap.jobs.iter().enumerate() {
        if job.state != JobState::Pending {
            continue;
        }
        // Backing off before a retry (its reason says for how long).
        if job.not_before_ms.is_some_and(|t| t > now) {
            continue;
        }
        // A job whose previous generation still has members running waits for them.
        if job.live_members().next().is_some() {
            let reason = format!(
                "waiting for the members of attempt {} to stop",
                job.generation()
            );
            notes.push((i, reason));
            continue;
        }
        if let Some(nodes) = stopping.get(&job.id) {
            let nodes: Vec<&str> = nodes.iter().map(|n| n.as_str()).collect();
            let reason = format!(
                "waiting for attempt {} to stop on {} (taken off the node)",
                job.generation(),
                nodes.join(", ")
            );
            notes.push((i, reason));
            continue;
        }
        queue.push(Pending {
            job: job.id.clone(),
            priority: job.spec.priority,
            seq: job_seq(&job.id),
            request: request(job),
        });
    }
    for (i, reason) in notes {
        note_reason(&mut snap.jobs[i], reason, actions);
    }
    if queue.is_empty() {
        return;
    }
    let mut engine = engine(snap.statuses, &held, false);
    let decisions = queue::schedule(&mut engine, &queue);
    let index: BTreeMap<JobId, usize> = snap
        .jobs
        .iter()
        .enumerate()
        .map(|(i, j)| (j.id.clone(), i))
        .collect();
    for (id, decision) in decisions {
        let Some(&i) = index.get(&id) else { continue };
        match decision {
            Err(why) => note_reason(&mut snap.jobs[i], format!("waiting: {why}"), actions),
            Ok(assignment) => {
                let job = &mut snap.jobs[i];
                let members =
                    match super::place::members(snap.statuses, &mut held, job, &assignment) {
                        Ok(members) => members,
                        Err(reason) => {
                            note_reason(job, reason, actions);
                            continue;
                        }
                    };
                let nodes: Vec<String> = members.iter().map(|m| m.node.to_string()).collect();
                job.attempts.extend(members.iter().cloned());
                job.state = JobState::Running;
                job.reason = Some(format!("starting on {}", nodes.join(", ")));
                actions.push(Action::Place {
                    job: job.id.clone(),
                    members: members.clone(),
                });
                let Some(memory) = memory.as_deref_mut() else {
                    continue;
                };
                let current = job.current_members();
                for m in &current {
                    let key = (job.id.clone(), m.generation, m.node.clone());
                    if let Some(&session) = snap.sessions.get(&m.node) {
                        memory.delivered.insert((key.clone(), session));
                    }
                    let start = start_command(job, &current, m);
                    actions.push(Action::start(key, job, start, true));
                }
            }
        }
    }
}

/// Records why a pending job waits, if that changed.
fn note_reason(job: &mut Job, reason: String, actions: &mut Vec<Action>) {
    if job.reason.as_deref() == Some(reason.as_str()) {
        return;
    }
    job.reason = Some(reason.clone());
    actions.push(Action::NoteReason {
        job: job.id.clone(),
        reason,
    });
}

/// A member's start, with the job's environment and the member's rank environment.
pub fn start_command(job: &Job, members: &[&Attempt], member: &Attempt) -> Command {
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
        function: None,
        secrets: Vec::new(),
        volumes: gantry_shared::volumes::attaches(&job.spec.volumes),
        code: Vec::new(),
    })
}

/// What a member taken off its node holds there until it is known to have stopped.
pub fn fence(job: &Job, member: &Attempt, grace_ms: u64) -> Fence {
    let r = request(job);
    Fence {
        grace_ms,
        cpu_millis: r.cpu_millis,
        memory_bytes: r.memory_bytes,
        gpus: member.gpus.clone(),
    }
}
