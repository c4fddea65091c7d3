//! `gantry-bench placement`: the placement engine alone, in process, no I/O: decisions per
//! second and latency per decision at several cluster sizes.
//!
//! Each size gets a fresh simulated cluster: nodes with 8 GPUs (3 in 5 H100 80 GB, the rest
//! A100 40 GB, named as NVML names them), NVLink groups and NUMA nodes of 4 GPUs, racks of
//! 32 nodes, every 10th node a spot node, 1 in 50 a CPU-only node, and 1 GPU in 200
//! unhealthy. The job mix, drawn from a seeded generator: 70 % 1-GPU jobs, 20 % single-node
//! jobs of 2–8 GPUs, 5 % CPU-only jobs, 5 % gangs of 2–4 nodes × 8 GPUs; model lists vary
//! (any, `H100`, `H100` then `A100`), one job in 10 is spot-tolerant.
//!
//! A decision is one `Engine::place` call, placed or not (an unplaceable job is explained,
//! which costs a scan). To hold the cluster at a steady load, placed jobs are kept in FIFO
//! order and the oldest are released whenever more than `--utilization` of the GPUs are
//! taken; releases are not timed. Decisions in a warm-up (filling the cluster) are not
//! counted. Single-node jobs with a node selector (`rack=…`, 32 nodes), which walk the
//! nodes carrying the label instead of the index, are measured apart.

use std::collections::{BTreeMap, VecDeque};
use std::time::Instant;

use anyhow::Context;
use gantry_coordinator::placement::{Assignment, Engine, NodeInfo, Request, Unplaceable};
use gantry_shared::NodeId;
use gantry_shared::gossip::{GpuHealth, GpuInfo};

use crate::percentile;

const GIB: u64 = 1 << 30;
const GPUS_PER_NODE: u32 = 8;
const RACK_SIZE: usize = 32;
/// Selector jobs measured per size.
const SELECTOR_DECISIONS: usize = 2_000;

/// What to run.
#[derive(Debug, Clone)]
pub struct PlacementBench {
    /// Cluster sizes in nodes.
    pub sizes: Vec<usize>,
    /// Timed decisions per size.
    pub decisions: usize,
    /// Share of GPUs kept busy (oldest jobs are released above it).
    pub utilization: f64,
    /// Seeds the job mix; printed so a run can be replayed.
    pub seed: u64,
}

/// splitmix64: small, seeded, good enough for a job mix.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn cluster(n: usize) -> anyhow::Result<Vec<NodeInfo>> {
    let mut nodes = Vec::with_capacity(n);
    for i in 0..n {
        let id = NodeId::new(format!("node-{i:05}")).context("node id")?;
        let mut labels = BTreeMap::new();
        labels.insert("rack".to_string(), format!("r{:03}", i / RACK_SIZE));
        if i % 10 == 9 {
            labels.insert("spot".into(), "true".into());
        }
        let (model, gib) = if i % 5 < 3 {
            ("NVIDIA H100 80GB HBM3", 80)
        } else {
            ("NVIDIA A100-SXM4-40GB", 40)
        };
        let gpus = if i % 50 == 49 {
            Vec::new()
        } else {
            (0..GPUS_PER_NODE)
                .map(|g| GpuInfo {
                    index: g,
                    uuid: format!("GPU-{i}-{g}"),
                    model: model.into(),
                    memory_bytes: gib * GIB,
                    pci_bus_id: String::new(),
                    numa_node: Some(g / 4),
                    nvlink_group: Some(g / 4),
                    health: if (i * 8 + g as usize) % 200 == 199 {
                        GpuHealth::Unhealthy(gantry_shared::attempt::GpuFault::Xid(79))
                    } else {
                        GpuHealth::Healthy
                    },
                    simulated: true,
                })
                .collect()
        };
        nodes.push(NodeInfo {
            id,
            cpu_millis: 128_000,
            memory_bytes: 1024 * GIB,
            labels,
            gpus,
            shared_volumes: false,
        });
    }
    Ok(nodes)
}

/// The kinds of job in the mix, for the per-class latencies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Class {
    OneGpu,
    MultiGpu,
    CpuOnly,
    Gang,
}

impl Class {
    fn name(self) -> &'static str {
        match self {
            Self::OneGpu => "1 GPU",
            Self::MultiGpu => "2–8 GPUs, one node",
            Self::CpuOnly => "CPU only",
            Self::Gang => "gang 2–4 × 8 GPUs",
        }
    }
}

fn job(rng: &mut Rng) -> (Class, Request) {
    let models = |rng: &mut Rng| -> Vec<String> {
        match rng.below(10) {
            0..=4 => Vec::new(),
            5..=7 => vec!["H100".into()],
            _ => vec!["H100".into(), "A100".into()],
        }
    };
    let spot = rng.below(10) == 0;
    let roll = rng.below(100);
    let (class, r) = if roll < 70 {
        let gpu_models = models(rng);
        (
            Class::OneGpu,
            Request {
                cpu_millis: 8_000,
                memory_bytes: 64 * GIB,
                gpus: 1,
                gpu_models,
                ..Request::default()
            },
        )
    } else if roll < 90 {
        let gpus = 2 + rng.below(7) as u32;
        let gpu_models = models(rng);
        (
            Class::MultiGpu,
            Request {
                cpu_millis: 8_000 * u64::from(gpus),
                memory_bytes: 64 * GIB * u64::from(gpus),
                gpus,
                gpu_models,
                ..Request::default()
            },
        )
    } else if roll < 95 {
        (
            Class::CpuOnly,
            Request {
                cpu_millis: 4_000 * (1 + rng.below(8)),
                memory_bytes: 16 * GIB * (1 + rng.below(8)),
                ..Request::default()
            },
        )
    } else {
        let nodes = 2 + rng.below(3) as u32;
        let gpu_models = if rng.below(2) == 0 {
            vec!["H100".into()]
        } else {
            Vec::new()
        };
        (
            Class::Gang,
            Request {
                nodes,
                cpu_millis: 96_000,
                memory_bytes: 768 * GIB,
                gpus: 8,
                gpu_models,
                ..Request::default()
            },
        )
    };
    (class, Request { spot, ..r })
}

/// Latencies (µs) of one class of decisions.
#[derive(Default)]
struct Samples {
    placed: Vec<f64>,
    refused: Vec<f64>,
}

struct SizeResult {
    nodes: usize,
    gpus: u64,
    decisions: usize,
    placed: usize,
    busy: usize,
    never: usize,
    place_s: f64,
    wall_s: f64,
    all: Vec<f64>,
    by_class: BTreeMap<Class, Samples>,
    selector: Vec<f64>,
    gpu_use: f64,
}

fn run_size(n: usize, b: &PlacementBench) -> anyhow::Result<SizeResult> {
    let nodes = cluster(n)?;
    let total_gpus: u64 = nodes.iter().map(|n| n.gpus.len() as u64).sum();
    let limit = (total_gpus as f64 * b.utilization.clamp(0.0, 1.0)) as u64;
    let built = Instant::now();
    let mut engine = Engine::new(nodes, Vec::<(NodeId, u64, u64, Vec<u32>)>::new());
    eprintln!(
        "placement: {n} nodes: engine built in {:.1} ms",
        built.elapsed().as_secs_f64() * 1e3
    );
    let mut rng = Rng(b.seed ^ n as u64);
    let mut live: VecDeque<(Assignment, Request)> = VecDeque::new();
    let mut live_gpus: u64 = 0;
    let warmup = (limit as usize).max(1_000);
    let mut r = SizeResult {
        nodes: n,
        gpus: total_gpus,
        decisions: 0,
        placed: 0,
        busy: 0,
        never: 0,
        place_s: 0.0,
        wall_s: 0.0,
        all: Vec::with_capacity(b.decisions),
        by_class: BTreeMap::new(),
        selector: Vec::new(),
        gpu_use: 0.0,
    };
    let mut use_sum = 0.0;
    let mut wall = Instant::now();
    for i in 0..warmup + b.decisions {
        if i == warmup {
            wall = Instant::now();
        }
        let (class, req) = job(&mut rng);
        let t = Instant::now();
        let result = engine.place(&req);
        let us = t.elapsed().as_secs_f64() * 1e6;
        let timed = i >= warmup;
        if timed {
            r.decisions += 1;
            r.place_s += us / 1e6;
            r.all.push(us);
            let s = r.by_class.entry(class).or_default();
            match &result {
                Ok(_) => s.placed.push(us),
                Err(_) => s.refused.push(us),
            }
            match &result {
                Ok(_) => r.placed += 1,
                Err(Unplaceable::Never(_)) => r.never += 1,
                Err(_) => r.busy += 1,
            }
        }
        if let Ok(a) = result {
            live_gpus += u64::from(req.gpus) * a.members.len() as u64;
            live.push_back((a, req));
        }
        while live_gpus > limit {
            let Some((a, req)) = live.pop_front() else {
                break;
            };
            live_gpus -= u64::from(req.gpus) * a.members.len() as u64;
            engine.release(&a, &req);
        }
        if timed {
            use_sum += live_gpus as f64 / total_gpus.max(1) as f64;
        }
    }
    r.wall_s = wall.elapsed().as_secs_f64();
    r.gpu_use = use_sum / r.decisions.max(1) as f64;
    // Selector jobs, placed and released at once so the load stays put.
    for i in 0..SELECTOR_DECISIONS {
        let (_, mut req) = job(&mut rng);
        req.nodes = 1;
        req.selector.insert(
            "rack".into(),
            format!("r{:03}", (i * 7) % n.div_ceil(RACK_SIZE)),
        );
        let t = Instant::now();
        let result = engine.place(&req);
        r.selector.push(t.elapsed().as_secs_f64() * 1e6);
        if let Ok(a) = result {
            engine.release(&a, &req);
        }
    }
    Ok(r)
}

pub fn run(b: PlacementBench) -> anyhow::Result<()> {
    eprintln!("placement: seed {}", b.seed);
    let mut results = Vec::new();
    for &n in &b.sizes {
        results.push(run_size(n, &b)?);
        eprintln!("placement: {n} nodes: done");
    }
    let p =
        |v: &[f64], q: f64| percentile(v, q).map_or_else(|| "—".to_string(), |x| format!("{x:.1}"));
    println!(
        "| nodes | GPUs | decisions | placed / busy / never | decisions/s (place only) | decisions/s (with releases) | p50 (µs) | p99 (µs) | GPUs in use |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in &results {
        println!(
            "| {} | {} | {} | {} / {} / {} | {:.0} | {:.0} | {} | {} | {:.0} % |",
            r.nodes,
            r.gpus,
            r.decisions,
            r.placed,
            r.busy,
            r.never,
            r.decisions as f64 / r.place_s.max(1e-9),
            r.decisions as f64 / r.wall_s.max(1e-9),
            p(&r.all, 50.0),
            p(&r.all, 99.0),
            r.gpu_use * 100.0
        );
    }
    println!();
    println!("Latency per decision by job class, p50 / p99 in µs (placed; not placed):");
    println!();
    print!("| job class |");
    for r in &results {
        print!(" {} nodes |", r.nodes);
    }
    println!();
    println!("|---|{}", "---|".repeat(results.len()));
    let classes = [Class::OneGpu, Class::MultiGpu, Class::CpuOnly, Class::Gang];
    for c in classes {
        print!("| {} |", c.name());
        for r in &results {
            let s = r.by_class.get(&c);
            let placed = s.map(|s| s.placed.as_slice()).unwrap_or_default();
            let refused = s.map(|s| s.refused.as_slice()).unwrap_or_default();
            print!(
                " {} / {} ({}); {} / {} ({}) |",
                p(placed, 50.0),
                p(placed, 99.0),
                placed.len(),
                p(refused, 50.0),
                p(refused, 99.0),
                refused.len()
            );
        }
        println!();
    }
    print!("| 1 node with a selector `rack=…` (placed or not) |");
    for r in &results {
        print!(
            " {} / {} ({}) |",
            p(&r.selector, 50.0),
            p(&r.selector, 99.0),
            r.selector.len()
        );
    }
    println!();
    println!();
    println!(
        "{} timed decisions per size after a warm-up that fills the cluster; the oldest jobs are released above {:.0} % of GPUs in use; seed {}.",
        b.decisions,
        b.utilization * 100.0,
        b.seed
    );
    Ok(())
}
