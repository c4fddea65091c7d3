//! `gantry image import|list`: root filesystems packed as one-layer OCI images and pushed
//! to the cluster's embedded registry, and the registry's catalog.

use std::path::Path;

use anyhow::{Context, bail};

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
        let url = api.url(&format!("/v2/{repo}/blobs/uploads/?digest={d}"));
        let r = api.send_raw(api.http().post(url).body(blob)).await?;
        refused(r, "upload").await?;
    }
    let put = api
        .http()
        .put(api.url(&format!("/v2/{repo}/manifests/{tag}")))
        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
        .body(manifest.clone());
    refused(api.send_raw(put).await?, "manifest").await?;
    Ok(digest(&manifest))
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
