//! `gantry-agent serve`: the agent as a cluster member. It keeps one control session to
//! the coordinator (reconnecting with backoff), runs the attempts it is told to start,
//! refuses commands for generations older than one it has seen, and reports what happens
//! through an outbox in sled: events survive agent restarts and disconnections and are
//! sent until the coordinator acknowledges them. Containers keep running while the
//! coordinator or the agent is away; a restarted agent re-adopts them and reports their
//! exits.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use gantry_shared::now_ms;
use gantry_shared::protocol::{
    self, AttemptSpec, Command, CommandReply, Event, NodeCapacity, Refusal, RefusalCode, Request,
    Response, SequencedEvent,
};
use gantry_shared::{
    AttemptRef, ContainerId, CpuMillis, EndCause, Generation, GpuFault, JobId, Owner, Resources,
    StartFailure,
};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::control::{self, ControlError, HelloInfo, NodeIdentity, Session};
use crate::gossip::{GossipSettings, Publisher};
use crate::gpu::inventory::Inventory;
use crate::image::{ImageStore, RegistryAuth};
use crate::runtime::{
    ContainerRequest, ContainerState, ExitReason, ExitRecord, Runtime, RuntimeError, Stream,
};
use crate::store::{LocalStore, StoreError, Table};

mod attempts;
mod gpus;
mod outbox;
mod output;
mod session;

use outbox::Outbox;
use session::{say_restarting, sessions};

/// Exited attempts whose output is kept on the node.
const KEEP_EXITED: usize = 100;

#[derive(Debug, Clone)]
pub struct DaemonConfig {
    pub coordinator: SocketAddr,
    /// Where `gantry-agent join` stored this node's identity.
    pub identity_dir: PathBuf,
    pub capacity: NodeCapacity,
    /// Longest wait between reconnection attempts.
    pub max_backoff: Duration,
    pub gossip: GossipConfig,
    /// Where to poll for the cloud's spot-interruption notice, if anywhere.
    pub spot_notice: Option<crate::preemption::WatcherConfig>,
    /// On a clean stop (SIGTERM: a restart, an upgrade), ask the coordinator to hold the
    /// node's work this long rather than re-place it once the node looks down; zero: don't.
    pub restart_hold: Duration,
}

/// How the agent gossips; the address defaults to the one this host reaches the
/// coordinator from.
#[derive(Debug, Clone)]
pub struct GossipConfig {
    pub membership: gantry_membership::MembershipConfig,
    pub labels: std::collections::BTreeMap<String, String>,
    pub addr: Option<std::net::IpAddr>,
    pub refresh: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("gossip: {0}")]
    Gossip(#[from] gantry_membership::MembershipError),
    #[error(
        "cannot tell which address this host reaches the coordinator {coordinator} from: \
         {source}; set the node's address explicitly"
    )]
    Address {
        coordinator: SocketAddr,
        source: std::io::Error,
    },
}

struct Agent {
    runtime: Runtime,
    images: ImageStore,
    /// The cluster registry (address, token) from the current session, for unqualified
    /// image names.
    registry: std::sync::Mutex<Option<(String, String)>>,
    outbox: Outbox,
    /// Highest generation taken per job: commands for older ones are refused, and a
    /// repeated start of the same one is a no-op.
    generations: Table,
    /// Tells the gossip publisher that containers changed.
    changed: Arc<Notify>,
    /// Containers stopped because one of their GPUs failed, with the fault their exit is
    /// reported with; persisted so a restart keeps it.
    gpu_faults: Table,
    /// The GPUs and their health: no attempt starts on an unhealthy one.
    gpus: tokio::sync::watch::Receiver<Vec<gantry_shared::gossip::GpuInfo>>,
    /// Sets GPU health (restored marks, an operator's clear).
    inventory: crate::gpu::inventory::InventoryHandle,
    /// GPUs marked unhealthy, by UUID, with the reason: they stay unhealthy across agent
    /// restarts until an operator clears them.
    gpu_marks: Table,
    /// Stops that arrived while their container was still starting (image resolution, or
    /// before the shim reported), with their grace: `start` honours them once it can.
    early_stops: std::sync::Mutex<std::collections::HashMap<ContainerId, Duration>>,
}

/// The newest generation of an owner's work this node has taken, and whether its end
/// (exit or start failure) is recorded in the outbox. Filed under [`Owner::key`].
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Mark {
    /// Absent in marks written before owners were recorded (they are all jobs').
    #[serde(default)]
    owner: Option<Owner>,
    generation: Generation,
    done: bool,
}

impl Mark {
    fn owner(&self, key: &str) -> Option<Owner> {
        self.owner
            .clone()
            .or_else(|| JobId::new(key).ok().map(Owner::Job))
    }
}

/// Runs the daemon until `cancel` fires. Containers are left running.
pub async fn run(
    cfg: DaemonConfig,
    runtime: Runtime,
    images: ImageStore,
    store: &LocalStore,
    inventory: &Inventory,
    cancel: CancellationToken,
) -> Result<(), DaemonError> {
    let identity = NodeIdentity::load(&cfg.identity_dir)?;
    let instance = now_ms();
    let addr = match cfg.gossip.addr {
        Some(a) => a,
        None => crate::gossip::local_addr_towards(cfg.coordinator).map_err(|source| {
            DaemonError::Address {
                coordinator: cfg.coordinator,
                source,
            }
        })?,
    };
    let agent = Arc::new(Agent {
        runtime: runtime.clone(),
        images,
        registry: std::sync::Mutex::new(None),
        outbox: Outbox {
            table: store.table("outbox")?,
            meta: store.table("outbox_meta")?,
            notify: Arc::new(Notify::new()),
            push_lock: Arc::default(),
        },
        generations: store.table("generations")?,
        changed: Arc::new(Notify::new()),
        gpu_faults: store.table("gpu_faults")?,
        gpus: inventory.subscribe(),
        inventory: inventory.handle(),
        gpu_marks: store.table("gpu_marks")?,
        early_stops: std::sync::Mutex::default(),
    });
    agent.restore_gpu_marks();
    agent.resume();
    tokio::spawn(
        agent
            .clone()
            .stop_on_gpu_faults(inventory.subscribe(), cancel.clone()),
    );
    let gossip_cancel = cancel.child_token();
    let publisher = Publisher::start(
        &identity.node,
        &identity.cluster,
        instance,
        GossipSettings {
            membership: cfg.gossip.membership.clone(),
            labels: cfg.gossip.labels.clone(),
            addr,
            refresh: cfg.gossip.refresh,
            capacity: cfg.capacity,
        },
        inventory,
        runtime,
        gossip_cancel.clone(),
    )
    .await?;
    let hello = HelloInfo {
        capacity: cfg.capacity,
        instance,
        gossip: Some(publisher.gossip_addr()),
    };
    let result = sessions(&cfg, &identity, hello, &publisher, agent, &cancel).await;
    gossip_cancel.cancel();
    publisher.shutdown().await;
    result
}

impl Agent {
    /// After a restart: watch re-adopted attempts again and report exits that happened
    /// while no agent ran.
    fn resume(self: &Arc<Self>) {
        for c in self.runtime.list() {
            let Some(attempt) = c.attempt else {
                continue;
            };
            match c.state {
                ContainerState::Running { .. } => self.clone().watch(c.id, attempt),
                ContainerState::Exited(exit) => {
                    let done = self
                        .generations
                        .get::<Mark>(attempt.owner.key())
                        .ok()
                        .flatten()
                        .is_some_and(|m| m.done && m.generation >= attempt.generation);
                    if !done {
                        self.report_exit(&c.id, attempt, &exit);
                    }
                }
            }
        }
        // Starts taken by an agent that died before the container existed.
        let marks = self.generations.list::<Mark>().unwrap_or_default();
        for (key, mark) in marks.into_iter().filter(|(_, m)| !m.done) {
            let Some(owner) = mark.owner(&key) else {
                continue;
            };
            let exists = owner
                .container_id(mark.generation)
                .is_some_and(|id| self.runtime.status(&id).is_ok());
            if !exists {
                tracing::warn!(%owner, generation = %mark.generation, "start lost while the agent was down");
                self.finish(Event::StartFailed {
                    owner,
                    generation: mark.generation,
                    message: "the agent stopped while starting it".into(),
                    failure: StartFailure::Node,
                });
            }
        }
    }

    /// Keeps the output of the newest exited attempts (for `gantry logs`) and removes the
    /// containers beyond [`KEEP_EXITED`].
    fn collect_garbage(&self) {
        let mut exited: Vec<(u64, ContainerId)> = self
            .runtime
            .list()
            .into_iter()
            .filter(|c| c.attempt.is_some())
            .filter_map(|c| match c.state {
                ContainerState::Exited(e) => Some((e.finished_at_ms, c.id)),
                ContainerState::Running { .. } => None,
            })
            .collect();
        exited.sort();
        let excess = exited.len().saturating_sub(KEEP_EXITED);
        for (_, id) in exited.into_iter().take(excess) {
            match self.runtime.remove(&id) {
                // Two exits collecting at once: the other one removed it.
                Ok(()) | Err(RuntimeError::NotFound { .. }) => {}
                Err(e) => {
                    tracing::warn!(container = %id, error = %e, "cannot remove an old container")
                }
            }
        }
    }

    /// Records the end of an attempt: its event goes to the outbox and its mark is done.
    /// False if the event could not be recorded (it is found again after a restart).
    fn finish(&self, event: Event) -> bool {
        let (owner, generation) = (event.owner().clone(), event.generation());
        if let Err(e) = self.outbox.push(event) {
            tracing::error!(%owner, error = %e, "cannot record an event");
            return false;
        }
        // An older generation's end (fenced here by a newer start) leaves the mark alone.
        let newer = self
            .generations
            .get::<Mark>(owner.key())
            .ok()
            .flatten()
            .is_some_and(|m| m.generation > generation);
        if newer {
            return true;
        }
        let mark = Mark {
            owner: Some(owner.clone()),
            generation,
            done: true,
        };
        if let Err(e) = self.generations.put(owner.key(), &mark) {
            tracing::warn!(%owner, error = %e, "cannot mark an attempt done");
        }
        true
    }

    /// Serves one session: commands from the coordinator, events to it. On `cancel`, says
    /// it is restarting (for `restart_hold`) before closing the session.
    async fn serve(
        self: Arc<Self>,
        session: &Session,
        cancel: &CancellationToken,
        restart_hold: Duration,
    ) {
        let conn = session.connection().clone();
        let commands = async {
            loop {
                let Ok((mut tx, mut rx)) = conn.accept_bi().await else {
                    return;
                };
                let agent = self.clone();
                tokio::spawn(async move {
                    let (reply, logs) = match control::read_frame::<Command>(&mut rx).await {
                        Ok(Command::Logs {
                            owner,
                            generation,
                            follow,
                        }) => agent.logs(&owner, generation, follow),
                        Ok(cmd) => (agent.handle(cmd).await, None),
                        Err(e) => (
                            CommandReply::Refused(Refusal::new(RefusalCode::NoSession, e)),
                            None,
                        ),
                    };
                    if let Ok(frame) = protocol::encode(&reply) {
                        let _ = tx.write_all(&frame).await;
                    }
                    if let Some((id, follow)) = logs {
                        agent.stream_logs(&mut tx, &id, follow).await;
                    }
                    let _ = tx.finish();
                });
            }
        };
        let events = async {
            loop {
                match self.outbox.pending(256) {
                    Ok(batch) if !batch.is_empty() => {
                        match session.request(&Request::Events { events: batch }).await {
                            Ok(Response::EventsAck { upto }) => {
                                if let Err(e) = self.outbox.ack(upto) {
                                    tracing::error!(error = %e, "cannot trim the event outbox");
                                }
                                continue;
                            }
                            Ok(other) => {
                                tracing::warn!(answer = ?other, "events not acknowledged; will resend")
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "sending events failed");
                                return;
                            }
                        }
                    }
                    Ok(_) => {}
                    Err(e) => tracing::error!(error = %e, "cannot read the event outbox"),
                }
                tokio::select! {
                    _ = self.outbox.notify.notified() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        };
        tokio::select! {
            _ = cancel.cancelled() => {
                say_restarting(session, restart_hold).await;
                conn.close(0u32.into(), b"agent shutting down");
            }
            _ = commands => {}
            _ = events => {}
        }
    }

    async fn handle(self: &Arc<Self>, cmd: Command) -> CommandReply {
        let (owner, generation) = match &cmd {
            Command::Ping => return CommandReply::Accepted,
            Command::ClearGpu { index } => return self.clear_gpu(*index),
            Command::Stop {
                owner,
                generation,
                grace_ms,
            } => return self.stop(owner, *generation, Duration::from_millis(*grace_ms)),
            Command::Start(a) => (a.owner.clone(), a.generation),
            Command::Logs {
                owner, generation, ..
            } => (owner.clone(), *generation),
        };
        let unavailable = |e: StoreError| {
            CommandReply::Refused(Refusal::new(RefusalCode::Unavailable, e.to_string()))
        };
        let mark = match self.generations.get::<Mark>(owner.key()) {
            Ok(m) => m,
            Err(e) => return unavailable(e),
        };
        let known = mark.map_or(Generation::NONE, |m| m.generation);
        if generation < known {
            return CommandReply::Refused(Refusal::new(
                RefusalCode::StaleGeneration,
                format!(
                    "{owner} is at generation {known} on this node; generation {generation} is stale"
                ),
            ));
        }
        match cmd {
            Command::Ping | Command::ClearGpu { .. } | Command::Stop { .. } => {
                CommandReply::Accepted
            }
            // This generation was taken before (running, starting or finished): its
            // events tell the coordinator what became of it.
            Command::Start(_) if generation == known => CommandReply::Accepted,
            Command::Start(spec) => {
                let Some(id) = owner.container_id(generation) else {
                    return CommandReply::Refused(Refusal::new(
                        RefusalCode::Unavailable,
                        format!("{owner} does not fit a container id"),
                    ));
                };
                let mark = Mark {
                    owner: Some(owner.clone()),
                    generation,
                    done: false,
                };
                if let Err(e) = self.generations.put(owner.key(), &mark) {
                    return unavailable(e);
                }
                // Fence older generations of the same owner still running here.
                for old in self.runtime.list() {
                    let older = old
                        .attempt
                        .as_ref()
                        .is_some_and(|a| a.owner == owner && a.generation < generation);
                    if older && matches!(old.state, ContainerState::Running { .. }) {
                        let rt = self.runtime.clone();
                        tokio::spawn(async move { rt.stop(&old.id, Duration::ZERO).await });
                    }
                }
                let agent = self.clone();
                tokio::spawn(async move { agent.start(id, spec).await });
                CommandReply::Accepted
            }
            Command::Logs { .. } => CommandReply::Refused(Refusal::new(
                RefusalCode::Unavailable,
                "logs are served on their own stream",
            )),
        }
    }
}

/// `registry.example.com/x`, `localhost:5000/x`: names a registry, as Docker reads it.
fn is_qualified(image: &str) -> bool {
    image.split_once('/').is_some_and(|(first, _)| {
        first.contains('.') || first.contains(':') || first == "localhost"
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qualified_image_names() {
        assert!(is_qualified("127.0.0.1:5000/team/x:v1"));
        assert!(is_qualified("registry.example.com/x"));
        assert!(is_qualified("localhost/x"));
        assert!(!is_qualified("busybox"));
        assert!(!is_qualified("team/x"));
    }

    #[test]
    fn marks_written_before_owners_were_recorded_are_jobs() {
        let old: Mark = serde_json::from_str(r#"{"generation": 3, "done": false}"#).expect("mark");
        let job = JobId::from_sequence(9);
        assert_eq!(old.owner(job.as_str()), Some(Owner::Job(job)));
        assert_eq!(old.generation, Generation(3));
    }

    #[test]
    fn the_outbox_keeps_order_and_trims_on_ack() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = LocalStore::open(dir.path()).expect("store");
        let outbox = Outbox {
            table: store.table("outbox").expect("t"),
            meta: store.table("meta").expect("t"),
            notify: Arc::new(Notify::new()),
            push_lock: Arc::default(),
        };
        for g in 1..=3 {
            outbox
                .push(Event::Started {
                    owner: Owner::Job(JobId::from_sequence(1)),
                    generation: Generation(g),
                    at_ms: 0,
                })
                .expect("push");
        }
        let seqs: Vec<u64> = outbox
            .pending(10)
            .expect("pending")
            .iter()
            .map(|e| e.seq)
            .collect();
        assert_eq!(seqs, [1, 2, 3]);
        outbox.ack(2).expect("ack");
        assert_eq!(
            outbox
                .pending(10)
                .expect("pending")
                .iter()
                .map(|e| e.seq)
                .collect::<Vec<_>>(),
            [3]
        );
    }
}
