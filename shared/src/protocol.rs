//! The control protocol between agents and the coordinator (over QUIC, mutual TLS).
//!
//! Each request is one bidirectional QUIC stream carrying one request frame and one
//! response frame. A frame is a 4-byte big-endian length followed by that many bytes of
//! JSON; frames above [`MAX_FRAME`] are refused before their body is read. Every first
//! exchange names the protocol version and the cluster, and a mismatch gets a
//! [`Refusal`] that says what is wrong instead of a decode error.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::attempt::{EndCause, Generation, Owner, StartFailure};
use crate::calls::{InputResult, LeasedInput, Payload};
use crate::gossip_key::GossipKey;
use crate::ids::{ClusterId, InputId, NodeId};
use crate::volumes::{VolumeBackend, VolumeName, VolumeOp};

/// Bumped on any incompatible change to the messages below. 5: `joined` and `welcome`
/// carry the cluster's gossip key. 7: web endpoints served through the runtime API. 8:
/// secrets in `AttemptSpec`. 9: volumes (`Command::Volume`, `AttemptSpec.volumes`, a
/// node's shared volume storage in its capacity). 10: image builds (`Command::Build`). 11:
/// code mounts (`AttemptSpec.code`). 12: streamed chunks of running inputs
/// (`Request::Outputs.chunks`).
pub const PROTOCOL_VERSION: u32 = 12;

/// TLS application protocol name of the control plane.
pub const ALPN: &[u8] = b"gantry-control/3";

/// Largest frame either side accepts (4 MiB): a certificate request, a job spec or a batch
/// of events fit easily, and so does one function input or output at its inline limit of
/// 2 MiB once base64 has grown it by a third; anything bigger is a bug or an attack.
pub const MAX_FRAME: usize = 4 << 20;

/// Most payload bytes one `Deliver` or `Outputs` batch carries, and most items: a batch
/// takes items while it stays under both, and always takes at least one (an item is at most
/// [`crate::calls::Payload::MAX_BYTES`], which fits a frame alone).
pub const BATCH_PAYLOAD_BYTES: usize = 1 << 20;
pub const BATCH_MAX_ITEMS: usize = 512;

/// Splits `items` into batches in order, by the payload bytes `size` counts for each (see
/// [`BATCH_PAYLOAD_BYTES`]).
pub fn batches<T>(items: impl IntoIterator<Item = T>, size: impl Fn(&T) -> usize) -> Vec<Vec<T>> {
    let mut out: Vec<Vec<T>> = Vec::new();
    let mut bytes = 0;
    for item in items {
        let n = size(&item);
        match out.last_mut() {
            Some(last) if last.len() < BATCH_MAX_ITEMS && bytes + n <= BATCH_PAYLOAD_BYTES => {
                bytes += n;
                last.push(item);
            }
            _ => {
                bytes = n;
                out.push(vec![item]);
            }
        }
    }
    out
}

impl OutputItem {
    /// The payload bytes it carries, for [`batches`].
    pub fn payload_bytes(&self) -> usize {
        self.result.size()
    }
}

/// The DNS name in a node's certificate: `<node-id>.node.gantry`. The coordinator
/// accepts a connection as node N only if its certificate is valid for N's name.
pub fn node_dns_name(node: &NodeId) -> String {
    format!("{node}.node.gantry")
}

/// The DNS name the coordinator's certificate carries; agents verify it.
pub const COORDINATOR_DNS_NAME: &str = "coordinator.gantry";

/// A request from an agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum Request {
    /// First contact, without a client certificate: trade a one-time join token and a
    /// certificate signing request for a certificate naming `node`.
    Join {
        protocol_version: u32,
        token: String,
        node: NodeId,
        csr_pem: String,
    },
    /// Opening of a session, with the node's certificate.
    Hello {
        protocol_version: u32,
        cluster: ClusterId,
        node: NodeId,
        /// What the node offers to jobs.
        capacity: NodeCapacity,
        /// This run of the agent (its start time, unix ms; also its gossip generation):
        /// tells a restarted agent from a second agent using the same identity.
        #[serde(default)]
        instance: u64,
        /// Where the agent gossips (`ip:port`), so the coordinator can contact it.
        #[serde(default)]
        gossip: Option<std::net::SocketAddr>,
    },
    /// The node's spot-interruption watcher saw a notice: its work must be gone by
    /// `deadline_ms` (unix ms). The coordinator marks it preempting.
    Preempting { deadline_ms: u64 },
    /// The agent is stopping to be restarted (an upgrade) and will be back within
    /// `back_within_ms`: until then the coordinator calls the node suspect, not down, and
    /// leaves its work in place (its containers keep running without the agent).
    Restarting { back_within_ms: u64 },
    /// Events the agent has not yet seen acknowledged, oldest first. Sequence numbers
    /// only grow per node; the coordinator applies each at most once and acknowledges
    /// the highest it has applied.
    Events { events: Vec<SequencedEvent> },
    /// Function containers' answers, oldest first (a batch: one commit for all of them).
    /// The coordinator records the first answer for an input's current lease and ignores
    /// any other, so a resend after a lost reply does no harm. `Noted` covers every answer
    /// of the batch; a refusal covers none.
    ///
    /// `chunks` are streamed chunks of running inputs (protocol 12), oldest first, applied
    /// before the batch's answers: the agent queues a chunk before its input's answer on
    /// the same ordered path, so the coordinator holds every chunk of an input before it
    /// records the input's end. Chunks live in the coordinator's memory only.
    Outputs {
        outputs: Vec<OutputItem>,
        #[serde(default)]
        chunks: Vec<ChunkItem>,
    },
}

/// One streamed chunk of input `input` (try `attempt`), from its function container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkItem {
    pub owner: Owner,
    pub generation: Generation,
    pub input: InputId,
    pub attempt: u32,
    /// Its number among the chunks of this attempt of the input: 0, 1, 2… in the order the
    /// container posted them (a resent one is known by it and kept once).
    pub seq: u64,
    pub payload: Payload,
}

impl ChunkItem {
    /// The payload bytes it carries, for [`batches`].
    pub fn payload_bytes(&self) -> usize {
        self.payload.bytes.len()
    }
}

/// One function container's answer to input `input` (try `attempt`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputItem {
    pub owner: Owner,
    pub generation: Generation,
    pub input: InputId,
    pub attempt: u32,
    pub result: InputResult,
    /// When the container answered (unix ms).
    pub at_ms: u64,
}

/// A node's resources for jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeCapacity {
    pub cpu_millis: u64,
    pub memory_bytes: u64,
    pub gpus: u32,
    /// The node declares shared volume storage (`[volumes] shared_path`): it may run what
    /// mounts a shared volume, and serve such volumes' files.
    #[serde(default)]
    pub shared_volumes: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SequencedEvent {
    pub seq: u64,
    pub event: Event,
}

/// Something that happened to an attempt on a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum Event {
    Started {
        owner: Owner,
        generation: Generation,
        at_ms: u64,
        /// How long getting its image ready took (pull and unpack; 0 when cached).
        #[serde(default)]
        image_ms: u64,
    },
    /// The attempt waits on something the platform owes it (its image's registry cannot be
    /// reached now); the agent keeps trying. For the history, sent once per cause.
    Waiting {
        owner: Owner,
        generation: Generation,
        message: String,
    },
    /// A function container said `ready`: it takes inputs from now on.
    Ready {
        owner: Owner,
        generation: Generation,
        at_ms: u64,
    },
    /// A function container's setup failed (`POST /v1/init/error`, or no `ready` within
    /// its startup timeout); the agent stops it.
    InitFailed {
        owner: Owner,
        generation: Generation,
        message: String,
    },
    /// The container could not be started (bad image, missing command, …).
    StartFailed {
        owner: Owner,
        generation: Generation,
        /// What went wrong, for people.
        message: String,
        /// Whose fault it was, for decisions.
        failure: StartFailure,
    },
    Exited {
        owner: Owner,
        generation: Generation,
        exit_code: Option<i32>,
        signal: Option<i32>,
        /// How it ended, for decisions.
        cause: EndCause,
        /// How it ended, for people (`exited`, `oom_killed`, `gpu_xid_79`, …).
        message: String,
        at_ms: u64,
    },
}

impl Event {
    pub fn owner(&self) -> &Owner {
        match self {
            Event::Started { owner, .. }
            | Event::Waiting { owner, .. }
            | Event::Ready { owner, .. }
            | Event::InitFailed { owner, .. }
            | Event::StartFailed { owner, .. }
            | Event::Exited { owner, .. } => owner,
        }
    }

    pub fn generation(&self) -> Generation {
        match self {
            Event::Started { generation, .. }
            | Event::Waiting { generation, .. }
            | Event::Ready { generation, .. }
            | Event::InitFailed { generation, .. }
            | Event::StartFailed { generation, .. }
            | Event::Exited { generation, .. } => *generation,
        }
    }
}

/// What the coordinator tells an agent, on a stream the coordinator opens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum Command {
    Start(AttemptSpec),
    Stop {
        owner: Owner,
        generation: Generation,
        grace_ms: u64,
    },
    /// Send the attempt's output: after an `accepted` reply the agent writes log chunks
    /// (see [`log_chunk`]) and finishes the stream at the end of the retained output, or,
    /// with `follow`, once the container has exited and its output is drained.
    Logs {
        owner: Owner,
        generation: Generation,
        follow: bool,
    },
    /// Is this session's agent still there? Answered `accepted` at once. Sent when a
    /// second agent says hello as the same node.
    Ping,
    /// An operator cleared GPU `index`: it is healthy again and may be placed on.
    ClearGpu {
        index: u32,
    },
    /// Hand `inputs` (in order) to the function container's runtime API (its next `GET
    /// /v1/inputs/next`s). Refused `NotRunning` when the container is gone.
    Deliver {
        owner: Owner,
        generation: Generation,
        inputs: Vec<LeasedInput>,
    },
    /// The input's call was cancelled: tell the container through its events, and stop it
    /// if it still holds the input after `grace_ms`.
    CancelInput {
        owner: Owner,
        generation: Generation,
        input: InputId,
        grace_ms: u64,
    },
    /// Scale-down: the container gets `410 Gone` from `next` and a `drain` event, finishes
    /// what it holds and exits; it is stopped if it has not exited after `grace_ms`. With
    /// `preempt_deadline_ms` its node is being preempted: the container first gets a
    /// `preempt` event with that deadline (unix ms).
    Drain {
        owner: Owner,
        generation: Generation,
        grace_ms: u64,
        #[serde(default)]
        preempt_deadline_ms: Option<u64>,
    },
    /// Open a connection to the web endpoint container's server for one request: after
    /// `Accepted`, the rest of this stream is that connection's bytes both ways (the
    /// coordinator's ingress speaks HTTP/1.1 over it). `NotRunning` when the container is
    /// gone, not ready or draining; `Refused` when its server does not accept.
    Web {
        owner: Owner,
        generation: Generation,
    },
    /// Act on a volume whose files this node holds (see [`VolumeOp`] for what each
    /// operation streams). Answered with a [`crate::volumes::VolumeReply`] frame, not a
    /// `CommandReply`: after the request's bytes for a write, or before the file's
    /// bytes for a read.
    Volume {
        name: VolumeName,
        backend: VolumeBackend,
        op: VolumeOp,
    },
    /// Run one piece of an image build here; answered with
    /// [`crate::recipes::BuildFrame`]s, not a `CommandReply`.
    Build(crate::recipes::BuildWork),
}

/// Which stream a log chunk carries.
pub const LOG_STDOUT: u8 = 1;
pub const LOG_STDERR: u8 = 2;

/// A log chunk on the wire: the stream byte, a 4-byte big-endian length, the bytes.
pub fn log_chunk(stream: u8, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + data.len());
    out.push(stream);
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// One attempt on one node, as the agent needs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptSpec {
    pub owner: Owner,
    /// Only ever increases per owner; agents refuse commands older than what they saw.
    pub generation: Generation,
    pub image: String,
    pub command: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cpu_millis: u64,
    pub memory_bytes: u64,
    /// Host GPU indices on this node.
    pub gpus: Vec<u32>,
    pub timeout_ms: Option<u64>,
    /// Set for a function's container: the agent serves the runtime API to it.
    #[serde(default)]
    pub function: Option<FunctionRuntime>,
    /// The secrets the container gets, with their values (kept in memory only).
    #[serde(default)]
    pub secrets: Vec<crate::secrets::SecretDelivery>,
    /// The volumes mounted into the container.
    #[serde(default)]
    pub volumes: Vec<crate::volumes::VolumeAttach>,
    /// The code mounts the agent assembles from registry blobs and mounts read-only.
    #[serde(default)]
    pub code: Vec<crate::code::CodeMount>,
}

/// How a function container is served its inputs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionRuntime {
    /// Inputs the container may hold at once (a web endpoint's: its `max_concurrency`).
    pub max_inputs: u32,
    /// Longest from start to `ready`; past it the container fails its setup.
    pub startup_timeout_ms: u64,
    /// Longest one input may run: the deadline the agent gives a web request that it
    /// turns into an input (calls' inputs carry theirs from the coordinator).
    pub timeout_ms: u64,
    /// A web endpoint, and how its requests reach the code.
    #[serde(default)]
    pub web: Option<WebRuntime>,
}

/// A web endpoint's container, as its agent serves it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "via")]
pub enum WebRuntime {
    /// An HTTP server on `port` in the container's own network namespace, ready when its
    /// probe passes; the container does not use the runtime API.
    Port { port: u16, readiness: Readiness },
    /// Each request becomes an `http` input on the runtime API; ready at `POST /v1/ready`.
    RuntimeApi,
}

/// How an agent knows a web endpoint's server is up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum Readiness {
    /// A TCP connection to the port is accepted.
    Tcp,
    /// `GET path` answers 2xx or 3xx.
    Http { path: String },
}

impl Readiness {
    /// `tcp`, or `GET /path`.
    pub fn parse(text: &str) -> Result<Readiness, String> {
        let text = text.trim();
        if text.eq_ignore_ascii_case("tcp") {
            return Ok(Readiness::Tcp);
        }
        let bad = || {
            format!(
                "`{text}` is not a probe; write `GET /health` (an HTTP GET that answers 2xx or 3xx) or `tcp` (a connection is accepted)"
            )
        };
        let (method, path) = text.split_once(' ').ok_or_else(bad)?;
        let path = path.trim();
        if method != "GET"
            || !path.starts_with('/')
            || path.len() > 1024
            || path.chars().any(|c| c.is_control() || c.is_whitespace())
        {
            return Err(bad());
        }
        Ok(Readiness::Http {
            path: path.to_owned(),
        })
    }
}

/// An agent's answer to a command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum CommandReply {
    Accepted,
    Refused(Refusal),
    /// To a stop: nothing of that generation runs or starts here (it exited, or the node
    /// never had it), so no exit event will follow.
    NotRunning,
}

/// The coordinator's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum Response {
    Joined {
        cluster: ClusterId,
        certificate_pem: String,
        ca_pem: String,
        /// An API token (reader) the node pulls images from the embedded registry with.
        registry_token: String,
        /// The key every gossip datagram is authenticated with; the node keeps it with
        /// its identity.
        gossip_key: GossipKey,
    },
    Welcome {
        cluster: ClusterId,
        node: NodeId,
        /// Where the embedded registry is (`host:port`): unqualified image names resolve
        /// there.
        registry: Option<String>,
        /// The registry speaks HTTPS (its certificate from the cluster CA, or one the
        /// node's trust store verifies); plain HTTP when false (and from older
        /// coordinators).
        #[serde(default)]
        registry_tls: bool,
        /// Where the coordinator gossips (`ip:port`): the agent's gossip seed.
        #[serde(default)]
        gossip: Option<std::net::SocketAddr>,
        /// The cluster's gossip key, as at join: a node that joined before gossip was
        /// authenticated (or lost the key) learns it here.
        gossip_key: GossipKey,
        /// The highest of this node's events the coordinator has applied. Less than the
        /// agent had acknowledged means the coordinator lost some (restored from a
        /// backup): the agent sends the ends of attempts it remembers again.
        #[serde(default)]
        events_applied: u64,
    },
    /// The request was acted on.
    Noted,
    /// Events up to and including `upto` are applied; the agent may forget them.
    EventsAck {
        upto: u64,
    },
    Refused(Refusal),
}

/// Why the coordinator refused a request; `message` says what to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct Refusal {
    pub code: RefusalCode,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefusalCode {
    /// The peer speaks another protocol version.
    ProtocolVersion,
    /// The peer belongs to another cluster.
    Cluster,
    /// The join token is unknown, used or expired.
    JoinToken,
    /// The certificate signing request is malformed.
    Csr,
    /// A request that needs a client certificate came without one.
    NotAuthenticated,
    /// The client certificate does not name the node the peer claims to be.
    Identity,
    /// A command for a generation older than one the agent has already seen.
    StaleGeneration,
    /// A request that needs an open session (hello first).
    NoSession,
    /// The coordinator could not act on it now (storage trouble); retry later.
    Unavailable,
    /// Another agent is connected as this node right now (or, at join, the node name is
    /// taken): two hosts must not share a node identity.
    DuplicateNode,
}

impl Refusal {
    pub fn new(code: RefusalCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the {MAX_FRAME}-byte limit")]
    TooLarge { len: usize },
    #[error("frame is not a valid message: {reason}")]
    Malformed { reason: String },
}

/// Encodes one frame: 4-byte big-endian length, then JSON.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let body = serde_json::to_vec(msg).map_err(|e| FrameError::Malformed {
        reason: e.to_string(),
    })?;
    if body.len() > MAX_FRAME {
        return Err(FrameError::TooLarge { len: body.len() });
    }
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Reads the body length from a frame header, refusing oversized frames before any of
/// their body is read.
pub fn body_len(header: [u8; 4]) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(header) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge { len });
    }
    Ok(len)
}

/// Decodes a frame body.
pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    serde_json::from_slice(body).map_err(|e| FrameError::Malformed {
        reason: e.to_string(),
    })
}

/// A one-time join token as the operator handles it: `gjt1.<id>.<secret>.<ca-hash>`.
///
/// The id finds the token in the coordinator's store, which keeps only a hash of the
/// secret; the CA hash (SHA-256 of the cluster CA certificate, hex) lets a joining agent
/// verify it talks to the right coordinator before it has the CA (as kubeadm's
/// `--discovery-token-ca-cert-hash`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinToken {
    pub id: String,
    pub secret: String,
    pub ca_sha256: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "join token is malformed; expected `gjt1.<id>.<secret>.<ca-hash>` as printed by `gantry-coordinator token create`"
)]
pub struct BadJoinToken;

impl JoinToken {
    const PREFIX: &'static str = "gjt1";

    pub fn parse(s: &str) -> Result<Self, BadJoinToken> {
        let mut parts = s.trim().split('.');
        let (Some(Self::PREFIX), Some(id), Some(secret), Some(ca), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(BadJoinToken);
        };
        let hex = |v: &str, len: usize| v.len() == len && v.bytes().all(|b| b.is_ascii_hexdigit());
        if !(hex(id, 16) && hex(secret, 32) && hex(ca, 64)) {
            return Err(BadJoinToken);
        }
        Ok(Self {
            id: id.into(),
            secret: secret.into(),
            ca_sha256: ca.to_ascii_lowercase(),
        })
    }
}

impl std::fmt::Display for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}.{}.{}.{}",
            Self::PREFIX,
            self.id,
            self.secret,
            self.ca_sha256
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CallId, InputId, WarmId};

    fn output(bytes: usize) -> OutputItem {
        let call = CallId::new("c-1").expect("call");
        OutputItem {
            owner: Owner::Function(WarmId::new("w-1").expect("warm")),
            generation: Generation(1),
            input: InputId::of(&call, 0),
            attempt: 1,
            // Not UTF-8, so it travels as base64 (the largest encoding).
            result: InputResult::Output(Payload::new("x/y", vec![0xff; bytes])),
            at_ms: 1,
        }
    }

    #[test]
    fn batches_keep_order_and_stay_under_a_frame() {
        let sizes = [10, Payload::MAX_BYTES, 600_000, 600_000, 5, 7];
        let items: Vec<(usize, usize)> = sizes.iter().copied().enumerate().collect();
        let got: Vec<Vec<usize>> = batches(items, |(_, n)| *n)
            .into_iter()
            .map(|b| b.into_iter().map(|(i, _)| i).collect())
            .collect();
        // An item over the byte bound goes alone; the rest fill up to it, in order.
        assert_eq!(got, vec![vec![0], vec![1], vec![2], vec![3, 4, 5]]);
        let many = batches(0..(BATCH_MAX_ITEMS * 2 + 1), |_| 1);
        assert_eq!(
            many.iter().map(Vec::len).collect::<Vec<_>>(),
            [BATCH_MAX_ITEMS, BATCH_MAX_ITEMS, 1]
        );
        // The largest batches still fit a frame: one answer at the inline limit, or a
        // full batch's bytes.
        for batch in batches(
            vec![
                output(Payload::MAX_BYTES),
                output(BATCH_PAYLOAD_BYTES / 2),
                output(BATCH_PAYLOAD_BYTES / 2),
            ],
            OutputItem::payload_bytes,
        ) {
            let frame = encode(&Request::Outputs {
                outputs: batch,
                chunks: Vec::new(),
            })
            .expect("fits a frame");
            assert!(frame.len() <= MAX_FRAME + 4);
        }
    }

    #[test]
    fn frames_roundtrip() {
        let msg = Request::Hello {
            protocol_version: PROTOCOL_VERSION,
            cluster: ClusterId::new("c1").expect("id"),
            node: NodeId::new("n1").expect("id"),
            capacity: NodeCapacity {
                cpu_millis: 2000,
                memory_bytes: 1 << 30,
                gpus: 0,
                shared_volumes: false,
            },
            instance: 1,
            gossip: None,
        };
        let frame = encode(&msg).expect("encode");
        let len = body_len(frame[..4].try_into().expect("header")).expect("len");
        assert_eq!(len, frame.len() - 4);
        assert_eq!(decode::<Request>(&frame[4..]).expect("decode"), msg);
    }

    #[test]
    fn oversized_and_garbage_frames_are_refused() {
        assert_eq!(
            body_len(((MAX_FRAME + 1) as u32).to_be_bytes()),
            Err(FrameError::TooLarge { len: MAX_FRAME + 1 })
        );
        assert!(matches!(
            decode::<Request>(b"\x00\xffnot json"),
            Err(FrameError::Malformed { .. })
        ));
        // A well-formed frame of an unknown message type is malformed, not a panic.
        assert!(matches!(
            decode::<Request>(br#"{"type":"launch_missiles"}"#),
            Err(FrameError::Malformed { .. })
        ));
    }

    #[test]
    fn join_tokens_roundtrip_and_reject_garbage() {
        let t = JoinToken {
            id: "0123456789abcdef".into(),
            secret: "0123456789abcdef0123456789abcdef".into(),
            ca_sha256: "a".repeat(64),
        };
        assert_eq!(JoinToken::parse(&t.to_string()), Ok(t));
        for bad in [
            "",
            "gjt1.x.y.z",
            "gjt2.0123456789abcdef.0123456789abcdef0123456789abcdef.aa",
            "gjt1.0123456789abcdef.short.aa",
        ] {
            assert_eq!(JoinToken::parse(bad), Err(BadJoinToken), "{bad:?}");
        }
    }

    #[test]
    fn node_names_are_dns_names() {
        assert_eq!(
            node_dns_name(&NodeId::new("gpu-3").expect("id")),
            "gpu-3.node.gantry"
        );
    }
}
