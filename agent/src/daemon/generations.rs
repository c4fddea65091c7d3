//! Generation marks (tree `generations`): per owner, the newest generation of its work this
//! node has taken and whether that attempt's end is recorded. They fence stale commands
//! (an older generation is refused, a repeated start is a no-op) and, after a restart,
//! find starts that an agent took but never turned into a container.

use gantry_shared::{Generation, JobId, Owner};
use serde::{Deserialize, Serialize};

use crate::store::{LocalStore, StoreError, Table};

/// The newest generation of an owner's work this node has taken, and whether its end
/// (exit or start failure) is recorded in the outbox. Filed under [`Owner::key`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Mark {
    /// Absent in marks written before owners were recorded (they are all jobs').
    #[serde(default)]
    owner: Option<Owner>,
    pub(super) generation: Generation,
    pub(super) done: bool,
}

impl Mark {
    fn owner(&self, key: &str) -> Option<Owner> {
        self.owner
            .clone()
            .or_else(|| JobId::new(key).ok().map(Owner::Job))
    }
}

/// The marks, persisted.
#[derive(Clone)]
pub(super) struct Generations {
    table: Table,
}

impl Generations {
    pub(super) fn open(store: &LocalStore) -> Result<Self, StoreError> {
        Ok(Self {
            table: store.table("generations")?,
        })
    }

    /// The mark of `owner`, if it has one.
    pub(super) fn get(&self, owner: &Owner) -> Result<Option<Mark>, StoreError> {
        self.table.get::<Mark>(owner.key())
    }

    /// The newest generation of `owner` taken here ([`Generation::NONE`] if none).
    pub(super) fn known(&self, owner: &Owner) -> Result<Generation, StoreError> {
        Ok(self.get(owner)?.map_or(Generation::NONE, |m| m.generation))
    }

    /// Whether the end of `generation` (or a newer one) of `owner` is recorded.
    pub(super) fn is_done(&self, owner: &Owner, generation: Generation) -> bool {
        self.get(owner)
            .ok()
            .flatten()
            .is_some_and(|m| m.done && m.generation >= generation)
    }

    /// Whether `generation` of `owner` was taken here and has not ended.
    pub(super) fn is_starting(&self, owner: &Owner, generation: Generation) -> bool {
        self.get(owner)
            .ok()
            .flatten()
            .is_some_and(|m| m.generation == generation && !m.done)
    }

    /// Takes `generation` of `owner`: it is the newest, not ended.
    pub(super) fn take(&self, owner: &Owner, generation: Generation) -> Result<(), StoreError> {
        let mark = Mark {
            owner: Some(owner.clone()),
            generation,
            done: false,
        };
        self.table.put(owner.key(), &mark)
    }

    /// Records the end of `generation` of `owner`; an older generation's end (fenced here
    /// by a newer start) leaves the mark alone.
    pub(super) fn done(&self, owner: &Owner, generation: Generation) -> Result<(), StoreError> {
        let newer = self
            .get(owner)
            .ok()
            .flatten()
            .is_some_and(|m| m.generation > generation);
        if newer {
            return Ok(());
        }
        let mark = Mark {
            owner: Some(owner.clone()),
            generation,
            done: true,
        };
        self.table.put(owner.key(), &mark)
    }

    /// The generations taken whose end is not recorded, with their owners.
    pub(super) fn unfinished(&self) -> Vec<(Owner, Generation)> {
        let marks = self.table.list::<Mark>().unwrap_or_default();
        marks
            .into_iter()
            .filter(|(_, m)| !m.done)
            .filter_map(|(key, m)| Some((m.owner(&key)?, m.generation)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_written_before_owners_were_recorded_are_jobs() {
        let old: Mark = serde_json::from_str(r#"{"generation": 3, "done": false}"#).expect("mark");
        let job = JobId::from_sequence(9);
        assert_eq!(old.owner(job.as_str()), Some(Owner::Job(job)));
        assert_eq!(old.generation, Generation(3));
    }

    #[test]
    fn an_older_end_leaves_a_newer_mark_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = LocalStore::open(dir.path()).expect("store");
        let marks = Generations::open(&store).expect("marks");
        let owner = Owner::Job(JobId::from_sequence(1));
        marks.take(&owner, Generation(2)).expect("take");
        assert!(marks.is_starting(&owner, Generation(2)));
        marks.done(&owner, Generation(1)).expect("done");
        assert!(marks.is_starting(&owner, Generation(2)));
        assert_eq!(marks.unfinished(), [(owner.clone(), Generation(2))]);
        marks.done(&owner, Generation(2)).expect("done");
        assert!(marks.is_done(&owner, Generation(2)));
        assert!(marks.unfinished().is_empty());
        assert_eq!(marks.known(&owner).expect("known"), Generation(2));
    }

    #[test]
    fn a_stop_that_overtakes_its_start_leaves_the_start_nothing_to_do() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = LocalStore::open(dir.path()).expect("store");
        let marks = Generations::open(&store).expect("marks");
        let owner = Owner::Function(gantry_shared::WarmId::from_sequence(7));
        // The stop of a generation never taken here marks it ended...
        marks.done(&owner, Generation(1)).expect("done");
        // ...so when its start arrives it is the generation known (a no-op for
        // `take_start`), nothing is left unfinished, and nothing older may start.
        assert_eq!(marks.known(&owner).expect("known"), Generation(1));
        assert!(marks.is_done(&owner, Generation(1)));
        assert!(!marks.is_starting(&owner, Generation(1)));
        assert!(marks.unfinished().is_empty());
    }
}
