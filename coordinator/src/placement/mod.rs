//! The placement engine: which nodes and GPUs a job (or a gang of them) gets. Pure: no I/O,
//! no async, no clocks. Nodes that may take work and the coordinator's ledger go in
//! ([`Engine::new`]); [`Engine::place`] returns an [`Assignment`] and reserves it, or an
//! [`Unplaceable`] that says whether the job can **never** run on this cluster or is
//! **busy** (it would fit on empty capacity), in words a user can act on. The queue pass
//! with backfill fences is [`queue::schedule`].
//!
//! Hard constraints, per gang member: cpu, memory, GPU count, an acceptable model, the
//! minimum GPU memory, the node selector, spot tolerance, healthy GPUs only, and one member
//! per distinct node. Nothing is ever oversubscribed given the ledger plus everything this
//! engine has placed; a gang is reserved whole or not at all.
//!
//! GPUs are grouped into *kinds*: one model name at one memory size. Each member's GPUs
//! are of one kind. A requested model matches a GPU's model when they are equal ignoring
//! ASCII case, or when the GPU's model contains the requested one (ignoring ASCII case) as
//! a whole token, where anything but an ASCII letter or digit is a boundary: `H100` matches
//! `NVIDIA H100 80GB HBM3` and `H100-80GB`, `A100` does not match `A100X`.
//! `gpu_models` and `min_gpu_memory_bytes` only matter when `gpus > 0`.
//!
//! Scoring, always deterministic (ties go to the lower node id, then GPU index):
//! - Models are tried in the job's order; the first one with which the whole request can be
//!   placed now wins.
//! - GPU jobs pack: the node left with the fewest free GPUs of the kind, then the least free
//!   cpu. CPU-only jobs prefer nodes without healthy GPUs, then the least free cpu.
//! - Within a node (`fit::pick_gpus`): one NVLink group (the one with the fewest free GPUs
//!   that still fits, so big groups stay whole), else one NUMA node by the same rule, else
//!   the lowest indices.
//! - Gangs (`fit::choose_gang`): if some rack (label `rack`, else `block`) has enough
//!   fitting nodes, the one with the fewest free GPUs overall (then name) takes the whole
//!   gang; otherwise the best nodes overall, from racks with more fitting nodes first.
//!   Rank 0 is the first member.
//!
//! Complexity, n nodes, k kinds accepted by the request: a single-node job without a
//! selector is `O(k · log n)` through the ordered index (`index.rs`), plus one `O(log n)`
//! step per node skipped for lack of memory; a gang without a selector is `O(F log F)` in
//! F, the nodes that fit now; a job with a selector walks the shortest posting list of its
//! `label=value` pairs, `O(m)` in the m nodes carrying that pair. Reserving or releasing a
//! member is `O(kinds on the node · log n)`. A job that cannot be placed is explained with
//! one `O(n)` scan for *busy*, plus one for *never* the first time that request is seen
//! (capacity does not change within an engine, so that verdict is cached).

use std::collections::{BTreeMap, HashMap};

use gantry_shared::NodeId;
use gantry_shared::gossip::GpuInfo;

mod diagnose;
mod fit;
mod index;
pub mod queue;

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod queue_tests;
#[cfg(test)]
mod tests;

pub use diagnose::{Busy, Never, Unplaceable};
pub use fit::model_matches;
pub use queue::{Pending, schedule};

use index::Index;

/// Label that makes a node a spot node when it is `true`.
pub const SPOT_LABEL: &str = "spot";
/// Labels naming a node's rack; the first one present counts.
pub const RACK_LABELS: [&str; 2] = ["rack", "block"];

/// A node that may take work (the caller passes only up and ready nodes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    pub id: NodeId,
    /// Offered to jobs in total; the ledger says what is taken.
    pub cpu_millis: u64,
    pub memory_bytes: u64,
    /// `spot=true` makes it a spot node; `rack` (else `block`) groups gangs.
    pub labels: BTreeMap<String, String>,
    /// Unhealthy ones are never chosen.
    pub gpus: Vec<GpuInfo>,
    /// Declares shared volume storage: may run what mounts a shared volume.
    pub shared_volumes: bool,
}

/// What a job asks for. Every gang member gets the per-node amounts.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Request {
    /// Gang size: one member on each of this many distinct nodes.
    pub nodes: u32,
    pub cpu_millis: u64,
    pub memory_bytes: u64,
    /// GPUs per node.
    pub gpus: u32,
    /// Acceptable models in preference order; empty accepts any model.
    pub gpu_models: Vec<String>,
    /// Each GPU has at least this much memory; 0 accepts any.
    pub min_gpu_memory_bytes: u64,
    /// Node labels that must all match.
    pub selector: BTreeMap<String, String>,
    /// May run on spot nodes (it survives preemption); other jobs never go there.
    pub spot: bool,
    /// Must run on this node: where the local volumes it mounts live.
    pub pin: Option<NodeId>,
    /// Mounts a shared volume: only nodes with shared volume storage.
    pub shared_volumes: bool,
}

impl Request {
    /// Its nodes are found by a scan over the nodes it may use, not through the index (a
    /// selector or a volume narrows them).
    pub(crate) fn narrowed(&self) -> bool {
        !self.selector.is_empty() || self.pin.is_some() || self.shared_volumes
    }
}

impl Default for Request {
    /// One node, nothing else asked: the base for building requests.
    fn default() -> Self {
        Self {
            nodes: 1,
            cpu_millis: 0,
            memory_bytes: 0,
            gpus: 0,
            gpu_models: Vec::new(),
            min_gpu_memory_bytes: 0,
            selector: BTreeMap::new(),
            spot: false,
            pin: None,
            shared_volumes: false,
        }
    }
}

/// One gang member: its node and the GPU indices there, ascending.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Member {
    pub node: NodeId,
    pub gpus: Vec<u32>,
}

/// Where a job runs: `members[rank]`, rank 0 first.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Assignment {
    pub members: Vec<Member>,
}

/// A GPU kind: one model at one memory size. Every member's GPUs are of one kind.
#[derive(Debug, Clone)]
pub(crate) struct Kind {
    pub model: String,
    pub memory_bytes: u64,
}

/// One GPU slot of a node.
#[derive(Debug, Clone)]
pub(crate) struct Slot {
    pub index: u32,
    /// `None` for an unhealthy GPU: it is never chosen and never counted free.
    pub kind: Option<u32>,
    pub nvlink: Option<u32>,
    pub numa: Option<u32>,
    pub reserved: bool,
}

/// Healthy GPUs of one kind on a node.
#[derive(Debug, Clone, Copy)]
pub(crate) struct KindCount {
    pub kind: u32,
    pub total: u32,
    pub free: u32,
}

/// A node with what is taken on it.
#[derive(Debug, Clone)]
pub(crate) struct NodeState {
    pub id: NodeId,
    pub labels: BTreeMap<String, String>,
    pub spot: bool,
    pub shared_volumes: bool,
    /// Position of the rack's name among all rack names, sorted.
    pub rack: Option<u32>,
    pub cpu: u64,
    pub memory: u64,
    /// May exceed the capacity when the ledger says so; free amounts saturate at zero.
    pub used_cpu: u64,
    pub used_memory: u64,
    /// Sorted by index, one slot per index.
    pub gpus: Vec<Slot>,
    pub kinds: Vec<KindCount>,
    /// Has at least one healthy GPU (CPU-only jobs go elsewhere first).
    pub has_gpus: bool,
    /// Held for the blocked job at this position of a queue pass (`queue::schedule`);
    /// a fenced node is out of the index and takes nothing.
    pub fenced_by: Option<usize>,
}

impl NodeState {
    pub fn free_cpu(&self) -> u64 {
        self.cpu.saturating_sub(self.used_cpu)
    }

    pub fn free_memory(&self) -> u64 {
        self.memory.saturating_sub(self.used_memory)
    }

    pub fn free_of(&self, kind: u32) -> u32 {
        self.kinds
            .iter()
            .find(|k| k.kind == kind)
            .map_or(0, |k| k.free)
    }

    pub fn total_of(&self, kind: u32) -> u32 {
        self.kinds
            .iter()
            .find(|k| k.kind == kind)
            .map_or(0, |k| k.total)
    }

    fn slot_mut(&mut self, index: u32) -> Option<&mut Slot> {
        let i = self.gpus.binary_search_by_key(&index, |s| s.index).ok()?;
        self.gpus.get_mut(i)
    }
}

/// The nodes, the ledger and the indexes over them. See the module header.
#[derive(Debug, Clone)]
pub struct Engine {
    /// Sorted by id, so a node's position orders like its id.
    pub(crate) nodes: Vec<NodeState>,
    pub(crate) kinds: Vec<Kind>,
    /// Free healthy GPUs per rack (all kinds), for the gang rack choice. Racks are
    /// numbered in the order of their names.
    pub(crate) rack_free: Vec<u64>,
    pub(crate) index: Index,
    /// Node positions per `(label, value)`, ascending: a selector walks the shortest list.
    pub(crate) labels: BTreeMap<(String, String), Vec<u32>>,
    pub(crate) fenced: Vec<u32>,
    /// `never` depends only on what does not change (capacity, labels, health), so its
    /// answers are kept, up to `NEVER_CACHE` requests.
    never_cache: HashMap<Request, Option<Never>>,
}

/// Most requests whose never/busy verdict is remembered.
const NEVER_CACHE: usize = 1024;

impl Engine {
    /// Builds the engine from the nodes that may take work and what the ledger holds on
    /// them: `(node, cpu millis, memory bytes, GPU indices)`, several entries per node
    /// allowed. A second node with an id already seen is ignored, as are reservations on
    /// unknown nodes and of GPU indices a node does not have.
    pub fn new<R, G>(nodes: Vec<NodeInfo>, reserved: R) -> Self
    where
        R: IntoIterator<Item = (NodeId, u64, u64, G)>,
        G: IntoIterator<Item = u32>,
    {
        let mut nodes = nodes;
        nodes.sort_by(|a, b| a.id.cmp(&b.id));
        nodes.dedup_by(|b, a| a.id == b.id);
        // Keep node positions well inside u32 (index keys use them).
        nodes.truncate(u32::MAX as usize - 1);

        let mut kind_keys: BTreeMap<(String, u64), u32> = BTreeMap::new();
        for n in &nodes {
            for g in n.gpus.iter().filter(|g| !g.health.is_unhealthy()) {
                kind_keys.insert((g.model.clone(), g.memory_bytes), 0);
            }
        }
        let mut kinds = Vec::with_capacity(kind_keys.len());
        for (i, ((model, memory_bytes), id)) in kind_keys.iter_mut().enumerate() {
            *id = i as u32;
            kinds.push(Kind {
                model: model.clone(),
                memory_bytes: *memory_bytes,
            });
        }
        let racks: Vec<String> = {
            let set: std::collections::BTreeSet<&str> =
                nodes.iter().filter_map(|n| rack_of(&n.labels)).collect();
            set.into_iter().map(str::to_owned).collect()
        };

        let mut states = Vec::with_capacity(nodes.len());
        for n in nodes {
            let rack = rack_of(&n.labels)
                .and_then(|r| racks.binary_search_by(|x| x.as_str().cmp(r)).ok())
                .map(|i| i as u32);
            let mut gpus: Vec<Slot> = n
                .gpus
                .iter()
                .map(|g| Slot {
                    index: g.index,
                    kind: if g.health.is_unhealthy() {
                        None
                    } else {
                        kind_keys.get(&(g.model.clone(), g.memory_bytes)).copied()
                    },
                    nvlink: g.nvlink_group,
                    numa: g.numa_node,
                    reserved: false,
                })
                .collect();
            gpus.sort_by_key(|s| s.index);
            gpus.dedup_by_key(|s| s.index);
            let mut counts: BTreeMap<u32, u32> = BTreeMap::new();
            for k in gpus.iter().filter_map(|s| s.kind) {
                *counts.entry(k).or_default() += 1;
            }
            states.push(NodeState {
                spot: n.labels.get(SPOT_LABEL).is_some_and(|v| v == "true"),
                shared_volumes: n.shared_volumes,
                id: n.id,
                labels: n.labels,
                rack,
                cpu: n.cpu_millis,
                memory: n.memory_bytes,
                used_cpu: 0,
                used_memory: 0,
                has_gpus: !counts.is_empty(),
                kinds: counts
                    .into_iter()
                    .map(|(kind, total)| KindCount {
                        kind,
                        total,
                        free: total,
                    })
                    .collect(),
                gpus,
                fenced_by: None,
            });
        }

        let mut rack_free = vec![0u64; racks.len()];
        for n in &states {
            if let Some(r) = n.rack {
                rack_free[r as usize] += n.kinds.iter().map(|k| u64::from(k.free)).sum::<u64>();
            }
        }
        let mut labels: BTreeMap<(String, String), Vec<u32>> = BTreeMap::new();
        for (i, n) in states.iter().enumerate() {
            for (k, v) in &n.labels {
                labels
                    .entry((k.clone(), v.clone()))
                    .or_default()
                    .push(i as u32);
            }
        }
        let mut engine = Self {
            index: Index::new(kinds.len()),
            labels,
            never_cache: HashMap::new(),
            nodes: states,
            kinds,
            rack_free,
            fenced: Vec::new(),
        };
        for i in 0..engine.nodes.len() {
            engine.index.insert(i as u32, &engine.nodes[i]);
        }
        for (node, cpu, memory, gpus) in reserved {
            if let Some(i) = engine.position(&node) {
                let gpus: Vec<u32> = gpus.into_iter().collect();
                engine.adjust(i, &gpus, cpu, memory, true);
            }
        }
        engine
    }

    /// Places `req` and reserves what it returns; on failure nothing is reserved.
    pub fn place(&mut self, req: &Request) -> Result<Assignment, Unplaceable> {
        match self.find(req) {
            Some(a) => {
                self.reserve(&a, req);
                Ok(a)
            }
            None => Err(self.explain(req)),
        }
    }

    /// Gives back what `place` reserved for `assignment` (for what-if and tests).
    /// Members on unknown nodes are ignored; amounts never go below zero.
    pub fn release(&mut self, assignment: &Assignment, req: &Request) {
        for m in &assignment.members {
            if let Some(i) = self.position(&m.node) {
                self.adjust(i, &m.gpus, req.cpu_millis, req.memory_bytes, false);
            }
        }
    }

    /// Whether `req` could run on this cluster if nothing were reserved: the line between
    /// a job that waits ([`Unplaceable::Busy`]) and one that never runs.
    pub fn would_fit_empty(&self, req: &Request) -> bool {
        self.never(req).is_none()
    }

    /// Number of nodes the engine knows.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Nodes whose labels match `req`'s selector and that can hold its volumes,
    /// ascending. Pinned to a node by a local volume, that node alone; else without a
    /// selector, every node; with one, only the shortest posting list of its pairs is
    /// walked.
    pub(crate) fn matching<'a>(
        &'a self,
        req: &'a Request,
    ) -> impl Iterator<Item = (u32, &'a NodeState)> + 'a {
        // A pin is its node's position alone (none if the engine lacks the node).
        let pinned = req.pin.as_ref().map(|node| self.position(node));
        let list: Option<&[u32]> = if pinned.is_some() || req.selector.is_empty() {
            None
        } else {
            Some(
                req.selector
                    .iter()
                    .map(|(k, v)| {
                        self.labels
                            .get(&(k.clone(), v.clone()))
                            .map_or(&[][..], Vec::as_slice)
                    })
                    .min_by_key(|l| l.len())
                    .unwrap_or_default(),
            )
        };
        let all = (pinned.is_none() && list.is_none()).then_some(0..self.nodes.len() as u32);
        all.into_iter()
            .flatten()
            .chain(pinned.flatten())
            .chain(list.into_iter().flatten().copied())
            .filter_map(|i| Some((i, self.nodes.get(i as usize)?)))
            .filter(|(_, n)| req.selector.iter().all(|(k, v)| n.labels.get(k) == Some(v)))
            .filter(|(_, n)| !req.shared_volumes || n.shared_volumes)
    }

    /// Nodes `req` may use whatever their load: the selector matches, and spot nodes
    /// only for spot-tolerant jobs.
    pub(crate) fn eligible<'a>(
        &'a self,
        req: &'a Request,
    ) -> impl Iterator<Item = (u32, &'a NodeState)> + 'a {
        self.matching(req).filter(|(_, n)| req.spot || !n.spot)
    }

    /// `never`, remembered per request.
    pub(crate) fn never_cached(&mut self, req: &Request) -> Option<Never> {
        if let Some(n) = self.never_cache.get(req) {
            return n.clone();
        }
        let n = self.never(req);
        if self.never_cache.len() >= NEVER_CACHE {
            self.never_cache.clear();
        }
        self.never_cache.insert(req.clone(), n.clone());
        n
    }

    fn reserve(&mut self, assignment: &Assignment, req: &Request) {
        for m in &assignment.members {
            if let Some(i) = self.position(&m.node) {
                self.adjust(i, &m.gpus, req.cpu_millis, req.memory_bytes, true);
            }
        }
    }

    pub(crate) fn position(&self, id: &NodeId) -> Option<u32> {
        self.nodes
            .binary_search_by(|n| n.id.cmp(id))
            .ok()
            .map(|i| i as u32)
    }

    /// Takes (`take`) or gives back cpu, memory and GPUs on node `i`, keeping the index
    /// and the rack totals in step.
    fn adjust(&mut self, i: u32, gpus: &[u32], cpu: u64, memory: u64, take: bool) {
        let Some(node) = self.nodes.get_mut(i as usize) else {
            return;
        };
        if node.fenced_by.is_none() {
            self.index.remove(i, node);
        }
        if take {
            node.used_cpu = node.used_cpu.saturating_add(cpu);
            node.used_memory = node.used_memory.saturating_add(memory);
        } else {
            node.used_cpu = node.used_cpu.saturating_sub(cpu);
            node.used_memory = node.used_memory.saturating_sub(memory);
        }
        let mut freed: i64 = 0;
        for &g in gpus {
            let Some(slot) = node.slot_mut(g) else {
                continue;
            };
            if slot.reserved == take {
                continue;
            }
            slot.reserved = take;
            if let Some(kind) = slot.kind
                && let Some(c) = node.kinds.iter_mut().find(|c| c.kind == kind)
            {
                if take {
                    c.free = c.free.saturating_sub(1);
                    freed -= 1;
                } else {
                    c.free = (c.free + 1).min(c.total);
                    freed += 1;
                }
            }
        }
        if let Some(r) = node.rack
            && let Some(f) = self.rack_free.get_mut(r as usize)
        {
            *f = f.saturating_add_signed(freed);
        }
        if node.fenced_by.is_none() {
            self.index.insert(i, node);
        }
    }

    /// Holds node `i` for the blocked job at queue position `owner`: it takes nothing
    /// more until [`Engine::clear_fences`].
    pub(crate) fn fence(&mut self, i: u32, owner: usize) {
        if let Some(node) = self.nodes.get_mut(i as usize)
            && node.fenced_by.is_none()
        {
            self.index.remove(i, node);
            node.fenced_by = Some(owner);
            self.fenced.push(i);
        }
    }

    pub(crate) fn clear_fences(&mut self) {
        for i in std::mem::take(&mut self.fenced) {
            if let Some(node) = self.nodes.get_mut(i as usize)
                && node.fenced_by.take().is_some()
            {
                self.index.insert(i, node);
            }
        }
    }
}

fn rack_of(labels: &BTreeMap<String, String>) -> Option<&str> {
    RACK_LABELS
        .iter()
        .find_map(|l| labels.get(*l))
        .map(String::as_str)
}
