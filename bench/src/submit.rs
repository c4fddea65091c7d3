//! `gantry-bench submit`: the whole path with real processes — HTTP API → coordinator →
//! QUIC → agent → shim → container — on loopback. Measures durable submissions per second
//! (the API answers 201 only once the job is in sled) and submit-to-running latency: from
//! just before the POST to the first instruction of the job's `/stamp` program, which
//! prints the wall clock.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::StreamExt;
use serde_json::{Value, json};

use crate::{import_bench_image, now_ns, percentile};

pub(crate) struct Kill(pub Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn lines_until(child: &mut Child, prefix: &str) -> anyhow::Result<Vec<String>> {
    let out = child.stdout.take().context("stdout")?;
    let mut reader = BufReader::new(out);
    let mut lines = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            bail!("process exited before `{prefix}`: {lines:?}");
        }
        let line = line.trim_end().to_owned();
        let done = line.starts_with(prefix);
        lines.push(line);
        if done {
            // Keep draining so the child never blocks on a full pipe.
            std::thread::spawn(move || for _ in reader.lines() {});
            return Ok(lines);
        }
    }
}

fn field(lines: &[String], prefix: &str) -> Option<String> {
    lines
        .iter()
        .find_map(|l| l.strip_prefix(prefix))
        .map(|s| s.trim().to_owned())
}

/// A coordinator and one agent (image `bench` imported) on loopback, running until
/// dropped.
pub(crate) struct LocalCluster {
    pub coordinator: Kill,
    pub agent: Kill,
    pub api: String,
    pub admin: String,
    pub http: reqwest::Client,
}

pub(crate) async fn local_cluster(
    coordinator_bin: &Path,
    agent_bin: &Path,
    rootfs: &Path,
    work: &Path,
) -> anyhow::Result<LocalCluster> {
    let _ = std::fs::remove_dir_all(work);
    std::fs::create_dir_all(work)?;
    let agent_state = work.join("agent");
    import_bench_image(agent_bin, &agent_state, rootfs)?;
    let mut coordinator = Kill(
        Command::new(coordinator_bin)
            .args([
                "serve",
                "--gossip-listen",
                "127.0.0.1:0",
                "--api-listen",
                "127.0.0.1:0",
                "--control-listen",
                "127.0.0.1:0",
                "--state-dir",
            ])
            .arg(work.join("coordinator"))
            .env("GANTRY_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()?,
    );
    let lines = lines_until(&mut coordinator.0, "control listening on")?;
    let api = field(&lines, "api listening on").context("api address")?;
    let control = field(&lines, "control listening on").context("control address")?;
    let admin =
        field(&lines, "admin token (shown once, store it safely):").context("admin token")?;
    let http = reqwest::Client::new();
    let token: Value = http
        .post(format!("http://{api}/v1/join-tokens"))
        .bearer_auth(&admin)
        .json(&json!({"ttl": "10m"}))
        .send()
        .await?
        .json()
        .await?;
    let join = Command::new(agent_bin)
        .env("GANTRY_STATE_DIR", &agent_state)
        .env("GANTRY_CONFIG", agent_state.join("agent.toml"))
        .args([
            "join",
            "--coordinator",
            &control,
            "--node",
            "bench-node",
            "--token",
            token["token"].as_str().context("token")?,
        ])
        .stdout(Stdio::null())
        .status()?;
    if !join.success() {
        bail!("join failed");
    }
    let mut agent = Kill(
        Command::new(agent_bin)
            .env("GANTRY_STATE_DIR", &agent_state)
            .env("GANTRY_CONFIG", agent_state.join("agent.toml"))
            .args([
                "serve",
                "--coordinator",
                &control,
                "--gossip-listen",
                "127.0.0.1:0",
            ])
            .stdout(Stdio::piped())
            .spawn()?,
    );
    lines_until(&mut agent.0, "agent serving")?;
    // Wait for the node's session.
    for _ in 0..100 {
        let nodes: Value = get_json(&http, &api, &admin, "/v1/nodes").await?;
        if nodes.as_array().is_some_and(|n| !n.is_empty()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    Ok(LocalCluster {
        coordinator,
        agent,
        api,
        admin,
        http,
    })
}

/// What `submit` measures beside the table, for BENCHMARKS.md (`--json`).
#[derive(serde::Serialize)]
struct Results {
    submit_p50_ms: f64,
    submit_p99_ms: f64,
    running_p50_ms: f64,
    running_p99_ms: f64,
    submits_per_s_sequential: f64,
    submits_per_s_concurrent: f64,
    completed_jobs: usize,
    completed_per_s: f64,
    gantry_run_p50_ms: Option<f64>,
    gantry_run_p99_ms: Option<f64>,
    gantry_run_runs: usize,
}

pub struct SubmitBench<'a> {
    pub coordinator_bin: &'a Path,
    pub agent_bin: &'a Path,
    /// The `gantry` CLI, for `gantry run` round trips.
    pub cli_bin: Option<&'a Path>,
    pub rootfs: &'a Path,
    pub jobs: usize,
    pub burst: usize,
    pub cli_runs: usize,
    pub work: &'a Path,
    pub json: Option<&'a Path>,
}

pub async fn run(b: SubmitBench<'_>) -> anyhow::Result<()> {
    let SubmitBench {
        coordinator_bin,
        agent_bin,
        rootfs,
        jobs,
        burst,
        work,
        ..
    } = b;
    let LocalCluster {
        coordinator: _coordinator,
        agent: _agent,
        api,
        admin,
        http,
    } = local_cluster(coordinator_bin, agent_bin, rootfs, work).await?;

    let spec = json!({"name": "stamp", "image": "bench", "command": ["/stamp"], "resources": {"cpu": "1", "memory": "32M"}});
    let mut submit_ms = Vec::new();
    let mut running_ms = Vec::new();
    for _ in 0..jobs {
        let t0 = now_ns();
        let started = Instant::now();
        let job: Value = http
            .post(format!("http://{api}/v1/jobs"))
            .bearer_auth(&admin)
            .json(&spec)
            .send()
            .await?
            .json()
            .await?;
        submit_ms.push(started.elapsed().as_secs_f64() * 1000.0);
        let id = job["id"].as_str().context("job id")?.to_owned();
        loop {
            let job: Value = get_json(&http, &api, &admin, &format!("/v1/jobs/{id}")).await?;
            if matches!(
                job["state"].as_str(),
                Some("succeeded" | "failed" | "cancelled")
            ) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let out = http
            .get(format!("http://{api}/v1/jobs/{id}/logs"))
            .bearer_auth(&admin)
            .send()
            .await?
            .text()
            .await?;
        let stamp: i128 = out
            .trim()
            .parse()
            .with_context(|| format!("job printed no stamp: {out:?}"))?;
        running_ms.push((stamp - t0) as f64 / 1e6);
    }

    // Durable submissions per second: a burst of POSTs, each answered only once in sled.
    // Half a core each: a CPU quota much below what the container's own setup needs
    // (libcontainer's init runs inside the cgroup) would throttle its start.
    let quick = json!({"name": "burst", "image": "bench", "command": ["true"], "resources": {"cpu": "0.5", "memory": "32M"}});
    let started = Instant::now();
    for _ in 0..burst {
        let r = http
            .post(format!("http://{api}/v1/jobs"))
            .bearer_auth(&admin)
            .json(&quick)
            .send()
            .await?;
        if r.status().as_u16() != 201 {
            bail!("submission refused: {}", r.text().await?);
        }
    }
    let per_sec = burst as f64 / started.elapsed().as_secs_f64();
    // The same with 32 clients at once: the store's group commit shares fsyncs.
    let started = Instant::now();
    let posts = (0..burst).map(|_| {
        let (http, api, admin, quick) = (&http, &api, &admin, &quick);
        async move {
            let r = http
                .post(format!("http://{api}/v1/jobs"))
                .bearer_auth(admin)
                .json(quick)
                .send()
                .await?;
            if r.status().as_u16() != 201 {
                bail!("submission refused: {}", r.text().await?);
            }
            Ok(())
        }
    });
    let results: Vec<anyhow::Result<()>> = futures_util::stream::iter(posts)
        .buffer_unordered(32)
        .collect()
        .await;
    results.into_iter().collect::<anyhow::Result<Vec<()>>>()?;
    let concurrent_per_sec = burst as f64 / started.elapsed().as_secs_f64();
    wait_all_done(&http, &api, &admin).await?;

    // To completion: `burst` trivial jobs from 32 clients, from the first POST to the last
    // job's end as the coordinator recorded it.
    let first_ms = (now_ns() / 1_000_000) as u64;
    let posts = (0..burst).map(|_| {
        let (http, api, admin, quick) = (&http, &api, &admin, &quick);
        async move {
            let job: Value = http
                .post(format!("http://{api}/v1/jobs"))
                .bearer_auth(admin)
                .json(quick)
                .send()
                .await?
                .json()
                .await?;
            job["id"].as_str().map(str::to_owned).context("job id")
        }
    });
    let ids: Vec<anyhow::Result<String>> = futures_util::stream::iter(posts)
        .buffer_unordered(32)
        .collect()
        .await;
    let ids = ids.into_iter().collect::<anyhow::Result<Vec<String>>>()?;
    wait_all_done(&http, &api, &admin).await?;
    let mut last_ms = first_ms;
    for id in &ids {
        let job: Value = get_json(&http, &api, &admin, &format!("/v1/jobs/{id}")).await?;
        if job["state"] != "succeeded" {
            bail!("job {id} did not succeed: {job}");
        }
        last_ms = last_ms.max(job["updated_at_ms"].as_u64().unwrap_or(0));
    }
    let completed_per_sec = ids.len() as f64 / ((last_ms - first_ms).max(1) as f64 / 1000.0);

    // `gantry run` round trips: the CLI process submits, follows the job to its end and
    // exits with its code, as a user runs it.
    let mut cli_ms = Vec::new();
    if let Some(cli) = b.cli_bin {
        for _ in 0..b.cli_runs {
            let started = Instant::now();
            let status = Command::new(cli)
                .env("GANTRY_ADDR", &api)
                .env("GANTRY_TOKEN", &admin)
                .args(["run", "--image", "bench", "--memory", "32M", "--", "true"])
                .stdout(Stdio::null())
                .status()?;
            if !status.success() {
                bail!("gantry run failed: {status}");
            }
            cli_ms.push(started.elapsed().as_secs_f64() * 1000.0);
        }
    }

    println!("| metric | p50 | p99 | runs |");
    println!("|---|---|---|---|");
    println!(
        "| `POST /v1/jobs` round trip (durable) | {:.1} ms | {:.1} ms | {} |",
        percentile(&submit_ms, 50.0).unwrap_or(f64::NAN),
        percentile(&submit_ms, 99.0).unwrap_or(f64::NAN),
        submit_ms.len()
    );
    println!(
        "| submit → container's first instruction | {:.1} ms | {:.1} ms | {} |",
        percentile(&running_ms, 50.0).unwrap_or(f64::NAN),
        percentile(&running_ms, 99.0).unwrap_or(f64::NAN),
        running_ms.len()
    );
    println!();
    println!(
        "Durable submissions, one client, sequential: **{per_sec:.0} jobs/s** ({burst} submissions)."
    );
    println!(
        "Durable submissions, 32 concurrent clients: **{concurrent_per_sec:.0} jobs/s** ({burst} submissions)."
    );
    println!(
        "To completion (`true` in a container, 32 clients submitting): **{completed_per_sec:.0} jobs/s** ({} jobs, first submission to last end).",
        ids.len()
    );
    if !cli_ms.is_empty() {
        println!(
            "`gantry run … -- true` round trip (CLI process start to exit): p50 **{:.1} ms**, p99 {:.1} ms ({} runs).",
            percentile(&cli_ms, 50.0).unwrap_or(f64::NAN),
            percentile(&cli_ms, 99.0).unwrap_or(f64::NAN),
            cli_ms.len()
        );
    }
    if let Some(path) = b.json {
        let r = Results {
            submit_p50_ms: percentile(&submit_ms, 50.0).unwrap_or(f64::NAN),
            submit_p99_ms: percentile(&submit_ms, 99.0).unwrap_or(f64::NAN),
            running_p50_ms: percentile(&running_ms, 50.0).unwrap_or(f64::NAN),
            running_p99_ms: percentile(&running_ms, 99.0).unwrap_or(f64::NAN),
            submits_per_s_sequential: per_sec,
            submits_per_s_concurrent: concurrent_per_sec,
            completed_jobs: ids.len(),
            completed_per_s: completed_per_sec,
            gantry_run_p50_ms: percentile(&cli_ms, 50.0),
            gantry_run_p99_ms: percentile(&cli_ms, 99.0),
            gantry_run_runs: cli_ms.len(),
        };
        std::fs::write(path, serde_json::to_vec_pretty(&r)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// `GET` an API path as `admin`, as JSON.
pub(crate) async fn get_json(
    http: &reqwest::Client,
    api: &str,
    admin: &str,
    path: &str,
) -> anyhow::Result<Value> {
    Ok(http
        .get(format!("http://{api}{path}"))
        .bearer_auth(admin)
        .send()
        .await?
        .json()
        .await?)
}

/// Waits until no job is pending or running (bounded: 5 minutes).
async fn wait_all_done(http: &reqwest::Client, api: &str, admin: &str) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        let mut busy = 0;
        for state in ["pending", "running"] {
            let list: Value =
                get_json(http, api, admin, &format!("/v1/jobs?state={state}&limit=1")).await?;
            busy += list["jobs"].as_array().map_or(0, Vec::len);
        }
        if busy == 0 {
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(300) {
            bail!("jobs still pending or running after 5 minutes");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
