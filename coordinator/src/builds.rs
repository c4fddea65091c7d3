//! Image builds from recipes (`POST /v1/images/builds`), into the embedded registry.
//!
//! Each step is one image in the registry, tagged `gantry-build-cache:<key>` where the key
//! hashes the parent's key and the step (`gantry_shared::recipes::step_key`): a build
//! walks its steps and takes every one whose image is there, so only what changed (and
//! what follows it) is built. Steps that change the configuration only (`env`,
//! `workdir`, `entrypoint`, `cmd`) and uploaded files (`add_local_*`, an archive the CLI
//! pushed by its digest) are assembled here; steps that run (`run_commands`,
//! `apt_install`, `pip_install`), a `debian_slim` base (mmdebstrap) and a base from
//! another registry (pulled, its layers sent back) are work for an agent
//! (`Command::Build`), which streams back the log and the layers. A layer enters the
//! registry only once complete, and a step's image is tagged only after it: a failed or
//! interrupted step leaves nothing (an agent that goes away mid-step has the step tried
//! again on a node, up to [`TRIES`]). Steps are built one at a time per key: two builds
//! of one recipe at once build each step once, the second finds it in the cache.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use gantry_shared::NodeId;
use gantry_shared::protocol::Command;
use gantry_shared::recipes::{
    Base, BuildEvent, BuildFrame, BuildRequest, BuildWork, Step, base_key, debian_release, step_key,
};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::nodes::Nodes;
use crate::nodes::liveness::Cluster;
use crate::registry::{OCI_MANIFEST, RegistryState};

/// Where step images are kept.
pub const CACHE_REPO: &str = "gantry-build-cache";
/// Where `debian_slim` bases are kept, tagged `<release>-py<version>`.
pub const DEBIAN_REPO: &str = "gantry/debian-slim";
/// Times a step that lost its node is tried.
const TRIES: usize = 3;
/// Longest one step may run.
const STEP_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// Longest a build waits for a node to run a step on.
const NODE_WAIT: Duration = Duration::from_secs(60);
/// Longest a `debian_slim` base may take to make.
const BASE_TIMEOUT: Duration = Duration::from_secs(30 * 60);

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
}

/// Why a step failed: said to the client, with the command's exit code when it ran.
struct StepFailed {
    exit_code: Option<i32>,
    message: String,
    /// The node went away or broke off: worth another try.
    retry: bool,
}

impl StepFailed {
    fn new(message: impl Into<String>) -> Self {
        Self {
            exit_code: None,
            message: message.into(),
            retry: false,
        }
    }
}

/// An image in the registry as a build sees it: its manifest and config.
#[derive(Clone)]
struct ImageDoc {
    manifest: Value,
    config: Value,
}

impl ImageDoc {
    /// An image with no layers yet and `run` as its run configuration (`Env`, `Cmd`, …).
    fn without_layers(run: Value) -> Self {
        Self {
            manifest: json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": []}),
            config: json!({
                "architecture": "amd64",
                "os": "linux",
                "config": run,
                "rootfs": {"type": "layers", "diff_ids": []},
                "history": [],
            }),
        }
    }
}

#[derive(Clone)]
pub struct BuildService {
    registry: RegistryState,
    nodes: Nodes,
    cluster: Cluster,
    /// The Debian mirror `debian_slim` bases come from (`None`: the agent host's apt
    /// sources).
    debian_mirror: Option<String>,
    /// One build of a key at a time.
    building: Arc<Mutex<HashMap<String, Weak<tokio::sync::Mutex<()>>>>>,
}

impl BuildService {
    pub fn new(
        registry: RegistryState,
        nodes: Nodes,
        cluster: Cluster,
        debian_mirror: Option<String>,
    ) -> Self {
        Self {
            registry,
            nodes,
            cluster,
            debian_mirror,
            building: Arc::default(),
        }
    }

    /// Checks the request and starts the build; its progress comes on the receiver (the
    /// build goes on if nobody listens: its steps stay in the cache).
    pub fn start(&self, req: BuildRequest) -> Result<mpsc::Receiver<BuildEvent>, BuildError> {
        req.recipe.validate(true).map_err(|e| BuildError::Invalid {
            field: format!("recipe.{}", e.field),
            message: e.message,
        })?;
        if let Some(name) = &req.name {
            let (repo, tag) = gantry_shared::image_name::registry_path(name);
            if gantry_shared::image_name::is_qualified(name)
                || tag.starts_with("sha256:")
                || repo.starts_with("gantry")
                || repo.is_empty()
            {
                return Err(BuildError::Invalid {
                    field: "name".into(),
                    message: format!(
                        "`{name}` is not a name for the cluster's registry: `name` or \
                         `name:tag`, not starting with `gantry`"
                    ),
                });
            }
        }
        let (tx, rx) = mpsc::channel(1024);
        let service = self.clone();
        tokio::spawn(async move {
            let result = service.build(&req, &tx).await;
            let event = match result {
                Ok((image, digest)) => BuildEvent::Done { image, digest },
                Err((step, f)) => BuildEvent::Failed {
                    step,
                    exit_code: f.exit_code,
                    message: f.message,
                },
            };
            let _ = tx.send(event).await;
        });
        Ok(rx)
    }

    async fn build(
        &self,
        req: &BuildRequest,
        events: &mpsc::Sender<BuildEvent>,
    ) -> Result<(String, String), (Option<usize>, StepFailed)> {
        let registry = &self.registry;
        let total = req.recipe.steps.len();
        let say = |e: BuildEvent| {
            let events = events.clone();
            async move {
                let _ = events.send(e).await;
            }
        };
        let mut node: Option<NodeId> = None;
        // The image so far: its key, manifest and config, and the reference a node pulls
        // it by.
        let (mut key, mut image, mut reference) = self
            .base(&req.recipe.base, total, &mut node, events)
            .await
            .map_err(|f| (Some(0), f))?;
        for (i, step) in req.recipe.steps.iter().enumerate() {
            let index = i + 1;
            let next = step_key(&key, step);
            let lock = self.lock_for(&next);
            let _one = lock.lock().await;
            if let Some(found) = load(registry, CACHE_REPO, &next).await {
                say(BuildEvent::Step {
                    index,
                    total,
                    summary: step.summary(),
                    cached: true,
                    node: None,
                })
                .await;
                reference = format!("{CACHE_REPO}:{next}");
                (key, image) = (next, found);
                continue;
            }
            let built = match step.script() {
                None => {
                    say(BuildEvent::Step {
                        index,
                        total,
                        summary: step.summary(),
                        cached: false,
                        node: None,
                    })
                    .await;
                    assemble(registry, &image, step).await
                }
                Some(script) => {
                    let work = BuildWork::Step {
                        image: reference.clone(),
                        script,
                        timeout_ms: STEP_TIMEOUT.as_millis() as u64,
                    };
                    let summary = step.summary();
                    let layer = self
                        .on_a_node(work, &mut node, events, building(index, total, &summary))
                        .await;
                    layer.and_then(Received::layer).and_then(|(digest, size)| {
                        with_layer(&image, &digest, size, &step.summary())
                    })
                }
            }
            .map_err(|f| (Some(index), f))?;
            store(registry, CACHE_REPO, &next, &built)
                .await
                .map_err(|f| (Some(index), f))?;
            reference = format!("{CACHE_REPO}:{next}");
            (key, image) = (next, built);
        }
        let name = req
            .name
            .clone()
            .unwrap_or_else(|| format!("recipe:{}", &key[..16]));
        let (repo, tag) = gantry_shared::image_name::registry_path(&name);
        let digest = store(registry, repo, tag, &image)
            .await
            .map_err(|f| (None, f))?;
        tracing::info!(image = %name, %digest, steps = total, "image built");
        Ok((name, digest))
    }

    /// The base image, its key and the reference nodes pull it by: an image of the
    /// cluster registry as it is now (keyed by its manifest digest), or a `debian_slim`
    /// base, made on a node the first time.
    async fn base(
        &self,
        base: &Base,
        total: usize,
        node: &mut Option<NodeId>,
        events: &mpsc::Sender<BuildEvent>,
    ) -> Result<(String, ImageDoc, String), StepFailed> {
        let registry = &self.registry;
        match base {
            Base::Image(name) => {
                if gantry_shared::image_name::is_qualified(name) {
                    return self.imported(name, total, node, events).await;
                }
                let (repo, tag) = gantry_shared::image_name::registry_path(name);
                let (bytes, digest) = registry.manifest(repo, tag).await.ok_or_else(|| {
                    StepFailed::new(format!(
                        "base image `{name}` is not in the cluster's registry (`gantry image \
                         list` shows what is)"
                    ))
                })?;
                let manifest: Value = serde_json::from_slice(&bytes)
                    .map_err(|e| StepFailed::new(format!("base image `{name}`: {e}")))?;
                if manifest["layers"].as_array().is_none() {
                    return Err(StepFailed::new(format!(
                        "base image `{name}` is a multi-platform index; push a single linux/amd64 \
                         image"
                    )));
                }
                let image = with_config(registry, manifest).await?;
                let _ = events
                    .send(BuildEvent::Step {
                        index: 0,
                        total,
                        summary: format!("image {name}"),
                        cached: true,
                        node: None,
                    })
                    .await;
                Ok((base_key(&digest), image, format!("{repo}@{digest}")))
            }
            Base::DebianSlim(py) => {
                let release = debian_release(py).map_err(StepFailed::new)?;
                let tag = format!("{release}-py{py}");
                let key = base_key(&format!("debian_slim {release} {py}"));
                let lock = self.lock_for(&key);
                let _one = lock.lock().await;
                let summary = format!("debian_slim {py} ({release}, mmdebstrap)");
                if let Some(found) =
                    cached_base(registry, (DEBIAN_REPO, &tag), total, &summary, events).await
                {
                    return Ok((key, found, format!("{DEBIAN_REPO}:{tag}")));
                }
                let work = BuildWork::DebianBase {
                    release: release.to_owned(),
                    mirror: self.debian_mirror.clone(),
                };
                let (digest, size) = self
                    .on_a_node(work, node, events, building(0, total, &summary))
                    .await?
                    .layer()?;
                let empty = ImageDoc::without_layers(json!({
                    "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                    "Cmd": ["python3"],
                }));
                let image = with_layer(&empty, &digest, size, &summary)?;
                store(registry, DEBIAN_REPO, &tag, &image).await?;
                Ok((key, image, format!("{DEBIAN_REPO}:{tag}")))
            }
        }
    }

    /// A base from another registry, copied into the cluster's once (keyed by its
    /// reference: pin a digest, `name@sha256:…`, to follow a moving tag): a node pulls it
    /// and sends its configuration and layers back.
    async fn imported(
        &self,
        name: &str,
        total: usize,
        node: &mut Option<NodeId>,
        events: &mpsc::Sender<BuildEvent>,
    ) -> Result<(String, ImageDoc, String), StepFailed> {
        let registry = &self.registry;
        let key = base_key(&format!("image {name}"));
        let reference = format!("{CACHE_REPO}:{key}");
        let lock = self.lock_for(&key);
        let _one = lock.lock().await;
        let summary = format!("image {name} (copied into the cluster's registry)");
        if let Some(found) =
            cached_base(registry, (CACHE_REPO, &key), total, &summary, events).await
        {
            return Ok((key, found, reference));
        }
        let work = BuildWork::Import {
            reference: name.to_owned(),
        };
        let image = match self
            .on_a_node(work, node, events, building(0, total, &summary))
            .await?
        {
            Received::Image(image) => image,
            Received::Layer(..) => {
                return Err(StepFailed::new("the node sent a layer, not an image"));
            }
        };
        store(registry, CACHE_REPO, &key, &image).await?;
        Ok((key, image, reference))
    }

    /// The lock one key's build holds.
    fn lock_for(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut map = self.building.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, w| w.strong_count() > 0);
        if let Some(l) = map.get(key).and_then(Weak::upgrade) {
            return l;
        }
        let l = Arc::new(tokio::sync::Mutex::new(()));
        map.insert(key.to_owned(), Arc::downgrade(&l));
        l
    }

    /// Runs `work` on a node (the last one used if it is still there), forwarding its
    /// log, and stores the layer it sends back; another node is tried when one goes away.
    async fn on_a_node(
        &self,
        work: BuildWork,
        node: &mut Option<NodeId>,
        events: &mpsc::Sender<BuildEvent>,
        starting: impl Fn(&NodeId) -> BuildEvent,
    ) -> Result<Received, StepFailed> {
        let registry = &self.registry;
        let timeout = match work {
            BuildWork::Step { .. } => STEP_TIMEOUT,
            BuildWork::DebianBase { .. } | BuildWork::Import { .. } => BASE_TIMEOUT,
        } + Duration::from_secs(60);
        let mut last = StepFailed::new(format!(
            "no node was up, ready and connected to build on within {NODE_WAIT:?}"
        ));
        let mut avoid: Vec<NodeId> = Vec::new();
        for _ in 0..TRIES {
            let Some((id, session)) = self.wait_for_node(node.as_ref(), &avoid, events).await
            else {
                break;
            };
            *node = Some(id.clone());
            let _ = events.send(starting(&id)).await;
            let run = exchange(registry, &session.conn, &work, events);
            let result = match tokio::time::timeout(timeout, run).await {
                Ok(r) => r,
                Err(_) => Err(StepFailed::new(format!(
                    "the step did not finish within {timeout:?}"
                ))),
            };
            match result {
                Ok(received) => return Ok(received),
                Err(f) if f.retry => {
                    tracing::warn!(node = %id, error = %f.message, "a build step lost its node; trying again");
                    let _ = events
                        .send(BuildEvent::Log {
                            line: format!(
                                "gantry: node {id} broke off ({}); trying again",
                                f.message
                            ),
                        })
                        .await;
                    avoid.push(id);
                    last = f;
                }
                Err(f) => return Err(f),
            }
        }
        Err(last)
    }

    /// [`BuildService::pick`], waiting up to [`NODE_WAIT`] for a node (a cluster that is
    /// starting, or whose nodes are all away for a moment), saying so once.
    async fn wait_for_node(
        &self,
        prefer: Option<&NodeId>,
        avoid: &[NodeId],
        events: &mpsc::Sender<BuildEvent>,
    ) -> Option<(NodeId, crate::nodes::Session)> {
        let until = tokio::time::Instant::now() + NODE_WAIT;
        let mut told = false;
        loop {
            if let Some(found) = self.pick(prefer, avoid) {
                return Some(found);
            }
            if tokio::time::Instant::now() >= until {
                return None;
            }
            if !told {
                told = true;
                let _ = events
                    .send(BuildEvent::Log {
                        line: "gantry: waiting for a node that is up, ready and connected".into(),
                    })
                    .await;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// A connected, ready node: `prefer` if it is one, else the lowest other one not in
    /// `avoid` (or in it, when nothing else is left).
    fn pick(
        &self,
        prefer: Option<&NodeId>,
        avoid: &[NodeId],
    ) -> Option<(NodeId, crate::nodes::Session)> {
        let ready: Vec<NodeId> = self
            .cluster
            .statuses()
            .into_iter()
            .filter(|s| s.placeable())
            .map(|s| s.id)
            .filter(|id| self.nodes.get(id).is_some())
            .collect();
        let choice = prefer
            .filter(|p| ready.contains(p) && !avoid.contains(p))
            .cloned()
            .or_else(|| ready.iter().find(|n| !avoid.contains(n)).cloned())
            .or_else(|| ready.first().cloned())?;
        let session = self.nodes.get(&choice)?;
        Some((choice, session))
    }
}

/// The event a step (`index`; 0 is the base) built on a node starts with.
fn building(index: usize, total: usize, summary: &str) -> impl Fn(&NodeId) -> BuildEvent + '_ {
    move |n| BuildEvent::Step {
        index,
        total,
        summary: summary.to_owned(),
        cached: false,
        node: Some(n.to_string()),
    }
}

/// What a node's share of a build brought back, in the registry already.
enum Received {
    /// One layer: its digest and size.
    Layer(String, u64),
    /// A whole image (an import).
    Image(ImageDoc),
}

impl Received {
    fn layer(self) -> Result<(String, u64), StepFailed> {
        match self {
            Received::Layer(digest, size) => Ok((digest, size)),
            Received::Image(_) => Err(StepFailed::new("the node sent an image, not a layer")),
        }
    }
}

/// One `Command::Build` on its own stream: the log to `events`, the layers into the
/// registry.
async fn exchange(
    registry: &RegistryState,
    conn: &quinn::Connection,
    work: &BuildWork,
    events: &mpsc::Sender<BuildEvent>,
) -> Result<Received, StepFailed> {
    let broke = |e: String| StepFailed {
        exit_code: None,
        message: e,
        retry: true,
    };
    let (mut tx, mut rx) = crate::control::open_command(conn, &Command::Build(work.clone()))
        .await
        .map_err(broke)?;
    let _ = tx.finish();
    loop {
        match crate::control::read_reply::<BuildFrame>(&mut rx)
            .await
            .map_err(broke)?
        {
            BuildFrame::Log { line } => {
                let _ = events.send(BuildEvent::Log { line }).await;
            }
            BuildFrame::Failed { exit_code, message } => {
                return Err(StepFailed {
                    exit_code,
                    message,
                    retry: false,
                });
            }
            BuildFrame::Layer => break,
            BuildFrame::Image {
                entrypoint,
                cmd,
                env,
                workdir,
                user,
                layers,
            } => {
                let mut image = ImageDoc::without_layers(json!({
                    "Env": env, "Cmd": cmd, "Entrypoint": entrypoint,
                    "WorkingDir": workdir.unwrap_or_default(),
                    "User": user.unwrap_or_default(),
                }));
                for i in 0..layers {
                    let bytes = match crate::control::read_reply::<BuildFrame>(&mut rx)
                        .await
                        .map_err(broke)?
                    {
                        BuildFrame::Sized { bytes } => bytes,
                        other => {
                            return Err(broke(format!("layer {i} of the import: {other:?}")));
                        }
                    };
                    let (digest, size) = sized_blob(registry, &mut rx, bytes).await?;
                    image = with_layer(&image, &digest, size, &format!("imported layer {i}"))?;
                }
                return Ok(Received::Image(image));
            }
            BuildFrame::Sized { .. } => {
                return Err(broke("the node sent a layer's size out of turn".into()));
            }
        }
    }
    let mut blob = registry
        .blob_writer()
        .await
        .map_err(|e| StepFailed::new(format!("the registry cannot take the layer: {e}")))?;
    loop {
        match rx.read_chunk(256 << 10, true).await {
            Ok(Some(chunk)) => blob
                .write(&chunk.bytes)
                .await
                .map_err(|e| StepFailed::new(format!("the registry cannot take the layer: {e}")))?,
            Ok(None) => break,
            // Dropped unfinished: nothing of it stays.
            Err(e) => return Err(broke(e.to_string())),
        }
    }
    blob.finish()
        .await
        .map(|(digest, size)| Received::Layer(digest, size))
        .map_err(|e| StepFailed::new(format!("the registry cannot take the layer: {e}")))
}

/// Exactly `bytes` bytes of `rx` as a blob of the registry.
async fn sized_blob(
    registry: &RegistryState,
    rx: &mut quinn::RecvStream,
    bytes: u64,
) -> Result<(String, u64), StepFailed> {
    let store_err =
        |e: std::io::Error| StepFailed::new(format!("the registry cannot take the layer: {e}"));
    let broke = |message: String| StepFailed {
        exit_code: None,
        message,
        retry: true,
    };
    let mut blob = registry.blob_writer().await.map_err(store_err)?;
    let mut left = bytes;
    while left > 0 {
        let want = usize::try_from(left.min(256 << 10)).unwrap_or(256 << 10);
        match rx.read_chunk(want, true).await {
            Ok(Some(chunk)) => {
                left = left.saturating_sub(chunk.bytes.len() as u64);
                blob.write(&chunk.bytes).await.map_err(store_err)?;
            }
            Ok(None) => {
                return Err(broke(format!(
                    "the node stopped {left} bytes short of a layer"
                )));
            }
            Err(e) => return Err(broke(e.to_string())),
        }
    }
    blob.finish().await.map_err(store_err)
}

/// A base already made (`repo:tag` in the registry), said to be cached.
async fn cached_base(
    registry: &RegistryState,
    (repo, tag): (&str, &str),
    total: usize,
    summary: &str,
    events: &mpsc::Sender<BuildEvent>,
) -> Option<ImageDoc> {
    let found = load(registry, repo, tag).await?;
    let _ = events
        .send(BuildEvent::Step {
            index: 0,
            total,
            summary: summary.to_owned(),
            cached: true,
            node: None,
        })
        .await;
    Some(found)
}

/// An image of the registry, by `repo:tag`, with its config.
async fn load(registry: &RegistryState, repo: &str, tag: &str) -> Option<ImageDoc> {
    let (bytes, _) = registry.manifest(repo, tag).await?;
    let manifest: Value = serde_json::from_slice(&bytes).ok()?;
    with_config(registry, manifest).await.ok()
}

async fn with_config(registry: &RegistryState, manifest: Value) -> Result<ImageDoc, StepFailed> {
    let digest = manifest["config"]["digest"]
        .as_str()
        .ok_or_else(|| StepFailed::new("the image's manifest names no config"))?;
    let bytes = registry
        .read_blob(digest)
        .await
        .map_err(|e| StepFailed::new(format!("the image's config {digest}: {e}")))?;
    let config = serde_json::from_slice(&bytes)
        .map_err(|e| StepFailed::new(format!("the image's config {digest}: {e}")))?;
    Ok(ImageDoc { manifest, config })
}

/// Writes the image's config, then its manifest tagged `repo:tag`; returns the digest.
async fn store(
    registry: &RegistryState,
    repo: &str,
    tag: &str,
    image: &ImageDoc,
) -> Result<String, StepFailed> {
    let config = serde_json::to_vec(&image.config).map_err(|e| StepFailed::new(e.to_string()))?;
    let config_digest = registry
        .put_blob(&config)
        .await
        .map_err(|e| StepFailed::new(format!("the registry cannot take the config: {e}")))?;
    let mut manifest = image.manifest.clone();
    manifest["schemaVersion"] = json!(2);
    manifest["mediaType"] = json!(OCI_MANIFEST);
    manifest["config"] = json!({
        "mediaType": "application/vnd.oci.image.config.v1+json",
        "digest": config_digest,
        "size": config.len(),
    });
    let bytes = serde_json::to_vec(&manifest).map_err(|e| StepFailed::new(e.to_string()))?;
    registry
        .put_image_manifest(repo, tag, &bytes)
        .await
        .map_err(StepFailed::new)
}

/// `image` with one more (uncompressed) layer.
fn with_layer(
    image: &ImageDoc,
    digest: &str,
    size: u64,
    created_by: &str,
) -> Result<ImageDoc, StepFailed> {
    let mut out = image.clone();
    let layers = out.manifest["layers"]
        .as_array_mut()
        .ok_or_else(|| StepFailed::new("the image's manifest has no layers"))?;
    layers.push(json!({
        "mediaType": "application/vnd.oci.image.layer.v1.tar",
        "digest": digest,
        "size": size,
    }));
    if !out.config["rootfs"]["diff_ids"].is_array() {
        out.config["rootfs"] = json!({"type": "layers", "diff_ids": []});
    }
    if let Some(ids) = out.config["rootfs"]["diff_ids"].as_array_mut() {
        ids.push(json!(digest));
    }
    history(&mut out.config, created_by, false);
    Ok(out)
}

/// Appends a history entry (an empty layer for configuration-only steps).
fn history(config: &mut Value, created_by: &str, empty_layer: bool) {
    if !config["history"].is_array() {
        config["history"] = json!([]);
    }
    if let Some(h) = config["history"].as_array_mut() {
        let mut entry = json!({"created_by": format!("gantry: {created_by}")});
        if empty_layer {
            entry["empty_layer"] = json!(true);
        }
        h.push(entry);
    }
}

/// A step done here: configuration changes, or an uploaded archive as a layer.
async fn assemble(
    registry: &RegistryState,
    image: &ImageDoc,
    step: &Step,
) -> Result<ImageDoc, StepFailed> {
    let mut out = image.clone();
    if !out.config["config"].is_object() {
        out.config["config"] = json!({});
    }
    let c = &mut out.config["config"];
    match step {
        Step::Env(vars) => {
            let mut env: Vec<String> = c["Env"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            for (k, v) in vars {
                env.retain(|e| e.split_once('=').map(|(n, _)| n) != Some(k.as_str()));
                env.push(format!("{k}={v}"));
            }
            c["Env"] = json!(env);
        }
        Step::Workdir(d) => c["WorkingDir"] = json!(d),
        Step::Entrypoint(e) => c["Entrypoint"] = json!(e),
        Step::Cmd(cmd) => c["Cmd"] = json!(cmd),
        Step::AddLocalFile(a) | Step::AddLocalDir(a) => {
            let digest = a
                .digest
                .as_deref()
                .ok_or_else(|| StepFailed::new("the upload's digest is missing"))?;
            if !registry.has_blob(digest) {
                return Err(StepFailed::new(format!(
                    "the upload of `{}` ({digest}) is not in the registry; `gantry image build` \
                     uploads it",
                    a.local
                )));
            }
            let size = registry
                .read_blob(digest)
                .await
                .map(|b| b.len() as u64)
                .map_err(|e| StepFailed::new(e.to_string()))?;
            return with_layer(image, digest, size, &step.summary());
        }
        Step::RunCommands(_) | Step::AptInstall(_) | Step::PipInstall(_) => {
            return Err(StepFailed::new("a step that runs is built on a node"));
        }
    }
    history(&mut out.config, &step.summary(), true);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> ImageDoc {
        ImageDoc {
            manifest: json!({"layers": [{"digest": "sha256:aa", "size": 1}]}),
            config: json!({"config": {"Env": ["PATH=/bin", "MODE=dev"]}, "rootfs": {"type": "layers", "diff_ids": ["sha256:aa"]}}),
        }
    }

    #[tokio::test]
    async fn configuration_steps_change_the_config_only() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = crate::store::Store::open(&dir.path().join("db")).expect("store");
        let tokens = store.api_tokens().expect("tokens");
        let registry = RegistryState::open(&dir.path().join("registry"), tokens).expect("registry");
        let step = Step::Env([("MODE".to_owned(), "prod".to_owned())].into());
        let out = assemble(&registry, &image(), &step)
            .await
            .ok()
            .expect("env");
        assert_eq!(
            out.config["config"]["Env"],
            json!(["PATH=/bin", "MODE=prod"])
        );
        assert_eq!(out.manifest, image().manifest, "no new layer");
        let out = assemble(&registry, &out, &Step::Workdir("/app".into()))
            .await
            .ok()
            .expect("workdir");
        assert_eq!(out.config["config"]["WorkingDir"], json!("/app"));
        assert_eq!(out.config["history"].as_array().map(Vec::len), Some(2));
        let layered = with_layer(&out, "sha256:bb", 7, "run").ok().expect("layer");
        assert_eq!(
            layered.config["rootfs"]["diff_ids"],
            json!(["sha256:aa", "sha256:bb"])
        );
        assert_eq!(layered.manifest["layers"][1]["size"], json!(7));
    }
}
