//! Carrying out a pass's [`Action`]s: store writes first, made durable with one commit,
//! then commands to nodes, each from a task of its own that is never awaited by the pass
//! (a node that died unnoticed holds up only its own commands, never the placement of other
//! work). What came of a command (a start not delivered, a stop that did not go out, a
//! fence's answer) comes back as an [`Outcome`] and is applied before the next pass.

use std::collections::HashSet;
use std::sync::Arc;

use gantry_shared::api::JobState;
use gantry_shared::protocol::{Command, CommandReply, Event};
use gantry_shared::secrets::SecretUse;
use gantry_shared::{EndCause, Generation, JobId, NodeId, Owner, StartFailure};
use tokio::sync::{Notify, mpsc};
use tokio_util::task::TaskTracker;

use super::link::NodeLink;
use super::plan::{Action, MemberKey, Memory, SendKind, fence};
use crate::jobs;
use crate::store::{Store, StoreError};

/// What became of a command sent by its own task, for the next pass.
#[derive(Debug)]
pub enum Outcome {
    /// A start the node did not take, or did not answer.
    Undelivered {
        job: JobId,
        node: NodeId,
        generation: Generation,
        error: String,
    },
    /// A stop of a member of a finished job did not go out: the next pass tries again.
    StopFailed(MemberKey),
    /// A start that could not be sent because a secret it names is gone: the member's
    /// start failed (the job's doing, like a bad image).
    StartRefused {
        job: JobId,
        node: NodeId,
        generation: Generation,
        message: String,
    },
    /// The node's answer to the stop of a member taken off it.
    Fenced {
        key: MemberKey,
        reply: Result<CommandReply, String>,
    },
}

/// Where command tasks report: the channel, and a wake-up for the loop.
#[derive(Clone)]
pub struct Reports {
    pub tx: mpsc::UnboundedSender<Outcome>,
    pub ready: Arc<Notify>,
}

/// Applies the store actions of a pass, then sends its commands. Returns the jobs whose
/// placement was recorded (with their new generation).
pub fn execute<L: NodeLink>(
    store: &Store,
    link: &L,
    tasks: &TaskTracker,
    reports: &Reports,
    actions: Vec<Action>,
    now_ms: u64,
) -> Result<Vec<(JobId, Generation)>, StoreError> {
    let (placed, sends) = apply(store, actions, now_ms)?;
    let recorded: HashSet<&(JobId, Generation)> = placed.iter().collect();
    for (member, mut command, kind, secrets) in sends {
        let (job, generation, _) = &member;
        if kind == (SendKind::Start { placed: true })
            && !recorded.contains(&(job.clone(), *generation))
        {
            continue; // the job changed meanwhile (cancelled): nothing to start
        }
        if let Err(message) = with_secrets(store, &mut command, &secrets) {
            let (job, generation, node) = member;
            let refused = Outcome::StartRefused {
                job,
                node,
                generation,
                message,
            };
            if reports.tx.send(refused).is_ok() {
                reports.ready.notify_one();
            }
            continue;
        }
        spawn_send(link, tasks, reports, member, command, kind);
    }
    Ok(placed)
}

/// Puts the values of `secrets` into a start command, or says why it cannot.
fn with_secrets(store: &Store, command: &mut Command, secrets: &[SecretUse]) -> Result<(), String> {
    if secrets.is_empty() {
        return Ok(());
    }
    let values = store
        .secrets()
        .resolve(secrets)
        .map_err(|e| e.to_string())?;
    if let Command::Start(spec) = command {
        spec.secrets = values;
    }
    Ok(())
}

/// The store part of a pass: every write, then one commit if anything was written.
/// Returns the recorded placements and the commands to send.
#[allow(clippy::type_complexity)]
pub fn apply(
    store: &Store,
    actions: Vec<Action>,
    now_ms: u64,
) -> Result<
    (
        Vec<(JobId, Generation)>,
        Vec<(MemberKey, Command, SendKind, Vec<SecretUse>)>,
    ),
    StoreError,
> {
    let mut wrote = false;
    let mut placed = Vec::new();
    let mut sends = Vec::new();
    for action in actions {
        match action {
            Action::AddFence {
                node,
                job,
                generation,
                fence,
            } => {
                store.add_fence(&node, &job, generation, &fence)?;
                wrote = true;
            }
            Action::Evict { job, members, why } => {
                store.update_job_deferred(&job, |j| jobs::evict(j, &members, why, now_ms))?;
                wrote = true;
            }
            Action::NoteReason { job, reason } => {
                store.update_job_deferred(&job, |j| {
                    if j.state == JobState::Pending {
                        j.reason = Some(reason.clone());
                    }
                })?;
                wrote = true;
            }
            Action::Place { job, members } => {
                let Some(generation) = members.first().map(|m| m.generation) else {
                    continue;
                };
                let nodes: Vec<String> = members.iter().map(|m| m.node.to_string()).collect();
                let updated = store.update_job_deferred(&job, |j| {
                    if j.state == JobState::Pending && j.live_members().next().is_none() {
                        j.attempts.extend(members.iter().cloned());
                        j.state = JobState::Running;
                        j.reason = Some(format!("starting on {}", nodes.join(", ")));
                    }
                })?;
                wrote = true;
                if updated.generation() == generation {
                    placed.push((job, generation));
                }
            }
            Action::Send {
                member,
                command,
                kind,
                secrets,
            } => sends.push((member, command, kind, secrets)),
        }
    }
    if wrote {
        // Recorded before any node hears of it: the ledger is authoritative.
        store.commit()?;
    }
    Ok((placed, sends))
}

fn spawn_send<L: NodeLink>(
    link: &L,
    tasks: &TaskTracker,
    reports: &Reports,
    (job, generation, node): MemberKey,
    command: Command,
    kind: SendKind,
) {
    let (link, reports) = (link.clone(), reports.clone());
    tasks.spawn(async move {
        let reply = link.exchange(&node, command).await;
        let outcome = match kind {
            SendKind::Start { .. } => match accepted(&node, reply) {
                Ok(()) => return,
                Err(error) => Outcome::Undelivered {
                    job,
                    node,
                    generation,
                    error,
                },
            },
            SendKind::Stop => match accepted(&node, reply) {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(%job, %node, error = %e, "could not ask the node to stop a member");
                    Outcome::StopFailed((job, generation, node))
                }
            },
            SendKind::Fence => Outcome::Fenced {
                key: (job, generation, node),
                reply,
            },
        };
        if reports.tx.send(outcome).is_ok() {
            reports.ready.notify_one();
        }
    });
}

/// A reply that must be `Accepted`.
fn accepted(node: &NodeId, reply: Result<CommandReply, String>) -> Result<(), String> {
    match reply? {
        CommandReply::Accepted => Ok(()),
        CommandReply::Refused(r) => Err(r.message),
        CommandReply::NotRunning => Err(format!("node {node} does not run it")),
    }
}

/// Applies what became of the commands sent since the last pass (one commit).
pub fn apply_outcomes(
    store: &Store,
    memory: &mut Memory,
    outcomes: Vec<Outcome>,
    now_ms: u64,
) -> Result<(), StoreError> {
    let mut wrote = false;
    for outcome in outcomes {
        match outcome {
            Outcome::StartRefused {
                job,
                node,
                generation,
                message,
            } => {
                tracing::warn!(%job, %node, error = %message, "start not sent");
                let failed = Event::StartFailed {
                    owner: Owner::Job(job.clone()),
                    generation,
                    message,
                    failure: StartFailure::Spec,
                };
                store.update_job_deferred(&job, |j| jobs::apply(j, &node, &failed, now_ms))?;
                wrote = true;
            }
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
                        a.end(EndCause::NotDelivered, reason, now_ms);
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
                memory.stopping.remove(&key);
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
