//! Attempts' output, read or followed from the runtime and streamed to the coordinator on
//! the command's own stream as log chunks.

use gantry_shared::protocol::{self, CommandReply, Refusal, RefusalCode};
use gantry_shared::{ContainerId, Generation, Owner};

use crate::runtime::{Runtime, Stream};

/// Whether this attempt's output can be served: the reply, and what to stream after it.
pub(super) fn logs(
    runtime: &Runtime,
    owner: &Owner,
    generation: Generation,
    follow: bool,
) -> (CommandReply, Option<(ContainerId, bool)>) {
    match owner
        .container_id(generation)
        .filter(|id| runtime.status(id).is_ok())
    {
        Some(id) => (CommandReply::Accepted, Some((id, follow))),
        None => (
            CommandReply::Refused(Refusal::new(
                RefusalCode::Unavailable,
                format!("no output of {owner} generation {generation} is kept on this node"),
            )),
            None,
        ),
    }
}

/// Writes the attempt's output as log chunks: what is retained, and with `follow`
/// everything until the container has exited.
pub(super) async fn stream(
    runtime: &Runtime,
    tx: &mut quinn::SendStream,
    id: &ContainerId,
    follow: bool,
) {
    let (chunks_tx, mut chunks) = tokio::sync::mpsc::channel::<(u8, Vec<u8>)>(64);
    for (stream, tag) in [
        (Stream::Stdout, protocol::LOG_STDOUT),
        (Stream::Stderr, protocol::LOG_STDERR),
    ] {
        let (rt, id, sender) = (runtime.clone(), id.clone(), chunks_tx.clone());
        tokio::spawn(async move {
            if follow {
                // Bounded channel: a slow reader makes the follower wait.
                let _ = rt
                    .follow(&id, stream, |b| {
                        let sender = sender.clone();
                        async move { sender.send((tag, b)).await.is_ok() }
                    })
                    .await;
            } else if let Ok(bytes) = rt.logs(&id, stream) {
                let _ = sender.send((tag, bytes)).await;
            }
        });
    }
    drop(chunks_tx);
    while let Some((tag, bytes)) = chunks.recv().await {
        for part in bytes.chunks(protocol::MAX_FRAME) {
            if tx.write_all(&protocol::log_chunk(tag, part)).await.is_err() {
                return; // the reader went away
            }
        }
    }
}
