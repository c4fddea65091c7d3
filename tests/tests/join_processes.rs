//! The join flow with real processes: a coordinator, its token command and an agent's
//! `join`, and a coordinator restart after kill -9 keeping its CA, tokens and jobs.

use std::net::SocketAddr;
use std::process::Command;

use gantry_agent::control::{self, NodeIdentity};
use gantry_shared::protocol::NodeCapacity;
use gantry_tests::{Coordinator, binary};

fn token_create(api: &str, admin: &str) -> std::process::Output {
    Command::new(binary("gantry-coordinator"))
        .args([
            "token", "create", "--ttl", "10m", "--api", api, "--token", admin,
        ])
        .output()
        .expect("token create")
}

#[tokio::test(flavor = "multi_thread")]
async fn agents_join_through_the_binaries_and_survive_a_coordinator_crash() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("coordinator");
    let mut coord = Coordinator::start(&state, "127.0.0.1:0", "127.0.0.1:0");
    let (api, control_addr) = (coord.api.clone(), coord.control.clone());
    let admin = coord
        .admin
        .clone()
        .expect("first start prints the admin token");

    let out = token_create(&api, &admin);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let denied = token_create(&api, "gat_not-a-token");
    assert!(!denied.status.success());
    assert!(
        String::from_utf8_lossy(&denied.stderr).contains("token not recognized"),
        "{}",
        String::from_utf8_lossy(&denied.stderr)
    );

    let agent_state = dir.path().join("agent");
    let join = |node: &str| {
        Command::new(binary("gantry-agent"))
            .env("GANTRY_STATE_DIR", &agent_state)
            .env("GANTRY_CONFIG", agent_state.join("agent.toml"))
            .args([
                "join",
                "--coordinator",
                &control_addr,
                "--token",
                &token,
                "--node",
                node,
            ])
            .output()
            .expect("join")
    };
    let out = join("gpu-e2e");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("as node gpu-e2e"));
    let again = join("gpu-other");
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("already used"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );

    // kill -9 and restart on the same state: same CA (the node's certificate still
    // works), the admin token is not printed again but still valid.
    coord.proc.kill9();
    let coord = Coordinator::start(&state, "127.0.0.1:0", "127.0.0.1:0");
    assert_eq!(coord.admin, None, "the admin token is shown once");
    let api = coord.api.clone();
    let control_addr: SocketAddr = coord.control.parse().expect("addr");
    let identity = NodeIdentity::load(&agent_state.join("identity")).expect("identity");
    control::connect(
        control_addr,
        &identity,
        control::HelloInfo {
            capacity: NodeCapacity {
                cpu_millis: 1000,
                memory_bytes: 1 << 30,
                gpus: 0,
                shared_volumes: false,
            },
            instance: 1,
            gossip: None,
        },
    )
    .await
    .expect("the node's certificate survives the restart");
    let out = token_create(&api, &admin);
    assert!(
        out.status.success(),
        "the admin token survives: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
