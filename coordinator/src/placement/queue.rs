//! One scheduling pass over the pending jobs, with backfill that cannot starve a big job.
//!
//! Jobs are taken by priority (higher first), then by submission order (`seq`, older
//! first). For each job:
//!
//! 1. It is placed if it fits now on nodes that are not fenced; the placement is reserved
//!    in the engine.
//! 2. If it could never run on this cluster ([`Unplaceable::Never`]) it is reported and
//!    fences nothing.
//! 3. Otherwise it is blocked, and it gets a *shadow placement*: where it would go if the
//!    cpu, memory and GPUs reserved by running jobs (the ledger, and what this pass has
//!    placed) were free, on nodes not already fenced. Among the places it could go, the
//!    shadow prefers nodes with the most of the request already free (fewest GPUs still
//!    busy, then cpu and memory free, then node id; a gang prefers one rack), so it waits
//!    for as little running work as possible. Every node of the shadow placement is
//!    **fenced** for the job: no later job of this pass is placed there at all, and later
//!    shadows avoid it. The job is reported as waiting for capacity.
//! 4. A blocked job for which no shadow placement exists outside the fences waits too,
//!    reported as waiting behind the earliest job holding a fenced node it could use.
//!
//! So a smaller, later job runs ahead only on nodes no blocked job ahead of it is waiting
//! for, and a blocked job only ever waits for work already running on its fenced nodes
//! (never for jobs queued behind it): nothing starves. Fences last for one pass; the next
//! pass computes them again from the ledger. Every placement returned stays reserved in
//! the engine.

use std::cmp::Reverse;

use gantry_shared::JobId;

use super::fit::{Cand, choose_gang};
use super::{Assignment, Engine, Request, Unplaceable};

/// A job waiting to be placed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    pub job: JobId,
    /// Higher runs first.
    pub priority: i32,
    /// Submission order: among equal priorities, lower (older) runs first.
    pub seq: u64,
    pub request: Request,
}

/// Runs one pass over `pending` (see the module header). Returns every job in the order it
/// was considered, with its assignment (reserved in `engine`) or the reason it waits.
pub fn schedule(
    engine: &mut Engine,
    pending: &[Pending],
) -> Vec<(JobId, Result<Assignment, Unplaceable>)> {
    let mut order: Vec<usize> = (0..pending.len()).collect();
    order.sort_by_key(|&i| (Reverse(pending[i].priority), pending[i].seq, i));
    let mut out = Vec::with_capacity(pending.len());
    for (pos, &i) in order.iter().enumerate() {
        let p = &pending[i];
        let result = match engine.place(&p.request) {
            Ok(a) => Ok(a),
            Err(e) if e.is_never() => Err(e),
            Err(busy) => match engine.shadow(&p.request) {
                Some(nodes) => {
                    for n in nodes {
                        engine.fence(n, pos);
                    }
                    Err(busy)
                }
                None => match engine.blocker(&p.request) {
                    Some(owner) => match order.get(owner).and_then(|&o| pending.get(o)) {
                        Some(ahead) => Err(Unplaceable::Behind {
                            job: ahead.job.clone(),
                        }),
                        None => Err(busy),
                    },
                    None => Err(busy),
                },
            },
        };
        out.push((p.job.clone(), result));
    }
    engine.clear_fences();
    out
}

impl Engine {
    /// The nodes of `req`'s shadow placement (see the module header), or `None` if it has
    /// none outside the fences. One scan per accepted model, in preference order.
    pub(crate) fn shadow(&self, req: &Request) -> Option<Vec<u32>> {
        let n = req.nodes as usize;
        if n == 0 {
            return None;
        }
        let prefs = if req.gpus == 0 {
            vec![Vec::new()]
        } else {
            self.preferences(req)
        };
        prefs.iter().find_map(|kinds| {
            let cands = self.shadow_candidates(req, kinds);
            let chosen = if n == 1 {
                vec![cands.into_iter().min_by_key(|c| c.key)?]
            } else {
                choose_gang(
                    cands,
                    n,
                    |i| self.nodes.get(i as usize).and_then(|nd| nd.rack),
                    |_, best| best.iter().map(|c| u64::from(c.key.0) + c.key.1).sum(),
                )?
            };
            Some(chosen.into_iter().map(|c| c.node).collect())
        })
    }

    /// Nodes outside the fences that `req` fits on empty, keyed by how much of it is not
    /// free now: `(GPUs still busy, 1 if cpu or memory is short, node)`.
    fn shadow_candidates(&self, req: &Request, kinds: &[u32]) -> Vec<Cand> {
        let mut out = Vec::new();
        for (i, nd) in self.eligible(req) {
            if nd.fenced_by.is_some() || nd.cpu < req.cpu_millis || nd.memory < req.memory_bytes {
                continue;
            }
            let short =
                u64::from(nd.free_cpu() < req.cpu_millis || nd.free_memory() < req.memory_bytes);
            if req.gpus == 0 {
                out.push(Cand {
                    node: i,
                    key: (0, short, i),
                    kind: None,
                });
                continue;
            }
            let best = nd
                .kinds
                .iter()
                .filter(|k| k.total >= req.gpus && kinds.contains(&k.kind))
                .map(|k| Cand {
                    node: i,
                    key: (req.gpus - k.free.min(req.gpus), short, i),
                    kind: Some(k.kind),
                })
                .min_by_key(|c| (c.key, c.kind));
            out.extend(best);
        }
        out
    }

    /// The earliest queue position holding a fenced node that `req` fits on empty.
    pub(crate) fn blocker(&self, req: &Request) -> Option<usize> {
        let prefs = self.preferences(req);
        self.eligible(req)
            .map(|(_, nd)| nd)
            .filter(|nd| {
                nd.cpu >= req.cpu_millis
                    && nd.memory >= req.memory_bytes
                    && (req.gpus == 0
                        || prefs.iter().flatten().any(|&k| nd.total_of(k) >= req.gpus))
            })
            .filter_map(|nd| nd.fenced_by)
            .min()
    }
}
