//! Shared fixtures for the agent's integration tests: a busybox image, a runtime in a
//! temporary state directory, and leak checks. These tests need root.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use gantry_agent::image::{ImageConfig, ImageStore, PullConfig};
use gantry_agent::runtime::{self, ContainerRequest, Runtime, RuntimeConfig};
use gantry_agent::store::LocalStore;
use gantry_shared::ContainerId;

pub const AGENT: &str = env!("CARGO_BIN_EXE_gantry-agent");

/// Builds a busybox root filesystem with the same script the README uses.
pub fn busybox_rootfs(dir: &Path) -> PathBuf {
    let root = dir.join("busybox-rootfs");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/make-busybox-rootfs");
    let out = Command::new(script)
        .arg(&root)
        .output()
        .expect("run make-busybox-rootfs");
    assert!(
        out.status.success(),
        "make-busybox-rootfs failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    root
}

/// A runtime on a fresh state directory with `busybox` imported.
pub struct TestHost {
    pub dir: tempfile::TempDir,
    pub store: LocalStore,
    pub images: ImageStore,
    pub runtime: Runtime,
}

impl TestHost {
    pub async fn new() -> Self {
        Self::with(|_| {}).await
    }

    /// A host whose runtime config is adjusted by `configure` first.
    pub async fn with(configure: impl FnOnce(&mut RuntimeConfig)) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path();
        let store = LocalStore::open(&state.join("db")).expect("store");
        let images =
            ImageStore::open(&state.join("images"), &store, PullConfig::default()).expect("images");
        let rootfs = busybox_rootfs(dir.path());
        images
            .import(&rootfs, "busybox", ImageConfig::default())
            .await
            .expect("import busybox");
        let mut config = RuntimeConfig::new(state, AGENT);
        configure(&mut config);
        let runtime = Runtime::open(config, images.clone(), &store)
            .await
            .expect("runtime");
        Self {
            dir,
            store,
            images,
            runtime,
        }
    }

    pub fn state_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Starts `sh -c SCRIPT` in busybox with default limits.
    pub async fn sh(&self, script: &str) -> ContainerId {
        let req = sh_request(script);
        self.runtime.start(req).await.expect("start").id
    }

    /// Runs `sh -c SCRIPT` to completion; returns (exit, stdout, stderr).
    pub async fn run(&self, script: &str) -> (runtime::ExitRecord, String, String) {
        let id = self.sh(script).await;
        let exit = tokio::time::timeout(Duration::from_secs(60), self.runtime.wait(&id))
            .await
            .expect("exit within 60s")
            .expect("wait");
        let out = String::from_utf8_lossy(
            &self
                .runtime
                .logs(&id, runtime::Stream::Stdout)
                .expect("logs"),
        )
        .into_owned();
        let err = String::from_utf8_lossy(
            &self
                .runtime
                .logs(&id, runtime::Stream::Stderr)
                .expect("logs"),
        )
        .into_owned();
        (exit, out, err)
    }
}

pub fn sh_request(script: &str) -> ContainerRequest {
    let mut req = ContainerRequest::new("busybox");
    req.command = Some(vec!["sh".into(), "-c".into(), script.into()]);
    req
}

/// Everything a container could leave behind on the host, by container id: mounts under
/// the state directory, cgroup directories, processes in them, libcontainer state.
pub fn leftovers(state: &Path, ids: &[ContainerId]) -> Vec<String> {
    let mut found = Vec::new();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let prefix = state.to_string_lossy();
    for l in mounts.lines() {
        if let Some(mp) = l.split(' ').nth(4)
            && mp.starts_with(&*prefix)
        {
            found.push(format!("mount {mp}"));
        }
    }
    for id in ids {
        let rel = runtime::cgroup::container_path(&runtime::cgroup::parent_for(state), id.as_str());
        for d in runtime::cgroup::existing_dirs(&rel) {
            found.push(format!("cgroup {}", d.display()));
        }
        for p in runtime::cgroup::pids(&rel) {
            found.push(format!("process {p} of {id}"));
        }
    }
    if let Ok(entries) = std::fs::read_dir(state.join("libcontainer")) {
        for e in entries.flatten() {
            found.push(format!("libcontainer state {}", e.path().display()));
        }
    }
    found
}

/// Polls `f` every 20 ms until it returns true or `timeout` passes.
pub async fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let until = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < until {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    f()
}
