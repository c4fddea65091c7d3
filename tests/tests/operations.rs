//! What an operator does on bare metal: check configuration files, join a node so that its
//! service starts with no flags, and upgrade an agent without losing its running work.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use gantry_tests::cluster::{ClusterSpec, TestCluster, processes};
use gantry_tests::netns::wait_until;
use gantry_tests::{Proc, binary};
use serde_json::json;

fn shipped(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../systemd")
        .join(name)
}

fn check(daemon: &str, file: &Path) -> std::process::Output {
    Command::new(binary(daemon))
        .args(["config", "check", "--config"])
        .arg(file)
        .output()
        .expect("config check")
}

#[test]
fn config_check_accepts_the_shipped_files_and_names_what_is_wrong_in_bad_ones() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (daemon, file) in [
        ("gantry-agent", "agent.toml"),
        ("gantry-coordinator", "coordinator.toml"),
    ] {
        let out = check(daemon, &shipped(file));
        assert!(
            out.status.success(),
            "{daemon}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("valid"));

        // An unknown key, a bad value, a missing file: exit 1, naming file, key, reason.
        let bad = dir.path().join(format!("bad-{file}"));
        for (text, key, reason) in [
            (
                "[gossip]\nintervall = \"1s\"\n",
                "gossip.intervall",
                "unknown field",
            ),
            (
                "[gossip]\ninterval = \"often\"\n",
                "gossip.interval",
                "not a duration",
            ),
            ("[log]\nformat = \"xml\"\n", "log.format", "unknown variant"),
        ] {
            std::fs::write(&bad, text).expect("write");
            let out = check(daemon, &bad);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{daemon} {text}: {stderr}");
            assert!(stderr.contains(&bad.display().to_string()), "{stderr}");
            assert!(stderr.contains(&format!("`{key}`")), "{stderr}");
            assert!(stderr.contains(reason), "{stderr}");
        }
        let out = check(daemon, &dir.path().join("missing.toml"));
        assert_eq!(out.status.code(), Some(1));
    }

    // A daemon refuses to start on a bad file, and creates nothing.
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "api_listen = \"everywhere\"\n").expect("write");
    let state = dir.path().join("state");
    let out = Command::new(binary("gantry-coordinator"))
        .args(["serve", "--config"])
        .arg(&bad)
        .arg("--state-dir")
        .arg(&state)
        .output()
        .expect("serve");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("`api_listen`"), "{stderr}");
    assert!(!state.exists(), "nothing is created on a bad configuration");
}

#[test]
fn a_joined_agent_serves_with_no_flags_and_an_upgrade_keeps_its_container() {
    let mut c = TestCluster::start(ClusterSpec {
        agents: 1,
        busybox: true,
        ..ClusterSpec::default()
    });
    // `join` recorded the coordinator in the agent's configuration file.
    let config = c.agents[0].state.join("agent.toml");
    let text = std::fs::read_to_string(&config).expect("agent.toml written by join");
    assert!(
        text.contains(&format!("coordinator = \"{}\"", c.control)),
        "{text}"
    );
    let job = c.submit(json!({
        "name": "long", "image": "busybox", "command": ["sleep", "1000"],
        "resources": {"cpu": "0.5", "memory": "64M"}
    }));
    let id = job["id"].as_str().expect("id").to_owned();
    wait_until("the container running", Duration::from_secs(30), || {
        c.job(&id)["attempts"][0]["started_at_ms"]
            .is_u64()
            .then_some(())
    });
    let host = c.agents[0].host.clone();
    assert_eq!(processes(&host, &["sleep", "1000"]), 1);

    // The upgrade: SIGTERM the agent (its container keeps running), put a new binary in
    // place, start it with no flags but the test machine's capacity.
    let status = c.stop_agent(0);
    assert!(
        status.success(),
        "the agent exits cleanly on SIGTERM: {status}"
    );
    assert_eq!(
        processes(&host, &["sleep", "1000"]),
        1,
        "the container outlives its agent"
    );
    let upgraded = c.dir.path().join("gantry-agent-upgraded");
    std::fs::copy(binary("gantry-agent"), &upgraded).expect("new binary");
    let mut cmd = c.agent_command_with(0, &upgraded);
    cmd.arg("serve");
    c.serve_flags(&mut cmd);
    let mut p = Proc::spawn(cmd);
    p.line_after("agent serving");
    c.agents[0].proc = Some(p);
    c.wait_state(&c.agents[0].node.clone(), "ready", Duration::from_secs(20));

    // Re-adopted: the same attempt runs on (no new generation), and the new agent can
    // stop it.
    std::thread::sleep(Duration::from_secs(2));
    let j = c.job(&id);
    assert_eq!(j["state"], "running", "{j}");
    assert_eq!(j["attempts"].as_array().map(Vec::len), Some(1), "{j}");
    assert_eq!(processes(&host, &["sleep", "1000"]), 1);
    let cancelled = c
        .http()
        .post(format!("http://{}/v1/jobs/{id}/cancel", c.api))
        .bearer_auth(&c.admin)
        .send()
        .expect("cancel");
    assert!(cancelled.status().is_success());
    wait_until("the container stopped", Duration::from_secs(30), || {
        (processes(&host, &["sleep", "1000"]) == 0).then_some(())
    });
}

#[test]
fn the_admin_token_rotates_without_a_restart() {
    let c = TestCluster::start(ClusterSpec {
        agents: 0,
        ..ClusterSpec::default()
    });
    let post = |token: &str, path: &str, body: serde_json::Value| {
        let r = c
            .http()
            .post(format!("http://{}{path}", c.api))
            .bearer_auth(token)
            .json(&body)
            .send()
            .expect("request");
        let status = r.status().as_u16();
        (status, r.json::<serde_json::Value>().unwrap_or_default())
    };
    let out = c.gantry(&[
        "tokens",
        "create",
        "--role",
        "admin",
        "--name",
        "admin-2026-11",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let next = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    // The old token cannot revoke itself; the new one revokes it.
    let (status, body) = post(&c.admin, "/v1/tokens/revoke", json!({"name": "admin"}));
    assert_eq!(status, 400, "{body}");
    assert!(body.to_string().contains("another admin token"), "{body}");
    let out = Command::new(binary("gantry"))
        .env("GANTRY_ADDR", &c.api)
        .env("GANTRY_TOKEN", &next)
        .args(["tokens", "revoke", "admin"])
        .output()
        .expect("gantry tokens revoke");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("revoked 1 token"));
    let (status, _) = post(&c.admin, "/v1/join-tokens", json!({"ttl": "10m"}));
    assert_eq!(status, 401, "the old admin token no longer works");
    let (status, body) = post(&next, "/v1/tokens/revoke", json!({"name": "nobody"}));
    assert_eq!(status, 404, "{body}");
    let (status, _) = post(&next, "/v1/join-tokens", json!({"ttl": "10m"}));
    assert_eq!(status, 201, "the new one does");
    // The OpenAPI document describes every route, these included.
    let doc: serde_json::Value = c
        .http()
        .get(format!("http://{}/v1/openapi.json", c.api))
        .send()
        .expect("openapi")
        .json()
        .expect("json");
    for path in [
        "/v1/jobs",
        "/v1/jobs/{id}",
        "/v1/jobs/{id}/cancel",
        "/v1/jobs/{id}/logs",
        "/v1/join-tokens",
        "/v1/tokens",
        "/v1/tokens/revoke",
        "/v1/nodes",
        "/v1/nodes/{id}",
        "/v1/nodes/{id}/drain",
        "/v1/nodes/{id}/undrain",
        "/v1/nodes/{id}/preempt",
        "/v1/nodes/{id}/gpus/{index}/clear",
    ] {
        assert!(
            doc["paths"].get(path).is_some(),
            "{path} missing from the OpenAPI document"
        );
    }
}

#[test]
fn sighup_reloads_the_log_level_and_logs_are_json_off_a_terminal() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("coordinator.toml");
    std::fs::write(
        &config,
        "api_listen = \"127.0.0.1:0\"\ncontrol_listen = \"127.0.0.1:0\"\n[gossip]\nlisten = \"127.0.0.1:0\"\n[log]\nlevel = \"info\"\n",
    )
    .expect("config");
    let mut cmd = Command::new(binary("gantry-coordinator"));
    cmd.args(["serve", "--config"])
        .arg(&config)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .env_remove("GANTRY_LOG")
        .stderr(std::process::Stdio::piped());
    let mut p = Proc::spawn(cmd);
    p.line_after("control listening on");
    let stderr = p.child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let next_json = |what: &str| -> serde_json::Value {
        loop {
            let line = rx
                .recv_timeout(Duration::from_secs(10))
                .unwrap_or_else(|_| panic!("no log line with {what}"));
            let v: serde_json::Value = serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
            if line.contains(what) {
                return v;
            }
        }
    };
    let serving = next_json("coordinator serving");
    assert_eq!(serving["level"], "INFO", "{serving}");
    // A bad file changes nothing and says why; a good one applies its level.
    std::fs::write(&config, "[log]\nlevel = \"=[\"\n").expect("bad config");
    let pid = nix::unistd::Pid::from_raw(p.child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).expect("SIGHUP");
    let refused = next_json("configuration not reloaded");
    assert!(
        refused["error"].to_string().contains("log.level"),
        "{refused}"
    );
    std::fs::write(&config, "[log]\nlevel = \"debug\"\n").expect("config");
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).expect("SIGHUP");
    let reloaded = next_json("log level reloaded");
    assert_eq!(reloaded["level"], "WARN", "{reloaded}");
    assert_eq!(reloaded["filter"], "debug", "{reloaded}");
    // SIGTERM: it shuts down and exits cleanly.
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    let status = p.child.wait().expect("exit");
    assert!(status.success(), "{status}");
}

#[test]
fn a_long_poll_on_a_job_answers_when_it_changes() {
    let c = TestCluster::start(ClusterSpec {
        agents: 0,
        ..ClusterSpec::default()
    });
    // No nodes: the job waits, pending.
    let job = c.submit(json!({
        "name": "waits", "image": "busybox", "command": ["true"],
        "resources": {"cpu": "0.1", "memory": "16M"}
    }));
    let id = job["id"].as_str().expect("id").to_owned();
    let get = |query: &str| {
        c.http()
            .get(format!("http://{}/v1/jobs/{id}?{query}", c.api))
            .bearer_auth(&c.admin)
            .timeout(Duration::from_secs(60))
            .send()
            .expect("get")
    };
    // Once the scheduler has said why it waits, nothing changes it until the cancel.
    let settled = wait_until("the waiting reason", Duration::from_secs(10), || {
        let j = c.job(&id);
        j["reason"].is_string().then_some(j)
    });
    let since = settled["updated_at_ms"].as_u64().expect("version");
    // Nothing changes: the poll ends at its wait with the job as it was.
    let same: serde_json::Value = get(&format!("changed_since={since}&wait=200ms"))
        .json()
        .expect("json");
    assert_eq!(same["updated_at_ms"], since, "{same}");
    // A change (a cancel) answers a waiting poll with the changed job.
    let poll = std::thread::scope(|s| {
        let waiting = s.spawn(|| {
            get(&format!("changed_since={since}&wait=30s"))
                .json::<serde_json::Value>()
                .expect("json")
        });
        std::thread::sleep(Duration::from_millis(300));
        let cancelled = c
            .http()
            .post(format!("http://{}/v1/jobs/{id}/cancel", c.api))
            .bearer_auth(&c.admin)
            .send()
            .expect("cancel");
        assert!(cancelled.status().is_success());
        waiting.join().expect("poll")
    });
    assert_eq!(poll["state"], "cancelled", "{poll}");
    assert!(poll["updated_at_ms"].as_u64() > Some(since), "{poll}");
    // A bad wait names the parameter.
    let bad = get(&format!("changed_since={since}&wait=forever"));
    assert_eq!(bad.status().as_u16(), 400);
    assert!(bad.text().unwrap_or_default().contains("wait"));
}

#[test]
fn a_restarting_agent_keeps_its_work_while_it_is_away() {
    let mut c = TestCluster::start(ClusterSpec {
        agents: 2,
        busybox: true,
        ..ClusterSpec::default()
    });
    let job = c.submit(json!({
        "name": "long", "image": "busybox", "command": ["sleep", "1000"],
        "resources": {"cpu": "0.5", "memory": "64M"}
    }));
    let id = job["id"].as_str().expect("id").to_owned();
    let j = wait_until("the container running", Duration::from_secs(30), || {
        let j = c.job(&id);
        j["attempts"][0]["started_at_ms"].is_u64().then_some(j)
    });
    let node = j["attempts"][0]["node"].as_str().expect("node").to_owned();
    let i = c
        .agents
        .iter()
        .position(|a| a.node == node)
        .expect("its agent");
    // A clean stop (SIGTERM) tells the coordinator it restarts (15 s by default) ...
    assert!(c.stop_agent(i).success());
    // ... so well past the ~2 s in which a silent node is declared down, it is suspect,
    // says why, and its job has not moved.
    std::thread::sleep(Duration::from_secs(5));
    let nodes = c.nodes();
    let status = gantry_tests::cluster::node_of(&nodes, &node).expect("node");
    assert_eq!(status["state"], "suspect", "{status}");
    assert!(
        status["reason"]
            .as_str()
            .unwrap_or("")
            .contains("restarting"),
        "{status}"
    );
    let j = c.job(&id);
    assert_eq!(j["attempts"].as_array().map(Vec::len), Some(1), "{j}");
    assert_eq!(j["state"], "running", "{j}");
    // Back: ready, the same attempt running.
    c.start_agent(i);
    c.wait_state(&node, "ready", Duration::from_secs(20));
    let j = c.job(&id);
    assert_eq!(j["attempts"].as_array().map(Vec::len), Some(1), "{j}");
    assert!(j["attempts"][0]["reason"].is_null(), "{j}");
}
