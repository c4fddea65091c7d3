//! TLS for the HTTP API and the embedded registry on it (`[api]` in coordinator.toml).
//! The certificate comes from PEM files (`tls_cert`, `tls_key`) or is issued by the
//! cluster CA at each start for the names in `tls_names`; either is read once, at start.
//! [`TlsListener`] is what `axum::serve` accepts connections from: handshakes run beside
//! the accept loop (bounded in number and time, so a slow client holds up no other),
//! TCP_NODELAY is kept, and a plain HTTP request on the TLS port gets a 400 that says to
//! use `https://`, which its client can show.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use gantry_shared::api::{ErrorBody, ErrorDetail};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::ca::{CaError, ClusterCa};

/// Most handshakes in progress at once; further connections wait in the listen backlog.
const MAX_HANDSHAKES: usize = 256;
/// Longest a client may take from connecting to a finished handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the API's certificate comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiTls {
    /// PEM files: the certificate chain (leaf first) and its private key.
    Files { cert: PathBuf, key: PathBuf },
    /// Issued by the cluster CA at each start for these DNS names and IP addresses; the
    /// agents trust it with the CA they got at join, users with the CA's `ca.pem`.
    ClusterCa { names: Vec<String> },
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {} (`api.{key}`): {source}", path.display())]
    Read {
        path: PathBuf,
        key: &'static str,
        source: std::io::Error,
    },
    #[error("{} (`api.{key}`) holds no usable PEM {what}: {reason}", path.display())]
    Pem {
        path: PathBuf,
        key: &'static str,
        what: &'static str,
        reason: String,
    },
    #[error(
        "the certificate in {} and the key in {} cannot serve TLS together ({source}); `api.tls_cert` must start with the certificate of `api.tls_key`",
        cert.display(), key.display()
    )]
    Pair {
        cert: PathBuf,
        key: PathBuf,
        source: rustls::Error,
    },
    #[error("cannot issue the API certificate (`api.tls_names`) from the cluster CA: {0}")]
    Issue(#[from] CaError),
    #[error("TLS configuration of the API: {0}")]
    Config(rustls::Error),
}

/// The rustls configuration the API serves with: HTTP/1.1 over TLS 1.2 or 1.3.
pub fn server_config(tls: &ApiTls, ca: &ClusterCa) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?
        .with_no_client_auth();
    let mut config = match tls {
        ApiTls::Files { cert, key } => {
            let (chain, private) = (read_chain(cert)?, read_key(key)?);
            builder
                .with_single_cert(chain, private)
                .map_err(|source| TlsError::Pair {
                    cert: cert.clone(),
                    key: key.clone(),
                    source,
                })?
        }
        ApiTls::ClusterCa { names } => {
            let id = ca.api_identity(names)?;
            builder
                .with_single_cert(id.chain, id.key)
                .map_err(TlsError::Config)?
        }
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn read(path: &Path, key: &'static str) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        key,
        source,
    })
}

fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = |reason: String| TlsError::Pem {
        path: path.to_owned(),
        key: "tls_cert",
        what: "certificate",
        reason,
    };
    let chain = CertificateDer::pem_slice_iter(&read(path, "tls_cert")?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem(e.to_string()))?;
    if chain.is_empty() {
        return Err(pem("no `BEGIN CERTIFICATE` block".into()));
    }
    Ok(chain)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(&read(path, "tls_key")?).map_err(|e| TlsError::Pem {
        path: path.to_owned(),
        key: "tls_key",
        what: "private key (PKCS#8, PKCS#1 or SEC1)",
        reason: e.to_string(),
    })
}

/// A TCP listener whose connections are served once their TLS handshake is done.
pub struct TlsListener {
    tcp: TcpListener,
    acceptor: TlsAcceptor,
    /// Handshakes in progress; aborted with the listener when serving ends.
    handshakes: JoinSet<Option<(TlsStream<TcpStream>, SocketAddr)>>,
}

impl TlsListener {
    pub fn new(tcp: TcpListener, config: Arc<rustls::ServerConfig>) -> Self {
        Self {
            tcp,
            acceptor: TlsAcceptor::from(config),
            handshakes: JoinSet::new(),
        }
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            // Never both branches off: below the bound accepting is on, at it the set is
            // not empty.
            tokio::select! {
                accepted = self.tcp.accept(), if self.handshakes.len() < MAX_HANDSHAKES => {
                    match accepted {
                        Ok((tcp, peer)) => {
                            self.handshakes.spawn(handshake(self.acceptor.clone(), tcp, peer));
                        }
                        Err(e) => accept_failed(e).await,
                    }
                }
                Some(done) = self.handshakes.join_next() => {
                    if let Ok(Some(conn)) = done {
                        return conn;
                    }
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.tcp.local_addr()
    }
}

/// As axum's own listener: a connection's failure is that connection's; anything else
/// (out of file descriptors) is waited out.
async fn accept_failed(e: std::io::Error) {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(
        e.kind(),
        ConnectionAborted | ConnectionRefused | ConnectionReset
    ) {
        return;
    }
    tracing::error!(error = %e, "accepting an API connection; retrying in 1 s");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// The connection once its handshake is done; `None` when it failed, timed out or was a
/// plain HTTP request (answered).
async fn handshake(
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    peer: SocketAddr,
) -> Option<(TlsStream<TcpStream>, SocketAddr)> {
    // Without TCP_NODELAY a response's last small write waits for the client's delayed
    // ACK (see `api::serve`).
    if let Err(e) = tcp.set_nodelay(true) {
        tracing::debug!(error = %e, "cannot set TCP_NODELAY");
    }
    let shake = async {
        // A TLS connection opens with a handshake record (0x16); an HTTP request with
        // its method's capital letters.
        let mut first = [0u8; 1];
        if tcp.peek(&mut first).await? == 1 && first[0].is_ascii_uppercase() {
            refuse_plain_http(tcp).await;
            return Ok(None);
        }
        acceptor.accept(tcp).await.map(Some)
    };
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, shake).await {
        Ok(Ok(tls)) => tls.map(|tls| (tls, peer)),
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "API TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::debug!(%peer, "API TLS handshake timed out");
            None
        }
    }
}

/// Answers a plain HTTP request with 400 and the API's error body, then closes.
async fn refuse_plain_http(mut tcp: TcpStream) {
    let body = serde_json::to_string(&ErrorBody {
        error: ErrorDetail {
            code: "https_required".into(),
            message: "this address serves the Gantry API over HTTPS only: use an https:// \
                      address (GANTRY_ADDR=https://HOST:PORT)"
                .into(),
            field: None,
        },
    })
    .unwrap_or_default();
    let response = format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    if tcp.write_all(response.as_bytes()).await.is_err() || tcp.shutdown().await.is_err() {
        return;
    }
    // Read what the client sent until it closes, so that closing with its request
    // unread does not reset the connection before it has read the answer.
    let mut sink = [0u8; 4096];
    while matches!(tcp.read(&mut sink).await, Ok(n) if n > 0) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    use axum::Router;
    use axum::routing::get;
    use tokio_util::sync::CancellationToken;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write");
        path
    }

    #[test]
    fn bad_files_are_named_with_their_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = ClusterCa::load_or_create(&dir.path().join("ca")).expect("ca");
        let issued =
            rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("cert");
        let other = rcgen::KeyPair::generate().expect("key");
        let cert = write(dir.path(), "cert.pem", &issued.cert.pem());
        let key = write(dir.path(), "key.pem", &issued.signing_key.serialize_pem());
        let other_key = write(dir.path(), "other.key", &other.serialize_pem());
        let garbage = write(dir.path(), "garbage.pem", "not pem\n");
        let files = |cert: &Path, key: &Path| ApiTls::Files {
            cert: cert.to_owned(),
            key: key.to_owned(),
        };
        server_config(&files(&cert, &key), &ca).expect("a matching pair serves");
        let err = |tls| match server_config(&tls, &ca) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("{tls:?} was accepted"),
        };
        for (tls, names) in [
            (
                files(&dir.path().join("missing.pem"), &key),
                ["missing.pem", "`api.tls_cert`"],
            ),
            (files(&garbage, &key), ["garbage.pem", "`api.tls_cert`"]),
            (files(&cert, &garbage), ["garbage.pem", "`api.tls_key`"]),
            (
                files(&cert, &other_key),
                ["other.key", "cannot serve TLS together"],
            ),
        ] {
            let e = err(tls);
            assert!(names.iter().all(|n| e.contains(n)), "{e}");
        }
    }

    /// One HTTP/1.1 request on `io`; the response as text.
    async fn healthz(mut io: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin) -> String {
        io.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .expect("write");
        let mut out = Vec::new();
        io.read_to_end(&mut out).await.expect("read");
        String::from_utf8_lossy(&out).into_owned()
    }

    #[tokio::test]
    async fn serves_https_refuses_plain_http_and_stops_on_cancel() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = ClusterCa::load_or_create(&dir.path().join("ca")).expect("ca");
        let config = server_config(
            &ApiTls::ClusterCa {
                names: vec!["127.0.0.1".into()],
            },
            &ca,
        )
        .expect("tls");
        let tcp = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = tcp.local_addr().expect("addr");
        let router = Router::new().route("/healthz", get(|| async { "ok" }));
        let cancel = CancellationToken::new();
        let server = tokio::spawn(super::super::serve(
            tcp,
            Some(config),
            router,
            cancel.clone(),
        ));

        // A client that trusts the cluster CA gets its answer.
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.ca_der().clone()).expect("root");
        let client = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        let name = rustls_pki_types::ServerName::try_from("127.0.0.1").expect("name");
        let tls = connector
            .connect(name, TcpStream::connect(addr).await.expect("connect"))
            .await
            .expect("handshake");
        let answer = healthz(tls).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with("ok"), "{answer}");

        // Plain HTTP is told to use https, in HTTP.
        let answer = healthz(TcpStream::connect(addr).await.expect("connect")).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
        assert!(answer.contains("https://"), "{answer}");

        // A client that stalls mid-handshake holds up nobody else.
        let _stalled = TcpStream::connect(addr).await.expect("connect");
        let answer = healthz(TcpStream::connect(addr).await.expect("connect")).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");

        cancel.cancel();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("stops on cancel")
            .expect("join")
            .expect("serve");
    }
}
