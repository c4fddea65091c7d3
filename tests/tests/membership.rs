//! Cluster membership on test hosts (network namespaces on a bridge): agents gossip their
//! capacity, GPUs and liveness, the coordinator's view follows faults, GPU health events
//! reach it, and two agents cannot be one node.

use std::time::Duration;

use gantry_tests::cluster::{ClusterSpec, TestCluster, node_of, state_of};
use serde_json::{Value, json};

/// Documented detection: gossip declares a dead member after ~phi × 200 ms, the control
/// session counts as silent after 1.5 s; allow generous slack for a loaded CI machine.
const DETECTION: Duration = Duration::from_secs(15);

fn gpus(node: &Value) -> Vec<Value> {
    node["gpus"].as_array().cloned().unwrap_or_default()
}

#[test]
fn five_hosts_converge_and_the_coordinator_sees_all_capacity() {
    let mut spec = ClusterSpec {
        agents: 5,
        simulate_gpus: Some("8xH100-80GB,nvlink=4,numa=2".into()),
        ..ClusterSpec::default()
    };
    spec.cpus = "3".into();
    let mut c = TestCluster::start(spec);
    // Labels are published too: restart one agent with labels.
    c.agents[4].serve_args = ["--label", "spot=true", "--label", "rack=r7"]
        .map(String::from)
        .to_vec();
    c.kill_agent(4);
    c.start_agent(4);
    let nodes = c.wait_nodes(
        "five ready nodes with labels",
        Duration::from_secs(30),
        |ns| {
            ns.len() == 5
                && ns.iter().all(|n| n["state"] == "ready")
                && node_of(ns, "node-4").is_some_and(|n| n["labels"]["rack"] == "r7")
        },
    );
    for (i, a) in c.agents.iter().enumerate() {
        let n = node_of(&nodes, &a.node).expect("listed");
        assert_eq!(n["address"], a.host.ip().to_string(), "{n}");
        assert_eq!(n["cpu_millis"], 3000);
        assert_eq!(n["free_cpu_millis"], 3000);
        assert_eq!(n["memory_bytes"], 4u64 << 30);
        assert_eq!(n["connected"], true);
        let g = gpus(n);
        assert_eq!(g.len(), 8, "{n}");
        for (j, gpu) in g.iter().enumerate() {
            assert_eq!(gpu["simulated"], true);
            assert_eq!(gpu["model"], "H100-80GB");
            assert_eq!(gpu["memory_bytes"], 80u64 << 30);
            assert_eq!(gpu["nvlink_group"], j / 4);
            assert_eq!(gpu["numa_node"], j / 4);
            assert_eq!(gpu["health"]["status"], "healthy");
            assert_eq!(gpu["uuid"], format!("GPU-SIM-node-{i}-{j}"));
        }
    }
    assert_eq!(
        node_of(&nodes, "node-4").expect("node")["labels"]["spot"],
        "true"
    );
    // The CLI says `simulated` wherever the GPUs appear.
    let list = c.gantry(&["nodes", "list"]);
    let text = String::from_utf8_lossy(&list.stdout);
    assert!(list.status.success(), "{text}");
    assert_eq!(
        text.matches("8/8 H100-80GB (simulated)").count(),
        5,
        "{text}"
    );
    let show = c.gantry(&["nodes", "show", "node-0"]);
    let text = String::from_utf8_lossy(&show.stdout);
    assert_eq!(text.matches("simulated").count(), 8, "{text}");
}

#[test]
fn a_capacity_change_reaches_the_coordinator_and_containers_see_their_gpus() {
    let c = TestCluster::start(ClusterSpec {
        agents: 1,
        simulate_gpus: Some("4xA100-40GB".into()),
        busybox: true,
        ..ClusterSpec::default()
    });
    let sleeper = c.submit(json!({
        "name": "hold", "image": "busybox",
        "command": ["sh", "-c", "trap 'exit 0' TERM; sleep 60 & wait"],
        "resources": {"cpu": "1.5", "memory": "256M", "gpus": 1}
    }));
    let id = sleeper["id"].as_str().expect("id").to_owned();
    let nodes = c.wait_nodes(
        "the node's free capacity to drop",
        Duration::from_secs(20),
        |ns| node_of(ns, "node-0").is_some_and(|n| n["free_cpu_millis"] == 2500),
    );
    let n = node_of(&nodes, "node-0").expect("node");
    assert_eq!(n["free_memory_bytes"], (4u64 << 30) - (256 << 20), "{n}");
    assert_eq!(n["reserved_gpus"], json!([0]), "{n}");
    // A second job gets the next GPU; inside, CUDA numbers from 0 and the host index is
    // in NVIDIA_VISIBLE_DEVICES; no device node is injected for a simulated GPU.
    let env = c.submit(json!({
        "name": "env", "image": "busybox",
        "command": ["sh", "-c", "echo CVD=$CUDA_VISIBLE_DEVICES NVD=$NVIDIA_VISIBLE_DEVICES SIM=$GANTRY_SIMULATED_GPUS; ls /dev | grep -c nvidia || true"],
        "resources": {"cpu": "0.5", "memory": "64M", "gpus": 1}
    }));
    let env_id = env["id"].as_str().expect("id");
    let done = c.wait_job(env_id, &["succeeded", "failed"], Duration::from_secs(30));
    assert_eq!(done["state"], "succeeded", "{done}");
    let out = c.logs(env_id);
    assert!(out.contains("CVD=0 NVD=1 SIM=1"), "{out}");
    assert!(
        out.lines().any(|l| l.trim() == "0"),
        "no /dev/nvidia*: {out}"
    );
    // Cancelling the first job frees its capacity, and the node says so.
    let r = c
        .http()
        .post(format!("http://{}/v1/jobs/{id}/cancel", c.api))
        .bearer_auth(&c.admin)
        .send()
        .expect("cancel");
    assert!(r.status().is_success());
    c.wait_nodes("the capacity to come back", Duration::from_secs(30), |ns| {
        node_of(ns, "node-0").is_some_and(|n| n["free_cpu_millis"] == 4000)
    });
}

#[test]
fn faults_move_nodes_down_and_back_up() {
    let mut c = TestCluster::start(ClusterSpec {
        agents: 3,
        ..ClusterSpec::default()
    });
    // kill -9 of a whole host.
    c.kill_host(0);
    let took = c.wait_state("node-0", "down", DETECTION);
    eprintln!("host kill -9 detected as down in {took:?}");
    let nodes = c.nodes();
    let n = node_of(&nodes, "node-0").expect("node");
    assert!(n["reason"].as_str().is_some_and(|r| !r.is_empty()), "{n}");
    // The QUIC session itself ends at its idle timeout (5 s).
    c.wait_nodes("node-0's session to close", DETECTION, |ns| {
        node_of(ns, "node-0").is_some_and(|n| n["connected"] == false)
    });
    assert_eq!(state_of(&nodes, "node-1"), Some("ready"));
    // The agent comes back (same identity, a new run): ready again.
    c.start_agent(0);
    c.wait_state("node-0", "ready", Duration::from_secs(30));

    // A partition: both signals stop; healed, it reconnects and gossips again.
    c.agents[1].host.partition();
    let took = c.wait_state("node-1", "down", DETECTION);
    eprintln!("partition detected as down in {took:?}");
    c.agents[1].host.heal();
    c.wait_state("node-1", "ready", Duration::from_secs(30));

    // A paused host (SIGSTOP) stops answering; resumed, it carries on.
    c.agents[2].host.pause();
    c.wait_nodes("node-2 not ready while paused", DETECTION, |ns| {
        matches!(state_of(ns, "node-2"), Some("suspect" | "down"))
    });
    c.agents[2].host.resume();
    c.wait_state("node-2", "ready", Duration::from_secs(30));

    // kill -9 of only the agent: it is gone from the cluster's view until restarted.
    c.kill_agent(2);
    c.wait_state("node-2", "down", DETECTION);
    c.start_agent(2);
    c.wait_state("node-2", "ready", Duration::from_secs(30));
}

#[test]
fn an_injected_xid_marks_that_gpu_unhealthy_and_it_is_never_placed() {
    let c = TestCluster::start(ClusterSpec {
        agents: 1,
        simulate_gpus: Some("4xH100-80GB".into()),
        busybox: true,
        ..ClusterSpec::default()
    });
    let inject = |index: &str, xid: &str| c.inject_xid(0, index, xid);
    inject("1", "13"); // an application Xid: the GPU stays healthy
    inject("2", "79"); // fallen off the bus
    let nodes = c.wait_nodes("GPU 2 unhealthy", Duration::from_secs(20), |ns| {
        node_of(ns, "node-0").is_some_and(|n| n["gpus"][2]["health"]["status"] == "unhealthy")
    });
    let g = gpus(node_of(&nodes, "node-0").expect("node"));
    assert_eq!(g[2]["health"]["reason"], "xid_79");
    for i in [0, 1, 3] {
        assert_eq!(g[i]["health"]["status"], "healthy", "GPU {i}: {}", g[i]);
    }
    // Three GPUs are left to place on, and GPU 2 is not among them.
    let job = c.submit(json!({
        "name": "three", "image": "busybox",
        "command": ["sh", "-c", "echo NVD=$NVIDIA_VISIBLE_DEVICES"],
        "resources": {"cpu": "0.5", "memory": "64M", "gpus": 3}
    }));
    let id = job["id"].as_str().expect("id");
    let done = c.wait_job(id, &["succeeded", "failed"], Duration::from_secs(30));
    assert_eq!(done["state"], "succeeded", "{done}");
    assert!(c.logs(id).contains("NVD=0,1,3"), "{}", c.logs(id));
    let four = c.submit(json!({
        "name": "four", "image": "busybox", "command": ["true"],
        "resources": {"cpu": "0.5", "memory": "64M", "gpus": 4}
    }));
    std::thread::sleep(Duration::from_secs(2));
    let four = c.job(four["id"].as_str().expect("id"));
    assert_eq!(four["state"], "pending", "{four}");
    assert!(
        four["reason"]
            .as_str()
            .is_some_and(|r| r.contains("no node has 4 healthy GPUs")),
        "{four}"
    );
}

#[test]
fn two_agents_claiming_one_node_id_are_refused() {
    let mut c = TestCluster::start(ClusterSpec {
        agents: 2,
        ..ClusterSpec::default()
    });
    // Host 1 gets a copy of node-0's identity and starts a second agent as node-0.
    c.kill_agent(1);
    let twin = c.agents[1].state.join("identity");
    std::fs::remove_dir_all(&twin).expect("remove identity");
    let copy = std::process::Command::new("cp")
        .arg("-a")
        .arg(c.agents[0].state.join("identity"))
        .arg(&twin)
        .status()
        .expect("cp");
    assert!(copy.success());
    let mut child = c
        .serve_command(1)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn twin");
    let status = gantry_tests::netns::wait_until(
        "the twin agent to give up",
        Duration::from_secs(30),
        || child.try_wait().expect("wait"),
    );
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().expect("stderr"), &mut err)
        .expect("read stderr");
    assert!(!status.success(), "{err}");
    assert!(
        err.contains("another agent is connected as node `node-0`"),
        "{err}"
    );
    // The real node-0 is unaffected.
    std::thread::sleep(Duration::from_secs(1));
    let nodes = c.nodes();
    assert_eq!(state_of(&nodes, "node-0"), Some("ready"), "{nodes:?}");
    assert_eq!(node_of(&nodes, "node-0").expect("node")["connected"], true);
}
