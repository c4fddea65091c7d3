//! The HTTP API (axum) under `/v1`, with its OpenAPI document at `/v1/openapi.json`,
//! `/healthz` and Prometheus `/metrics`. Handlers only parse, authorize and call the
//! store; every error becomes an HTTP status in one place (`ApiError`).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{
    DefaultBodyLimit, FromRequest, FromRequestParts, MatchedPath, Path, Query, Request, State,
};
use axum::http::{HeaderMap, StatusCode, header, request::Parts};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use gantry_shared::JobId;
use gantry_shared::api::{
    ApiTokenRequest, ApiTokenResponse, ErrorBody, ErrorDetail, Job, JobList, JobSpec, JobState,
    JoinTokenRequest, JoinTokenResponse, Node, NodeNotice, RevokeTokensRequest,
    RevokeTokensResponse,
};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use utoipa::OpenApi;

use crate::functions::FunctionService;
use crate::images::{ImageCheck, ImageNotFound};
use crate::jobs::service::{JobService, JobServiceError, MAX_JOB_WAIT};
use crate::nodes::service::{AdminMode, NodeService, NodeServiceError};
use crate::store::joins::JoinTokens;
use crate::store::tokens::{ApiTokens, Role};

mod builds;
mod extract;
mod functions;
mod nodes;
mod schedules;
mod secrets;
mod tls;
mod tokens;
mod volumes;

pub use extract::{ApiError, Caller, Spec};
use nodes::*;
pub use tls::{ApiTls, TlsError, server_config};
use tokens::*;

/// Settings of the HTTP API.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    pub listen: SocketAddr,
    /// Largest request body accepted (413 above it).
    pub max_body_bytes: usize,
    /// Largest page `GET /v1/jobs` returns.
    pub max_page: usize,
    /// Serve HTTPS only, with this certificate; `None`: plain HTTP (loopback, `gantry
    /// dev`, or behind a TLS-terminating proxy).
    pub tls: Option<ApiTls>,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7080)),
            max_body_bytes: 1 << 20,
            max_page: 500,
            tls: None,
        }
    }
}

/// What the handlers call: one service per domain. Handlers validate and call one
/// service method; they never reach into the store, the reconciler or the QUIC layer.
/// Validation includes the image check for requests that name images (`images`): a short
/// image name that is nowhere is refused before the service sees the request.
#[derive(Clone)]
pub struct ApiState {
    jobs: JobService,
    functions: FunctionService,
    nodes: NodeService,
    images: ImageCheck,
    tokens: ApiTokens,
    join: JoinTokens,
    secrets: crate::secrets::Secrets,
    schedules: crate::schedules::ScheduleService,
    volumes: crate::volumes::VolumeService,
    /// Image builds (`None`: this coordinator does not build).
    builds: Option<crate::builds::BuildService>,
    metrics: Arc<Metrics>,
    cfg: ApiConfig,
}

impl ApiState {
    pub fn new(
        jobs: JobService,
        functions: FunctionService,
        nodes: NodeService,
        images: ImageCheck,
        tokens: ApiTokens,
        join: JoinTokens,
        cfg: ApiConfig,
    ) -> Self {
        let mut metrics = Metrics::new();
        functions.register_metrics(&mut metrics.registry);
        nodes.register_metrics(&mut metrics.registry);
        let schedules = crate::schedules::ScheduleService::new(
            jobs.store().clone(),
            functions.clone(),
            jobs.clone(),
        );
        Self {
            schedules,
            volumes: jobs.volume_service(functions.clone()),
            builds: None,
            secrets: jobs.secrets().clone(),
            jobs,
            functions,
            nodes,
            images,
            tokens,
            join,
            metrics: Arc::new(metrics),
            cfg,
        }
    }
}

impl ApiState {
    /// Serves image builds with `builds`.
    pub fn with_builds(self, builds: crate::builds::BuildService) -> Self {
        Self {
            builds: Some(builds),
            ..self
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: String,
    /// The route template (`/v1/jobs/{id}`), never a concrete id.
    route: String,
    status: u16,
}

struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    jobs_submitted: Counter,
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("gantry");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "api_requests",
            "HTTP API requests by route and status",
            requests.clone(),
        );
        let jobs_submitted = Counter::default();
        registry.register(
            "jobs_submitted",
            "Jobs accepted by the API",
            jobs_submitted.clone(),
        );
        Self {
            registry,
            requests,
            jobs_submitted,
        }
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Gantry API",
        description = "Self-hosted serverless GPU compute. Authenticate with `Authorization: Bearer <token>`."
    ),
    paths(
        submit_job,
        list_jobs,
        get_job,
        cancel_job,
        job_logs,
        create_join_token,
        create_api_token,
        revoke_api_tokens,
        list_nodes,
        get_node,
        drain_node,
        undrain_node,
        preempt_node,
        clear_gpu,
        functions::deploy,
        functions::list_apps,
        functions::get_app,
        functions::stop_app,
        functions::rollback_app,
        functions::call_function,
        functions::get_call,
        functions::cancel_call,
        functions::append_inputs,
        functions::call_outputs,
        functions::call_stream,
        secrets::create_secret,
        secrets::list_secrets,
        secrets::delete_secret,
        schedules::list_schedules,
        schedules::put_schedule,
        schedules::delete_schedule,
        volumes::create_volume,
        volumes::list_volumes,
        volumes::delete_volume,
        volumes::list_files,
        volumes::get_file,
        volumes::put_file,
        volumes::remove_file,
        builds::build_image
    ),
    components(schemas(
        JobSpec,
        Job,
        NodeNotice,
        JobList,
        ErrorBody,
        JoinTokenRequest,
        JoinTokenResponse,
        Node
    ))
)]
struct ApiDoc;

/// The API's routes.
pub fn router(state: ApiState) -> Router {
    let limit = state.cfg.max_body_bytes;
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(metrics))
        .route(
            "/v1/openapi.json",
            get(|| async { Json(ApiDoc::openapi()) }),
        )
        .route("/v1/jobs", post(submit_job).get(list_jobs))
        .route("/v1/jobs/{id}", get(get_job))
        .route("/v1/jobs/{id}/cancel", post(cancel_job))
        .route("/v1/jobs/{id}/logs", get(job_logs))
        .route("/v1/join-tokens", post(create_join_token))
        .route("/v1/tokens", post(create_api_token))
        .route("/v1/tokens/revoke", post(revoke_api_tokens))
        .route(
            "/v1/secrets",
            post(secrets::create_secret).get(secrets::list_secrets),
        )
        .route("/v1/secrets/{name}", delete(secrets::delete_secret))
        .route(
            "/v1/schedules",
            post(schedules::put_schedule).get(schedules::list_schedules),
        )
        .route("/v1/schedules/{name}", delete(schedules::delete_schedule))
        .route(
            "/v1/volumes",
            post(volumes::create_volume).get(volumes::list_volumes),
        )
        .route("/v1/volumes/{name}", delete(volumes::delete_volume))
        .route("/v1/volumes/{name}/ls", get(volumes::list_files))
        .route(
            "/v1/volumes/{name}/files/{*path}",
            get(volumes::get_file)
                .put(volumes::put_file)
                .delete(volumes::remove_file)
                // A file's size is bounded by its volume, not by the API.
                .layer(DefaultBodyLimit::disable()),
        )
        .route("/v1/images/builds", post(builds::build_image))
        .route("/v1/nodes", get(list_nodes))
        .route("/v1/nodes/{id}", get(get_node))
        .route("/v1/nodes/{id}/drain", post(drain_node))
        .route("/v1/nodes/{id}/undrain", post(undrain_node))
        .route("/v1/nodes/{id}/preempt", post(preempt_node))
        .route("/v1/nodes/{id}/gpus/{index}/clear", post(clear_gpu))
        .route("/v1/apps", get(functions::list_apps))
        .route("/v1/apps/{app}", get(functions::get_app))
        .route("/v1/apps/{app}/deployments", post(functions::deploy))
        .route("/v1/apps/{app}/stop", post(functions::stop_app))
        .route("/v1/apps/{app}/rollback", post(functions::rollback_app))
        .route(
            "/v1/apps/{app}/functions/{function}/calls",
            post(functions::call_function).layer(DefaultBodyLimit::max(functions::MAX_CALL_BODY)),
        )
        .route("/v1/calls/{id}", get(functions::get_call))
        .route("/v1/calls/{id}/cancel", post(functions::cancel_call))
        .route(
            "/v1/calls/{id}/inputs",
            post(functions::append_inputs).layer(DefaultBodyLimit::max(functions::MAX_CALL_BODY)),
        )
        .route("/v1/calls/{id}/outputs", get(functions::call_outputs))
        .route("/v1/calls/{id}/stream", get(functions::call_stream))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            count_requests,
        ))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

/// Serves `router` on `listener` until `cancel` fires, finishing in-flight requests; over
/// TLS only when `tls` is given.
pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    router: Router,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    let stop = async move { cancel.cancelled().await };
    if let Some(config) = tls {
        let listener = tls::TlsListener::new(listener, config);
        return axum::serve(listener, router)
            .with_graceful_shutdown(stop)
            .await;
    }
    // Without TCP_NODELAY a response's last small write (the end of a streamed body)
    // waits for the client's delayed ACK: ~40 ms on every `gantry run`.
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
    });
    axum::serve(listener, router)
        .with_graceful_shutdown(stop)
        .await
}

async fn count_requests(State(state): State<ApiState>, req: Request, next: Next) -> Response {
    let method = req.method().to_string();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".into());
    let response = next.run(req).await;
    let labels = RequestLabels {
        method,
        route,
        status: response.status().as_u16(),
    };
    state.metrics.requests.get_or_create(&labels).inc();
    response
}

async fn metrics(State(state): State<ApiState>) -> Result<Response, ApiError> {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &state.metrics.registry)
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

/// Submit a job. With an `Idempotency-Key` header, a retried request returns the job the
/// first one created (with `Idempotent-Replayed: true`); the same key with another body is 422.
/// A short image name that is neither in the cluster's registry nor on any node is 422 too.
#[utoipa::path(post, path = "/v1/jobs", request_body = JobSpec,
    params(("Idempotency-Key" = Option<String>, Header, description = "Makes retries safe")),
    responses((status = 201, body = Job), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 413, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn submit_job(
    State(state): State<ApiState>,
    caller: Caller,
    headers: HeaderMap,
    Spec(spec): Spec,
) -> Result<Response, ApiError> {
    caller.require(Role::Submitter)?;
    let key = idempotency_key(&headers)?;
    state
        .images
        .require(&spec.image)
        .await
        .map_err(|e| ApiError::image_not_found("image", e))?;
    let (job, created) = state.jobs.submit(spec, key).await?;
    if created {
        state.metrics.jobs_submitted.inc();
    }
    Ok(replayed(
        (StatusCode::CREATED, Json(job)).into_response(),
        !created,
    ))
}

/// Marks the answer to a request replayed under its Idempotency-Key
/// (`Idempotent-Replayed: true`).
fn replayed(mut response: Response, replay: bool) -> Response {
    if replay {
        response.headers_mut().insert(
            "idempotent-replayed",
            header::HeaderValue::from_static("true"),
        );
    }
    response
}

/// A long poll's `wait` parameter, or a 400 naming it.
fn wait_param(wait: &str) -> Result<std::time::Duration, ApiError> {
    humantime::parse_duration(wait).map_err(|e| ApiError::BadRequest {
        field: Some("wait".into()),
        message: format!("`{wait}` is not a duration ({e}); e.g. `30s`"),
    })
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    /// Only jobs in this state.
    state: Option<JobState>,
    /// From the previous page's `next_page_token`.
    page_token: Option<String>,
    /// Page size (default 100, at most the server's limit).
    limit: Option<usize>,
}

/// List jobs in submission order, a page at a time.
#[utoipa::path(get, path = "/v1/jobs", params(ListQuery),
    responses((status = 200, body = JobList), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)))]
async fn list_jobs(
    State(state): State<ApiState>,
    caller: Caller,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<JobList>, ApiError> {
    caller.require(Role::Reader)?;
    let q = query_params(query)?;
    let after = q
        .page_token
        .map(|t| {
            JobId::new(t).map_err(|_| ApiError::BadRequest {
                field: Some("page_token".into()),
                message: "not a page token from this API".into(),
            })
        })
        .transpose()?;
    let limit = q.limit.unwrap_or(100).clamp(1, state.cfg.max_page);
    let (jobs, more) = state.jobs.list(q.state, after, limit)?;
    let next_page_token = more
        .then(|| jobs.last().map(|j| j.id.to_string()))
        .flatten();
    Ok(Json(JobList {
        jobs,
        next_page_token,
    }))
}

/// One job: its state, attempts and why it is where it is. With `changed_since`, a long
/// poll: the answer comes once the job changed (or after `wait`).
#[utoipa::path(get, path = "/v1/jobs/{id}", params(("id" = String, Path), JobQuery),
    responses((status = 200, body = Job), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn get_job(
    State(state): State<ApiState>,
    caller: Caller,
    Path(id): Path<String>,
    query: Result<Query<JobQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Job>, ApiError> {
    caller.require(Role::Reader)?;
    let q = query_params(query)?;
    let id = job_id(id)?;
    let Some(since) = q.changed_since else {
        return Ok(Json(state.jobs.get(&id)?));
    };
    let wait = match q.wait.as_deref() {
        None => MAX_JOB_WAIT,
        Some(w) => wait_param(w)?,
    };
    Ok(Json(state.jobs.changed_since(&id, since, wait).await?))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
struct JobQuery {
    /// Wait until the job's `updated_at_ms` is past this value (a long poll).
    changed_since: Option<u64>,
    /// How long to wait at most (default and limit 60s).
    wait: Option<String>,
}

/// Cancel a job. Cancelling a finished job changes nothing and returns it.
#[utoipa::path(post, path = "/v1/jobs/{id}/cancel", params(("id" = String, Path)),
    responses((status = 200, body = Job), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn cancel_job(
    State(state): State<ApiState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Job>, ApiError> {
    caller.require(Role::Submitter)?;
    Ok(Json(state.jobs.cancel(&job_id(id)?)?))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
struct LogsQuery {
    /// Keep streaming until the attempt's container exits.
    follow: Option<bool>,
    /// Which attempt (default: the latest).
    generation: Option<u64>,
    /// Which member of a gang (default 0; every job today has one member per attempt).
    rank: Option<u32>,
}

/// A job's output (stdout and stderr interleaved as they arrive), fetched from the node
/// that ran it. With `follow=true` the response streams until the container exits.
#[utoipa::path(get, path = "/v1/jobs/{id}/logs", params(("id" = String, Path), LogsQuery),
    responses((status = 200, description = "the output", content_type = "text/plain"), (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn job_logs(
    State(state): State<ApiState>,
    caller: Caller,
    Path(id): Path<String>,
    query: Result<Query<LogsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    caller.require(Role::Reader)?;
    let q = query_params(query)?;
    let output = state
        .jobs
        .output(
            &job_id(id)?,
            q.generation.map(gantry_shared::Generation),
            q.rank.unwrap_or(0),
            q.follow.unwrap_or(false),
        )
        .await?;
    let body =
        futures_util::StreamExt::map(output, |chunk| Ok::<_, std::io::Error>(Bytes::from(chunk)));
    Ok((
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        axum::body::Body::from_stream(body),
    )
        .into_response())
}

/// The `Idempotency-Key` header, if sent: 1 to 128 visible ASCII characters.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    headers
        .get("idempotency-key")
        .map(|v| {
            v.to_str()
                .ok()
                .filter(|k| !k.is_empty() && k.len() <= 128)
                .map(str::to_owned)
                .ok_or(ApiError::BadRequest {
                    field: Some("Idempotency-Key".into()),
                    message: "must be 1 to 128 visible ASCII characters".into(),
                })
        })
        .transpose()
}

/// A query string, or a 400 saying what in it is wrong.
fn query_params<T>(
    query: Result<Query<T>, axum::extract::rejection::QueryRejection>,
) -> Result<T, ApiError> {
    query.map(|Query(q)| q).map_err(|e| ApiError::BadRequest {
        field: None,
        message: e.body_text(),
    })
}

/// An optional JSON body (empty means `{}`), parsed with the failing field's path.
fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return deserialize_json(b"{}");
    }
    deserialize_json(body)
}

/// Parses JSON, naming the field that failed (`resources.memory`) in the error.
fn deserialize_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        ApiError::BadRequest {
            field: (path != ".").then_some(path),
            message: e.inner().to_string(),
        }
    })
}

fn job_id(raw: String) -> Result<JobId, ApiError> {
    JobId::new(raw.clone()).map_err(|_| ApiError::NotFound {
        what: format!("job `{raw}`"),
    })
}
