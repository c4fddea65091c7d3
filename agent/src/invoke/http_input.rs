//! Web endpoints served through the runtime API (`via = "runtime_api"`): every request the
//! ingress sends to such a container becomes an input of kind `http`, handed out by
//! `GET /v1/inputs/next` like a call's, and the container's answer becomes the response.
//!
//! On the runtime API an `http` input is its request's body (`Content-Type` as the client
//! sent it) with these headers besides the usual ones:
//! - `Gantry-Input-Kind: http` (a call's input says `call`);
//! - `Gantry-Http-Method`, `Gantry-Http-Path` (the path under the endpoint, as sent, still
//!   percent-encoded) and `Gantry-Http-Query` (without `?`; absent when there is none);
//! - one `Gantry-Http-Header: NAME: VALUE` per request header, in order (the bearer token
//!   the ingress took and the headers of one connection are not among them).
//!
//! The container answers with `POST /v1/inputs/{id}/response`: its body is the response's,
//! `Gantry-Http-Status` the status (200 to 599; default 200) and one `Gantry-Http-Header:
//! NAME: VALUE` per response header; without a `Content-Type` among them the POST's own
//! `Content-Type` is the response's. An error answer (`/error`) becomes `500`, a timeout
//! `504`, a request the container never took (it was draining) `503` with `Retry-After`.
//! Bodies are at most [`Payload::MAX_BYTES`] each way (`413` beyond); an upgrade
//! (WebSocket) needs an HTTP server (`via = "port"`) and gets `501`.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use gantry_shared::calls::{FailureCause, InputResult, LeasedInput, Payload};
use gantry_shared::{CallId, InputId, now_ms};
use tokio::sync::oneshot;

use super::server::Shared;

/// Says which kind an input is, on `next`.
pub(super) const INPUT_KIND: &str = "gantry-input-kind";
const METHOD: &str = "gantry-http-method";
const PATH: &str = "gantry-http-path";
const QUERY: &str = "gantry-http-query";
/// One request or response header, as `NAME: VALUE`; repeated.
const HEADER: &str = "gantry-http-header";
/// The response's status, on the container's answer.
const STATUS: &str = "gantry-http-status";

/// The head of a request that became an input: what `next` tells the container.
#[derive(Debug)]
pub(super) struct RequestHead {
    method: HeaderValue,
    path: HeaderValue,
    query: Option<HeaderValue>,
    /// `NAME: VALUE` each.
    headers: Vec<HeaderValue>,
}

/// The status and headers the container answered with.
#[derive(Debug, Default)]
pub(super) struct AnswerHead {
    status: Option<StatusCode>,
    headers: HeaderMap,
}

/// A web request waiting for its input's answer.
pub(super) struct Pending {
    head: Arc<RequestHead>,
    answer: Option<AnswerHead>,
    reply: oneshot::Sender<(InputResult, Option<AnswerHead>)>,
}

/// The web requests of one container that wait for their answers, by input.
#[derive(Default)]
pub(super) struct PendingRequests(HashMap<InputId, Pending>);

impl PendingRequests {
    pub(super) fn contains(&self, input: &InputId) -> bool {
        self.0.contains_key(input)
    }

    /// The request head of `input`, for `next`.
    pub(super) fn head(&self, input: &InputId) -> Option<Arc<RequestHead>> {
        self.0.get(input).map(|p| p.head.clone())
    }

    /// Keeps the container's status and headers for `input` until its answer is applied.
    pub(super) fn set_answer(&mut self, input: &InputId, head: AnswerHead) {
        if let Some(p) = self.0.get_mut(input) {
            p.answer = Some(head);
        }
    }

    /// Sends `input`'s answer to its request (gone already: nothing to do).
    pub(super) fn reply(&mut self, input: &InputId, result: InputResult) {
        if let Some(p) = self.0.remove(input) {
            let _ = p.reply.send((result, p.answer));
        }
    }

    /// The container's server stops: every request still waiting gets its end.
    pub(super) fn clear(&mut self) {
        self.0.clear();
    }
}

/// The routes of a stream from the ingress: every request becomes an input.
pub(super) fn router(shared: Arc<Shared>) -> axum::Router {
    axum::Router::new()
        .fallback(request)
        // Bodies are read with the payload limit, and a refusal that says so.
        .layer(axum::extract::DefaultBodyLimit::disable())
        .with_state(shared)
}

/// One request: queued as an input, answered with what the container answers.
async fn request(State(s): State<Arc<Shared>>, req: Request) -> Response {
    if req.headers().contains_key(header::UPGRADE) {
        return plain(
            StatusCode::NOT_IMPLEMENTED,
            "this endpoint takes its requests as inputs (`via = \"runtime_api\"`), which cannot \
             be upgraded; serve WebSocket from an HTTP server (`via = \"port\"`)",
        );
    }
    let (parts, body) = req.into_parts();
    let max = Payload::MAX_BYTES;
    let bytes = match axum::body::to_bytes(body, max).await {
        Ok(b) => b.to_vec(),
        Err(_) => {
            return plain(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!(
                    "the body is over {max} bytes, the most a request taken as an input may \
                     carry; serve large uploads from an HTTP server (`via = \"port\"`)"
                ),
            );
        }
    };
    let content_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or(Payload::DEFAULT_CONTENT_TYPE)
        .to_owned();
    let head = match RequestHead::of(&parts) {
        Some(h) => h,
        None => return plain(StatusCode::BAD_REQUEST, "the request's path is not valid"),
    };
    let n = s.web_sequence.fetch_add(1, Ordering::Relaxed);
    // Ids are `http-` and hex digits: always valid.
    let Ok(call) = CallId::new(format!("http-{n:x}")) else {
        return plain(StatusCode::INTERNAL_SERVER_ERROR, "cannot name the input");
    };
    let input = LeasedInput {
        id: InputId::of(&call, 0),
        call,
        attempt: 1,
        deadline_ms: now_ms().saturating_add(s.timeout_ms),
        payload: Payload::new(content_type, bytes),
    };
    let id = input.id.clone();
    let (reply, answered) = oneshot::channel();
    s.pending().0.insert(
        id.clone(),
        Pending {
            head: Arc::new(head),
            answer: None,
            reply,
        },
    );
    // Until the answer comes: a client that goes away takes its input back.
    let _forget = Forget {
        shared: &s,
        input: &id,
    };
    let delivered = s.inbox().deliver_web(input);
    if let Err(e) = delivered {
        return unavailable(&e.to_string());
    }
    s.poke();
    match answered.await {
        Ok((result, head)) => response(&s, &id, result, head),
        Err(_) => unavailable("the container stopped before it answered"),
    }
}

/// Drops a request's input when the request ends unanswered.
struct Forget<'a> {
    shared: &'a Shared,
    input: &'a InputId,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        if self.shared.pending().0.remove(self.input).is_some() {
            self.shared.inbox().forget_web(self.input);
            self.shared.poke();
        }
    }
}

impl RequestHead {
    fn of(parts: &axum::http::request::Parts) -> Option<Self> {
        let headers = parts
            .headers
            .iter()
            .filter_map(|(name, value)| {
                let mut line = Vec::with_capacity(name.as_str().len() + 2 + value.len());
                line.extend_from_slice(name.as_str().as_bytes());
                line.extend_from_slice(b": ");
                line.extend_from_slice(value.as_bytes());
                HeaderValue::from_bytes(&line).ok()
            })
            .collect();
        Some(Self {
            method: HeaderValue::from_str(parts.method.as_str()).ok()?,
            path: HeaderValue::from_str(parts.uri.path()).ok()?,
            query: match parts.uri.query() {
                Some(q) => Some(HeaderValue::from_str(q).ok()?),
                None => None,
            },
            headers,
        })
    }

    /// Adds the request's head to `next`'s response.
    pub(super) fn describe(&self, headers: &mut HeaderMap) {
        headers.insert(INPUT_KIND, HeaderValue::from_static("http"));
        headers.insert(METHOD, self.method.clone());
        headers.insert(PATH, self.path.clone());
        if let Some(q) = &self.query {
            headers.insert(QUERY, q.clone());
        }
        for h in &self.headers {
            headers.append(HEADER, h.clone());
        }
    }
}

impl AnswerHead {
    /// The status and headers of the container's `POST /v1/inputs/{id}/response`, or what
    /// is wrong with them.
    pub(super) fn parse(post: &HeaderMap) -> Result<Self, String> {
        let status = match post.get(STATUS) {
            None => None,
            Some(v) => {
                let bad = || {
                    format!(
                        "Gantry-Http-Status must be a status from 200 to 599, not {:?}",
                        String::from_utf8_lossy(v.as_bytes())
                    )
                };
                let code: u16 = v
                    .to_str()
                    .ok()
                    .and_then(|s| s.trim().parse().ok())
                    .ok_or_else(bad)?;
                if !(200..=599).contains(&code) {
                    return Err(bad());
                }
                Some(StatusCode::from_u16(code).map_err(|_| bad())?)
            }
        };
        let mut headers = HeaderMap::new();
        for line in post.get_all(HEADER) {
            let bytes = line.as_bytes();
            let bad = || {
                format!(
                    "each Gantry-Http-Header must be `NAME: VALUE` with a valid header name and \
                     value, not {:?}",
                    String::from_utf8_lossy(bytes)
                )
            };
            let colon = bytes.iter().position(|b| *b == b':').ok_or_else(bad)?;
            let name = HeaderName::from_bytes(bytes[..colon].trim_ascii()).map_err(|_| bad())?;
            let value =
                HeaderValue::from_bytes(bytes[colon + 1..].trim_ascii()).map_err(|_| bad())?;
            // The agent frames the response itself.
            if is_framing(&name) {
                continue;
            }
            headers.append(name, value);
        }
        if !headers.contains_key(header::CONTENT_TYPE)
            && let Some(ct) = post.get(header::CONTENT_TYPE)
        {
            headers.insert(header::CONTENT_TYPE, ct.clone());
        }
        Ok(Self { status, headers })
    }
}

/// Headers that describe a message's framing or its connection, which the agent's server
/// sets: never taken from the container's answer.
fn is_framing(name: &HeaderName) -> bool {
    [
        header::CONTENT_LENGTH,
        header::TRANSFER_ENCODING,
        header::CONNECTION,
        header::TRAILER,
        header::UPGRADE,
        header::TE,
    ]
    .contains(name)
        || name.as_str() == "keep-alive"
}

/// The response to a request whose input ended with `result`.
fn response(
    s: &Shared,
    input: &InputId,
    result: InputResult,
    head: Option<AnswerHead>,
) -> Response {
    match result {
        InputResult::Output(payload) => {
            let head = head.unwrap_or_default();
            let mut r = Response::new(Body::from(payload.bytes));
            *r.status_mut() = head.status.unwrap_or(StatusCode::OK);
            *r.headers_mut() = head.headers;
            if !r.headers().contains_key(header::CONTENT_TYPE)
                && let Ok(ct) = HeaderValue::from_str(&payload.content_type)
            {
                r.headers_mut().insert(header::CONTENT_TYPE, ct);
            }
            r
        }
        InputResult::Error(e) => match e.cause {
            FailureCause::Timeout => plain(
                StatusCode::GATEWAY_TIMEOUT,
                "the function did not answer within its timeout",
            ),
            FailureCause::User => {
                tracing::warn!(container = %s.id, %input, error_type = %e.error_type, message = %e.message, "a web request's function failed");
                plain(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &format!("the function failed on this request ({})", e.error_type),
                )
            }
            _ => unavailable(&e.message),
        },
    }
}

/// `503` with `Retry-After`: the request was not served and may be sent again.
fn unavailable(message: &str) -> Response {
    let mut r = plain(StatusCode::SERVICE_UNAVAILABLE, message);
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    r
}

fn plain(status: StatusCode, message: &str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        format!("{message}\n"),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_head_takes_status_and_headers_and_leaves_framing_to_the_agent() {
        let mut post = HeaderMap::new();
        post.insert(STATUS, HeaderValue::from_static("201"));
        post.append(HEADER, HeaderValue::from_static("X-One: 1"));
        post.append(HEADER, HeaderValue::from_static("set-cookie: a=1, b"));
        post.append(HEADER, HeaderValue::from_static("set-cookie: c=2"));
        post.append(HEADER, HeaderValue::from_static("Content-Length: 99"));
        post.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html"));
        let head = AnswerHead::parse(&post).expect("valid");
        assert_eq!(head.status, Some(StatusCode::CREATED));
        assert_eq!(head.headers["x-one"], "1");
        let cookies: Vec<_> = head.headers.get_all("set-cookie").iter().collect();
        assert_eq!(cookies, ["a=1, b", "c=2"]);
        assert!(!head.headers.contains_key(header::CONTENT_LENGTH));
        assert_eq!(head.headers[header::CONTENT_TYPE], "text/html");

        // A content type among the headers wins over the POST's own.
        post.append(
            HEADER,
            HeaderValue::from_static("content-type: application/json"),
        );
        let head = AnswerHead::parse(&post).expect("valid");
        assert_eq!(head.headers[header::CONTENT_TYPE], "application/json");

        for (name, value, says) in [
            (STATUS, "101", "from 200 to 599"),
            (STATUS, "ok", "from 200 to 599"),
            (HEADER, "no colon", "NAME: VALUE"),
            (HEADER, "bad name: 1", "NAME: VALUE"),
        ] {
            let mut post = HeaderMap::new();
            post.insert(name, HeaderValue::from_static(value));
            let e = AnswerHead::parse(&post).expect_err(value);
            assert!(e.contains(says), "{e}");
        }
    }
}
