//! The ingress: HTTP to web endpoints, on its own address (`ingress_listen`).
//!
//! A request names its endpoint by path, `/APP/LABEL/rest…` (the container sees `/rest…`),
//! or by host, `APP--LABEL.DOMAIN` (with `ingress_domain`; the container sees the whole
//! path). It needs a bearer token (role `submitter`) unless the endpoint is `public`. It
//! goes to the ready container of the app's active version with the fewest requests in
//! flight below `max_concurrency`; with none free it is held (the autoscaler counts it as
//! demand, so a function at zero starts a container) up to `max_pending` per endpoint
//! (beyond: `429`) and until `startup_timeout` + 30 s (then `504`).
//!
//! The request travels to the container's node on a new stream of the node's QUIC session
//! (`Command::Web`, mutual TLS), where the agent joins it to a TCP connection into the
//! container's network namespace; HTTP/1.1 runs end to end over it, so bodies stream both
//! ways and upgrades (WebSocket) pass through. A container that refuses or cannot be
//! reached before the request is sent is skipped for another; one lost before its response
//! began is too, for a request that can be sent again unchanged (an idempotent method
//! without a body), and any other request gets `502`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use gantry_shared::{AppName, Owner, WarmId};
use hyper_util::rt::TokioIo;

use crate::functions::FunctionService;
use crate::functions::service::{WebEndpoint, WebLease, WebWaitError};
use crate::nodes::Nodes;
use crate::store::tokens::{ApiTokens, Role};

/// How long past its `startup_timeout` a request is held for a container.
const HOLD_GRACE: Duration = Duration::from_secs(30);
/// Containers one request tries before it fails (each refused or unreachable).
const MAX_TRIES: usize = 3;

#[derive(Clone)]
pub struct Ingress {
    functions: FunctionService,
    nodes: Nodes,
    tokens: ApiTokens,
    /// `APP--LABEL.DOMAIN` names endpoints by host.
    domain: Option<String>,
}

impl Ingress {
    pub fn new(
        functions: FunctionService,
        nodes: Nodes,
        tokens: ApiTokens,
        domain: Option<String>,
    ) -> Self {
        Self {
            functions,
            nodes,
            tokens,
            domain: domain.map(|d| d.trim_start_matches('.').to_ascii_lowercase()),
        }
    }

    pub fn router(self) -> axum::Router {
        axum::Router::new()
            .fallback(handle)
            .with_state(Arc::new(self))
    }

    /// The endpoint a request names, and the path its container sees.
    fn route(&self, req: &Request) -> Option<(WebEndpoint, String)> {
        let path_and_query = req
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        if let Some(domain) = &self.domain {
            let host = req
                .headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(|h| h.rsplit_once(':').map_or(h, |(name, _)| name))
                .map(str::to_ascii_lowercase);
            if let Some(name) = host
                .as_deref()
                .and_then(|h| h.strip_suffix(domain.as_str()))
                && let Some(name) = name.strip_suffix('.')
            {
                // An app's name may hold `--` itself: every split is tried.
                for (i, _) in name.match_indices("--") {
                    let (app, label) = (&name[..i], &name[i + 2..]);
                    if let Ok(app) = AppName::new(app)
                        && let Some(e) = self.functions.web_endpoint(&app, label)
                    {
                        return Some((e, path_and_query));
                    }
                }
                return None;
            }
        }
        let rest = path_and_query.strip_prefix('/')?;
        let (app, rest) = rest.split_once('/').unwrap_or((rest, ""));
        let (label, rest) = match rest.find(['/', '?']) {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let endpoint = self
            .functions
            .web_endpoint(&AppName::new(app).ok()?, label)?;
        let path = match rest {
            "" => "/".to_owned(),
            r if r.starts_with('?') => format!("/{r}"),
            r => r.to_owned(),
        };
        Some((endpoint, path))
    }

    /// Whether the request's bearer `token` may call functions.
    async fn authorized(&self, token: Option<String>) -> Result<(), Response> {
        let token = token.ok_or_else(|| {
                plain(
                    StatusCode::UNAUTHORIZED,
                    "missing `Authorization: Bearer <token>`; this endpoint is not public (`public = true` in its `web` table makes it so)",
                )
            })?;
        let tokens = self.tokens.clone();
        let who = tokio::task::spawn_blocking(move || tokens.identify(&token))
            .await
            .map_err(|e| plain(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()))?
            .map_err(|e| plain(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()))?;
        match who {
            Some((role, _)) if role.allows(Role::Submitter) => Ok(()),
            Some(_) => Err(plain(
                StatusCode::FORBIDDEN,
                "this token's role may not call functions; use a `submitter` or `admin` token",
            )),
            None => Err(plain(
                StatusCode::UNAUTHORIZED,
                "token not recognized; create one with `gantry tokens create`",
            )),
        }
    }

    /// A connection to a container of `endpoint`: a lease on it and the stream to its
    /// server. Containers that refuse or cannot be reached are skipped.
    /// `skip` holds the containers that failed this request so far (and gets those that
    /// fail here).
    async fn connect(
        &self,
        endpoint: &WebEndpoint,
        (arrived_ms, deadline): (u64, tokio::time::Instant),
        skip: &mut Vec<WarmId>,
    ) -> Result<
        (
            WebLease,
            TokioIo<tokio::io::Join<quinn::RecvStream, quinn::SendStream>>,
        ),
        Response,
    > {
        loop {
            let acquired = self
                .functions
                .web_acquire(endpoint, arrived_ms, deadline, skip)
                .await;
            let lease = match acquired {
                Ok(lease) => lease,
                Err(e @ WebWaitError::TooMany { .. }) => {
                    let mut r = plain(
                        StatusCode::TOO_MANY_REQUESTS,
                        &format!("{e}; try again shortly"),
                    );
                    r.headers_mut()
                        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                    return Err(r);
                }
                Err(WebWaitError::Timeout) => {
                    return Err(plain(
                        StatusCode::GATEWAY_TIMEOUT,
                        &format!(
                            "no container of `{}` could take the request within its startup_timeout + {}s; see `gantry apps show {}`",
                            endpoint.key,
                            HOLD_GRACE.as_secs(),
                            endpoint.key.app
                        ),
                    ));
                }
            };
            let opened = match self.nodes.get(&lease.node) {
                Some(session) => {
                    crate::control::open_web(&session.conn, Owner::Function(lease.warm.clone()))
                        .await
                }
                None => Err(format!("node {} is not connected", lease.node)),
            };
            match opened {
                Ok((tx, rx)) => return Ok((lease, TokioIo::new(tokio::io::join(rx, tx)))),
                Err(e) => {
                    tracing::warn!(container = %lease.warm, node = %lease.node, error = %e, "web request could not reach the container; trying another");
                    skip.push(lease.warm.clone());
                    drop(lease);
                    if skip.len() >= MAX_TRIES {
                        return Err(plain(
                            StatusCode::BAD_GATEWAY,
                            &format!(
                                "{MAX_TRIES} containers of `{}` could not be reached; last: {e}",
                                endpoint.key
                            ),
                        ));
                    }
                }
            }
        }
    }
}

async fn handle(State(ingress): State<Arc<Ingress>>, req: Request) -> Response {
    let started = Instant::now();
    let arrived_ms = ingress.functions.now_ms();
    let Some((endpoint, path)) = ingress.route(&req) else {
        return plain(
            StatusCode::NOT_FOUND,
            "no web endpoint here: address one as /APP/LABEL/... (or APP--LABEL.DOMAIN with ingress_domain); `gantry apps show APP` lists an app's endpoints",
        );
    };
    if !endpoint.web.public {
        let token = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(|t| t.trim().to_owned());
        if let Err(r) = ingress.authorized(token).await {
            return r;
        }
    }
    let (mut parts, body) = req.into_parts();
    if !endpoint.web.public {
        // The caller's Gantry token is for the ingress, never for the container's code.
        parts.headers.remove(header::AUTHORIZATION);
    }
    match path.parse::<Uri>() {
        Ok(uri) => parts.uri = uri,
        Err(e) => return plain(StatusCode::BAD_REQUEST, &format!("bad path: {e}")),
    }
    let upgrade = parts
        .headers
        .contains_key(header::UPGRADE)
        .then(|| parts.extensions.remove::<hyper::upgrade::OnUpgrade>())
        .flatten();
    // A request that can be sent again unchanged (an idempotent method, no body) goes to
    // another container when its container fails before answering; any other gets 502.
    let replayable = matches!(
        parts.method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    ) && !parts.headers.contains_key(header::TRANSFER_ENCODING)
        && parts
            .headers
            .get(header::CONTENT_LENGTH)
            .is_none_or(|v| v.as_bytes() == b"0");
    let mut body = Some(body);
    let deadline = tokio::time::Instant::now() + endpoint.spec.startup_timeout() + HOLD_GRACE;
    let mut skip = Vec::new();
    let function = endpoint.key.to_string();
    let (lease, mut response) = loop {
        let (lease, io) = match ingress
            .connect(&endpoint, (arrived_ms, deadline), &mut skip)
            .await
        {
            Ok(c) => c,
            Err(r) => return r,
        };
        let warm = lease.warm.clone();
        let (mut sender, conn) = match hyper::client::conn::http1::handshake(io).await {
            Ok(c) => c,
            Err(e) => {
                return plain(
                    StatusCode::BAD_GATEWAY,
                    &format!("cannot speak HTTP to the container: {e}"),
                );
            }
        };
        // The request counts as in flight on its container until the connection ends: its
        // response body sent, or an upgraded connection closed.
        let lease = Arc::new(lease);
        let held = lease.clone();
        // This try's answer status, once its head arrived (dropped unsent: none came).
        let (answered, status) = tokio::sync::oneshot::channel::<u16>();
        let (functions, key) = (ingress.functions.clone(), endpoint.key.clone());
        let leased = Instant::now();
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
            let (warm, mut timings) = (held.warm.clone(), held.timings.clone());
            drop(held);
            if let Ok(status) = status.await {
                let ms = |d: Duration| d.as_millis() as u64;
                timings.run_ms = Some(ms(leased.elapsed()));
                timings.total_ms = Some(ms(started.elapsed()));
                tracing::info!(
                    function = %key, container = %warm, status, ms = timings.total_ms,
                    queued_ms = timings.queued_ms, placement_ms = timings.placement_ms,
                    image_ms = timings.image_ms, startup_ms = timings.startup_ms,
                    run_ms = timings.run_ms, "web request"
                );
                functions.web_request_ended(&key, &timings, status);
            }
        });
        let mut req = hyper::Request::new(body.take().unwrap_or_else(Body::empty));
        *req.method_mut() = parts.method.clone();
        *req.uri_mut() = parts.uri.clone();
        *req.version_mut() = parts.version;
        *req.headers_mut() = parts.headers.clone();
        if upgrade.is_none() {
            strip_hop_by_hop(req.headers_mut());
        }
        match sender.send_request(req).await {
            Ok(r) => {
                let _ = answered.send(r.status().as_u16());
                break (lease, r);
            }
            Err(e) if replayable && skip.len() + 1 < MAX_TRIES => {
                tracing::warn!(%function, container = %warm, error = %e, "web request lost with its container; sending it to another");
                skip.push(warm);
            }
            Err(e) => {
                tracing::warn!(%function, container = %warm, error = %e, "web request failed");
                return plain(
                    StatusCode::BAD_GATEWAY,
                    &format!("the container's server did not answer: {e}"),
                );
            }
        }
    };
    let status = response.status();
    if status == StatusCode::SWITCHING_PROTOCOLS
        && let Some(client) = upgrade
    {
        let server = hyper::upgrade::on(&mut response);
        tokio::spawn(async move {
            if let (Ok(client), Ok(server)) = (client.await, server.await) {
                let (mut client, mut server) = (TokioIo::new(client), TokioIo::new(server));
                let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
            }
            drop(lease);
        });
    }
    if status != StatusCode::SWITCHING_PROTOCOLS {
        // The client's connection to the ingress is its own (kept alive or not as the
        // client and the ingress agree), not the container's.
        strip_hop_by_hop(response.headers_mut());
    }
    response.map(Body::new)
}

/// Removes the headers that describe one connection (RFC 9110, 7.6.1): those `Connection`
/// names, and the standard ones.
fn strip_hop_by_hop(headers: &mut axum::http::HeaderMap) {
    let named: Vec<header::HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| header::HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
    ] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
}

/// A plain-text answer.
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
    fn hop_by_hop_headers_stay_on_their_connection() {
        let mut h = axum::http::HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-trace"),
        );
        h.insert("x-trace", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("5"));
        strip_hop_by_hop(&mut h);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["content-type", "content-length"]);
    }
}
