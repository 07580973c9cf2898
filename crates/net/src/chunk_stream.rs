//! The sending half of a chunk stream, as the site and a source DP serve
//! it: `Want` frames in, one reply frame per id out, in order. Chunks are
//! read ahead on a blocking thread (straight from where they are kept into
//! the frame) while earlier ones are on the wire, packed into buffers of
//! about [`FRAME_BATCH_BYTES`], and held to the receiver's [`Pacer`].

use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{Bytes, BytesMut};
use ferry_core::ChunkId;
use ferry_wire::pb::{self, Code};
use ferry_wire::{put_frame, read_frame, WireError, MAX_BATCH_CHUNKS, MAX_REQUEST_BYTES};
use tracing::warn;

use crate::pace::Pacer;

/// Buffers of frames read ahead of the wire per stream.
const READ_AHEAD: usize = 16;
/// Bytes of frames packed into one buffer before it is handed on.
pub const FRAME_BATCH_BYTES: usize = 64 << 10;

/// Where a stream's chunks come from.
pub trait ChunkSource: Send + 'static {
    /// Appends the reply to `id` to `out`: its chunk frame, or an error
    /// reply ([`pb::Reply::error`]) saying why not. Returns the chunk's
    /// bytes (0 for an error). Runs on a blocking thread.
    fn put(&mut self, id: &ChunkId, out: &mut BytesMut) -> u64;
}

/// Answers `id` with a refusal: it is not in the stream's revision (what
/// a sender serves is scoped to it). Logged.
pub fn put_not_in_revision(out: &mut BytesMut, id: &ChunkId, package: &str, revision: u32) {
    warn!(chunk = %id, %package, revision, "chunk refused: not in the stream's revision");
    put_frame(
        out,
        &pb::Reply::error(
            Code::NotAllowed,
            format!("chunk {id} is not in {package} revision {revision}"),
        ),
    );
}

/// What the receiver's half of a stream asked for.
enum Want {
    /// Chunks to send, in order.
    Ids(Vec<ChunkId>),
    /// A bad request: answer this error after what came before, then stop.
    Refuse(String),
}

/// Serves one chunk stream until the receiver finishes its half and every
/// id is answered, or the stream breaks. `on_want` sees every `Want`
/// first (a source DP takes a renewed grant from it); an error it returns
/// is answered in order, and ends the stream. Chunk bytes are added to
/// `served` as they are handed to QUIC.
pub async fn serve(
    source: impl ChunkSource,
    send: &mut quinn::SendStream,
    mut recv: quinn::RecvStream,
    pacer: &Pacer,
    served: &AtomicU64,
    mut on_want: impl FnMut(&pb::Want) -> Result<(), String> + Send,
) -> Result<(), WireError> {
    let (want_tx, mut want_rx) = tokio::sync::mpsc::channel::<Want>(64);
    let (frame_tx, mut frame_rx) = tokio::sync::mpsc::channel::<(Bytes, u64)>(READ_AHEAD);
    let mut source = source;
    let reader = tokio::task::spawn_blocking(move || {
        let mut batch = BytesMut::new();
        let mut data_bytes = 0u64;
        let send = |batch: &mut BytesMut, n: &mut u64| {
            let out = (batch.split().freeze(), std::mem::take(n));
            frame_tx.blocking_send(out).is_ok()
        };
        while let Some(want) = want_rx.blocking_recv() {
            let ids = match want {
                Want::Ids(ids) => ids,
                Want::Refuse(msg) => {
                    put_frame(&mut batch, &pb::Reply::error(Code::BadRequest, msg));
                    let _ = send(&mut batch, &mut data_bytes);
                    return;
                }
            };
            for id in ids {
                data_bytes += source.put(&id, &mut batch);
                if batch.len() >= FRAME_BATCH_BYTES && !send(&mut batch, &mut data_bytes) {
                    return;
                }
            }
            if !batch.is_empty() && !send(&mut batch, &mut data_bytes) {
                return;
            }
        }
    });
    // The receiver's half: `Want` frames until it finishes. A bad one is
    // answered in order, after what was asked before it.
    let wants = async move {
        loop {
            let refuse = match read_frame::<pb::Want>(&mut recv, MAX_REQUEST_BYTES).await {
                Ok(Some(w)) if w.ids.len() > MAX_BATCH_CHUNKS => format!(
                    "{} chunk ids in one request; the limit is {MAX_BATCH_CHUNKS}",
                    w.ids.len()
                ),
                Ok(Some(w)) => match on_want(&w) {
                    Err(why) => why,
                    Ok(()) => {
                        let ids: Option<Vec<ChunkId>> =
                            w.ids.iter().map(|raw| ChunkId::from_slice(raw)).collect();
                        match ids {
                            Some(ids) if ids.is_empty() => continue,
                            Some(ids) => {
                                if want_tx.send(Want::Ids(ids)).await.is_err() {
                                    return;
                                }
                                continue;
                            }
                            None => "a chunk id is not 32 bytes".to_string(),
                        }
                    }
                },
                Ok(None) => return,
                Err(e) if e.is_retryable() => return,
                Err(e) => e.to_string(),
            };
            warn!(error = %refuse, "bad request on a chunk stream");
            let _ = want_tx.send(Want::Refuse(refuse)).await;
            return;
        }
    };
    let frames = async {
        while let Some((frame, n)) = frame_rx.recv().await {
            pacer.take(frame.len()).await;
            send.write_chunk(frame)
                .await
                .map_err(|e| WireError::Io(e.into()))?;
            // Counted as handed to QUIC.
            served.fetch_add(n, Ordering::Relaxed);
        }
        Ok::<(), WireError>(())
    };
    tokio::pin!(wants);
    tokio::pin!(frames);
    let result = tokio::select! {
        r = &mut frames => r,
        () = &mut wants => (&mut frames).await,
    };
    reader.abort();
    result
}
