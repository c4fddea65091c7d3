//! The agent's side of the control plane: joining a cluster with a one-time token, and
//! opening mutually authenticated QUIC sessions to the coordinator.
//!
//! Before it has the cluster CA, a joining agent trusts the coordinator only if the CA
//! certificate the coordinator presents hashes to the value pinned in the join token.
//! Afterwards it trusts exactly that CA and presents its own node certificate.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use gantry_shared::protocol::{
    self, ALPN, COORDINATOR_DNS_NAME, JoinToken, NodeCapacity, PROTOCOL_VERSION, Refusal, Request,
    Response,
};
use gantry_shared::{ClusterId, GossipKey, NodeId};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::fsutil::{self, Durability};

const FRAME_TIMEOUT: Duration = Duration::from_secs(10);
/// How often an idle session sends a keep-alive. The coordinator counts a session with
/// nothing received for 1.5 s as silent (a liveness signal beside gossip).
pub const KEEP_ALIVE: Duration = Duration::from_millis(500);
/// A session with no traffic (keep-alives included) for this long is considered lost.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(transparent)]
    Token(#[from] protocol::BadJoinToken),
    #[error("coordinator refused: {0}")]
    Refused(Refusal),
    #[error(
        "cannot reach the coordinator at {addr}: {message}; check the address and that it runs"
    )]
    Connect { addr: SocketAddr, message: String },
    #[error("control stream to the coordinator failed: {0}")]
    Stream(String),
    #[error("unexpected answer from the coordinator: {0:?}")]
    Unexpected(Box<Response>),
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    #[error("certificate or key is unreadable: {0}")]
    Pem(String),
    #[error("cannot create a key or certificate request: {0}")]
    Csr(#[from] rcgen::Error),
    #[error("node identity in {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "this agent has not joined a cluster (no identity in {dir}); run `gantry-agent join --coordinator ADDR --token TOKEN`"
    )]
    NotJoined { dir: PathBuf },
}

/// What a joined node keeps: its name, its cluster, its certificate and key, the CA, and
/// the cluster's gossip key. Stored readable by root only (the file 0600, its directory
/// 0700): the keys are secrets.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeIdentity {
    pub node: NodeId,
    pub cluster: ClusterId,
    pub cert_pem: String,
    pub key_pem: String,
    pub ca_pem: String,
    /// Reader token for the cluster's embedded registry.
    #[serde(default)]
    pub registry_token: String,
    /// The key gossip datagrams are authenticated with, from the join (or, for a node
    /// that joined before gossip was authenticated, from its first hello since).
    #[serde(default)]
    pub gossip_key: Option<GossipKey>,
}

impl NodeIdentity {
    const FILE: &'static str = "identity.json";

    /// Loads the identity `join` stored in `dir`.
    pub fn load(dir: &Path) -> Result<Self, ControlError> {
        let path = dir.join(Self::FILE);
        fsutil::read_json(&path)
            .map_err(|source| ControlError::Io {
                path: path.clone(),
                source,
            })?
            .ok_or_else(|| ControlError::NotJoined {
                dir: dir.to_owned(),
            })
    }

    /// Stores the identity in `dir`, replacing what is there.
    pub fn save(&self, dir: &Path) -> Result<(), ControlError> {
        use std::os::unix::fs::PermissionsExt;
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| ControlError::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io(dir))?;
        let path = dir.join(Self::FILE);
        fsutil::write_json_private(&path, self, Durability::Host).map_err(io(&path))
    }
}

/// How the agent decides to trust the coordinator's certificate.
pub enum Trust<'a> {
    /// Before joining: the CA the coordinator presents must hash to this (hex SHA-256).
    Pinned(&'a str),
    /// After joining: the cluster CA.
    Ca(&'a str),
}

/// The cluster's embedded registry as the coordinator announced it at hello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterRegistry {
    /// `host:port`.
    pub address: String,
    /// It serves HTTPS (else plain HTTP).
    pub tls: bool,
}

/// One QUIC connection to the coordinator.
#[derive(Debug)]
pub struct Session {
    conn: quinn::Connection,
    /// The embedded registry, from the coordinator's welcome.
    registry: std::sync::Mutex<Option<ClusterRegistry>>,
    /// The coordinator's gossip address, from its welcome.
    gossip: std::sync::Mutex<Option<SocketAddr>>,
    /// The cluster's gossip key, from the coordinator's welcome.
    gossip_key: std::sync::Mutex<Option<GossipKey>>,
    /// The highest of this node's events the coordinator has applied, from its welcome.
    events_applied: std::sync::atomic::AtomicU64,
    _endpoint: quinn::Endpoint,
}

impl Session {
    /// Opens a connection, presenting `client` (certificate and key PEM) if given.
    pub async fn open(
        addr: SocketAddr,
        trust: Trust<'_>,
        client: Option<(&str, &str)>,
    ) -> Result<Self, ControlError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?;
        let builder = match trust {
            Trust::Pinned(hash) => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(PinnedCa {
                    ca_sha256: hash.to_ascii_lowercase(),
                    provider,
                })),
            Trust::Ca(ca_pem) => {
                let mut roots = rustls::RootCertStore::empty();
                roots.add(parse_cert(ca_pem)?)?;
                builder.with_root_certificates(roots)
            }
        };
        let mut tls = match client {
            Some((cert, key)) => {
                builder.with_client_auth_cert(vec![parse_cert(cert)?], parse_key(key)?)?
            }
            None => builder.with_no_client_auth(),
        };
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
            .map_err(|e| ControlError::Tls(rustls::Error::General(e.to_string())))?;
        let bind: SocketAddr = if addr.is_ipv6() {
            "[::]:0"
        } else {
            "0.0.0.0:0"
        }
        .parse()
        .map_err(|e: std::net::AddrParseError| ControlError::Connect {
            addr,
            message: e.to_string(),
        })?;
        let mut endpoint = quinn::Endpoint::client(bind).map_err(|e| ControlError::Connect {
            addr,
            message: e.to_string(),
        })?;
        let mut client = quinn::ClientConfig::new(Arc::new(quic));
        // Keep-alives make a lost coordinator (or network) show within IDLE_TIMEOUT.
        let mut transport = quinn::TransportConfig::default();
        transport.keep_alive_interval(Some(KEEP_ALIVE));
        transport.max_idle_timeout(Some(IDLE_TIMEOUT.try_into().map_err(
            |e: quinn::VarIntBoundsExceeded| ControlError::Connect {
                addr,
                message: e.to_string(),
            },
        )?));
        client.transport_config(Arc::new(transport));
        endpoint.set_default_client_config(client);
        let conn = endpoint
            .connect(addr, COORDINATOR_DNS_NAME)
            .map_err(|e| ControlError::Connect {
                addr,
                message: e.to_string(),
            })?
            .await
            .map_err(|e| ControlError::Connect {
                addr,
                message: e.to_string(),
            })?;
        Ok(Self {
            conn,
            registry: std::sync::Mutex::new(None),
            gossip: std::sync::Mutex::new(None),
            gossip_key: std::sync::Mutex::new(None),
            events_applied: std::sync::atomic::AtomicU64::new(0),
            _endpoint: endpoint,
        })
    }

    /// One request, one answer, on a fresh stream.
    pub async fn request(&self, request: &Request) -> Result<Response, ControlError> {
        let stream = |e: String| ControlError::Stream(e);
        let exchange = async {
            let (mut send, mut recv) = self
                .conn
                .open_bi()
                .await
                .map_err(|e| stream(e.to_string()))?;
            let frame = protocol::encode(request).map_err(|e| stream(e.to_string()))?;
            send.write_all(&frame)
                .await
                .map_err(|e| stream(e.to_string()))?;
            let _ = send.finish();
            read_frame(&mut recv).await.map_err(stream)
        };
        tokio::time::timeout(FRAME_TIMEOUT, exchange)
            .await
            .map_err(|_| stream(format!("no answer within {FRAME_TIMEOUT:?}")))?
    }

    /// The embedded registry the coordinator announced, if any.
    pub fn registry(&self) -> Option<ClusterRegistry> {
        self.registry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The highest of this node's events the coordinator said it has applied.
    pub fn events_applied(&self) -> u64 {
        self.events_applied
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The coordinator's gossip address it announced, if any.
    pub fn coordinator_gossip(&self) -> Option<SocketAddr> {
        *self.gossip.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The cluster's gossip key, from the welcome (none before it).
    pub fn gossip_key(&self) -> Option<GossipKey> {
        self.gossip_key
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The underlying connection (for streams of the protocols built on this session).
    pub fn connection(&self) -> &quinn::Connection {
        &self.conn
    }
}

/// The coordinator's address could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("resolving the coordinator address `{addr}` (use host:port)")]
    Lookup {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{addr}` resolves to no address")]
    NoAddress { addr: String },
}

/// Resolves the coordinator's control address (`host:port`) to its first socket address.
pub async fn resolve(addr: &str) -> Result<SocketAddr, ResolveError> {
    tokio::net::lookup_host(addr)
        .await
        .map_err(|source| ResolveError::Lookup {
            addr: addr.to_owned(),
            source,
        })?
        .next()
        .ok_or_else(|| ResolveError::NoAddress {
            addr: addr.to_owned(),
        })
}

/// Joins the cluster: trades the one-time `token` and a fresh key's CSR for a certificate
/// naming `node`, and stores the identity in `dir`.
pub async fn join(
    addr: SocketAddr,
    token: &str,
    node: NodeId,
    dir: &Path,
) -> Result<NodeIdentity, ControlError> {
    let token = JoinToken::parse(token)?;
    let key = rcgen::KeyPair::generate()?;
    let csr = rcgen::CertificateParams::new(vec![protocol::node_dns_name(&node)])?
        .serialize_request(&key)?;
    let session = Session::open(addr, Trust::Pinned(&token.ca_sha256), None).await?;
    let request = Request::Join {
        protocol_version: PROTOCOL_VERSION,
        token: token.to_string(),
        node: node.clone(),
        csr_pem: csr.pem()?,
    };
    match session.request(&request).await? {
        Response::Joined {
            cluster,
            certificate_pem,
            ca_pem,
            registry_token,
            gossip_key,
        } => {
            let identity = NodeIdentity {
                node,
                cluster,
                cert_pem: certificate_pem,
                key_pem: key.serialize_pem(),
                ca_pem,
                registry_token,
                gossip_key: Some(gossip_key),
            };
            identity.save(dir)?;
            Ok(identity)
        }
        Response::Refused(r) => Err(ControlError::Refused(r)),
        other => Err(ControlError::Unexpected(Box::new(other))),
    }
}

/// What an agent says about itself at hello.
#[derive(Debug, Clone, Copy)]
pub struct HelloInfo {
    pub capacity: NodeCapacity,
    /// This run of the agent (start time, unix ms).
    pub instance: u64,
    pub gossip: Option<SocketAddr>,
}

/// Opens an authenticated session as `identity` and says hello.
pub async fn connect(
    addr: SocketAddr,
    identity: &NodeIdentity,
    info: HelloInfo,
) -> Result<Session, ControlError> {
    let session = Session::open(
        addr,
        Trust::Ca(&identity.ca_pem),
        Some((&identity.cert_pem, &identity.key_pem)),
    )
    .await?;
    let hello = Request::Hello {
        protocol_version: PROTOCOL_VERSION,
        cluster: identity.cluster.clone(),
        node: identity.node.clone(),
        capacity: info.capacity,
        instance: info.instance,
        gossip: info.gossip,
    };
    match session.request(&hello).await? {
        Response::Welcome {
            registry,
            registry_tls,
            gossip,
            gossip_key,
            events_applied,
            ..
        } => {
            session
                .events_applied
                .store(events_applied, std::sync::atomic::Ordering::Relaxed);
            let registry = registry.map(|address| ClusterRegistry {
                address,
                tls: registry_tls,
            });
            *session.registry.lock().unwrap_or_else(|e| e.into_inner()) = registry;
            *session.gossip.lock().unwrap_or_else(|e| e.into_inner()) = gossip;
            *session.gossip_key.lock().unwrap_or_else(|e| e.into_inner()) = Some(gossip_key);
            Ok(session)
        }
        Response::Refused(r) => Err(ControlError::Refused(r)),
        other => Err(ControlError::Unexpected(Box::new(other))),
    }
}

/// Reads one frame (4-byte length, JSON) from a stream.
pub(crate) async fn read_frame<T: serde::de::DeserializeOwned>(
    recv: &mut quinn::RecvStream,
) -> Result<T, String> {
    let mut header = [0u8; 4];
    recv.read_exact(&mut header)
        .await
        .map_err(|e| e.to_string())?;
    let mut body = vec![0u8; protocol::body_len(header).map_err(|e| e.to_string())?];
    recv.read_exact(&mut body)
        .await
        .map_err(|e| e.to_string())?;
    protocol::decode(&body).map_err(|e| e.to_string())
}

fn parse_cert(pem: &str) -> Result<CertificateDer<'static>, ControlError> {
    CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| ControlError::Pem(e.to_string()))
}

fn parse_key(pem: &str) -> Result<PrivateKeyDer<'static>, ControlError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| ControlError::Pem(e.to_string()))
}

/// Trusts a server whose chain includes a CA certificate with the pinned hash, verifying
/// the server certificate against that CA as the only root.
#[derive(Debug)]
struct PinnedCa {
    ca_sha256: String,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| hex::encode(Sha256::digest(c.as_ref())) == self.ca_sha256)
            .ok_or_else(|| rustls::Error::General("the coordinator's CA does not match the join token's CA hash; the token is for another cluster or the address is wrong".into()))?;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        verifier.verify_server_cert(end_entity, &[], server_name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
