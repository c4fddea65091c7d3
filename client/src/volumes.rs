//! `gantry volume …` and `gantry run --volume`: volumes made, listed and deleted, and their
//! files put, fetched, listed and removed through the coordinator (which streams them to
//! and from the node that holds them).

use gantry_shared::volumes::{MountPath, VolumeMounts, VolumeName, VolumeUse};

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
