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
    pub inputs: u32,
    #[serde(default)]
    pub cancelled: bool,
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
    warm: sled::Tree,
}

impl FunctionStore {
    pub(super) fn open(store: Store) -> Result<Self, StoreError> {
        let db = &store.db;
        Ok(Self {
            apps: db.open_tree("fn_apps")?,
            calls: db.open_tree("fn_calls")?,
            idempotency: db.open_tree("fn_idempotency")?,
            inputs: db.open_tree("fn_inputs")?,
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

    /// Inputs that have not ended (read once, at start).
    pub fn live_inputs(&self) -> Result<Vec<InputRecord>, StoreError> {
        let mut out = Vec::new();
        for kv in self.inputs.iter() {
            let i: InputRecord = serde_json::from_slice(&kv?.1)?;
            if !matches!(
                i.state,
                InputState::Succeeded | InputState::Failed | InputState::Cancelled
            ) {
                out.push(i);
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
