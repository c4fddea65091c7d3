//! `gantry-bench functions`: the serverless path with real processes on a test host
//! (`gantry_tests::cluster`: a coordinator and one agent in a network namespace, the static
//! echo runtime of `examples/echo-runtime` imported as image `echo`), through the HTTP API
//! with a keep-alive client, as a user calls it:
//! - **warm call**: sequential sync calls of a trivial echo to one warm container
//!   (`min_containers = 1`), each from just before the `POST …/calls` to its `200`;
//! - **map**: one call of N inputs over 4 warm containers, from the `POST` to the moment a
//!   long poll on the call says every input ended; and the same inputs through `gantry map`
//!   (one streamed map fed in chunks of 500), the CLI process from start to exit;
//! - **scale from zero**: a sync call to a deployed function with no container, the image
//!   cached on the node; between trials the function drains to zero (`scaledown_window =
//!   "2s"`, waited until `GET /v1/apps/{app}` shows no container);
//! - **0 → N containers**: from the deploy of `min_containers = N` until the app shows N
//!   idle (ready) containers.
//!
//! Every loop is bounded by a count and a deadline; nothing here asserts a time.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use gantry_tests::cluster::{ClusterSpec, TestCluster};
use serde_json::{Value, json};

use crate::cpu::CpuWindow;
use crate::percentile;

/// The longest any wait for a state of the cluster may take.
const WAIT: Duration = Duration::from_secs(90);

pub struct FunctionsBench {
    /// Timed sequential warm calls (after a warm-up of 100).
    pub calls: usize,
    /// Inputs of the map.
    pub map_inputs: usize,
    /// `max_inputs` of each of the map's 4 containers.
    pub map_max_inputs: u32,
    /// Scale-from-zero trials.
    pub cold_trials: usize,
    /// Containers of the 0 → N measurement, and its trials.
    pub fleet: u32,
    pub fleet_trials: usize,
    /// `cpu` of every function container (a small CFS quota slows container starts).
    pub cpu: String,
    pub json: Option<PathBuf>,
}

/// The API of the cluster, with one keep-alive client (also `gantry-bench web`'s).
pub(crate) struct Api {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Api {
    /// The cluster's API as its admin.
    pub(crate) fn of(c: &TestCluster) -> anyhow::Result<Self> {
        Ok(Self {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(120))
                .tcp_nodelay(true)
                .pool_max_idle_per_host(4)
                .build()?,
            base: format!("http://{}", c.api),
            token: c.admin.clone(),
        })
    }

    pub(crate) async fn post(&self, path: &str, body: &Value) -> anyhow::Result<(u16, Value)> {
        let r = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .json(body)
            .send()
            .await
            .with_context(|| format!("POST {path}"))?;
        let status = r.status().as_u16();
        let v: Value = r
            .json()
            .await
            .with_context(|| format!("POST {path}: body"))?;
        if !(200..300).contains(&status) {
            bail!("POST {path}: {status} {v}");
        }
        Ok((status, v))
    }

    pub(crate) async fn get(&self, path: &str) -> anyhow::Result<Value> {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .with_context(|| format!("GET {path}"))?;
        let status = r.status();
        let v: Value = r
            .json()
            .await
            .with_context(|| format!("GET {path}: body"))?;
        if !status.is_success() {
            bail!("GET {path}: {status} {v}");
        }
        Ok(v)
    }

    /// Deploys app `app` with one function `echo` running the echo runtime.
    async fn deploy(&self, app: &str, cpu: &str, extra: Value) -> anyhow::Result<()> {
        let mut f = json!({
            "image": "echo", "command": ["/app/runtime"], "cpu": cpu, "memory": "64M",
        });
        for (k, v) in extra.as_object().into_iter().flatten() {
            f[k] = v.clone();
        }
        let manifest = json!({"app": app, "functions": {"echo": f}});
        self.post(&format!("/v1/apps/{app}/deployments"), &manifest)
            .await?;
        Ok(())
    }

    /// (starting, idle, busy, draining) over the app's functions.
    pub(crate) async fn containers(&self, app: &str) -> anyhow::Result<[u64; 4]> {
        let v = self.get(&format!("/v1/apps/{app}")).await?;
        let mut n = [0; 4];
        for f in v["functions"].as_array().into_iter().flatten() {
            for (i, k) in ["starting", "idle", "busy", "draining"].iter().enumerate() {
                n[i] += f[*k].as_u64().unwrap_or(0);
            }
        }
        Ok(n)
    }

    /// Polls the app every `every` until `ok` holds for its container counts; returns the
    /// time it took.
    pub(crate) async fn wait_containers(
        &self,
        app: &str,
        what: &str,
        every: Duration,
        ok: impl Fn([u64; 4]) -> bool,
    ) -> anyhow::Result<Duration> {
        let started = Instant::now();
        loop {
            let n = self.containers(app).await?;
            if ok(n) {
                return Ok(started.elapsed());
            }
            if started.elapsed() > WAIT {
                bail!(
                    "{app}: {what} not reached within {WAIT:?} (starting, idle, busy, draining: {n:?})"
                );
            }
            tokio::time::sleep(every).await;
        }
    }

    /// Stops the app and waits until none of its containers is left.
    pub(crate) async fn stop(&self, app: &str) -> anyhow::Result<()> {
        self.post(&format!("/v1/apps/{app}/stop"), &json!({}))
            .await?;
        self.wait_containers(app, "no container", Duration::from_millis(50), |n| {
            n.iter().sum::<u64>() == 0
        })
        .await?;
        Ok(())
    }

    /// One sync call of `text`; its view once it succeeded.
    async fn call(&self, app: &str, text: &str) -> anyhow::Result<Value> {
        let (status, v) = self
            .post(
                &format!("/v1/apps/{app}/functions/echo/calls"),
                &json!({"input": {"text": text}}),
            )
            .await?;
        if status != 200 || v["state"] != "succeeded" {
            bail!("call to {app}: {status} {v}");
        }
        if v["results"][0]["output"]["text"] != text {
            bail!("call to {app} answered something else: {v}");
        }
        Ok(v)
    }
}

/// A cluster of one agent offering enough for every container of every phase (the offer
/// is accounting; the cores are this machine's), with `images` (`busybox`, `echo`), a
/// single-threaded runtime, the API, and the coordinator's and the agent's pids.
pub(crate) struct OneAgent {
    pub c: TestCluster,
    pub rt: tokio::runtime::Runtime,
    pub api: Api,
    pub pids: (u32, u32),
}

impl OneAgent {
    pub(crate) fn start(images: ClusterSpec) -> anyhow::Result<Self> {
        let c = TestCluster::start(ClusterSpec {
            agents: 1,
            cpus: "64".into(),
            memory: "32G".into(),
            ..images
        });
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let api = Api::of(&c)?;
        let pids = (
            c.coordinator.child.id(),
            c.agents[0].proc.as_ref().map_or(0, |p| p.child.id()),
        );
        Ok(Self { c, rt, api, pids })
    }
}

pub fn run(b: FunctionsBench) -> anyhow::Result<()> {
    let OneAgent { c, rt, api, pids } = OneAgent::start(ClusterSpec {
        echo: true,
        ..ClusterSpec::default()
    })?;
    let mut out = json!({"cpu": b.cpu});

    eprintln!("functions: warm calls");
    out["warm"] = rt.block_on(warm(&api, &b, pids))?;
    eprintln!("functions: map of {} inputs", b.map_inputs);
    out["map"] = rt.block_on(map(&api, &b, pids))?;
    out["map"]["cli"] = cli_map(&c, &b).unwrap_or_else(|e| json!({"error": format!("{e:#}")}));
    rt.block_on(api.stop("map"))?;
    eprintln!("functions: scale from zero, {} trials", b.cold_trials);
    out["cold"] = rt.block_on(cold(&api, &b))?;
    eprintln!("functions: 0 -> {} containers", b.fleet);
    out["fleet"] = rt.block_on(fleet(&api, &b))?;

    print_tables(&out, &b);
    if let Some(path) = &b.json {
        std::fs::write(path, serde_json::to_vec_pretty(&out)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    drop(api);
    drop(rt);
    drop(c);
    Ok(())
}

pub(crate) fn stats(v: &[f64]) -> Value {
    json!({
        "n": v.len(),
        "p50_ms": percentile(v, 50.0),
        "p90_ms": percentile(v, 90.0),
        "p99_ms": percentile(v, 99.0),
        "max_ms": percentile(v, 100.0),
        "mean_ms": if v.is_empty() { None } else { Some(v.iter().sum::<f64>() / v.len() as f64) },
    })
}

/// The p50 of each phase the coordinator recorded for these inputs' views.
fn phases(views: &[Value]) -> Value {
    let mut o = serde_json::Map::new();
    for k in [
        "queued_ms",
        "placement_ms",
        "image_ms",
        "startup_ms",
        "run_ms",
        "total_ms",
    ] {
        let v: Vec<f64> = views
            .iter()
            .filter_map(|r| r["timings"][k].as_f64())
            .collect();
        o.insert(k.into(), json!({"p50": percentile(&v, 50.0), "n": v.len()}));
    }
    Value::Object(o)
}

async fn warm(api: &Api, b: &FunctionsBench, pids: (u32, u32)) -> anyhow::Result<Value> {
    api.deploy(
        "warm",
        &b.cpu,
        json!({"min_containers": 1, "max_containers": 1, "max_inputs": 1}),
    )
    .await?;
    api.wait_containers("warm", "1 idle", Duration::from_millis(20), |n| n[1] == 1)
        .await?;
    for i in 0..100 {
        api.call("warm", &format!("w{i}")).await?;
    }
    let mut ms = Vec::with_capacity(b.calls);
    let mut server = Vec::with_capacity(b.calls);
    let deadline = Instant::now() + Duration::from_secs(300);
    let cpu = CpuWindow::start(pids.0, pids.1);
    for i in 0..b.calls {
        let t = Instant::now();
        let v = api.call("warm", &format!("c{i}")).await?;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
        server.push(v["results"][0].clone());
        if Instant::now() > deadline {
            eprintln!("functions: warm calls stopped at the 300 s deadline after {i}");
            break;
        }
    }
    let cpu = cpu.end();
    api.stop("warm").await?;
    let mut s = stats(&ms);
    s["phases"] = phases(&server);
    s["cpu"] = cpu;
    Ok(s)
}

async fn map(api: &Api, b: &FunctionsBench, pids: (u32, u32)) -> anyhow::Result<Value> {
    api.deploy(
        "map",
        &b.cpu,
        json!({"min_containers": 4, "max_containers": 4, "max_inputs": b.map_max_inputs}),
    )
    .await?;
    api.wait_containers("map", "4 idle", Duration::from_millis(20), |n| n[1] == 4)
        .await?;
    // Warm-up: a small map.
    let small: Vec<Value> = (0..200).map(|i| json!({"text": format!("{i}")})).collect();
    api.post(
        "/v1/apps/map/functions/echo/calls",
        &json!({"inputs": small}),
    )
    .await?;
    let inputs: Vec<Value> = (0..b.map_inputs)
        .map(|i| json!({"text": format!("{i}")}))
        .collect();
    let body = json!({"inputs": inputs, "wait": false});
    let cpu = CpuWindow::start(pids.0, pids.1);
    let t0 = Instant::now();
    let (_, call) = api.post("/v1/apps/map/functions/echo/calls", &body).await?;
    let accepted = t0.elapsed();
    let id = call["id"].as_str().context("call id")?.to_owned();
    let done = loop {
        let v = api.get(&format!("/v1/calls/{id}?wait=55s")).await?;
        if v["state"] != "running" {
            break v;
        }
        if t0.elapsed() > Duration::from_secs(600) {
            bail!("the map did not end within 600 s");
        }
    };
    let secs = t0.elapsed().as_secs_f64();
    let cpu = cpu.end();
    if done["state"] != "succeeded" || done["succeeded"].as_u64() != Some(b.map_inputs as u64) {
        bail!(
            "the map ended {} with {} of {} succeeded",
            done["state"],
            done["succeeded"],
            b.map_inputs
        );
    }
    let quiet = map_polling_counters(api, b, pids).await?;
    let per_node: std::collections::BTreeMap<String, usize> = done["results"]
        .as_array()
        .into_iter()
        .flatten()
        .fold(Default::default(), |mut m, r| {
            *m.entry(r["container"].as_str().unwrap_or("?").to_owned())
                .or_default() += 1;
            m
        });
    Ok(json!({
        "inputs": b.map_inputs,
        "containers": 4,
        "max_inputs": b.map_max_inputs,
        "accepted_s": accepted.as_secs_f64(),
        "seconds": secs,
        "per_s": b.map_inputs as f64 / secs,
        "per_container": per_node.values().collect::<Vec<_>>(),
        "phases": phases(done["results"].as_array().map(Vec::as_slice).unwrap_or(&[])),
        "cpu": cpu,
        "polling_counters": quiet,
    }))
}

/// The same map, but the client waits by polling the function's counters (`GET
/// /v1/apps/map` every 50 ms until nothing is queued or running) and reads the call once at
/// the end, instead of holding a long poll on the call: a long poll re-reads the whole call
/// on every output of any call, so this isolates what the wait costs the coordinator.
async fn map_polling_counters(
    api: &Api,
    b: &FunctionsBench,
    pids: (u32, u32),
) -> anyhow::Result<Value> {
    let inputs: Vec<Value> = (0..b.map_inputs)
        .map(|i| json!({"text": format!("q{i}")}))
        .collect();
    let body = json!({"inputs": inputs, "wait": false});
    let cpu = CpuWindow::start(pids.0, pids.1);
    let t0 = Instant::now();
    let (_, call) = api.post("/v1/apps/map/functions/echo/calls", &body).await?;
    let id = call["id"].as_str().context("call id")?.to_owned();
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let v = api.get("/v1/apps/map").await?;
        let f = &v["functions"][0];
        if f["queued"] == 0 && f["running"] == 0 {
            let done = api.get(&format!("/v1/calls/{id}")).await?;
            if done["state"] != "running" {
                let secs = t0.elapsed().as_secs_f64();
                let cpu = cpu.end();
                if done["succeeded"].as_u64() != Some(b.map_inputs as u64) {
                    bail!(
                        "the map ended {} with {} succeeded",
                        done["state"],
                        done["succeeded"]
                    );
                }
                return Ok(
                    json!({"seconds": secs, "per_s": b.map_inputs as f64 / secs, "cpu": cpu}),
                );
            }
        }
        if t0.elapsed() > Duration::from_secs(600) {
            bail!("the map did not end within 600 s");
        }
    }
}

/// The same inputs through `gantry map` (the CLI process, start to exit).
fn cli_map(c: &TestCluster, b: &FunctionsBench) -> anyhow::Result<Value> {
    let file = c.dir.path().join("inputs.jsonl");
    let lines: Vec<String> = (0..b.map_inputs).map(|i| format!("m{i}")).collect();
    std::fs::write(&file, lines.join("\n"))?;
    let t0 = Instant::now();
    let out = c.gantry(&[
        "map",
        "map",
        "echo",
        "--input-file",
        &file.to_string_lossy(),
    ]);
    let secs = t0.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&file);
    if !out.status.success() {
        bail!(
            "gantry map: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let n = String::from_utf8_lossy(&out.stdout).lines().count();
    if n != b.map_inputs {
        bail!("gantry map printed {n} outputs for {} inputs", b.map_inputs);
    }
    Ok(json!({"seconds": secs, "per_s": n as f64 / secs}))
}

async fn cold(api: &Api, b: &FunctionsBench) -> anyhow::Result<Value> {
    api.deploy(
        "cold",
        &b.cpu,
        json!({"min_containers": 0, "scaledown_window": "2s", "max_inputs": 1}),
    )
    .await?;
    // The first start of the app is not timed (page cache, the image's first overlay).
    api.call("cold", "first").await?;
    let mut ms = Vec::new();
    let mut views = Vec::new();
    let budget = Instant::now() + Duration::from_secs(300);
    for i in 0..b.cold_trials {
        api.wait_containers("cold", "zero containers", Duration::from_millis(50), |n| {
            n.iter().sum::<u64>() == 0
        })
        .await?;
        // Let the drained container's teardown finish, so it does not share the CPU.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let t = Instant::now();
        let v = api.call("cold", &format!("cold{i}")).await?;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
        views.push(v["results"][0].clone());
        if Instant::now() > budget {
            eprintln!("functions: scale-from-zero trials stopped at 300 s after {i}");
            break;
        }
    }
    api.stop("cold").await?;
    let mut s = stats(&ms);
    s["phases"] = phases(&views);
    Ok(s)
}

async fn fleet(api: &Api, b: &FunctionsBench) -> anyhow::Result<Value> {
    let n = u64::from(b.fleet);
    let (mut all, mut first, mut placed) = (Vec::new(), Vec::new(), Vec::new());
    for t in 0..b.fleet_trials {
        let app = format!("fleet{t}");
        let t0 = Instant::now();
        api.deploy(
            &app,
            &b.cpu,
            json!({"min_containers": b.fleet, "max_containers": b.fleet}),
        )
        .await?;
        let (mut f, mut p) = (None, None);
        let started = Instant::now();
        loop {
            let c = api.containers(&app).await?;
            let el = t0.elapsed().as_secs_f64() * 1e3;
            if f.is_none() && c[1] >= 1 {
                f = Some(el);
            }
            if p.is_none() && c[0] + c[1] >= n {
                p = Some(el);
            }
            if c[1] >= n {
                all.push(el);
                break;
            }
            if started.elapsed() > WAIT {
                bail!("{app}: {n} idle containers not reached within {WAIT:?}: {c:?}");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        first.extend(f);
        placed.extend(p);
        api.stop(&app).await?;
    }
    Ok(json!({
        "containers": n,
        "all_ready": stats(&all),
        "first_ready": stats(&first),
        "all_placed": stats(&placed),
        "all_ready_samples": all,
    }))
}

fn print_tables(o: &Value, b: &FunctionsBench) {
    let f = |v: &Value| v.as_f64().map_or("—".into(), |x| format!("{x:.1}"));
    let w = &o["warm"];
    let m = &o["map"];
    let c = &o["cold"];
    let fl = &o["fleet"];
    println!("| metric | n | p50 | p99 (or p90) | max |");
    println!("|---|---|---|---|---|");
    println!(
        "| warm sync call, `POST …/calls` round trip (ms) | {} | {} | {} | {} |",
        w["n"],
        f(&w["p50_ms"]),
        f(&w["p99_ms"]),
        f(&w["max_ms"])
    );
    println!(
        "| scale from zero to the first output (ms) | {} | {} | {} (p90) | {} |",
        c["n"],
        f(&c["p50_ms"]),
        f(&c["p90_ms"]),
        f(&c["max_ms"])
    );
    println!(
        "| 0 → {} containers ready (ms) | {} | {} | — | {} |",
        fl["containers"],
        fl["all_ready"]["n"],
        f(&fl["all_ready"]["p50_ms"]),
        f(&fl["all_ready"]["max_ms"])
    );
    println!(
        "| … first of them ready / all placed (ms) | {} | {} / {} | — | — |",
        fl["all_ready"]["n"],
        f(&fl["first_ready"]["p50_ms"]),
        f(&fl["all_placed"]["p50_ms"])
    );
    println!();
    println!(
        "Map of {} inputs over 4 warm containers (`max_inputs = {}`), one `POST` and a long poll: **{:.0} inputs/s** ({:.2} s; accepted durably in {:.2} s). Through `gantry map` (one streamed map fed in chunks of 500): {}.",
        b.map_inputs,
        b.map_max_inputs,
        m["per_s"].as_f64().unwrap_or(f64::NAN),
        m["seconds"].as_f64().unwrap_or(f64::NAN),
        m["accepted_s"].as_f64().unwrap_or(f64::NAN),
        m["cli"]["per_s"].as_f64().map_or_else(
            || format!("failed: {}", m["cli"]["error"]),
            |x| format!("**{x:.0} inputs/s**")
        )
    );
    let ph = |v: &Value| {
        [
            "queued_ms",
            "placement_ms",
            "image_ms",
            "startup_ms",
            "run_ms",
            "total_ms",
        ]
        .iter()
        .filter_map(|k| {
            v[*k]["p50"]
                .as_f64()
                .map(|x| format!("{} {x:.0}", k.trim_end_matches("_ms")))
        })
        .collect::<Vec<_>>()
        .join(", ")
    };
    println!();
    println!(
        "Where the time went, as the coordinator records it per input (p50, ms; whole milliseconds): warm call: {}; scale from zero: {}.",
        ph(&w["phases"]),
        ph(&c["phases"])
    );
    let cpu = |v: &Value, n: f64| {
        crate::cpu::summary(
            v,
            n,
            (
                "input",
                "client",
                "shims, containers, kernel threads, other work",
            ),
        )
    };
    let q = &m["polling_counters"];
    println!();
    println!(
        "The same map with the client polling the function's counters every 50 ms instead of a long poll on the call: **{:.0} inputs/s** ({:.2} s).",
        q["per_s"].as_f64().unwrap_or(f64::NAN),
        q["seconds"].as_f64().unwrap_or(f64::NAN),
    );
    println!();
    println!(
        "CPU: warm calls: {}. Map (long poll): {}. Map (counters polled): {}.",
        cpu(&w["cpu"], w["n"].as_f64().unwrap_or(1.0)),
        cpu(&m["cpu"], b.map_inputs as f64),
        cpu(&q["cpu"], b.map_inputs as f64)
    );
    println!();
    println!(
        "One agent on a test host; every function container asks for `cpu = \"{}\"`, `memory = \"64M\"`; a keep-alive HTTP client from the root namespace.",
        b.cpu
    );
}
