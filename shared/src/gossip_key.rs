//! The cluster's gossip key: 32 random bytes the coordinator makes once for its cluster and
//! hands to each node on its authenticated control session (at join, and again at every
//! hello). Every gossip datagram carries a MAC made with it (`gantry_membership`), so a
//! host without it cannot add members or capacity to anyone's view.
//!
//! It travels and is stored as standard base64. It is a secret: `Debug` does not show it
//! and there is no `Display`; [`GossipKey::to_base64`] is the one way to spell it out.

use base64::Engine as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Clone, PartialEq, Eq)]
pub struct GossipKey([u8; GossipKey::LEN]);

/// Text that is not a base64-encoded 32-byte key.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("a gossip key is {} bytes in base64; this is {what}", GossipKey::LEN)]
pub struct BadGossipKey {
    what: String,
}

impl GossipKey {
    pub const LEN: usize = 32;

    pub const fn from_bytes(bytes: [u8; Self::LEN]) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; Self::LEN] {
        &self.0
    }

    /// Reads the base64 text [`GossipKey::to_base64`] writes (surrounding white space
    /// allowed).
    pub fn parse(text: &str) -> Result<Self, BadGossipKey> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text.trim())
            .map_err(|e| BadGossipKey {
                what: format!("not base64 ({e})"),
            })?;
        let len = bytes.len();
        bytes.try_into().map(Self).map_err(|_| BadGossipKey {
            what: format!("{len} bytes"),
        })
    }

    pub fn to_base64(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.0)
    }
}

impl std::fmt::Debug for GossipKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GossipKey(..)")
    }
}

impl Serialize for GossipKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_base64())
    }
}

impl<'de> Deserialize<'de> for GossipKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Self::parse(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_as_base64_and_hides_itself() {
        let key = GossipKey::from_bytes([7; 32]);
        let json = serde_json::to_string(&key).expect("json");
        assert_eq!(json, format!("\"{}\"", key.to_base64()));
        assert_eq!(
            serde_json::from_str::<GossipKey>(&json).expect("parse"),
            key
        );
        assert_eq!(
            GossipKey::parse(&format!(" {}\n", key.to_base64())),
            Ok(key.clone())
        );
        assert_eq!(format!("{key:?}"), "GossipKey(..)");
    }

    #[test]
    fn anything_but_32_bytes_is_refused() {
        let short = base64::engine::general_purpose::STANDARD.encode([1u8; 16]);
        let e = GossipKey::parse(&short).expect_err("16 bytes");
        assert_eq!(
            e.to_string(),
            "a gossip key is 32 bytes in base64; this is 16 bytes"
        );
        assert!(GossipKey::parse("not base64!").is_err());
        assert!(serde_json::from_str::<GossipKey>("\"AAAA\"").is_err());
    }
}
