//! A client of the HTTP API, for the CLIs.

use gantry_shared::api::{ErrorBody, JoinTokenRequest, JoinTokenResponse};
use serde::Serialize;
use serde::de::DeserializeOwned;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot reach the coordinator at {url}: {source}; is it running (`gantry-coordinator serve`) and is GANTRY_ADDR right?"
    )]
    Connect { url: String, source: reqwest::Error },
    #[error("{message} (HTTP {status})")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
    #[error("unexpected answer from the coordinator: {0}")]
    Decode(reqwest::Error),
}

pub struct ApiClient {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl ApiClient {
    /// `addr` is `host:port` or a full `http://…` URL.
    pub fn new(addr: &str, token: &str) -> Self {
        let base = if addr.starts_with("http://") || addr.starts_with("https://") {
            addr.trim_end_matches('/').to_owned()
        } else {
            format!("http://{addr}")
        };
        Self {
            base,
            token: token.to_owned(),
            http: reqwest::Client::new(),
        }
    }

    pub async fn create_join_token(&self, ttl: &str) -> Result<JoinTokenResponse, ClientError> {
        self.post(
            "/v1/join-tokens",
            &JoinTokenRequest {
                ttl: ttl.to_owned(),
            },
        )
        .await
    }

    async fn post<B: Serialize, R: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<R, ClientError> {
        let url = format!("{}{path}", self.base);
        let resp = self
            .http
            .post(&url)
            .bearer_auth(&self.token)
            .json(body)
            .send()
            .await
            .map_err(|source| ClientError::Connect {
                url: url.clone(),
                source,
            })?;
        let status = resp.status();
        if !status.is_success() {
            let err: Option<ErrorBody> = resp.json().await.ok();
            let (code, message) = err
                .map(|e| (e.error.code, e.error.message))
                .unwrap_or_else(|| ("unknown".into(), status.to_string()));
            return Err(ClientError::Api {
                status: status.as_u16(),
                code,
                message,
            });
        }
        resp.json().await.map_err(ClientError::Decode)
    }
}
