//! The node service: what the API does with nodes. The view with the coordinator's
//! reservations, and what operators do to nodes (drain, undrain, preempt, clear a GPU),
//! each answered once the cluster view has taken the change in (it waits on the view's
//! recomputations, never polls).

use std::time::Duration;

use gantry_shared::api::Node;
use gantry_shared::protocol::{Command, CommandReply};
use gantry_shared::{NodeId, now_ms};

use super::Nodes;
use super::liveness::{Cluster, Liveness, NodeStatus};
use crate::reconcile::{self, NodeLink, QuicLink};
pub use crate::store::node_admin::AdminMode;
use crate::store::node_admin::{AdminError, AdminState, NodeAdmin};
use crate::store::{Store, StoreError};

/// How long an operator's change may take to show in the view before the answer goes out
/// anyway (the view is recomputed every 100 ms; gossip carries a GPU's health in a few
/// rounds).
const VIEW_WAIT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum NodeServiceError {
    #[error("node `{id}` not found (it has not joined this cluster)")]
    NotFound { id: String },
    #[error("GPU {index} on node {node} not found ({message})")]
    NoSuchGpu {
        node: NodeId,
        index: u32,
        message: String,
    },
    #[error("{message}")]
    Unavailable { message: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Admin(#[from] AdminError),
}

#[derive(Clone)]
pub struct NodeService {
    store: Store,
    cluster: Cluster,
    nodes: Nodes,
    admin: NodeAdmin,
}

impl NodeService {
    pub fn new(store: Store, cluster: Cluster, nodes: Nodes, admin: NodeAdmin) -> Self {
        Self {
            store,
            cluster,
            nodes,
            admin,
        }
    }

    /// Registers the coordinator's gossip counters (datagrams dropped, bytes) for
    /// `/metrics`.
    pub fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register_collector(Box::new(super::metrics::GossipMetrics(
            self.cluster.gossip_traffic(),
        )));
    }

    /// Every joined node, with what the coordinator has reserved on each.
    pub fn list(&self) -> Result<Vec<Node>, NodeServiceError> {
        let jobs = self.store.active_jobs()?;
        let ledger = reconcile::ledger(&jobs, &self.store.all_fences()?, now_ms());
        Ok(self
            .cluster
            .statuses()
            .into_iter()
            .map(|s| {
                let reserved = ledger.get(&s.id);
                node_view(s, reserved)
            })
            .collect())
    }

    pub fn get(&self, id: &str) -> Result<Node, NodeServiceError> {
        self.list()?
            .into_iter()
            .find(|n| n.id.as_str() == id)
            .ok_or_else(|| NodeServiceError::NotFound { id: id.to_owned() })
    }

    /// Drains or preempts a node (`deadline`: when its work must be gone, from now).
    pub async fn set_admin(
        &self,
        id: &str,
        mode: AdminMode,
        deadline: Option<Duration>,
    ) -> Result<Node, NodeServiceError> {
        let node = self.known(id)?;
        let now = now_ms();
        self.admin.set(
            &node,
            AdminState {
                mode,
                since_ms: now,
                deadline_ms: deadline.map(|d| now + d.as_millis() as u64),
            },
        )?;
        tracing::warn!(%node, ?mode, ?deadline, "node taken out of service");
        self.after_change(&node).await
    }

    /// Takes a node back into service.
    pub async fn undrain(&self, id: &str) -> Result<Node, NodeServiceError> {
        let node = self.known(id)?;
        self.admin.clear(&node)?;
        self.after_change(&node).await
    }

    /// Declares GPU `index` healthy again: the node forgets its mark and gossips it.
    pub async fn clear_gpu(&self, id: &str, index: u32) -> Result<Node, NodeServiceError> {
        let node = self.known(id)?;
        let link = QuicLink {
            nodes: self.nodes.clone(),
        };
        if link.session(&node).is_none() {
            return Err(NodeServiceError::Unavailable {
                message: format!("node {node} is not connected; clear its GPU once it is back"),
            });
        }
        let reply = link
            .exchange(&node, Command::ClearGpu { index })
            .await
            .map_err(|e| NodeServiceError::Unavailable {
                message: format!("cannot reach node {node}: {e}"),
            })?;
        if let CommandReply::Refused(r) = reply {
            return Err(NodeServiceError::NoSuchGpu {
                node,
                index,
                message: r.message,
            });
        }
        let healthy = |statuses: &[NodeStatus]| {
            statuses.iter().any(|s| {
                s.id == node
                    && s.gossip
                        .as_ref()
                        .and_then(|g| g.gpus.iter().find(|g| g.index == index))
                        .is_some_and(|g| !g.health.is_unhealthy())
            })
        };
        self.cluster.wait_until(healthy, VIEW_WAIT).await;
        self.after_change(&node).await
    }

    fn known(&self, id: &str) -> Result<NodeId, NodeServiceError> {
        NodeId::new(id)
            .ok()
            .filter(|n| self.cluster.statuses().iter().any(|s| &s.id == n))
            .ok_or_else(|| NodeServiceError::NotFound { id: id.to_owned() })
    }

    /// The node once the view has taken its admin state in; the reconciler looks again.
    async fn after_change(&self, node: &NodeId) -> Result<Node, NodeServiceError> {
        let wanted = self.admin.get(node).ok().flatten();
        let taken_in =
            |statuses: &[NodeStatus]| statuses.iter().any(|s| &s.id == node && s.admin == wanted);
        self.cluster.wait_until(taken_in, VIEW_WAIT).await;
        self.nodes.changed.notify_one();
        self.get(node.as_str())
    }
}

/// A node as the API shows it.
fn node_view(s: NodeStatus, reserved: Option<&reconcile::Held>) -> Node {
    let gossip = s.gossip.as_ref();
    Node {
        state: s.state().into(),
        reason: (!s.reason.is_empty()).then(|| s.reason.to_owned()),
        state_since_ms: s
            .admin
            .as_ref()
            .filter(|_| s.liveness == Liveness::Up)
            .map_or(s.since_ms, |a| a.since_ms),
        deadline_ms: s.admin.as_ref().and_then(|a| a.deadline_ms),
        last_seen_ms: s.last_seen_ms,
        connected: s.connected,
        address: gossip.map(|g| g.addr.to_string()),
        labels: gossip.map(|g| g.labels.clone()).unwrap_or_default(),
        cpu_millis: s.capacity.map_or(0, |c| c.cpu_millis),
        memory_bytes: s.capacity.map_or(0, |c| c.memory_bytes),
        free_cpu_millis: gossip.map(|g| g.resources.free_cpu_millis),
        free_memory_bytes: gossip.map(|g| g.resources.free_memory_bytes),
        reserved_cpu_millis: reserved.map_or(0, |v| v.cpu_millis),
        reserved_memory_bytes: reserved.map_or(0, |v| v.memory_bytes),
        reserved_gpus: reserved
            .map(|v| v.gpus.iter().copied().collect())
            .unwrap_or_default(),
        gpus: gossip.map(|g| g.gpus.clone()).unwrap_or_default(),
        jobs: reserved
            .map(|v| v.jobs.iter().cloned().collect())
            .unwrap_or_default(),
        id: s.id,
    }
}
