//! What placement needs from the cluster, as pure functions: what a job asks of a node,
//! the ledger of what live members (and fenced ones) hold, the engine over the placeable
//! nodes, and the members of a new generation (ranks, addresses, rank 0's `MASTER_PORT`).

use std::collections::{BTreeMap, BTreeSet};

use gantry_shared::api::{Attempt, Job};
use gantry_shared::volumes::placement_needs;
use gantry_shared::{Generation, JobId, NodeId};

use crate::jobs::ranks;
use crate::nodes::liveness::NodeStatus;
use crate::placement::{Assignment, Engine, NodeInfo, Request};
use crate::store::Fence;

/// How long GPUs of an attempt stopped for a GPU fault stay out of placement on the
/// coordinator's own word (gossip says it within a second).
const FAULT_HOLD_MS: u64 = 30_000;

/// What a job asks of each of its nodes.
pub fn request(job: &Job) -> Request {
    let r = &job.spec.resources;
    let (pin, shared_volumes) = placement_needs(&job.spec.volumes).unwrap_or_default();
    Request {
        nodes: job.spec.nodes,
        cpu_millis: r.cpu.value().0,
        memory_bytes: r.memory.value().0,
        gpus: r.gpus,
        gpu_models: r.gpu_types.clone(),
        min_gpu_memory_bytes: r.gpu_memory.as_ref().map_or(0, |m| m.value().0),
        selector: job.spec.selector.clone(),
        spot: job.spec.spot,
        // Two local volumes on different nodes are refused at submit.
        pin,
        shared_volumes,
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
        shared_volumes: capacity.shared_volumes,
    })
}

/// The ledger: per node, what live members of `jobs` hold, and what members taken off a
/// node but not yet known to have stopped there (`fences`) still hold.
pub fn ledger<'a>(
    jobs: impl IntoIterator<Item = &'a Job>,
    fences: &[(NodeId, JobId, Generation, Fence)],
    now: u64,
) -> BTreeMap<NodeId, Held> {
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
            matches!(m.cause, Some(gantry_shared::EndCause::GpuFault(_)))
                && m.ended_at_ms
                    .is_some_and(|t| now.saturating_sub(t) < FAULT_HOLD_MS)
        }) {
            let h = held.entry(m.node.clone()).or_default();
            h.faulty.extend(m.gpus.iter().copied());
        }
        for m in job.live_members() {
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

/// Adds what `other` holds to `held`, node by node.
pub fn add_held(held: &mut BTreeMap<NodeId, Held>, other: &BTreeMap<NodeId, Held>) {
    for (node, o) in other {
        let h = held.entry(node.clone()).or_default();
        h.cpu_millis += o.cpu_millis;
        h.memory_bytes += o.memory_bytes;
        h.gpus.extend(o.gpus.iter().copied());
        h.ports.extend(o.ports.iter().copied());
        h.faulty.extend(o.faulty.iter().copied());
    }
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

/// The members of `job`'s next generation on `assignment`, with ranks, addresses and (for
/// distributed work) a `MASTER_PORT` on rank 0's node, reserved in `held`. `Err` says why
/// the job waits instead (no `MASTER_PORT` free there).
pub fn members(
    statuses: &[NodeStatus],
    held: &mut BTreeMap<NodeId, Held>,
    job: &Job,
    assignment: &Assignment,
) -> Result<Vec<Attempt>, String> {
    let Some(rank0) = assignment.members.first() else {
        return Err("waiting: the placement chose no node".into());
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
            return Err(format!(
                "waiting: every MASTER_PORT ({}–{}) on {} is in use",
                ranks::MASTER_PORTS.start(),
                ranks::MASTER_PORTS.end(),
                rank0.node
            ));
        };
        Some(port)
    } else {
        None
    };
    let generation = job.generation().next();
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
            cause: None,
            reason: None,
            ended_at_ms: None,
        })
        .collect();
    let r = request(job);
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
    Ok(members)
}

/// Submission order from the job id (`j-<16 hex>` from sled's monotonic counter).
pub fn job_seq(id: &JobId) -> u64 {
    id.as_str()
        .strip_prefix("j-")
        .and_then(|h| u64::from_str_radix(h, 16).ok())
        .unwrap_or(u64::MAX)
}
