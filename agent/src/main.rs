//! `gantry-agent`: parses flags, loads the configuration file (flags over it), sets up
//! logging and calls into the library. Shim mode is dispatched before any async runtime
//! exists, because the shim forks (via libcontainer) and must stay single-threaded.

use std::path::Path;
use std::process::ExitCode;

use clap::Parser;
use gantry_agent::config::AgentConfig;
use gantry_agent::gpu::inventory::HealthEvent;
use gantry_agent::host::{Host, HostConfig};
use gantry_agent::image::{ImageConfig, PullConfig, RegistryAuth};
use gantry_agent::local;
use gantry_agent::runtime::{Forked, PreforkedShim};
use tokio_util::sync::CancellationToken;

mod flags;

use flags::{Cli, Command, ConfigCommand, GpuCommand, ImageCommand};

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Shim {
        cleanup,
        pooled,
        dir,
    } = &cli.command
    {
        use gantry_agent::runtime::shim::{self, Assignment};
        let code = match (dir, *cleanup, *pooled) {
            (Some(dir), true, _) => shim::cleanup_lost(dir),
            (Some(dir), false, false) => shim::main(Assignment::Now(dir)),
            _ => shim::main(Assignment::Later),
        };
        return ExitCode::from(code.clamp(0, 255) as u8);
    }
    // `run` forks its shim now, while this process has one thread: the shim is ready by
    // the time the store is open, without an exec. Failing that, the runtime spawns one.
    let preforked = match &cli.command {
        Command::Run(_) => match gantry_agent::runtime::prefork() {
            Ok(Forked::Shim(code)) => return ExitCode::from(code.clamp(0, 255) as u8),
            Ok(Forked::Agent(shim)) => Some(Ok(shim)),
            Err(e) => Some(Err(e)),
        },
        _ => None,
    };
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
    let mut file = match AgentConfig::load(&config, false) {
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
    if let Some(dir) = cli.state_dir_flag.clone() {
        file.state_dir = dir;
    }
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
    // SIGHUP reloads the file's log level, unless a flag fixed it.
    let reload = (serving && cli.log.is_none()).then_some(reload);
    let state_dir = file.state_dir.clone();
    let preforked = preforked.and_then(|shim| {
        shim.inspect_err(
            |e| tracing::debug!(error = %e, "no pre-forked shim; the runtime spawns one"),
        )
        .ok()
    });
    match cli.command {
        Command::Join {
            coordinator,
            token,
            node,
        } => block_on(async move {
            gantry_agent::join::run(&state_dir, &config, &coordinator, &token, node).await?;
            Ok(0)
        }),
        Command::Gpu(GpuCommand::List { simulate }) => {
            exit_on(local::gpu_list(simulate.as_deref()).map(|()| 0))
        }
        Command::Gpu(GpuCommand::Inject { index, xid, ecc: _ }) => {
            let event = match xid {
                Some(x) => HealthEvent::Xid(x),
                None => HealthEvent::DoubleBitEcc,
            };
            exit_on(local::gpu_inject(&state_dir, index, event).map(|()| 0))
        }
        Command::Serve(args) => {
            args.overlay(&mut file);
            block_on(async move {
                if let Some(reload) = reload {
                    tokio::spawn(gantry_agent::config::reload_log_on_hangup(config, reload));
                }
                let shutdown = CancellationToken::new();
                let signals = shutdown.clone();
                tokio::spawn(async move {
                    terminated().await;
                    signals.cancel();
                });
                gantry_agent::serve::run(file, shutdown).await?;
                Ok(0)
            })
        }
        // `run` waits on one container: a runtime without worker threads starts sooner.
        command @ Command::Run(_) => block_on_with(
            current_thread(),
            one_shot(&state_dir, file, command, preforked),
        ),
        command => block_on(one_shot(&state_dir, file, command, preforked)),
    }
}

/// The commands that act on this host's state without a daemon. `shim` is the one `run`
/// forked at the start.
async fn one_shot(
    state_dir: &Path,
    file: AgentConfig,
    command: Command,
    shim: Option<PreforkedShim>,
) -> anyhow::Result<i32> {
    let pull = match &command {
        Command::Image(ImageCommand::Pull {
            insecure_registries,
            ..
        }) => PullConfig {
            insecure_registries: insecure_registries.clone(),
            extra_roots: match &file.registry.ca_file {
                Some(path) => gantry_agent::image::read_roots(path)?,
                None => Vec::new(),
            },
            ..PullConfig::default()
        },
        _ => PullConfig::default(),
    };
    let gpu = file.gpu;
    let quick_start = matches!(command, Command::Run(_));
    let host = Host::open(
        state_dir,
        HostConfig {
            pull,
            shim_pool: 0,
            simulated_gpus: false,
            gpu,
            quick_start,
        },
    )
    .await?;
    if let Some(shim) = shim {
        host.runtime.give_shim(shim);
    }
    let code = match command {
        Command::Run(args) => {
            let detach = args.detach;
            local::run(&host, args.request(), detach).await?
        }
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
            local::image_import(&host, &source, &name, config).await?
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
            local::image_pull(&host, &reference, &auth).await?
        }
        Command::Image(ImageCommand::List) => local::image_list(&host)?,
        Command::Ps => local::ps(&host),
        Command::Logs { id, follow } => local::logs(&host, &id, follow).await?,
        Command::Stop { id, time } => local::stop(&host, &id, time).await?,
        Command::Wait { id } => local::wait(&host, &id).await?,
        Command::Rm { id } => local::rm(&host, &id)?,
        Command::Serve(_)
        | Command::Shim { .. }
        | Command::Join { .. }
        | Command::Gpu(_)
        | Command::Config(_) => {
            unreachable!("dispatched before the store is opened")
        }
    };
    Ok(code)
}

/// Resolves at Ctrl-C or SIGTERM.
async fn terminated() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async {
            match term.as_mut() {
                Some(t) => { t.recv().await; }
                None => std::future::pending().await,
            }
        } => {}
    }
}

/// The exit code of a command that ran (clamped to 0..=255), or 125 after printing why
/// it could not.
fn exit_on<E: Into<anyhow::Error>>(result: Result<i32, E>) -> ExitCode {
    match result {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("gantry-agent: {:#}", e.into());
            ExitCode::from(125)
        }
    }
}

fn block_on(f: impl std::future::Future<Output = anyhow::Result<i32>>) -> ExitCode {
    block_on_with(tokio::runtime::Runtime::new(), f)
}

fn current_thread() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

fn block_on_with(
    rt: std::io::Result<tokio::runtime::Runtime>,
    f: impl std::future::Future<Output = anyhow::Result<i32>>,
) -> ExitCode {
    let rt = match rt {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("gantry-agent: cannot start the async runtime: {e}");
            return ExitCode::from(125);
        }
    };
    exit_on(rt.block_on(f))
}
