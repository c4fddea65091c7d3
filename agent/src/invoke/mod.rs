//! The runtime API of function containers: HTTP/1.1 on a unix socket the agent serves to
//! each function container, bind-mounted at `/run/gantry` (`GANTRY_RUNTIME_API`). The
//! container says `ready`, takes inputs with `GET /v1/inputs/next`, answers each with a
//! response or an error, and long-polls `GET /v1/events` for cancellations and drain.
//!
//! This module owns the servers (one per container, [`Invoke`]), their decisions
//! (`state`, pure), their routes (`api`), their sockets and tasks (`server`), and the
//! answers on their way to the coordinator ([`Outputs`]). It does not know about the
//! control session or the runtime: the daemon hands each server a [`Container`] for
//! events and stops, and sends the [`Outputs`].
//!
//! Routes (errors answer with a plain-text message):
//! - `POST /v1/ready` → 204. Before it, the startup timeout runs from the container's start.
//! - `POST /v1/init/error` `{"type","message","traceback"}` → 202; the container is stopped.
//! - `GET /v1/inputs/next` → 200, the input's bytes, with `Gantry-Input-Id`,
//!   `Gantry-Call-Id`, `Gantry-Attempt`, `Gantry-Deadline-Ms` (unix ms) and `Content-Type`;
//!   429 beyond `max_inputs` outstanding (waiting or held); 410 once draining.
//! - `POST /v1/inputs/{id}/response` (body and `Content-Type`) → 202;
//!   `POST /v1/inputs/{id}/error` `{"type","message","traceback"}` → 202; 404 for an input
//!   the container does not hold, 413 over [`Payload::MAX_BYTES`], 400 for a bad body.
//! - `POST /v1/inputs/{id}/stream` (body and `Content-Type`) → 202: one chunk a call's
//!   input streams while it runs, numbered from 0 per input and queued for the coordinator
//!   before the input's answer; 404 for an input not held, 413 over 1 MiB, 429 once the
//!   input streamed 10,000 chunks or 64 MiB, 400 for a bad content type or a web request's
//!   input.
//! - `GET /v1/events` → 200 with `[{"type":"cancel","input":ID}, {"type":"drain"}]`, or 204
//!   after 30 s without any.
//!
//! [`Payload::MAX_BYTES`]: gantry_shared::calls::Payload::MAX_BYTES

mod api;
mod http_input;
mod outputs;
mod server;
mod state;
mod web;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use gantry_shared::protocol::FunctionRuntime;
use gantry_shared::{AttemptRef, ContainerId};
use tokio_util::sync::CancellationToken;

pub use outputs::{Outputs, Report};
pub use server::{Container, FunctionServer, WebConnection, WebError, WebRequest};
pub use state::{
    Action, ChunkReport, Inbox, InboxError, Next, OutputReport, RuntimeEvent, StopReason,
};

/// Where the runtime API's directory is mounted in a function container.
pub const CONTAINER_DIR: &str = "/run/gantry";
/// The socket's name in that directory.
pub const SOCKET_NAME: &str = "runtime.sock";
/// The variable naming the socket's path in the container.
pub const ENV_RUNTIME_API: &str = "GANTRY_RUNTIME_API";
/// The variable giving the container's `max_inputs`.
pub const ENV_MAX_INPUTS: &str = "GANTRY_MAX_INPUTS";

/// The variables a function container gets.
pub fn container_env(runtime: &FunctionRuntime) -> Vec<(String, String)> {
    vec![
        (
            ENV_RUNTIME_API.to_owned(),
            format!("{CONTAINER_DIR}/{SOCKET_NAME}"),
        ),
        (ENV_MAX_INPUTS.to_owned(), runtime.max_inputs.to_string()),
    ]
}

#[derive(Debug, thiserror::Error)]
pub enum InvokeError {
    #[error("cannot prepare the runtime API directory {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "cannot bind the runtime API socket {path}: {source} (a unix socket path is at most \
         107 bytes; a shorter state directory helps if it is too long)"
    )]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("container {id} has a runtime API server already")]
    Exists { id: ContainerId },
}

/// Settings of the runtime API servers.
#[derive(Debug, Clone)]
pub struct InvokeConfig {
    /// Holds one directory per function container (`<root>/<container id>/runtime.sock`).
    pub root: PathBuf,
    /// How long `GET /v1/events` waits for an event before answering 204.
    pub events_poll: Duration,
    /// Answers kept for the coordinator at most (a container answering beyond waits).
    pub outputs_capacity: usize,
}

impl InvokeConfig {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            events_poll: Duration::from_secs(30),
            outputs_capacity: outputs::DEFAULT_CAPACITY,
        }
    }
}

/// The runtime API servers of this node's function containers. Clones share them.
#[derive(Clone)]
pub struct Invoke {
    inner: Arc<Inner>,
}

struct Inner {
    config: InvokeConfig,
    servers: Mutex<HashMap<ContainerId, Arc<FunctionServer>>>,
    outputs: Outputs,
    /// Parent of every server's token: the agent's shutdown ends them all.
    cancel: CancellationToken,
}

impl Invoke {
    pub fn new(config: InvokeConfig, cancel: CancellationToken) -> Self {
        let outputs = Outputs::new(config.outputs_capacity);
        Self {
            inner: Arc::new(Inner {
                config,
                servers: Mutex::default(),
                outputs,
                cancel,
            }),
        }
    }

    fn servers(&self) -> std::sync::MutexGuard<'_, HashMap<ContainerId, Arc<FunctionServer>>> {
        self.inner
            .servers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The answers waiting for the coordinator.
    pub fn outputs(&self) -> &Outputs {
        &self.inner.outputs
    }

    /// The host directory mounted at [`CONTAINER_DIR`] in container `id`.
    pub fn dir(&self, id: &ContainerId) -> PathBuf {
        self.inner.config.root.join(id.as_str())
    }

    /// Binds container `id`'s socket and serves it (before the container starts, so the
    /// socket is there when it looks).
    pub fn open(
        &self,
        id: &ContainerId,
        attempt: AttemptRef,
        runtime: &FunctionRuntime,
        container: Arc<dyn Container>,
    ) -> Result<Arc<FunctionServer>, InvokeError> {
        let mut servers = self.servers();
        if servers.contains_key(id) {
            return Err(InvokeError::Exists { id: id.clone() });
        }
        let server = Arc::new(FunctionServer::bind(
            &self.dir(id),
            id.clone(),
            attempt,
            runtime,
            (
                container,
                self.inner.outputs.clone(),
                self.inner.config.clone(),
            ),
            self.inner.cancel.child_token(),
        )?);
        servers.insert(id.clone(), server.clone());
        Ok(server)
    }

    /// Container `id`'s server, while it has one.
    pub fn get(&self, id: &ContainerId) -> Option<Arc<FunctionServer>> {
        self.servers().get(id).cloned()
    }

    /// Every server open now.
    pub fn all(&self) -> Vec<Arc<FunctionServer>> {
        self.servers().values().cloned().collect()
    }

    /// Container `id` ended (or never started): its server stops, its directory goes.
    /// Inputs it still held are dropped: the coordinator leases them again.
    pub async fn close(&self, id: &ContainerId) {
        let server = self.servers().remove(id);
        match server {
            Some(server) => server.shutdown(true).await,
            None => server::remove_dir(&self.dir(id)),
        }
    }

    /// Removes the directories of containers that have no server and for which `keep` is
    /// false: what an agent that died left behind.
    pub fn sweep(&self, keep: impl Fn(&ContainerId) -> bool) {
        let Ok(entries) = std::fs::read_dir(&self.inner.config.root) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(id) = name.to_str().and_then(|n| ContainerId::new(n).ok()) else {
                continue;
            };
            if self.get(&id).is_none() && !keep(&id) {
                server::remove_dir(&entry.path());
            }
        }
    }

    /// The agent stops: every server stops serving (their directories stay, with the
    /// containers that keep running).
    pub async fn shutdown(&self) {
        self.inner.cancel.cancel();
        let servers: Vec<_> = self.servers().drain().map(|(_, s)| s).collect();
        for server in servers {
            server.shutdown(false).await;
        }
    }

    /// The root directory of the servers.
    pub fn root(&self) -> &Path {
        &self.inner.config.root
    }
}
