//! Streamed chunks of inputs, in memory (pure: every method takes the time): what function
//! containers post to `POST /v1/inputs/{id}/stream` while an input runs, kept for
//! `GET /v1/calls/{id}/stream`.
//!
//! Each input has one stream: its chunks in the order its container posted them, each at
//! a place (`seq`) that only grows, across attempts too: a retry's first chunk drops the
//! earlier attempt's chunks and its own continue after their places. Bounded per input
//! ([`ChunkLimits::per_input_chunks`], [`ChunkLimits::per_input_bytes`]: what goes beyond
//! is dropped; the agent refuses it first) and all together
//! ([`ChunkLimits::total_bytes`]: the streams of the inputs that ended longest ago go
//! first, then the oldest chunks of the largest live stream). A stream is kept until
//! [`ChunkLimits::keep_after_end`] after its input ended. Nothing here is durable: a
//! coordinator restart loses every stream.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::time::Duration;

use gantry_shared::InputId;
use gantry_shared::calls::Payload;
use gantry_shared::chunks::{
    MAX_CHUNK_BYTES_PER_INPUT, MAX_CHUNKS_PER_INPUT, StreamChunk, StreamPage,
};

/// Bytes a chunk counts for besides its payload, in the total bound: a stream of empty
/// chunks is not free.
const CHUNK_OVERHEAD: u64 = 128;

/// The bounds of the streams.
#[derive(Debug, Clone)]
pub struct ChunkLimits {
    pub per_input_chunks: usize,
    pub per_input_bytes: u64,
    /// Every stream together, payloads and [`CHUNK_OVERHEAD`] per chunk.
    pub total_bytes: u64,
    /// How long a stream stays once its input ended.
    pub keep_after_end: Duration,
    /// The most chunks, and about the most payload bytes, one page returns (at least one
    /// chunk).
    pub page_chunks: usize,
    pub page_bytes: usize,
}

impl Default for ChunkLimits {
    fn default() -> Self {
        Self {
            per_input_chunks: MAX_CHUNKS_PER_INPUT as usize,
            per_input_bytes: MAX_CHUNK_BYTES_PER_INPUT,
            total_bytes: 256 << 20,
            keep_after_end: Duration::from_secs(600),
            page_chunks: 1_000,
            page_bytes: 8 << 20,
        }
    }
}

/// What became of a chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    Kept,
    /// Had already (a resend), or of an earlier attempt than the stream's.
    Stale,
    /// Its input ended already.
    Ended,
    /// Beyond the input's bounds.
    Full,
}

#[derive(Debug)]
struct Chunk {
    seq: u64,
    attempt: u32,
    payload: Payload,
}

#[derive(Debug, Default)]
struct Stream {
    attempt: u32,
    /// The next chunk number of `attempt` the agent is expected to send.
    next_agent_seq: u64,
    /// The place the next chunk gets.
    next_seq: u64,
    chunks: VecDeque<Chunk>,
    /// Payload bytes of `attempt`'s chunks, kept or not (the per-input bound).
    attempt_bytes: u64,
    /// Chunks of `attempt`, kept or not.
    attempt_chunks: usize,
    /// Counted in the total: payloads and overheads of `chunks`.
    held_bytes: u64,
    ended_ms: Option<u64>,
}

/// Every input's stream.
#[derive(Debug, Default)]
pub struct Chunks {
    limits: ChunkLimits,
    streams: HashMap<InputId, Stream>,
    /// Ended streams by when they ended, oldest first.
    ended: BTreeSet<(u64, InputId)>,
    total: u64,
}

impl Chunks {
    pub fn new(limits: ChunkLimits) -> Self {
        Self {
            limits,
            ..Self::default()
        }
    }

    /// Bytes held now, all streams together (overheads included).
    pub fn total_bytes(&self) -> u64 {
        self.total
    }

    /// Chunk `agent_seq` of `attempt` of `input` (the caller checked it comes from the
    /// input's current lease).
    pub fn push(
        &mut self,
        input: &InputId,
        attempt: u32,
        agent_seq: u64,
        payload: Payload,
    ) -> Pushed {
        let limits = self.limits.clone();
        let stream = self.streams.entry(input.clone()).or_default();
        if stream.ended_ms.is_some() {
            return Pushed::Ended;
        }
        if attempt < stream.attempt {
            return Pushed::Stale;
        }
        if attempt > stream.attempt {
            // A retry starts afresh: the earlier attempt's chunks go, the places go on.
            self.total -= stream.held_bytes;
            stream.chunks.clear();
            stream.held_bytes = 0;
            stream.attempt = attempt;
            stream.next_agent_seq = 0;
            stream.attempt_bytes = 0;
            stream.attempt_chunks = 0;
        }
        if agent_seq < stream.next_agent_seq {
            return Pushed::Stale;
        }
        // A gap (chunks this coordinator never got, e.g. sent before its restart) is
        // skipped: the next chunk is the one after this.
        stream.next_agent_seq = agent_seq + 1;
        let bytes = payload.bytes.len() as u64;
        if stream.attempt_chunks >= limits.per_input_chunks
            || stream.attempt_bytes + bytes > limits.per_input_bytes
        {
            return Pushed::Full;
        }
        stream.attempt_chunks += 1;
        stream.attempt_bytes += bytes;
        let held = bytes + CHUNK_OVERHEAD;
        stream.held_bytes += held;
        self.total += held;
        stream.chunks.push_back(Chunk {
            seq: stream.next_seq,
            attempt,
            payload,
        });
        stream.next_seq += 1;
        self.enforce_total(input);
        Pushed::Kept
    }

    /// Input `input` ended at `now`: its stream takes no more chunks and is kept until
    /// [`ChunkLimits::keep_after_end`] from now.
    pub fn end(&mut self, input: &InputId, now: u64) {
        if let Some(stream) = self.streams.get_mut(input)
            && stream.ended_ms.is_none()
        {
            stream.ended_ms = Some(now);
            self.ended.insert((now, input.clone()));
        }
    }

    /// Drops the streams whose inputs ended [`ChunkLimits::keep_after_end`] before `now`.
    pub fn expire(&mut self, now: u64) {
        let keep = self.limits.keep_after_end.as_millis() as u64;
        while let Some((at, input)) = self.ended.first().cloned() {
            if at.saturating_add(keep) > now {
                break;
            }
            self.ended.pop_first();
            self.remove(&input);
        }
    }

    fn remove(&mut self, input: &InputId) {
        if let Some(stream) = self.streams.remove(input) {
            self.total -= stream.held_bytes;
        }
    }

    /// Over the total bound: the streams of the inputs that ended longest ago go first,
    /// then the oldest chunks of the largest live stream (never `keep`'s newest chunk).
    fn enforce_total(&mut self, keep: &InputId) {
        while self.total > self.limits.total_bytes {
            if let Some((_, input)) = self.ended.pop_first() {
                self.remove(&input);
                continue;
            }
            let largest = self
                .streams
                .iter()
                .filter(|(id, s)| {
                    // Its newest chunk stays: what was just kept is not dropped at once.
                    let floor = if *id == keep { 1 } else { 0 };
                    s.chunks.len() > floor
                })
                .max_by_key(|(_, s)| s.held_bytes)
                .map(|(id, _)| id.clone());
            let Some(largest) = largest else {
                return;
            };
            if let Some(stream) = self.streams.get_mut(&largest)
                && let Some(chunk) = stream.chunks.pop_front()
            {
                let held = chunk.payload.bytes.len() as u64 + CHUNK_OVERHEAD;
                stream.held_bytes -= held;
                self.total -= held;
            }
        }
    }

    /// A page of `input`'s chunks from place `from` on. `ended`: the input has ended
    /// (read before the chunks, so that every chunk it streamed is here already); the
    /// page is `done` when it has and nothing is left after the page.
    pub fn read(&self, input: &InputId, from: u64, ended: bool) -> StreamPage {
        let Some(stream) = self.streams.get(input) else {
            return StreamPage {
                chunks: Vec::new(),
                next: from,
                done: ended,
            };
        };
        let mut chunks = Vec::new();
        let mut bytes = 0;
        let mut next = from.max(stream.chunks.front().map_or(stream.next_seq, |c| c.seq));
        for chunk in stream.chunks.iter().filter(|c| c.seq >= from) {
            let n = chunk.payload.bytes.len();
            if chunks.len() >= self.limits.page_chunks
                || (!chunks.is_empty() && bytes + n > self.limits.page_bytes)
            {
                break;
            }
            bytes += n;
            chunks.push(StreamChunk::new(chunk.seq, chunk.attempt, &chunk.payload));
            next = chunk.seq + 1;
        }
        StreamPage {
            chunks,
            next,
            done: ended && next >= stream.next_seq,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gantry_shared::CallId;

    fn id(n: u32) -> InputId {
        InputId::of(&CallId::new("c-1").expect("call"), n)
    }

    fn texts(page: &StreamPage) -> Vec<(u64, u32, String)> {
        page.chunks
            .iter()
            .map(|c| (c.seq, c.attempt, c.text.clone().unwrap_or_default()))
            .collect()
    }

    fn limits() -> ChunkLimits {
        ChunkLimits {
            per_input_chunks: 3,
            per_input_bytes: 10,
            total_bytes: 3 * (CHUNK_OVERHEAD + 4),
            keep_after_end: Duration::from_secs(600),
            page_chunks: 2,
            page_bytes: 100,
        }
    }

    #[test]
    fn chunks_keep_their_order_resends_count_once_and_pages_follow_next() {
        let mut c = Chunks::new(ChunkLimits::default());
        assert_eq!(c.push(&id(0), 1, 0, Payload::text("a")), Pushed::Kept);
        assert_eq!(c.push(&id(0), 1, 1, Payload::text("b")), Pushed::Kept);
        // A batch sent again after a lost reply.
        assert_eq!(c.push(&id(0), 1, 1, Payload::text("b")), Pushed::Stale);
        assert_eq!(c.push(&id(0), 1, 2, Payload::text("c")), Pushed::Kept);
        let page = c.read(&id(0), 0, false);
        assert_eq!(
            texts(&page),
            [(0, 1, "a".into()), (1, 1, "b".into()), (2, 1, "c".into())]
        );
        assert_eq!((page.next, page.done), (3, false));
        let later = c.read(&id(0), 3, false);
        assert!(later.chunks.is_empty());
        assert_eq!(later.next, 3);
        // Ended: done once every chunk was returned.
        c.end(&id(0), 10);
        assert_eq!(c.push(&id(0), 1, 3, Payload::text("d")), Pushed::Ended);
        assert!(!c.read(&id(0), 1, true).chunks.is_empty());
        assert!(c.read(&id(0), 1, true).done);
        assert!(c.read(&id(0), 3, true).done);
        // An input without chunks.
        assert_eq!(
            c.read(&id(9), 0, true),
            StreamPage {
                chunks: Vec::new(),
                next: 0,
                done: true
            }
        );
        // Pages are bounded: next says where to go on.
        let mut small = Chunks::new(limits());
        for n in 0..3 {
            small.push(&id(1), 1, n, Payload::text("x"));
        }
        let first = small.read(&id(1), 0, true);
        assert_eq!((first.chunks.len(), first.next, first.done), (2, 2, false));
        let second = small.read(&id(1), first.next, true);
        assert_eq!(
            (second.chunks.len(), second.next, second.done),
            (1, 3, true)
        );
    }

    #[test]
    fn a_retry_starts_the_stream_afresh_after_the_earlier_places() {
        let mut c = Chunks::new(ChunkLimits::default());
        c.push(&id(0), 1, 0, Payload::text("a"));
        c.push(&id(0), 1, 1, Payload::text("b"));
        assert_eq!(c.push(&id(0), 2, 0, Payload::text("A")), Pushed::Kept);
        // A late chunk of the earlier attempt.
        assert_eq!(c.push(&id(0), 1, 2, Payload::text("c")), Pushed::Stale);
        let page = c.read(&id(0), 0, false);
        assert_eq!(texts(&page), [(2, 2, "A".into())]);
        assert_eq!(page.next, 3);
        assert_eq!(c.total_bytes(), 1 + CHUNK_OVERHEAD);
    }

    #[test]
    fn an_input_is_bounded_and_the_total_drops_what_ended_longest_ago_first() {
        let mut c = Chunks::new(limits());
        assert_eq!(c.push(&id(0), 1, 0, Payload::text("1234")), Pushed::Kept);
        assert_eq!(c.push(&id(0), 1, 1, Payload::text("1234")), Pushed::Kept);
        // 8 + 4 > 10 bytes.
        assert_eq!(c.push(&id(0), 1, 2, Payload::text("1234")), Pushed::Full);
        assert_eq!(c.push(&id(0), 1, 3, Payload::text("12")), Pushed::Kept);
        // The count bound: 3 kept.
        assert_eq!(c.push(&id(0), 1, 4, Payload::text("")), Pushed::Full);
        c.end(&id(0), 5);
        // Over the total: input 0, which ended, goes whole.
        c.push(&id(1), 1, 0, Payload::text("abcd"));
        assert!(c.read(&id(0), 0, true).chunks.is_empty());
        c.end(&id(1), 6);
        c.push(&id(2), 1, 0, Payload::text("wxyz"));
        assert_eq!(c.read(&id(1), 0, true).chunks.len(), 1);
        assert!(c.total_bytes() <= limits().total_bytes);
        // Only live streams left over the bound: the largest loses its oldest chunks.
        c.push(&id(2), 1, 1, Payload::text("wxyz"));
        c.push(&id(3), 1, 0, Payload::text("q"));
        assert!(c.read(&id(1), 0, true).chunks.is_empty(), "ended first");
        c.push(&id(3), 1, 1, Payload::text("r"));
        let two = c.read(&id(2), 0, false);
        assert_eq!(
            two.chunks.first().map(|c| c.seq),
            Some(1),
            "a gap says what went"
        );
        assert!(c.total_bytes() <= limits().total_bytes);
    }

    #[test]
    fn streams_go_ten_minutes_after_their_input_ended() {
        let mut c = Chunks::new(ChunkLimits::default());
        c.push(&id(0), 1, 0, Payload::text("a"));
        c.push(&id(1), 1, 0, Payload::text("b"));
        c.end(&id(0), 1_000);
        c.expire(1_000 + 599_999);
        assert_eq!(c.read(&id(0), 0, true).chunks.len(), 1);
        c.expire(1_000 + 600_000);
        assert!(c.read(&id(0), 0, true).chunks.is_empty());
        // A running input's stream stays.
        c.expire(u64::MAX);
        assert_eq!(c.read(&id(1), 0, false).chunks.len(), 1);
        assert_eq!(c.total_bytes(), 1 + CHUNK_OVERHEAD);
    }
}
