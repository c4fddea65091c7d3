//! What operators (and spot-interruption notices) decided about nodes: draining or
//! preempting, with an optional deadline. Persisted (sled tree `node_admin`), because an
//! operator's drain must survive a coordinator restart; the cluster view overlays it on
//! what gossip says, and the scheduler evicts work from such nodes (`scheduler`).

use std::collections::BTreeMap;

use gantry_shared::NodeId;
use serde::{Deserialize, Serialize};

/// Why a node takes no new work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdminMode {
    /// Running work finishes; at the deadline (if any) what is left is stopped and placed
    /// elsewhere.
    Drain,
    /// A spot interruption: running work is stopped now (SIGTERM, a grace bounded by the
    /// deadline, SIGKILL) and placed elsewhere.
    Preempt,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminState {
    pub mode: AdminMode,
    /// Unix ms.
    pub since_ms: u64,
    pub deadline_ms: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("node admin store: {0}")]
    Store(#[from] sled::Error),
    #[error("node admin record is corrupt: {0}")]
    Corrupt(#[from] serde_json::Error),
}

/// The admin states, by node. Cheap to clone.
#[derive(Clone)]
pub struct NodeAdmin {
    tree: sled::Tree,
}

impl NodeAdmin {
    pub(super) fn new(tree: sled::Tree) -> Self {
        Self { tree }
    }

    /// Sets `node`'s state, durably. A preemption is never weakened into a drain.
    pub fn set(&self, node: &NodeId, state: AdminState) -> Result<AdminState, AdminError> {
        let state = match self.get(node)? {
            Some(old) if old.mode == AdminMode::Preempt && state.mode == AdminMode::Drain => old,
            Some(old) if old.mode == state.mode => AdminState {
                // A later notice may only bring the deadline closer.
                deadline_ms: match (old.deadline_ms, state.deadline_ms) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                },
                since_ms: old.since_ms,
                ..state
            },
            _ => state,
        };
        self.tree
            .insert(node.as_str(), serde_json::to_vec(&state)?)?;
        self.tree.flush()?;
        Ok(state)
    }

    /// Back to normal (undrain), durably.
    pub fn clear(&self, node: &NodeId) -> Result<(), AdminError> {
        self.tree.remove(node.as_str())?;
        self.tree.flush()?;
        Ok(())
    }

    pub fn get(&self, node: &NodeId) -> Result<Option<AdminState>, AdminError> {
        Ok(match self.tree.get(node.as_str())? {
            Some(v) => Some(serde_json::from_slice(&v)?),
            None => None,
        })
    }

    pub fn all(&self) -> Result<BTreeMap<NodeId, AdminState>, AdminError> {
        let mut out = BTreeMap::new();
        for kv in self.tree.iter() {
            let (k, v) = kv?;
            if let Ok(id) = NodeId::new(String::from_utf8_lossy(&k).into_owned()) {
                out.insert(id, serde_json::from_slice(&v)?);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preemption_wins_and_deadlines_only_come_closer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = crate::store::Store::open(dir.path()).expect("store");
        let a = store.node_admin().expect("admin");
        let n = NodeId::new("n").expect("id");
        let state = |mode, deadline_ms| AdminState {
            mode,
            since_ms: 1,
            deadline_ms,
        };
        a.set(&n, state(AdminMode::Preempt, Some(100)))
            .expect("set");
        let s = a.set(&n, state(AdminMode::Drain, None)).expect("set");
        assert_eq!(s.mode, AdminMode::Preempt);
        let s = a.set(&n, state(AdminMode::Preempt, Some(50))).expect("set");
        assert_eq!(s.deadline_ms, Some(50));
        let s = a.set(&n, state(AdminMode::Preempt, Some(90))).expect("set");
        assert_eq!(s.deadline_ms, Some(50));
        a.clear(&n).expect("clear");
        assert!(a.all().expect("all").is_empty());
    }
}
