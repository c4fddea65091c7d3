//! CDI (Container Device Interface) specs for NVIDIA GPUs, as `nvidia-ctk cdi generate`
//! writes them to `/etc/cdi` or `/var/run/cdi`: when the host has a spec of kind
//! `nvidia.com/gpu`, it says exactly which device nodes, driver files, environment and
//! hooks a container needs for GPU `N` (the device named `N`, plus the spec's own
//! top-level edits), and Gantry takes them from it instead of looking for the driver.
//!
//! Specs are YAML or JSON. Every file in the directories is read; files of other kinds are
//! ignored, but a file that does not parse is an error naming it (the host's CDI setup is
//! broken, and guessing around it would hide that). Paths in a spec are host paths: the
//! edits a container gets are checked (absolute, present, device nodes are character
//! devices) and an error names the file and the field. A later directory wins over an
//! earlier one for the same device name (`/var/run/cdi` over `/etc/cdi`, as CDI says);
//! two files of one directory defining the same device are a conflict.

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::edits::{DeviceNode, Hook, HookStage, Mount, NodeProblem};

/// The spec directories CDI defines, lowest priority first.
pub const DEFAULT_DIRS: [&str; 2] = ["/etc/cdi", "/var/run/cdi"];
/// The kind whose devices are NVIDIA GPUs.
pub const KIND: &str = "nvidia.com/gpu";
/// The largest spec file read (nvidia-ctk's are tens of kilobytes).
pub const MAX_SPEC_BYTES: u64 = 4 << 20;
/// The most spec files read from one directory.
pub const MAX_SPEC_FILES: usize = 256;

/// A CDI spec file: the fields Gantry uses (others, such as annotations, are ignored).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SpecFile {
    pub cdi_version: String,
    pub kind: String,
    #[serde(default)]
    pub devices: Vec<DeviceSpec>,
    #[serde(default)]
    pub container_edits: EditsSpec,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceSpec {
    pub name: String,
    #[serde(default)]
    pub container_edits: EditsSpec,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct EditsSpec {
    /// `KEY=VALUE`.
    pub env: Vec<String>,
    pub device_nodes: Vec<NodeSpec>,
    pub mounts: Vec<MountSpec>,
    pub hooks: Vec<HookSpec>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeSpec {
    /// In the container; also the host path unless `hostPath` is given.
    pub path: PathBuf,
    pub host_path: Option<PathBuf>,
    /// `c` (character) when given.
    #[serde(rename = "type")]
    pub kind: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MountSpec {
    pub host_path: PathBuf,
    pub container_path: PathBuf,
    /// `bind` when given. The options are not used: every mount is a read-only bind.
    #[serde(rename = "type")]
    pub kind: Option<String>,
    #[serde(default)]
    pub options: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HookSpec {
    pub hook_name: String,
    pub path: PathBuf,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: Vec<String>,
    pub timeout: Option<u32>,
}

/// What is wrong with one field of a spec.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    #[error("`{}` is not an absolute path", path.display())]
    Relative { path: PathBuf },
    #[error("`{}` does not exist on this host", path.display())]
    Missing { path: PathBuf },
    #[error("`{}` is not a character device", path.display())]
    NotCharDevice { path: PathBuf },
    #[error("device type `{kind}` is not supported (only `c`)")]
    DeviceType { kind: String },
    #[error("mount type `{kind}` is not supported (only `bind`)")]
    MountType { kind: String },
    #[error(
        "`{name}` is not an OCI hook name (prestart, createRuntime, createContainer, startContainer, poststart, poststop)"
    )]
    HookName { name: String },
    #[error("`{entry}` is not KEY=VALUE")]
    Env { entry: String },
}

#[derive(Debug, thiserror::Error)]
pub enum CdiError {
    #[error("cannot read CDI spec {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("CDI spec {} is over {max} bytes", path.display(), max = MAX_SPEC_BYTES)]
    TooLarge { path: PathBuf },
    #[error(
        "CDI directory {} has over {max} spec files; remove stale ones",
        dir.display(),
        max = MAX_SPEC_FILES
    )]
    TooMany { dir: PathBuf },
    #[error(
        "CDI spec {} does not parse ({reason}); fix it, regenerate it (`nvidia-ctk cdi generate`) or remove it",
        path.display()
    )]
    Parse {
        path: PathBuf,
        /// The parser's one-line account, with the line and column.
        reason: String,
    },
    #[error(
        "CDI spec {}, field {field}: {problem}; regenerate the spec (`nvidia-ctk cdi generate`) or fix the field",
        path.display()
    )]
    Invalid {
        path: PathBuf,
        field: String,
        problem: Problem,
    },
    #[error(
        "CDI device `{KIND}={name}` is defined by both {} and {}; remove one",
        first.display(),
        second.display()
    )]
    Conflict {
        name: String,
        first: PathBuf,
        second: PathBuf,
    },
    #[error(
        "GPU {index} has no device `{KIND}={index}` in the CDI spec(s) {}, which define {}; \
         regenerate them with `nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml` (device \
         names are the GPU indices by default), or remove them to let Gantry find the driver itself",
        display_paths(specs),
        if names.is_empty() { "no device".to_owned() } else { names.join(", ") }
    )]
    NoDevice {
        index: u32,
        specs: Vec<PathBuf>,
        names: Vec<String>,
    },
}

fn display_paths(paths: &[PathBuf]) -> String {
    let v: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    v.join(", ")
}

/// The validated edits for one container's GPUs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Edits {
    pub devices: Vec<DeviceNode>,
    pub mounts: Vec<Mount>,
    /// In order; a later value for a name replaces an earlier one.
    pub env: Vec<(String, String)>,
    pub hooks: Vec<Hook>,
    /// The spec files the edits came from.
    pub specs: Vec<PathBuf>,
}

/// One spec of kind [`KIND`] and where it was found.
#[derive(Debug, Clone)]
struct Loaded {
    path: PathBuf,
    /// The index of its directory: higher wins.
    rank: usize,
    spec: SpecFile,
}

/// The host's NVIDIA GPU specs.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    specs: Vec<Loaded>,
}

impl Registry {
    /// Reads every spec in `dirs` (lowest priority first); missing directories are skipped.
    pub fn load(dirs: &[PathBuf]) -> Result<Self, CdiError> {
        let mut specs = Vec::new();
        for (rank, dir) in dirs.iter().enumerate() {
            for path in spec_files(dir)? {
                if let Some(spec) = read_spec(&path)? {
                    specs.push(Loaded { path, rank, spec });
                }
            }
        }
        Ok(Self { specs })
    }

    /// No spec of kind [`KIND`]: the driver is found another way.
    pub fn is_empty(&self) -> bool {
        self.specs.is_empty()
    }

    pub fn files(&self) -> Vec<PathBuf> {
        self.specs.iter().map(|s| s.path.clone()).collect()
    }

    /// The edits for GPUs `indices` (the devices named by their indices, then each used
    /// spec's own edits), checked against the host.
    pub fn edits(&self, indices: &[u32]) -> Result<Edits, CdiError> {
        let mut found = Vec::new();
        for &index in indices {
            let (s, d) = self
                .device(&index.to_string())?
                .ok_or_else(|| self.no_device(index))?;
            found.push((s, d));
        }
        let mut out = Edits::default();
        // CDI's order: a spec's own edits, then its devices'.
        for &(s, _) in &found {
            let spec = &self.specs[s];
            if !out.specs.contains(&spec.path) {
                out.specs.push(spec.path.clone());
                apply(
                    &mut out,
                    &spec.path,
                    "containerEdits",
                    &spec.spec.container_edits,
                )?;
            }
        }
        for &(s, d) in &found {
            let spec = &self.specs[s];
            let field = format!("devices[{d}].containerEdits");
            apply(
                &mut out,
                &spec.path,
                &field,
                &spec.spec.devices[d].container_edits,
            )?;
        }
        // Parents before what is mounted inside them.
        out.mounts.sort_by_key(|m| m.container.components().count());
        Ok(out)
    }

    /// The spec and device index of the device `name`.
    fn device(&self, name: &str) -> Result<Option<(usize, usize)>, CdiError> {
        let mut best: Option<(usize, usize)> = None;
        for (s, spec) in self.specs.iter().enumerate() {
            let Some(d) = spec.spec.devices.iter().position(|d| d.name == name) else {
                continue;
            };
            match best {
                Some((b, _)) if self.specs[b].rank > spec.rank => {}
                Some((b, _)) if self.specs[b].rank == spec.rank => {
                    return Err(CdiError::Conflict {
                        name: name.to_owned(),
                        first: self.specs[b].path.clone(),
                        second: spec.path.clone(),
                    });
                }
                _ => best = Some((s, d)),
            }
        }
        Ok(best)
    }

    fn no_device(&self, index: u32) -> CdiError {
        let mut names: Vec<String> = self
            .specs
            .iter()
            .flat_map(|s| s.spec.devices.iter().map(|d| d.name.clone()))
            .collect();
        names.sort();
        names.dedup();
        CdiError::NoDevice {
            index,
            specs: self.files(),
            names,
        }
    }
}

/// The `.json`, `.yaml` and `.yml` files of `dir`, by name; none if it does not exist.
fn spec_files(dir: &Path) -> Result<Vec<PathBuf>, CdiError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(CdiError::Read {
                path: dir.to_owned(),
                source,
            });
        }
    };
    let mut files = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let spec_like = matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("json" | "yaml" | "yml")
        );
        if spec_like && path.is_file() {
            if files.len() == MAX_SPEC_FILES {
                return Err(CdiError::TooMany {
                    dir: dir.to_owned(),
                });
            }
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// The spec in `path` if its kind is [`KIND`].
fn read_spec(path: &Path) -> Result<Option<SpecFile>, CdiError> {
    let read_err = |source| CdiError::Read {
        path: path.to_owned(),
        source,
    };
    let mut text = String::new();
    std::fs::File::open(path)
        .map_err(read_err)?
        .take(MAX_SPEC_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(read_err)?;
    if text.len() as u64 > MAX_SPEC_BYTES {
        return Err(CdiError::TooLarge {
            path: path.to_owned(),
        });
    }
    /// Only the kind, so that specs of other vendors need not have every field Gantry
    /// reads.
    #[derive(Deserialize)]
    struct KindOnly {
        kind: String,
    }
    let json = path.extension().is_some_and(|e| e == "json");
    if parse::<KindOnly>(path, &text, json)?.kind != KIND {
        return Ok(None);
    }
    parse(path, &text, json).map(Some)
}

/// `text` as JSON or YAML, errors on one line.
fn parse<T: serde::de::DeserializeOwned>(
    path: &Path,
    text: &str,
    json: bool,
) -> Result<T, CdiError> {
    let reason = if json {
        match serde_json::from_str(text) {
            Ok(v) => return Ok(v),
            Err(e) => e.to_string(),
        }
    } else {
        match serde_saphyr::from_str(text) {
            Ok(v) => return Ok(v),
            Err(e) => e.render_with_options(serde_saphyr::render_options! {
                snippets: serde_saphyr::SnippetMode::Off,
            }),
        }
    };
    Err(CdiError::Parse {
        path: path.to_owned(),
        reason: reason.trim().replace('\n', " "),
    })
}

/// Checks `edits` (at `field` of `path`) against the host and adds them to `out`.
fn apply(out: &mut Edits, path: &Path, field: &str, edits: &EditsSpec) -> Result<(), CdiError> {
    let invalid = |sub: String, problem: Problem| CdiError::Invalid {
        path: path.to_owned(),
        field: format!("{field}.{sub}"),
        problem,
    };
    for (i, entry) in edits.env.iter().enumerate() {
        let (k, v) = entry
            .split_once('=')
            .filter(|(k, _)| !k.is_empty())
            .ok_or_else(|| {
                invalid(
                    format!("env[{i}]"),
                    Problem::Env {
                        entry: entry.clone(),
                    },
                )
            })?;
        out.env.push((k.to_owned(), v.to_owned()));
    }
    for (i, node) in edits.device_nodes.iter().enumerate() {
        let at = |f: &str| format!("deviceNodes[{i}].{f}");
        absolute(&node.path).map_err(|p| invalid(at("path"), p))?;
        let (host, host_field) = match &node.host_path {
            Some(h) => (h, at("hostPath")),
            None => (&node.path, at("path")),
        };
        absolute(host).map_err(|p| invalid(host_field.clone(), p))?;
        if let Some(kind) = node.kind.as_deref().filter(|k| *k != "c") {
            return Err(invalid(
                at("type"),
                Problem::DeviceType {
                    kind: kind.to_owned(),
                },
            ));
        }
        let device = DeviceNode::stat(host, node.path.clone()).map_err(|p| {
            let path = host.clone();
            invalid(
                host_field.clone(),
                match p {
                    NodeProblem::Missing => Problem::Missing { path },
                    NodeProblem::NotCharDevice => Problem::NotCharDevice { path },
                },
            )
        })?;
        if !out.devices.iter().any(|d| d.path == device.path) {
            out.devices.push(device);
        }
    }
    for (i, mount) in edits.mounts.iter().enumerate() {
        let at = |f: &str| format!("mounts[{i}].{f}");
        existing(&mount.host_path).map_err(|p| invalid(at("hostPath"), p))?;
        absolute(&mount.container_path).map_err(|p| invalid(at("containerPath"), p))?;
        if let Some(kind) = mount.kind.as_deref().filter(|k| *k != "bind") {
            return Err(invalid(
                at("type"),
                Problem::MountType {
                    kind: kind.to_owned(),
                },
            ));
        }
        out.mounts.retain(|m| m.container != mount.container_path);
        out.mounts.push(Mount {
            host: mount.host_path.clone(),
            container: mount.container_path.clone(),
        });
    }
    for (i, hook) in edits.hooks.iter().enumerate() {
        let at = |f: &str| format!("hooks[{i}].{f}");
        let stage = HookStage::from_oci_name(&hook.hook_name).ok_or_else(|| {
            invalid(
                at("hookName"),
                Problem::HookName {
                    name: hook.hook_name.clone(),
                },
            )
        })?;
        existing(&hook.path).map_err(|p| invalid(at("path"), p))?;
        let hook = Hook {
            stage,
            path: hook.path.clone(),
            args: hook.args.clone(),
            env: hook.env.clone(),
            timeout: hook.timeout,
        };
        if !out.hooks.contains(&hook) {
            out.hooks.push(hook);
        }
    }
    Ok(())
}

fn absolute(path: &Path) -> Result<(), Problem> {
    if path.is_absolute() {
        Ok(())
    } else {
        Err(Problem::Relative {
            path: path.to_owned(),
        })
    }
}

/// Absolute and present (a dangling link counts as missing).
fn existing(path: &Path) -> Result<(), Problem> {
    absolute(path)?;
    if path.exists() {
        Ok(())
    } else {
        Err(Problem::Missing {
            path: path.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests;
