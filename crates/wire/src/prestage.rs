//! Prestage bundles: a revision's signed manifest and the chunks a DP
//! lacks, in one file an operator carries to a DP that should not (or
//! cannot) get them over its link.
//!
//! Layout: [`MAGIC`], then frames of a one-byte tag and a 4-byte
//! big-endian length — `H` a [`pb::PrestageHeader`], `C` a [`pb::Chunk`]
//! per chunk, `E` a [`pb::PrestageEnd`] that counts the chunks and carries
//! the BLAKE3 of every byte before it. A reader checks each chunk against
//! its id as it comes and the end frame last, so a truncated, cut or
//! altered bundle is refused; the manifest's signature is checked by
//! whoever trusts the site's key.

use std::io::{Read, Write};

use ferry_core::ChunkId;
use prost::Message;

use crate::pb;

/// The first bytes of every bundle.
pub const MAGIC: &[u8; 16] = b"FERRY-PRESTAGE-1";

/// The largest frame a reader takes (a header with a large manifest, or a
/// chunk).
pub const MAX_FRAME_BYTES: usize = crate::MAX_REPLY_BYTES;

const HEADER: u8 = b'H';
const CHUNK: u8 = b'C';
const END: u8 = b'E';

/// Why a bundle is refused.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// Reading or writing the file failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The file does not start as a bundle does.
    #[error("not a Ferry prestage bundle (it does not start with {:?})", std::str::from_utf8(MAGIC).unwrap_or_default())]
    NotABundle,
    /// The file ends before its end frame.
    #[error("the bundle is cut short after {at} bytes: copy it again")]
    Truncated {
        /// Bytes read.
        at: u64,
    },
    /// A frame that is not what the layout allows there.
    #[error("the bundle is damaged at byte {at}: {what}")]
    Malformed {
        /// Where.
        at: u64,
        /// What is wrong.
        what: String,
    },
    /// A chunk whose bytes do not hash to its id.
    #[error("chunk {id} in the bundle does not match its id: the bundle was altered or damaged")]
    ChunkMismatch {
        /// The id it claims.
        id: String,
    },
    /// The end frame does not match what came before.
    #[error("the bundle's end does not match its contents ({0}): it was altered or damaged")]
    End(String),
}

/// Writes a bundle: the header, then each chunk, then [`BundleWriter::finish`].
#[derive(Debug)]
pub struct BundleWriter<W: Write> {
    w: W,
    hasher: blake3::Hasher,
    chunks: u64,
}

impl<W: Write> BundleWriter<W> {
    /// Starts a bundle with `header` (its `chunks` is the count to come).
    pub fn new(mut w: W, header: &pb::PrestageHeader) -> Result<Self, BundleError> {
        let mut hasher = blake3::Hasher::new();
        w.write_all(MAGIC)?;
        hasher.update(MAGIC);
        let mut me = Self {
            w,
            hasher,
            chunks: 0,
        };
        me.frame(HEADER, &header.encode_to_vec())?;
        Ok(me)
    }

    fn frame(&mut self, tag: u8, body: &[u8]) -> Result<(), BundleError> {
        let len = u32::try_from(body.len()).map_err(|_| BundleError::Malformed {
            at: 0,
            what: format!("a frame of {} bytes", body.len()),
        })?;
        let mut head = [0u8; 5];
        head[0] = tag;
        head[1..].copy_from_slice(&len.to_be_bytes());
        self.w.write_all(&head)?;
        self.w.write_all(body)?;
        self.hasher.update(&head);
        self.hasher.update(body);
        Ok(())
    }

    /// Adds one chunk.
    pub fn chunk(&mut self, id: &ChunkId, data: &[u8]) -> Result<(), BundleError> {
        let c = pb::Chunk {
            id: id.as_bytes().to_vec().into(),
            data: data.to_vec().into(),
        };
        self.chunks += 1;
        self.frame(CHUNK, &c.encode_to_vec())
    }

    /// Ends the bundle; returns the writer.
    pub fn finish(mut self) -> Result<W, BundleError> {
        let end = pb::PrestageEnd {
            chunks: self.chunks,
            digest: self.hasher.finalize().as_bytes().to_vec().into(),
        };
        let body = end.encode_to_vec();
        let mut head = [0u8; 5];
        head[0] = END;
        head[1..].copy_from_slice(&(body.len() as u32).to_be_bytes());
        self.w.write_all(&head)?;
        self.w.write_all(&body)?;
        self.w.flush()?;
        Ok(self.w)
    }
}

/// Reads a bundle: [`BundleReader::open`] gives the header, then
/// [`BundleReader::next_chunk`] each chunk (checked) until `None`, which
/// comes only after the end frame checked out.
#[derive(Debug)]
pub struct BundleReader<R: Read> {
    r: R,
    hasher: blake3::Hasher,
    at: u64,
    chunks: u64,
    expected: u64,
    ended: bool,
}

impl<R: Read> BundleReader<R> {
    /// Reads the magic and the header.
    pub fn open(mut r: R) -> Result<(Self, pb::PrestageHeader), BundleError> {
        let mut magic = [0u8; 16];
        match r.read_exact(&mut magic) {
            Ok(()) if &magic == MAGIC => {}
            Ok(()) => return Err(BundleError::NotABundle),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(BundleError::NotABundle)
            }
            Err(e) => return Err(e.into()),
        }
        let mut hasher = blake3::Hasher::new();
        hasher.update(MAGIC);
        let mut me = Self {
            r,
            hasher,
            at: 16,
            chunks: 0,
            expected: 0,
            ended: false,
        };
        let (tag, body) = me.frame()?;
        if tag != HEADER {
            return Err(me.malformed("the header is missing"));
        }
        let header = pb::PrestageHeader::decode(body.as_slice())
            .map_err(|e| me.malformed(format!("the header does not decode: {e}")))?;
        me.expected = header.chunks;
        Ok((me, header))
    }

    fn malformed(&self, what: impl Into<String>) -> BundleError {
        BundleError::Malformed {
            at: self.at,
            what: what.into(),
        }
    }

    fn read(&mut self, buf: &mut [u8]) -> Result<(), BundleError> {
        match self.r.read_exact(buf) {
            Ok(()) => {
                self.at += buf.len() as u64;
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                Err(BundleError::Truncated { at: self.at })
            }
            Err(e) => Err(e.into()),
        }
    }

    /// One frame; everything but the end frame is hashed.
    fn frame(&mut self) -> Result<(u8, Vec<u8>), BundleError> {
        let mut head = [0u8; 5];
        self.read(&mut head)?;
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        if len > MAX_FRAME_BYTES {
            return Err(self.malformed(format!(
                "a frame of {len} bytes, above the limit of {MAX_FRAME_BYTES}"
            )));
        }
        let mut body = vec![0u8; len];
        self.read(&mut body)?;
        if head[0] != END {
            self.hasher.update(&head);
            self.hasher.update(&body);
        }
        Ok((head[0], body))
    }

    /// The next chunk, its bytes checked against its id; `None` once the
    /// end frame checked out.
    pub fn next_chunk(&mut self) -> Result<Option<(ChunkId, Vec<u8>)>, BundleError> {
        if self.ended {
            return Ok(None);
        }
        let digest = self.hasher.clone().finalize();
        let (tag, body) = self.frame()?;
        match tag {
            CHUNK => {
                let c = pb::Chunk::decode(body.as_slice())
                    .map_err(|e| self.malformed(format!("a chunk does not decode: {e}")))?;
                let id = ChunkId::from_slice(&c.id)
                    .ok_or_else(|| self.malformed("a chunk id is not 32 bytes"))?;
                if ChunkId::of(&c.data) != id {
                    return Err(BundleError::ChunkMismatch { id: id.to_hex() });
                }
                self.chunks += 1;
                Ok(Some((id, c.data.to_vec())))
            }
            END => {
                let end = pb::PrestageEnd::decode(body.as_slice())
                    .map_err(|e| self.malformed(format!("the end does not decode: {e}")))?;
                if end.chunks != self.chunks || self.chunks != self.expected {
                    return Err(BundleError::End(format!(
                        "{} chunks read, the header says {}, the end {}",
                        self.chunks, self.expected, end.chunks
                    )));
                }
                if end.digest.as_ref() != digest.as_bytes() {
                    return Err(BundleError::End("the digest differs".into()));
                }
                self.ended = true;
                Ok(None)
            }
            other => Err(self.malformed(format!("a frame tagged {other:#04x}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(chunks: u64) -> pb::PrestageHeader {
        pb::PrestageHeader {
            site_code: "FRY".into(),
            dp: "dp1".into(),
            package: "FRY00001".into(),
            revision: 2,
            manifest: Some(pb::SignedManifest {
                body: vec![1, 2, 3].into(),
                signature: vec![9; 64].into(),
                base_revision: 0,
            }),
            chunks,
            full: false,
            base_revision: 1,
        }
    }

    fn bundle(parts: &[&[u8]]) -> Vec<u8> {
        let mut w = BundleWriter::new(Vec::new(), &header(parts.len() as u64)).unwrap();
        for p in parts {
            w.chunk(&ChunkId::of(p), p).unwrap();
        }
        w.finish().unwrap()
    }

    fn read_all(bytes: &[u8]) -> Result<(pb::PrestageHeader, Vec<Vec<u8>>), BundleError> {
        let (mut r, h) = BundleReader::open(bytes)?;
        let mut out = Vec::new();
        while let Some((id, data)) = r.next_chunk()? {
            assert_eq!(ChunkId::of(&data), id);
            out.push(data);
        }
        Ok((h, out))
    }

    #[test]
    fn a_bundle_reads_back_whole() {
        let b = bundle(&[b"one", b"two", b"three"]);
        let (h, chunks) = read_all(&b).unwrap();
        assert_eq!(h, header(3));
        assert_eq!(
            chunks,
            vec![b"one".to_vec(), b"two".to_vec(), b"three".to_vec()]
        );
    }

    #[test]
    fn cut_altered_and_foreign_bundles_are_refused() {
        let b = bundle(&[b"one", b"two", b"three"]);
        // Cut anywhere: refused, never read as complete.
        for cut in [0, 10, 16, 20, b.len() / 2, b.len() - 1] {
            let e = read_all(&b[..cut]).unwrap_err();
            assert!(
                matches!(e, BundleError::Truncated { .. } | BundleError::NotABundle),
                "cut at {cut}: {e}"
            );
        }
        // A flipped byte in a chunk's data.
        let mut bad = b.clone();
        let at = bad.windows(5).position(|w| w == b"three").unwrap();
        bad[at] ^= 1;
        assert!(matches!(
            read_all(&bad).unwrap_err(),
            BundleError::ChunkMismatch { .. }
        ));
        // Fewer chunks than the header says.
        let mut w = BundleWriter::new(Vec::new(), &header(3)).unwrap();
        for p in [&b"one"[..], b"two"] {
            w.chunk(&ChunkId::of(p), p).unwrap();
        }
        let short = w.finish().unwrap();
        assert!(matches!(read_all(&short).unwrap_err(), BundleError::End(_)));
        // A byte of the header changed (the signature: no chunk covers
        // it): the end's digest gives it away.
        let mut bad = b.clone();
        let at = bad
            .windows(64)
            .position(|w| w.iter().all(|&x| x == 9))
            .unwrap();
        bad[at + 10] ^= 1;
        let e = read_all(&bad).unwrap_err();
        assert!(e.to_string().contains("digest"), "{e}");
        // Another file altogether.
        assert!(matches!(
            read_all(b"MZ\x90\x00 not a bundle at all").unwrap_err(),
            BundleError::NotABundle
        ));
        // An oversized frame is refused before it is read.
        let mut huge = MAGIC.to_vec();
        huge.push(b'H');
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        let e = read_all(&huge).unwrap_err();
        assert!(e.to_string().contains("above the limit"), "{e}");
    }
}
