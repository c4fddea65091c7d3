//! A client of the HTTP API, for the CLIs.

use gantry_shared::api::{
    ErrorBody, Job, JobList, JobSpec, JoinTokenRequest, JoinTokenResponse, Node,
};
use gantry_shared::calls::{
    AppendRequest, AppendView, CallRequest, CallView, OutputOrder, OutputsPage,
};
use gantry_shared::functions::{AppManifest, AppView, DeploymentView};
use gantry_shared::volumes::{CreateVolume, Volume, VolumeList, VolumeListing};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot reach the coordinator at {url}: {source}; is it running (`gantry-coordinator serve`) and is GANTRY_ADDR right?"
    )]
    Connect { url: String, source: reqwest::Error },
    #[error(
        "the coordinator at {url} presented a certificate this client does not trust ({reason}); set GANTRY_CA (or `ca_file` in the CLI's config.json) to the CA certificate (PEM) that signed it: for a certificate from the cluster CA, the coordinator's <state_dir>/ca/ca.pem"
    )]
    Untrusted { url: String, reason: String },
    #[error(
        "TLS with the coordinator at {url} failed ({reason}); if it serves plain HTTP, use an http:// address, else set GANTRY_CA to the CA certificate (PEM) that signed its certificate"
    )]
    Tls { url: String, reason: String },
    #[error("cannot use the CA file {} (GANTRY_CA / `ca_file`): {reason}", path.display())]
    CaFile { path: PathBuf, reason: String },
    #[error("cannot set up the HTTP client: {0}")]
    Setup(reqwest::Error),
    #[error("{message} (HTTP {status})")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
    #[error("unexpected answer from the coordinator: {0}")]
    Decode(reqwest::Error),
    #[error("local file: {0}")]
    Local(std::io::Error),
    #[error("the coordinator address {base} is not a URL this client can use: {reason}")]
    Address { base: String, reason: String },
}

impl ClientError {
    /// A request that got no answer: a certificate the client cannot verify or a failed
    /// handshake say so (and what to set); anything else is a connection failure.
    fn unanswered(url: &str, source: reqwest::Error) -> Self {
        let url = url.to_owned();
        match tls_error(&source) {
            Some(rustls::Error::InvalidCertificate(e)) => ClientError::Untrusted {
                url,
                reason: format!("{e:?}"),
            },
            Some(e) => ClientError::Tls {
                url,
                reason: e.to_string(),
            },
            None => ClientError::Connect { url, source },
        }
    }
}

/// The TLS failure behind a request's error, if that was it. (rustls reports it inside
/// `io::Error`s, whose `source()` skips the error they wrap.)
fn tls_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut next = Some(e);
    while let Some(e) = next {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        next = match e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(wrapped) => Some(wrapped as &(dyn std::error::Error + 'static)),
            None => e.source(),
        };
    }
    None
}

#[derive(Clone)]
pub struct ApiClient {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl ApiClient {
    /// `addr` is `host:port` (plain HTTP) or a full `http://…` or `https://…` URL. An
    /// https:// coordinator's certificate is verified with `ca_file` (PEM) if given,
    /// else with the system's roots.
    pub fn new(addr: &str, token: &str, ca_file: Option<&Path>) -> Result<Self, ClientError> {
        let base = if addr.starts_with("http://") || addr.starts_with("https://") {
            addr.trim_end_matches('/').to_owned()
        } else {
            format!("http://{addr}")
        };
        let mut http = reqwest::Client::builder();
        if let Some(path) = ca_file {
            let bad = |reason: String| ClientError::CaFile {
                path: path.to_owned(),
                reason,
            };
            let pem = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
            let roots = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| bad(format!("not PEM certificates ({e})")))?;
            if roots.is_empty() {
                return Err(bad("no `BEGIN CERTIFICATE` block".into()));
            }
            // Only these roots, as `curl --cacert`: a private CA is not mixed with the
            // public ones.
            http = http.tls_certs_only(roots);
        }
        Ok(Self {
            base,
            token: token.to_owned(),
            http: http.build().map_err(ClientError::Setup)?,
        })
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

    /// Every schedule with its next and last run.
    pub async fn schedules(
        &self,
    ) -> Result<Vec<gantry_shared::schedules::ScheduleView>, ClientError> {
        #[derive(serde::Deserialize)]
        struct List {
            schedules: Vec<gantry_shared::schedules::ScheduleView>,
        }
        let list: List = self.get("/v1/schedules").await?;
        Ok(list.schedules)
    }

    /// Creates or replaces a job template's schedule.
    pub async fn put_schedule(
        &self,
        req: &gantry_shared::schedules::CreateJobSchedule,
    ) -> Result<gantry_shared::schedules::ScheduleView, ClientError> {
        self.post("/v1/schedules", req).await
    }

    pub async fn delete_schedule(&self, name: &str) -> Result<(), ClientError> {
        self.send(self.http.delete(self.url(&format!("/v1/schedules/{name}"))))
            .await?;
        Ok(())
    }

    /// Creates a secret (or replaces it, with `replace` in `req`).
    pub async fn create_secret(
        &self,
        req: &gantry_shared::secrets::CreateSecret,
    ) -> Result<gantry_shared::secrets::SecretView, ClientError> {
        self.post("/v1/secrets", req).await
    }

    /// The secrets: names and keys.
    pub async fn secrets(&self) -> Result<Vec<gantry_shared::secrets::SecretView>, ClientError> {
        #[derive(serde::Deserialize)]
        struct List {
            secrets: Vec<gantry_shared::secrets::SecretView>,
        }
        let list: List = self.get("/v1/secrets").await?;
        Ok(list.secrets)
    }

    pub async fn delete_secret(&self, name: &str) -> Result<(), ClientError> {
        self.send(self.http.delete(self.url(&format!("/v1/secrets/{name}"))))
            .await?;
        Ok(())
    }

    pub async fn create_volume(&self, req: &CreateVolume) -> Result<Volume, ClientError> {
        self.post("/v1/volumes", req).await
    }

    pub async fn volumes(&self) -> Result<Vec<Volume>, ClientError> {
        let list: VolumeList = self.get("/v1/volumes").await?;
        Ok(list.volumes)
    }

    pub async fn delete_volume(&self, name: &str) -> Result<(), ClientError> {
        self.send(self.http.delete(self.volume_url(name, &[])?))
            .await?;
        Ok(())
    }

    /// The entries under `path` (the root when empty) of volume `name`.
    pub async fn volume_ls(
        &self,
        name: &str,
        path: &str,
        recursive: bool,
    ) -> Result<VolumeListing, ClientError> {
        let req = self
            .http
            .get(self.volume_url(name, &["ls"])?)
            .query(&[("path", path)])
            .query(&[("recursive", recursive)]);
        Self::decode(self.send(req).await?).await
    }

    /// Streams file `path` of volume `name` into `out`; returns its size.
    pub async fn volume_get(
        &self,
        name: &str,
        path: &str,
        out: &mut (impl tokio::io::AsyncWrite + Unpin + ?Sized),
    ) -> Result<u64, ClientError> {
        use futures_util::StreamExt;
        use tokio::io::AsyncWriteExt;
        let url = self.volume_file_url(name, path)?;
        let mut body = self.send(self.http.get(url)).await?.bytes_stream();
        let mut n = 0u64;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(ClientError::Decode)?;
            out.write_all(&chunk).await.map_err(ClientError::Local)?;
            n += chunk.len() as u64;
        }
        out.flush().await.map_err(ClientError::Local)?;
        Ok(n)
    }

    /// Streams `file` into `path` of volume `name` (replacing what is there once all of
    /// it arrived).
    pub async fn volume_put(
        &self,
        name: &str,
        path: &str,
        file: tokio::fs::File,
    ) -> Result<(), ClientError> {
        let len = file.metadata().await.map_err(ClientError::Local)?.len();
        let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::with_capacity(
            file,
            256 << 10,
        ));
        let req = self
            .http
            .put(self.volume_file_url(name, path)?)
            .header(reqwest::header::CONTENT_LENGTH, len)
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .body(body);
        self.send(req).await?;
        Ok(())
    }

    /// Removes file or directory `path` of volume `name`.
    pub async fn volume_rm(&self, name: &str, path: &str) -> Result<(), ClientError> {
        self.send(self.http.delete(self.volume_file_url(name, path)?))
            .await?;
        Ok(())
    }

    /// `/v1/volumes/NAME/SEGMENTS…`, each percent-encoded.
    fn volume_url(&self, name: &str, segments: &[&str]) -> Result<reqwest::Url, ClientError> {
        let bad = |reason: String| ClientError::Address {
            base: self.base.clone(),
            reason,
        };
        let mut url =
            reqwest::Url::parse(&self.url("/v1/volumes")).map_err(|e| bad(e.to_string()))?;
        url.path_segments_mut()
            .map_err(|()| bad("it cannot hold a path".into()))?
            .push(name)
            .extend(segments);
        Ok(url)
    }

    fn volume_file_url(&self, name: &str, path: &str) -> Result<reqwest::Url, ClientError> {
        let parts: Vec<&str> = std::iter::once("files")
            .chain(path.split('/').filter(|p| !p.is_empty()))
            .collect();
        self.volume_url(name, &parts)
    }

    /// Starts an image build; its events come as they happen, one per line.
    pub async fn build_image(
        &self,
        req: &gantry_shared::recipes::BuildRequest,
    ) -> Result<
        impl futures_util::Stream<Item = Result<gantry_shared::recipes::BuildEvent, ClientError>>
        + use<>,
        ClientError,
    > {
        use futures_util::StreamExt;
        let resp = self
            .send(self.http.post(self.url("/v1/images/builds")).json(req))
            .await?;
        let body = resp.bytes_stream();
        Ok(futures_util::stream::unfold(
            (body, Vec::new()),
            |(mut body, mut buf)| async move {
                loop {
                    if let Some(n) = buf.iter().position(|b| *b == b'\n') {
                        let line: Vec<u8> = buf.drain(..=n).collect();
                        let event =
                            serde_json::from_slice(&line[..n]).map_err(|e| ClientError::Api {
                                status: 200,
                                code: "bad_event".into(),
                                message: format!("the build sent a line that is not an event: {e}"),
                            });
                        return Some((event, (body, buf)));
                    }
                    match body.next().await {
                        Some(Ok(chunk)) => buf.extend_from_slice(&chunk),
                        Some(Err(e)) => return Some((Err(ClientError::Decode(e)), (body, buf))),
                        None => return None,
                    }
                }
            },
        ))
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

    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The HTTP client, for requests this type has no method for (the registry's).
    pub(crate) fn http(&self) -> &reqwest::Client {
        &self.http
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
        Self::check(self.send_raw(req).await?).await
    }

    /// Sends `req` with the token; any status is the caller's to read.
    pub(crate) async fn send_raw(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, ClientError> {
        req.bearer_auth(&self.token)
            .send()
            .await
            .map_err(|source| ClientError::unanswered(&self.base, source))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("request failed")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn a_tls_failure_is_found_inside_io_errors() {
        use std::io::ErrorKind;
        let untrusted = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        // As hyper-util reports it: an io::Error around the handshake's io::Error.
        let handshake = std::io::Error::new(ErrorKind::InvalidData, untrusted);
        let e = Outer(std::io::Error::other(handshake));
        assert!(matches!(
            tls_error(&e),
            Some(rustls::Error::InvalidCertificate(_))
        ));
        let refused = Outer(std::io::Error::from(ErrorKind::ConnectionRefused));
        assert!(tls_error(&refused).is_none());
    }

    #[test]
    fn a_ca_file_that_cannot_be_used_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "nothing\n").expect("write");
        for path in [empty, dir.path().join("missing.pem")] {
            let e = match ApiClient::new("https://127.0.0.1:1", "t", Some(&path)) {
                Err(e) => e.to_string(),
                Ok(_) => panic!("{} was accepted", path.display()),
            };
            assert!(
                e.contains(&path.display().to_string()) && e.contains("GANTRY_CA"),
                "{e}"
            );
        }
    }
}
