//! The control plane end to end on loopback: a real coordinator endpoint (QUIC, mutual
//! TLS, cluster CA, join tokens) and the agent's client. Covers the join flow (with the
//! cluster's gossip key handed out at join and at hello), every way a peer must be
//! refused, and that bad frames close only the offending connection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use gantry_agent::control::{self, ControlError, HelloInfo, NodeIdentity, Session, Trust};
use gantry_coordinator::ca::ClusterCa;
use gantry_coordinator::control::{ControlConfig, ControlServer};
use gantry_coordinator::nodes::Nodes;
use gantry_coordinator::store::Store;
use gantry_coordinator::store::joins::JoinTokens;
use gantry_shared::protocol::{
    self, CommandReply, MAX_FRAME, NodeCapacity, PROTOCOL_VERSION, RefusalCode, Request, Response,
};

const CAPACITY: NodeCapacity = NodeCapacity {
    cpu_millis: 2000,
    memory_bytes: 1 << 30,
    gpus: 0,
    shared_volumes: false,
};

/// What an agent run `instance` says at hello.
fn hello(instance: u64) -> HelloInfo {
    HelloInfo {
        capacity: CAPACITY,
        instance,
        gossip: None,
    }
}
use gantry_shared::{ClusterId, GossipKey, NodeId};
use tokio_util::sync::CancellationToken;

struct Cluster {
    addr: SocketAddr,
    tokens: JoinTokens,
    ca_pem: String,
    gossip_key: GossipKey,
    cancel: CancellationToken,
    dir: tempfile::TempDir,
    _store_db: Store,
}

impl Cluster {
    async fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = ClusterCa::load_or_create(&dir.path().join("ca")).expect("ca");
        let store = Store::open(&dir.path().join("db")).expect("store");
        let tokens = store.join_tokens(ca.ca_sha256()).expect("tokens");
        let ca_pem = ca.ca_pem().to_owned();
        let gossip_key = ca.gossip_key().clone();
        let cfg = ControlConfig {
            listen: "127.0.0.1:0".parse().expect("addr"),
            ..ControlConfig::default()
        };
        let api_tokens = store.api_tokens().expect("api tokens");
        let server = ControlServer::bind(
            cfg,
            Arc::new(ca),
            tokens.clone(),
            api_tokens,
            store.clone(),
            Nodes::default(),
        )
        .expect("bind");
        let addr = server.local_addr().expect("addr");
        let cancel = CancellationToken::new();
        tokio::spawn(server.serve(cancel.clone()));
        Self {
            addr,
            tokens,
            ca_pem,
            gossip_key,
            cancel,
            dir,
            _store_db: store,
        }
    }

    fn token(&self) -> String {
        self.tokens
            .create(Duration::from_secs(3600))
            .expect("token")
            .to_string()
    }

    async fn join(&self, node: &str) -> NodeIdentity {
        let node = NodeId::new(node).expect("id");
        let dir = self.dir.path().join(format!("agent-{node}"));
        control::join(self.addr, &self.token(), node, &dir)
            .await
            .expect("join")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

fn refusal(r: Result<impl std::fmt::Debug, ControlError>) -> (RefusalCode, String) {
    match r {
        Err(ControlError::Refused(r)) => (r.code, r.message),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn an_agent_joins_once_and_then_connects_with_its_certificate() {
    let c = Cluster::start().await;
    let dir = c.dir.path().join("agent");
    let token = c.token();
    let identity = control::join(c.addr, &token, NodeId::new("gpu-1").expect("id"), &dir)
        .await
        .expect("join");
    assert_eq!(
        NodeIdentity::load(&dir).expect("stored").node.as_str(),
        "gpu-1"
    );
    control::connect(c.addr, &identity, hello(1))
        .await
        .expect("authenticated session");
    // The token was one-time.
    let (code, message) = refusal(
        control::join(
            c.addr,
            &token,
            NodeId::new("gpu-2").expect("id"),
            &c.dir.path().join("again"),
        )
        .await,
    );
    assert_eq!(code, RefusalCode::JoinToken);
    assert!(message.contains("already used"), "{message}");
    // A second host cannot join under a name already given out, and the refusal leaves
    // its (fresh) token usable.
    let fresh = c.token();
    let (code, message) = refusal(
        control::join(
            c.addr,
            &fresh,
            NodeId::new("gpu-1").expect("id"),
            &c.dir.path().join("twin"),
        )
        .await,
    );
    assert_eq!(code, RefusalCode::DuplicateNode);
    assert!(message.contains("already joined"), "{message}");
    control::join(
        c.addr,
        &fresh,
        NodeId::new("gpu-3").expect("id"),
        &c.dir.path().join("third"),
    )
    .await
    .expect("the token was not used up by the refused join");
}

#[tokio::test]
async fn the_gossip_key_is_handed_out_at_join_and_at_every_hello() {
    use std::os::unix::fs::PermissionsExt;
    let c = Cluster::start().await;
    let dir = c.dir.path().join("agent-k");
    let identity = control::join(c.addr, &c.token(), NodeId::new("gpu-k").expect("id"), &dir)
        .await
        .expect("join");
    assert_eq!(identity.gossip_key.as_ref(), Some(&c.gossip_key));
    // Kept with the identity, which only its owner may read.
    let stored = NodeIdentity::load(&dir).expect("stored");
    assert_eq!(stored.gossip_key.as_ref(), Some(&c.gossip_key));
    let mode = std::fs::metadata(dir.join("identity.json"))
        .expect("identity file")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    // Every welcome carries it too: how a node that joined before gossip was authenticated
    // (an identity without the key) learns it.
    let before = NodeIdentity {
        gossip_key: None,
        ..identity
    };
    let session = control::connect(c.addr, &before, hello(1))
        .await
        .expect("session");
    assert_eq!(session.gossip_key().as_ref(), Some(&c.gossip_key));
}

#[tokio::test]
async fn a_second_live_agent_with_the_same_identity_is_refused() {
    let c = Cluster::start().await;
    let identity = c.join("gpu-d").await;
    let first = control::connect(c.addr, &identity, hello(1))
        .await
        .expect("first agent");
    // The first agent answers pings, as a running agent does.
    let conn = first.connection().clone();
    tokio::spawn(async move {
        while let Ok((mut tx, _rx)) = conn.accept_bi().await {
            let frame = protocol::encode(&CommandReply::Accepted).expect("encode");
            let _ = tx.write_all(&frame).await;
            let _ = tx.finish();
        }
    });
    let (code, message) = refusal(control::connect(c.addr, &identity, hello(2)).await);
    assert_eq!(code, RefusalCode::DuplicateNode);
    assert!(
        message.contains("another agent is connected as node `gpu-d`"),
        "{message}"
    );
    // The same run reconnecting is not a duplicate, and once the first agent is gone a
    // restarted one (another run) takes over.
    control::connect(c.addr, &identity, hello(1))
        .await
        .expect("the same run reconnects");
    first.connection().close(0u32.into(), b"agent stopped");
    drop(first);
    tokio::time::sleep(Duration::from_millis(100)).await;
    control::connect(c.addr, &identity, hello(3))
        .await
        .expect("a restarted agent takes over");
}

#[tokio::test]
async fn expired_and_foreign_join_tokens_are_refused() {
    let c = Cluster::start().await;
    let expired = c.tokens.create(Duration::ZERO).expect("token").to_string();
    let (code, message) = refusal(
        control::join(
            c.addr,
            &expired,
            NodeId::new("n1").expect("id"),
            &c.dir.path().join("a"),
        )
        .await,
    );
    assert_eq!(code, RefusalCode::JoinToken);
    assert!(message.contains("expired"), "{message}");
    // A token pinning another CA: the agent refuses the coordinator before sending it.
    let other = Cluster::start().await;
    let foreign = other.token();
    match control::join(
        c.addr,
        &foreign,
        NodeId::new("n2").expect("id"),
        &c.dir.path().join("b"),
    )
    .await
    {
        Err(ControlError::Connect { message, .. }) => assert!(message.contains("CA"), "{message}"),
        other => panic!("expected the pinned CA check to fail, got {other:?}"),
    }
    let err = control::join(
        c.addr,
        "not-a-token",
        NodeId::new("n3").expect("id"),
        &c.dir.path().join("c"),
    )
    .await;
    assert!(matches!(err, Err(ControlError::Token(_))), "{err:?}");
}

#[tokio::test]
async fn hello_needs_a_certificate_that_names_the_node_of_this_cluster() {
    let c = Cluster::start().await;
    let identity = c.join("gpu-a").await;
    // No client certificate.
    let anon = Session::open(c.addr, Trust::Ca(&c.ca_pem), None)
        .await
        .expect("tls");
    let raw_hello = |node: &NodeId, cluster: &ClusterId, v: u32| Request::Hello {
        protocol_version: v,
        cluster: cluster.clone(),
        node: node.clone(),
        capacity: CAPACITY,
        instance: 1,
        gossip: None,
    };
    let (code, _) = refusal(
        anon.request(&raw_hello(
            &identity.node,
            &identity.cluster,
            PROTOCOL_VERSION,
        ))
        .await
        .and_then(into_result),
    );
    assert_eq!(code, RefusalCode::NotAuthenticated);
    // A valid certificate for gpu-a claiming to be gpu-b.
    let mut impostor = identity.clone();
    impostor.node = NodeId::new("gpu-b").expect("id");
    let (code, message) = refusal(control::connect(c.addr, &impostor, hello(1)).await);
    assert_eq!(code, RefusalCode::Identity);
    assert!(message.contains("gpu-b"), "{message}");
    // The right certificate, another cluster's id.
    let mut lost = identity.clone();
    lost.cluster = ClusterId::new("some-other-cluster").expect("id");
    assert_eq!(
        refusal(control::connect(c.addr, &lost, hello(1)).await).0,
        RefusalCode::Cluster
    );
    // Another protocol version.
    let session = Session::open(
        c.addr,
        Trust::Ca(&c.ca_pem),
        Some((&identity.cert_pem, &identity.key_pem)),
    )
    .await
    .expect("tls");
    let (code, message) = refusal(
        session
            .request(&raw_hello(
                &identity.node,
                &identity.cluster,
                PROTOCOL_VERSION + 1,
            ))
            .await
            .and_then(into_result),
    );
    assert_eq!(code, RefusalCode::ProtocolVersion);
    assert!(message.contains("protocol"), "{message}");
}

#[tokio::test]
async fn certificates_from_another_ca_are_refused_at_the_handshake() {
    let c = Cluster::start().await;
    let other = Cluster::start().await;
    let stranger = other.join("gpu-x").await;
    // Trusting our CA for the server, presenting the other cluster's node certificate.
    let result = async {
        let s = Session::open(
            c.addr,
            Trust::Ca(&c.ca_pem),
            Some((&stranger.cert_pem, &stranger.key_pem)),
        )
        .await?;
        s.request(&Request::Hello {
            protocol_version: PROTOCOL_VERSION,
            cluster: stranger.cluster.clone(),
            node: stranger.node.clone(),
            capacity: CAPACITY,
            instance: 1,
            gossip: None,
        })
        .await
    }
    .await;
    assert!(
        matches!(
            result,
            Err(ControlError::Connect { .. } | ControlError::Stream(_))
        ),
        "must not get an answer: {result:?}"
    );
}

#[tokio::test]
async fn bad_frames_close_only_their_connection() {
    let c = Cluster::start().await;
    let identity = c.join("gpu-f").await;
    for frame in [
        ((MAX_FRAME + 1) as u32).to_be_bytes().to_vec(),
        [&8u32.to_be_bytes()[..], b"\xff\xfegarbage"].concat(),
    ] {
        let bad = control::connect(c.addr, &identity, hello(1))
            .await
            .expect("session");
        let (mut send, _recv) = bad.connection().open_bi().await.expect("stream");
        send.write_all(&frame).await.expect("write");
        let _ = send.finish();
        let closed = tokio::time::timeout(Duration::from_secs(10), bad.connection().closed())
            .await
            .expect("closed in time");
        assert!(
            matches!(closed, quinn::ConnectionError::ApplicationClosed(_)),
            "{closed:?}"
        );
        // Everyone else is still served.
        control::connect(c.addr, &identity, hello(1))
            .await
            .expect("a fresh session works");
    }
}

fn into_result(r: Response) -> Result<Response, ControlError> {
    match r {
        Response::Refused(r) => Err(ControlError::Refused(r)),
        other => Ok(other),
    }
}
