//! Unit tests of what a GPU container gets: from a fabricated host (device nodes made with
//! mknod, so root is needed), through a fabricated linker cache, or from a CDI spec.

use super::*;
use crate::gpu::driver::Fallback;
use crate::gpu::ldcache::tests::{cache_bytes, native_flags};
use nix::sys::stat::{Mode, SFlag, makedev, mknod};

/// A fabricated host: `gpus` device nodes, a driver library among others, no CDI spec
/// and no linker cache (tests add them).
fn fake_host(gpus: u32) -> (tempfile::TempDir, GpuConfig) {
    let dir = tempfile::tempdir().expect("tempdir");
    let dev = dir.path().join("dev");
    let lib = dir.path().join("lib");
    std::fs::create_dir_all(&dev).expect("mkdir");
    std::fs::create_dir_all(&lib).expect("mkdir");
    std::fs::create_dir_all(dir.path().join("cdi")).expect("mkdir");
    for i in 0..gpus {
        mknod(
            &dev.join(format!("nvidia{i}")),
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o666),
            makedev(195, i as u64),
        )
        .expect("mknod (needs root)");
    }
    mknod(
        &dev.join("nvidiactl"),
        SFlag::S_IFCHR,
        Mode::from_bits_truncate(0o666),
        makedev(195, 255),
    )
    .expect("mknod");
    std::fs::write(lib.join("libcuda.so.550.54"), b"").expect("write");
    std::fs::write(lib.join("libc.so.6"), b"").expect("write");
    let cfg = GpuConfig {
        dev,
        cdi_dirs: vec![dir.path().join("cdi")],
        cdi_hooks: true,
        ld_cache: dir.path().join("ld.so.cache"),
        lib_dirs: vec![lib],
        bin_dirs: vec![],
    };
    (dir, cfg)
}

#[test]
fn injects_assigned_devices_with_real_numbers() {
    let (_d, cfg) = fake_host(4);
    let inj = injection(&[2, 0], &cfg).expect("inject");
    let got: Vec<_> = inj
        .devices
        .iter()
        .map(|d| (d.path.display().to_string(), d.major, d.minor))
        .collect();
    assert_eq!(
        got,
        vec![
            ("/dev/nvidia2".into(), 195, 2),
            ("/dev/nvidia0".into(), 195, 0),
            ("/dev/nvidiactl".into(), 195, 255)
        ]
    );
    assert_eq!(
        inj.mounts,
        vec![Mount {
            host: cfg.lib_dirs[0].join("libcuda.so.550.54"),
            container: "/usr/local/nvidia/lib64/libcuda.so.550.54".into(),
        }],
        "only driver libraries, in the container's driver directory"
    );
    assert_eq!(inj.library_path, vec![PathBuf::from(CONTAINER_LIB_DIR)]);
    assert_eq!(
        inj.source,
        DriverSource::Host {
            found: Found::FixedDirs {
                why: Fallback::NoCache
            },
            libraries: 1
        }
    );
}

#[test]
fn linker_cache_finds_the_driver_where_the_host_keeps_it() {
    let (d, cfg) = fake_host(1);
    let elsewhere = d.path().join("usr/local/nvidia/lib64");
    std::fs::create_dir_all(&elsewhere).expect("mkdir");
    std::fs::write(elsewhere.join("libnvidia-ml.so.550.54"), b"").expect("write");
    std::os::unix::fs::symlink(
        "libnvidia-ml.so.550.54",
        elsewhere.join("libnvidia-ml.so.1"),
    )
    .expect("symlink");
    let ml = elsewhere.join("libnvidia-ml.so.1").display().to_string();
    std::fs::write(
        &cfg.ld_cache,
        cache_bytes(&[(native_flags(), "libnvidia-ml.so.1", &ml, 0)], None),
    )
    .expect("write");
    let inj = injection(&[0], &cfg).expect("inject");
    let targets: Vec<_> = inj
        .mounts
        .iter()
        .map(|m| m.container.display().to_string())
        .collect();
    assert_eq!(
        targets,
        [
            "/usr/local/nvidia/lib64/libnvidia-ml.so.1",
            "/usr/local/nvidia/lib64/libnvidia-ml.so.550.54"
        ],
        "the cache's entry and its file; the fixed directories are not searched"
    );
    assert!(matches!(
        &inj.source,
        DriverSource::Host { found: Found::LdCache { path }, libraries: 2 } if *path == cfg.ld_cache
    ));
    assert!(
        inj.source.to_string().contains("linker cache"),
        "{}",
        inj.source
    );
}

#[test]
fn cdi_spec_wins_over_the_host() {
    let (d, mut cfg) = fake_host(1);
    let lib = d.path().join("lib/libcuda.so.550.54");
    let hook = d.path().join("nvidia-ctk");
    std::fs::write(&hook, b"").expect("write");
    let spec = format!(
        "cdiVersion: 0.5.0\nkind: nvidia.com/gpu\ndevices:\n- name: \"3\"\n  containerEdits:\n    deviceNodes:\n    - {{path: /dev/nvidia3, hostPath: /dev/null}}\ncontainerEdits:\n  env: [NVIDIA_CTK_DEBUG=1]\n  mounts:\n  - {{hostPath: {lib}, containerPath: /usr/lib64/libcuda.so.550.54}}\n  hooks:\n  - {{hookName: createContainer, path: {hook}, args: [nvidia-ctk, hook, update-ldcache]}}\n",
        lib = lib.display(),
        hook = hook.display(),
    );
    std::fs::write(cfg.cdi_dirs[0].join("nvidia.yaml"), spec).expect("write");
    // GPU 3 has no /dev/nvidia3 in the fake /dev: it comes from the spec alone.
    let inj = injection(&[3], &cfg).expect("inject");
    assert_eq!(inj.devices.len(), 1);
    assert_eq!(inj.devices[0].path, PathBuf::from("/dev/nvidia3"));
    assert_eq!(
        inj.mounts[0].container,
        PathBuf::from("/usr/lib64/libcuda.so.550.54")
    );
    assert_eq!(inj.env, vec![("NVIDIA_CTK_DEBUG".into(), "1".into())]);
    assert_eq!(inj.hooks.len(), 1);
    assert!(inj.library_path.is_empty(), "the ldcache hook does it");
    assert!(
        inj.source.to_string().starts_with("CDI spec "),
        "{}",
        inj.source
    );

    // Hooks off: skipped, said so, and the loader still finds the library under its
    // linker-cache name.
    std::os::unix::fs::symlink("libcuda.so.550.54", d.path().join("lib/libcuda.so.1"))
        .expect("symlink");
    let cuda1 = d.path().join("lib/libcuda.so.1").display().to_string();
    std::fs::write(
        &cfg.ld_cache,
        cache_bytes(&[(native_flags(), "libcuda.so.1", &cuda1, 0)], None),
    )
    .expect("write");
    cfg.cdi_hooks = false;
    let inj = injection(&[3], &cfg).expect("inject");
    assert!(inj.hooks.is_empty());
    assert_eq!(inj.library_path, vec![PathBuf::from("/usr/lib64")]);
    assert_eq!(
        inj.mounts.last(),
        Some(&Mount {
            host: lib.clone(),
            container: "/usr/lib64/libcuda.so.1".into()
        })
    );
    assert!(
        inj.source.to_string().contains("1 hooks skipped"),
        "{}",
        inj.source
    );

    // A broken spec is an error naming it, not a silent fallback to the host.
    std::fs::write(
        cfg.cdi_dirs[0].join("nvidia.yaml"),
        "kind: nvidia.com/gpu\ndevices: 3\n",
    )
    .expect("write");
    let err = injection(&[0], &cfg).expect_err("broken spec");
    assert!(err.to_string().contains("nvidia.yaml"), "{err}");
}

#[test]
fn missing_gpu_is_a_clear_error() {
    let (_d, cfg) = fake_host(1);
    let err = injection(&[3], &cfg).expect_err("no nvidia3");
    assert!(err.to_string().contains("GPU 3 was requested"), "{err}");
    assert!(matches!(
        injection(&[0, 0], &cfg),
        Err(GpuError::Duplicate { index: 0 })
    ));
}

#[test]
fn no_gpus_inject_nothing() {
    let cfg = GpuConfig {
        dev: "/nonexistent".into(),
        cdi_dirs: vec![],
        ld_cache: "/nonexistent".into(),
        lib_dirs: vec![],
        bin_dirs: vec![],
        ..GpuConfig::default()
    };
    assert_eq!(injection(&[], &cfg).expect("ok"), GpuInjection::default());
    assert_eq!(simulated(&[]).expect("ok"), GpuInjection::default());
    assert_eq!(simulated(&[1]).expect("ok").source, DriverSource::Simulated);
}
