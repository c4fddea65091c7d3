//! An app manifest (`gantry.toml`, or the same document as JSON through the API): an app
//! and its functions, each with an image, resources, limits, a retry policy and an
//! autoscaler. Parsed and validated here, where it enters; the coordinator stores and acts
//! on the validated form and never re-reads the text.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::api::{FieldError, SpecLimits};
use crate::ids::{AppName, FunctionName};
use crate::resources::{CpuMillis, HumanDuration, MemoryBytes, Parsed};

/// What `gantry deploy` sends: an app and its functions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AppManifest {
    #[schema(value_type = String)]
    pub app: AppName,
    #[schema(value_type = BTreeMap<String, FunctionSpec>)]
    pub functions: BTreeMap<FunctionName, FunctionSpec>,
}

/// One function: what its containers run and how many of them there are.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FunctionSpec {
    /// Image reference: unqualified names resolve to the cluster's registry.
    pub image: String,
    /// The program that speaks the runtime API; empty runs the image's default.
    #[serde(default)]
    pub command: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Cores per container (`0.5`, `2`, `500m`).
    #[serde(default = "default_cpu")]
    #[schema(value_type = String)]
    pub cpu: Parsed<CpuMillis>,
    /// Memory per container (`512M`, `16G`).
    #[serde(default = "default_memory")]
    #[schema(value_type = String)]
    pub memory: Parsed<MemoryBytes>,
    /// GPUs per container: `"H100:2"`, or acceptable ones in order of preference
    /// (`["H100:2", "A100-80GB:2"]`), tried in that order.
    #[serde(default)]
    pub gpu: Option<GpuRequest>,
    /// Longest one input may run (default `300s`; 1 s to 24 h).
    #[serde(default = "default_timeout")]
    #[schema(value_type = String)]
    pub timeout: Parsed<HumanDuration>,
    /// Longest from a container's start to its `ready` (default: `timeout`).
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub startup_timeout: Option<Parsed<HumanDuration>>,
    /// Retries of an input that failed by its own error (platform failures never count).
    #[serde(default)]
    pub retries: Retries,
    /// Containers kept warm even with nothing to do.
    #[serde(default)]
    pub min_containers: u32,
    #[serde(default = "default_max_containers")]
    pub max_containers: u32,
    /// Extra idle containers kept while there is demand, for bursts.
    #[serde(default)]
    pub buffer_containers: u32,
    /// How long a container stays idle before it is drained (default `60s`; 2 s to 1 h).
    #[serde(default = "default_scaledown_window")]
    #[schema(value_type = String)]
    pub scaledown_window: Parsed<HumanDuration>,
    /// Inputs one container holds at once.
    #[serde(default = "one")]
    pub max_inputs: u32,
    /// Inputs per container the autoscaler aims for (default: `max_inputs`).
    #[serde(default)]
    pub target_inputs: Option<u32>,
    /// Serves HTTP through the coordinator's ingress instead of taking calls.
    #[serde(default)]
    pub web: Option<WebSpec>,
    /// Secrets its containers get: `"NAME"` (environment variables) or
    /// `{ name = "NAME", mount = "files" }` (files under `/run/secrets/NAME/`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<crate::secrets::SecretUse>,
    /// Volumes mounted into each container: `{ "/data" = "NAME" }`. The coordinator
    /// records where each lives as it deploys the version.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schema(value_type = BTreeMap<String, String>)]
    pub volumes: crate::volumes::VolumeMounts,
    /// Files mounted read-only into each container, by the digest of blobs already in the
    /// cluster's registry: `[[functions.NAME.mounts]]` with a `path` and its `files`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<crate::code::CodeMount>,
    /// Called with an empty input on a cron expression or every period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<crate::schedules::ScheduleSpec>,
}

/// A web endpoint, reached through the coordinator's ingress at `/APP/LABEL/…` or
/// `APP--LABEL.DOMAIN`: any HTTP server listening on `port` in the container's own network
/// namespace (`$PORT` says which; contract H), or a runtime API program that takes each
/// request as an `http` input (`via = "runtime_api"`; contract P).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WebSpec {
    /// How requests reach the code (default: an HTTP server on `port`).
    #[serde(default)]
    pub via: WebVia,
    /// The port the server listens on in its container (default 8000).
    #[serde(default)]
    pub port: Option<u16>,
    /// How the agent knows the server is up: `GET /PATH` (a 2xx or 3xx answer) or `tcp`
    /// (a connection is accepted), the default; it must pass within `startup_timeout`.
    #[serde(default)]
    pub readiness: Option<String>,
    /// Requests one container serves at once; more wait in the ingress (default 100).
    #[serde(default = "default_max_concurrency")]
    pub max_concurrency: u32,
    /// Requests per container the autoscaler aims for (default: 70 % of `max_concurrency`).
    #[serde(default)]
    pub target_concurrency: Option<u32>,
    /// Requests held while no container can take them; beyond it `429` (default 1,000).
    #[serde(default = "default_max_pending")]
    pub max_pending: u32,
    /// Served without a bearer token.
    #[serde(default)]
    pub public: bool,
    /// The endpoint's name in its address (default: the function's name, lower-cased,
    /// `_` as `-`).
    #[serde(default)]
    pub label: Option<String>,
}

/// How a web endpoint's requests reach its code.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum WebVia {
    /// An HTTP server on `port` in the container (contract H).
    #[default]
    Port,
    /// Each request is an input of kind `http` on the runtime API, answered with a status,
    /// headers and a body (contract P; bodies of at most 2 MiB each way).
    RuntimeApi,
}

fn default_max_concurrency() -> u32 {
    100
}

fn default_max_pending() -> u32 {
    1000
}

impl WebSpec {
    pub const MAX_CONCURRENCY: u32 = 10_000;
    pub const MAX_PENDING: u32 = 100_000;
    pub const DEFAULT_PORT: u16 = 8000;

    /// The port the server listens on (`via = "port"`).
    pub fn port(&self) -> u16 {
        self.port.unwrap_or(Self::DEFAULT_PORT)
    }

    /// Requests per container the autoscaler aims for.
    pub fn target_concurrency(&self) -> u32 {
        self.target_concurrency
            .unwrap_or(self.max_concurrency * 7 / 10)
            .max(1)
    }

    /// The readiness probe, parsed (validated at deploy).
    pub fn probe(&self) -> Result<crate::protocol::Readiness, String> {
        crate::protocol::Readiness::parse(self.readiness.as_deref().unwrap_or("tcp"))
    }

    /// The endpoint's label: the one given, or one made from the function's name.
    pub fn label_for(&self, function: &FunctionName) -> String {
        self.label
            .clone()
            .unwrap_or_else(|| function.as_str().to_ascii_lowercase().replace('_', "-"))
    }

    fn validate(&self) -> Result<(), FieldError> {
        let err = |field: &'static str, message: String| Err(FieldError { field, message });
        if self.via == WebVia::RuntimeApi {
            let given = [
                ("web.port", self.port.is_some()),
                ("web.readiness", self.readiness.is_some()),
            ];
            if let Some((field, _)) = given.into_iter().find(|(_, g)| *g) {
                return err(
                    field,
                    "a `via = \"runtime_api\"` endpoint takes its requests as inputs and is ready \
                     at `POST /v1/ready`, with no port or probe; remove it, or serve HTTP on a \
                     port with `via = \"port\"`"
                        .into(),
                );
            }
        }
        if self.port == Some(0) {
            return err("web.port", "must be between 1 and 65535".into());
        }
        if let Err(message) = self.probe() {
            return err("web.readiness", message);
        }
        per_container(
            (
                "web.max_concurrency",
                self.max_concurrency,
                Self::MAX_CONCURRENCY,
            ),
            ("web.target_concurrency", self.target_concurrency),
        )?;
        if self.max_pending > Self::MAX_PENDING {
            return err(
                "web.max_pending",
                format!("must be at most {}", Self::MAX_PENDING),
            );
        }
        if let Some(label) = &self.label
            && let Err(e) = AppName::new(label.clone())
        {
            return err(
                "web.label",
                format!(
                    "{e}: a label is 1 to 63 lower-case letters, digits and `-`, as in a host name"
                ),
            );
        }
        Ok(())
    }
}

/// A per-container limit (`max_inputs`, `max_concurrency`) between 1 and `bound`, and the
/// autoscaler's target for it, if given, between 1 and the limit.
fn per_container(
    (limit_field, limit, bound): (&'static str, u32, u32),
    (target_field, target): (&'static str, Option<u32>),
) -> Result<(), FieldError> {
    if limit == 0 || limit > bound {
        return Err(FieldError {
            field: limit_field,
            message: format!("must be between 1 and {bound}"),
        });
    }
    if let Some(t) = target
        && (t == 0 || t > limit)
    {
        let short = limit_field.rsplit('.').next().unwrap_or(limit_field);
        return Err(FieldError {
            field: target_field,
            message: format!("must be between 1 and {short} ({limit})"),
        });
    }
    Ok(())
}

/// A parsed duration as the standard library's.
fn dur(p: &Parsed<HumanDuration>) -> Duration {
    (*p.value()).into()
}

fn default_cpu() -> Parsed<CpuMillis> {
    Parsed::known("1", CpuMillis(1000))
}

fn default_memory() -> Parsed<MemoryBytes> {
    Parsed::known("512M", MemoryBytes(512 << 20))
}

fn default_timeout() -> Parsed<HumanDuration> {
    Parsed::known("300s", Duration::from_secs(300).into())
}

fn default_scaledown_window() -> Parsed<HumanDuration> {
    Parsed::known("60s", Duration::from_secs(60).into())
}

fn default_max_containers() -> u32 {
    FunctionSpec::DEFAULT_MAX_CONTAINERS
}

fn one() -> u32 {
    1
}

/// `gpu = "H100:2"` or `gpu = ["H100:2", "A100-80GB:2"]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum GpuRequest {
    One(String),
    Preferred(Vec<String>),
}

/// One acceptable GPU choice: `count` GPUs of `model` (any model when `None`, written
/// `any:N`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuOption {
    pub model: Option<String>,
    pub count: u32,
}

impl GpuOption {
    pub const MAX_COUNT: u32 = 64;

    /// `H100`, `H100:2`, `any:4`, `A100-80GB:8`.
    pub fn parse(text: &str) -> Result<GpuOption, String> {
        let (model, count) = match text.rsplit_once(':') {
            Some((m, c)) => (
                m,
                c.trim().parse::<u32>().map_err(|_| {
                    format!("`{text}`: `{c}` is not a GPU count; write e.g. `H100:2`")
                })?,
            ),
            None => (text, 1),
        };
        let model = model.trim();
        if model.is_empty()
            || model.len() > 64
            || !model
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(format!(
                "`{text}` is not a GPU; write a model and a count such as `H100:2` or `A100-80GB:1`"
            ));
        }
        if count == 0 || count > Self::MAX_COUNT {
            return Err(format!(
                "`{text}`: the count must be between 1 and {}",
                Self::MAX_COUNT
            ));
        }
        let model = (!model.eq_ignore_ascii_case("any")).then(|| model.to_owned());
        Ok(GpuOption { model, count })
    }
}

impl GpuRequest {
    /// The choices in order of preference.
    pub fn options(&self) -> Result<Vec<GpuOption>, String> {
        match self {
            GpuRequest::One(t) => Ok(vec![GpuOption::parse(t)?]),
            GpuRequest::Preferred(list) => list.iter().map(|t| GpuOption::parse(t)).collect(),
        }
    }
}

/// `retries = 3` (3 retries 1 s apart), or a table with Modal's fields and bounds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum Retries {
    Count(u32),
    Policy(RetryPolicy),
}

impl Default for Retries {
    fn default() -> Self {
        Retries::Count(0)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    /// 0 to 10.
    pub max_retries: u32,
    /// Each delay is this many times the one before (1 to 10; default 2).
    #[serde(default = "two")]
    pub backoff_coefficient: f64,
    /// Before the first retry (default `1s`; 0 to 60 s).
    #[serde(default = "one_second")]
    #[schema(value_type = String)]
    pub initial_delay: Parsed<HumanDuration>,
    /// The longest delay (default `60s`; 1 s to 60 s).
    #[serde(default = "sixty_seconds")]
    #[schema(value_type = String)]
    pub max_delay: Parsed<HumanDuration>,
}

fn two() -> f64 {
    2.0
}

fn one_second() -> Parsed<HumanDuration> {
    Parsed::known("1s", Duration::from_secs(1).into())
}

fn sixty_seconds() -> Parsed<HumanDuration> {
    Parsed::known("60s", Duration::from_secs(60).into())
}

impl Retries {
    pub const MAX_RETRIES: u32 = 10;

    pub fn max_retries(&self) -> u32 {
        match self {
            Retries::Count(n) => *n,
            Retries::Policy(p) => p.max_retries,
        }
    }

    /// The wait before retry `n` (1 = the first): `initial × coefficient^(n-1)`, at most
    /// `max_delay`; a plain count waits 1 s each time.
    pub fn delay(&self, n: u32) -> Duration {
        match self {
            Retries::Count(_) => Duration::from_secs(1),
            Retries::Policy(p) => {
                let initial = dur(&p.initial_delay).as_secs_f64();
                let max = dur(&p.max_delay).as_secs_f64();
                let exp = i32::try_from(n.saturating_sub(1)).unwrap_or(i32::MAX);
                let secs = (initial * p.backoff_coefficient.powi(exp)).min(max);
                Duration::from_secs_f64(secs.max(0.0))
            }
        }
    }
}

impl FunctionSpec {
    pub const DEFAULT_MAX_CONTAINERS: u32 = 10;
    /// A bound on one function's containers, so one manifest cannot ask for the cluster.
    pub const MAX_CONTAINERS: u32 = 1000;
    pub const MAX_INPUTS: u32 = 1000;

    /// Inputs per container the autoscaler aims for.
    pub fn target_inputs(&self) -> u32 {
        self.target_inputs.unwrap_or(self.max_inputs).max(1)
    }

    /// What the autoscaler aims for per container: requests in flight for a web endpoint,
    /// inputs otherwise.
    pub fn target_per_container(&self) -> u32 {
        self.web
            .as_ref()
            .map_or_else(|| self.target_inputs(), WebSpec::target_concurrency)
    }

    pub fn startup_timeout(&self) -> Duration {
        self.startup_timeout
            .as_ref()
            .map(dur)
            .unwrap_or(dur(&self.timeout))
    }

    pub fn timeout(&self) -> Duration {
        dur(&self.timeout)
    }

    pub fn scaledown_window(&self) -> Duration {
        dur(&self.scaledown_window)
    }

    /// The GPU choices in order of preference; empty when the function uses no GPU.
    pub fn gpu_options(&self) -> Vec<GpuOption> {
        self.gpu
            .as_ref()
            .and_then(|g| g.options().ok())
            .unwrap_or_default()
    }

    /// Checks everything a function can get wrong on its own; `field` in the error is the
    /// field's name within the function.
    pub fn validate(&self) -> Result<(), FieldError> {
        let err = |field: &'static str, message: String| Err(FieldError { field, message });
        let l = SpecLimits::DEFAULT;
        if let Err(e) = crate::secrets::check_uses(&self.secrets) {
            return err("secrets", e.to_string());
        }
        if let Err(e) = crate::volumes::check_mounts(&self.volumes) {
            return err("volumes", e.to_string());
        }
        if let Err(e) = crate::code::check_mounts(&self.mounts, &self.volumes) {
            return err("mounts", e.to_string());
        }
        if let Some(schedule) = &self.schedule {
            if self.web.is_some() {
                return err(
                    "schedule",
                    "a web endpoint takes requests, not calls: it cannot run on a schedule".into(),
                );
            }
            if let Err(e) = schedule.parse() {
                return err("schedule", e.to_string());
            }
        }
        if self.image.trim().is_empty() {
            return err(
                "image",
                "must name an image, e.g. `busybox` or `registry.example.com/team/fn:v1`".into(),
            );
        }
        if self.image.len() > l.image_bytes
            || self
                .image
                .chars()
                .any(|c| c.is_control() || c.is_whitespace())
        {
            return err(
                "image",
                format!(
                    "must be an image reference of at most {} bytes without spaces",
                    l.image_bytes
                ),
            );
        }
        if self.command.len() > l.command_args
            || self.command.iter().map(String::len).sum::<usize>() > l.command_bytes
        {
            return err(
                "command",
                format!(
                    "is longer than the limit of {} arguments or {} bytes",
                    l.command_args, l.command_bytes
                ),
            );
        }
        if self.env.len() > l.env_vars
            || self
                .env
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
                > l.env_bytes
        {
            return err(
                "env",
                format!(
                    "is longer than the limit of {} variables or {} bytes",
                    l.env_vars, l.env_bytes
                ),
            );
        }
        if let Some(k) = self.env.keys().find(|k| !crate::api::valid_env_name(k)) {
            return err("env", format!("`{k}` is not a valid variable name"));
        }
        if let Some(k) = self.env.keys().find(|k| k.starts_with("GANTRY_")) {
            return err(
                "env",
                format!("`{k}`: names starting with GANTRY_ are set by Gantry"),
            );
        }
        if let Some(gpu) = &self.gpu {
            let options = gpu.options().map_err(|message| FieldError {
                field: "gpu",
                message,
            })?;
            if options.is_empty() {
                return err(
                    "gpu",
                    "the list is empty; leave `gpu` out for no GPU".into(),
                );
            }
            if options.len() > l.gpu_types {
                return err("gpu", format!("lists more than {} choices", l.gpu_types));
            }
        }
        let secs = |d: Duration| d.as_secs_f64();
        if !(1.0..=86_400.0).contains(&secs(self.timeout())) {
            return err("timeout", "must be between 1s and 24h".into());
        }
        if let Some(t) = &self.startup_timeout
            && !(1.0..=86_400.0).contains(&secs(dur(t)))
        {
            return err("startup_timeout", "must be between 1s and 24h".into());
        }
        if !(2.0..=3_600.0).contains(&secs(self.scaledown_window())) {
            return err("scaledown_window", "must be between 2s and 1h".into());
        }
        match &self.retries {
            Retries::Count(n) if *n > Retries::MAX_RETRIES => {
                return err(
                    "retries",
                    format!("must be at most {}", Retries::MAX_RETRIES),
                );
            }
            Retries::Policy(p) => {
                if p.max_retries > Retries::MAX_RETRIES {
                    return err(
                        "retries.max_retries",
                        format!("must be at most {}", Retries::MAX_RETRIES),
                    );
                }
                if !(1.0..=10.0).contains(&p.backoff_coefficient) {
                    return err(
                        "retries.backoff_coefficient",
                        "must be between 1.0 and 10.0".into(),
                    );
                }
                if secs(dur(&p.initial_delay)) > 60.0 {
                    return err("retries.initial_delay", "must be between 0s and 60s".into());
                }
                if !(1.0..=60.0).contains(&secs(dur(&p.max_delay))) {
                    return err("retries.max_delay", "must be between 1s and 60s".into());
                }
            }
            Retries::Count(_) => {}
        }
        if self.max_containers == 0 || self.max_containers > Self::MAX_CONTAINERS {
            return err(
                "max_containers",
                format!("must be between 1 and {}", Self::MAX_CONTAINERS),
            );
        }
        if self.min_containers > self.max_containers {
            return err(
                "min_containers",
                format!(
                    "is {} but max_containers is {}; raise max_containers or lower this",
                    self.min_containers, self.max_containers
                ),
            );
        }
        if self.buffer_containers > self.max_containers {
            return err(
                "buffer_containers",
                format!("must be at most max_containers ({})", self.max_containers),
            );
        }
        per_container(
            ("max_inputs", self.max_inputs, Self::MAX_INPUTS),
            ("target_inputs", self.target_inputs),
        )?;
        if let Some(web) = &self.web {
            web.validate()?;
        }
        Ok(())
    }
}

/// A manifest field that is wrong: `functions.<name>.<field>: <why>`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("functions.{function}.{field}: {message}")]
pub struct ManifestError {
    pub function: FunctionName,
    pub field: &'static str,
    pub message: String,
}

impl AppManifest {
    /// A bound on the functions of one app.
    pub const MAX_FUNCTIONS: usize = 256;

    /// Checks every function; the first wrong field is named with its function.
    pub fn validate(&self) -> Result<(), ManifestValidationError> {
        if self.functions.is_empty() {
            return Err(ManifestValidationError::NoFunctions);
        }
        if self.functions.len() > Self::MAX_FUNCTIONS {
            return Err(ManifestValidationError::TooManyFunctions {
                max: Self::MAX_FUNCTIONS,
            });
        }
        for (name, f) in &self.functions {
            f.validate().map_err(|e| {
                ManifestValidationError::Function(ManifestError {
                    function: name.clone(),
                    field: e.field,
                    message: e.message,
                })
            })?;
        }
        // Two web endpoints of one app cannot share an address.
        let mut labels: BTreeMap<String, &FunctionName> = BTreeMap::new();
        for (name, web) in self
            .functions
            .iter()
            .filter_map(|(n, f)| Some((n, f.web.as_ref()?)))
        {
            let label = web.label_for(name);
            if AppName::new(label.clone()).is_err() {
                return Err(ManifestValidationError::Function(ManifestError {
                    function: name.clone(),
                    field: "web.label",
                    message: format!(
                        "the function's name does not make a label (`{label}`); give one: 1 to 63 lower-case letters, digits and `-`"
                    ),
                }));
            }
            if let Some(other) = labels.insert(label.clone(), name) {
                return Err(ManifestValidationError::Function(ManifestError {
                    function: name.clone(),
                    field: "web.label",
                    message: format!(
                        "`{label}` is also the label of function `{other}`; give one of them another `label`"
                    ),
                }));
            }
        }
        Ok(())
    }

    /// The function serving web endpoint `label`, if any.
    pub fn web_function(&self, label: &str) -> Option<(&FunctionName, &FunctionSpec, &WebSpec)> {
        self.functions.iter().find_map(|(name, f)| {
            let web = f.web.as_ref()?;
            (web.label_for(name) == label).then_some((name, f, web))
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestValidationError {
    #[error("functions: the manifest has none; add a `[functions.NAME]` table with an `image`")]
    NoFunctions,
    #[error("functions: an app holds at most {max} functions")]
    TooManyFunctions { max: usize },
    #[error(transparent)]
    Function(#[from] ManifestError),
}

/// One deployment of an app: an immutable version of its manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DeploymentView {
    #[schema(value_type = String)]
    pub app: AppName,
    /// 1 for the first deployment; each `gantry deploy` adds one.
    pub version: u64,
    pub created_at_ms: u64,
    pub manifest: AppManifest,
}

/// An app: its versions, the one new calls go to, and its functions' containers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AppView {
    #[schema(value_type = String)]
    pub app: AppName,
    /// The version new calls go to; absent once the app is stopped.
    pub active_version: Option<u64>,
    pub versions: Vec<VersionSummary>,
    pub functions: Vec<FunctionView>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VersionSummary {
    pub version: u64,
    pub created_at_ms: u64,
    #[schema(value_type = Vec<String>)]
    pub functions: Vec<FunctionName>,
}

/// A function of an app's versions that still has work or containers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct FunctionView {
    #[schema(value_type = String)]
    pub name: FunctionName,
    pub version: u64,
    /// Placed, not yet ready.
    pub starting: u32,
    /// Ready with nothing leased.
    pub idle: u32,
    /// Ready and holding inputs.
    pub busy: u32,
    /// Told to finish and exit.
    pub draining: u32,
    /// Inputs waiting for a slot.
    pub queued: u32,
    /// Inputs leased to containers.
    pub running: u32,
    /// Containers the autoscaler wants now.
    pub desired: u32,
    /// Inputs that ended in the last minute (÷ 60: inputs per second).
    pub ended_last_minute: u32,
    /// Latency (accepted → ended) of those inputs.
    pub p50_ms: Option<u64>,
    pub p99_ms: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(toml_text: &str) -> AppManifest {
        toml::from_str(toml_text).expect("manifest parses")
    }

    #[test]
    fn code_mounts_parse_from_toml_and_their_mistakes_name_the_field() {
        let a = format!("sha256:{}", "a".repeat(64));
        let text = |mounts: &str| {
            format!(
                "app = \"a\"\n[functions.f]\nimage = \"x\"\nvolumes = {{ \"/data\" = \"v\" }}\n{mounts}"
            )
        };
        let ok = manifest(&text(&format!(
            "[[functions.f.mounts]]\npath = \"/root\"\nfiles = [{{ path = \"app.py\", digest = \"{a}\" }}]\n\
             [[functions.f.mounts]]\npath = \"/opt/code\"\nfiles = [{{ path = \"bin/run\", digest = \"{a}\", executable = true }}]\n"
        )));
        ok.validate().expect("valid");
        let f = &ok.functions[&FunctionName::new("f").expect("name")];
        assert_eq!(f.mounts.len(), 2);
        assert!(f.mounts[1].files[0].executable);
        let e = manifest(&text(&format!(
            "[[functions.f.mounts]]\npath = \"/data\"\nfiles = [{{ path = \"a\", digest = \"{a}\" }}]\n"
        )))
        .validate()
        .expect_err("on a volume")
        .to_string();
        assert!(e.starts_with("functions.f.mounts: "), "{e}");
        let bad = toml::from_str::<AppManifest>(&text(&format!(
            "[[functions.f.mounts]]\npath = \"/root\"\nfiles = [{{ path = \"../x\", digest = \"{a}\" }}]\n"
        )))
        .expect_err("bad path")
        .to_string();
        assert!(bad.contains("`../x`"), "{bad}");
        // None is written back as none.
        let plain = manifest(&text(""));
        let json = serde_json::to_value(&plain).expect("json");
        assert!(json["functions"]["f"].get("mounts").is_none(), "{json}");
    }

    #[test]
    fn a_schedule_is_checked_at_deploy_and_never_on_a_web_endpoint() {
        let scheduled = |extra: &str| {
            manifest(&format!(
                "app = \"a\"\n[functions.f]\nimage = \"x\"\nschedule = {extra}\n"
            ))
            .validate()
        };
        scheduled("{ period = \"1h\" }").expect("valid");
        let e = scheduled("{ cron = \"bad\" }")
            .expect_err("bad cron")
            .to_string();
        assert!(e.contains("functions.f.schedule"), "{e}");
        let web = manifest(
            "app = \"a\"\n[functions.f]\nimage = \"x\"\nschedule = { period = \"1h\" }\n[functions.f.web]\n",
        );
        let e = web.validate().expect_err("web with a schedule").to_string();
        assert!(e.contains("cannot run on a schedule"), "{e}");
    }

    #[test]
    fn a_web_table_parses_with_defaults_and_its_mistakes_are_named() {
        let m = manifest(
            r#"
app = "site"
[functions.serve_model]
image = "vllm"
[functions.serve_model.web]
readiness = "GET /health"
"#,
        );
        m.validate().expect("valid");
        let (name, f, web) = m.web_function("serve-model").expect("label from the name");
        assert_eq!(name.as_str(), "serve_model");
        assert_eq!(
            (web.via, web.port(), web.max_concurrency, web.max_pending),
            (WebVia::Port, 8000, 100, 1000)
        );
        assert_eq!(
            (web.target_concurrency(), f.target_per_container()),
            (70, 70)
        );
        assert!(!web.public);
        assert_eq!(
            web.probe(),
            Ok(crate::protocol::Readiness::Http {
                path: "/health".into()
            })
        );
        let tcp = manifest("app = \"a\"\n[functions.f]\nimage = \"x\"\n[functions.f.web]\n");
        let web = tcp.functions.values().next().and_then(|f| f.web.clone());
        assert_eq!(
            web.map(|w| w.probe()),
            Some(Ok(crate::protocol::Readiness::Tcp))
        );

        let bad = |table: &str| {
            manifest(&format!(
                "app = \"a\"\n[functions.f]\nimage = \"x\"\n[functions.f.web]\n{table}\n"
            ))
            .validate()
            .expect_err(table)
            .to_string()
        };
        assert!(bad("port = 0").contains("functions.f.web.port"));
        assert!(bad("readiness = \"POST /x\"").contains("GET /health"));
        assert!(bad("readiness = \"GET health\"").contains("web.readiness"));
        assert!(bad("max_concurrency = 0").contains("web.max_concurrency"));
        assert!(bad("max_concurrency = 4\ntarget_concurrency = 5").contains("max_concurrency (4)"));
        assert!(bad("max_pending = 1000000").contains("web.max_pending"));
        assert!(bad("label = \"Has_Upper\"").contains("web.label"));
        // A runtime API endpoint has no port and no probe.
        let inputs = manifest(
            "app = \"a\"\n[functions.f]\nimage = \"x\"\n[functions.f.web]\nvia = \"runtime_api\"\n",
        );
        inputs.validate().expect("valid");
        assert!(bad("via = \"runtime_api\"\nport = 80").contains("functions.f.web.port: a `via"));
        assert!(bad("via = \"runtime_api\"\nreadiness = \"tcp\"").contains("web.readiness"));
        // Two endpoints of one app cannot share a label.
        let twice = manifest(
            r#"
app = "a"
[functions.x]
image = "x"
[functions.x.web]
label = "api"
[functions.y]
image = "x"
[functions.y.web]
label = "api"
"#,
        );
        let e = twice.validate().expect_err("one label twice").to_string();
        assert!(e.contains("`api` is also the label of function `x`"), "{e}");
    }

    #[test]
    fn the_issue_example_parses_with_defaults() {
        let m = manifest(
            r#"
app = "embed"
[functions.encode]
image = "embedder:v3"
command = ["/app/serve"]
gpu = ["H100:1", "A100-80GB:1"]
memory = "16G"
max_containers = 8
scaledown_window = "2m"
max_inputs = 4
"#,
        );
        m.validate().expect("valid");
        let f = &m.functions[&FunctionName::new("encode").expect("name")];
        assert_eq!(f.max_containers, 8);
        assert_eq!(f.target_inputs(), 4);
        assert_eq!(f.scaledown_window(), Duration::from_secs(120));
        assert_eq!(f.timeout(), Duration::from_secs(300));
        assert_eq!(f.startup_timeout(), Duration::from_secs(300));
        assert_eq!(f.min_containers, 0);
        assert_eq!(f.cpu.value().0, 1000);
        assert_eq!(
            f.gpu_options(),
            vec![
                GpuOption {
                    model: Some("H100".into()),
                    count: 1
                },
                GpuOption {
                    model: Some("A100-80GB".into()),
                    count: 1
                }
            ]
        );
        // JSON through the API is the same document.
        let json = serde_json::to_string(&m).expect("json");
        assert_eq!(serde_json::from_str::<AppManifest>(&json).expect("back"), m);
    }

    #[test]
    fn retries_are_a_count_or_a_policy() {
        let m = manifest(
            r#"
app = "a"
[functions.f]
image = "busybox"
retries = 3
[functions.g]
image = "busybox"
retries = { max_retries = 4, initial_delay = "2s", max_delay = "10s" }
"#,
        );
        m.validate().expect("valid");
        let f = &m.functions[&FunctionName::new("f").expect("name")];
        assert_eq!(f.retries.max_retries(), 3);
        assert_eq!(f.retries.delay(3), Duration::from_secs(1));
        let g = &m.functions[&FunctionName::new("g").expect("name")];
        assert_eq!(g.retries.max_retries(), 4);
        assert_eq!(g.retries.delay(1), Duration::from_secs(2));
        assert_eq!(g.retries.delay(2), Duration::from_secs(4));
        assert_eq!(g.retries.delay(4), Duration::from_secs(10));
    }

    #[test]
    fn wrong_fields_are_named_with_their_function() {
        let cases = [
            ("max_containers = 0", "functions.f.max_containers"),
            ("min_containers = 20", "functions.f.min_containers"),
            ("scaledown_window = \"1s\"", "functions.f.scaledown_window"),
            ("timeout = \"25h\"", "functions.f.timeout"),
            ("gpu = \"H100:0\"", "functions.f.gpu"),
            ("gpu = []", "functions.f.gpu"),
            (
                "max_inputs = 2\ntarget_inputs = 3",
                "functions.f.target_inputs",
            ),
            ("retries = 11", "functions.f.retries"),
            (
                "retries = { max_retries = 2, backoff_coefficient = 20.0 }",
                "functions.f.retries.backoff_coefficient",
            ),
            ("env = { GANTRY_X = \"1\" }", "functions.f.env"),
            ("env = { \"1A\" = \"1\" }", "functions.f.env"),
        ];
        for (line, field) in cases {
            let m = manifest(&format!(
                "app = \"a\"\n[functions.f]\nimage = \"busybox\"\n{line}\n"
            ));
            let e = m.validate().expect_err(line).to_string();
            assert!(e.starts_with(&format!("{field}:")), "{line}: {e}");
        }
        let empty = manifest("app = \"a\"\nfunctions = {}\n");
        assert_eq!(empty.validate(), Err(ManifestValidationError::NoFunctions));
    }

    #[test]
    fn names_and_unknown_fields_are_refused_when_parsed() {
        let bad_app = toml::from_str::<AppManifest>(
            "app = \"Embed App\"\n[functions.f]\nimage = \"busybox\"\n",
        );
        assert!(bad_app.is_err());
        let unknown = toml::from_str::<AppManifest>(
            "app = \"a\"\n[functions.f]\nimage = \"busybox\"\nmax_container = 3\n",
        )
        .expect_err("typo")
        .to_string();
        assert!(unknown.contains("max_container"), "{unknown}");
        assert!(FunctionName::new("encode_v2").is_ok());
        assert!(FunctionName::new("2encode").is_err());
    }

    #[test]
    fn gpu_choices_parse_model_and_count() {
        assert_eq!(
            GpuOption::parse("any:4"),
            Ok(GpuOption {
                model: None,
                count: 4
            })
        );
        assert_eq!(
            GpuOption::parse("H100"),
            Ok(GpuOption {
                model: Some("H100".into()),
                count: 1
            })
        );
        assert!(GpuOption::parse("H100:x").is_err());
        assert!(GpuOption::parse("H 100").is_err());
    }
}
