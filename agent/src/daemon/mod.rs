//! `gantry-agent serve`: the agent as a cluster member. It keeps one control session to
//! the coordinator (reconnecting with backoff), runs the attempts it is told to start,
//! refuses commands for generations older than one it has seen, and reports what happens
//! through an outbox in sled: events survive agent restarts and disconnections and are
//! sent until the coordinator acknowledges them. Containers keep running while the
//! coordinator or the agent is away; a restarted agent re-adopts them and reports their
//! exits.
//!
//! One component per responsibility, each in its own file: `attempts` (start, stop,
//! watch, report), `generations` (the marks that fence stale commands), `gpus` (the
//! GPU guard: faults stop attempts, marks outlive restarts), `outbox` (events until
//! acknowledged), `output` (attempts' logs streamed), and `session` (the control
//! session that routes commands to them). This file assembles them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use gantry_shared::now_ms;
use gantry_shared::protocol::NodeCapacity;
use tokio_util::sync::CancellationToken;

use crate::control::{ControlError, HelloInfo, NodeIdentity};
use crate::gossip::{GossipSettings, Publisher};
use crate::gpu::inventory::Inventory;
use crate::image::ImageStore;
use crate::runtime::Runtime;
use crate::store::{LocalStore, StoreError};

mod attempts;
mod generations;
mod gpus;
mod outbox;
mod output;
mod session;

use attempts::Attempts;
use generations::Generations;
use gpus::GpuGuard;
use outbox::Outbox;
use session::{Router, sessions};

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
    let outbox = Outbox::open(store)?;
    let gpus = Arc::new(GpuGuard::open(store, inventory, runtime.clone())?);
    let attempts = Arc::new(Attempts::new(
        runtime.clone(),
        images,
        outbox.clone(),
        Generations::open(store)?,
        gpus.clone(),
    ));
    gpus.restore_marks();
    attempts.resume();
    tokio::spawn({
        let (gpus, cancel) = (gpus.clone(), cancel.clone());
        async move { gpus.stop_on_faults(cancel).await }
    });
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
        runtime.clone(),
        gossip_cancel.clone(),
    )
    .await?;
    let hello = HelloInfo {
        capacity: cfg.capacity,
        instance,
        gossip: Some(publisher.gossip_addr()),
    };
    let router = Router {
        attempts,
        gpus,
        outbox,
        runtime,
    };
    let result = sessions(&cfg, &identity, hello, &publisher, router, &cancel).await;
    gossip_cancel.cancel();
    publisher.shutdown().await;
    result
}
