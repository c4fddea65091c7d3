//! Secrets: create (or replace) and delete (admin), list names and keys (submitter). No
//! answer ever carries a value.

use gantry_shared::secrets::{CreateSecret, SecretName, SecretView};

use gantry_shared::now_ms;

use super::*;

/// The secrets, names and keys only.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub(super) struct SecretList {
    secrets: Vec<SecretView>,
}

/// Create a secret, or replace one with `"replace": true` (admin). Containers started
/// afterwards get the new values.
#[utoipa::path(post, path = "/v1/secrets", request_body = CreateSecret,
    responses((status = 201, body = SecretView), (status = 200, body = SecretView, description = "replaced"),
        (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(super) async fn create_secret(
    State(state): State<ApiState>,
    caller: Caller,
    body: Bytes,
) -> Result<(StatusCode, Json<SecretView>), ApiError> {
    caller.require(Role::Admin)?;
    // Never echo the body: a parse error could quote a value.
    let req: CreateSecret = serde_json::from_slice(&body).map_err(|e| ApiError::BadRequest {
        field: None,
        message: format!(
            "the body must be JSON {{\"name\": \"NAME\", \"values\": {{\"KEY\": \"VALUE\", …}}, \
             \"replace\": false}} with string values (line {}, column {})",
            e.line(),
            e.column()
        ),
    })?;
    let store = state
        .secrets
        .store()
        .map_err(|e| ApiError::secret("name", e))?
        .clone();
    let name = req.name.clone();
    let (view, created) = tokio::task::spawn_blocking(move || store.create(req, now_ms()))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(|e| ApiError::secret("name", e))?;
    tracing::info!(secret = %name, keys = view.keys.len(), created, "secret written");
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(view)))
}

/// List the secrets: names and keys, never values (submitter).
#[utoipa::path(get, path = "/v1/secrets",
    responses((status = 200, body = SecretList), (status = 401, body = ErrorBody)))]
pub(super) async fn list_secrets(
    State(state): State<ApiState>,
    caller: Caller,
) -> Result<Json<SecretList>, ApiError> {
    caller.require(Role::Submitter)?;
    let store = state
        .secrets
        .store()
        .map_err(|e| ApiError::secret("name", e))?
        .clone();
    let secrets = tokio::task::spawn_blocking(move || store.list())
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(|e| ApiError::secret("name", e))?;
    Ok(Json(SecretList { secrets }))
}

/// Delete a secret (admin). Running containers keep what they got; later starts that
/// name it fail.
#[utoipa::path(delete, path = "/v1/secrets/{name}",
    responses((status = 204), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(super) async fn delete_secret(
    State(state): State<ApiState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    caller.require(Role::Admin)?;
    let not_found = || ApiError::NotFound {
        what: format!("secret `{name}`"),
    };
    let secret = SecretName::new(name.clone()).map_err(|_| not_found())?;
    let store = state
        .secrets
        .store()
        .map_err(|e| ApiError::secret("name", e))?
        .clone();
    let gone = tokio::task::spawn_blocking(move || store.delete(&secret))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(|e| ApiError::secret("name", e))?;
    if !gone {
        return Err(not_found());
    }
    tracing::info!(secret = %name, "secret deleted");
    Ok(StatusCode::NO_CONTENT)
}
