//! Unit tests of single placements: constraints, scoring, GPU choice, gangs, messages.

use std::collections::BTreeMap;

use gantry_shared::NodeId;
use gantry_shared::gossip::{GpuHealth, GpuInfo};

use super::*;

pub(super) const GIB: u64 = 1 << 30;

pub(super) fn id(s: &str) -> NodeId {
    NodeId::new(s).expect("valid node id")
}

pub(super) fn gpu(index: u32, model: &str, gib: u64) -> GpuInfo {
    GpuInfo {
        index,
        uuid: format!("GPU-{index}"),
        model: model.into(),
        memory_bytes: gib * GIB,
        pci_bus_id: String::new(),
        numa_node: None,
        nvlink_group: None,
        health: GpuHealth::Healthy,
        simulated: true,
    }
}

/// Eight GPUs of one model: NVLink groups {0-3} and {4-7}, NUMA nodes likewise.
pub(super) fn eight(model: &str, gib: u64) -> Vec<GpuInfo> {
    (0..8)
        .map(|i| GpuInfo {
            nvlink_group: Some(i / 4),
            numa_node: Some(i / 4),
            ..gpu(i, model, gib)
        })
        .collect()
}

pub(super) fn node(name: &str, labels: &[(&str, &str)], gpus: Vec<GpuInfo>) -> NodeInfo {
    NodeInfo {
        id: id(name),
        cpu_millis: 64_000,
        memory_bytes: 512 * GIB,
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        gpus,
        shared_volumes: false,
    }
}

pub(super) type Held = (NodeId, u64, u64, Vec<u32>);

pub(super) fn held(name: &str, gpus: &[u32]) -> Held {
    (id(name), 0, 0, gpus.to_vec())
}

pub(super) fn engine(nodes: Vec<NodeInfo>, ledger: Vec<Held>) -> Engine {
    Engine::new(nodes, ledger)
}

/// A request for `gpus` GPUs of `models` (1 cpu, 1 GiB) on one node.
pub(super) fn req(gpus: u32, models: &[&str]) -> Request {
    Request {
        cpu_millis: 1000,
        memory_bytes: GIB,
        gpus,
        gpu_models: models.iter().map(|m| m.to_string()).collect(),
        ..Request::default()
    }
}

/// What the engine has taken per node: cpu, memory, reserved GPUs.
pub(super) fn usage(e: &Engine) -> BTreeMap<NodeId, (u64, u64, Vec<u32>)> {
    e.nodes
        .iter()
        .map(|n| {
            let gpus = n.gpus.iter().filter(|s| s.reserved).map(|s| s.index);
            (n.id.clone(), (n.used_cpu, n.used_memory, gpus.collect()))
        })
        .collect()
}

fn placed(e: &mut Engine, r: &Request) -> Vec<(String, Vec<u32>)> {
    let a = e.place(r).expect("placed");
    a.members
        .into_iter()
        .map(|m| (m.node.to_string(), m.gpus))
        .collect()
}

fn one(e: &mut Engine, r: &Request) -> (String, Vec<u32>) {
    placed(e, r).remove(0)
}

fn message(e: &mut Engine, r: &Request) -> String {
    e.place(r).expect_err("not placed").to_string()
}

#[test]
fn model_names_match_whole_tokens_ignoring_case() {
    assert!(model_matches("H100", "NVIDIA H100 80GB HBM3"));
    assert!(model_matches("H100", "H100-80GB"));
    assert!(model_matches("h100", "H100"));
    assert!(model_matches("A100", "NVIDIA A100-SXM4-40GB"));
    assert!(model_matches("a100-sxm4", "NVIDIA A100-SXM4-40GB"));
    assert!(!model_matches("A100", "A100X"));
    assert!(!model_matches("A100", "NVIDIA A1000"));
    assert!(!model_matches("100", "H100"));
    assert!(!model_matches("", "H100"));
}

#[test]
fn falls_back_to_the_next_model_only_when_the_first_has_no_room() {
    let nodes = || {
        vec![
            node("a", &[], eight("A100-40GB", 40)),
            node("h", &[], eight("H100-80GB", 80)),
        ]
    };
    let r = req(2, &["H100", "A100"]);
    let mut both_free = engine(nodes(), vec![]);
    assert_eq!(one(&mut both_free, &r).0, "h");
    let mut h_full = engine(nodes(), vec![held("h", &[0, 1, 2, 3, 4, 5, 6, 7])]);
    assert_eq!(one(&mut h_full, &r), ("a".into(), vec![0, 1]));
}

#[test]
fn no_acceptable_model_is_never_and_names_what_exists() {
    let mut e = engine(vec![node("v", &[], eight("V100-16GB", 16))], vec![]);
    let err = e
        .place(&req(1, &["H100", "A100"]))
        .expect_err("no such model");
    assert!(err.is_never());
    assert_eq!(
        err.to_string(),
        "no node has 1 healthy H100 or A100 GPU; the largest offers 8 V100-16GB (16 GiB each)"
    );
    assert!(!e.would_fit_empty(&req(1, &["H100", "A100"])));
}

#[test]
fn min_gpu_memory_is_a_hard_constraint() {
    let nodes = vec![
        node("a40", &[], eight("A100", 40)),
        node("a80", &[], eight("A100", 80)),
    ];
    let mut e = engine(nodes, vec![]);
    let mut r = req(2, &["A100"]);
    r.min_gpu_memory_bytes = 80 * GIB;
    assert_eq!(one(&mut e, &r).0, "a80");
    r.min_gpu_memory_bytes = 96 * GIB;
    r.gpus = 8;
    assert_eq!(
        message(&mut e, &r),
        "no node has 8 healthy A100 GPUs of ≥ 96 GiB; the largest offers 8 A100 (80 GiB each)"
    );
}

#[test]
fn selector_labels_must_all_match() {
    let nodes = vec![
        node("n1", &[("rack", "r1"), ("zone", "a")], eight("H100", 80)),
        node("n2", &[("rack", "r1"), ("zone", "b")], eight("H100", 80)),
        node("n3", &[("rack", "r2"), ("zone", "a")], eight("H100", 80)),
    ];
    let mut e = engine(nodes, vec![held("n1", &[0])]);
    let mut r = req(1, &[]);
    r.selector = [("rack".into(), "r1".into()), ("zone".into(), "b".into())].into();
    assert_eq!(one(&mut e, &r).0, "n2");
    r.selector = [("rack".into(), "r9".into())].into();
    assert_eq!(
        message(&mut e, &r),
        "no node matches the selector rack=r9; `gantry nodes show NODE` lists a node's labels"
    );
    r.selector = [("rack".into(), "r1".into())].into();
    r.nodes = 3;
    assert_eq!(
        message(&mut e, &r),
        "the job needs 3 nodes but only 2 match the selector rack=r1"
    );
}

#[test]
fn only_spot_tolerant_jobs_use_spot_nodes() {
    let nodes = vec![
        node("od", &[], eight("H100", 80)),
        node("sp", &[("spot", "true")], eight("H100", 80)),
    ];
    // The on-demand node is the better pack (partly used), yet a spot job may use either.
    let mut e = engine(nodes, vec![held("od", &[0, 1, 2, 3, 4, 5])]);
    let mut spot = req(2, &["H100"]);
    spot.spot = true;
    assert_eq!(one(&mut e, &spot).0, "od");
    assert_eq!(one(&mut e, &spot).0, "sp");
    // The on-demand node is full now: a job that is not spot-tolerant waits.
    let err = e.place(&req(1, &["H100"])).expect_err("only spot room");
    assert!(!err.is_never(), "{err}");
    assert_eq!(
        err.to_string(),
        "waiting for capacity: no node has 1 free healthy H100 GPU"
    );

    let mut all_spot = engine(
        vec![node("sp", &[("spot", "true")], eight("H100", 80))],
        vec![],
    );
    assert_eq!(
        message(&mut all_spot, &req(1, &[])),
        "the job is not spot-tolerant and every node is a spot node; mark the job \
         spot-tolerant or add on-demand nodes"
    );
}

#[test]
fn unhealthy_gpus_are_never_chosen() {
    let mut gpus = eight("H100", 80);
    for g in &mut gpus[..3] {
        g.health = GpuHealth::Unhealthy(gantry_shared::attempt::GpuFault::Xid(79));
    }
    gpus[3].health = GpuHealth::Degraded("thermal".into());
    let mut e = engine(vec![node("n", &[], gpus)], vec![]);
    // Group {0-3} has only GPU 3 left: the pair comes from {4-7}, the rest is spread.
    assert_eq!(one(&mut e, &req(2, &[])).1, vec![4, 5]);
    assert_eq!(one(&mut e, &req(3, &[])).1, vec![3, 6, 7]);
    assert!(!e.would_fit_empty(&req(6, &[])));
    assert_eq!(
        message(&mut e, &req(6, &[])),
        "no node has 6 healthy GPUs of one model; the largest offers 5 H100 (80 GiB each)"
    );
    assert_eq!(
        message(&mut e, &req(1, &[])),
        "waiting for capacity: no node has 1 free healthy GPU"
    );
}

#[test]
fn gpus_stay_within_one_nvlink_group_and_keep_big_groups_whole() {
    let nodes = || vec![node("n", &[], eight("H100", 80))];
    let ledger = || vec![held("n", &[0, 1])];
    assert_eq!(
        one(&mut engine(nodes(), ledger()), &req(4, &[])).1,
        vec![4, 5, 6, 7]
    );
    assert_eq!(
        one(&mut engine(nodes(), ledger()), &req(2, &[])).1,
        vec![2, 3]
    );
    assert_eq!(one(&mut engine(nodes(), ledger()), &req(1, &[])).1, vec![2]);
    // Neither group has 5 free: the lowest indices.
    assert_eq!(
        one(&mut engine(nodes(), ledger()), &req(5, &[])).1,
        vec![2, 3, 4, 5, 6]
    );
}

#[test]
fn numa_groups_are_the_fallback_without_nvlink() {
    let gpus: Vec<GpuInfo> = eight("A100", 40)
        .into_iter()
        .map(|g| GpuInfo {
            nvlink_group: None,
            ..g
        })
        .collect();
    let nodes = || vec![node("n", &[], gpus.clone())];
    let mut e = engine(nodes(), vec![held("n", &[0])]);
    assert_eq!(one(&mut e, &req(4, &[])).1, vec![4, 5, 6, 7]);
    let mut e = engine(nodes(), vec![held("n", &[0])]);
    assert_eq!(one(&mut e, &req(3, &[])).1, vec![1, 2, 3]);
    // No topology at all: the lowest free indices.
    let flat: Vec<GpuInfo> = (0..4).map(|i| gpu(i, "A100", 40)).collect();
    let mut e = engine(vec![node("n", &[], flat)], vec![held("n", &[1])]);
    assert_eq!(one(&mut e, &req(2, &[])).1, vec![0, 2]);
}

#[test]
fn gpu_jobs_pack_onto_partly_used_nodes() {
    let nodes = vec![
        node("a", &[], eight("H100", 80)),
        node("b", &[], eight("H100", 80)),
        node("c", &[], eight("H100", 80)),
    ];
    let mut e = engine(nodes, vec![held("b", &[0, 1, 2]), held("c", &[0])]);
    assert_eq!(one(&mut e, &req(1, &[])), ("b".into(), vec![3]));
    // b has 4 left, c 7: a 5-GPU job goes to c, an 8-GPU job to a.
    assert_eq!(one(&mut e, &req(5, &[])).0, "c");
    assert_eq!(one(&mut e, &req(8, &[])).0, "a");
}

#[test]
fn ties_go_to_less_free_cpu_then_node_id() {
    let mut small = node("z", &[], eight("H100", 80));
    small.cpu_millis = 16_000;
    let nodes = vec![
        node("x", &[], eight("H100", 80)),
        node("y", &[], eight("H100", 80)),
        small,
    ];
    let mut e = engine(nodes, vec![]);
    assert_eq!(one(&mut e, &req(8, &[])).0, "z");
    assert_eq!(one(&mut e, &req(8, &[])).0, "x");
}

#[test]
fn cpu_only_jobs_prefer_nodes_without_gpus() {
    let mut cpu_small = node("c1", &[], vec![]);
    cpu_small.cpu_millis = 8_000;
    let nodes = vec![
        node("c0", &[], vec![]),
        cpu_small,
        node("g", &[], eight("H100", 80)),
    ];
    let mut e = engine(nodes, vec![]);
    let mut r = req(0, &["H100"]);
    r.cpu_millis = 6_000;
    assert_eq!(one(&mut e, &r), ("c1".into(), vec![]));
    assert_eq!(one(&mut e, &r).0, "c0");
    r.cpu_millis = 60_000;
    assert_eq!(one(&mut e, &r).0, "g");
    assert_eq!(
        message(&mut e, &r),
        "waiting for capacity: no node has 60 cpu and 1 GiB of memory free"
    );
    r.cpu_millis = 100_000;
    r.memory_bytes = 0;
    assert_eq!(
        message(&mut e, &r),
        "no node has 100 cpu; nodes offer at most 64 cpu and 512 GiB of memory"
    );
}

#[test]
fn cpu_and_memory_are_never_oversubscribed() {
    let mut n = node("n", &[], eight("H100", 80));
    n.cpu_millis = 4_000;
    n.memory_bytes = 8 * GIB;
    let mut e = Engine::new(vec![n], vec![(id("n"), 1_500, 2 * GIB, vec![])]);
    let mut r = req(1, &[]);
    r.cpu_millis = 1_000;
    r.memory_bytes = 3 * GIB;
    assert!(e.place(&r).is_ok());
    assert!(e.place(&r).is_ok());
    let err = e.place(&r).expect_err("memory is used up");
    assert_eq!(
        err.to_string(),
        "waiting for capacity: no node has 1 cpu and 3 GiB of memory free"
    );
    assert_eq!(usage(&e)[&id("n")], (3_500, 8 * GIB, vec![0, 1]));
}

#[test]
fn gang_members_are_on_distinct_nodes() {
    let mut big = node("big", &[], eight("H100", 80));
    big.gpus.extend((8..16).map(|i| gpu(i, "H100", 80)));
    let nodes = vec![big, node("small", &[], eight("H100", 80))];
    let mut e = engine(nodes, vec![]);
    let mut r = req(8, &["H100"]);
    r.nodes = 2;
    let members = placed(&mut e, &r);
    assert_eq!(members.len(), 2);
    assert_ne!(members[0].0, members[1].0);
    r.nodes = 3;
    assert_eq!(
        message(&mut e, &r),
        "the job needs 3 nodes but the cluster has only 2 ready nodes"
    );
}

#[test]
fn a_gang_prefers_one_rack_with_the_fewest_free_gpus() {
    let mut nodes = Vec::new();
    // r1: 2 free nodes (ids first). r2: 3 free nodes plus a busy one. r3: 3 free + 1 free.
    for n in ["a1", "a2"] {
        nodes.push(node(n, &[("rack", "r1")], eight("H100", 80)));
    }
    for n in ["b1", "b2", "b3", "b4"] {
        nodes.push(node(n, &[("rack", "r2")], eight("H100", 80)));
    }
    for n in ["c1", "c2", "c3", "c4"] {
        nodes.push(node(n, &[("block", "r3")], eight("H100", 80)));
    }
    let mut e = engine(nodes, vec![held("b4", &[0, 1, 2, 3, 4, 5, 6, 7])]);
    let mut r = req(8, &[]);
    r.nodes = 3;
    let names: Vec<String> = placed(&mut e, &r).into_iter().map(|m| m.0).collect();
    assert_eq!(names, ["b1", "b2", "b3"]);
    let names: Vec<String> = placed(&mut e, &r).into_iter().map(|m| m.0).collect();
    assert_eq!(names, ["c1", "c2", "c3"]);
    // Now no rack has 3 free nodes: the best nodes overall, bigger racks first.
    let names: Vec<String> = placed(&mut e, &r).into_iter().map(|m| m.0).collect();
    assert_eq!(names, ["a1", "a2", "c4"]);
}

#[test]
fn a_gang_is_placed_whole_or_not_at_all() {
    let nodes = vec![
        node("n1", &[], eight("H100", 80)),
        node("n2", &[], eight("H100", 80)),
        node("n3", &[], eight("H100", 80)),
    ];
    let mut e = engine(nodes, vec![held("n3", &[7])]);
    let before = usage(&e);
    let mut r = req(8, &["H100"]);
    r.nodes = 3;
    let err = e.place(&r).expect_err("only two nodes have 8 free");
    assert_eq!(
        err.to_string(),
        "waiting for capacity: the job needs 3 nodes with 8 free healthy H100 GPUs each, \
         and only 2 nodes have that"
    );
    assert_eq!(usage(&e), before);
}

#[test]
fn release_gives_back_exactly_what_place_took() {
    let nodes = vec![
        node("n1", &[("rack", "r")], eight("H100", 80)),
        node("n2", &[("rack", "r")], eight("H100", 80)),
    ];
    let mut e = engine(nodes, vec![held("n1", &[0])]);
    let before = usage(&e);
    let mut r = req(4, &[]);
    r.nodes = 2;
    let a = e.place(&r).expect("fits");
    assert_ne!(usage(&e), before);
    e.release(&a, &r);
    assert_eq!(usage(&e), before);
    assert_eq!(e.place(&r).expect("fits again"), a);
}

#[test]
fn decisions_are_deterministic_whatever_the_input_order() {
    let mut nodes: Vec<NodeInfo> = (0..12)
        .map(|i| {
            node(
                &format!("n{i:02}"),
                &[("rack", if i % 3 == 0 { "r0" } else { "r1" })],
                eight(if i % 2 == 0 { "H100" } else { "A100" }, 80),
            )
        })
        .collect();
    let jobs: Vec<Request> = (0..30)
        .map(|i| Request {
            nodes: 1 + i % 3,
            gpus: [1, 2, 4, 8, 0][i as usize % 5],
            gpu_models: if i % 4 == 0 {
                vec!["A100".into()]
            } else {
                vec![]
            },
            ..req(0, &[])
        })
        .collect();
    let run = |nodes: Vec<NodeInfo>| {
        let mut e = engine(nodes, vec![held("n03", &[1, 2])]);
        jobs.iter().map(|r| e.place(r)).collect::<Vec<_>>()
    };
    let first = run(nodes.clone());
    nodes.reverse();
    assert_eq!(run(nodes), first);
}

#[test]
fn never_and_busy_messages_say_what_to_do() {
    let nodes = vec![
        node("a", &[], eight("A100-40GB", 40)),
        node("h", &[], eight("H100-80GB", 80)),
    ];
    let mut e = engine(nodes, vec![held("h", &[0])]);
    let err = e
        .place(&req(8, &["H100"]))
        .expect_err("H100 node partly used");
    assert!(!err.is_never());
    assert_eq!(
        err.to_string(),
        "waiting for capacity: no node has 8 free healthy H100 GPUs; 1 node has 8 free \
         A100-40GB but the job accepts only H100"
    );
    let mut r = req(8, &["H100"]);
    r.min_gpu_memory_bytes = 80 * GIB;
    r.nodes = 2;
    let err = e.place(&r).expect_err("one H100 node");
    assert!(err.is_never());
    assert_eq!(
        err.to_string(),
        "the job needs 2 nodes with 8 healthy H100 GPUs of ≥ 80 GiB each, but only 1 node \
         has that; the largest offers 8 H100-80GB (80 GiB each)"
    );
    let mut r = req(4, &[]);
    r.cpu_millis = 128_000;
    assert_eq!(
        message(&mut e, &r),
        "no node has 128 cpu and 1 GiB of memory; nodes offer at most 64 cpu and 512 GiB of \
         memory"
    );
    let mut r = req(0, &[]);
    r.nodes = 0;
    assert_eq!(
        message(&mut e, &r),
        "the job asks for a gang of 0 nodes; ask for at least 1"
    );
    let mut empty = engine(vec![], vec![]);
    assert!(message(&mut empty, &req(1, &[])).starts_with("no node is up and ready"));
}

#[test]
fn a_local_volume_pins_its_user_to_the_volume_node() {
    let nodes = || {
        vec![
            node("a", &[], vec![]),
            node("b", &[], vec![]),
            node("c", &[], vec![]),
        ]
    };
    let r = Request {
        pin: Some(id("b")),
        ..req(0, &[])
    };
    // Without the pin the CPU job would go to `a` (ties to the lower id).
    assert_eq!(one(&mut engine(nodes(), vec![]), &req(0, &[])).0, "a");
    assert_eq!(one(&mut engine(nodes(), vec![]), &r).0, "b");
    // The node full: it waits for that node, it does not go elsewhere.
    let full = (id("b"), 64_000, 0, Vec::new());
    let err = engine(nodes(), vec![full]).place(&r).expect_err("waits");
    assert!(!err.is_never(), "{err}");
    // The node not in the cluster (down, or removed): never on this engine, and what
    // waits for it names it.
    let mut without_b = engine(vec![node("a", &[], vec![])], vec![]);
    let err = without_b.place(&r).expect_err("no node b");
    assert!(err.is_never());
    assert!(err.to_string().contains("node b"), "{err}");
    assert_eq!(
        without_b.busy(&r).to_string(),
        "node b, where its local volume lives, is not up and ready"
    );
    // A gang cannot share a local volume.
    let gang = Request { nodes: 2, ..r };
    let err = engine(nodes(), vec![]).place(&gang).expect_err("gang");
    assert!(err.is_never());
    assert!(err.to_string().contains("shared volume"), "{err}");
}

#[test]
fn a_shared_volume_needs_nodes_with_shared_storage() {
    let with_shared = |name: &str| NodeInfo {
        shared_volumes: true,
        ..node(name, &[], vec![])
    };
    let r = Request {
        shared_volumes: true,
        ..req(0, &[])
    };
    let mut none = engine(vec![node("a", &[], vec![])], vec![]);
    let err = none.place(&r).expect_err("no shared storage");
    assert!(err.is_never());
    assert!(err.to_string().contains("shared_path"), "{err}");
    let mut some = engine(vec![node("a", &[], vec![]), with_shared("z")], vec![]);
    assert_eq!(one(&mut some, &r).0, "z");
    // A gang of two on a cluster with one such node: never, saying why.
    let err = some
        .place(&Request { nodes: 2, ..r })
        .expect_err("one node only");
    assert!(err.is_never());
    assert!(err.to_string().contains("shared volume storage"), "{err}");
}
