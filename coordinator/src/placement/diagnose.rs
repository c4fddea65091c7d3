//! Why a job cannot be placed, in words a user can act on: **never** (no node could
//! satisfy it even with the cluster empty) or **busy** (it would fit on empty capacity and
//! waits), or, in a queue pass, **behind** an earlier blocked job that holds the nodes it
//! needs. Busy is one scan over the eligible nodes; never is one more, cached per request.

use std::collections::BTreeMap;
use std::fmt;

use gantry_shared::resources::bytes_text;
use gantry_shared::{JobId, NodeId};

use super::{Engine, NodeState, Request, model_matches};

/// Why a job was not placed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unplaceable {
    /// No node could ever satisfy it on this cluster, even with nothing running.
    #[error("{0}")]
    Never(Never),
    /// It would fit on empty capacity; it waits for running work to finish.
    #[error("waiting for capacity: {0}")]
    Busy(Busy),
    /// A queue pass: the nodes it could use are held for an earlier job that is blocked.
    #[error(
        "waiting behind job {job}: the nodes this job fits on are held for that job, \
         which is ahead in the queue and waiting for capacity"
    )]
    Behind { job: JobId },
}

impl Unplaceable {
    /// Whether the job can never run on this cluster as it is (fix the job or the cluster).
    pub fn is_never(&self) -> bool {
        matches!(self, Self::Never(_))
    }
}

/// What makes a job impossible on this cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Never {
    /// A gang of zero nodes.
    NoMembers,
    /// No node may take work at all.
    NoNodes,
    /// The gang is larger than the cluster.
    TooFewNodes { needed: u32, nodes: usize },
    /// A gang mounts a local volume, which lives on one node only.
    LocalVolumeGang { needed: u32 },
    /// The node its local volumes live on is not in the cluster (the engine's nodes).
    VolumeNode { node: NodeId },
    /// It mounts a shared volume and no node declares shared volume storage.
    SharedVolumes,
    /// Too few nodes carry the selector's labels (and hold its volumes).
    Selector {
        /// `key=value` pairs, comma-separated.
        selector: String,
        needed: u32,
        matching: usize,
    },
    /// The job is not spot-tolerant and too few matching nodes are on demand.
    Spot {
        needed: u32,
        on_demand: usize,
        /// The job has a selector (the nodes counted are those matching it).
        selector: bool,
    },
    /// Too few matching nodes are large enough, even empty.
    TooSmall {
        needed: u32,
        fitting: usize,
        /// What each member needs: `8 healthy H100 GPUs of ≥ 80 GiB`.
        need: String,
        /// What the cluster offers instead: `the largest offers 4 A100-40GB (40 GiB each)`.
        largest: String,
        /// The job has a selector (the nodes counted are those matching it).
        selector: bool,
    },
}

impl std::error::Error for Never {}

impl fmt::Display for Never {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoMembers => write!(f, "the job asks for a gang of 0 nodes; ask for at least 1"),
            Self::NoNodes => write!(
                f,
                "no node is up and ready to take work; join an agent to the cluster"
            ),
            Self::TooFewNodes { needed, nodes } => write!(
                f,
                "the job needs {needed} nodes but the cluster has only {nodes} ready {}",
                plural(*nodes, "node", "nodes")
            ),
            Self::LocalVolumeGang { needed } => write!(
                f,
                "the job runs on {needed} nodes but mounts a local volume, which lives on one \
                 node; use a shared volume (`gantry volume create --shared`)"
            ),
            Self::VolumeNode { node } => write!(
                f,
                "it mounts a local volume on node {node}, which is not up and ready; bring \
                 the node back, or use a volume on another node"
            ),
            Self::SharedVolumes => write!(
                f,
                "it mounts a shared volume but no node declares shared volume storage \
                 (`[volumes] shared_path` in agent.toml)"
            ),
            Self::Selector {
                selector,
                needed,
                matching: 0,
            } if *needed <= 1 => write!(
                f,
                "no node matches the selector {selector}; `gantry nodes show NODE` lists a \
                 node's labels"
            ),
            Self::Selector {
                selector,
                needed,
                matching,
            } => write!(
                f,
                "the job needs {needed} nodes but only {matching} {} the selector {selector}",
                plural(*matching, "matches", "match")
            ),
            Self::Spot {
                needed,
                on_demand,
                selector,
            } => {
                let scope = if *selector { "matching node" } else { "node" };
                if *on_demand == 0 {
                    write!(
                        f,
                        "the job is not spot-tolerant and every {scope} is a spot node"
                    )?;
                } else {
                    write!(
                        f,
                        "the job needs {needed} nodes and is not spot-tolerant, but only \
                         {on_demand} {scope}{} {} not spot nodes",
                        plural(*on_demand, "", "s"),
                        plural(*on_demand, "is", "are")
                    )?;
                }
                write!(f, "; mark the job spot-tolerant or add on-demand nodes")
            }
            Self::TooSmall {
                needed,
                fitting,
                need,
                largest,
                selector,
            } => {
                let scope = if *selector { "matching node" } else { "node" };
                if *needed <= 1 || *fitting == 0 {
                    write!(f, "no {scope} has {need}; {largest}")
                } else {
                    write!(
                        f,
                        "the job needs {needed} nodes with {need} each, but only {fitting} \
                         {scope}{} {} that; {largest}",
                        plural(*fitting, "", "s"),
                        plural(*fitting, "has", "have")
                    )
                }
            }
        }
    }
}

/// What a job that fits the cluster is waiting for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Busy {
    /// Gang size.
    pub nodes: u32,
    /// What each member needs free: `8 free healthy H100 GPUs`.
    pub need: String,
    /// Nodes that have it free now (fewer than `nodes`).
    pub available: usize,
    /// Nodes with enough free GPUs of a model the job does not accept:
    /// `3 nodes have 8 free A100-40GB but the job accepts only H100`.
    pub other_models: Option<String>,
    /// Nodes that have it free but are held for blocked jobs ahead in the queue.
    pub held: usize,
    /// The job has a selector (the nodes counted are those matching it).
    pub selector: bool,
    /// The node its local volumes live on, when that node is not up and ready.
    pub volume_node_away: Option<NodeId>,
}

impl std::error::Error for Busy {}

impl fmt::Display for Busy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(node) = &self.volume_node_away {
            return write!(
                f,
                "node {node}, where its local volume lives, is not up and ready"
            );
        }
        let scope = if self.selector {
            "matching node"
        } else {
            "node"
        };
        if self.nodes <= 1 || self.available == 0 {
            write!(f, "no {scope} has {}", self.need)?;
        } else {
            write!(
                f,
                "the job needs {} nodes with {} each, and only {} {scope}{} {} that",
                self.nodes,
                self.need,
                self.available,
                plural(self.available, "", "s"),
                plural(self.available, "has", "have")
            )?;
        }
        if let Some(other) = &self.other_models {
            write!(f, "; {other}")?;
        }
        if self.held > 0 {
            write!(
                f,
                "; {} {scope}{} that {} it {} held for jobs ahead in the queue",
                self.held,
                plural(self.held, "", "s"),
                plural(self.held, "has", "have"),
                plural(self.held, "is", "are")
            )?;
        }
        Ok(())
    }
}

impl Engine {
    /// Never or busy, for a request `find` could not place.
    pub(crate) fn explain(&mut self, req: &Request) -> Unplaceable {
        match self.never_cached(req) {
            Some(never) => Unplaceable::Never(never),
            None => Unplaceable::Busy(self.busy(req)),
        }
    }

    /// Why `req` could not run even on the empty cluster; `None` if it could.
    pub(crate) fn never(&self, req: &Request) -> Option<Never> {
        let needed = req.nodes;
        let n = needed as usize;
        if needed == 0 {
            return Some(Never::NoMembers);
        }
        if self.nodes.is_empty() {
            return Some(Never::NoNodes);
        }
        if let Some(node) = &req.pin {
            if n > 1 {
                return Some(Never::LocalVolumeGang { needed });
            }
            if self.position(node).is_none() {
                return Some(Never::VolumeNode { node: node.clone() });
            }
        }
        if req.shared_volumes && !self.nodes.iter().any(|nd| nd.shared_volumes) {
            return Some(Never::SharedVolumes);
        }
        // The volumes narrow the nodes like a selector does.
        let has_selector = req.narrowed();
        if !has_selector && self.nodes.len() < n {
            return Some(Never::TooFewNodes {
                needed,
                nodes: self.nodes.len(),
            });
        }
        let matching = self.matching(req).count();
        if has_selector && matching < n {
            return Some(Never::Selector {
                selector: selector_text(req),
                needed,
                matching,
            });
        }
        let eligible: Vec<&NodeState> = self.eligible(req).map(|(_, nd)| nd).collect();
        if eligible.len() < n {
            return Some(Never::Spot {
                needed,
                on_demand: eligible.len(),
                selector: has_selector,
            });
        }

        let prefs = self.preferences(req);
        let res_ok = |nd: &NodeState| nd.cpu >= req.cpu_millis && nd.memory >= req.memory_bytes;
        let gpu_ok =
            |nd: &NodeState, kinds: &[u32]| kinds.iter().any(|&k| nd.total_of(k) >= req.gpus);
        let count = |f: &dyn Fn(&NodeState) -> bool| eligible.iter().filter(|nd| f(nd)).count();
        let fitting = if req.gpus == 0 {
            count(&res_ok)
        } else {
            prefs
                .iter()
                .map(|ks| count(&|nd| res_ok(nd) && gpu_ok(nd, ks)))
                .max()
                .unwrap_or(0)
        };
        if fitting >= n {
            return None;
        }

        let all: Vec<u32> = prefs.concat();
        let gpu_nodes: Vec<&NodeState> = if req.gpus == 0 {
            eligible.clone()
        } else {
            eligible
                .iter()
                .copied()
                .filter(|nd| gpu_ok(nd, &all))
                .collect()
        };
        let res_nodes = count(&res_ok);
        let (need, largest) = if req.gpus > 0 && gpu_nodes.len() < n {
            (gpu_text(req, false), self.largest_gpus(req, &eligible))
        } else if req.gpus == 0 || res_nodes < n {
            (
                resources_text(req),
                format!("nodes offer at most {}", most_resources(&eligible)),
            )
        } else {
            (
                format!(
                    "{} together with {}",
                    gpu_text(req, false),
                    resources_text(req)
                ),
                format!(
                    "the nodes with those GPUs offer at most {}",
                    most_resources(&gpu_nodes)
                ),
            )
        };
        Some(Never::TooSmall {
            needed,
            fitting,
            need,
            largest,
            selector: has_selector,
        })
    }

    /// What `req`, which fits the empty cluster, is waiting for. Fenced nodes count as
    /// held, not available.
    pub(crate) fn busy(&self, req: &Request) -> Busy {
        let n = req.nodes as usize;
        let prefs = self.preferences(req);
        let all: Vec<u32> = prefs.concat();
        let res_free = |nd: &NodeState| {
            nd.free_cpu() >= req.cpu_millis && nd.free_memory() >= req.memory_bytes
        };
        let gpu_free = |nd: &NodeState, kinds: &[u32]| {
            req.gpus == 0 || kinds.iter().any(|&k| nd.free_of(k) >= req.gpus)
        };
        let (mut gpu_avail, mut res_avail, mut held) = (0, 0, 0);
        let mut full = vec![0usize; prefs.len().max(1)];
        let mut other: BTreeMap<&str, usize> = BTreeMap::new();
        for (_, nd) in self.eligible(req) {
            let (g, r) = (gpu_free(nd, &all), res_free(nd));
            if nd.fenced_by.is_some() {
                held += usize::from(g && r);
                continue;
            }
            gpu_avail += usize::from(g);
            res_avail += usize::from(r);
            if req.gpus == 0 {
                full[0] += usize::from(r);
            } else {
                for (i, ks) in prefs.iter().enumerate() {
                    full[i] += usize::from(r && gpu_free(nd, ks));
                }
            }
            if req.gpus > 0 && !req.gpu_models.is_empty() && !g {
                // A node's kinds are sorted by model: count each model once per node.
                let mut last: Option<&str> = None;
                for k in nd.kinds.iter().filter(|k| k.free >= req.gpus) {
                    let Some(kind) = self.kinds.get(k.kind as usize) else {
                        continue;
                    };
                    if all.contains(&k.kind) || last == Some(kind.model.as_str()) {
                        continue;
                    }
                    last = Some(kind.model.as_str());
                    *other.entry(kind.model.as_str()).or_default() += 1;
                }
            }
        }
        let full = full.into_iter().max().unwrap_or(0);
        let (need, available) = if req.gpus > 0 && gpu_avail < n {
            (gpu_text(req, true), gpu_avail)
        } else if req.gpus == 0 || res_avail < n {
            (format!("{} free", resources_text(req)), res_avail)
        } else {
            (
                format!(
                    "{} together with {} free",
                    gpu_text(req, true),
                    resources_text(req)
                ),
                full,
            )
        };
        let other_models = other
            .into_iter()
            .max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(a.0)))
            .map(|(model, nodes)| {
                format!(
                    "{nodes} {} {} {} free {model} but the job accepts only {}",
                    plural(nodes, "node", "nodes"),
                    plural(nodes, "has", "have"),
                    req.gpus,
                    accepted_text(req)
                )
            });
        Busy {
            nodes: req.nodes,
            need,
            available,
            other_models,
            held,
            selector: req.narrowed(),
            volume_node_away: req.pin.clone().filter(|n| self.position(n).is_none()),
        }
    }

    /// The biggest single-kind GPU offer among `nodes`, preferring accepted models:
    /// `the largest offers 4 A100-40GB (40 GiB each)`.
    fn largest_gpus(&self, req: &Request, nodes: &[&NodeState]) -> String {
        let accepted = |model: &str| {
            req.gpu_models.is_empty() || req.gpu_models.iter().any(|w| model_matches(w, model))
        };
        let offers = || {
            nodes.iter().flat_map(|nd| {
                nd.kinds
                    .iter()
                    .filter_map(|k| Some((k.total, self.kinds.get(k.kind as usize)?)))
            })
        };
        let best = |only_accepted: bool| {
            offers()
                .filter(|(_, k)| !only_accepted || accepted(&k.model))
                .max_by(|a, b| {
                    (a.0, a.1.memory_bytes)
                        .cmp(&(b.0, b.1.memory_bytes))
                        .then(b.1.model.cmp(&a.1.model))
                })
        };
        match best(true).or_else(|| best(false)) {
            Some((count, kind)) => format!(
                "the largest offers {count} {} ({} each)",
                kind.model,
                bytes_text(kind.memory_bytes)
            ),
            None => "none of them has a healthy GPU".into(),
        }
    }
}

fn plural<'a>(n: usize, one: &'a str, many: &'a str) -> &'a str {
    if n == 1 { one } else { many }
}

fn selector_text(req: &Request) -> String {
    let mut text = req
        .selector
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    for (on, what) in [
        (req.pin.is_some(), "the node of its local volume"),
        (req.shared_volumes, "shared volume storage"),
    ] {
        if on {
            if !text.is_empty() {
                text.push_str(" and ");
            }
            text.push_str(what);
        }
    }
    text
}

/// `8 healthy H100 GPUs of ≥ 80 GiB`, or with `free`: `8 free healthy H100 GPUs`.
fn gpu_text(req: &Request, free: bool) -> String {
    let g = req.gpus;
    let mut s = format!("{g} {}healthy ", if free { "free " } else { "" });
    if !req.gpu_models.is_empty() {
        s.push_str(&req.gpu_models.join(" or "));
        s.push(' ');
    }
    s.push_str(if g == 1 { "GPU" } else { "GPUs" });
    if req.gpu_models.is_empty() && g > 1 {
        s.push_str(" of one model");
    }
    if req.min_gpu_memory_bytes > 0 {
        s.push_str(&format!(" of ≥ {}", bytes_text(req.min_gpu_memory_bytes)));
    }
    s
}

/// `H100 or A100 of ≥ 80 GiB`.
fn accepted_text(req: &Request) -> String {
    let mut s = req.gpu_models.join(" or ");
    if req.min_gpu_memory_bytes > 0 {
        s.push_str(&format!(" of ≥ {}", bytes_text(req.min_gpu_memory_bytes)));
    }
    s
}

/// `32 cpu and 256 GiB of memory`; a part the job does not ask for is left out.
fn resources_text(req: &Request) -> String {
    match (req.cpu_millis, req.memory_bytes) {
        (0, m) if m > 0 => format!("{} of memory", bytes_text(m)),
        (c, 0) => cpu_text(c),
        (c, m) => both_text(c, m),
    }
}

fn both_text(cpu: u64, memory: u64) -> String {
    format!("{} and {} of memory", cpu_text(cpu), bytes_text(memory))
}

/// The most cpu and the most memory any of `nodes` has (maybe on different nodes).
fn most_resources(nodes: &[&NodeState]) -> String {
    let cpu = nodes.iter().map(|n| n.cpu).max().unwrap_or(0);
    let mem = nodes.iter().map(|n| n.memory).max().unwrap_or(0);
    both_text(cpu, mem)
}

/// `8 cpu`, `1500m cpu`.
pub(crate) fn cpu_text(millis: u64) -> String {
    if millis.is_multiple_of(1000) {
        format!("{} cpu", millis / 1000)
    } else {
        format!("{millis}m cpu")
    }
}
