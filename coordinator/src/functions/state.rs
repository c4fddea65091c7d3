//! The functions' live state and its transitions, with no I/O: the queue of each function
//! version, the inputs not yet ended, the warm containers and what each holds. Every
//! transition returns what changed ([`Changes`]): records the service writes to the store,
//! inputs to hand to containers, calls to wake. Unit tests drive it directly.
//!
//! Rules it keeps:
//! - an input is leased to at most one container at a time, and only to a ready one with a
//!   free slot (fewer leases than its `max_inputs`);
//! - an output is recorded once: only the answer of the input's current lease counts;
//! - a failure of the platform (container or node gone, a delivery that found no container)
//!   puts the input back at the front of its queue without using the function's retries,
//!   at most [`PLATFORM_RETRIES`] times; the function's own errors follow its `retries`.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use gantry_shared::calls::{
    FailureCause, InputFailure, InputResult, InputState, LeasedInput, Payload, PhaseTimings,
};
use gantry_shared::functions::FunctionSpec;
use gantry_shared::{AppName, CallId, InputId, NodeId, WarmId};
use serde::{Deserialize, Serialize};

use super::FunctionKey;
use super::web::WebTraffic;

/// Platform failures an input survives before it fails saying why.
pub const PLATFORM_RETRIES: u32 = 3;
/// Consecutive containers of a version that fail their setup before its queued inputs fail.
pub const INIT_FAILURES: u32 = 3;
/// After a container ends before it was ready, the version's next start waits 1 s, then
/// twice as long after each further such end, at most this long (a broken image or runtime
/// must not be restarted in a loop). A container its host took with it does not count
/// ([`State::container_lost`]).
pub const MAX_START_BACKOFF_MS: u64 = 30_000;

/// Where a warm container is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WarmPhase {
    /// Placed; its start is on the way to its node.
    Placed,
    /// Running; setup not done.
    Started,
    /// Takes inputs.
    Ready,
    /// Told to finish and exit; takes no more inputs.
    Draining,
    /// Taken off a node that went down: it may still run there until the node says it
    /// stopped, and holds its resources until then.
    Fenced,
}

/// One warm container, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WarmRecord {
    pub id: WarmId,
    pub key: FunctionKey,
    pub node: NodeId,
    pub gpus: Vec<u32>,
    pub cpu_millis: u64,
    pub memory_bytes: u64,
    pub max_inputs: u32,
    pub phase: WarmPhase,
    pub placed_at_ms: u64,
    #[serde(default)]
    pub started_at_ms: Option<u64>,
    #[serde(default)]
    pub image_ms: Option<u64>,
    #[serde(default)]
    pub ready_at_ms: Option<u64>,
    /// Since when it has held nothing (scale-down waits for `scaledown_window` of it).
    pub idle_since_ms: u64,
    /// Its setup failure was counted (its end then adds none).
    #[serde(default)]
    pub setup_failed: bool,
}

/// An input's current lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub warm: WarmId,
    pub node: NodeId,
    pub attempt: u32,
    pub at_ms: u64,
    pub deadline_ms: u64,
}

/// One input, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputRecord {
    pub id: InputId,
    pub call: CallId,
    pub index: u32,
    pub key: FunctionKey,
    pub payload: Payload,
    pub state: InputState,
    /// Leases so far.
    pub attempt: u32,
    pub user_retries: u32,
    pub platform_retries: u32,
    #[serde(default)]
    pub lease: Option<Lease>,
    /// A retry waits until then (unix ms).
    #[serde(default)]
    pub not_before_ms: u64,
    pub accepted_at_ms: u64,
    #[serde(default)]
    pub result: Option<InputResult>,
    #[serde(default)]
    pub ended_at_ms: Option<u64>,
    /// The container (and node) of its latest lease.
    #[serde(default)]
    pub last: Option<(WarmId, NodeId)>,
    #[serde(default)]
    pub timings: PhaseTimings,
    /// Once ended: how many of its call's inputs ended before it (the order
    /// `GET /v1/calls/{id}/outputs?order=completion` reads). Set by the service as the end
    /// is written.
    #[serde(default)]
    pub done_seq: Option<u32>,
}

impl InputRecord {
    pub fn new(
        id: InputId,
        call: CallId,
        index: u32,
        key: FunctionKey,
        payload: Payload,
        now: u64,
    ) -> Self {
        Self {
            id,
            call,
            index,
            key,
            payload,
            state: InputState::Queued,
            attempt: 0,
            user_retries: 0,
            platform_retries: 0,
            lease: None,
            not_before_ms: 0,
            accepted_at_ms: now,
            result: None,
            ended_at_ms: None,
            last: None,
            timings: PhaseTimings::default(),
            done_seq: None,
        }
    }
}

/// An input handed to a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub node: NodeId,
    pub warm: WarmId,
    pub input: LeasedInput,
}

/// What a transition changed.
#[derive(Debug, Default)]
pub struct Changes {
    /// Inputs to write (ended ones leave the live state; the store keeps them).
    pub inputs: Vec<InputRecord>,
    /// Warm containers to write.
    pub warm: Vec<WarmRecord>,
    /// Warm containers to forget (their end is known).
    pub warm_gone: Vec<WarmId>,
    /// Inputs to hand to containers.
    pub deliveries: Vec<Delivery>,
    /// Running inputs of cancelled calls, to tell their containers about.
    pub cancels: Vec<(NodeId, WarmId, InputId)>,
    /// Calls with an input that ended.
    pub calls: BTreeSet<CallId>,
}

impl Changes {
    fn merge(&mut self, other: Changes) {
        self.inputs.extend(other.inputs);
        self.warm.extend(other.warm);
        self.warm_gone.extend(other.warm_gone);
        self.deliveries.extend(other.deliveries);
        self.cancels.extend(other.cancels);
        self.calls.extend(other.calls);
    }
}

/// The live state.
#[derive(Debug, Default)]
pub struct State {
    /// Every function version that may still have work or containers.
    pub specs: BTreeMap<FunctionKey, FunctionSpec>,
    /// Per app, the version new calls go to (`None`: stopped), as stored: the scaling step
    /// reads it every pass.
    pub active: BTreeMap<AppName, Option<u64>>,
    queues: BTreeMap<FunctionKey, VecDeque<InputId>>,
    inputs: HashMap<InputId, InputRecord>,
    warm: BTreeMap<WarmId, WarmRecord>,
    leases: HashMap<WarmId, BTreeSet<InputId>>,
    /// Consecutive setup failures per version, and the latest message.
    init_failures: BTreeMap<FunctionKey, (u32, String)>,
    /// Per version: containers that ended before they were ready, in a row, and when the
    /// next may be placed (unix ms).
    start_backoff: BTreeMap<FunctionKey, (u32, u64)>,
    /// Inputs not yet ended, per call: a waiting reader checks this, not the store.
    open: HashMap<CallId, u32>,
    /// Leases found at restore: their delivery may not have gone out before the restart,
    /// so each is sent again (agents ignore an input they already hold) once its node is
    /// connected.
    redeliver: Vec<InputId>,
    /// Web endpoints' requests (in memory only).
    pub web: WebTraffic,
}

impl State {
    /// Rebuilt from the store at start: live inputs (queued ones in acceptance order; leased
    /// ones keep their lease, since their container may still answer) and warm containers.
    pub fn restore(
        specs: BTreeMap<FunctionKey, FunctionSpec>,
        inputs: Vec<InputRecord>,
        warm: Vec<WarmRecord>,
    ) -> Self {
        let mut s = State {
            specs,
            ..State::default()
        };
        for w in warm {
            s.leases.entry(w.id.clone()).or_default();
            s.warm.insert(w.id.clone(), w);
        }
        let mut inputs = inputs;
        inputs.sort_by(|a, b| (a.accepted_at_ms, &a.id).cmp(&(b.accepted_at_ms, &b.id)));
        for i in inputs {
            match &i.lease {
                Some(l) if s.warm.contains_key(&l.warm) => {
                    s.leases
                        .entry(l.warm.clone())
                        .or_default()
                        .insert(i.id.clone());
                    s.redeliver.push(i.id.clone());
                }
                _ => s
                    .queues
                    .entry(i.key.clone())
                    .or_default()
                    .push_back(i.id.clone()),
            }
            *s.open.entry(i.call.clone()).or_default() += 1;
            s.inputs.insert(i.id.clone(), i);
        }
        // An input whose container is gone is queued again.
        for i in s.inputs.values_mut() {
            if i.lease
                .as_ref()
                .is_some_and(|l| !s.warm.contains_key(&l.warm))
            {
                i.lease = None;
                i.state = InputState::Queued;
            }
        }
        s
    }

    /// Whether a new container of `key` may be placed now (not backing off after
    /// containers that ended before they were ready).
    pub fn may_start(&self, key: &FunctionKey, now: u64) -> bool {
        self.start_backoff
            .get(key)
            .is_none_or(|(_, not_before)| *not_before <= now)
    }

    /// The restored leases whose node is `connected` now, as deliveries (sent again; the
    /// rest wait for their node).
    pub fn take_redeliveries(&mut self, connected: impl Fn(&NodeId) -> bool) -> Vec<Delivery> {
        let mut out = Vec::new();
        let mut keep = Vec::new();
        for id in std::mem::take(&mut self.redeliver) {
            let Some(i) = self.inputs.get(&id) else {
                continue;
            };
            let Some(l) = &i.lease else { continue };
            if !connected(&l.node) {
                keep.push(id);
                continue;
            }
            out.push(Delivery {
                node: l.node.clone(),
                warm: l.warm.clone(),
                input: LeasedInput {
                    id: i.id.clone(),
                    call: i.call.clone(),
                    attempt: l.attempt,
                    deadline_ms: l.deadline_ms,
                    payload: i.payload.clone(),
                },
            });
        }
        self.redeliver = keep;
        out
    }

    /// Whether new calls go to `key`'s version.
    pub fn is_current(&self, key: &FunctionKey) -> bool {
        self.active.get(&key.app).copied().flatten() == Some(key.version)
    }

    /// Adds what the warm containers (fenced ones included) hold to `held`, per node.
    pub fn add_held(&self, held: &mut BTreeMap<NodeId, crate::reconcile::Held>) {
        for w in self.warm.values() {
            let h = held.entry(w.node.clone()).or_default();
            h.cpu_millis += w.cpu_millis;
            h.memory_bytes += w.memory_bytes;
            h.gpus.extend(w.gpus.iter().copied());
        }
    }

    pub fn warm(&self) -> impl Iterator<Item = &WarmRecord> {
        self.warm.values()
    }

    pub fn warm_of(&self, id: &WarmId) -> Option<&WarmRecord> {
        self.warm.get(id)
    }

    pub fn input(&self, id: &InputId) -> Option<&InputRecord> {
        self.inputs.get(id)
    }

    pub fn leased(&self, warm: &WarmId) -> usize {
        self.leases.get(warm).map_or(0, BTreeSet::len)
    }

    /// What a container holds: inputs leased, or web requests in flight.
    pub fn busy(&self, warm: &WarmId) -> u32 {
        self.leased(warm) as u32 + self.web.in_flight(warm)
    }

    /// The ready containers of `key` and their nodes (where web requests may go).
    pub fn ready_of(&self, key: &FunctionKey) -> Vec<(WarmId, NodeId)> {
        self.warm
            .values()
            .filter(|w| &w.key == key && w.phase == WarmPhase::Ready)
            .map(|w| (w.id.clone(), w.node.clone()))
            .collect()
    }

    /// A web request on `warm` ended: a container left with nothing is idle from `now`.
    /// Only in memory (a write per request would cost a disk write each): after a
    /// restart a web container counts as idle since its stored record's time, usually
    /// when it became ready, so one whose window has passed is drained soon after.
    pub fn web_done(&mut self, warm: &WarmId, now: u64) {
        if self.web.done(warm)
            && self.leased(warm) == 0
            && let Some(w) = self.warm.get_mut(warm)
        {
            w.idle_since_ms = now;
        }
    }

    /// Web requests of `key` in flight.
    pub fn web_running(&self, key: &FunctionKey) -> u32 {
        self.warm
            .values()
            .filter(|w| &w.key == key)
            .map(|w| self.web.in_flight(&w.id))
            .sum()
    }

    pub fn queued(&self, key: &FunctionKey) -> usize {
        self.queues.get(key).map_or(0, VecDeque::len)
    }

    /// Inputs of `key` leased to containers.
    pub fn running(&self, key: &FunctionKey) -> usize {
        self.warm
            .values()
            .filter(|w| &w.key == key)
            .map(|w| self.leased(&w.id))
            .sum()
    }

    /// The versions with queued inputs or containers.
    pub fn active_keys(&self) -> BTreeSet<FunctionKey> {
        self.queues
            .iter()
            .filter(|(_, q)| !q.is_empty())
            .map(|(k, _)| k.clone())
            .chain(self.warm.values().map(|w| w.key.clone()))
            .collect()
    }

    /// New inputs join their queue and go to free slots at once.
    pub fn accept(&mut self, inputs: Vec<InputRecord>, now: u64) -> Changes {
        let mut keys = BTreeSet::new();
        for i in inputs {
            keys.insert(i.key.clone());
            self.queues
                .entry(i.key.clone())
                .or_default()
                .push_back(i.id.clone());
            *self.open.entry(i.call.clone()).or_default() += 1;
            self.inputs.insert(i.id.clone(), i);
        }
        let mut changes = Changes::default();
        for key in keys {
            changes.merge(self.dispatch(&key, now));
        }
        changes
    }

    /// A container was placed (and its start is being sent).
    pub fn placed(&mut self, warm: WarmRecord) -> Changes {
        self.leases.entry(warm.id.clone()).or_default();
        self.warm.insert(warm.id.clone(), warm.clone());
        Changes {
            warm: vec![warm],
            ..Changes::default()
        }
    }

    pub fn started(&mut self, id: &WarmId, at_ms: u64, image_ms: u64) -> Changes {
        let Some(w) = self.warm.get_mut(id) else {
            return Changes::default();
        };
        if w.phase == WarmPhase::Placed {
            w.phase = WarmPhase::Started;
        }
        w.started_at_ms = Some(at_ms);
        w.image_ms = Some(image_ms);
        Changes {
            warm: vec![w.clone()],
            ..Changes::default()
        }
    }

    /// The container said ready: it takes queued inputs.
    pub fn ready(&mut self, id: &WarmId, at_ms: u64, now: u64) -> Changes {
        let Some(w) = self.warm.get_mut(id) else {
            return Changes::default();
        };
        if !matches!(w.phase, WarmPhase::Placed | WarmPhase::Started) {
            return Changes::default();
        }
        w.phase = WarmPhase::Ready;
        w.ready_at_ms = Some(at_ms);
        w.idle_since_ms = now;
        let key = w.key.clone();
        let record = w.clone();
        self.init_failures.remove(&key);
        self.start_backoff.remove(&key);
        let mut changes = Changes {
            warm: vec![record],
            ..Changes::default()
        };
        changes.merge(self.dispatch(&key, now));
        changes
    }

    /// Leases queued inputs of `key` (whose retry delay has passed) to ready containers
    /// with free slots, the least loaded first.
    pub fn dispatch(&mut self, key: &FunctionKey, now: u64) -> Changes {
        let mut changes = Changes::default();
        let Some(spec) = self.specs.get(key) else {
            return changes;
        };
        let timeout_ms = spec.timeout().as_millis() as u64;
        while let Some(queue) = self.queues.get_mut(key) {
            let Some(pos) = queue
                .iter()
                .position(|id| self.inputs.get(id).is_some_and(|i| i.not_before_ms <= now))
            else {
                break;
            };
            let slot = self
                .warm
                .values()
                .filter(|w| &w.key == key && w.phase == WarmPhase::Ready)
                .map(|w| (self.leases.get(&w.id).map_or(0, BTreeSet::len), w))
                .filter(|(n, w)| (*n as u32) < w.max_inputs)
                .min_by_key(|(n, w)| (*n, w.id.clone()))
                .map(|(_, w)| (w.id.clone(), w.node.clone()));
            let Some((warm, node)) = slot else {
                break;
            };
            let Some(id) = queue.remove(pos) else {
                break;
            };
            let Some(input) = self.inputs.get_mut(&id) else {
                continue;
            };
            input.attempt += 1;
            input.state = InputState::Running;
            let deadline_ms = now + timeout_ms;
            input.lease = Some(Lease {
                warm: warm.clone(),
                node: node.clone(),
                attempt: input.attempt,
                at_ms: now,
                deadline_ms,
            });
            input.last = Some((warm.clone(), node.clone()));
            self.leases
                .entry(warm.clone())
                .or_default()
                .insert(id.clone());
            changes.deliveries.push(Delivery {
                node,
                warm: warm.clone(),
                input: LeasedInput {
                    id: id.clone(),
                    call: input.call.clone(),
                    attempt: input.attempt,
                    deadline_ms,
                    payload: input.payload.clone(),
                },
            });
            changes.inputs.push(input.clone());
        }
        changes
    }

    /// A container answered input `id` for try `attempt`. Only the current lease's answer
    /// counts; any other (late, duplicate, from a container since replaced) is ignored.
    pub fn answered(
        &mut self,
        warm: &WarmId,
        id: &InputId,
        attempt: u32,
        result: InputResult,
        now: u64,
    ) -> Changes {
        let current = self.inputs.get(id).is_some_and(|i| {
            i.lease
                .as_ref()
                .is_some_and(|l| &l.warm == warm && l.attempt == attempt)
        });
        if !current {
            return Changes::default();
        }
        self.release(warm, id, now);
        let Some(mut input) = self.inputs.remove(id) else {
            return Changes::default();
        };
        let lease = input.lease.take();
        let key = input.key.clone();
        let mut changes = Changes::default();
        if let Some(lease) = &lease {
            input.timings.run_ms = Some(now.saturating_sub(lease.at_ms));
        }
        self.note_wait(&mut input, lease.as_ref());
        match result {
            InputResult::Output(p) => {
                self.end(&mut input, InputResult::Output(p), now, &mut changes)
            }
            InputResult::Error(failure) => {
                let retries = self
                    .specs
                    .get(&key)
                    .map(|s| s.retries.clone())
                    .unwrap_or_default();
                let retryable = matches!(failure.cause, FailureCause::User | FailureCause::Timeout);
                if retryable && input.user_retries < retries.max_retries() {
                    input.user_retries += 1;
                    input.state = InputState::Queued;
                    input.not_before_ms =
                        now + retries.delay(input.user_retries).as_millis() as u64;
                    input.result = Some(InputResult::Error(failure));
                    self.queues
                        .entry(key.clone())
                        .or_default()
                        .push_back(input.id.clone());
                    changes.inputs.push(input.clone());
                    self.inputs.insert(input.id.clone(), input);
                } else {
                    self.end(&mut input, InputResult::Error(failure), now, &mut changes);
                }
            }
        }
        changes.merge(self.dispatch(&key, now));
        changes
    }

    /// A container ended (exited, start failed, or a command to it failed): what it held
    /// goes back to the front of the queue as a platform failure, and if it was not ready
    /// yet the version's next start backs off. `fenced`: it may still run on its node; it
    /// stays as a fence.
    pub fn container_ended(&mut self, id: &WarmId, why: &str, fenced: bool, now: u64) -> Changes {
        if let Some(w) = self
            .warm
            .get(id)
            .filter(|w| matches!(w.phase, WarmPhase::Placed | WarmPhase::Started))
        {
            let (n, _) = self.start_backoff.get(&w.key).copied().unwrap_or((0, 0));
            let delay = 1_000u64
                .saturating_mul(1 << n.min(16))
                .min(MAX_START_BACKOFF_MS);
            self.start_backoff
                .insert(w.key.clone(), (n + 1, now.saturating_add(delay)));
        }
        self.container_lost(id, why, fenced, now)
    }

    /// [`State::container_ended`] for a container the platform lost (its host crashed or
    /// went down under it): nothing is wrong with the function, so its next start does not
    /// back off.
    pub fn container_lost(&mut self, id: &WarmId, why: &str, fenced: bool, now: u64) -> Changes {
        let mut changes = Changes::default();
        let held: Vec<InputId> = self
            .leases
            .remove(id)
            .map(|s| s.into_iter().collect())
            .unwrap_or_default();
        let Some(mut w) = self.warm.remove(id) else {
            return changes;
        };
        if fenced {
            w.phase = WarmPhase::Fenced;
            self.leases.insert(w.id.clone(), BTreeSet::new());
            self.warm.insert(w.id.clone(), w.clone());
            changes.warm.push(w.clone());
        } else {
            changes.warm_gone.push(w.id.clone());
        }
        for input_id in held.iter().rev() {
            let Some(mut input) = self.inputs.remove(input_id) else {
                continue;
            };
            input.lease = None;
            input.platform_retries += 1;
            if input.platform_retries > PLATFORM_RETRIES {
                let failure = InputFailure {
                    cause: FailureCause::Platform,
                    error_type: "ContainerLost".into(),
                    message: format!(
                        "the platform failed this input {} times; last: {why}",
                        input.platform_retries
                    ),
                    traceback: None,
                };
                self.end(&mut input, InputResult::Error(failure), now, &mut changes);
            } else {
                input.state = InputState::Queued;
                self.queues
                    .entry(input.key.clone())
                    .or_default()
                    .push_front(input.id.clone());
                changes.inputs.push(input.clone());
                self.inputs.insert(input.id.clone(), input);
            }
        }
        changes.merge(self.dispatch(&w.key, now));
        changes
    }

    /// A fenced container is known stopped: forget it.
    pub fn forget(&mut self, id: &WarmId) -> Changes {
        let mut changes = Changes::default();
        if self.warm.remove(id).is_some() {
            self.leases.remove(id);
            changes.warm_gone.push(id.clone());
        }
        changes
    }

    /// A container of `key` could not be set up (its image, its spec, or its own init):
    /// after [`INIT_FAILURES`] in a row, or at once for `certain` (an image that does not
    /// exist will not appear by trying again), every queued input of the version fails
    /// with the message.
    pub fn setup_failed(
        &mut self,
        key: &FunctionKey,
        message: &str,
        certain: bool,
        now: u64,
    ) -> Changes {
        let entry = self
            .init_failures
            .entry(key.clone())
            .or_insert((0, String::new()));
        entry.0 += 1;
        entry.1 = message.to_owned();
        let mut changes = Changes::default();
        if !certain && entry.0 < INIT_FAILURES {
            return changes;
        }
        self.init_failures.remove(key);
        let queued: Vec<InputId> = self
            .queues
            .remove(key)
            .map(|q| q.into_iter().collect())
            .unwrap_or_default();
        for id in queued {
            let Some(mut input) = self.inputs.remove(&id) else {
                continue;
            };
            let failure = InputFailure {
                cause: FailureCause::Init,
                error_type: "InitError".into(),
                message: format!("no container of {key} could be set up: {message}"),
                traceback: None,
            };
            self.end(&mut input, InputResult::Error(failure), now, &mut changes);
        }
        changes
    }

    /// Container `id` failed its setup (`message`): counted once per container, however
    /// many ways it is reported (an init error, then its exit).
    pub fn container_setup_failed(&mut self, id: &WarmId, message: &str, now: u64) -> Changes {
        let Some(w) = self.warm.get_mut(id) else {
            return Changes::default();
        };
        if w.setup_failed {
            return Changes::default();
        }
        w.setup_failed = true;
        let (key, record) = (w.key.clone(), w.clone());
        let mut changes = self.setup_failed(&key, message, false, now);
        changes.warm.push(record);
        changes
    }

    /// Cancels `call`: queued inputs end cancelled; running ones end cancelled too, and
    /// their containers are told (the answer, if one comes, is ignored).
    pub fn cancel(&mut self, call: &CallId, now: u64) -> Changes {
        let mut changes = Changes::default();
        let ids: Vec<InputId> = self
            .inputs
            .values()
            .filter(|i| &i.call == call)
            .map(|i| i.id.clone())
            .collect();
        for id in ids {
            let Some(mut input) = self.inputs.remove(&id) else {
                continue;
            };
            if let Some(lease) = input.lease.take() {
                self.release(&lease.warm, &id, now);
                changes
                    .cancels
                    .push((lease.node.clone(), lease.warm.clone(), id.clone()));
            } else if let Some(q) = self.queues.get_mut(&input.key) {
                q.retain(|x| x != &id);
            }
            self.closed(&input.call);
            input.state = InputState::Cancelled;
            input.ended_at_ms = Some(now);
            input.timings.total_ms = Some(now.saturating_sub(input.accepted_at_ms));
            changes.calls.insert(input.call.clone());
            changes.inputs.push(input);
        }
        changes
    }

    /// Marks a container draining (scale-down): it gets no more inputs.
    pub fn drain(&mut self, id: &WarmId) -> Changes {
        let Some(w) = self.warm.get_mut(id) else {
            return Changes::default();
        };
        w.phase = WarmPhase::Draining;
        Changes {
            warm: vec![w.clone()],
            ..Changes::default()
        }
    }

    /// Leased inputs whose deadline passed long ago (`grace_ms` beyond it) without any
    /// answer: their container is treated as gone (its agent reports a timeout itself;
    /// this is for an agent that cannot).
    pub fn overdue(&self, now: u64, grace_ms: u64) -> Vec<WarmId> {
        // Only leased inputs can be overdue: walk the leases, not every queued input.
        let mut out: BTreeSet<WarmId> = BTreeSet::new();
        for ids in self.leases.values() {
            for i in ids.iter().filter_map(|id| self.inputs.get(id)) {
                if let Some(l) = &i.lease
                    && l.deadline_ms + grace_ms < now
                {
                    out.insert(l.warm.clone());
                }
            }
        }
        out.into_iter().collect()
    }

    fn release(&mut self, warm: &WarmId, id: &InputId, now: u64) {
        if let Some(set) = self.leases.get_mut(warm) {
            set.remove(id);
            if set.is_empty()
                && let Some(w) = self.warm.get_mut(warm)
            {
                w.idle_since_ms = now;
            }
        }
    }

    /// Where an input's wait before its (final) lease went (see [`State::wait_phases`]).
    fn note_wait(&self, input: &mut InputRecord, lease: Option<&Lease>) {
        let Some(lease) = lease else { return };
        let t = self.wait_phases(&lease.warm, input.accepted_at_ms, lease.at_ms);
        input.timings = PhaseTimings {
            run_ms: input.timings.run_ms,
            total_ms: input.timings.total_ms,
            ..t
        };
    }

    /// Where a wait from `from` to `to` (unix ms) for container `warm` went: the parts of
    /// it that overlap the container's cold start (placement until the image was being
    /// fetched, the image, start until ready) count as those phases; the rest was
    /// queueing. Only `queued_ms` is set when the container was ready before the wait.
    pub fn wait_phases(&self, warm: &WarmId, from: u64, to: u64) -> PhaseTimings {
        let overlap = |a: u64, b: u64| b.min(to).saturating_sub(a.max(from));
        let mut t = PhaseTimings::default();
        let mut cold = 0;
        if let Some(w) = self.warm.get(warm)
            && let (Some(started), Some(ready)) = (w.started_at_ms, w.ready_at_ms)
            && ready > from
        {
            let image = w.image_ms.unwrap_or(0);
            let fetching = started.saturating_sub(image);
            let placement = overlap(w.placed_at_ms, fetching);
            let image = overlap(fetching, started);
            let startup = overlap(started, ready);
            t.placement_ms = Some(placement);
            t.image_ms = Some(image);
            t.startup_ms = Some(startup);
            cold = placement + image + startup;
        }
        t.queued_ms = Some(to.saturating_sub(from).saturating_sub(cold));
        t
    }

    fn end(
        &mut self,
        input: &mut InputRecord,
        result: InputResult,
        now: u64,
        changes: &mut Changes,
    ) {
        input.state = match &result {
            InputResult::Output(_) => InputState::Succeeded,
            InputResult::Error(_) => InputState::Failed,
        };
        input.result = Some(result);
        input.lease = None;
        input.ended_at_ms = Some(now);
        input.timings.total_ms = Some(now.saturating_sub(input.accepted_at_ms));
        self.closed(&input.call);
        changes.calls.insert(input.call.clone());
        changes.inputs.push(input.clone());
    }

    /// One input of `call` ended.
    fn closed(&mut self, call: &CallId) {
        if let Some(n) = self.open.get_mut(call) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.open.remove(call);
            }
        }
    }

    /// Inputs of `call` that have not ended (0 for a call that ended or is unknown).
    pub fn open_inputs(&self, call: &CallId) -> u32 {
        self.open.get(call).copied().unwrap_or(0)
    }
}

#[cfg(test)]
#[path = "state_tests.rs"]
mod tests;
