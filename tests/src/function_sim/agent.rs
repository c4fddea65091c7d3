//! A fake agent for function containers, following the real agent's contract: a start
//! answers `accepted` (again for a start it already had), reports `started` at once and
//! `ready` after a simulated start delay; a delivery is held (never more than the
//! container's `max_inputs`, which it checks) and each input answered after a simulated
//! run; a drain lets the container finish what it holds and exit (stopped after the
//! drain's grace); a stop ends it; a command for a container it does not run is answered
//! `not_running`. Answers wait in memory until the coordinator has them and die with the
//! host; events wait until acknowledged and survive it.

use std::collections::{BTreeMap, HashSet};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::ops::Range;

use gantry_shared::calls::{FailureCause, InputFailure, InputResult, Payload};
use gantry_shared::protocol::{Command, CommandReply, Event, OutputItem, Refusal, RefusalCode};
use gantry_shared::{EndCause, Generation, InputId, NodeId, Owner, WarmId};

/// An input whose payload starts with this fails (a user error) on its first lease.
pub const FLAKY: &str = "flaky";

/// What can happen to a simulated host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The host dies with its containers and unsent answers; its agent comes back with a
    /// new session and reports the containers lost.
    Crash,
    /// The host is cut off: its containers keep running, its answers and events wait.
    Partition,
    /// Nothing on the host moves (its clock included) until it resumes.
    Stall,
}

/// The parts of a run every agent shares.
#[derive(Debug, Clone)]
pub(super) struct Shape {
    pub seed: u64,
    pub start_ms: Range<u64>,
    pub run_ms: Range<u64>,
}

impl Shape {
    /// A draw from `range` that depends only on the seed and `what`, not on the order in
    /// which commands arrive.
    fn draw(&self, range: &Range<u64>, what: impl Hash) -> u64 {
        if range.end <= range.start {
            return range.start;
        }
        let mut h = DefaultHasher::new();
        (self.seed, what).hash(&mut h);
        range.start + h.finish() % (range.end - range.start)
    }
}

pub(super) struct Container {
    pub id: WarmId,
    pub cpu_millis: u64,
    pub memory_bytes: u64,
    pub gpus: Vec<u32>,
    pub max_inputs: u32,
    /// When it says ready; `None` once it has.
    ready_at: Option<u64>,
    draining: bool,
    /// When it ends, and how.
    exit_at: Option<(u64, EndCause)>,
    /// Inputs it holds: attempt, when its answer is ready, the payload.
    pub held: BTreeMap<InputId, (u32, u64, Payload)>,
    /// Its last sign of work (ready, an input delivered or answered): a drain for scale-down
    /// comes only after the function's `scaledown_window` of idleness.
    last_active: u64,
}

pub(super) struct Agent {
    pub id: NodeId,
    /// A fault, when it began and when it ends.
    pub fault: Option<(Fault, u64, u64)>,
    pub session: usize,
    pub containers: BTreeMap<WarmId, Container>,
    /// Every container this node was asked to start: a repeated start is accepted.
    seen: HashSet<WarmId>,
    /// Containers that died with the host, reported when its agent is back.
    lost: Vec<WarmId>,
    /// Events not yet acknowledged (they survive a crash, as the agent's outbox does).
    pub events: Vec<Event>,
    /// Answers not yet noted (they die with the host, as the agent's do).
    pub outputs: Vec<OutputItem>,
    /// A preemption notice: when it came and the deadline (unix ms).
    pub preempted: Option<(u64, u64)>,
}

/// What a command did that the driver records.
#[derive(Debug, Default)]
pub(super) struct Noted {
    /// A container started.
    pub started: bool,
    /// A drain came after this much idleness (ms).
    pub drained_idle_ms: Option<u64>,
    /// A drain told a preemption: its deadline and grace (ms).
    pub preempt: Option<(u64, u64)>,
    /// The contract the coordinator broke, if it did.
    pub violation: Option<String>,
}

impl Agent {
    pub fn new(id: NodeId, session: usize) -> Self {
        Self {
            id,
            fault: None,
            session,
            containers: BTreeMap::new(),
            seen: HashSet::new(),
            lost: Vec::new(),
            events: Vec::new(),
            outputs: Vec::new(),
            preempted: None,
        }
    }

    pub fn reachable(&self) -> bool {
        self.fault.is_none()
    }

    /// Whether its containers make progress now (a cut-off host still runs them).
    fn running(&self) -> bool {
        matches!(self.fault, None | Some((Fault::Partition, _, _)))
    }

    pub fn handle(&mut self, command: Command, now: u64, shape: &Shape) -> (CommandReply, Noted) {
        let mut noted = Noted::default();
        let reply = match command {
            Command::Start(spec) => {
                let Some(warm) = spec.owner.warm().cloned() else {
                    let refusal = Refusal::new(
                        RefusalCode::Unavailable,
                        "the simulated function agents run function containers only",
                    );
                    return (CommandReply::Refused(refusal), noted);
                };
                let Some(runtime) = spec.function else {
                    noted.violation = Some(format!("{warm} started without its runtime"));
                    return (CommandReply::Accepted, noted);
                };
                if !self.seen.insert(warm.clone()) {
                    return (CommandReply::Accepted, noted);
                }
                let ready_at = now + shape.draw(&shape.start_ms, ("start", &warm));
                self.containers.insert(
                    warm.clone(),
                    Container {
                        id: warm.clone(),
                        cpu_millis: spec.cpu_millis,
                        memory_bytes: spec.memory_bytes,
                        gpus: spec.gpus.clone(),
                        max_inputs: runtime.max_inputs,
                        ready_at: Some(ready_at),
                        draining: false,
                        exit_at: None,
                        held: BTreeMap::new(),
                        last_active: now,
                    },
                );
                self.events.push(Event::Started {
                    owner: spec.owner,
                    generation: spec.generation,
                    at_ms: now,
                    image_ms: 0,
                });
                noted.started = true;
                CommandReply::Accepted
            }
            Command::Deliver { owner, inputs, .. } => {
                let Some(c) = owner.warm().and_then(|w| self.live(w)) else {
                    return (CommandReply::NotRunning, noted);
                };
                if c.ready_at.is_some() {
                    noted.violation =
                        Some(format!("{} was handed inputs before it was ready", c.id));
                }
                for i in inputs {
                    if c.held.contains_key(&i.id) {
                        continue;
                    }
                    let done = now + shape.draw(&shape.run_ms, ("run", &i.id, i.attempt));
                    c.held.insert(i.id, (i.attempt, done, i.payload));
                }
                c.last_active = now;
                if c.held.len() > c.max_inputs as usize {
                    noted.violation = Some(format!(
                        "{} holds {} inputs, more than its max_inputs {}",
                        c.id,
                        c.held.len(),
                        c.max_inputs
                    ));
                }
                CommandReply::Accepted
            }
            Command::CancelInput { owner, input, .. } => {
                match owner.warm().and_then(|w| self.live(w)) {
                    Some(c) => {
                        c.held.remove(&input);
                        CommandReply::Accepted
                    }
                    None => CommandReply::NotRunning,
                }
            }
            Command::Drain {
                owner,
                grace_ms,
                preempt_deadline_ms,
                ..
            } => match owner.warm().and_then(|w| self.live(w)) {
                Some(c) => {
                    if preempt_deadline_ms.is_none() && !c.draining {
                        noted.drained_idle_ms = Some(now.saturating_sub(c.last_active));
                    }
                    noted.preempt = preempt_deadline_ms.map(|d| (d, grace_ms));
                    c.draining = true;
                    let stop = now + grace_ms;
                    if c.exit_at.is_none_or(|(at, _)| stop < at) {
                        c.exit_at = Some((stop, EndCause::Stopped));
                    }
                    CommandReply::Accepted
                }
                None => CommandReply::NotRunning,
            },
            Command::Stop { owner, .. } => match owner.warm().and_then(|w| self.live(w)) {
                Some(c) => {
                    c.exit_at = Some((now, EndCause::Stopped));
                    CommandReply::Accepted
                }
                None => CommandReply::NotRunning,
            },
            _ => CommandReply::Accepted,
        };
        (reply, noted)
    }

    /// A container that has not exited.
    fn live(&mut self, warm: &WarmId) -> Option<&mut Container> {
        self.containers.get_mut(warm)
    }

    /// Containers become ready, inputs are answered, finished drains and stops exit.
    pub fn progress(&mut self, now: u64) {
        if !self.running() {
            return;
        }
        let mut exited = Vec::new();
        for c in self.containers.values_mut() {
            let owner = Owner::Function(c.id.clone());
            if let Some(at) = c.ready_at.filter(|at| *at <= now) {
                c.ready_at = None;
                c.last_active = now;
                self.events.push(Event::Ready {
                    owner: owner.clone(),
                    generation: Generation(1),
                    at_ms: at,
                });
            }
            let done: Vec<InputId> = c
                .held
                .iter()
                .filter(|(_, (_, at, _))| *at <= now)
                .map(|(id, _)| id.clone())
                .collect();
            for id in done {
                let Some((attempt, at, payload)) = c.held.remove(&id) else {
                    continue;
                };
                let flaky = payload.bytes.starts_with(FLAKY.as_bytes());
                let result = if flaky && attempt == 1 {
                    InputResult::Error(InputFailure {
                        cause: FailureCause::User,
                        error_type: "Flaky".into(),
                        message: "fails on its first try".into(),
                        traceback: None,
                    })
                } else {
                    InputResult::Output(payload)
                };
                c.last_active = now;
                self.outputs.push(OutputItem {
                    owner: owner.clone(),
                    generation: Generation(1),
                    input: id,
                    attempt,
                    result,
                    at_ms: at,
                });
            }
            if c.draining && c.held.is_empty() && c.exit_at.is_none_or(|(at, _)| now < at) {
                c.exit_at = Some((now, EndCause::Exited));
            }
            if let Some((at, cause)) = c.exit_at.filter(|(at, _)| *at <= now) {
                exited.push((c.id.clone(), cause, at));
            }
        }
        for (id, cause, at) in exited {
            self.containers.remove(&id);
            let (exit_code, signal) = match cause {
                EndCause::Exited => (Some(0), None),
                _ => (None, Some(9)),
            };
            self.events.push(Event::Exited {
                owner: Owner::Function(id),
                generation: Generation(1),
                exit_code,
                signal,
                cause,
                message: cause.label(),
                at_ms: at,
            });
        }
    }

    /// The fault begins at `now`.
    pub fn fail(&mut self, fault: Fault, now: u64, until: u64) {
        self.fault = Some((fault, now, until));
        if fault == Fault::Crash {
            self.lost
                .extend(std::mem::take(&mut self.containers).into_keys());
            self.outputs.clear();
        }
    }

    /// The fault ends at `now`; the agent opens session `session`.
    pub fn heal(&mut self, now: u64, session: usize) {
        let Some((fault, since, _)) = self.fault.take() else {
            return;
        };
        match fault {
            Fault::Crash => {
                for id in std::mem::take(&mut self.lost) {
                    self.events.push(Event::Exited {
                        owner: Owner::Function(id),
                        generation: Generation(1),
                        exit_code: None,
                        signal: None,
                        cause: EndCause::ShimLost,
                        message: EndCause::ShimLost.label(),
                        at_ms: now,
                    });
                }
            }
            Fault::Stall => {
                let shift = |t: &mut u64| *t = t.saturating_add(now - since);
                for c in self.containers.values_mut() {
                    if let Some(t) = c.ready_at.as_mut() {
                        shift(t);
                    }
                    if let Some((t, _)) = c.exit_at.as_mut() {
                        shift(t);
                    }
                    for (_, t, _) in c.held.values_mut() {
                        shift(t);
                    }
                }
            }
            Fault::Partition => {}
        }
        self.session = session;
    }

    /// What the node's containers hold that it cannot: more CPU, memory or GPUs than it
    /// has, or one GPU twice.
    pub fn overcommitted(&self, cpu_millis: u64, memory_bytes: u64, gpus: u32) -> Option<String> {
        let cpu: u64 = self.containers.values().map(|c| c.cpu_millis).sum();
        let memory: u64 = self.containers.values().map(|c| c.memory_bytes).sum();
        let mut held = HashSet::new();
        for c in self.containers.values() {
            for g in &c.gpus {
                if *g >= gpus || !held.insert(*g) {
                    return Some(format!(
                        "{}: GPU {g} of {} held twice or absent",
                        c.id, self.id
                    ));
                }
            }
        }
        (cpu > cpu_millis || memory > memory_bytes).then(|| {
            format!(
                "{} runs {} containers holding {cpu}m CPU and {memory} B, more than its {cpu_millis}m and {memory_bytes} B",
                self.id,
                self.containers.len()
            )
        })
    }
}
