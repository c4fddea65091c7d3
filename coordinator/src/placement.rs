//! Placement: which node runs an attempt, and on which of its GPUs. Pure: the view of
//! nodes and what is already reserved on them go in, a decision or a reason comes out.
//! This is a single-node fit; the full engine (models, topology, gangs, queue fairness)
//! replaces it behind the same function. Only nodes the cluster view calls placeable are
//! offered, and GPUs reported unhealthy are never chosen.

use std::collections::BTreeSet;

use gantry_shared::api::{Attempt, Job, JobSpec};
use gantry_shared::protocol::NodeCapacity;
use gantry_shared::{CpuMillis, JobId, NodeId, parse_memory};

/// What one attempt needs on its node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Need {
    pub cpu_millis: u64,
    pub memory_bytes: u64,
    pub gpus: u32,
}

/// A node that may take work: its declared capacity and the GPUs never to use.
#[derive(Debug, Clone)]
pub struct Offer {
    pub id: NodeId,
    pub capacity: NodeCapacity,
    pub unhealthy_gpus: BTreeSet<u32>,
}

/// A node that may take work and what the coordinator's own ledger has reserved on it.
#[derive(Debug, Clone)]
pub struct NodeView {
    pub id: NodeId,
    pub capacity: NodeCapacity,
    /// Reported unhealthy (critical Xid, ECC): never placed on.
    pub unhealthy_gpus: BTreeSet<u32>,
    pub reserved_cpu_millis: u64,
    pub reserved_memory_bytes: u64,
    pub reserved_gpus: BTreeSet<u32>,
    /// Jobs holding the reservations.
    pub jobs: Vec<JobId>,
}

/// An attempt holds its node's resources until it is known to have ended.
pub fn live_attempt(job: &Job) -> Option<&Attempt> {
    job.attempts.last().filter(|a| a.reason.is_none())
}

/// What a job's spec asks of each node.
pub fn need(spec: &JobSpec) -> Need {
    let r = &spec.resources;
    // Validated at submission; should a stored spec not parse, reserve a core and 512 MiB.
    Need {
        cpu_millis: r.cpu.parse::<CpuMillis>().map(|c| c.0).unwrap_or(1000),
        memory_bytes: parse_memory(&r.memory).unwrap_or(512 << 20),
        gpus: r.gpus,
    }
}

/// The coordinator's ledger: each connected node with what the live attempts of `jobs`
/// reserve on it.
pub fn ledger<'a>(nodes: &[Offer], jobs: impl IntoIterator<Item = &'a Job>) -> Vec<NodeView> {
    let mut views: Vec<NodeView> = nodes
        .iter()
        .map(|o| NodeView {
            id: o.id.clone(),
            capacity: o.capacity,
            unhealthy_gpus: o.unhealthy_gpus.clone(),
            reserved_cpu_millis: 0,
            reserved_memory_bytes: 0,
            reserved_gpus: BTreeSet::new(),
            jobs: Vec::new(),
        })
        .collect();
    for job in jobs {
        if let Some(a) = live_attempt(job)
            && let Some(v) = views.iter_mut().find(|v| v.id == a.node)
        {
            let n = need(&job.spec);
            v.reserved_cpu_millis += n.cpu_millis;
            v.reserved_memory_bytes += n.memory_bytes;
            v.reserved_gpus.extend(a.gpus.iter().copied());
            v.jobs.push(job.id.clone());
        }
    }
    views
}

impl NodeView {
    /// GPUs neither reserved nor unhealthy.
    fn free_gpus(&self) -> impl Iterator<Item = u32> + '_ {
        (0..self.capacity.gpus)
            .filter(|g| !self.reserved_gpus.contains(g) && !self.unhealthy_gpus.contains(g))
    }

    fn free(&self) -> (u64, u64, u32) {
        (
            self.capacity
                .cpu_millis
                .saturating_sub(self.reserved_cpu_millis),
            self.capacity
                .memory_bytes
                .saturating_sub(self.reserved_memory_bytes),
            self.free_gpus().count() as u32,
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub node: NodeId,
    pub gpus: Vec<u32>,
}

/// Why nothing fits now, in words a user can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unplaceable {
    /// Larger than any node even when empty: it will never run.
    #[error(
        "no node is large enough: the largest offers {cpu_millis}m cpu, {memory_bytes} bytes of memory and {gpus} GPUs"
    )]
    TooLarge {
        cpu_millis: u64,
        memory_bytes: u64,
        gpus: u32,
    },
    #[error("no connected node")]
    NoNodes,
    #[error(
        "waiting for capacity: no node has {need_cpu}m cpu, {need_memory} bytes and {need_gpus} GPUs free"
    )]
    Busy {
        need_cpu: u64,
        need_memory: u64,
        need_gpus: u32,
    },
}

/// Best fit: among the nodes with room, the one with the least free resources left, so
/// large nodes stay free for large jobs. Ties break by node id, so the same input always
/// gives the same decision. GPUs are the lowest free indices.
pub fn place(need: Need, nodes: &[NodeView]) -> Result<Placement, Unplaceable> {
    if nodes.is_empty() {
        return Err(Unplaceable::NoNodes);
    }
    let fits_empty = |n: &NodeView| {
        n.capacity.cpu_millis >= need.cpu_millis
            && n.capacity.memory_bytes >= need.memory_bytes
            && n.capacity.gpus >= need.gpus
    };
    if !nodes.iter().any(fits_empty) {
        let max = |f: fn(&NodeView) -> u64| nodes.iter().map(f).max().unwrap_or(0);
        return Err(Unplaceable::TooLarge {
            cpu_millis: max(|n| n.capacity.cpu_millis),
            memory_bytes: max(|n| n.capacity.memory_bytes),
            gpus: max(|n| u64::from(n.capacity.gpus)) as u32,
        });
    }
    let best = nodes
        .iter()
        .filter(|n| {
            let (cpu, mem, gpus) = n.free();
            cpu >= need.cpu_millis && mem >= need.memory_bytes && gpus >= need.gpus
        })
        .min_by_key(|n| {
            let (cpu, mem, gpus) = n.free();
            (
                gpus - need.gpus,
                cpu - need.cpu_millis,
                mem - need.memory_bytes,
                n.id.clone(),
            )
        })
        .ok_or(Unplaceable::Busy {
            need_cpu: need.cpu_millis,
            need_memory: need.memory_bytes,
            need_gpus: need.gpus,
        })?;
    let gpus = best.free_gpus().take(need.gpus as usize).collect();
    Ok(Placement {
        node: best.id.clone(),
        gpus,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, cpu: u64, gpus: u32, used_cpu: u64, used_gpus: &[u32]) -> NodeView {
        NodeView {
            id: NodeId::new(id).expect("id"),
            capacity: NodeCapacity {
                cpu_millis: cpu,
                memory_bytes: 64 << 30,
                gpus,
            },
            reserved_cpu_millis: used_cpu,
            reserved_memory_bytes: 0,
            reserved_gpus: used_gpus.iter().copied().collect(),
            unhealthy_gpus: BTreeSet::new(),
            jobs: Vec::new(),
        }
    }

    fn need(cpu: u64, gpus: u32) -> Need {
        Need {
            cpu_millis: cpu,
            memory_bytes: 1 << 30,
            gpus,
        }
    }

    #[test]
    fn packs_onto_the_fullest_node_that_fits() {
        let nodes = [
            node("a", 8000, 8, 0, &[]),
            node("b", 8000, 8, 6000, &[0, 1, 2]),
        ];
        let p = place(need(1000, 2), &nodes).expect("fits");
        assert_eq!(p.node.as_str(), "b");
        assert_eq!(p.gpus, vec![3, 4], "lowest free GPUs");
    }

    #[test]
    fn unhealthy_gpus_are_never_chosen() {
        let mut a = node("a", 8000, 4, 0, &[0]);
        a.unhealthy_gpus = [1, 2].into();
        let p = place(need(100, 1), std::slice::from_ref(&a)).expect("one left");
        assert_eq!(p.gpus, vec![3]);
        assert!(matches!(
            place(need(100, 2), &[a]),
            Err(Unplaceable::Busy { .. })
        ));
    }

    #[test]
    fn never_oversubscribes() {
        let nodes = [node("a", 2000, 1, 1500, &[0])];
        assert!(matches!(
            place(need(1000, 0), &nodes),
            Err(Unplaceable::Busy { .. })
        ));
        assert!(matches!(
            place(need(100, 1), &nodes),
            Err(Unplaceable::Busy { .. })
        ));
    }

    #[test]
    fn too_large_is_distinguished_from_busy() {
        let nodes = [node("a", 2000, 1, 0, &[])];
        let err = place(need(4000, 0), &nodes).expect_err("too big");
        assert!(
            matches!(
                err,
                Unplaceable::TooLarge {
                    cpu_millis: 2000,
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(place(need(1, 0), &[]), Err(Unplaceable::NoNodes));
    }

    #[test]
    fn same_input_same_decision() {
        let nodes = [node("b", 4000, 0, 0, &[]), node("a", 4000, 0, 0, &[])];
        assert_eq!(
            place(need(1000, 0), &nodes).expect("fits").node.as_str(),
            "a"
        );
    }
}
