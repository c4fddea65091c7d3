//! `gantry-agent`: parses flags, sets up logging and calls into the library. Shim mode is
//! dispatched before any async runtime exists, because the shim forks (via libcontainer)
//! and must stay single-threaded.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use gantry_agent::gpu::inventory::{HealthEvent, Inventory, InventoryError};
use gantry_agent::gpu::nvml::NvmlSource;
use gantry_agent::gpu::simulated::SimulatedSource;
use gantry_agent::image::{ImageConfig, ImageStore, PullConfig, RegistryAuth};
use gantry_agent::runtime::{
    self, ContainerRequest, ContainerState, NetworkMode, Runtime, RuntimeConfig, RuntimeError,
    Stream,
};
use gantry_agent::store::LocalStore;
use gantry_shared::{ContainerId, CpuMillis, NodeId, parse_memory};

mod cli;

use cli::gpu::gpu_command;
use cli::run::{follow_both, run_container};
use cli::serve::{gpu_inventory, join, reload_on_hangup, serve};

#[derive(Parser)]
#[command(
    name = "gantry-agent",
    version,
    about = "Gantry's per-host agent: runs containers on this GPU host"
)]
struct Cli {
    /// The configuration file (TOML; see `systemd/agent.toml`; default
    /// /etc/gantry/agent.toml, which may be absent). Flags win over it.
    #[arg(long, global = true, env = "GANTRY_CONFIG")]
    config: Option<PathBuf>,
    /// Where the agent keeps images, containers and its database (default: the config
    /// file's `state_dir`, else /var/lib/gantry/agent).
    #[arg(long = "state-dir", global = true, env = "GANTRY_STATE_DIR")]
    state_dir_flag: Option<PathBuf>,
    /// Resolved from the flag, the config file and the default.
    #[arg(skip)]
    state_dir: PathBuf,
    /// Log filter (tracing syntax), e.g. `info` or `gantry_agent=debug` (default: the
    /// config file's `log.level` for `serve`, `warn` for other commands).
    #[arg(long, global = true, env = "GANTRY_LOG")]
    log: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one container in the foreground, like `podman run`, and exit with its code.
    Run(RunArgs),
    /// Manage images on this host.
    #[command(subcommand)]
    Image(ImageCommand),
    /// List containers on this host.
    Ps,
    /// Print a container's output.
    Logs {
        id: ContainerId,
        /// Keep printing until the container exits.
        #[arg(long, short)]
        follow: bool,
    },
    /// Stop a container: SIGTERM, then SIGKILL after the grace period.
    Stop {
        id: ContainerId,
        #[arg(long, short = 't', default_value = "10s", value_parser = humantime::parse_duration)]
        time: Duration,
    },
    /// Run as a cluster member: take attempts from the coordinator and report on them.
    /// Containers keep running when the agent stops.
    Serve(ServeArgs),
    /// This host's GPUs (NVML or simulated), and fault injection into simulated ones.
    #[command(subcommand)]
    Gpu(GpuCommand),
    /// Check the configuration file and exit (0: valid; 1: the file, key and reason).
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Join a cluster: trade a one-time token for this node's certificate, and record the
    /// coordinator's address in the configuration file (so `serve` needs no flags).
    Join {
        /// The coordinator's control address, `host:port`.
        #[arg(long)]
        coordinator: String,
        /// The token from `gantry-coordinator token create`.
        #[arg(long, env = "GANTRY_JOIN_TOKEN", hide_env_values = true)]
        token: String,
        /// This node's name in the cluster (default: the host name).
        #[arg(long)]
        node: Option<NodeId>,
    },
    /// Wait for a container to exit and exit with its code.
    Wait { id: ContainerId },
    /// Remove an exited container and its logs.
    Rm { id: ContainerId },
    /// (internal) Supervise one container; started by the agent.
    #[command(hide = true)]
    Shim {
        /// Tear down after a lost shim instead of starting a container.
        #[arg(long, conflicts_with = "pooled")]
        cleanup: bool,
        /// Start now and wait for a container directory on stdin (the agent's shim pool).
        #[arg(long)]
        pooled: bool,
        #[arg(required_unless_present = "pooled")]
        dir: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate the configuration file without starting anything.
    Check,
}

/// Flags of `serve`; each one absent falls back to the configuration file, then to the
/// default written there.
#[derive(Args)]
struct ServeArgs {
    /// The coordinator's control address, `host:port` (`coordinator` in the config file;
    /// `gantry-agent join` writes it).
    #[arg(long)]
    coordinator: Option<String>,
    /// CPU offered to jobs (default: all cores).
    #[arg(long, visible_alias = "cpu")]
    cpus: Option<CpuMillis>,
    /// Memory offered to jobs (default: all of it).
    #[arg(long, value_parser = parse_memory)]
    memory: Option<u64>,
    /// Declare simulated GPUs instead of reading NVML, e.g. `8xH100-80GB,nvlink=4,numa=2`
    /// (kinds joined with `+`). Reported as simulated everywhere; never injected.
    #[arg(long, env = "GANTRY_SIMULATE_GPUS")]
    simulate_gpus: Option<String>,
    /// A label for placement, `KEY=VALUE` (`spot=true`, `rack=r12`); repeatable.
    #[arg(long = "label", value_parser = gantry_shared::gossip::parse_label)]
    labels: Vec<(String, String)>,
    /// The address other nodes and containers reach this node at (default: the one this
    /// host reaches the coordinator from).
    #[arg(long)]
    address: Option<std::net::IpAddr>,
    /// UDP address to gossip on (port 0: any free port; default 0.0.0.0:7946).
    #[arg(long)]
    gossip_listen: Option<std::net::SocketAddr>,
    /// Address peers gossip with this node at (default: the node address and the
    /// listening port).
    #[arg(long)]
    gossip_advertise: Option<std::net::SocketAddr>,
    /// Further gossip members to contact at start (the coordinator's gossip address is
    /// learned from its welcome); repeatable.
    #[arg(long = "gossip-seed")]
    gossip_seeds: Vec<String>,
    /// How often to gossip (default 200ms).
    #[arg(long, value_parser = humantime::parse_duration)]
    gossip_interval: Option<Duration>,
    /// Suspicion (silence over the mean heartbeat interval) at which a peer is dead
    /// (default 6).
    #[arg(long)]
    phi_threshold: Option<f64>,
    /// How long a dead peer's state is kept before it is forgotten (default 10m).
    #[arg(long, value_parser = humantime::parse_duration)]
    dead_node_grace: Option<Duration>,
    /// Poll this URL for the cloud's spot-interruption notice (AWS:
    /// `http://169.254.169.254/latest/meta-data/spot/instance-action`); off when absent.
    #[arg(long)]
    spot_notice_url: Option<String>,
    /// How often to poll it (default 2s).
    #[arg(long, value_parser = humantime::parse_duration)]
    spot_notice_interval: Option<Duration>,
    /// On SIGTERM, how long the coordinator keeps this node's work in place waiting for the
    /// agent to return (default 15s; 0s: off).
    #[arg(long, value_parser = humantime::parse_duration)]
    restart_hold: Option<Duration>,
}

#[derive(Subcommand)]
enum GpuCommand {
    /// List the GPUs this agent would offer (NVML, or the simulated spec).
    List {
        /// Show a simulated inventory instead of NVML's.
        #[arg(long)]
        simulate: Option<String>,
    },
    /// Inject a fault into a simulated GPU of the agent running on this state directory,
    /// as NVML would report it.
    Inject {
        /// Host index of the GPU.
        #[arg(long)]
        index: u32,
        /// An Xid error code (application Xids 13, 31, 43, 45, 68, 109 leave it healthy).
        #[arg(long, conflicts_with = "ecc", required_unless_present = "ecc")]
        xid: Option<u64>,
        /// A double-bit ECC error.
        #[arg(long)]
        ecc: bool,
    },
}

#[derive(Subcommand)]
enum ImageCommand {
    /// Import a root filesystem (directory or tarball, optionally gzip/zstd) as an image.
    Import {
        source: PathBuf,
        #[arg(long)]
        name: String,
        /// Default command of the image (`--cmd sh --cmd -c …`), like Dockerfile CMD.
        #[arg(long, allow_hyphen_values = true)]
        cmd: Vec<String>,
        /// Default environment, `KEY=VALUE`, repeatable.
        #[arg(long, short, value_parser = parse_env)]
        env: Vec<(String, String)>,
        /// Default working directory.
        #[arg(long)]
        workdir: Option<String>,
        /// Default user.
        #[arg(long)]
        user: Option<String>,
    },
    /// Pull an image from an OCI/Docker registry.
    Pull {
        reference: String,
        /// Registry user (basic auth, or exchanged for a bearer token when the registry asks).
        #[arg(long, env = "GANTRY_REGISTRY_USER")]
        username: Option<String>,
        /// Registry password.
        #[arg(long, env = "GANTRY_REGISTRY_PASSWORD", hide_env_values = true)]
        password: Option<String>,
        /// A bearer token obtained elsewhere (instead of a user and password).
        #[arg(long, env = "GANTRY_REGISTRY_TOKEN", hide_env_values = true, conflicts_with_all = ["username", "password"])]
        token: Option<String>,
        /// A registry (`host:port`) to reach over plain HTTP; loopback registries always are.
        #[arg(long = "insecure-registry")]
        insecure_registries: Vec<String>,
    },
    /// List images on this host.
    List,
}

#[derive(Args)]
struct RunArgs {
    #[arg(long)]
    image: String,
    /// Container id (default: generated).
    #[arg(long)]
    name: Option<ContainerId>,
    /// Memory limit, e.g. `256M`, `2G`.
    #[arg(long, default_value = "512M", value_parser = parse_memory)]
    memory: u64,
    /// CPU limit in cores (`0.5`) or millicores (`500m`).
    #[arg(long, visible_alias = "cpu", default_value = "1")]
    cpus: CpuMillis,
    /// Maximum number of processes and threads.
    #[arg(long, default_value_t = gantry_shared::Resources::DEFAULT_PIDS)]
    pids: u64,
    /// `KEY=VALUE`, repeatable.
    #[arg(long, short, value_parser = parse_env)]
    env: Vec<(String, String)>,
    #[arg(long, short)]
    workdir: Option<String>,
    /// `user`, `uid`, `user:group` or `uid:gid` inside the image.
    #[arg(long, short)]
    user: Option<String>,
    /// Replace the image's entrypoint.
    #[arg(long)]
    entrypoint: Option<String>,
    /// Host GPU indices to give the container, e.g. `0,1`.
    #[arg(long, value_delimiter = ',')]
    gpus: Vec<u32>,
    /// `host` (default) or `isolated` (own network namespace, loopback only).
    #[arg(long, default_value = "host", value_parser = parse_network)]
    network: NetworkMode,
    /// Size of /dev/shm.
    #[arg(long, default_value = "64M", value_parser = parse_memory)]
    shm_size: u64,
    /// Stop the container after this long, e.g. `30s`, `2h`.
    #[arg(long, value_parser = humantime::parse_duration)]
    timeout: Option<Duration>,
    /// Grace between SIGTERM and SIGKILL on timeout or Ctrl-C.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    stop_grace: Duration,
    /// Start it and print its id instead of waiting (it is kept until `rm`).
    #[arg(long, short)]
    detach: bool,
    /// Command and arguments (replace the image's cmd).
    #[arg(last = true)]
    command: Vec<String>,
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("`{s}` is not KEY=VALUE"))
}

fn parse_network(s: &str) -> Result<NetworkMode, String> {
    match s {
        "host" => Ok(NetworkMode::Host),
        "isolated" | "none" => Ok(NetworkMode::Isolated),
        _ => Err(format!(
            "`{s}` is not a network mode; use `host` or `isolated`"
        )),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Shim {
        cleanup,
        pooled,
        dir,
    } = &cli.command
    {
        use runtime::shim::{self, Assignment};
        let code = match (dir, *cleanup, *pooled) {
            (Some(dir), true, _) => shim::cleanup_lost(dir),
            (Some(dir), false, false) => shim::main(Assignment::Now(dir)),
            _ => shim::main(Assignment::Later),
        };
        return ExitCode::from(code.clamp(0, 255) as u8);
    }
    let mut cli = cli;
    // A missing file is the defaults (flags only; `join` creates it).
    let explicit = cli.config.is_some();
    let config = cli
        .config
        .clone()
        .unwrap_or_else(|| gantry_agent::config::DEFAULT_PATH.into());
    if explicit && !config.exists() && matches!(cli.command, Command::Serve(_)) {
        eprintln!(
            "gantry-agent: no configuration file at {}; using flags and defaults",
            config.display()
        );
    }
    let file = match gantry_agent::config::AgentConfig::load(&config, false) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("gantry-agent: {e}");
            return ExitCode::from(if matches!(cli.command, Command::Config(_)) {
                1
            } else {
                125
            });
        }
    };
    cli.state_dir = cli
        .state_dir_flag
        .clone()
        .unwrap_or_else(|| file.state_dir.clone());
    if let Command::Config(ConfigCommand::Check) = &cli.command {
        if !config.exists() {
            eprintln!("gantry-agent: {}: no such file", config.display());
            return ExitCode::from(1);
        }
        println!("{}: valid", config.display());
        return ExitCode::SUCCESS;
    }
    let serving = matches!(cli.command, Command::Serve(_));
    let level = cli.log.clone().unwrap_or_else(|| {
        if serving {
            file.log.level.clone()
        } else {
            "warn".into()
        }
    });
    let reload = gantry_shared::config::init_logging(&level, file.log.format);
    if let Command::Join {
        coordinator,
        token,
        node,
    } = cli.command
    {
        return block_on(join(cli.state_dir, &config, coordinator, token, node));
    }
    if let Command::Gpu(cmd) = &cli.command {
        return match gpu_command(&cli.state_dir, cmd) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("gantry-agent: {e:#}");
                ExitCode::from(125)
            }
        };
    }
    // SIGHUP reloads the file's log level, unless a flag fixed it.
    let reload = (serving && cli.log.is_none()).then_some((config, reload));
    block_on(run(cli, file, reload))
}

fn block_on(f: impl std::future::Future<Output = anyhow::Result<i32>>) -> ExitCode {
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("gantry-agent: cannot start the async runtime: {e}");
            return ExitCode::from(125);
        }
    };
    match rt.block_on(f) {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("gantry-agent: {e:#}");
            ExitCode::from(125)
        }
    }
}

struct Host {
    images: ImageStore,
    runtime: Runtime,
    store: LocalStore,
}

async fn open_host(
    state_dir: &std::path::Path,
    pull: PullConfig,
    shim_pool: usize,
    simulated_gpus: bool,
) -> anyhow::Result<Host> {
    std::fs::create_dir_all(state_dir)
        .with_context(|| format!("creating state directory {}", state_dir.display()))?;
    let store = LocalStore::open(&state_dir.join("db"))?;
    let images = ImageStore::open(&state_dir.join("images"), &store, pull)?;
    let exe = std::env::current_exe().context("locating the gantry-agent binary for shims")?;
    let config = RuntimeConfig {
        shim_pool,
        simulated_gpus,
        ..RuntimeConfig::new(state_dir, exe)
    };
    let runtime = Runtime::open(config, images.clone(), &store).await?;
    Ok(Host {
        images,
        runtime,
        store,
    })
}

async fn run(
    cli: Cli,
    file: gantry_agent::config::Checked,
    reload: Option<(PathBuf, gantry_shared::config::LogReload)>,
) -> anyhow::Result<i32> {
    if let Some((config, reload)) = reload {
        tokio::spawn(reload_on_hangup(config, reload));
    }
    let pull = match &cli.command {
        Command::Image(ImageCommand::Pull {
            insecure_registries,
            ..
        }) => PullConfig {
            insecure_registries: insecure_registries.clone(),
            ..PullConfig::default()
        },
        _ => PullConfig::default(),
    };
    // The daemon keeps pre-started shims; one-shot commands would only start them to exit.
    let pool = if matches!(cli.command, Command::Serve { .. }) {
        2
    } else {
        0
    };
    // The daemon's GPUs: discovered before the runtime, which must know if they are real.
    let inventory = match &cli.command {
        Command::Serve(args) => {
            let node = gantry_agent::control::NodeIdentity::load(&cli.state_dir.join("identity"))
                .map(|i| i.node.to_string())
                .unwrap_or_else(|_| "local".into());
            let simulate = args
                .simulate_gpus
                .as_deref()
                .or(file.simulate_gpus.as_deref());
            gpu_inventory(&cli.state_dir, simulate, &node)?
        }
        _ => None,
    };
    let simulated = matches!(&cli.command, Command::Serve(a) if a.simulate_gpus.is_some() || file.simulate_gpus.is_some());
    let host = open_host(&cli.state_dir, pull, pool, simulated).await?;
    match cli.command {
        Command::Run(args) => run_container(&host, args).await,
        Command::Image(ImageCommand::Import {
            source,
            name,
            cmd,
            env,
            workdir,
            user,
        }) => {
            let mut config = ImageConfig {
                cmd,
                workdir,
                user,
                ..ImageConfig::default()
            };
            config.env = env.into_iter().map(|(k, v)| format!("{k}={v}")).collect();
            let rec = host.images.import(&source, &name, config).await?;
            println!("{} {}", rec.name, rec.digest);
            Ok(0)
        }
        Command::Image(ImageCommand::Pull {
            reference,
            username,
            password,
            token,
            ..
        }) => {
            let auth = match (username, password, token) {
                (_, _, Some(t)) => RegistryAuth::Bearer(t),
                (Some(u), Some(p), None) => RegistryAuth::Basic(u, p),
                (None, None, None) => RegistryAuth::Anonymous,
                _ => anyhow::bail!(
                    "give both --username and --password (or neither, for anonymous access)"
                ),
            };
            let rec = host.images.pull(&reference, &auth).await?;
            println!("{} {}", rec.name, rec.digest);
            Ok(0)
        }
        Command::Image(ImageCommand::List) => {
            println!("{:<50} {:<20} LAYERS", "NAME", "DIGEST");
            for i in host.images.list()? {
                println!(
                    "{:<50} {:<20} {}",
                    i.name,
                    &i.digest[..i.digest.len().min(19)],
                    i.layers.len()
                );
            }
            Ok(0)
        }
        Command::Ps => {
            println!("{:<24} {:<30} {:<10} EXIT", "ID", "IMAGE", "STATE");
            for c in host.runtime.list() {
                let (state, exit) = match &c.state {
                    ContainerState::Running { .. } => ("running".to_owned(), String::new()),
                    ContainerState::Exited(e) => (
                        format!("{:?}", e.reason).to_lowercase(),
                        e.code().to_string(),
                    ),
                };
                println!("{:<24} {:<30} {:<10} {}", c.id, c.image, state, exit);
            }
            Ok(0)
        }
        Command::Logs { id, follow } => {
            if follow {
                follow_both(&host.runtime, &id).await?;
            } else {
                use std::io::Write;
                std::io::stdout().write_all(&host.runtime.logs(&id, Stream::Stdout)?)?;
                std::io::stderr().write_all(&host.runtime.logs(&id, Stream::Stderr)?)?;
            }
            Ok(0)
        }
        Command::Stop { id, time } => {
            let exit = host.runtime.stop(&id, time).await?;
            println!("{id} {:?} {}", exit.reason, exit.code());
            Ok(0)
        }
        Command::Wait { id } => {
            let exit = host.runtime.wait(&id).await?;
            println!("{}", serde_json::to_string(&exit)?);
            Ok(exit.code())
        }
        Command::Rm { id } => {
            host.runtime.remove(&id)?;
            Ok(0)
        }
        Command::Serve(args) => serve(&cli.state_dir, &host, args, &file, inventory).await,
        Command::Shim { .. } | Command::Join { .. } | Command::Gpu(_) | Command::Config(_) => {
            unreachable!("dispatched before the store is opened")
        }
    }
}
