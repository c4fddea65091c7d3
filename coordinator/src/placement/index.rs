//! Ordered indexes over the nodes that are not fenced, so a decision does not scan the
//! cluster. Keys sort in placement preference, so the first entry that fits is the best:
//!
//! - per GPU kind and spot class: `(free GPUs of the kind, free cpu, node)`, only for nodes
//!   with at least one free GPU of the kind. A job needing g GPUs starts at `(g, cpu, 0)`:
//!   the fewest free GPUs left after placement, then the least free cpu, then the node id.
//! - per spot class, for CPU-only jobs: `(has healthy GPUs, free cpu, node)`, every node.
//!
//! Memory is checked on the entries met; a node is re-keyed (removed and inserted again)
//! on every change of its cpu, memory or GPUs.

use std::collections::BTreeSet;

use super::NodeState;

/// `(primary, free cpu, node position)`; see the module header.
pub(crate) type Key = (u32, u64, u32);

/// Spot class of a node: 0 on demand, 1 spot.
fn class(n: &NodeState) -> usize {
    usize::from(n.spot)
}

#[derive(Debug, Clone)]
pub(crate) struct Index {
    gpu: Vec<[BTreeSet<Key>; 2]>,
    cpu: [BTreeSet<Key>; 2],
}

impl Index {
    pub fn new(kinds: usize) -> Self {
        Self {
            gpu: vec![Default::default(); kinds],
            cpu: Default::default(),
        }
    }

    pub fn insert(&mut self, i: u32, n: &NodeState) {
        let c = class(n);
        for k in &n.kinds {
            if k.free > 0
                && let Some(sets) = self.gpu.get_mut(k.kind as usize)
            {
                sets[c].insert((k.free, n.free_cpu(), i));
            }
        }
        self.cpu[c].insert((u32::from(n.has_gpus), n.free_cpu(), i));
    }

    pub fn remove(&mut self, i: u32, n: &NodeState) {
        let c = class(n);
        for k in &n.kinds {
            if let Some(sets) = self.gpu.get_mut(k.kind as usize) {
                sets[c].remove(&(k.free, n.free_cpu(), i));
            }
        }
        self.cpu[c].remove(&(u32::from(n.has_gpus), n.free_cpu(), i));
    }

    /// The best node with at least `gpus` free GPUs of `kind` and `cpu` free cpu among the
    /// spot classes allowed, for which `ok` (the memory check) holds.
    pub fn best_gpu(
        &self,
        kind: u32,
        spot: bool,
        gpus: u32,
        cpu: u64,
        ok: impl Fn(u32) -> bool,
    ) -> Option<Key> {
        let sets = self.gpu.get(kind as usize)?;
        classes(spot)
            .filter_map(|c| first_fit(&sets[c], gpus, cpu, &ok))
            .min()
    }

    /// The best node for a CPU-only member.
    pub fn best_cpu(&self, spot: bool, cpu: u64, ok: impl Fn(u32) -> bool) -> Option<Key> {
        classes(spot)
            .filter_map(|c| first_fit(&self.cpu[c], 0, cpu, &ok))
            .min()
    }

    /// Every node with at least `gpus` free GPUs of `kind` and `cpu` free cpu (memory is
    /// the caller's check), in key order per class.
    pub fn all_gpu(
        &self,
        kind: u32,
        spot: bool,
        gpus: u32,
        cpu: u64,
    ) -> impl Iterator<Item = Key> + '_ {
        let sets = self.gpu.get(kind as usize);
        classes(spot).flat_map(move |c| {
            sets.into_iter()
                .flat_map(move |s| s[c].range((gpus, 0, 0)..))
                .filter(move |k| k.1 >= cpu)
                .copied()
        })
    }

    /// Every node with `cpu` free cpu, for CPU-only gangs.
    pub fn all_cpu(&self, spot: bool, cpu: u64) -> impl Iterator<Item = Key> + '_ {
        classes(spot).flat_map(move |c| self.cpu[c].iter().filter(move |k| k.1 >= cpu).copied())
    }
}

fn classes(spot: bool) -> impl Iterator<Item = usize> {
    0..if spot { 2 } else { 1 }
}

/// The first key `>= (primary, cpu, 0)` whose cpu is at least `cpu` and for which `ok`
/// holds. Entries with too little cpu are skipped a whole primary value at a time.
fn first_fit(
    set: &BTreeSet<Key>,
    primary: u32,
    cpu: u64,
    ok: &impl Fn(u32) -> bool,
) -> Option<Key> {
    let mut from = (primary, cpu, 0);
    while let Some(&k) = set.range(from..).next() {
        if k.1 < cpu {
            from = (k.0, cpu, 0);
            continue;
        }
        if ok(k.2) {
            return Some(k);
        }
        from = match k.2.checked_add(1) {
            Some(next) => (k.0, k.1, next),
            None => (k.0, k.1.checked_add(1)?, 0),
        };
    }
    None
}
