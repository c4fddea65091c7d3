//! What the runtime API's tests share: a server on a real unix socket in a temporary
//! directory, a recorder standing in for the rest of the agent, and an HTTP/1.1 client.
#![allow(dead_code)] // each test crate uses some of it

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode};
use gantry_agent::invoke::{
    Container, FunctionServer, Invoke, InvokeConfig, OutputReport, Report, StopReason,
};
use gantry_shared::calls::{LeasedInput, Payload};
use gantry_shared::protocol::{Event, FunctionRuntime};
use gantry_shared::{AttemptRef, CallId, ContainerId, Generation, InputId, Owner, WarmId};
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// What the server asked of the rest of the agent.
#[derive(Debug)]
pub enum Seen {
    Event(Event),
    Stop(StopReason),
}

pub struct Recorder(pub mpsc::Sender<Seen>);

impl Container for Recorder {
    fn event(&self, event: Event) {
        let _ = self.0.try_send(Seen::Event(event));
    }
    fn stop(&self, reason: StopReason) {
        let _ = self.0.try_send(Seen::Stop(reason));
    }
}

pub struct Fixture {
    pub _dir: tempfile::TempDir,
    pub invoke: Invoke,
    pub server: Arc<FunctionServer>,
    pub id: ContainerId,
    pub seen: mpsc::Receiver<Seen>,
    pub sock: PathBuf,
}

pub fn attempt() -> AttemptRef {
    AttemptRef {
        owner: Owner::Function(WarmId::new("w-1").expect("warm id")),
        generation: Generation(3),
    }
}

pub async fn fixture(max_inputs: u32, startup_timeout_ms: u64) -> Fixture {
    fixture_with(FunctionRuntime {
        max_inputs,
        startup_timeout_ms,
        timeout_ms: 60_000,
        web: None,
    })
    .await
}

/// A server for a container with `runtime`.
pub async fn fixture_with(runtime: FunctionRuntime) -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = InvokeConfig::new(dir.path().join("invoke"));
    config.events_poll = Duration::from_millis(300);
    let invoke = Invoke::new(config, CancellationToken::new());
    let attempt = attempt();
    let id = attempt.owner.container_id(attempt.generation).expect("id");
    let (tx, seen) = mpsc::channel(64);
    let server = invoke
        .open(&id, attempt, &runtime, Arc::new(Recorder(tx)))
        .expect("bind");
    let sock = server.socket();
    assert_eq!(sock, invoke.dir(&id).join("runtime.sock"));
    Fixture {
        _dir: dir,
        invoke,
        server,
        id,
        seen,
        sock,
    }
}

impl Fixture {
    pub async fn next_seen(&mut self) -> Seen {
        tokio::time::timeout(Duration::from_secs(5), self.seen.recv())
            .await
            .expect("the server did something in time")
            .expect("recorder open")
    }

    pub async fn no_more_seen(&mut self) {
        if let Ok(Some(s)) =
            tokio::time::timeout(Duration::from_millis(200), self.seen.recv()).await
        {
            panic!("unexpected: {s:?}");
        }
    }

    /// The answers queued for the coordinator, waiting up to 5 s for `n` of them.
    pub async fn outputs(&self, n: usize) -> Vec<OutputReport> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let all: Vec<OutputReport> = self
                .reports()
                .into_iter()
                .filter_map(|r| match r {
                    Report::Output(o) => Some(o),
                    Report::Chunk(_) => None,
                })
                .collect();
            if all.len() >= n || tokio::time::Instant::now() > deadline {
                return all;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Everything queued for the coordinator now (answers and chunks), in order.
    pub fn reports(&self) -> Vec<Report> {
        self.invoke
            .outputs()
            .pending(&HashSet::new(), usize::MAX)
            .into_iter()
            .map(|(_, r)| r)
            .collect()
    }

    /// Takes everything queued for the coordinator, as the control session would.
    pub fn take_reports(&self) -> Vec<Report> {
        let outputs = self.invoke.outputs();
        let all = outputs.pending(&HashSet::new(), usize::MAX);
        for (seq, _) in &all {
            outputs.done(*seq);
        }
        all.into_iter().map(|(_, r)| r).collect()
    }
}

pub fn input(n: u32, deadline_ms: u64, body: &str) -> LeasedInput {
    let call = CallId::new("fc-1").expect("call id");
    LeasedInput {
        id: InputId::of(&call, n),
        call,
        attempt: 2,
        deadline_ms,
        payload: Payload::new("application/json", body.as_bytes().to_vec()),
    }
}

pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One HTTP/1.1 request on its own connection to the socket.
pub async fn call(
    sock: &Path,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> Answer {
    let stream = UnixStream::connect(sock).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    let conn = tokio::spawn(conn);
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "gantry");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = sender
        .send_request(req.body(Body::from(body)).expect("request"))
        .await
        .expect("response");
    let (parts, body) = resp.into_parts();
    let body = axum::body::to_bytes(Body::new(body), usize::MAX)
        .await
        .expect("body")
        .to_vec();
    drop(sender);
    conn.abort();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

pub async fn get(sock: &Path, path: &str) -> Answer {
    call(sock, "GET", path, &[], Vec::new()).await
}

pub async fn post(sock: &Path, path: &str, content_type: &str, body: &str) -> Answer {
    call(
        sock,
        "POST",
        path,
        &[("content-type", content_type)],
        body.as_bytes().to_vec(),
    )
    .await
}

/// `POST /v1/inputs/{id}/{what}` (`response`, `stream`) with a `text/plain` body.
pub async fn post_input(sock: &Path, id: &str, what: &str, body: &str) -> Answer {
    post(sock, &format!("/v1/inputs/{id}/{what}"), "text/plain", body).await
}

pub fn header<'a>(a: &'a Answer, name: &str) -> &'a str {
    a.headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_else(|| panic!("header {name} in {:?}", a.headers))
}
