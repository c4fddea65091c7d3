//! Gossip datagrams as they travel: chitchat's message between a timestamp and a MAC made
//! with the cluster's gossip key. Pure: the transport (`crate::transport`) hands in the
//! clock's reading.
//!
//! ```text
//! | stamp: u64, big-endian unix ms | chitchat envelope (its own wire format) | tag: 32 bytes |
//! tag = HMAC-SHA256(key, "gantry-gossip-1" ‖ stamp ‖ envelope)
//! ```
//!
//! A datagram is accepted when it is long enough to hold a stamp and a tag, its tag
//! verifies (compared in constant time) and its stamp is within [`MAX_CLOCK_SKEW`] of the
//! receiver's clock. Anything else is dropped, by [`DropReason`].
//!
//! Replays: the stamp bounds them to [`MAX_CLOCK_SKEW`]; within it a replayed datagram
//! repeats what its member already said, and chitchat applies only heartbeats and values
//! newer than the ones it holds, so a replay cannot roll a member's state back.

use std::time::Duration;

use gantry_shared::GossipKey;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

pub const STAMP_LEN: usize = 8;
pub const TAG_LEN: usize = 32;
/// Bytes a sealed datagram adds to chitchat's message.
pub const OVERHEAD: usize = STAMP_LEN + TAG_LEN;

/// The most a datagram's stamp may differ from the receiver's clock: how far apart members'
/// clocks may be, and how long a captured datagram can be replayed.
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);

/// Names what the tag authenticates, so the key could never be confused with a MAC of
/// anything else.
const CONTEXT: &[u8] = b"gantry-gossip-1";

// Sealed datagrams fit a UDP datagram because chitchat cuts its deltas this much shorter.
const _: () = assert!(OVERHEAD <= chitchat::TRANSPORT_FRAMING_RESERVE);

/// Why a received datagram was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Too short to hold a stamp and a tag.
    Short,
    /// The tag does not verify: not made with this cluster's key (a stranger, a member of
    /// another cluster), or changed on the way.
    BadMac,
    /// Authentic, but stamped further than [`MAX_CLOCK_SKEW`] from this host's clock: the
    /// clocks disagree, or it is an old datagram replayed.
    Stale,
    /// Authentic and fresh, but not a chitchat message this member reads.
    Malformed,
}

impl DropReason {
    pub const ALL: [DropReason; 4] = [Self::Short, Self::BadMac, Self::Stale, Self::Malformed];

    /// The metric label: `short`, `bad_mac`, `stale`, `malformed`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Short => "short",
            Self::BadMac => "bad_mac",
            Self::Stale => "stale",
            Self::Malformed => "malformed",
        }
    }

    /// What an operator should make of it.
    pub fn hint(self) -> &'static str {
        match self {
            Self::Short => "dropped a gossip datagram too short to be authenticated",
            Self::BadMac => {
                "dropped a gossip datagram not signed with this cluster's gossip key (a host \
                 that is not a member, or a member of another cluster, sends to this port)"
            }
            Self::Stale => {
                "dropped an authentic gossip datagram stamped more than 5 minutes from this \
                 host's clock: keep the hosts' clocks in sync (NTP), or it is a replay"
            }
            Self::Malformed => {
                "dropped an authentic gossip datagram that is not a chitchat message this \
                 version reads; run matching Gantry versions"
            }
        }
    }
}

/// Seals and opens datagrams with one key (the keyed MAC state is made once).
#[derive(Clone)]
pub struct Sealer {
    mac: HmacSha256,
}

impl Sealer {
    pub fn new(key: &GossipKey) -> Self {
        let mac =
            HmacSha256::new_from_slice(key.as_bytes()).expect("HMAC takes a key of any length");
        Self { mac }
    }

    /// The datagram carrying `envelope` (chitchat's serialized message), stamped `now_ms`.
    pub fn seal(&self, now_ms: u64, envelope: &[u8]) -> Vec<u8> {
        let stamp = now_ms.to_be_bytes();
        let mut datagram = Vec::with_capacity(OVERHEAD + envelope.len());
        datagram.extend_from_slice(&stamp);
        datagram.extend_from_slice(envelope);
        let tag = self.tag(&stamp, envelope).finalize().into_bytes();
        datagram.extend_from_slice(&tag);
        datagram
    }

    /// The envelope `datagram` carries, if it is authentic and fresh at `now_ms`.
    pub fn open<'a>(&self, now_ms: u64, datagram: &'a [u8]) -> Result<&'a [u8], DropReason> {
        if datagram.len() < OVERHEAD {
            return Err(DropReason::Short);
        }
        let (stamp, rest) = datagram.split_at(STAMP_LEN);
        let (envelope, tag) = rest.split_at(rest.len() - TAG_LEN);
        self.tag(stamp, envelope)
            .verify_slice(tag)
            .map_err(|_| DropReason::BadMac)?;
        let mut at = [0u8; STAMP_LEN];
        at.copy_from_slice(stamp);
        let skew = u64::from_be_bytes(at).abs_diff(now_ms);
        if u128::from(skew) > MAX_CLOCK_SKEW.as_millis() {
            return Err(DropReason::Stale);
        }
        Ok(envelope)
    }

    fn tag(&self, stamp: &[u8], envelope: &[u8]) -> HmacSha256 {
        let mut mac = self.mac.clone();
        mac.update(CONTEXT);
        mac.update(stamp);
        mac.update(envelope);
        mac
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_700_000_000_000;

    fn sealer(byte: u8) -> Sealer {
        Sealer::new(&GossipKey::from_bytes([byte; 32]))
    }

    #[test]
    fn a_sealed_datagram_opens_to_its_envelope() {
        let s = sealer(1);
        let d = s.seal(NOW, b"chitchat bytes");
        assert_eq!(d.len(), OVERHEAD + 14);
        assert_eq!(s.open(NOW, &d), Ok(&b"chitchat bytes"[..]));
        // An empty envelope is still authenticated.
        assert_eq!(s.open(NOW, &s.seal(NOW, b"")), Ok(&b""[..]));
    }

    #[test]
    fn any_changed_byte_fails_the_tag() {
        let s = sealer(1);
        let d = s.seal(NOW, b"chitchat bytes");
        for i in 0..d.len() {
            let mut forged = d.clone();
            forged[i] ^= 0x01;
            assert_eq!(s.open(NOW, &forged), Err(DropReason::BadMac), "byte {i}");
        }
        // Cut short or lengthened.
        assert_eq!(s.open(NOW, &d[..d.len() - 1]), Err(DropReason::BadMac));
        let mut longer = d.clone();
        longer.push(0);
        assert_eq!(s.open(NOW, &longer), Err(DropReason::BadMac));
    }

    #[test]
    fn another_key_fails_the_tag() {
        let d = sealer(1).seal(NOW, b"chitchat bytes");
        assert_eq!(sealer(2).open(NOW, &d), Err(DropReason::BadMac));
    }

    #[test]
    fn too_short_is_dropped_before_any_check() {
        let s = sealer(1);
        assert_eq!(s.open(NOW, b""), Err(DropReason::Short));
        assert_eq!(s.open(NOW, &[0u8; OVERHEAD - 1]), Err(DropReason::Short));
        assert_eq!(s.open(NOW, &[0u8; OVERHEAD]), Err(DropReason::BadMac));
    }

    #[test]
    fn stamps_beyond_the_skew_are_stale_either_way() {
        let s = sealer(1);
        let skew = MAX_CLOCK_SKEW.as_millis() as u64;
        for (stamp, ok) in [
            (NOW - skew, true),
            (NOW + skew, true),
            (NOW - skew - 1, false),
            (NOW + skew + 1, false),
            (0, false),
        ] {
            let datagram = s.seal(stamp, b"x");
            let got = s.open(NOW, &datagram);
            assert_eq!(got.is_ok(), ok, "stamp {stamp}: {got:?}");
            if !ok {
                assert_eq!(got, Err(DropReason::Stale));
            }
        }
    }
}
