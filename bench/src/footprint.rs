//! `gantry-bench footprint`: what Gantry costs a GPU host in memory. A coordinator and one
//! agent on loopback; the agent's RSS idle (after its pre-started shims are up), then with
//! `containers` jobs running (`sleep`), and the RSS of one shim (median over the running
//! containers' shims). The coordinator's memory at cluster scale comes from `schedule`
//! (its state in process with thousands of nodes and 100,000 jobs).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::percentile;
use crate::rss_kib;
use crate::submit::{LocalCluster, get_json, local_cluster};

pub struct FootprintBench<'a> {
    pub coordinator_bin: &'a Path,
    pub agent_bin: &'a Path,
    pub rootfs: &'a Path,
    pub containers: usize,
    pub work: &'a Path,
    pub json: Option<&'a Path>,
}

pub async fn run(b: FootprintBench<'_>) -> anyhow::Result<()> {
    let LocalCluster {
        coordinator,
        agent,
        api,
        admin,
        http,
    } = local_cluster(b.coordinator_bin, b.agent_bin, b.rootfs, b.work).await?;
    let agent_pid = agent.0.id();
    let coordinator_pid = coordinator.0.id();
    // Settle: pre-started shims, first gossip rounds, allocator warm-up.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let agent_idle = rss_kib(agent_pid).context("agent RSS")?;
    let coordinator_idle = rss_kib(coordinator_pid).context("coordinator RSS")?;

    let spec = json!({"name": "idle", "image": "bench", "command": ["sleep", "600"],
        "resources": {"cpu": "0.01", "memory": "16M"}});
    let mut ids = Vec::new();
    for _ in 0..b.containers {
        let job: Value = http
            .post(format!("http://{api}/v1/jobs"))
            .bearer_auth(&admin)
            .json(&spec)
            .send()
            .await?
            .json()
            .await?;
        ids.push(job["id"].as_str().context("job id")?.to_owned());
    }
    let started = Instant::now();
    loop {
        let mut running = 0;
        for id in &ids {
            let j: Value = get_json(&http, &api, &admin, &format!("/v1/jobs/{id}")).await?;
            running += usize::from(j["attempts"][0]["started_at_ms"].is_u64());
        }
        if running == ids.len() {
            break;
        }
        if started.elapsed() > Duration::from_secs(120) {
            bail!("only {running} of {} containers started", ids.len());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let agent_loaded = rss_kib(agent_pid).context("agent RSS")?;
    let coordinator_loaded = rss_kib(coordinator_pid).context("coordinator RSS")?;
    let shims: Vec<f64> = shim_pids(b.agent_bin)
        .into_iter()
        .filter_map(rss_kib)
        .map(|k| k as f64)
        .collect();
    for id in &ids {
        let _ = http
            .post(format!("http://{api}/v1/jobs/{id}/cancel"))
            .bearer_auth(&admin)
            .send()
            .await;
    }
    let mib = |kib: u64| kib as f64 / 1024.0;
    let shim_mib = percentile(&shims, 50.0).map(|k| k / 1024.0);
    println!("| process | idle | with {} containers |", b.containers);
    println!("|---|---|---|");
    println!(
        "| `gantry-agent serve` | {:.1} MiB | {:.1} MiB |",
        mib(agent_idle),
        mib(agent_loaded)
    );
    println!(
        "| `gantry-coordinator serve` (one node) | {:.1} MiB | {:.1} MiB |",
        mib(coordinator_idle),
        mib(coordinator_loaded)
    );
    println!(
        "| shim (one per container, median of {}) | — | {} |",
        shims.len(),
        shim_mib.map_or("—".into(), |m| format!("{m:.1} MiB"))
    );
    if let Some(path) = b.json {
        let v = json!({
            "containers": b.containers,
            "agent_idle_mib": mib(agent_idle),
            "agent_loaded_mib": mib(agent_loaded),
            "coordinator_idle_mib": mib(coordinator_idle),
            "coordinator_loaded_mib": mib(coordinator_loaded),
            "shim_mib": shim_mib,
            "shims": shims.len(),
        });
        std::fs::write(path, serde_json::to_vec_pretty(&v)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    // Cancelled containers get SIGTERM, then SIGKILL after 10 s; their shims tear them down
    // and exit. Only then the daemons go (the agent would leave its containers running).
    let started = Instant::now();
    while shim_pids(b.agent_bin).len() > 2 && started.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop((coordinator, agent));
    Ok(())
}

/// Processes running `agent_bin shim …` (containers' shims and the agent's pre-started
/// ones).
fn shim_pids(agent_bin: &Path) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    // Shims are started from the agent's own resolved path.
    let agent_bin = std::fs::canonicalize(agent_bin).unwrap_or_else(|_| agent_bin.to_owned());
    let agent_bin = agent_bin.as_path();
    dir.flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|p| p.parse::<u32>().ok()))
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let mut args = cmdline.split(|c| *c == 0);
            let exe = args.next().and_then(|a| std::str::from_utf8(a).ok());
            exe.is_some_and(|e| Path::new(e) == agent_bin) && args.next() == Some(b"shim")
        })
        .collect()
}
