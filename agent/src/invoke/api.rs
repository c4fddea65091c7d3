//! The runtime API's HTTP routes: each handler parses its request, asks the inbox, and
//! carries out what it decided. Refusals map to a status in one place ([`ApiError`]) and
//! answer with a plain-text message saying what was wrong.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::StreamExt;
use gantry_shared::calls::{FailureCause, InputFailure, InputResult, LeasedInput, Payload};
use gantry_shared::chunks::MAX_CHUNK_BYTES;
use gantry_shared::now_ms;
use serde::Deserialize;

use super::http_input::{AnswerHead, INPUT_KIND};
use super::outputs::Report;
use super::server::Shared;
use super::state::{InboxError, Next};

/// The longest `type` of an error, in bytes.
const MAX_ERROR_TYPE: usize = 256;
/// How much of an init error (type, message, traceback) goes into `InitFailed`.
const MAX_INIT_MESSAGE: usize = 16 << 10;

pub(super) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/ready", post(ready))
        .route("/v1/init/error", post(init_error))
        .route("/v1/inputs/next", get(next))
        .route("/v1/inputs/{id}/response", post(response))
        .route("/v1/inputs/{id}/error", post(error))
        .route("/v1/inputs/{id}/stream", post(stream))
        .route("/v1/events", get(events))
        // Bodies are read with the payload limit, and a refusal that says so.
        .layer(DefaultBodyLimit::disable())
        .with_state(shared)
}

/// Why a request was refused.
#[derive(Debug, thiserror::Error)]
enum ApiError {
    #[error(transparent)]
    Inbox(#[from] InboxError),
    #[error(
        "the body is over {max} bytes; at most {max} travel inline (store larger data in a \
         volume and return its path)"
    )]
    TooLarge { max: usize },
    #[error("the chunk is over {max} bytes; split it into chunks of at most {max} bytes")]
    ChunkTooLarge { max: usize },
    #[error("{0}")]
    BadBody(String),
    #[error("cannot read the request body: {0}")]
    Read(String),
    #[error("the agent is stopping this container's runtime API")]
    Stopping,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self {
            ApiError::Inbox(InboxError::TooMany { .. }) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Inbox(InboxError::Draining) => StatusCode::GONE,
            ApiError::Inbox(InboxError::NotHeld { .. }) => StatusCode::NOT_FOUND,
            ApiError::Inbox(InboxError::StreamFull { .. }) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Inbox(InboxError::NotCall { .. }) => StatusCode::BAD_REQUEST,
            ApiError::Inbox(
                InboxError::SetupFailed
                | InboxError::AlreadyReady
                | InboxError::NotReady
                | InboxError::NotWeb,
            ) => StatusCode::CONFLICT,
            ApiError::TooLarge { .. } | ApiError::ChunkTooLarge { .. } => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            ApiError::BadBody(_) | ApiError::Read(_) => StatusCode::BAD_REQUEST,
            ApiError::Stopping => StatusCode::SERVICE_UNAVAILABLE,
        };
        let body = format!("{self}\n");
        (
            status,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            body,
        )
            .into_response()
    }
}

/// `POST /v1/ready`: setup is done.
async fn ready(State(s): State<Arc<Shared>>) -> Result<StatusCode, ApiError> {
    let actions = s.inbox().ready(now_ms())?;
    s.apply(actions).await;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /v1/init/error`: setup failed; the container is stopped.
async fn init_error(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Body,
) -> Result<StatusCode, ApiError> {
    let e = error_body(&read_body(&headers, body).await?)?;
    let mut message = format!("{}: {}", e.error_type, e.message);
    if let Some(tb) = e.traceback.filter(|t| !t.is_empty()) {
        message.push('\n');
        message.push_str(&tb);
    }
    truncate(&mut message, MAX_INIT_MESSAGE);
    let actions = s.inbox().init_error(message)?;
    s.apply(actions).await;
    Ok(StatusCode::ACCEPTED)
}

/// `GET /v1/inputs/next`: waits for an input and hands it out.
async fn next(State(s): State<Arc<Shared>>) -> Result<Response, ApiError> {
    s.inbox().begin_next()?;
    // Frees the slot if this call goes away while it waits.
    let mut waiting = Waiting {
        shared: &s,
        waiting: true,
    };
    loop {
        let changed = s.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let found = s.inbox().take_next();
        match found {
            Ok(Next::Input(input)) => {
                waiting.waiting = false;
                s.poke();
                let head = s.pending().head(&input.id);
                let mut response = input_response(input);
                match head {
                    Some(head) => head.describe(response.headers_mut()),
                    None => {
                        let call = HeaderValue::from_static("call");
                        response.headers_mut().insert(INPUT_KIND, call);
                    }
                }
                return Ok(response);
            }
            Ok(Next::Wait) => {}
            Err(e) => {
                waiting.waiting = false;
                return Err(e.into());
            }
        }
        tokio::select! {
            _ = changed => {}
            _ = s.cancel.cancelled() => return Err(ApiError::Stopping),
        }
    }
}

struct Waiting<'a> {
    shared: &'a Shared,
    waiting: bool,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if self.waiting {
            self.shared.inbox().abandon_next();
        }
    }
}

fn input_response(input: LeasedInput) -> Response {
    let content_type = HeaderValue::from_str(&input.payload.content_type)
        .unwrap_or_else(|_| HeaderValue::from_static(Payload::DEFAULT_CONTENT_TYPE));
    let mut response = Response::new(Body::from(input.payload.bytes));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, content_type);
    for (name, value) in [
        ("gantry-input-id", input.id.as_str().to_owned()),
        ("gantry-call-id", input.call.as_str().to_owned()),
        ("gantry-attempt", input.attempt.to_string()),
        ("gantry-deadline-ms", input.deadline_ms.to_string()),
    ] {
        // Ids are labels and numbers are digits: always valid header values.
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert(name, v);
        }
    }
    response
}

/// `POST /v1/inputs/{id}/response`: the input's output (body and `Content-Type`).
async fn response(
    State(s): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<StatusCode, ApiError> {
    let payload = payload(&headers, read_body(&headers, body).await?)?;
    // A web request's input: its answer's status and headers travel with it.
    if let Ok(input) = gantry_shared::InputId::new(id.as_str())
        && s.pending().contains(&input)
    {
        let head = AnswerHead::parse(&headers).map_err(ApiError::BadBody)?;
        s.pending().set_answer(&input, head);
    }
    let actions = s
        .inbox()
        .answer(&id, InputResult::Output(payload), now_ms())?;
    s.apply(actions).await;
    Ok(StatusCode::ACCEPTED)
}

/// The body's bytes with the request's `Content-Type` (default
/// `application/octet-stream`), checked as any payload.
fn payload(headers: &HeaderMap, bytes: Vec<u8>) -> Result<Payload, ApiError> {
    let content_type = match headers.get(header::CONTENT_TYPE) {
        None => Payload::DEFAULT_CONTENT_TYPE.to_owned(),
        Some(v) => v
            .to_str()
            .map_err(|_| ApiError::BadBody("Content-Type must be printable ASCII".into()))?
            .to_owned(),
    };
    let payload = Payload::new(content_type, bytes);
    payload
        .check()
        .map_err(|e| ApiError::BadBody(e.to_string()))?;
    Ok(payload)
}

/// `POST /v1/inputs/{id}/stream`: one chunk the input streams while it runs (a call's
/// input only). It is queued for the coordinator on the answers' path, before any answer
/// decided after it, so the input's chunks all arrive before its answer.
async fn stream(
    State(s): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<StatusCode, ApiError> {
    let bytes = read_limited(&headers, body, MAX_CHUNK_BYTES)
        .await
        .map_err(|e| match e {
            ApiError::TooLarge { max } => ApiError::ChunkTooLarge { max },
            e => e,
        })?;
    let payload = payload(&headers, bytes)?;
    // Room first (waiting while the coordinator is away), then the decision and the
    // queueing together under the inbox's lock: chunks are queued in their order, and
    // before an answer decided after them.
    let place = s.outputs.reserve().await.ok_or(ApiError::Stopping)?;
    let mut inbox = s.inbox();
    let chunk = inbox.stream(&id, payload)?;
    place.push(Report::Chunk(chunk));
    Ok(StatusCode::ACCEPTED)
}

/// `POST /v1/inputs/{id}/error`: the function failed on the input.
async fn error(
    State(s): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<StatusCode, ApiError> {
    let e = error_body(&read_body(&headers, body).await?)?;
    let failure = InputFailure {
        cause: FailureCause::User,
        error_type: e.error_type,
        message: e.message,
        traceback: e.traceback,
    };
    let actions = s
        .inbox()
        .answer(&id, InputResult::Error(failure), now_ms())?;
    s.apply(actions).await;
    Ok(StatusCode::ACCEPTED)
}

/// `GET /v1/events`: the events not yet polled, or 204 after the poll's wait.
async fn events(State(s): State<Arc<Shared>>) -> Response {
    let until = tokio::time::Instant::now() + s.config.events_poll;
    loop {
        let changed = s.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let events = s.inbox().take_events();
        if !events.is_empty() {
            return axum::Json(events).into_response();
        }
        tokio::select! {
            _ = changed => {}
            _ = tokio::time::sleep_until(until) => return StatusCode::NO_CONTENT.into_response(),
            _ = s.cancel.cancelled() => return StatusCode::NO_CONTENT.into_response(),
        }
    }
}

/// `{"type", "message", "traceback"}`.
#[derive(Debug, Deserialize)]
struct ErrorBody {
    #[serde(rename = "type")]
    error_type: String,
    message: String,
    #[serde(default)]
    traceback: Option<String>,
}

fn error_body(bytes: &[u8]) -> Result<ErrorBody, ApiError> {
    let body: ErrorBody = serde_json::from_slice(bytes).map_err(|e| {
        ApiError::BadBody(format!(
            "the body must be JSON {{\"type\": \"...\", \"message\": \"...\", \"traceback\": \
             \"...\" (optional)}}: {e}"
        ))
    })?;
    if body.error_type.is_empty() || body.error_type.len() > MAX_ERROR_TYPE {
        return Err(ApiError::BadBody(format!(
            "`type` must be 1 to {MAX_ERROR_TYPE} bytes (the error's type, e.g. ValueError)"
        )));
    }
    Ok(body)
}

/// Reads a body of at most [`Payload::MAX_BYTES`].
async fn read_body(headers: &HeaderMap, body: Body) -> Result<Vec<u8>, ApiError> {
    read_limited(headers, body, Payload::MAX_BYTES).await
}

/// Reads a body of at most `max` bytes.
async fn read_limited(headers: &HeaderMap, body: Body, max: usize) -> Result<Vec<u8>, ApiError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return Err(ApiError::TooLarge { max });
    }
    let mut bytes = Vec::with_capacity(declared.unwrap_or(0) as usize);
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::Read(e.to_string()))?;
        if bytes.len() + chunk.len() > max {
            return Err(ApiError::TooLarge { max });
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(bytes)
}

/// Cuts `s` to at most `max` bytes, on a character boundary.
fn truncate(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}
