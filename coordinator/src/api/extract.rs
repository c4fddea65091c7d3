//! Who calls (`Caller`, from the bearer token), the job spec body (`Spec`), and every
//! error as an HTTP status in one place (`ApiError`).

use super::*;

/// Who calls: their token's role and name.
pub struct Caller(pub(super) Role, pub(super) String);

impl Caller {
    pub(super) fn require(&self, role: Role) -> Result<(), ApiError> {
        if self.0.allows(role) {
            Ok(())
        } else {
            Err(ApiError::Forbidden { required: role })
        }
    }
}

impl FromRequestParts<ApiState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &ApiState) -> Result<Self, ApiError> {
        let token = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or(ApiError::Unauthenticated { message: "missing `Authorization: Bearer <token>`; use the admin token printed at the coordinator's first start, or one created from it" })?;
        let tokens = state.tokens.clone();
        let token = token.trim().to_owned();
        let who = tokio::task::spawn_blocking(move || tokens.identify(&token))
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        who.map(|(role, name)| Caller(role, name))
            .ok_or(ApiError::Unauthenticated {
                message: "token not recognized; check GANTRY_TOKEN or create a new token",
            })
    }
}

/// A `JobSpec` body: parsed with the failing field's path, then validated.
pub struct Spec(pub(super) JobSpec);

impl FromRequest<ApiState> for Spec {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &ApiState) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::TooLarge {
                    limit: state.cfg.max_body_bytes,
                }
            } else {
                ApiError::BadRequest {
                    field: None,
                    message: e.body_text(),
                }
            }
        })?;
        let spec: JobSpec = deserialize_json(&bytes)?;
        spec.validate().map_err(|e| ApiError::InvalidSpec {
            field: e.field,
            message: e.message,
        })?;
        Ok(Spec(spec))
    }
}

/// Every error the API can return, mapped to a status here and nowhere else.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{message}")]
    BadRequest {
        field: Option<String>,
        message: String,
    },
    #[error("{field}: {message}")]
    InvalidSpec {
        field: &'static str,
        message: String,
    },
    #[error("request body is larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error("{message}")]
    PayloadTooLarge { message: String },
    #[error("{message}")]
    Conflict { message: String },
    #[error("{message}")]
    Unauthenticated { message: &'static str },
    #[error("this needs the {required:?} role or higher; ask an admin for a token with it")]
    Forbidden { required: Role },
    #[error("{what} not found")]
    NotFound { what: String },
    #[error("{message}")]
    Unavailable { message: String },
    /// 429 with `Retry-After: 1`.
    #[error("{message}")]
    Busy { message: String },
    #[error("the job can never run here: {message}; ask for less or add a larger node")]
    TooLargeForCluster { message: String },
    #[error("{message}")]
    IdempotencyKeyReused { message: String },
    /// A short image name that is nowhere (`crate::images`); `field` names where it was.
    #[error("{message}")]
    ImageNotFound { field: String, message: String },
    /// A code mount at `field` names a blob the registry lacks.
    #[error("{message}")]
    CodeMissing { field: String, message: String },
    /// A secret named at `field` does not exist.
    #[error("{message}")]
    SecretNotFound { field: String, message: String },
    /// A volume named at `field` does not exist (or is being deleted).
    #[error("{message}")]
    VolumeNotFound { field: String, message: String },
    /// 404, said in full.
    #[error("{message}")]
    Missing { message: String },
    /// 507: the volume is full.
    #[error("{message}")]
    InsufficientStorage { message: String },
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    /// The image named at `field` is nowhere.
    pub(super) fn image_not_found(field: impl Into<String>, e: ImageNotFound) -> Self {
        ApiError::ImageNotFound {
            field: field.into(),
            message: e.to_string(),
        }
    }
}

impl ApiError {
    /// A code mount at `field` names a blob the registry lacks.
    pub(super) fn code_missing(field: String, e: crate::images::CodeMissing) -> Self {
        ApiError::CodeMissing {
            message: format!("{field}: {e}"),
            field,
        }
    }

    /// What a secrets error means to a caller; `field` names where the secret was named.
    pub(super) fn secret(field: &str, e: crate::secrets::SecretStoreError) -> Self {
        use crate::secrets::SecretStoreError as E;
        match e {
            e @ E::NotFound { .. } => ApiError::SecretNotFound {
                field: field.to_owned(),
                message: format!("{field}: {e}"),
            },
            e @ E::Exists { .. } => ApiError::Conflict {
                message: e.to_string(),
            },
            E::Invalid(e) => ApiError::BadRequest {
                field: Some("values".into()),
                message: e.to_string(),
            },
            e => ApiError::Internal(e.to_string()),
        }
    }
}

impl ApiError {
    /// What a volume named at `field` being unusable means to a caller.
    pub(super) fn volume(field: &str, e: crate::volumes::VolumeUseError) -> Self {
        use crate::volumes::VolumeUseError as E;
        match e {
            e @ (E::Unknown { .. } | E::Deleting { .. }) => ApiError::VolumeNotFound {
                field: field.to_owned(),
                message: format!("{field}: {e}"),
            },
            e @ (E::TwoNodes(_) | E::Gang { .. }) => ApiError::BadRequest {
                field: Some(field.to_owned()),
                message: format!("{field}: {e}"),
            },
            E::Store(e) => ApiError::Internal(e.to_string()),
        }
    }
}

impl From<crate::volumes::VolumeServiceError> for ApiError {
    fn from(e: crate::volumes::VolumeServiceError) -> Self {
        use crate::volumes::VolumeServiceError as E;
        use gantry_shared::volumes::FailureKind as K;
        match e {
            E::Invalid { field, message } => ApiError::BadRequest {
                field: Some(field.to_owned()),
                message,
            },
            e @ E::NotFound { .. } => ApiError::Missing {
                message: e.to_string(),
            },
            e @ (E::Exists { .. } | E::InUse { .. }) => ApiError::Conflict {
                message: e.to_string(),
            },
            E::Unavailable { message } => ApiError::Unavailable { message },
            E::Node(f) => match f.kind {
                K::NotFound => ApiError::Missing { message: f.message },
                K::BadPath | K::Unsupported => ApiError::BadRequest {
                    field: Some("path".into()),
                    message: f.message,
                },
                K::NoSpace => ApiError::InsufficientStorage { message: f.message },
                K::Busy => ApiError::Conflict { message: f.message },
                K::Io => ApiError::Internal(f.message),
            },
            E::Store(e) => ApiError::Internal(e.to_string()),
        }
    }
}

impl From<JobServiceError> for ApiError {
    fn from(e: JobServiceError) -> Self {
        match e {
            JobServiceError::NeverFits { message } => ApiError::TooLargeForCluster { message },
            JobServiceError::NotFound { what } => ApiError::NotFound { what },
            e @ JobServiceError::IdempotencyKeyReused { .. } => ApiError::IdempotencyKeyReused {
                message: e.to_string(),
            },
            JobServiceError::Unavailable { message } => ApiError::Unavailable { message },
            JobServiceError::Secret(e) => ApiError::secret("secrets", e),
            JobServiceError::Volume(e) => ApiError::volume("volumes", e),
            JobServiceError::Store(e) => ApiError::Internal(e.to_string()),
            JobServiceError::Internal(e) => ApiError::Internal(e),
        }
    }
}

impl From<NodeServiceError> for ApiError {
    fn from(e: NodeServiceError) -> Self {
        match e {
            NodeServiceError::NotFound { id } => ApiError::NotFound {
                what: format!("node `{id}` (it has not joined this cluster)"),
            },
            NodeServiceError::NoSuchGpu {
                node,
                index,
                message,
            } => ApiError::NotFound {
                what: format!("GPU {index} on node {node} ({message})"),
            },
            NodeServiceError::Unavailable { message } => ApiError::Unavailable { message },
            NodeServiceError::Store(e) => ApiError::Internal(e.to_string()),
            NodeServiceError::Admin(e) => ApiError::Internal(e.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code, field) = match &self {
            ApiError::BadRequest { field, .. } => {
                (StatusCode::BAD_REQUEST, "bad_request", field.clone())
            }
            ApiError::InvalidSpec { field, .. } => (
                StatusCode::BAD_REQUEST,
                "invalid_spec",
                Some((*field).to_owned()),
            ),
            ApiError::TooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", None),
            ApiError::PayloadTooLarge { .. } => {
                (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", None)
            }
            ApiError::Conflict { .. } => (StatusCode::CONFLICT, "conflict", None),
            ApiError::Unavailable { .. } => (StatusCode::SERVICE_UNAVAILABLE, "unavailable", None),
            ApiError::Busy { .. } => (StatusCode::TOO_MANY_REQUESTS, "busy", None),
            ApiError::TooLargeForCluster { .. } => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "too_large_for_cluster",
                Some("resources".into()),
            ),
            ApiError::Unauthenticated { .. } => (StatusCode::UNAUTHORIZED, "unauthenticated", None),
            ApiError::Forbidden { .. } => (StatusCode::FORBIDDEN, "forbidden", None),
            ApiError::NotFound { .. } => (StatusCode::NOT_FOUND, "not_found", None),
            ApiError::IdempotencyKeyReused { .. } => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_key_reused",
                Some("Idempotency-Key".into()),
            ),
            ApiError::ImageNotFound { field, .. } => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "image_not_found",
                Some(field.clone()),
            ),
            ApiError::CodeMissing { field, .. } => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "code_missing",
                Some(field.clone()),
            ),
            ApiError::SecretNotFound { field, .. } => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "secret_not_found",
                Some(field.clone()),
            ),
            ApiError::VolumeNotFound { field, .. } => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "volume_not_found",
                Some(field.clone()),
            ),
            ApiError::Missing { .. } => (StatusCode::NOT_FOUND, "not_found", None),
            ApiError::InsufficientStorage { .. } => {
                (StatusCode::INSUFFICIENT_STORAGE, "volume_full", None)
            }
            ApiError::Internal(_) => {
                tracing::error!(error = %self, "API request failed");
                (StatusCode::INTERNAL_SERVER_ERROR, "internal", None)
            }
        };
        let body = ErrorBody {
            error: ErrorDetail {
                code: code.into(),
                message: self.to_string(),
                field,
            },
        };
        let mut response = (status, Json(body)).into_response();
        if status == StatusCode::TOO_MANY_REQUESTS {
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from_static("1"),
            );
        }
        response
    }
}
