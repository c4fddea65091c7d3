//! Property tests: random clusters and job streams; the invariants are checked from the
//! inputs, not from the engine's own bookkeeping.

use std::collections::{BTreeMap, BTreeSet};

use gantry_shared::JobId;
use gantry_shared::gossip::{GpuHealth, GpuInfo};
use proptest::prelude::*;

use super::tests::{GIB, gpu, id, usage};
use super::*;

const MODELS: [(&str, u64); 3] = [
    ("H100-80GB", 80),
    ("A100-40GB", 40),
    ("NVIDIA A100 80GB", 80),
];
const WANTED: [&str; 5] = ["H100", "A100", "a100-40gb", "V100", "NVIDIA A100 80GB"];

fn gpu_strategy() -> impl Strategy<Value = (usize, u8, Option<u32>, Option<u32>)> {
    (
        0..MODELS.len(),
        0u8..10,
        proptest::option::of(0u32..2),
        proptest::option::of(0u32..2),
    )
}

prop_compose! {
    fn node_strategy()(
        cpu in 1u64..=64,
        mem in 1u64..=512,
        models in 1usize..=3,
        gpus in proptest::collection::vec(gpu_strategy(), 0..=8),
        rack in proptest::option::of(0u8..4),
        block in any::<bool>(),
        spot in 0u8..4,
        pool in any::<bool>(),
    ) -> (u64, u64, Vec<GpuInfo>, BTreeMap<String, String>) {
        let gpus = gpus.into_iter().enumerate().map(|(i, (m, health, nvlink, numa))| {
            let (model, gib) = MODELS[m % models];
            GpuInfo {
                nvlink_group: nvlink,
                numa_node: numa,
                health: match health {
                    0 => GpuHealth::Unhealthy(gantry_shared::attempt::GpuFault::Xid(79)),
                    1 => GpuHealth::Degraded("thermal".into()),
                    _ => GpuHealth::Healthy,
                },
                ..gpu(i as u32, model, gib)
            }
        }).collect();
        let mut labels = BTreeMap::new();
        if let Some(r) = rack {
            labels.insert(if block { "block" } else { "rack" }.to_string(), format!("r{r}"));
        }
        if spot == 0 {
            labels.insert("spot".into(), "true".into());
        }
        if pool {
            labels.insert("pool".into(), "train".into());
        }
        (cpu * 1000, mem * GIB, gpus, labels)
    }
}

prop_compose! {
    fn cluster_strategy()(
        nodes in proptest::collection::vec(node_strategy(), 1..=40),
        ledger_seed in proptest::collection::vec((any::<u8>(), any::<u8>(), any::<u8>()), 40),
    ) -> (Vec<NodeInfo>, Vec<(NodeId, u64, u64, Vec<u32>)>) {
        let mut infos = Vec::new();
        let mut ledger = Vec::new();
        for (i, (cpu, mem, gpus, labels)) in nodes.into_iter().enumerate() {
            let (c, m, g) = ledger_seed[i];
            let taken: Vec<u32> = gpus.iter().map(|x| x.index).filter(|x| g & (1 << x) != 0).collect();
            let nid = id(&format!("node-{i:02}"));
            // Part of the cpu and memory, in one or two entries.
            let (cpu_held, mem_held) = (cpu * u64::from(c % 5) / 5, mem * u64::from(m % 5) / 5);
            ledger.push((nid.clone(), cpu_held / 2, mem_held / 2, taken));
            ledger.push((nid.clone(), cpu_held - cpu_held / 2, mem_held - mem_held / 2, vec![]));
            // Every third node declares shared volume storage.
            infos.push(NodeInfo { id: nid, cpu_millis: cpu, memory_bytes: mem, labels, gpus, shared_volumes: i % 3 == 0 });
        }
        (infos, ledger)
    }
}

prop_compose! {
    fn request_strategy()(
        nodes in prop_oneof![6 => Just(1u32), 1 => 2u32..=4],
        gpus in prop_oneof![3 => 0u32..=2, 1 => 3u32..=8],
        cpu in 0u64..=16,
        mem in 0u64..=64,
        wanted in proptest::collection::vec(0..WANTED.len(), 0..=2),
        min_mem in prop_oneof![4 => Just(0u64), 1 => Just(40), 1 => Just(80)],
        selector in prop_oneof![
            4 => Just(None),
            1 => Just(Some(("rack", "r1"))),
            1 => Just(Some(("pool", "train"))),
        ],
        spot in any::<bool>(),
        priority in -1i32..=1,
        // A local volume's node (some beyond the cluster), a shared volume.
        pin in prop_oneof![6 => Just(None), 1 => (0usize..48).prop_map(Some)],
        shared_volumes in prop_oneof![5 => Just(false), 1 => Just(true)],
    ) -> (i32, Request) {
        (priority, Request {
            nodes,
            cpu_millis: cpu * 500,
            memory_bytes: mem * GIB / 2,
            gpus,
            gpu_models: wanted.into_iter().map(|w| WANTED[w].to_string()).collect(),
            min_gpu_memory_bytes: min_mem * GIB,
            selector: selector.into_iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            spot,
            pin: pin.map(|i| id(&format!("node-{i:02}"))),
            shared_volumes,
        })
    }
}

/// Checks every invariant of one pass against the inputs.
fn check(
    nodes: &[NodeInfo],
    ledger: &[(NodeId, u64, u64, Vec<u32>)],
    pending: &[Pending],
    decisions: &[(JobId, Result<Assignment, Unplaceable>)],
    after: &Engine,
) -> Result<(), TestCaseError> {
    let by_id: BTreeMap<&NodeId, &NodeInfo> = nodes.iter().map(|n| (&n.id, n)).collect();
    let requests: BTreeMap<&JobId, &Request> =
        pending.iter().map(|p| (&p.job, &p.request)).collect();
    let mut cpu: BTreeMap<&NodeId, u64> = BTreeMap::new();
    let mut mem: BTreeMap<&NodeId, u64> = BTreeMap::new();
    let mut taken: BTreeMap<&NodeId, BTreeSet<u32>> = BTreeMap::new();
    for (n, c, m, g) in ledger {
        *cpu.entry(n).or_default() += c;
        *mem.entry(n).or_default() += m;
        taken.entry(n).or_default().extend(g.iter().copied());
    }
    prop_assert_eq!(decisions.len(), pending.len());
    for (job, decision) in decisions {
        let req = requests[job];
        let Ok(a) = decision else { continue };
        prop_assert_eq!(a.members.len(), req.nodes as usize, "whole gang");
        let distinct: BTreeSet<&NodeId> = a.members.iter().map(|m| &m.node).collect();
        prop_assert_eq!(distinct.len(), a.members.len(), "distinct nodes");
        for m in &a.members {
            let node = by_id[&m.node];
            prop_assert!(req.spot || node.labels.get("spot").is_none_or(|v| v != "true"));
            prop_assert!(
                req.pin.as_ref().is_none_or(|p| *p == m.node),
                "on its volume's node"
            );
            prop_assert!(!req.shared_volumes || node.shared_volumes, "shared storage");
            for (k, v) in &req.selector {
                prop_assert_eq!(node.labels.get(k), Some(v));
            }
            prop_assert_eq!(m.gpus.len(), req.gpus as usize);
            prop_assert!(m.gpus.windows(2).all(|w| w[0] < w[1]), "ascending");
            let infos: Vec<&GpuInfo> = m
                .gpus
                .iter()
                .filter_map(|g| node.gpus.iter().find(|x| x.index == *g))
                .collect();
            prop_assert_eq!(infos.len(), m.gpus.len(), "GPUs exist");
            for g in &infos {
                prop_assert!(!g.health.is_unhealthy(), "healthy only");
                prop_assert!(g.memory_bytes >= req.min_gpu_memory_bytes);
                prop_assert!(
                    req.gpu_models.is_empty()
                        || req.gpu_models.iter().any(|w| model_matches(w, &g.model))
                );
                prop_assert_eq!(&g.model, &infos[0].model, "one model per member");
                prop_assert!(
                    taken.entry(&m.node).or_default().insert(g.index),
                    "GPU twice"
                );
            }
            *cpu.entry(&m.node).or_default() += req.cpu_millis;
            *mem.entry(&m.node).or_default() += req.memory_bytes;
        }
    }
    for n in nodes {
        prop_assert!(cpu.get(&n.id).copied().unwrap_or(0) <= n.cpu_millis, "cpu");
        prop_assert!(
            mem.get(&n.id).copied().unwrap_or(0) <= n.memory_bytes,
            "memory"
        );
    }
    // The engine holds exactly the ledger plus what was placed: nothing partial.
    for (nid, (c, m, g)) in usage(after) {
        prop_assert_eq!(c, cpu.get(&nid).copied().unwrap_or(0));
        prop_assert_eq!(m, mem.get(&nid).copied().unwrap_or(0));
        let held: Vec<u32> = taken
            .get(&nid)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default();
        prop_assert_eq!(g, held);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn schedule_never_oversubscribes_and_is_deterministic(
        (nodes, ledger) in cluster_strategy(),
        jobs in proptest::collection::vec(request_strategy(), 1..=30),
    ) {
        let pending: Vec<Pending> = jobs
            .into_iter()
            .enumerate()
            .map(|(i, (priority, request))| Pending {
                job: JobId::from_sequence(i as u64),
                priority,
                seq: i as u64,
                request,
            })
            .collect();
        let mut engine = Engine::new(nodes.clone(), ledger.clone());
        let decisions = schedule(&mut engine, &pending);
        check(&nodes, &ledger, &pending, &decisions, &engine)?;
        prop_assert!(engine.fenced.is_empty());
        let mut again = Engine::new(nodes.clone(), ledger.clone());
        prop_assert_eq!(schedule(&mut again, &pending), decisions);
    }

    #[test]
    fn never_means_not_even_on_the_empty_cluster(
        (nodes, _ledger) in cluster_strategy(),
        (_, request) in request_strategy(),
    ) {
        let mut empty = Engine::new(nodes, Vec::<(NodeId, u64, u64, Vec<u32>)>::new());
        let fits = empty.would_fit_empty(&request);
        match empty.place(&request) {
            Ok(_) => prop_assert!(fits),
            Err(e) => {
                prop_assert!(!fits);
                prop_assert!(e.is_never(), "{}", e);
            }
        }
    }

    #[test]
    fn place_then_release_restores_the_ledger(
        (nodes, ledger) in cluster_strategy(),
        jobs in proptest::collection::vec(request_strategy(), 1..=30),
    ) {
        let mut engine = Engine::new(nodes, ledger);
        let before = usage(&engine);
        let placed: Vec<(Assignment, Request)> = jobs
            .into_iter()
            .filter_map(|(_, r)| engine.place(&r).ok().map(|a| (a, r)))
            .collect();
        for (a, r) in placed.iter().rev() {
            engine.release(a, r);
        }
        prop_assert_eq!(usage(&engine), before);
    }
}
