//! `gantry-bench web`: web endpoints (contract H) with real processes on a test host
//! (`gantry_tests::cluster`: a coordinator and one agent in a network namespace, busybox
//! imported as image `busybox`), each container running busybox `httpd` serving a 6-byte
//! `index.html`:
//! - **through the ingress against directly**, 4 warm containers (`min_containers =
//!   max_containers = 4`): the same `GET /index.html`, once through the coordinator's
//!   ingress (`/APP/LABEL/index.html` with a bearer token: ingress → QUIC → agent → TCP
//!   into the container's namespace) and once straight to the same servers on their
//!   namespaces' loopback (see [`crate::http_load`]), one request at a time (alternating in
//!   rounds, so machine noise hits both alike) for the latency the ingress adds, then
//!   `concurrency` at a time for requests/s;
//! - **scale from zero to the first byte**: a request to an endpoint with no container
//!   (`scaledown_window = "2s"`, waited until `GET /v1/apps/{app}` shows none), on a new
//!   connection, timed to the response head; the image is cached on the node.
//!
//! Every loop is bounded by a count and a deadline; nothing here asserts a time.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use gantry_tests::cluster::ClusterSpec;
use serde_json::{Value, json};

use crate::cpu::CpuWindow;
use crate::functions::{Api, OneAgent, stats};
use crate::http_load::{self, Load, Outcome, Target};

/// The directory httpd serves; also what tells its processes apart from other tests'.
const WWW: &str = "/tmp/gantry-bench-www";
const BODY: &[u8] = b"hello\n";
const PORT: u16 = 8000;
/// Latency rounds: each sends its share through the ingress, then directly.
pub const ROUNDS: usize = 10;

pub struct WebBench {
    /// Requests one at a time, through the ingress and as many directly.
    pub requests: usize,
    /// Requests of the concurrent load (each way), and how many at once.
    pub load_requests: usize,
    pub concurrency: usize,
    /// Scale-from-zero trials.
    pub cold_trials: usize,
    /// `cpu` of every container.
    pub cpu: String,
    pub json: Option<PathBuf>,
}

fn httpd_command() -> Value {
    json!([
        "sh",
        "-c",
        format!(
            "mkdir -p {WWW} && echo hello > {WWW}/index.html && exec httpd -f -p $PORT -h {WWW}"
        )
    ])
}

async fn deploy(api: &Api, app: &str, cpu: &str, extra: Value) -> anyhow::Result<()> {
    let mut f = json!({
        "image": "busybox", "command": httpd_command(), "cpu": cpu, "memory": "64M",
        "web": {"port": PORT},
    });
    for (k, v) in extra.as_object().into_iter().flatten() {
        f[k] = v.clone();
    }
    let manifest = json!({"app": app, "functions": {"www": f}});
    api.post(&format!("/v1/apps/{app}/deployments"), &manifest)
        .await?;
    Ok(())
}

pub fn run(b: WebBench) -> anyhow::Result<()> {
    let OneAgent { c, rt, api, pids } = OneAgent::start(ClusterSpec {
        busybox: true,
        ..ClusterSpec::default()
    })?;
    let ingress: std::net::SocketAddr = c.ingress.parse().context("ingress address")?;
    let cgroup = gantry_agent::runtime::cgroup::parent_for(&c.agents[0].state);
    let mut out = json!({"cpu": b.cpu, "concurrency": b.concurrency});

    eprintln!("web: 4 warm containers");
    rt.block_on(async {
        deploy(
            &api,
            "warm",
            &b.cpu,
            json!({"min_containers": 4, "max_containers": 4}),
        )
        .await?;
        api.wait_containers("warm", "4 idle", Duration::from_millis(20), |n| n[1] == 4)
            .await
    })?;
    let namespaces = server_namespaces(&cgroup, 4)?;
    let through = |requests, concurrency| Load {
        target: Target::Addr(ingress),
        path: "/warm/www/index.html".into(),
        token: Some(c.admin.clone()),
        requests,
        concurrency,
        expect_body: Some(BODY.to_vec()),
        deadline: Duration::from_secs(120),
    };
    let direct = |requests, concurrency| Load {
        target: Target::Netns {
            namespaces: namespaces.clone(),
            port: PORT,
        },
        path: "/index.html".into(),
        token: None,
        requests,
        concurrency,
        expect_body: Some(BODY.to_vec()),
        deadline: Duration::from_secs(120),
    };
    // Warm-up: connections, page cache, the agent's and the coordinator's first requests.
    checked(
        http_load::run(through(200, 4))?,
        "warm-up through the ingress",
    )?;
    checked(http_load::run(direct(200, 4))?, "warm-up directly")?;

    eprintln!("web: {} requests one at a time, each way", b.requests);
    let (mut via, mut straight) = (Vec::new(), Vec::new());
    let (mut via_s, mut straight_s) = (0.0, 0.0);
    let cpu = CpuWindow::start(pids.0, pids.1);
    for _ in 0..ROUNDS {
        let n = b.requests.div_ceil(ROUNDS);
        let o = checked(http_load::run(through(n, 1))?, "through the ingress")?;
        via_s += o.seconds;
        via.extend(o.latencies_ms);
        let o = checked(http_load::run(direct(n, 1))?, "directly")?;
        straight_s += o.seconds;
        straight.extend(o.latencies_ms);
    }
    out["sequential"] = json!({
        "cpu": cpu.end(),
        "ingress": with_rate(stats(&via), via.len(), via_s),
        "direct": with_rate(stats(&straight), straight.len(), straight_s),
    });

    eprintln!(
        "web: {} requests, {} at a time, each way",
        b.load_requests, b.concurrency
    );
    let cpu = CpuWindow::start(pids.0, pids.1);
    let o = http_load::run(through(b.load_requests, b.concurrency))?;
    out["concurrent"]["ingress"] = o.to_json();
    out["concurrent"]["ingress"]["cpu"] = cpu.end();
    let cpu = CpuWindow::start(pids.0, pids.1);
    let o = http_load::run(direct(b.load_requests, b.concurrency))?;
    out["concurrent"]["direct"] = o.to_json();
    out["concurrent"]["direct"]["cpu"] = cpu.end();
    drop(namespaces);
    rt.block_on(api.stop("warm"))?;

    eprintln!("web: scale from zero, {} trials", b.cold_trials);
    out["cold"] = rt.block_on(cold(&api, &b, ingress, &c.admin))?;

    print_tables(&out, &b);
    if let Some(path) = &b.json {
        std::fs::write(path, serde_json::to_vec_pretty(&out)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    drop(api);
    drop(rt);
    drop(c);
    Ok(())
}

/// `o` when every request succeeded.
fn checked(o: Outcome, what: &str) -> anyhow::Result<Outcome> {
    if o.errors > 0 {
        bail!(
            "{what}: {} of {} requests failed; first: {}",
            o.errors,
            o.errors + o.latencies_ms.len(),
            o.first_error.as_deref().unwrap_or("?")
        );
    }
    Ok(o)
}

fn with_rate(mut s: Value, n: usize, seconds: f64) -> Value {
    s["seconds"] = json!(seconds);
    s["per_s"] = json!(n as f64 / seconds.max(1e-9));
    s
}

/// The network namespaces of the `want` httpd servers this benchmark's agent runs (found
/// by their command line and their cgroup under the agent's), each opened once.
fn server_namespaces(cgroup: &str, want: usize) -> anyhow::Result<Vec<Arc<File>>> {
    let argv: Vec<u8> = ["httpd", "-f", "-p", "8000", "-h", WWW]
        .iter()
        .flat_map(|a| [a.as_bytes(), b"\0"].concat())
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut found: Vec<(u64, Arc<File>)> = Vec::new();
        for entry in std::fs::read_dir("/proc")?.flatten() {
            let pid = entry.path();
            let ours = std::fs::read(pid.join("cmdline")).is_ok_and(|c| c == argv)
                && std::fs::read_to_string(pid.join("cgroup")).is_ok_and(|g| g.contains(cgroup));
            if !ours {
                continue;
            }
            let Ok(ns) = File::open(pid.join("ns/net")) else {
                continue;
            };
            let ino = ns.metadata()?.ino();
            if !found.iter().any(|(i, _)| *i == ino) {
                found.push((ino, Arc::new(ns)));
            }
        }
        if found.len() == want {
            return Ok(found.into_iter().map(|(_, f)| f).collect());
        }
        if Instant::now() > deadline {
            bail!(
                "found {} httpd namespaces under cgroup {cgroup}, not {want}",
                found.len()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

async fn cold(
    api: &Api,
    b: &WebBench,
    ingress: std::net::SocketAddr,
    token: &str,
) -> anyhow::Result<Value> {
    deploy(
        api,
        "cold",
        &b.cpu,
        json!({"min_containers": 0, "max_containers": 1, "scaledown_window": "2s"}),
    )
    .await?;
    // The first start of the app is not timed (page cache, the image's first overlay).
    first_byte(ingress, token).await?;
    let mut ms = Vec::new();
    let budget = Instant::now() + Duration::from_secs(300);
    for i in 0..b.cold_trials {
        api.wait_containers("cold", "zero containers", Duration::from_millis(50), |n| {
            n.iter().sum::<u64>() == 0
        })
        .await?;
        // Let the drained container's teardown finish, so it does not share the CPU.
        tokio::time::sleep(Duration::from_millis(300)).await;
        ms.push(first_byte(ingress, token).await?);
        if Instant::now() > budget {
            eprintln!("web: scale-from-zero trials stopped at 300 s after {i}");
            break;
        }
    }
    api.stop("cold").await?;
    Ok(stats(&ms))
}

/// One `GET /cold/www/index.html` on a new connection: milliseconds from the connect to
/// the response head (its first byte), once the whole body is checked.
async fn first_byte(ingress: std::net::SocketAddr, token: &str) -> anyhow::Result<f64> {
    use hyper::body::Body as _;
    let t = Instant::now();
    let stream = tokio::net::TcpStream::connect(ingress).await?;
    stream.set_nodelay(true)?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    let conn = tokio::spawn(conn);
    let req = hyper::Request::get("/cold/www/index.html")
        .header(hyper::header::HOST, "localhost")
        .header(hyper::header::AUTHORIZATION, format!("Bearer {token}"))
        .body(String::new())?;
    let response = tokio::time::timeout(Duration::from_secs(60), sender.send_request(req))
        .await
        .context("no answer from zero within 60 s")??;
    let head = t.elapsed().as_secs_f64() * 1e3;
    let status = response.status();
    let mut body = response.into_body();
    let mut got = Vec::new();
    while let Some(frame) =
        std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx)).await
    {
        if let Ok(data) = frame?.into_data() {
            got.extend_from_slice(&data);
        }
    }
    conn.abort();
    if !status.is_success() || got != BODY {
        bail!(
            "from zero: {status} {:?}",
            String::from_utf8_lossy(&got).trim()
        );
    }
    Ok(head)
}

fn print_tables(o: &Value, b: &WebBench) {
    let f = |v: &Value| v.as_f64().map_or("—".into(), |x| format!("{x:.2}"));
    let (si, sd) = (&o["sequential"]["ingress"], &o["sequential"]["direct"]);
    let (ci, cd) = (&o["concurrent"]["ingress"], &o["concurrent"]["direct"]);
    let c = &o["cold"];
    let diff = |k: &str| match (si[k].as_f64(), sd[k].as_f64()) {
        (Some(a), Some(d)) => format!("{:.2}", a - d),
        _ => "—".into(),
    };
    println!("| metric | n | p50 | p99 | max | requests/s |");
    println!("|---|---|---|---|---|---|");
    let row = |what: &str, v: &Value| {
        println!(
            "| {what} (ms) | {} | {} | {} | {} | {:.0} |",
            v["n"],
            f(&v["p50_ms"]),
            f(&v["p99_ms"]),
            f(&v["max_ms"]),
            v["per_s"].as_f64().unwrap_or(f64::NAN)
        )
    };
    row("one at a time through the ingress", si);
    row(
        "one at a time directly, the same servers on their namespaces' loopback",
        sd,
    );
    println!(
        "| **added by the ingress** (ms) | | **{}** | {} | | |",
        diff("p50_ms"),
        diff("p99_ms")
    );
    for (what, v) in [("through the ingress", ci), ("directly", cd)] {
        row(
            &format!(
                "{} at a time {what}, {} failed,",
                b.concurrency, v["errors"]
            ),
            v,
        );
    }
    println!(
        "| scale from zero to the first byte (ms; p90 for p99 below 100 trials) | {} | {} | {} | {} | |",
        c["n"],
        f(&c["p50_ms"]),
        f(if c["n"].as_u64().unwrap_or(0) < 100 {
            &c["p90_ms"]
        } else {
            &c["p99_ms"]
        }),
        f(&c["max_ms"])
    );
    let cpu = |v: &Value, n: f64| {
        crate::cpu::summary(
            v,
            n,
            ("request", "the load generator", "httpd, kernel, other work"),
        )
    };
    println!();
    println!(
        "CPU, {} at a time through the ingress: {}. Directly: {}.",
        b.concurrency,
        cpu(&ci["cpu"], ci["n"].as_f64().unwrap_or(1.0)),
        cpu(&cd["cpu"], cd["n"].as_f64().unwrap_or(1.0)),
    );
    println!();
    println!(
        "One agent on a test host; 4 containers of busybox `httpd` (`cpu = \"{}\"`, `memory = \"64M\"`) serving a 6-byte file; requests through the ingress carry a bearer token; the load generator is one thread in the root namespace.",
        b.cpu
    );
}
