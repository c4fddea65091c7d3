//! The functions' records: apps with their deployments (`fn_apps`), calls (`fn_calls`)
//! with their idempotency keys (`fn_idempotency`), inputs (`fn_inputs`, keyed
//! `<call>-<index>` so a call's inputs are one prefix scan, in order) and warm containers
//! (`fn_warm`). Inputs are written whole, payload and result included, and a call's
//! inputs are durable before the API acknowledges it (the store's group commit).

use gantry_shared::calls::InputState;
use gantry_shared::functions::DeploymentView;
use gantry_shared::{AppName, CallId, WarmId};
use serde::{Deserialize, Serialize};

use super::{Store, StoreError};
use crate::functions::FunctionKey;
use crate::functions::state::{InputRecord, WarmRecord};

/// An app: every deployment, and the version new calls go to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AppRecord {
    pub app: AppName,
    pub deployments: Vec<DeploymentView>,
    /// `None` once stopped.
    pub active: Option<u64>,
}

impl AppRecord {
    pub fn deployment(&self, version: u64) -> Option<&DeploymentView> {
        self.deployments.iter().find(|d| d.version == version)
    }
}

/// A call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallRecord {
    pub id: CallId,
    pub key: FunctionKey,
    pub created_at_ms: u64,
    /// Inputs it holds so far (final once it is not `open`).
    pub inputs: u32,
    #[serde(default)]
    pub cancelled: bool,
    /// A streamed map that still takes inputs.
    #[serde(default)]
    pub open: bool,
}

#[derive(Serialize, Deserialize)]
struct IdempotencyRecord {
    call: CallId,
    body_sha256: String,
}

/// The functions' trees. Cheap to clone.
#[derive(Clone)]
pub struct FunctionStore {
    store: Store,
    apps: sled::Tree,
    calls: sled::Tree,
    idempotency: sled::Tree,
    inputs: sled::Tree,
    /// Each call's ended inputs in the order they ended: `<call>/<n:08x>` → the input's
    /// index (JSON). An index of the inputs' `done_seq`, which is written
    /// with the input's end; repaired from them at open.
    done: sled::Tree,
    warm: sled::Tree,
}

impl FunctionStore {
    /// The volumes function containers may mount.
    pub fn volumes(&self) -> &crate::volumes::VolumeStore {
        self.store.volumes()
    }

    /// The secrets function containers may name.
    pub fn secrets(&self) -> &crate::secrets::Secrets {
        self.store.secrets()
    }

    pub(super) fn open(store: Store) -> Result<Self, StoreError> {
        let db = &store.db;
        Ok(Self {
            apps: db.open_tree("fn_apps")?,
            calls: db.open_tree("fn_calls")?,
            idempotency: db.open_tree("fn_idempotency")?,
            inputs: db.open_tree("fn_inputs")?,
            done: db.open_tree("fn_done")?,
            warm: db.open_tree("fn_warm")?,
            store,
        })
    }

    /// A fresh number for an id (sled's monotonic counter, shared with jobs).
    pub fn next_id(&self) -> Result<u64, StoreError> {
        Ok(self.store.db.generate_id()?)
    }

    /// Makes everything written so far durable (shared fsyncs).
    pub fn commit(&self) -> Result<(), StoreError> {
        self.store.commit()
    }

    pub fn app(&self, app: &AppName) -> Result<Option<AppRecord>, StoreError> {
        Ok(match self.apps.get(app.as_str())? {
            Some(v) => Some(serde_json::from_slice(&v)?),
            None => None,
        })
    }

    pub fn apps(&self) -> Result<Vec<AppRecord>, StoreError> {
        self.apps
            .iter()
            .map(|kv| Ok(serde_json::from_slice(&kv?.1)?))
            .collect()
    }

    pub fn put_app(&self, record: &AppRecord) -> Result<(), StoreError> {
        self.apps
            .insert(record.app.as_str(), serde_json::to_vec(record)?)?;
        Ok(())
    }

    /// Records a call and its inputs. With an idempotency key, a replay of the same body
    /// returns the call recorded first (`Ok(Err(id))`); a different body is refused.
    pub fn create_call(
        &self,
        call: &CallRecord,
        inputs: &[InputRecord],
        idempotency: Option<(&str, &str)>,
    ) -> Result<Result<(), CallId>, StoreError> {
        if let Some((key, body_sha256)) = idempotency {
            let record = IdempotencyRecord {
                call: call.id.clone(),
                body_sha256: body_sha256.to_owned(),
            };
            let value = serde_json::to_vec(&record)?;
            if let Err(existing) =
                self.idempotency
                    .compare_and_swap(key, None as Option<&[u8]>, Some(value))?
            {
                let Some(current) = existing.current else {
                    return Err(StoreError::IdempotencyMismatch {
                        key: key.to_owned(),
                    });
                };
                let earlier: IdempotencyRecord = serde_json::from_slice(&current)?;
                if earlier.body_sha256 != body_sha256 {
                    return Err(StoreError::IdempotencyMismatch {
                        key: key.to_owned(),
                    });
                }
                return Ok(Err(earlier.call));
            }
        }
        let mut batch = sled::Batch::default();
        for i in inputs {
            batch.insert(i.id.as_str(), serde_json::to_vec(i)?);
        }
        self.inputs.apply_batch(batch)?;
        self.calls
            .insert(call.id.as_str(), serde_json::to_vec(call)?)?;
        self.commit()?;
        Ok(Ok(()))
    }

    pub fn call(&self, id: &CallId) -> Result<Option<CallRecord>, StoreError> {
        Ok(match self.calls.get(id.as_str())? {
            Some(v) => Some(serde_json::from_slice(&v)?),
            None => None,
        })
    }

    pub fn put_call(&self, call: &CallRecord) -> Result<(), StoreError> {
        self.calls
            .insert(call.id.as_str(), serde_json::to_vec(call)?)?;
        Ok(())
    }

    /// Adds inputs to an open call and writes its record, durably.
    pub fn append_inputs(
        &self,
        call: &CallRecord,
        inputs: &[InputRecord],
    ) -> Result<(), StoreError> {
        self.put_inputs(inputs)?;
        self.put_call(call)?;
        self.commit()
    }

    /// Input `index` of `call`.
    pub fn input(&self, call: &CallId, index: u32) -> Result<Option<InputRecord>, StoreError> {
        let id = gantry_shared::InputId::of(call, index);
        Ok(match self.inputs.get(id.as_str())? {
            Some(v) => Some(serde_json::from_slice(&v)?),
            None => None,
        })
    }

    /// Up to `limit` of a call's inputs from index `from` on, in order, while `keep` holds
    /// (decoding nothing past the first it refuses: a long poll asks on every wake-up).
    pub fn inputs_from(
        &self,
        call: &CallId,
        from: u32,
        limit: usize,
        keep: impl Fn(&InputRecord) -> bool,
    ) -> Result<Vec<InputRecord>, StoreError> {
        let start = gantry_shared::InputId::of(call, from);
        scan_from::<InputRecord>(&self.inputs, &format!("{call}-"), start.as_str(), limit)
            .take_while(|i| i.as_ref().map_or(true, &keep))
            .collect()
    }

    fn done_key(call: &CallId, seq: u32) -> String {
        format!("{call}/{seq:08x}")
    }

    /// Notes that input `index` of `call` was the `seq`th to end (not yet durable).
    pub fn put_done(&self, call: &CallId, seq: u32, index: u32) -> Result<(), StoreError> {
        self.done
            .insert(Self::done_key(call, seq), serde_json::to_vec(&index)?)?;
        Ok(())
    }

    /// How many of a call's inputs have ended.
    pub fn done_count(&self, call: &CallId) -> Result<u32, StoreError> {
        let mut n = 0;
        for kv in self.done.scan_prefix(format!("{call}/").as_bytes()) {
            kv?;
            n += 1;
        }
        Ok(n)
    }

    /// The indices of a call's inputs that ended `from`th to `from + limit`th, in the order
    /// they ended.
    pub fn done_since(
        &self,
        call: &CallId,
        from: u32,
        limit: usize,
    ) -> Result<Vec<u32>, StoreError> {
        let start = Self::done_key(call, from);
        scan_from(&self.done, &format!("{call}/"), &start, limit).collect()
    }

    /// A call's inputs in order.
    pub fn inputs_of(&self, call: &CallId) -> Result<Vec<InputRecord>, StoreError> {
        self.inputs
            .scan_prefix(format!("{call}-").as_bytes())
            .map(|kv| Ok(serde_json::from_slice(&kv?.1)?))
            .collect()
    }

    /// Writes inputs (not yet durable: [`FunctionStore::commit`]).
    pub fn put_inputs<'a>(
        &self,
        inputs: impl IntoIterator<Item = &'a InputRecord>,
    ) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for i in inputs {
            batch.insert(i.id.as_str(), serde_json::to_vec(i)?);
        }
        self.inputs.apply_batch(batch)?;
        Ok(())
    }

    /// Inputs that have not ended (read once, at start). The order of ended inputs
    /// (`fn_done`) is repaired on the way: an end whose index entry a crash lost gets it.
    pub fn live_inputs(&self) -> Result<Vec<InputRecord>, StoreError> {
        let mut out = Vec::new();
        for kv in self.inputs.iter() {
            let i: InputRecord = serde_json::from_slice(&kv?.1)?;
            if !matches!(
                i.state,
                InputState::Succeeded | InputState::Failed | InputState::Cancelled
            ) {
                out.push(i);
            } else if let Some(seq) = i.done_seq
                && !self.done.contains_key(Self::done_key(&i.call, seq))?
            {
                self.put_done(&i.call, seq, i.index)?;
            }
        }
        Ok(out)
    }

    pub fn put_warm<'a>(
        &self,
        warm: impl IntoIterator<Item = &'a WarmRecord>,
    ) -> Result<(), StoreError> {
        for w in warm {
            self.warm.insert(w.id.as_str(), serde_json::to_vec(w)?)?;
        }
        Ok(())
    }

    pub fn remove_warm(&self, id: &WarmId) -> Result<(), StoreError> {
        self.warm.remove(id.as_str())?;
        Ok(())
    }

    pub fn all_warm(&self) -> Result<Vec<WarmRecord>, StoreError> {
        self.warm
            .iter()
            .map(|kv| Ok(serde_json::from_slice(&kv?.1)?))
            .collect()
    }
}

/// Up to `limit` records of `tree` from key `start` on, while their keys begin with
/// `prefix`, decoded as they are read.
fn scan_from<'a, T: serde::de::DeserializeOwned>(
    tree: &sled::Tree,
    prefix: &'a str,
    start: &str,
    limit: usize,
) -> impl Iterator<Item = Result<T, StoreError>> + 'a {
    tree.range(start..)
        .take_while(move |kv| {
            kv.as_ref()
                .map_or(true, |(k, _)| k.starts_with(prefix.as_bytes()))
        })
        .take(limit)
        .map(|kv| Ok(serde_json::from_slice(&kv?.1)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use gantry_shared::calls::{InputResult, Payload};
    use gantry_shared::{FunctionName, InputId};

    #[test]
    fn the_order_inputs_ended_in_is_read_in_pages_and_repaired_from_the_inputs() {
        let dir = tempfile::tempdir().expect("dir");
        let store = Store::open(dir.path()).expect("store");
        let fns = store.functions().expect("functions");
        let call = CallId::from_sequence(7);
        let key = FunctionKey {
            app: AppName::new("a").expect("app"),
            version: 1,
            function: FunctionName::new("f").expect("fn"),
        };
        let mut inputs: Vec<InputRecord> = (0..4)
            .map(|i| {
                InputRecord::new(
                    InputId::of(&call, i),
                    call.clone(),
                    i,
                    key.clone(),
                    Payload::text("x"),
                    1,
                )
            })
            .collect();
        // Inputs 2, 0 and 3 ended in that order; the index entry of the last was lost.
        for (seq, index) in [(0, 2), (1, 0), (2, 3)] {
            let i = &mut inputs[index as usize];
            i.state = InputState::Succeeded;
            i.result = Some(InputResult::Output(Payload::text("y")));
            i.done_seq = Some(seq);
            if seq < 2 {
                fns.put_done(&call, seq, index).expect("done");
            }
        }
        // Another call's input sorts right after this call's.
        let next = CallId::from_sequence(8);
        let other = InputRecord::new(InputId::of(&next, 0), next, 0, key, Payload::text("z"), 1);
        fns.put_inputs(inputs.iter().chain([&other]))
            .expect("inputs");
        assert_eq!(fns.done_count(&call).expect("count"), 2);
        let live = fns.live_inputs().expect("live");
        assert_eq!(
            live.iter().map(|i| i.id.clone()).collect::<Vec<_>>(),
            [InputId::of(&call, 1), other.id.clone()]
        );
        assert_eq!(fns.done_count(&call).expect("count"), 3, "repaired at read");
        assert_eq!(fns.done_since(&call, 0, 10).expect("all"), [2, 0, 3]);
        assert_eq!(fns.done_since(&call, 1, 1).expect("page"), [0]);
        let from_two: Vec<u32> = fns
            .inputs_from(&call, 2, 10, |_| true)
            .expect("from")
            .iter()
            .map(|i| i.index)
            .collect();
        assert_eq!(from_two, [2, 3], "a range stops at the call's end");
        let ended = |from| -> Vec<u32> {
            let got = fns
                .inputs_from(&call, from, 10, |i| i.state.is_terminal())
                .expect("ended");
            got.iter().map(|i| i.index).collect()
        };
        assert_eq!(ended(0), [0], "stops at input 1, which has not ended");
        assert_eq!(ended(1), Vec::<u32>::new());
        assert_eq!(ended(2), [2, 3]);
    }
}
