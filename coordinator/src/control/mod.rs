//! The control endpoint: QUIC (quinn) with mutual TLS against the cluster CA.
//!
//! Client certificates are optional at the TLS layer so a node without one can join;
//! everything else requires one. Each request is one bidirectional stream: one frame in,
//! one frame out (`gantry_shared::protocol`). Frames are bounded in size and time; a peer
//! that sends an oversized or undecodable frame has its connection closed, with the reason
//! logged, while every other connection carries on.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use gantry_shared::now_ms;
use gantry_shared::protocol::{
    self, ALPN, FrameError, JoinToken, PROTOCOL_VERSION, Refusal, RefusalCode, Request, Response,
};
use gantry_shared::{ClusterId, NodeId};
use rustls_pki_types::{CertificateDer, ServerName};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::ca::{CaError, ClusterCa};
use crate::functions::FunctionService;
use crate::nodes::{Nodes, Session};
use crate::store::Store;
use crate::store::joins::JoinTokens;
use crate::store::tokens::{ApiTokens, Role};

/// The longest an agent's restart notice holds its node out of `down` (an agent asking for
/// more gets this much).
const MAX_RESTART_HOLD_MS: u64 = 5 * 60 * 1000;

/// Settings of the control endpoint.
#[derive(Debug, Clone)]
pub struct ControlConfig {
    pub listen: SocketAddr,
    /// Time allowed to receive or send one frame.
    pub frame_timeout: Duration,
    /// QUIC idle timeout: a silent peer is dropped after it.
    pub idle_timeout: Duration,
    /// The embedded registry's address as nodes reach it (`host:port`), told to each node
    /// at hello; `None` if nodes should not use it.
    pub registry: Option<String>,
    /// Nodes speak HTTPS to the registry (verified with the cluster CA, their trust store
    /// or their `registry.ca_file`).
    pub registry_tls: bool,
    /// The coordinator's gossip address, told to each node at hello (its gossip seed).
    pub gossip: Option<SocketAddr>,
}

impl Default for ControlConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 7443)),
            frame_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(10),
            registry: None,
            registry_tls: false,
            gossip: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("QUIC configuration: {0}")]
    Quic(String),
    #[error("cannot listen on {addr}: {source}; pick a free port or stop what uses it")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Why a stream was abandoned.
#[derive(Debug, thiserror::Error)]
enum StreamError {
    #[error("peer sent a bad frame: {0}")]
    Frame(#[from] FrameError),
    #[error("frame timed out after {0:?}")]
    Timeout(Duration),
    #[error("stream closed early: {0}")]
    Read(#[from] quinn::ReadExactError),
    #[error("cannot answer: {0}")]
    Write(#[from] quinn::WriteError),
}

struct State {
    ca: Arc<ClusterCa>,
    tokens: JoinTokens,
    store: Store,
    /// Where function containers' events and outputs go (none: a coordinator without
    /// functions, as some tests run it).
    functions: Option<FunctionService>,
    nodes: Nodes,
    api_tokens: ApiTokens,
    cfg: ControlConfig,
}

/// What one connection has established: its verified certificate, and the node it said
/// hello as (events on it are that node's).
struct Peer {
    cert: Option<CertificateDer<'static>>,
    node: std::sync::Mutex<Option<NodeId>>,
    conn: quinn::Connection,
}

/// A bound control endpoint; `serve` runs it until cancelled.
pub struct ControlServer {
    endpoint: quinn::Endpoint,
    state: Arc<State>,
}

impl ControlServer {
    /// Routes function containers' events and outputs to `functions`. Call before
    /// [`ControlServer::serve`].
    pub fn with_functions(mut self, functions: FunctionService) -> Self {
        if let Some(state) = Arc::get_mut(&mut self.state) {
            state.functions = Some(functions);
        }
        self
    }

    pub fn bind(
        cfg: ControlConfig,
        ca: Arc<ClusterCa>,
        tokens: JoinTokens,
        api_tokens: ApiTokens,
        store: Store,
        nodes: Nodes,
    ) -> Result<Self, ControlError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.ca_der().clone())?;
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .allow_unauthenticated()
        .build()?;
        let identity = ca.server_identity()?;
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(identity.chain, identity.key)?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
            .map_err(|e| ControlError::Quic(e.to_string()))?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(quic));
        let mut transport = quinn::TransportConfig::default();
        transport.max_idle_timeout(Some(
            cfg.idle_timeout
                .try_into()
                .map_err(|e: quinn::VarIntBoundsExceeded| ControlError::Quic(e.to_string()))?,
        ));
        transport.max_concurrent_bidi_streams(64u32.into());
        server.transport_config(Arc::new(transport));
        let endpoint =
            quinn::Endpoint::server(server, cfg.listen).map_err(|source| ControlError::Bind {
                addr: cfg.listen,
                source,
            })?;
        Ok(Self {
            endpoint,
            state: Arc::new(State {
                ca,
                tokens,
                store,
                functions: None,
                nodes,
                api_tokens,
                cfg,
            }),
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// Accepts connections until `cancel` fires, then closes them and waits for their tasks.
    pub async fn serve(self, cancel: CancellationToken) {
        let tasks = TaskTracker::new();
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                incoming = self.endpoint.accept() => {
                    let Some(incoming) = incoming else { break };
                    tasks.spawn(connection(incoming, self.state.clone(), cancel.clone()));
                }
            }
        }
        self.endpoint
            .close(0u32.into(), b"coordinator shutting down");
        tasks.close();
        tasks.wait().await;
    }
}

async fn connection(incoming: quinn::Incoming, state: Arc<State>, cancel: CancellationToken) {
    let remote = incoming.remote_address();
    let conn = match incoming.await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(%remote, error = %e, "control handshake refused");
            return;
        }
    };
    let cert: Option<CertificateDer<'static>> = conn
        .peer_identity()
        .and_then(|id| id.downcast::<Vec<CertificateDer<'static>>>().ok())
        .and_then(|chain| chain.first().cloned());
    let peer = Arc::new(Peer {
        cert,
        node: std::sync::Mutex::new(None),
        conn: conn.clone(),
    });
    let streams = TaskTracker::new();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            stream = conn.accept_bi() => {
                let Ok((send, recv)) = stream else { break };
                let (state, peer) = (state.clone(), peer.clone());
                streams.spawn(async move {
                    if let Err(e) = exchange(send, recv, state, peer.clone()).await {
                        tracing::warn!(%remote, error = %e, "closing control connection");
                        peer.conn.close(1u32.into(), e.to_string().as_bytes());
                    }
                });
            }
        }
    }
    if let Some(node) = peer.node() {
        tracing::info!(%node, "node session ended");
        state.nodes.disconnect(&node, &conn);
    }
    streams.close();
    streams.wait().await;
}

impl Peer {
    fn node(&self) -> Option<NodeId> {
        self.node.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

async fn exchange(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    state: Arc<State>,
    peer: Arc<Peer>,
) -> Result<(), StreamError> {
    let t = state.cfg.frame_timeout;
    let request: Request = tokio::time::timeout(t, read_frame(&mut recv))
        .await
        .map_err(|_| StreamError::Timeout(t))??;
    let duplicate = match &request {
        Request::Hello { node, instance, .. } => state.live_duplicate(node, *instance, &peer).await,
        _ => None,
    };
    let response = match duplicate {
        Some(refusal) => Response::Refused(refusal),
        // The decisions write and commit the store, which waits for the disk: off the
        // async workers, so other sessions' streams go on meanwhile.
        None => tokio::task::spawn_blocking(move || state.handle(request, &peer))
            .await
            .unwrap_or_else(|e| {
                Response::Refused(Refusal::new(
                    RefusalCode::Unavailable,
                    format!("the request failed ({e}); send it again"),
                ))
            }),
    };
    if let Response::Refused(r) = &response {
        tracing::warn!(code = ?r.code, reason = %r.message, "control request refused");
    }
    let frame = protocol::encode(&response)?;
    tokio::time::timeout(t, send.write_all(&frame))
        .await
        .map_err(|_| StreamError::Timeout(t))??;
    let _ = send.finish();
    Ok(())
}

/// Reads one frame.
async fn read_frame<T: serde::de::DeserializeOwned>(
    recv: &mut quinn::RecvStream,
) -> Result<T, StreamError> {
    let mut header = [0u8; 4];
    recv.read_exact(&mut header).await?;
    let mut body = vec![0u8; protocol::body_len(header)?];
    recv.read_exact(&mut body).await?;
    Ok(protocol::decode(&body)?)
}

/// Sends `command` to a node on a new stream of its session and reads the reply. The
/// stream's receiving half is returned for commands that send more (logs).
pub(crate) async fn command(
    conn: &quinn::Connection,
    command: &gantry_shared::protocol::Command,
) -> Result<(gantry_shared::protocol::CommandReply, quinn::RecvStream), String> {
    let (mut tx, mut rx) = conn.open_bi().await.map_err(|e| e.to_string())?;
    tx.write_all(&protocol::encode(command).map_err(|e| e.to_string())?)
        .await
        .map_err(|e| e.to_string())?;
    let _ = tx.finish();
    let reply = read_frame(&mut rx).await.map_err(|e| e.to_string())?;
    Ok((reply, rx))
}

/// Opens a stream to a node and sends `command` on it; the halves come back for the
/// caller to stream the rest (a volume's bytes) and read the reply.
pub(crate) async fn open_command(
    conn: &quinn::Connection,
    command: &gantry_shared::protocol::Command,
) -> Result<(quinn::SendStream, quinn::RecvStream), String> {
    let (mut tx, rx) = conn.open_bi().await.map_err(|e| e.to_string())?;
    tx.write_all(&protocol::encode(command).map_err(|e| e.to_string())?)
        .await
        .map_err(|e| e.to_string())?;
    Ok((tx, rx))
}

/// Reads one reply frame of a stream [`open_command`] opened.
pub(crate) async fn read_reply<T: serde::de::DeserializeOwned>(
    rx: &mut quinn::RecvStream,
) -> Result<T, String> {
    read_frame(rx).await.map_err(|e| e.to_string())
}

/// Opens a connection to web endpoint container `owner`'s server through its node's
/// session: after the node's `Accepted`, the stream's two halves are that connection.
/// Any other answer comes back as the error.
pub(crate) async fn open_web(
    conn: &quinn::Connection,
    owner: gantry_shared::Owner,
) -> Result<(quinn::SendStream, quinn::RecvStream), String> {
    let (mut tx, mut rx) = conn.open_bi().await.map_err(|e| e.to_string())?;
    let cmd = gantry_shared::protocol::Command::Web {
        owner,
        generation: gantry_shared::Generation(1),
    };
    tx.write_all(&protocol::encode(&cmd).map_err(|e| e.to_string())?)
        .await
        .map_err(|e| e.to_string())?;
    match read_frame(&mut rx).await.map_err(|e| e.to_string())? {
        gantry_shared::protocol::CommandReply::Accepted => Ok((tx, rx)),
        other => Err(format!("the node answered {other:?}")),
    }
}

impl State {
    /// Another agent holds a live session as `node`: a hello from a different run of an
    /// agent (another `instance`) is refused while the existing session still answers a
    /// ping within a second. A dead or silent old session is replaced (the node restarted).
    async fn live_duplicate(&self, node: &NodeId, instance: u64, peer: &Peer) -> Option<Refusal> {
        // Only a peer that proved it is `node` may make the coordinator probe `node`.
        check_identity(peer.cert.as_ref()?, node).ok()?;
        let old = self.nodes.get(node)?;
        if old.conn.stable_id() == peer.conn.stable_id()
            || old.conn.close_reason().is_some()
            || old.instance == instance
        {
            return None;
        }
        let ping = command(&old.conn, &gantry_shared::protocol::Command::Ping);
        let alive = matches!(
            tokio::time::timeout(Duration::from_secs(1), ping).await,
            Ok(Ok((gantry_shared::protocol::CommandReply::Accepted, _)))
        );
        alive.then(|| {
            Refusal::new(
                RefusalCode::DuplicateNode,
                format!(
                    "another agent is connected as node `{node}` (from {}); two hosts must not \
                     share a node identity: join this host with its own `--node` name",
                    old.conn.remote_address()
                ),
            )
        })
    }

    /// The protocol's decisions (the store calls are the only I/O).
    fn handle(&self, request: Request, peer: &Peer) -> Response {
        match self.decide(request, peer) {
            Ok(r) => r,
            Err(refusal) => Response::Refused(refusal),
        }
    }

    fn decide(&self, request: Request, peer: &Peer) -> Result<Response, Refusal> {
        match request {
            Request::Outputs { outputs, chunks } => {
                let node = peer.node().ok_or_else(|| {
                    Refusal::new(RefusalCode::NoSession, "say hello before sending outputs")
                })?;
                let functions = self.functions.as_ref().ok_or_else(|| {
                    Refusal::new(
                        RefusalCode::Unavailable,
                        "this coordinator serves no functions",
                    )
                })?;
                // The chunks first: an input's chunks are all kept before its end.
                functions.on_chunks(&node, chunks);
                functions.on_outputs(&node, outputs).map_err(|e| {
                    tracing::error!(%node, error = %e, "cannot record outputs");
                    Refusal::new(
                        RefusalCode::Unavailable,
                        format!(
                            "the coordinator cannot record the outputs now ({e}); send them again"
                        ),
                    )
                })?;
                Ok(Response::Noted)
            }
            Request::Join {
                protocol_version,
                token,
                node,
                csr_pem,
            } => {
                check_version(protocol_version)?;
                let token = JoinToken::parse(&token)
                    .map_err(|e| Refusal::new(RefusalCode::JoinToken, e.to_string()))?;
                self.tokens.redeem(&token, &node).map_err(|e| {
                    let code = match e {
                        crate::store::joins::JoinError::NodeTaken { .. } => {
                            RefusalCode::DuplicateNode
                        }
                        _ => RefusalCode::JoinToken,
                    };
                    Refusal::new(code, e.to_string())
                })?;
                let certificate_pem = self
                    .ca
                    .sign_node(&csr_pem, &node)
                    .map_err(|e| Refusal::new(RefusalCode::Csr, e.to_string()))?;
                let registry_token = self
                    .api_tokens
                    .create(Role::Reader, &format!("node {node} (registry pulls)"))
                    .map_err(|e| Refusal::new(RefusalCode::Unavailable, e.to_string()))?;
                tracing::info!(%node, "node joined");
                Ok(Response::Joined {
                    cluster: self.ca.cluster().clone(),
                    certificate_pem,
                    ca_pem: self.ca.ca_pem().to_owned(),
                    registry_token,
                    gossip_key: self.ca.gossip_key().clone(),
                })
            }
            Request::Hello {
                protocol_version,
                cluster,
                node,
                capacity,
                instance,
                gossip,
            } => {
                check_version(protocol_version)?;
                self.check_cluster(&cluster)?;
                let cert = peer.cert.as_ref().ok_or_else(|| {
                    Refusal::new(RefusalCode::NotAuthenticated, "no client certificate; connect with the node certificate that `gantry-agent join` obtained")
                })?;
                check_identity(cert, &node)?;
                *peer.node.lock().unwrap_or_else(|e| e.into_inner()) = Some(node.clone());
                self.nodes.connect(
                    node.clone(),
                    Session {
                        conn: peer.conn.clone(),
                        capacity,
                        instance,
                        gossip,
                    },
                );
                tracing::info!(%node, ?capacity, instance, "node session opened");
                let events_applied = self.store.node_events_applied(&node).map_err(|e| {
                    Refusal::new(
                        RefusalCode::Unavailable,
                        format!("the coordinator cannot read its store now ({e}); say hello again"),
                    )
                })?;
                Ok(Response::Welcome {
                    cluster,
                    node,
                    registry: self.cfg.registry.clone(),
                    registry_tls: self.cfg.registry_tls,
                    gossip: self.cfg.gossip,
                    gossip_key: self.ca.gossip_key().clone(),
                    events_applied,
                })
            }
            Request::Preempting { deadline_ms } => {
                let node = peer.node().ok_or_else(|| {
                    Refusal::new(RefusalCode::NoSession, "say hello before sending a notice")
                })?;
                let admin = self
                    .store
                    .node_admin()
                    .map_err(|e| Refusal::new(RefusalCode::Unavailable, e.to_string()))?;
                let state = admin
                    .set(
                        &node,
                        crate::store::node_admin::AdminState {
                            mode: crate::store::node_admin::AdminMode::Preempt,
                            since_ms: now_ms(),
                            deadline_ms: Some(deadline_ms),
                        },
                    )
                    .map_err(|e| Refusal::new(RefusalCode::Unavailable, e.to_string()))?;
                tracing::warn!(%node, deadline_ms = ?state.deadline_ms, "spot interruption notice from the node");
                self.nodes.changed.notify_one();
                Ok(Response::Noted)
            }
            Request::Restarting { back_within_ms } => {
                let node = peer.node().ok_or_else(|| {
                    Refusal::new(
                        RefusalCode::NoSession,
                        "say hello before saying you restart",
                    )
                })?;
                let hold =
                    std::time::Duration::from_millis(back_within_ms.min(MAX_RESTART_HOLD_MS));
                self.nodes.hold_for_restart(&node, hold);
                tracing::warn!(%node, hold = ?hold, "the node's agent is restarting; its work stays");
                Ok(Response::Noted)
            }
            Request::Events { events } => {
                let node = peer.node().ok_or_else(|| {
                    Refusal::new(RefusalCode::NoSession, "say hello before sending events")
                })?;
                // Function containers' events first: if recording them fails, the batch is
                // refused and sent again (their transitions ignore a replay); once the job
                // events' transaction acknowledges the batch, both are durable.
                if let Some(functions) = &self.functions {
                    let refuse = |err: crate::functions::FunctionServiceError| {
                        tracing::error!(%node, error = %err, "cannot record a function container's event");
                        Refusal::new(
                            RefusalCode::Unavailable,
                            format!(
                                "the coordinator cannot record events now ({err}); they stay buffered and are sent again"
                            ),
                        )
                    };
                    let mut any = false;
                    for e in events.iter().filter(|e| e.event.owner().warm().is_some()) {
                        functions.on_event(&e.event).map_err(refuse)?;
                        any = true;
                    }
                    if any {
                        functions.commit().map_err(refuse)?;
                    }
                }
                let now = now_ms();
                let upto = self
                    .store
                    .apply_node_events(&node, &events, |job, event| crate::jobs::apply(job, &node, event, now))
                    .map_err(|e| {
                        tracing::error!(%node, error = %e, "cannot record events");
                        Refusal::new(RefusalCode::Unavailable, format!("the coordinator cannot record events now ({e}); they stay buffered and are sent again"))
                    })?;
                self.nodes.changed.notify_one();
                Ok(Response::EventsAck { upto })
            }
        }
    }

    fn check_cluster(&self, cluster: &ClusterId) -> Result<(), Refusal> {
        if cluster == self.ca.cluster() {
            return Ok(());
        }
        Err(Refusal::new(
            RefusalCode::Cluster,
            format!(
                "this coordinator runs cluster `{}`, the agent belongs to `{cluster}`; point the agent at its own coordinator or join this one",
                self.ca.cluster()
            ),
        ))
    }
}

fn check_version(v: u32) -> Result<(), Refusal> {
    if v == PROTOCOL_VERSION {
        return Ok(());
    }
    Err(Refusal::new(
        RefusalCode::ProtocolVersion,
        format!(
            "the coordinator speaks control protocol {PROTOCOL_VERSION}, the peer {v}; run matching gantry versions"
        ),
    ))
}

/// The certificate (already verified against the cluster CA by rustls) must name `node`.
fn check_identity(cert: &CertificateDer<'static>, node: &NodeId) -> Result<(), Refusal> {
    let mismatch = || {
        Refusal::new(
            RefusalCode::Identity,
            format!(
                "the client certificate does not name node `{node}`; each node connects with its own certificate"
            ),
        )
    };
    let name = ServerName::try_from(protocol::node_dns_name(node)).map_err(|_| mismatch())?;
    let ee = webpki::EndEntityCert::try_from(cert).map_err(|_| mismatch())?;
    ee.verify_is_valid_for_subject_name(&name)
        .map_err(|_| mismatch())
}
