//! `serve` (the daemon: configuration merged with flags, GPUs, signals) and `join`.

use crate::*;

/// SIGHUP re-reads the configuration file and applies its `log.level`; a bad file is
/// reported and changes nothing. (Other settings take a restart.)
pub(crate) async fn reload_on_hangup(config: PathBuf, reload: gantry_shared::config::LogReload) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hangups) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot install a SIGHUP handler; log level reload is off");
        return;
    };
    while hangups.recv().await.is_some() {
        reload.apply(gantry_agent::config::AgentConfig::load(&config, false).map(|c| c.log));
    }
}

pub(crate) async fn serve(
    state_dir: &std::path::Path,
    host: &Host,
    args: ServeArgs,
    file: &gantry_agent::config::Checked,
    inventory: Option<Inventory>,
) -> anyhow::Result<i32> {
    let coordinator = args.coordinator.or_else(|| file.coordinator.clone()).context(
        "no coordinator address: run `gantry-agent join --coordinator HOST:PORT --token TOKEN` (it records it in the configuration file) or pass --coordinator",
    )?;
    let addr = resolve(&coordinator).await?;
    let inventory = inventory.unwrap_or_else(Inventory::empty);
    // Flags add labels to the file's and win on the same key.
    let mut labels: std::collections::BTreeMap<String, String> =
        file.labels.iter().cloned().collect();
    labels.extend(args.labels);
    let cpu_millis = args.cpus.or(file.cpus).map(|c| c.0).unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get() as u64 * 1000)
            .unwrap_or(1000)
    });
    let memory_bytes = match args.memory.or(file.memory) {
        Some(m) => m,
        None => host_memory().context("reading /proc/meminfo (pass --memory)")?,
    };
    let cfg = gantry_agent::daemon::DaemonConfig {
        coordinator: addr,
        identity_dir: state_dir.join("identity"),
        capacity: gantry_shared::protocol::NodeCapacity {
            cpu_millis,
            memory_bytes,
            gpus: inventory.current().len() as u32,
        },
        max_backoff: Duration::from_secs(5),
        gossip: gantry_agent::daemon::GossipConfig {
            membership: gantry_membership::MembershipConfig {
                listen: args.gossip_listen.unwrap_or(file.gossip_listen),
                advertise: args.gossip_advertise.or(file.gossip_advertise),
                seeds: [file.gossip_seeds.clone(), args.gossip_seeds].concat(),
                gossip_interval: args.gossip_interval.unwrap_or(file.gossip_interval),
                phi_threshold: args.phi_threshold.unwrap_or(file.phi_threshold),
                dead_node_grace: args.dead_node_grace.unwrap_or(file.dead_node_grace),
            },
            labels,
            addr: args.address.or(file.address),
            refresh: Duration::from_secs(2),
        },
        spot_notice: args
            .spot_notice_url
            .or_else(|| file.spot_notice_url.clone())
            .map(|url| gantry_agent::preemption::WatcherConfig {
                url,
                interval: args
                    .spot_notice_interval
                    .unwrap_or(file.spot_notice_interval),
            }),
        restart_hold: args.restart_hold.unwrap_or(file.restart_hold),
    };
    let cancel = tokio_util::sync::CancellationToken::new();
    let signals = cancel.clone();
    tokio::spawn(async move {
        terminated().await;
        signals.cancel();
    });
    println!("agent serving; coordinator {addr}");
    // systemd (Type=notify): started; containers of an earlier run are re-adopted by now.
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    gantry_agent::daemon::run(
        cfg,
        host.runtime.clone(),
        host.images.clone(),
        &host.store,
        &inventory,
        cancel,
    )
    .await?;
    Ok(0)
}

/// The GPUs to offer: the simulated spec if given, else NVML's; a host without NVML
/// offers none and says why.
pub(crate) fn gpu_inventory(
    state_dir: &std::path::Path,
    simulate: Option<&str>,
    node: &str,
) -> anyhow::Result<Option<Inventory>> {
    if let Some(spec) = simulate {
        let source = SimulatedSource::new(spec, node, state_dir)?;
        return Ok(Some(Inventory::start(source)?));
    }
    match NvmlSource::open() {
        Ok(source) => Ok(Some(Inventory::start(source)?)),
        Err(e @ InventoryError::NoNvml { .. }) => {
            eprintln!("gantry-agent: {e}");
            tracing::warn!(error = %e, "no real GPUs");
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

/// Resolves at Ctrl-C or SIGTERM.
pub(crate) async fn terminated() {
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

pub(crate) fn host_memory() -> anyhow::Result<u64> {
    let text = std::fs::read_to_string("/proc/meminfo")?;
    let kb: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no MemTotal in /proc/meminfo")?;
    Ok(kb * 1024)
}

pub(crate) async fn resolve(addr: &str) -> anyhow::Result<std::net::SocketAddr> {
    tokio::net::lookup_host(addr)
        .await
        .with_context(|| format!("resolving the coordinator address `{addr}` (use host:port)"))?
        .next()
        .with_context(|| format!("`{addr}` resolves to no address"))
}

/// `gantry-agent join`: needs no local store, only the identity directory.
pub(crate) async fn join(
    state_dir: PathBuf,
    config: &std::path::Path,
    coordinator: String,
    token: String,
    node: Option<NodeId>,
) -> anyhow::Result<i32> {
    let addr = resolve(&coordinator).await?;
    let node = match node {
        Some(n) => n,
        None => {
            let host = nix::unistd::gethostname()
                .context("reading the host name")?
                .to_string_lossy()
                .to_lowercase();
            NodeId::new(host.clone()).with_context(|| {
                format!("the host name `{host}` is not a valid node name; pass --node")
            })?
        }
    };
    let identity =
        gantry_agent::control::join(addr, &token, node, &state_dir.join("identity")).await?;
    println!(
        "joined cluster {} as node {}",
        identity.cluster, identity.node
    );
    gantry_agent::config::record_join(config, &coordinator, &state_dir)?;
    println!("coordinator recorded in {}", config.display());
    Ok(0)
}
