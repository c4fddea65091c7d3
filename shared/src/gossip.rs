//! What cluster members publish about themselves through chitchat gossip, and its compact
//! encoding as chitchat key-values.
//!
//! Every agent publishes its address, labels, state, cpu/memory (total and free), one key
//! per GPU and the images its own store holds under names a short image name can match
//! ([`LocalImages`]); the coordinator publishes its role and endpoints. Values are short JSON
//! objects with one-letter field names, and each GPU has its own key, so a health change
//! re-gossips ~150 bytes, not the whole inventory. A node with 8 GPUs encodes to about
//! 1.5 KB, far below one gossip datagram (64 KB).
//!
//! Gossip is advisory: the coordinator places against its own ledger of reservations and
//! the capacity the node declared on its authenticated control session; gossip adds
//! liveness, free capacity as the node sees it, labels, GPU health and local images.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Bumped on an incompatible change to the encoding below.
pub const GOSSIP_VERSION: u32 = 2;

pub const KEY_VERSION: &str = "v";
pub const KEY_ROLE: &str = "role";
/// The IP other members and containers reach the node at.
pub const KEY_ADDR: &str = "addr";
pub const KEY_LABELS: &str = "labels";
pub const KEY_RESOURCES: &str = "res";
/// Number of GPUs: keys `gpu.0` .. `gpu.<n-1>` are current, any above are stale.
pub const KEY_GPU_COUNT: &str = "gpus";
pub const GPU_KEY_PREFIX: &str = "gpu.";
/// The node's local images ([`LocalImages`]); absent from agents that predate it.
pub const KEY_IMAGES: &str = "imgs";
/// The coordinator's control (QUIC) and API (HTTP) addresses.
pub const KEY_CONTROL: &str = "control";
pub const KEY_API: &str = "api";

/// A GPU's health as its node sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case", tag = "status", content = "reason")]
pub enum GpuHealth {
    Healthy,
    /// Usable but worth a look (thermal or power throttling); still placed.
    Degraded(String),
    /// Never placed (critical Xid, double-bit ECC, lost from the bus): `xid_79`, `ecc_dbe`.
    Unhealthy(crate::attempt::GpuFault),
}

impl GpuHealth {
    pub fn is_unhealthy(&self) -> bool {
        matches!(self, Self::Unhealthy(_))
    }

    /// `ok`, `degraded:<reason>` or `unhealthy:<reason>`.
    pub fn to_compact(&self) -> String {
        match self {
            Self::Healthy => "ok".into(),
            Self::Degraded(r) => format!("degraded:{r}"),
            Self::Unhealthy(r) => format!("unhealthy:{r}"),
        }
    }

    fn from_compact(s: &str) -> Option<Self> {
        match s.split_once(':') {
            None if s == "ok" => Some(Self::Healthy),
            Some(("degraded", r)) => Some(Self::Degraded(r.into())),
            Some(("unhealthy", r)) => r.parse().ok().map(Self::Unhealthy),
            _ => None,
        }
    }
}

/// One GPU of a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct GpuInfo {
    /// Host index (`/dev/nvidia<index>`, NVML's index).
    pub index: u32,
    pub uuid: String,
    /// Product name as NVML reports it, or the simulated model (`H100-80GB`).
    pub model: String,
    pub memory_bytes: u64,
    /// PCI bus id (`00000000:1B:00.0`); empty for simulated GPUs.
    pub pci_bus_id: String,
    pub numa_node: Option<u32>,
    /// GPUs with the same group are connected by NVLink (one NVLink domain); `None`
    /// without NVLink.
    pub nvlink_group: Option<u32>,
    pub health: GpuHealth,
    /// Declared in the agent's configuration, not real hardware: never injected into
    /// containers as a device.
    pub simulated: bool,
}

impl GpuInfo {
    /// A simulated GPU of `node`: healthy, no PCI address, no topology, and a UUID
    /// (`GPU-SIM-<node>-<index>`) that says what it is. The one definition the agent's
    /// simulated inventory, tests and benchmarks share.
    pub fn simulated(node: &str, index: u32, model: &str, memory_bytes: u64) -> GpuInfo {
        GpuInfo {
            index,
            uuid: format!("GPU-SIM-{node}-{index}"),
            model: model.into(),
            memory_bytes,
            pci_bus_id: String::new(),
            numa_node: None,
            nvlink_group: None,
            health: GpuHealth::Healthy,
            simulated: true,
        }
    }
}

/// Wire form of a GPU: short field names, health as one string.
#[derive(Serialize, Deserialize)]
struct GpuWire {
    u: String,
    m: String,
    /// Memory in MiB.
    g: u64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    p: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    n: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    l: Option<u32>,
    h: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    s: bool,
}

/// cpu and memory as the node sees them: total offered to jobs, and what running
/// containers leave free.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
pub struct NodeResources {
    pub cpu_millis: u64,
    pub free_cpu_millis: u64,
    pub memory_bytes: u64,
    pub free_memory_bytes: u64,
}

#[derive(Serialize, Deserialize)]
struct ResourcesWire {
    /// cpu millis: total, free.
    c: [u64; 2],
    /// memory bytes: total, free.
    m: [u64; 2],
    /// Indices of GPUs no container holds.
    #[serde(default)]
    f: Vec<u32>,
}

/// The images a node holds in its own store that a short (unqualified) image name can
/// resolve to there ([`crate::image_name::answers_unqualified`]), so the coordinator can
/// refuse a job whose short image is on no node and not in the cluster's registry. Gossiped
/// as a JSON array of names, at most [`LocalImages::MAX_BYTES`] of them; a node with more
/// says `*`: it may hold anything.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum LocalImages {
    /// Not published (an agent older than this key): it may hold anything.
    #[default]
    Unreported,
    /// Every such image, by the name it is stored under (`busybox:latest`,
    /// `docker.io/library/busybox:latest`).
    Listed(BTreeSet<String>),
    /// Not listed: more than fit in [`LocalImages::MAX_BYTES`], or the node could not read
    /// its store. It may hold anything.
    Unlisted,
}

impl LocalImages {
    /// Most bytes of names a node publishes (about 300 names of typical length; a datagram
    /// holds 64 KB): enough for what operators import by hand, while a node's gossip stays
    /// small. Past it the node says it has too many to list.
    pub const MAX_BYTES: usize = 8 << 10;

    /// The names among `stored` (every name in a node's image store) that short names can
    /// resolve to, bounded by [`LocalImages::MAX_BYTES`].
    pub fn from_stored(stored: impl IntoIterator<Item = String>) -> Self {
        let names: BTreeSet<String> = stored
            .into_iter()
            .filter(|n| crate::image_name::answers_unqualified(n))
            .collect();
        // Each name costs its bytes plus quotes and a comma in the JSON array.
        let bytes: usize = names.iter().map(|n| n.len() + 3).sum();
        match bytes <= Self::MAX_BYTES {
            true => Self::Listed(names),
            false => Self::Unlisted,
        }
    }

    /// Whether the node holds the short name `image`; `None` when it cannot be told.
    pub fn holds(&self, image: &str) -> Option<bool> {
        match self {
            Self::Listed(names) => Some(
                crate::image_name::local_candidates(image)
                    .iter()
                    .any(|c| names.contains(c)),
            ),
            Self::Unreported | Self::Unlisted => None,
        }
    }

    fn to_wire(&self) -> Option<String> {
        match self {
            Self::Unreported => None,
            Self::Listed(names) => Some(json(names)),
            Self::Unlisted => Some("*".into()),
        }
    }

    fn from_wire(raw: Option<&str>) -> Result<Self, GossipError> {
        match raw {
            None => Ok(Self::Unreported),
            Some("*") => Ok(Self::Unlisted),
            Some(raw) => serde_json::from_str(raw)
                .map(Self::Listed)
                .map_err(|_| bad(KEY_IMAGES, raw)),
        }
    }
}

/// Everything an agent publishes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentGossip {
    pub addr: IpAddr,
    pub labels: BTreeMap<String, String>,
    pub resources: NodeResources,
    /// Indices of GPUs not held by a container.
    pub free_gpus: Vec<u32>,
    pub gpus: Vec<GpuInfo>,
    pub images: LocalImages,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GossipError {
    #[error("gossip format version {found} is not {GOSSIP_VERSION}; upgrade the older member")]
    Version { found: String },
    #[error("gossip key `{key}` is missing")]
    Missing { key: String },
    #[error("gossip key `{key}` has a bad value `{value}`")]
    Bad { key: String, value: String },
    #[error("member's role is `{found}`, expected `{expected}`")]
    Role {
        found: String,
        expected: &'static str,
    },
}

fn bad(key: &str, value: &str) -> GossipError {
    GossipError::Bad {
        key: key.into(),
        value: value.into(),
    }
}

fn json<T: Serialize>(v: &T) -> String {
    // Plain structs of strings and numbers always serialize.
    serde_json::to_string(v).unwrap_or_default()
}

/// `rack=r1,spot=true`: the form labels take on the command line and in gossip.
pub fn format_labels(labels: &BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Parses one `key=value` label. Keys and values are 1–63 characters of `a-z A-Z 0-9 . _ -`
/// (keys may also hold `/`), as Kubernetes labels.
pub fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("label `{s}` is not KEY=VALUE (e.g. `rack=r1`)"))?;
    let ok = |t: &str, slash: bool| {
        (1..=63).contains(&t.len())
            && t.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b) || (slash && b == b'/'))
    };
    if !ok(k, true) {
        return Err(format!(
            "label key `{k}` must be 1-63 characters of letters, digits, `._-/`"
        ));
    }
    if !ok(v, false) {
        return Err(format!(
            "label value `{v}` must be 1-63 characters of letters, digits, `._-`"
        ));
    }
    Ok((k.into(), v.into()))
}

impl AgentGossip {
    /// The key-values to publish. Keys `gpu.<n>` above the current count stay as stale
    /// leftovers in chitchat until deleted; [`KEY_GPU_COUNT`] says which are current.
    pub fn to_key_values(&self) -> Vec<(String, String)> {
        let mut kv = vec![
            (KEY_VERSION.into(), GOSSIP_VERSION.to_string()),
            (KEY_ROLE.into(), "agent".into()),
            (KEY_ADDR.into(), self.addr.to_string()),
            (KEY_LABELS.into(), format_labels(&self.labels)),
            (
                KEY_RESOURCES.into(),
                json(&ResourcesWire {
                    c: [self.resources.cpu_millis, self.resources.free_cpu_millis],
                    m: [
                        self.resources.memory_bytes,
                        self.resources.free_memory_bytes,
                    ],
                    f: self.free_gpus.clone(),
                }),
            ),
            (KEY_GPU_COUNT.into(), self.gpus.len().to_string()),
        ];
        kv.extend(self.images.to_wire().map(|v| (KEY_IMAGES.into(), v)));
        for (i, g) in self.gpus.iter().enumerate() {
            kv.push((
                format!("{GPU_KEY_PREFIX}{i}"),
                json(&GpuWire {
                    u: g.uuid.clone(),
                    m: g.model.clone(),
                    g: g.memory_bytes >> 20,
                    p: g.pci_bus_id.clone(),
                    n: g.numa_node,
                    l: g.nvlink_group,
                    h: g.health.to_compact(),
                    s: g.simulated,
                }),
            ));
        }
        kv
    }

    /// Reads what an agent published. `get` looks a key up in the member's state.
    pub fn decode<'a>(get: impl Fn(&str) -> Option<&'a str>) -> Result<Self, GossipError> {
        let need = |key: &str| get(key).ok_or_else(|| GossipError::Missing { key: key.into() });
        let version = need(KEY_VERSION)?;
        if version != GOSSIP_VERSION.to_string() {
            return Err(GossipError::Version {
                found: version.into(),
            });
        }
        let role = need(KEY_ROLE)?;
        if role != "agent" {
            return Err(GossipError::Role {
                found: role.into(),
                expected: "agent",
            });
        }
        let addr = need(KEY_ADDR)?;
        let addr = addr.parse().map_err(|_| bad(KEY_ADDR, addr))?;
        let labels_raw = need(KEY_LABELS)?;
        let mut labels = BTreeMap::new();
        for l in labels_raw.split(',').filter(|l| !l.is_empty()) {
            let (k, v) = parse_label(l).map_err(|_| bad(KEY_LABELS, labels_raw))?;
            labels.insert(k, v);
        }
        let res_raw = need(KEY_RESOURCES)?;
        let res: ResourcesWire =
            serde_json::from_str(res_raw).map_err(|_| bad(KEY_RESOURCES, res_raw))?;
        let count_raw = need(KEY_GPU_COUNT)?;
        let count: u32 = count_raw
            .parse()
            .ok()
            .filter(|&c| c <= 1024)
            .ok_or_else(|| bad(KEY_GPU_COUNT, count_raw))?;
        let mut gpus = Vec::with_capacity(count as usize);
        for index in 0..count {
            let key = format!("{GPU_KEY_PREFIX}{index}");
            let raw = need(&key)?;
            let w: GpuWire = serde_json::from_str(raw).map_err(|_| bad(&key, raw))?;
            gpus.push(GpuInfo {
                index,
                uuid: w.u,
                model: w.m,
                memory_bytes: w.g << 20,
                pci_bus_id: w.p,
                numa_node: w.n,
                nvlink_group: w.l,
                health: GpuHealth::from_compact(&w.h).ok_or_else(|| bad(&key, raw))?,
                simulated: w.s,
            });
        }
        Ok(Self {
            addr,
            labels,
            resources: NodeResources {
                cpu_millis: res.c[0],
                free_cpu_millis: res.c[1],
                memory_bytes: res.m[0],
                free_memory_bytes: res.m[1],
            },
            free_gpus: res.f,
            gpus,
            images: LocalImages::from_wire(get(KEY_IMAGES))?,
        })
    }
}

/// What the coordinator publishes.
pub fn coordinator_key_values(control: &str, api: &str) -> Vec<(String, String)> {
    vec![
        (KEY_VERSION.into(), GOSSIP_VERSION.to_string()),
        (KEY_ROLE.into(), "coordinator".into()),
        (KEY_CONTROL.into(), control.into()),
        (KEY_API.into(), api.into()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h100(index: u32) -> GpuInfo {
        GpuInfo {
            index,
            uuid: format!("GPU-5b8e1c4d-8a3f-4e1b-9c2d-7f6a5b4c3d{index:02}"),
            model: "NVIDIA H100 80GB HBM3".into(),
            memory_bytes: 81_559 << 20,
            pci_bus_id: format!("00000000:{:02X}:00.0", 0x18 + index),
            numa_node: Some(index / 4),
            nvlink_group: Some(0),
            health: GpuHealth::Healthy,
            simulated: false,
        }
    }

    fn node() -> AgentGossip {
        let mut gpus: Vec<_> = (0..8).map(h100).collect();
        gpus[3].health = GpuHealth::Unhealthy(crate::attempt::GpuFault::Xid(79));
        gpus[5].health = GpuHealth::Degraded("thermal_slowdown".into());
        AgentGossip {
            addr: "10.0.3.17".parse().expect("ip"),
            labels: [("rack", "r12"), ("spot", "true")]
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .into(),
            resources: NodeResources {
                cpu_millis: 192_000,
                free_cpu_millis: 100_000,
                memory_bytes: 2 << 40,
                free_memory_bytes: 1 << 40,
            },
            free_gpus: vec![0, 1, 2, 4],
            gpus,
            images: LocalImages::from_stored(["busybox:latest".to_string()]),
        }
    }

    fn roundtrip(n: &AgentGossip) -> Result<AgentGossip, GossipError> {
        let kv: BTreeMap<_, _> = n.to_key_values().into_iter().collect();
        AgentGossip::decode(|k| kv.get(k).map(String::as_str))
    }

    #[test]
    fn roundtrips() {
        let n = node();
        assert_eq!(roundtrip(&n), Ok(n));
    }

    #[test]
    fn eight_gpus_fit_comfortably_in_one_datagram() {
        let bytes: usize = node()
            .to_key_values()
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum();
        // chitchat adds ~16 bytes of framing per key-value; a datagram holds 65,507.
        assert!(bytes < 2_000, "{bytes} bytes");
    }

    #[test]
    fn bad_values_name_the_key() {
        let mut kv: BTreeMap<_, _> = node().to_key_values().into_iter().collect();
        kv.insert("gpu.2".into(), "{not json".into());
        let err = AgentGossip::decode(|k| kv.get(k).map(String::as_str)).expect_err("bad gpu");
        assert!(err.to_string().contains("gpu.2"), "{err}");
        kv.insert(KEY_VERSION.into(), "7".into());
        assert!(matches!(
            AgentGossip::decode(|k| kv.get(k).map(String::as_str)),
            Err(GossipError::Version { .. })
        ));
        kv.remove(KEY_VERSION);
        assert!(matches!(
            AgentGossip::decode(|k| kv.get(k).map(String::as_str)),
            Err(GossipError::Missing { .. })
        ));
    }

    #[test]
    fn local_images_roundtrip_and_answer_short_names() {
        let mut n = node();
        for images in [
            LocalImages::Unreported,
            LocalImages::Unlisted,
            LocalImages::from_stored(Vec::new()),
            LocalImages::from_stored(
                [
                    "team/x:v1",
                    "docker.io/library/alpine:3",
                    "10.0.0.1:7080/y:latest",
                ]
                .map(String::from),
            ),
        ] {
            n.images = images;
            assert_eq!(roundtrip(&n), Ok(n.clone()));
        }
        assert_eq!(n.images.holds("team/x:v1"), Some(true));
        assert_eq!(n.images.holds("alpine:3"), Some(true));
        assert_eq!(n.images.holds("team/x"), Some(false), "only :v1 is there");
        assert_eq!(
            n.images.holds("y"),
            Some(false),
            "pulled from the cluster registry: not a local image"
        );
        assert_eq!(LocalImages::Unlisted.holds("y"), None);
        assert_eq!(LocalImages::Unreported.holds("y"), None);
    }

    #[test]
    fn too_many_local_images_are_unlisted() {
        let many = (0..1000).map(|i| format!("team/image-number-{i}:latest"));
        assert_eq!(LocalImages::from_stored(many), LocalImages::Unlisted);
        let mut n = node();
        n.images = LocalImages::from_stored((0..200).map(|i| format!("img-{i}:latest")));
        let bytes: usize = n
            .to_key_values()
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum();
        assert!(bytes < 2_000 + LocalImages::MAX_BYTES, "{bytes} bytes");
    }

    #[test]
    fn labels_are_checked() {
        assert_eq!(parse_label("rack=r1"), Ok(("rack".into(), "r1".into())));
        assert_eq!(
            parse_label("topology.gantry.dev/block=b2"),
            Ok(("topology.gantry.dev/block".into(), "b2".into()))
        );
        for bad in ["rack", "=x", "rack=", "ra ck=1", "rack=a,b", "k=v/w"] {
            assert!(parse_label(bad).is_err(), "{bad}");
        }
    }
}
