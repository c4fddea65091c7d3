//! `run`: one container in the foreground, like `podman run`, exiting with its code.

use crate::*;

pub(crate) async fn follow_both(rt: &Runtime, id: &ContainerId) -> Result<(), RuntimeError> {
    use std::io::Write;
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

pub(crate) async fn run_container(host: &Host, a: RunArgs) -> anyhow::Result<i32> {
    let mut req = ContainerRequest::new(a.image);
    req.id = a.name;
    req.resources = gantry_shared::Resources {
        cpu: a.cpus,
        memory_bytes: a.memory,
        pids: a.pids,
    };
    req.env = a.env;
    req.workdir = a.workdir;
    req.user = a.user;
    req.entrypoint = a.entrypoint.map(|e| vec![e]);
    req.command = (!a.command.is_empty()).then_some(a.command);
    req.gpus = a.gpus;
    req.network = a.network;
    req.shm_bytes = a.shm_size;
    req.timeout = a.timeout;
    req.stop_grace = a.stop_grace;
    // Handlers before the start: a signal that arrives as soon as the container runs must
    // stop it, not kill this process with the container still running.
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing a SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing a SIGINT handler")?;
    let status = match host.runtime.start(req).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("gantry-agent: {e}");
            return Ok(125);
        }
    };
    let id = status.id;
    if a.detach {
        println!("{id}");
        return Ok(0);
    }
    let rt = host.runtime.clone();
    let stopper = {
        let (rt, id, grace) = (rt.clone(), id.clone(), a.stop_grace);
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
