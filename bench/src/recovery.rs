//! `gantry-bench recovery`: how fast work comes back after a failure, with real processes
//! on the test-host harness (`gantry_tests::cluster`: network namespaces on a bridge, a
//! coordinator, three agents with simulated GPUs).
//!
//! Each trial runs one single-GPU job that exits at once on SIGTERM, does the fault to its
//! node, and measures from the fault to the job's next generation running elsewhere (the
//! agent's `started` time of the new attempt; all clocks are this machine's):
//! - **node loss**: kill -9 of every process of the host (agent, shims, containers);
//! - **preemption**: `POST /v1/nodes/{id}/preempt` with a 30 s deadline; also reported
//!   without the grace period, i.e. from the old container's exit to the new start
//!   (Gantry starts the next generation only once the old one stopped);
//! - **GPU fault**: an Xid 79 injected on the job's GPU (`gantry-agent gpu inject`).
//!
//! Between trials the host is brought back (agent restarted, node undrained, GPU cleared)
//! and the job cancelled, so every trial starts from the same cluster.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use gantry_shared::now_ms;
use gantry_tests::cluster::{ClusterSpec, TestCluster, state_of};
use serde_json::{Value, json};

use crate::percentile;

const AGENTS: usize = 3;
const WAIT: Duration = Duration::from_secs(60);

pub struct RecoveryBench {
    pub trials: usize,
    pub json: Option<std::path::PathBuf>,
}

#[derive(Default)]
struct Samples {
    node_loss: Vec<f64>,
    preempt: Vec<f64>,
    preempt_no_grace: Vec<f64>,
    xid: Vec<f64>,
}

pub fn run(b: RecoveryBench) -> anyhow::Result<()> {
    let mut c = TestCluster::start(ClusterSpec {
        agents: AGENTS,
        simulate_gpus: Some("2xH100-80GB".into()),
        busybox: true,
        ..ClusterSpec::default()
    });
    let mut s = Samples::default();
    for trial in 0..b.trials {
        eprintln!("recovery: trial {} of {}", trial + 1, b.trials);
        // Node loss.
        let (id, i, _) = running_job(&c)?;
        let t0 = now_ms();
        c.kill_host(i);
        let started = next_generation_started(&c, &id)?;
        s.node_loss.push(started.saturating_sub(t0) as f64);
        eprintln!("recovery: node loss {} ms", started.saturating_sub(t0));
        finish(&c, &id)?;
        c.start_agent(i);
        all_ready(&c)?;

        // Preemption.
        let (id, i, _) = running_job(&c)?;
        let node = c.agents[i].node.clone();
        let t0 = now_ms();
        admin(
            &c,
            &format!("/v1/nodes/{node}/preempt"),
            json!({"deadline": "30s"}),
        )?;
        let started = next_generation_started(&c, &id)?;
        let job = c.job(&id);
        let old_end = job["attempts"][0]["ended_at_ms"]
            .as_u64()
            .context("the preempted attempt has no end time")?;
        s.preempt.push(started.saturating_sub(t0) as f64);
        s.preempt_no_grace
            .push(started.saturating_sub(old_end.max(t0)) as f64);
        finish(&c, &id)?;
        admin(&c, &format!("/v1/nodes/{node}/undrain"), json!({}))?;
        all_ready(&c)?;

        // GPU fault.
        let (id, i, gpu) = running_job(&c)?;
        let node = c.agents[i].node.clone();
        let t0 = now_ms();
        c.inject_xid(i, &gpu.to_string(), "79");
        let started = next_generation_started(&c, &id)?;
        s.xid.push(started.saturating_sub(t0) as f64);
        finish(&c, &id)?;
        admin(&c, &format!("/v1/nodes/{node}/gpus/{gpu}/clear"), json!({}))?;
    }
    if let Some(path) = &b.json {
        let q = |v: &[f64]| json!({"p50_ms": percentile(v, 50.0), "p90_ms": percentile(v, 90.0), "max_ms": percentile(v, 100.0), "trials": v.len()});
        let v = json!({
            "node_loss": q(&s.node_loss),
            "preempt": q(&s.preempt),
            "preempt_no_grace": q(&s.preempt_no_grace),
            "xid": q(&s.xid),
        });
        std::fs::write(path, serde_json::to_vec_pretty(&v)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    println!(
        "| From | to | trials | p50 | p90 | max |\n|---|---|---|---|---|---|\n{}\n{}\n{}\n{}",
        row(
            "kill -9 of the job's host",
            "running on another node",
            &s.node_loss
        ),
        row(
            "preemption notice (30 s deadline)",
            "running on another node",
            &s.preempt
        ),
        row(
            "preemption: the old container's exit (grace excluded)",
            "running on another node",
            &s.preempt_no_grace
        ),
        row(
            "Xid 79 injected on the job's GPU",
            "running again (another GPU or node)",
            &s.xid
        ),
    );
    Ok(())
}

fn row(from: &str, to: &str, ms: &[f64]) -> String {
    let q = |p| percentile(ms, p).map_or("-".into(), |v: f64| format!("{:.2} s", v / 1000.0));
    format!(
        "| {from} | {to} | {} | {} | {} | {} |",
        ms.len(),
        q(50.0),
        q(90.0),
        q(100.0)
    )
}

/// Submits a single-GPU job and waits until it runs; returns its id, its host and GPU.
fn running_job(c: &TestCluster) -> anyhow::Result<(String, usize, u64)> {
    let job = c.submit(json!({
        "name": "recovery", "image": "busybox",
        "command": ["sh", "-c", "trap 'exit 0' TERM; sleep 1000 & wait"],
        "resources": {"cpu": "0.5", "memory": "64M", "gpus": 1}
    }));
    let id = job["id"].as_str().context("job id")?.to_owned();
    let j = wait(c, &id, |j| {
        j["attempts"][0]["started_at_ms"].is_u64() && j["state"] == "running"
    })?;
    let node = &j["attempts"][0]["node"];
    let i = c
        .agents
        .iter()
        .position(|a| node == a.node.as_str())
        .context("the job's node")?;
    let gpu = j["attempts"][0]["gpus"][0].as_u64().context("its GPU")?;
    Ok((id, i, gpu))
}

/// Waits for generation 2 of `id` to have started; returns when (agent's clock, ms).
fn next_generation_started(c: &TestCluster, id: &str) -> anyhow::Result<u64> {
    let j = wait(c, id, |j| {
        j["attempts"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|a| a["generation"] == 2 && a["started_at_ms"].is_u64())
    })?;
    j["attempts"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|a| a["generation"] == 2)
        .and_then(|a| a["started_at_ms"].as_u64())
        .context("generation 2 start time")
}

/// Cancels `id` and waits until it ended.
fn finish(c: &TestCluster, id: &str) -> anyhow::Result<()> {
    admin(c, &format!("/v1/jobs/{id}/cancel"), json!({}))?;
    wait(c, id, |j| {
        j["state"] == "cancelled"
            && j["attempts"]
                .as_array()
                .into_iter()
                .flatten()
                .all(|a| !a["reason"].is_null())
    })?;
    Ok(())
}

fn wait(c: &TestCluster, id: &str, ok: impl Fn(&Value) -> bool) -> anyhow::Result<Value> {
    let started = Instant::now();
    loop {
        let j = c.job(id);
        if ok(&j) {
            return Ok(j);
        }
        if started.elapsed() > WAIT {
            bail!("job {id} did not get there within {WAIT:?}: {j}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn all_ready(c: &TestCluster) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        let nodes = c.nodes();
        if c.agents
            .iter()
            .all(|a| state_of(&nodes, &a.node) == Some("ready"))
        {
            return Ok(());
        }
        if started.elapsed() > WAIT {
            bail!("nodes not ready within {WAIT:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// An admin `POST` to the API.
fn admin(c: &TestCluster, path: &str, body: Value) -> anyhow::Result<()> {
    let r = c
        .http()
        .post(format!("http://{}{path}", c.api))
        .bearer_auth(&c.admin)
        .json(&body)
        .send()
        .with_context(|| format!("POST {path}"))?;
    if !r.status().is_success() {
        bail!(
            "POST {path}: {} {}",
            r.status(),
            r.text().unwrap_or_default()
        );
    }
    Ok(())
}
