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
    Ok(Json(nodes_view(&state)?))
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
    nodes_view(&state)?
        .into_iter()
        .find(|n| n.id.as_str() == id)
        .map(Json)
        .ok_or(ApiError::NotFound {
            what: format!("node `{id}` (it has not joined this cluster)"),
        })
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
    let node = known_node(&state, &id)?;
    state
        .admin
        .clear(&node)
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    node_after_change(&state, &node).await
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
    let node = known_node(&state, &id)?;
    let session = state
        .nodes
        .get(&node)
        .ok_or_else(|| ApiError::Unavailable {
            message: format!("node {node} is not connected; clear its GPU once it is back"),
        })?;
    let cmd = gantry_shared::protocol::Command::ClearGpu { index };
    let reply = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        crate::control::command(&session.conn, &cmd),
    )
    .await
    .map_err(|_| ApiError::Unavailable {
        message: format!("node {node} did not answer within 10 s"),
    })?
    .map_err(|e| ApiError::Unavailable {
        message: format!("cannot reach node {node}: {e}"),
    })?;
    if let gantry_shared::protocol::CommandReply::Refused(r) = reply.0 {
        return Err(ApiError::NotFound {
            what: format!("GPU {index} on node {node} ({})", r.message),
        });
    }
    // Gossip carries the new health to the view within a few rounds.
    for _ in 0..40 {
        let healthy = state.cluster.statuses().iter().any(|s| {
            s.id == node
                && s.gossip
                    .as_ref()
                    .and_then(|g| g.gpus.iter().find(|g| g.index == index))
                    .is_some_and(|g| !g.health.is_unhealthy())
        });
        if healthy {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    node_after_change(&state, &node).await
}

pub(super) fn known_node(state: &ApiState, id: &str) -> Result<NodeId, ApiError> {
    let node = NodeId::new(id).ok();
    node.filter(|n| state.cluster.statuses().iter().any(|s| &s.id == n))
        .ok_or(ApiError::NotFound {
            what: format!("node `{id}` (it has not joined this cluster)"),
        })
}

pub(super) async fn set_admin(
    state: &ApiState,
    id: &str,
    mode: AdminMode,
    deadline: Option<&str>,
) -> Result<Json<Node>, ApiError> {
    let node = known_node(state, id)?;
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
    let now = now_ms();
    state
        .admin
        .set(
            &node,
            AdminState {
                mode,
                since_ms: now,
                deadline_ms: deadline.map(|d| now + d.as_millis() as u64),
            },
        )
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    tracing::warn!(%node, ?mode, ?deadline, "node taken out of service");
    node_after_change(state, &node).await
}

/// The node once the cluster view has taken the change in (a poll, ~100 ms).
pub(super) async fn node_after_change(
    state: &ApiState,
    node: &NodeId,
) -> Result<Json<Node>, ApiError> {
    let wanted = state.admin.get(node).ok().flatten();
    for _ in 0..20 {
        if state
            .cluster
            .statuses()
            .iter()
            .any(|s| &s.id == node && s.admin == wanted)
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    state.nodes.changed.notify_one();
    nodes_view(state)?
        .into_iter()
        .find(|n| &n.id == node)
        .map(Json)
        .ok_or(ApiError::NotFound {
            what: format!("node `{node}`"),
        })
}

pub(super) fn nodes_view(state: &ApiState) -> Result<Vec<Node>, ApiError> {
    let jobs = state.store.active_jobs()?;
    let statuses = state.cluster.statuses();
    let ledger = reconcile::ledger(&jobs, &state.store.all_fences()?, now_ms());
    Ok(statuses
        .into_iter()
        .map(|s| {
            let reserved = ledger.get(&s.id);
            let gossip = s.gossip.as_ref();
            Node {
                state: s.state().into(),
                reason: (!s.reason.is_empty()).then(|| s.reason.to_owned()),
                state_since_ms: s
                    .admin
                    .as_ref()
                    .filter(|_| s.liveness == crate::nodes::liveness::Liveness::Up)
                    .map_or(s.since_ms, |a| a.since_ms),
                deadline_ms: s.admin.as_ref().and_then(|a| a.deadline_ms),
                last_seen_ms: s.last_seen_ms,
                connected: s.connected,
                address: gossip.map(|g| g.addr.to_string()),
                labels: gossip.map(|g| g.labels.clone()).unwrap_or_default(),
                cpu_millis: s.capacity.map_or(0, |c| c.cpu_millis),
                memory_bytes: s.capacity.map_or(0, |c| c.memory_bytes),
                free_cpu_millis: gossip.map(|g| g.resources.free_cpu_millis),
                free_memory_bytes: gossip.map(|g| g.resources.free_memory_bytes),
                reserved_cpu_millis: reserved.map_or(0, |v| v.cpu_millis),
                reserved_memory_bytes: reserved.map_or(0, |v| v.memory_bytes),
                reserved_gpus: reserved
                    .map(|v| v.gpus.iter().copied().collect())
                    .unwrap_or_default(),
                gpus: gossip.map(|g| g.gpus.clone()).unwrap_or_default(),
                jobs: reserved
                    .map(|v| v.jobs.iter().cloned().collect())
                    .unwrap_or_default(),
                id: s.id,
            }
        })
        .collect())
}
