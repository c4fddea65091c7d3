//! The flags of `gantry-agent` (clap), and how they become library values: a container
//! request for `run`, the serve flags laid over the configuration file.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use gantry_agent::config::AgentConfig;
use gantry_agent::runtime::{ContainerRequest, NetworkMode};
use gantry_shared::{ContainerId, CpuMillis, NodeId, parse_memory};

#[derive(Parser)]
#[command(
    name = "gantry-agent",
    version,
    about = "Gantry's per-host agent: runs containers on this GPU host"
)]
pub(crate) struct Cli {
    /// The configuration file (TOML; see `systemd/agent.toml`; default
    /// /etc/gantry/agent.toml, which may be absent). Flags win over it.
    #[arg(long, global = true, env = "GANTRY_CONFIG")]
    pub(crate) config: Option<PathBuf>,
    /// Where the agent keeps images, containers and its database (default: the config
    /// file's `state_dir`, else /var/lib/gantry/agent).
    #[arg(long = "state-dir", global = true, env = "GANTRY_STATE_DIR")]
    pub(crate) state_dir_flag: Option<PathBuf>,
    /// Log filter (tracing syntax), e.g. `info` or `gantry_agent=debug` (default: the
    /// config file's `log.level` for `serve`, `warn` for other commands).
    #[arg(long, global = true, env = "GANTRY_LOG")]
    pub(crate) log: Option<String>,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Subcommand)]
pub(crate) enum Command {
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
pub(crate) enum ConfigCommand {
    /// Validate the configuration file without starting anything.
    Check,
}

/// Flags of `serve`; each one absent falls back to the configuration file, then to the
/// default written there.
#[derive(Args)]
pub(crate) struct ServeArgs {
    /// The coordinator's control address, `host:port` (`coordinator` in the config file;
    /// `gantry-agent join` writes it).
    #[arg(long)]
    pub(crate) coordinator: Option<String>,
    /// CPU offered to jobs (default: all cores).
    #[arg(long, visible_alias = "cpu")]
    pub(crate) cpus: Option<CpuMillis>,
    /// Memory offered to jobs (default: all of it).
    #[arg(long, value_parser = parse_memory)]
    pub(crate) memory: Option<u64>,
    /// Declare simulated GPUs instead of reading NVML, e.g. `8xH100-80GB,nvlink=4,numa=2`
    /// (kinds joined with `+`). Reported as simulated everywhere; never injected.
    #[arg(long, env = "GANTRY_SIMULATE_GPUS")]
    pub(crate) simulate_gpus: Option<String>,
    /// A label for placement, `KEY=VALUE` (`spot=true`, `rack=r12`); repeatable.
    #[arg(long = "label", value_parser = gantry_shared::gossip::parse_label)]
    pub(crate) labels: Vec<(String, String)>,
    /// The address other nodes and containers reach this node at (default: the one this
    /// host reaches the coordinator from).
    #[arg(long)]
    pub(crate) address: Option<IpAddr>,
    /// UDP address to gossip on (port 0: any free port; default 0.0.0.0:7946).
    #[arg(long)]
    pub(crate) gossip_listen: Option<SocketAddr>,
    /// Address peers gossip with this node at (default: the node address and the
    /// listening port).
    #[arg(long)]
    pub(crate) gossip_advertise: Option<SocketAddr>,
    /// Further gossip members to contact at start (the coordinator's gossip address is
    /// learned from its welcome); repeatable.
    #[arg(long = "gossip-seed")]
    pub(crate) gossip_seeds: Vec<String>,
    /// How often to gossip (default 200ms).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub(crate) gossip_interval: Option<Duration>,
    /// Suspicion (silence over the mean heartbeat interval) at which a peer is dead
    /// (default 6).
    #[arg(long)]
    pub(crate) phi_threshold: Option<f64>,
    /// How long a dead peer's state is kept before it is forgotten (default 10m).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub(crate) dead_node_grace: Option<Duration>,
    /// Poll this URL for the cloud's spot-interruption notice (AWS:
    /// `http://169.254.169.254/latest/meta-data/spot/instance-action`); off when absent.
    #[arg(long)]
    pub(crate) spot_notice_url: Option<String>,
    /// How often to poll it (default 2s).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub(crate) spot_notice_interval: Option<Duration>,
    /// On SIGTERM, how long the coordinator keeps this node's work in place waiting for the
    /// agent to return (default 15s; 0s: off).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub(crate) restart_hold: Option<Duration>,
}

#[derive(Subcommand)]
pub(crate) enum GpuCommand {
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
pub(crate) enum ImageCommand {
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
pub(crate) struct RunArgs {
    #[arg(long)]
    pub(crate) image: String,
    /// Container id (default: generated).
    #[arg(long)]
    pub(crate) name: Option<ContainerId>,
    /// Memory limit, e.g. `256M`, `2G`.
    #[arg(long, default_value = "512M", value_parser = parse_memory)]
    pub(crate) memory: u64,
    /// CPU limit in cores (`0.5`) or millicores (`500m`).
    #[arg(long, visible_alias = "cpu", default_value = "1")]
    pub(crate) cpus: CpuMillis,
    /// Maximum number of processes and threads.
    #[arg(long, default_value_t = gantry_shared::Resources::DEFAULT_PIDS)]
    pub(crate) pids: u64,
    /// `KEY=VALUE`, repeatable.
    #[arg(long, short, value_parser = parse_env)]
    pub(crate) env: Vec<(String, String)>,
    #[arg(long, short)]
    pub(crate) workdir: Option<String>,
    /// `user`, `uid`, `user:group` or `uid:gid` inside the image.
    #[arg(long, short)]
    pub(crate) user: Option<String>,
    /// Replace the image's entrypoint.
    #[arg(long)]
    pub(crate) entrypoint: Option<String>,
    /// Host GPU indices to give the container, e.g. `0,1`.
    #[arg(long, value_delimiter = ',')]
    pub(crate) gpus: Vec<u32>,
    /// `host` (default) or `isolated` (own network namespace, loopback only).
    #[arg(long, default_value = "host", value_parser = parse_network)]
    pub(crate) network: NetworkMode,
    /// Size of /dev/shm.
    #[arg(long, default_value = "64M", value_parser = parse_memory)]
    pub(crate) shm_size: u64,
    /// Stop the container after this long, e.g. `30s`, `2h`.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub(crate) timeout: Option<Duration>,
    /// Grace between SIGTERM and SIGKILL on timeout or Ctrl-C.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub(crate) stop_grace: Duration,
    /// Start it and print its id instead of waiting (it is kept until `rm`).
    #[arg(long, short)]
    pub(crate) detach: bool,
    /// Command and arguments (replace the image's cmd).
    #[arg(last = true)]
    pub(crate) command: Vec<String>,
}

pub(crate) fn parse_env(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("`{s}` is not KEY=VALUE"))
}

pub(crate) fn parse_network(s: &str) -> Result<NetworkMode, String> {
    match s {
        "host" => Ok(NetworkMode::Host),
        "isolated" | "none" => Ok(NetworkMode::Isolated),
        _ => Err(format!(
            "`{s}` is not a network mode; use `host` or `isolated`"
        )),
    }
}

impl RunArgs {
    /// The container these flags ask for.
    pub(crate) fn request(self) -> ContainerRequest {
        let mut req = ContainerRequest::new(self.image);
        req.id = self.name;
        req.resources = gantry_shared::Resources {
            cpu: self.cpus,
            memory_bytes: self.memory,
            pids: self.pids,
        };
        req.env = self.env;
        req.workdir = self.workdir;
        req.user = self.user;
        req.entrypoint = self.entrypoint.map(|e| vec![e]);
        req.command = (!self.command.is_empty()).then_some(self.command);
        req.gpus = self.gpus;
        req.network = self.network;
        req.shm_bytes = self.shm_size;
        req.timeout = self.timeout;
        req.stop_grace = self.stop_grace;
        req
    }
}

impl ServeArgs {
    /// The flags over the configuration file, the one place they meet: a flag given wins;
    /// labels and gossip seeds add to the file's (a label flag wins on the same key).
    pub(crate) fn overlay(self, config: &mut AgentConfig) {
        if let Some(c) = self.coordinator {
            config.coordinator = Some(c);
        }
        config.cpus = self.cpus.or(config.cpus);
        config.memory = self.memory.or(config.memory);
        if let Some(spec) = self.simulate_gpus {
            config.simulate_gpus = Some(spec);
        }
        config.labels.extend(self.labels);
        config.address = self.address.or(config.address);
        let gossip = &mut config.gossip;
        gossip.listen = self.gossip_listen.unwrap_or(gossip.listen);
        gossip.advertise = self.gossip_advertise.or(gossip.advertise);
        gossip.seeds.extend(self.gossip_seeds);
        gossip.gossip_interval = self.gossip_interval.unwrap_or(gossip.gossip_interval);
        gossip.phi_threshold = self.phi_threshold.unwrap_or(gossip.phi_threshold);
        gossip.dead_node_grace = self.dead_node_grace.unwrap_or(gossip.dead_node_grace);
        if let Some(url) = self.spot_notice_url {
            config.spot_notice.url = Some(url);
        }
        config.spot_notice.interval = self
            .spot_notice_interval
            .unwrap_or(config.spot_notice.interval);
        config.restart_hold = self.restart_hold.unwrap_or(config.restart_hold);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serve_flags_win_over_the_file_and_add_labels_and_seeds() {
        let cli = Cli::try_parse_from([
            "gantry-agent",
            "serve",
            "--cpus",
            "2",
            "--label",
            "rack=r2",
            "--gossip-seed",
            "10.0.0.3:7946",
            "--gossip-interval",
            "1s",
            "--restart-hold",
            "0s",
        ])
        .expect("flags");
        let Command::Serve(args) = cli.command else {
            panic!("not serve");
        };
        let mut config = AgentConfig {
            coordinator: Some("10.0.0.1:7443".into()),
            memory: Some(1 << 30),
            labels: [("rack", "r1"), ("spot", "true")]
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .into(),
            ..AgentConfig::default()
        };
        config.gossip.seeds = vec!["10.0.0.2:7946".into()];
        args.overlay(&mut config);
        assert_eq!(config.coordinator.as_deref(), Some("10.0.0.1:7443"));
        assert_eq!(config.cpus, Some(CpuMillis(2000)));
        assert_eq!(config.memory, Some(1 << 30));
        assert_eq!(config.labels["rack"], "r2");
        assert_eq!(config.labels["spot"], "true");
        assert_eq!(config.gossip.seeds, ["10.0.0.2:7946", "10.0.0.3:7946"]);
        assert_eq!(config.gossip.gossip_interval, Duration::from_secs(1));
        assert_eq!(config.gossip.phi_threshold, 6.0);
        assert_eq!(config.restart_hold, Duration::ZERO);
        assert_eq!(config.spot_notice.interval, Duration::from_secs(2));
    }
}
