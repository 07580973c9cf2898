//! Segments: the pieces a file is cut into before chunking.
//!
//! A WIM is cut at its resource boundaries — header, each blob resource,
//! metadata resources, blob table, XML data, integrity table, and the gaps
//! between them — so a blob that did not change keeps its chunks even when it
//! moves to another offset. [`cover`] turns the extents a parser found into a
//! list that covers every byte of the file exactly once.

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// How many leading bytes of a segment its [`fingerprint`] covers.
pub const HINT_PREFIX_BYTES: usize = 64;

/// Fingerprint of a segment that starts with `prefix` (at least
/// [`HINT_PREFIX_BYTES`] long): the first 16 bytes of BLAKE3 over its first
/// [`HINT_PREFIX_BYTES`]. With the segment's length it names a segment seen
/// before, so a gap that repeats old resources can be cut the same way.
pub fn fingerprint(prefix: &[u8]) -> Option<[u8; 16]> {
    let head = prefix.get(..HINT_PREFIX_BYTES)?;
    let mut f = [0u8; 16];
    f.copy_from_slice(&blake3::hash(head).as_bytes()[..16]);
    Some(f)
}

/// What a segment holds; kept in the manifest for inspection and statistics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SegmentKind {
    /// The fixed-size WIM header at offset 0.
    Header,
    /// A file-data resource listed in the blob table.
    Blob,
    /// An image's metadata resource (directory tree, security data).
    Metadata,
    /// The blob table (SHA-1 → resource location).
    BlobTable,
    /// The UTF-16 XML document describing the images.
    Xml,
    /// The integrity table (SHA-1 of each 10 MiB of the file).
    Integrity,
    /// Bytes no table points at: padding, or resources an append left behind.
    Gap,
    /// A whole file that is not a WIM (or not split by structure).
    Data,
}

impl SegmentKind {
    /// Lower-case name used in tables and JSON.
    pub fn name(self) -> &'static str {
        match self {
            SegmentKind::Header => "header",
            SegmentKind::Blob => "blob",
            SegmentKind::Metadata => "metadata",
            SegmentKind::BlobTable => "blob-table",
            SegmentKind::Xml => "xml",
            SegmentKind::Integrity => "integrity",
            SegmentKind::Gap => "gap",
            SegmentKind::Data => "data",
        }
    }
}

/// How a segment is split into chunks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    /// Content-defined chunking over the raw bytes.
    Cdc,
    /// A non-solid compressed WIM resource: split at its own compressed-chunk
    /// boundaries, read from the chunk table at its start.
    Resource {
        /// Uncompressed size of the resource, from its resource header.
        uncompressed: u64,
        /// The WIM's chunk size (uncompressed bytes per compressed chunk).
        chunk_size: u32,
    },
    /// Look the segment's bytes up among segments seen before (a gap an
    /// append left behind often repeats them exactly); CDC for the rest.
    Known,
}

/// A byte range of a file with its kind and split rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Offset of the first byte in the file.
    pub offset: u64,
    /// Length in bytes; never zero.
    pub len: u64,
    /// What the bytes are.
    pub kind: SegmentKind,
    /// How to chunk them.
    pub split: Split,
}

impl Segment {
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.offset + self.len
    }
}

/// Extents a parser found do not fit the file.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum CoverError {
    /// An extent ends past the end of the file.
    #[error("{kind} at offset {offset} with {len} bytes ends past the end of the file ({file_len} bytes)")]
    PastEnd {
        /// Kind of the extent.
        kind: &'static str,
        /// Its offset.
        offset: u64,
        /// Its length.
        len: u64,
        /// The file's length.
        file_len: u64,
    },
    /// Two extents share bytes.
    #[error("{first} at offset {first_offset} ({first_len} bytes) overlaps {second} at offset {second_offset}")]
    Overlap {
        /// Kind of the earlier extent.
        first: &'static str,
        /// Its offset.
        first_offset: u64,
        /// Its length.
        first_len: u64,
        /// Kind of the later extent.
        second: &'static str,
        /// Its offset.
        second_offset: u64,
    },
}

/// Sorts `extents`, checks that none overlaps another or runs past
/// `file_len`, and fills every hole with a [`SegmentKind::Gap`] segment, so
/// the result covers `0..file_len` exactly once. Zero-length extents are
/// dropped.
pub fn cover(file_len: u64, mut extents: Vec<Segment>) -> Result<Vec<Segment>, CoverError> {
    extents.retain(|s| s.len > 0);
    extents.sort_by_key(|s| (s.offset, s.len));
    let mut out = Vec::with_capacity(extents.len() * 2 + 1);
    let mut pos = 0u64;
    let mut prev: Option<Segment> = None;
    for seg in extents {
        let end = seg.offset.checked_add(seg.len);
        if end.is_none_or(|e| e > file_len) {
            return Err(CoverError::PastEnd {
                kind: seg.kind.name(),
                offset: seg.offset,
                len: seg.len,
                file_len,
            });
        }
        if seg.offset < pos {
            let p = prev.unwrap_or(seg);
            return Err(CoverError::Overlap {
                first: p.kind.name(),
                first_offset: p.offset,
                first_len: p.len,
                second: seg.kind.name(),
                second_offset: seg.offset,
            });
        }
        if seg.offset > pos {
            out.push(gap(pos, seg.offset - pos));
        }
        pos = seg.end();
        out.push(seg);
        prev = Some(seg);
    }
    if pos < file_len {
        out.push(gap(pos, file_len - pos));
    }
    Ok(out)
}

fn gap(offset: u64, len: u64) -> Segment {
    Segment {
        offset,
        len,
        kind: SegmentKind::Gap,
        split: Split::Known,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn seg(offset: u64, len: u64) -> Segment {
        Segment {
            offset,
            len,
            kind: SegmentKind::Blob,
            split: Split::Cdc,
        }
    }

    #[test]
    fn fills_holes_and_tail() {
        let out = cover(100, vec![seg(50, 10), seg(0, 20)]).unwrap();
        let spans: Vec<_> = out.iter().map(|s| (s.offset, s.len, s.kind)).collect();
        assert_eq!(
            spans,
            vec![
                (0, 20, SegmentKind::Blob),
                (20, 30, SegmentKind::Gap),
                (50, 10, SegmentKind::Blob),
                (60, 40, SegmentKind::Gap)
            ]
        );
    }

    #[test]
    fn empty_file_has_no_segments() {
        assert!(cover(0, vec![]).unwrap().is_empty());
    }

    #[test]
    fn rejects_overlap_and_past_end() {
        assert!(matches!(
            cover(100, vec![seg(0, 20), seg(10, 5)]),
            Err(CoverError::Overlap { .. })
        ));
        assert!(matches!(
            cover(100, vec![seg(90, 11)]),
            Err(CoverError::PastEnd { .. })
        ));
        assert!(matches!(
            cover(100, vec![seg(u64::MAX, 2)]),
            Err(CoverError::PastEnd { .. })
        ));
    }

    proptest! {
        #[test]
        fn covers_every_byte_once(len in 0u64..10_000, cuts in proptest::collection::vec((0u64..10_000, 1u64..500), 0..20)) {
            // Build non-overlapping extents from arbitrary input by keeping those that fit.
            let mut taken: Vec<Segment> = Vec::new();
            for (o, l) in cuts {
                if o + l <= len && taken.iter().all(|s| o + l <= s.offset || o >= s.end()) {
                    taken.push(seg(o, l));
                }
            }
            let out = cover(len, taken).unwrap();
            let mut pos = 0;
            for s in &out {
                prop_assert_eq!(s.offset, pos);
                prop_assert!(s.len > 0);
                pos = s.end();
            }
            prop_assert_eq!(pos, len);
        }
    }
}
