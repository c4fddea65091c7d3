//! The `gantry` command line: a client of the HTTP API, plus `gantry dev`, which runs a
//! coordinator and one agent on this machine as child processes.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use gantry_shared::api::{Job, JobResources, JobSpec, JobState, Node};
use gantry_shared::now_ms;
use serde::{Deserialize, Serialize};

use crate::client::ApiClient;

/// Where the CLI finds the coordinator: `gantry dev` writes it; GANTRY_ADDR and
/// GANTRY_TOKEN override it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CliConfig {
    pub addr: String,
    pub token: String,
}

impl CliConfig {
    pub fn path() -> PathBuf {
        let base = std::env::var_os("XDG_CONFIG_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
            .unwrap_or_else(|| PathBuf::from("/etc"));
        base.join("gantry").join("config.json")
    }

    /// The file (if any) overridden by the environment.
    pub fn load() -> anyhow::Result<Self> {
        let file: Option<CliConfig> = match std::fs::read(Self::path()) {
            Ok(b) => Some(serde_json::from_slice(&b).with_context(|| {
                format!(
                    "{} is not valid; delete it or rerun `gantry dev`",
                    Self::path().display()
                )
            })?),
            Err(_) => None,
        };
        let addr = std::env::var("GANTRY_ADDR")
            .ok()
            .or_else(|| file.as_ref().map(|f| f.addr.clone()));
        let token = std::env::var("GANTRY_TOKEN")
            .ok()
            .or_else(|| file.as_ref().map(|f| f.token.clone()));
        match (addr, token) {
            (Some(addr), Some(token)) => Ok(Self { addr, token }),
            _ => bail!(
                "no coordinator configured: start one with `gantry dev`, or set GANTRY_ADDR and GANTRY_TOKEN"
            ),
        }
    }

    /// The file only, without environment overrides (what `gantry dev` just wrote).
    pub fn load_from_file() -> anyhow::Result<Self> {
        let bytes = std::fs::read(Self::path())
            .with_context(|| format!("reading {}", Self::path().display()))?;
        Ok(serde_json::from_slice(&bytes)?)
    }

    pub fn save(&self) -> anyhow::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let path = Self::path();
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)?;
        f.write_all(&serde_json::to_vec_pretty(self)?)?;
        Ok(())
    }

    pub fn client(&self) -> ApiClient {
        ApiClient::new(&self.addr, &self.token)
    }
}

/// What `gantry run` submits.
pub struct RunArgs {
    pub image: String,
    pub name: Option<String>,
    pub cpu: String,
    pub memory: String,
    /// Per node.
    pub gpus: u32,
    /// Acceptable GPU models in order of preference.
    pub gpu_types: Vec<String>,
    /// Least memory per GPU (`40G`).
    pub gpu_memory: Option<String>,
    /// Gang size.
    pub nodes: u32,
    pub selector: Vec<(String, String)>,
    pub spot: bool,
    pub priority: i32,
    pub env: Vec<(String, String)>,
    pub retries: u32,
    /// Wait before the first retry (doubling per failure, at most 5 minutes).
    pub retry_delay: Option<String>,
    pub timeout: Option<String>,
    pub command: Vec<String>,
    pub detach: bool,
}

/// Submits a job; unless detached, waits for it and returns its exit code.
pub async fn run(cfg: &CliConfig, args: RunArgs, json: bool) -> anyhow::Result<i32> {
    let spec = JobSpec {
        name: args.name.unwrap_or_else(|| args.image.clone()),
        image: args.image,
        command: args.command,
        env: args.env.into_iter().collect(),
        resources: JobResources {
            cpu: args.cpu,
            memory: args.memory,
            gpus: args.gpus,
            gpu_types: args.gpu_types,
            gpu_memory: args.gpu_memory,
        },
        nodes: args.nodes,
        spot: args.spot,
        selector: args.selector.into_iter().collect(),
        retries: args.retries,
        backoff: gantry_shared::api::Backoff {
            initial: args.retry_delay.unwrap_or_else(|| "1s".into()),
            ..Default::default()
        },
        timeout: args.timeout,
        priority: args.priority,
    };
    let client = cfg.client();
    let job = client.submit(&spec).await?;
    if args.detach {
        print_job(&job, json)?;
        return Ok(0);
    }
    if !json {
        eprintln!("submitted {}", job.id);
    }
    let mut last_reason = None;
    let mut followed = 0;
    let mut seen = 0;
    let mut look_now = false;
    loop {
        // Each look waits for the next change (a long poll), so the end is seen at once;
        // after following output, look again at once (the job may have ended meanwhile).
        let job = if std::mem::take(&mut look_now) {
            client.job(job.id.as_str()).await?
        } else {
            client.job_changed(job.id.as_str(), seen, "30s").await?
        };
        seen = job.updated_at_ms;
        if !json && job.reason != last_reason {
            if let Some(r) = &job.reason {
                eprintln!("{}: {r}", job.id);
            }
            last_reason = job.reason.clone();
        }
        // Stream each generation's output once its members run (after a retry too).
        let members = crate::jobs::current(&job);
        if !json
            && !members.is_empty()
            && members[0].generation > followed
            && members
                .iter()
                .all(|a| a.started_at_ms.is_some() || a.reason.is_some())
        {
            followed = members[0].generation;
            if members.len() == 1 {
                if let Err(e) = client
                    .logs(job.id.as_str(), true, None, &mut std::io::stdout())
                    .await
                {
                    eprintln!("{}: output unavailable: {e}", job.id);
                }
            } else {
                follow_ranks(&client, job.id.as_str(), members.len() as u32).await;
            }
            look_now = true;
            continue;
        }
        if job.state.is_terminal() {
            let code = crate::jobs::exit_code(&job).unwrap_or(match job.state {
                JobState::Succeeded => 0,
                _ => 1,
            });
            if json {
                print_job(&job, true)?;
            }
            return Ok(code);
        }
    }
}

/// Follows every rank's output at once, each line prefixed `[rank<r>]: ` as torchrun's
/// logs are.
async fn follow_ranks(client: &ApiClient, id: &str, ranks: u32) {
    let tasks = (0..ranks).map(|rank| {
        let (client, id) = (client.clone(), id.to_owned());
        tokio::spawn(async move {
            let mut out = RankLines {
                prefix: format!("[rank{rank}]: "),
                partial: Vec::new(),
            };
            if let Err(e) = client.logs(&id, true, Some(rank), &mut out).await {
                eprintln!("{id}: output of rank {rank} unavailable: {e}");
            }
        })
    });
    for t in futures_util::future::join_all(tasks).await {
        if let Err(e) = t {
            eprintln!("{id}: following output failed: {e}");
        }
    }
}

/// Writes whole lines to stdout with a prefix; a partial line waits for its end (or for
/// the writer to be dropped), so ranks' lines never interleave mid-line.
struct RankLines {
    prefix: String,
    partial: Vec<u8>,
}

impl RankLines {
    fn emit(&self, line: &[u8]) -> std::io::Result<()> {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        out.write_all(self.prefix.as_bytes())?;
        out.write_all(line)?;
        out.flush()
    }
}

impl std::io::Write for RankLines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.partial.extend_from_slice(buf);
        while let Some(i) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=i).collect();
            self.emit(&line)?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for RankLines {
    fn drop(&mut self) {
        if !self.partial.is_empty() {
            let mut line = std::mem::take(&mut self.partial);
            line.push(b'\n');
            let _ = self.emit(&line);
        }
    }
}

pub fn print_job(job: &Job, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(job)?);
        return Ok(());
    }
    println!("id:      {}", job.id);
    println!("name:    {}", job.spec.name);
    println!("image:   {}", job.spec.image);
    println!("state:   {}", state_name(job.state));
    if let Some(r) = &job.reason {
        println!("reason:  {r}");
    }
    let r = &job.spec.resources;
    println!(
        "asks:    {} node(s) × cpu {}, memory {}, {} GPU(s){}{}",
        job.spec.nodes,
        r.cpu,
        r.memory,
        r.gpus,
        if r.gpu_types.is_empty() {
            String::new()
        } else {
            format!(" of {}", r.gpu_types.join(" or "))
        },
        r.gpu_memory
            .as_deref()
            .map(|m| format!(" with ≥ {m} each"))
            .unwrap_or_default()
    );
    if job.attempts.is_empty() {
        return Ok(());
    }
    println!(
        "\n{:<4} {:<5} {:<20} {:<16} {:<14} {:<10} {:<5} REASON",
        "GEN", "RANK", "NODE", "ADDRESS", "GPUS", "STATE", "EXIT"
    );
    for a in &job.attempts {
        let state = match (&a.reason, a.started_at_ms) {
            (Some(_), _) => "ended",
            (None, Some(_)) => "running",
            (None, None) => "starting",
        };
        let gpus: Vec<String> = a.gpus.iter().map(u32::to_string).collect();
        println!(
            "{:<4} {:<5} {:<20} {:<16} {:<14} {:<10} {:<5} {}",
            a.generation,
            a.rank,
            a.node,
            a.address.as_deref().unwrap_or("-"),
            if gpus.is_empty() {
                "-".into()
            } else {
                gpus.join(",")
            },
            state,
            a.exit_code
                .map(|c| c.to_string())
                .unwrap_or_else(|| "-".into()),
            a.reason.as_deref().unwrap_or("")
        );
    }
    Ok(())
}

pub fn print_jobs(jobs: &[Job], json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(jobs)?);
        return Ok(());
    }
    println!(
        "{:<20} {:<10} {:<24} {:<6} REASON",
        "ID", "STATE", "NAME", "EXIT"
    );
    for j in jobs {
        let exit = crate::jobs::exit_code(j)
            .map(|c| c.to_string())
            .unwrap_or_else(|| "-".into());
        println!(
            "{:<20} {:<10} {:<24} {:<6} {}",
            j.id,
            state_name(j.state),
            j.spec.name,
            exit,
            j.reason.as_deref().unwrap_or("")
        );
    }
    Ok(())
}

pub fn print_nodes(nodes: &[Node], json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(nodes)?);
        return Ok(());
    }
    println!(
        "{:<20} {:<10} {:<10} {:<16} {:>13} {:>15} {:<22} JOBS",
        "NODE", "STATE", "LAST SEEN", "ADDRESS", "CPU FREE", "MEMORY FREE", "GPUS FREE"
    );
    let now = now_ms();
    for n in nodes {
        println!(
            "{:<20} {:<10} {:<10} {:<16} {:>13} {:>15} {:<22} {}",
            n.id,
            n.state,
            n.last_seen_ms.map_or("never".into(), |t| ago(now, t)),
            n.address.as_deref().unwrap_or("-"),
            format!(
                "{}/{}m",
                n.cpu_millis.saturating_sub(n.reserved_cpu_millis),
                n.cpu_millis
            ),
            format!(
                "{}/{}Mi",
                n.memory_bytes.saturating_sub(n.reserved_memory_bytes) >> 20,
                n.memory_bytes >> 20
            ),
            gpu_summary(n),
            n.jobs.len()
        );
    }
    Ok(())
}

/// `gantry nodes show`: one node in full, with a line per GPU.
pub fn print_node(n: &Node, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(n)?);
        return Ok(());
    }
    let now = now_ms();
    println!("node:       {}", n.id);
    println!(
        "state:      {}{} (since {})",
        n.state,
        n.reason
            .as_deref()
            .map(|r| format!(": {r}"))
            .unwrap_or_default(),
        ago(now, n.state_since_ms)
    );
    if let Some(d) = n.deadline_ms {
        let now = now_ms();
        println!(
            "deadline:   {}",
            if d > now {
                format!("in {}s", (d - now).div_ceil(1000))
            } else {
                "passed".into()
            }
        );
    }
    println!(
        "last seen:  {}",
        n.last_seen_ms.map_or("never".into(), |t| ago(now, t))
    );
    println!("connected:  {}", if n.connected { "yes" } else { "no" });
    println!("address:    {}", n.address.as_deref().unwrap_or("-"));
    println!(
        "labels:     {}",
        if n.labels.is_empty() {
            "-".into()
        } else {
            gantry_shared::gossip::format_labels(&n.labels)
        }
    );
    println!(
        "cpu:        {}m offered, {}m reserved, {} free as the node reports",
        n.cpu_millis,
        n.reserved_cpu_millis,
        n.free_cpu_millis.map_or("?".into(), |f| format!("{f}m"))
    );
    println!(
        "memory:     {}Mi offered, {}Mi reserved, {} free as the node reports",
        n.memory_bytes >> 20,
        n.reserved_memory_bytes >> 20,
        n.free_memory_bytes
            .map_or("?".into(), |f| format!("{}Mi", f >> 20))
    );
    println!("jobs:       {}", n.jobs.len());
    if n.gpus.is_empty() {
        println!("gpus:       none");
        return Ok(());
    }
    println!(
        "\n{:<5} {:<34} {:<24} {:>7} {:>5} {:>7} {:<9} {:<22} KIND",
        "GPU", "UUID", "MODEL", "MEMORY", "NUMA", "NVLINK", "RESERVED", "HEALTH"
    );
    for g in &n.gpus {
        let opt = |v: Option<u32>| v.map_or("-".into(), |v| v.to_string());
        println!(
            "{:<5} {:<34} {:<24} {:>6}G {:>5} {:>7} {:<9} {:<22} {}",
            g.index,
            g.uuid,
            g.model,
            g.memory_bytes >> 30,
            opt(g.numa_node),
            opt(g.nvlink_group),
            if n.reserved_gpus.contains(&g.index) {
                "yes"
            } else {
                "no"
            },
            g.health.to_compact(),
            if g.simulated { "simulated" } else { "real" }
        );
    }
    Ok(())
}

/// `6/8 H100-80GB sim`: free (neither reserved nor unhealthy) over total, the models, and
/// whether they are simulated.
fn gpu_summary(n: &Node) -> String {
    if n.gpus.is_empty() {
        return "-".into();
    }
    let free = n
        .gpus
        .iter()
        .filter(|g| !g.health.is_unhealthy() && !n.reserved_gpus.contains(&g.index))
        .count();
    let mut models: Vec<&str> = n.gpus.iter().map(|g| g.model.as_str()).collect();
    models.dedup();
    let sim = if n.gpus.iter().any(|g| g.simulated) {
        " (simulated)"
    } else {
        ""
    };
    format!("{free}/{} {}{sim}", n.gpus.len(), models.join("+"))
}

fn ago(now_ms: u64, then_ms: u64) -> String {
    let s = now_ms.saturating_sub(then_ms) / 1000;
    match s {
        0..60 => format!("{s}s ago"),
        60..3600 => format!("{}m ago", s / 60),
        _ => format!("{}h ago", s / 3600),
    }
}

fn state_name(s: JobState) -> &'static str {
    match s {
        JobState::Pending => "pending",
        JobState::Running => "running",
        JobState::Succeeded => "succeeded",
        JobState::Failed => "failed",
        JobState::Cancelled => "cancelled",
    }
}

/// A sibling binary of the running one (`gantry-coordinator`, `gantry-agent`), else PATH.
pub fn sibling_binary(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join(name)))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(name))
}

/// Reads the admin token `gantry dev` kept from the coordinator's first start.
pub fn read_secret(path: &Path) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

/// `gantry image import`: packs a root filesystem (a directory or an uncompressed tarball)
/// as a one-layer OCI image and pushes it to the cluster's embedded registry as `name`
/// (`repo` or `repo:tag`). Returns the manifest digest.
pub async fn import_image(
    cfg: &CliConfig,
    source: &Path,
    name: &str,
    cmd: Vec<String>,
) -> anyhow::Result<String> {
    use sha2::{Digest, Sha256};
    let (repo, tag) = name
        .rsplit_once(':')
        .filter(|(_, t)| !t.contains('/'))
        .unwrap_or((name, "latest"));
    let layer = if source.is_dir() {
        let src = source.to_owned();
        tokio::task::spawn_blocking(move || -> std::io::Result<Vec<u8>> {
            let mut b = tar::Builder::new(Vec::new());
            b.follow_symlinks(false);
            b.append_dir_all(".", &src)?;
            b.into_inner()
        })
        .await??
    } else {
        let bytes =
            std::fs::read(source).with_context(|| format!("reading {}", source.display()))?;
        if bytes.starts_with(&[0x1f, 0x8b]) || bytes.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            bail!(
                "{} is compressed; import a directory or an uncompressed tarball",
                source.display()
            );
        }
        bytes
    };
    let digest = |b: &[u8]| format!("sha256:{}", hex::encode(Sha256::digest(b)));
    let layer_digest = digest(&layer);
    let mut run_config = serde_json::json!({"Env": [format!("PATH={}", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")]});
    if !cmd.is_empty() {
        run_config["Cmd"] = serde_json::json!(cmd);
    }
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux", "config": run_config,
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    }))?;
    let config_digest = digest(&config);
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest, "size": layer.len()}],
    }))?;
    let http = reqwest::Client::new();
    let base = if cfg.addr.starts_with("http") {
        cfg.addr.trim_end_matches('/').to_owned()
    } else {
        format!("http://{}", cfg.addr)
    };
    let check = |r: reqwest::Response, what: &str| -> anyhow::Result<()> {
        if r.status().is_success() {
            Ok(())
        } else {
            bail!("the registry refused the {what} (HTTP {})", r.status())
        }
    };
    for (blob, d) in [(layer, &layer_digest), (config.clone(), &config_digest)] {
        let r = http
            .post(format!("{base}/v2/{repo}/blobs/uploads/?digest={d}"))
            .bearer_auth(&cfg.token)
            .body(blob)
            .send()
            .await?;
        check(r, "upload")?;
    }
    let r = http
        .put(format!("{base}/v2/{repo}/manifests/{tag}"))
        .bearer_auth(&cfg.token)
        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
        .body(manifest.clone())
        .send()
        .await?;
    check(r, "manifest")?;
    Ok(digest(&manifest))
}

/// `gantry image list`: `repo:tag` for every image in the embedded registry.
pub async fn list_images(cfg: &CliConfig) -> anyhow::Result<Vec<String>> {
    let http = reqwest::Client::new();
    let base = if cfg.addr.starts_with("http") {
        cfg.addr.trim_end_matches('/').to_owned()
    } else {
        format!("http://{}", cfg.addr)
    };
    let catalog: serde_json::Value = http
        .get(format!("{base}/v2/_catalog"))
        .bearer_auth(&cfg.token)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let mut out = Vec::new();
    for repo in catalog["repositories"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r.as_str())
    {
        let tags: serde_json::Value = http
            .get(format!("{base}/v2/{repo}/tags/list"))
            .bearer_auth(&cfg.token)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        out.extend(
            tags["tags"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|t| t.as_str())
                .map(|t| format!("{repo}:{t}")),
        );
    }
    Ok(out)
}
