//! `gantry dev`: a whole Gantry on this machine. Starts `gantry-coordinator serve` and
//! N `gantry-agent serve` processes (each with its own state directory, node name and
//! gossip port, optionally with simulated GPUs) as children of a local state directory,
//! joins the agents on first use, writes the CLI's address and token, and stays in the
//! foreground until Ctrl-C or SIGTERM, then stops them all (the agents' containers stop
//! with their jobs' cancellation or keep running under their shims, as on a real host).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::api::ApiClient;
use crate::config::{CliConfig, read_secret, sibling_binary};

pub struct DevConfig {
    pub state_dir: PathBuf,
    pub api_listen: String,
    pub control_listen: String,
    /// The first agent's node name; further agents are `<node>-2`, `<node>-3`, ….
    pub node: String,
    /// How many agents to run.
    pub agents: u32,
    /// Simulated GPUs for every agent (`8xH100-80GB,nvlink=4`); none when absent.
    pub simulate_gpus: Option<String>,
    /// Instead of waiting for Ctrl-C: push this root filesystem as image `demo`, run a
    /// demo job on it, print its output and exit with its exit code.
    pub demo: Option<PathBuf>,
    /// Children log from `info` on a terminal too.
    pub verbose: bool,
}

/// How the children log: on a terminal (where their stderr goes, as ours does) as text
/// and, unless `verbose` or GANTRY_LOG says otherwise, only warnings and errors, so their
/// lines do not bury `gantry dev`'s own; off a terminal (a file, a journal) as they would
/// by themselves: JSON from `info`.
fn child_log_level(verbose: bool) -> Option<&'static str> {
    use std::io::IsTerminal;
    let quiet =
        std::io::stderr().is_terminal() && !verbose && std::env::var_os("GANTRY_LOG").is_none();
    quiet.then_some("warn")
}

/// Lines a child printed up to the one starting with `until`; the rest of its output is
/// copied to our stderr in the background.
async fn read_until(child: &mut Child, until: &str, what: &str) -> anyhow::Result<Vec<String>> {
    let stdout = child.stdout.take().context("child stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let mut seen = Vec::new();
    let found = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await? {
            let done = line.starts_with(until);
            seen.push(line);
            if done {
                return Ok::<bool, std::io::Error>(true);
            }
        }
        Ok(false)
    })
    .await
    .with_context(|| format!("{what} did not start within 60 s"))??;
    if !found {
        bail!("{what} exited during start-up; its messages are above");
    }
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            eprintln!("{line}");
        }
    });
    Ok(seen)
}

fn field(lines: &[String], prefix: &str) -> Option<String> {
    lines
        .iter()
        .find_map(|l| l.strip_prefix(prefix))
        .map(|r| r.trim().to_owned())
}

pub async fn run(cfg: DevConfig) -> anyhow::Result<i32> {
    std::fs::create_dir_all(&cfg.state_dir)
        .with_context(|| format!("creating {}", cfg.state_dir.display()))?;
    let token_file = cfg.state_dir.join("admin-token");
    let mut coordinator = Command::new(sibling_binary("gantry-coordinator"));
    // Its own configuration file (absent: the defaults), never the host's
    // /etc/gantry/coordinator.toml or GANTRY_CONFIG: the dev cluster stays plain HTTP on
    // loopback whatever a production coordinator on this host serves.
    coordinator.env("GANTRY_CONFIG", cfg.state_dir.join("coordinator.toml"));
    if let Some(level) = child_log_level(cfg.verbose) {
        coordinator.env("GANTRY_LOG", level);
    }
    let mut coordinator = coordinator
        .args([
            "serve",
            "--gossip-listen",
            "127.0.0.1:0",
            "--api-listen",
            &cfg.api_listen,
            "--control-listen",
            &cfg.control_listen,
            "--state-dir",
        ])
        .arg(cfg.state_dir.join("coordinator"))
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("starting gantry-coordinator (it ships next to gantry)")?;
    let lines = read_until(&mut coordinator, "control listening on", "the coordinator").await?;
    if let Some(admin) = field(&lines, "admin token (shown once, store it safely):") {
        write_secret(&token_file, &admin)?;
    }
    let api =
        field(&lines, "api listening on").context("the coordinator printed no API address")?;
    let control = field(&lines, "control listening on")
        .context("the coordinator printed no control address")?;
    let ingress = field(&lines, "ingress listening on")
        .context("the coordinator printed no ingress address")?;
    let token = read_secret(&token_file).with_context(|| {
        format!("no admin token in {}: this coordinator state was created outside `gantry dev`; set GANTRY_TOKEN or use a fresh --state-dir", token_file.display())
    })?;
    if cfg.agents == 0 {
        bail!("--agents must be at least 1");
    }
    let mut agents = Vec::new();
    for i in 1..=cfg.agents {
        // The first agent keeps the layout of a one-agent dev cluster.
        let (state, node) = if i == 1 {
            (cfg.state_dir.join("agent"), cfg.node.clone())
        } else {
            (
                cfg.state_dir.join(format!("agent-{i}")),
                format!("{}-{i}", cfg.node),
            )
        };
        agents.push(start_agent(&cfg, &state, &node, &api, &control, &token).await?);
    }
    CliConfig {
        addr: api.clone(),
        token,
        ca_file: None,
    }
    .save()?;
    println!(
        "gantry dev is running: API http://{api}, {} agent(s){}, web endpoints at http://{ingress}/APP/LABEL/, state in {}",
        cfg.agents,
        cfg.simulate_gpus
            .as_deref()
            .map(|s| format!(" with simulated GPUs {s}"))
            .unwrap_or_default(),
        cfg.state_dir.display()
    );
    if let Some(rootfs) = &cfg.demo {
        let code = demo(&CliConfig::load_from_file()?, rootfs).await;
        for agent in &mut agents {
            stop(agent).await;
        }
        stop(&mut coordinator).await;
        return code;
    }
    println!("try: gantry image import DIR --name NAME, then gantry run --image NAME -- CMD");
    println!("Ctrl-C stops it.");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let any_agent = futures_util::future::select_all(agents.iter_mut().map(|a| Box::pin(a.wait())));
    let code = tokio::select! {
        _ = tokio::signal::ctrl_c() => 0,
        _ = term.recv() => 0,
        s = coordinator.wait() => { eprintln!("gantry dev: the coordinator exited ({s:?}); stopping"); 1 }
        (s, i, _) = any_agent => { eprintln!("gantry dev: agent {} exited ({s:?}); stopping", i + 1); 1 }
    };
    for agent in &mut agents {
        stop(agent).await;
    }
    stop(&mut coordinator).await;
    Ok(code)
}

/// Joins (first time only) and starts one agent.
async fn start_agent(
    cfg: &DevConfig,
    state: &Path,
    node: &str,
    api: &str,
    control: &str,
    token: &str,
) -> anyhow::Result<Child> {
    if !state.join("identity").join("identity.json").exists() {
        let join = ApiClient::new(api, token, None)?
            .create_join_token("10m")
            .await?;
        let status = Command::new(sibling_binary("gantry-agent"))
            .env("GANTRY_STATE_DIR", state)
            .env("GANTRY_CONFIG", state.join("agent.toml"))
            .args([
                "join",
                "--coordinator",
                control,
                "--token",
                &join.token,
                "--node",
                node,
            ])
            .status()
            .await
            .context("starting gantry-agent join")?;
        if !status.success() {
            bail!("agent `{node}` could not join the dev cluster");
        }
    }
    let mut cmd = Command::new(sibling_binary("gantry-agent"));
    cmd.env("GANTRY_STATE_DIR", state)
        .env("GANTRY_CONFIG", state.join("agent.toml"))
        .args([
            "serve",
            "--coordinator",
            control,
            "--gossip-listen",
            "127.0.0.1:0",
        ]);
    if let Some(spec) = &cfg.simulate_gpus {
        cmd.args(["--simulate-gpus", spec]);
    }
    if let Some(level) = child_log_level(cfg.verbose) {
        cmd.env("GANTRY_LOG", level);
    }
    let mut agent = cmd
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("starting gantry-agent serve")?;
    read_until(&mut agent, "agent serving", &format!("agent `{node}`")).await?;
    Ok(agent)
}

/// The demo: push `rootfs` as `demo`, run a job on it through the whole path, return its
/// exit code.
async fn demo(cfg: &CliConfig, rootfs: &Path) -> anyhow::Result<i32> {
    let digest = crate::image::import_image(cfg, rootfs, "demo", Vec::new()).await?;
    println!("pushed image demo ({digest}) to the embedded registry");
    let args = crate::run::RunArgs {
        image: "demo".into(),
        name: Some("demo".into()),
        cpu: "0.5".into(),
        memory: "128M".into(),
        gpus: 0,
        gpu_types: Vec::new(),
        gpu_memory: None,
        nodes: 1,
        selector: Vec::new(),
        spot: false,
        priority: 0,
        env: vec![("GREETING".into(), "hello from a Gantry job".into())],
        secrets: Vec::new(),
        volumes: Vec::new(),
        retries: 0,
        retry_delay: None,
        timeout: Some("1m".into()),
        command: vec!["sh".into(), "-c".into(), "echo \"$GREETING on $(hostname)\"; echo CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-none} NVIDIA_VISIBLE_DEVICES=$NVIDIA_VISIBLE_DEVICES".into()],
        detach: false,
    };
    let code = crate::run::run(cfg, args, false).await?;
    println!("demo job exited with {code}");
    Ok(code)
}

/// SIGTERM, then SIGKILL after 10 s.
async fn stop(child: &mut Child) {
    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
        // SAFETY: kill(2) on our own child's pid with a valid signal.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    if tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
}

fn write_secret(path: &Path, secret: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(secret.as_bytes())?;
    Ok(())
}
