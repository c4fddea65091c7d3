//! The volume service: what the API does with volumes. A volume is made on the node that
//! will hold it (a local one's, or any node with shared storage for a shared one) before
//! it is recorded, and removed there before its record goes. Files are streamed between
//! the HTTP request and that node's agent over one QUIC stream each (`Command::Volume`),
//! never held whole by the coordinator.

use std::time::Duration;

use axum::body::Bytes;
use futures_util::{Stream, StreamExt};
use gantry_shared::protocol::Command;
use gantry_shared::volumes::{
    CreateVolume, FailureKind, MIN_SIZE_BYTES, Volume, VolumeBackend, VolumeFailure, VolumeListing,
    VolumeName, VolumeOp, VolumePath, VolumeReply,
};
use gantry_shared::{NodeId, now_ms};

use crate::functions::FunctionService;
use crate::nodes::Nodes;
use crate::nodes::liveness::Cluster;
use crate::store::{Store, StoreError};

/// Longest a node may take to make, remove, list or remove from a volume (an ext4
/// filesystem for a large volume takes a few seconds; a big tree takes a while to remove).
const OP_TIMEOUT: Duration = Duration::from_secs(120);
/// Most of a refused upload's body read and dropped before the answer is sent.
const DRAIN_LIMIT: u64 = 1 << 30;

#[derive(Debug, thiserror::Error)]
pub enum VolumeServiceError {
    #[error("{message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("volume `{name}` does not exist; `gantry volume list` shows the volumes")]
    NotFound { name: VolumeName },
    #[error("a volume named `{name}` exists already")]
    Exists { name: VolumeName },
    #[error(
        "volume `{name}` is in use by {}; stop them (or deploy without it) first",
        users.join(", ")
    )]
    InUse {
        name: VolumeName,
        users: Vec<String>,
    },
    #[error("{message}")]
    Unavailable { message: String },
    /// What the node holding the volume said.
    #[error(transparent)]
    Node(VolumeFailure),
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[derive(Clone)]
pub struct VolumeService {
    store: Store,
    cluster: Cluster,
    nodes: Nodes,
    functions: FunctionService,
    /// One create at a time: two creates of one name never both make it on a node.
    creating: std::sync::Arc<tokio::sync::Mutex<()>>,
}

impl VolumeService {
    pub fn new(store: Store, cluster: Cluster, nodes: Nodes, functions: FunctionService) -> Self {
        Self {
            store,
            cluster,
            nodes,
            functions,
            creating: Default::default(),
        }
    }

    /// Makes a volume on its node, then records it. A local volume without a node goes
    /// to the up, ready, connected node holding the fewest volumes (then the lowest id).
    pub async fn create(&self, req: CreateVolume) -> Result<Volume, VolumeServiceError> {
        let _one = self.creating.lock().await;
        let volumes = self.store.volumes();
        if volumes.get(&req.name)?.is_some() {
            return Err(VolumeServiceError::Exists { name: req.name });
        }
        let size_bytes = req.size.as_ref().map(|s| s.value().0);
        if let Some(size) = size_bytes.filter(|s| *s < MIN_SIZE_BYTES) {
            return Err(VolumeServiceError::Invalid {
                field: "size",
                message: gantry_shared::volumes::VolumeError::TooSmall(size).to_string(),
            });
        }
        let backend = if req.shared {
            if req.node.is_some() || size_bytes.is_some() {
                return Err(VolumeServiceError::Invalid {
                    field: "shared",
                    message: "a shared volume lives on every node's shared path: it takes no \
                              node, and its size is the shared filesystem's (set a quota \
                              there)"
                        .into(),
                });
            }
            VolumeBackend::Shared
        } else {
            let node = match req.node {
                Some(node) => node,
                None => self.pick_node()?,
            };
            VolumeBackend::Local { node, size_bytes }
        };
        let volume = Volume {
            name: req.name.clone(),
            backend,
            created_at_ms: now_ms(),
            deleting: false,
        };
        self.simple(&volume, VolumeOp::Create).await?;
        if !volumes.insert_new(&volume)? {
            return Err(VolumeServiceError::Exists { name: volume.name });
        }
        tracing::info!(volume = %volume.name, backend = ?volume.backend, "volume created");
        Ok(volume)
    }

    /// The up, ready, connected node with the fewest local volumes.
    fn pick_node(&self) -> Result<NodeId, VolumeServiceError> {
        let mut held: std::collections::BTreeMap<NodeId, usize> = Default::default();
        for v in self.store.volumes().list()? {
            if let Some(node) = v.backend.node() {
                *held.entry(node.clone()).or_default() += 1;
            }
        }
        self.cluster
            .statuses()
            .into_iter()
            .filter(|s| s.placeable() && self.nodes.get(&s.id).is_some())
            .map(|s| (held.get(&s.id).copied().unwrap_or(0), s.id))
            .min()
            .map(|(_, id)| id)
            .ok_or_else(|| VolumeServiceError::Unavailable {
                message: "no node is up, ready and connected to hold the volume; join an agent \
                          or name a node with --node"
                    .into(),
            })
    }

    pub fn list(&self) -> Result<Vec<Volume>, VolumeServiceError> {
        Ok(self.store.volumes().list()?)
    }

    pub fn get(&self, name: &VolumeName) -> Result<Volume, VolumeServiceError> {
        self.store
            .volumes()
            .get(name)?
            .ok_or_else(|| VolumeServiceError::NotFound { name: name.clone() })
    }

    /// What mounts `name`: jobs not yet ended, and function versions that are deployed
    /// or still have containers.
    fn users(&self, name: &VolumeName) -> Result<Vec<String>, VolumeServiceError> {
        let mut users: Vec<String> = self
            .store
            .active_jobs()?
            .into_iter()
            .filter(|j| j.spec.volumes.values().any(|u| u.name == *name))
            .map(|j| format!("job {}", j.id))
            .collect();
        users.extend(self.functions.volume_users(name));
        Ok(users)
    }

    /// Removes a volume and its files, refused while anything mounts it. The volume is
    /// marked first, so nothing starts using it while its files go.
    pub async fn delete(&self, name: &VolumeName) -> Result<(), VolumeServiceError> {
        let volumes = self.store.volumes();
        let marked = {
            let _deletes = volumes.deletes();
            let volume = self.get(name)?;
            let users = self.users(name)?;
            if !users.is_empty() {
                return Err(VolumeServiceError::InUse {
                    name: name.clone(),
                    users,
                });
            }
            let marked = Volume {
                deleting: true,
                ..volume
            };
            volumes.put(&marked)?;
            marked
        };
        match self.simple(&marked, VolumeOp::Delete).await {
            Ok(_) => {
                volumes.remove(name)?;
                tracing::info!(volume = %name, "volume deleted");
                Ok(())
            }
            Err(e) => {
                // Usable again; a delete later finishes the job.
                volumes.put(&Volume {
                    deleting: false,
                    ..marked
                })?;
                Err(e)
            }
        }
    }

    /// The entries under `path`.
    pub async fn list_files(
        &self,
        name: &VolumeName,
        path: VolumePath,
        recursive: bool,
    ) -> Result<VolumeListing, VolumeServiceError> {
        let volume = self.get(name)?;
        match self
            .simple(&volume, VolumeOp::List { path, recursive })
            .await?
        {
            VolumeReply::Listing(listing) => Ok(listing),
            other => Err(unexpected(&other)),
        }
    }

    /// Removes a file or a directory tree.
    pub async fn remove(
        &self,
        name: &VolumeName,
        path: VolumePath,
    ) -> Result<(), VolumeServiceError> {
        let volume = self.get(name)?;
        self.simple(&volume, VolumeOp::Remove { path })
            .await
            .map(drop)
    }

    /// A file's size and its bytes as they come from the node.
    pub async fn read(
        &self,
        name: &VolumeName,
        path: VolumePath,
    ) -> Result<(u64, impl Stream<Item = std::io::Result<Bytes>> + use<>), VolumeServiceError> {
        let volume = self.get(name)?;
        let (tx, mut rx) = self.open(&volume, VolumeOp::Read { path }).await?;
        drop(tx);
        let size = match self.reply(&mut rx).await? {
            VolumeReply::File { size_bytes } => size_bytes,
            other => return Err(unexpected(&other)),
        };
        let chunks = futures_util::stream::unfold(rx, |mut rx| async move {
            match rx.read_chunk(64 << 10, true).await {
                Ok(Some(chunk)) => Some((Ok(chunk.bytes), rx)),
                Ok(None) => None,
                Err(e) => Some((Err(std::io::Error::other(e)), rx)),
            }
        });
        Ok((size, chunks))
    }

    /// Streams `body` into `path` on the volume's node; the file is replaced only once
    /// all of it arrived. A body that fails midway leaves the old file as it was.
    pub async fn write<S, E>(
        &self,
        name: &VolumeName,
        path: VolumePath,
        body: S,
    ) -> Result<(), VolumeServiceError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let volume = self.get(name)?;
        let (mut tx, mut rx) = self.open(&volume, VolumeOp::Write { path }).await?;
        let mut body = body;
        let mut sent = Ok(());
        while let Some(chunk) = body.next().await {
            match chunk {
                Ok(bytes) => {
                    if tx.write_all(&bytes).await.is_err() {
                        // The node stopped reading: its reply says why.
                        sent = Err(None);
                        break;
                    }
                }
                Err(e) => {
                    sent = Err(Some(e.to_string()));
                    break;
                }
            }
        }
        match sent {
            Ok(()) => {
                let _ = tx.finish();
            }
            Err(Some(why)) => {
                // The upload is abandoned: the node drops what it got.
                let _ = tx.reset(0u32.into());
                return Err(VolumeServiceError::Invalid {
                    field: "body",
                    message: format!("the upload broke off: {why}; nothing was written"),
                });
            }
            Err(None) => {
                // The node refused the rest (the volume is full): take what the client
                // still sends, up to a bound, so it gets the answer instead of a
                // connection closed under its upload.
                let mut drained = 0u64;
                while drained < DRAIN_LIMIT {
                    match body.next().await {
                        Some(Ok(bytes)) => drained += bytes.len() as u64,
                        Some(Err(_)) | None => break,
                    }
                }
            }
        }
        self.reply(&mut rx).await.map(drop)
    }

    /// Sends a request that carries no bytes and reads its reply (bounded in time).
    async fn simple(
        &self,
        volume: &Volume,
        op: VolumeOp,
    ) -> Result<VolumeReply, VolumeServiceError> {
        let exchange = async {
            let (mut tx, mut rx) = self.open(volume, op).await?;
            let _ = tx.finish();
            self.reply(&mut rx).await
        };
        tokio::time::timeout(OP_TIMEOUT, exchange)
            .await
            .map_err(|_| VolumeServiceError::Unavailable {
                message: format!(
                    "the node holding volume `{}` did not answer within {OP_TIMEOUT:?}",
                    volume.name
                ),
            })?
    }

    /// Opens a stream for `op` to the node that holds `volume`'s files.
    async fn open(
        &self,
        volume: &Volume,
        op: VolumeOp,
    ) -> Result<(quinn::SendStream, quinn::RecvStream), VolumeServiceError> {
        let (node, session) = self.holder(volume)?;
        let command = Command::Volume {
            name: volume.name.clone(),
            backend: volume.backend.clone(),
            op,
        };
        crate::control::open_command(&session.conn, &command)
            .await
            .map_err(|e| VolumeServiceError::Unavailable {
                message: format!(
                    "cannot reach node {node}, which holds volume `{}`: {e}",
                    volume.name
                ),
            })
    }

    /// A reply; a failure comes back as the error.
    async fn reply(&self, rx: &mut quinn::RecvStream) -> Result<VolumeReply, VolumeServiceError> {
        match crate::control::read_reply::<VolumeReply>(rx).await {
            Ok(VolumeReply::Failed(f)) => Err(VolumeServiceError::Node(f)),
            Ok(reply) => Ok(reply),
            Err(e) => Err(VolumeServiceError::Unavailable {
                message: format!("the node holding the volume broke off: {e}"),
            }),
        }
    }

    /// The connected node that serves `volume`'s files: a local volume's own node, or
    /// for a shared one the lowest connected node with shared storage.
    fn holder(
        &self,
        volume: &Volume,
    ) -> Result<(NodeId, crate::nodes::Session), VolumeServiceError> {
        match &volume.backend {
            VolumeBackend::Local { node, .. } => {
                let session = self.nodes.get(node).ok_or_else(|| {
                    VolumeServiceError::Unavailable {
                        message: format!(
                            "node {node}, which holds volume `{}`, is not connected; bring it back \
                         and try again",
                            volume.name
                        ),
                    }
                })?;
                Ok((node.clone(), session))
            }
            VolumeBackend::Shared => self
                .nodes
                .sessions()
                .into_iter()
                .filter(|(_, s)| s.capacity.shared_volumes)
                .min_by(|a, b| a.0.cmp(&b.0))
                .ok_or_else(|| VolumeServiceError::Unavailable {
                    message: "no connected node declares shared volume storage ([volumes] \
                              shared_path in agent.toml)"
                        .into(),
                }),
        }
    }
}

fn unexpected(reply: &VolumeReply) -> VolumeServiceError {
    VolumeServiceError::Node(VolumeFailure::new(
        FailureKind::Io,
        format!("the node answered {reply:?}"),
    ))
}
