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
//! acknowledged), `output` (attempts' logs streamed), `functions` (function containers'
//! runtime API servers, the commands for them and their answers to the coordinator),
//! `gossip_key` (the cluster's key for a node that joined without one, and a changed one),
//! `build` (steps of image builds) and `session` (the control session that routes
//! commands to them). This file assembles them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use gantry_shared::now_ms;
use gantry_shared::protocol::NodeCapacity;
use tokio_util::sync::CancellationToken;

use crate::code::{CodeCache, CodeError};
use crate::config::AgentConfig;
use crate::control::{ControlError, HelloInfo, NodeIdentity};
use crate::gossip::{GossipSettings, Publisher};
use crate::gpu::inventory::Inventory;
use crate::host::Host;
use crate::invoke::{Invoke, InvokeConfig};
use crate::store::StoreError;
use crate::volumes::Volumes;

mod attempts;
mod build;
mod functions;
mod generations;
mod gossip_key;
mod gpus;
mod outbox;
mod output;
mod session;

use attempts::Attempts;
use functions::Functions;
use generations::Generations;
use gpus::GpuGuard;
use outbox::Outbox;
use session::{Link, Router, sessions};

/// Republish gossip at least this often.
const GOSSIP_REFRESH: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Code(#[from] CodeError),
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

/// Runs the daemon with `config` until `cancel` fires. Containers are left running.
/// `coordinator` is the resolved control address and `capacity` what the node offers.
pub async fn run(
    config: &AgentConfig,
    coordinator: SocketAddr,
    capacity: NodeCapacity,
    (host, volumes): (&Host, &Volumes),
    inventory: &Inventory,
    cancel: CancellationToken,
) -> Result<(), DaemonError> {
    let identity = NodeIdentity::load(&config.state_dir.join("identity"))?;
    let instance = now_ms();
    let addr = match config.address {
        Some(a) => a,
        None => crate::gossip::local_addr_towards(coordinator).map_err(|source| {
            DaemonError::Address {
                coordinator,
                source,
            }
        })?,
    };
    let (runtime, store) = (&host.runtime, &host.store);
    let outbox = Outbox::open(store)?;
    let gpus = Arc::new(GpuGuard::open(store, inventory, runtime.clone())?);
    let functions = Arc::new(Functions::new(
        Invoke::new(
            InvokeConfig::new(config.state_dir.join("invoke")),
            cancel.child_token(),
        ),
        runtime.clone(),
        outbox.clone(),
    ));
    let attempts = Arc::new(Attempts::new(
        runtime.clone(),
        host.images.clone(),
        outbox.clone(),
        Generations::open(store)?,
        gpus.clone(),
        functions.clone(),
        (
            volumes.clone(),
            CodeCache::open(config.state_dir.join("code"))?,
        ),
    ));
    gpus.restore_marks();
    attempts.resume();
    tokio::spawn({
        let (gpus, cancel) = (gpus.clone(), cancel.clone());
        async move { gpus.stop_on_faults(cancel).await }
    });
    // A node joined before gossip was authenticated learns the key before it gossips.
    let hello = HelloInfo {
        capacity,
        instance,
        gossip: None,
    };
    let Some((identity, key)) =
        gossip_key::learn(identity, coordinator, hello, &config.state_dir, &cancel).await?
    else {
        functions.shutdown().await;
        return Ok(());
    };
    let gossip_cancel = cancel.child_token();
    let publisher = Publisher::start(
        &identity.node,
        (&identity.cluster, &key),
        instance,
        GossipSettings {
            membership: config.gossip.clone(),
            labels: config.labels.clone(),
            addr,
            refresh: GOSSIP_REFRESH,
            capacity,
        },
        (inventory, runtime.clone(), host.images.clone()),
        gossip_cancel.clone(),
    )
    .await?;
    let hello = HelloInfo {
        gossip: Some(publisher.gossip_addr()),
        ..hello
    };
    let router = Router {
        attempts,
        gpus,
        outbox,
        runtime: runtime.clone(),
        functions: functions.clone(),
        volumes: volumes.clone(),
        builds: build::BuildConfig {
            scratch: config.state_dir.join("builds"),
            ca_file: Some(config.builds.ca_file.clone()).filter(|p| !p.as_os_str().is_empty()),
        },
    };
    let link = Link {
        coordinator,
        identity: &identity,
        hello,
    };
    let result = sessions(config, &link, &publisher, router, &cancel).await;
    gossip_cancel.cancel();
    publisher.shutdown().await;
    functions.shutdown().await;
    result
}
