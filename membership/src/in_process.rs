//! Datagrams between members in one process (simulations and tests): each member's
//! socket is an inbox on a shared [`InProcessNetwork`], addressed by its `listen` address
//! (a name here, so every member needs its own port). Like UDP, a datagram to nobody or to
//! a full inbox is lost. Members run the same sealing socket as over UDP, so a test can
//! also put forged bytes on the network ([`InProcessNetwork::inject`]) or cut two members
//! apart ([`InProcessNetwork::cut`]).

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use crate::transport::Datagrams;

/// Datagrams an inbox holds before more are lost (UDP's receive buffer).
const INBOX: usize = 256;

type Datagram = (SocketAddr, Vec<u8>);

/// The network members opened on it share. Cheap to clone.
#[derive(Clone, Default)]
pub struct InProcessNetwork {
    hub: Arc<Mutex<Hub>>,
}

#[derive(Default)]
struct Hub {
    inboxes: HashMap<SocketAddr, mpsc::Sender<Datagram>>,
    /// Pairs that cannot reach each other, both ways (stored in address order).
    cut: HashSet<(SocketAddr, SocketAddr)>,
}

fn pair(a: SocketAddr, b: SocketAddr) -> (SocketAddr, SocketAddr) {
    if a <= b { (a, b) } else { (b, a) }
}

impl InProcessNetwork {
    /// From now on nothing passes between `a` and `b`, either way.
    pub fn cut(&self, a: SocketAddr, b: SocketAddr) {
        self.hub().cut.insert(pair(a, b));
    }

    /// Undoes [`InProcessNetwork::cut`].
    pub fn heal(&self, a: SocketAddr, b: SocketAddr) {
        self.hub().cut.remove(&pair(a, b));
    }

    /// Delivers `datagram` to `to` as if `from` had sent it: whatever bytes a test wants a
    /// member to receive (a forgery, a replay).
    pub fn inject(&self, from: SocketAddr, to: SocketAddr, datagram: Vec<u8>) {
        self.deliver(from, to, datagram);
    }

    pub(crate) fn open(&self, addr: SocketAddr) -> anyhow::Result<InProcessSocket> {
        let mut hub = self.hub();
        if addr.port() == 0 {
            anyhow::bail!("an in-process gossip socket needs an explicit port ({addr})");
        }
        if hub.inboxes.contains_key(&addr) {
            anyhow::bail!("{addr} is taken on the in-process gossip network");
        }
        let (tx, inbox) = mpsc::channel(INBOX);
        hub.inboxes.insert(addr, tx);
        Ok(InProcessSocket {
            addr,
            network: self.clone(),
            inbox,
            current: Vec::new(),
        })
    }

    fn deliver(&self, from: SocketAddr, to: SocketAddr, datagram: Vec<u8>) {
        let hub = self.hub();
        if hub.cut.contains(&pair(from, to)) {
            return;
        }
        if let Some(inbox) = hub.inboxes.get(&to) {
            // A full inbox loses the datagram, as a full UDP receive buffer would.
            let _ = inbox.try_send((from, datagram));
        }
    }

    fn hub(&self) -> std::sync::MutexGuard<'_, Hub> {
        self.hub.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One member's socket on an [`InProcessNetwork`]; its address is free again once dropped.
pub(crate) struct InProcessSocket {
    addr: SocketAddr,
    network: InProcessNetwork,
    inbox: mpsc::Receiver<Datagram>,
    /// The datagram last received (what [`Datagrams::recv`] lends out).
    current: Vec<u8>,
}

#[async_trait::async_trait]
impl Datagrams for InProcessSocket {
    fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.addr)
    }

    async fn send_to(&self, to: SocketAddr, datagram: &[u8]) -> anyhow::Result<()> {
        self.network.deliver(self.addr, to, datagram.to_vec());
        Ok(())
    }

    async fn recv(&mut self) -> anyhow::Result<(SocketAddr, &[u8])> {
        // The network holds a sender for as long as this socket exists.
        let (from, datagram) = self
            .inbox
            .recv()
            .await
            .ok_or_else(|| anyhow::anyhow!("the in-process gossip network is gone"))?;
        self.current = datagram;
        Ok((from, &self.current))
    }
}

impl Drop for InProcessSocket {
    fn drop(&mut self) {
        // Only this socket can be bound at its address while it exists.
        self.network.hub().inboxes.remove(&self.addr);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[tokio::test]
    async fn delivers_between_sockets_until_cut_and_frees_addresses() {
        let net = InProcessNetwork::default();
        let a = net.open(addr(1)).expect("a");
        let mut b = net.open(addr(2)).expect("b");
        assert!(net.open(addr(2)).is_err(), "taken");
        assert!(net.open(addr(0)).is_err(), "needs a port");
        a.send_to(addr(2), b"hi").await.expect("send");
        assert_eq!(b.recv().await.expect("recv"), (addr(1), &b"hi"[..]));

        net.cut(addr(2), addr(1));
        a.send_to(addr(2), b"lost").await.expect("send");
        net.heal(addr(1), addr(2));
        a.send_to(addr(2), b"again").await.expect("send");
        assert_eq!(b.recv().await.expect("recv"), (addr(1), &b"again"[..]));

        // Sending to nobody is no error, as over UDP.
        a.send_to(addr(3), b"void").await.expect("send");
        drop(b);
        assert!(net.open(addr(2)).is_ok(), "free again");
    }
}
