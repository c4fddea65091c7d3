//! The runtime API of function containers over its real unix socket, without a container:
//! an HTTP/1.1 client on the socket plays the container, a recorder plays the rest of the
//! agent (events and stops), and the answers are read from the real output queue.

mod support;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use gantry_agent::invoke::StopReason;
use gantry_shared::calls::{FailureCause, InputResult, Payload};
use gantry_shared::protocol::{Event, FunctionRuntime};
use gantry_shared::{CallId, ContainerId, InputId, now_ms};
use tokio::net::UnixStream;
use tokio::sync::mpsc;

use support::*;

#[tokio::test]
async fn ready_next_response_and_the_output() {
    let mut f = fixture(1, 60_000).await;
    // Ready before the container counts as started waits for it (Started goes first).
    assert_eq!(
        post(&f.sock, "/v1/ready", "text/plain", "").await.status,
        StatusCode::NO_CONTENT
    );
    f.no_more_seen().await;
    f.server.started().await;
    let Seen::Event(Event::Ready {
        owner, generation, ..
    }) = f.next_seen().await
    else {
        panic!("ready");
    };
    assert_eq!((owner, generation), (attempt().owner, attempt().generation));

    let deadline = now_ms() + 60_000;
    f.server
        .deliver(vec![input(0, deadline, r#"{"x":1}"#)])
        .expect("deliver");
    let a = get(&f.sock, "/v1/inputs/next").await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    assert_eq!(a.text(), r#"{"x":1}"#);
    let id = InputId::of(&CallId::new("fc-1").expect("call"), 0);
    assert_eq!(header(&a, "gantry-input-id"), id.as_str());
    assert_eq!(header(&a, "gantry-call-id"), "fc-1");
    assert_eq!(header(&a, "gantry-attempt"), "2");
    assert_eq!(header(&a, "gantry-deadline-ms"), deadline.to_string());
    assert_eq!(header(&a, "content-type"), "application/json");

    let before = now_ms();
    let path = format!("/v1/inputs/{id}/response");
    let a = post(&f.sock, &path, "text/plain", "out").await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{}", a.text());
    let outputs = f.outputs(1).await;
    let [o] = &outputs[..] else {
        panic!("one output: {outputs:?}");
    };
    assert_eq!(o.input, id);
    assert_eq!(o.attempt, 2);
    assert_eq!(o.attempt_ref, attempt());
    assert!(o.at_ms >= before);
    assert_eq!(
        o.result,
        InputResult::Output(Payload::new("text/plain", b"out".to_vec()))
    );
    let item = o.to_item();
    assert_eq!((item.input, item.attempt), (id.clone(), 2));

    // Answered already, unknown, or not even an id: 404 with a message.
    let a = post(&f.sock, &path, "text/plain", "again").await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    assert!(a.text().contains("not held"), "{}", a.text());
    let a = post(
        &f.sock,
        "/v1/inputs/fc-1-00000009/response",
        "text/plain",
        "x",
    )
    .await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    let a = post(
        &f.sock,
        "/v1/inputs/BAD%20ID/error",
        "application/json",
        "{}",
    )
    .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST, "bad body checked first");
    f.no_more_seen().await;
}

#[tokio::test]
async fn errors_bodies_and_limits() {
    let mut f = fixture(2, 60_000).await;
    f.server.started().await;
    for n in 0..2 {
        f.server
            .deliver(vec![input(n, now_ms() + 60_000, "x")])
            .expect("deliver");
    }
    let first = get(&f.sock, "/v1/inputs/next").await;
    let second = get(&f.sock, "/v1/inputs/next").await;
    let (first, second) = (
        header(&first, "gantry-input-id").to_owned(),
        header(&second, "gantry-input-id").to_owned(),
    );

    let path = format!("/v1/inputs/{first}/error");
    let a = post(
        &f.sock,
        &path,
        "application/json",
        r#"{"type": "ValueError"}"#,
    )
    .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert!(a.text().contains("missing field `message`"), "{}", a.text());
    let a = post(&f.sock, &path, "application/json", "not json").await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    let a = post(
        &f.sock,
        &path,
        "application/json",
        r#"{"type": "ValueError", "message": "bad x", "traceback": "line 1"}"#,
    )
    .await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{}", a.text());
    let outputs = f.outputs(1).await;
    let [o] = &outputs[..] else {
        panic!("one output: {outputs:?}");
    };
    let InputResult::Error(e) = &o.result else {
        panic!("an error: {o:?}");
    };
    assert_eq!(e.cause, FailureCause::User);
    assert_eq!(
        (
            e.error_type.as_str(),
            e.message.as_str(),
            e.traceback.as_deref()
        ),
        ("ValueError", "bad x", Some("line 1"))
    );

    // Over the inline limit: 413, and the input is still held.
    let big = "x".repeat(Payload::MAX_BYTES + 1);
    let path = format!("/v1/inputs/{second}/response");
    let a = post(&f.sock, &path, "text/plain", &big).await;
    assert_eq!(a.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(a.text().contains("inline"), "{}", a.text());
    let exact = "y".repeat(Payload::MAX_BYTES);
    let a = post(&f.sock, &path, "application/octet-stream", &exact).await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{}", a.text());
    assert_eq!(f.outputs(2).await.len(), 2);
    f.no_more_seen().await;
}

#[tokio::test]
async fn next_waits_for_a_delivery_and_max_inputs_holds() {
    let mut f = fixture(2, 60_000).await;
    f.server.started().await;
    // Two `next` calls wait; a third is one too many.
    let sock = f.sock.clone();
    let waiting: Vec<_> = (0..2)
        .map(|_| {
            let sock = sock.clone();
            tokio::spawn(async move { get(&sock, "/v1/inputs/next").await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let a = get(&f.sock, "/v1/inputs/next").await;
    assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(a.text().contains("GANTRY_MAX_INPUTS"), "{}", a.text());
    for n in 0..2 {
        f.server
            .deliver(vec![input(n, now_ms() + 60_000, "x")])
            .expect("deliver");
    }
    let mut ids = HashSet::new();
    for w in waiting {
        let a = w.await.expect("join");
        assert_eq!(a.status, StatusCode::OK);
        ids.insert(header(&a, "gantry-input-id").to_owned());
    }
    assert_eq!(ids.len(), 2);
    // Both held: still too many.
    f.server
        .deliver(vec![input(2, now_ms() + 60_000, "x")])
        .expect("deliver");
    assert_eq!(
        get(&f.sock, "/v1/inputs/next").await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    // One answered: its slot takes the queued input.
    let one = ids.iter().next().expect("an id").clone();
    let path = format!("/v1/inputs/{one}/response");
    assert_eq!(
        post(&f.sock, &path, "text/plain", "ok").await.status,
        StatusCode::ACCEPTED
    );
    let a = get(&f.sock, "/v1/inputs/next").await;
    assert_eq!(a.status, StatusCode::OK);
    assert!(header(&a, "gantry-input-id").ends_with("00000002"));

    // A waiting `next` that goes away frees its slot.
    let f2 = fixture(1, 60_000).await;
    let sock = f2.sock.clone();
    let gone = tokio::spawn(async move { get(&sock, "/v1/inputs/next").await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    gone.abort();
    let _ = gone.await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    f2.server
        .deliver(vec![input(0, now_ms() + 60_000, "x")])
        .expect("deliver");
    assert_eq!(
        get(&f2.sock, "/v1/inputs/next").await.status,
        StatusCode::OK
    );
    f.no_more_seen().await;
}

#[tokio::test]
async fn drain_answers_gone_tells_the_container_and_stops_it_after_the_grace() {
    let mut f = fixture(2, 60_000).await;
    f.server.started().await;
    let sock = f.sock.clone();
    let waiting = tokio::spawn(async move { get(&sock, "/v1/inputs/next").await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    f.server.drain(Duration::from_millis(300));
    assert!(!f.server.accepting());
    assert_eq!(waiting.await.expect("join").status, StatusCode::GONE);
    let a = get(&f.sock, "/v1/inputs/next").await;
    assert_eq!(a.status, StatusCode::GONE);
    assert!(a.text().contains("draining"), "{}", a.text());
    let a = get(&f.sock, "/v1/events").await;
    assert_eq!(a.status, StatusCode::OK);
    let events: serde_json::Value = serde_json::from_slice(&a.body).expect("json");
    assert_eq!(events, serde_json::json!([{"type": "drain"}]));
    assert!(
        f.server
            .deliver(vec![input(0, now_ms() + 60_000, "x")])
            .is_err(),
        "a draining container takes no input"
    );
    let Seen::Stop(StopReason::Drained) = f.next_seen().await else {
        panic!("stopped after the grace");
    };
}

#[tokio::test]
async fn preemption_tells_the_deadline_then_drains_and_stops_at_it() {
    let mut f = fixture(2, 60_000).await;
    f.server.started().await;
    let deadline = now_ms() + 400;
    f.server.preempt(deadline);
    let a = get(&f.sock, "/v1/events").await;
    assert_eq!(a.status, StatusCode::OK);
    let events: serde_json::Value = serde_json::from_slice(&a.body).expect("json");
    assert_eq!(
        events,
        serde_json::json!([{"type": "preempt", "deadline_ms": deadline}, {"type": "drain"}])
    );
    assert_eq!(
        get(&f.sock, "/v1/inputs/next").await.status,
        StatusCode::GONE
    );
    let Seen::Stop(StopReason::Drained) = f.next_seen().await else {
        panic!("stopped at the deadline");
    };
    assert!(now_ms() >= deadline, "not stopped before the deadline");
}

#[tokio::test]
async fn cancel_is_an_event_and_a_stop_if_still_held() {
    let mut f = fixture(2, 60_000).await;
    f.server.started().await;
    for n in 0..2 {
        f.server
            .deliver(vec![input(n, now_ms() + 60_000, "x")])
            .expect("deliver");
    }
    let a = get(&f.sock, "/v1/inputs/next").await;
    let b = get(&f.sock, "/v1/inputs/next").await;
    let (a, b) = (
        header(&a, "gantry-input-id").to_owned(),
        header(&b, "gantry-input-id").to_owned(),
    );
    // Nothing yet: the poll answers 204 after its wait.
    assert_eq!(
        get(&f.sock, "/v1/events").await.status,
        StatusCode::NO_CONTENT
    );
    // A waiting poll is woken by the cancel.
    let sock = f.sock.clone();
    let poll = tokio::spawn(async move { get(&sock, "/v1/events").await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let grace = Duration::from_millis(400);
    f.server
        .cancel_input(&InputId::new(a.clone()).expect("id"), grace);
    f.server
        .cancel_input(&InputId::new(b.clone()).expect("id"), grace);
    let mut events = Vec::new();
    let first = poll.await.expect("join");
    assert_eq!(first.status, StatusCode::OK);
    events.extend(serde_json::from_slice::<Vec<serde_json::Value>>(&first.body).expect("json"));
    if events.len() < 2 {
        let more = get(&f.sock, "/v1/events").await;
        events.extend(serde_json::from_slice::<Vec<serde_json::Value>>(&more.body).expect("json"));
    }
    assert_eq!(
        events,
        [
            serde_json::json!({"type": "cancel", "input": a}),
            serde_json::json!({"type": "cancel", "input": b}),
        ]
    );
    // Answering a cancelled input: 404, not reported. `b` stays held: the container stops.
    let path = format!("/v1/inputs/{a}/response");
    assert_eq!(
        post(&f.sock, &path, "text/plain", "late").await.status,
        StatusCode::NOT_FOUND
    );
    let Seen::Stop(StopReason::Cancelled { input }) = f.next_seen().await else {
        panic!("stopped for the cancelled input");
    };
    assert_eq!(input.as_str(), b);
    assert!(f.outputs(0).await.is_empty());
}

#[tokio::test]
async fn an_input_past_its_deadline_times_out_and_stops_the_container() {
    let mut f = fixture(1, 60_000).await;
    f.server.started().await;
    f.server
        .deliver(vec![input(0, now_ms() + 300, "x")])
        .expect("deliver");
    let a = get(&f.sock, "/v1/inputs/next").await;
    assert_eq!(a.status, StatusCode::OK);
    let Seen::Stop(StopReason::InputTimeout { input }) = f.next_seen().await else {
        panic!("stopped for the timeout");
    };
    assert_eq!(input.as_str(), header(&a, "gantry-input-id"));
    let outputs = f.outputs(1).await;
    let [o] = &outputs[..] else {
        panic!("one output: {outputs:?}");
    };
    let InputResult::Error(e) = &o.result else {
        panic!("an error: {o:?}");
    };
    assert_eq!(e.cause, FailureCause::Timeout);
    assert_eq!(e.error_type, "Timeout");
    assert!(e.message.contains("timeout"), "{}", e.message);
    // A late answer is not taken.
    let path = format!("/v1/inputs/{input}/response");
    assert_eq!(
        post(&f.sock, &path, "text/plain", "late").await.status,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn setup_failures_init_error_and_startup_timeout() {
    let mut f = fixture(1, 60_000).await;
    f.server.started().await;
    let a = post(
        &f.sock,
        "/v1/init/error",
        "application/json",
        r#"{"message": "x"}"#,
    )
    .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    let a = post(
        &f.sock,
        "/v1/init/error",
        "application/json",
        r#"{"type": "ImportError", "message": "no module named torch", "traceback": "tb"}"#,
    )
    .await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{}", a.text());
    let Seen::Event(Event::InitFailed { message, .. }) = f.next_seen().await else {
        panic!("init failed");
    };
    assert_eq!(message, "ImportError: no module named torch\ntb");
    let Seen::Stop(StopReason::InitFailed { .. }) = f.next_seen().await else {
        panic!("stopped");
    };
    assert_eq!(
        post(&f.sock, "/v1/ready", "text/plain", "").await.status,
        StatusCode::CONFLICT
    );

    let mut f = fixture(1, 200).await;
    f.server.started().await;
    let Seen::Event(Event::InitFailed { message, .. }) = f.next_seen().await else {
        panic!("init failed");
    };
    assert!(message.contains("startup timeout of 200 ms"), "{message}");
    let Seen::Stop(StopReason::InitFailed { .. }) = f.next_seen().await else {
        panic!("stopped");
    };
}

#[tokio::test]
async fn closing_stops_the_server_and_leaves_nothing() {
    let mut f = fixture(1, 60_000).await;
    f.server.started().await;
    // A call waiting when the container ends gets an answer, not a hang.
    let sock = f.sock.clone();
    let waiting = tokio::spawn(async move { get(&sock, "/v1/inputs/next").await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let dir = f.invoke.dir(&f.id);
    assert!(dir.join("runtime.sock").exists());
    tokio::time::timeout(Duration::from_secs(5), f.invoke.close(&f.id))
        .await
        .expect("closed in time");
    assert_eq!(
        waiting.await.expect("join").status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert!(!dir.exists(), "the directory is removed");
    assert!(UnixStream::connect(&f.sock).await.is_err());
    assert!(f.invoke.get(&f.id).is_none());
    f.no_more_seen().await;

    // A leftover directory of a container without a server is swept.
    let stale = f.invoke.dir(&ContainerId::new("w-2-g1").expect("id"));
    std::fs::create_dir_all(&stale).expect("mkdir");
    f.invoke.sweep(|_| false);
    assert!(!stale.exists());
    // A server for the same container can be bound again (a stale socket is replaced).
    let (tx, _rx) = mpsc::channel(1);
    let again = f
        .invoke
        .open(
            &f.id,
            attempt(),
            &FunctionRuntime {
                max_inputs: 1,
                startup_timeout_ms: 1_000,
                timeout_ms: 60_000,
                web: None,
            },
            Arc::new(Recorder(tx)),
        )
        .expect("rebind");
    assert_eq!(
        post(&again.socket(), "/v1/ready", "text/plain", "")
            .await
            .status,
        StatusCode::NO_CONTENT
    );
    f.invoke.shutdown().await;
}
