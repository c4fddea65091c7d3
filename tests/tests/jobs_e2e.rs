//! Jobs through the whole path with real processes on loopback: HTTP API → coordinator →
//! QUIC → agent → shim → container, and back as events. Includes kill -9 of the agent
//! and of the coordinator while a job runs, and the image check at submission (a short
//! image name that is nowhere is refused).

use std::process::Command;
use std::time::Duration;

use gantry_tests::{Coordinator, Proc, binary, free_ports};
use serde_json::{Value, json};

struct Cluster {
    dir: tempfile::TempDir,
    coordinator: Proc,
    api: String,
    control: String,
    admin: String,
    agent: Option<Proc>,
}

impl Cluster {
    async fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let (api, control) = free_ports();
        let coordinator = Coordinator::start(&dir.path().join("coordinator"), &api, &control);
        let admin = coordinator
            .admin
            .clone()
            .expect("first start prints the admin token");
        let coordinator = coordinator.proc;
        let mut c = Self {
            dir,
            coordinator,
            api,
            control,
            admin,
            agent: None,
        };
        // An agent with the busybox image, joined with a fresh token.
        let rootfs = c.dir.path().join("rootfs");
        gantry_tests::busybox_rootfs(&rootfs);
        gantry_tests::import_busybox(c.agent_cmd(), &rootfs);
        let token = Command::new(binary("gantry-coordinator"))
            .args(["token", "create", "--api", &c.api, "--token", &c.admin])
            .output()
            .expect("token");
        let token = String::from_utf8_lossy(&token.stdout).trim().to_owned();
        let join = c
            .agent_cmd()
            .args([
                "join",
                "--coordinator",
                &c.control,
                "--token",
                &token,
                "--node",
                "e2e-node",
            ])
            .output()
            .expect("join");
        assert!(
            join.status.success(),
            "{}",
            String::from_utf8_lossy(&join.stderr)
        );
        c.start_agent();
        c
    }

    fn agent_cmd(&self) -> Command {
        let mut cmd = Command::new(binary("gantry-agent"));
        cmd.env("GANTRY_STATE_DIR", self.dir.path().join("agent"))
            .env("GANTRY_CONFIG", self.dir.path().join("agent/agent.toml"))
            .env("GANTRY_LOG", "info");
        cmd
    }

    fn start_agent(&mut self) {
        let mut cmd = self.agent_cmd();
        cmd.args([
            "serve",
            "--coordinator",
            &self.control,
            "--gossip-listen",
            "127.0.0.1:0",
            "--cpus",
            "2",
            "--memory",
            "2G",
        ]);
        let mut p = Proc::spawn(cmd);
        p.line_after("agent serving");
        self.agent = Some(p);
    }

    /// `GET /v1/nodes`.
    async fn nodes(&self) -> Value {
        reqwest::Client::new()
            .get(format!("http://{}/v1/nodes", self.api))
            .bearer_auth(&self.admin)
            .send()
            .await
            .expect("nodes")
            .json()
            .await
            .expect("json")
    }

    /// Waits until the node is ready: connected, and its gossip (its images with it) heard.
    async fn wait_ready(&self) {
        for _ in 0..300 {
            if self.nodes().await[0]["state"] == "ready" {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the node never became ready");
    }

    /// The `gantry` CLI as the admin, with a home of its own.
    fn gantry(&self, args: &[&str]) -> std::process::Output {
        Command::new(binary("gantry"))
            .env("HOME", self.dir.path().join("home"))
            .env_remove("XDG_CONFIG_HOME")
            .env("GANTRY_ADDR", &self.api)
            .env("GANTRY_TOKEN", &self.admin)
            .args(args)
            .output()
            .expect("gantry")
    }

    /// POSTs a job spec as the admin.
    async fn post(&self, spec: Value) -> reqwest::Response {
        reqwest::Client::new()
            .post(format!("http://{}/v1/jobs", self.api))
            .bearer_auth(&self.admin)
            .json(&spec)
            .send()
            .await
            .expect("submit")
    }

    /// Submits `sh -c SCRIPT` in busybox; returns the job id.
    async fn submit(&self, script: &str) -> String {
        self.submit_spec(json!({"name": "e2e", "image": "busybox", "command": ["sh", "-c", script], "resources": {"cpu": "0.5", "memory": "128M"}}))
            .await
    }

    /// Submits `spec`, which must be accepted; returns the job id.
    async fn submit_spec(&self, spec: Value) -> String {
        let resp = self.post(spec).await;
        assert_eq!(resp.status().as_u16(), 201);
        let job: Value = resp.json().await.expect("job");
        job["id"].as_str().expect("id").to_owned()
    }

    async fn job(&self, id: &str) -> Value {
        reqwest::Client::new()
            .get(format!("http://{}/v1/jobs/{id}", self.api))
            .bearer_auth(&self.admin)
            .send()
            .await
            .expect("get")
            .json()
            .await
            .expect("job")
    }

    /// Polls until the job is in `state` (bounded).
    async fn wait_state(&self, id: &str, states: &[&str]) -> Value {
        for _ in 0..300 {
            let job = self.job(id).await;
            if states.iter().any(|s| job["state"] == *s) {
                return job;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("job {id} never reached {states:?}: {}", self.job(id).await);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn jobs_run_and_report_their_exit_codes() {
    let c = Cluster::start().await;
    let ok = c.submit("echo hi").await;
    let bad = c.submit("exit 3").await;
    let job = c.wait_state(&ok, &["succeeded", "failed"]).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["attempts"][0]["exit_code"], 0);
    assert_eq!(job["attempts"][0]["node"], "e2e-node");
    let job = c.wait_state(&bad, &["succeeded", "failed"]).await;
    assert_eq!(job["state"], "failed", "{job}");
    assert_eq!(job["attempts"][0]["exit_code"], 3);
    assert!(
        job["reason"]
            .as_str()
            .unwrap_or("")
            .contains("exited with 3"),
        "{job}"
    );
    let nodes = c.nodes().await;
    assert_eq!(nodes[0]["id"], "e2e-node", "{nodes}");
    assert_eq!(nodes[0]["cpu_millis"], 2000);
    // Larger than any node (2 cores here): refused at submission, saying why.
    let huge =
        json!({"name": "huge", "image": "busybox", "resources": {"cpu": "64", "memory": "1G"}});
    let resp = c.post(huge).await;
    assert_eq!(resp.status().as_u16(), 422);
    let body: Value = resp.json().await.expect("error body");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("can never run here: no node has 64 cpu"),
        "{body}"
    );
}

/// A short image name must be somewhere: in a node's own store (imported there) or in the
/// cluster's registry. One that is nowhere is refused at submission with 422, naming it and
/// saying how to push it, for jobs and for functions alike; one that is only in the node's
/// store, or only in the registry, runs.
#[tokio::test(flavor = "multi_thread")]
async fn a_short_image_that_is_nowhere_is_refused_at_submission() {
    let c = Cluster::start().await;
    // Until the node has gossiped what it holds, the coordinator cannot tell, and accepts.
    c.wait_ready().await;
    let resp = c
        .post(json!({"name": "e2e", "image": "no-such-image", "command": ["true"]}))
        .await;
    assert_eq!(resp.status().as_u16(), 422);
    let body: Value = resp.json().await.expect("error body");
    assert_eq!(body["error"]["code"], "image_not_found", "{body}");
    assert_eq!(body["error"]["field"], "image", "{body}");
    let message = body["error"]["message"].as_str().unwrap_or("");
    for part in [
        "image `no-such-image`",
        "gantry image import DIR|TAR --name no-such-image",
        &format!("docker://{}/no-such-image", c.api),
    ] {
        assert!(message.contains(part), "{part}: {body}");
    }
    // busybox is only in the node's own store (imported there, never pushed).
    let local = c.submit("echo from-the-node").await;
    // Pushed to the registry only: the node pulls it.
    let rootfs = c.dir.path().join("rootfs");
    let pushed = c.gantry(&[
        "image",
        "import",
        rootfs.to_str().expect("utf-8"),
        "--name",
        "team/pushed:v1",
    ]);
    assert!(
        pushed.status.success(),
        "{}",
        String::from_utf8_lossy(&pushed.stderr)
    );
    let pulled = c
        .submit_spec(json!({"name": "e2e", "image": "team/pushed:v1",
            "command": ["echo", "from-the-registry"],
            "resources": {"cpu": "0.5", "memory": "128M"}}))
        .await;
    for id in [&local, &pulled] {
        let job = c.wait_state(id, &["succeeded", "failed"]).await;
        assert_eq!(job["state"], "succeeded", "{job}");
    }
    // A function is judged the same way when it is deployed.
    let manifest = c.dir.path().join("gantry.toml");
    std::fs::write(
        &manifest,
        "app = \"nowhere\"\n[functions.f]\nimage = \"no-such-fn-image\"\n",
    )
    .expect("manifest");
    let deploy = c.gantry(&["deploy", "-f", manifest.to_str().expect("utf-8")]);
    let stderr = String::from_utf8_lossy(&deploy.stderr);
    assert!(!deploy.status.success(), "{stderr}");
    assert!(
        stderr.contains("image `no-such-fn-image` is not in the cluster's registry"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_running_job_survives_kill_9_of_the_agent_and_of_the_coordinator() {
    let mut c = Cluster::start().await;
    let id = c.submit("sleep 3; exit 7").await;
    // Wait until the node reports the container running (not merely placed).
    for _ in 0..300 {
        if !c.job(&id).await["attempts"][0]["started_at_ms"].is_null() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The agent dies; its container keeps running; a new agent re-adopts and reports.
    c.agent.take().expect("agent").kill9();
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.start_agent();
    // More accepted work, then the coordinator dies too and comes back on the same state.
    let others = [c.submit("sleep 1; exit 0").await, c.submit("exit 2").await];
    c.coordinator.kill9();
    c.coordinator = Coordinator::start(&c.dir.path().join("coordinator"), &c.api, &c.control).proc;
    // Every accepted job is still there and finishes.
    let done: Vec<Value> = wait_all(&c, &others).await;
    assert_eq!(done[0]["state"], "succeeded", "{}", done[0]);
    let last = done[1]["attempts"]
        .as_array()
        .and_then(|a| a.last())
        .cloned()
        .unwrap_or_default();
    assert_eq!(last["exit_code"], 2, "{}", done[1]);
    let job = c.wait_state(&id, &["succeeded", "failed"]).await;
    assert_eq!(job["state"], "failed", "{job}");
    assert_eq!(
        job["attempts"].as_array().map(Vec::len),
        Some(1),
        "one attempt, reported once: {job}"
    );
    assert_eq!(job["attempts"][0]["exit_code"], 7, "{job}");
}

async fn wait_all(c: &Cluster, ids: &[String]) -> Vec<Value> {
    let mut out = Vec::new();
    for id in ids {
        out.push(c.wait_state(id, &["succeeded", "failed"]).await);
    }
    out
}

/// Cut the agent off (SIGSTOP past the liveness timeouts and the session's idle timeout):
/// the node is declared down and its running member lost. Restored, the node stops what
/// it still ran of the lost generation, the job runs again as a new generation, and the
/// old generation's buffered exit changes nothing.
#[tokio::test(flavor = "multi_thread")]
async fn a_node_cut_off_loses_its_member_and_its_late_exit_is_ignored() {
    let c = Cluster::start().await;
    let id = c.submit("sleep 1; exit 5").await;
    for _ in 0..300 {
        if !c.job(&id).await["attempts"][0]["started_at_ms"].is_null() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pid = c.agent.as_ref().expect("agent").child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-STOP", &pid])
            .status()
            .expect("kill")
            .success()
    );
    // Past the coordinator's 10 s idle timeout: the session is gone.
    let mut cut = false;
    for _ in 0..200 {
        let nodes = c.nodes().await;
        // Joined nodes stay listed; the session is what goes.
        if nodes[0]["connected"] == false && nodes[0]["state"] == "down" {
            cut = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        Command::new("kill")
            .args(["-CONT", &pid])
            .status()
            .expect("kill")
            .success()
    );
    assert!(cut, "the coordinator never noticed the agent was gone");
    let lost = c.job(&id).await;
    assert_eq!(
        lost["attempts"][0]["exit_code"],
        Value::Null,
        "the exit cannot have been reported while cut off: {lost}"
    );
    let job = c.wait_state(&id, &["succeeded", "failed"]).await;
    assert_eq!(job["attempts"].as_array().map(Vec::len), Some(2), "{job}");
    assert!(
        job["attempts"][0]["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("lost: node e2e-node is down")),
        "{job}"
    );
    assert_eq!(job["attempts"][1]["generation"], 2, "{job}");
    assert_eq!(job["attempts"][1]["exit_code"], 5, "{job}");
    assert_eq!(
        job["failures"], 1,
        "the lost generation did not count: {job}"
    );
    assert_eq!(job["state"], "failed");
}

/// A failing job is retried with exponential backoff, each attempt in its history with
/// how it ended, until its retries are used up.
#[tokio::test(flavor = "multi_thread")]
async fn retries_back_off_exponentially() {
    let c = Cluster::start().await;
    let id = c
        .submit_spec(json!({
            "name": "flaky", "image": "busybox", "command": ["sh", "-c", "exit 3"],
            "retries": 2, "backoff": {"initial": "1s", "factor": 2, "max": "1m"},
            "resources": {"cpu": "0.5", "memory": "64M"}
        }))
        .await;
    let job = c.wait_state(&id, &["succeeded", "failed"]).await;
    assert_eq!(job["state"], "failed", "{job}");
    assert_eq!(job["failures"], 3, "{job}");
    let attempts = job["attempts"].as_array().expect("attempts");
    assert_eq!(attempts.len(), 3, "{job}");
    let started: Vec<u64> = attempts
        .iter()
        .map(|a| a["started_at_ms"].as_u64().expect("started"))
        .collect();
    // Each retry waited at least its backoff: 1 s, then 2 s.
    assert!(started[1] - started[0] >= 1_000, "{started:?}");
    assert!(started[2] - started[1] >= 2_000, "{started:?}");
    for a in attempts {
        assert_eq!(
            (a["exit_code"].as_i64(), a["reason"].as_str()),
            (Some(3), Some("exited"))
        );
    }
    // A bad backoff is refused, naming the field.
    let bad = c
        .post(json!({"name": "x", "image": "busybox", "backoff": {"factor": 0}}))
        .await;
    assert_eq!(bad.status().as_u16(), 400);
    let body: Value = bad.json().await.expect("error");
    assert_eq!(body["error"]["field"], "backoff.factor", "{body}");
}

/// A job past its timeout is stopped by its node and its history says so.
#[tokio::test(flavor = "multi_thread")]
async fn a_timeout_ends_the_attempt_and_the_history_says_so() {
    let c = Cluster::start().await;
    let id = c
        .submit_spec(json!({
            "name": "slow", "image": "busybox", "command": ["sleep", "60"], "timeout": "1s",
            "resources": {"cpu": "0.5", "memory": "64M"}
        }))
        .await;
    let job = c.wait_state(&id, &["succeeded", "failed"]).await;
    assert_eq!(job["state"], "failed", "{job}");
    assert_eq!(job["attempts"][0]["reason"], "timed_out", "{job}");
    assert!(
        job["reason"]
            .as_str()
            .is_some_and(|r| r.contains("timed_out")),
        "{job}"
    );
    assert!(
        job["attempts"][0]["ended_at_ms"].as_u64().is_some(),
        "{job}"
    );
}
