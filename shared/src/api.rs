//! The HTTP API's request and response bodies (`/v1`). The coordinator serves them and
//! the CLI sends them; the OpenAPI document is generated from these types.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::attempt::{EndCause, Generation};
use crate::ids::{JobId, NodeId};
use crate::resources::{CpuMillis, HumanDuration, MemoryBytes, Parsed};

/// What a user submits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// A human name; not unique.
    pub name: String,
    /// Image reference: unqualified names resolve to the cluster's registry.
    pub image: String,
    /// Command and arguments; empty runs the image's default.
    #[serde(default)]
    pub command: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Per node of the job.
    #[serde(default)]
    pub resources: JobResources,
    /// Gang size: nodes that run the job together (1 for a plain job).
    #[serde(default = "one")]
    pub nodes: u32,
    /// May run on spot (preemptible) nodes; jobs that may not never go to a node labelled
    /// `spot=true`.
    #[serde(default)]
    pub spot: bool,
    /// Node labels that must all match (`rack: r12`).
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    /// Restarts after a failure of the job's own making.
    #[serde(default)]
    pub retries: u32,
    /// How long a failed job waits before each retry.
    #[serde(default)]
    pub backoff: Backoff,
    /// Wall-clock limit, e.g. `30m`, `12h`.
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub timeout: Option<Parsed<HumanDuration>>,
    /// Higher runs first.
    #[serde(default)]
    pub priority: i32,
    /// Secrets the job's containers get: `"NAME"` (environment variables) or
    /// `{"name": "NAME", "mount": "files"}` (files under `/run/secrets/NAME/`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<crate::secrets::SecretUse>,
    /// Volumes mounted into each container: `{"/data": "NAME"}`. The coordinator records
    /// where each lives as it accepts the job.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    #[schema(value_type = BTreeMap<String, String>)]
    pub volumes: crate::volumes::VolumeMounts,
}

fn one() -> u32 {
    1
}

/// Exponential backoff between retries: `initial`, then × `factor` per failure, at most
/// `max`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Backoff {
    /// Before the first retry (`1s`).
    #[schema(value_type = String)]
    pub initial: Parsed<HumanDuration>,
    /// Each further retry waits this many times longer (1–10).
    pub factor: u32,
    /// The longest wait (`5m`).
    #[schema(value_type = String)]
    pub max: Parsed<HumanDuration>,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Parsed::known("1s", std::time::Duration::from_secs(1).into()),
            factor: 2,
            max: Parsed::known("5m", std::time::Duration::from_secs(300).into()),
        }
    }
}

impl Backoff {
    /// The wait before retry number `failures` (1 = the first retry), in ms.
    pub fn delay_ms(&self, failures: u32) -> u64 {
        let ms = |d: &Parsed<HumanDuration>| d.value().as_millis() as u64;
        let (initial, max) = (ms(&self.initial), ms(&self.max));
        let factor = u64::from(self.factor.clamp(1, 10));
        let mut delay = initial;
        for _ in 1..failures {
            delay = delay.saturating_mul(factor);
            if delay >= max {
                break;
            }
        }
        delay.min(max)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JobResources {
    /// Cores (`0.5`, `2`) or millicores (`500m`).
    #[schema(value_type = String)]
    pub cpu: Parsed<CpuMillis>,
    /// Bytes with an optional binary unit (`256M`, `2G`).
    #[schema(value_type = String)]
    pub memory: Parsed<MemoryBytes>,
    /// GPUs per node.
    #[serde(default)]
    pub gpus: u32,
    /// Acceptable GPU models in order of preference (empty: any).
    #[serde(default)]
    pub gpu_types: Vec<String>,
    /// Least memory each GPU must have (`40G`).
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub gpu_memory: Option<Parsed<MemoryBytes>>,
}

impl Default for JobResources {
    fn default() -> Self {
        Self {
            cpu: Parsed::known("1", CpuMillis(1000)),
            memory: Parsed::known("512M", MemoryBytes(512 << 20)),
            gpus: 0,
            gpu_types: Vec::new(),
            gpu_memory: None,
        }
    }
}

/// The largest values a job spec may hold, in one place: one request must not be able to
/// bloat the job store or every scheduling pass. Each refusal names the field and the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpecLimits {
    pub name_bytes: usize,
    pub image_bytes: usize,
    pub command_args: usize,
    /// All arguments together.
    pub command_bytes: usize,
    pub env_vars: usize,
    /// All keys and values together.
    pub env_bytes: usize,
    pub gpu_types: usize,
    pub selector_labels: usize,
}

impl SpecLimits {
    pub const DEFAULT: SpecLimits = SpecLimits {
        name_bytes: 128,
        image_bytes: 512,
        command_args: 1024,
        command_bytes: 256 << 10,
        env_vars: 1024,
        env_bytes: 256 << 10,
        gpu_types: 16,
        selector_labels: 64,
    };
}

/// A field of a spec that is wrong, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    pub field: &'static str,
    pub message: String,
}

impl JobSpec {
    pub const MAX_NODES: u32 = 1024;
    pub const MAX_RETRIES: u32 = 100;

    /// Checks everything a spec can get wrong on its own (not against cluster capacity).
    pub fn validate(&self) -> Result<(), FieldError> {
        let err = |field, message: &str| {
            Err(FieldError {
                field,
                message: message.to_owned(),
            })
        };
        let l = SpecLimits::DEFAULT;
        if let Err(e) = crate::secrets::check_uses(&self.secrets) {
            return err("secrets", &e.to_string());
        }
        if let Err(e) = crate::volumes::check_mounts(&self.volumes) {
            return err("volumes", &e.to_string());
        }
        let too_long = |field, what: &str, max: usize| {
            Err(FieldError {
                field,
                message: format!("{what} is longer than the limit of {max}; shorten it"),
            })
        };
        if self.name.trim().is_empty() || self.name.len() > l.name_bytes {
            return err("name", "must be 1 to 128 characters");
        }
        if self.name.chars().any(char::is_control) {
            return err(
                "name",
                "must not contain control characters (NUL, newlines, escapes)",
            );
        }
        if self.image.trim().is_empty() {
            return err(
                "image",
                "must name an image, e.g. `busybox` or `registry.example.com/team/train:v1`",
            );
        }
        if self.image.len() > l.image_bytes {
            return too_long("image", "the image reference", l.image_bytes);
        }
        if self
            .image
            .chars()
            .any(|c| c.is_control() || c.is_whitespace())
        {
            return err("image", "must not contain spaces or control characters");
        }
        if self.command.len() > l.command_args {
            return too_long("command", "the argument list", l.command_args);
        }
        if self.command.iter().map(String::len).sum::<usize>() > l.command_bytes {
            return too_long("command", "the command line (bytes)", l.command_bytes);
        }
        if self.env.len() > l.env_vars {
            return too_long("env", "the number of variables", l.env_vars);
        }
        if self
            .env
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum::<usize>()
            > l.env_bytes
        {
            return too_long("env", "the environment (bytes)", l.env_bytes);
        }
        if self.resources.gpu_types.len() > l.gpu_types {
            return too_long("resources.gpu_types", "the list", l.gpu_types);
        }
        if self.selector.len() > l.selector_labels {
            return too_long("selector", "the number of labels", l.selector_labels);
        }
        if self.nodes == 0 || self.nodes > Self::MAX_NODES {
            return err("nodes", "must be between 1 and 1024");
        }
        if self.retries > Self::MAX_RETRIES {
            return err("retries", "must be at most 100");
        }
        if let Some((k, _)) = self.env.iter().find(|(k, _)| !valid_env_name(k)) {
            return Err(FieldError {
                field: "env",
                message: format!("`{k}` is not a valid variable name"),
            });
        }
        if self.resources.gpus > 64 {
            return err("resources.gpus", "must be at most 64 per node");
        }
        if self
            .resources
            .gpu_types
            .iter()
            .any(|t| t.trim().is_empty() || t.len() > 64)
        {
            return err(
                "resources.gpu_types",
                "each must be a GPU model such as `H100` or `A100-80GB`",
            );
        }
        if let Some((k, v)) = self
            .selector
            .iter()
            .find(|(k, v)| crate::gossip::parse_label(&format!("{k}={v}")).is_err())
        {
            return Err(FieldError {
                field: "selector",
                message: format!(
                    "`{k}={v}` is not a valid label (letters, digits, `._-`; keys may hold `/`)"
                ),
            });
        }
        if !(1..=10).contains(&self.backoff.factor) {
            return err("backoff.factor", "must be between 1 and 10");
        }
        Ok(())
    }
}

pub(crate) fn valid_env_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Accepted, waiting for capacity.
    Pending,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }
}

/// One member of one placement of a job: a gang of N nodes has N per generation, with
/// ranks 0..N-1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Attempt {
    /// Only ever increases for a job; agents refuse commands with older generations.
    #[schema(value_type = u64)]
    pub generation: Generation,
    #[schema(value_type = String)]
    pub node: NodeId,
    pub gpus: Vec<u32>,
    /// Rank of this member in its generation (0 for a job of one node).
    pub rank: u32,
    /// The member's node address at placement (its entry in `GANTRY_NODE_IPS`).
    #[serde(default)]
    pub address: Option<String>,
    /// Where the generation's rank 0 listens for its peers (`MASTER_ADDR`, `MASTER_PORT`).
    #[serde(default)]
    pub master_addr: Option<String>,
    #[serde(default)]
    pub master_port: Option<u16>,
    /// When the node reported the container running (unix ms); absent while starting.
    #[serde(default)]
    pub started_at_ms: Option<u64>,
    pub exit_code: Option<i32>,
    /// How the attempt ended, as a fact (`exited`, `oom`, `{"gpu_fault": "xid_79"}`,
    /// `lost`, …); absent while it is live.
    #[serde(default)]
    pub cause: Option<EndCause>,
    /// How the attempt ended, for people; absent while it is live.
    pub reason: Option<String>,
    /// When it ended (unix ms); absent while it is live.
    #[serde(default)]
    pub ended_at_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Job {
    #[schema(value_type = String)]
    pub id: JobId,
    pub spec: JobSpec,
    pub state: JobState,
    /// Why the job is in its state (why it waits, how it ended).
    pub reason: Option<String>,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
    /// Every member of every generation, oldest first.
    pub attempts: Vec<Attempt>,
    /// Generations that failed by the job's own doing (counted against `retries`).
    #[serde(default)]
    pub failures: u32,
    /// A retrying job is not placed before this (unix ms): its backoff.
    #[serde(default)]
    pub not_before_ms: Option<u64>,
}

impl Job {
    /// The newest generation ([`Generation::NONE`] before the first placement).
    pub fn generation(&self) -> Generation {
        self.attempts
            .iter()
            .map(|a| a.generation)
            .max()
            .unwrap_or(Generation::NONE)
    }

    /// The members of the newest generation, by rank.
    pub fn current_members(&self) -> Vec<&Attempt> {
        let g = self.generation();
        let mut members: Vec<&Attempt> =
            self.attempts.iter().filter(|a| a.generation == g).collect();
        members.sort_by_key(|a| a.rank);
        members
    }

    /// Members not yet known to have ended: they hold their node's resources.
    pub fn live_members(&self) -> impl Iterator<Item = &Attempt> {
        self.attempts.iter().filter(|a| a.is_live())
    }

    /// The exit code a finished job reports: of its newest generation, the first failing
    /// member's that Gantry did not end, else any failing member's, else 0 once all
    /// exited 0.
    pub fn exit_code(&self) -> Option<i32> {
        let members = self.current_members();
        let failing = |a: &&&Attempt| a.exit_code.is_some_and(|c| c != 0);
        members
            .iter()
            .filter(failing)
            .find(|a| a.cause.is_some_and(|c| !c.ended_by_gantry()))
            .or_else(|| members.iter().find(failing))
            .and_then(|a| a.exit_code)
            .or_else(|| {
                members
                    .iter()
                    .all(|a| a.exit_code == Some(0))
                    .then_some(0)
                    .filter(|_| !members.is_empty())
            })
    }
}

impl Attempt {
    /// Not yet known to have ended.
    pub fn is_live(&self) -> bool {
        self.cause.is_none() && self.reason.is_none()
    }

    /// Records how it ended (once; a member that already ended keeps its first end).
    pub fn end(&mut self, cause: EndCause, message: impl Into<String>, at_ms: u64) {
        if self.is_live() {
            self.cause = Some(cause);
            self.reason = Some(message.into());
            self.ended_at_ms = Some(at_ms);
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct JobList {
    pub jobs: Vec<Job>,
    /// Pass as `page_token` to get the next page; absent on the last page.
    pub next_page_token: Option<String>,
}

/// A node as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Node {
    #[schema(value_type = String)]
    pub id: NodeId,
    /// `ready`, `draining` or `preempting` while up; `suspect` when one of gossip and the
    /// control session has gone quiet; `down` when both have.
    pub state: String,
    /// Why it is suspect or down.
    pub reason: Option<String>,
    /// When it entered its state (unix ms).
    pub state_since_ms: u64,
    /// For `draining` and `preempting`: when its remaining work is stopped (unix ms).
    #[serde(default)]
    pub deadline_ms: Option<u64>,
    /// When a heartbeat or control traffic last arrived from it (unix ms).
    pub last_seen_ms: Option<u64>,
    /// It has an open control session.
    pub connected: bool,
    /// The address it gossips as reachable at.
    pub address: Option<String>,
    pub labels: BTreeMap<String, String>,
    /// Offered to jobs, as declared on its latest control session.
    pub cpu_millis: u64,
    pub memory_bytes: u64,
    /// Free as the node itself reports it through gossip (advisory; placement uses the
    /// reservations below).
    pub free_cpu_millis: Option<u64>,
    pub free_memory_bytes: Option<u64>,
    /// Reserved by attempts the coordinator placed there.
    pub reserved_cpu_millis: u64,
    pub reserved_memory_bytes: u64,
    pub reserved_gpus: Vec<u32>,
    /// Its GPUs with their health; each says whether it is simulated.
    pub gpus: Vec<crate::gossip::GpuInfo>,
    /// Jobs with a live attempt on the node.
    #[schema(value_type = Vec<String>)]
    pub jobs: Vec<JobId>,
}

/// `POST /v1/nodes/{id}/drain` and `/preempt`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NodeNotice {
    /// When the node's work must be gone, from now (`30s`, `2h`). A drain without one
    /// waits for its work to finish; a preemption without one gives 10 s of grace.
    #[serde(default)]
    pub deadline: Option<String>,
}

/// `POST /v1/tokens`: a new API token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ApiTokenRequest {
    /// `reader`, `submitter` or `admin`.
    pub role: String,
    /// Who or what it is for (shown nowhere secret; for the operator's records).
    pub name: String,
}

/// `POST /v1/tokens/revoke`: every API token with this name stops working.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RevokeTokensRequest {
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RevokeTokensResponse {
    /// How many tokens had that name.
    pub revoked: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ApiTokenResponse {
    /// `gat_…`: shown once, stored only as a hash.
    pub token: String,
    pub role: String,
}

/// `POST /v1/join-tokens`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JoinTokenRequest {
    /// How long the token stays valid, e.g. `1h` (at most 7 days).
    pub ttl: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct JoinTokenResponse {
    /// `gjt1.…`: give it to `gantry-agent join --token`. Shown once.
    pub token: String,
    pub expires_in_seconds: u64,
}

/// Every error the API returns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable, machine-readable (`invalid_spec`, `not_found`, …).
    pub code: String,
    /// What was wrong and what to do.
    pub message: String,
    /// The offending field, when one is to blame.
    pub field: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> JobSpec {
        serde_json::from_str(r#"{"name":"t","image":"busybox","command":["true"]}"#).expect("spec")
    }

    #[test]
    fn defaults_fill_in() {
        let s = spec();
        assert_eq!((s.nodes, s.retries, s.resources.gpus), (1, 0, 0));
        assert_eq!(s.validate(), Ok(()));
    }

    #[test]
    fn validation_names_the_field() {
        let bad = |body: serde_json::Value| serde_json::from_value::<JobSpec>(body).is_err();
        assert!(bad(serde_json::json!({"name": "t", "image": "b",
            "resources": {"cpu": "1", "memory": "0"}})));
        assert!(bad(
            serde_json::json!({"name": "t", "image": "b", "timeout": "soon"})
        ));
        assert!(bad(serde_json::json!({"name": "t", "image": "b",
            "backoff": {"initial": "soon"}})));
        let mut s = spec();
        s.nodes = 0;
        assert_eq!(s.validate().map_err(|e| e.field), Err("nodes"));
        let mut s = spec();
        s.env.insert("1X".into(), "y".into());
        assert_eq!(s.validate().map_err(|e| e.field), Err("env"));
    }

    #[test]
    fn every_list_and_string_is_bounded_and_the_refusal_names_field_and_limit() {
        let l = SpecLimits::DEFAULT;
        let field = |s: &JobSpec| s.validate().map_err(|e| (e.field, e.message));
        let mut s = spec();
        s.name = "a\0b".into();
        assert_eq!(field(&s).map_err(|e| e.0), Err("name"));
        let mut s = spec();
        s.name = "x".repeat(100 * 1024);
        assert_eq!(field(&s).map_err(|e| e.0), Err("name"));
        let mut s = spec();
        s.resources.gpu_types = vec!["H100".into(); 10_000];
        let e = field(&s).expect_err("too many gpu types");
        assert_eq!(e.0, "resources.gpu_types");
        assert!(e.1.contains(&l.gpu_types.to_string()), "{}", e.1);
        let mut s = spec();
        s.command = vec!["x".into(); l.command_args + 1];
        assert_eq!(field(&s).map_err(|e| e.0), Err("command"));
        let mut s = spec();
        s.env = (0..=l.env_vars)
            .map(|i| (format!("K{i}"), "v".into()))
            .collect();
        assert_eq!(field(&s).map_err(|e| e.0), Err("env"));
        let mut s = spec();
        s.image = "x".repeat(l.image_bytes + 1);
        assert_eq!(field(&s).map_err(|e| e.0), Err("image"));
        let mut s = spec();
        s.image = "busy box".into();
        assert_eq!(field(&s).map_err(|e| e.0), Err("image"));
        let mut s = spec();
        s.selector = (0..=l.selector_labels)
            .map(|i| (format!("k{i}"), "v".into()))
            .collect();
        assert_eq!(field(&s).map_err(|e| e.0), Err("selector"));
        // What real jobs carry stays well inside.
        assert_eq!(spec().validate(), Ok(()));
    }

    #[test]
    fn unknown_fields_are_refused() {
        let r: Result<JobSpec, _> = serde_json::from_str(r#"{"name":"t","image":"x","gpus":1}"#);
        assert!(r.is_err_and(|e| e.to_string().contains("unknown field `gpus`")));
    }

    #[test]
    fn backoff_grows_to_its_max() {
        let b = Backoff {
            initial: "500ms".parse().expect("duration"),
            factor: 3,
            max: "10s".parse().expect("duration"),
        };
        let delays: Vec<u64> = (1..=5).map(|f| b.delay_ms(f)).collect();
        assert_eq!(delays, [500, 1_500, 4_500, 10_000, 10_000]);
        assert_eq!(Backoff::default().delay_ms(1), 1_000);
        assert_eq!(Backoff::default().delay_ms(100), 300_000);
        let mut s = spec();
        s.backoff.factor = 0;
        assert_eq!(s.validate().map_err(|e| e.field), Err("backoff.factor"));
    }
}
