//! Image builds from recipes (submitter): the build's progress streams back as JSON lines
//! (`BuildEvent`s), ending with `done` (the image to run) or `failed`.

use gantry_shared::recipes::{BuildEvent, BuildRequest};

use super::*;

/// Build an image from a recipe into the cluster's registry (submitter). The response
/// streams one JSON `BuildEvent` per line: each step (cached, or built and where), the
/// log of steps that run, then `done` with the image's name, or `failed`.
#[utoipa::path(post, path = "/v1/images/builds", request_body = BuildRequest,
    responses((status = 200, body = BuildEvent, description = "JSON lines, one BuildEvent each", content_type = "application/x-ndjson"),
        (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub(super) async fn build_image(
    State(state): State<ApiState>,
    caller: Caller,
    body: Result<Json<BuildRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    caller.require(Role::Submitter)?;
    let Json(req) = body.map_err(|e| ApiError::BadRequest {
        field: None,
        message: e.body_text(),
    })?;
    let builds = state.builds.as_ref().ok_or_else(|| ApiError::Unavailable {
        message: "this coordinator does not build images".into(),
    })?;
    let events = builds.start(req).map_err(|e| match e {
        crate::builds::BuildError::Invalid { field, message } => ApiError::BadRequest {
            field: Some(field),
            message,
        },
    })?;
    let lines = futures_util::stream::unfold(events, |mut events| async move {
        let event = events.recv().await?;
        let mut line = serde_json::to_vec(&event).unwrap_or_default();
        line.push(b'\n');
        Some((Ok::<_, std::io::Error>(Bytes::from(line)), events))
    });
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        axum::body::Body::from_stream(lines),
    )
        .into_response())
}
