//! `Command::Volume` on its stream: one [`VolumeReply`] frame, after the request's bytes
//! for a write and before the file's bytes for a read. Filesystem work runs on the
//! blocking pool; bytes are copied between the stream and the file without holding more
//! than a buffer of them.

use gantry_shared::protocol;
use gantry_shared::volumes::{
    FailureKind, VolumeBackend, VolumeFailure, VolumeName, VolumeOp, VolumeReply,
};

use super::{Volumes, files};

/// Serves one volume request; the stream's halves are the request's.
pub async fn serve(
    volumes: &Volumes,
    name: VolumeName,
    backend: VolumeBackend,
    op: VolumeOp,
    rx: &mut quinn::RecvStream,
    tx: &mut quinn::SendStream,
) {
    let reply = match op {
        VolumeOp::Read { path } => {
            let v = volumes.clone();
            let opened = blocking(move || {
                let root = v.root(&name, &backend)?;
                files::open(&root, &path)
            })
            .await;
            match opened {
                Ok((file, size_bytes)) => {
                    if write_reply(tx, &VolumeReply::File { size_bytes }).await {
                        let mut file = tokio::fs::File::from_std(file);
                        if let Err(e) = tokio::io::copy(&mut file, tx).await {
                            tracing::warn!(error = %e, "sending a volume file failed");
                            let _ = tx.reset(1u32.into());
                        }
                    }
                    return;
                }
                Err(f) => VolumeReply::Failed(f),
            }
        }
        VolumeOp::Write { path } => write(volumes, name, backend, path, rx).await,
        other => {
            let v = volumes.clone();
            let done = blocking(move || match other {
                VolumeOp::Create => v.create(&name, &backend).map(|()| VolumeReply::Done),
                VolumeOp::Delete => v.delete(&name, &backend).map(|()| VolumeReply::Done),
                VolumeOp::List { path, recursive } => {
                    let root = v.root(&name, &backend)?;
                    files::list(&root, &path, recursive).map(VolumeReply::Listing)
                }
                VolumeOp::Remove { path } => {
                    let root = v.root(&name, &backend)?;
                    files::remove(&root, &path).map(|()| VolumeReply::Done)
                }
                VolumeOp::Read { .. } | VolumeOp::Write { .. } => Err(VolumeFailure::new(
                    FailureKind::Io,
                    "reads and writes stream on their own",
                )),
            })
            .await;
            done.unwrap_or_else(VolumeReply::Failed)
        }
    };
    write_reply(tx, &reply).await;
}

/// Takes the rest of the request stream into `path`, in place only once all of it came.
async fn write(
    volumes: &Volumes,
    name: VolumeName,
    backend: VolumeBackend,
    path: gantry_shared::volumes::VolumePath,
    rx: &mut quinn::RecvStream,
) -> VolumeReply {
    let v = volumes.clone();
    let begun = blocking(move || {
        let root = v.root(&name, &backend)?;
        let mut upload = files::Upload::begin(&root, &path)?;
        let file = upload.file()?;
        Ok((upload, file))
    })
    .await;
    let (upload, file) = match begun {
        Ok(b) => b,
        Err(f) => {
            // Nothing more of the request is wanted.
            let _ = rx.stop(0u32.into());
            return VolumeReply::Failed(f);
        }
    };
    let mut file = tokio::fs::File::from_std(file);
    let copied = tokio::io::copy(rx, &mut file).await;
    let file = file.into_std().await;
    if let Err(e) = copied {
        let _ = rx.stop(0u32.into());
        // A sender that went away gets no answer; the upload is dropped (and removed).
        return VolumeReply::Failed(upload.failure(e));
    }
    blocking(move || upload.commit(file).map(|()| VolumeReply::Done))
        .await
        .unwrap_or_else(VolumeReply::Failed)
}

/// Runs filesystem work on the blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, VolumeFailure> + Send + 'static,
) -> Result<T, VolumeFailure> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(VolumeFailure::new(FailureKind::Io, e.to_string())))
}

/// Writes the reply frame; false if the stream is gone.
async fn write_reply(tx: &mut quinn::SendStream, reply: &VolumeReply) -> bool {
    match protocol::encode(reply) {
        Ok(frame) => tx.write_all(&frame).await.is_ok(),
        Err(e) => {
            tracing::error!(error = %e, "cannot encode a volume reply");
            false
        }
    }
}
