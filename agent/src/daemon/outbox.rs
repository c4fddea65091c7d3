//! The event outbox: events the coordinator has not acknowledged, in order, durable in the
//! agent's store, sent again after a reconnect.

use super::*;

/// Events waiting for the coordinator's acknowledgement, in sequence order.
#[derive(Clone)]
pub(super) struct Outbox {
    pub(super) table: Table,
    pub(super) meta: Table,
    pub(super) notify: Arc<Notify>,
    /// Serializes pushes: a sequence number is read, used and advanced under it.
    pub(super) push_lock: Arc<std::sync::Mutex<()>>,
}

impl Outbox {
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
}
