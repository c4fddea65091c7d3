//! Volumes: create, list, delete (submitter; list is a reader's), and their files: list,
//! get (reader), put and remove (submitter). File bodies stream through to and from the
//! node that holds the volume; a put has no size limit but the volume's.

use gantry_shared::volumes::{
    CreateVolume, Volume, VolumeList, VolumeListing, VolumeName, VolumePath,
};

use super::*;

/// A volume named in a URL: a bad name is one that cannot exist.
fn volume_name(raw: String) -> Result<VolumeName, ApiError> {
    VolumeName::new(raw.clone()).map_err(|_| ApiError::Missing {
        message: format!("volume `{raw}` does not exist; `gantry volume list` shows the volumes"),
    })
}

fn volume_path(raw: &str) -> Result<VolumePath, ApiError> {
    VolumePath::new(raw).map_err(|e| ApiError::BadRequest {
        field: Some("path".into()),
        message: e.to_string(),
    })
}

/// Create a volume (submitter): local to a node (`node`, or one the coordinator picks),
/// optionally of a fixed `size`, or `shared`.
#[utoipa::path(post, path = "/v1/volumes", request_body = CreateVolume,
    responses((status = 201, body = Volume), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub(super) async fn create_volume(
    State(state): State<ApiState>,
    caller: Caller,
    body: Result<Json<CreateVolume>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<Volume>), ApiError> {
    caller.require(Role::Submitter)?;
    let Json(req) = body.map_err(|e| ApiError::BadRequest {
        field: None,
        message: e.body_text(),
    })?;
    let volume = state.volumes.create(req).await?;
    Ok((StatusCode::CREATED, Json(volume)))
}

/// The volumes.
#[utoipa::path(get, path = "/v1/volumes",
    responses((status = 200, body = VolumeList), (status = 401, body = ErrorBody)))]
pub(super) async fn list_volumes(
    State(state): State<ApiState>,
    caller: Caller,
) -> Result<Json<VolumeList>, ApiError> {
    caller.require(Role::Reader)?;
    Ok(Json(VolumeList {
        volumes: state.volumes.list()?,
    }))
}

/// Delete a volume and its files (submitter); refused (409) while a job that has not
/// ended or a deployed function mounts it.
#[utoipa::path(delete, path = "/v1/volumes/{name}",
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub(super) async fn delete_volume(
    State(state): State<ApiState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    caller.require(Role::Submitter)?;
    state.volumes.delete(&volume_name(name)?).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub(super) struct LsQuery {
    /// A path in the volume (its root when absent).
    path: Option<String>,
    /// All the way down.
    recursive: Option<bool>,
}

/// The entries under a path of a volume.
#[utoipa::path(get, path = "/v1/volumes/{name}/ls", params(LsQuery),
    responses((status = 200, body = VolumeListing), (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub(super) async fn list_files(
    State(state): State<ApiState>,
    caller: Caller,
    Path(name): Path<String>,
    query: Result<Query<LsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<VolumeListing>, ApiError> {
    caller.require(Role::Reader)?;
    let q = query_params(query)?;
    let path = volume_path(q.path.as_deref().unwrap_or(""))?;
    let listing = state
        .volumes
        .list_files(&volume_name(name)?, path, q.recursive.unwrap_or(false))
        .await?;
    Ok(Json(listing))
}

/// A file of a volume, streamed from its node.
#[utoipa::path(get, path = "/v1/volumes/{name}/files/{path}",
    responses((status = 200, description = "the file's bytes", content_type = "application/octet-stream"), (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub(super) async fn get_file(
    State(state): State<ApiState>,
    caller: Caller,
    Path((name, path)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    caller.require(Role::Reader)?;
    let (size, chunks) = state
        .volumes
        .read(&volume_name(name)?, volume_path(&path)?)
        .await?;
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
            (header::CONTENT_LENGTH, size.to_string()),
        ],
        axum::body::Body::from_stream(chunks),
    )
        .into_response())
}

/// Write a file of a volume (submitter), making its directories: the body streams to the
/// volume's node and replaces the file only once all of it arrived. 507 when the volume
/// is full (nothing is written).
#[utoipa::path(put, path = "/v1/volumes/{name}/files/{path}",
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 204), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 507, body = ErrorBody)))]
pub(super) async fn put_file(
    State(state): State<ApiState>,
    caller: Caller,
    Path((name, path)): Path<(String, String)>,
    body: axum::body::Body,
) -> Result<StatusCode, ApiError> {
    caller.require(Role::Submitter)?;
    let (name, path) = (volume_name(name)?, volume_path(&path)?);
    state
        .volumes
        .write(&name, path, body.into_data_stream())
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Remove a file, or a directory and everything in it, from a volume (submitter).
#[utoipa::path(delete, path = "/v1/volumes/{name}/files/{path}",
    responses((status = 204), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(super) async fn remove_file(
    State(state): State<ApiState>,
    caller: Caller,
    Path((name, path)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    caller.require(Role::Submitter)?;
    state
        .volumes
        .remove(&volume_name(name)?, volume_path(&path)?)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
