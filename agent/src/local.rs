//! The operator's one-shot commands on this host, without a daemon: a container run in the
//! foreground (like `podman run`), images, `ps`, `logs`, `stop`, `wait`, `rm`, and the
//! GPUs (`gpu list`, fault injection into simulated ones). Each prints what the operator
//! asked for and returns the process's exit code.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use gantry_shared::ContainerId;

use crate::gpu::inventory::{GpuSource, HealthEvent, InventoryError};
use crate::gpu::nvml::NvmlSource;
use crate::gpu::simulated;
use crate::host::{Host, HostError};
use crate::image::{ImageConfig, ImageError, RegistryAuth};
use crate::runtime::{ContainerRequest, ContainerState, Runtime, RuntimeError, Stream};

#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error(transparent)]
    Host(#[from] HostError),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Gpu(#[from] InventoryError),
    #[error("installing a {signal} handler")]
    Signal {
        signal: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// Writing to this process's stdout or stderr.
    #[error(transparent)]
    Output(#[from] std::io::Error),
    #[error(transparent)]
    Json(#[from] serde_json::Error),
}

/// Runs one container in the foreground: its output is printed as it comes, SIGTERM or
/// Ctrl-C stops it (a second Ctrl-C kills it), and the exit code is the container's (125
/// when it did not start). With `detach`, prints its id once started and leaves it.
pub async fn run(host: &Host, req: ContainerRequest, detach: bool) -> Result<i32, LocalError> {
    // Handlers before the start: a signal that arrives as soon as the container runs must
    // stop it, not kill this process with the container still running.
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(|source| LocalError::Signal {
        signal: "SIGTERM",
        source,
    })?;
    let mut int = signal(SignalKind::interrupt()).map_err(|source| LocalError::Signal {
        signal: "SIGINT",
        source,
    })?;
    let grace = req.stop_grace;
    let mut status = match host.runtime.start(req.clone()).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("gantry-agent: {e}");
            return Ok(125);
        }
    };
    // The image was looked up while the store opened; it must be what the store says.
    if !host.images.stale_files()?.is_empty() {
        eprintln!(
            "gantry-agent: the image's record had changed; starting again with the current one"
        );
        host.runtime.stop(&status.id, Duration::ZERO).await?;
        host.runtime.wait(&status.id).await?;
        host.runtime.remove(&status.id)?;
        status = match host.runtime.start(req).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("gantry-agent: {e}");
                return Ok(125);
            }
        };
    }
    let id = status.id;
    if detach {
        println!("{id}");
        return Ok(0);
    }
    let rt = host.runtime.clone();
    let stopper = {
        let (rt, id) = (rt.clone(), id.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            eprintln!("gantry-agent: stopping {id} (grace {grace:?}; Ctrl-C again to kill)");
            let second = tokio::spawn({
                let (rt, id) = (rt.clone(), id.clone());
                async move {
                    int.recv().await;
                    let _ = rt.stop(&id, Duration::ZERO).await;
                }
            });
            let _ = rt.stop(&id, grace).await;
            second.abort();
        })
    };
    follow_both(&rt, &id).await?;
    let exit = rt.wait(&id).await?;
    stopper.abort();
    rt.remove(&id)?;
    if exit.oom_killed {
        eprintln!(
            "gantry-agent: container {id} was killed by the OOM killer at its memory limit; raise --memory"
        );
    }
    Ok(exit.code())
}

/// Prints a container's stdout and stderr to this process's until it exits.
pub async fn follow_both(rt: &Runtime, id: &ContainerId) -> Result<(), RuntimeError> {
    let out = rt.follow(id, Stream::Stdout, |b| {
        let mut o = std::io::stdout().lock();
        let ok = o.write_all(&b).and_then(|()| o.flush()).is_ok();
        std::future::ready(ok)
    });
    let err = rt.follow(id, Stream::Stderr, |b| {
        std::future::ready(std::io::stderr().write_all(&b).is_ok())
    });
    let (a, b) = tokio::join!(out, err);
    a.and(b)
}

/// `image import`: a root filesystem (directory or tarball) as an image.
pub async fn image_import(
    host: &Host,
    source: &Path,
    name: &str,
    config: ImageConfig,
) -> Result<i32, LocalError> {
    let rec = host.images.import(source, name, config).await?;
    println!("{} {}", rec.name, rec.digest);
    Ok(0)
}

/// `image pull`.
pub async fn image_pull(
    host: &Host,
    reference: &str,
    auth: &RegistryAuth,
) -> Result<i32, LocalError> {
    let rec = host.images.pull(reference, auth).await?;
    println!("{} {}", rec.name, rec.digest);
    Ok(0)
}

/// `image list`.
pub fn image_list(host: &Host) -> Result<i32, LocalError> {
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

/// `ps`: every container on this host, running or exited.
pub fn ps(host: &Host) -> i32 {
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
    0
}

/// `logs`: what a container printed; with `follow`, until it exits.
pub async fn logs(host: &Host, id: &ContainerId, follow: bool) -> Result<i32, LocalError> {
    if follow {
        follow_both(&host.runtime, id).await?;
    } else {
        std::io::stdout().write_all(&host.runtime.logs(id, Stream::Stdout)?)?;
        std::io::stderr().write_all(&host.runtime.logs(id, Stream::Stderr)?)?;
    }
    Ok(0)
}

/// `stop`: SIGTERM, then SIGKILL after `grace`.
pub async fn stop(host: &Host, id: &ContainerId, grace: Duration) -> Result<i32, LocalError> {
    let exit = host.runtime.stop(id, grace).await?;
    println!("{id} {:?} {}", exit.reason, exit.code());
    Ok(0)
}

/// `wait`: prints the exit record and exits with the container's code.
pub async fn wait(host: &Host, id: &ContainerId) -> Result<i32, LocalError> {
    let exit = host.runtime.wait(id).await?;
    println!("{}", serde_json::to_string(&exit)?);
    Ok(exit.code())
}

/// `rm`: an exited container and its logs.
pub fn rm(host: &Host, id: &ContainerId) -> Result<i32, LocalError> {
    host.runtime.remove(id)?;
    Ok(0)
}

/// `gpu list`: the GPUs an agent would offer, NVML's or a simulated spec's.
pub fn gpu_list(simulate: Option<&str>) -> Result<(), InventoryError> {
    let gpus = match simulate {
        Some(spec) => simulated::parse_spec(spec, "local")?,
        None => NvmlSource::open()?.discover()?,
    };
    println!(
        "{:<5} {:<40} {:<24} {:>9} {:<16} {:>4} {:>6} {:<10}",
        "INDEX", "UUID", "MODEL", "MEMORY", "PCI", "NUMA", "NVLINK", "HEALTH"
    );
    for g in gpus {
        let opt = |v: Option<u32>| v.map_or("-".into(), |v| v.to_string());
        println!(
            "{:<5} {:<40} {:<24} {:>8}G {:<16} {:>4} {:>6} {:<10}{}",
            g.index,
            g.uuid,
            g.model,
            g.memory_bytes >> 30,
            if g.pci_bus_id.is_empty() {
                "-"
            } else {
                &g.pci_bus_id
            },
            opt(g.numa_node),
            opt(g.nvlink_group),
            g.health.to_compact(),
            if g.simulated { " (simulated)" } else { "" }
        );
    }
    Ok(())
}

/// `gpu inject`: a fault into a simulated GPU of the agent on `state_dir`, as NVML would
/// report it.
pub fn gpu_inject(state_dir: &Path, index: u32, event: HealthEvent) -> Result<(), InventoryError> {
    simulated::inject(state_dir, simulated::Fault { index, event })
}
