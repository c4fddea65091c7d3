//! The event outbox: events the coordinator has not acknowledged, in order, durable in the
//! agent's store (trees `outbox` and `outbox_meta`), sent again after a reconnect. The ends
//! of attempts (exits, failed starts) outlive their acknowledgement in `outbox_ends` (the
//! newest [`KEPT_ENDS`]), so a coordinator restored from a backup that predates them can
//! be told again ([`Outbox::recall`]).

use std::sync::{Arc, Mutex};

/// Acknowledged ends kept for a coordinator restored from a backup.
pub(super) const KEPT_ENDS: usize = 1_000;

use gantry_shared::protocol::{Event, SequencedEvent};
use tokio::sync::Notify;

use crate::store::{LocalStore, StoreError, Table};

/// Events waiting for the coordinator's acknowledgement, in sequence order. Clones share
/// the same outbox.
#[derive(Clone)]
pub(super) struct Outbox {
    table: Table,
    meta: Table,
    /// Acknowledged ends of attempts, by their sequence number.
    ends: Table,
    /// Wakes the sender when an event is pushed.
    notify: Arc<Notify>,
    /// Serializes pushes: a sequence number is read, used and advanced under it.
    push_lock: Arc<Mutex<()>>,
}

impl Outbox {
    /// The outbox kept in `store`.
    pub(super) fn open(store: &LocalStore) -> Result<Self, StoreError> {
        Ok(Self {
            table: store.table("outbox")?,
            meta: store.table("outbox_meta")?,
            ends: store.table("outbox_ends")?,
            notify: Arc::new(Notify::new()),
            push_lock: Arc::default(),
        })
    }

    pub(super) fn push(&self, event: Event) -> Result<(), StoreError> {
        let _guard = self.push_lock.lock().unwrap_or_else(|e| e.into_inner());
        let seq = self.meta.get::<u64>("next_seq")?.unwrap_or(1);
        self.table
            .put(&format!("{seq:020}"), &SequencedEvent { seq, event })?;
        self.meta.put("next_seq", &(seq + 1))?;
        self.notify.notify_one();
        Ok(())
    }

    pub(super) fn pending(&self, max: usize) -> Result<Vec<SequencedEvent>, StoreError> {
        Ok(self
            .table
            .list::<SequencedEvent>()?
            .into_iter()
            .take(max)
            .map(|(_, e)| e)
            .collect())
    }

    pub(super) fn ack(&self, upto: u64) -> Result<(), StoreError> {
        let mut kept = false;
        for (key, e) in self.table.list::<SequencedEvent>()? {
            if e.seq <= upto {
                if matches!(e.event, Event::Exited { .. } | Event::StartFailed { .. }) {
                    // Durable with the removal's flush just below.
                    self.ends.put_unflushed(&key, &e)?;
                    kept = true;
                }
                self.table.remove(&key)?;
            }
        }
        if self.meta.get::<u64>("acked")?.is_none_or(|a| a < upto) {
            self.meta.put("acked", &upto)?;
        }
        if kept {
            let keys = self.ends.keys()?;
            for key in keys.iter().take(keys.len().saturating_sub(KEPT_ENDS)) {
                self.ends.remove(key)?;
            }
        }
        Ok(())
    }

    /// The coordinator says it has applied this node's events up to `applied`. When that is
    /// less than it acknowledged before, it lost them (restored from a backup): the ends
    /// it lost are sent again, as new events (applying an end twice changes nothing).
    /// Returns how many.
    pub(super) fn recall(&self, applied: u64) -> Result<usize, StoreError> {
        let acked = self.meta.get::<u64>("acked")?.unwrap_or(0);
        if applied >= acked {
            return Ok(0);
        }
        let lost: Vec<(String, SequencedEvent)> = self
            .ends
            .list::<SequencedEvent>()?
            .into_iter()
            .filter(|(_, e)| e.seq > applied)
            .collect();
        for (key, e) in &lost {
            self.push(e.event.clone())?;
            self.ends.remove(key)?;
        }
        // What it acknowledges from now on is measured against what it has.
        self.meta.put("acked", &applied)?;
        Ok(lost.len())
    }

    /// Resolves when an event is pushed (or was, since the last wait).
    pub(super) async fn pushed(&self) {
        self.notify.notified().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gantry_shared::{Generation, JobId, Owner};

    #[test]
    fn the_outbox_keeps_order_and_trims_on_ack() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = LocalStore::open(dir.path()).expect("store");
        let outbox = Outbox::open(&store).expect("outbox");
        for g in 1..=3 {
            outbox
                .push(Event::Started {
                    owner: Owner::Job(JobId::from_sequence(1)),
                    generation: Generation(g),
                    at_ms: 0,
                    image_ms: 0,
                })
                .expect("push");
        }
        let seqs: Vec<u64> = outbox
            .pending(10)
            .expect("pending")
            .iter()
            .map(|e| e.seq)
            .collect();
        assert_eq!(seqs, [1, 2, 3]);
        outbox.ack(2).expect("ack");
        assert_eq!(outbox.recall(2).expect("recall"), 0, "nothing lost");
        assert_eq!(
            outbox
                .pending(10)
                .expect("pending")
                .iter()
                .map(|e| e.seq)
                .collect::<Vec<_>>(),
            [3]
        );
    }

    #[test]
    fn ends_a_restored_coordinator_lost_are_sent_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = LocalStore::open(dir.path()).expect("store");
        let outbox = Outbox::open(&store).expect("outbox");
        let owner = |n| Owner::Job(JobId::from_sequence(n));
        let exited = |n| Event::Exited {
            owner: owner(n),
            generation: Generation(1),
            exit_code: Some(0),
            signal: None,
            cause: gantry_shared::EndCause::Exited,
            message: "exited".into(),
            at_ms: 5,
        };
        outbox
            .push(Event::Started {
                owner: owner(1),
                generation: Generation(1),
                at_ms: 0,
                image_ms: 0,
            })
            .expect("push");
        outbox.push(exited(1)).expect("push");
        outbox.push(exited(2)).expect("push");
        outbox.ack(3).expect("ack");
        assert!(outbox.pending(10).expect("pending").is_empty());
        // The coordinator now says it applied only up to 1: both ends come back, as new
        // events after the last sequence number; the start does not.
        assert_eq!(outbox.recall(1).expect("recall"), 2);
        let again = outbox.pending(10).expect("pending");
        assert_eq!(
            again
                .iter()
                .map(|e| (e.seq, e.event.owner().clone()))
                .collect::<Vec<_>>(),
            [(4, owner(1)), (5, owner(2))]
        );
        // Once applied and acknowledged again, a second recall finds nothing lost.
        outbox.ack(5).expect("ack");
        assert_eq!(outbox.recall(5).expect("recall"), 0);
    }
}
