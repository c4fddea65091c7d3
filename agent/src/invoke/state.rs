//! The runtime API's decisions for one function container, apart from I/O: its setup
//! (starting, ready, failed), the inputs delivered to it (queued, handed out, cancelled),
//! its slots (`max_inputs`), draining, the events it has not polled yet, and what each
//! deadline does when it passes. Every method takes the time (unix ms) and returns what
//! to do; the server (`server.rs`) carries it out.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use gantry_shared::calls::{FailureCause, InputFailure, InputResult, LeasedInput, Payload};
use gantry_shared::chunks::{MAX_CHUNK_BYTES_PER_INPUT, MAX_CHUNKS_PER_INPUT};
use gantry_shared::protocol::{ChunkItem, Event, FunctionRuntime, OutputItem};
use gantry_shared::{AttemptRef, CallId, InputId};
use serde::Serialize;

/// Events kept for a container that does not poll them; older ones are dropped beyond.
const MAX_EVENTS: usize = 1024;

/// Something the container learns from `GET /v1/events`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum RuntimeEvent {
    /// The call of a held input was cancelled: stop working on it.
    Cancel { input: InputId },
    /// Finish what you hold, then exit; `next` answers `410 Gone` from now on.
    Drain,
    /// The node is being preempted: it goes away at `deadline_ms` (unix ms). Save what is
    /// worth saving; a `drain` follows.
    Preempt { deadline_ms: u64 },
}

/// An answer for one input, on its way to the coordinator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputReport {
    pub attempt_ref: AttemptRef,
    pub input: InputId,
    pub call: CallId,
    /// The input's try (from its lease).
    pub attempt: u32,
    pub result: InputResult,
    /// When the container answered (unix ms).
    pub at_ms: u64,
}

impl OutputReport {
    /// This answer as an item of the request that carries it to the coordinator.
    pub fn to_item(&self) -> OutputItem {
        OutputItem {
            owner: self.attempt_ref.owner.clone(),
            generation: self.attempt_ref.generation,
            input: self.input.clone(),
            attempt: self.attempt,
            result: self.result.clone(),
            at_ms: self.at_ms,
        }
    }
}

/// A streamed chunk of an input, on its way to the coordinator (before the input's answer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkReport {
    pub attempt_ref: AttemptRef,
    pub input: InputId,
    /// The input's try (from its lease).
    pub attempt: u32,
    /// Its number among this attempt's chunks, from 0.
    pub seq: u64,
    pub payload: Payload,
}

impl ChunkReport {
    /// This chunk as an item of the request that carries it to the coordinator.
    pub fn to_item(&self) -> ChunkItem {
        ChunkItem {
            owner: self.attempt_ref.owner.clone(),
            generation: self.attempt_ref.generation,
            input: self.input.clone(),
            attempt: self.attempt,
            seq: self.seq,
            payload: self.payload.clone(),
        }
    }
}

/// Why the agent stops a function container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// Its setup failed (`POST /v1/init/error`, or no `ready` in time).
    InitFailed { message: String },
    /// An input it held ran past its deadline.
    InputTimeout { input: InputId },
    /// It still held a cancelled input after the cancel's grace.
    Cancelled { input: InputId },
    /// It had not exited after the drain's grace.
    Drained,
    /// A web endpoint's last request ended after its drain.
    WebDrained,
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StopReason::InitFailed { message } => write!(f, "its setup failed: {message}"),
            StopReason::InputTimeout { input } => {
                write!(f, "input {input} ran past its deadline")
            }
            StopReason::Cancelled { input } => write!(
                f,
                "it still held cancelled input {input} after the cancel's grace"
            ),
            StopReason::Drained => write!(f, "it had not exited after the drain's grace"),
            StopReason::WebDrained => write!(f, "its last request ended after a drain"),
        }
    }
}

/// What the server does after a decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// `Ready` or `InitFailed`, to the event outbox.
    Event(Event),
    /// An answer for an input, to the coordinator.
    Output(OutputReport),
    /// An answer for a web request's input, to the request (not the coordinator).
    WebAnswer { input: InputId, result: InputResult },
    /// Stop the container now.
    Stop(StopReason),
}

/// Why the runtime API refused a request; `api.rs` maps each to its status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InboxError {
    #[error(
        "this container already has {max_inputs} input(s) outstanding (GANTRY_MAX_INPUTS); \
         answer one before asking for the next"
    )]
    TooMany { max_inputs: u32 },
    #[error("the container is draining: finish the inputs you hold, then exit")]
    Draining,
    #[error("input {input} is not held by this container (unknown, already answered or cancelled)")]
    NotHeld { input: String },
    #[error("setup already failed; the container is being stopped")]
    SetupFailed,
    #[error("the container already said ready; report errors per input")]
    AlreadyReady,
    #[error("the container is not ready yet")]
    NotReady,
    #[error("the container is not a web endpoint")]
    NotWeb,
    #[error(
        "input {input} is a web request (`Gantry-Input-Kind: http`); only a call's inputs \
         stream chunks: answer the request with its whole body"
    )]
    NotCall { input: String },
    #[error(
        "input {input} already streamed {chunks} chunk(s) of {bytes} bytes (at most \
         {max_chunks} and {max_bytes} bytes per input); stop streaming, its answer still \
         works"
    )]
    StreamFull {
        input: String,
        chunks: u32,
        bytes: u64,
        max_chunks: u32,
        max_bytes: u64,
    },
}

/// An input handed out and not answered yet.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Held {
    call: CallId,
    attempt: u32,
    deadline_ms: u64,
    /// Set once its call was cancelled: the container is stopped if it still holds the
    /// input at this time (unix ms).
    cancelled_stop_ms: Option<u64>,
    /// Chunks it streamed so far, and their bytes (bounded per input).
    chunks: u32,
    chunk_bytes: u64,
}

/// Where the container's setup stands.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Setup {
    /// Not ready yet. `started_ms` is set once the container runs (the startup timeout runs
    /// from it); a `ready` or a failure reported before that waits for it, so the outbox
    /// carries `Started` first.
    Starting {
        started_ms: Option<u64>,
        ready_ms: Option<u64>,
        failure: Option<String>,
    },
    Ready,
    Failed,
}

/// The state of one function container's runtime API.
#[derive(Debug)]
pub struct Inbox {
    attempt: AttemptRef,
    max_inputs: u32,
    startup_timeout_ms: u64,
    setup: Setup,
    /// Delivered, not handed out yet, oldest first.
    queued: VecDeque<LeasedInput>,
    /// Handed out and not answered (cancelled ones included: the container still works on
    /// them until it answers).
    held: BTreeMap<InputId, Held>,
    /// `next` calls waiting for an input: they count against `max_inputs` too.
    waiting: u32,
    /// Set by a drain: the container is stopped at this time (unix ms) if still running.
    drain_stop_ms: Option<u64>,
    /// A `preempt` event was queued.
    preempt_told: bool,
    events: VecDeque<RuntimeEvent>,
    /// A stop was decided: nothing more is decided for this container.
    stopping: bool,
    /// A web endpoint's container: its requests in flight (`None` for one that takes
    /// calls).
    web_requests: Option<u32>,
    /// Inputs queued or held that are web requests' (`via = "runtime_api"`): answered to
    /// the request, never reported to the coordinator.
    web_inputs: BTreeSet<InputId>,
}

/// What a `next` finds.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    Input(LeasedInput),
    /// Nothing yet: wait for a delivery.
    Wait,
}

impl Inbox {
    pub fn new(attempt: AttemptRef, runtime: &FunctionRuntime) -> Self {
        Self {
            attempt,
            max_inputs: runtime.max_inputs.max(1),
            startup_timeout_ms: runtime.startup_timeout_ms,
            setup: Setup::Starting {
                started_ms: None,
                ready_ms: None,
                failure: None,
            },
            queued: VecDeque::new(),
            held: BTreeMap::new(),
            waiting: 0,
            drain_stop_ms: None,
            preempt_told: false,
            events: VecDeque::new(),
            stopping: false,
            web_requests: runtime.web.as_ref().map(|_| 0),
            web_inputs: BTreeSet::new(),
        }
    }

    /// A web request that became an input (`via = "runtime_api"`): queued for the next
    /// `next` like a delivery. Refused while draining or stopping.
    pub fn deliver_web(&mut self, input: LeasedInput) -> Result<(), InboxError> {
        if self.web_requests.is_none() {
            return Err(InboxError::NotWeb);
        }
        let id = input.id.clone();
        self.deliver(input)?;
        self.web_inputs.insert(id);
        Ok(())
    }

    /// A web request went away before its answer: not handed out yet, its input is
    /// dropped; held, the container finishes it and its answer goes nowhere.
    pub fn forget_web(&mut self, input: &InputId) {
        if self.web_inputs.contains(input) && !self.held.contains_key(input) {
            self.queued.retain(|q| &q.id != input);
            self.web_inputs.remove(input);
        }
    }

    /// An answer for `input`: to its web request, or to the coordinator.
    fn answer_of(&mut self, report: OutputReport) -> Action {
        if self.web_inputs.remove(&report.input) {
            return Action::WebAnswer {
                input: report.input,
                result: report.result,
            };
        }
        Action::Output(report)
    }

    /// A web request may go to the container: it is ready and neither draining nor
    /// stopping. Each one taken is ended with [`Inbox::web_end`].
    pub fn web_begin(&mut self) -> Result<(), InboxError> {
        let Some(n) = self.web_requests else {
            return Err(InboxError::NotWeb);
        };
        if self.stopping || self.draining() {
            return Err(InboxError::Draining);
        }
        if self.setup != Setup::Ready {
            return Err(InboxError::NotReady);
        }
        self.web_requests = Some(n + 1);
        Ok(())
    }

    /// A web request's connection ended: once drained, the last one stops the container.
    pub fn web_end(&mut self) -> Vec<Action> {
        if let Some(n) = self.web_requests.as_mut() {
            *n = n.saturating_sub(1);
        }
        self.web_drained().into_iter().collect()
    }

    /// A drained web endpoint with no request left is stopped at once (it does not read
    /// the runtime API's `drain` event).
    fn web_drained(&mut self) -> Option<Action> {
        if self.web_requests == Some(0) && self.draining() {
            return self.stop(StopReason::WebDrained);
        }
        None
    }

    pub fn max_inputs(&self) -> u32 {
        self.max_inputs
    }

    /// Whether a stop was decided (the container takes no more inputs).
    pub fn stopping(&self) -> bool {
        self.stopping
    }

    pub fn draining(&self) -> bool {
        self.drain_stop_ms.is_some()
    }

    /// The container runs (its `Started` is in the outbox): the startup timeout starts,
    /// and a `ready` or setup failure reported before now is emitted.
    pub fn started(&mut self, now: u64) -> Vec<Action> {
        let Setup::Starting {
            started_ms: None,
            ready_ms,
            failure,
        } = &self.setup
        else {
            return Vec::new();
        };
        if let Some(message) = failure.clone() {
            return self.fail_setup(message);
        }
        if let Some(at_ms) = *ready_ms {
            self.setup = Setup::Ready;
            return vec![self.ready_event(at_ms)];
        }
        self.setup = Setup::Starting {
            started_ms: Some(now),
            ready_ms: None,
            failure: None,
        };
        Vec::new()
    }

    /// `POST /v1/ready`. Saying it twice is harmless.
    pub fn ready(&mut self, now: u64) -> Result<Vec<Action>, InboxError> {
        match &mut self.setup {
            Setup::Ready => Ok(Vec::new()),
            Setup::Failed
            | Setup::Starting {
                failure: Some(_), ..
            } => Err(InboxError::SetupFailed),
            Setup::Starting {
                started_ms: None,
                ready_ms,
                ..
            } => {
                ready_ms.get_or_insert(now);
                Ok(Vec::new())
            }
            Setup::Starting {
                started_ms: Some(_),
                ..
            } => {
                self.setup = Setup::Ready;
                Ok(vec![self.ready_event(now)])
            }
        }
    }

    /// `POST /v1/init/error`: the setup failed with `message`.
    pub fn init_error(&mut self, message: String) -> Result<Vec<Action>, InboxError> {
        match &mut self.setup {
            Setup::Ready => Err(InboxError::AlreadyReady),
            Setup::Failed
            | Setup::Starting {
                failure: Some(_), ..
            } => Err(InboxError::SetupFailed),
            Setup::Starting {
                started_ms: None,
                failure,
                ..
            } => {
                *failure = Some(message);
                Ok(Vec::new())
            }
            Setup::Starting {
                started_ms: Some(_),
                ..
            } => Ok(self.fail_setup(message)),
        }
    }

    fn ready_event(&self, at_ms: u64) -> Action {
        Action::Event(Event::Ready {
            owner: self.attempt.owner.clone(),
            generation: self.attempt.generation,
            at_ms,
        })
    }

    fn fail_setup(&mut self, message: String) -> Vec<Action> {
        self.setup = Setup::Failed;
        let mut actions = vec![Action::Event(Event::InitFailed {
            owner: self.attempt.owner.clone(),
            generation: self.attempt.generation,
            message: message.clone(),
        })];
        actions.extend(self.stop(StopReason::InitFailed { message }));
        actions
    }

    fn stop(&mut self, reason: StopReason) -> Option<Action> {
        if self.stopping {
            return None;
        }
        self.stopping = true;
        Some(Action::Stop(reason))
    }

    /// `Command::Deliver`: queues `input` for the next `next`. A repeated delivery of an
    /// input queued or held already is a no-op. Refused while draining or stopping.
    pub fn deliver(&mut self, input: LeasedInput) -> Result<(), InboxError> {
        if self.stopping || self.draining() {
            return Err(InboxError::Draining);
        }
        let known =
            self.held.contains_key(&input.id) || self.queued.iter().any(|q| q.id == input.id);
        if !known {
            self.queued.push_back(input);
        }
        Ok(())
    }

    /// A `next` arrives: it takes a slot while it waits, or is refused.
    pub fn begin_next(&mut self) -> Result<(), InboxError> {
        if self.draining() || self.stopping {
            return Err(InboxError::Draining);
        }
        let outstanding = self.held.len() as u64 + u64::from(self.waiting);
        if outstanding >= u64::from(self.max_inputs) {
            return Err(InboxError::TooMany {
                max_inputs: self.max_inputs,
            });
        }
        self.waiting += 1;
        Ok(())
    }

    /// A waiting `next` looks for an input. `Input` and `Err` end the wait (its slot now
    /// belongs to the held input, or is free); `Wait` keeps it.
    pub fn take_next(&mut self) -> Result<Next, InboxError> {
        if self.draining() || self.stopping {
            self.abandon_next();
            return Err(InboxError::Draining);
        }
        let Some(input) = self.queued.pop_front() else {
            return Ok(Next::Wait);
        };
        self.abandon_next();
        self.held.insert(
            input.id.clone(),
            Held {
                call: input.call.clone(),
                attempt: input.attempt,
                deadline_ms: input.deadline_ms,
                cancelled_stop_ms: None,
                chunks: 0,
                chunk_bytes: 0,
            },
        );
        Ok(Next::Input(input))
    }

    /// A waiting `next` went away (its connection closed) without an input.
    pub fn abandon_next(&mut self) {
        self.waiting = self.waiting.saturating_sub(1);
    }

    /// The container answered `input` at `now`: its output for the coordinator. An input
    /// whose call was cancelled is taken back (its slot frees) but not reported.
    pub fn answer(
        &mut self,
        input: &str,
        result: InputResult,
        now: u64,
    ) -> Result<Vec<Action>, InboxError> {
        let not_held = || InboxError::NotHeld {
            input: input.to_owned(),
        };
        let id = InputId::new(input).map_err(|_| not_held())?;
        let held = self.held.remove(&id).ok_or_else(not_held)?;
        if held.cancelled_stop_ms.is_some() {
            return Err(not_held());
        }
        let report = OutputReport {
            attempt_ref: self.attempt.clone(),
            input: id,
            call: held.call,
            attempt: held.attempt,
            result,
            at_ms: now,
        };
        Ok(vec![self.answer_of(report)])
    }

    /// `POST /v1/inputs/{input}/stream`: the container streams `payload` while it works on
    /// `input` (a call's, held and not cancelled). Numbered from 0 per input; refused once
    /// the input streamed [`MAX_CHUNKS_PER_INPUT`] chunks or [`MAX_CHUNK_BYTES_PER_INPUT`]
    /// bytes. The caller queues the chunk before it lets go of the inbox, so chunks and
    /// answers reach the coordinator in the order they were decided.
    pub fn stream(&mut self, input: &str, payload: Payload) -> Result<ChunkReport, InboxError> {
        let not_held = || InboxError::NotHeld {
            input: input.to_owned(),
        };
        let id = InputId::new(input).map_err(|_| not_held())?;
        if self.web_inputs.contains(&id) {
            return Err(InboxError::NotCall {
                input: input.to_owned(),
            });
        }
        let held = self.held.get_mut(&id).ok_or_else(not_held)?;
        if held.cancelled_stop_ms.is_some() {
            return Err(not_held());
        }
        let bytes = payload.bytes.len() as u64;
        if held.chunks >= MAX_CHUNKS_PER_INPUT
            || held.chunk_bytes.saturating_add(bytes) > MAX_CHUNK_BYTES_PER_INPUT
        {
            return Err(InboxError::StreamFull {
                input: input.to_owned(),
                chunks: held.chunks,
                bytes: held.chunk_bytes,
                max_chunks: MAX_CHUNKS_PER_INPUT,
                max_bytes: MAX_CHUNK_BYTES_PER_INPUT,
            });
        }
        let seq = u64::from(held.chunks);
        held.chunks += 1;
        held.chunk_bytes += bytes;
        Ok(ChunkReport {
            attempt_ref: self.attempt.clone(),
            input: id,
            attempt: held.attempt,
            seq,
            payload,
        })
    }

    /// `Command::CancelInput`: a queued input is dropped; a held one gets a cancel event
    /// and `grace_ms` to be answered before the container is stopped.
    pub fn cancel(&mut self, input: &InputId, grace_ms: u64, now: u64) {
        self.queued.retain(|q| &q.id != input);
        if let Some(held) = self.held.get_mut(input)
            && held.cancelled_stop_ms.is_none()
        {
            held.cancelled_stop_ms = Some(now.saturating_add(grace_ms));
            self.push_event(RuntimeEvent::Cancel {
                input: input.clone(),
            });
        }
    }

    /// `Command::Drain`: `next` answers 410 from now on, inputs not handed out are dropped
    /// (the coordinator leases them again when the container ends; a web request's is
    /// answered as not taken, to be sent again), and the container is stopped if it still
    /// runs `grace_ms` from now.
    pub fn drain(&mut self, grace_ms: u64, now: u64) -> Vec<Action> {
        let stop_at = now.saturating_add(grace_ms);
        match self.drain_stop_ms {
            Some(at) if at <= stop_at => Vec::new(),
            Some(_) => {
                self.drain_stop_ms = Some(stop_at);
                Vec::new()
            }
            None => {
                self.drain_stop_ms = Some(stop_at);
                self.push_event(RuntimeEvent::Drain);
                let queued: Vec<LeasedInput> = self.queued.drain(..).collect();
                queued
                    .into_iter()
                    .filter(|q| self.web_inputs.remove(&q.id))
                    .map(|q| Action::WebAnswer {
                        input: q.id,
                        result: InputResult::Error(InputFailure {
                            cause: FailureCause::Platform,
                            error_type: "Draining".into(),
                            message: "the container began draining before it took the \
                                      request; send it again"
                                .into(),
                            traceback: None,
                        }),
                    })
                    .collect()
            }
        }
    }

    /// The node is being preempted: a `preempt` event with the deadline (once), then a
    /// drain whose grace ends at the deadline.
    pub fn preempt(&mut self, deadline_ms: u64, now: u64) -> Vec<Action> {
        if !self.preempt_told {
            self.preempt_told = true;
            self.push_event(RuntimeEvent::Preempt { deadline_ms });
        }
        self.drain(deadline_ms.saturating_sub(now), now)
    }

    fn push_event(&mut self, event: RuntimeEvent) {
        if self.events.len() >= MAX_EVENTS {
            self.events.pop_front();
        }
        self.events.push_back(event);
    }

    /// The events not yet polled, oldest first.
    pub fn take_events(&mut self) -> Vec<RuntimeEvent> {
        self.events.drain(..).collect()
    }

    /// What the deadlines passed by `now` decide: a held input past its deadline fails
    /// with a timeout and stops the container (a queued one only fails: the container
    /// never had it); no ready within the startup timeout, a cancelled input still held
    /// after its grace or a drain past its grace stop it.
    pub fn expire(&mut self, now: u64) -> Vec<Action> {
        let mut actions = Vec::new();
        if let Setup::Starting {
            started_ms: Some(started),
            ..
        } = self.setup
            && now >= started.saturating_add(self.startup_timeout_ms)
        {
            let message = format!(
                "the container did not say ready (POST /v1/ready) within its startup \
                 timeout of {} ms",
                self.startup_timeout_ms
            );
            actions.extend(self.fail_setup(message));
        }
        let late: VecDeque<LeasedInput> = {
            let (late, keep): (VecDeque<_>, VecDeque<_>) =
                self.queued.drain(..).partition(|q| q.deadline_ms <= now);
            self.queued = keep;
            late
        };
        for input in late {
            actions.push(self.timeout(input.id, input.call, input.attempt, input.deadline_ms, now));
        }
        let expired: Vec<InputId> = self
            .held
            .iter()
            .filter(|(_, h)| h.cancelled_stop_ms.is_none() && h.deadline_ms <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for id in expired {
            if let Some(h) = self.held.remove(&id) {
                actions.push(self.timeout(id.clone(), h.call, h.attempt, h.deadline_ms, now));
                actions.extend(self.stop(StopReason::InputTimeout { input: id }));
            }
        }
        let cancelled = self
            .held
            .iter()
            .find(|(_, h)| h.cancelled_stop_ms.is_some_and(|at| at <= now))
            .map(|(id, _)| id.clone());
        if let Some(input) = cancelled {
            actions.extend(self.stop(StopReason::Cancelled { input }));
        }
        if self.drain_stop_ms.is_some_and(|at| at <= now) {
            actions.extend(self.stop(StopReason::Drained));
        }
        actions.extend(self.web_drained());
        actions
    }

    fn timeout(
        &mut self,
        input: InputId,
        call: CallId,
        attempt: u32,
        deadline_ms: u64,
        now: u64,
    ) -> Action {
        let late_by = now.saturating_sub(deadline_ms);
        self.answer_of(OutputReport {
            attempt_ref: self.attempt.clone(),
            input: input.clone(),
            call,
            attempt,
            result: InputResult::Error(InputFailure {
                cause: FailureCause::Timeout,
                error_type: "Timeout".into(),
                message: format!(
                    "input {input} ran past the function's timeout (deadline {deadline_ms} unix ms, \
                     {late_by} ms ago) without an answer; the container was stopped"
                ),
                traceback: None,
            }),
            at_ms: now,
        })
    }

    /// When `expire` next has something to decide (unix ms), if ever.
    pub fn next_wake(&self) -> Option<u64> {
        if self.stopping {
            // Only timeouts of inputs are still reported.
            return self
                .queued
                .iter()
                .map(|q| q.deadline_ms)
                .chain(
                    self.held
                        .values()
                        .filter(|h| h.cancelled_stop_ms.is_none())
                        .map(|h| h.deadline_ms),
                )
                .min();
        }
        let startup = match self.setup {
            Setup::Starting {
                started_ms: Some(s),
                ..
            } => Some(s.saturating_add(self.startup_timeout_ms)),
            _ => None,
        };
        self.queued
            .iter()
            .map(|q| q.deadline_ms)
            .chain(
                self.held
                    .values()
                    .map(|h| h.cancelled_stop_ms.unwrap_or(h.deadline_ms)),
            )
            .chain(startup)
            .chain(self.drain_stop_ms)
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gantry_shared::{Generation, Owner, WarmId};

    fn attempt() -> AttemptRef {
        AttemptRef {
            owner: Owner::Function(WarmId::new("w-1").expect("warm id")),
            generation: Generation(1),
        }
    }

    fn inbox(max_inputs: u32) -> Inbox {
        Inbox::new(
            attempt(),
            &FunctionRuntime {
                max_inputs,
                startup_timeout_ms: 1_000,
                timeout_ms: 60_000,
                web: None,
            },
        )
    }

    fn input(n: u32, deadline_ms: u64) -> LeasedInput {
        let call = CallId::new("c-1").expect("call id");
        LeasedInput {
            id: InputId::of(&call, n),
            call,
            attempt: 1,
            deadline_ms,
            payload: Payload::text("x"),
        }
    }

    fn web_inbox() -> Inbox {
        Inbox::new(
            attempt(),
            &FunctionRuntime {
                max_inputs: 1,
                startup_timeout_ms: 1_000,
                timeout_ms: 60_000,
                web: Some(gantry_shared::protocol::WebRuntime::Port {
                    port: 8000,
                    readiness: gantry_shared::protocol::Readiness::Tcp,
                }),
            },
        )
    }

    #[test]
    fn a_web_endpoint_takes_requests_once_ready_and_stops_after_its_last_when_drained() {
        let mut web = web_inbox();
        assert_eq!(web.web_begin(), Err(InboxError::NotReady));
        web.started(1);
        web.ready(2).expect("ready");
        assert_eq!(web.web_begin(), Ok(()));
        assert_eq!(web.web_begin(), Ok(()));
        // Drained with two requests in flight: no stop until the last ends, and no new one.
        web.drain(30_000, 3);
        assert_eq!(web.expire(4), []);
        assert_eq!(web.web_begin(), Err(InboxError::Draining));
        assert_eq!(web.web_end(), []);
        assert_eq!(web.web_end(), [Action::Stop(StopReason::WebDrained)]);
        // Drained with nothing in flight: stopped at the next look.
        let mut idle = web_inbox();
        idle.started(1);
        idle.ready(2).expect("ready");
        idle.drain(30_000, 3);
        assert_eq!(idle.expire(3), [Action::Stop(StopReason::WebDrained)]);
        // A runtime API container takes no web requests.
        assert_eq!(inbox(1).web_begin(), Err(InboxError::NotWeb));
    }

    #[test]
    fn ready_before_started_waits_for_it() {
        let mut b = inbox(1);
        assert_eq!(b.ready(5).expect("ready"), []);
        let actions = b.started(7);
        assert!(
            matches!(&actions[..], [Action::Event(Event::Ready { at_ms: 5, .. })]),
            "{actions:?}"
        );
        assert_eq!(b.ready(9).expect("again"), []);
        assert_eq!(b.init_error("x".into()), Err(InboxError::AlreadyReady));
        assert_eq!(b.expire(100_000), []);
    }

    #[test]
    fn no_ready_within_the_startup_timeout_fails_and_stops() {
        let mut b = inbox(1);
        assert_eq!(b.started(100), []);
        assert_eq!(b.next_wake(), Some(1_100));
        assert_eq!(b.expire(1_099), []);
        let actions = b.expire(1_100);
        assert!(
            matches!(
                &actions[..],
                [
                    Action::Event(Event::InitFailed { .. }),
                    Action::Stop(StopReason::InitFailed { .. })
                ]
            ),
            "{actions:?}"
        );
        assert_eq!(b.ready(1_200), Err(InboxError::SetupFailed));
        assert_eq!(b.expire(5_000), []);
    }

    #[test]
    fn init_error_before_started_is_emitted_after_it() {
        let mut b = inbox(1);
        assert_eq!(b.init_error("boom".into()).expect("taken"), []);
        let actions = b.started(3);
        assert!(
            matches!(&actions[..], [Action::Event(Event::InitFailed { message, .. }), Action::Stop(_)] if message == "boom"),
            "{actions:?}"
        );
    }

    #[test]
    fn slots_count_waiting_and_held() {
        let mut b = inbox(2);
        b.begin_next().expect("first");
        b.begin_next().expect("second");
        assert_eq!(b.begin_next(), Err(InboxError::TooMany { max_inputs: 2 }));
        b.deliver(input(0, u64::MAX)).expect("deliver");
        assert!(matches!(b.take_next(), Ok(Next::Input(_))));
        assert_eq!(b.take_next(), Ok(Next::Wait));
        b.abandon_next();
        b.begin_next().expect("a freed slot");
        assert_eq!(b.begin_next(), Err(InboxError::TooMany { max_inputs: 2 }));
        let id = InputId::of(&CallId::new("c-1").expect("call"), 0);
        let actions = b
            .answer(id.as_str(), InputResult::Output(Payload::text("y")), 10)
            .expect("answer");
        assert!(matches!(&actions[..], [Action::Output(o)] if o.at_ms == 10 && o.attempt == 1));
        assert!(matches!(
            b.answer(id.as_str(), InputResult::Output(Payload::text("y")), 11),
            Err(InboxError::NotHeld { .. })
        ));
        b.begin_next().expect("answered frees its slot");
    }

    #[test]
    fn a_held_input_past_its_deadline_times_out_and_stops_the_container() {
        let mut b = inbox(2);
        b.deliver(input(0, 50)).expect("deliver");
        b.deliver(input(1, 60)).expect("deliver");
        b.begin_next().expect("next");
        assert!(matches!(b.take_next(), Ok(Next::Input(_))));
        assert_eq!(b.next_wake(), Some(50));
        let actions = b.expire(55);
        assert!(
            matches!(
                &actions[..],
                [
                    Action::Output(OutputReport {
                        result: InputResult::Error(InputFailure {
                            cause: FailureCause::Timeout,
                            ..
                        }),
                        ..
                    }),
                    Action::Stop(StopReason::InputTimeout { .. }),
                ]
            ),
            "{actions:?}"
        );
        // The queued one only fails; no second stop.
        let actions = b.expire(60);
        assert!(matches!(&actions[..], [Action::Output(_)]), "{actions:?}");
        assert_eq!(b.next_wake(), None);
    }

    #[test]
    fn cancel_and_drain() {
        let mut b = inbox(2);
        b.deliver(input(0, u64::MAX)).expect("deliver");
        b.deliver(input(1, u64::MAX)).expect("deliver");
        b.begin_next().expect("next");
        let Ok(Next::Input(held)) = b.take_next() else {
            panic!("an input");
        };
        let queued = InputId::of(&CallId::new("c-1").expect("call"), 1);
        b.cancel(&queued, 100, 0);
        b.cancel(&held.id, 100, 0);
        assert_eq!(
            b.take_events(),
            [RuntimeEvent::Cancel {
                input: held.id.clone()
            }]
        );
        assert_eq!(b.next_wake(), Some(100));
        let actions = b.expire(100);
        assert!(matches!(
            &actions[..],
            [Action::Stop(StopReason::Cancelled { .. })]
        ));
        // A cancelled input's answer is not reported.
        assert!(matches!(
            b.answer(held.id.as_str(), InputResult::Output(Payload::text("y")), 1),
            Err(InboxError::NotHeld { .. })
        ));

        let mut b = inbox(1);
        b.drain(500, 0);
        b.drain(900, 10);
        assert_eq!(b.take_events(), [RuntimeEvent::Drain]);
        assert_eq!(b.begin_next(), Err(InboxError::Draining));
        assert_eq!(b.deliver(input(2, 1)), Err(InboxError::Draining));
        assert_eq!(b.next_wake(), Some(500));
        assert!(matches!(
            &b.expire(500)[..],
            [Action::Stop(StopReason::Drained)]
        ));
    }

    #[test]
    fn a_preemption_tells_its_deadline_once_then_drains_until_it() {
        let mut b = inbox(1);
        b.preempt(5_000, 1_000);
        b.preempt(5_000, 2_000);
        assert_eq!(
            b.take_events(),
            [
                RuntimeEvent::Preempt { deadline_ms: 5_000 },
                RuntimeEvent::Drain
            ]
        );
        assert_eq!(b.begin_next(), Err(InboxError::Draining));
        assert_eq!(b.next_wake(), Some(5_000));
        assert!(b.expire(4_999).is_empty());
        assert!(matches!(
            &b.expire(5_000)[..],
            [Action::Stop(StopReason::Drained)]
        ));
        // A drain already under way keeps its earlier stop; the deadline is still told.
        let mut b = inbox(1);
        b.drain(100, 0);
        b.preempt(9_000, 10);
        assert_eq!(
            b.take_events(),
            [
                RuntimeEvent::Drain,
                RuntimeEvent::Preempt { deadline_ms: 9_000 }
            ]
        );
        assert_eq!(b.next_wake(), Some(100));
    }

    #[test]
    fn chunks_are_numbered_per_input_bounded_and_only_for_held_calls() {
        let mut b = inbox(2);
        b.deliver(input(0, u64::MAX)).expect("deliver");
        b.begin_next().expect("next");
        let Ok(Next::Input(held)) = b.take_next() else {
            panic!("an input");
        };
        let id = held.id.as_str();
        for n in 0..3 {
            let c = b.stream(id, Payload::text("c")).expect("streamed");
            assert_eq!((c.seq, c.attempt), (n, 1));
        }
        assert!(matches!(
            b.stream("fc-nope", Payload::text("c")),
            Err(InboxError::NotHeld { .. })
        ));
        // The count bound, then the bytes bound.
        b.held.get_mut(&held.id).expect("held").chunks = MAX_CHUNKS_PER_INPUT;
        assert!(matches!(
            b.stream(id, Payload::text("c")),
            Err(InboxError::StreamFull { .. })
        ));
        let h = b.held.get_mut(&held.id).expect("held");
        h.chunks = 3;
        h.chunk_bytes = MAX_CHUNK_BYTES_PER_INPUT - 1;
        assert!(matches!(
            b.stream(id, Payload::text("cc")),
            Err(InboxError::StreamFull { .. })
        ));
        assert_eq!(b.stream(id, Payload::text("c")).expect("fits").seq, 3);
        // Answered (or cancelled): no more chunks.
        b.answer(id, InputResult::Output(Payload::text("y")), 1)
            .expect("answer");
        assert!(matches!(
            b.stream(id, Payload::text("c")),
            Err(InboxError::NotHeld { .. })
        ));
        let mut b = inbox(1);
        b.deliver(input(1, u64::MAX)).expect("deliver");
        b.begin_next().expect("next");
        let Ok(Next::Input(held)) = b.take_next() else {
            panic!("an input");
        };
        b.cancel(&held.id, 100, 0);
        assert!(matches!(
            b.stream(held.id.as_str(), Payload::text("c")),
            Err(InboxError::NotHeld { .. })
        ));
    }

    #[test]
    fn a_web_request_streams_no_chunks() {
        let mut web = Inbox::new(
            attempt(),
            &FunctionRuntime {
                max_inputs: 1,
                startup_timeout_ms: 1_000,
                timeout_ms: 60_000,
                web: Some(gantry_shared::protocol::WebRuntime::RuntimeApi),
            },
        );
        web.started(1);
        web.ready(2).expect("ready");
        web.deliver_web(input(0, u64::MAX)).expect("deliver");
        web.begin_next().expect("next");
        let Ok(Next::Input(held)) = web.take_next() else {
            panic!("an input");
        };
        assert!(matches!(
            web.stream(held.id.as_str(), Payload::text("c")),
            Err(InboxError::NotCall { .. })
        ));
    }

    #[test]
    fn a_waiting_next_learns_of_a_drain() {
        let mut b = inbox(1);
        b.begin_next().expect("next");
        b.drain(0, 0);
        assert_eq!(b.take_next(), Err(InboxError::Draining));
        assert_eq!(b.waiting, 0);
    }
}
