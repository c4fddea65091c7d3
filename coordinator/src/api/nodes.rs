//! Nodes: the view with reservations, and what operators do to nodes (drain, undrain,
//! preempt, clear a GPU).

use super::*;

/// Nodes with a control session, with what the coordinator has reserved on each.
#[utoipa::path(get, path = "/v1/nodes", responses((status = 200, body = Vec<Node>), (status = 401, body = ErrorBody)))]
pub(super) async fn list_nodes(
    State(state): State<ApiState>,
    caller: Caller,
) -> Result<Json<Vec<Node>>, ApiError> {
    caller.require(Role::Reader)?;
    Ok(Json(state.nodes.list()?))
}

/// One node.
#[utoipa::path(get, path = "/v1/nodes/{id}", params(("id" = String, Path)),
    responses((status = 200, body = Node), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(super) async fn get_node(
    State(state): State<ApiState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Node>, ApiError> {
    caller.require(Role::Reader)?;
    Ok(Json(state.nodes.get(&id)?))
}

/// Stops new placements on a node; running work finishes, or at the deadline is stopped
/// and placed elsewhere.
#[utoipa::path(post, path = "/v1/nodes/{id}/drain", params(("id" = String, Path)), request_body = NodeNotice,
    responses((status = 200, body = Node), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(super) async fn drain_node(
    State(state): State<ApiState>,
    caller: Caller,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<Node>, ApiError> {
    caller.require(Role::Admin)?;
    let notice: NodeNotice = parse_body(&body)?;
    set_admin(&state, &id, AdminMode::Drain, notice.deadline.as_deref()).await
}

/// A spot-interruption notice: the node's work is stopped now (SIGTERM, a grace bounded by
/// the deadline, SIGKILL) and placed elsewhere, not counted against retries.
#[utoipa::path(post, path = "/v1/nodes/{id}/preempt", params(("id" = String, Path)), request_body = NodeNotice,
    responses((status = 200, body = Node), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(super) async fn preempt_node(
    State(state): State<ApiState>,
    caller: Caller,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<Node>, ApiError> {
    caller.require(Role::Admin)?;
    let notice: NodeNotice = parse_body(&body)?;
    set_admin(&state, &id, AdminMode::Preempt, notice.deadline.as_deref()).await
}

/// Takes a node back into service.
#[utoipa::path(post, path = "/v1/nodes/{id}/undrain", params(("id" = String, Path)),
    responses((status = 200, body = Node), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(super) async fn undrain_node(
    State(state): State<ApiState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Node>, ApiError> {
    caller.require(Role::Admin)?;
    Ok(Json(state.nodes.undrain(&id).await?))
}

/// Declares a GPU healthy again after an operator dealt with it (it stays unhealthy, and
/// unused, until then, even across agent restarts).
#[utoipa::path(post, path = "/v1/nodes/{id}/gpus/{index}/clear", params(("id" = String, Path), ("index" = u32, Path)),
    responses((status = 200, body = Node), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub(super) async fn clear_gpu(
    State(state): State<ApiState>,
    caller: Caller,
    Path((id, index)): Path<(String, u32)>,
) -> Result<Json<Node>, ApiError> {
    caller.require(Role::Admin)?;
    Ok(Json(state.nodes.clear_gpu(&id, index).await?))
}

pub(super) async fn set_admin(
    state: &ApiState,
    id: &str,
    mode: AdminMode,
    deadline: Option<&str>,
) -> Result<Json<Node>, ApiError> {
    let deadline = match deadline {
        None => None,
        Some(d) => Some(
            humantime::parse_duration(d)
                .ok()
                .filter(|d| *d <= std::time::Duration::from_secs(7 * 24 * 3600))
                .ok_or_else(|| ApiError::BadRequest {
                    field: Some("deadline".into()),
                    message: format!(
                        "deadline `{d}` is not a duration such as `30s` or `2h` (at most 7 days)"
                    ),
                })?,
        ),
    };
    Ok(Json(state.nodes.set_admin(id, mode, deadline).await?))
}
