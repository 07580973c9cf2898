//! Manifests: how to rebuild one file from chunks.
//!
//! A manifest lists a file's chunks in order with their lengths, the file's
//! size and whole-file BLAKE3, and the segments the chunks were cut from.
//! Rebuilding the file is concatenating the chunks; the whole-file hash
//! proves the result. Manifests are stored and sent as [`Manifest::encode`]
//! bytes, so a signature over those bytes covers exactly what is used.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::segment::SegmentKind;
use crate::{ChunkId, FileHash};

/// First byte of every encoded manifest; bumped when the layout changes.
pub const MANIFEST_FORMAT: u8 = 1;
/// Largest encoded manifest accepted (a 64 GiB file at 16 KiB chunks fits).
pub const MAX_MANIFEST_BYTES: usize = 256 * 1024 * 1024;

/// One chunk as a manifest names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ChunkRef {
    /// BLAKE3 of the chunk's bytes.
    pub id: ChunkId,
    /// The chunk's length in bytes (at least 1).
    pub len: u32,
}

/// The chunks cut from one segment of the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentRecord {
    /// What the segment holds.
    pub kind: SegmentKind,
    /// Offset of its first byte in the file.
    pub offset: u64,
    /// Its length in bytes.
    pub len: u64,
    /// Index of its first chunk in [`Manifest::chunks`].
    pub first_chunk: u32,
    /// How many chunks it was cut into.
    pub chunk_count: u32,
    /// [`fingerprint`](crate::segment::fingerprint) of its first bytes, for
    /// segments of at least [`HINT_PREFIX_BYTES`](crate::segment::HINT_PREFIX_BYTES).
    pub fingerprint: Option<[u8; 16]>,
}

/// How to rebuild one file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Path of the file inside its package, `/`-separated and relative
    /// (`install.wim`, `sources/install.wim`).
    pub path: String,
    /// File size in bytes.
    pub size: u64,
    /// BLAKE3 of the whole file.
    pub hash: FileHash,
    /// The chunks, in file order.
    pub chunks: Vec<ChunkRef>,
    /// The segments, in file order, covering the file exactly once.
    pub segments: Vec<SegmentRecord>,
}

/// A manifest that cannot be used.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ManifestError {
    /// The bytes are not a manifest of a format this build reads.
    #[error("manifest is not readable: {0}")]
    Decode(String),
    /// The encoded manifest is larger than [`MAX_MANIFEST_BYTES`].
    #[error("manifest is {0} bytes, more than the {MAX_MANIFEST_BYTES} allowed")]
    TooLarge(usize),
    /// The parts of the manifest disagree with each other.
    #[error("manifest for {path:?} is inconsistent: {reason}")]
    Inconsistent {
        /// The manifest's file path.
        path: String,
        /// What disagrees.
        reason: String,
    },
    /// The file path could escape the package folder or is not portable.
    #[error("manifest path {0:?} is not a safe relative path")]
    UnsafePath(String),
}

impl Manifest {
    /// The manifest of a file made of `parts` in this order, as one data
    /// segment (the form a DP receives). For tests and tools that make
    /// files of known chunks.
    pub fn of_parts<'a>(path: &str, parts: impl IntoIterator<Item = &'a [u8]>) -> Manifest {
        let mut hasher = blake3::Hasher::new();
        let chunks: Vec<ChunkRef> = parts
            .into_iter()
            .map(|p| {
                hasher.update(p);
                ChunkRef {
                    id: ChunkId::of(p),
                    len: u32::try_from(p.len()).unwrap_or(u32::MAX),
                }
            })
            .collect();
        let size: u64 = chunks.iter().map(|c| u64::from(c.len)).sum();
        Manifest {
            path: path.to_string(),
            size,
            hash: FileHash::from(hasher.finalize()),
            segments: if size == 0 {
                Vec::new()
            } else {
                vec![SegmentRecord {
                    kind: SegmentKind::Data,
                    offset: 0,
                    len: size,
                    first_chunk: 0,
                    chunk_count: u32::try_from(chunks.len()).unwrap_or(u32::MAX),
                    fingerprint: None,
                }]
            },
            chunks,
        }
    }

    /// The chunks of one segment.
    pub fn segment_chunks(&self, s: &SegmentRecord) -> &[ChunkRef] {
        let first = s.first_chunk as usize;
        self.chunks
            .get(first..first + s.chunk_count as usize)
            .unwrap_or(&[])
    }

    /// Byte offset of each chunk in the file, in chunk order.
    pub fn offsets(&self) -> impl Iterator<Item = (u64, &ChunkRef)> {
        self.chunks.iter().scan(0u64, |pos, c| {
            let at = *pos;
            *pos += u64::from(c.len);
            Some((at, c))
        })
    }

    /// Encodes for storage or the wire; [`Manifest::decode`] reads it back.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![MANIFEST_FORMAT];
        // Serialising plain structs and vectors into a Vec cannot fail.
        out.extend(postcard::to_stdvec(self).unwrap_or_default());
        out
    }

    /// Decodes and [`validates`](Manifest::validate) a manifest.
    pub fn decode(bytes: &[u8]) -> Result<Self, ManifestError> {
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(ManifestError::TooLarge(bytes.len()));
        }
        match bytes.split_first() {
            Some((&MANIFEST_FORMAT, rest)) => {
                let m: Manifest =
                    postcard::from_bytes(rest).map_err(|e| ManifestError::Decode(e.to_string()))?;
                m.validate()?;
                Ok(m)
            }
            Some((v, _)) => Err(ManifestError::Decode(format!("unknown format {v}"))),
            None => Err(ManifestError::Decode("empty".into())),
        }
    }

    /// Checks that chunks add up to the size, segments cover the file exactly
    /// once with in-range chunk spans, and the path is a safe relative path.
    pub fn validate(&self) -> Result<(), ManifestError> {
        check_rel_path(&self.path)?;
        let bad = |reason: String| ManifestError::Inconsistent {
            path: self.path.clone(),
            reason,
        };
        if self.chunks.iter().any(|c| c.len == 0) {
            return Err(bad("a chunk has length 0".into()));
        }
        let total: u64 = self.chunks.iter().map(|c| u64::from(c.len)).sum();
        if total != self.size {
            return Err(bad(format!(
                "chunks add up to {total} bytes, size is {}",
                self.size
            )));
        }
        let mut pos = 0u64;
        let mut next_chunk = 0u64;
        for s in &self.segments {
            if s.offset != pos || s.len == 0 {
                return Err(bad(format!(
                    "segment at {} does not follow {pos}",
                    s.offset
                )));
            }
            let first = u64::from(s.first_chunk);
            let end = first + u64::from(s.chunk_count);
            if first != next_chunk || end > self.chunks.len() as u64 {
                return Err(bad(format!(
                    "segment at {} names chunks out of order",
                    s.offset
                )));
            }
            let bytes: u64 = self.chunks[first as usize..end as usize]
                .iter()
                .map(|c| u64::from(c.len))
                .sum();
            if bytes != s.len {
                return Err(bad(format!(
                    "segment at {} holds {bytes} bytes of chunks, not {}",
                    s.offset, s.len
                )));
            }
            pos += s.len;
            next_chunk = end;
        }
        if pos != self.size || next_chunk != self.chunks.len() as u64 {
            return Err(bad("segments do not cover the file".into()));
        }
        Ok(())
    }
}

/// Accepts `a/b/c.wim`: non-empty `/`-separated components, none of them
/// `.`, `..`, empty, or holding `\`, `:` or NUL — nothing that could step out
/// of a package folder on Linux or Windows.
pub fn check_rel_path(path: &str) -> Result<(), ManifestError> {
    let ok = !path.is_empty()
        && path
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != ".." && !c.contains(['\\', ':', '\0']));
    if ok {
        Ok(())
    } else {
        Err(ManifestError::UnsafePath(path.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        let a = b"hello ".to_vec();
        let b = b"world".to_vec();
        Manifest {
            path: "sources/install.wim".into(),
            size: 11,
            hash: FileHash::of(b"hello world"),
            chunks: vec![
                ChunkRef {
                    id: ChunkId::of(&a),
                    len: 6,
                },
                ChunkRef {
                    id: ChunkId::of(&b),
                    len: 5,
                },
            ],
            segments: vec![
                SegmentRecord {
                    kind: SegmentKind::Header,
                    offset: 0,
                    len: 6,
                    first_chunk: 0,
                    chunk_count: 1,
                    fingerprint: None,
                },
                SegmentRecord {
                    kind: SegmentKind::Gap,
                    offset: 6,
                    len: 5,
                    first_chunk: 1,
                    chunk_count: 1,
                    fingerprint: None,
                },
            ],
        }
    }

    #[test]
    fn encode_decode_round_trip() {
        let m = sample();
        assert_eq!(Manifest::decode(&m.encode()).unwrap(), m);
        let offs: Vec<u64> = m.offsets().map(|(o, _)| o).collect();
        assert_eq!(offs, vec![0, 6]);
    }

    #[test]
    fn rejects_inconsistent_and_garbage() {
        let mut m = sample();
        m.size = 12;
        assert!(matches!(
            Manifest::decode(&m.encode()),
            Err(ManifestError::Inconsistent { .. })
        ));
        let mut m = sample();
        m.segments[1].offset = 7;
        assert!(m.validate().is_err());
        assert!(Manifest::decode(&[]).is_err());
        assert!(Manifest::decode(&[9, 1, 2]).is_err());
        let enc = sample().encode();
        for cut in 0..enc.len() {
            assert!(Manifest::decode(&enc[..cut]).is_err(), "truncated at {cut}");
        }
    }

    #[test]
    fn paths_must_stay_inside() {
        for p in ["", "/abs", "a/../b", "..", "a//b", "c:\\x", "a\\b", "./a"] {
            assert!(check_rel_path(p).is_err(), "{p:?}");
        }
        for p in ["install.wim", "sources/install.wim", "x/y z/ü.txt"] {
            assert!(check_rel_path(p).is_ok(), "{p:?}");
        }
    }
}
