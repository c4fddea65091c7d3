//! The members' behaviour over both networks (converge, see changes, detect a death, a
//! partition), settings refused; `strangers`: what hosts without the key can do over UDP.

mod strangers;

use std::sync::atomic::Ordering;

use super::*;

fn cfg(seeds: Vec<String>) -> MembershipConfig {
    MembershipConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        seeds,
        gossip_interval: Duration::from_millis(50),
        ..MembershipConfig::default()
    }
}

fn key(byte: u8) -> GossipKey {
    GossipKey::from_bytes([byte; 32])
}

async fn wait_for(what: &str, mut f: impl AsyncFnMut() -> bool) {
    for _ in 0..400 {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out waiting for {what}");
}

/// The same behaviour over UDP and in process.
async fn converge_see_changes_and_detect_death(transport: GossipTransport) {
    // The in-process network's addresses are names: each member gets its own port.
    let on = |port: u16, seeds: Vec<String>| match transport {
        GossipTransport::Udp => cfg(seeds),
        GossipTransport::InProcess(_) => MembershipConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], port)),
            ..cfg(seeds)
        },
    };
    let start = async |name: &str, port: u16, seeds: Vec<String>, kv| {
        Member::start_on(&transport, name, 1, "c1", &key(1), &on(port, seeds), kv)
            .await
            .expect(name)
    };
    let a = start("a", 7001, vec![], vec![("k".into(), "1".into())]).await;
    let seed = vec![a.gossip_addr().to_string()];
    let b = start("b", 7002, seed.clone(), vec![]).await;
    let c = start("c", 7003, seed, vec![]).await;
    wait_for("c to see a and b live", async || {
        let m = c.members().await;
        m.iter().filter(|v| v.live).count() == 3
    })
    .await;
    a.set(vec![("k".into(), "2".into())]).await;
    wait_for("c to see a's new value", async || {
        c.members()
            .await
            .iter()
            .any(|v| v.node == "a" && v.key_values.get("k").map(String::as_str) == Some("2"))
    })
    .await;
    assert!(b.traffic().sent.load(Ordering::Relaxed) > 0);
    assert!(b.traffic().received.load(Ordering::Relaxed) > 0);
    for m in [&a, &b, &c] {
        for reason in DropReason::ALL {
            assert_eq!(m.traffic().dropped(reason), 0, "{reason:?}");
        }
    }
    b.shutdown().await;
    wait_for("c to declare b dead", async || {
        c.members().await.iter().any(|v| v.node == "b" && !v.live)
    })
    .await;
    a.shutdown().await;
    c.shutdown().await;
}

#[tokio::test]
async fn members_converge_see_changes_and_detect_death_over_udp() {
    converge_see_changes_and_detect_death(GossipTransport::Udp).await;
}

#[tokio::test]
async fn members_converge_see_changes_and_detect_death_in_process() {
    converge_see_changes_and_detect_death(GossipTransport::InProcess(InProcessNetwork::default()))
        .await;
}

#[tokio::test]
async fn a_member_cut_off_is_declared_dead_and_comes_back_when_healed() {
    let net = InProcessNetwork::default();
    let transport = GossipTransport::InProcess(net.clone());
    let at = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
    let start = async |name: &str, port: u16, seeds: Vec<String>| {
        let cfg = MembershipConfig {
            listen: at(port),
            ..cfg(seeds)
        };
        Member::start_on(&transport, name, 1, "c1", &key(1), &cfg, vec![])
            .await
            .expect(name)
    };
    let a = start("a", 7101, vec![]).await;
    let b = start("b", 7102, vec![at(7101).to_string()]).await;
    let live =
        async |m: &Member, node: &str| m.members().await.iter().any(|v| v.node == node && v.live);
    wait_for("a to see b", async || live(&a, "b").await).await;
    net.cut(at(7101), at(7102));
    wait_for("a to declare b dead", async || !live(&a, "b").await).await;
    net.heal(at(7101), at(7102));
    wait_for("a to see b again", async || live(&a, "b").await).await;
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test]
async fn in_process_members_need_a_port() {
    let e = Member::start_on(
        &GossipTransport::InProcess(InProcessNetwork::default()),
        "a",
        1,
        "c1",
        &key(1),
        &cfg(vec![]),
        vec![],
    )
    .await
    .err();
    assert!(matches!(e, Some(MembershipError::InProcessPort { .. })));
}

#[tokio::test]
async fn another_cluster_is_not_joined() {
    let a = Member::start("a", 1, "c1", &key(1), &cfg(vec![]), vec![])
        .await
        .expect("a");
    let x = Member::start(
        "x",
        1,
        "other",
        &key(1),
        &cfg(vec![a.gossip_addr().to_string()]),
        vec![],
    )
    .await
    .expect("x");
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(a.members().await.iter().all(|v| v.node != "x"));
    assert!(x.members().await.iter().all(|v| v.node != "a"));
}

#[tokio::test]
async fn bad_settings_are_refused() {
    let mut c = cfg(vec![]);
    c.phi_threshold = 0.0;
    assert!(matches!(
        Member::start("a", 1, "c", &key(1), &c, vec![]).await,
        Err(MembershipError::Phi(_))
    ));
    let c = MembershipConfig::default();
    assert!(matches!(
        Member::start("a", 1, "c", &key(1), &c, vec![]).await,
        Err(MembershipError::NoAdvertise { .. })
    ));
}
