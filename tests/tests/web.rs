//! Web endpoints end to end with real processes and real containers: busybox `httpd` (and
//! an `nc` upgrade server) as functions (contract H), and the echo runtime taking requests
//! as inputs (contract P), behind the coordinator's ingress. A request to an endpoint at
//! zero is held while its container starts and is answered; a token is required unless
//! the endpoint is public; requests beyond `max_concurrency` wait and the endpoint scales
//! out; beyond `max_pending` they get 429, and one held past `startup_timeout` + 30 s for a
//! container that never gets ready gets 504; idle containers drain and stop, during traffic
//! too, losing no request; an event stream arrives event by event; an upgraded connection
//! carries bytes both ways; a new version takes new requests while one in flight finishes
//! on the old; kill -9 of the serving host answers an idempotent request elsewhere and
//! fails a POST with 502, never hanging; a request as an input carries its method, path,
//! query, headers and body, and its answer's status, headers and body come back. (A real
//! WebSocket: `websocket.rs`.)

use std::time::{Duration, Instant};

use gantry_tests::cluster::{ClusterSpec, TestCluster, live_containers};
use gantry_tests::netns::wait_until;
use serde_json::Value;

/// A busybox `httpd` serving `/tmp/www` on `$PORT`: `index.html` says hello; the CGI
/// `/cgi-bin/slow` answers after a second (its head at once), `/cgi-bin/slow3` after three
/// (nothing before), and
/// `/cgi-bin/events` sends an event, waits two seconds and sends another.
const HTTPD: &str = r#"["sh", "-c", "mkdir -p /tmp/www/cgi-bin && cd /tmp/www && echo hello > index.html && printf '#!/bin/sh\necho Content-Type: text/plain\necho\nsleep 1\necho slow\n' > cgi-bin/slow && printf '#!/bin/sh\nsleep 3\necho Content-Type: text/plain\necho\necho slow\n' > cgi-bin/slow3 && printf '#!/bin/sh\necho Content-Type: text/event-stream\necho\necho data: one\necho\nsleep 2\necho data: two\necho\n' > cgi-bin/events && chmod +x cgi-bin/* && exec httpd -f -p $PORT -h /tmp/www"]"#;

fn cluster(agents: usize) -> TestCluster {
    TestCluster::start(ClusterSpec {
        agents,
        busybox: true,
        ..ClusterSpec::default()
    })
}

fn ingress_get(c: &TestCluster, path: &str, token: Option<&str>) -> (u16, String) {
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("client");
    let mut req = client.get(format!("http://{}{path}", c.ingress));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let r = req.send().expect("ingress request");
    let status = r.status().as_u16();
    (status, r.text().expect("body"))
}

/// The agent whose host runs a container of the functions (by its `GANTRY_CONTAINER`).
fn host_with_a_container(c: &TestCluster) -> Option<usize> {
    c.agents.iter().position(|a| {
        a.host.pids().into_iter().any(|pid| {
            std::fs::read(format!("/proc/{pid}/environ")).is_ok_and(|env| {
                env.split(|b| *b == 0)
                    .any(|v| v.starts_with(b"GANTRY_CONTAINER="))
            })
        })
    })
}

#[test]
fn a_web_endpoint_at_zero_answers_its_first_request_and_drains_when_idle() {
    let c = cluster(1);
    c.deploy(&format!(
        r#"
app = "site"
[functions.www]
image = "busybox"
command = {HTTPD}
cpu = "0.2"
memory = "64M"
scaledown_window = "2s"
startup_timeout = "20s"
[functions.www.web]
port = 8000
readiness = "GET /index.html"

[functions.open_door]
image = "busybox"
command = {HTTPD}
cpu = "0.2"
memory = "64M"
scaledown_window = "2s"
[functions.open_door.web]
public = true
"#
    ));
    assert_eq!(
        live_containers(&c.function_view("site", "www")),
        0,
        "nothing runs before a request"
    );

    // The first request is held while a container starts, then answered.
    let t0 = Instant::now();
    let (status, body) = ingress_get(&c, "/site/www/index.html", Some(&c.admin));
    assert_eq!((status, body.trim()), (200, "hello"), "the first request");
    eprintln!(
        "web: first request from zero answered in {:?}",
        t0.elapsed()
    );
    let (status, body) = ingress_get(&c, "/site/www/cgi-bin/slow", Some(&c.admin));
    assert_eq!((status, body.trim()), (200, "slow"));
    assert_eq!(
        live_containers(&c.function_view("site", "www")),
        1,
        "one container serves both"
    );
    // Requests count as the function's inputs (once their connection ended): in /metrics,
    // with their wait for a container as `queued`, and in the recent latencies.
    let series = [
        "gantry_input_phase_seconds_count{function=\"site/www\",phase=\"queued\"} 2",
        "gantry_input_phase_seconds_count{function=\"site/www\",phase=\"total\"} 2",
        "gantry_inputs_ended_total{function=\"site/www\",outcome=\"succeeded\"} 2",
    ];
    wait_until("both requests in /metrics", Duration::from_secs(10), || {
        let metrics = c.http().get(c.url("/metrics")).send().ok()?.text().ok()?;
        series.iter().all(|s| metrics.contains(s)).then_some(())
    });
    assert_eq!(c.function_view("site", "www")["ended_last_minute"], 2);

    // A token is needed unless the endpoint is public; unknown endpoints are 404.
    let (status, body) = ingress_get(&c, "/site/www/index.html", None);
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("Bearer"), "{body}");
    let (status, body) = ingress_get(&c, "/site/www/index.html", Some("not-a-token"));
    assert_eq!(status, 401, "{body}");
    let (status, body) = ingress_get(&c, "/site/open-door/index.html", None);
    assert_eq!((status, body.trim()), (200, "hello"), "a public endpoint");
    assert_eq!(namespace_threads(&c), 2, "one per web container");
    let (status, body) = ingress_get(&c, "/site/nothing/", Some(&c.admin));
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("/APP/LABEL/"), "{body}");

    // A web endpoint takes no calls.
    let r = c
        .http()
        .post(c.url("/v1/apps/site/functions/www/calls"))
        .bearer_auth(&c.admin)
        .json(&serde_json::json!({"input": {"text": "x"}}))
        .send()
        .expect("call");
    let status = r.status().as_u16();
    let text = r.text().expect("body");
    assert_eq!(status, 409, "{text}");
    assert!(text.contains("/site/www/"), "{text}");

    // Idle past its window, every container drains and stops.
    wait_until(
        "the endpoints back at zero",
        Duration::from_secs(30),
        || {
            let (a, b) = (
                c.function_view("site", "www"),
                c.function_view("site", "open_door"),
            );
            (live_containers(&a) + live_containers(&b) == 0).then_some(())
        },
    );
    // Each web container's namespace thread in the agent ended with it.
    wait_until("no namespace thread left", Duration::from_secs(10), || {
        (namespace_threads(&c) == 0).then_some(())
    });
}

/// The agent's (the first's) threads that make sockets in web containers' namespaces.
fn namespace_threads(c: &TestCluster) -> usize {
    let agent = c.agents[0]
        .proc
        .as_ref()
        .expect("the agent runs")
        .child
        .id();
    std::fs::read_dir(format!("/proc/{agent}/task"))
        .map(|threads| {
            threads
                .flatten()
                .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
                .filter(|name| name.trim() == "gantry-netns")
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn requests_beyond_max_concurrency_wait_and_the_endpoint_scales_out() {
    let c = cluster(2);
    c.deploy(&format!(
        r#"
app = "busy"
[functions.slow]
image = "busybox"
command = {HTTPD}
cpu = "0.2"
memory = "64M"
max_containers = 2
scaledown_window = "2s"
[functions.slow.web]
max_concurrency = 1
target_concurrency = 1
max_pending = 4
"#
    ));
    // Four slow requests at once, at zero: all four wait in the ingress (max_pending 4
    // holds them), two containers start (one request each) and the other two follow.
    let started = Instant::now();
    let results: Vec<(u16, String)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| s.spawn(|| ingress_get(&c, "/busy/slow/cgi-bin/slow", Some(&c.admin))))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("request thread"))
            .collect()
    });
    for (status, body) in &results {
        assert_eq!((*status, body.trim()), (200, "slow"), "{results:?}");
    }
    let f = c.function_view("busy", "slow");
    assert_eq!(
        live_containers(&f),
        2,
        "scaled out to its two containers: {f}"
    );
    eprintln!(
        "web: four 1 s requests on two containers took {:?}",
        started.elapsed()
    );

    // Beyond max_pending (with both containers busy): 429 with Retry-After.
    let statuses: Vec<u16> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|_| s.spawn(|| ingress_get(&c, "/busy/slow/cgi-bin/slow", Some(&c.admin)).0))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("request thread"))
            .collect()
    });
    let refused = statuses.iter().filter(|s| **s == 429).count();
    let served = statuses.iter().filter(|s| **s == 200).count();
    assert_eq!(refused + served, 8, "{statuses:?}");
    assert!(refused >= 1, "eight at once on 2 + 4 places: {statuses:?}");
}

#[test]
fn responses_stream_and_a_request_lost_with_its_node_goes_to_another_if_it_can() {
    let mut c = cluster(2);
    c.deploy(&format!(
        r#"
app = "stream"
[functions.ev]
image = "busybox"
command = {HTTPD}
cpu = "0.2"
memory = "64M"
max_containers = 2
scaledown_window = "60s"
[functions.ev.web]
max_concurrency = 4
"#
    ));
    let (status, _) = ingress_get(&c, "/stream/ev/index.html", Some(&c.admin));
    assert_eq!(status, 200, "warm-up");

    // An event stream arrives event by event, not buffered to its end.
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client");
    let t0 = Instant::now();
    let mut r = client
        .get(format!("http://{}/stream/ev/cgi-bin/events", c.ingress))
        .bearer_auth(&c.admin)
        .send()
        .expect("events");
    assert_eq!(r.status(), 200);
    let mut first = [0u8; 64];
    let n = std::io::Read::read(&mut r, &mut first).expect("the first event");
    let at_first = t0.elapsed();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut r, &mut rest).expect("the rest");
    let at_end = t0.elapsed();
    assert!(
        String::from_utf8_lossy(&first[..n]).contains("data: one") && rest.contains("data: two"),
        "{:?} then {rest:?}",
        String::from_utf8_lossy(&first[..n])
    );
    assert!(
        at_end - at_first >= Duration::from_millis(1500),
        "the first event came at {at_first:?}, the end at {at_end:?}: it was held back"
    );

    // The node serving two slow requests dies under them: the GET (idempotent, no body)
    // is answered by another container; the POST, which cannot be sent again, fails
    // (never hangs).
    let host = host_with_a_container(&c).expect("a host runs the container");
    let url = format!("http://{}/stream/ev/cgi-bin/slow3", c.ingress);
    // Sends `req`; its status and body (or its error), and how long it took.
    let timed = |req: reqwest::blocking::RequestBuilder| {
        let t = Instant::now();
        let r = req.bearer_auth(&c.admin).send();
        (
            r.map(|r| (r.status().as_u16(), r.text().unwrap_or_default())),
            t.elapsed(),
        )
    };
    let (get, post) = std::thread::scope(|s| {
        let get = s.spawn(|| timed(client.get(&url)));
        let post = s.spawn(|| timed(client.post(&url).body("x=1")));
        std::thread::sleep(Duration::from_secs(1));
        c.agents[host].host.kill();
        (get.join().expect("get"), post.join().expect("post"))
    });
    let (get, took) = get;
    let (status, body) = get.expect("the GET is answered");
    assert_eq!((status, body.trim()), (200, "slow"), "after {took:?}");
    eprintln!("web: a GET whose node died was answered elsewhere after {took:?}");
    let (post, took) = post;
    match post {
        Ok((status, body)) => assert_eq!(status, 502, "{body}"),
        Err(e) => panic!("the POST got no answer after {took:?}: {e}"),
    }
    assert!(
        took < Duration::from_secs(25),
        "the POST failed only after {took:?}"
    );
    c.kill_host(host);
}

/// A server that upgrades every connection to a raw echo (`101`, then every byte back): the
/// way WebSocket and other upgrades pass through the ingress.
const UPGRADE: &str = r#"["sh", "-c", "printf '#!/bin/sh\nwhile read -r l; do l=$(printf %s \"$l\" | tr -d \"\\\\r\"); [ -z \"$l\" ] && break; done\nprintf \"HTTP/1.1 101 Switching Protocols\\\\r\\\\nUpgrade: echo\\\\r\\\\nConnection: Upgrade\\\\r\\\\n\\\\r\\\\n\"\nexec cat\n' > /tmp/up && chmod +x /tmp/up && exec nc -ll -p $PORT -e /tmp/up"]"#;

/// A server that answers every request with the request's head as it arrived (its lines
/// joined by `;`).
const HEAD_ECHO: &str = r#"["sh", "-c", "printf '#!/bin/sh\nh=\nwhile read -r l; do l=$(printf %%s \"$l\" | tr -d \"\\\\r\"); [ -z \"$l\" ] && break; h=\"$h$l;\"; done\nprintf \"HTTP/1.1 200 OK\\\\r\\\\nContent-Type: text/plain\\\\r\\\\nConnection: close\\\\r\\\\n\\\\r\\\\n%%s\" \"$h\"\n' > /tmp/head && chmod +x /tmp/head && exec nc -ll -p $PORT -e /tmp/head"]"#;

#[test]
fn an_upgraded_connection_passes_through_and_a_new_version_takes_new_requests() {
    use std::io::{BufRead, BufReader, Write};
    let c = cluster(1);
    let manifest = |version: &str| {
        format!(
            r#"
app = "up"
[functions.echo]
image = "busybox"
command = {UPGRADE}
cpu = "0.2"
memory = "64M"
scaledown_window = "60s"
env = {{ VERSION = "{version}" }}
[functions.echo.web]

[functions.www]
image = "busybox"
command = {HTTPD}
cpu = "0.2"
memory = "64M"
scaledown_window = "60s"
env = {{ VERSION = "{version}" }}
[functions.www.web]

[functions.head]
image = "busybox"
command = {HEAD_ECHO}
cpu = "0.2"
memory = "64M"
[functions.head.web]
"#
        )
    };
    c.deploy(&manifest("1"));

    // What the container gets: the request with its path under the endpoint, without
    // the caller's Gantry token.
    let (status, head) = ingress_get(&c, "/up/head/x/y?z=1", Some(&c.admin));
    assert_eq!(status, 200, "{head}");
    assert!(head.starts_with("GET /x/y?z=1 HTTP/1.1;"), "{head}");
    assert!(
        !head.to_ascii_lowercase().contains("authorization") && !head.contains(&c.admin),
        "the container saw the caller's token: {head}"
    );

    // The upgrade: 101 through the ingress, then bytes both ways.
    let mut s = std::net::TcpStream::connect(&c.ingress).expect("connect to the ingress");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    write!(
        s,
        "GET /up/echo/ HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n",
        c.admin
    )
    .expect("request");
    let mut reader = BufReader::new(s.try_clone().expect("clone"));
    let mut head = String::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).expect("response head");
        if line.trim().is_empty() {
            break;
        }
        head.push_str(&line);
    }
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    for word in ["ping\n", "pong again\n"] {
        s.write_all(word.as_bytes()).expect("write");
        let mut back = String::new();
        reader.read_line(&mut back).expect("echo");
        assert_eq!(back, word, "echoed through the upgraded connection");
    }
    drop((s, reader));

    // A request in flight finishes on the version it went to; the next go to the new one.
    let slow = std::thread::scope(|sc| {
        let slow = sc.spawn(|| ingress_get(&c, "/up/www/cgi-bin/slow", Some(&c.admin)));
        std::thread::sleep(Duration::from_millis(300));
        c.deploy(&manifest("2"));
        slow.join().expect("slow request")
    });
    assert_eq!(
        (slow.0, slow.1.trim()),
        (200, "slow"),
        "the request in flight"
    );
    let (status, body) = ingress_get(&c, "/up/www/index.html", Some(&c.admin));
    assert_eq!((status, body.trim()), (200, "hello"), "on the new version");
    wait_until(
        "version 1 drained, version 2 serving",
        Duration::from_secs(30),
        || {
            let v: Value = c
                .http()
                .get(c.url("/v1/apps/up"))
                .bearer_auth(&c.admin)
                .send()
                .ok()?
                .json()
                .ok()?;
            let live_of = |version: u64| -> u64 {
                v["functions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|f| f["version"] == version && f["name"] == "www")
                    .map(live_containers)
                    .sum()
            };
            (live_of(1) == 0 && live_of(2) == 1).then_some(())
        },
    );
}

#[test]
fn an_endpoint_on_the_runtime_api_takes_each_request_as_an_input() {
    let c = TestCluster::start(ClusterSpec {
        agents: 1,
        echo: true,
        ..ClusterSpec::default()
    });
    c.deploy(
        r#"
app = "api"
[functions.echo]
image = "echo"
command = ["/app/runtime"]
cpu = "0.2"
memory = "64M"
scaledown_window = "60s"
[functions.echo.web]
via = "runtime_api"
max_concurrency = 4
"#,
    );
    // The first request, at zero, waits for the container's `ready`; the echo runtime
    // answers with what the request was (its `x-echo-*` headers) and its body.
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("client");
    let r = client
        .post(format!("http://{}/api/echo/status/201?q=1", c.ingress))
        .bearer_auth(&c.admin)
        .header("x-trace", "t-1")
        .header("content-type", "text/plain")
        .body("hello")
        .send()
        .expect("request");
    let header = |r: &reqwest::blocking::Response, name: &str| {
        r.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    assert_eq!(r.status(), 201);
    for (name, value) in [
        ("x-echo-method", "POST"),
        ("x-echo-path", "/status/201"),
        ("x-echo-query", "q=1"),
        ("x-echo-x-trace", "t-1"),
        ("content-type", "text/plain"),
    ] {
        assert_eq!(header(&r, name).as_deref(), Some(value), "{name}");
    }
    assert!(
        header(&r, "x-echo-authorization").is_none(),
        "the token reached the code"
    );
    assert_eq!(r.text().expect("body"), "hello");

    // The function's error is a 500 naming its type.
    let r = client
        .post(format!("http://{}/api/echo/", c.ingress))
        .bearer_auth(&c.admin)
        .body("fail:no such item")
        .send()
        .expect("request");
    assert_eq!(r.status(), 500);
    assert!(r.text().expect("body").contains("EchoError"));

    // Each request's time is accounted as a call's: the first one's wait was the
    // container's cold start (placement, image, startup), in /metrics.
    let series = [
        "gantry_input_phase_seconds_count{function=\"api/echo\",phase=\"startup\"} 1",
        "gantry_input_phase_seconds_count{function=\"api/echo\",phase=\"placement\"} 1",
        "gantry_input_phase_seconds_count{function=\"api/echo\",phase=\"run\"} 2",
        "gantry_inputs_ended_total{function=\"api/echo\",outcome=\"failed\"} 1",
        "gantry_inputs_ended_total{function=\"api/echo\",outcome=\"succeeded\"} 1",
    ];
    wait_until("both requests in /metrics", Duration::from_secs(10), || {
        let metrics = c.http().get(c.url("/metrics")).send().ok()?.text().ok()?;
        series.iter().all(|s| metrics.contains(s)).then_some(())
    });
    assert_eq!(
        live_containers(&c.function_view("api", "echo")),
        1,
        "one container"
    );
}

#[test]
fn scaling_down_during_traffic_loses_no_request() {
    let c = cluster(1);
    c.deploy(&format!(
        r#"
app = "calm"
[functions.www]
image = "busybox"
command = {HTTPD}
cpu = "0.2"
memory = "64M"
max_containers = 3
scaledown_window = "2s"
[functions.www.web]
max_concurrency = 1
target_concurrency = 1
"#
    ));
    // A burst scales out to three containers.
    let burst: Vec<u16> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..3)
            .map(|_| s.spawn(|| ingress_get(&c, "/calm/www/cgi-bin/slow", Some(&c.admin)).0))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("request thread"))
            .collect()
    });
    assert_eq!(burst, [200, 200, 200]);
    assert_eq!(live_containers(&c.function_view("calm", "www")), 3);

    // Then steady traffic that one container serves: the other two go idle, drain and
    // stop while requests keep coming, and every request is answered.
    let until = Instant::now() + Duration::from_secs(10);
    let mut answered = 0;
    let mut least = u64::MAX;
    while Instant::now() < until {
        let (status, body) = ingress_get(&c, "/calm/www/index.html", Some(&c.admin));
        assert_eq!(
            (status, body.trim()),
            (200, "hello"),
            "request {answered} while scaling down"
        );
        answered += 1;
        least = least.min(live_containers(&c.function_view("calm", "www")));
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("web: {answered} requests answered while scaling down from 3 to {least}");
    assert_eq!(least, 1, "scaled down to one container during the traffic");
}

#[test]
fn a_request_to_an_endpoint_that_never_gets_ready_ends_with_504() {
    let c = cluster(1);
    // The probe asks for a page the server does not have: no container ever gets ready.
    c.deploy(&format!(
        r#"
app = "broken"
[functions.www]
image = "busybox"
command = {HTTPD}
cpu = "0.2"
memory = "64M"
startup_timeout = "1s"
[functions.www.web]
readiness = "GET /health"
"#
    ));
    let t0 = Instant::now();
    let (status, body) = ingress_get(&c, "/broken/www/index.html", Some(&c.admin));
    let took = t0.elapsed();
    assert_eq!(status, 504, "{body}");
    assert!(body.contains("startup_timeout"), "{body}");
    // Held for its startup_timeout (1 s) and 30 s more, not for ever.
    assert!(
        took >= Duration::from_secs(30) && took < Duration::from_secs(50),
        "answered after {took:?}"
    );
}
