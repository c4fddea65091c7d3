//! `POST /v1/inputs/{id}/stream` over the runtime API's real unix socket: what it accepts
//! and refuses, and that an input's chunks are queued for the coordinator in order and
//! before its answer.

mod support;

use axum::http::StatusCode;
use gantry_agent::invoke::Report;
use gantry_shared::calls::{InputResult, Payload};
use gantry_shared::chunks::{MAX_CHUNK_BYTES, MAX_CHUNK_BYTES_PER_INPUT};
use gantry_shared::now_ms;

use support::*;

/// A ready server holding input 0 (taken with `next`); its id.
async fn holding_one(f: &Fixture) -> String {
    f.server.started().await;
    post(&f.sock, "/v1/ready", "text/plain", "").await;
    f.server
        .deliver(vec![input(0, now_ms() + 60_000, "x")])
        .expect("deliver");
    let a = get(&f.sock, "/v1/inputs/next").await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    assert_eq!(header(&a, "gantry-input-kind"), "call");
    header(&a, "gantry-input-id").to_owned()
}

#[tokio::test]
async fn chunks_go_in_order_before_the_answer() {
    let f = fixture(1, 60_000).await;
    let id = holding_one(&f).await;
    let path = format!("/v1/inputs/{id}/stream");
    for n in 0..3 {
        let a = post(&f.sock, &path, "text/plain", &format!("chunk-{n}")).await;
        assert_eq!(a.status, StatusCode::ACCEPTED, "{}", a.text());
    }
    // No Content-Type: the default.
    let a = call(&f.sock, "POST", &path, &[], b"\xff".to_vec()).await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{}", a.text());
    let a = post(
        &f.sock,
        &format!("/v1/inputs/{id}/response"),
        "text/plain",
        "done",
    )
    .await;
    assert_eq!(a.status, StatusCode::ACCEPTED);
    let reports = f.reports();
    let [
        Report::Chunk(c0),
        Report::Chunk(c1),
        Report::Chunk(c2),
        Report::Chunk(c3),
        Report::Output(o),
    ] = &reports[..]
    else {
        panic!("four chunks, then the answer: {reports:?}");
    };
    for (n, c) in [c0, c1, c2].into_iter().enumerate() {
        assert_eq!(c.seq, n as u64);
        assert_eq!(c.attempt, 2);
        assert_eq!(c.attempt_ref, attempt());
        assert_eq!(c.payload, Payload::text(&format!("chunk-{n}")));
        let item = c.to_item();
        assert_eq!((item.seq, item.input.as_str()), (n as u64, id.as_str()));
    }
    assert_eq!(
        c3.payload,
        Payload::new(Payload::DEFAULT_CONTENT_TYPE, vec![0xff])
    );
    assert_eq!(o.result, InputResult::Output(Payload::text("done")));
    // Answered: no more chunks.
    let a = post(&f.sock, &path, "text/plain", "late").await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    assert!(a.text().contains("not held"), "{}", a.text());
}

#[tokio::test]
async fn refusals_unknown_too_large_bad_type_and_full() {
    let f = fixture(1, 60_000).await;
    let id = holding_one(&f).await;
    let path = format!("/v1/inputs/{id}/stream");
    // Unknown input, not even an id.
    let a = post(
        &f.sock,
        "/v1/inputs/fc-1-00000009/stream",
        "text/plain",
        "x",
    )
    .await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    let a = post(&f.sock, "/v1/inputs/BAD%20ID/stream", "text/plain", "x").await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    // Over 1 MiB.
    let big = vec![b'a'; MAX_CHUNK_BYTES + 1];
    let a = call(
        &f.sock,
        "POST",
        &path,
        &[("content-type", "text/plain")],
        big,
    )
    .await;
    assert_eq!(a.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(a.text().contains("split it"), "{}", a.text());
    // A content type that is not printable ASCII.
    let a = call(
        &f.sock,
        "POST",
        &path,
        &[("content-type", "a\tb")],
        b"x".to_vec(),
    )
    .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST, "{}", a.text());
    assert!(f.reports().is_empty(), "nothing refused was queued");
    // 64 MiB streamed: the next chunk is refused, the answer still works.
    let full = vec![b'a'; MAX_CHUNK_BYTES];
    for _ in 0..(MAX_CHUNK_BYTES_PER_INPUT / MAX_CHUNK_BYTES as u64) {
        let a = call(&f.sock, "POST", &path, &[], full.clone()).await;
        assert_eq!(a.status, StatusCode::ACCEPTED, "{}", a.text());
        // The control session takes them meanwhile (the queue is bounded).
        f.take_reports();
    }
    let a = post(&f.sock, &path, "text/plain", "x").await;
    assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(a.text().contains("stop streaming"), "{}", a.text());
    let a = post_input(&f.sock, &id, "response", "ok").await;
    assert_eq!(a.status, StatusCode::ACCEPTED);
    // Cancelled: 404 as for an answer.
    f.server
        .deliver(vec![input(1, now_ms() + 60_000, "x")])
        .expect("deliver");
    let a = get(&f.sock, "/v1/inputs/next").await;
    let second = header(&a, "gantry-input-id").to_owned();
    f.server.cancel_input(
        &second.parse().expect("id"),
        std::time::Duration::from_secs(30),
    );
    let a = post(
        &f.sock,
        &format!("/v1/inputs/{second}/stream"),
        "text/plain",
        "x",
    )
    .await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
}
