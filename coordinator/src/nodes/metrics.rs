//! The coordinator's gossip in `/metrics`, read from its member's counters at each scrape:
//! `gantry_gossip_datagrams_dropped_total{reason}` (datagrams that did not authenticate,
//! by [`DropReason`]) and the bytes sent and accepted. (Names here lack the `gantry_`
//! prefix: the API's registry adds it.)

use std::sync::Arc;
use std::sync::atomic::Ordering;

use gantry_membership::{DropReason, Traffic};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;

#[derive(Debug)]
pub(super) struct GossipMetrics(pub(super) Arc<Traffic>);

impl Collector for GossipMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let t = &self.0;
        let mut dropped = encoder.encode_descriptor(
            "gossip_datagrams_dropped",
            "Gossip datagrams dropped unread: short (no room for a tag), bad_mac (not \
             signed with this cluster's gossip key), stale (stamped too far from this \
             clock), malformed (authentic but unreadable)",
            None,
            MetricType::Counter,
        )?;
        for reason in DropReason::ALL {
            let labels = [("reason", reason.as_str())];
            ConstCounter::new(t.dropped(reason)).encode(dropped.encode_family(&labels)?)?;
        }
        for (name, help, bytes) in [
            (
                "gossip_sent_bytes",
                "Bytes of gossip datagrams sent",
                &t.sent,
            ),
            (
                "gossip_received_bytes",
                "Bytes of gossip datagrams received and accepted",
                &t.received,
            ),
        ] {
            ConstCounter::new(bytes.load(Ordering::Relaxed)).encode(encoder.encode_descriptor(
                name,
                help,
                None,
                MetricType::Counter,
            )?)?;
        }
        Ok(())
    }
}
