//! What this agent tells the cluster through gossip: its address, labels, state, cpu and
//! memory (total and what its running containers leave free), its GPUs with their
//! health, and the images in its store that short image names can resolve to
//! (`gantry_shared::gossip` defines the keys).
//!
//! A task republishes whenever something changes (a container starts or exits: the daemon
//! pokes it; a GPU's health changes: the inventory's watch fires) and every `refresh`
//! interval in any case (which also picks up images the daemon pulled). Unchanged values
//! cost nothing: chitchat gossips only new versions.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use gantry_membership::{Member, MembershipConfig, MembershipError};
use gantry_shared::gossip::{AgentGossip, GPU_KEY_PREFIX, GpuInfo, LocalImages, NodeResources};
use gantry_shared::protocol::NodeCapacity;
use gantry_shared::{ClusterId, GossipKey, NodeId};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::gpu::inventory::Inventory;
use crate::image::ImageStore;
use crate::runtime::{ContainerState, ContainerStatus, Runtime};

/// How the agent gossips and what it says about itself: the agent's one gossip type,
/// built once by the daemon from its configuration (`[gossip]`, `labels`, `address`) and
/// what the node offers.
#[derive(Debug, Clone)]
pub struct GossipSettings {
    pub membership: MembershipConfig,
    /// Labels published for placement (`spot=true`, `rack=r12`).
    pub labels: BTreeMap<String, String>,
    /// The address other nodes and containers reach this node at (resolved: the
    /// configured one, else the one this host reaches the coordinator from).
    pub addr: IpAddr,
    /// Republish at least this often.
    pub refresh: Duration,
    /// What the node offers to jobs.
    pub capacity: NodeCapacity,
}

/// The running publisher.
pub struct Publisher {
    member: Arc<Member>,
    poke: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl Publisher {
    /// Joins gossip in `cluster` (its id, and the key its datagrams are authenticated
    /// with) as `node` and starts publishing what `inventory`, `runtime` and `images` hold.
    pub async fn start(
        node: &NodeId,
        cluster: (&ClusterId, &GossipKey),
        instance: u64,
        settings: GossipSettings,
        (inventory, runtime, images): (&Inventory, Runtime, ImageStore),
        cancel: CancellationToken,
    ) -> Result<Self, MembershipError> {
        let mut membership = settings.membership.clone();
        if membership.advertise.is_none() && membership.listen.ip().is_unspecified() {
            membership.advertise = Some(SocketAddr::new(settings.addr, membership.listen.port()));
        }
        let refresh = settings.refresh;
        let current = move |gpus: &[GpuInfo], runtime: &Runtime| {
            describe(&settings, gpus, &runtime.list(), local_images(&images))
        };
        let first = current(&inventory.current(), &runtime);
        let member = Arc::new(
            Member::start(
                node.as_str(),
                instance,
                cluster.0.as_str(),
                cluster.1,
                &membership,
                first.to_key_values(),
            )
            .await?,
        );
        tracing::info!(gossip = %member.gossip_addr(), "gossiping");
        let poke = Arc::new(Notify::new());
        let mut gpus_rx = inventory.subscribe();
        let (m, p) = (member.clone(), poke.clone());
        let task = tokio::spawn(async move {
            let mut published = first.gpus.len();
            let mut tick = tokio::time::interval(refresh);
            // A CPU-only node's inventory never changes (its sender is gone).
            let mut gpus_open = true;
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = p.notified() => {}
                    _ = tick.tick() => {}
                    changed = gpus_rx.changed(), if gpus_open => gpus_open = changed.is_ok(),
                }
                let gpus = gpus_rx.borrow().clone();
                let now = current(&gpus, &runtime);
                m.set(now.to_key_values()).await;
                if gpus.len() < published {
                    let stale: Vec<String> = (gpus.len()..published)
                        .map(|i| format!("{GPU_KEY_PREFIX}{i}"))
                        .collect();
                    m.delete(&stale).await;
                }
                published = gpus.len();
            }
        });
        Ok(Self { member, poke, task })
    }

    /// Something changed (a container started or exited): publish now.
    pub fn poke(&self) {
        self.poke.notify_one();
    }

    pub fn gossip_addr(&self) -> SocketAddr {
        self.member.gossip_addr()
    }

    /// Contacts a member learned of outside gossip (the coordinator, from its welcome).
    pub fn contact(&self, addr: SocketAddr) {
        self.member.contact(addr);
    }

    /// Stops publishing and leaves gossip (peers declare this node dead).
    pub async fn shutdown(self) {
        self.task.abort();
        let _ = self.task.await;
        match Arc::try_unwrap(self.member) {
            Ok(member) => member.shutdown().await,
            Err(_) => tracing::debug!("gossip member still shared at shutdown"),
        }
    }
}

/// The images in `store` that short names can resolve to; unlisted (the coordinator then
/// takes the node as possibly holding any) when the store cannot be read.
fn local_images(store: &ImageStore) -> LocalImages {
    match store.names() {
        Ok(names) => LocalImages::from_stored(names),
        Err(e) => {
            tracing::warn!(error = %e, "cannot list local images for gossip");
            LocalImages::Unlisted
        }
    }
}

/// What the node publishes, from its capacity, GPUs, containers and local images. Running
/// containers (and ones still starting) hold their cpu, memory and GPUs.
pub fn describe(
    settings: &GossipSettings,
    gpus: &[GpuInfo],
    containers: &[ContainerStatus],
    images: LocalImages,
) -> AgentGossip {
    let (mut cpu, mut memory) = (0u64, 0u64);
    let mut held = std::collections::BTreeSet::new();
    for c in containers {
        if matches!(c.state, ContainerState::Exited(_)) {
            continue;
        }
        if let Some(r) = &c.resources {
            cpu += r.cpu.0;
            memory += r.memory_bytes;
        }
        held.extend(c.gpus.iter().copied());
    }
    let capacity = settings.capacity;
    AgentGossip {
        addr: settings.addr,
        labels: settings.labels.clone(),
        resources: NodeResources {
            cpu_millis: capacity.cpu_millis,
            free_cpu_millis: capacity.cpu_millis.saturating_sub(cpu),
            memory_bytes: capacity.memory_bytes,
            free_memory_bytes: capacity.memory_bytes.saturating_sub(memory),
        },
        free_gpus: gpus
            .iter()
            .map(|g| g.index)
            .filter(|i| !held.contains(i))
            .collect(),
        gpus: gpus.to_vec(),
        images,
    }
}

/// The local address this host uses to reach `peer` (no packet is sent).
pub fn local_addr_towards(peer: SocketAddr) -> std::io::Result<IpAddr> {
    let bind: SocketAddr = if peer.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = std::net::UdpSocket::bind(bind)?;
    socket.connect(peer)?;
    Ok(socket.local_addr()?.ip())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::simulated::parse_spec;
    use crate::runtime::ExitRecord;
    use gantry_shared::{ContainerId, CpuMillis, Resources};

    fn container(id: &str, cpu: u64, gpus: Vec<u32>, running: bool) -> ContainerStatus {
        ContainerStatus {
            id: ContainerId::new(id).expect("id"),
            image: "x".into(),
            image_digest: String::new(),
            gpus,
            resources: Some(Resources {
                cpu: CpuMillis(cpu),
                memory_bytes: 1 << 30,
                pids: 100,
            }),
            attempt: None,
            state: if running {
                ContainerState::Running { started_at_ms: 1 }
            } else {
                ContainerState::Exited(ExitRecord::shim_lost(None))
            },
        }
    }

    #[test]
    fn running_containers_hold_capacity_and_gpus() {
        let settings = GossipSettings {
            membership: MembershipConfig::default(),
            labels: BTreeMap::new(),
            addr: "10.0.0.5".parse().expect("ip"),
            refresh: Duration::from_secs(1),
            capacity: NodeCapacity {
                cpu_millis: 8000,
                memory_bytes: 8 << 30,
                gpus: 4,
                shared_volumes: false,
            },
        };
        let gpus = parse_spec("4xA100-40GB", "n").expect("spec");
        let g = describe(
            &settings,
            &gpus,
            &[
                container("a", 1500, vec![1, 2], true),
                container("b", 4000, vec![0], false),
            ],
            LocalImages::Unlisted,
        );
        assert_eq!(g.resources.free_cpu_millis, 6500);
        assert_eq!(g.resources.free_memory_bytes, 7 << 30);
        assert_eq!(g.free_gpus, [0, 3]);
        assert_eq!(g.gpus.len(), 4);
    }

    #[test]
    fn finds_the_local_address_towards_a_peer() {
        let ip = local_addr_towards("127.0.0.1:9".parse().expect("addr")).expect("route");
        assert!(ip.is_loopback(), "{ip}");
    }
}
