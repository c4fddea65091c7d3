//! Join tokens and API tokens: creation, and revocation by name (admin).

use super::*;

/// Create a one-time join token for a new node (admin).
#[utoipa::path(post, path = "/v1/join-tokens", request_body = JoinTokenRequest,
    responses((status = 201, body = JoinTokenResponse), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub(super) async fn create_join_token(
    State(state): State<ApiState>,
    caller: Caller,
    body: Result<Json<JoinTokenRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<JoinTokenResponse>), ApiError> {
    caller.require(Role::Admin)?;
    let Json(req) = body.map_err(|e| ApiError::BadRequest {
        field: None,
        message: e.body_text(),
    })?;
    let ttl = humantime::parse_duration(&req.ttl).map_err(|e| ApiError::BadRequest {
        field: Some("ttl".into()),
        message: format!("{e}; use e.g. `1h` or `15m`"),
    })?;
    if ttl.is_zero() || ttl > std::time::Duration::from_secs(7 * 24 * 3600) {
        return Err(ApiError::BadRequest {
            field: Some("ttl".into()),
            message: "must be more than zero and at most 7 days".into(),
        });
    }
    let join = state.join.clone();
    let token = tokio::task::spawn_blocking(move || join.create(ttl))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok((
        StatusCode::CREATED,
        Json(JoinTokenResponse {
            token: token.to_string(),
            expires_in_seconds: ttl.as_secs(),
        }),
    ))
}

/// Revokes every API token with a name (rotation: create a new admin token, then revoke
/// the old one's name using the new one). A caller cannot revoke its own token's name.
#[utoipa::path(post, path = "/v1/tokens/revoke", request_body = RevokeTokensRequest,
    responses((status = 200, body = RevokeTokensResponse), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(super) async fn revoke_api_tokens(
    State(state): State<ApiState>,
    caller: Caller,
    body: axum::body::Bytes,
) -> Result<Json<RevokeTokensResponse>, ApiError> {
    caller.require(Role::Admin)?;
    let req: RevokeTokensRequest = parse_body(&body)?;
    if req.name == caller.1 {
        return Err(ApiError::BadRequest {
            field: Some("name".into()),
            message: format!(
                "that is the name of the token making this request; revoke `{}` with another admin token",
                req.name
            ),
        });
    }
    let tokens = state.tokens.clone();
    let name = req.name.clone();
    let revoked = tokio::task::spawn_blocking(move || tokens.revoke(&name))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    if revoked == 0 {
        return Err(ApiError::NotFound {
            what: format!("API token named `{}`", req.name),
        });
    }
    tracing::warn!(name = %req.name, revoked, "API tokens revoked");
    Ok(Json(RevokeTokensResponse { revoked }))
}

/// Create an API token with a role (admin). The token is in the answer only.
#[utoipa::path(post, path = "/v1/tokens", request_body = ApiTokenRequest,
    responses((status = 201, body = ApiTokenResponse), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub(super) async fn create_api_token(
    State(state): State<ApiState>,
    caller: Caller,
    body: Result<Json<ApiTokenRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<ApiTokenResponse>), ApiError> {
    caller.require(Role::Admin)?;
    let Json(req) = body.map_err(|e| ApiError::BadRequest {
        field: None,
        message: e.body_text(),
    })?;
    let role = match req.role.as_str() {
        "reader" => Role::Reader,
        "submitter" => Role::Submitter,
        "admin" => Role::Admin,
        _ => {
            return Err(ApiError::BadRequest {
                field: Some("role".into()),
                message: "must be `reader`, `submitter` or `admin`".into(),
            });
        }
    };
    if req.name.trim().is_empty() || req.name.len() > 128 {
        return Err(ApiError::BadRequest {
            field: Some("name".into()),
            message: "must be 1 to 128 characters".into(),
        });
    }
    let tokens = state.tokens.clone();
    let name = req.name.clone();
    let token = tokio::task::spawn_blocking(move || tokens.create(role, &name))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok((
        StatusCode::CREATED,
        Json(ApiTokenResponse {
            token,
            role: req.role,
        }),
    ))
}
