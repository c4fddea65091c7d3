//! `Command::Build`: this node's share of an image build. A step runs its script in a
//! container of its parent image (pulled from the cluster registry) on the host's network,
//! so apt and pip reach their mirrors; what the container wrote (its overlay upper
//! directory, kept after it exits) is packed into a layer and streamed back. A
//! `debian_slim` base is made with mmdebstrap on the host. Either way the coordinator
//! gets `Log` frames as the work goes, then `Layer` and the tar's bytes, or `Failed`.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use gantry_shared::protocol;
use gantry_shared::recipes::{BuildFrame, BuildWork};
use gantry_shared::{ContainerId, CpuMillis, Resources};
use tokio::io::AsyncBufReadExt;
use tokio::sync::mpsc;

use super::attempts::Attempts;
use crate::runtime::{BindMount, ContainerRequest, ExitReason, Runtime, Stream};

/// How this node runs its share of builds.
#[derive(Debug, Clone)]
pub(super) struct BuildConfig {
    /// Scratch files (a base's tarball).
    pub scratch: std::path::PathBuf,
    /// CA certificates steps trust for HTTPS (mounted while they run), if the file is
    /// there.
    pub ca_file: Option<std::path::PathBuf>,
}

/// Where a step's container finds [`BuildConfig::ca_file`]; removed from its layer.
const STEP_CA_DIR: &str = "/run/gantry-build";
const STEP_CA: &str = "/run/gantry-build/ca.pem";
/// The variables that point HTTPS clients (Python's ssl, pip, requests, curl, git) at it.
const CA_VARIABLES: [&str; 6] = [
    "SSL_CERT_FILE",
    "PIP_CERT",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "GIT_SSL_CAINFO",
    "NODE_EXTRA_CA_CERTS",
];

/// What a step's container may use (it is not placed: it runs beside the node's work).
const STEP_CPU: CpuMillis = CpuMillis(2000);
const STEP_MEMORY: u64 = 4 << 30;

/// Serves one build request on its stream.
pub(super) async fn serve(
    attempts: &Arc<Attempts>,
    runtime: &Runtime,
    config: &BuildConfig,
    work: BuildWork,
    tx: &mut quinn::SendStream,
) {
    if let BuildWork::Import { reference } = &work {
        import(attempts, config, reference, tx).await;
        return;
    }
    let (log_tx, mut log_rx) = mpsc::channel::<String>(256);
    let work_done = async {
        match work {
            BuildWork::Step {
                image,
                script,
                timeout_ms,
            } => {
                let ca = config.ca_file.as_deref().filter(|p| p.is_file());
                step(attempts, runtime, &image, &script, timeout_ms, ca, log_tx).await
            }
            BuildWork::DebianBase { release, mirror } => {
                debian_base(&config.scratch, &release, mirror.as_deref(), log_tx).await
            }
            BuildWork::Import { .. } => Err((None, "an import is served on its own".into())),
        }
    };
    tokio::pin!(work_done);
    // Log lines go out as they come; the layer (or the failure) once the work is done.
    let outcome = loop {
        tokio::select! {
            Some(line) = log_rx.recv() => {
                if !send(tx, &BuildFrame::Log { line }).await {
                    return;
                }
            }
            outcome = &mut work_done => break outcome,
        }
    };
    while let Ok(line) = log_rx.try_recv() {
        if !send(tx, &BuildFrame::Log { line }).await {
            return;
        }
    }
    match outcome {
        Ok(layer) => {
            if send(tx, &BuildFrame::Layer).await {
                let copied = async {
                    let mut file = tokio::fs::File::open(&layer.path).await?;
                    tokio::io::copy(&mut file, tx).await
                };
                if let Err(e) = copied.await {
                    tracing::warn!(error = %e, "sending a build layer failed");
                    let _ = tx.reset(1u32.into());
                }
            }
            layer.cleanup(runtime);
        }
        Err((exit_code, message)) => {
            send(tx, &BuildFrame::Failed { exit_code, message }).await;
        }
    }
}

/// A packed layer on disk, and what to remove once it is sent.
struct Layer {
    path: std::path::PathBuf,
    container: Option<ContainerId>,
}

impl Layer {
    fn cleanup(self, runtime: &Runtime) {
        let _ = std::fs::remove_file(&self.path);
        if let Some(id) = self.container
            && let Err(e) = runtime.remove(&id)
        {
            tracing::warn!(container = %id, error = %e, "cannot remove a build container");
        }
    }
}

type Failure = (Option<i32>, String);

async fn step(
    attempts: &Arc<Attempts>,
    runtime: &Runtime,
    image: &str,
    script: &str,
    timeout_ms: u64,
    ca_file: Option<&Path>,
    logs: mpsc::Sender<String>,
) -> Result<Layer, Failure> {
    let fail = |m: String| (None, m);
    let reference = pull(attempts, image).await.map_err(fail)?;
    let id = ContainerId::generate();
    let mut req = ContainerRequest::new(reference);
    req.id = Some(id.clone());
    req.entrypoint = Some(vec!["/bin/sh".into(), "-e".into(), "-c".into()]);
    req.command = Some(vec![script.to_owned()]);
    req.user = Some("0".into());
    req.resources = Resources {
        cpu: STEP_CPU,
        memory_bytes: STEP_MEMORY,
        pids: Resources::DEFAULT_PIDS,
    };
    req.timeout = Some(Duration::from_millis(timeout_ms));
    req.keep_upper = true;
    if let Some(ca) = ca_file {
        req.binds.push(BindMount {
            source: ca.to_owned(),
            destination: STEP_CA.into(),
            read_only: true,
            exec: false,
        });
        req.env
            .extend(CA_VARIABLES.map(|v| (v.to_owned(), STEP_CA.to_owned())));
    }
    runtime
        .start(req)
        .await
        .map_err(|e| fail(format!("the step's container could not start: {e}")))?;
    let forward = |stream| {
        let logs = logs.clone();
        let id = id.clone();
        async move {
            let mut partial = Vec::new();
            let _ = runtime
                .follow(&id, stream, |chunk| {
                    partial.extend_from_slice(&chunk);
                    let mut lines = Vec::new();
                    while let Some(n) = partial.iter().position(|b| *b == b'\n') {
                        let line: Vec<u8> = partial.drain(..=n).collect();
                        lines.push(String::from_utf8_lossy(&line[..n]).into_owned());
                    }
                    let logs = logs.clone();
                    async move {
                        for l in lines {
                            if logs.send(l).await.is_err() {
                                return false;
                            }
                        }
                        true
                    }
                })
                .await;
            if !partial.is_empty() {
                let _ = logs
                    .send(String::from_utf8_lossy(&partial).into_owned())
                    .await;
            }
        }
    };
    tokio::join!(forward(Stream::Stdout), forward(Stream::Stderr));
    let exit = runtime
        .wait(&id)
        .await
        .map_err(|e| fail(format!("the step's container was lost: {e}")))?;
    let discard = |runtime: &Runtime| {
        let _ = runtime.remove(&id);
    };
    if exit.exit_code != Some(0) {
        discard(runtime);
        let how = match (exit.exit_code, exit.reason) {
            (_, ExitReason::TimedOut) => format!("ran past its {timeout_ms} ms limit"),
            (_, ExitReason::OomKilled) => "ran out of memory".to_owned(),
            (Some(code), _) => format!("exited with {code}"),
            (None, reason) => format!("ended ({reason:?}, signal {:?})", exit.signal),
        };
        return Err((exit.exit_code, format!("the step {how}")));
    }
    let upper = runtime.upper_dir(&id);
    // The CA's mount point is the build's, not the image's.
    let _ = std::fs::remove_dir_all(upper.join(STEP_CA_DIR.trim_start_matches('/')));
    let path = upper.with_extension("tar");
    let packed = {
        let (upper, path) = (upper.clone(), path.clone());
        tokio::task::spawn_blocking(move || {
            crate::image::pack::pack_upper(&upper, std::fs::File::create(&path)?)
        })
        .await
    };
    match packed {
        Ok(Ok(())) => Ok(Layer {
            path,
            container: Some(id),
        }),
        Ok(Err(e)) => {
            discard(runtime);
            Err(fail(format!("packing the step's layer: {e}")))
        }
        Err(e) => {
            discard(runtime);
            Err(fail(format!("packing the step's layer: {e}")))
        }
    }
}

/// The step's image here: pulled from its registry unless the store has it.
async fn pull(attempts: &Attempts, image: &str) -> Result<String, String> {
    let images = attempts.images();
    if images.get(image).is_ok() {
        return Ok(image.to_owned());
    }
    let (reference, auth, scheme) = attempts.locate(image).ok_or_else(|| {
        "this node has no session with the cluster registry yet; the build is retried".to_owned()
    })?;
    if images.get(&reference).is_ok() {
        return Ok(reference);
    }
    images
        .pull_from(&reference, &auth, scheme)
        .await
        .map_err(|e| format!("pulling {image}: {e}"))?;
    Ok(reference)
}

/// An image of another registry: pulled here, its configuration, then each layer (as
/// unpacked, packed again) with its size.
async fn import(
    attempts: &Arc<Attempts>,
    config: &BuildConfig,
    reference: &str,
    tx: &mut quinn::SendStream,
) {
    let pulled = async {
        let name = pull(attempts, reference).await?;
        let images = attempts.images();
        let record = images.get(&name).map_err(|e| e.to_string())?;
        let dirs = images.layer_dirs(&record).map_err(|e| e.to_string())?;
        Ok::<_, String>((record, dirs))
    };
    let (record, dirs) = match pulled.await {
        Ok(found) => found,
        Err(message) => {
            send(
                tx,
                &BuildFrame::Failed {
                    exit_code: None,
                    message,
                },
            )
            .await;
            return;
        }
    };
    let c = record.config;
    let image = BuildFrame::Image {
        entrypoint: c.entrypoint,
        cmd: c.cmd,
        env: c.env,
        workdir: c.workdir,
        user: c.user,
        layers: dirs.len() as u32,
    };
    if !send(tx, &image).await {
        return;
    }
    if let Err(e) = tokio::fs::create_dir_all(&config.scratch).await {
        tracing::warn!(error = %e, "no scratch directory for an import");
        let _ = tx.reset(1u32.into());
        return;
    }
    for dir in dirs {
        let tar = config
            .scratch
            .join(format!("import-{}.tar", ContainerId::generate()));
        let sent = async {
            let (d, t) = (dir.clone(), tar.clone());
            tokio::task::spawn_blocking(move || {
                crate::image::pack::pack_upper(&d, std::fs::File::create(&t)?)
            })
            .await
            .map_err(std::io::Error::other)??;
            let mut file = tokio::fs::File::open(&tar).await?;
            let bytes = file.metadata().await?.len();
            if !send(tx, &BuildFrame::Sized { bytes }).await {
                return Err(std::io::Error::other("the coordinator went away"));
            }
            tokio::io::copy(&mut file, tx).await.map(drop)
        };
        let result = sent.await;
        let _ = tokio::fs::remove_file(&tar).await;
        if let Err(e) = result {
            tracing::warn!(error = %e, "sending an imported layer failed");
            let _ = tx.reset(1u32.into());
            return;
        }
    }
}

/// mmdebstrap into a tarball under `scratch`, its output as log lines.
async fn debian_base(
    scratch: &Path,
    release: &str,
    mirror: Option<&str>,
    logs: mpsc::Sender<String>,
) -> Result<Layer, Failure> {
    tokio::fs::create_dir_all(scratch)
        .await
        .map_err(|e| (None, format!("{}: {e}", scratch.display())))?;
    let path = scratch.join(format!("debian-{release}-{}.tar", ContainerId::generate()));
    let mut cmd = tokio::process::Command::new("mmdebstrap");
    cmd.args([
        "--variant=minbase",
        "--include=python3,python3-pip,ca-certificates",
        // The image is the environment: pip installs into the system Python.
        "--customize-hook=rm -f \"$1\"/usr/lib/python3*/EXTERNALLY-MANAGED",
        "--customize-hook=rm -rf \"$1\"/var/lib/apt/lists/* \"$1\"/var/cache/apt/*.bin",
        release,
    ])
    .arg(&path);
    if let Some(m) = mirror {
        cmd.arg(m);
    }
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|e| {
        (
            None,
            format!(
                "cannot run mmdebstrap ({e}): a debian_slim base is made with it on a node; \
                 install it there (apt-get install mmdebstrap)"
            ),
        )
    })?;
    let pipe = |r: Option<Box<dyn tokio::io::AsyncRead + Unpin + Send>>| {
        let logs = logs.clone();
        async move {
            let Some(r) = r else { return };
            let mut lines = tokio::io::BufReader::new(r).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let _ = logs.send(line).await;
            }
        }
    };
    let out = child
        .stdout
        .take()
        .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>);
    let err = child
        .stderr
        .take()
        .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>);
    let (status, (), ()) = tokio::join!(child.wait(), pipe(out), pipe(err));
    let status = status.map_err(|e| (None, format!("mmdebstrap: {e}")))?;
    if !status.success() {
        let _ = tokio::fs::remove_file(&path).await;
        return Err((status.code(), format!("mmdebstrap failed ({status})")));
    }
    Ok(Layer {
        path,
        container: None,
    })
}

async fn send(tx: &mut quinn::SendStream, frame: &BuildFrame) -> bool {
    match protocol::encode(frame) {
        Ok(bytes) => tx.write_all(&bytes).await.is_ok(),
        Err(e) => {
            tracing::error!(error = %e, "cannot encode a build frame");
            false
        }
    }
}
