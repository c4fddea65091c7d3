//! Real containers through the runtime API (root required): lifecycle, limits, security,
//! stop/timeout, bad input, and leak checks.

mod common;

use std::time::Duration;

use common::{TestHost, eventually, leftovers, sh_request};
use gantry_agent::image::ImageConfig;
use gantry_agent::runtime::{
    ContainerRequest, ContainerState, ExitReason, NetworkMode, RuntimeError, Stream, cgroup,
};
use gantry_shared::ContainerId;

#[tokio::test(flavor = "multi_thread")]
async fn exit_code_and_output() {
    let h = TestHost::new().await;
    let (exit, out, err) = h.run("echo out; echo err >&2; exit 7").await;
    assert_eq!(exit.reason, ExitReason::Exited);
    assert_eq!(exit.exit_code, Some(7));
    assert_eq!(exit.code(), 7);
    assert_eq!(out, "out\n");
    assert_eq!(err, "err\n");
    assert!(exit.finished_at_ms >= exit.started_at_ms && exit.started_at_ms > 0);
    assert_eq!(exit.cleanup_error, None);
}

#[tokio::test(flavor = "multi_thread")]
async fn env_workdir_and_user_come_from_the_image_config() {
    let h = TestHost::new().await;
    let rootfs = common::busybox_rootfs(&h.state_dir().join("second"));
    let config = ImageConfig {
        cmd: vec![
            "sh".into(),
            "-c".into(),
            "echo $GREETING $MODE; pwd; id -u; id -g".into(),
        ],
        env: vec!["GREETING=hi".into(), "MODE=image".into()],
        workdir: Some("/home/user".into()),
        user: Some("user".into()),
        ..ImageConfig::default()
    };
    h.images
        .import(&rootfs, "configured", config)
        .await
        .expect("import");
    let mut req = ContainerRequest::new("configured");
    let id = h.runtime.start(req.clone()).await.expect("start").id;
    assert_eq!(h.runtime.wait(&id).await.expect("wait").code(), 0);
    let out = String::from_utf8(h.runtime.logs(&id, Stream::Stdout).expect("logs")).expect("utf8");
    assert_eq!(out, "hi image\n/home/user\n1000\n1000\n");

    // The request overrides each of them.
    req.env = vec![("MODE".into(), "request".into())];
    req.workdir = Some("/tmp".into());
    req.user = Some("0:0".into());
    let id = h.runtime.start(req).await.expect("start").id;
    h.runtime.wait(&id).await.expect("wait");
    let out = String::from_utf8(h.runtime.logs(&id, Stream::Stdout).expect("logs")).expect("utf8");
    assert_eq!(out, "hi request\n/tmp\n0\n0\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn security_defaults_seen_from_inside() {
    let h = TestHost::new().await;
    assert!(
        !std::fs::read("/proc/timer_list")
            .expect("host timer_list")
            .is_empty(),
        "host /proc/timer_list has content"
    );
    let (exit, out, err) = h
        .run(
            "grep -E '^(CapEff|CapBnd|NoNewPrivs)' /proc/self/status; \
             for p in /proc/kcore /proc/timer_list /proc/keys; do [ -e $p ] && echo \"$p $(cat $p | wc -c)\"; done; \
             if echo x > /proc/sys/kernel/domainname 2>/dev/null; then echo proc-sys-writable; fi; \
             hostname; exit 0",
        )
        .await;
    assert_eq!(exit.code(), 0, "stderr: {err}");
    assert!(out.contains("CapEff:\t00000000a80425fb"), "{out}");
    assert!(out.contains("CapBnd:\t00000000a80425fb"), "{out}");
    assert!(out.contains("NoNewPrivs:\t1"), "{out}");
    assert!(
        out.contains("/proc/timer_list 0\n"),
        "timer_list must be masked: {out}"
    );
    for line in out.lines().filter(|l| l.starts_with("/proc/")) {
        assert!(line.ends_with(" 0"), "masked path readable: {line}");
    }
    assert!(!out.contains("proc-sys-writable"), "{out}");
    assert!(
        out.trim_end().ends_with(&exit_hostname(&h)),
        "hostname is the container id: {out}"
    );
}

fn exit_hostname(h: &TestHost) -> String {
    h.runtime
        .list()
        .last()
        .map(|c| c.id.to_string())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn isolated_network_has_only_loopback() {
    let h = TestHost::new().await;
    let mut req = sh_request("cat /proc/net/dev | tail -n +3 | cut -d: -f1 | tr -d ' '");
    req.network = NetworkMode::Isolated;
    let id = h.runtime.start(req).await.expect("start").id;
    assert_eq!(h.runtime.wait(&id).await.expect("wait").code(), 0);
    assert_eq!(
        String::from_utf8_lossy(&h.runtime.logs(&id, Stream::Stdout).expect("logs")),
        "lo\n"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn memory_hog_is_oom_killed_and_reported() {
    let h = TestHost::new().await;
    let mut req = sh_request("tail /dev/zero");
    req.resources.memory_bytes = 32 << 20;
    let id = h.runtime.start(req).await.expect("start").id;
    let exit = tokio::time::timeout(Duration::from_secs(60), h.runtime.wait(&id))
        .await
        .expect("oom within 60s")
        .expect("wait");
    assert_eq!(exit.reason, ExitReason::OomKilled, "{exit:?}");
    assert!(exit.oom_killed);
    assert_eq!(exit.signal, Some(9));
    assert!(leftovers(h.state_dir(), &[id]).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn fork_bomb_stops_at_the_pids_limit_and_neighbours_are_fine() {
    let h = TestHost::new().await;
    let mut req = sh_request("bomb() { bomb | bomb & }; bomb; sleep 1000");
    req.resources.pids = 64;
    req.resources.cpu = gantry_shared::CpuMillis(500);
    let bomb = h.runtime.start(req).await.expect("start").id;
    let pids_dir = cgroup::existing_dirs(&h.runtime.cgroup_path(&bomb))
        .into_iter()
        .find(|d| d.join("pids.max").exists())
        .expect("pids cgroup");
    assert_eq!(
        std::fs::read_to_string(pids_dir.join("pids.max"))
            .expect("pids.max")
            .trim(),
        "64"
    );
    // The bomb reaches its limit ...
    let hit = eventually(Duration::from_secs(20), || {
        std::fs::read_to_string(pids_dir.join("pids.current"))
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .is_some_and(|n| n >= 60)
    })
    .await;
    assert!(hit, "fork bomb never approached its pids limit");
    // ... never passes it, and a neighbour container still starts and runs normally.
    let (exit, out, _) = h.run("echo neighbour ok").await;
    assert_eq!((exit.code(), out.as_str()), (0, "neighbour ok\n"));
    let current: u64 = std::fs::read_to_string(pids_dir.join("pids.current"))
        .expect("pids.current")
        .trim()
        .parse()
        .expect("number");
    assert!(current <= 64, "pids.current = {current}");
    let exit = h.runtime.stop(&bomb, Duration::ZERO).await.expect("stop");
    assert_eq!(exit.reason, ExitReason::Stopped);
    assert!(
        eventually(Duration::from_secs(10), || leftovers(
            h.state_dir(),
            std::slice::from_ref(&bomb)
        )
        .is_empty())
        .await,
        "{:?}",
        leftovers(h.state_dir(), &[bomb])
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn stop_with_grace_lets_the_handler_finish() {
    let h = TestHost::new().await;
    let id = h
        .sh("trap 'echo got-term; exit 3' TERM; echo ready; while true; do sleep 0.1; done")
        .await;
    let ready = eventually(Duration::from_secs(10), || {
        h.runtime
            .logs(&id, Stream::Stdout)
            .is_ok_and(|b| b.starts_with(b"ready"))
    })
    .await;
    assert!(ready);
    let exit = h
        .runtime
        .stop(&id, Duration::from_secs(20))
        .await
        .expect("stop");
    assert_eq!(exit.reason, ExitReason::Stopped);
    assert_eq!(
        exit.exit_code,
        Some(3),
        "the TERM handler's exit code: {exit:?}"
    );
    assert_eq!(
        h.runtime.logs(&id, Stream::Stdout).expect("logs"),
        b"ready\ngot-term\n"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn stop_without_grace_kills_at_once() {
    let h = TestHost::new().await;
    let id = h
        .sh("trap 'echo ignoring' TERM; while true; do sleep 0.1; done")
        .await;
    let t = std::time::Instant::now();
    let exit = h.runtime.stop(&id, Duration::ZERO).await.expect("stop");
    assert_eq!((exit.reason, exit.signal), (ExitReason::Stopped, Some(9)));
    assert!(t.elapsed() < Duration::from_secs(10));
    assert!(
        !String::from_utf8_lossy(&h.runtime.logs(&id, Stream::Stdout).expect("logs"))
            .contains("ignoring")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn timeout_stops_the_container() {
    let h = TestHost::new().await;
    let mut req = sh_request("sleep 1000");
    req.timeout = Some(Duration::from_millis(500));
    req.stop_grace = Duration::from_millis(200);
    let id = h.runtime.start(req).await.expect("start").id;
    let exit = tokio::time::timeout(Duration::from_secs(30), h.runtime.wait(&id))
        .await
        .expect("timeout enforced")
        .expect("wait");
    assert_eq!(exit.reason, ExitReason::TimedOut);
    assert_eq!(
        exit.signal,
        Some(9),
        "sleep as PID 1 ignores SIGTERM, so SIGKILL ends it"
    );
    assert!(exit.finished_at_ms - exit.started_at_ms >= 500);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_fails_clearly_and_leaves_nothing() {
    let h = TestHost::new().await;
    let named = |name: &str, mut req: ContainerRequest| {
        req.id = Some(ContainerId::new(name).expect("id"));
        req
    };
    // Unknown image.
    let err = h
        .runtime
        .start(named("bad-image", ContainerRequest::new("nope")))
        .await
        .expect_err("unknown image");
    assert!(
        err.to_string().contains("image `nope` is not on this host"),
        "{err}"
    );
    // Command that does not exist in the image.
    let mut req = named("bad-cmd", ContainerRequest::new("busybox"));
    req.command = Some(vec!["no-such-binary".into()]);
    match h.runtime.start(req).await {
        Err(RuntimeError::StartFailed {
            message,
            user_error,
            ..
        }) => {
            assert!(user_error);
            assert!(
                message.contains("no-such-binary")
                    && message.contains("does not exist in the image"),
                "{message}"
            );
        }
        other => panic!("expected StartFailed, got {other:?}"),
    }
    // Zero limits.
    let mut req = named("bad-mem", sh_request("true"));
    req.resources.memory_bytes = 0;
    let err = h.runtime.start(req).await.expect_err("zero memory");
    assert!(
        err.to_string()
            .contains("memory limit must be greater than zero"),
        "{err}"
    );
    let mut req = named("bad-pids", sh_request("true"));
    req.resources.pids = 0;
    assert!(h.runtime.start(req).await.is_err());
    // A user the image does not define.
    let mut req = named("bad-user", sh_request("true"));
    req.user = Some("nobody-here".into());
    let err = h.runtime.start(req).await.expect_err("unknown user");
    assert!(err.to_string().contains("nobody-here"), "{err}");
    // Real GPUs on a host without them (this test host has no /dev/nvidia0).
    if !std::path::Path::new("/dev/nvidia0").exists() {
        let mut req = named("bad-gpu", sh_request("true"));
        req.gpus = vec![0];
        let err = h.runtime.start(req).await.expect_err("no GPUs here");
        assert!(
            err.to_string().contains("/dev/nvidia0 does not exist"),
            "{err}"
        );
    }
    let ids: Vec<ContainerId> = [
        "bad-image",
        "bad-cmd",
        "bad-mem",
        "bad-pids",
        "bad-user",
        "bad-gpu",
    ]
    .iter()
    .map(|n| ContainerId::new(*n).expect("id"))
    .collect();
    assert_eq!(leftovers(h.state_dir(), &ids), Vec::<String>::new());
    assert!(
        h.runtime.list().is_empty(),
        "no records: {:?}",
        h.runtime.list()
    );
    let dirs: Vec<_> = std::fs::read_dir(h.state_dir().join("containers"))
        .expect("ls")
        .collect();
    assert!(dirs.is_empty(), "no container directories: {dirs:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn duplicate_ids_are_refused() {
    let h = TestHost::new().await;
    let mut req = sh_request("sleep 1000");
    req.id = Some(ContainerId::new("twice").expect("id"));
    h.runtime.start(req.clone()).await.expect("first");
    assert!(matches!(
        h.runtime.start(req.clone()).await,
        Err(RuntimeError::Exists { .. })
    ));
    let id = req.id.expect("id");
    assert!(matches!(
        h.runtime.remove(&id),
        Err(RuntimeError::StillRunning { .. })
    ));
    h.runtime.stop(&id, Duration::ZERO).await.expect("stop");
    h.runtime.remove(&id).expect("remove");
    assert!(matches!(
        h.runtime.status(&id),
        Err(RuntimeError::NotFound { .. })
    ));
}

#[tokio::test(flavor = "multi_thread")]
async fn logs_are_capped_and_keep_the_newest_output() {
    let h = TestHost::with(|cfg| cfg.log_cap_bytes = 4096).await;
    let rt = &h.runtime;
    let id = rt
        .start(sh_request(
            "i=0; while [ $i -lt 2000 ]; do echo line-$i; i=$((i+1)); done",
        ))
        .await
        .expect("start")
        .id;
    rt.wait(&id).await.expect("wait");
    let out = rt.logs(&id, Stream::Stdout).expect("logs");
    assert!(
        out.len() <= 2 * 4096,
        "at most two files of the cap: {}",
        out.len()
    );
    assert!(String::from_utf8_lossy(&out).ends_with("line-1999\n"));
    let dir_size: u64 = std::fs::read_dir(rt.log_dir(&id).expect("dir"))
        .expect("ls")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("stdout"))
        .map(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
        .sum();
    assert!(dir_size <= 2 * 4096);
}

#[tokio::test(flavor = "multi_thread")]
async fn many_start_stop_cycles_leave_nothing_behind() {
    let h = TestHost::new().await;
    let cycles: usize = std::env::var("GANTRY_CYCLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let mut ids = Vec::new();
    for i in 0..cycles {
        // Alternate: stopped while running, and exited by itself.
        let script = if i % 2 == 0 { "sleep 1000" } else { "true" };
        let id = h.sh(script).await;
        let exit = if i % 2 == 0 {
            h.runtime.stop(&id, Duration::ZERO).await
        } else {
            h.runtime.wait(&id).await
        }
        .expect("exit");
        assert_eq!(exit.cleanup_error, None, "cycle {i}");
        h.runtime.remove(&id).expect("remove");
        ids.push(id);
    }
    assert_eq!(leftovers(h.state_dir(), &ids), Vec::<String>::new());
    assert!(h.runtime.list().is_empty());
    let left: Vec<_> = std::fs::read_dir(h.state_dir().join("containers"))
        .expect("ls")
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "{left:?}");
    // No shim outlived its container.
    let shims = std::process::Command::new("pgrep")
        .args([
            "-f",
            &format!("gantry-agent shim {}", h.state_dir().display()),
        ])
        .output()
        .expect("pgrep");
    assert!(
        shims.stdout.is_empty(),
        "shims still running: {}",
        String::from_utf8_lossy(&shims.stdout)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn status_and_list_report_running_then_exited() {
    let h = TestHost::new().await;
    let id = h.sh("sleep 1000").await;
    assert!(matches!(
        h.runtime.status(&id).expect("status").state,
        ContainerState::Running { .. }
    ));
    // The leak check sees a live container's mount, cgroups, process and state.
    let live = leftovers(h.state_dir(), std::slice::from_ref(&id));
    for kind in ["mount", "cgroup", "process", "libcontainer state"] {
        assert!(
            live.iter().any(|l| l.starts_with(kind)),
            "no {kind} in {live:?}"
        );
    }
    h.runtime.stop(&id, Duration::ZERO).await.expect("stop");
    match h.runtime.status(&id).expect("status").state {
        ContainerState::Exited(e) => assert_eq!(e.reason, ExitReason::Stopped),
        s => panic!("expected exited, got {s:?}"),
    }
    assert_eq!(h.runtime.list().len(), 1);
}

/// GPU injection end to end without NVIDIA hardware: the host paths point at device nodes
/// made here with the numbers of harmless kernel devices (`/dev/zero` as GPU 0, `/dev/full`
/// as GPU 1, `/dev/null` as nvidiactl). The container must get exactly its assigned
/// "GPU", the visibility variables, and a device cgroup that refuses everything else.
#[tokio::test(flavor = "multi_thread")]
async fn assigned_gpu_devices_are_injected_and_nothing_else() {
    use nix::sys::stat::{Mode, SFlag, makedev, mknod};
    let dir = tempfile::tempdir().expect("tempdir");
    let dev = dir.path().join("fake-dev");
    std::fs::create_dir_all(&dev).expect("mkdir");
    for (name, major, minor) in [("nvidia0", 1, 5), ("nvidia1", 1, 7), ("nvidiactl", 1, 3)] {
        mknod(
            &dev.join(name),
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o666),
            makedev(major, minor),
        )
        .expect("mknod");
    }
    // A driver library where no fixed directory would look; the linker cache (fabricated
    // here as glibc writes it) says where it is.
    let lib = dir.path().join("opt/nvidia/lib");
    std::fs::create_dir_all(&lib).expect("mkdir");
    std::fs::write(lib.join("libcuda.so.1"), "fake-cuda").expect("write");
    let ld_cache = dir.path().join("ld.so.cache");
    std::fs::write(
        &ld_cache,
        ld_cache_bytes("libcuda.so.1", &lib.join("libcuda.so.1")),
    )
    .expect("write");
    let h = TestHost::with(|cfg| {
        cfg.gpu = gantry_agent::gpu::GpuConfig {
            dev,
            cdi_dirs: vec![dir.path().join("no-cdi")],
            ld_cache,
            lib_dirs: vec![],
            bin_dirs: vec![],
            ..Default::default()
        }
    })
    .await;
    let rt = &h.runtime;

    let mut req = sh_request(
        "ls /dev | grep nvidia | tr '\\n' ' '; echo; \
         echo NVIDIA=$NVIDIA_VISIBLE_DEVICES CUDA=$CUDA_VISIBLE_DEVICES; \
         head -c 4 /dev/nvidia1 | od -An -tx1; \
         mknod /tmp/mem c 1 1 && (head -c 1 /tmp/mem >/dev/null 2>&1 && echo mem-readable || echo mem-denied); \
         cat /usr/local/nvidia/lib64/libcuda.so.1; echo; echo LD=$LD_LIBRARY_PATH",
    );
    req.gpus = vec![1];
    req.env = vec![("NVIDIA_VISIBLE_DEVICES".into(), "all".into())];
    let id = rt.start(req).await.expect("start").id;
    let exit = rt.wait(&id).await.expect("wait");
    let out = String::from_utf8_lossy(&rt.logs(&id, Stream::Stdout).expect("logs")).into_owned();
    let err = String::from_utf8_lossy(&rt.logs(&id, Stream::Stderr).expect("logs")).into_owned();
    assert_eq!(exit.code(), 0, "{out}{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[0].trim(),
        "nvidia1 nvidiactl",
        "only the assigned GPU and the control device"
    );
    assert_eq!(
        lines[1], "NVIDIA=1 CUDA=0",
        "the user's NVIDIA_VISIBLE_DEVICES=all is overridden"
    );
    assert_eq!(
        lines[2].trim(),
        "00 00 00 00",
        "the assigned device is usable (here /dev/full reads zeros)"
    );
    assert_eq!(
        lines[3], "mem-denied",
        "the device cgroup refuses unassigned devices"
    );
    assert_eq!(
        lines[4], "fake-cuda",
        "the driver library found through the linker cache"
    );
    assert_eq!(lines[5], "LD=/usr/local/nvidia/lib64");
}

/// A glibc `ld.so.cache` (format 1.1) with one native library, as `ldconfig` writes it.
fn ld_cache_bytes(name: &str, path: &std::path::Path) -> Vec<u8> {
    let abi: u32 = if cfg!(target_arch = "aarch64") {
        0x0a00
    } else {
        0x0300
    };
    let strings_at = 48 + 24;
    let mut strings = Vec::new();
    strings.extend_from_slice(name.as_bytes());
    strings.push(0);
    let path_at = strings_at + strings.len();
    strings.extend_from_slice(path.to_string_lossy().as_bytes());
    strings.push(0);
    let mut b = b"glibc-ld.so.cache1.1".to_vec();
    b.extend_from_slice(&1u32.to_ne_bytes());
    b.extend_from_slice(&(strings.len() as u32).to_ne_bytes());
    b.extend_from_slice(&[0; 20]);
    b.extend_from_slice(&(0x0003 | abi).to_ne_bytes());
    b.extend_from_slice(&(strings_at as u32).to_ne_bytes());
    b.extend_from_slice(&(path_at as u32).to_ne_bytes());
    b.extend_from_slice(&[0; 12]);
    b.extend_from_slice(&strings);
    b
}

/// A host with a CDI spec (as `nvidia-ctk cdi generate` writes one): the container gets
/// the spec's device nodes, mounts and env, and libcontainer runs its createContainer
/// hook after the mounts and before pivot_root, with the state on stdin, the way
/// `nvidia-ctk hook update-ldcache` needs (here a script that finds the rootfs through the
/// bundle's config.json and records what it saw inside it).
#[tokio::test(flavor = "multi_thread")]
async fn cdi_spec_edits_and_hooks_reach_the_container() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cdi = dir.path().join("cdi");
    let driver = dir.path().join("driver");
    std::fs::create_dir_all(&cdi).expect("mkdir");
    std::fs::create_dir_all(&driver).expect("mkdir");
    std::fs::write(driver.join("libfake.so.1"), "fake-driver").expect("write");
    let hook = dir.path().join("hook.sh");
    // Finds the rootfs as nvidia-ctk does: the bundle from the state on stdin, then
    // root.path from the bundle's config.json.
    let script = r#"#!/bin/sh
bundle=$(tr -d ' \n' | sed -n 's/.*"bundle":"\([^"]*\)".*/\1/p')
root=$(tr -d ' \n' < "$bundle/config.json" | sed -n 's/.*"root":{"path":"\([^"]*\)".*/\1/p')
cat "$root/usr/lib/gantry-test/libfake.so.1" > "$root/hook-saw" || echo no-rootfs > "$root/hook-saw"
"#;
    std::fs::write(&hook, script).expect("write hook");
    std::fs::set_permissions(&hook, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    let spec = format!(
        r#"cdiVersion: 0.5.0
kind: nvidia.com/gpu
devices:
- name: "0"
  containerEdits:
    deviceNodes:
    - path: /dev/nvidia0
      hostPath: /dev/zero
containerEdits:
  env:
  - NVIDIA_VISIBLE_DEVICES=void
  - FROM_CDI=yes
  deviceNodes:
  - path: /dev/nvidiactl
    hostPath: /dev/null
  mounts:
  - hostPath: {lib}
    containerPath: /usr/lib/gantry-test/libfake.so.1
    options: [ro, nosuid, nodev, bind]
  hooks:
  - hookName: createContainer
    path: {hook}
    args: [hook.sh, update-ldcache]
    env: [PATH=/usr/bin:/bin:/usr/sbin:/sbin]
"#,
        lib = driver.join("libfake.so.1").display(),
        hook = hook.display(),
    );
    std::fs::write(cdi.join("nvidia.yaml"), spec).expect("write spec");
    let h = TestHost::with(|cfg| {
        cfg.gpu = gantry_agent::gpu::GpuConfig {
            cdi_dirs: vec![cdi.clone()],
            ..Default::default()
        }
    })
    .await;
    let rt = &h.runtime;
    let mut req = sh_request(
        "ls /dev | grep nvidia | tr '\\n' ' '; echo; \
         echo NVIDIA=$NVIDIA_VISIBLE_DEVICES CDI=$FROM_CDI; \
         cat /usr/lib/gantry-test/libfake.so.1; echo; \
         cat /hook-saw; echo",
    );
    req.gpus = vec![0];
    let id = rt.start(req).await.expect("start");
    let id = id.id;
    let exit = rt.wait(&id).await.expect("wait");
    let out = String::from_utf8_lossy(&rt.logs(&id, Stream::Stdout).expect("logs")).into_owned();
    let err = String::from_utf8_lossy(&rt.logs(&id, Stream::Stderr).expect("logs")).into_owned();
    assert_eq!(exit.code(), 0, "{out}{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0].trim(), "nvidia0 nvidiactl", "{out}");
    assert_eq!(
        lines[1], "NVIDIA=0 CDI=yes",
        "Gantry's visibility wins over the spec's void"
    );
    assert_eq!(lines[2], "fake-driver", "the spec's mount");
    assert_eq!(
        lines[3], "fake-driver",
        "the hook ran with the rootfs and the spec's mounts in place"
    );

    // A spec that names a missing file: the start fails with the file and the field.
    std::fs::remove_file(driver.join("libfake.so.1")).expect("rm");
    let mut req = sh_request("true");
    req.gpus = vec![0];
    let err = rt.start(req).await.expect_err("missing driver file");
    let msg = err.to_string();
    assert!(
        msg.contains("nvidia.yaml") && msg.contains("containerEdits.mounts[0].hostPath"),
        "{msg}"
    );
}

/// Pre-started shims: a start uses one (no exec on the start path), the pool refills, and
/// idle shims exit once the runtime that owns them is gone.
#[tokio::test(flavor = "multi_thread")]
async fn pooled_shims_serve_starts_and_exit_with_their_runtime() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A private copy of the binary, so this test's shims can be told from other tests'.
    let binary = dir.path().join("bin/gantry-agent");
    std::fs::create_dir_all(binary.parent().expect("parent")).expect("mkdir");
    std::fs::copy(common::AGENT, &binary).expect("copy agent binary");
    let pooled = || -> Vec<i32> {
        let out = std::process::Command::new("pgrep")
            .args(["-f", &format!("^{} shim --pooled", binary.display())])
            .output()
            .expect("pgrep");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    };
    let h = TestHost::with(|cfg| {
        cfg.shim_binary = binary.clone();
        cfg.shim_pool = 2;
    })
    .await;
    let rt = h.runtime.clone();
    assert!(
        eventually(Duration::from_secs(10), || pooled().len() == 2).await,
        "pool never filled: {:?}",
        pooled()
    );
    let idle = pooled();

    let id = rt.start(sh_request("sleep 1000")).await.expect("start").id;
    let shim: gantry_agent::runtime::ShimPid = serde_json::from_slice(
        &std::fs::read(
            rt.log_dir(&id)
                .expect("dir")
                .join(gantry_agent::runtime::files::SHIM_PID),
        )
        .expect("shim.pid"),
    )
    .expect("json");
    assert!(
        idle.contains(&shim.pid),
        "the container runs under a pre-started shim ({} not in {idle:?})",
        shim.pid
    );
    // The assigned shim keeps its `--pooled` command line; the others are idle.
    let idle_now = || pooled().into_iter().filter(|p| *p != shim.pid).count();
    assert!(
        eventually(Duration::from_secs(10), || idle_now() == 2).await,
        "pool never refilled: {:?} (assigned: {})",
        pooled(),
        shim.pid
    );

    let exit = rt.stop(&id, Duration::ZERO).await.expect("stop");
    assert_eq!(exit.reason, ExitReason::Stopped);
    drop(rt);
    drop(h);
    assert!(
        eventually(Duration::from_secs(10), || pooled().is_empty()).await,
        "idle shims outlived their runtime: {:?}",
        pooled()
    );
}

/// A shim that does not report in time is rolled back: whatever it had started is
/// stopped and torn down, and the failed start leaves nothing behind.
#[tokio::test(flavor = "multi_thread")]
async fn a_start_that_times_out_is_rolled_back() {
    // A shim that is slow to start (it waits 500 ms, then runs the real one): it misses
    // the 100 ms report deadline, creates the container anyway, and reports within the
    // grace, which is exactly when the roll-back must stop and remove it.
    let scripts = tempfile::tempdir().expect("tempdir");
    let slow = scripts.path().join("slow-shim");
    std::fs::write(
        &slow,
        format!("#!/bin/sh\nsleep 0.5\nexec {} \"$@\"\n", common::AGENT),
    )
    .expect("script");
    std::fs::set_permissions(&slow, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    let h = TestHost::with(|cfg| {
        cfg.shim_binary = slow.clone();
        cfg.shim_pool = 0;
        cfg.start_timeout = Duration::from_millis(100);
    })
    .await;
    let mut req = sh_request("sleep 1000");
    req.id = Some(ContainerId::new("too-slow").expect("id"));
    let err = h
        .runtime
        .start(req)
        .await
        .expect_err("100 ms is too short for this shim");
    assert!(err.to_string().contains("did not report"), "{err}");
    let id = ContainerId::new("too-slow").expect("id");
    assert_eq!(leftovers(h.state_dir(), &[id]), Vec::<String>::new());
    assert!(!h.state_dir().join("containers/too-slow").exists());
    assert!(h.runtime.list().is_empty());
}

/// Every limit in the request reaches the kernel: the container's cgroups and its /dev/shm.
#[tokio::test(flavor = "multi_thread")]
async fn requested_limits_are_enforced_by_the_kernel() {
    let h = TestHost::new().await;
    let mut req = sh_request("df -k /dev/shm | tail -n 1 | awk '{print $2}'; sleep 1000");
    req.resources.memory_bytes = 64 << 20;
    req.resources.cpu = gantry_shared::CpuMillis(500);
    req.resources.pids = 100;
    req.shm_bytes = 32 << 20;
    let id = h.runtime.start(req).await.expect("start").id;
    let read = |controller: &str, file: &str| {
        let dir = cgroup::existing_dirs(&h.runtime.cgroup_path(&id))
            .into_iter()
            .find(|d| d.join(file).exists())
            .unwrap_or_else(|| panic!("no cgroup with {file} ({controller})"));
        std::fs::read_to_string(dir.join(file))
            .expect("read")
            .trim()
            .to_owned()
    };
    assert_eq!(
        read("memory", "memory.limit_in_bytes"),
        (64u64 << 20).to_string()
    );
    assert_eq!(read("cpu", "cpu.cfs_quota_us"), "50000");
    assert_eq!(read("cpu", "cpu.cfs_period_us"), "100000");
    assert_eq!(read("pids", "pids.max"), "100");
    let shm = eventually(Duration::from_secs(10), || {
        h.runtime
            .logs(&id, Stream::Stdout)
            .is_ok_and(|b| b == b"32768\n")
    })
    .await;
    assert!(
        shm,
        "/dev/shm is 32 MiB: {:?}",
        String::from_utf8_lossy(&h.runtime.logs(&id, Stream::Stdout).expect("logs"))
    );
    h.runtime.stop(&id, Duration::ZERO).await.expect("stop");
}

/// A function container sees its runtime API socket where `GANTRY_RUNTIME_API` says, can
/// reach it as a user other than root, and the agent's directory goes with the server.
#[tokio::test(flavor = "multi_thread")]
async fn a_function_container_sees_its_runtime_api_socket() {
    use gantry_agent::invoke::{self, Container, Invoke, InvokeConfig, StopReason};
    use gantry_agent::runtime::BindMount;
    use gantry_shared::protocol::{Event, FunctionRuntime};
    use gantry_shared::{AttemptRef, Generation, Owner, WarmId};

    struct Nobody;
    impl Container for Nobody {
        fn event(&self, _: Event) {}
        fn stop(&self, _: StopReason) {}
    }

    let h = TestHost::new().await;
    let invoke = Invoke::new(
        InvokeConfig::new(h.state_dir().join("invoke")),
        tokio_util::sync::CancellationToken::new(),
    );
    let attempt = AttemptRef {
        owner: Owner::Function(WarmId::new("w-1").expect("warm id")),
        generation: Generation(1),
    };
    let id = attempt.owner.container_id(attempt.generation).expect("id");
    let function = FunctionRuntime {
        max_inputs: 3,
        startup_timeout_ms: 60_000,
        timeout_ms: 60_000,
        web: None,
    };
    invoke
        .open(&id, attempt, &function, std::sync::Arc::new(Nobody))
        .expect("serve");
    let mut req = sh_request(
        "test -S \"$GANTRY_RUNTIME_API\" && echo socket; test -w \"$GANTRY_RUNTIME_API\" && echo writable; \
         echo \"$GANTRY_RUNTIME_API $GANTRY_MAX_INPUTS\"; id -u",
    );
    req.id = Some(id.clone());
    req.user = Some("1000:1000".into());
    req.env.extend(invoke::container_env(&function));
    req.binds.push(BindMount {
        source: invoke.dir(&id),
        destination: invoke::CONTAINER_DIR.into(),
        read_only: false,
        exec: false,
    });
    let id = h.runtime.start(req).await.expect("start").id;
    let exit = h.runtime.wait(&id).await.expect("wait");
    let out = String::from_utf8(h.runtime.logs(&id, Stream::Stdout).expect("logs")).expect("utf8");
    let err = String::from_utf8(h.runtime.logs(&id, Stream::Stderr).expect("logs")).expect("utf8");
    assert_eq!(exit.code(), 0, "stderr: {err}");
    assert_eq!(
        out, "socket\nwritable\n/run/gantry/runtime.sock 3\n1000\n",
        "stderr: {err}"
    );
    invoke.close(&id).await;
    assert!(!invoke.dir(&id).exists());
    h.runtime.remove(&id).expect("remove");
    assert_eq!(leftovers(h.state_dir(), &[id]), Vec::<String>::new());
}
