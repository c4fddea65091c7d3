//! Web endpoints' containers (contract H): each runs an HTTP server in its own network
//! namespace. The agent brings that namespace's loopback up, probes the server until it is
//! ready, and opens one connection into the namespace for each request the coordinator's
//! ingress sends (`Command::Web`).
//!
//! A socket belongs to the network namespace of the thread that made it, so every socket
//! into a container is made on a short-lived thread that enters the namespace first and
//! ends after; no thread of the agent's runtime ever changes namespace.

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::Arc;
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

/// A web endpoint container's server: its network namespace and port.
#[derive(Debug, Clone)]
pub struct WebTarget {
    netns: Arc<File>,
    port: u16,
}

impl WebTarget {
    /// The server on `port` in the network namespace of process `pid` (one of the
    /// container's), with the namespace's loopback brought up.
    pub async fn of_process(pid: i32, port: u16) -> std::io::Result<Self> {
        let netns = File::open(format!("/proc/{pid}/ns/net"))?;
        let target = Self {
            netns: Arc::new(netns),
            port,
        };
        target.inside(loopback_up).await?;
        Ok(target)
    }

    /// A connection to the server.
    pub async fn connect(&self) -> std::io::Result<tokio::net::TcpStream> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        let stream = self
            .inside(move || std::net::TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT))
            .await?;
        stream.set_nonblocking(true)?;
        stream.set_nodelay(true)?;
        tokio::net::TcpStream::from_std(stream)
    }

    /// Runs `f` on a new thread inside the namespace (the thread ends with it).
    async fn inside<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
    ) -> std::io::Result<T> {
        let netns = self.netns.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("gantry-netns".into())
            .spawn(move || {
                let result = setns(netns.as_ref(), CloneFlags::CLONE_NEWNET)
                    .map_err(std::io::Error::from)
                    .and_then(|()| f());
                let _ = tx.send(result);
            })?;
        rx.await
            .unwrap_or_else(|_| Err(std::io::Error::other("the namespace thread died")))
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
