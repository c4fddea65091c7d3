//! One function container's runtime API server: the socket it listens on, the tasks that
//! accept and serve connections and fire deadlines (all owned by one tracker, ended by one
//! token), and the edge to the rest of the agent ([`Container`]: events and stops).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use gantry_shared::calls::LeasedInput;
use gantry_shared::protocol::{Event, FunctionRuntime, Readiness, WebRuntime};
use gantry_shared::{AttemptRef, ContainerId, InputId, now_ms};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::http_input::PendingRequests;
use super::outputs::Outputs;
use super::state::{Action, Inbox, InboxError, StopReason};
use super::web::{self, WebTarget};
use super::{InvokeConfig, InvokeError, SOCKET_NAME};

/// Connections beyond the container's slots (events, answers, ready).
const SPARE_CONNECTIONS: usize = 16;
/// How long a connection gets to finish its request once the server stops.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// Longest sleep of the deadline timer with nothing to wait for.
const IDLE_WAKE: Duration = Duration::from_secs(3600);

/// The rest of the agent, as a function container's server sees it.
pub trait Container: Send + Sync + 'static {
    /// Records `Ready` or `InitFailed` (in the event outbox, after the container's
    /// `Started`).
    fn event(&self, event: Event);
    /// Stops the container now; its end closes the server.
    fn stop(&self, reason: StopReason);
}

/// What the server's tasks and handlers share.
pub(super) struct Shared {
    pub(super) id: ContainerId,
    inbox: Mutex<Inbox>,
    /// Wakes waiting `next` and `events` calls.
    pub(super) changed: Notify,
    /// Wakes the deadline timer to look again.
    timer: Notify,
    /// Ends the server: its tasks and its waiting calls.
    pub(super) cancel: CancellationToken,
    pub(super) config: InvokeConfig,
    container: Arc<dyn Container>,
    pub(super) outputs: Outputs,
    /// A web endpoint's server, once the container runs (`via = "port"`).
    web: std::sync::OnceLock<WebTarget>,
    /// A web endpoint whose requests become inputs (`via = "runtime_api"`).
    web_inputs: bool,
    /// Web requests waiting for their inputs' answers.
    pending: Mutex<PendingRequests>,
    /// Numbers the inputs made of web requests.
    pub(super) web_sequence: AtomicU64,
    /// The deadline a web request's input gets, from its arrival.
    pub(super) timeout_ms: u64,
}

impl Shared {
    pub(super) fn inbox(&self) -> MutexGuard<'_, Inbox> {
        self.inbox.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn pending(&self) -> MutexGuard<'_, PendingRequests> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The state changed outside a decision: wake the waiters and the timer.
    pub(super) fn poke(&self) {
        self.changed.notify_waiters();
        self.timer.notify_one();
    }

    /// Carries out what the inbox decided, in order.
    pub(super) async fn apply(&self, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::Event(event) => self.container.event(event),
                Action::Output(report) => self.outputs.push(report).await,
                Action::WebAnswer { input, result } => self.pending().reply(&input, result),
                Action::Stop(reason) => {
                    tracing::warn!(container = %self.id, %reason, "stopping the function container");
                    self.container.stop(reason);
                }
            }
        }
        self.poke();
    }
}

/// A running runtime API server. Dropping it does not stop it: call [`shutdown`].
///
/// [`shutdown`]: FunctionServer::shutdown
pub struct FunctionServer {
    shared: Arc<Shared>,
    tracker: TaskTracker,
    dir: PathBuf,
}

impl FunctionServer {
    /// Creates `dir`, binds `dir/runtime.sock` (replacing a stale one) and serves it until
    /// [`shutdown`](Self::shutdown) or `cancel`.
    pub(super) fn bind(
        dir: &Path,
        id: ContainerId,
        attempt: AttemptRef,
        runtime: &FunctionRuntime,
        parts: (Arc<dyn Container>, Outputs, InvokeConfig),
        cancel: CancellationToken,
    ) -> Result<Self, InvokeError> {
        let (container, outputs, config) = parts;
        let dir_err = |source| InvokeError::Dir {
            path: dir.to_owned(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(dir_err)?;
        // The container's user may not be root: it must reach the socket.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).map_err(dir_err)?;
        let path = dir.join(SOCKET_NAME);
        let bind_err = |source| InvokeError::Bind {
            path: path.clone(),
            source,
        };
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(bind_err(e)),
        }
        let listener = UnixListener::bind(&path).map_err(bind_err)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666))
            .map_err(bind_err)?;
        let inbox = Inbox::new(attempt, runtime);
        let connections = inbox.max_inputs() as usize + SPARE_CONNECTIONS;
        let shared = Arc::new(Shared {
            id,
            inbox: Mutex::new(inbox),
            changed: Notify::new(),
            timer: Notify::new(),
            cancel,
            config,
            container,
            outputs,
            web: std::sync::OnceLock::new(),
            web_inputs: matches!(runtime.web, Some(WebRuntime::RuntimeApi)),
            pending: Mutex::default(),
            web_sequence: AtomicU64::new(0),
            timeout_ms: runtime.timeout_ms,
        });
        let tracker = TaskTracker::new();
        tracker.spawn(accept(
            listener,
            shared.clone(),
            tracker.clone(),
            Arc::new(Semaphore::new(connections)),
        ));
        tracker.spawn(deadlines(shared.clone()));
        Ok(Self {
            shared,
            tracker,
            dir: dir.to_owned(),
        })
    }

    pub fn id(&self) -> &ContainerId {
        &self.shared.id
    }

    /// The socket's path on the host.
    pub fn socket(&self) -> PathBuf {
        self.dir.join(SOCKET_NAME)
    }

    /// The container runs and its `Started` is recorded: the startup timeout starts, and a
    /// `ready` (or setup failure) it reported already is recorded now.
    pub async fn started(&self) {
        let actions = self.shared.inbox().started(now_ms());
        self.shared.apply(actions).await;
    }

    /// A web endpoint's container with an HTTP server on `port` runs as process `pid` (one
    /// of its processes): its namespace's loopback goes up and its server is probed until
    /// `readiness` passes, which makes it ready (the startup timeout runs meanwhile). A
    /// namespace that cannot be entered fails its setup.
    pub async fn serve_web(&self, pid: i32, port: u16, readiness: &Readiness) {
        let target = match WebTarget::of_process(pid, port).await {
            Ok(t) => t,
            Err(e) => {
                let message = format!("cannot reach the container's network namespace: {e}");
                let failed = self.shared.inbox().init_error(message);
                if let Ok(actions) = failed {
                    self.shared.apply(actions).await;
                }
                return;
            }
        };
        let _ = self.shared.web.set(target.clone());
        let (shared, readiness) = (self.shared.clone(), readiness.clone());
        self.tracker.spawn(async move {
            if web::probe(&target, &readiness, &shared.cancel).await {
                let actions = shared.inbox().ready(now_ms());
                if let Ok(actions) = actions {
                    shared.apply(actions).await;
                }
            }
        });
    }

    /// Where a stream from the ingress goes, counted as a request in flight until the
    /// returned guard drops: refused while the container is not ready, draining or
    /// stopping.
    pub async fn web_connect(&self) -> Result<(WebConnection, WebRequest), WebError> {
        let target = match self.shared.web_inputs {
            true => None,
            false => Some(self.shared.web.get().cloned().ok_or(WebError::NotReady)?),
        };
        self.shared.inbox().web_begin().map_err(WebError::Refused)?;
        let guard = WebRequest {
            shared: self.shared.clone(),
        };
        let connection = match target {
            Some(target) => WebTo::Server(target.connect().await.map_err(WebError::Connect)?),
            None => WebTo::Inputs(self.shared.clone()),
        };
        Ok((WebConnection(connection), guard))
    }

    /// Queues `input` for the container's next `GET /v1/inputs/next`.
    pub fn deliver(&self, inputs: Vec<LeasedInput>) -> Result<(), InboxError> {
        let result = {
            let mut inbox = self.shared.inbox();
            inputs.into_iter().try_for_each(|i| inbox.deliver(i))
        };
        self.shared.poke();
        result
    }

    /// The input's call was cancelled: a `cancel` event, and a stop if the container still
    /// holds the input after `grace`.
    pub fn cancel_input(&self, input: &InputId, grace: Duration) {
        self.shared
            .inbox()
            .cancel(input, grace.as_millis() as u64, now_ms());
        self.shared.poke();
    }

    /// Scale-down: `410 Gone` for `next`, a `drain` event, and a stop if the container
    /// still runs after `grace`.
    pub fn drain(&self, grace: Duration) {
        let actions = self
            .shared
            .inbox()
            .drain(grace.as_millis() as u64, now_ms());
        self.answer_web(actions);
    }

    /// Its node is being preempted: a `preempt` event with `deadline_ms` (unix ms), then a
    /// drain that stops the container at the deadline if it still runs.
    pub fn preempt(&self, deadline_ms: u64) {
        let actions = self.shared.inbox().preempt(deadline_ms, now_ms());
        self.answer_web(actions);
    }

    /// Carries out a drain's decisions: answers to web requests the container never took.
    fn answer_web(&self, actions: Vec<Action>) {
        for action in actions {
            if let Action::WebAnswer { input, result } = action {
                self.shared.pending().reply(&input, result);
            }
        }
        self.shared.poke();
    }

    /// Whether the container takes inputs (not draining, no stop decided).
    pub fn accepting(&self) -> bool {
        let inbox = self.shared.inbox();
        !inbox.draining() && !inbox.stopping()
    }

    /// Stops serving: waiting calls end, connections close, every task has ended when
    /// this returns. With `remove`, the directory (and the socket) go too.
    pub async fn shutdown(&self, remove: bool) {
        self.shared.cancel.cancel();
        // Web requests waiting for an answer get their end (`503`).
        self.shared.pending().clear();
        self.tracker.close();
        self.tracker.wait().await;
        if remove {
            remove_dir(&self.dir);
        }
    }
}

/// Where a stream from the ingress goes.
pub struct WebConnection(WebTo);

enum WebTo {
    /// A connection to the container's HTTP server (`via = "port"`).
    Server(tokio::net::TcpStream),
    /// The agent serves the stream, each request an input (`via = "runtime_api"`).
    Inputs(Arc<Shared>),
}

impl WebConnection {
    /// Carries `stream` (HTTP/1.1 from the ingress) until either side ends it.
    pub async fn serve<S>(self, mut stream: S)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        match self.0 {
            WebTo::Server(mut server) => {
                // Both ways; each side's end is passed on (a finished stream, a closed
                // socket).
                let _ = tokio::io::copy_bidirectional(&mut stream, &mut server).await;
            }
            WebTo::Inputs(shared) => {
                // Served until the ingress closes it. When the server stops, every request
                // waiting for an answer gets its `503` at once (`shutdown`), which the
                // connection gets a moment to carry.
                let router = super::http_input::router(shared.clone());
                let service = hyper_util::service::TowerToHyperService::new(router);
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service);
                let stopped = async {
                    shared.cancel.cancelled().await;
                    tokio::time::sleep(CLOSE_GRACE).await;
                };
                tokio::select! {
                    _ = conn => {}
                    _ = stopped => {}
                }
            }
        }
    }
}

/// Why a web request cannot go to the container.
#[derive(Debug, thiserror::Error)]
pub enum WebError {
    #[error("the container's server is not ready")]
    NotReady,
    #[error("{0}")]
    Refused(InboxError),
    #[error("cannot connect to the container's server: {0}")]
    Connect(std::io::Error),
}

/// One web request in flight to a container; its end is counted when this drops (the
/// last one after a drain stops the container).
pub struct WebRequest {
    shared: Arc<Shared>,
}

impl Drop for WebRequest {
    fn drop(&mut self) {
        let actions = self.shared.inbox().web_end();
        if actions.is_empty() {
            return;
        }
        let shared = self.shared.clone();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move { shared.apply(actions).await });
        }
    }
}

/// Removes a runtime API directory, logging what could not be removed.
pub(super) fn remove_dir(dir: &Path) {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot remove a runtime API directory")
        }
    }
}

/// Accepts connections (at most `slots` at once) until the server stops.
async fn accept(
    listener: UnixListener,
    shared: Arc<Shared>,
    tracker: TaskTracker,
    slots: Arc<Semaphore>,
) {
    let router = super::api::router(shared.clone());
    loop {
        let permit = tokio::select! {
            _ = shared.cancel.cancelled() => return,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let stream = tokio::select! {
            _ = shared.cancel.cancelled() => return,
            s = listener.accept() => s,
        };
        match stream {
            Ok((stream, _)) => {
                let (router, cancel) = (router.clone(), shared.cancel.clone());
                tracker.spawn(async move {
                    serve_connection(stream, router, cancel).await;
                    drop(permit);
                });
            }
            Err(e) => {
                tracing::warn!(container = %shared.id, error = %e, "runtime API accept failed");
                tokio::select! {
                    _ = shared.cancel.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
            }
        }
    }
}

/// Serves HTTP/1.1 on one connection until the peer closes it or the server stops.
async fn serve_connection(stream: UnixStream, router: axum::Router, cancel: CancellationToken) {
    let service = hyper_util::service::TowerToHyperService::new(router);
    let conn =
        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => {
            if let Err(e) = result {
                tracing::debug!(error = %e, "runtime API connection ended");
            }
        }
        _ = cancel.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(CLOSE_GRACE, conn).await;
        }
    }
}

/// Fires the inbox's deadlines: input timeouts, the startup timeout, cancel and drain
/// graces.
async fn deadlines(shared: Arc<Shared>) {
    loop {
        let timer = shared.timer.notified();
        tokio::pin!(timer);
        timer.as_mut().enable();
        let actions = shared.inbox().expire(now_ms());
        if !actions.is_empty() {
            shared.apply(actions).await;
            continue;
        }
        let wake = shared.inbox().next_wake();
        let sleep = wake.map_or(IDLE_WAKE, |at| {
            Duration::from_millis(at.saturating_sub(now_ms())).min(IDLE_WAKE)
        });
        tokio::select! {
            _ = shared.cancel.cancelled() => return,
            _ = timer => {}
            _ = tokio::time::sleep(sleep) => {}
        }
    }
}
