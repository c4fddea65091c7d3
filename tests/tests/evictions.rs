//! Taking work off nodes on test hosts: a spot preemption notice and a drain move running
//! jobs to other capacity as a new generation, without counting against retries, and the
//! node stops the old containers (SIGTERM, then SIGKILL at the grace).

use std::time::Duration;

use gantry_tests::cluster::{ClusterSpec, TestCluster, node_of, state_of};
use gantry_tests::netns::{Host, wait_until};
use serde_json::{Value, json};

fn sleepers(host: &Host) -> usize {
    gantry_tests::cluster::processes(host, &["sleep", "1000"])
}

fn cluster() -> TestCluster {
    TestCluster::start(ClusterSpec {
        agents: 2,
        simulate_gpus: Some("1xH100-80GB".into()),
        busybox: true,
        ..ClusterSpec::default()
    })
}

/// A long job holding the node's GPU; returns its id and the index of its node.
fn long_job(c: &TestCluster) -> (String, usize) {
    let job = c.submit(json!({
        "name": "long", "image": "busybox",
        "command": ["sh", "-c", "trap 'exit 0' TERM; sleep 1000 & wait"],
        "resources": {"cpu": "0.5", "memory": "64M", "gpus": 1}
    }));
    let id = job["id"].as_str().expect("id").to_owned();
    let running = c.wait_job(&id, &["running"], Duration::from_secs(30));
    let node = running["attempts"]
        .as_array()
        .and_then(|a| a.last())
        .map(|a| a["node"].clone())
        .unwrap_or_default();
    let i = c
        .agents
        .iter()
        .position(|a| node == a.node.as_str())
        .expect("its host");
    wait_until("the container running", Duration::from_secs(20), || {
        (sleepers(&c.agents[i].host) == 1).then_some(())
    });
    (id, i)
}

/// Waits for generation `g` of `id` to run; returns the job.
fn wait_generation(c: &TestCluster, id: &str, g: u64) -> Value {
    let mut last = Value::Null;
    let found = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_until(
            &format!("generation {g} of {id} running"),
            Duration::from_secs(60),
            || {
                let j = c.job(id);
                last = j.clone();
                let started = j["attempts"].as_array().into_iter().flatten().any(|m| {
                    m["generation"] == g && !m["started_at_ms"].is_null() && m["reason"].is_null()
                });
                (j["state"] == "running" && started).then_some(j)
            },
        )
    }));
    found.unwrap_or_else(|_| panic!("generation {g} of {id} never ran: {last}"))
}

#[test]
fn a_preemption_notice_moves_the_work_and_stops_the_old_container() {
    let c = cluster();
    let (id, i) = long_job(&c);
    let node = c.agents[i].node.clone();
    let out = c.gantry(&["nodes", "preempt", &node, "--deadline", "20s"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("preempting"), "{text}");
    assert!(text.contains("deadline:   in"), "{text}");
    let j = wait_generation(&c, &id, 2);
    assert_eq!(j["failures"], 0, "preemption is not the job's fault: {j}");
    assert!(
        j["attempts"][0]["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("preempted: node")),
        "{j}"
    );
    assert_ne!(j["attempts"][1]["node"], node.as_str(), "{j}");
    // The preempted node got SIGTERM (the job traps it and exits at once).
    wait_until("the old container to stop", Duration::from_secs(20), || {
        (sleepers(&c.agents[i].host) == 0).then_some(())
    });
    // Nothing new goes to a preempting node.
    let nodes = c.nodes();
    assert_eq!(state_of(&nodes, &node), Some("preempting"));
    assert_eq!(node_of(&nodes, &node).expect("node")["jobs"], json!([]));
}

#[test]
fn the_next_generation_waits_for_a_preempted_container_to_stop() {
    let c = cluster();
    // Takes two seconds to checkpoint after SIGTERM.
    let job = c.submit(json!({
        "name": "checkpointing", "image": "busybox",
        "command": ["sh", "-c", "trap 'sleep 2; exit 0' TERM; sleep 1000 & wait"],
        "resources": {"cpu": "0.5", "memory": "64M", "gpus": 1}
    }));
    let id = job["id"].as_str().expect("id").to_owned();
    let running = wait_until("the container started", Duration::from_secs(30), || {
        let j = c.job(&id);
        j["attempts"][0]["started_at_ms"].is_u64().then_some(j)
    });
    let node = running["attempts"][0]["node"]
        .as_str()
        .expect("node")
        .to_owned();
    let out = c.gantry(&["nodes", "preempt", &node, "--deadline", "30s"]);
    assert!(out.status.success());
    // While the old container checkpoints, the job waits and says why.
    let waiting = wait_until(
        "the job to wait for its old attempt",
        Duration::from_secs(10),
        || {
            let j = c.job(&id);
            j["reason"]
                .as_str()
                .is_some_and(|r| r.contains("waiting for attempt 1 to stop on"))
                .then_some(j)
        },
    );
    assert_eq!(waiting["state"], "pending", "{waiting}");
    let j = wait_generation(&c, &id, 2);
    let old = &j["attempts"][0];
    let new = &j["attempts"][1];
    assert_eq!(
        old["exit_code"], 0,
        "the old container's own exit is kept: {j}"
    );
    let (ended, started) = (
        old["ended_at_ms"].as_u64().expect("old end"),
        new["started_at_ms"].as_u64().expect("new start"),
    );
    assert!(
        started >= ended,
        "generation 2 started before 1 stopped: {j}"
    );
    assert_eq!(j["failures"], 0, "{j}");
}

#[test]
fn a_drain_lets_work_finish_and_its_deadline_moves_what_is_left() {
    let c = cluster();
    let (id, i) = long_job(&c);
    let node = c.agents[i].node.clone();
    let other = &c.agents[1 - i].node;
    // Without a deadline: the job keeps running; new work goes elsewhere.
    let out = c.gantry(&["nodes", "drain", &node]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(state_of(&c.nodes(), &node), Some("draining"));
    let cpu = c.submit(json!({
        "name": "elsewhere", "image": "busybox", "command": ["true"],
        "resources": {"cpu": "0.5", "memory": "64M"}
    }));
    let done = c.wait_job(
        cpu["id"].as_str().expect("id"),
        &["succeeded", "failed"],
        Duration::from_secs(30),
    );
    assert_eq!(done["attempts"][0]["node"], other.as_str(), "{done}");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(c.job(&id)["state"], "running");
    assert_eq!(sleepers(&c.agents[i].host), 1, "drained work runs on");
    // Undrain, then drain again with a deadline: at the deadline the job moves.
    let out = c.gantry(&["nodes", "undrain", &node]);
    assert!(out.status.success());
    assert_eq!(state_of(&c.nodes(), &node), Some("ready"));
    let out = c.gantry(&["nodes", "drain", &node, "--deadline", "2s"]);
    assert!(out.status.success());
    let j = wait_generation(&c, &id, 2);
    assert_eq!(j["failures"], 0, "{j}");
    assert!(
        j["attempts"][0]["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("drained: node")),
        "{j}"
    );
    wait_until(
        "the drained container to stop",
        Duration::from_secs(20),
        || (sleepers(&c.agents[i].host) == 0).then_some(()),
    );
    // Bad input names what is wrong.
    let bad = c.gantry(&["nodes", "drain", &node, "--deadline", "soon"]);
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("deadline"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
    let missing = c.gantry(&["nodes", "drain", "no-such-node"]);
    assert!(!missing.status.success());
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("not joined"),
        "{}",
        String::from_utf8_lossy(&missing.stderr)
    );
}

#[test]
fn a_fault_on_an_assigned_gpu_stops_the_attempt_and_re_places_the_job() {
    let c = TestCluster::start(ClusterSpec {
        agents: 1,
        simulate_gpus: Some("2xH100-80GB".into()),
        busybox: true,
        ..ClusterSpec::default()
    });
    let (id, i) = long_job(&c);
    let gpu = c.job(&id)["attempts"][0]["gpus"][0]
        .as_u64()
        .expect("assigned GPU")
        .to_string();
    c.inject_xid(i, &gpu, "79");
    // The attempt ends as the GPU's fault, the job runs again on the other GPU, and no
    // retry was used.
    let j = wait_generation(&c, &id, 2);
    assert_eq!(j["attempts"][0]["reason"], "gpu_xid_79", "{j}");
    assert_eq!(j["failures"], 0, "{j}");
    assert_ne!(j["attempts"][1]["gpus"][0].to_string(), gpu, "{j}");
    // Gossip says so too (placement did not wait for it).
    let index: usize = gpu.parse().expect("index");
    c.wait_nodes(
        "the GPU unhealthy in the view",
        Duration::from_secs(20),
        |ns| ns[0]["gpus"][index]["health"]["reason"] == "xid_79",
    );
    // It stays unhealthy across an agent restart, until an operator clears it.
    let mut c = c;
    c.kill_agent(i);
    c.start_agent(i);
    std::thread::sleep(Duration::from_secs(3));
    c.wait_state("node-0", "ready", Duration::from_secs(30));
    assert_eq!(
        c.nodes()[0]["gpus"][index]["health"]["reason"],
        "xid_79",
        "still unhealthy after the restart"
    );
    let out = c.gantry(&["nodes", "gpu-clear", "node-0", "--gpu", &gpu]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    c.wait_nodes("the GPU healthy again", Duration::from_secs(20), |ns| {
        ns[0]["gpus"][index]["health"]["status"] == "healthy"
    });
    let missing = c.gantry(&["nodes", "gpu-clear", "node-0", "--gpu", "7"]);
    assert!(!missing.status.success());
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("no GPU 7"),
        "{}",
        String::from_utf8_lossy(&missing.stderr)
    );
}

/// A cloud metadata endpoint on the bridge: 404 until `notice` is set, then AWS's
/// spot `instance-action` answer with a deadline 30 s away.
fn metadata_server(
    ip: std::net::Ipv4Addr,
    notice: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> String {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind((ip, 0)).expect("bind");
    let addr = listener.local_addr().expect("addr");
    listener.set_nonblocking(true).expect("nonblocking");
    std::thread::spawn(move || {
        // Bounded: the test is over long before this.
        let end = std::time::Instant::now() + Duration::from_secs(120);
        while std::time::Instant::now() < end {
            let Ok((mut s, _)) = listener.accept() else {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            };
            let _ = s.set_nonblocking(false);
            let mut buf = [0u8; 2048];
            let _ = s.read(&mut buf);
            let answer = if notice.load(std::sync::atomic::Ordering::SeqCst) {
                let secs = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0)
                    + 30;
                let body = format!(r#"{{"action":"terminate","time":"{}"}}"#, rfc3339(secs));
                format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                )
            } else {
                "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n".to_owned()
            };
            let _ = s.write_all(answer.as_bytes());
        }
    });
    format!("http://{addr}/latest/meta-data/spot/instance-action")
}

/// Unix seconds as `YYYY-MM-DDTHH:MM:SSZ` (civil-from-days).
fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[test]
fn the_agents_spot_watcher_preempts_its_node() {
    let mut c = cluster();
    let notice = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let url = metadata_server(c.net.bridge_ip(), notice.clone());
    c.agents[0].serve_args = vec![
        "--spot-notice-url".into(),
        url,
        "--spot-notice-interval".into(),
        "200ms".into(),
    ];
    c.kill_agent(0);
    c.start_agent(0);
    // Let the old run's session and gossip member die out (they look alive for ~1.5 s),
    // so the job goes to the new run.
    std::thread::sleep(Duration::from_secs(3));
    c.wait_state("node-0", "ready", Duration::from_secs(30));
    let (id, i) = long_job(&c);
    assert_eq!(i, 0, "ties go to the lower node id");
    notice.store(true, std::sync::atomic::Ordering::SeqCst);
    c.wait_state("node-0", "preempting", Duration::from_secs(20));
    let j = wait_generation(&c, &id, 2);
    assert_eq!(j["failures"], 0, "{j}");
    assert_eq!(j["attempts"][1]["node"], "node-1", "{j}");
    let node = gantry_tests::cluster::node_of(&c.nodes(), "node-0")
        .cloned()
        .expect("node");
    assert!(node["deadline_ms"].as_u64().is_some(), "{node}");
    wait_until("the old container to stop", Duration::from_secs(20), || {
        (sleepers(&c.agents[0].host) == 0).then_some(())
    });
}
