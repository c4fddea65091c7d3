//! Schedules: list every schedule with its next and last run (reader); create, replace or
//! delete a job template's schedule (submitter). Functions' schedules come from their
//! manifests (`gantry deploy`).

use gantry_shared::now_ms;
use gantry_shared::schedules::{CreateJobSchedule, ScheduleView};

use super::*;
use crate::schedules::ScheduleServiceError;

/// Every schedule.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub(super) struct ScheduleList {
    schedules: Vec<ScheduleView>,
}

impl From<ScheduleServiceError> for ApiError {
    fn from(e: ScheduleServiceError) -> Self {
        match e {
            ScheduleServiceError::Invalid { field, message } => {
                ApiError::InvalidSpec { field, message }
            }
            ScheduleServiceError::Secret(e) => ApiError::secret("job.secrets", e),
            ScheduleServiceError::Volume(e) => ApiError::volume("job.volumes", e),
            ScheduleServiceError::NotFound { name } => ApiError::NotFound {
                what: format!("schedule `{name}`"),
            },
            e => ApiError::Internal(e.to_string()),
        }
    }
}

/// List the schedules with their next and last run.
#[utoipa::path(get, path = "/v1/schedules",
    responses((status = 200, body = ScheduleList), (status = 401, body = ErrorBody)))]
pub(super) async fn list_schedules(
    State(state): State<ApiState>,
    caller: Caller,
) -> Result<Json<ScheduleList>, ApiError> {
    caller.require(Role::Reader)?;
    let s = state.schedules.clone();
    let schedules = tokio::task::spawn_blocking(move || s.list())
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))??;
    Ok(Json(ScheduleList { schedules }))
}

/// Create or replace a job template's schedule (submitter); its first run is its first
/// tick from now.
#[utoipa::path(post, path = "/v1/schedules", request_body = CreateJobSchedule,
    responses((status = 201, body = ScheduleView), (status = 400, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub(super) async fn put_schedule(
    State(state): State<ApiState>,
    caller: Caller,
    body: Bytes,
) -> Result<(StatusCode, Json<ScheduleView>), ApiError> {
    caller.require(Role::Submitter)?;
    let req: CreateJobSchedule = parse_body(&body)?;
    let s = state.schedules.clone();
    let view = tokio::task::spawn_blocking(move || s.put_job(req, now_ms()))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))??;
    Ok((StatusCode::CREATED, Json(view)))
}

/// Delete a job template's schedule (submitter); runs it started go on.
#[utoipa::path(delete, path = "/v1/schedules/{name}",
    responses((status = 204), (status = 404, body = ErrorBody)))]
pub(super) async fn delete_schedule(
    State(state): State<ApiState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    caller.require(Role::Submitter)?;
    let s = state.schedules.clone();
    tokio::task::spawn_blocking(move || s.delete_job(&name))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))??;
    Ok(StatusCode::NO_CONTENT)
}
