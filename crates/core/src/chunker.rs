//! Chunkers: decide where one chunk ends and the next begins.
//!
//! A chunker sees a *window*: the bytes of the current segment from the end
//! of the last chunk onwards, as far as the driver has read them. It answers
//! with the length of the next chunk, or `None` when it needs more bytes. The
//! driver keeps at least [`MAX_CHUNK_BYTES`] in the window (or everything up
//! to the segment's end, flagged by `eof`), so a chunker can always decide.
//! Files, network streams and WIM resources all go through this one
//! interface.

use fastcdc::v2020;

use crate::SegmentKind;

/// Smallest chunk content-defined chunking cuts (except at a segment's end).
pub const MIN_CHUNK_BYTES: usize = 16 * 1024;
/// Average chunk size content-defined chunking aims for.
pub const AVG_CHUNK_BYTES: usize = 64 * 1024;
/// Largest chunk any chunker produces.
pub const MAX_CHUNK_BYTES: usize = 256 * 1024;
/// A piece of a compressed resource ends at the first compressed-chunk
/// boundary at or past this many bytes. A 32 KiB chunk of OS files
/// compresses to 10–20 KiB, so a piece is usually one compressed chunk: a
/// patch costs about the compressed chunk it lands in, as it does for rsync.
/// Runs of highly compressible chunks are grouped; their grouping depends only
/// on the chunks since the last piece that ended on a chunk of at least this
/// size, so a change disturbs pieces only until the next such chunk.
pub const GROUP_MIN_BYTES: usize = 8 * 1024;
/// Resources of at most this many compressed chunks stay one chunk.
pub const SMALL_RESOURCE_CHUNKS: u64 = 2;
/// WIM chunk sizes above this are not split at compressed-chunk boundaries.
pub const MAX_WIM_CHUNK_SIZE: u32 = 64 * 1024;

/// Decides chunk boundaries over a window of bytes.
pub trait Chunker {
    /// Length of the next chunk at the start of `window`, or `None` if more
    /// bytes are needed. `eof` says the window ends at the segment's end; then
    /// a non-empty window always gets an answer. An answer is never 0 and
    /// never more than `window.len()` or [`MAX_CHUNK_BYTES`].
    fn cut(&mut self, window: &[u8], eof: bool) -> Option<usize>;
}

/// FastCDC (2020) content-defined chunking with given sizes.
#[derive(Clone, Copy, Debug)]
pub struct Cdc {
    min: usize,
    avg: usize,
    max: usize,
}

impl Cdc {
    /// For bulk data: uncompressed or solid resources, whole files.
    pub const DATA: Cdc = Cdc {
        min: MIN_CHUNK_BYTES,
        avg: AVG_CHUNK_BYTES,
        max: MAX_CHUNK_BYTES,
    };
    /// For tables (blob table, XML, integrity table, header, gaps): small and
    /// rewritten with most entries unchanged, so finer chunks share more.
    pub const TABLE: Cdc = Cdc {
        min: 2 * 1024,
        avg: 8 * 1024,
        max: 64 * 1024,
    };

    /// The CDC for segments of `kind` that are not split by structure.
    pub fn for_kind(kind: SegmentKind) -> Cdc {
        match kind {
            SegmentKind::Blob | SegmentKind::Metadata | SegmentKind::Data => Cdc::DATA,
            SegmentKind::Header
            | SegmentKind::BlobTable
            | SegmentKind::Xml
            | SegmentKind::Integrity
            | SegmentKind::Gap => Cdc::TABLE,
        }
    }

    fn masks(&self) -> (u64, u64) {
        // Normalisation level 1, as fastcdc's default constructor uses.
        let bits = v2020::logarithm2(self.avg as u32) as usize;
        (v2020::MASKS[bits + 1], v2020::MASKS[bits - 1])
    }
}

impl Default for Cdc {
    fn default() -> Self {
        Cdc::DATA
    }
}

impl Chunker for Cdc {
    fn cut(&mut self, window: &[u8], eof: bool) -> Option<usize> {
        if window.is_empty() || (!eof && window.len() < self.max) {
            return None;
        }
        let (mask_s, mask_l) = self.masks();
        let (_, n) = v2020::cut(
            window,
            self.min,
            self.avg,
            self.max,
            mask_s,
            mask_l,
            mask_s << 1,
            mask_l << 1,
        );
        Some(n.clamp(1, window.len()))
    }
}

/// Splits one non-solid compressed WIM resource at its compressed-chunk
/// boundaries.
///
/// Such a resource starts with a chunk table (one offset per compressed chunk
/// but the first, 4 bytes each, or 8 when the resource is over 4 GiB
/// uncompressed), then the compressed chunks, each holding `chunk_size`
/// uncompressed bytes. wimlib compresses each chunk on its own, so a chunk
/// whose uncompressed bytes did not change keeps its compressed bytes when a
/// patched file is recompressed. The table becomes its own piece(s); the
/// compressed chunks are grouped into pieces whose ends are chosen by the
/// chunks' own content, so one changed chunk dirties one piece only.
///
/// A table that does not make sense (offsets going backwards or past the
/// resource) is not an error — the resource still gets stored — the rest of
/// the resource falls back to [`Cdc`].
#[derive(Debug)]
pub struct ResourceChunker {
    state: State,
}

#[derive(Debug)]
enum State {
    /// Small resource: one chunk for all of it.
    Whole,
    /// Reading the chunk table; `entries` collected so far.
    Table {
        table_left: u64,
        entry_bytes: usize,
        entries: Vec<u64>,
        data_len: u64,
    },
    /// Emitting groups of compressed chunks; `ends` are offsets (relative to
    /// the end of the table) where compressed chunks end, `next` the index of
    /// the next chunk to place, `pos` where it starts.
    Chunks {
        ends: Vec<u64>,
        next: usize,
        pos: u64,
    },
    /// The table was unusable: plain CDC.
    Fallback,
}

impl ResourceChunker {
    /// A chunker for a resource of `stored_len` bytes in the file holding
    /// `uncompressed` bytes in compressed chunks of `chunk_size`.
    pub fn new(stored_len: u64, uncompressed: u64, chunk_size: u32) -> Self {
        let state = if chunk_size == 0 || chunk_size > MAX_WIM_CHUNK_SIZE {
            State::Fallback
        } else {
            let chunks = uncompressed.div_ceil(u64::from(chunk_size));
            let entry_bytes = if uncompressed > u64::from(u32::MAX) {
                8
            } else {
                4
            };
            let table_len = chunks.saturating_sub(1).saturating_mul(entry_bytes as u64);
            if chunks <= SMALL_RESOURCE_CHUNKS && stored_len <= MAX_CHUNK_BYTES as u64 {
                State::Whole
            } else if table_len >= stored_len {
                State::Fallback
            } else {
                State::Table {
                    table_left: table_len,
                    entry_bytes,
                    entries: Vec::with_capacity(chunks as usize),
                    data_len: stored_len - table_len,
                }
            }
        };
        Self { state }
    }
}

impl Chunker for ResourceChunker {
    fn cut(&mut self, window: &[u8], eof: bool) -> Option<usize> {
        if window.is_empty() {
            return None;
        }
        match &mut self.state {
            State::Whole => {
                if eof {
                    Some(window.len().min(MAX_CHUNK_BYTES))
                } else if window.len() >= MAX_CHUNK_BYTES {
                    // The resource is larger than its header claimed.
                    self.state = State::Fallback;
                    self.cut(window, eof)
                } else {
                    None
                }
            }
            State::Table {
                table_left,
                entry_bytes,
                entries,
                data_len,
            } => {
                let eb = *entry_bytes;
                let max_piece = (MAX_CHUNK_BYTES / eb) * eb;
                let piece = (*table_left).min(max_piece as u64) as usize;
                if window.len() < piece {
                    return if eof {
                        self.state = State::Fallback;
                        self.cut(window, eof)
                    } else {
                        None
                    };
                }
                for entry in window[..piece].chunks_exact(eb) {
                    let v = if eb == 8 {
                        u64::from_le_bytes(entry.try_into().unwrap_or([0; 8]))
                    } else {
                        u64::from(u32::from_le_bytes(entry.try_into().unwrap_or([0; 4])))
                    };
                    entries.push(v);
                }
                *table_left -= piece as u64;
                if *table_left == 0 {
                    // Table entries are the start offsets of chunks 1..n; the
                    // ends are those plus the end of the data.
                    let mut ends = std::mem::take(entries);
                    ends.push(*data_len);
                    // Every compressed chunk is 1..=MAX_CHUNK_BYTES long and
                    // the last one ends where the resource does.
                    let mut prev = 0u64;
                    let sane = ends.last() == Some(data_len)
                        && ends.iter().all(|&e| {
                            let ok = e > prev && e - prev <= MAX_CHUNK_BYTES as u64;
                            prev = e;
                            ok
                        });
                    self.state = if sane {
                        State::Chunks {
                            ends,
                            next: 0,
                            pos: 0,
                        }
                    } else {
                        State::Fallback
                    };
                }
                Some(piece.max(1).min(window.len()))
            }
            State::Chunks { ends, next, pos } => {
                let start = *pos;
                let mut i = *next;
                while i < ends.len() {
                    let piece_len = (ends[i] - start) as usize;
                    if piece_len > MAX_CHUNK_BYTES {
                        break;
                    }
                    if piece_len > window.len() {
                        if !eof {
                            return None;
                        }
                        // The resource is shorter than its table says.
                        self.state = State::Fallback;
                        return self.cut(window, eof);
                    }
                    i += 1;
                    if piece_len >= GROUP_MIN_BYTES {
                        break;
                    }
                }
                let end = if i == 0 { 0 } else { ends[i - 1] };
                if end == start {
                    // More bytes than the table accounts for.
                    self.state = State::Fallback;
                    return self.cut(window, eof);
                }
                *next = i;
                *pos = end;
                Some((end - start) as usize)
            }
            State::Fallback => Cdc::default().cut(window, eof),
        }
    }
}

/// Runs `chunker` over all of `data` (one segment held in memory) and returns
/// the chunk lengths. Used by tests and benches; drivers stream instead.
pub fn split_all(chunker: &mut dyn Chunker, data: &[u8]) -> Vec<usize> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < data.len() {
        let end = (pos + MAX_CHUNK_BYTES).min(data.len());
        let eof = end == data.len();
        match chunker.cut(&data[pos..end], eof) {
            Some(n) => {
                out.push(n);
                pos += n;
            }
            None => unreachable_window(),
        }
    }
    out
}

#[cold]
fn unreachable_window() -> ! {
    // A chunker asked for more than MAX_CHUNK_BYTES: a bug in this crate.
    panic!("chunker needed more than MAX_CHUNK_BYTES of window")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
        use rand::{RngCore, SeedableRng};
        let mut out = vec![0u8; len];
        rand::rngs::SmallRng::seed_from_u64(seed).fill_bytes(&mut out);
        out
    }

    /// A fake compressed resource: chunk table + chunks of the given sizes.
    fn resource(sizes: &[usize], seed: u64) -> (Vec<u8>, u64) {
        let mut table = Vec::new();
        let mut off = 0u64;
        for s in &sizes[..sizes.len() - 1] {
            off += *s as u64;
            table.extend_from_slice(&(off as u32).to_le_bytes());
        }
        let total: usize = sizes.iter().sum();
        let mut out = table;
        out.extend(pseudo_random(total, seed));
        (out, sizes.len() as u64 * 32768)
    }

    #[test]
    fn cdc_sizes_at_the_edges() {
        for len in [
            0usize,
            1,
            MIN_CHUNK_BYTES - 1,
            MIN_CHUNK_BYTES,
            AVG_CHUNK_BYTES,
            MAX_CHUNK_BYTES,
            MAX_CHUNK_BYTES + 1,
            3_000_000,
        ] {
            let data = pseudo_random(len, 7);
            let cuts = split_all(&mut Cdc::default(), &data);
            assert_eq!(cuts.iter().sum::<usize>(), len, "len {len}");
            assert!(cuts.iter().all(|&c| c > 0 && c <= MAX_CHUNK_BYTES));
            if len > 0 && len <= MIN_CHUNK_BYTES {
                assert_eq!(cuts, vec![len]);
            }
        }
    }

    #[test]
    fn cdc_zeroes_cut_at_max() {
        let cuts = split_all(&mut Cdc::default(), &vec![0u8; MAX_CHUNK_BYTES * 2 + 5]);
        assert_eq!(cuts, vec![MAX_CHUNK_BYTES, MAX_CHUNK_BYTES, 5]);
    }

    #[test]
    fn resource_pieces_follow_compressed_chunks() {
        let sizes: Vec<usize> = (0..40).map(|i| 9000 + (i * 997) % 7000).collect();
        let (data, uncompressed) = resource(&sizes, 3);
        let table_len = (sizes.len() - 1) * 4;
        let mut ch = ResourceChunker::new(data.len() as u64, uncompressed, 32768);
        let cuts = split_all(&mut ch, &data);
        assert_eq!(cuts[0], table_len, "the table is its own piece");
        assert_eq!(cuts.iter().sum::<usize>(), data.len());
        // Every later cut lands on a compressed-chunk boundary.
        let mut bounds = std::collections::HashSet::new();
        let mut acc = table_len;
        for s in &sizes {
            acc += s;
            bounds.insert(acc);
        }
        let mut pos = table_len;
        for c in &cuts[1..] {
            pos += c;
            assert!(
                bounds.contains(&pos),
                "cut at {pos} is not a chunk boundary"
            );
        }
        assert!(
            cuts.len() > 3,
            "a 40-chunk resource is split into several pieces"
        );
    }

    #[test]
    fn one_changed_compressed_chunk_dirties_few_pieces() {
        let sizes: Vec<usize> = (0..64).map(|i| 8000 + (i * 1237) % 9000).collect();
        let (a, unc) = resource(&sizes, 11);
        let mut b = a.clone();
        // Rewrite chunk 30 in place (same size): as a patched file recompressed.
        let table_len = 63 * 4;
        let start = table_len + sizes[..30].iter().sum::<usize>();
        for x in &mut b[start..start + sizes[30]] {
            *x ^= 0x5a;
        }
        let pieces = |d: &[u8]| {
            let cuts = split_all(&mut ResourceChunker::new(d.len() as u64, unc, 32768), d);
            let mut pos = 0;
            cuts.iter()
                .map(|&c| {
                    let h = blake3::hash(&d[pos..pos + c]);
                    pos += c;
                    h
                })
                .collect::<Vec<_>>()
        };
        let (pa, pb) = (pieces(&a), pieces(&b));
        let old: std::collections::HashSet<_> = pa.iter().collect();
        let fresh = pb.iter().filter(|h| !old.contains(h)).count();
        assert!(fresh <= 2, "{fresh} new pieces of {}", pb.len());
    }

    #[test]
    fn small_resource_is_one_chunk() {
        let (data, unc) = resource(&[20_000, 10_000], 5);
        let cuts = split_all(
            &mut ResourceChunker::new(data.len() as u64, unc, 32768),
            &data,
        );
        assert_eq!(cuts, vec![data.len()]);
    }

    #[test]
    fn nonsense_table_falls_back_to_cdc() {
        let mut data = pseudo_random(600_000, 9);
        // Table claims 20 chunks with offsets going backwards.
        for i in 0..19u32 {
            data[i as usize * 4..i as usize * 4 + 4]
                .copy_from_slice(&(1_000_000 - i * 10).to_le_bytes());
        }
        let cuts = split_all(
            &mut ResourceChunker::new(data.len() as u64, 20 * 32768, 32768),
            &data,
        );
        assert_eq!(cuts.iter().sum::<usize>(), data.len());
    }

    #[test]
    fn truncated_resource_falls_back() {
        let sizes = vec![30_000usize; 10];
        let (mut data, unc) = resource(&sizes, 4);
        data.truncate(100_000);
        let cuts = split_all(
            &mut ResourceChunker::new(data.len() as u64, unc, 32768),
            &data,
        );
        assert_eq!(cuts.iter().sum::<usize>(), data.len());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn chunks_concatenate_to_input(data in proptest::collection::vec(any::<u8>(), 0..600_000)) {
            let cuts = split_all(&mut Cdc::default(), &data);
            prop_assert_eq!(cuts.iter().sum::<usize>(), data.len());
        }

        #[test]
        fn hostile_resource_headers_never_panic(
            data in proptest::collection::vec(any::<u8>(), 1..100_000),
            unc in any::<u64>(),
            cs in any::<u32>(),
        ) {
            let cuts = split_all(&mut ResourceChunker::new(data.len() as u64, unc, cs), &data);
            prop_assert_eq!(cuts.iter().sum::<usize>(), data.len());
        }

        #[test]
        fn an_edit_moves_boundaries_only_locally(seed in any::<u64>(), at in 0usize..1_500_000) {
            let a = pseudo_random(2_000_000, seed);
            let mut b = a.clone();
            b.insert(at, 0xAB);
            let ends = |d: &[u8]| {
                let mut pos = 0;
                split_all(&mut Cdc::default(), d).into_iter().map(|c| { pos += c; pos }).collect::<Vec<_>>()
            };
            let ea: std::collections::HashSet<_> = ends(&a).into_iter().filter(|&e| e > at + MAX_CHUNK_BYTES * 2).map(|e| e + 1).collect();
            let eb: Vec<_> = ends(&b).into_iter().filter(|&e| e > at + MAX_CHUNK_BYTES * 2).collect();
            // Far from the edit, boundaries are the same ones shifted by one.
            let same = eb.iter().filter(|e| ea.contains(e)).count();
            prop_assert!(same + 1 >= eb.len());
        }
    }
}
