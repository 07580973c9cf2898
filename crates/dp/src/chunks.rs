//! The DP's client of a chunk stream: a `Fetch` naming the revision, then
//! `Want` frames of chunk ids; the site answers each id with its chunk, in
//! the order asked. The transfer keeps a few such streams open for a whole
//! revision; validation opens one for the few chunks it repairs.

use bytes::Bytes;
use ferry_core::ChunkId;
use ferry_wire::pb::{self, reply, request, Code};
use ferry_wire::{read_frame, write_frame, WireError, MAX_BATCH_CHUNKS, MAX_REPLY_BYTES};

/// The asking half of a chunk stream.
pub(crate) struct Asker {
    send: quinn::SendStream,
}

/// The answering half: what the site sends, in the order asked.
pub(crate) struct Replies {
    recv: quinn::RecvStream,
}

/// A reply on a chunk stream.
pub(crate) enum Incoming {
    /// A chunk.
    Chunk { id: ChunkId, data: Bytes },
    /// Anything else, decoded (a refusal, most likely).
    Other(pb::Reply),
}

/// Opens a chunk stream for `revision` of `package` on `conn` (to a
/// source DP: with the site's `grant`).
pub(crate) async fn open(
    conn: &quinn::Connection,
    package: &str,
    revision: u32,
    grant: Option<pb::SignedGrant>,
) -> crate::error::Result<(Asker, Replies)> {
    let (mut send, recv) = conn.open_bi().await?;
    let req = pb::Request {
        kind: Some(request::Kind::Fetch(pb::Fetch {
            package: package.to_string(),
            revision,
            grant,
        })),
    };
    write_frame(&mut send, &req).await?;
    Ok((Asker { send }, Replies { recv }))
}

impl Asker {
    /// Asks for `ids`, in frames of at most [`MAX_BATCH_CHUNKS`].
    pub(crate) async fn want<'a>(
        &mut self,
        ids: impl IntoIterator<Item = &'a ChunkId>,
    ) -> Result<(), WireError> {
        let ids: Vec<Bytes> = ids
            .into_iter()
            .map(|id| Bytes::copy_from_slice(id.as_bytes()))
            .collect();
        for batch in ids.chunks(MAX_BATCH_CHUNKS) {
            let w = pb::Want {
                ids: batch.to_vec(),
                grant: None,
            };
            write_frame(&mut self.send, &w).await?;
        }
        Ok(())
    }

    /// Hands a source DP the site's newer grant for the stream's revision.
    pub(crate) async fn renew(&mut self, grant: pb::SignedGrant) -> Result<(), WireError> {
        let w = pb::Want {
            ids: Vec::new(),
            grant: Some(grant),
        };
        write_frame(&mut self.send, &w).await
    }

    /// Says nothing more will be asked.
    pub(crate) fn finish(mut self) {
        let _ = self.send.finish();
    }
}

impl Replies {
    /// The next reply, read into one buffer (a copy out of quinn's: hashing
    /// and writing one contiguous piece costs less than keeping the dozen
    /// packet-sized pieces a chunk arrives in). `None` at the stream's end.
    pub(crate) async fn next(&mut self) -> Result<Option<Incoming>, WireError> {
        Ok(
            match read_frame::<pb::Reply>(&mut self.recv, MAX_REPLY_BYTES).await? {
                None => None,
                Some(pb::Reply {
                    kind: Some(reply::Kind::Chunk(c)),
                }) => match ChunkId::from_slice(&c.id) {
                    Some(id) => Some(Incoming::Chunk { id, data: c.data }),
                    None => Some(Incoming::Other(pb::Reply::error(
                        Code::BadRequest,
                        "the site sent a chunk with a malformed id",
                    ))),
                },
                Some(other) => Some(Incoming::Other(other)),
            },
        )
    }
}
