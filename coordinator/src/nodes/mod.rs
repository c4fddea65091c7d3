//! Nodes. This module: the nodes with an open control session (who is connected, what
//! they offer, and the connection to send them commands on; rebuilt from sessions, never
//! persisted). Beside it: `liveness` (the view of every node as up, suspect or down, from
//! gossip and sessions), `service` (what the API does with nodes) and `metrics` (gossip's
//! counters for `/metrics`). Their durable records (drain/preempt state, join tokens,
//! joined nodes) are in `store/`.

pub mod liveness;
mod metrics;
pub mod service;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use gantry_shared::NodeId;
use gantry_shared::protocol::NodeCapacity;
use tokio::sync::Notify;

#[derive(Clone)]
pub struct Session {
    pub conn: quinn::Connection,
    pub capacity: NodeCapacity,
    /// The agent run that opened it (its start time, unix ms).
    pub instance: u64,
    /// Where the agent gossips.
    pub gossip: Option<std::net::SocketAddr>,
}

/// Connected nodes. Cheap to clone.
#[derive(Clone, Default)]
pub struct Nodes {
    inner: Arc<Mutex<HashMap<NodeId, Session>>>,
    /// Nodes whose agent said it is restarting, until when (its next session ends it).
    restarting: Arc<Mutex<HashMap<NodeId, std::time::Instant>>>,
    /// Fires when a node connects, a job is submitted or events change jobs: the
    /// scheduler should look again.
    pub changed: Arc<Notify>,
}

impl Nodes {
    /// Registers `node`'s session, replacing (and closing) an older one.
    pub fn connect(&self, node: NodeId, session: Session) {
        self.restarting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&node);
        let old = self.lock().insert(node, session);
        if let Some(old) = old {
            old.conn.close(2u32.into(), b"replaced by a newer session");
        }
        self.changed.notify_one();
    }

    /// Forgets `node` if `conn` is still its session.
    pub fn disconnect(&self, node: &NodeId, conn: &quinn::Connection) {
        let mut map = self.lock();
        if map
            .get(node)
            .is_some_and(|s| s.conn.stable_id() == conn.stable_id())
        {
            map.remove(node);
        }
    }

    /// The agent of `node` is restarting and will be back within `hold`.
    pub fn hold_for_restart(&self, node: &NodeId, hold: std::time::Duration) {
        self.restarting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(node.clone(), std::time::Instant::now() + hold);
    }

    /// Whether `node`'s agent said it is restarting and that time has not run out.
    pub fn is_restarting(&self, node: &NodeId) -> bool {
        self.restarting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(node)
            .is_some_and(|until| std::time::Instant::now() < *until)
    }

    pub fn get(&self, node: &NodeId) -> Option<Session> {
        self.lock().get(node).cloned()
    }

    /// Every open session, by node.
    pub fn sessions(&self) -> Vec<(NodeId, Session)> {
        let mut v: Vec<_> = self
            .lock()
            .iter()
            .map(|(k, s)| (k.clone(), s.clone()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<NodeId, Session>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}
