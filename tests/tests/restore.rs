//! A coordinator restored from a backup learns what it lost from its agents: a job that
//! ended after the backup (its exit acknowledged, so the agent no longer holds it as an
//! event) ends as it did once the restored coordinator is running again, instead of
//! showing as running forever.

use std::time::Duration;

use gantry_tests::cluster::{ClusterSpec, TestCluster};
use serde_json::json;

/// Copies directory `from` to `to` (replacing `to`), as `tar` would for a backup.
fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    let _ = std::fs::remove_dir_all(to);
    let out = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .output()
        .expect("cp");
    assert!(
        out.status.success(),
        "cp: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_job_that_ended_after_the_backup_ends_as_it_did_after_a_restore() {
    let mut c = TestCluster::start(ClusterSpec {
        agents: 1,
        busybox: true,
        ..ClusterSpec::default()
    });
    let state = c.dir.path().join("coordinator");
    let backup = c.dir.path().join("backup");
    let job = c.submit(json!({
        "name": "outlives-the-backup", "image": "busybox",
        "command": ["sh", "-c", "sleep 2; exit 3"],
        "resources": {"cpu": "0.25", "memory": "64M"}
    }));
    let id = job["id"].as_str().expect("id").to_owned();
    c.wait_job(&id, &["running"], Duration::from_secs(30));

    // The backup, taken with the coordinator down (as docs/operations.md says).
    c.coordinator.kill9();
    copy_dir(&state, &backup);
    c.restart_coordinator();

    // The job ends after the backup; its exit is applied and acknowledged.
    let ended = c.wait_job(&id, &["failed"], Duration::from_secs(30));
    assert_eq!(ended["attempts"][0]["exit_code"], 3, "{ended}");

    // Restored: the coordinator's store says the job runs.
    c.coordinator.kill9();
    copy_dir(&backup, &state);
    c.restart_coordinator();
    let restored = c.job(&id);
    assert_eq!(
        restored["state"], "running",
        "the backup predates the end: {restored}"
    );

    // The agent reconnects, sees the coordinator lost events it had acknowledged, and
    // tells it the job's end again.
    let again = c.wait_job(&id, &["failed"], Duration::from_secs(30));
    assert_eq!(again["attempts"][0]["exit_code"], 3, "{again}");
}
