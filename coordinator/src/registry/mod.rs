//! The embedded image registry: the OCI distribution API (pull and push) under `/v2/`,
//! with content-addressed blobs on disk, so a cluster needs no external registry.
//!
//! Layout under its directory: `blobs/sha256/<hex>` (layers, configs and manifests alike),
//! `media-types/<hex>` (a manifest's media type), `tags/<repository>/<tag>` (a digest),
//! `uploads/<id>` (blob uploads in progress). Blobs appear by rename only after their
//! digest is verified. Clients authenticate with an API token, as HTTP basic (any user
//! name, the token as password, which is how `skopeo --creds` and `docker login` send it)
//! or as a bearer token: reading needs the reader role, pushing the submitter role.

use std::path::{Path, PathBuf};

use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use futures_util::StreamExt;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::store::tokens::{ApiTokens, Role};

/// Manifests are small; anything larger is refused before it is read.
const MAX_MANIFEST: usize = 4 << 20;

#[derive(Clone)]
pub struct RegistryState {
    root: PathBuf,
    tokens: ApiTokens,
}

impl RegistryState {
    pub fn open(root: &Path, tokens: ApiTokens) -> std::io::Result<Self> {
        for d in ["blobs/sha256", "media-types", "tags", "uploads"] {
            std::fs::create_dir_all(root.join(d))?;
        }
        Ok(Self {
            root: root.to_owned(),
            tokens,
        })
    }

    fn blob(&self, hex: &str) -> PathBuf {
        self.root.join("blobs/sha256").join(hex)
    }

    /// Whether a manifest is here for `repo` under `reference` (a tag or a digest), as a
    /// pull of `repo:reference` would find it. A name the registry could never hold is not.
    pub async fn has_manifest(&self, repo: &str, reference: &str) -> bool {
        if !valid_repo(repo) {
            return false;
        }
        let path = if reference.starts_with("sha256:") {
            match hex_of(reference) {
                Ok(hex) => self.root.join("media-types").join(hex),
                Err(_) => return false,
            }
        } else if valid_tag(reference) {
            self.root.join("tags").join(repo).join(reference)
        } else {
            return false;
        };
        // A file: `tags/team/x` is a directory when `team/x` is a repository.
        tokio::fs::metadata(path).await.is_ok_and(|m| m.is_file())
    }
}

/// The registry from inside the coordinator (image builds write here directly).
impl RegistryState {
    /// A manifest as stored under `repo` and `reference` (a tag or a digest): its bytes
    /// and digest.
    pub async fn manifest(&self, repo: &str, reference: &str) -> Option<(Vec<u8>, String)> {
        if !valid_repo(repo) {
            return None;
        }
        let digest = if reference.starts_with("sha256:") {
            reference.to_owned()
        } else if valid_tag(reference) {
            tokio::fs::read_to_string(self.root.join("tags").join(repo).join(reference))
                .await
                .ok()?
                .trim()
                .to_owned()
        } else {
            return None;
        };
        let bytes = tokio::fs::read(self.blob(hex_of(&digest).ok()?))
            .await
            .ok()?;
        Some((bytes, digest))
    }

    /// A blob's bytes (a config: small).
    pub async fn read_blob(&self, digest: &str) -> std::io::Result<Vec<u8>> {
        let hex = hex_of(digest).map_err(|e| std::io::Error::other(e.2))?;
        tokio::fs::read(self.blob(hex)).await
    }

    /// Whether a blob is here.
    pub fn has_blob(&self, digest: &str) -> bool {
        hex_of(digest).is_ok_and(|hex| self.blob(hex).exists())
    }

    /// Stores `bytes` as a blob; returns its digest.
    pub async fn put_blob(&self, bytes: &[u8]) -> std::io::Result<String> {
        let mut w = self.blob_writer().await?;
        w.write(bytes).await?;
        Ok(w.finish().await?.0)
    }

    /// A blob written piece by piece, hashed as it goes; it appears in the store only at
    /// [`BlobWriter::finish`], and an abandoned one leaves nothing.
    pub async fn blob_writer(&self) -> std::io::Result<BlobWriter> {
        let id = new_upload_id().map_err(|e| std::io::Error::other(e.2))?;
        let path = self.root.join("uploads").join(format!("build-{id}"));
        Ok(BlobWriter {
            file: Some(tokio::fs::File::create(&path).await?),
            path,
            blobs: self.root.join("blobs/sha256"),
            hash: Sha256::new(),
            size: 0,
        })
    }

    /// Stores an OCI image manifest (its blobs already here) and tags it `repo:tag`;
    /// returns its digest.
    pub async fn put_image_manifest(
        &self,
        repo: &str,
        tag: &str,
        bytes: &[u8],
    ) -> Result<String, String> {
        if !valid_repo(repo) || !valid_tag(tag) {
            return Err(format!("`{repo}:{tag}` is not a valid image name"));
        }
        store_manifest(self, repo, tag, bytes, OCI_MANIFEST)
            .await
            .map_err(|e| e.2)
    }
}

/// The media type of the manifests builds write.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// See [`RegistryState::blob_writer`].
pub struct BlobWriter {
    file: Option<tokio::fs::File>,
    path: PathBuf,
    blobs: PathBuf,
    hash: Sha256,
    size: u64,
}

impl BlobWriter {
    pub async fn write(&mut self, chunk: &[u8]) -> std::io::Result<()> {
        let file = self
            .file
            .as_mut()
            .ok_or_else(|| std::io::Error::other("the blob is finished"))?;
        file.write_all(chunk).await?;
        self.hash.update(chunk);
        self.size += chunk.len() as u64;
        Ok(())
    }

    /// Moves the blob into the store: its digest and size.
    pub async fn finish(mut self) -> std::io::Result<(String, u64)> {
        let mut file = self
            .file
            .take()
            .ok_or_else(|| std::io::Error::other("the blob is finished"))?;
        file.flush().await?;
        file.sync_all().await?;
        drop(file);
        let hex = hex::encode(std::mem::take(&mut self.hash).finalize());
        if let Err(e) = tokio::fs::rename(&self.path, self.blobs.join(&hex)).await {
            let _ = tokio::fs::remove_file(&self.path).await;
            return Err(e);
        }
        Ok((format!("sha256:{hex}"), self.size))
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if self.file.is_some() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// The registry's routes; blobs stream, so the API's body limit does not apply here.
pub fn router(state: RegistryState) -> Router {
    Router::new()
        .route("/v2/", get(|| async { axum::Json(serde_json::json!({})) }))
        .route("/v2/_catalog", get(catalog))
        .route("/v2/{*path}", any(dispatch))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            authenticate,
        ))
        .layer(DefaultBodyLimit::disable())
        .with_state(state)
}

/// An OCI distribution error: status, code and message.
struct OciError(StatusCode, &'static str, String);

impl IntoResponse for OciError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({"errors": [{"code": self.1, "message": self.2}]});
        let mut resp = (self.0, axum::Json(body)).into_response();
        if self.0 == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"gantry\""),
            );
        }
        resp
    }
}

fn io_error(e: std::io::Error) -> OciError {
    tracing::error!(error = %e, "registry storage");
    OciError(
        StatusCode::INTERNAL_SERVER_ERROR,
        "UNKNOWN",
        "storage error".into(),
    )
}

async fn authenticate(
    State(state): State<RegistryState>,
    req: Request,
    next: axum::middleware::Next,
) -> Response {
    let required = if matches!(*req.method(), Method::GET | Method::HEAD) {
        Role::Reader
    } else {
        Role::Submitter
    };
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            if let Some(t) = v.strip_prefix("Bearer ") {
                Some(t.trim().to_owned())
            } else {
                use base64::Engine;
                let decoded = base64::engine::general_purpose::STANDARD
                    .decode(v.strip_prefix("Basic ")?.trim())
                    .ok()?;
                let decoded = String::from_utf8(decoded).ok()?;
                decoded
                    .split_once(':')
                    .map(|(_, password)| password.to_owned())
            }
        });
    let Some(token) = presented else {
        return OciError(
            StatusCode::UNAUTHORIZED,
            "UNAUTHORIZED",
            "authenticate with an API token (as the password)".into(),
        )
        .into_response();
    };
    let tokens = state.tokens.clone();
    let role = tokio::task::spawn_blocking(move || tokens.role(&token))
        .await
        .ok()
        .and_then(Result::ok)
        .flatten();
    match role {
        Some(r) if r.allows(required) => next.run(req).await,
        Some(_) => OciError(
            StatusCode::FORBIDDEN,
            "DENIED",
            format!("this needs the {required:?} role"),
        )
        .into_response(),
        None => OciError(
            StatusCode::UNAUTHORIZED,
            "UNAUTHORIZED",
            "token not recognized".into(),
        )
        .into_response(),
    }
}

#[derive(Debug, Deserialize, Default)]
struct UploadQuery {
    digest: Option<String>,
}

/// What a `/v2/...` path names.
enum Target<'a> {
    Tags { repo: &'a str },
    Upload { repo: &'a str, id: Option<&'a str> },
    Blob { digest: &'a str },
    Manifest { repo: &'a str, reference: &'a str },
}

/// A repository name the registry stores: lowercase path components, nothing that leaves
/// its directory.
fn valid_repo(r: &str) -> bool {
    !r.is_empty()
        && !r.starts_with('/')
        && !r.ends_with('/')
        && !r.contains("..")
        && !r.contains("//")
        && r.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-/".contains(c))
}

fn parse(path: &str) -> Option<Target<'_>> {
    let path = path.trim_start_matches('/');
    let (repo, target) = if let Some(repo) = path.strip_suffix("/tags/list") {
        (repo, Target::Tags { repo })
    } else if let Some((repo, id)) = path.split_once("/blobs/uploads") {
        let id = id.trim_start_matches('/');
        (
            repo,
            Target::Upload {
                repo,
                id: (!id.is_empty()).then_some(id),
            },
        )
    } else if let Some((repo, digest)) = path.rsplit_once("/blobs/") {
        (repo, Target::Blob { digest })
    } else if let Some((repo, reference)) = path.rsplit_once("/manifests/") {
        (repo, Target::Manifest { repo, reference })
    } else {
        return None;
    };
    valid_repo(repo).then_some(target)
}

fn hex_of(digest: &str) -> Result<&str, OciError> {
    digest
        .strip_prefix("sha256:")
        .filter(|h| {
            h.len() == 64
                && h.bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        })
        .ok_or_else(|| {
            OciError(
                StatusCode::BAD_REQUEST,
                "DIGEST_INVALID",
                format!("`{digest}` is not a sha256 digest"),
            )
        })
}

fn valid_tag(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 128
        && !t.starts_with(['.', '-'])
        && t.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
}

async fn dispatch(
    State(state): State<RegistryState>,
    method: Method,
    axum::extract::Path(path): axum::extract::Path<String>,
    Query(query): Query<UploadQuery>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, OciError> {
    let not_found = || {
        OciError(
            StatusCode::NOT_FOUND,
            "NAME_UNKNOWN",
            format!("no such registry path `/v2/{path}`"),
        )
    };
    let target = parse(&path).ok_or_else(not_found)?;
    match (method, target) {
        (Method::GET, Target::Tags { repo }) => tags(&state, repo).await,
        (Method::POST, Target::Upload { repo, id: None }) => {
            start_upload(&state, repo, query.digest.as_deref(), body).await
        }
        (Method::PATCH, Target::Upload { repo, id: Some(id) }) => {
            append(&state, repo, id, body).await
        }
        (Method::PUT, Target::Upload { repo, id: Some(id) }) => {
            finish_upload(&state, repo, id, query.digest.as_deref(), body).await
        }
        (Method::GET, Target::Upload { repo, id: Some(id) }) => {
            upload_status(&state, repo, id).await
        }
        (Method::DELETE, Target::Upload { id: Some(id), .. }) => {
            let _ = tokio::fs::remove_file(state.root.join("uploads").join(upload_name(id)?)).await;
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        (m @ (Method::GET | Method::HEAD), Target::Blob { digest, .. }) => {
            get_blob(
                &state,
                digest,
                m == Method::HEAD,
                "application/octet-stream",
            )
            .await
        }
        (m @ (Method::GET | Method::HEAD), Target::Manifest { repo, reference }) => {
            get_manifest(&state, repo, reference, m == Method::HEAD).await
        }
        (Method::PUT, Target::Manifest { repo, reference }) => {
            put_manifest(&state, repo, reference, &headers, body).await
        }
        _ => Err(OciError(
            StatusCode::METHOD_NOT_ALLOWED,
            "UNSUPPORTED",
            format!("this registry does not support that on `/v2/{path}`"),
        )),
    }
}

fn upload_name(id: &str) -> Result<&str, OciError> {
    if id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(id)
    } else {
        Err(OciError(
            StatusCode::NOT_FOUND,
            "BLOB_UPLOAD_UNKNOWN",
            format!("no upload `{id}`"),
        ))
    }
}

fn new_upload_id() -> Result<String, OciError> {
    let mut b = [0u8; 16];
    std::io::Read::read_exact(
        &mut std::fs::File::open("/dev/urandom").map_err(io_error)?,
        &mut b,
    )
    .map_err(io_error)?;
    Ok(hex::encode(b))
}

async fn write_body(file: &Path, body: Body, append: bool) -> Result<u64, OciError> {
    let mut f = tokio::fs::OpenOptions::new()
        .create(true)
        .append(append)
        .write(true)
        .truncate(!append)
        .open(file)
        .await
        .map_err(io_error)?;
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            OciError(
                StatusCode::BAD_REQUEST,
                "BLOB_UPLOAD_INVALID",
                e.to_string(),
            )
        })?;
        f.write_all(&chunk).await.map_err(io_error)?;
    }
    f.flush().await.map_err(io_error)?;
    Ok(f.metadata().await.map_err(io_error)?.len())
}

fn upload_response(status: StatusCode, repo: &str, id: &str, size: u64) -> Response {
    let mut r = status.into_response();
    let h = r.headers_mut();
    let set = |h: &mut HeaderMap, k: &'static str, v: String| {
        if let Ok(v) = HeaderValue::from_str(&v) {
            h.insert(k, v);
        }
    };
    set(h, "location", format!("/v2/{repo}/blobs/uploads/{id}"));
    set(h, "docker-upload-uuid", id.to_owned());
    set(h, "range", format!("0-{}", size.saturating_sub(1)));
    set(h, "content-length", "0".into());
    r
}

async fn start_upload(
    state: &RegistryState,
    repo: &str,
    digest: Option<&str>,
    body: Body,
) -> Result<Response, OciError> {
    let id = new_upload_id()?;
    let file = state.root.join("uploads").join(&id);
    let size = write_body(&file, body, false).await?;
    match digest {
        Some(d) => commit(state, repo, &file, d).await,
        None => Ok(upload_response(StatusCode::ACCEPTED, repo, &id, size)),
    }
}

async fn append(
    state: &RegistryState,
    repo: &str,
    id: &str,
    body: Body,
) -> Result<Response, OciError> {
    let file = state.root.join("uploads").join(upload_name(id)?);
    if !file.exists() {
        return Err(OciError(
            StatusCode::NOT_FOUND,
            "BLOB_UPLOAD_UNKNOWN",
            format!("no upload `{id}`"),
        ));
    }
    let size = write_body(&file, body, true).await?;
    Ok(upload_response(StatusCode::ACCEPTED, repo, id, size))
}

async fn upload_status(state: &RegistryState, repo: &str, id: &str) -> Result<Response, OciError> {
    let file = state.root.join("uploads").join(upload_name(id)?);
    let size = tokio::fs::metadata(&file)
        .await
        .map_err(|_| {
            OciError(
                StatusCode::NOT_FOUND,
                "BLOB_UPLOAD_UNKNOWN",
                format!("no upload `{id}`"),
            )
        })?
        .len();
    Ok(upload_response(StatusCode::NO_CONTENT, repo, id, size))
}

async fn finish_upload(
    state: &RegistryState,
    repo: &str,
    id: &str,
    digest: Option<&str>,
    body: Body,
) -> Result<Response, OciError> {
    let file = state.root.join("uploads").join(upload_name(id)?);
    if !file.exists() {
        return Err(OciError(
            StatusCode::NOT_FOUND,
            "BLOB_UPLOAD_UNKNOWN",
            format!("no upload `{id}`"),
        ));
    }
    write_body(&file, body, true).await?;
    let digest = digest.ok_or_else(|| {
        OciError(
            StatusCode::BAD_REQUEST,
            "DIGEST_INVALID",
            "finishing an upload needs `?digest=`".into(),
        )
    })?;
    commit(state, repo, &file, digest).await
}

/// Verifies an uploaded file against `digest` and moves it into the blob store.
async fn commit(
    state: &RegistryState,
    repo: &str,
    file: &Path,
    digest: &str,
) -> Result<Response, OciError> {
    let hex = hex_of(digest)?.to_owned();
    let path = file.to_owned();
    let actual = tokio::task::spawn_blocking(move || -> std::io::Result<String> {
        let mut h = Sha256::new();
        std::io::copy(&mut std::fs::File::open(&path)?, &mut h)?;
        Ok(hex::encode(h.finalize()))
    })
    .await
    .map_err(|e| io_error(std::io::Error::other(e)))?
    .map_err(io_error)?;
    if actual != hex {
        let _ = tokio::fs::remove_file(file).await;
        return Err(OciError(
            StatusCode::BAD_REQUEST,
            "DIGEST_INVALID",
            format!("uploaded content is sha256:{actual}, not {digest}"),
        ));
    }
    tokio::fs::rename(file, state.blob(&hex))
        .await
        .map_err(io_error)?;
    let mut r = StatusCode::CREATED.into_response();
    if let (Ok(loc), Ok(d)) = (
        HeaderValue::from_str(&format!("/v2/{repo}/blobs/{digest}")),
        HeaderValue::from_str(digest),
    ) {
        r.headers_mut().insert(header::LOCATION, loc);
        r.headers_mut().insert("docker-content-digest", d);
    }
    Ok(r)
}

async fn get_blob(
    state: &RegistryState,
    digest: &str,
    head: bool,
    content_type: &str,
) -> Result<Response, OciError> {
    let hex = hex_of(digest)?;
    let path = state.blob(hex);
    let file = tokio::fs::File::open(&path).await.map_err(|_| {
        OciError(
            StatusCode::NOT_FOUND,
            "BLOB_UNKNOWN",
            format!("no blob {digest}"),
        )
    })?;
    let len = file.metadata().await.map_err(io_error)?.len();
    let body = if head {
        Body::empty()
    } else {
        Body::from_stream(tokio_util::io::ReaderStream::new(file))
    };
    let mut r = Response::new(body);
    let h = r.headers_mut();
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    if let (Ok(ct), Ok(d)) = (
        HeaderValue::from_str(content_type),
        HeaderValue::from_str(digest),
    ) {
        h.insert(header::CONTENT_TYPE, ct);
        h.insert("docker-content-digest", d);
    }
    Ok(r)
}

async fn get_manifest(
    state: &RegistryState,
    repo: &str,
    reference: &str,
    head: bool,
) -> Result<Response, OciError> {
    let unknown = || {
        OciError(
            StatusCode::NOT_FOUND,
            "MANIFEST_UNKNOWN",
            format!("no manifest `{reference}` in `{repo}`"),
        )
    };
    let digest = if reference.starts_with("sha256:") {
        reference.to_owned()
    } else if valid_tag(reference) {
        tokio::fs::read_to_string(state.root.join("tags").join(repo).join(reference))
            .await
            .map_err(|_| unknown())?
            .trim()
            .to_owned()
    } else {
        return Err(unknown());
    };
    let hex = hex_of(&digest)?;
    let media = tokio::fs::read_to_string(state.root.join("media-types").join(hex))
        .await
        .map_err(|_| unknown())?;
    get_blob(state, &digest, head, media.trim()).await
}

async fn put_manifest(
    state: &RegistryState,
    repo: &str,
    reference: &str,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, OciError> {
    let bytes = axum::body::to_bytes(body, MAX_MANIFEST)
        .await
        .map_err(|_| {
            OciError(
                StatusCode::PAYLOAD_TOO_LARGE,
                "MANIFEST_INVALID",
                format!("manifests are limited to {MAX_MANIFEST} bytes"),
            )
        })?;
    let media = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/vnd.oci.image.manifest.v1+json")
        .to_owned();
    // Every blob the manifest names must already be here.
    let parsed: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| OciError(StatusCode::BAD_REQUEST, "MANIFEST_INVALID", e.to_string()))?;
    let named = parsed["layers"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(std::iter::once(&parsed["config"]))
        .chain(parsed["manifests"].as_array().into_iter().flatten());
    for d in named.filter_map(|d| d["digest"].as_str()) {
        if !state.blob(hex_of(d)?).exists() {
            return Err(OciError(
                StatusCode::BAD_REQUEST,
                "MANIFEST_BLOB_UNKNOWN",
                format!("the manifest names {d}, which was not pushed"),
            ));
        }
    }
    let digest = store_manifest(state, repo, reference, &bytes, &media).await?;
    let mut r = StatusCode::CREATED.into_response();
    if let (Ok(loc), Ok(d)) = (
        HeaderValue::from_str(&format!("/v2/{repo}/manifests/{digest}")),
        HeaderValue::from_str(&digest),
    ) {
        r.headers_mut().insert(header::LOCATION, loc);
        r.headers_mut().insert("docker-content-digest", d);
    }
    Ok(r)
}

/// Stores a manifest (its blobs already here) and, for a tag reference, points the tag
/// at it; returns its digest.
async fn store_manifest(
    state: &RegistryState,
    repo: &str,
    reference: &str,
    bytes: &[u8],
    media: &str,
) -> Result<String, OciError> {
    let hex = hex::encode(Sha256::digest(bytes));
    let digest = format!("sha256:{hex}");
    if reference.starts_with("sha256:") && reference != digest {
        return Err(OciError(
            StatusCode::BAD_REQUEST,
            "DIGEST_INVALID",
            format!("the manifest is {digest}, not {reference}"),
        ));
    }
    // Unique per write: two writers of one manifest (two builds of one recipe, two
    // pushes) must not rename each other's file away.
    let id = new_upload_id()?;
    let tmp = state
        .root
        .join("uploads")
        .join(format!("manifest-{hex}-{id}"));
    tokio::fs::write(&tmp, bytes).await.map_err(io_error)?;
    tokio::fs::write(state.root.join("media-types").join(&hex), media.as_bytes())
        .await
        .map_err(io_error)?;
    tokio::fs::rename(&tmp, state.blob(&hex))
        .await
        .map_err(io_error)?;
    if !reference.starts_with("sha256:") {
        if !valid_tag(reference) {
            return Err(OciError(
                StatusCode::BAD_REQUEST,
                "TAG_INVALID",
                format!("`{reference}` is not a valid tag"),
            ));
        }
        let dir = state.root.join("tags").join(repo);
        tokio::fs::create_dir_all(&dir).await.map_err(io_error)?;
        let tmp = dir.join(format!(".{reference}.{id}.tmp"));
        tokio::fs::write(&tmp, digest.as_bytes())
            .await
            .map_err(io_error)?;
        tokio::fs::rename(&tmp, dir.join(reference))
            .await
            .map_err(io_error)?;
    }
    Ok(digest)
}

/// `GET /v2/_catalog`: every repository with at least one tag.
async fn catalog(State(state): State<RegistryState>) -> Result<Response, OciError> {
    let root = state.root.join("tags");
    let repos = tokio::task::spawn_blocking(move || {
        let mut repos = Vec::new();
        let mut stack = vec![root.clone()];
        while let Some(dir) = stack.pop() {
            for e in std::fs::read_dir(&dir)?.flatten() {
                if e.file_type()?.is_dir() {
                    stack.push(e.path());
                } else if let Ok(rel) = dir.strip_prefix(&root) {
                    let repo = rel.to_string_lossy().into_owned();
                    if !repo.is_empty() && !repos.contains(&repo) {
                        repos.push(repo);
                    }
                }
            }
        }
        repos.sort();
        Ok::<_, std::io::Error>(repos)
    })
    .await
    .map_err(|e| io_error(std::io::Error::other(e)))?
    .map_err(io_error)?;
    Ok(axum::Json(serde_json::json!({"repositories": repos})).into_response())
}

async fn tags(state: &RegistryState, repo: &str) -> Result<Response, OciError> {
    let dir = state.root.join("tags").join(repo);
    let mut tags = Vec::new();
    let mut entries = tokio::fs::read_dir(&dir).await.map_err(|_| {
        OciError(
            StatusCode::NOT_FOUND,
            "NAME_UNKNOWN",
            format!("no repository `{repo}`"),
        )
    })?;
    while let Some(e) = entries.next_entry().await.map_err(io_error)? {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with('.') {
            tags.push(name);
        }
    }
    tags.sort();
    Ok(axum::Json(serde_json::json!({"name": repo, "tags": tags})).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_parse_and_unsafe_names_are_refused() {
        assert!(matches!(
            parse("team/x/blobs/uploads/"),
            Some(Target::Upload {
                repo: "team/x",
                id: None
            })
        ));
        assert!(matches!(
            parse("team/x/blobs/uploads/abc"),
            Some(Target::Upload {
                id: Some("abc"),
                ..
            })
        ));
        assert!(matches!(
            parse("x/blobs/sha256:ab"),
            Some(Target::Blob {
                digest: "sha256:ab"
            })
        ));
        assert!(matches!(
            parse("a/b/c/manifests/v1"),
            Some(Target::Manifest {
                repo: "a/b/c",
                reference: "v1"
            })
        ));
        assert!(matches!(
            parse("x/tags/list"),
            Some(Target::Tags { repo: "x" })
        ));
        for bad in [
            "../etc/manifests/v1",
            "X/manifests/v1",
            "x//y/manifests/v1",
            "nothing",
        ] {
            assert!(parse(bad).is_none(), "{bad}");
        }
    }

    #[tokio::test]
    async fn knows_which_manifests_it_holds() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = crate::store::Store::open(&dir.path().join("db")).expect("store");
        let root = dir.path().join("registry");
        let state = RegistryState::open(&root, store.api_tokens().expect("tokens")).expect("open");
        let hex = "ab".repeat(32);
        std::fs::create_dir_all(root.join("tags/team/x")).expect("tags");
        std::fs::write(root.join("tags/team/x/v1"), format!("sha256:{hex}")).expect("tag");
        std::fs::write(root.join("media-types").join(&hex), "application/json").expect("type");
        assert!(state.has_manifest("team/x", "v1").await);
        assert!(state.has_manifest("x", &format!("sha256:{hex}")).await);
        assert!(!state.has_manifest("team/x", "v2").await);
        assert!(
            !state.has_manifest("team", "x").await,
            "a repository, not a tag"
        );
        assert!(!state.has_manifest("Team/x", "v1").await);
        assert!(!state.has_manifest("../registry/tags/team/x", "v1").await);
        assert!(!state.has_manifest("x", "sha256:00").await);
    }
}
