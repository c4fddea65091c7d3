//! Web endpoints whose requests become inputs (`via = "runtime_api"`), without a container
//! or an ingress: a request goes into the container's server as the ingress's stream
//! would, an HTTP/1.1 client on the runtime API's socket plays the container, and what it
//! answers comes back as the response.

mod support;

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use gantry_agent::invoke::{FunctionServer, StopReason, WebError};
use gantry_shared::protocol::{FunctionRuntime, WebRuntime};
use hyper_util::rt::TokioIo;

use support::*;

/// A web endpoint's server taking requests as inputs, ready.
async fn web_fixture(max_inputs: u32, timeout_ms: u64) -> Fixture {
    let f = fixture_with(FunctionRuntime {
        max_inputs,
        startup_timeout_ms: 60_000,
        timeout_ms,
        web: Some(WebRuntime::RuntimeApi),
    })
    .await;
    f.server.started().await;
    assert!(
        matches!(f.server.web_connect().await, Err(WebError::Refused(_))),
        "no request before ready"
    );
    let ready = post(&f.sock, "/v1/ready", "text/plain", "").await;
    assert_eq!(ready.status, StatusCode::NO_CONTENT);
    f
}

/// Sends `req` the way the ingress does: on a stream the container's server serves. The
/// connection lives in this future: dropping it closes the stream, as a client gone does.
async fn send(server: &FunctionServer, req: Request<Body>) -> Answer {
    let (connection, request) = server.web_connect().await.expect("web connection");
    let (ours, theirs) = tokio::io::duplex(64 << 10);
    tokio::spawn(async move {
        connection.serve(theirs).await;
        drop(request);
    });
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(ours))
        .await
        .expect("handshake");
    tokio::pin!(conn);
    let resp = tokio::select! {
        biased;
        r = sender.send_request(req) => r.expect("response"),
        _ = &mut conn => panic!("the connection closed before the response"),
    };
    // No more requests: the connection ends with this response.
    drop(sender);
    let (parts, body) = resp.into_parts();
    let (body, _) = tokio::join!(axum::body::to_bytes(Body::new(body), usize::MAX), conn);
    let body = body.expect("body").to_vec();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// [`send`] on its own task.
fn spawn_send(f: &Fixture, req: Request<Body>) -> tokio::task::JoinHandle<Answer> {
    let server = f.server.clone();
    tokio::spawn(async move { send(&server, req).await })
}

/// The answer of a request sent with [`spawn_send`], within 5 s.
async fn answer_of(client: tokio::task::JoinHandle<Answer>) -> Answer {
    tokio::time::timeout(Duration::from_secs(5), client)
        .await
        .expect("answered in time")
        .expect("client")
}

fn get_req(path: &str) -> Request<Body> {
    Request::get(path)
        .header("host", "example")
        .body(Body::empty())
        .expect("request")
}

/// `GET /v1/inputs/next` as the container, within 5 s.
async fn next(f: &Fixture) -> Answer {
    tokio::time::timeout(Duration::from_secs(5), get(&f.sock, "/v1/inputs/next"))
        .await
        .expect("an input in time")
}

#[tokio::test]
async fn a_request_is_an_http_input_and_its_answer_the_response() {
    let f = web_fixture(2, 60_000).await;
    let req = Request::post("/items/7?x=1&y=%20")
        .header("host", "example")
        .header("x-trace", "abc")
        .header("content-type", "application/json")
        .body(Body::from(r#"{"a":1}"#))
        .expect("request");
    let client = spawn_send(&f, req);

    let input = next(&f).await;
    assert_eq!(input.status, StatusCode::OK);
    assert_eq!(header(&input, "gantry-input-kind"), "http");
    assert_eq!(header(&input, "gantry-http-method"), "POST");
    assert_eq!(header(&input, "gantry-http-path"), "/items/7");
    assert_eq!(header(&input, "gantry-http-query"), "x=1&y=%20");
    assert_eq!(header(&input, "content-type"), "application/json");
    let sent: Vec<&str> = input
        .headers
        .get_all("gantry-http-header")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    for h in [
        "host: example",
        "x-trace: abc",
        "content-type: application/json",
    ] {
        assert!(sent.contains(&h), "{h} in {sent:?}");
    }
    assert_eq!(input.text(), r#"{"a":1}"#);
    let id = header(&input, "gantry-input-id").to_owned();

    // A malformed answer is refused to the container, which may answer again.
    let bad = call(
        &f.sock,
        "POST",
        &format!("/v1/inputs/{id}/response"),
        &[("gantry-http-status", "99")],
        Vec::new(),
    )
    .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST, "{}", bad.text());
    assert!(bad.text().contains("Gantry-Http-Status"), "{}", bad.text());
    let answered = call(
        &f.sock,
        "POST",
        &format!("/v1/inputs/{id}/response"),
        &[
            ("gantry-http-status", "201"),
            ("gantry-http-header", "x-out: 1"),
            ("gantry-http-header", "set-cookie: a=1"),
            ("content-type", "text/plain"),
        ],
        b"made".to_vec(),
    )
    .await;
    assert_eq!(answered.status, StatusCode::ACCEPTED, "{}", answered.text());

    let resp = answer_of(client).await;
    assert_eq!(resp.status, StatusCode::CREATED);
    assert_eq!(header(&resp, "x-out"), "1");
    assert_eq!(header(&resp, "set-cookie"), "a=1");
    assert_eq!(header(&resp, "content-type"), "text/plain");
    assert_eq!(resp.text(), "made");
    // A web request's answer is the response's alone: nothing goes to the coordinator.
    assert!(f.outputs(0).await.is_empty());

    // The function's error is a 500 that names its type, not its message.
    let client = spawn_send(&f, get_req("/boom"));
    let input = next(&f).await;
    let id = header(&input, "gantry-input-id").to_owned();
    let error = post(
        &f.sock,
        &format!("/v1/inputs/{id}/error"),
        "application/json",
        r#"{"type":"KeyError","message":"secret detail"}"#,
    )
    .await;
    assert_eq!(error.status, StatusCode::ACCEPTED);
    let resp = answer_of(client).await;
    assert_eq!(resp.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(resp.text().contains("KeyError"), "{}", resp.text());
    assert!(!resp.text().contains("secret detail"), "{}", resp.text());
}

#[tokio::test]
async fn limits_timeouts_a_client_gone_and_a_drain() {
    let mut f = web_fixture(1, 400).await;

    // Over the payload limit: 413, and no input. An upgrade: 501.
    let big = Request::post("/upload")
        .body(Body::from(vec![b'x'; (2 << 20) + 1]))
        .expect("request");
    let resp = send(&f.server, big).await;
    assert_eq!(
        resp.status,
        StatusCode::PAYLOAD_TOO_LARGE,
        "{}",
        resp.text()
    );
    let upgrade = Request::get("/ws")
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .body(Body::empty())
        .expect("request");
    let resp = send(&f.server, upgrade).await;
    assert_eq!(resp.status, StatusCode::NOT_IMPLEMENTED, "{}", resp.text());
    assert!(resp.text().contains("via = \"port\""), "{}", resp.text());

    // A client that goes away before its input is taken takes it back: the next input
    // handed out is the next request's.
    let gone = tokio::time::timeout(
        Duration::from_millis(100),
        send(&f.server, get_req("/gone")),
    )
    .await;
    assert!(gone.is_err(), "nobody answered");
    tokio::time::sleep(Duration::from_millis(100)).await;

    // Held past the function's timeout: 504, and the container is stopped.
    let client = spawn_send(&f, get_req("/slow"));
    let input = next(&f).await;
    assert_eq!(
        header(&input, "gantry-http-path"),
        "/slow",
        "not the request that went away"
    );
    let resp = answer_of(client).await;
    assert_eq!(resp.status, StatusCode::GATEWAY_TIMEOUT, "{}", resp.text());
    loop {
        if let Seen::Stop(reason) = f.next_seen().await {
            assert!(
                matches!(reason, StopReason::InputTimeout { .. }),
                "{reason:?}"
            );
            break;
        }
    }
}

#[tokio::test]
async fn a_request_the_container_never_took_is_answered_503_by_a_drain() {
    let f = web_fixture(1, 60_000).await;
    let client = spawn_send(&f, get_req("/queued"));
    // Until the container asks for it, the request waits; a drain answers it.
    tokio::time::sleep(Duration::from_millis(200)).await;
    f.server.drain(Duration::from_secs(30));
    let resp = answer_of(client).await;
    assert_eq!(
        resp.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        resp.text()
    );
    assert_eq!(header(&resp, "retry-after"), "1");
    assert!(
        matches!(f.server.web_connect().await, Err(WebError::Refused(_))),
        "no request after a drain"
    );

    // A request waiting when the container ends gets its end too.
    let f = web_fixture(1, 60_000).await;
    let client = spawn_send(&f, get_req("/waiting"));
    tokio::time::sleep(Duration::from_millis(200)).await;
    f.invoke.close(&f.id).await;
    let resp = answer_of(client).await;
    assert_eq!(
        resp.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        resp.text()
    );
}

#[tokio::test]
async fn a_web_requests_input_streams_no_chunks() {
    let f = web_fixture(1, 60_000).await;
    let client = spawn_send(&f, Request::get("/x").body(Body::empty()).expect("request"));
    let next = get(&f.sock, "/v1/inputs/next").await;
    assert_eq!(header(&next, "gantry-input-kind"), "http");
    let id = header(&next, "gantry-input-id").to_owned();
    let a = post_input(&f.sock, &id, "stream", "x").await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert!(a.text().contains("web request"), "{}", a.text());
    let a = post_input(&f.sock, &id, "response", "ok").await;
    assert_eq!(a.status, StatusCode::ACCEPTED);
    assert_eq!(answer_of(client).await.status, StatusCode::OK);
}
