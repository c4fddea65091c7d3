//! Building a container's OCI runtime spec. Pure: the image config, the request and a few
//! host facts go in, a `Spec` comes out, so every security default is unit-tested.
//!
//! Defaults follow containerd's: its default capability set, `no_new_privileges`, its
//! masked and read-only /proc paths, a deny-all device cgroup that allows only the standard
//! devices and the assigned GPUs, and memory, cpu and pids limits always set.

use std::collections::BTreeMap;
use std::path::Path;

use gantry_shared::ContainerId;
use gantry_shared::secrets::SecretMount;
use oci_spec::runtime::Spec;
use serde_json::{Value, json};

use super::types::{ContainerRequest, NetworkMode};
use crate::gpu::GpuInjection;
use crate::image::{DEFAULT_PATH, ImageConfig};

/// containerd's default capabilities (`oci.defaultCaps`); CapEff `00000000a80425fb`.
pub const DEFAULT_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// containerd's masked paths: hidden behind /dev/null (files) or an empty tmpfs (dirs).
pub const MASKED_PATHS: &[&str] = &[
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

/// containerd's read-only paths.
pub const READONLY_PATHS: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// CFS period; quota is derived from the cpu request against it.
const CPU_PERIOD_US: u64 = 100_000;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error(
        "image `{image}` has no entrypoint or cmd; give a command to run (after `--` on the command line)"
    )]
    NoCommand { image: String },
    #[error(
        "env name `{name}` is not valid; use letters, digits and `_`, not starting with a digit"
    )]
    BadEnvName { name: String },
    #[error("workdir `{workdir}` must be an absolute path inside the container")]
    RelativeWorkdir { workdir: String },
    #[error(transparent)]
    Resources(#[from] gantry_shared::ResourceError),
    #[error("internal error: generated spec is invalid: {0}")]
    Invalid(String),
}

/// Host facts the spec depends on.
#[derive(Debug, Clone)]
pub struct HostFacts {
    /// Current hard limit of RLIMIT_NOFILE: never raised (the host may lack CAP_SYS_RESOURCE).
    pub nofile_hard: u64,
    /// Host files bind-mounted read-only for name resolution on the host network.
    pub resolv_files: Vec<&'static str>,
}

/// Everything a container's spec is built from.
pub struct SpecInput<'a> {
    pub id: &'a ContainerId,
    pub rootfs: &'a Path,
    pub image_name: &'a str,
    pub image: &'a ImageConfig,
    pub request: &'a ContainerRequest,
    pub gpus: &'a GpuInjection,
    pub host: &'a HostFacts,
    /// The container's cgroup, relative to the hierarchy roots.
    pub cgroup_path: &'a str,
}

/// What building the spec decided besides the spec itself.
#[derive(Debug)]
pub struct BuiltSpec {
    pub spec: Spec,
    /// User env keys that were dropped (`NVIDIA_*`), to tell the user.
    pub stripped_env: Vec<String>,
}

/// The argv a container runs: Docker's rules for entrypoint and cmd overrides.
pub fn argv(image: &ImageConfig, req: &ContainerRequest) -> Vec<String> {
    let (entrypoint, cmd) = match (&req.entrypoint, &req.command) {
        (Some(ep), cmd) => (ep.clone(), cmd.clone().unwrap_or_default()),
        (None, Some(cmd)) => (image.entrypoint.clone(), cmd.clone()),
        (None, None) => (image.entrypoint.clone(), image.cmd.clone()),
    };
    entrypoint.into_iter().chain(cmd).collect()
}

fn valid_env_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Merges image env and request env (request wins), strips `NVIDIA_*` from the request,
/// lays a CDI spec's env over them, appends the driver's library directories to
/// `LD_LIBRARY_PATH`, then sets the GPU visibility variables Gantry owns.
fn env(input: &SpecInput<'_>) -> Result<(Vec<String>, Vec<String>), SpecError> {
    let mut vars: BTreeMap<String, String> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    let mut set = |k: &str, v: &str, vars: &mut BTreeMap<String, String>| {
        if vars.insert(k.to_owned(), v.to_owned()).is_none() {
            order.push(k.to_owned());
        }
    };
    for kv in &input.image.env {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        if !k.starts_with("NVIDIA_VISIBLE_DEVICES") && k != "CUDA_VISIBLE_DEVICES" {
            set(k, v, &mut vars);
        }
    }
    let mut stripped = Vec::new();
    for (k, v) in &input.request.env {
        if !valid_env_name(k) {
            return Err(SpecError::BadEnvName { name: k.clone() });
        }
        if k.starts_with("NVIDIA_") || k == "CUDA_VISIBLE_DEVICES" {
            stripped.push(k.clone());
            continue;
        }
        set(k, v, &mut vars);
    }
    // A secret's value wins over the request's env.
    for secret in input
        .request
        .secrets
        .iter()
        .filter(|s| s.mount == SecretMount::Env)
    {
        for (k, v) in secret.values.iter() {
            set(k, v, &mut vars);
        }
    }
    for (k, v) in &input.gpus.env {
        // The visibility variables are Gantry's (a CDI spec sets NVIDIA_VISIBLE_DEVICES=void
        // for the legacy hook's sake).
        if !gantry_owned(k) && valid_env_name(k) {
            set(k, v, &mut vars);
        }
    }
    if !input.gpus.library_path.is_empty() {
        let current = vars.get("LD_LIBRARY_PATH").cloned().unwrap_or_default();
        let mut dirs: Vec<&str> = current.split(':').filter(|d| !d.is_empty()).collect();
        for dir in &input.gpus.library_path {
            let dir = dir.to_str().unwrap_or_default();
            if !dir.is_empty() && !dirs.contains(&dir) {
                dirs.push(dir);
            }
        }
        // After the image's and the user's own (a CUDA forward-compat libcuda wins).
        let joined = dirs.join(":");
        set("LD_LIBRARY_PATH", &joined, &mut vars);
    }
    if !vars.contains_key("PATH") {
        set("PATH", DEFAULT_PATH, &mut vars);
    }
    set("HOSTNAME", input.id.as_str(), &mut vars);
    let host_indices: Vec<String> = input.gpus.indices.iter().map(u32::to_string).collect();
    if host_indices.is_empty() {
        set("NVIDIA_VISIBLE_DEVICES", "void", &mut vars);
    } else {
        set("NVIDIA_VISIBLE_DEVICES", &host_indices.join(","), &mut vars);
        // Inside the container CUDA numbers the visible GPUs from 0.
        let local: Vec<String> = (0..host_indices.len()).map(|i| i.to_string()).collect();
        set("CUDA_VISIBLE_DEVICES", &local.join(","), &mut vars);
        if input.gpus.simulated {
            // Nothing real is behind these indices; say so where the workload can see it.
            set("GANTRY_SIMULATED_GPUS", "1", &mut vars);
        }
    }
    let env = order.iter().map(|k| format!("{k}={}", vars[k])).collect();
    Ok((env, stripped))
}

/// Variables only Gantry sets in a GPU container.
fn gantry_owned(name: &str) -> bool {
    name == "NVIDIA_VISIBLE_DEVICES"
        || name == "CUDA_VISIBLE_DEVICES"
        || name.starts_with("GANTRY_")
}

/// The OCI `hooks` object for a CDI spec's hooks, by stage.
fn hooks(gpus: &GpuInjection) -> Value {
    let mut by_stage = serde_json::Map::new();
    for h in &gpus.hooks {
        let mut hook = json!({"path": h.path, "args": h.args});
        if !h.env.is_empty() {
            hook["env"] = json!(h.env);
        }
        if let Some(t) = h.timeout {
            hook["timeout"] = json!(t);
        }
        if let Value::Array(list) = by_stage
            .entry(h.stage.oci_name())
            .or_insert_with(|| Value::Array(Vec::new()))
        {
            list.push(hook);
        }
    }
    Value::Object(by_stage)
}

pub fn build(input: &SpecInput<'_>) -> Result<BuiltSpec, SpecError> {
    let req = input.request;
    req.resources.validate()?;
    let args = argv(input.image, req);
    if args.is_empty() {
        return Err(SpecError::NoCommand {
            image: input.image_name.to_owned(),
        });
    }
    let cwd = req
        .workdir
        .clone()
        .or_else(|| input.image.workdir.clone())
        .unwrap_or_else(|| "/".into());
    if !cwd.starts_with('/') {
        return Err(SpecError::RelativeWorkdir { workdir: cwd });
    }
    let (env, stripped_env) = env(input)?;
    let caps: Vec<&str> = DEFAULT_CAPS.to_vec();
    let nofile = input.host.nofile_hard.min(1 << 20);

    let mut mounts = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]}),
        json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", format!("size={}", req.shm_bytes)]}),
        json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]}),
        json!({"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup", "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]}),
    ];
    if req.network == NetworkMode::Host {
        for f in &input.host.resolv_files {
            mounts.push(json!({"destination": f, "type": "bind", "source": f, "options": ["rbind", "ro", "nosuid", "nodev", "noexec"]}));
        }
    }
    for m in &input.gpus.mounts {
        mounts.push(json!({"destination": m.container, "type": "bind", "source": m.host, "options": ["rbind", "ro", "nosuid", "nodev"]}));
    }
    for b in &req.binds {
        let mode = if b.read_only { "ro" } else { "rw" };
        let mut options = vec!["rbind", mode, "nosuid", "nodev"];
        if !b.exec {
            options.push("noexec");
        }
        mounts.push(json!({"destination": b.destination, "type": "bind", "source": b.source, "options": options}));
    }

    let mut namespaces = vec![
        json!({"type": "pid"}),
        json!({"type": "mount"}),
        json!({"type": "ipc"}),
        json!({"type": "uts"}),
    ];
    if req.network == NetworkMode::Isolated {
        namespaces.push(json!({"type": "network"}));
    }

    let mut device_rules = vec![json!({"allow": false, "access": "rwm"})];
    let mut devices = Vec::new();
    for d in &input.gpus.devices {
        devices.push(json!({"path": d.path, "type": "c", "major": d.major, "minor": d.minor, "fileMode": 0o666, "uid": 0, "gid": 0}));
        device_rules.push(json!({"allow": true, "type": "c", "major": d.major, "minor": d.minor, "access": "rwm"}));
    }

    let cpu_quota = req.resources.cpu.0 * CPU_PERIOD_US / 1000;
    let mut spec = json!({
        "ociVersion": "1.0.2",
        "root": {"path": input.rootfs, "readonly": false},
        "hostname": input.id.as_str(),
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": env,
            "cwd": cwd,
            "noNewPrivileges": true,
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": nofile, "soft": nofile}],
        },
        "mounts": mounts,
        "linux": {
            "namespaces": namespaces,
            "cgroupsPath": format!("/{}", input.cgroup_path),
            "resources": {
                "devices": device_rules,
                "memory": {"limit": req.resources.memory_bytes},
                "cpu": {"quota": cpu_quota, "period": CPU_PERIOD_US},
                "pids": {"limit": req.resources.pids},
            },
            "devices": devices,
            "maskedPaths": MASKED_PATHS,
            "readonlyPaths": READONLY_PATHS,
        },
    });
    if !input.gpus.hooks.is_empty() {
        spec["hooks"] = hooks(input.gpus);
    }
    let spec: Spec = serde_json::from_value(spec).map_err(|e| SpecError::Invalid(e.to_string()))?;
    Ok(BuiltSpec { spec, stripped_env })
}

/// A user spec resolved to numbers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedUser {
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UserError {
    #[error(
        "user `{user}` is not in the image's /etc/passwd; use a numeric uid or a user the image defines"
    )]
    UnknownUser { user: String },
    #[error(
        "group `{group}` is not in the image's /etc/group; use a numeric gid or a group the image defines"
    )]
    UnknownGroup { group: String },
}

/// Resolves `user`, `uid`, `user:group` or `uid:gid` against the image's passwd and group
/// files (either may be empty when the image has none), as runc does.
pub fn resolve_user(spec: &str, passwd: &str, group: &str) -> Result<ResolvedUser, UserError> {
    let (user, grp) = spec
        .split_once(':')
        .map_or((spec, None), |(u, g)| (u, Some(g)));
    let passwd_entry = passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() >= 4 && (f[0] == user || (user.parse::<u32>().is_ok() && f[2] == user)));
    let (uid, primary_gid, name) = match (user.parse::<u32>(), &passwd_entry) {
        (_, Some(f)) => (
            f[2].parse()
                .map_err(|_| UserError::UnknownUser { user: user.into() })?,
            f[3].parse().unwrap_or(0),
            Some(f[0].to_owned()),
        ),
        (Ok(uid), None) => (uid, 0, None),
        (Err(_), None) => return Err(UserError::UnknownUser { user: user.into() }),
    };
    let groups: Vec<Vec<&str>> = group
        .lines()
        .map(|l| l.split(':').collect())
        .filter(|f: &Vec<&str>| f.len() >= 4)
        .collect();
    let gid = match grp {
        None => primary_gid,
        Some(g) => match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => groups
                .iter()
                .find(|f| f[0] == g)
                .and_then(|f| f[2].parse().ok())
                .ok_or_else(|| UserError::UnknownGroup { group: g.into() })?,
        },
    };
    let additional_gids = match (&name, grp) {
        (Some(n), None) => groups
            .iter()
            .filter(|f| f[3].split(',').any(|m| m == n))
            .filter_map(|f| f[2].parse().ok())
            .filter(|g| *g != gid)
            .collect(),
        _ => Vec::new(),
    };
    Ok(ResolvedUser {
        uid,
        gid,
        additional_gids,
    })
}

/// Re-exported for tests that inspect generated specs as JSON.
pub fn to_json(spec: &Spec) -> Value {
    serde_json::to_value(spec).unwrap_or(Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::inject::{DeviceNode, Hook, HookStage, Mount};

    fn host() -> HostFacts {
        HostFacts {
            nofile_hard: 4096,
            resolv_files: vec![],
        }
    }

    fn build_with(
        image: &ImageConfig,
        req: &ContainerRequest,
        gpus: &GpuInjection,
    ) -> Result<BuiltSpec, SpecError> {
        let id = ContainerId::new("c1").expect("id");
        build(&SpecInput {
            id: &id,
            rootfs: Path::new("/r"),
            image_name: "img",
            image,
            request: req,
            gpus,
            host: &host(),
            cgroup_path: "gantry/test/c1",
        })
    }

    fn image() -> ImageConfig {
        ImageConfig {
            cmd: vec!["sh".into()],
            env: vec![
                "PATH=/bin".into(),
                "A=1".into(),
                "NVIDIA_VISIBLE_DEVICES=all".into(),
            ],
            ..Default::default()
        }
    }

    #[test]
    fn docker_argv_rules() {
        let img = ImageConfig {
            entrypoint: vec!["ep".into()],
            cmd: vec!["c".into()],
            ..Default::default()
        };
        let mut r = ContainerRequest::new("x");
        assert_eq!(argv(&img, &r), ["ep", "c"]);
        r.command = Some(vec!["x".into()]);
        assert_eq!(argv(&img, &r), ["ep", "x"]);
        r.command = None;
        r.entrypoint = Some(vec!["e2".into()]);
        assert_eq!(
            argv(&img, &r),
            ["e2"],
            "overriding the entrypoint drops the image cmd"
        );
    }

    #[test]
    fn no_command_is_an_error() {
        let r = ContainerRequest::new("x");
        let err =
            build_with(&ImageConfig::default(), &r, &GpuInjection::default()).expect_err("no cmd");
        assert!(err.to_string().contains("no entrypoint or cmd"));
    }

    #[test]
    fn security_defaults() {
        let v = to_json(
            &build_with(
                &image(),
                &ContainerRequest::new("x"),
                &GpuInjection::default(),
            )
            .expect("spec")
            .spec,
        );
        assert_eq!(v["process"]["noNewPrivileges"], true);
        assert_eq!(
            v["process"]["capabilities"]["effective"]
                .as_array()
                .map(Vec::len),
            Some(14)
        );
        assert!(v["process"]["capabilities"]["ambient"].is_null());
        assert_eq!(
            v["linux"]["maskedPaths"].as_array().map(Vec::len),
            Some(MASKED_PATHS.len())
        );
        assert_eq!(v["linux"]["resources"]["pids"]["limit"], 4096);
        assert_eq!(v["linux"]["resources"]["memory"]["limit"], 512u64 << 20);
        assert_eq!(v["linux"]["resources"]["cpu"]["quota"], 100_000);
        assert_eq!(v["linux"]["resources"]["devices"][0]["allow"], false);
        assert_eq!(
            v["process"]["rlimits"][0]["hard"], 4096,
            "never above the host's hard limit"
        );
        let ns: Vec<&str> = v["linux"]["namespaces"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|n| n["type"].as_str())
            .collect();
        assert_eq!(ns, ["pid", "mount", "ipc", "uts"]);
        assert_eq!(v["hostname"], "c1");
    }

    #[test]
    fn agent_binds_are_mounted_without_privileges() {
        let mut r = ContainerRequest::new("x");
        r.binds.push(super::super::types::BindMount {
            source: "/var/lib/gantry/invoke/w-1-g1".into(),
            destination: "/run/gantry".into(),
            read_only: false,
            exec: false,
        });
        let v = to_json(
            &build_with(&image(), &r, &GpuInjection::default())
                .expect("spec")
                .spec,
        );
        let mount = v["mounts"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|m| m["destination"] == "/run/gantry")
            .expect("the bind is mounted");
        assert_eq!(mount["source"], "/var/lib/gantry/invoke/w-1-g1");
        assert_eq!(
            mount["options"],
            serde_json::json!(["rbind", "rw", "nosuid", "nodev", "noexec"])
        );
        assert_eq!(v["process"]["noNewPrivileges"], true);
    }

    #[test]
    fn isolated_network_gets_a_namespace() {
        let mut r = ContainerRequest::new("x");
        r.network = NetworkMode::Isolated;
        let v = to_json(
            &build_with(&image(), &r, &GpuInjection::default())
                .expect("spec")
                .spec,
        );
        assert!(
            v["linux"]["namespaces"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|n| n["type"] == "network")
        );
    }

    #[test]
    fn gpus_are_injected_and_user_nvidia_env_stripped() {
        let mut r = ContainerRequest::new("x");
        r.env = vec![
            ("NVIDIA_VISIBLE_DEVICES".into(), "all".into()),
            ("CUDA_VISIBLE_DEVICES".into(), "7".into()),
            ("B".into(), "2".into()),
        ];
        let gpus = GpuInjection {
            indices: vec![3, 5],
            devices: vec![DeviceNode {
                path: "/dev/nvidia3".into(),
                major: 195,
                minor: 3,
            }],
            mounts: vec![Mount {
                host: "/usr/local/nvidia/bin/nvidia-smi".into(),
                container: "/usr/bin/nvidia-smi".into(),
            }],
            ..GpuInjection::default()
        };
        let built = build_with(&image(), &r, &gpus).expect("spec");
        assert_eq!(
            built.stripped_env,
            ["NVIDIA_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES"]
        );
        let v = to_json(&built.spec);
        let env: Vec<&str> = v["process"]["env"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e.as_str())
            .collect();
        assert!(env.contains(&"NVIDIA_VISIBLE_DEVICES=3,5"), "{env:?}");
        assert!(env.contains(&"CUDA_VISIBLE_DEVICES=0,1"), "{env:?}");
        assert!(env.contains(&"B=2") && env.contains(&"A=1"));
        assert_eq!(v["linux"]["devices"][0]["minor"], 3);
        assert_eq!(v["linux"]["resources"]["devices"][1]["allow"], true);
        assert!(
            v["mounts"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|m| m["destination"] == "/usr/bin/nvidia-smi"
                    && m["source"] == "/usr/local/nvidia/bin/nvidia-smi")
        );
        assert!(v.get("hooks").is_none_or(Value::is_null), "no hooks: {v}");
    }

    #[test]
    fn driver_env_library_path_and_hooks() {
        let mut r = ContainerRequest::new("x");
        r.env = vec![(
            "LD_LIBRARY_PATH".into(),
            "/opt/lib:/usr/local/nvidia/lib64".into(),
        )];
        let gpus = GpuInjection {
            indices: vec![0],
            env: vec![
                ("NVIDIA_VISIBLE_DEVICES".into(), "void".into()),
                ("NVIDIA_CTK_LIBCUDA_DIR".into(), "/usr/lib64".into()),
            ],
            library_path: vec!["/usr/local/nvidia/lib64".into(), "/usr/lib64".into()],
            hooks: vec![Hook {
                stage: HookStage::CreateContainer,
                path: "/usr/bin/nvidia-ctk".into(),
                args: vec!["nvidia-ctk".into(), "hook".into(), "update-ldcache".into()],
                env: vec![],
                timeout: Some(10),
            }],
            ..GpuInjection::default()
        };
        let v = to_json(&build_with(&image(), &r, &gpus).expect("spec").spec);
        let env = env_of(&v);
        for want in [
            "NVIDIA_VISIBLE_DEVICES=0",
            "NVIDIA_CTK_LIBCUDA_DIR=/usr/lib64",
            "LD_LIBRARY_PATH=/opt/lib:/usr/local/nvidia/lib64:/usr/lib64",
        ] {
            assert!(env.contains(&want), "{want} in {env:?}");
        }
        assert!(!env.contains(&"NVIDIA_VISIBLE_DEVICES=void"), "{env:?}");
        let hook = &v["hooks"]["createContainer"][0];
        assert_eq!(hook["path"], "/usr/bin/nvidia-ctk");
        assert_eq!(hook["args"][2], "update-ldcache");
        assert_eq!(hook["timeout"], 10);
    }

    fn env_of(spec: &serde_json::Value) -> Vec<&str> {
        spec["process"]["env"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e.as_str())
            .collect()
    }

    #[test]
    fn no_gpus_means_void() {
        let v = to_json(
            &build_with(
                &image(),
                &ContainerRequest::new("x"),
                &GpuInjection::default(),
            )
            .expect("spec")
            .spec,
        );
        let env = env_of(&v);
        assert!(env.contains(&"NVIDIA_VISIBLE_DEVICES=void"));
        assert!(!env.iter().any(|e| e.starts_with("CUDA_VISIBLE_DEVICES")));
    }

    #[test]
    fn simulated_gpus_set_visibility_but_inject_no_device() {
        let gpus = crate::gpu::inject::simulated(&[6, 7]).expect("simulated");
        let v = to_json(
            &build_with(&image(), &ContainerRequest::new("x"), &gpus)
                .expect("spec")
                .spec,
        );
        let env = env_of(&v);
        for want in [
            "NVIDIA_VISIBLE_DEVICES=6,7",
            "CUDA_VISIBLE_DEVICES=0,1",
            "GANTRY_SIMULATED_GPUS=1",
        ] {
            assert!(env.contains(&want), "{want} in {env:?}");
        }
        let devices = v["linux"]["devices"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert!(
            devices
                .iter()
                .all(|d| !d["path"].as_str().unwrap_or("").contains("nvidia")),
            "{devices:?}"
        );
        assert!(crate::gpu::inject::simulated(&[1, 1]).is_err());
    }

    #[test]
    fn bad_input_is_refused() {
        let mut r = ContainerRequest::new("x");
        r.env = vec![("1BAD".into(), "x".into())];
        assert!(matches!(
            build_with(&image(), &r, &GpuInjection::default()),
            Err(SpecError::BadEnvName { .. })
        ));
        let mut r = ContainerRequest::new("x");
        r.workdir = Some("rel".into());
        assert!(matches!(
            build_with(&image(), &r, &GpuInjection::default()),
            Err(SpecError::RelativeWorkdir { .. })
        ));
        let mut r = ContainerRequest::new("x");
        r.resources.memory_bytes = 0;
        assert!(matches!(
            build_with(&image(), &r, &GpuInjection::default()),
            Err(SpecError::Resources(_))
        ));
    }

    #[test]
    fn users_resolve_like_runc() {
        let passwd = "root:x:0:0::/root:/bin/sh\nalice:x:1000:1000::/home/alice:/bin/sh\n";
        let group = "root:x:0:\nalice:x:1000:\nvideo:x:44:alice\n";
        assert_eq!(
            resolve_user("alice", passwd, group),
            Ok(ResolvedUser {
                uid: 1000,
                gid: 1000,
                additional_gids: vec![44]
            })
        );
        assert_eq!(
            resolve_user("1000:44", passwd, group),
            Ok(ResolvedUser {
                uid: 1000,
                gid: 44,
                additional_gids: vec![]
            })
        );
        assert_eq!(
            resolve_user("alice:video", passwd, group).map(|u| u.gid),
            Ok(44)
        );
        assert_eq!(
            resolve_user("4242", "", ""),
            Ok(ResolvedUser {
                uid: 4242,
                gid: 0,
                additional_gids: vec![]
            })
        );
        assert!(matches!(
            resolve_user("bob", passwd, group),
            Err(UserError::UnknownUser { .. })
        ));
        assert!(matches!(
            resolve_user("alice:nogroup", passwd, group),
            Err(UserError::UnknownGroup { .. })
        ));
    }
}
