//! Cluster membership: one chitchat member per process (every agent and the coordinator),
//! gossiping over UDP datagrams authenticated with the cluster's gossip key.
//!
//! chitchat (Scuttlebutt reconciliation, phi-accrual failure detection) does the work;
//! this crate owns how Gantry configures it ([`MembershipConfig`], with defaults chosen for
//! fast detection), the transport under it (`transport`: every datagram sealed with an
//! HMAC (`seal`) and dropped unless it opens, over UDP or an [`InProcessNetwork`]), what
//! a member moved and dropped (for `/metrics` and the gossip benchmark), and turns
//! chitchat's state into plain [`MemberView`]s. What the key-values mean is
//! `gantry_shared::gossip`'s business.

mod in_process;
mod seal;
mod transport;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use chitchat::{
    ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig, ProtocolVersion,
};
pub use gantry_shared::GossipKey;
pub use in_process::InProcessNetwork;
pub use seal::{DropReason, MAX_CLOCK_SKEW};
use serde::{Deserialize, Serialize};
use transport::SealedTransport;
pub use transport::Traffic;

/// How a member gossips and decides that a peer is dead.
///
/// With the defaults a member gossips with up to three peers every 200 ms; a peer's
/// heartbeats then arrive every ~200 ms and it is declared dead once nothing has come for
/// `phi_threshold` × that mean interval (~1.2 s), checked every gossip round. chitchat's own
/// defaults (1 s interval, phi 8, a 5 s prior interval, 24 h grace) take ~10–40 s to detect.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MembershipConfig {
    /// UDP address to gossip on; port 0 picks a free port.
    pub listen: SocketAddr,
    /// Address peers reach this member at (default: `listen`, with the port actually bound).
    /// Required when `listen` is a wildcard address.
    pub advertise: Option<SocketAddr>,
    /// Members to contact first (`host:port`); the coordinator's gossip address for agents.
    pub seeds: Vec<String>,
    #[serde(with = "humantime_serde")]
    pub gossip_interval: Duration,
    /// Suspicion level (elapsed time over the mean heartbeat interval) above which a peer is
    /// declared dead.
    pub phi_threshold: f64,
    /// How long a dead peer is remembered (and its state kept) before it is forgotten.
    #[serde(with = "humantime_serde")]
    pub dead_node_grace: Duration,
}

impl Default for MembershipConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 7946)),
            advertise: None,
            seeds: Vec::new(),
            gossip_interval: Duration::from_millis(200),
            phi_threshold: 6.0,
            dead_node_grace: Duration::from_secs(600),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    #[error(
        "gossip listens on the wildcard address {listen}; set the address peers reach this \
         member at (advertise address)"
    )]
    NoAdvertise { listen: SocketAddr },
    #[error("cannot gossip on {listen}/udp: {source}; pick a free port or stop what uses it")]
    Bind {
        listen: SocketAddr,
        source: anyhow::Error,
    },
    #[error("phi threshold {0} must be a positive number")]
    Phi(f64),
    #[error("gossip interval must be at least 10ms")]
    Interval,
    #[error("an in-process gossip member needs an explicit port in its listen address ({listen})")]
    InProcessPort { listen: SocketAddr },
}

/// Where a member's datagrams travel. The product gossips over UDP; simulations and
/// tests can put members in one process on an [`InProcessNetwork`], which can also cut
/// links between members (a partition) and carry forged bytes. Both run the same
/// authenticating socket and are counted the same way.
#[derive(Clone, Default)]
pub enum GossipTransport {
    #[default]
    Udp,
    /// In process: every member opened on one network reaches the others. Its `listen`
    /// addresses are only names, so each member needs its own explicit port.
    InProcess(InProcessNetwork),
}

impl std::fmt::Debug for GossipTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            GossipTransport::Udp => "udp",
            GossipTransport::InProcess(_) => "in process",
        })
    }
}

/// One member as this process sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberView {
    /// The node id (`NodeId`) or `coordinator`.
    pub node: String,
    /// Incremented on each start of the member's process (its start time in ms), so a
    /// restarted member is a new chitchat identity.
    pub generation: u64,
    pub gossip_addr: SocketAddr,
    /// chitchat's failure detector considers it alive (always true for this member).
    pub live: bool,
    /// Declared dead by the failure detector. A member that is neither live nor dead has
    /// just appeared (fewer than two heartbeats seen).
    pub dead: bool,
    /// Incremented by the member on every gossip round.
    pub heartbeat: u64,
    pub key_values: BTreeMap<String, String>,
}

/// A running member. Dropping it without [`Member::shutdown`] aborts the gossip task.
pub struct Member {
    handle: ChitchatHandle,
    traffic: Arc<Traffic>,
}

impl Member {
    /// Starts gossiping over UDP as `node` (generation `generation`) in cluster `cluster`,
    /// sealing and opening every datagram with the cluster's `key`.
    pub async fn start(
        node: &str,
        generation: u64,
        cluster: &str,
        key: &GossipKey,
        cfg: &MembershipConfig,
        key_values: Vec<(String, String)>,
    ) -> Result<Self, MembershipError> {
        Self::start_on(
            &GossipTransport::Udp,
            node,
            generation,
            cluster,
            key,
            cfg,
            key_values,
        )
        .await
    }

    /// Starts gossiping over `transport`.
    pub async fn start_on(
        transport: &GossipTransport,
        node: &str,
        generation: u64,
        cluster: &str,
        key: &GossipKey,
        cfg: &MembershipConfig,
        key_values: Vec<(String, String)>,
    ) -> Result<Self, MembershipError> {
        if matches!(transport, GossipTransport::InProcess(_)) && cfg.listen.port() == 0 {
            return Err(MembershipError::InProcessPort { listen: cfg.listen });
        }
        if !(cfg.phi_threshold.is_finite() && cfg.phi_threshold > 0.0) {
            return Err(MembershipError::Phi(cfg.phi_threshold));
        }
        if cfg.gossip_interval < Duration::from_millis(10) {
            return Err(MembershipError::Interval);
        }
        if cfg.listen.ip().is_unspecified() && cfg.advertise.is_none() {
            return Err(MembershipError::NoAdvertise { listen: cfg.listen });
        }
        let traffic = Arc::new(Traffic::default());
        // chitchat needs its advertised address (with the port) before it binds, so a
        // port 0 is resolved first; a port taken in between is retried with another.
        let mut attempts = 0;
        loop {
            attempts += 1;
            let listen = if cfg.listen.port() == 0 {
                free_udp_port(cfg.listen).map_err(|source| MembershipError::Bind {
                    listen: cfg.listen,
                    source: source.into(),
                })?
            } else {
                cfg.listen
            };
            let advertise = match cfg.advertise {
                Some(a) if a.port() == 0 => SocketAddr::new(a.ip(), listen.port()),
                Some(a) => a,
                None => listen,
            };
            let config = ChitchatConfig {
                chitchat_id: ChitchatId::new(node, generation, advertise),
                cluster_id: cluster.to_owned(),
                gossip_interval: cfg.gossip_interval,
                listen_addr: listen,
                seed_nodes: cfg.seeds.clone(),
                failure_detector_config: FailureDetectorConfig {
                    phi_threshold: cfg.phi_threshold,
                    sampling_window_size: 1_000,
                    max_interval: Duration::from_secs(10),
                    // The prior mean of heartbeat intervals: chitchat's 5 s default would
                    // make the first minute's detection 5–20× slower.
                    initial_interval: cfg.gossip_interval,
                    dead_node_grace_period: cfg.dead_node_grace,
                },
                marked_for_deletion_grace_period: Duration::from_secs(3_600),
                catchup_callback: None,
                extra_liveness_predicate: None,
                // V1 compresses digests (zstd): at 100 members ~20 KB/s per node instead
                // of ~170 (bench/README.md). Every Gantry member speaks it.
                protocol_version: ProtocolVersion::V1,
            };
            let sealed = SealedTransport {
                network: transport.clone(),
                key: key.clone(),
                traffic: traffic.clone(),
            };
            match chitchat::spawn_chitchat(config, key_values.clone(), &sealed).await {
                Ok(handle) => return Ok(Self { handle, traffic }),
                Err(source) if cfg.listen.port() == 0 && attempts < 5 => {
                    tracing::debug!(error = %source, "gossip port taken meanwhile; retrying");
                }
                Err(source) => return Err(MembershipError::Bind { listen, source }),
            }
        }
    }

    /// The address peers gossip with this member at.
    pub fn gossip_addr(&self) -> SocketAddr {
        self.handle.chitchat_id().gossip_advertise_addr
    }

    pub fn traffic(&self) -> Arc<Traffic> {
        self.traffic.clone()
    }

    /// Publishes key-values; unchanged ones cost nothing (chitchat skips them).
    pub async fn set(&self, key_values: Vec<(String, String)>) {
        self.handle
            .with_chitchat(|c| {
                let state = c.self_node_state();
                for (k, v) in &key_values {
                    state.set(k, v);
                }
            })
            .await;
    }

    /// Deletes keys this member published (chitchat keeps tombstones for an hour).
    pub async fn delete(&self, keys: &[String]) {
        self.handle
            .with_chitchat(|c| {
                let state = c.self_node_state();
                for k in keys {
                    if state.contains_key(k) {
                        state.delete(k);
                    }
                }
            })
            .await;
    }

    /// Asks chitchat to contact `addr` now (a member learned of later than the seeds).
    pub fn contact(&self, addr: SocketAddr) {
        if let Err(e) = self.handle.gossip(addr) {
            tracing::debug!(%addr, error = %e, "gossip task is gone");
        }
    }

    /// Every member this process knows, live or dead, including itself.
    pub async fn members(&self) -> Vec<MemberView> {
        self.handle
            .with_chitchat(|c| {
                let live: std::collections::HashSet<ChitchatId> = c.live_nodes().cloned().collect();
                let dead: std::collections::HashSet<ChitchatId> = c.dead_nodes().cloned().collect();
                c.node_states()
                    .iter()
                    .map(|(id, state)| MemberView {
                        node: id.node_id.to_string(),
                        generation: id.generation_id,
                        gossip_addr: id.gossip_advertise_addr,
                        live: live.contains(id),
                        dead: dead.contains(id),
                        heartbeat: state.heartbeat().into(),
                        key_values: state
                            .key_values()
                            .map(|(k, v)| (k.to_owned(), v.to_owned()))
                            .collect(),
                    })
                    .collect()
            })
            .await
    }

    /// Stops gossiping (peers will declare this member dead).
    pub async fn shutdown(self) {
        if let Err(e) = self.handle.shutdown().await {
            tracing::debug!(error = %e, "gossip task ended with an error");
        }
    }
}

fn free_udp_port(listen: SocketAddr) -> std::io::Result<SocketAddr> {
    std::net::UdpSocket::bind(listen)?.local_addr()
}

#[cfg(test)]
mod tests;
