//! `gantry-bench functions-sim`: how fast the coordinator decides a function's scale-up,
//! on the in-process simulation (`gantry_tests::function_sim`: the real store, reconciler,
//! function service, autoscaler and router against fake agents on a virtual clock). Per
//! seed, one function (`min_containers = 0`, `max_inputs = 1`, one core and 1 GiB per
//! container) gets one map of `inputs` inputs, and the simulation steps until `containers`
//! of its containers are ready. Reported, in simulated time from the map's acceptance:
//! when `containers` were decided (placed, their starts sent), when the nodes had them
//! all (starts received), when the first and the last of them said ready; and in wall
//! time: the step that decided them (the reconcile pass, its commit, the starts sent and
//! answered) and the whole simulation up to the last ready.
//!
//! The simulated times are bounded below by the step (`--step`) and, for ready, by the
//! simulated start delay (`--start-min`..`--start-max`), an input of the simulation: what
//! the coordinator adds is the difference. Nothing here asserts a time.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use gantry_shared::calls::Payload;
use gantry_shared::{AppName, FunctionName};
use gantry_tests::function_sim::{FunctionSim, SimConfig};

/// The most simulated time one run may take.
const LIMIT_MS: u64 = 120_000;

pub struct FunctionSimBench {
    pub seeds: Vec<u64>,
    pub nodes: usize,
    /// Containers to reach.
    pub containers: u32,
    /// The function's `max_containers`.
    pub max_containers: u32,
    /// Inputs of the map (each wants a container of its own).
    pub inputs: usize,
    pub step: Duration,
    pub start_min: Duration,
    pub start_max: Duration,
    pub json: Option<PathBuf>,
}

/// One seed's run.
#[derive(Debug, Default, serde::Serialize)]
struct Run {
    seed: u64,
    /// Simulated ms from the map's acceptance.
    decided_ms: Option<u64>,
    started_ms: Option<u64>,
    first_ready_ms: Option<u64>,
    ready_ms: Option<u64>,
    /// Wall ms of the step that decided them.
    deciding_step_wall_ms: Option<f64>,
    /// Wall ms of the whole run up to the last ready.
    wall_ms: f64,
    passes: u64,
}

pub fn run(b: FunctionSimBench) -> anyhow::Result<()> {
    if b.seeds.is_empty() || b.nodes == 0 || b.containers == 0 || b.inputs == 0 {
        bail!("--seeds, --nodes, --containers and --inputs need at least one");
    }
    if b.containers > b.max_containers {
        bail!(
            "--containers {} is more than --max-containers {}",
            b.containers,
            b.max_containers
        );
    }
    if b.start_max < b.start_min || b.step.is_zero() {
        bail!("--start-max must be at least --start-min, and --step more than 0");
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut runs = Vec::new();
    for &seed in &b.seeds {
        let r = rt.block_on(one(&b, seed))?;
        runs.push(r);
    }
    let ms = |v: Option<u64>| v.map_or("—".to_owned(), |v| format!("{v}"));
    let n = b.containers;
    println!(
        "| seed | {n} decided (sim ms) | {n} started on nodes (sim ms) | first ready (sim ms) | {n} ready (sim ms) | deciding step (wall ms) | passes | run (wall s) |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for r in &runs {
        println!(
            "| {} | **{}** | {} | {} | **{}** | {} | {} | {:.2} |",
            r.seed,
            ms(r.decided_ms),
            ms(r.started_ms),
            ms(r.first_ready_ms),
            ms(r.ready_ms),
            r.deciding_step_wall_ms
                .map_or("—".to_owned(), |v| format!("{v:.1}")),
            r.passes,
            r.wall_ms / 1000.0
        );
    }
    let worst = runs
        .iter()
        .map(|r| r.decided_ms.unwrap_or(u64::MAX))
        .max()
        .unwrap_or(u64::MAX);
    println!();
    println!(
        "{} nodes of 8 cores and 32 GiB, containers of 1 core and 1 GiB (`max_containers = {}`, `max_inputs = 1`), one map of {} inputs; steps of {} ms, start delays {}–{} ms. Goal 0 → 200 decided ≤ 1 s of simulated time: {}.",
        b.nodes,
        b.max_containers,
        b.inputs,
        b.step.as_millis(),
        b.start_min.as_millis(),
        b.start_max.as_millis(),
        if worst <= 1_000 && n >= 200 {
            "met"
        } else if n < 200 {
            "not measured (fewer than 200 containers)"
        } else {
            "not met"
        }
    );
    if let Some(path) = &b.json {
        let v = serde_json::json!({
            "nodes": b.nodes,
            "containers": b.containers,
            "max_containers": b.max_containers,
            "inputs": b.inputs,
            "step_ms": b.step.as_millis() as u64,
            "start_ms": [b.start_min.as_millis() as u64, b.start_max.as_millis() as u64],
            "runs": runs,
        });
        std::fs::write(path, serde_json::to_vec_pretty(&v)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

async fn one(b: &FunctionSimBench, seed: u64) -> anyhow::Result<Run> {
    let mut sim = FunctionSim::new(SimConfig {
        nodes: b.nodes,
        step_ms: b.step.as_millis() as u64,
        // At least one millisecond of spread keeps the draw's range non-empty.
        start_ms: b.start_min.as_millis() as u64..b.start_max.as_millis() as u64 + 1,
        ..SimConfig::new(seed)
    });
    let app: AppName = "bench".parse()?;
    let function: FunctionName = "f".parse()?;
    sim.deploy(serde_json::from_value(serde_json::json!({
        "app": "bench", "functions": {"f": {
            "image": "sim", "cpu": "1", "memory": "1G", "max_inputs": 1,
            "min_containers": 0, "max_containers": b.max_containers,
        }}
    }))?);
    let payloads: Vec<Payload> = (0..b.inputs)
        .map(|i| Payload::text(&format!("in-{i}")))
        .collect();
    let wall = Instant::now();
    let t0 = sim.now();
    sim.map(&app, &function, &payloads).await;
    let mut r = Run {
        seed,
        ..Run::default()
    };
    let want = b.containers;
    while r.ready_ms.is_none() && sim.now() - t0 < LIMIT_MS {
        let step = Instant::now();
        sim.step().await;
        let step_ms = step.elapsed().as_secs_f64() * 1000.0;
        let c = sim.counts(&app, &function);
        let at = sim.now() - t0;
        if r.decided_ms.is_none() && c.placed >= want {
            r.decided_ms = Some(at);
            r.deciding_step_wall_ms = Some(step_ms);
        }
        if r.started_ms.is_none() && sim.stats.starts >= want as usize {
            r.started_ms = Some(at);
        }
        if r.first_ready_ms.is_none() && c.ready > 0 {
            r.first_ready_ms = Some(at);
        }
        if c.ready >= want {
            r.ready_ms = Some(at);
        }
    }
    r.wall_ms = wall.elapsed().as_secs_f64() * 1000.0;
    r.passes = sim.stats.passes;
    if !sim.stats.violations.is_empty() {
        bail!(
            "seed {seed}: the simulation saw {} violations, first: {}",
            sim.stats.violations.len(),
            sim.stats.violations[0]
        );
    }
    sim.shutdown().await;
    Ok(r)
}
