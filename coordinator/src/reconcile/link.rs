//! The edge between the reconciler and the agents: sending one command to a node and
//! reading its reply. [`QuicLink`] is the product's, over the nodes' control sessions;
//! [`ChannelLink`] hands commands to an in-process twin (the simulation's fake agents).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gantry_shared::NodeId;
use gantry_shared::protocol::{Command, CommandReply};
use tokio::sync::{mpsc, oneshot};

use crate::nodes::Nodes;

/// How long a command may take to be answered.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// Commands to agents.
pub trait NodeLink: Clone + Send + Sync + 'static {
    /// The node's current session, if it is connected. Starts and fences are sent once per
    /// session: a node that reconnects gets them again.
    fn session(&self, node: &NodeId) -> Option<usize>;

    /// Sends one command to `node` and reads its reply.
    fn exchange(
        &self,
        node: &NodeId,
        command: Command,
    ) -> impl Future<Output = Result<CommandReply, String>> + Send;
}

/// Commands over each node's QUIC control session, one stream per command.
#[derive(Clone)]
pub struct QuicLink {
    pub nodes: Nodes,
}

impl NodeLink for QuicLink {
    fn session(&self, node: &NodeId) -> Option<usize> {
        self.nodes.get(node).map(|s| s.conn.stable_id())
    }

    async fn exchange(&self, node: &NodeId, command: Command) -> Result<CommandReply, String> {
        let session = self
            .nodes
            .get(node)
            .ok_or_else(|| format!("node {node} is not connected"))?;
        let exchange = crate::control::command(&session.conn, &command);
        Ok(tokio::time::timeout(COMMAND_TIMEOUT, exchange)
            .await
            .map_err(|_| format!("no reply within {COMMAND_TIMEOUT:?}"))??
            .0)
    }
}

/// A command delivered to an in-process agent, with where its reply goes.
pub struct Delivered {
    pub node: NodeId,
    pub command: Command,
    pub reply: oneshot::Sender<CommandReply>,
}

/// Commands handed to in-process agents over a channel: for the simulation. A node is
/// connected while it has a session number; `disconnect` takes it away, as a lost QUIC
/// session would.
#[derive(Clone)]
pub struct ChannelLink {
    sessions: Arc<Mutex<HashMap<NodeId, usize>>>,
    commands: mpsc::UnboundedSender<Delivered>,
}

impl ChannelLink {
    /// A link and the receiving end its commands arrive on. Unbounded: the simulation's
    /// driver drains it every step, and a bound would only stall the reconciler's tasks.
    pub fn new() -> (Self, mpsc::UnboundedReceiver<Delivered>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let link = Self {
            sessions: Arc::default(),
            commands: tx,
        };
        (link, rx)
    }

    /// `node` opened session `session`.
    pub fn connect(&self, node: &NodeId, session: usize) {
        self.lock().insert(node.clone(), session);
    }

    pub fn disconnect(&self, node: &NodeId) {
        self.lock().remove(node);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<NodeId, usize>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl NodeLink for ChannelLink {
    fn session(&self, node: &NodeId) -> Option<usize> {
        self.lock().get(node).copied()
    }

    async fn exchange(&self, node: &NodeId, command: Command) -> Result<CommandReply, String> {
        if self.session(node).is_none() {
            return Err(format!("node {node} is not connected"));
        }
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Delivered {
                node: node.clone(),
                command,
                reply: tx,
            })
            .map_err(|_| "the simulation stopped".to_owned())?;
        match tokio::time::timeout(COMMAND_TIMEOUT, rx).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(_)) => Err(format!("node {node} dropped the command")),
            Err(_) => Err(format!("no reply within {COMMAND_TIMEOUT:?}")),
        }
    }
}
