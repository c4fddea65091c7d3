//! Unit tests of CDI spec loading against fabricated spec directories: YAML and JSON,
//! directory priority, conflicts, and malformed specs that must name the file and field.

use super::*;

/// A fabricated host: two CDI directories, a driver library, a hook program. Device
/// nodes are /dev/null and /dev/zero, character devices every machine has.
struct Host {
    dir: tempfile::TempDir,
    etc: PathBuf,
    run: PathBuf,
    lib: PathBuf,
    hook: PathBuf,
}

impl Host {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let etc = dir.path().join("etc/cdi");
        let run = dir.path().join("run/cdi");
        let lib = dir.path().join("lib/libcuda.so.550.54.14");
        let hook = dir.path().join("bin/nvidia-ctk");
        for p in [&etc, &run] {
            std::fs::create_dir_all(p).expect("mkdir");
        }
        for p in [&lib, &hook] {
            std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            std::fs::write(p, b"").expect("write");
        }
        Self {
            dir,
            etc,
            run,
            lib,
            hook,
        }
    }

    fn dirs(&self) -> Vec<PathBuf> {
        vec![self.etc.clone(), self.run.clone()]
    }

    /// What `nvidia-ctk cdi generate` writes, in its shape.
    fn nvidia_yaml(&self) -> String {
        format!(
            r#"---
cdiVersion: 0.5.0
kind: nvidia.com/gpu
devices:
- name: "0"
  containerEdits:
    deviceNodes:
    - path: /dev/nvidia0
      hostPath: /dev/null
- name: "1"
  containerEdits:
    deviceNodes:
    - path: /dev/nvidia1
      hostPath: /dev/zero
- name: GPU-4b3c1e0d-0000-0000-0000-000000000001
  containerEdits:
    deviceNodes:
    - path: /dev/nvidia1
      hostPath: /dev/zero
- name: all
  containerEdits:
    deviceNodes:
    - path: /dev/nvidia0
      hostPath: /dev/null
containerEdits:
  env:
  - NVIDIA_VISIBLE_DEVICES=void
  deviceNodes:
  - path: /dev/nvidiactl
    hostPath: /dev/zero
  hooks:
  - hookName: createContainer
    path: {hook}
    args:
    - nvidia-ctk
    - hook
    - update-ldcache
    - --folder
    - /usr/lib/x86_64-linux-gnu
  mounts:
  - hostPath: {lib}
    containerPath: /usr/lib/x86_64-linux-gnu/libcuda.so.550.54.14
    options:
    - ro
    - nosuid
    - nodev
    - bind
"#,
            hook = self.hook.display(),
            lib = self.lib.display()
        )
    }

    fn write(&self, dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).expect("write");
        p
    }
}

#[test]
fn no_specs_is_empty() {
    let host = Host::new();
    let mut dirs = host.dirs();
    dirs.push(host.dir.path().join("no-such-dir"));
    assert!(Registry::load(&dirs).expect("load").is_empty());
}

#[test]
fn yaml_spec_gives_device_and_top_level_edits() {
    let host = Host::new();
    let file = host.write(&host.etc, "nvidia.yaml", &host.nvidia_yaml());
    let reg = Registry::load(&host.dirs()).expect("load");
    assert_eq!(reg.files(), vec![file.clone()]);
    let edits = reg.edits(&[1, 0]).expect("edits");
    let nodes: Vec<_> = edits
        .devices
        .iter()
        .map(|d| (d.path.display().to_string(), d.major, d.minor))
        .collect();
    assert_eq!(
        nodes,
        vec![
            ("/dev/nvidiactl".into(), 1, 5),
            ("/dev/nvidia1".into(), 1, 5),
            ("/dev/nvidia0".into(), 1, 3),
        ],
        "the spec's own nodes, then each GPU's, numbers from the host path"
    );
    assert_eq!(
        edits.mounts,
        vec![Mount {
            host: host.lib.clone(),
            container: "/usr/lib/x86_64-linux-gnu/libcuda.so.550.54.14".into()
        }]
    );
    assert_eq!(
        edits.env,
        vec![("NVIDIA_VISIBLE_DEVICES".into(), "void".into())]
    );
    assert_eq!(
        edits.hooks.len(),
        1,
        "the spec's hook once, not once per GPU"
    );
    assert_eq!(edits.hooks[0].stage, HookStage::CreateContainer);
    assert_eq!(edits.hooks[0].args[2], "update-ldcache");
    assert_eq!(edits.specs, vec![file]);
}

#[test]
fn json_spec_in_a_later_directory_wins_and_other_kinds_are_ignored() {
    let host = Host::new();
    host.write(&host.etc, "nvidia.yaml", &host.nvidia_yaml());
    let json = serde_json::json!({
        "cdiVersion": "0.6.0",
        "kind": "nvidia.com/gpu",
        "devices": [{
            "name": "0",
            "containerEdits": {
                "deviceNodes": [{"path": "/dev/nvidia0", "hostPath": "/dev/zero", "type": "c"}],
                "env": ["FROM_JSON=1"]
            }
        }]
    });
    let run_file = host.write(&host.run, "nvidia.json", &json.to_string());
    // Another vendor's spec with fields Gantry does not know.
    host.write(
        &host.etc,
        "fpga.yaml",
        "cdiVersion: 0.6.0\nkind: vendor.example/fpga\nannotations: {a: b}\ndevices: []\n",
    );
    let reg = Registry::load(&host.dirs()).expect("load");
    assert_eq!(reg.files().len(), 2, "{:?}", reg.files());
    let edits = reg.edits(&[0]).expect("edits");
    assert_eq!(edits.specs, vec![run_file]);
    assert_eq!(edits.env, vec![("FROM_JSON".into(), "1".into())]);
    assert_eq!(
        (edits.devices[0].major, edits.devices[0].minor),
        (1, 5),
        "/var/run/cdi's device 0 (zero), not /etc/cdi's (null)"
    );
    // GPU 1 still comes from /etc/cdi, with that spec's own edits.
    let edits = reg.edits(&[0, 1]).expect("edits");
    assert_eq!(edits.specs.len(), 2);
    assert!(
        edits
            .devices
            .iter()
            .any(|d| d.path == Path::new("/dev/nvidiactl"))
    );
}

#[test]
fn same_directory_conflict_and_missing_device_are_clear() {
    let host = Host::new();
    host.write(&host.etc, "a.yaml", &host.nvidia_yaml());
    host.write(&host.etc, "b.yaml", &host.nvidia_yaml());
    let err = Registry::load(&host.dirs())
        .expect("load")
        .edits(&[0])
        .expect_err("conflict");
    assert!(matches!(err, CdiError::Conflict { .. }), "{err}");
    assert!(err.to_string().contains("a.yaml"), "{err}");

    let host = Host::new();
    host.write(&host.etc, "nvidia.yaml", &host.nvidia_yaml());
    let err = Registry::load(&host.dirs())
        .expect("load")
        .edits(&[0, 5])
        .expect_err("no GPU 5");
    let msg = err.to_string();
    assert!(
        msg.contains("GPU 5 has no device `nvidia.com/gpu=5`")
            && msg.contains("nvidia.yaml")
            && msg.contains("0, 1, GPU-4b3c1e0d")
            && msg.contains("nvidia-ctk cdi generate"),
        "{msg}"
    );
}

/// Loads a spec with `from` replaced by `to` and returns the error for GPU 0. `LIB` and
/// `HOOK` in either stand for the host's library and hook paths.
fn broken(from: &str, to: &str) -> String {
    let host = Host::new();
    let paths = |s: &str| {
        s.replace("LIB", &host.lib.display().to_string())
            .replace("HOOK", &host.hook.display().to_string())
    };
    let (from, to) = (&paths(from), &paths(to));
    let text = host.nvidia_yaml();
    assert!(text.contains(from), "{from}");
    let file = host.write(&host.etc, "nvidia.yaml", &text.replacen(from, to, 1));
    let err = Registry::load(&host.dirs())
        .and_then(|r| r.edits(&[0]))
        .expect_err("broken spec");
    let msg = err.to_string();
    assert!(msg.contains(&file.display().to_string()), "{msg}");
    msg
}

#[test]
fn invalid_fields_name_the_file_and_field() {
    let msg = broken("hostPath: LIB", "hostPath: lib/libcuda.so.1");
    assert!(
        msg.contains("field containerEdits.mounts[0].hostPath")
            && msg.contains("`lib/libcuda.so.1` is not an absolute path"),
        "{msg}"
    );
    let msg = broken("hostPath: LIB", "hostPath: /no/such/libcuda.so");
    assert!(msg.contains("does not exist on this host"), "{msg}");
    let msg = broken("containerPath: /usr/lib", "containerPath: usr/lib");
    assert!(msg.contains("mounts[0].containerPath"), "{msg}");
    let msg = broken("hostPath: /dev/null", "hostPath: LIB");
    assert!(
        msg.contains("field devices[0].containerEdits.deviceNodes[0].hostPath")
            && msg.contains("not a character device"),
        "{msg}"
    );
    let msg = broken("- path: /dev/nvidia0", "- path: dev/nvidia0");
    assert!(msg.contains("deviceNodes[0].path"), "{msg}");
    let msg = broken("hookName: createContainer", "hookName: beforeStart");
    assert!(
        msg.contains("hooks[0].hookName") && msg.contains("beforeStart"),
        "{msg}"
    );
    let msg = broken("path: HOOK", "path: /no/such/nvidia-ctk");
    assert!(msg.contains("hooks[0].path"), "{msg}");
    let msg = broken("NVIDIA_VISIBLE_DEVICES=void", "JUST_A_NAME");
    assert!(
        msg.contains("env[0]") && msg.contains("not KEY=VALUE"),
        "{msg}"
    );
}

#[test]
fn unparseable_specs_name_the_file() {
    let msg = broken("kind: nvidia.com/gpu\n", "kind: [nvidia.com/gpu\n");
    assert!(msg.contains("does not parse"), "{msg}");
    let msg = broken("kind: nvidia.com/gpu\n", "");
    assert!(
        msg.contains("does not parse") && msg.contains("kind"),
        "{msg}"
    );
    let msg = broken("cdiVersion: 0.5.0\n", "");
    assert!(msg.contains("cdiVersion"), "{msg}");
    let msg = broken("    - path: /dev/nvidia0", "    - path: [1, 2]");
    assert!(msg.contains("does not parse"), "{msg}");

    let host = Host::new();
    let file = host.write(&host.run, "nvidia.json", "{\"kind\": \"nvidia.com/gpu\", ");
    let err = Registry::load(&host.dirs()).expect_err("truncated json");
    assert!(
        matches!(&err, CdiError::Parse { path, .. } if *path == file),
        "{err}"
    );

    let host = Host::new();
    let big = "#".repeat(MAX_SPEC_BYTES as usize + 1);
    host.write(&host.etc, "big.yaml", &big);
    let err = Registry::load(&host.dirs()).expect_err("too large");
    assert!(matches!(err, CdiError::TooLarge { .. }), "{err}");
}
