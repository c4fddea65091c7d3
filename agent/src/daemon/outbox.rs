//! The event outbox: events the coordinator has not acknowledged, in order, durable in the
//! agent's store (trees `outbox` and `outbox_meta`), sent again after a reconnect.

use std::sync::{Arc, Mutex};

use gantry_shared::protocol::{Event, SequencedEvent};
use tokio::sync::Notify;

use crate::store::{LocalStore, StoreError, Table};

/// Events waiting for the coordinator's acknowledgement, in sequence order. Clones share
/// the same outbox.
#[derive(Clone)]
pub(super) struct Outbox {
    table: Table,
    meta: Table,
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
        for (key, e) in self.table.list::<SequencedEvent>()? {
            if e.seq <= upto {
                self.table.remove(&key)?;
            }
        }
        Ok(())
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
}
