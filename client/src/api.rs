//! A client of the HTTP API, for the CLIs.

use gantry_shared::api::{
    ErrorBody, Job, JobList, JobSpec, JoinTokenRequest, JoinTokenResponse, Node,
};
use gantry_shared::calls::{
    AppendRequest, AppendView, CallRequest, CallView, OutputOrder, OutputsPage,
};
use gantry_shared::functions::{AppManifest, AppView, DeploymentView};
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

#[derive(Clone)]
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

    /// A new API token with `role` (`reader`, `submitter`, `admin`), named `name`.
    pub async fn create_api_token(
        &self,
        role: &str,
        name: &str,
    ) -> Result<gantry_shared::api::ApiTokenResponse, ClientError> {
        self.post(
            "/v1/tokens",
            &gantry_shared::api::ApiTokenRequest {
                role: role.to_owned(),
                name: name.to_owned(),
            },
        )
        .await
    }

    /// Revokes every API token named `name`; returns how many there were.
    pub async fn revoke_api_tokens(&self, name: &str) -> Result<usize, ClientError> {
        let r: gantry_shared::api::RevokeTokensResponse = self
            .post(
                "/v1/tokens/revoke",
                &gantry_shared::api::RevokeTokensRequest {
                    name: name.to_owned(),
                },
            )
            .await?;
        Ok(r.revoked)
    }

    pub async fn submit(&self, spec: &JobSpec) -> Result<Job, ClientError> {
        self.post("/v1/jobs", spec).await
    }

    pub async fn job(&self, id: &str) -> Result<Job, ClientError> {
        self.get(&format!("/v1/jobs/{id}")).await
    }

    /// The job once it changed after `since` (its `updated_at_ms`), or as it is after
    /// `wait` (a long poll; the server caps it at 60 s).
    pub async fn job_changed(&self, id: &str, since: u64, wait: &str) -> Result<Job, ClientError> {
        self.get(&format!("/v1/jobs/{id}?changed_since={since}&wait={wait}"))
            .await
    }

    pub async fn jobs(
        &self,
        state: Option<&str>,
        page_token: Option<&str>,
    ) -> Result<JobList, ClientError> {
        let mut query = vec![("limit", "100")];
        query.extend(state.map(|s| ("state", s)));
        query.extend(page_token.map(|t| ("page_token", t)));
        let req = self.http.get(self.url("/v1/jobs")).query(&query);
        Self::decode(self.send(req).await?).await
    }

    pub async fn cancel(&self, id: &str) -> Result<Job, ClientError> {
        self.post(&format!("/v1/jobs/{id}/cancel"), &serde_json::json!({}))
            .await
    }

    /// Copies a job's output to `out` as it arrives (until the container exits, with
    /// `follow`).
    pub async fn logs(
        &self,
        id: &str,
        follow: bool,
        rank: Option<u32>,
        out: &mut (impl std::io::Write + ?Sized),
    ) -> Result<(), ClientError> {
        use futures_util::StreamExt;
        let mut req = self
            .http
            .get(self.url(&format!("/v1/jobs/{id}/logs")))
            .query(&[("follow", follow)]);
        if let Some(r) = rank {
            req = req.query(&[("rank", r)]);
        }
        let mut body = self.send(req).await?.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(ClientError::Decode)?;
            if out.write_all(&chunk).and_then(|()| out.flush()).is_err() {
                break; // our reader went away
            }
        }
        Ok(())
    }

    /// Deploys a new version of the manifest's app.
    pub async fn deploy(&self, manifest: &AppManifest) -> Result<DeploymentView, ClientError> {
        self.post(&format!("/v1/apps/{}/deployments", manifest.app), manifest)
            .await
    }

    pub async fn apps(&self) -> Result<Vec<AppView>, ClientError> {
        self.get("/v1/apps").await
    }

    pub async fn app(&self, app: &str) -> Result<AppView, ClientError> {
        self.get(&format!("/v1/apps/{app}")).await
    }

    /// `stop`, or `rollback` (to `version`, default the one before).
    pub async fn app_action(
        &self,
        app: &str,
        action: &str,
        version: Option<u64>,
    ) -> Result<AppView, ClientError> {
        let body = match version {
            Some(v) => serde_json::json!({ "version": v }),
            None => serde_json::json!({}),
        };
        self.post(&format!("/v1/apps/{app}/{action}"), &body).await
    }

    /// Calls `function` of `app`; with `request.wait` the answer comes once every input
    /// ended or after the server's long-poll bound.
    pub async fn call(
        &self,
        app: &str,
        function: &str,
        request: &CallRequest,
    ) -> Result<CallView, ClientError> {
        self.post(
            &format!("/v1/apps/{app}/functions/{function}/calls"),
            request,
        )
        .await
    }

    /// The call; with `wait` (`55s`), once every input ended or after that long.
    pub async fn call_view(&self, id: &str, wait: Option<&str>) -> Result<CallView, ClientError> {
        match wait {
            Some(w) => self.get(&format!("/v1/calls/{id}?wait={w}")).await,
            None => self.get(&format!("/v1/calls/{id}")).await,
        }
    }

    /// Adds inputs to an open map (see `AppendRequest`).
    pub async fn append_inputs(
        &self,
        id: &str,
        request: &AppendRequest,
    ) -> Result<AppendView, ClientError> {
        self.post(&format!("/v1/calls/{id}/inputs"), request).await
    }

    /// A page of the call's results from `from` on, waiting up to `wait` for the first.
    pub async fn call_outputs(
        &self,
        id: &str,
        from: u32,
        order: OutputOrder,
        wait: &str,
    ) -> Result<OutputsPage, ClientError> {
        let order = match order {
            OutputOrder::Input => "input",
            OutputOrder::Completion => "completion",
        };
        self.get(&format!(
            "/v1/calls/{id}/outputs?from={from}&order={order}&wait={wait}"
        ))
        .await
    }

    pub async fn cancel_call(&self, id: &str) -> Result<CallView, ClientError> {
        self.post(&format!("/v1/calls/{id}/cancel"), &serde_json::json!({}))
            .await
    }

    pub async fn nodes(&self) -> Result<Vec<Node>, ClientError> {
        self.get("/v1/nodes").await
    }

    pub async fn node(&self, id: &str) -> Result<Node, ClientError> {
        self.get(&format!("/v1/nodes/{id}")).await
    }

    /// `drain`, `undrain` or `preempt` a node.
    pub async fn node_action(
        &self,
        id: &str,
        action: &str,
        deadline: Option<&str>,
    ) -> Result<Node, ClientError> {
        self.post(
            &format!("/v1/nodes/{id}/{action}"),
            &gantry_shared::api::NodeNotice {
                deadline: deadline.map(str::to_owned),
            },
        )
        .await
    }

    /// Declares a node's GPU healthy again.
    pub async fn clear_gpu(&self, id: &str, index: u32) -> Result<Node, ClientError> {
        self.post(
            &format!("/v1/nodes/{id}/gpus/{index}/clear"),
            &serde_json::json!({}),
        )
        .await
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn get<R: DeserializeOwned>(&self, path: &str) -> Result<R, ClientError> {
        Self::decode(self.send(self.http.get(self.url(path))).await?).await
    }

    async fn post<B: Serialize, R: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<R, ClientError> {
        let req = self.http.post(self.url(path)).json(body);
        Self::decode(self.send(req).await?).await
    }

    /// Sends `req` with the token; an error status becomes the API's error message.
    async fn send(&self, req: reqwest::RequestBuilder) -> Result<reqwest::Response, ClientError> {
        let resp = req
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|source| ClientError::Connect {
                url: self.base.clone(),
                source,
            })?;
        Self::check(resp).await
    }

    async fn decode<R: DeserializeOwned>(resp: reqwest::Response) -> Result<R, ClientError> {
        resp.json().await.map_err(ClientError::Decode)
    }

    /// Turns an error status into the API's error message.
    async fn check(resp: reqwest::Response) -> Result<reqwest::Response, ClientError> {
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
        Ok(resp)
    }
}
