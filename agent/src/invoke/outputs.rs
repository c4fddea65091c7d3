//! Answers for inputs, and the chunks inputs stream before them, on their way to the
//! coordinator: kept in memory, in order (one queue for both, so an input's chunks always
//! go before its answer), until the control session has them `Noted` (or refused), so they
//! outlive a reconnect of the session. Bounded: a container that answers or streams while
//! the coordinator is away waits for room. They do not outlive the agent: an input whose
//! answer is lost so is leased again by the coordinator when its container ends or its
//! lease expires; lost chunks are lost (chunks are not durable).

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};

use gantry_shared::AttemptRef;
use tokio::sync::{Notify, Semaphore, SemaphorePermit};

use super::state::{ChunkReport, OutputReport};

/// Answers and chunks kept at most (each up to 2 MiB).
pub const DEFAULT_CAPACITY: usize = 256;

/// One thing on its way to the coordinator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    Output(OutputReport),
    Chunk(ChunkReport),
}

impl Report {
    pub fn attempt_ref(&self) -> &AttemptRef {
        match self {
            Report::Output(o) => &o.attempt_ref,
            Report::Chunk(c) => &c.attempt_ref,
        }
    }

    /// The payload bytes it carries (for batching).
    pub fn size(&self) -> usize {
        match self {
            Report::Output(o) => o.result.size(),
            Report::Chunk(c) => c.payload.bytes.len(),
        }
    }
}

/// A place in the queue, taken before a decision so that what was decided is queued
/// without waiting (see [`Outputs::reserve`]). Dropped unused, the place is given back.
pub struct Place<'a> {
    outputs: &'a Outputs,
    permit: SemaphorePermit<'a>,
}

impl Place<'_> {
    /// Queues `report` in this place.
    pub fn push(self, report: Report) {
        // Given back by `done`.
        self.permit.forget();
        self.outputs.insert(report);
    }
}

/// The answers not yet taken by the coordinator. Clones share them.
#[derive(Clone)]
pub struct Outputs {
    inner: Arc<Inner>,
}

struct Inner {
    pending: Mutex<Pending>,
    /// One permit per free place.
    room: Semaphore,
    /// Wakes the sender.
    pushed: Notify,
    /// Wakes those waiting for a container's answers to be taken.
    taken: Notify,
}

#[derive(Default)]
struct Pending {
    next_seq: u64,
    reports: BTreeMap<u64, Report>,
}

impl Outputs {
    pub fn new(capacity: usize) -> Self {
        Self {
            inner: Arc::new(Inner {
                pending: Mutex::default(),
                room: Semaphore::new(capacity.max(1)),
                pushed: Notify::new(),
                taken: Notify::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.inner
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues an answer, waiting for room when the queue is full.
    pub async fn push(&self, report: OutputReport) {
        if let Ok(permit) = self.inner.room.acquire().await {
            // Given back by `done`.
            permit.forget();
        }
        self.insert(Report::Output(report));
    }

    /// Waits for room and takes a place, to fill with [`Place::push`] (or give back by
    /// dropping it). `None` only if the queue was closed, which it never is.
    pub async fn reserve(&self) -> Option<Place<'_>> {
        let permit = self.inner.room.acquire().await.ok()?;
        Some(Place {
            outputs: self,
            permit,
        })
    }

    fn insert(&self, report: Report) {
        let mut pending = self.lock();
        let seq = pending.next_seq;
        pending.next_seq += 1;
        pending.reports.insert(seq, report);
        drop(pending);
        self.inner.pushed.notify_one();
    }

    /// Up to `max` answers and chunks, oldest first, leaving out those in `skip` (in
    /// flight).
    pub fn pending(&self, skip: &HashSet<u64>, max: usize) -> Vec<(u64, Report)> {
        self.lock()
            .reports
            .iter()
            .filter(|(seq, _)| !skip.contains(seq))
            .take(max)
            .map(|(seq, r)| (*seq, r.clone()))
            .collect()
    }

    /// The coordinator took (or refused) answer `seq`: forget it.
    pub fn done(&self, seq: u64) {
        if self.lock().reports.remove(&seq).is_some() {
            self.inner.room.add_permits(1);
            self.inner.taken.notify_waiters();
        }
    }

    pub fn len(&self) -> usize {
        self.lock().reports.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Resolves when an answer is pushed (or was, since the last wait).
    pub async fn pushed(&self) {
        self.inner.pushed.notified().await;
    }

    /// Resolves once no answer of `attempt` waits any more, so its container's end is
    /// reported after its answers.
    pub async fn settled(&self, attempt: &AttemptRef) {
        loop {
            let taken = self.inner.taken.notified();
            tokio::pin!(taken);
            taken.as_mut().enable();
            let waiting = self
                .lock()
                .reports
                .values()
                .any(|r| r.attempt_ref() == attempt);
            if !waiting {
                return;
            }
            taken.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use gantry_shared::calls::{InputResult, Payload};
    use gantry_shared::{CallId, Generation, InputId, Owner, WarmId};

    fn report(n: u32) -> OutputReport {
        let call = CallId::new("c-1").expect("call");
        OutputReport {
            attempt_ref: AttemptRef {
                owner: Owner::Function(WarmId::new("w-1").expect("warm")),
                generation: Generation(1),
            },
            input: InputId::of(&call, n),
            call,
            attempt: 1,
            result: InputResult::Output(Payload::text("y")),
            at_ms: 1,
        }
    }

    #[tokio::test]
    async fn answers_wait_for_room_and_stay_until_done() {
        let outputs = Outputs::new(2);
        // A place taken and dropped unused is given back.
        drop(outputs.reserve().await.expect("a place"));
        drop(outputs.reserve().await.expect("a place"));
        outputs.push(report(0)).await;
        outputs.push(report(1)).await;
        let third = {
            let outputs = outputs.clone();
            tokio::spawn(async move { outputs.push(report(2)).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!third.is_finished(), "a full queue makes the answer wait");
        let skip: HashSet<u64> = [0].into();
        let firsts = outputs.pending(&skip, 10);
        assert_eq!(firsts.iter().map(|(s, _)| *s).collect::<Vec<_>>(), [1]);
        outputs.done(0);
        third.await.expect("pushed once there was room");
        assert_eq!(outputs.len(), 2);
        let attempt = report(0).attempt_ref;
        let settled = {
            let outputs = outputs.clone();
            tokio::spawn(async move { outputs.settled(&attempt).await })
        };
        outputs.done(1);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!settled.is_finished());
        outputs.done(2);
        settled.await.expect("settled");
        assert!(outputs.is_empty());
    }
}
