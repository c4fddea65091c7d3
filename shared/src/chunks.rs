//! Streamed chunks of a running input: what a function container posts to
//! `POST /v1/inputs/{id}/stream` while it works on a call's input (a generator's items, what
//! it prints), their bounds, and how a reader sees them in `GET /v1/calls/{id}/stream`.
//!
//! Chunks are not durable: the agent and the coordinator hold them in memory only (the
//! input's final answer stays exactly-once, as ever). The wire form between them is
//! [`crate::protocol::ChunkItem`].

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::calls::Payload;

/// The most bytes one chunk carries (1 MiB): 413 beyond.
pub const MAX_CHUNK_BYTES: usize = 1 << 20;
/// The most chunks one input's attempt may post (429 beyond).
pub const MAX_CHUNKS_PER_INPUT: u32 = 10_000;
/// The most chunk bytes one input's attempt may post, all its chunks together (429 beyond).
pub const MAX_CHUNK_BYTES_PER_INPUT: u64 = 64 << 20;

/// One chunk as a reader sees it: its place in the input's stream, the attempt that posted
/// it, and its bytes in the payloads' JSON form (`text` for UTF-8, `base64` otherwise).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct StreamChunk {
    /// Its place in the input's stream: 0, 1, 2… in the order the container posted them,
    /// continuing across attempts (a retry's chunks follow its earlier attempt's places).
    /// A gap means chunks were dropped (the coordinator's memory bound, or its restart).
    pub seq: u64,
    /// The input's try that posted it (1, 2, …): a reader that sees it change knows a
    /// retry started the stream afresh, the earlier attempt's chunks being dropped.
    pub attempt: u32,
    pub content_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base64: Option<String>,
}

impl StreamChunk {
    /// The chunk at `seq` of `attempt`, holding `payload`.
    pub fn new(seq: u64, attempt: u32, payload: &Payload) -> Self {
        let (text, base64) = payload.text_or_base64();
        Self {
            seq,
            attempt,
            content_type: payload.content_type.clone(),
            text,
            base64,
        }
    }

    /// Its bytes (empty when `base64` does not decode, which a chunk made by
    /// [`StreamChunk::new`] never has).
    pub fn bytes(&self) -> Vec<u8> {
        match (&self.text, &self.base64) {
            (Some(t), _) => t.as_bytes().to_vec(),
            (None, Some(b)) => base64::engine::general_purpose::STANDARD
                .decode(b.as_bytes())
                .unwrap_or_default(),
            (None, None) => Vec::new(),
        }
    }
}

/// `GET /v1/calls/{id}/stream`: a page of one input's chunks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct StreamPage {
    /// The chunks from `from` on, in order.
    pub chunks: Vec<StreamChunk>,
    /// The `from` of the next page.
    pub next: u64,
    /// The input has ended and every chunk it still has was returned: nothing more comes.
    pub done: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunk_is_text_or_base64() {
        let c = StreamChunk::new(3, 1, &Payload::text("hi"));
        let json = serde_json::to_value(&c).expect("json");
        assert_eq!(
            json,
            serde_json::json!({"seq": 3, "attempt": 1, "content_type": "text/plain", "text": "hi"})
        );
        let b = StreamChunk::new(0, 2, &Payload::new("x/y", vec![0xff, 0]));
        assert_eq!(b.base64.as_deref(), Some("/wA="));
        assert_eq!(b.bytes(), [0xff, 0]);
    }
}
