//! Web endpoints' containers (contract H): each runs an HTTP server in its own network
//! namespace. The agent brings that namespace's loopback up, probes the server until it is
//! ready, and opens one connection into the namespace for each request the coordinator's
//! ingress sends (`Command::Web`).
//!
//! A socket belongs to the network namespace of the thread that made it, so each container
//! has one thread that enters its namespace, brings its loopback up and then only makes
//! sockets there; the runtime connects them. No thread of the agent's runtime ever changes
//! namespace.

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::time::Duration;

use gantry_shared::protocol::Readiness;
use hyper_util::rt::TokioIo;
use nix::sched::{CloneFlags, setns};
use tokio_util::sync::CancellationToken;

/// Longest a connection to a container's server may take (it is on this host).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// First and longest wait between readiness probes: a server that comes up in a few
/// milliseconds is found in a few milliseconds.
const PROBE_FIRST: Duration = Duration::from_millis(2);
const PROBE_MAX: Duration = Duration::from_millis(50);
/// Longest one HTTP probe may take to answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// A web endpoint container's server: a thread that lives in the container's network
/// namespace and makes sockets there for the runtime to connect, and the server's port.
/// The thread ends when the last clone of this is dropped.
#[derive(Debug, Clone)]
pub struct WebTarget {
    sockets: std::sync::mpsc::Sender<Socket>,
    port: u16,
}

/// Where the namespace's thread sends a socket it made.
type Socket = tokio::sync::oneshot::Sender<std::io::Result<tokio::net::TcpSocket>>;

impl WebTarget {
    /// The server on `port` in the network namespace of process `pid` (one of the
    /// container's): the namespace's thread starts and brings its loopback up.
    pub async fn of_process(pid: i32, port: u16) -> std::io::Result<Self> {
        let netns = File::open(format!("/proc/{pid}/ns/net"))?;
        let (sockets, requests) = std::sync::mpsc::channel::<Socket>();
        let (ready, up) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("gantry-netns".into())
            .spawn(move || {
                // This thread stays in the namespace: it only ever makes sockets there.
                let entered = setns(&netns, CloneFlags::CLONE_NEWNET)
                    .map_err(std::io::Error::from)
                    .and_then(|()| loopback_up());
                let entered_ok = entered.is_ok();
                let _ = ready.send(entered);
                if !entered_ok {
                    return;
                }
                for reply in requests {
                    let _ = reply.send(tokio::net::TcpSocket::new_v4());
                }
            })?;
        up.await
            .unwrap_or_else(|_| Err(std::io::Error::other("the namespace thread died")))?;
        Ok(Self { sockets, port })
    }

    /// A connection to the server: a socket made in its namespace, connected from here.
    pub async fn connect(&self) -> std::io::Result<tokio::net::TcpStream> {
        let gone = || std::io::Error::other("the container's namespace thread ended");
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.sockets.send(tx).map_err(|_| gone())?;
        let socket = rx.await.map_err(|_| gone())??;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(addr))
            .await
            .map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no connection to {addr} in the container within {CONNECT_TIMEOUT:?}"),
                )
            })??;
        stream.set_nodelay(true)?;
        Ok(stream)
    }
}

/// Brings up `lo` in the calling thread's network namespace (a new namespace starts with
/// it down, and `127.0.0.1` unreachable).
fn loopback_up() -> std::io::Result<()> {
    let socket = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
    let fd = socket.as_raw_fd();
    // SAFETY: `ifreq` is plain data, zeroed, with a NUL-terminated name shorter than
    // IFNAMSIZ; both calls get a valid pointer to it and an open socket, and the kernel
    // writes only within it.
    unsafe {
        let mut req: libc::ifreq = std::mem::zeroed();
        for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
            *dst = *src as libc::c_char;
        }
        if libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(fd, libc::SIOCSIFFLAGS, &req) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Probes the server until `readiness` passes (true) or `cancel` (false).
pub async fn probe(target: &WebTarget, readiness: &Readiness, cancel: &CancellationToken) -> bool {
    let mut delay = PROBE_FIRST;
    loop {
        if check(target, readiness).await {
            return true;
        }
        tokio::select! {
            _ = cancel.cancelled() => return false,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(PROBE_MAX);
    }
}

/// One probe.
async fn check(target: &WebTarget, readiness: &Readiness) -> bool {
    let Ok(stream) = target.connect().await else {
        return false;
    };
    let path = match readiness {
        Readiness::Tcp => return true,
        Readiness::Http { path } => path.clone(),
    };
    let get = async move {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .ok()?;
        tokio::spawn(conn);
        let req = hyper::Request::get(path)
            .header(hyper::header::HOST, "localhost")
            .header(hyper::header::USER_AGENT, "gantry-agent-probe")
            .body(axum::body::Body::empty())
            .ok()?;
        let status = sender.send_request(req).await.ok()?.status();
        Some(status.is_success() || status.is_redirection())
    };
    matches!(
        tokio::time::timeout(PROBE_TIMEOUT, get).await,
        Ok(Some(true))
    )
}
