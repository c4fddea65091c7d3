//! chitchat's transport for Gantry: every datagram a member sends is sealed with the
//! cluster's gossip key, and every datagram it receives must open (`crate::seal`) or it is
//! dropped before chitchat sees it, and counted by reason in [`Traffic`]. The datagrams
//! travel over UDP in the product, or over an [`InProcessNetwork`] for members in one
//! process; both run this same code.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context as _;
use chitchat::ChitchatEnvelope;
use chitchat::transport::{RecvOutcome, SendOutcome, Socket, Transport};
use gantry_shared::{GossipKey, now_ms};

use crate::GossipTransport;
use crate::seal::{DropReason, Sealer};

/// What a member's gossip moved since it started: bytes of the datagrams it sent and of the
/// ones it accepted (their stamp and tag included), and the datagrams it dropped.
#[derive(Debug, Default)]
pub struct Traffic {
    pub sent: AtomicU64,
    pub received: AtomicU64,
    dropped: [AtomicU64; DropReason::ALL.len()],
}

impl Traffic {
    /// Datagrams dropped for `reason`.
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.dropped[reason as usize].load(Ordering::Relaxed)
    }

    /// Counts a drop; returns how many there have been for that reason.
    fn drop_one(&self, reason: DropReason) -> u64 {
        self.dropped[reason as usize].fetch_add(1, Ordering::Relaxed) + 1
    }
}

/// Where a socket's datagrams go and come from: the one edge between the sealing socket
/// and a network.
#[async_trait::async_trait]
pub(crate) trait Datagrams: Send + Sync + 'static {
    fn local_addr(&self) -> anyhow::Result<SocketAddr>;

    async fn send_to(&self, to: SocketAddr, datagram: &[u8]) -> anyhow::Result<()>;

    /// The next datagram and who sent it. An error means the network is gone for good.
    async fn recv(&mut self) -> anyhow::Result<(SocketAddr, &[u8])>;
}

/// chitchat's [`Transport`]: opens sealing sockets on the member's network.
pub(crate) struct SealedTransport {
    pub(crate) network: GossipTransport,
    pub(crate) key: GossipKey,
    pub(crate) traffic: Arc<Traffic>,
}

#[async_trait::async_trait]
impl Transport for SealedTransport {
    async fn open(&self, listen_addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        let sealer = Sealer::new(&self.key);
        let traffic = self.traffic.clone();
        Ok(match &self.network {
            GossipTransport::Udp => Box::new(SealedSocket {
                datagrams: Udp::bind(listen_addr).await?,
                sealer,
                traffic,
            }),
            GossipTransport::InProcess(network) => Box::new(SealedSocket {
                datagrams: network.open(listen_addr)?,
                sealer,
                traffic,
            }),
        })
    }
}

struct SealedSocket<D> {
    datagrams: D,
    sealer: Sealer,
    traffic: Arc<Traffic>,
}

#[async_trait::async_trait]
impl<D: Datagrams> Socket for SealedSocket<D> {
    fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        self.datagrams.local_addr()
    }

    async fn send(
        &mut self,
        to: SocketAddr,
        envelope: ChitchatEnvelope,
    ) -> anyhow::Result<SendOutcome> {
        let datagram = self.sealer.seal(now_ms(), &envelope.serialize_to_vec());
        self.datagrams.send_to(to, &datagram).await?;
        self.traffic
            .sent
            .fetch_add(datagram.len() as u64, Ordering::Relaxed);
        Ok(SendOutcome {
            num_bytes_sent: datagram.len(),
        })
    }

    async fn recv(&mut self) -> anyhow::Result<RecvOutcome> {
        let Self {
            datagrams,
            sealer,
            traffic,
        } = self;
        loop {
            let (from, datagram) = datagrams.recv().await?;
            let reason = match sealer.open(now_ms(), datagram) {
                Ok(mut envelope) => match ChitchatEnvelope::deserialize(&mut envelope) {
                    Ok(envelope) => {
                        traffic
                            .received
                            .fetch_add(datagram.len() as u64, Ordering::Relaxed);
                        return Ok(RecvOutcome {
                            from_addr: from,
                            envelope,
                            num_bytes_received: datagram.len(),
                        });
                    }
                    Err(_) => DropReason::Malformed,
                },
                Err(reason) => reason,
            };
            let dropped = traffic.drop_one(reason);
            // The first drops of each kind and then ever fewer are worth a warning: a
            // flood of forged datagrams must not become a flood of log lines.
            if dropped.is_power_of_two() {
                tracing::warn!(%from, reason = reason.as_str(), dropped, "{}", reason.hint());
            } else {
                tracing::debug!(%from, reason = reason.as_str(), dropped, "{}", reason.hint());
            }
        }
    }
}

/// The product's network: a UDP socket.
struct Udp {
    socket: tokio::net::UdpSocket,
    /// Room for the largest UDP payload.
    buf: Box<[u8]>,
}

impl Udp {
    async fn bind(addr: SocketAddr) -> anyhow::Result<Self> {
        let socket = tokio::net::UdpSocket::bind(addr)
            .await
            .with_context(|| format!("failed to bind to {addr}/UDP for gossip"))?;
        Ok(Self {
            socket,
            buf: vec![0; u16::MAX as usize].into_boxed_slice(),
        })
    }
}

#[async_trait::async_trait]
impl Datagrams for Udp {
    fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        self.socket
            .local_addr()
            .context("failed to get the gossip socket's address")
    }

    async fn send_to(&self, to: SocketAddr, datagram: &[u8]) -> anyhow::Result<()> {
        self.socket
            .send_to(datagram, to)
            .await
            .with_context(|| format!("failed to send a gossip datagram to {to}"))?;
        Ok(())
    }

    async fn recv(&mut self) -> anyhow::Result<(SocketAddr, &[u8])> {
        loop {
            match self.socket.recv_from(&mut self.buf).await {
                Ok((len, from)) => return Ok((from, &self.buf[..len])),
                // As chitchat's own UDP socket: an ICMP error about an earlier send, or
                // memory pressure, is no reason to stop gossiping.
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::OutOfMemory
                            | std::io::ErrorKind::ConnectionReset
                            | std::io::ErrorKind::ConnectionRefused
                    ) =>
                {
                    tracing::warn!(error = %e, "transient gossip receive error");
                }
                Err(e) => return Err(e).context("gossip socket failed"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use chitchat::{ChitchatMessage, ProtocolVersion};

    use super::*;
    use crate::in_process::InProcessNetwork;

    fn key(byte: u8) -> GossipKey {
        GossipKey::from_bytes([byte; 32])
    }

    fn envelope() -> ChitchatEnvelope {
        ChitchatEnvelope {
            version: ProtocolVersion::V1,
            message: ChitchatMessage::BadCluster,
        }
    }

    /// How a test puts raw bytes on the network, as a stranger would.
    enum Raw {
        Udp(tokio::net::UdpSocket),
        InProcess(InProcessNetwork, SocketAddr),
    }

    impl Raw {
        async fn send(&self, to: SocketAddr, bytes: &[u8]) {
            match self {
                Raw::Udp(s) => {
                    s.send_to(bytes, to).await.expect("send");
                }
                Raw::InProcess(net, from) => net.inject(*from, to, bytes.to_vec()),
            }
        }
    }

    /// The same checks over UDP and in process: a sealed datagram passes; short, changed,
    /// wrongly keyed, stale and authentic-but-garbage ones are dropped and counted, and the
    /// socket goes on receiving after them.
    async fn drops_what_does_not_open(network: GossipTransport, raw: Raw, at: SocketAddr) {
        let traffic = Arc::new(Traffic::default());
        let transport = SealedTransport {
            network,
            key: key(1),
            traffic: traffic.clone(),
        };
        let mut socket = transport.open(at).await.expect("open");
        let to = socket.local_addr().expect("addr");
        let sealer = Sealer::new(&key(1));
        let good = sealer.seal(now_ms(), &envelope().serialize_to_vec());

        raw.send(to, &good).await;
        let got = socket.recv().await.expect("recv");
        assert_eq!(got.envelope, envelope());
        assert_eq!(got.num_bytes_received, good.len());

        let mut changed = good.clone();
        changed[crate::seal::STAMP_LEN] ^= 0xff;
        let stale_at = now_ms() - 2 * crate::seal::MAX_CLOCK_SKEW.as_millis() as u64;
        // A chitchat message in the clear, long enough to be taken for a sealed one.
        let clear = ChitchatEnvelope {
            version: ProtocolVersion::V1,
            message: ChitchatMessage::Syn {
                cluster_id: "c".repeat(64),
                digest: Default::default(),
            },
        };
        let forged: Vec<Vec<u8>> = vec![
            b"junk".to_vec(),
            changed,
            Sealer::new(&key(2)).seal(now_ms(), &envelope().serialize_to_vec()),
            clear.serialize_to_vec(),
            sealer.seal(stale_at, &envelope().serialize_to_vec()),
            sealer.seal(now_ms(), b"not chitchat"),
        ];
        for d in &forged {
            raw.send(to, d).await;
        }
        raw.send(to, &good).await;
        let got = tokio::time::timeout(Duration::from_secs(5), socket.recv())
            .await
            .expect("the good datagram after the forged ones")
            .expect("recv");
        assert_eq!(got.envelope, envelope());
        let dropped = |r| traffic.dropped(r);
        assert_eq!(dropped(DropReason::Short), 1);
        // Changed, another key's, and a bare chitchat message whose last bytes are no tag.
        assert_eq!(dropped(DropReason::BadMac), 3);
        assert_eq!(dropped(DropReason::Stale), 1);
        assert_eq!(dropped(DropReason::Malformed), 1);
        assert_eq!(
            traffic.received.load(Ordering::Relaxed),
            2 * good.len() as u64
        );
    }

    #[tokio::test]
    async fn drops_what_does_not_open_over_udp() {
        let raw = tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("bind");
        drops_what_does_not_open(
            GossipTransport::Udp,
            Raw::Udp(raw),
            "127.0.0.1:0".parse().expect("addr"),
        )
        .await;
    }

    #[tokio::test]
    async fn drops_what_does_not_open_in_process() {
        let net = InProcessNetwork::default();
        drops_what_does_not_open(
            GossipTransport::InProcess(net.clone()),
            Raw::InProcess(net, "127.0.0.1:9".parse().expect("addr")),
            "127.0.0.1:7000".parse().expect("addr"),
        )
        .await;
    }

    #[tokio::test]
    async fn sent_datagrams_are_sealed() {
        let traffic = Arc::new(Traffic::default());
        let transport = SealedTransport {
            network: GossipTransport::Udp,
            key: key(1),
            traffic: traffic.clone(),
        };
        let mut socket = transport
            .open("127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("open");
        let peer = tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let out = socket
            .send(peer.local_addr().expect("addr"), envelope())
            .await
            .expect("send");
        let mut buf = vec![0; 70_000];
        let (len, _) = peer.recv_from(&mut buf).await.expect("recv");
        assert_eq!(len, out.num_bytes_sent);
        assert_eq!(traffic.sent.load(Ordering::Relaxed), len as u64);
        let opened = Sealer::new(&key(1))
            .open(now_ms(), &buf[..len])
            .expect("opens with the key");
        assert_eq!(opened, &envelope().serialize_to_vec()[..]);
    }
}
