//! What the coordinator's in-process tests share: a store in a temporary directory and the
//! services over it (jobs, functions, the cluster view with its gossip member on
//! 127.0.0.1), with no nodes.
#![allow(dead_code)] // each test crate uses some of it

use gantry_coordinator::functions::{FunctionService, Outbound};
use gantry_coordinator::jobs::service::JobService;
use gantry_coordinator::nodes::Nodes;
use gantry_coordinator::nodes::liveness::{Cluster, ClusterConfig};
use gantry_coordinator::store::Store;
use gantry_coordinator::store::joins::JoinTokens;
use gantry_coordinator::store::node_admin::NodeAdmin;
use gantry_shared::{ClusterId, GossipKey};
use tokio_util::sync::CancellationToken;

pub struct Services {
    pub store: Store,
    pub join: JoinTokens,
    pub nodes: Nodes,
    pub node_admin: NodeAdmin,
    pub cluster: Cluster,
    pub jobs: JobService,
    pub functions: FunctionService,
    /// Where the function service's messages to nodes go (no nodes here).
    pub outbound: tokio::sync::mpsc::UnboundedReceiver<Outbound>,
}

/// The services over a store in `dir`.
pub async fn services(dir: &std::path::Path) -> Services {
    let store = Store::open(dir).expect("store");
    let join = store.join_tokens("ab".repeat(32)).expect("join tokens");
    let nodes = Nodes::default();
    let node_admin = store.node_admin().expect("admin");
    let cluster = Cluster::start(
        ClusterConfig {
            membership: gantry_membership::MembershipConfig {
                listen: "127.0.0.1:0".parse().expect("addr"),
                ..Default::default()
            },
            ..ClusterConfig::default()
        },
        (
            &ClusterId::new("test").expect("id"),
            &GossipKey::from_bytes([1; 32]),
        ),
        ("127.0.0.1:7443", "127.0.0.1:7080"),
        nodes.clone(),
        join.clone(),
        node_admin.clone(),
        CancellationToken::new(),
    )
    .await
    .expect("cluster view");
    let jobs = JobService::new(
        store.clone(),
        cluster.clone(),
        nodes.clone(),
        CancellationToken::new(),
    );
    let (functions, outbound) = FunctionService::open(
        store.functions().expect("function store"),
        nodes.changed.clone(),
        CancellationToken::new(),
    )
    .expect("function service");
    Services {
        store,
        join,
        nodes,
        node_admin,
        cluster,
        jobs,
        functions,
        outbound,
    }
}
