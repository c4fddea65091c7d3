//! The coordinator's cluster view over the in-process gossip transport: a node's gossip
//! reaches the view with no UDP at all, and a node that stops gossiping goes down.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use gantry_coordinator::nodes::Nodes;
use gantry_coordinator::nodes::liveness::{Cluster, ClusterConfig, Liveness, NodeStatus};
use gantry_coordinator::store::Store;
use gantry_membership::{GossipTransport, InProcessNetwork, Member, MembershipConfig};
use gantry_shared::gossip::{AgentGossip, GpuInfo, NodeResources};
use gantry_shared::{ClusterId, GossipKey, NodeId};
use tokio_util::sync::CancellationToken;

fn gossip_cfg(port: u16, seeds: Vec<String>) -> MembershipConfig {
    MembershipConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], port)),
        seeds,
        gossip_interval: Duration::from_millis(50),
        ..MembershipConfig::default()
    }
}

fn agent_gossip() -> AgentGossip {
    AgentGossip {
        addr: "10.0.0.7".parse().expect("ip"),
        labels: BTreeMap::new(),
        resources: NodeResources::default(),
        free_gpus: vec![0, 1],
        gpus: (0..2)
            .map(|index| GpuInfo::simulated("n1", index, "H100-80GB", 80 << 30))
            .collect(),
        images: Default::default(),
    }
}

fn status_of(cluster: &Cluster, node: &NodeId) -> Option<NodeStatus> {
    cluster.statuses().into_iter().find(|s| &s.id == node)
}

#[tokio::test]
async fn the_view_reads_gossip_over_the_in_process_transport() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("store");
    let joins = store.join_tokens("ab".repeat(32)).expect("joins");
    let node = NodeId::new("n1").expect("id");
    let token = joins.create(Duration::from_secs(60)).expect("token");
    joins.redeem(&token, &node).expect("joined");

    let transport = GossipTransport::InProcess(InProcessNetwork::default());
    let key = GossipKey::from_bytes([1; 32]);
    let cancel = CancellationToken::new();
    let cluster = Cluster::start(
        ClusterConfig {
            membership: gossip_cfg(7100, vec![]),
            startup_grace: Duration::ZERO,
            transport: transport.clone(),
            ..ClusterConfig::default()
        },
        (&ClusterId::new("c1").expect("cluster id"), &key),
        ("127.0.0.1:7443", "127.0.0.1:7080"),
        Nodes::default(),
        joins,
        store.node_admin().expect("admin"),
        cancel.clone(),
    )
    .await
    .expect("cluster view");
    let agent = Member::start_on(
        &transport,
        "n1",
        1,
        "c1",
        &key,
        &gossip_cfg(7101, vec![cluster.gossip_addr().to_string()]),
        agent_gossip().to_key_values(),
    )
    .await
    .expect("agent member");

    // Gossip alone: once its heartbeats show it live, the view knows the node's GPUs;
    // without a control session it is suspect, never placeable.
    let described = |s: &[NodeStatus]| {
        s.iter().any(|s| {
            s.id == node
                && s.liveness == Liveness::Suspect
                && s.gossip.as_ref().is_some_and(|g| g.gpus.len() == 2)
        })
    };
    assert!(
        cluster.wait_until(described, Duration::from_secs(10)).await,
        "{:?}",
        status_of(&cluster, &node)
    );
    let s = status_of(&cluster, &node).expect("status");
    assert_eq!(
        s.reason, "gossiping, but not connected since the coordinator started",
        "{s:?}"
    );
    assert!(!s.placeable());

    // It stops gossiping and never had a session: down.
    agent.shutdown().await;
    let down = |s: &[NodeStatus]| {
        s.iter()
            .any(|s| s.id == node && s.liveness == Liveness::Down)
    };
    assert!(
        cluster.wait_until(down, Duration::from_secs(15)).await,
        "{:?}",
        status_of(&cluster, &node)
    );
    cancel.cancel();
}
