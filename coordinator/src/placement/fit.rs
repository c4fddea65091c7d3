//! Finding a place: model matching, candidate nodes (from the index, or a scan when the job
//! has a selector), the gang's choice of nodes, and the GPUs within a node. Nothing here
//! reserves; [`Engine::place`] does, after a whole assignment has been found.

use std::cmp::Reverse;
use std::collections::BTreeMap;

use super::index::Key;
use super::{Assignment, Engine, Member, Request, Slot};

/// Whether a requested model name matches a GPU's model: equal ignoring ASCII case, or
/// contained in it (ignoring ASCII case) as a whole token, where any byte that is not an
/// ASCII letter or digit is a boundary. `H100` matches `NVIDIA H100 80GB HBM3` and
/// `H100-80GB`; `A100` does not match `A100X`. An empty request matches nothing.
pub fn model_matches(requested: &str, model: &str) -> bool {
    let (r, m) = (requested.as_bytes(), model.as_bytes());
    if r.is_empty() || r.len() > m.len() {
        return false;
    }
    let boundary = |i: usize| m.get(i).is_none_or(|b| !b.is_ascii_alphanumeric());
    m.windows(r.len()).enumerate().any(|(start, w)| {
        w.eq_ignore_ascii_case(r)
            && (start == 0 || boundary(start - 1))
            && boundary(start + r.len())
    })
}

/// A node that can take one member: its position, its score (lower is better; see
/// [`super::index`]) and the GPU kind it would use (`None` for CPU-only members).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Cand {
    pub node: u32,
    pub key: Key,
    pub kind: Option<u32>,
}

impl Engine {
    /// The sets of GPU kinds to try, in the job's preference order: per requested model,
    /// the kinds of that model with enough memory; one set of every kind with enough memory
    /// when any model is accepted.
    pub(crate) fn preferences(&self, req: &Request) -> Vec<Vec<u32>> {
        let kinds = || {
            self.kinds
                .iter()
                .enumerate()
                .filter(|(_, k)| k.memory_bytes >= req.min_gpu_memory_bytes)
        };
        if req.gpu_models.is_empty() {
            return vec![kinds().map(|(i, _)| i as u32).collect()];
        }
        req.gpu_models
            .iter()
            .map(|want| {
                kinds()
                    .filter(|(_, k)| model_matches(want, &k.model))
                    .map(|(i, _)| i as u32)
                    .collect()
            })
            .collect()
    }

    /// The assignment `place` would make now, without reserving it.
    pub(crate) fn find(&self, req: &Request) -> Option<Assignment> {
        if req.nodes == 0 || req.nodes as usize > self.nodes.len() {
            return None;
        }
        if req.gpus == 0 {
            return self.find_with(req, &[]);
        }
        self.preferences(req)
            .iter()
            .filter(|kinds| !kinds.is_empty())
            .find_map(|kinds| self.find_with(req, kinds))
    }

    /// A whole assignment using only `kinds` (ignored for CPU-only jobs).
    fn find_with(&self, req: &Request, kinds: &[u32]) -> Option<Assignment> {
        let chosen = if req.nodes == 1 {
            vec![self.best_one(req, kinds)?]
        } else {
            let cands = self.candidates(req, kinds);
            choose_gang(
                cands,
                req.nodes as usize,
                |n| self.nodes.get(n as usize).and_then(|n| n.rack),
                |rack, _| self.rack_free.get(rack as usize).copied().unwrap_or(0),
            )?
        };
        let mut members = Vec::with_capacity(chosen.len());
        for c in chosen {
            let node = self.nodes.get(c.node as usize)?;
            let gpus = match c.kind {
                Some(kind) => pick_gpus(&node.gpus, kind, req.gpus)?,
                None => Vec::new(),
            };
            members.push(Member {
                node: node.id.clone(),
                gpus,
            });
        }
        Some(Assignment { members })
    }

    fn mem_ok(&self, req: &Request) -> impl Fn(u32) -> bool + '_ {
        let need = req.memory_bytes;
        move |i| {
            self.nodes
                .get(i as usize)
                .is_some_and(|n| n.free_memory() >= need)
        }
    }

    /// The best node for a single-node job.
    fn best_one(&self, req: &Request, kinds: &[u32]) -> Option<Cand> {
        if req.narrowed() {
            return self.scan(req, kinds).into_iter().min_by_key(|c| c.key);
        }
        let ok = self.mem_ok(req);
        if req.gpus == 0 {
            let key = self.index.best_cpu(req.spot, req.cpu_millis, ok)?;
            return Some(Cand {
                node: key.2,
                key,
                kind: None,
            });
        }
        kinds
            .iter()
            .filter_map(|&kind| {
                let key = self
                    .index
                    .best_gpu(kind, req.spot, req.gpus, req.cpu_millis, &ok)?;
                Some(Cand {
                    node: key.2,
                    key,
                    kind: Some(kind),
                })
            })
            .min_by_key(|c| (c.key, c.kind))
    }

    /// Every node that can take one member now, one candidate per node (its best kind).
    fn candidates(&self, req: &Request, kinds: &[u32]) -> Vec<Cand> {
        if req.narrowed() {
            return self.scan(req, kinds);
        }
        let ok = self.mem_ok(req);
        let mut out: Vec<Cand> = if req.gpus == 0 {
            self.index
                .all_cpu(req.spot, req.cpu_millis)
                .filter(|k| ok(k.2))
                .map(|key| Cand {
                    node: key.2,
                    key,
                    kind: None,
                })
                .collect()
        } else {
            kinds
                .iter()
                .flat_map(|&kind| {
                    self.index
                        .all_gpu(kind, req.spot, req.gpus, req.cpu_millis)
                        .map(move |key| Cand {
                            node: key.2,
                            key,
                            kind: Some(kind),
                        })
                })
                .filter(|c| ok(c.node))
                .collect()
        };
        // A node with several fitting kinds: keep its best.
        out.sort_by_key(|c| (c.node, c.key, c.kind));
        out.dedup_by_key(|c| c.node);
        out
    }

    /// The candidates by a scan over every node (jobs with a selector).
    fn scan(&self, req: &Request, kinds: &[u32]) -> Vec<Cand> {
        let mut out = Vec::new();
        for (i, n) in self.eligible(req) {
            if n.fenced_by.is_some()
                || n.free_cpu() < req.cpu_millis
                || n.free_memory() < req.memory_bytes
            {
                continue;
            }
            if req.gpus == 0 {
                out.push(Cand {
                    node: i,
                    key: (u32::from(n.has_gpus), n.free_cpu(), i),
                    kind: None,
                });
                continue;
            }
            let best = n
                .kinds
                .iter()
                .filter(|k| k.free >= req.gpus && kinds.contains(&k.kind))
                .map(|k| Cand {
                    node: i,
                    key: (k.free, n.free_cpu(), i),
                    kind: Some(k.kind),
                })
                .min_by_key(|c| (c.key, c.kind));
            out.extend(best);
        }
        out
    }
}

/// Chooses `n` distinct nodes for a gang from `cands` (at most one per node). If some
/// rack has at least `n` candidates, the rack with the lowest `rack_cost` (given the rack's
/// best `n` candidates; ties to the lower rack name) takes the gang, its best `n` nodes by
/// key. Otherwise the candidates are taken from racks with more candidates first (then
/// by rack name, nodes without a rack last), each rack's best first. `None` with fewer
/// than `n` candidates.
pub(crate) fn choose_gang(
    mut cands: Vec<Cand>,
    n: usize,
    rack: impl Fn(u32) -> Option<u32>,
    rack_cost: impl Fn(u32, &[Cand]) -> u64,
) -> Option<Vec<Cand>> {
    if n == 0 || cands.len() < n {
        return None;
    }
    cands.sort_by_key(|c| c.key);
    let mut by_rack: BTreeMap<u32, Vec<Cand>> = BTreeMap::new();
    for c in &cands {
        if let Some(r) = rack(c.node) {
            by_rack.entry(r).or_default().push(*c);
        }
    }
    let whole = by_rack
        .iter()
        .filter(|(_, v)| v.len() >= n)
        .min_by_key(|(r, v)| (rack_cost(**r, &v[..n]), **r));
    if let Some((_, v)) = whole {
        return Some(v[..n].to_vec());
    }
    cands.sort_by_key(|c| {
        let r = rack(c.node);
        let size = r.and_then(|r| by_rack.get(&r)).map_or(0, Vec::len);
        (Reverse(size), r.is_none(), r, c.key)
    });
    cands.truncate(n);
    Some(cands)
}

/// `count` free GPUs of `kind` among `slots` (sorted by index): all in one NVLink group
/// (the group with the fewest free GPUs of the kind that still fits, ties to the lower
/// indices), else all in one NUMA node by the same rule, else the lowest indices.
/// Ascending; `None` if fewer than `count` are free.
pub(crate) fn pick_gpus(slots: &[Slot], kind: u32, count: u32) -> Option<Vec<u32>> {
    let free: Vec<&Slot> = slots
        .iter()
        .filter(|s| !s.reserved && s.kind == Some(kind))
        .collect();
    let count = count as usize;
    if free.len() < count {
        return None;
    }
    let groupings: [fn(&Slot) -> Option<u32>; 2] = [|s| s.nvlink, |s| s.numa];
    for group_of in groupings {
        let mut groups: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
        for s in &free {
            if let Some(g) = group_of(s) {
                groups.entry(g).or_default().push(s.index);
            }
        }
        if let Some(v) = groups
            .into_values()
            .filter(|v| v.len() >= count)
            .min_by_key(|v| (v.len(), v.first().copied()))
        {
            return Some(v[..count].to_vec());
        }
    }
    Some(free[..count].iter().map(|s| s.index).collect())
}
