//! `gantry image import|list`: root filesystems packed as one-layer OCI images and pushed
//! to the cluster's embedded registry, and the registry's catalog.

use std::path::Path;

use anyhow::{Context, bail};
use sha2::Digest;

use crate::api::ApiClient;
use crate::config::CliConfig;

/// `gantry image import`: packs a root filesystem (a directory or an uncompressed tarball)
/// as a one-layer OCI image and pushes it to the cluster's embedded registry as `name`
/// (`repo` or `repo:tag`). Returns the manifest digest.
pub async fn import_image(
    cfg: &CliConfig,
    source: &Path,
    name: &str,
    cmd: Vec<String>,
) -> anyhow::Result<String> {
    use sha2::{Digest, Sha256};
    // Where the agents and the coordinator's image check look for the short name.
    let (repo, tag) = gantry_shared::image_name::registry_path(name);
    let layer = if source.is_dir() {
        let src = source.to_owned();
        tokio::task::spawn_blocking(move || -> std::io::Result<Vec<u8>> {
            let mut b = tar::Builder::new(Vec::new());
            b.follow_symlinks(false);
            b.append_dir_all(".", &src)?;
            b.into_inner()
        })
        .await??
    } else {
        let bytes =
            std::fs::read(source).with_context(|| format!("reading {}", source.display()))?;
        if bytes.starts_with(&[0x1f, 0x8b]) || bytes.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            bail!(
                "{} is compressed; import a directory or an uncompressed tarball",
                source.display()
            );
        }
        bytes
    };
    let digest = |b: &[u8]| format!("sha256:{}", hex::encode(Sha256::digest(b)));
    let layer_digest = digest(&layer);
    let mut run_config = serde_json::json!({"Env": [format!("PATH={}", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")]});
    if !cmd.is_empty() {
        run_config["Cmd"] = serde_json::json!(cmd);
    }
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux", "config": run_config,
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    }))?;
    let config_digest = digest(&config);
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest, "size": layer.len()}],
    }))?;
    let api = cfg.client()?;
    for (blob, d) in [(layer, &layer_digest), (config.clone(), &config_digest)] {
        upload_blob(&api, repo, blob, d).await?;
    }
    let put = api
        .http()
        .put(api.url(&format!("/v2/{repo}/manifests/{tag}")))
        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
        .body(manifest.clone());
    refused(api.send_raw(put).await?, "manifest").await?;
    Ok(digest(&manifest))
}

/// Pushes one blob of `digest` to the registry (in one request).
async fn upload_blob(
    api: &ApiClient,
    repo: &str,
    blob: Vec<u8>,
    digest: &str,
) -> anyhow::Result<()> {
    let url = api.url(&format!("/v2/{repo}/blobs/uploads/?digest={digest}"));
    let r = api.send_raw(api.http().post(url).body(blob)).await?;
    refused(r, "upload").await?;
    Ok(())
}

/// Where `gantry image build` uploads local files (blobs are shared by every
/// repository; the build finds them by digest).
const UPLOADS_REPO: &str = "gantry-build-uploads";

/// `gantry image build -f RECIPE [--name NAME]`: uploads the recipe's local files by
/// their content's hash, starts the build and prints its progress; returns the exit code
/// (0 when the image was built).
pub async fn build(
    cfg: &CliConfig,
    recipe_file: &Path,
    name: Option<String>,
    json: bool,
) -> anyhow::Result<i32> {
    use futures_util::StreamExt;
    use gantry_shared::recipes::{BuildEvent, BuildRequest, Recipe, Step};
    let text = std::fs::read_to_string(recipe_file)
        .with_context(|| format!("reading {}", recipe_file.display()))?;
    let mut recipe: Recipe = if recipe_file.extension().is_some_and(|e| e == "json") {
        serde_json::from_str(&text).with_context(|| format!("{}", recipe_file.display()))?
    } else {
        gantry_shared::config::parse(recipe_file, &text)?
    };
    recipe
        .validate(false)
        .with_context(|| format!("{}", recipe_file.display()))?;
    let api = cfg.client()?;
    let here = recipe_file.parent().unwrap_or(Path::new("."));
    for step in &mut recipe.steps {
        if let Step::AddLocalFile(a) | Step::AddLocalDir(a) = step {
            let local = here.join(&a.local);
            let (local2, remote) = (local.clone(), a.remote.clone());
            let archive = tokio::task::spawn_blocking(move || archive(&local2, &remote))
                .await?
                .with_context(|| format!("{}", local.display()))?;
            let digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&archive)));
            upload_blob(&api, UPLOADS_REPO, archive, &digest).await?;
            a.digest = Some(digest);
        }
    }
    let mut events = Box::pin(api.build_image(&BuildRequest { recipe, name }).await?);
    let mut code = 1;
    while let Some(event) = events.next().await {
        let event = event?;
        if json {
            println!("{}", serde_json::to_string(&event)?);
        }
        match event {
            BuildEvent::Step {
                index,
                total,
                summary,
                cached,
                node,
            } if !json => {
                let how = match (cached, node) {
                    (true, _) => "cached".to_owned(),
                    (false, Some(n)) => format!("building on {n}"),
                    (false, None) => "building".to_owned(),
                };
                eprintln!("[{index}/{total}] {summary}: {how}");
            }
            BuildEvent::Log { line } if !json => eprintln!("    {line}"),
            BuildEvent::Done { image, digest } => {
                if !json {
                    println!("{image} {digest}");
                }
                code = 0;
            }
            BuildEvent::Failed {
                step,
                exit_code,
                message,
            } if !json => {
                let at = step.map(|s| format!(" at step {s}")).unwrap_or_default();
                let exit = exit_code
                    .map(|c| format!(" (exit code {c})"))
                    .unwrap_or_default();
                eprintln!("build failed{at}: {message}{exit}");
            }
            _ => {}
        }
    }
    Ok(code)
}

/// A tar of `local` (a file, or a directory and everything in it) placed at `remote`
/// (absolute) in an image: entries sorted, owned by root, times zero, modes kept, so the
/// same content is the same archive (and digest).
fn archive(local: &Path, remote: &str) -> std::io::Result<Vec<u8>> {
    let remote = remote.trim_start_matches('/').trim_end_matches('/');
    let mut b = tar::Builder::new(Vec::new());
    b.follow_symlinks(false);
    b.mode(tar::HeaderMode::Deterministic);
    let meta = std::fs::metadata(local)?;
    if meta.is_dir() {
        let mut pending = vec![(local.to_owned(), remote.to_owned())];
        b.append_dir(remote, local)?;
        while let Some((dir, at)) = pending.pop() {
            let mut entries: Vec<_> = std::fs::read_dir(&dir)?.collect::<Result<_, _>>()?;
            entries.sort_by_key(|e| e.file_name());
            for e in entries {
                let inner = format!("{at}/{}", e.file_name().to_string_lossy());
                let path = e.path();
                if e.file_type()?.is_dir() {
                    b.append_dir(&inner, &path)?;
                    pending.push((path, inner));
                } else {
                    b.append_path_with_name(&path, &inner)?;
                }
            }
        }
    } else {
        b.append_path_with_name(local, remote)?;
    }
    b.into_inner()
}

/// `gantry image list`: `repo:tag` for every image in the embedded registry.
pub async fn list_images(cfg: &CliConfig) -> anyhow::Result<Vec<String>> {
    let api = cfg.client()?;
    let catalog = get_json(&api, "/v2/_catalog").await?;
    let mut out = Vec::new();
    for repo in catalog["repositories"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r.as_str())
    {
        let tags = get_json(&api, &format!("/v2/{repo}/tags/list")).await?;
        out.extend(
            tags["tags"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|t| t.as_str())
                .map(|t| format!("{repo}:{t}")),
        );
    }
    Ok(out)
}

async fn get_json(api: &ApiClient, path: &str) -> anyhow::Result<serde_json::Value> {
    let r = api.send_raw(api.http().get(api.url(path))).await?;
    Ok(refused(r, "listing").await?.json().await?)
}

/// `r` if it succeeded; else what the registry (or the API) said about refusing `what`.
async fn refused(r: reqwest::Response, what: &str) -> anyhow::Result<reqwest::Response> {
    let status = r.status();
    if status.is_success() {
        return Ok(r);
    }
    // The API's error body (`https_required`, …) or the registry's (`errors: [..]`).
    let body: serde_json::Value = r.json().await.unwrap_or_default();
    let message = body["error"]["message"]
        .as_str()
        .or_else(|| body["errors"][0]["message"].as_str())
        .map(|m| format!(": {m}"))
        .unwrap_or_default();
    bail!("the registry refused the {what} (HTTP {status}){message}")
}
