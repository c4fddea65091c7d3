//! The volumes the coordinator knows, in the sled tree `volumes` (name → [`Volume`]), and
//! how a job's or function's volumes are resolved against them: each use gets the
//! volume's backend (its node, or shared) written into the spec as it is accepted, so
//! placement and starts read it from the spec without looking anything up.
//!
//! Resolving and deleting exclude each other ([`VolumeStore::uses`] and
//! [`VolumeStore::deletes`]): a spec is resolved and recorded under a shared guard, and a
//! delete marks its volume `deleting` under the exclusive one after checking that nothing
//! uses it, so nothing can start using a volume between that check and its removal.

use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use gantry_shared::volumes::{Volume, VolumeMounts, VolumeName, placement_needs};

use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum VolumeUseError {
    #[error("volume `{name}` does not exist; create it with `gantry volume create {name}`")]
    Unknown { name: VolumeName },
    #[error("volume `{name}` is being deleted")]
    Deleting { name: VolumeName },
    #[error("{0}")]
    TwoNodes(String),
    #[error(
        "volume `{name}` is local to one node and this job runs on {nodes} nodes; use a \
         shared volume (`gantry volume create --shared`)"
    )]
    Gang { name: VolumeName, nodes: u32 },
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[derive(Clone)]
pub struct VolumeStore {
    tree: sled::Tree,
    guard: Arc<RwLock<()>>,
}

impl VolumeStore {
    pub fn new(tree: sled::Tree) -> Self {
        Self {
            tree,
            guard: Arc::default(),
        }
    }

    /// Held while a spec naming volumes is resolved and recorded.
    pub fn uses(&self) -> RwLockReadGuard<'_, ()> {
        self.guard.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Held while a delete checks that nothing uses its volume and marks it.
    pub fn deletes(&self) -> RwLockWriteGuard<'_, ()> {
        self.guard.write().unwrap_or_else(|e| e.into_inner())
    }

    pub fn get(&self, name: &VolumeName) -> Result<Option<Volume>, StoreError> {
        self.tree
            .get(name.as_str())?
            .map(|v| serde_json::from_slice(&v).map_err(StoreError::from))
            .transpose()
    }

    /// Every volume, by name.
    pub fn list(&self) -> Result<Vec<Volume>, StoreError> {
        self.tree
            .iter()
            .values()
            .map(|v| Ok(serde_json::from_slice(&v?)?))
            .collect()
    }

    /// Records a new volume durably; `false` if one of that name exists.
    pub fn insert_new(&self, volume: &Volume) -> Result<bool, StoreError> {
        let value = serde_json::to_vec(volume)?;
        let swapped =
            self.tree
                .compare_and_swap(volume.name.as_str(), None::<&[u8]>, Some(value))?;
        self.tree.flush()?;
        Ok(swapped.is_ok())
    }

    /// Replaces a volume's record durably.
    pub fn put(&self, volume: &Volume) -> Result<(), StoreError> {
        self.tree
            .insert(volume.name.as_str(), serde_json::to_vec(volume)?)?;
        self.tree.flush()?;
        Ok(())
    }

    pub fn remove(&self, name: &VolumeName) -> Result<(), StoreError> {
        self.tree.remove(name.as_str())?;
        self.tree.flush()?;
        Ok(())
    }

    /// Writes each use's backend into `mounts` (replacing whatever was sent), refusing
    /// volumes that do not exist or are being deleted and local volumes on two nodes.
    /// Call it holding [`VolumeStore::uses`] until the spec is recorded.
    pub fn resolve(&self, mounts: &mut VolumeMounts) -> Result<(), VolumeUseError> {
        for u in mounts.values_mut() {
            let volume = self.get(&u.name)?.ok_or_else(|| VolumeUseError::Unknown {
                name: u.name.clone(),
            })?;
            if volume.deleting {
                return Err(VolumeUseError::Deleting { name: volume.name });
            }
            u.backend = Some(volume.backend);
        }
        placement_needs(mounts).map_err(VolumeUseError::TwoNodes)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use gantry_shared::NodeId;
    use gantry_shared::volumes::{MountPath, VolumeBackend, VolumeUse};

    use super::*;

    fn volume(name: &str, node: Option<&str>) -> Volume {
        Volume {
            name: VolumeName::new(name).expect("name"),
            backend: match node {
                Some(n) => VolumeBackend::Local {
                    node: NodeId::new(n).expect("node"),
                    size_bytes: None,
                },
                None => VolumeBackend::Shared,
            },
            created_at_ms: 1,
            deleting: false,
        }
    }

    fn mounts(names: &[&str]) -> VolumeMounts {
        names
            .iter()
            .map(|n| {
                (
                    MountPath::new(format!("/{n}")).expect("path"),
                    VolumeUse {
                        name: VolumeName::new(*n).expect("name"),
                        // What a caller sent is replaced.
                        backend: Some(VolumeBackend::Shared),
                    },
                )
            })
            .collect()
    }

    #[test]
    fn uses_get_their_volume_backend_or_a_reason() {
        let db = sled::Config::new().temporary(true).open().expect("db");
        let store = VolumeStore::new(db.open_tree("volumes").expect("tree"));
        assert!(store.insert_new(&volume("a", Some("n1"))).expect("insert"));
        assert!(!store.insert_new(&volume("a", None)).expect("insert"));
        store.insert_new(&volume("b", Some("n2"))).expect("insert");
        store.insert_new(&volume("s", None)).expect("insert");
        let mut m = mounts(&["a", "s"]);
        store.resolve(&mut m).expect("resolves");
        let backends: Vec<_> = m.values().map(|u| u.backend.clone()).collect();
        assert_eq!(
            backends,
            [
                Some(volume("a", Some("n1")).backend),
                Some(VolumeBackend::Shared)
            ]
        );
        assert!(matches!(
            store.resolve(&mut mounts(&["a", "b"])),
            Err(VolumeUseError::TwoNodes(_))
        ));
        assert!(matches!(
            store.resolve(&mut mounts(&["nope"])),
            Err(VolumeUseError::Unknown { .. })
        ));
        store
            .put(&Volume {
                deleting: true,
                ..volume("s", None)
            })
            .expect("put");
        assert!(matches!(
            store.resolve(&mut mounts(&["s"])),
            Err(VolumeUseError::Deleting { .. })
        ));
        store
            .remove(&VolumeName::new("a").expect("name"))
            .expect("rm");
        assert_eq!(store.list().expect("list").len(), 2);
    }
}
