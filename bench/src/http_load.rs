//! A bounded HTTP/1.1 load generator for the web benchmarks (`gantry-bench web` and
//! `gantry-bench http-load`, which `bench/ray_web.py` runs against Ray Serve's proxy).
//!
//! `concurrency` workers share one count of `requests`; each sends `GET path` on its own
//! connection, reads the whole body and checks it, and keeps the connection for the next
//! request unless the server closes it (`Connection: close`), in which case the next
//! request opens a new one and its latency includes that connect. Latency is from just
//! before the request (or its connect) to the end of the body. Everything runs on one new
//! thread with a current-thread runtime, so the client costs the same on every path.
//!
//! A target is an address this thread reaches (the ingress, Ray Serve's proxy), or a port
//! on the loopback of a container's network namespace ("directly"): a socket belongs to the
//! namespace of the thread that made it, so the generator's own thread enters the
//! container's namespace just to make each socket and returns to its own at once (its
//! runtime does no other work meanwhile), then connects from its own namespace.
//!
//! Only loopback addresses and namespaces are targets: [`Target::Addr`] is refused
//! unless it is in 127.0.0.0/8 or on a test-host bridge the benchmark made (10.231.0.0/16).

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hyper::body::Body as _;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use nix::sched::{CloneFlags, setns};
use serde_json::{Value, json};

use crate::percentile;

/// Where the requests go.
#[derive(Clone)]
pub enum Target {
    /// An address reachable from the generator's namespace.
    Addr(SocketAddr),
    /// `port` on the loopback of each of these network namespaces, round robin per
    /// connection.
    Netns {
        namespaces: Vec<Arc<File>>,
        port: u16,
    },
}

#[derive(Clone)]
pub struct Load {
    pub target: Target,
    /// Path and query of every request.
    pub path: String,
    /// `Authorization: Bearer …` on every request.
    pub token: Option<String>,
    pub requests: usize,
    pub concurrency: usize,
    /// What every body must be (checked when set).
    pub expect_body: Option<Vec<u8>>,
    /// Longest the whole load may take; workers stop at it.
    pub deadline: Duration,
}

/// What a load measured: per-request latencies of the successful requests.
pub struct Outcome {
    pub latencies_ms: Vec<f64>,
    pub seconds: f64,
    pub errors: usize,
    pub first_error: Option<String>,
    pub connects: usize,
}

impl Outcome {
    pub fn to_json(&self) -> Value {
        let v = &self.latencies_ms;
        json!({
            "n": v.len(),
            "seconds": self.seconds,
            "per_s": v.len() as f64 / self.seconds.max(1e-9),
            "p50_ms": percentile(v, 50.0),
            "p90_ms": percentile(v, 90.0),
            "p99_ms": percentile(v, 99.0),
            "max_ms": percentile(v, 100.0),
            "errors": self.errors,
            "first_error": self.first_error,
            "connections": self.connects,
        })
    }
}

/// Runs `load` on a new thread and waits for it.
pub fn run(load: Load) -> anyhow::Result<Outcome> {
    if let Target::Addr(addr) = &load.target
        && !is_local(addr)
    {
        bail!("{addr} is not a loopback or test-bridge address; the benchmarks stay local");
    }
    std::thread::Builder::new()
        .name("gantry-bench-load".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(drive(&load))
        })?
        .join()
        .map_err(|_| anyhow::anyhow!("the load thread panicked"))?
}

/// 127.0.0.0/8, or the range of the test-host bridges (`gantry_tests::netns`, 10.231.0.0/16).
fn is_local(addr: &SocketAddr) -> bool {
    match addr {
        SocketAddr::V4(a) => a.ip().is_loopback() || a.ip().octets()[..2] == [10, 231],
        SocketAddr::V6(a) => a.ip().is_loopback(),
    }
}

struct Shared<'a> {
    load: &'a Load,
    next: AtomicUsize,
    /// Round robin over the target's namespaces.
    turn: AtomicUsize,
    /// This thread's own network namespace, to return to after making a socket.
    home: Option<File>,
    stop_at: Instant,
}

async fn drive(load: &Load) -> anyhow::Result<Outcome> {
    let home = match &load.target {
        Target::Netns { .. } => Some(
            File::open("/proc/thread-self/ns/net").context("this thread's network namespace")?,
        ),
        Target::Addr(_) => None,
    };
    let shared = Shared {
        load,
        next: AtomicUsize::new(0),
        turn: AtomicUsize::new(0),
        home,
        stop_at: Instant::now() + load.deadline,
    };
    let t0 = Instant::now();
    let workers = (0..load.concurrency.max(1)).map(|_| worker(&shared));
    let results = futures_util::future::join_all(workers).await;
    let seconds = t0.elapsed().as_secs_f64();
    let mut out = Outcome {
        latencies_ms: Vec::with_capacity(load.requests),
        seconds,
        errors: 0,
        first_error: None,
        connects: 0,
    };
    for w in results {
        out.latencies_ms.extend(w.latencies_ms);
        out.errors += w.errors;
        out.connects += w.connects;
        if out.first_error.is_none() {
            out.first_error = w.first_error;
        }
    }
    Ok(out)
}

async fn worker(shared: &Shared<'_>) -> Outcome {
    let mut out = Outcome {
        latencies_ms: Vec::new(),
        seconds: 0.0,
        errors: 0,
        first_error: None,
        connects: 0,
    };
    let mut conn: Option<SendRequest<String>> = None;
    loop {
        if shared.next.fetch_add(1, Ordering::Relaxed) >= shared.load.requests
            || Instant::now() > shared.stop_at
        {
            return out;
        }
        let t = Instant::now();
        match one(shared, &mut conn, &mut out.connects).await {
            Ok(()) => out.latencies_ms.push(t.elapsed().as_secs_f64() * 1e3),
            Err(e) => {
                conn = None;
                out.errors += 1;
                if out.first_error.is_none() {
                    out.first_error = Some(format!("{e:#}"));
                }
            }
        }
    }
}

/// One request on `conn` (opened first when there is none); `conn` is kept when the
/// server keeps the connection.
async fn one(
    shared: &Shared<'_>,
    conn: &mut Option<SendRequest<String>>,
    connects: &mut usize,
) -> anyhow::Result<()> {
    let kept = match conn.take() {
        Some(mut s) => s.ready().await.is_ok().then_some(s),
        None => None,
    };
    let mut sender = match kept {
        Some(s) => s,
        None => {
            *connects += 1;
            connect(shared).await?
        }
    };
    let mut req = hyper::Request::get(shared.load.path.as_str())
        .header(hyper::header::HOST, "localhost")
        .body(String::new())?;
    if let Some(t) = &shared.load.token {
        req.headers_mut().insert(
            hyper::header::AUTHORIZATION,
            format!("Bearer {t}").parse().context("token header")?,
        );
    }
    let response = sender.send_request(req).await.context("request")?;
    let status = response.status();
    let closes = response
        .headers()
        .get(hyper::header::CONNECTION)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"))
        || response.version() == hyper::Version::HTTP_10;
    let body = read_body(response.into_body()).await?;
    if !status.is_success() {
        bail!("{status}: {}", String::from_utf8_lossy(&body).trim());
    }
    if let Some(want) = &shared.load.expect_body
        && &body != want
    {
        bail!("unexpected body: {:?}", String::from_utf8_lossy(&body));
    }
    if !closes {
        *conn = Some(sender);
    }
    Ok(())
}

/// The whole body (small bodies only: the benchmarks' are a few bytes).
async fn read_body(mut body: hyper::body::Incoming) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
        if let Ok(data) = frame.context("body")?.into_data() {
            out.extend_from_slice(&data);
            if out.len() > 1 << 20 {
                bail!("a body over 1 MiB");
            }
        }
    }
    Ok(out)
}

async fn connect(shared: &Shared<'_>) -> anyhow::Result<SendRequest<String>> {
    let stream = match &shared.load.target {
        Target::Addr(addr) => tokio::net::TcpStream::connect(addr)
            .await
            .with_context(|| format!("connect {addr}"))?,
        Target::Netns { namespaces, port } => {
            let i = shared.turn.fetch_add(1, Ordering::Relaxed) % namespaces.len().max(1);
            let ns = namespaces.get(i).context("no namespace to connect into")?;
            let home = shared.home.as_ref().context("no home namespace")?;
            let socket = socket_in(ns, home)?;
            socket
                .connect(SocketAddr::from((Ipv4Addr::LOCALHOST, *port)))
                .await
                .with_context(|| format!("connect 127.0.0.1:{port} in a container"))?
        }
    };
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

/// A TCP socket made in namespace `ns`; the calling thread is back in `home` when this
/// returns (or the process aborts: a generator left in a container's namespace would
/// measure nonsense).
fn socket_in(ns: &File, home: &File) -> anyhow::Result<tokio::net::TcpSocket> {
    setns(ns, CloneFlags::CLONE_NEWNET).context("entering the container's namespace")?;
    let socket = tokio::net::TcpSocket::new_v4();
    if let Err(e) = setns(home, CloneFlags::CLONE_NEWNET) {
        eprintln!("gantry-bench: cannot return to its own network namespace: {e}");
        std::process::abort();
    }
    Ok(socket?)
}
