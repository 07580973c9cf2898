//! Streaming a file into the library: read each segment, cut it into
//! chunks, hash and store them, and build the manifest.
//!
//! Three threads, each on its own core where there is one: the caller's
//! reads, cuts and hashes chunks; one hashes the whole file; one writes the
//! chunks into the import's pack. Memory stays bounded by the read window
//! and the blocks in the two queues (a few MiB) whatever the file's size: a
//! segment is read as it is chunked, never whole.

use std::io::{Read, Seek, SeekFrom};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};

use ferry_core::chunker::{Cdc, Chunker, ResourceChunker, MAX_CHUNK_BYTES};
use ferry_core::manifest::SegmentRecord;
use ferry_core::segment::{fingerprint, HINT_PREFIX_BYTES};
use ferry_core::{ChunkId, ChunkRef, FileHash, Manifest, Segment, SegmentKind, Split};
use ferry_store::{Import, Library, StoreError};

/// Bytes read from the file at a time.
const READ_BYTES: usize = 4 * 1024 * 1024;

/// Reading or storing failed.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// Reading the file failed (or it ended early: it changed while read).
    #[error("reading at offset {offset}: {source}")]
    Read {
        /// Where in the file.
        offset: u64,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The library refused a write.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The bytes of the current segment read but not yet cut: `buf[pos..end]`.
/// The buffer is allocated once; reads go after `end`, and what is left is
/// moved to the front only when more room is needed.
struct Window<'r, R: Read> {
    reader: &'r mut R,
    buf: Vec<u8>,
    pos: usize,
    end: usize,
    /// Bytes of the segment still unread.
    unread: u64,
    /// File offset of `buf[pos]`.
    offset: u64,
    /// Every block read goes to the whole-file hasher thread, in order.
    whole: SyncSender<Vec<u8>>,
    /// Blocks the hasher is done with, for reuse.
    spare: Receiver<Vec<u8>>,
    read_total: u64,
}

impl<R: Read> Window<'_, R> {
    fn view(&self) -> &[u8] {
        &self.buf[self.pos..self.end]
    }

    fn eof(&self) -> bool {
        self.unread == 0
    }

    /// Reads until `want` bytes are in view or the segment ends.
    fn fill(&mut self, want: usize) -> Result<(), IngestError> {
        if self.end - self.pos >= want || self.unread == 0 {
            return Ok(());
        }
        if self.pos > 0 {
            self.buf.copy_within(self.pos..self.end, 0);
            self.end -= self.pos;
            self.pos = 0;
        }
        while self.end < want && self.unread > 0 {
            let n = (READ_BYTES.max(want - self.end) as u64).min(self.unread) as usize;
            if self.buf.len() < self.end + n {
                self.buf.resize(self.end + n, 0);
            }
            let offset = self.offset + self.end as u64;
            let block = &mut self.buf[self.end..self.end + n];
            self.reader
                .read_exact(block)
                .map_err(|source| IngestError::Read { offset, source })?;
            let mut copy = self.spare.try_recv().unwrap_or_default();
            copy.clear();
            copy.extend_from_slice(block);
            // The hasher thread only stops early if it panicked; the join
            // in `ingest` reports that.
            let _ = self.whole.send(copy);
            self.end += n;
            self.unread -= n as u64;
            self.read_total += n as u64;
        }
        Ok(())
    }

    fn consume(&mut self, n: usize) {
        self.pos += n;
        self.offset += n as u64;
    }

    /// At the start of a segment whose chunks are known: skips its bytes
    /// in the file (which may be a hole) and hands the whole-file hasher
    /// the chunks' bytes from the library instead.
    fn take_from(
        &mut self,
        lib: &Library,
        chunks: &[ChunkRef],
        mut progress: impl FnMut(u64),
    ) -> Result<(), IngestError>
    where
        R: Seek,
    {
        debug_assert!(self.view().is_empty() && self.pos == self.end);
        let len = self.unread;
        let offset = self.offset;
        self.reader
            .seek(SeekFrom::Current(len as i64))
            .map_err(|source| IngestError::Read { offset, source })?;
        let mut block = self.spare.try_recv().unwrap_or_default();
        block.clear();
        for c in chunks {
            lib.with_chunk(&c.id, |b| block.extend_from_slice(b))?;
            if block.len() >= READ_BYTES {
                let next = self.spare.try_recv().unwrap_or_default();
                self.read_total += block.len() as u64;
                let _ = self.whole.send(std::mem::replace(&mut block, next));
                block.clear();
                progress(self.read_total);
            }
        }
        self.read_total += block.len() as u64;
        let _ = self.whole.send(block);
        self.unread = 0;
        self.offset += len;
        progress(self.read_total);
        Ok(())
    }
}

/// What an in-place append left of the file it was made from: the old
/// manifest's segments below `below`, whose bytes the append did not touch.
/// The importer takes their chunks as they were instead of cutting and
/// hashing them again, and feeds the whole-file hash from the library: the
/// file need not even hold those bytes (servicing's work copy leaves them
/// as holes).
pub(crate) struct Kept<'m> {
    manifest: &'m Manifest,
    below: u64,
    lib: &'m Library,
}

impl<'m> Kept<'m> {
    /// For a WIM that wimlib appended to in place (`wimlib_overwrite`
    /// without a rebuild), made from the file `manifest` describes: it
    /// writes the header and then only past the old resources, from where
    /// the old blob table, XML data or integrity table began at the earliest.
    pub(crate) fn after_append(lib: &'m Library, manifest: &'m Manifest) -> Self {
        let below = manifest
            .segments
            .iter()
            .filter(|s| {
                matches!(
                    s.kind,
                    SegmentKind::BlobTable | SegmentKind::Xml | SegmentKind::Integrity
                )
            })
            .map(|s| s.offset)
            .min()
            .unwrap_or(0)
            .min(manifest.size);
        Self {
            manifest,
            below,
            lib,
        }
    }

    /// The old record and chunks of a segment the append left as it was.
    fn of(&self, seg: &Segment) -> Option<(&'m SegmentRecord, &'m [ChunkRef])> {
        if seg.kind == SegmentKind::Header || seg.end() > self.below {
            return None;
        }
        let m = self.manifest;
        let i = m
            .segments
            .binary_search_by_key(&seg.offset, |r| r.offset)
            .ok()?;
        let r = &m.segments[i];
        (r.len == seg.len && r.kind == seg.kind).then(|| (r, m.segment_chunks(r)))
    }
}

/// Chunks on their way to the writer thread: their bytes end to end.
#[derive(Default)]
struct Batch {
    data: Vec<u8>,
    chunks: Vec<ChunkRef>,
}

/// A batch is handed to the writer once it holds this many bytes.
const BATCH_BYTES: usize = 1024 * 1024;
/// Batches queued for the writer.
const WRITER_QUEUE: usize = 4;

/// Builds one manifest while chunks go to the writer.
struct Builder<'l> {
    lib: &'l Library,
    chunks: Vec<ChunkRef>,
    batch: Batch,
    writer: SyncSender<Batch>,
    spare: Receiver<Batch>,
}

impl Builder<'_> {
    fn emit(&mut self, data: &[u8]) -> Result<(), StoreError> {
        self.emit_as(ChunkId::of(data), data)
    }

    /// Stores a chunk whose id the caller has computed already.
    fn emit_as(&mut self, id: ChunkId, data: &[u8]) -> Result<(), StoreError> {
        let c = ChunkRef {
            id,
            len: data.len() as u32,
        };
        self.chunks.push(c);
        self.batch.chunks.push(c);
        self.batch.data.extend_from_slice(data);
        if self.batch.data.len() >= BATCH_BYTES {
            self.send()?;
        }
        Ok(())
    }

    /// Hands the batch to the writer.
    fn send(&mut self) -> Result<(), StoreError> {
        let next = self.spare.try_recv().unwrap_or_default();
        let batch = std::mem::replace(&mut self.batch, next);
        // The writer only hangs up after an error, which `ingest` reports
        // in place of this one.
        self.writer
            .send(batch)
            .map_err(|_| StoreError::Refused("the chunk writer stopped".into()))
    }
}

/// Stores the chunks of each batch, in order, and hands the emptied
/// batches back.
fn write_batches(
    import: &mut Import<'_>,
    batches: Receiver<Batch>,
    spare: SyncSender<Batch>,
) -> Result<(), StoreError> {
    for mut batch in batches {
        let mut at = 0;
        for c in &batch.chunks {
            let end = at + c.len as usize;
            import.put_chunk(&c.id, &batch.data[at..end])?;
            at = end;
        }
        batch.data.clear();
        batch.chunks.clear();
        let _ = spare.try_send(batch);
    }
    Ok(())
}

/// Blocks queued for the whole-file hasher (each up to [`READ_BYTES`]).
const HASH_QUEUE_BLOCKS: usize = 4;

/// Reads `reader` (positioned at offset 0) segment by segment and stores
/// its chunks through `import`; returns the manifest for `path`. Segments
/// `kept` names keep their old chunks.
/// `progress` is called with the bytes read so far. The whole-file BLAKE3 is
/// computed on a second thread and chunks are stored on a third while this
/// one reads, cuts and hashes.
pub(crate) fn ingest<R: Read + Seek>(
    import: &mut Import<'_>,
    reader: &mut R,
    segments: &[Segment],
    path: &str,
    kept: Option<&Kept<'_>>,
    progress: impl FnMut(u64),
) -> Result<Manifest, IngestError> {
    std::thread::scope(|scope| {
        let (tx, rx) = sync_channel::<Vec<u8>>(HASH_QUEUE_BLOCKS);
        let (give_back, spare) = sync_channel::<Vec<u8>>(HASH_QUEUE_BLOCKS + 1);
        let hasher = scope.spawn(move || {
            let mut h = blake3::Hasher::new();
            for block in rx {
                h.update(&block);
                let _ = give_back.try_send(block);
            }
            h.finalize()
        });
        let lib = import.library();
        let (to_writer, batches) = sync_channel::<Batch>(WRITER_QUEUE);
        let (give_back_batch, spare_batches) = sync_channel::<Batch>(WRITER_QUEUE + 1);
        let writer = scope.spawn(move || write_batches(import, batches, give_back_batch));
        let b = Builder {
            lib,
            chunks: Vec::new(),
            batch: Batch::default(),
            writer: to_writer,
            spare: spare_batches,
        };
        let result = chunk_segments(b, reader, segments, path, kept, progress, tx, spare);
        let failed = |what: &str| IngestError::Read {
            offset: 0,
            source: std::io::Error::other(format!("the {what} thread failed")),
        };
        let hash = hasher.join().map_err(|_| failed("whole-file hasher"))?;
        writer.join().map_err(|_| failed("chunk writer"))??;
        result.map(|mut m| {
            m.hash = FileHash::from(hash);
            m
        })
    })
}

/// The chunking half of [`ingest`]; the manifest's hash is filled in there.
#[allow(clippy::too_many_arguments)]
fn chunk_segments<R: Read + Seek>(
    mut b: Builder<'_>,
    reader: &mut R,
    segments: &[Segment],
    path: &str,
    kept: Option<&Kept<'_>>,
    mut progress: impl FnMut(u64),
    whole: SyncSender<Vec<u8>>,
    spare: Receiver<Vec<u8>>,
) -> Result<Manifest, IngestError> {
    let mut records = Vec::with_capacity(segments.len());
    let mut w = Window {
        reader,
        buf: Vec::with_capacity(READ_BYTES + MAX_CHUNK_BYTES),
        pos: 0,
        end: 0,
        unread: 0,
        offset: 0,
        whole,
        spare,
        read_total: 0,
    };
    for seg in segments {
        debug_assert!(
            w.view().is_empty(),
            "the previous segment was consumed whole"
        );
        w.unread = seg.len;
        let first_chunk = b.chunks.len() as u32;
        if let Some((k, (old, chunks))) = kept.and_then(|k| Some((k, k.of(seg)?))) {
            w.take_from(k.lib, chunks, &mut progress)?;
            b.chunks.extend_from_slice(chunks);
            records.push(SegmentRecord {
                first_chunk,
                ..*old
            });
            continue;
        }
        w.fill(HINT_PREFIX_BYTES)?;
        let fp = if seg.kind == SegmentKind::Header {
            None
        } else {
            fingerprint(w.view())
        };
        let mut chunker: Box<dyn Chunker> = match seg.split {
            Split::Resource {
                uncompressed,
                chunk_size,
            } => Box::new(ResourceChunker::new(seg.len, uncompressed, chunk_size)),
            Split::Cdc => Box::new(Cdc::for_kind(seg.kind)),
            Split::Known => {
                reuse_known(&mut b, &mut w)?;
                Box::new(Cdc::for_kind(seg.kind))
            }
        };
        loop {
            w.fill(MAX_CHUNK_BYTES)?;
            if w.view().is_empty() {
                break;
            }
            let eof = w.eof();
            let n = chunker
                .cut(w.view(), eof)
                .unwrap_or(w.view().len().min(MAX_CHUNK_BYTES));
            let n = n.clamp(1, w.view().len());
            b.emit(&w.view()[..n])?;
            w.consume(n);
            progress(w.read_total);
        }
        records.push(SegmentRecord {
            kind: seg.kind,
            offset: seg.offset,
            len: seg.len,
            first_chunk,
            chunk_count: b.chunks.len() as u32 - first_chunk,
            fingerprint: fp,
        });
    }
    b.send()?;
    Ok(Manifest {
        path: path.to_string(),
        size: w.read_total,
        hash: FileHash([0; 32]),
        chunks: b.chunks,
        segments: records,
    })
}

/// At the start of a gap: while the bytes ahead repeat a segment seen
/// before, cut them exactly as that segment was cut (an in-place append
/// leaves old metadata, blob table, XML and dropped resources behind in just
/// this way). Stops at the first chunk that does not match; the caller
/// chunks whatever is left.
fn reuse_known<R: Read>(b: &mut Builder<'_>, w: &mut Window<'_, R>) -> Result<(), IngestError> {
    'next_segment: loop {
        w.fill(HINT_PREFIX_BYTES)?;
        let Some(fp) = fingerprint(w.view()) else {
            return Ok(());
        };
        let ahead = w.view().len() as u64 + w.unread;
        for candidate in b.lib.hints(&fp, ahead)? {
            let mut matched = 0usize;
            for c in &candidate {
                let len = c.len as usize;
                w.fill(len)?;
                if w.view().len() < len || ChunkId::of(&w.view()[..len]) != c.id {
                    break;
                }
                b.emit_as(c.id, &w.view()[..len])?;
                w.consume(len);
                matched += 1;
            }
            if matched == candidate.len() {
                continue 'next_segment;
            }
            if matched > 0 {
                return Ok(());
            }
        }
        return Ok(());
    }
}
