//! Apps, deployments and calls: `/v1/apps…` and `/v1/calls…`. Each handler parses,
//! authorizes and calls one method of the function service.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use gantry_shared::calls::{
    AppendRequest, AppendView, CallRequest, CallRequestError, CallState, CallView, OutputOrder,
    OutputsPage, PayloadError,
};
use gantry_shared::chunks::StreamPage;
use gantry_shared::functions::{AppManifest, AppView, DeploymentView};
use gantry_shared::{AppName, CallId, FunctionName};
use serde::Deserialize;

use super::{
    ApiError, ApiState, Caller, deserialize_json, idempotency_key, parse_body, query_params,
    replayed, wait_param,
};
use crate::functions::FunctionServiceError;
use crate::functions::service::MAX_CALL_WAIT;
use crate::store::tokens::Role;

/// The largest call body: a map of many inputs (each at most 2 MiB inline).
pub const MAX_CALL_BODY: usize = 64 << 20;

impl From<FunctionServiceError> for ApiError {
    fn from(e: FunctionServiceError) -> Self {
        match e {
            FunctionServiceError::Manifest(m) => ApiError::BadRequest {
                field: manifest_field(&m),
                message: m.to_string(),
            },
            FunctionServiceError::Call(CallRequestError::Payload {
                index,
                source: source @ PayloadError::TooLarge { .. },
            }) => ApiError::PayloadTooLarge {
                message: format!("input {index}: {source}"),
            },
            FunctionServiceError::Call(c) => ApiError::BadRequest {
                field: None,
                message: c.to_string(),
            },
            FunctionServiceError::NotFound { what } => ApiError::NotFound { what },
            FunctionServiceError::Conflict { message } => ApiError::Conflict { message },
            FunctionServiceError::Busy { message } => ApiError::Busy { message },
            e @ FunctionServiceError::IdempotencyKeyReused { .. } => {
                ApiError::IdempotencyKeyReused {
                    message: e.to_string(),
                }
            }
            FunctionServiceError::Secret { field, error } => ApiError::secret(&field, error),
            FunctionServiceError::Volume { field, error } => ApiError::volume(&field, error),
            FunctionServiceError::Store(e) => ApiError::Internal(e.to_string()),
            FunctionServiceError::Internal(e) => ApiError::Internal(e),
        }
    }
}

fn manifest_field(e: &gantry_shared::functions::ManifestValidationError) -> Option<String> {
    use gantry_shared::functions::ManifestValidationError as M;
    match e {
        M::Function(f) => Some(format!("functions.{}.{}", f.function, f.field)),
        M::NoFunctions | M::TooManyFunctions { .. } => Some("functions".into()),
    }
}

fn app_name(raw: String) -> Result<AppName, ApiError> {
    AppName::new(raw).map_err(|e| ApiError::BadRequest {
        field: Some("app".into()),
        message: e.to_string(),
    })
}

fn call_id(raw: String) -> Result<CallId, ApiError> {
    CallId::new(raw.clone()).map_err(|_| ApiError::NotFound {
        what: format!("call `{raw}`"),
    })
}

/// Deploy a new immutable version of an app (its manifest: `gantry.toml` as JSON). New
/// calls go to it; inputs in flight finish on the version they started on. A function whose
/// short image name is neither in the cluster's registry nor on any node is 422
/// `image_not_found`; one whose code mounts name a blob the registry lacks, 422
/// `code_missing`.
#[utoipa::path(post, path = "/v1/apps/{app}/deployments", params(("app" = String, Path)),
    request_body = AppManifest,
    responses((status = 201, body = DeploymentView), (status = 400, body = gantry_shared::api::ErrorBody),
        (status = 422, description = "`image_not_found`, `code_missing` (a code mount's blob is not in the registry), `secret_not_found` or `volume_not_found`", body = gantry_shared::api::ErrorBody)))]
pub(super) async fn deploy(
    State(state): State<ApiState>,
    caller: Caller,
    Path(app): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    caller.require(Role::Submitter)?;
    let app = app_name(app)?;
    let manifest: AppManifest = deserialize_json(&body)?;
    if manifest.app != app {
        return Err(ApiError::BadRequest {
            field: Some("app".into()),
            message: format!(
                "the manifest names app `{}` but was sent to `{app}`",
                manifest.app
            ),
        });
    }
    // Checked here too so that a malformed image is a 400 naming it, not a missing one.
    manifest.validate().map_err(FunctionServiceError::from)?;
    for (name, function) in &manifest.functions {
        state
            .images
            .require(&function.image)
            .await
            .map_err(|e| ApiError::image_not_found(format!("functions.{name}.image"), e))?;
        state
            .images
            .require_code(&function.mounts)
            .await
            .map_err(|e| ApiError::code_missing(format!("functions.{name}.mounts"), e))?;
    }
    let deployment = state.functions.deploy(manifest)?;
    Ok((StatusCode::CREATED, Json(deployment)).into_response())
}

/// Every app, with its versions and its functions' containers and queues.
#[utoipa::path(get, path = "/v1/apps", responses((status = 200, body = Vec<AppView>)))]
pub(super) async fn list_apps(
    State(state): State<ApiState>,
    caller: Caller,
) -> Result<Json<Vec<AppView>>, ApiError> {
    caller.require(Role::Reader)?;
    Ok(Json(state.functions.apps()?))
}

#[utoipa::path(get, path = "/v1/apps/{app}", params(("app" = String, Path)),
    responses((status = 200, body = AppView), (status = 404, body = gantry_shared::api::ErrorBody)))]
pub(super) async fn get_app(
    State(state): State<ApiState>,
    caller: Caller,
    Path(app): Path<String>,
) -> Result<Json<AppView>, ApiError> {
    caller.require(Role::Reader)?;
    Ok(Json(state.functions.app(&app_name(app)?)?))
}

/// Stop an app: new calls are refused (409); accepted inputs finish; containers drain.
#[utoipa::path(post, path = "/v1/apps/{app}/stop", params(("app" = String, Path)),
    responses((status = 200, body = AppView), (status = 404, body = gantry_shared::api::ErrorBody)))]
pub(super) async fn stop_app(
    State(state): State<ApiState>,
    caller: Caller,
    Path(app): Path<String>,
) -> Result<Json<AppView>, ApiError> {
    caller.require(Role::Submitter)?;
    Ok(Json(state.functions.stop(&app_name(app)?)?))
}

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct RollbackRequest {
    /// The version new calls go to (default: the one before the active one).
    #[serde(default)]
    version: Option<u64>,
}

/// Point new calls at an earlier version.
#[utoipa::path(post, path = "/v1/apps/{app}/rollback", params(("app" = String, Path)),
    request_body = RollbackRequest,
    responses((status = 200, body = AppView), (status = 404, body = gantry_shared::api::ErrorBody), (status = 409, body = gantry_shared::api::ErrorBody)))]
pub(super) async fn rollback_app(
    State(state): State<ApiState>,
    caller: Caller,
    Path(app): Path<String>,
    body: Bytes,
) -> Result<Json<AppView>, ApiError> {
    caller.require(Role::Submitter)?;
    let req: RollbackRequest = parse_body(&body)?;
    Ok(Json(
        state.functions.rollback(&app_name(app)?, req.version)?,
    ))
}

/// Call a function of the app's active version with one input (`input`) or a map
/// (`inputs`). With `wait` (default) the answer comes once every input ended (200) or
/// after 55 s (202, still running: ask `GET /v1/calls/{id}`); without, at once (202).
#[utoipa::path(post, path = "/v1/apps/{app}/functions/{function}/calls",
    params(("app" = String, Path), ("function" = String, Path),
        ("Idempotency-Key" = Option<String>, Header, description = "Makes retries safe")),
    request_body = CallRequest,
    responses((status = 200, body = CallView), (status = 202, body = CallView),
        (status = 400, body = gantry_shared::api::ErrorBody), (status = 404, body = gantry_shared::api::ErrorBody),
        (status = 409, body = gantry_shared::api::ErrorBody), (status = 413, body = gantry_shared::api::ErrorBody)))]
pub(super) async fn call_function(
    State(state): State<ApiState>,
    caller: Caller,
    Path((app, function)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    caller.require(Role::Submitter)?;
    let app = app_name(app)?;
    let function = FunctionName::new(function.clone()).map_err(|_| ApiError::NotFound {
        what: format!("function `{function}` in app `{app}`"),
    })?;
    let key = idempotency_key(&headers)?;
    let request: CallRequest = deserialize_json(&body)?;
    let (view, created) = state.functions.call(&app, &function, request, key).await?;
    let status = if view.state == CallState::Running {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    Ok(replayed((status, Json(view)).into_response(), !created))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub(super) struct CallQuery {
    /// Wait up to this long (at most 55s) for every input to end.
    wait: Option<String>,
}

/// A call: each input's state, output or error, and where its time went.
#[utoipa::path(get, path = "/v1/calls/{id}", params(("id" = String, Path), CallQuery),
    responses((status = 200, body = CallView), (status = 404, body = gantry_shared::api::ErrorBody)))]
pub(super) async fn get_call(
    State(state): State<ApiState>,
    caller: Caller,
    Path(id): Path<String>,
    query: Result<Query<CallQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<CallView>, ApiError> {
    caller.require(Role::Reader)?;
    let q = query_params(query)?;
    let id = call_id(id)?;
    let Some(wait) = q.wait else {
        return Ok(Json(state.functions.call_view(&id)?));
    };
    let wait = wait_param(&wait)?;
    Ok(Json(
        state
            .functions
            .wait_call(&id, wait.min(MAX_CALL_WAIT))
            .await?,
    ))
}

/// Cancel a call: queued inputs are dropped, running ones told and then stopped.
#[utoipa::path(post, path = "/v1/calls/{id}/cancel", params(("id" = String, Path)),
    responses((status = 200, body = CallView), (status = 404, body = gantry_shared::api::ErrorBody)))]
pub(super) async fn cancel_call(
    State(state): State<ApiState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<CallView>, ApiError> {
    caller.require(Role::Submitter)?;
    Ok(Json(state.functions.cancel(&call_id(id)?).await?))
}

/// Add inputs to an open map (a call made with `"open": true`) at index `start`, and close
/// it with `close`. While the map holds 1,000 inputs that have not ended, the request
/// waits for room (up to 55 s, then 429 with `Retry-After`). Sending a request again with
/// the same `start` and inputs is safe: it is answered as before and adds nothing.
#[utoipa::path(post, path = "/v1/calls/{id}/inputs", params(("id" = String, Path)),
    request_body = AppendRequest,
    responses((status = 200, body = AppendView), (status = 400, body = gantry_shared::api::ErrorBody),
        (status = 404, body = gantry_shared::api::ErrorBody), (status = 409, body = gantry_shared::api::ErrorBody),
        (status = 413, body = gantry_shared::api::ErrorBody), (status = 429, body = gantry_shared::api::ErrorBody)))]
pub(super) async fn append_inputs(
    State(state): State<ApiState>,
    caller: Caller,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    caller.require(Role::Submitter)?;
    let id = call_id(id)?;
    let request: AppendRequest = deserialize_json(&body)?;
    let (view, replay) = state.functions.append(&id, request).await?;
    Ok(replayed(
        (StatusCode::OK, Json(view)).into_response(),
        replay,
    ))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub(super) struct OutputsQuery {
    /// Where to read from: an input index (`order=input`) or a count of ended inputs
    /// (`order=completion`); the previous page's `next`. Default 0.
    from: Option<u32>,
    /// `input` (default): in input order, up to the first input that has not ended.
    /// `completion`: in the order inputs ended.
    order: Option<OutputOrder>,
    /// At most this many results (default and most: 1,000).
    limit: Option<usize>,
    /// Wait up to this long (at most 55s) for a first result.
    wait: Option<String>,
}

/// Read a call's results while it runs, page by page, in input order or as they complete.
#[utoipa::path(get, path = "/v1/calls/{id}/outputs", params(("id" = String, Path), OutputsQuery),
    responses((status = 200, body = OutputsPage), (status = 404, body = gantry_shared::api::ErrorBody)))]
pub(super) async fn call_outputs(
    State(state): State<ApiState>,
    caller: Caller,
    Path(id): Path<String>,
    query: Result<Query<OutputsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<OutputsPage>, ApiError> {
    caller.require(Role::Reader)?;
    let q = query_params(query)?;
    let id = call_id(id)?;
    let wait = optional_wait(q.wait.as_deref())?;
    let limit = q.limit.unwrap_or(OUTPUTS_PAGE).clamp(1, OUTPUTS_PAGE);
    Ok(Json(
        state
            .functions
            .outputs(
                &id,
                q.from.unwrap_or(0),
                q.order.unwrap_or_default(),
                limit,
                wait,
            )
            .await?,
    ))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub(super) struct StreamQuery {
    /// The input's index in the call (default 0).
    index: Option<u32>,
    /// The first place to read (the previous page's `next`; default 0).
    from: Option<u64>,
    /// Wait up to this long (at most 55s) for a chunk or the input's end.
    wait: Option<String>,
}

/// Read the chunks an input streams while it runs (`POST /v1/inputs/{id}/stream` in its
/// container), page by page from `from`; `done` once the input ended and every chunk was
/// returned. Chunks live in the coordinator's memory only, for 10 minutes after the input
/// ended (a restart loses them).
#[utoipa::path(get, path = "/v1/calls/{id}/stream", params(("id" = String, Path), StreamQuery),
    responses((status = 200, body = StreamPage), (status = 400, body = gantry_shared::api::ErrorBody),
        (status = 404, description = "no such call, or no such input in it", body = gantry_shared::api::ErrorBody)))]
pub(super) async fn call_stream(
    State(state): State<ApiState>,
    caller: Caller,
    Path(id): Path<String>,
    query: Result<Query<StreamQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<StreamPage>, ApiError> {
    caller.require(Role::Reader)?;
    let q = query_params(query)?;
    let id = call_id(id)?;
    let wait = optional_wait(q.wait.as_deref())?;
    Ok(Json(
        state
            .functions
            .stream(&id, q.index.unwrap_or(0), q.from.unwrap_or(0), wait)
            .await?,
    ))
}

/// A long poll's `wait` parameter; none is no wait.
fn optional_wait(wait: Option<&str>) -> Result<std::time::Duration, ApiError> {
    wait.map_or(Ok(std::time::Duration::ZERO), wait_param)
}

/// The most results one page of `GET /v1/calls/{id}/outputs` holds.
const OUTPUTS_PAGE: usize = 1_000;
