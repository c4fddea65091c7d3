//! `gantry-bench schedule`: the coordinator's durable scheduling throughput, in process.
//!
//! Accepted: `threads` writers create `jobs` jobs through `Store::create_job`, each call
//! returning only once its job is on disk (as the API answers 201) — concurrent writers
//! share fsyncs through the store's group commit. Placed: the scheduler's own pass
//! (`reconcile::place_pending`: read the active jobs, run the engine's queue over the
//! nodes, record every new generation, one commit) runs until every job is placed, over
//! `nodes` simulated ready nodes. What it leaves out: HTTP (see `submit` for the whole
//! path on loopback) and delivering starts to agents (each agent starts containers at its
//! own pace; see `cold-start`).

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::{Context, bail};
use gantry_coordinator::nodes::liveness::{Liveness, NodeStatus};
use gantry_coordinator::reconcile;
use gantry_coordinator::store::Store;
use gantry_shared::NodeId;
use gantry_shared::api::{JobSpec, JobState};
use gantry_shared::gossip::{AgentGossip, GpuHealth, GpuInfo, NodeResources};
use gantry_shared::protocol::NodeCapacity;

pub struct ScheduleBench {
    pub jobs: usize,
    pub threads: usize,
    pub nodes: usize,
    pub work: std::path::PathBuf,
    pub json: Option<std::path::PathBuf>,
}

/// A ready node with 8 simulated GPUs and room for many small jobs.
fn node(i: usize) -> anyhow::Result<NodeStatus> {
    let id = NodeId::new(format!("n{i:05}"))?;
    let gpus = (0..8)
        .map(|g| GpuInfo {
            index: g,
            uuid: format!("GPU-SIM-n{i}-{g}"),
            model: if i.is_multiple_of(2) {
                "H100-80GB"
            } else {
                "A100-80GB"
            }
            .into(),
            memory_bytes: 80 << 30,
            pci_bus_id: String::new(),
            numa_node: Some(g / 4),
            nvlink_group: Some(g / 4),
            health: GpuHealth::Healthy,
            simulated: true,
        })
        .collect();
    let capacity = NodeCapacity {
        cpu_millis: 256_000,
        memory_bytes: 2 << 40,
        gpus: 8,
        shared_volumes: false,
    };
    Ok(NodeStatus {
        id,
        liveness: Liveness::Up,
        reason: "",
        since_ms: 0,
        last_seen_ms: None,
        connected: true,
        capacity: Some(capacity),
        gossip: Some(AgentGossip {
            addr: std::net::IpAddr::from([10, 0, (i / 256) as u8, (i % 256) as u8]),
            labels: BTreeMap::new(),
            resources: NodeResources {
                cpu_millis: capacity.cpu_millis,
                free_cpu_millis: capacity.cpu_millis,
                memory_bytes: capacity.memory_bytes,
                free_memory_bytes: capacity.memory_bytes,
            },
            free_gpus: (0..8).collect(),
            gpus,
            images: Default::default(),
        }),
        gossip_error: None,
        admin: None,
    })
}

/// Mostly CPU jobs of a tenth of a core, every fifth asking for one GPU.
fn spec(i: usize) -> anyhow::Result<JobSpec> {
    let gpus = u32::from(i.is_multiple_of(5));
    Ok(serde_json::from_value(serde_json::json!({
        "name": format!("bench-{i}"), "image": "busybox", "command": ["true"],
        "resources": {"cpu": "100m", "memory": "64M", "gpus": gpus}
    }))?)
}

pub fn run(b: ScheduleBench) -> anyhow::Result<()> {
    if b.threads == 0 || b.jobs == 0 || b.nodes == 0 {
        bail!("--jobs, --threads and --nodes must be at least 1");
    }
    let _ = std::fs::remove_dir_all(&b.work);
    std::fs::create_dir_all(&b.work)?;
    let store = Store::open(&b.work.join("db")).context("opening the job store")?;
    let specs: Vec<JobSpec> = (0..b.jobs).map(spec).collect::<anyhow::Result<_>>()?;

    let started = Instant::now();
    std::thread::scope(|s| -> anyhow::Result<()> {
        let per = b.jobs.div_ceil(b.threads);
        let handles: Vec<_> = specs
            .chunks(per)
            .map(|chunk| {
                let store = &store;
                s.spawn(move || -> anyhow::Result<()> {
                    for spec in chunk {
                        store.create_job(spec.clone(), 1, None)?;
                    }
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join()
                .map_err(|_| anyhow::anyhow!("a writer panicked"))??;
        }
        Ok(())
    })?;
    let accept_secs = started.elapsed().as_secs_f64();

    let statuses: Vec<NodeStatus> = (0..b.nodes).map(node).collect::<anyhow::Result<_>>()?;
    let started = Instant::now();
    let mut passes = 0;
    let mut placed = 0;
    // Bounded: every pass places something while capacity lasts.
    while placed < b.jobs && passes < 10_000 {
        let now = reconcile::place_pending(&store, &statuses, store.active_jobs()?)?;
        passes += 1;
        if now.is_empty() {
            break;
        }
        placed += now.len();
    }
    let place_secs = started.elapsed().as_secs_f64();
    let pending = store
        .active_jobs()?
        .iter()
        .filter(|j| j.state == JobState::Pending)
        .count();
    if pending > 0 {
        let why = store
            .active_jobs()?
            .into_iter()
            .find(|j| j.state == JobState::Pending)
            .and_then(|j| j.reason)
            .unwrap_or_default();
        bail!("{pending} jobs were left pending after {passes} passes; one says: {why}");
    }

    println!("| stage | jobs | time | rate |");
    println!("|---|---|---|---|");
    println!(
        "| accepted durably ({} writers, group commit) | {} | {:.2} s | **{:.0} jobs/s** |",
        b.threads,
        b.jobs,
        accept_secs,
        b.jobs as f64 / accept_secs
    );
    println!(
        "| placed durably ({} nodes, {passes} passes) | {placed} | {:.2} s | **{:.0} jobs/s** |",
        b.nodes,
        place_secs,
        placed as f64 / place_secs
    );
    println!(
        "| end to end (accepted + placed) | {} | {:.2} s | **{:.0} jobs/s** |",
        b.jobs,
        accept_secs + place_secs,
        b.jobs as f64 / (accept_secs + place_secs)
    );
    // What the coordinator's state costs in memory at this size: this process holds the
    // same store (sled and its cache), active jobs and engine a coordinator would.
    let rss = crate::rss_kib(std::process::id()).unwrap_or(0);
    println!();
    println!(
        "Memory (RSS) of this process with {} nodes and {} jobs placed: **{:.0} MiB**.",
        b.nodes,
        b.jobs,
        rss as f64 / 1024.0
    );
    if let Some(path) = &b.json {
        let v = serde_json::json!({
            "nodes": b.nodes,
            "jobs": b.jobs,
            "accepted_per_s": b.jobs as f64 / accept_secs,
            "placed_per_s": placed as f64 / place_secs,
            "rss_mib": rss as f64 / 1024.0,
        });
        std::fs::write(path, serde_json::to_vec_pretty(&v)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
