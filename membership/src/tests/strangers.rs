//! Gossip over real UDP (127.0.0.1) is authenticated: members that share the cluster's
//! gossip key converge, and strangers that can send to their ports change nothing in any
//! member's view, whether they gossip with another key or with no key at all (stock
//! chitchat, the same cluster id, claiming a new member with capacity, claiming to be a
//! new run of a member, and relaying a forged newer state of a real member, which a
//! plain chitchat node takes); what they send is dropped and counted. And sealing leaves
//! every datagram within UDP's limit: a state many datagrams large still arrives whole.

use chitchat::transport::UdpTransport;
use chitchat::{
    ChitchatHandle, DeletionStatus, FailureDetectorConfig, VersionedValue, spawn_chitchat,
};

use super::*;

const CLUSTER: &str = "c-test";

fn kv(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A stock chitchat node, gossiping in the clear: what anyone who can reach the gossip
/// port can run.
async fn stranger(
    node: &str,
    generation: u64,
    seeds: Vec<String>,
    key_values: Vec<(String, String)>,
) -> ChitchatHandle {
    let listen = std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("a free port");
    let config = ChitchatConfig {
        chitchat_id: ChitchatId::new(node.to_owned(), generation, listen),
        cluster_id: CLUSTER.to_owned(),
        gossip_interval: Duration::from_millis(50),
        listen_addr: listen,
        seed_nodes: seeds,
        failure_detector_config: FailureDetectorConfig::default(),
        marked_for_deletion_grace_period: Duration::from_secs(3_600),
        catchup_callback: None,
        extra_liveness_predicate: None,
        protocol_version: ProtocolVersion::V1,
    };
    spawn_chitchat(config, key_values, &UdpTransport)
        .await
        .expect("stranger")
}

/// A member's view: (node, generation) → key-values.
async fn view(m: &Member) -> BTreeMap<(String, u64), BTreeMap<String, String>> {
    m.members()
        .await
        .into_iter()
        .map(|v| ((v.node, v.generation), v.key_values))
        .collect()
}

#[tokio::test]
async fn strangers_change_nothing_and_are_counted() {
    let key = key(1);
    let start = async |name: &str, seeds: Vec<String>, pairs: &[(&str, &str)]| {
        Member::start(name, 1, CLUSTER, &key, &cfg(seeds), kv(pairs))
            .await
            .expect(name)
    };
    let a = start("a", vec![], &[("res", "a's")]).await;
    let seed = vec![a.gossip_addr().to_string()];
    let b = start("b", seed.clone(), &[("res", "b's")]).await;
    let c = start("c", seed.clone(), &[("res", "c's")]).await;
    wait_for("every member to see the three live", async || {
        for m in [&a, &b, &c] {
            if m.members().await.iter().filter(|v| v.live).count() != 3 {
                return false;
            }
        }
        true
    })
    .await;
    let before = view(&a).await;
    assert_eq!(before.len(), 3);

    // Strangers seeded with every member: one with its own key, two without any, one of
    // them claiming to be a new run of member b.
    let all: Vec<String> = [&a, &b, &c]
        .iter()
        .map(|m| m.gossip_addr().to_string())
        .collect();
    let other_key = super::key(2);
    let keyed = Member::start(
        "intruder-keyed",
        1,
        CLUSTER,
        &other_key,
        &cfg(all.clone()),
        kv(&[("res", "{\"cpu\":1000000}")]),
    )
    .await
    .expect("keyed stranger");
    let clear = stranger(
        "intruder",
        1,
        all.clone(),
        kv(&[("res", "{\"cpu\":1000000}"), ("gpus", "64")]),
    )
    .await;
    let impostor = stranger("b", 2, all, kv(&[("res", "forged")])).await;
    // The clear stranger also relays a forged state of member b itself (b's very
    // identity, versions far ahead of b's own)...
    let real_b = ChitchatId::new("b".to_owned(), 1, b.gossip_addr());
    clear
        .with_chitchat(|c| {
            let forged = VersionedValue {
                value: "forged".into(),
                version: 1 << 20,
                status: DeletionStatus::Set,
            };
            let forged = ("res".to_owned(), forged);
            c.reset_node_state_if_update(&real_b, std::iter::once(forged), 1 << 20, 0);
        })
        .await;
    // ...which a plain chitchat node, with no key to check, takes: the attack is real.
    let victim = stranger(
        "victim",
        1,
        vec![clear.chitchat_id().gossip_advertise_addr.to_string()],
        vec![],
    )
    .await;
    wait_for(
        "the unauthenticated victim to take the forged state",
        async || {
            victim
                .with_chitchat(|c| {
                    c.node_state(&real_b)
                        .and_then(|s| s.get("res").map(str::to_owned))
                        .is_some_and(|v| v == "forged")
                })
                .await
        },
    )
    .await;

    // Many gossip rounds later (each stranger contacts its seeds every 50 ms) nothing has
    // changed, and every member has dropped their datagrams as not signed with the key.
    wait_for("every member to drop strangers' datagrams", async || {
        [&a, &b, &c]
            .iter()
            .all(|m| m.traffic().dropped(DropReason::BadMac) >= 10)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    for m in [&a, &b, &c] {
        let now = view(m).await;
        assert_eq!(now, before, "the view changed");
        assert_eq!(m.members().await.iter().filter(|v| v.live).count(), 3);
        let t = m.traffic();
        assert_eq!(t.dropped(DropReason::Short), 0);
        assert_eq!(t.dropped(DropReason::Stale), 0);
        assert_eq!(t.dropped(DropReason::Malformed), 0);
    }
    // Nor did the strangers learn anything from a member: none ever answered them.
    assert_eq!(keyed.members().await.len(), 1);
    let learned = |c: &chitchat::Chitchat| {
        c.node_states()
            .keys()
            .filter(|id| ["a", "c"].contains(&&*id.node_id) || **id == real_b)
            .count()
    };
    assert_eq!(impostor.with_chitchat(|c| learned(c)).await, 0);
    // (The clear stranger holds the forged b it planted itself, and nothing else of them.)
    assert_eq!(clear.with_chitchat(|c| learned(c)).await, 1);
    keyed.shutdown().await;
    for s in [clear, impostor, victim] {
        s.shutdown().await.expect("stranger");
    }
    for m in [a, b, c] {
        m.shutdown().await;
    }
}

#[tokio::test]
async fn a_state_of_many_datagrams_arrives_whole() {
    let key = key(3);
    // ~200 KB of values that compress poorly: deltas are cut at the datagram limit, and
    // every one of those datagrams must still fit once sealed.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let values: Vec<(String, String)> = (0..200)
        .map(|i| {
            let v = (0..1_000)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    alphabet[(x % 64) as usize] as char
                })
                .collect();
            (format!("k{i:03}"), v)
        })
        .collect();
    let a = Member::start("a", 1, CLUSTER, &key, &cfg(vec![]), values.clone())
        .await
        .expect("a");
    let b = Member::start(
        "b",
        1,
        CLUSTER,
        &key,
        &cfg(vec![a.gossip_addr().to_string()]),
        vec![],
    )
    .await
    .expect("b");
    let want: BTreeMap<String, String> = values.into_iter().collect();
    wait_for("b to hold all of a's values", async || {
        b.members()
            .await
            .iter()
            .any(|v| v.node == "a" && v.key_values == want)
    })
    .await;
    // Many full datagrams went by.
    assert!(b.traffic().received.load(Ordering::Relaxed) > 100_000);
    a.shutdown().await;
    b.shutdown().await;
}
