//! Cluster membership on test hosts (network namespaces on a bridge): agents gossip their
//! capacity, GPUs and liveness, the coordinator's view follows faults, GPU health events
//! reach it, two agents cannot be one node, and strangers without the cluster's gossip key
//! change nothing.

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

/// Strangers on the cluster network, from the test process on the bridge: a gossip member
/// with a key of its own and plain chitchat in the clear (the cluster's id, claiming a
/// node with 8 GPUs), both contacting the coordinator's and every agent's gossip port.
/// Nobody answers them, the view keeps exactly the two nodes as they were, and the
/// coordinator counts the datagrams it dropped in `/metrics`.
#[test]
fn strangers_without_the_gossip_key_change_nothing() {
    use gantry_membership::{GossipKey, Member, MembershipConfig};
    use gantry_shared::gossip::{AgentGossip, GpuInfo, NodeResources};

    let c = TestCluster::start(ClusterSpec {
        agents: 2,
        simulate_gpus: Some("2xA100-40GB".into()),
        ..ClusterSpec::default()
    });
    let before = c.nodes();
    let cluster = std::fs::read_to_string(c.dir.path().join("coordinator/ca/cluster-id"))
        .expect("cluster id")
        .trim()
        .to_owned();
    let seeds: Vec<String> = std::iter::once(c.gossip.clone())
        .chain(c.agents.iter().map(|a| format!("{}:7946", a.host.ip())))
        .collect();
    let bridge = std::net::IpAddr::from(c.net.bridge_ip());
    let claim = |node: &str| {
        AgentGossip {
            addr: bridge,
            labels: Default::default(),
            resources: NodeResources {
                cpu_millis: 512_000,
                free_cpu_millis: 512_000,
                memory_bytes: 4 << 40,
                free_memory_bytes: 4 << 40,
            },
            free_gpus: (0..8).collect(),
            gpus: (0..8)
                .map(|i| GpuInfo::simulated(node, i, "H100-80GB", 80 << 30))
                .collect(),
            images: Default::default(),
        }
        .to_key_values()
    };
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let (keyed_knows, clear_knows) = runtime.block_on(async {
        let keyed = Member::start(
            "node-8",
            1,
            &cluster,
            &GossipKey::from_bytes([9; 32]),
            &MembershipConfig {
                listen: std::net::SocketAddr::new(bridge, 0),
                seeds: seeds.clone(),
                gossip_interval: Duration::from_millis(100),
                ..MembershipConfig::default()
            },
            claim("node-8"),
        )
        .await
        .expect("keyed stranger");
        let listen = std::net::UdpSocket::bind((bridge, 0))
            .and_then(|s| s.local_addr())
            .expect("a free port");
        let clear = chitchat::spawn_chitchat(
            chitchat::ChitchatConfig {
                chitchat_id: chitchat::ChitchatId::new("node-9".to_owned(), 1, listen),
                cluster_id: cluster.clone(),
                gossip_interval: Duration::from_millis(100),
                listen_addr: listen,
                seed_nodes: seeds,
                failure_detector_config: chitchat::FailureDetectorConfig::default(),
                marked_for_deletion_grace_period: Duration::from_secs(3_600),
                catchup_callback: None,
                extra_liveness_predicate: None,
                protocol_version: chitchat::ProtocolVersion::V1,
            },
            claim("node-9"),
            &chitchat::transport::UdpTransport,
        )
        .await
        .expect("stranger in the clear");
        tokio::time::sleep(Duration::from_secs(3)).await;
        let known = (
            keyed.members().await.len(),
            clear.with_chitchat(|c| c.node_states().len()).await,
        );
        keyed.shutdown().await;
        let _ = clear.shutdown().await;
        known
    });
    assert_eq!(
        (keyed_knows, clear_knows),
        (1, 1),
        "a stranger learned of members"
    );
    let after = c.nodes();
    assert_eq!(after.len(), 2, "{after:?}");
    for name in ["node-0", "node-1"] {
        let (was, is) = (
            node_of(&before, name).expect("before"),
            node_of(&after, name).expect("after"),
        );
        assert_eq!(is["state"], "ready", "{is}");
        for field in ["address", "cpu_millis", "free_cpu_millis", "gpus"] {
            assert_eq!(is[field], was[field], "{name} {field}");
        }
    }
    let metrics = c
        .http()
        .get(format!("http://{}/metrics", c.api))
        .send()
        .and_then(|r| r.text())
        .expect("metrics");
    let dropped: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix(r#"gantry_gossip_datagrams_dropped_total{reason="bad_mac"} "#))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no bad_mac count in {metrics}"));
    assert!(dropped >= 10, "{dropped} datagrams dropped: {metrics}");
}

/// A node that joined before gossip was authenticated has no gossip key with its identity:
/// its agent learns the key from its first hello, stores it, gossips with it, and the node
/// is ready as before.
#[test]
fn a_node_joined_without_a_gossip_key_learns_it_at_hello() {
    let mut c = TestCluster::start(ClusterSpec::default());
    c.kill_agent(0);
    let file = c.agents[0].state.join("identity/identity.json");
    let mut identity: Value =
        serde_json::from_slice(&std::fs::read(&file).expect("identity")).expect("json");
    let key = identity["gossip_key"].clone();
    assert!(key.is_string(), "the join stored the key: {identity}");
    identity
        .as_object_mut()
        .expect("object")
        .remove("gossip_key");
    std::fs::write(&file, identity.to_string()).expect("write");
    c.start_agent(0);
    let stored = gantry_tests::netns::wait_until(
        "the agent to store the key",
        Duration::from_secs(30),
        || {
            let v: Value =
                serde_json::from_slice(&std::fs::read(&file).expect("identity")).expect("json");
            v.get("gossip_key").cloned()
        },
    );
    assert_eq!(stored, key);
    // Ready again: its new run gossips (a node whose gossip is dropped stays suspect).
    std::thread::sleep(Duration::from_secs(2));
    c.wait_state("node-0", "ready", Duration::from_secs(30));
}
