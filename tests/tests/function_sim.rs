//! The functions layer (store, reconciler, function service, router, autoscaler, input
//! transitions) against hundreds of fake agents in one process on a virtual clock
//! (`gantry_tests::function_sim`):
//!
//! - a burst with no faults scales a function from 0 to its 250 containers (200 of them
//!   placed and ready within 1 s of simulated time) and, once its inputs are done and its
//!   `scaledown_window` passed, back to 0;
//! - a seeded schedule of maps to two functions (one with a simulated GPU per container,
//!   one with retries and inputs that fail their first try) while hosts crash, are cut off
//!   and stall.
//!
//! Checked at every step: no node holds more CPU, memory or GPUs than it has, no container
//! more inputs than its `max_inputs`, none is handed inputs before it is ready. At the end:
//! every input ended once, succeeded with the output a container produced for its current
//! try (or failed saying why), no idle container was drained before its window, and
//! nothing runs or is held anywhere.
//!
//! `GANTRY_SIM_SEED=N` replays a run (the seed is printed).

use std::collections::BTreeMap;
use std::time::Instant;

use gantry_shared::calls::{CallState, FailureCause, InputState, Payload};
use gantry_shared::functions::AppManifest;
use gantry_shared::{AppName, CallId, FunctionName};
use gantry_tests::function_sim::{Counts, FLAKY, Fault, FunctionSim, SimConfig};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde_json::json;

fn seed() -> u64 {
    std::env::var("GANTRY_SIM_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        })
}

fn manifest(value: serde_json::Value) -> AppManifest {
    serde_json::from_value(value).expect("manifest")
}

fn name<T: std::str::FromStr>(s: &str) -> T
where
    T::Err: std::fmt::Debug,
{
    s.parse().expect("name")
}

/// How the inputs ended.
#[derive(Debug, Default)]
struct Ended {
    /// Failed inputs by cause.
    failed: BTreeMap<String, usize>,
    /// Inputs leased more than once.
    retried: usize,
}

/// Every input of `calls` ended: succeeded with its own payload back, answered by a
/// container for the try the coordinator recorded, or failed.
fn check_outputs(sim: &FunctionSim, calls: &[(CallId, Vec<Payload>)], seed: u64) -> Ended {
    let mut ended = Ended::default();
    let mut wrong = Vec::new();
    for (call, payloads) in calls {
        let view = sim.call_view(call);
        assert_ne!(
            view.state,
            CallState::Running,
            "seed {seed}: call {call} still runs"
        );
        assert_eq!(view.results.len(), payloads.len());
        for (input, payload) in view.results.iter().zip(payloads) {
            ended.retried += usize::from(input.attempt > 1);
            match input.state {
                InputState::Succeeded => {
                    if input.output.as_ref() != Some(payload) {
                        wrong.push(format!("{}: output is not its input", input.id));
                    }
                    let by = (input.container.clone(), input.attempt);
                    let produced = sim
                        .stats
                        .produced
                        .get(&input.id)
                        .is_some_and(|p| p.iter().any(|(w, a)| (Some(w.clone()), *a) == by));
                    if !produced {
                        wrong.push(format!(
                            "{}: output recorded for {:?} try {}, which no container answered",
                            input.id, by.0, by.1
                        ));
                    }
                }
                InputState::Failed => {
                    let cause = input
                        .error
                        .as_ref()
                        .map_or("none".to_owned(), |e| format!("{:?}", e.cause));
                    *ended.failed.entry(cause).or_default() += 1;
                }
                other => wrong.push(format!("{}: ended {other:?}", input.id)),
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "seed {seed}: {} inputs ended wrongly, e.g. {:#?}",
        wrong.len(),
        &wrong[..wrong.len().min(5)]
    );
    ended
}

/// Steps until nothing runs or is held for the functions (every container drained and
/// gone, no fence left); panics after `limit_ms`.
async fn until_scaled_to_zero(
    sim: &mut FunctionSim,
    functions: &[(AppName, FunctionName)],
    limit_ms: u64,
    seed: u64,
) {
    let done = sim
        .step_until(limit_ms, |s| {
            s.containers_running() == 0
                && s.nodes_held() == 0
                && !s.any_fault()
                && functions
                    .iter()
                    .all(|(a, f)| s.counts(a, f) == Counts::default())
        })
        .await;
    assert!(
        done,
        "seed {seed}: not back to zero {limit_ms} ms after the load: {} containers run, {} nodes held, {:?}",
        sim.containers_running(),
        sim.nodes_held(),
        functions
            .iter()
            .map(|(a, f)| sim.counts(a, f))
            .collect::<Vec<_>>()
    );
}

fn assert_clean(sim: &FunctionSim, window_ms: u64, seed: u64) {
    let v = &sim.stats.violations;
    assert!(
        v.is_empty(),
        "seed {seed}: {} violations, first: {:#?}",
        v.len(),
        &v[..v.len().min(5)]
    );
    let early: Vec<&u64> = sim
        .stats
        .drained_idle_ms
        .iter()
        .filter(|ms| **ms < window_ms)
        .collect();
    assert!(
        early.is_empty(),
        "seed {seed}: {} containers drained before {window_ms} ms idle: {early:?}",
        early.len()
    );
}

#[tokio::test(flavor = "current_thread")]
async fn a_burst_scales_a_function_from_zero_to_its_maximum_and_back() {
    let seed = seed();
    eprintln!("function sim seed: {seed} (replay with GANTRY_SIM_SEED={seed})");
    let started = Instant::now();
    let mut sim = FunctionSim::new(SimConfig {
        step_ms: 10,
        ..SimConfig::new(seed)
    });
    let (app, f): (AppName, FunctionName) = (name("burst"), name("f"));
    sim.deploy(manifest(json!({"app": "burst", "functions": {"f": {
        "image": "sim", "cpu": "1", "memory": "1G", "max_containers": 250, "max_inputs": 1,
        "scaledown_window": "2s",
    }}})));
    let payloads: Vec<Payload> = (0..3_000)
        .map(|i| Payload::text(&format!("in-{i}")))
        .collect();
    let t0 = sim.now();
    let call = sim.map(&app, &f, &payloads).await;

    let mut peak = Counts::default();
    let (mut decided, mut ready) = (None, None);
    let done = sim
        .step_until(120_000, |s| {
            let c = s.counts(&app, &f);
            peak.placed = peak.placed.max(c.placed);
            peak.ready = peak.ready.max(c.ready);
            if c.placed >= 200 && decided.is_none() {
                decided = Some(s.now() - t0);
            }
            if c.ready >= 200 && ready.is_none() {
                ready = Some(s.now() - t0);
            }
            c.queued + c.running == 0
        })
        .await;
    assert!(done, "seed {seed}: the burst's inputs did not all end");
    let ended = check_outputs(&sim, &[(call, payloads)], seed);
    assert!(
        ended.failed.is_empty() && ended.retried == 0,
        "seed {seed}: inputs failed or ran twice with no fault: {ended:?}"
    );
    let load_ms = sim.now() - t0;
    until_scaled_to_zero(&mut sim, &[(app, f)], 10_000, seed).await;
    assert_clean(&sim, 2_000, seed);
    assert_eq!(
        (peak.placed, peak.ready),
        (250, 250),
        "seed {seed}: max_containers"
    );
    assert_eq!(
        sim.stats.starts, 250,
        "seed {seed}: containers started beyond the burst's 250"
    );
    let (decided, ready) = (decided.unwrap_or(u64::MAX), ready.unwrap_or(u64::MAX));
    // The starts are decided in the first pass; the 200th is ready once its simulated start
    // delay (at most 500 ms) is over.
    assert!(
        decided <= 1_000 && ready <= 1_000,
        "seed {seed}: 200 containers decided after {decided} ms, ready after {ready} ms of simulated time"
    );
    eprintln!(
        "function sim: 0 -> 200 containers decided in {decided} ms, ready in {ready} ms (simulated); 3,000 inputs in {load_ms} ms; back to 0 at {} ms ({} drains, the first after {:?} ms idle); {} passes; took {:.1} s",
        sim.now() - t0,
        sim.stats.drained_idle_ms.len(),
        sim.stats.drained_idle_ms.iter().min(),
        sim.stats.passes,
        started.elapsed().as_secs_f64()
    );
    sim.shutdown().await;
}

#[tokio::test(flavor = "current_thread")]
async fn functions_survive_a_seeded_schedule_of_host_faults() {
    let seed = seed();
    eprintln!("function sim seed: {seed} (replay with GANTRY_SIM_SEED={seed})");
    let started = Instant::now();
    let mut rng = StdRng::seed_from_u64(seed);
    // Each node: one simulated GPU and 3 cores, so a GPU container (1 core) and a CPU one
    // (2 cores) fit together, and a CPU one leaves no room for a second. Inputs run long
    // enough (0.2-3 s) that the GPU function wants all 250 containers: with hosts down,
    // the nodes are full.
    let mut sim = FunctionSim::new(SimConfig {
        cpu_millis: 3_000,
        memory_bytes: 16 << 30,
        gpus: 1,
        run_ms: 200..3_000,
        ..SimConfig::new(seed)
    });
    let app: AppName = name("mixed");
    let (gpu, cpu): (FunctionName, FunctionName) = (name("gpu"), name("cpu"));
    sim.deploy(manifest(json!({"app": "mixed", "functions": {
        "gpu": {"image": "sim", "cpu": "1", "memory": "4G", "gpu": "any:1",
                "max_containers": 250, "max_inputs": 1, "scaledown_window": "2s"},
        "cpu": {"image": "sim", "cpu": "2", "memory": "2G", "max_containers": 250,
                "max_inputs": 4, "target_inputs": 2, "retries": 1, "scaledown_window": "3s"},
    }})));

    let load_ms = 20_000;
    let t0 = sim.now();
    let mut calls = Vec::new();
    let mut faults = BTreeMap::new();
    let mut n = 0usize;
    while sim.now() - t0 < load_ms {
        // A map every 200 ms, alternating between the functions.
        if (sim.now() - t0).is_multiple_of(200) {
            let f = if calls.len() % 2 == 0 { &gpu } else { &cpu };
            let payloads: Vec<Payload> = (0..100)
                .map(|_| {
                    n += 1;
                    let flaky = f == &cpu && rng.random_range(0..10) == 0;
                    Payload::text(&format!("{}{n}", if flaky { FLAKY } else { "in-" }))
                })
                .collect();
            calls.push((sim.map(&app, f, &payloads).await, payloads));
        }
        if rng.random_range(0..4) == 0 {
            let i = rng.random_range(0..sim.nodes());
            if !sim.faulted(i) {
                let fault = [Fault::Crash, Fault::Partition, Fault::Stall][rng.random_range(0..3)];
                sim.fault(i, fault, rng.random_range(1_000..6_000));
                *faults.entry(format!("{fault:?}")).or_insert(0) += 1;
            }
        }
        sim.step().await;
    }
    let inputs = n;
    let functions = [(app.clone(), gpu.clone()), (app.clone(), cpu.clone())];
    let done = sim
        .step_until(120_000, |s| {
            functions.iter().all(|(a, f)| {
                let c = s.counts(a, f);
                c.queued + c.running == 0
            })
        })
        .await;
    assert!(
        done,
        "seed {seed}: inputs still queued or running 120 s after the load: {:?}",
        functions
            .iter()
            .map(|(a, f)| sim.counts(a, f))
            .collect::<Vec<_>>()
    );
    let ended = check_outputs(&sim, &calls, seed);
    let ended_ms = sim.now() - t0;
    until_scaled_to_zero(&mut sim, &functions, 60_000, seed).await;
    assert_clean(&sim, 2_000, seed);
    // Losing hosts is the platform's failure: an input fails only after it was lost more
    // times than the platform retries, never because containers died with their host.
    let init = ended
        .failed
        .get(&format!("{:?}", FailureCause::Init))
        .copied();
    assert!(
        init.is_none(),
        "seed {seed}: {init:?} inputs failed as if their function could not be set up ({ended:?})"
    );
    eprintln!(
        "function sim: {inputs} inputs in {} maps on {} nodes with faults {faults:?}; all ended at {ended_ms} ms, {} leased more than once, failed: {:?}; {} containers started; back to 0 at {} ms; {} passes; took {:.1} s",
        calls.len(),
        sim.nodes(),
        ended.retried,
        ended.failed,
        sim.stats.starts,
        sim.now() - t0,
        sim.stats.passes,
        started.elapsed().as_secs_f64()
    );
    sim.shutdown().await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_host_that_crashes_while_its_containers_start_costs_a_retry_not_the_inputs() {
    let seed = seed();
    eprintln!("function sim seed: {seed} (replay with GANTRY_SIM_SEED={seed})");
    let mut sim = FunctionSim::new(SimConfig {
        start_ms: 300..500,
        ..SimConfig::new(seed)
    });
    let (app, f): (AppName, FunctionName) = (name("crashy"), name("f"));
    sim.deploy(manifest(json!({"app": "crashy", "functions": {"f": {
        "image": "sim", "cpu": "1", "memory": "1G", "max_containers": 8, "max_inputs": 1,
        "scaledown_window": "2s",
    }}})));
    let payloads: Vec<Payload> = (0..16).map(|i| Payload::text(&format!("in-{i}"))).collect();
    let t0 = sim.now();
    let call = sim.map(&app, &f, &payloads).await;
    sim.step().await;
    // Every container starting on one host, which dies before any is ready and is back
    // before it is called down: its agent reports them lost.
    let hosts: Vec<usize> = (0..sim.nodes())
        .filter(|i| sim.containers_on(*i) > 0)
        .collect();
    assert_eq!(sim.stats.starts, 8, "seed {seed}: the first pass starts 8");
    for i in &hosts {
        sim.fault(*i, Fault::Crash, 1_000);
    }
    let done = sim
        .step_until(60_000, |s| {
            let c = s.counts(&app, &f);
            c.queued + c.running == 0
        })
        .await;
    assert!(done, "seed {seed}: the inputs did not end");
    let ended = check_outputs(&sim, &[(call, payloads)], seed);
    assert!(
        ended.failed.is_empty(),
        "seed {seed}: a host's crash failed inputs: {ended:?}"
    );
    let took = sim.now() - t0;
    // The next containers start as soon as the host is back and reports the loss (a start
    // backoff would hold the function back for up to 30 s).
    assert!(
        took <= 10_000,
        "seed {seed}: the inputs took {took} ms of simulated time after a 1 s crash"
    );
    eprintln!(
        "function sim: {} hosts crashed under 8 starting containers; 16 inputs ended after {took} ms, {} containers started",
        hosts.len(),
        sim.stats.starts
    );
    until_scaled_to_zero(&mut sim, &[(app, f)], 10_000, seed).await;
    assert_clean(&sim, 2_000, seed);
    sim.shutdown().await;
}

#[tokio::test(flavor = "current_thread")]
async fn containers_on_a_preempted_node_hear_its_deadline_and_their_work_finishes() {
    let seed = seed();
    eprintln!("function sim seed: {seed} (replay with GANTRY_SIM_SEED={seed})");
    let mut sim = FunctionSim::new(SimConfig {
        run_ms: 2_000..4_000,
        ..SimConfig::new(seed)
    });
    let (app, f): (AppName, FunctionName) = (name("spot"), name("f"));
    sim.deploy(manifest(json!({"app": "spot", "functions": {"f": {
        "image": "sim", "cpu": "1", "memory": "1G", "max_containers": 16, "max_inputs": 1,
        "scaledown_window": "2s",
    }}})));
    let payloads: Vec<Payload> = (0..48).map(|i| Payload::text(&format!("in-{i}"))).collect();
    let call = sim.map(&app, &f, &payloads).await;
    let ready = sim
        .step_until(10_000, |s| s.counts(&app, &f).ready == 16)
        .await;
    assert!(ready, "seed {seed}: 16 containers never ready");
    let host = (0..sim.nodes())
        .find(|i| sim.containers_on(*i) > 0)
        .expect("a host with containers");
    let on_host = sim.containers_on(host);
    let deadline = sim.now() + 20_000;
    sim.preempt(host, deadline);
    let done = sim
        .step_until(60_000, |s| {
            let c = s.counts(&app, &f);
            c.queued + c.running == 0
        })
        .await;
    assert!(done, "seed {seed}: the inputs did not end");
    // Every container on the node heard the node's deadline, with a grace that ends there.
    let told: Vec<&(gantry_shared::NodeId, u64, u64)> = sim.stats.preempt_drains.iter().collect();
    assert_eq!(told.len(), on_host, "seed {seed}: {told:?}");
    for (node, d, grace) in &told {
        assert_eq!((node, *d), (sim.node_id(host), deadline), "seed {seed}");
        assert!(*grace <= 20_000 && *grace > 0, "seed {seed}: grace {grace}");
    }
    // Nothing new went to the node, and every input ended with its own output.
    assert_eq!(
        sim.containers_on(host),
        0,
        "seed {seed}: the preempted node runs containers"
    );
    let ended = check_outputs(&sim, &[(call, payloads)], seed);
    assert!(ended.failed.is_empty(), "seed {seed}: {ended:?}");
    let v = &sim.stats.violations;
    assert!(v.is_empty(), "seed {seed}: {v:#?}");
    sim.shutdown().await;
}

/// An idle container's drain lost on its way (its node cut off for a moment, too briefly
/// to be called down) goes again when the node is back: the container still stops, and
/// nothing is left running or held.
#[tokio::test(flavor = "current_thread")]
async fn a_drain_lost_while_a_node_is_cut_off_for_a_moment_is_sent_again() {
    let seed = seed();
    eprintln!("function sim seed: {seed} (replay with GANTRY_SIM_SEED={seed})");
    let mut sim = FunctionSim::new(SimConfig::new(seed));
    let (app, f): (AppName, FunctionName) = (name("lossy"), name("f"));
    sim.deploy(manifest(json!({"app": "lossy", "functions": {"f": {
        "image": "sim", "cpu": "1", "memory": "1G", "max_containers": 2, "max_inputs": 1,
        "scaledown_window": "2s",
    }}})));
    let payloads: Vec<Payload> = (0..4).map(|i| Payload::text(&format!("in-{i}"))).collect();
    let call = sim.map(&app, &f, &payloads).await;
    let done = sim
        .step_until(30_000, |s| {
            let c = s.counts(&app, &f);
            c.queued + c.running == 0
        })
        .await;
    assert!(done, "seed {seed}: the inputs did not end");
    check_outputs(&sim, &[(call, payloads)], seed);
    // Idle now: their drains go out 2 s from now, while their nodes are cut off (1.5 s,
    // shorter than it takes to call a node down).
    let idle_since = sim.now();
    sim.step_until(1_900, |s| s.now() >= idle_since + 1_900)
        .await;
    let hosts: Vec<usize> = (0..sim.nodes())
        .filter(|i| sim.containers_on(*i) > 0)
        .collect();
    assert!(!hosts.is_empty(), "seed {seed}: no container to drain");
    for i in &hosts {
        sim.fault(*i, Fault::Partition, 1_500);
    }
    until_scaled_to_zero(&mut sim, &[(app, f)], 20_000, seed).await;
    assert_clean(&sim, 2_000, seed);
    sim.shutdown().await;
}

/// The coordinator is killed right after it placed containers, before their starts went
/// out. Restarted from its store, it sends those starts again once each node is connected
/// (a node ignores a start it took), so the containers start and the inputs end, instead
/// of the placements holding their slots until their startup timeout.
#[tokio::test(flavor = "current_thread")]
async fn starts_lost_with_a_coordinator_crash_are_sent_again_after_the_restart() {
    let seed = seed();
    eprintln!("function sim seed: {seed} (replay with GANTRY_SIM_SEED={seed})");
    let mut sim = FunctionSim::new(SimConfig::new(seed));
    let (app, f): (AppName, FunctionName) = (name("restart"), name("f"));
    sim.deploy(manifest(json!({"app": "restart", "functions": {"f": {
        "image": "sim", "cpu": "1", "memory": "1G", "max_containers": 4, "max_inputs": 1,
        "scaledown_window": "2s", "timeout": "300s",
    }}})));
    let payloads: Vec<Payload> = (0..8).map(|i| Payload::text(&format!("in-{i}"))).collect();
    let call = sim.map(&app, &f, &payloads).await;
    sim.crash_coordinator_after_a_pass().await;
    let c = sim.counts(&app, &f);
    assert_eq!(
        c.placed, 4,
        "seed {seed}: the placements survive the crash: {c:?}"
    );
    assert_eq!(sim.stats.starts, 0, "seed {seed}: no start reached a node");
    let t0 = sim.now();
    let done = sim
        .step_until(10_000, |s| {
            let c = s.counts(&app, &f);
            c.queued + c.running == 0
        })
        .await;
    assert!(
        done,
        "seed {seed}: the inputs did not end within 10 s of the restart: {:?}, {} containers started",
        sim.counts(&app, &f),
        sim.stats.starts
    );
    let ended = check_outputs(&sim, &[(call, payloads)], seed);
    assert!(ended.failed.is_empty(), "seed {seed}: {ended:?}");
    eprintln!(
        "function sim: 8 inputs ended {} ms after a restart that lost 4 starts",
        sim.now() - t0
    );
    until_scaled_to_zero(&mut sim, &[(app, f)], 10_000, seed).await;
    assert_clean(&sim, 2_000, seed);
    sim.shutdown().await;
}
