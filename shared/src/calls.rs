//! Calls of functions as the API, the CLI and agents see them: payloads (opaque bytes with a
//! content type), a call request, an input leased to a container, how an input ended, and
//! where its time went.

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::ids::{AppName, CallId, FunctionName, InputId, NodeId, WarmId};

/// Opaque bytes with a content type: one input or one output. In JSON it is
/// `{"content_type": "...", "text": "..."}` for UTF-8, or `"base64": "..."` for any bytes.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Payload {
    pub content_type: String,
    pub bytes: Vec<u8>,
}

impl Payload {
    /// The most one input or output may hold inline (2 MiB).
    pub const MAX_BYTES: usize = 2 << 20;
    pub const DEFAULT_CONTENT_TYPE: &str = "application/octet-stream";

    pub fn new(content_type: impl Into<String>, bytes: Vec<u8>) -> Self {
        Self {
            content_type: content_type.into(),
            bytes,
        }
    }

    pub fn text(text: &str) -> Self {
        Self::new("text/plain", text.as_bytes().to_vec())
    }

    /// Refuses a payload over [`Payload::MAX_BYTES`] or with a content type that is not one
    /// header value.
    pub fn check(&self) -> Result<(), PayloadError> {
        if self.bytes.len() > Self::MAX_BYTES {
            return Err(PayloadError::TooLarge {
                bytes: self.bytes.len(),
                max: Self::MAX_BYTES,
            });
        }
        if self.content_type.len() > 256
            || self
                .content_type
                .chars()
                .any(|c| c.is_control() || !c.is_ascii())
        {
            return Err(PayloadError::ContentType);
        }
        Ok(())
    }
}

impl Payload {
    /// Its bytes as JSON carries them: `(Some(text), None)` for UTF-8, else
    /// `(None, Some(base64))`.
    pub fn text_or_base64(&self) -> (Option<String>, Option<String>) {
        match std::str::from_utf8(&self.bytes) {
            Ok(t) => (Some(t.to_owned()), None),
            Err(_) => (
                None,
                Some(base64::engine::general_purpose::STANDARD.encode(&self.bytes)),
            ),
        }
    }
}

impl std::fmt::Debug for Payload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Payload({}, {} bytes)",
            self.content_type,
            self.bytes.len()
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    #[error(
        "the payload is {bytes} bytes; at most {max} travel inline (store larger data in a volume and pass its path)"
    )]
    TooLarge { bytes: usize, max: usize },
    #[error("content_type must be printable ASCII of at most 256 bytes")]
    ContentType,
    #[error("a payload needs exactly one of `text` and `base64`")]
    Body,
    #[error("`base64` is not valid base64: {0}")]
    Base64(String),
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PayloadJson {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    content_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    text: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    base64: Option<String>,
}

impl Serialize for Payload {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let (text, base64) = self.text_or_base64();
        PayloadJson {
            content_type: Some(self.content_type.clone()),
            text,
            base64,
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for Payload {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let j = PayloadJson::deserialize(d)?;
        let bytes = match (j.text, j.base64) {
            (Some(t), None) => t.into_bytes(),
            (None, Some(b)) => base64::engine::general_purpose::STANDARD
                .decode(b.as_bytes())
                .map_err(|e| D::Error::custom(PayloadError::Base64(e.to_string())))?,
            _ => return Err(D::Error::custom(PayloadError::Body)),
        };
        Ok(Payload {
            content_type: j
                .content_type
                .unwrap_or_else(|| Payload::DEFAULT_CONTENT_TYPE.to_owned()),
            bytes,
        })
    }
}

impl utoipa::PartialSchema for Payload {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, Type};
        ObjectBuilder::new()
            .property(
                "content_type",
                ObjectBuilder::new().schema_type(Type::String),
            )
            .property("text", ObjectBuilder::new().schema_type(Type::String))
            .property("base64", ObjectBuilder::new().schema_type(Type::String))
            .description(Some(
                "Opaque bytes with a content type: `text` for UTF-8, `base64` for any bytes",
            ))
            .into()
    }
}

impl ToSchema for Payload {}

/// `POST /v1/apps/{app}/functions/{function}/calls`: one input (`input`) or many (`inputs`,
/// a map). With `wait` (the default) the request waits up to 55 s for the outputs; without
/// it, it answers at once with the call's id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CallRequest {
    #[serde(default)]
    pub input: Option<Payload>,
    #[serde(default)]
    pub inputs: Vec<Payload>,
    #[serde(default = "yes")]
    pub wait: bool,
    /// A streamed map: more inputs may follow (`POST /v1/calls/{id}/inputs`) until one
    /// says `close`. `inputs` may then be empty.
    #[serde(default)]
    pub open: bool,
}

fn yes() -> bool {
    true
}

impl CallRequest {
    /// The most inputs one call may carry.
    pub const MAX_INPUTS: usize = 100_000;

    /// The call's inputs in order, checked.
    pub fn into_inputs(self) -> Result<Vec<Payload>, CallRequestError> {
        let inputs = match (self.input, self.inputs.is_empty()) {
            (Some(one), true) => vec![one],
            (None, false) => self.inputs,
            (None, true) if self.open => Vec::new(),
            (None, true) => return Err(CallRequestError::NoInput),
            (Some(_), false) => return Err(CallRequestError::Both),
        };
        if inputs.len() > Self::MAX_INPUTS {
            return Err(CallRequestError::TooMany {
                max: Self::MAX_INPUTS,
            });
        }
        for (index, p) in inputs.iter().enumerate() {
            p.check()
                .map_err(|source| CallRequestError::Payload { index, source })?;
        }
        Ok(inputs)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallRequestError {
    #[error("the call has no input; send `input` (one) or `inputs` (a map)")]
    NoInput,
    #[error("send either `input` or `inputs`, not both")]
    Both,
    #[error("a call holds at most {max} inputs; split the map into several calls")]
    TooMany { max: usize },
    #[error("input {index}: {source}")]
    Payload { index: usize, source: PayloadError },
}

/// One input as a container receives it through the runtime API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeasedInput {
    pub id: InputId,
    pub call: CallId,
    /// 1 for the first try; each retry or re-lease adds one.
    pub attempt: u32,
    /// When the input's `timeout` runs out (unix ms).
    pub deadline_ms: u64,
    pub payload: Payload,
}

/// How an input ended without an output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct InputFailure {
    /// Whose failure it was.
    pub cause: FailureCause,
    /// The error's type as the function named it (`ValueError`), or Gantry's name for a
    /// platform failure (`ContainerLost`).
    #[serde(rename = "type")]
    pub error_type: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceback: Option<String>,
}

/// Whose failure ended an input: decides retries (only `user` uses the function's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FailureCause {
    /// The function returned an error for it.
    User,
    /// It ran past the function's `timeout`.
    Timeout,
    /// The container could not be started or set up (bad image, a failed init).
    Init,
    /// The platform failed it more times than it retries (node lost, container died).
    Platform,
    /// Its call was cancelled.
    Cancelled,
}

/// What a container reports for one input.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InputResult {
    Output(Payload),
    Error(InputFailure),
}

impl InputResult {
    /// About how many bytes it carries (for batching).
    pub fn size(&self) -> usize {
        match self {
            InputResult::Output(p) => p.bytes.len(),
            InputResult::Error(e) => {
                e.error_type.len() + e.message.len() + e.traceback.as_ref().map_or(0, String::len)
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum InputState {
    /// Waiting for a container with a free slot (or for a retry's delay).
    Queued,
    /// Leased to a container.
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl InputState {
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }
}

/// Where one input's time went, in milliseconds. A phase it did not go through (an input
/// that found a warm container needed no placement, image or start) is absent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PhaseTimings {
    /// Waiting in the queue, apart from the phases below.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queued_ms: Option<u64>,
    /// Deciding where a new container goes and telling its node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement_ms: Option<u64>,
    /// Pulling and unpacking the image on the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_ms: Option<u64>,
    /// From the container's start to its `ready`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub startup_ms: Option<u64>,
    /// From the lease to the output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_ms: Option<u64>,
}

/// One input of a call, as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct InputView {
    pub index: u32,
    #[schema(value_type = String)]
    pub id: InputId,
    pub state: InputState,
    /// Tries so far (0 while never leased).
    pub attempt: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Payload>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<InputFailure>,
    /// The container that ran it last, and its node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub container: Option<WarmId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub node: Option<NodeId>,
    pub timings: PhaseTimings,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CallState {
    /// Some input has not ended.
    Running,
    /// Every input has an output.
    Succeeded,
    /// Every input ended and at least one failed.
    Failed,
    Cancelled,
}

/// A call, as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CallView {
    #[schema(value_type = String)]
    pub id: CallId,
    #[schema(value_type = String)]
    pub app: AppName,
    #[schema(value_type = String)]
    pub function: FunctionName,
    /// The deployment version the call went to.
    pub version: u64,
    pub state: CallState,
    pub created_at_ms: u64,
    pub inputs: u32,
    pub succeeded: u32,
    pub failed: u32,
    /// A streamed map that takes more inputs (`POST /v1/calls/{id}/inputs`) until closed;
    /// it runs until it is closed and every input ended.
    #[serde(default)]
    pub open: bool,
    /// Each input, in order, with its output or error once it has one.
    pub results: Vec<InputView>,
}

/// More inputs for an open map: `POST /v1/calls/{id}/inputs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AppendRequest {
    /// The index the first of `inputs` gets: the number of inputs the map holds so far. A
    /// request sent again (its answer lost) with the same `start` and inputs is answered
    /// as before and adds nothing.
    pub start: u32,
    #[serde(default)]
    pub inputs: Vec<Payload>,
    /// No more inputs come after these.
    #[serde(default)]
    pub close: bool,
}

impl AppendRequest {
    /// The inputs, checked (at most [`MAX_OUTSTANDING`] per request).
    pub fn checked_inputs(&self) -> Result<(), CallRequestError> {
        if self.inputs.len() > MAX_OUTSTANDING as usize {
            return Err(CallRequestError::TooMany {
                max: MAX_OUTSTANDING as usize,
            });
        }
        for (i, p) in self.inputs.iter().enumerate() {
            p.check().map_err(|source| CallRequestError::Payload {
                index: self.start as usize + i,
                source,
            })?;
        }
        Ok(())
    }
}

/// The most inputs an open map holds outstanding (accepted, not ended): an append that
/// would go beyond waits for room.
pub const MAX_OUTSTANDING: u32 = 1_000;

/// An open map after an append.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AppendView {
    #[schema(value_type = String)]
    pub call: CallId,
    /// Inputs the map holds now: the next append's `start`.
    pub inputs: u32,
    /// Inputs accepted and not yet ended.
    pub outstanding: u32,
    pub open: bool,
}

/// The order `GET /v1/calls/{id}/outputs` returns results in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum OutputOrder {
    /// By input index: the ended inputs from `from` on, up to the first that has not ended.
    #[default]
    Input,
    /// As they ended: `from` counts ended inputs in the order they ended.
    Completion,
}

/// A page of a call's results, for reading a map's outputs while it runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct OutputsPage {
    /// Ended inputs, each with its output or error, in the order asked for.
    pub results: Vec<InputView>,
    /// The `from` of the next page.
    pub next: u32,
    /// Every result has been returned: the call is closed and `next` covers all of it.
    pub done: bool,
}
