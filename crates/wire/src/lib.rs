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

use ferry_core::manifest::SegmentRecord;
use ferry_core::{ChunkId, ChunkRef, FileHash, Manifest, SegmentKind};
use prost::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Types generated from `proto/ferry/v1/ferry.proto`.
#[allow(missing_docs, unreachable_pub, clippy::all)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/ferry.v1.rs"));
}

/// ALPN protocol id; a peer speaking anything else fails the handshake.
pub const ALPN: &[u8] = b"ferry/1";
/// Protocol version sent in [`pb::Watch`].
pub const PROTOCOL_VERSION: u32 = 1;
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
/// Most chunk ids one `GetChunks` may name.
pub const MAX_BATCH_CHUNKS: usize = 1024;
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
/// is allocated.
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
    // Grow with what arrives, so a peer announcing a large frame and
    // sending nothing holds no memory.
    let mut buf = Vec::with_capacity(len.min(64 << 10));
    let got = r.take(len as u64).read_to_end(&mut buf).await?;
    if got < len {
        return Err(WireError::Truncated { got, want: len });
    }
    M::decode(buf.as_slice())
        .map(Some)
        .map_err(|e| WireError::Malformed {
            what: std::any::type_name::<M>()
                .rsplit("::")
                .next()
                .unwrap_or("message"),
            detail: e.to_string(),
        })
}

/// Encodes `msg` into one frame and writes it.
pub async fn write_frame(
    w: &mut (impl AsyncWrite + Unpin),
    msg: &impl Message,
) -> Result<(), WireError> {
    let len = msg.encoded_len();
    let mut buf = Vec::with_capacity(4 + len);
    buf.extend_from_slice(&(len as u32).to_be_bytes());
    // Encoding into a Vec with enough capacity cannot fail.
    let _ = msg.encode(&mut buf);
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
                base_index: 0,
            })
            .collect(),
    }
}

/// Turns a full-form manifest body into compact form against `base`, the
/// chunk list of a revision the DP holds: every chunk found there is named by
/// its 1-based position instead of its 32-byte id.
pub fn compact(body: &mut pb::ManifestBody, base: &[ChunkId]) {
    let mut at: std::collections::HashMap<&[u8], u32> = std::collections::HashMap::new();
    for (i, id) in base.iter().enumerate() {
        at.entry(id.as_bytes().as_slice())
            .or_insert(u32::try_from(i + 1).unwrap_or(0));
    }
    for f in &mut body.files {
        for c in &mut f.chunks {
            if let Some(&i) = at.get(c.id.as_ref()).filter(|&&i| i > 0) {
                c.base_index = i;
                c.id = Default::default();
            }
        }
    }
}

/// Undoes [`compact`]: fills every `base_index` in from `base`. The result
/// encodes to the bytes the site signed.
pub fn expand(body: &mut pb::ManifestBody, base: &[ChunkId]) -> Result<(), WireError> {
    for f in &mut body.files {
        for c in &mut f.chunks {
            if c.base_index == 0 {
                continue;
            }
            let id = base
                .get(c.base_index as usize - 1)
                .ok_or_else(|| WireError::Malformed {
                    what: "ManifestBody",
                    detail: format!(
                        "{}: chunk {} of the base revision named, which has {}",
                        f.path,
                        c.base_index,
                        base.len()
                    ),
                })?;
            c.id = id.as_bytes().to_vec().into();
            c.base_index = 0;
        }
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
    use proptest::prelude::*;

    fn run<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn compact_manifests_expand_to_the_signed_bytes() {
        let id = |n: u8| ChunkId::of(&[n; 8]);
        let refs = |ids: &[u8]| -> Vec<pb::ChunkRef> {
            ids.iter()
                .map(|&n| pb::ChunkRef {
                    id: id(n).as_bytes().to_vec().into(),
                    len: 8,
                    base_index: 0,
                })
                .collect()
        };
        let full = pb::ManifestBody {
            package: "FRY00001".into(),
            revision: 2,
            name: "x".into(),
            files: vec![pb::FileManifest {
                path: "a.wim".into(),
                size: 32,
                hash: vec![0; 32].into(),
                chunks: refs(&[1, 9, 3, 1]),
            }],
        };
        let signed = full.encode_to_vec();
        let base: Vec<ChunkId> = [1, 2, 3].iter().map(|&n| id(n)).collect();
        let mut c = full.clone();
        compact(&mut c, &base);
        let idx: Vec<u32> = c.files[0].chunks.iter().map(|r| r.base_index).collect();
        assert_eq!(idx, [1, 0, 3, 1], "only the new chunk keeps its id");
        // Each of the three chunks named by position saves its 32-byte id.
        assert!(signed.len() - c.encode_to_vec().len() >= 3 * 30);
        expand(&mut c, &base).unwrap();
        assert_eq!(c.encode_to_vec(), signed);
        let mut bad = full.clone();
        compact(&mut bad, &base);
        let e = expand(&mut bad, &base[..1]).unwrap_err().to_string();
        assert!(e.contains("chunk 3 of the base revision"), "{e}");
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
