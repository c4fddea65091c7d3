//! Multi-node jobs on test hosts with simulated GPUs: every member of a gang gets the rank
//! environment, and it is real (rank 1 reaches rank 0 at MASTER_ADDR:MASTER_PORT); a gang
//! waits, whole, for capacity; `gantry run` of a gang streams every rank's output.

use std::time::Duration;

use gantry_tests::cluster::{ClusterSpec, TestCluster};
use serde_json::json;

fn cluster(agents: usize, gpus: &str) -> TestCluster {
    TestCluster::start(ClusterSpec {
        agents,
        simulate_gpus: Some(gpus.into()),
        busybox: true,
        ..ClusterSpec::default()
    })
}

/// Rank 0 listens on MASTER_PORT and logs what arrives; the others connect to
/// MASTER_ADDR:MASTER_PORT (retrying while rank 0 starts) and send their rank.
const RENDEZVOUS: &str = r#"
if [ "$NODE_RANK" = 0 ]; then
  echo "rank0 listening on $MASTER_ADDR:$MASTER_PORT NNODES=$NNODES WORLD_SIZE=$WORLD_SIZE"
  # The peer's message goes to stderr (our log). Not `nc -l` alone: busybox nc quits when
  # its own stdin (empty here) ends, which can be before the peer's bytes arrive.
  nc -l -p "$MASTER_PORT" -e sh -c 'cat >&2'
else
  for i in $(seq 1 200); do
    echo "hello from NODE_RANK=$NODE_RANK RANK=$RANK of WORLD_SIZE=$WORLD_SIZE ips=$GANTRY_NODE_IPS" \
      | nc "$MASTER_ADDR" "$MASTER_PORT" && exit 0
    sleep 0.1
  done
  exit 1
fi
"#;

#[test]
fn gang_members_find_each_other_through_the_rank_environment() {
    let c = cluster(2, "2xH100-80GB");
    let job = c.submit(json!({
        "name": "rendezvous", "image": "busybox", "nodes": 2,
        "command": ["sh", "-c", RENDEZVOUS],
        "resources": {"cpu": "0.5", "memory": "64M", "gpus": 2, "gpu_types": ["H100"]}
    }));
    let id = job["id"].as_str().expect("id");
    let done = c.wait_job(id, &["succeeded", "failed"], Duration::from_secs(60));
    assert_eq!(done["state"], "succeeded", "{done}");
    let members = done["attempts"].as_array().expect("attempts");
    assert_eq!(members.len(), 2, "{done}");
    let rank0 = members.iter().find(|m| m["rank"] == 0).expect("rank 0");
    let rank1 = members.iter().find(|m| m["rank"] == 1).expect("rank 1");
    assert_ne!(rank0["node"], rank1["node"], "one member per node");
    let addr0 = rank0["address"].as_str().expect("address").to_owned();
    let addr1 = rank1["address"].as_str().expect("address").to_owned();
    assert_eq!(rank0["master_addr"], addr0.as_str());
    let port = rank0["master_port"].as_u64().expect("port");
    assert!((29500..30000).contains(&port), "{port}");
    let logs = |rank: u32| {
        c.http()
            .get(format!("http://{}/v1/jobs/{id}/logs?rank={rank}", c.api))
            .bearer_auth(&c.admin)
            .send()
            .expect("logs")
            .text()
            .expect("text")
    };
    let out0 = logs(0);
    assert!(
        out0.contains(&format!(
            "rank0 listening on {addr0}:{port} NNODES=2 WORLD_SIZE=4"
        )),
        "{out0}"
    );
    assert!(
        out0.contains(&format!(
            "hello from NODE_RANK=1 RANK=2 of WORLD_SIZE=4 ips={addr0},{addr1}"
        )),
        "rank 1 reached rank 0 and said who it is: rank 0 printed {out0:?}, rank 1 {:?}",
        logs(1)
    );
}

#[test]
fn a_gang_waits_whole_for_capacity_and_starts_when_it_frees() {
    let c = cluster(2, "2xA100-40GB");
    // One GPU of node-0 is held for a few seconds.
    let holder = c.submit(json!({
        "name": "holder", "image": "busybox", "command": ["sleep", "4"],
        "resources": {"cpu": "0.5", "memory": "64M", "gpus": 1}
    }));
    let holder = holder["id"].as_str().expect("id").to_owned();
    c.wait_job(&holder, &["running"], Duration::from_secs(20));
    // A gang of 2 nodes × 2 GPUs cannot start until that GPU is free: nothing of it runs
    // meanwhile, and it says why it waits.
    let gang = c.submit(json!({
        "name": "gang", "image": "busybox", "nodes": 2, "command": ["true"],
        "resources": {"cpu": "0.5", "memory": "64M", "gpus": 2}
    }));
    let gang = gang["id"].as_str().expect("id").to_owned();
    std::thread::sleep(Duration::from_millis(1500));
    let waiting = c.job(&gang);
    assert_eq!(waiting["state"], "pending", "{waiting}");
    assert_eq!(waiting["attempts"], json!([]), "all or nothing: {waiting}");
    assert!(
        waiting["reason"]
            .as_str()
            .is_some_and(|r| r.contains("waiting")),
        "{waiting}"
    );
    let done = c.wait_job(&gang, &["succeeded", "failed"], Duration::from_secs(60));
    assert_eq!(done["state"], "succeeded", "{done}");
    let holder = c.job(&holder);
    assert_eq!(holder["state"], "succeeded", "{holder}");
}

#[test]
fn gantry_run_of_a_gang_streams_every_rank_and_fails_if_one_fails() {
    let c = cluster(2, "1xH100-80GB");
    let out = c.gantry(&[
        "run",
        "--image",
        "busybox",
        "--nodes",
        "2",
        "--gpus",
        "1",
        "--gpu-type",
        "H100,A100",
        "--cpu",
        "0.5",
        "--memory",
        "64M",
        "--",
        "sh",
        "-c",
        "echo line one of $NODE_RANK; echo line two of $NODE_RANK; sleep 0.5; exit $NODE_RANK",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    for rank in ["0", "1"] {
        for line in ["one", "two"] {
            let want = format!("[rank{rank}]: line {line} of {rank}");
            assert!(stdout.lines().any(|l| l == want), "{want} in {stdout}");
        }
    }
    assert_eq!(
        out.status.code(),
        Some(1),
        "rank 1 exited 1: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // `gantry jobs show` lists the members with node, GPUs, rank and state.
    let list = c.gantry(&["--output", "json", "jobs", "list"]);
    let jobs: serde_json::Value = serde_json::from_slice(&list.stdout).expect("json");
    let id = jobs[0]["id"].as_str().expect("id");
    let show = c.gantry(&["jobs", "show", id]);
    let text = String::from_utf8_lossy(&show.stdout);
    assert!(text.contains("GEN  RANK  NODE"), "{text}");
    assert!(text.contains("node-0") && text.contains("node-1"), "{text}");
}

fn sleepers(host: &gantry_tests::netns::Host) -> usize {
    gantry_tests::cluster::processes(host, &["sleep", "1000"])
}

#[test]
fn a_lost_member_re_places_the_whole_gang_and_its_node_is_fenced_on_return() {
    let c = cluster(3, "1xH100-80GB");
    let job = c.submit(json!({
        "name": "long", "image": "busybox", "nodes": 2,
        "command": ["sh", "-c", "trap 'exit 0' TERM; sleep 1000 & wait"],
        "resources": {"cpu": "0.5", "memory": "64M", "gpus": 1}
    }));
    let id = job["id"].as_str().expect("id").to_owned();
    let running = c.wait_job(&id, &["running"], Duration::from_secs(30));
    let gen1: Vec<serde_json::Value> = running["attempts"].as_array().cloned().unwrap_or_default();
    let rank1 = gen1.iter().find(|m| m["rank"] == 1).expect("rank 1");
    let lost = c
        .agents
        .iter()
        .position(|a| rank1["node"] == a.node.as_str())
        .expect("rank 1's host");
    gantry_tests::netns::wait_until("rank 1 running", Duration::from_secs(20), || {
        (sleepers(&c.agents[lost].host) == 1).then_some(())
    });
    // Cut rank 1's host off: it is declared down, its member lost, the whole generation
    // stopped and a new one placed with fresh ranks on the two nodes left.
    c.agents[lost].host.partition();
    let regen =
        gantry_tests::netns::wait_until("generation 2 running", Duration::from_secs(60), || {
            let j = c.job(&id);
            let members: Vec<serde_json::Value> = j["attempts"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|m| m["generation"] == 2 && !m["started_at_ms"].is_null())
                .cloned()
                .collect();
            (j["state"] == "running" && members.len() == 2).then_some(j)
        });
    assert_eq!(
        regen["failures"], 0,
        "a lost node is not the job's fault: {regen}"
    );
    let old: Vec<&serde_json::Value> = regen["attempts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| m["generation"] == 1)
        .collect();
    assert!(
        old.iter().any(|m| m["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("lost: node"))),
        "{regen}"
    );
    for m in regen["attempts"].as_array().into_iter().flatten() {
        if m["generation"] == 2 {
            assert_ne!(m["node"], c.agents[lost].node.as_str(), "{regen}");
        }
    }
    // Healed, the node is fenced: what it still ran of generation 1 is stopped.
    assert_eq!(sleepers(&c.agents[lost].host), 1, "it ran on while cut off");
    c.agents[lost].host.heal();
    gantry_tests::netns::wait_until(
        "the lost member to be stopped",
        Duration::from_secs(60),
        || (sleepers(&c.agents[lost].host) == 0).then_some(()),
    );
    let j = c.job(&id);
    assert_eq!(j["state"], "running", "generation 2 runs on: {j}");
}
