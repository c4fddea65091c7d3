//! `gantry volume …` and `gantry run --volume`: volumes made, listed and deleted, and their
//! files put, fetched, listed and removed through the coordinator (which streams them to
//! and from the node that holds them).

use std::path::{Path, PathBuf};

use anyhow::Context;
use gantry_shared::volumes::{
    EntryKind, MountPath, Volume, VolumeBackend, VolumeListing, VolumeMounts, VolumeName,
    VolumePath, VolumeUse,
};

use crate::api::ApiClient;

/// `--volume NAME:/path`.
pub fn parse_mount(text: &str) -> Result<(MountPath, VolumeUse), String> {
    let (name, path) = text
        .split_once(':')
        .ok_or_else(|| format!("`{text}`: write NAME:/path, such as weights:/data"))?;
    let name = VolumeName::new(name).map_err(|e| e.to_string())?;
    let path = MountPath::new(path).map_err(|e| e.to_string())?;
    Ok((
        path,
        VolumeUse {
            name,
            backend: None,
        },
    ))
}

/// The `--volume` flags as a spec's mounts; a path named twice is refused.
pub fn mounts(flags: Vec<(MountPath, VolumeUse)>) -> anyhow::Result<VolumeMounts> {
    let mut out = VolumeMounts::new();
    for (path, u) in flags {
        if out.contains_key(&path) {
            anyhow::bail!("--volume: two volumes at {path}; mount each at its own path");
        }
        out.insert(path, u);
    }
    Ok(out)
}

/// `gantry volume put NAME LOCAL [REMOTE]`: a file, or a directory and everything in it.
/// REMOTE defaults to LOCAL's name at the volume's root; a REMOTE ending in `/` is a
/// directory LOCAL goes into. Returns the files and bytes written.
pub async fn put(
    client: &ApiClient,
    name: &str,
    local: &Path,
    remote: Option<&str>,
) -> anyhow::Result<(usize, u64)> {
    let meta = tokio::fs::metadata(local)
        .await
        .with_context(|| format!("{}", local.display()))?;
    let base = local
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let target = match remote {
        None => base.clone(),
        Some(r) if r.ends_with('/') => format!("{r}{base}"),
        Some(r) => r.to_owned(),
    };
    let target = VolumePath::new(target)?;
    if !meta.is_dir() {
        let file = tokio::fs::File::open(local)
            .await
            .with_context(|| format!("{}", local.display()))?;
        client.volume_put(name, target.as_str(), file).await?;
        return Ok((1, meta.len()));
    }
    let (mut files, mut bytes) = (0, 0);
    let mut pending = vec![(local.to_owned(), target)];
    while let Some((dir, at)) = pending.pop() {
        let mut entries = tokio::fs::read_dir(&dir)
            .await
            .with_context(|| format!("{}", dir.display()))?;
        while let Some(entry) = entries.next_entry().await? {
            let name_here = entry.file_name().to_string_lossy().into_owned();
            let there = at.join(&name_here)?;
            let kind = entry.file_type().await?;
            if kind.is_dir() {
                pending.push((entry.path(), there));
            } else if kind.is_file() {
                let file = tokio::fs::File::open(entry.path()).await?;
                bytes += file.metadata().await?.len();
                client.volume_put(name, there.as_str(), file).await?;
                files += 1;
            } else {
                eprintln!(
                    "skipping {} (not a file or directory)",
                    entry.path().display()
                );
            }
        }
    }
    Ok((files, bytes))
}

/// `gantry volume get NAME REMOTE [LOCAL]`: a file (to LOCAL, by default REMOTE's name
/// here; `-` is standard output), or a directory and everything in it (into LOCAL).
/// Returns the files and bytes fetched.
pub async fn get(
    client: &ApiClient,
    name: &str,
    remote: &str,
    local: Option<&Path>,
) -> anyhow::Result<(usize, u64)> {
    let remote = VolumePath::new(remote)?;
    let listing = client.volume_ls(name, remote.as_str(), true).await?;
    let is_file = listing.entries.len() == 1
        && listing.entries[0].path == remote.as_str()
        && listing.entries[0].kind != EntryKind::Dir;
    let default_name = remote.file_name().unwrap_or(name).to_owned();
    if is_file {
        if local == Some(Path::new("-")) {
            let n = client
                .volume_get(name, remote.as_str(), &mut tokio::io::stdout())
                .await?;
            return Ok((1, n));
        }
        let to = local.map_or_else(|| PathBuf::from(&default_name), Path::to_owned);
        let n = fetch_to(client, name, remote.as_str(), &to).await?;
        return Ok((1, n));
    }
    if listing.truncated {
        anyhow::bail!(
            "`{}` holds more than {} entries; get its subdirectories one by one",
            remote,
            listing.entries.len()
        );
    }
    let root = local.map_or_else(|| PathBuf::from(&default_name), Path::to_owned);
    let (mut files, mut bytes) = (0, 0);
    tokio::fs::create_dir_all(&root)
        .await
        .with_context(|| format!("{}", root.display()))?;
    for e in &listing.entries {
        let rel = e
            .path
            .strip_prefix(remote.as_str())
            .unwrap_or(&e.path)
            .trim_start_matches('/');
        // Paths come from the volume: still, nothing lands outside `root`.
        let rel = VolumePath::new(rel)?;
        let to = root.join(rel.as_str());
        match e.kind {
            EntryKind::Dir => tokio::fs::create_dir_all(&to).await?,
            EntryKind::File => {
                bytes += fetch_to(client, name, &e.path, &to).await?;
                files += 1;
            }
            EntryKind::Symlink | EntryKind::Other => {
                eprintln!("skipping {} (not a file or directory)", e.path)
            }
        }
    }
    Ok((files, bytes))
}

/// Fetches one file to `to`, written beside it first and renamed into place.
async fn fetch_to(client: &ApiClient, name: &str, remote: &str, to: &Path) -> anyhow::Result<u64> {
    if let Some(parent) = to.parent().filter(|p| !p.as_os_str().is_empty()) {
        tokio::fs::create_dir_all(parent).await?;
    }
    let partial = to.with_extension("gantry-partial");
    let mut file = tokio::fs::File::create(&partial)
        .await
        .with_context(|| format!("{}", partial.display()))?;
    let n = match client.volume_get(name, remote, &mut file).await {
        Ok(n) => n,
        Err(e) => {
            drop(file);
            let _ = tokio::fs::remove_file(&partial).await;
            return Err(e.into());
        }
    };
    file.sync_all().await?;
    tokio::fs::rename(&partial, to)
        .await
        .with_context(|| format!("{}", to.display()))?;
    Ok(n)
}

pub fn print_volumes(volumes: &[Volume], json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(volumes)?);
        return Ok(());
    }
    println!("{:<24} {:<20} {:<10} CREATED", "NAME", "WHERE", "SIZE");
    for v in volumes {
        let (place, size) = match &v.backend {
            VolumeBackend::Local { node, size_bytes } => (
                format!("node {node}"),
                size_bytes.map_or("-".to_owned(), gantry_shared::resources::bytes_text),
            ),
            VolumeBackend::Shared => ("shared".to_owned(), "-".to_owned()),
        };
        let created = crate::print::ago(gantry_shared::now_ms(), v.created_at_ms);
        let note = if v.deleting { " (deleting)" } else { "" };
        println!("{:<24} {place:<20} {size:<10} {created}{note}", v.name);
    }
    Ok(())
}

pub fn print_listing(listing: &VolumeListing, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(listing)?);
        return Ok(());
    }
    for e in &listing.entries {
        let (kind, size) = match e.kind {
            EntryKind::Dir => ("dir", "-".to_owned()),
            EntryKind::File => ("file", gantry_shared::resources::bytes_text(e.size_bytes)),
            EntryKind::Symlink => ("link", "-".to_owned()),
            EntryKind::Other => ("other", "-".to_owned()),
        };
        println!("{kind:<5} {size:>10}  {}", e.path);
    }
    if listing.truncated {
        eprintln!("(more entries than shown; list a subdirectory)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mounts_parse_with_clear_refusals() {
        let (path, u) = parse_mount("weights:/data").expect("ok");
        assert_eq!((path.as_str(), u.name.as_str()), ("/data", "weights"));
        assert!(
            parse_mount("weights")
                .expect_err("no path")
                .contains("NAME:/path")
        );
        assert!(parse_mount("weights:data").is_err());
        assert!(parse_mount("Bad:/data").is_err());
        let twice = vec![
            parse_mount("a:/data").expect("ok"),
            parse_mount("b:/data").expect("ok"),
        ];
        assert!(mounts(twice).is_err());
    }
}
