//! `gantry-coordinator`: parses flags, sets up logging and calls into the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use gantry_coordinator::api::ApiConfig;
use gantry_coordinator::client::ApiClient;
use gantry_coordinator::cluster::ClusterConfig;
use gantry_coordinator::control::ControlConfig;
use gantry_coordinator::server::{self, CoordinatorConfig};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "gantry-coordinator",
    version,
    about = "Gantry's coordinator: HTTP API, cluster CA and control plane"
)]
struct Cli {
    /// Log filter, e.g. `info` or `gantry_coordinator=debug`.
    #[arg(long, global = true, env = "GANTRY_LOG", default_value = "info")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the coordinator in the foreground.
    Serve {
        #[arg(
            long,
            env = "GANTRY_STATE_DIR",
            default_value = "/var/lib/gantry/coordinator"
        )]
        state_dir: PathBuf,
        /// HTTP API address.
        #[arg(long, default_value = "127.0.0.1:7080")]
        api_listen: SocketAddr,
        /// QUIC control-plane address (agents connect here).
        #[arg(long, default_value = "0.0.0.0:7443")]
        control_listen: SocketAddr,
        /// The embedded registry's address as nodes reach it, `host:port` (default: the
        /// API address, unless it listens on all interfaces).
        #[arg(long)]
        registry_address: Option<String>,
        #[command(flatten)]
        gossip: GossipArgs,
    },
    /// Manage join tokens (through the running coordinator's API, as an admin).
    #[command(subcommand)]
    Token(TokenCommand),
}

/// Gossip and node liveness.
#[derive(clap::Args)]
struct GossipArgs {
    /// UDP address to gossip on (port 0: any free port).
    #[arg(long, default_value = "0.0.0.0:7946")]
    gossip_listen: SocketAddr,
    /// Address agents gossip with the coordinator at (default: the control address's IP,
    /// or the host's first non-loopback IPv4 address).
    #[arg(long)]
    gossip_advertise: Option<SocketAddr>,
    /// How often to gossip.
    #[arg(long, default_value = "200ms", value_parser = humantime::parse_duration)]
    gossip_interval: std::time::Duration,
    /// Suspicion (silence over the mean heartbeat interval) at which a member is dead.
    #[arg(long, default_value_t = 6.0)]
    phi_threshold: f64,
    /// How long a dead member's state is kept before it is forgotten.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    dead_node_grace: std::time::Duration,
    /// A control session with nothing received for this long counts as silent.
    #[arg(long, default_value = "1500ms", value_parser = humantime::parse_duration)]
    session_silence: std::time::Duration,
    /// After a start, how long nodes not heard from yet stay suspect (not down, their
    /// work not lost) while they reconnect.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    startup_grace: std::time::Duration,
}

impl GossipArgs {
    fn config(self) -> ClusterConfig {
        ClusterConfig {
            membership: gantry_membership::MembershipConfig {
                listen: self.gossip_listen,
                advertise: self.gossip_advertise,
                seeds: Vec::new(),
                gossip_interval: self.gossip_interval,
                phi_threshold: self.phi_threshold,
                dead_node_grace: self.dead_node_grace,
            },
            session_silence: self.session_silence,
            startup_grace: self.startup_grace,
            ..ClusterConfig::default()
        }
    }
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Create a one-time join token for a new node.
    Create {
        /// How long it stays valid.
        #[arg(long, default_value = "1h")]
        ttl: String,
        #[arg(long, env = "GANTRY_ADDR", default_value = "127.0.0.1:7080")]
        api: String,
        /// An admin token.
        #[arg(long, env = "GANTRY_TOKEN", hide_env_values = true)]
        token: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("gantry-coordinator: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gantry-coordinator: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve {
            state_dir,
            api_listen,
            control_listen,
            registry_address,
            gossip,
        } => {
            let cfg = CoordinatorConfig {
                state_dir,
                api: ApiConfig {
                    listen: api_listen,
                    ..ApiConfig::default()
                },
                control: ControlConfig {
                    listen: control_listen,
                    ..ControlConfig::default()
                },
                registry_address,
                cluster: gossip.config(),
            };
            let cancel = CancellationToken::new();
            let signals = cancel.clone();
            tokio::spawn(async move {
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
                }
                tracing::info!("shutting down");
                signals.cancel();
            });
            server::run(cfg, cancel, |bound, admin| {
                // Machine-readable lines on stdout: tools and tests read them. The admin
                // token (first start only) comes first, so readers can stop at `control`.
                if let Some(token) = admin {
                    println!("admin token (shown once, store it safely): {token}");
                }
                println!("api listening on {}", bound.api);
                println!("gossip listening on {}", bound.gossip);
                println!("control listening on {}", bound.control);
            })
            .await
        }
        Command::Token(TokenCommand::Create { ttl, api, token }) => {
            let created = ApiClient::new(&api, &token).create_join_token(&ttl).await?;
            println!("{}", created.token);
            eprintln!(
                "valid for {}s; join a node with: gantry-agent join --coordinator CONTROL_ADDR --token <token>",
                created.expires_in_seconds
            );
            Ok(())
        }
    }
}
