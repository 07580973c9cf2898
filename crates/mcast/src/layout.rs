//! How a package's files are cut into blocks, and the check of a layout.
//!
//! A block is a run of whole manifest chunks of one file, at least
//! [`BLOCK_TARGET`] bytes (the last of a file may be shorter) and so at most
//! that plus one chunk. Each block is one RaptorQ source block of
//! `ceil(len / SYMBOL_SIZE)` source symbols. Because a block holds whole
//! chunks, a receiver checks every chunk of a decoded block against the
//! BLAKE3 ids of the site-signed manifest before it keeps it.

use ferry_core::{ChunkId, ChunkRef, Manifest};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::datagram::SYMBOL_SIZE;

/// A block is at least this long (the last of a file may be shorter).
pub const BLOCK_TARGET: u64 = 1 << 20;
/// The most source symbols a block may have (RFC 6330's K'max is 56,403;
/// Ferry's blocks have about 750, a layout far beyond is refused).
pub const MAX_BLOCK_SYMBOLS: u32 = 8192;

/// One block: a run of whole chunks of one file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Block {
    /// Index of the file in the package's file list.
    pub file: u32,
    /// Offset of its first byte in the file.
    pub offset: u64,
    /// Its length.
    pub len: u64,
}

impl Block {
    /// Its source symbols (K).
    pub fn symbols(&self) -> u32 {
        symbols(self.len)
    }
}

/// Source symbols of a block of `len` bytes.
pub fn symbols(len: u64) -> u32 {
    u32::try_from(len.div_ceil(u64::from(SYMBOL_SIZE))).unwrap_or(u32::MAX)
}

/// The blocks of a package whose files have these chunk lengths (in file
/// order): consecutive chunks of one file until a block reaches `target`
/// bytes. Empty files have no block.
pub fn layout(files: &[Vec<u32>], target: u64) -> Vec<Block> {
    let mut out = Vec::new();
    for (fi, chunks) in files.iter().enumerate() {
        let mut off = 0u64;
        let mut cur: Option<Block> = None;
        for &len in chunks {
            let b = cur.get_or_insert(Block {
                file: fi as u32,
                offset: off,
                len: 0,
            });
            b.len += u64::from(len);
            off += u64::from(len);
            if b.len >= target {
                out.extend(cur.take());
            }
        }
        out.extend(cur);
    }
    out
}

/// The blocks of a package's manifests at [`BLOCK_TARGET`].
pub fn of_manifests(manifests: &[Manifest]) -> Vec<Block> {
    let chunks: Vec<Vec<u32>> = manifests
        .iter()
        .map(|m| m.chunks.iter().map(|c| c.len).collect())
        .collect();
    layout(&chunks, BLOCK_TARGET)
}

/// Why a layout a DP sent does not fit the signed manifests.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum LayoutError {
    /// A block names a file the package does not have.
    #[error("block {block} names file {file} of a package of {files} files")]
    NoFile {
        /// The block.
        block: usize,
        /// The file it names.
        file: u32,
        /// Files the package has.
        files: usize,
    },
    /// A block does not start where the previous one of its file ended, is
    /// empty, or does not end on a chunk boundary.
    #[error("block {block} of {path} is not a run of whole chunks following the one before it")]
    NotChunks {
        /// The block.
        block: usize,
        /// The file's path.
        path: String,
    },
    /// A block has more source symbols than a receiver takes.
    #[error("block {block} of {path} has {symbols} symbols (at most {MAX_BLOCK_SYMBOLS})")]
    TooLarge {
        /// The block.
        block: usize,
        /// The file's path.
        path: String,
        /// Its symbols.
        symbols: u32,
    },
    /// The blocks leave part of a file uncovered.
    #[error("the session's blocks do not cover {path}")]
    Uncovered {
        /// The file's path.
        path: String,
    },
}

/// A layout checked against the signed manifests: each block with the
/// chunks it covers.
#[derive(Clone, Debug)]
pub struct Layout {
    blocks: Vec<Block>,
    /// Per block, its chunks: (offset in the file, chunk).
    chunks: Vec<Vec<(u64, ChunkRef)>>,
    /// Per block, the index in its file's manifest of its first chunk.
    first_chunk: Vec<usize>,
}

impl Layout {
    /// Checks that `blocks` cut `manifests` into runs of whole chunks that
    /// cover every file once, in order.
    pub fn check(blocks: &[Block], manifests: &[Manifest]) -> Result<Layout, LayoutError> {
        let mut covered = vec![(0u64, 0usize); manifests.len()];
        let mut chunks = Vec::with_capacity(blocks.len());
        let mut first_chunk = Vec::with_capacity(blocks.len());
        for (i, b) in blocks.iter().enumerate() {
            let m = manifests.get(b.file as usize).ok_or(LayoutError::NoFile {
                block: i,
                file: b.file,
                files: manifests.len(),
            })?;
            let not_chunks = || LayoutError::NotChunks {
                block: i,
                path: m.path.clone(),
            };
            let (at, first) = covered[b.file as usize];
            if b.offset != at || b.len == 0 {
                return Err(not_chunks());
            }
            let k = b.symbols();
            if k > MAX_BLOCK_SYMBOLS {
                return Err(LayoutError::TooLarge {
                    block: i,
                    path: m.path.clone(),
                    symbols: k,
                });
            }
            let end = b.offset.checked_add(b.len).ok_or_else(not_chunks)?;
            let mut cs = Vec::new();
            let mut o = b.offset;
            for c in m.chunks.get(first..).unwrap_or_default() {
                if o >= end {
                    break;
                }
                cs.push((o, *c));
                o += u64::from(c.len);
            }
            if o != end {
                return Err(not_chunks());
            }
            covered[b.file as usize] = (end, first + cs.len());
            first_chunk.push(first);
            chunks.push(cs);
        }
        for (m, (c, _)) in manifests.iter().zip(&covered) {
            if *c != m.size {
                return Err(LayoutError::Uncovered {
                    path: m.path.clone(),
                });
            }
        }
        Ok(Layout {
            blocks: blocks.to_vec(),
            chunks,
            first_chunk,
        })
    }

    /// The blocks.
    pub fn blocks(&self) -> &[Block] {
        &self.blocks
    }

    /// The chunks of block `b`: (offset in its file, chunk).
    pub fn chunks(&self, b: usize) -> &[(u64, ChunkRef)] {
        self.chunks.get(b).map(Vec::as_slice).unwrap_or_default()
    }

    /// The range of chunk indexes of block `b` in its file's manifest.
    pub fn chunk_range(&self, b: usize) -> std::ops::Range<usize> {
        let first = self.first_chunk.get(b).copied().unwrap_or(0);
        first..first + self.chunks(b).len()
    }

    /// Whether `data` (block `b`'s bytes) matches every chunk of the block.
    pub fn verify(&self, b: usize, data: &[u8]) -> bool {
        let Some(blk) = self.blocks.get(b) else {
            return false;
        };
        data.len() as u64 == blk.len
            && self.chunks(b).iter().all(|(off, c)| {
                let at = (off - blk.offset) as usize;
                data.get(at..at + c.len as usize)
                    .is_some_and(|d| ChunkId::of(d) == c.id)
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_runs_of_whole_chunks_of_one_file() {
        let files = vec![vec![300_000u32; 10], vec![], vec![100]];
        let b = layout(&files, BLOCK_TARGET);
        // 4 × 300 000 ≥ 1 MiB: blocks of 4, 4 and the last 2 chunks.
        let want = [
            (0, 0, 1_200_000),
            (0, 1_200_000, 1_200_000),
            (0, 2_400_000, 600_000),
            (2, 0, 100),
        ];
        let want: Vec<Block> = want
            .iter()
            .map(|&(file, offset, len)| Block { file, offset, len })
            .collect();
        assert_eq!(b, want);
        assert_eq!(b[0].symbols(), 858);
        assert_eq!(b[3].symbols(), 1);
        assert_eq!(symbols(0), 0);
        assert_eq!(symbols(1), 1);
        assert_eq!(symbols(1400), 1);
        assert_eq!(symbols(1401), 2);
    }

    fn manifest(path: &str, parts: &[&[u8]]) -> Manifest {
        Manifest::of_parts(path, parts.iter().copied())
    }

    #[test]
    fn a_layout_is_checked_against_the_manifests() {
        let a = vec![1u8; 5000];
        let b = vec![2u8; 3000];
        let m = vec![
            manifest("a", &[&a, &b]),
            manifest("e", &[]),
            manifest("c", &[&a]),
        ];
        let blocks = layout(
            &m.iter()
                .map(|m| m.chunks.iter().map(|c| c.len).collect())
                .collect::<Vec<_>>(),
            4000,
        );
        assert_eq!(blocks.len(), 3, "{blocks:?}");
        let l = Layout::check(&blocks, &m).unwrap();
        assert_eq!(l.chunks(1).len(), 1);
        assert_eq!(l.chunk_range(1), 1..2);
        assert!(l.verify(0, &a));
        assert!(l.verify(1, &b));
        assert!(!l.verify(1, &a[..3000]), "wrong bytes");
        assert!(!l.verify(1, &b[..2999]), "wrong length");
        assert!(!l.verify(9, &b), "no such block");

        let mut bad = blocks.clone();
        bad[1].offset += 1;
        assert!(matches!(
            Layout::check(&bad, &m),
            Err(LayoutError::NotChunks { block: 1, .. })
        ));
        let mut bad = blocks.clone();
        bad[0].len = 4000;
        assert!(matches!(
            Layout::check(&bad, &m),
            Err(LayoutError::NotChunks { block: 0, .. })
        ));
        let mut bad = blocks.clone();
        bad[2].file = 7;
        assert!(matches!(
            Layout::check(&bad, &m),
            Err(LayoutError::NoFile { file: 7, .. })
        ));
        assert!(matches!(
            Layout::check(&blocks[..2], &m),
            Err(LayoutError::Uncovered { path }) if path == "c"
        ));
        let mut bad = blocks.clone();
        bad.push(blocks[2]);
        assert!(Layout::check(&bad, &m).is_err(), "a block twice");
        let huge = [Block {
            file: 0,
            offset: 0,
            len: u64::MAX,
        }];
        assert!(matches!(
            Layout::check(&huge, &m),
            Err(LayoutError::TooLarge { .. })
        ));
    }
}
