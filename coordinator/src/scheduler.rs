//! The scheduling loop: places pending jobs on connected nodes (through the pure
//! `placement::place`), records each attempt with a new generation before telling the
//! node, and asks nodes to stop attempts of cancelled jobs. It wakes when nodes connect or
//! events arrive, and every half second.

use std::collections::HashSet;
use std::time::Duration;

use gantry_shared::api::{Attempt, Job, JobState};
use gantry_shared::protocol::{AttemptSpec, Command, CommandReply};
use gantry_shared::{JobId, NodeId};
use tokio_util::sync::CancellationToken;

use crate::cluster::Cluster;
use crate::nodes::Nodes;
use crate::placement::{self, Need, live_attempt, need};
use crate::store::{Store, StoreError};

const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
/// Grace between SIGTERM and SIGKILL when a job is cancelled.
const CANCEL_GRACE: Duration = Duration::from_secs(10);

pub async fn run(store: Store, nodes: Nodes, cluster: Cluster, cancel: CancellationToken) {
    let mut stopping: HashSet<(JobId, u64)> = HashSet::new();
    // Starts sent, per node session: a node that reconnects gets unconfirmed starts again
    // (agents treat a repeated start of the same generation as a no-op).
    let mut delivered: HashSet<(JobId, u64, usize)> = HashSet::new();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = nodes.changed.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        if let Err(e) = tick(&store, &nodes, &cluster, &mut stopping, &mut delivered).await {
            tracing::error!(error = %e, "scheduling pass failed");
        }
    }
}

async fn tick(
    store: &Store,
    nodes: &Nodes,
    cluster: &Cluster,
    stopping: &mut HashSet<(JobId, u64)>,
    delivered: &mut HashSet<(JobId, u64, usize)>,
) -> Result<(), StoreError> {
    let active = store.active_jobs()?;
    let of = |state| {
        active
            .iter()
            .filter(|j| j.state == state)
            .cloned()
            .collect::<Vec<Job>>()
    };
    let (running, cancelled, mut pending) = (
        of(JobState::Running),
        of(JobState::Cancelled),
        of(JobState::Pending),
    );
    let mut views = placement::ledger(&cluster.offers(), running.iter().chain(&cancelled));
    for job in &running {
        let Some(a) = live_attempt(job).filter(|a| a.started_at_ms.is_none()) else {
            continue;
        };
        let Some(session) = nodes.get(&a.node) else {
            continue;
        };
        if delivered.insert((job.id.clone(), a.generation, session.conn.stable_id())) {
            tracing::info!(job = %job.id, node = %a.node, generation = a.generation, "sending an unconfirmed start again");
            if let Err(e) = send(
                nodes,
                &a.node,
                &start_command(job, a.generation, &a.gpus, need(&job.spec)),
            )
            .await
            {
                tracing::warn!(job = %job.id, error = %e, "start not delivered");
            }
        }
    }
    for job in &cancelled {
        if let Some(a) = live_attempt(job)
            && stopping.insert((job.id.clone(), a.generation))
        {
            let stop = Command::Stop {
                job: job.id.clone(),
                generation: a.generation,
                grace_ms: CANCEL_GRACE.as_millis() as u64,
            };
            if let Err(e) = send(nodes, &a.node, &stop).await {
                tracing::warn!(job = %job.id, node = %a.node, error = %e, "could not ask the node to stop a cancelled job");
                stopping.remove(&(job.id.clone(), a.generation));
            }
        }
    }
    // Forget what no longer needs remembering, so the sets stay as small as the live work.
    let unconfirmed: HashSet<(&JobId, u64)> = running
        .iter()
        .filter_map(|j| {
            live_attempt(j)
                .filter(|a| a.started_at_ms.is_none())
                .map(|a| (&j.id, a.generation))
        })
        .collect();
    delivered.retain(|(j, g, _)| unconfirmed.contains(&(j, *g)));
    let stoppable: HashSet<(&JobId, u64)> = cancelled
        .iter()
        .filter_map(|j| live_attempt(j).map(|a| (&j.id, a.generation)))
        .collect();
    stopping.retain(|(j, g)| stoppable.contains(&(j, *g)));
    pending.sort_by(|a, b| {
        b.spec
            .priority
            .cmp(&a.spec.priority)
            .then_with(|| a.id.cmp(&b.id))
    });
    for job in pending {
        let n = need(&job.spec);
        let placed = match placement::place(n, &views) {
            Ok(p) => p,
            Err(why) => {
                let reason = format!("waiting: {why}");
                if job.reason.as_deref() != Some(reason.as_str()) {
                    store.update_job(&job.id, |j| {
                        if j.state == JobState::Pending {
                            j.reason = Some(reason.clone());
                        }
                    })?;
                }
                continue;
            }
        };
        let generation = job.attempts.last().map_or(1, |a| a.generation + 1);
        let attempt = Attempt {
            generation,
            node: placed.node.clone(),
            gpus: placed.gpus.clone(),
            rank: 0,
            started_at_ms: None,
            exit_code: None,
            reason: None,
        };
        // Recorded before the node hears of it: the ledger is authoritative.
        let job = store.update_job(&job.id, |j| {
            if j.state == JobState::Pending {
                j.attempts.push(attempt.clone());
                j.state = JobState::Running;
                j.reason = Some(format!("starting on {}", attempt.node));
            }
        })?;
        if job.attempts.last().map(|a| a.generation) != Some(generation) {
            continue; // cancelled meanwhile
        }
        if let Some(v) = views.iter_mut().find(|v| v.id == placed.node) {
            v.reserved_cpu_millis += n.cpu_millis;
            v.reserved_memory_bytes += n.memory_bytes;
            v.reserved_gpus.extend(placed.gpus.iter().copied());
        }
        let start = start_command(&job, generation, &placed.gpus, n);
        if let Some(session) = nodes.get(&placed.node) {
            delivered.insert((job.id.clone(), generation, session.conn.stable_id()));
        }
        if let Err(e) = send(nodes, &placed.node, &start).await {
            tracing::warn!(job = %job.id, node = %placed.node, error = %e, "start not delivered; the job waits again");
            store.update_job(&job.id, |j| {
                if let Some(a) = j
                    .attempts
                    .last_mut()
                    .filter(|a| a.generation == generation && a.reason.is_none())
                {
                    a.reason = Some(format!("not delivered to {}: {e}", a.node));
                    if j.state == JobState::Running {
                        j.state = JobState::Pending;
                        j.reason = Some("waiting: the chosen node did not take the job".into());
                    }
                }
            })?;
        }
    }
    Ok(())
}

fn start_command(job: &Job, generation: u64, gpus: &[u32], n: Need) -> Command {
    Command::Start(AttemptSpec {
        job: job.id.clone(),
        generation,
        image: job.spec.image.clone(),
        command: job.spec.command.clone(),
        env: job
            .spec
            .env
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        cpu_millis: n.cpu_millis,
        memory_bytes: n.memory_bytes,
        gpus: gpus.to_vec(),
        timeout_ms: job
            .spec
            .timeout
            .as_deref()
            .and_then(|t| humantime::parse_duration(t).ok())
            .map(|d| d.as_millis() as u64),
    })
}

/// Sends one command to a node on a stream of its session and reads the reply.
async fn send(nodes: &Nodes, node: &NodeId, command: &Command) -> Result<(), String> {
    let session = nodes
        .get(node)
        .ok_or_else(|| format!("node {node} is not connected"))?;
    let exchange = crate::control::command(&session.conn, command);
    match tokio::time::timeout(COMMAND_TIMEOUT, exchange)
        .await
        .map_err(|_| format!("no reply within {COMMAND_TIMEOUT:?}"))??
        .0
    {
        CommandReply::Accepted => Ok(()),
        CommandReply::Refused(r) => Err(r.message),
    }
}
