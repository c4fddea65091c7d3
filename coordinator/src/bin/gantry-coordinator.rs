//! `gantry-coordinator`: parses flags, sets up logging and calls into the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use gantry_client::api::ApiClient;
use gantry_coordinator::config::{CoordinatorSettings, RegistryAddress};
use gantry_coordinator::server;
use gantry_shared::config::Phi;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "gantry-coordinator",
    version,
    about = "Gantry's coordinator: HTTP API, cluster CA and control plane"
)]
struct Cli {
    /// Log filter, e.g. `info` or `gantry_coordinator=debug` (default: the config file's
    /// `log.level`, else `info`).
    #[arg(long, global = true, env = "GANTRY_LOG")]
    log: Option<String>,
    /// The configuration file (TOML; see `systemd/coordinator.toml`; default
    /// /etc/gantry/coordinator.toml, which may be absent). Flags win over it.
    #[arg(long, global = true, env = "GANTRY_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the coordinator in the foreground. Each flag absent falls back to the
    /// configuration file, then to the default written there.
    Serve(ServeFlags),
    /// Manage join tokens (through the running coordinator's API, as an admin).
    #[command(subcommand)]
    Token(TokenCommand),
    /// Check the configuration file and exit (0: valid; 1: the file, key and reason).
    #[command(subcommand)]
    Config(ConfigCommand),
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate the configuration file without starting anything.
    Check,
}

/// `serve`'s flags: each one given replaces its setting from the file.
#[derive(clap::Args)]
struct ServeFlags {
    /// Database, cluster CA, tokens (default /var/lib/gantry/coordinator).
    #[arg(long, env = "GANTRY_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// HTTP API address (default 127.0.0.1:7080).
    #[arg(long)]
    api_listen: Option<SocketAddr>,
    /// QUIC control-plane address, where agents connect (default 0.0.0.0:7443).
    #[arg(long)]
    control_listen: Option<SocketAddr>,
    /// Web endpoints' HTTP ingress (default: the API's address with the next port,
    /// 127.0.0.1:7081; port 0 when the API's is 0).
    #[arg(long)]
    ingress_listen: Option<SocketAddr>,
    /// The embedded registry's address as nodes reach it, `host:port`, or
    /// `https://host:port` behind a TLS proxy (default: the API address, unless it listens
    /// on all interfaces; HTTPS when the API serves it).
    #[arg(long)]
    registry_address: Option<RegistryAddress>,
    /// UDP address to gossip on (port 0: any free port; default 0.0.0.0:7946).
    #[arg(long)]
    gossip_listen: Option<SocketAddr>,
    /// Address agents gossip with the coordinator at (default: the control address's IP,
    /// or the host's first non-loopback IPv4 address).
    #[arg(long)]
    gossip_advertise: Option<SocketAddr>,
    /// How often to gossip (default 200ms).
    #[arg(long, value_parser = humantime::parse_duration)]
    gossip_interval: Option<std::time::Duration>,
    /// Suspicion (silence over the mean heartbeat interval) at which a member is dead
    /// (default 6).
    #[arg(long, value_parser = |v: &str| v.parse::<f64>().map_err(|e| e.to_string()).and_then(Phi::try_from))]
    phi_threshold: Option<Phi>,
    /// How long a dead member's state is kept before it is forgotten (default 10m).
    #[arg(long, value_parser = humantime::parse_duration)]
    dead_node_grace: Option<std::time::Duration>,
    /// A control session with nothing received for this long counts as silent (default
    /// 1500ms).
    #[arg(long, value_parser = humantime::parse_duration)]
    session_silence: Option<std::time::Duration>,
    /// After a start, how long nodes not heard from yet stay suspect (not down, their
    /// work not lost) while they reconnect (default 15s).
    #[arg(long, value_parser = humantime::parse_duration)]
    startup_grace: Option<std::time::Duration>,
}

impl ServeFlags {
    /// Lays the flags given over the settings from the file: the one place they meet.
    fn overlay(self, s: &mut CoordinatorSettings) {
        fn set<T>(to: &mut T, flag: Option<T>) {
            if let Some(v) = flag {
                *to = v;
            }
        }
        set(&mut s.state_dir, self.state_dir);
        set(&mut s.api_listen, self.api_listen);
        set(&mut s.control_listen, self.control_listen);
        if self.ingress_listen.is_some() {
            s.ingress_listen = self.ingress_listen;
        }
        if self.registry_address.is_some() {
            s.registry_address = self.registry_address;
        }
        set(&mut s.gossip.listen, self.gossip_listen);
        if self.gossip_advertise.is_some() {
            s.gossip.advertise = self.gossip_advertise;
        }
        set(&mut s.gossip.interval, self.gossip_interval);
        set(&mut s.gossip.phi_threshold, self.phi_threshold);
        set(&mut s.gossip.dead_node_grace, self.dead_node_grace);
        set(&mut s.liveness.session_silence, self.session_silence);
        set(&mut s.liveness.startup_grace, self.startup_grace);
    }
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Create a one-time join token for a new node.
    Create {
        /// How long it stays valid.
        #[arg(long, default_value = "1h")]
        ttl: String,
        /// The API: `host:port`, or `https://host:port` when it serves TLS.
        #[arg(long, env = "GANTRY_ADDR", default_value = "127.0.0.1:7080")]
        api: String,
        /// An admin token.
        #[arg(long, env = "GANTRY_TOKEN", hide_env_values = true)]
        token: String,
        /// The CA certificate (PEM) that signed the API's certificate, for an https://
        /// address: the cluster CA is `<state_dir>/ca/ca.pem` (default: the system's roots).
        #[arg(long, env = "GANTRY_CA")]
        ca_file: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = cli
        .config
        .clone()
        .unwrap_or_else(|| gantry_coordinator::config::DEFAULT_PATH.into());
    // A missing file is the defaults, except for `config check`.
    let checking = matches!(cli.command, Command::Config(_));
    let file = match CoordinatorSettings::load(&config, checking) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("gantry-coordinator: {e}");
            return ExitCode::FAILURE;
        }
    };
    if checking {
        println!("{}: valid", config.display());
        return ExitCode::SUCCESS;
    }
    let level = cli.log.clone().unwrap_or_else(|| file.log.level.clone());
    let reload = gantry_shared::config::init_logging(&level, file.log.format);
    // SIGHUP reloads the file's log level, unless a flag fixed it.
    let reload = cli.log.is_none().then_some((config, reload));
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("gantry-coordinator: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli.command, file, reload)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gantry-coordinator: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// SIGHUP re-reads the configuration file and applies its `log.level`; a bad file is
/// reported and changes nothing. (Other settings take a restart.)
async fn reload_on_hangup(config: PathBuf, reload: gantry_shared::config::LogReload) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hangups) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot install a SIGHUP handler; log level reload is off");
        return;
    };
    while hangups.recv().await.is_some() {
        reload.apply(CoordinatorSettings::load(&config, false).map(|c| c.log));
    }
}

async fn run(
    command: Command,
    mut settings: CoordinatorSettings,
    reload: Option<(PathBuf, gantry_shared::config::LogReload)>,
) -> anyhow::Result<()> {
    match command {
        Command::Serve(flags) => {
            if let Some((config, reload)) = reload {
                tokio::spawn(reload_on_hangup(config, reload));
            }
            flags.overlay(&mut settings);
            let cfg = settings.server();
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
                let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
                signals.cancel();
            });
            server::run(cfg, cancel, |bound, admin| {
                // Machine-readable lines on stdout: tools and tests read them. The admin
                // token (first start only) comes first, so readers can stop at `control`.
                if let Some(token) = admin {
                    println!("admin token (shown once, store it safely): {token}");
                }
                // A bare address for plain HTTP (as always), the URL for HTTPS.
                if bound.api_tls {
                    println!("api listening on {}", bound.api_url());
                } else {
                    println!("api listening on {}", bound.api);
                }
                println!("ingress listening on {}", bound.ingress);
                println!("gossip listening on {}", bound.gossip);
                println!("control listening on {}", bound.control);
                // systemd (Type=notify): every endpoint is bound and serving.
                let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
            })
            .await
        }
        Command::Config(ConfigCommand::Check) => unreachable!("answered before the runtime starts"),
        Command::Token(TokenCommand::Create {
            ttl,
            api,
            token,
            ca_file,
        }) => {
            let created = ApiClient::new(&api, &token, ca_file.as_deref())?
                .create_join_token(&ttl)
                .await?;
            println!("{}", created.token);
            eprintln!(
                "valid for {}s; join a node with: gantry-agent join --coordinator CONTROL_ADDR --token <token>",
                created.expires_in_seconds
            );
            Ok(())
        }
    }
}
