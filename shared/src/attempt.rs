//! The attempt contract every role shares, as typed facts: who owns an attempt
//! ([`Owner`]), which placement of that owner it is ([`Generation`]), and how it ended
//! ([`EndCause`], with a GPU's [`GpuFault`] and a start's [`StartFailure`]). The agent
//! reports these, the coordinator stores them and decides on them, and the API shows them
//! beside a human message; nothing decides by reading the message.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::ids::{ContainerId, JobId, WarmId};

/// One placement of an owner's work. Only ever increases per owner; every command carries
/// it and agents refuse commands older than the newest they have seen, so a node that
/// comes back never runs a superseded placement. 0 means "never placed".
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    ToSchema,
)]
#[serde(transparent)]
pub struct Generation(pub u64);

impl Generation {
    /// Before the first placement.
    pub const NONE: Generation = Generation(0);

    /// The generation after this one.
    pub fn next(self) -> Generation {
        Generation(self.0 + 1)
    }

    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for Generation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Whose work an attempt is: a job's, or one warm container of a function's. Both are
/// placed by the same engine, started by the same runtime and fenced by the same
/// generations.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Owner {
    Job(JobId),
    /// A function's warm container; its function and version live in the coordinator's
    /// records of it, and its runtime API in the attempt's spec.
    Function(WarmId),
}

impl Owner {
    /// The key the owner's records are filed under on an agent (its generation mark).
    pub fn key(&self) -> &str {
        match self {
            Owner::Job(job) => job.as_str(),
            Owner::Function(warm) => warm.as_str(),
        }
    }

    /// The container id of this owner's `generation` on a node: `<job>-g<n>`. Only a name
    /// (hostname, cgroup, state directory); agents keep owner and generation as fields of
    /// the container's record and never parse them back out of it.
    pub fn container_id(&self, generation: Generation) -> Option<ContainerId> {
        match self {
            Owner::Job(job) => ContainerId::new(format!("{job}-g{generation}")).ok(),
            Owner::Function(warm) => ContainerId::new(format!("{warm}-g{generation}")).ok(),
        }
    }

    pub fn job(&self) -> Option<&JobId> {
        match self {
            Owner::Job(job) => Some(job),
            Owner::Function(_) => None,
        }
    }

    pub fn warm(&self) -> Option<&WarmId> {
        match self {
            Owner::Function(warm) => Some(warm),
            Owner::Job(_) => None,
        }
    }
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Owner::Job(job) => write!(f, "job {job}"),
            Owner::Function(warm) => write!(f, "function container {warm}"),
        }
    }
}

/// An owner's attempt on one node: what a container that runs Gantry's work records.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct AttemptRef {
    pub owner: Owner,
    pub generation: Generation,
}

/// A GPU fault that takes the GPU out of use until an operator clears it. One encoding
/// from the NVML event through gossip, the agent's records and the coordinator's
/// decisions: `xid_<n>`, `ecc_dbe` or `lost` wherever it is written as text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum GpuFault {
    /// A critical Xid error the driver reported (79: fallen off the bus, 48: DBE, …).
    Xid(u32),
    /// An uncorrectable (double-bit) ECC error.
    DoubleBitEcc,
    /// The GPU is gone (NVML cannot reach it).
    Lost,
}

impl fmt::Display for GpuFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GpuFault::Xid(n) => write!(f, "xid_{n}"),
            GpuFault::DoubleBitEcc => f.write_str("ecc_dbe"),
            GpuFault::Lost => f.write_str("lost"),
        }
    }
}

/// In the API document a GPU fault is its text form.
impl utoipa::PartialSchema for GpuFault {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        String::schema()
    }
}

impl ToSchema for GpuFault {}

/// Text that is not a GPU fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a GPU fault; expected `xid_<n>`, `ecc_dbe` or `lost`")]
pub struct BadGpuFault(pub String);

impl FromStr for GpuFault {
    type Err = BadGpuFault;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "ecc_dbe" => Ok(GpuFault::DoubleBitEcc),
            "lost" => Ok(GpuFault::Lost),
            _ => s
                .strip_prefix("xid_")
                .and_then(|n| n.parse().ok())
                .map(GpuFault::Xid)
                .ok_or_else(|| BadGpuFault(s.to_owned())),
        }
    }
}

impl TryFrom<String> for GpuFault {
    type Error = BadGpuFault;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<GpuFault> for String {
    fn from(f: GpuFault) -> String {
        f.to_string()
    }
}

/// Why a container could not be started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum StartFailure {
    /// Its image could not be found, pulled or unpacked: the submitter's to fix.
    Image,
    /// Its spec cannot run here as written (no such command, user or working directory, a
    /// GPU request the node's devices cannot satisfy): the submitter's to fix.
    Spec,
    /// The node could not run it (runtime or disk trouble, a GPU that just failed, a stop
    /// that arrived first): placed again elsewhere.
    Node,
    /// Its image's registry stayed unreachable (refused connections, timed out, answered
    /// 5xx, or, for the cluster's own registry, refused the node's token) for as long as
    /// the node retries: the platform's fault, placed again.
    Registry,
}

impl StartFailure {
    /// Whether the submitter has to change something: such a start is not tried again.
    pub fn is_user_error(self) -> bool {
        matches!(self, StartFailure::Image | StartFailure::Spec)
    }
}

/// How an attempt ended: the fact code decides on. A human message travels beside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EndCause {
    /// Its process exited by itself, with any code.
    Exited,
    /// A signal nobody at Gantry sent killed it.
    Signaled,
    /// The kernel's OOM killer killed it at its memory limit.
    Oom,
    /// It ran past its timeout and was stopped.
    Timeout,
    /// Gantry stopped it on request (a cancel, a failed sibling, a fence).
    Stopped,
    /// Its supervising shim vanished without recording an exit: the host crashed or was
    /// killed under it.
    ShimLost,
    /// Its node stopped it because one of its GPUs failed.
    GpuFault(GpuFault),
    /// Its node went down.
    Lost,
    /// Its node was preempted (a spot interruption).
    Preempted,
    /// Its node reached a drain deadline.
    Drained,
    /// The start command never reached its node.
    NotDelivered,
    /// Its container could not be started.
    StartFailed(StartFailure),
}

impl EndCause {
    /// Whether Gantry (or the platform under it) ended the attempt rather than the work's
    /// own process: such an end is never counted against the user's retries.
    pub fn ended_by_gantry(self) -> bool {
        matches!(
            self,
            EndCause::Stopped
                | EndCause::ShimLost
                | EndCause::GpuFault(_)
                | EndCause::Lost
                | EndCause::Preempted
                | EndCause::Drained
                | EndCause::NotDelivered
        )
    }

    /// The short name the history has always shown (`exited`, `oom_killed`, `timed_out`,
    /// `gpu_xid_79`, …): what an attempt's `reason` says when there is nothing to add.
    pub fn label(self) -> String {
        match self {
            EndCause::Exited => "exited".into(),
            EndCause::Signaled => "signaled".into(),
            EndCause::Oom => "oom_killed".into(),
            EndCause::Timeout => "timed_out".into(),
            EndCause::Stopped => "stopped".into(),
            EndCause::ShimLost => "shim_lost".into(),
            EndCause::GpuFault(GpuFault::DoubleBitEcc) => "gpu_ecc".into(),
            EndCause::GpuFault(f) => format!("gpu_{f}"),
            EndCause::Lost => "lost".into(),
            EndCause::Preempted => "preempted".into(),
            EndCause::Drained => "drained".into(),
            EndCause::NotDelivered => "not_delivered".into(),
            EndCause::StartFailed(_) => "start_failed".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpu_faults_have_one_text_form() {
        for f in [GpuFault::Xid(79), GpuFault::DoubleBitEcc, GpuFault::Lost] {
            assert_eq!(f.to_string().parse::<GpuFault>(), Ok(f));
            let json = serde_json::to_string(&f).expect("json");
            assert_eq!(serde_json::from_str::<GpuFault>(&json).expect("back"), f);
        }
        assert_eq!(GpuFault::Xid(79).to_string(), "xid_79");
        assert!("xid_".parse::<GpuFault>().is_err());
        assert!("gpu_xid_79".parse::<GpuFault>().is_err());
    }

    #[test]
    fn end_causes_serialize_as_readable_json() {
        let json = |c: EndCause| serde_json::to_value(c).expect("json");
        assert_eq!(json(EndCause::Exited), serde_json::json!("exited"));
        assert_eq!(
            json(EndCause::GpuFault(GpuFault::Xid(79))),
            serde_json::json!({"gpu_fault": "xid_79"})
        );
        assert_eq!(
            json(EndCause::StartFailed(StartFailure::Image)),
            serde_json::json!({"start_failed": "image"})
        );
        assert_eq!(EndCause::GpuFault(GpuFault::Xid(79)).label(), "gpu_xid_79");
        assert_eq!(
            EndCause::GpuFault(GpuFault::DoubleBitEcc).label(),
            "gpu_ecc"
        );
    }

    #[test]
    fn only_platform_ends_are_gantrys() {
        assert!(!EndCause::Exited.ended_by_gantry());
        assert!(!EndCause::Oom.ended_by_gantry());
        assert!(!EndCause::Timeout.ended_by_gantry());
        assert!(EndCause::Preempted.ended_by_gantry());
        assert!(EndCause::GpuFault(GpuFault::Lost).ended_by_gantry());
    }

    #[test]
    fn owners_name_their_containers() {
        let owner = Owner::Job(JobId::from_sequence(3));
        let id = owner.container_id(Generation(2)).expect("id");
        assert_eq!(id.as_str(), "j-0000000000000003-g2");
        assert_eq!(
            serde_json::to_value(&owner).expect("json"),
            serde_json::json!({"job": "j-0000000000000003"})
        );
    }
}
