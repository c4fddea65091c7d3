//! `gantry dev`: a whole Gantry on this machine. Starts `gantry-coordinator serve` and
//! `gantry-agent serve` as child processes with a local state directory, joins the agent
//! on first use, writes the CLI's address and token, and stays in the foreground until
//! Ctrl-C or SIGTERM, then stops both (the agent's containers stop with their jobs'
//! cancellation or keep running under their shims, as on a real host).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::cli::{CliConfig, read_secret, sibling_binary};
use crate::client::ApiClient;

pub struct DevConfig {
    pub state_dir: PathBuf,
    pub api_listen: String,
    pub control_listen: String,
    pub node: String,
    /// Instead of waiting for Ctrl-C: push this root filesystem as image `demo`, run a
    /// demo job on it, print its output and exit with its exit code.
    pub demo: Option<PathBuf>,
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
    let mut coordinator = Command::new(sibling_binary("gantry-coordinator"))
        .args([
            "serve",
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
    let token = read_secret(&token_file).with_context(|| {
        format!("no admin token in {}: this coordinator state was created outside `gantry dev`; set GANTRY_TOKEN or use a fresh --state-dir", token_file.display())
    })?;
    let agent_state = cfg.state_dir.join("agent");
    if !agent_state.join("identity").join("identity.json").exists() {
        let join = ApiClient::new(&api, &token)
            .create_join_token("10m")
            .await?;
        let status = Command::new(sibling_binary("gantry-agent"))
            .env("GANTRY_STATE_DIR", &agent_state)
            .args([
                "join",
                "--coordinator",
                &control,
                "--token",
                &join.token,
                "--node",
                &cfg.node,
            ])
            .status()
            .await
            .context("starting gantry-agent join")?;
        if !status.success() {
            bail!("the agent could not join the dev cluster");
        }
    }
    let mut agent = Command::new(sibling_binary("gantry-agent"))
        .env("GANTRY_STATE_DIR", &agent_state)
        .args(["serve", "--coordinator", &control])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("starting gantry-agent serve")?;
    read_until(&mut agent, "agent serving", "the agent").await?;
    CliConfig {
        addr: api.clone(),
        token,
    }
    .save()?;
    println!(
        "gantry dev is running: API http://{api}, node `{}`, state in {}",
        cfg.node,
        cfg.state_dir.display()
    );
    if let Some(rootfs) = &cfg.demo {
        let code = demo(&CliConfig::load_from_file()?, rootfs).await;
        stop(&mut agent).await;
        stop(&mut coordinator).await;
        return code;
    }
    println!("try: gantry image import DIR --name NAME, then gantry run --image NAME -- CMD");
    println!("Ctrl-C stops it.");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let code = tokio::select! {
        _ = tokio::signal::ctrl_c() => 0,
        _ = term.recv() => 0,
        s = coordinator.wait() => { eprintln!("gantry dev: the coordinator exited ({s:?}); stopping"); 1 }
        s = agent.wait() => { eprintln!("gantry dev: the agent exited ({s:?}); stopping"); 1 }
    };
    stop(&mut agent).await;
    stop(&mut coordinator).await;
    Ok(code)
}

/// The demo: push `rootfs` as `demo`, run a job on it through the whole path, return its
/// exit code.
async fn demo(cfg: &CliConfig, rootfs: &Path) -> anyhow::Result<i32> {
    let digest = crate::cli::import_image(cfg, rootfs, "demo", Vec::new()).await?;
    println!("pushed image demo ({digest}) to the embedded registry");
    let args = crate::cli::RunArgs {
        image: "demo".into(),
        name: Some("demo".into()),
        cpu: "0.5".into(),
        memory: "128M".into(),
        gpus: 0,
        env: vec![("GREETING".into(), "hello from a Gantry job".into())],
        retries: 0,
        timeout: Some("1m".into()),
        command: vec!["sh".into(), "-c".into(), "echo \"$GREETING on $(hostname)\"; echo CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-none} NVIDIA_VISIBLE_DEVICES=$NVIDIA_VISIBLE_DEVICES".into()],
        detach: false,
    };
    let code = crate::cli::run(cfg, args, false).await?;
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
