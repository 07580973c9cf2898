//! Ferry's site ↔ distribution point protocol.
//!
//! What it is: the message types generated from `proto/ferry/v1/ferry.proto`
//! ([`pb`]), the length-prefixed framing every stream uses
//! ([`read_frame`], [`write_frame`]), the protocol's stated limits, and the
//! conversion between a wire [`pb::FileManifest`] and a checked
//! [`ferry_core::Manifest`].
//!
//! What it is not: it opens no connection and knows nothing of TLS (that is
//! `ferry-net`), and it does not decide what to send (that is the site and
//! the DP agent).
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

use bytes::{BufMut, Bytes, BytesMut};
use ferry_core::manifest::SegmentRecord;
use ferry_core::{ChunkId, ChunkRef, FileHash, Manifest, SegmentKind};
use prost::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub mod prestage;

/// Types generated from `proto/ferry/v1/ferry.proto`.
#[allow(missing_docs, unreachable_pub, clippy::all)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/ferry.v1.rs"));
}

/// ALPN protocol id; a peer speaking anything else fails the handshake.
pub const ALPN: &[u8] = b"ferry/1";
/// Protocol version sent in [`pb::Watch`]. Version 2: long-lived fetch
/// streams (`Fetch` + `Want`) and run-length compact manifests.
pub const PROTOCOL_VERSION: u32 = 2;
/// QUIC application close code: the DP was revoked (its agent stops).
pub const CLOSE_REVOKED: u32 = 0x10;
/// QUIC application close code: the certificate is not accepted.
pub const CLOSE_NOT_ALLOWED: u32 = 0x11;
/// QUIC application close code: the site holds as many connections of
/// this kind as it may (enrollment), or this one outlived its deadline.
pub const CLOSE_BUSY: u32 = 0x12;
/// Largest frame a DP may send (requests, reports): a `GetChunks` of
/// [`MAX_BATCH_CHUNKS`] ids fits many times over.
pub const MAX_REQUEST_BYTES: usize = 1 << 20;
/// Largest frame on a connection without a DP certificate (enrollment).
pub const MAX_ENROLL_BYTES: usize = 16 << 10;
/// How long the site waits for a stream's request frame.
pub const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// How long a DP waits for each reply frame.
pub const REPLY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);
/// Largest frame the site may send (a manifest set; a chunk is far smaller).
pub const MAX_REPLY_BYTES: usize = 64 << 20;
/// Most chunk ids one `Want` may name.
pub const MAX_BATCH_CHUNKS: usize = 1024;
/// Most chunks a compact manifest may expand to: the full form must fit in
/// one reply frame (the site signs it whole), at 38 bytes per chunk. A
/// hostile run list cannot make the DP allocate more.
pub const MAX_EXPANDED_CHUNKS: usize = MAX_REPLY_BYTES / 38;
/// Most bidirectional streams a DP may have open at once on one connection;
/// QUIC flow control makes the peer wait for more.
pub const MAX_STREAMS: u32 = 32;
/// Size of an Ed25519 signature.
pub const SIGNATURE_BYTES: usize = 64;

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The frame announces more bytes than the limit for this direction.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    Oversized {
        /// Announced length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The stream ended inside a frame.
    #[error("stream ended inside a frame ({got} of {want} bytes)")]
    Truncated {
        /// Bytes read.
        got: usize,
        /// Bytes announced (4 for the length prefix itself).
        want: usize,
    },
    /// The frame is not a valid message of the expected type.
    #[error("malformed {what}: {detail}")]
    Malformed {
        /// The message type expected.
        what: &'static str,
        /// The decoder's message.
        detail: String,
    },
    /// Reading or writing the stream failed.
    #[error("stream failed: {0}")]
    Io(#[from] std::io::Error),
}

impl WireError {
    /// Whether a new attempt (a new stream or connection) can help: a failed
    /// stream yes, a peer sending garbage no.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Io(_) | Self::Truncated { .. })
    }
}

/// Reads exactly `buf.len()` bytes; `Ok(n < len)` when the stream ends first.
async fn read_full(r: &mut (impl AsyncRead + Unpin), buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        let n = r.read(&mut buf[got..]).await?;
        if n == 0 {
            break;
        }
        got += n;
    }
    Ok(got)
}

/// Reads one frame and decodes it as `M`. `Ok(None)` when the stream ended
/// cleanly between frames. A length above `max` is rejected before anything
/// is allocated, and the buffer grows with what arrives, so a peer
/// announcing a large frame and sending nothing holds no memory. The frame
/// is read into a [`Bytes`] buffer: the `bytes` fields of the decoded
/// message (chunk data) point into it instead of being copied.
pub async fn read_frame<M: Message + Default>(
    r: &mut (impl AsyncRead + Unpin),
    max: usize,
) -> Result<Option<M>, WireError> {
    let mut len = [0u8; 4];
    match read_full(r, &mut len).await? {
        0 => return Ok(None),
        4 => {}
        got => return Err(WireError::Truncated { got, want: 4 }),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(WireError::Oversized { len, max });
    }
    let mut buf = BytesMut::with_capacity(len.min(64 << 10));
    let mut rest = r.take(len as u64);
    while buf.len() < len {
        if buf.capacity() == buf.len() {
            // Double what arrived, up to what the frame still lacks.
            buf.reserve((len - buf.len()).min(buf.len().max(64 << 10)));
        }
        if rest.read_buf(&mut buf).await? == 0 {
            return Err(WireError::Truncated {
                got: buf.len(),
                want: len,
            });
        }
    }
    M::decode(buf.freeze())
        .map(Some)
        .map_err(|e| WireError::Malformed {
            what: std::any::type_name::<M>()
                .rsplit("::")
                .next()
                .unwrap_or("message"),
            detail: e.to_string(),
        })
}

/// One framed `Reply{chunk: Chunk{id, data}}`, built with a single copy of
/// `data` (the site answers from RocksDB's buffer straight into this).
pub fn chunk_frame(id: &ChunkId, data: &[u8]) -> Bytes {
    let mut b = BytesMut::new();
    put_chunk_frame(&mut b, id, data);
    b.freeze()
}

/// Appends one framed `Reply{chunk: Chunk{id, data}}` to `b`: several
/// frames in one buffer go to QUIC as one write.
pub fn put_chunk_frame(b: &mut BytesMut, id: &ChunkId, data: &[u8]) {
    use prost::encoding::{encode_key, encode_varint, encoded_len_varint, WireType};
    let id_field = 1 + encoded_len_varint(32) + 32;
    let data_field = 1 + encoded_len_varint(data.len() as u64) + data.len();
    let inner = id_field + data_field;
    let outer = 1 + encoded_len_varint(inner as u64) + inner;
    b.reserve(4 + outer);
    b.put_u32(outer as u32);
    encode_key(4, WireType::LengthDelimited, b);
    encode_varint(inner as u64, b);
    encode_key(1, WireType::LengthDelimited, b);
    encode_varint(32, b);
    b.put_slice(id.as_bytes());
    encode_key(2, WireType::LengthDelimited, b);
    encode_varint(data.len() as u64, b);
    b.put_slice(data);
}

/// Appends `msg` as one frame to `b`.
pub fn put_frame(b: &mut BytesMut, msg: &impl Message) {
    let len = msg.encoded_len();
    b.reserve(4 + len);
    b.put_u32(len as u32);
    // Encoding into a buffer with enough room cannot fail.
    let _ = msg.encode(b);
}

/// Encodes `msg` into one frame and writes it.
pub async fn write_frame(
    w: &mut (impl AsyncWrite + Unpin),
    msg: &impl Message,
) -> Result<(), WireError> {
    let mut buf = BytesMut::new();
    put_frame(&mut buf, msg);
    w.write_all(&buf).await?;
    Ok(())
}

impl pb::Reply {
    /// An error reply.
    pub fn error(code: pb::Code, message: impl Into<String>) -> Self {
        Self {
            kind: Some(pb::reply::Kind::Error(pb::Error {
                code: code as i32,
                message: message.into(),
            })),
        }
    }
}

/// A file manifest as the protocol sends it (no segments: the DP only needs
/// the chunk list).
pub fn file_to_wire(m: &Manifest) -> pb::FileManifest {
    pb::FileManifest {
        path: m.path.clone(),
        size: m.size,
        hash: m.hash.as_bytes().to_vec().into(),
        chunks: m
            .chunks
            .iter()
            .map(|c| pb::ChunkRef {
                id: c.id.as_bytes().to_vec().into(),
                len: c.len,
            })
            .collect(),
        runs: Vec::new(),
    }
}

/// Turns a full-form manifest body into compact form against `base`, the
/// chunk list of a revision the DP holds: chunks found there are named in
/// runs of consecutive base positions (see `FileManifest.runs` in the
/// proto), so a revision that moved whole resources around costs a triple
/// per run. A file with no chunk of the base keeps its full form.
pub fn compact(body: &mut pb::ManifestBody, base: &[ChunkId]) {
    let mut at: std::collections::HashMap<&[u8], u32> = std::collections::HashMap::new();
    for (i, id) in base.iter().enumerate() {
        if let Ok(i) = u32::try_from(i) {
            at.entry(id.as_bytes().as_slice()).or_insert(i);
        }
    }
    for f in &mut body.files {
        let mut runs: Vec<u32> = Vec::new();
        let mut fresh: Vec<pb::ChunkRef> = Vec::new();
        // The triple being built: (start, count, fresh).
        let mut cur: Option<(u32, u32, u32)> = None;
        let mut from_base = 0usize;
        for c in f.chunks.drain(..) {
            if let Some((start, count, 0)) = cur.as_mut() {
                let next = (*start + *count) as usize;
                if base
                    .get(next)
                    .is_some_and(|b| b.as_bytes().as_slice() == c.id.as_ref())
                {
                    *count += 1;
                    from_base += 1;
                    continue;
                }
            }
            match at.get(c.id.as_ref()) {
                Some(&p) => {
                    if let Some((a, b, c)) = cur.take() {
                        runs.extend([a, b, c]);
                    }
                    cur = Some((p, 1, 0));
                    from_base += 1;
                }
                None => {
                    let t = cur.get_or_insert((0, 0, 0));
                    t.2 += 1;
                    fresh.push(c);
                }
            }
        }
        if let Some((a, b, c)) = cur {
            runs.extend([a, b, c]);
        }
        if from_base == 0 {
            f.chunks = fresh;
        } else {
            f.chunks = fresh;
            f.runs = runs;
        }
    }
}

/// Undoes [`compact`]: rebuilds each file's full chunk list from its runs
/// and `base`. The result encodes to the bytes the site signed.
pub fn expand(body: &mut pb::ManifestBody, base: &[ChunkRef]) -> Result<(), WireError> {
    expand_at_most(body, base, MAX_EXPANDED_CHUNKS)
}

fn expand_at_most(
    body: &mut pb::ManifestBody,
    base: &[ChunkRef],
    max_chunks: usize,
) -> Result<(), WireError> {
    let mut total = 0usize;
    for f in &mut body.files {
        let bad = |detail: String| WireError::Malformed {
            what: "ManifestBody",
            detail: format!("{}: {detail}", f.path),
        };
        if f.runs.is_empty() {
            total += f.chunks.len();
            continue;
        }
        if f.runs.len() % 3 != 0 {
            return Err(bad("the run list is not made of triples".into()));
        }
        let mut fresh = std::mem::take(&mut f.chunks).into_iter();
        let mut out = Vec::new();
        for t in f.runs.chunks_exact(3) {
            let (start, count, new) = (t[0] as usize, t[1] as usize, t[2] as usize);
            total = total.saturating_add(count).saturating_add(new);
            if total > max_chunks {
                return Err(bad(format!("expands to more than {max_chunks} chunks")));
            }
            let run = base
                .get(start..start.saturating_add(count))
                .ok_or_else(|| {
                    bad(format!(
                        "chunks {start}..{} of the base revision named, which has {}",
                        start.saturating_add(count),
                        base.len()
                    ))
                })?;
            out.extend(run.iter().map(|c| pb::ChunkRef {
                id: Bytes::copy_from_slice(c.id.as_bytes()),
                len: c.len,
            }));
            for _ in 0..new {
                out.push(
                    fresh
                        .next()
                        .ok_or_else(|| bad("the runs name more new chunks than it lists".into()))?,
                );
            }
        }
        if fresh.next().is_some() {
            return Err(bad("it lists new chunks no run uses".into()));
        }
        f.chunks = out;
        f.runs.clear();
    }
    Ok(())
}

/// Checks a received file manifest (ids and hash 32 bytes, a safe relative
/// path, chunks adding up to the size) and turns it into a [`Manifest`] with
/// one data segment.
pub fn file_from_wire(f: &pb::FileManifest) -> Result<Manifest, WireError> {
    let bad = |detail: String| WireError::Malformed {
        what: "FileManifest",
        detail,
    };
    let hash = FileHash::from_slice(&f.hash)
        .ok_or_else(|| bad(format!("{}: file hash is not 32 bytes", f.path)))?;
    let chunks = f
        .chunks
        .iter()
        .map(|c| {
            ChunkId::from_slice(&c.id)
                .map(|id| ChunkRef { id, len: c.len })
                .ok_or_else(|| bad(format!("{}: a chunk id is not 32 bytes", f.path)))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let segments = if f.size == 0 {
        Vec::new()
    } else {
        vec![SegmentRecord {
            kind: SegmentKind::Data,
            offset: 0,
            len: f.size,
            first_chunk: 0,
            chunk_count: u32::try_from(chunks.len())
                .map_err(|_| bad(format!("{}: too many chunks", f.path)))?,
            fingerprint: None,
        }]
    };
    let m = Manifest {
        path: f.path.clone(),
        size: f.size,
        hash,
        chunks,
        segments,
    };
    m.validate().map_err(|e| bad(e.to_string()))?;
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_core::chunker::MAX_CHUNK_BYTES;
    use proptest::prelude::*;

    fn run<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    fn body(files: Vec<Vec<u16>>) -> pb::ManifestBody {
        pb::ManifestBody {
            package: "FRY00001".into(),
            revision: 2,
            name: "x".into(),
            files: files
                .into_iter()
                .enumerate()
                .map(|(i, ids)| pb::FileManifest {
                    path: format!("f{i}.wim"),
                    size: 8 * ids.len() as u64,
                    hash: vec![0; 32].into(),
                    chunks: ids
                        .iter()
                        .map(|&n| pb::ChunkRef {
                            id: id16(n).as_bytes().to_vec().into(),
                            len: 8,
                        })
                        .collect(),
                    runs: vec![],
                })
                .collect(),
        }
    }

    fn id16(n: u16) -> ChunkId {
        ChunkId::of(&n.to_le_bytes())
    }

    fn refs(ids: impl IntoIterator<Item = u16>) -> Vec<ChunkRef> {
        ids.into_iter()
            .map(|n| ChunkRef {
                id: id16(n),
                len: 8,
            })
            .collect()
    }

    #[test]
    fn compact_manifests_expand_to_the_signed_bytes() {
        // The new revision keeps 0..1000 of the base, with two resources
        // swapped (rebuilt), a new chunk inserted, and a file of its own.
        let base = refs(0..1000);
        let mut order: Vec<u16> = (0..1000).collect();
        order[100..200].rotate_left(50);
        order.insert(500, 5000);
        let full = body(vec![order, vec![7000, 7001]]);
        let signed = full.encode_to_vec();
        let ids: Vec<ChunkId> = base.iter().map(|c| c.id).collect();
        let mut c = full.clone();
        compact(&mut c, &ids);
        assert_eq!(
            c.files[0].chunks.len(),
            1,
            "only the new chunk keeps its id"
        );
        assert_eq!(
            c.files[0].runs,
            [0, 100, 0, 150, 50, 0, 100, 50, 0, 200, 300, 1, 500, 500, 0]
        );
        assert!(c.files[1].runs.is_empty(), "nothing of the base: full form");
        let small = c.encode_to_vec().len();
        assert!(
            small < 400,
            "{small} bytes for 1003 chunks (full form: {})",
            signed.len()
        );
        expand(&mut c, &base).unwrap();
        assert_eq!(c.encode_to_vec(), signed);

        // Runs past the base, uneven triples, and new chunks left over or
        // missing are refused, not trusted.
        let mut bad = full.clone();
        compact(&mut bad, &ids);
        let e = expand(&mut bad.clone(), &base[..10])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("of the base revision named, which has 10"),
            "{e}"
        );
        let mut odd = bad.clone();
        odd.files[0].runs.pop();
        assert!(expand(&mut odd, &base).is_err());
        let mut extra = bad.clone();
        let first = extra.files[0].chunks[0].clone();
        extra.files[0].chunks.push(first);
        assert!(expand(&mut extra, &base)
            .unwrap_err()
            .to_string()
            .contains("no run uses"));
        let mut short = bad.clone();
        short.files[0].chunks.clear();
        assert!(expand(&mut short, &base).is_err());
        let mut huge = bad;
        huge.files[0].runs = [0u32, 1000, 0].repeat(6);
        let e = expand_at_most(&mut huge, &base, 5000).unwrap_err();
        assert!(e.to_string().contains("more than 5000"), "{e}");
    }

    #[test]
    fn chunk_frames_decode_as_replies_without_copying() {
        run(async {
            for len in [
                0usize,
                1,
                127,
                128,
                16_383,
                16_384,
                MAX_CHUNK_BYTES,
                300_000,
            ] {
                let data: Vec<u8> = (0..len).map(|i| i as u8).collect();
                let id = ChunkId::of(&data);
                let frame = chunk_frame(&id, &data);
                let want = pb::Reply {
                    kind: Some(pb::reply::Kind::Chunk(pb::Chunk {
                        id: id.as_bytes().to_vec().into(),
                        data: data.clone().into(),
                    })),
                };
                let mut via_prost = Vec::new();
                write_frame(&mut via_prost, &want).await.unwrap();
                if len > 0 {
                    // (prost leaves an empty field out; both decode alike)
                    assert_eq!(frame.as_ref(), via_prost.as_slice(), "len {len}");
                }
                let got: pb::Reply = read_frame(&mut frame.as_ref(), MAX_REPLY_BYTES)
                    .await
                    .unwrap()
                    .unwrap();
                assert_eq!(got, want);
                // Read in packet-sized pieces (the buffer grows as they
                // arrive): the same reply.
                let got: pb::Reply = read_frame(&mut Pieces(frame.as_ref()), MAX_REPLY_BYTES)
                    .await
                    .unwrap()
                    .unwrap();
                assert_eq!(got, want, "len {len}");
                // A frame cut short is an error.
                let cut = &frame[..frame.len() - 1];
                let r: Result<Option<pb::Reply>, _> =
                    read_frame(&mut Pieces(cut), MAX_REPLY_BYTES).await;
                assert!(matches!(r, Err(WireError::Truncated { .. })), "{r:?}");
            }
        });
    }

    /// A reader handing out at most 1,452 bytes a read, as a QUIC stream
    /// does packet by packet.
    struct Pieces<'a>(&'a [u8]);

    impl tokio::io::AsyncRead for Pieces<'_> {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            let n = self.0.len().min(buf.remaining()).min(1_452);
            buf.put_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[test]
    fn frames_round_trip_and_end_cleanly() {
        run(async {
            let msg = pb::Request {
                kind: Some(pb::request::Kind::GetManifest(pb::GetManifest {
                    package: "FRY00001".into(),
                    revision: 2,
                    base_revision: 1,
                })),
            };
            let mut buf = Vec::new();
            write_frame(&mut buf, &msg).await.unwrap();
            write_frame(&mut buf, &msg).await.unwrap();
            let mut r = buf.as_slice();
            for _ in 0..2 {
                let got: pb::Request = read_frame(&mut r, MAX_REQUEST_BYTES)
                    .await
                    .unwrap()
                    .unwrap();
                assert_eq!(got, msg);
            }
            let end: Option<pb::Request> = read_frame(&mut r, MAX_REQUEST_BYTES).await.unwrap();
            assert!(end.is_none());
        });
    }

    #[test]
    fn oversized_truncated_and_garbage_frames_are_errors() {
        run(async {
            let mut big = (u32::MAX).to_be_bytes().to_vec();
            big.extend([0u8; 16]);
            let r: Result<Option<pb::Request>, _> =
                read_frame(&mut big.as_slice(), MAX_REQUEST_BYTES).await;
            assert!(matches!(r, Err(WireError::Oversized { .. })), "{r:?}");

            let short = [0u8, 0, 0, 10, 1, 2];
            let r: Result<Option<pb::Request>, _> =
                read_frame(&mut short.as_slice(), MAX_REQUEST_BYTES).await;
            assert!(matches!(r, Err(WireError::Truncated { got: 2, want: 10 })));

            let half_len = [0u8, 0];
            let r: Result<Option<pb::Request>, _> =
                read_frame(&mut half_len.as_slice(), MAX_REQUEST_BYTES).await;
            assert!(matches!(r, Err(WireError::Truncated { got: 2, want: 4 })));

            let garbage = [0u8, 0, 0, 3, 0xFF, 0xFF, 0xFF];
            let r: Result<Option<pb::Request>, _> =
                read_frame(&mut garbage.as_slice(), MAX_REQUEST_BYTES).await;
            assert!(matches!(r, Err(WireError::Malformed { .. })), "{r:?}");
        });
    }

    #[test]
    fn manifests_with_bad_ids_or_paths_are_refused() {
        let data = b"hello world";
        let m = Manifest {
            path: "a/b.wim".into(),
            size: data.len() as u64,
            hash: FileHash::of(data),
            chunks: vec![ChunkRef {
                id: ChunkId::of(data),
                len: data.len() as u32,
            }],
            segments: vec![],
        };
        let w = file_to_wire(&m);
        let back = file_from_wire(&w).unwrap();
        assert_eq!(back.chunks, m.chunks);
        assert_eq!(back.hash, m.hash);

        let mut evil = w.clone();
        evil.path = "../../etc/passwd".into();
        assert!(file_from_wire(&evil).is_err());
        let mut short = w.clone();
        short.chunks[0].id = vec![1, 2, 3].into();
        assert!(file_from_wire(&short).is_err());
        let mut wrong = w;
        wrong.size += 1;
        assert!(file_from_wire(&wrong).is_err());
    }

    proptest! {
        #[test]
        fn any_bytes_decode_to_a_value_or_an_error(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            run(async {
                let _ = read_frame::<pb::Reply>(&mut bytes.as_slice(), MAX_REPLY_BYTES).await;
                let _ = read_frame::<pb::Request>(&mut bytes.as_slice(), MAX_REQUEST_BYTES).await;
            });
        }
    }
}
