//! A registry that is briefly away is the platform's fault, never the job's: jobs whose
//! images come from the cluster's embedded registry are started while the coordinator
//! (which serves that registry) is killed -9 and restarted; every accepted job succeeds.
//! An image the registry does not have (and no node holds) is refused at submission.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use gantry_tests::cluster::{ClusterSpec, TestCluster};
use serde_json::{Value, json};

/// Layers big enough that pulls are still running when the coordinator goes away: a
/// busybox root filesystem plus `mib` MiB that do not compress.
fn big_rootfs(dir: &Path, mib: usize) -> std::path::PathBuf {
    let rootfs = dir.join("rootfs");
    gantry_tests::busybox_rootfs(&rootfs);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut data = Vec::with_capacity(mib << 20);
    while data.len() < mib << 20 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data.extend_from_slice(&x.to_le_bytes());
    }
    std::fs::write(rootfs.join("ballast"), data).expect("ballast");
    rootfs
}

fn push(c: &TestCluster, layout: &Path, repo: &str) {
    let out = Command::new("skopeo")
        .args([
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
            "--dest-creds",
            &format!("gantry:{}", c.admin),
        ])
        .arg(format!("oci:{}:v1", layout.display()))
        .arg(format!("docker://{}/{repo}:v1", c.api))
        .output()
        .expect("skopeo");
    assert!(
        out.status.success(),
        "push {repo}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn jobs_started_while_the_registry_restarts_all_succeed() {
    let mut c = TestCluster::start(ClusterSpec {
        agents: 2,
        ..ClusterSpec::default()
    });
    let work = c.dir.path().join("image");
    std::fs::create_dir_all(&work).expect("dir");
    let rootfs = big_rootfs(&work, 24);
    let layout = gantry_tests::functions_fixture::oci_layout(&rootfs, &work, &["true"]);
    // One repository per job, so every start needs its own pull.
    let jobs = 6;
    for i in 0..jobs {
        push(&c, &layout, &format!("team/big-{i}"));
    }
    let mut ids = Vec::new();
    for i in 0..jobs {
        let job = c.submit(json!({
            "name": format!("pull-{i}"),
            "image": format!("team/big-{i}:v1"),
            "command": ["sh", "-c", "test -s /ballast && echo pulled"],
            "resources": {"cpu": "0.25", "memory": "64M"},
        }));
        ids.push(job["id"].as_str().expect("id").to_owned());
    }
    // The pulls are under way: the registry goes away and comes back.
    let killed = Instant::now();
    c.coordinator.kill9();
    std::thread::sleep(Duration::from_millis(1500));
    c.restart_coordinator();
    eprintln!("registry away for {:?}", killed.elapsed());
    for id in &ids {
        let job = c.wait_job(
            id,
            &["succeeded", "failed", "cancelled"],
            Duration::from_secs(120),
        );
        assert_eq!(job["state"], "succeeded", "{job}");
        assert_eq!(job["failures"], 0, "a platform fault used a retry: {job}");
    }

    // An image the registry does not have, and no node either, is refused at submission
    // (it used to be placed, then fail on the node). Judged once every node has gossiped
    // what it holds to the restarted coordinator.
    let names: Vec<String> = c.agents.iter().map(|a| a.node.clone()).collect();
    c.wait_nodes("every node ready", Duration::from_secs(30), |nodes| {
        names
            .iter()
            .all(|n| gantry_tests::cluster::state_of(nodes, n) == Some("ready"))
    });
    let resp = c
        .http()
        .post(c.url("/v1/jobs"))
        .bearer_auth(&c.admin)
        .json(&json!({
            "name": "missing",
            "image": "team/nothing-here:v1",
            "command": ["true"],
            "resources": {"cpu": "0.25", "memory": "64M"},
        }))
        .send()
        .expect("submit");
    assert_eq!(resp.status().as_u16(), 422);
    let body: Value = resp.json().expect("error body");
    let message = body["error"]["message"].as_str().unwrap_or("");
    assert!(message.contains("`team/nothing-here:v1`"), "{body}");
}
