//! The [`Library`]: RocksDB column families and the operations over them.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use ferry_core::{ChunkId, ChunkRef, Manifest};
use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamily, ColumnFamilyDescriptor, DBCompressionType, Direction,
    IngestExternalFileOptions, IteratorMode, Options, ReadOptions, SstFileWriter, WriteBatch,
    WriteOptions, DB,
};
use thiserror::Error;

use crate::gate::{Exclusive, Gate, Shared};

/// key: pack number (u64 BE) ++ sequence number in the pack (u32 BE) →
/// value: a chunk's bytes. Each import writes its new chunks, in arrival
/// order, into table files of its own pack and hands them to RocksDB whole
/// at commit (`ingest_external_file`): no memtable, no flush, no compaction
/// (packs never overlap), each byte written once.
pub const CF_PACKS: &str = "packs";
/// key: [`ChunkId`] (32 bytes) → value: the chunk's bytes, in blob files.
/// Where releases before [`CF_PACKS`] stored chunks; read, freed and
/// reclaimed as before, never written.
pub const CF_CHUNKS: &str = "chunks";
/// key: [`ChunkId`] → value: reference count (u64 LE) ++ chunk length (u32
/// LE) ++ its key in [`CF_PACKS`] (12 bytes; absent: the chunk is in
/// [`CF_CHUNKS`]). Present exactly when the chunk is stored; a count of 0
/// means stored but not (yet, or no longer) referenced.
pub const CF_INDEX: &str = "index";
/// key: package id (UTF-8) → value: the catalog record, opaque to the store.
pub const CF_PACKAGES: &str = "packages";
/// key: package id ++ 0x00 ++ revision (u32 BE) ++ file number (u32 BE) →
/// value: [`Manifest::encode`] bytes.
pub const CF_MANIFESTS: &str = "manifests";
/// key: 0 (u64 BE) ++ [`ChunkId`] → empty. Chunks whose count fell to 0;
/// [`Library::collect`] deletes those still unreferenced. (Releases before
/// [`CF_PACKS`] also listed here, under other numbers, the chunks of
/// imports not yet committed; `collect` treats those the same way.)
pub const CF_PENDING: &str = "pending";
/// key: segment fingerprint ([`ferry_core::segment::fingerprint`], 16
/// bytes) ++ segment length (u64 BE) → value: postcard
/// `Vec<ChunkRef>`, the chunks that segment was cut into. Lets the importer
/// recognise old resources an in-place append left behind as gaps.
pub const CF_HINTS: &str = "hints";
/// key: setting name (UTF-8) → value: setting bytes (`next-package`: u64 LE;
/// `garbage-bytes`: u64 LE, bytes freed since the last space reclamation).
pub const CF_META: &str = "meta";
/// The site's own records (its registry of DPs and groups): key → value,
/// both chosen by the caller ([`Library::state`], [`Library::write_state`]).
const CF_STATE: &str = "state";

const ALL_CFS: [&str; 9] = [
    CF_PACKS,
    CF_CHUNKS,
    CF_INDEX,
    CF_PACKAGES,
    CF_MANIFESTS,
    CF_PENDING,
    CF_HINTS,
    CF_META,
    CF_STATE,
];
/// An import starts a new table file of its pack after this many bytes, so
/// the index the writer holds in memory stays small.
const PACK_FILE_BYTES: u64 = 256 << 20;
/// Meta key prefix of a pack being ingested: `pack-open\0` ++ pack (u64 BE).
/// Written (synced) before an import's files are ingested and deleted by
/// its commit batch; one left at open means the commit never landed, and
/// the pack's chunks are deleted.
const META_PACK_OPEN: &[u8] = b"pack-open\0";
const META_NEXT_PACK: &[u8] = b"next-pack";
/// A state record: key, value.
pub type StateRecord = (Vec<u8>, Vec<u8>);
/// A change to a state record: its key, and the new value (`None`: delete).
pub type StateChange = (Vec<u8>, Option<Vec<u8>>);
/// The block cache all column families share.
const BLOCK_CACHE_BYTES: usize = 32 << 20;
/// Pending-list id for chunks whose reference count fell to zero.
const GARBAGE_IMPORT: u64 = 0;
/// Freed bytes wait in blob files until they exceed this share of the live
/// bytes (and [`RECLAIM_MIN_BYTES`]); then one compaction rewrites the live
/// chunks and drops the dead ones, so rewriting costs at most a few times
/// what was freed.
const RECLAIM_SHARE: u64 = 4;
/// See [`RECLAIM_SHARE`].
const RECLAIM_MIN_BYTES: u64 = 64 << 20;
const META_GARBAGE: &[u8] = b"garbage-bytes";

/// What went wrong in the library.
#[derive(Debug, Error)]
pub enum StoreError {
    /// RocksDB reported an error (I/O, corruption, disk full).
    #[error("content library at {path}: {source}")]
    Db {
        /// The library folder.
        path: PathBuf,
        /// RocksDB's error.
        source: rocksdb::Error,
    },
    /// A chunk a manifest needs is not in the library.
    #[error("chunk {0} is missing from the content library")]
    MissingChunk(ChunkId),
    /// A chunk's bytes do not hash to its id.
    #[error("chunk {id} is damaged: {detail}")]
    Damaged {
        /// The chunk.
        id: ChunkId,
        /// What is wrong (hash mismatch, checksum error from storage).
        detail: String,
    },
    /// A stored manifest or record cannot be read.
    #[error("stored {what} is unreadable: {detail}")]
    Corrupt {
        /// Which record.
        what: String,
        /// Why.
        detail: String,
    },
    /// No such package.
    #[error("no package {0} in the content library")]
    NoPackage(String),
    /// A caller's update of a catalog record refused the record it found
    /// (it changed since the caller read it).
    #[error("{0}")]
    Refused(String),
    /// The revision was committed already (by a concurrent import).
    #[error(
        "{package} revision {revision} exists already (another import committed it); try again"
    )]
    RevisionExists {
        /// The package.
        package: String,
        /// The revision.
        revision: u32,
    },
}

impl StoreError {
    /// Whether trying the same operation again may succeed (a full disk may
    /// be cleared, a busy file released); damage and missing data stay.
    pub fn is_retryable(&self) -> bool {
        match self {
            StoreError::Db { source, .. } => matches!(
                source.kind(),
                rocksdb::ErrorKind::IOError
                    | rocksdb::ErrorKind::Busy
                    | rocksdb::ErrorKind::TryAgain
                    | rocksdb::ErrorKind::TimedOut
            ),
            StoreError::RevisionExists { .. } => true,
            _ => false,
        }
    }
}

/// Library-wide figures.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LibraryStats {
    /// Distinct chunks stored.
    pub chunks: u64,
    /// Their bytes.
    pub bytes: u64,
}

/// What one commit added.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CommitStats {
    /// Bytes of the files described (sum of manifest sizes).
    pub logical_bytes: u64,
    /// Chunk references in the manifests.
    pub chunks: u64,
    /// Distinct chunks nothing referenced before this commit.
    pub new_chunks: u64,
    /// Their bytes: what this import added to the library.
    pub new_bytes: u64,
}

/// What a removal freed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RemoveStats {
    /// Chunks whose last reference went away.
    pub freed_chunks: u64,
    /// Their bytes.
    pub freed_bytes: u64,
}

/// One damaged or missing chunk found by verification.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Damage {
    /// The chunk.
    pub id: ChunkId,
    /// What is wrong.
    pub detail: String,
}

/// The content library.
pub struct Library {
    db: DB,
    path: PathBuf,
    /// Imports hold it shared; deleting unreferenced chunks takes it
    /// exclusively, so no import can lose a chunk it found already stored.
    gate: Gate,
    /// Serialises reference-count read-modify-write between commits and removals.
    counts: Mutex<()>,
    /// The options of [`CF_PACKS`], which an import's table files are
    /// written with.
    pack_options: Options,
    chunks: AtomicU64,
    bytes: AtomicU64,
}

/// A key in [`CF_PACKS`].
type PackKey = [u8; 12];

fn pack_key(pack: u64, seq: u32) -> PackKey {
    let mut k = [0u8; 12];
    k[..8].copy_from_slice(&pack.to_be_bytes());
    k[8..].copy_from_slice(&seq.to_be_bytes());
    k
}

/// A chunk's [`CF_INDEX`] entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Entry {
    count: u64,
    len: u32,
    /// Its key in [`CF_PACKS`]; `None`: in [`CF_CHUNKS`] under its id.
    pack: Option<PackKey>,
}

impl Entry {
    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(24);
        v.extend(self.count.to_le_bytes());
        v.extend(self.len.to_le_bytes());
        if let Some(k) = &self.pack {
            v.extend(k);
        }
        v
    }

    fn parse(v: &[u8]) -> Option<Self> {
        if v.len() != 12 && v.len() != 24 {
            return None;
        }
        Some(Self {
            count: u64::from_le_bytes(v[..8].try_into().ok()?),
            len: u32::from_le_bytes(v[8..12].try_into().ok()?),
            pack: v.get(12..24).and_then(|k| k.try_into().ok()),
        })
    }

    fn with_count(self, count: u64) -> Self {
        Self { count, ..self }
    }
}

/// The options of [`CF_PACKS`]: chunks are compressed already; the table
/// index goes through the shared block cache, so it does not grow in memory
/// with the library; reads of chunk blocks bypass that cache
/// ([`Library::with_chunk`]).
fn pack_options(cache: &Cache) -> Options {
    let mut table = BlockBasedOptions::default();
    table.set_block_cache(cache);
    table.set_cache_index_and_filter_blocks(true);
    table.set_block_size(16 << 10);
    let mut o = Options::default();
    o.set_block_based_table_factory(&table);
    o.set_compression_type(DBCompressionType::None);
    o
}

fn manifest_prefix(package: &str, revision: u32) -> Vec<u8> {
    let mut k = package.as_bytes().to_vec();
    k.push(0);
    k.extend(revision.to_be_bytes());
    k
}

fn pending_key(import: u64, id: &ChunkId) -> [u8; 40] {
    let mut k = [0u8; 40];
    k[..8].copy_from_slice(&import.to_be_bytes());
    k[8..].copy_from_slice(id.as_bytes());
    k
}

fn hint_key(fingerprint: &[u8; 16], len: u64) -> Vec<u8> {
    let mut k = fingerprint.to_vec();
    k.extend(len.to_be_bytes());
    k
}

/// Hint entries of a manifest: (key, chunk list) per fingerprinted segment.
fn hints_of(m: &Manifest) -> impl Iterator<Item = (Vec<u8>, &[ChunkRef])> {
    m.segments.iter().filter_map(move |s| {
        s.fingerprint
            .map(|f| (hint_key(&f, s.len), m.segment_chunks(s)))
    })
}

impl Library {
    /// Opens (creating if needed) the library in `path` and reclaims chunks
    /// an earlier process wrote but never committed.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        // Chunk data, index and pending lists flush together, so a crash never
        // keeps a chunk while losing the entry that says it is uncommitted.
        opts.set_atomic_flush(true);
        opts.increase_parallelism(2);
        opts.set_max_open_files(512);
        opts.set_keep_log_file_num(5);
        let mut table = BlockBasedOptions::default();
        table.set_bloom_filter(10.0, false);
        // One block cache for every column family, of a fixed size: serving
        // a large image touches every block of the chunk index, and the
        // site's memory must not grow with the library.
        let cache = Cache::new_lru_cache(BLOCK_CACHE_BYTES);
        table.set_block_cache(&cache);
        let pack_opts = pack_options(&cache);
        let cfs = ALL_CFS.iter().map(|&name| {
            if name == CF_PACKS {
                return ColumnFamilyDescriptor::new(name, pack_options(&cache));
            }
            let mut o = Options::default();
            o.set_block_based_table_factory(&table);
            if name == CF_CHUNKS {
                // WIM resources are compressed already; keep values in blob
                // files so compaction moves keys, not gigabytes.
                o.set_compression_type(DBCompressionType::None);
                o.set_enable_blob_files(true);
                o.set_min_blob_size(4096);
                o.set_blob_file_size(256 << 20);
                o.set_blob_compression_type(DBCompressionType::None);
                // Blob GC inside every compaction rewrites live chunks while
                // imports run; it is run on purpose after removals instead
                // (`reclaim_space`).
                o.set_enable_blob_gc(false);
                o.set_write_buffer_size(64 << 20);
            } else {
                o.set_compression_type(DBCompressionType::Lz4);
            }
            ColumnFamilyDescriptor::new(name, o)
        });
        let db = DB::open_cf_descriptors(&opts, path, cfs).map_err(|source| StoreError::Db {
            path: path.to_path_buf(),
            source,
        })?;
        let lib = Self {
            db,
            path: path.to_path_buf(),
            gate: Gate::default(),
            counts: Mutex::new(()),
            pack_options: pack_opts,
            chunks: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
        };
        lib.drop_unfinished_packs()?;
        let (mut n, mut b) = (0u64, 0u64);
        for item in lib.db.iterator_cf(lib.cf(CF_INDEX), IteratorMode::Start) {
            let (_, v) = item.map_err(|e| lib.db_err(e))?;
            if let Some(e) = Entry::parse(&v) {
                n += 1;
                b += u64::from(e.len);
            }
        }
        lib.chunks.store(n, Ordering::Relaxed);
        lib.bytes.store(b, Ordering::Relaxed);
        // Chunks of imports that never committed (killed, failed) go now.
        lib.collect()?;
        Ok(lib)
    }

    /// The folder the library lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where imports write their table files before the commit hands them
    /// to RocksDB.
    fn incoming(&self) -> PathBuf {
        self.path.join("incoming")
    }

    /// After a crash: deletes the table files of imports that never
    /// committed, and the chunks of packs whose ingestion was not followed
    /// by their commit.
    fn drop_unfinished_packs(&self) -> Result<(), StoreError> {
        let incoming = self.incoming();
        let io = |e: std::io::Error| StoreError::Corrupt {
            what: format!("folder {}", incoming.display()),
            detail: e.to_string(),
        };
        match std::fs::remove_dir_all(&incoming) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(e)),
        }
        std::fs::create_dir_all(&incoming).map_err(io)?;
        let open = self
            .scan(CF_META, META_PACK_OPEN)?
            .into_iter()
            .filter_map(|(k, _)| {
                let b = <[u8; 8]>::try_from(&k[META_PACK_OPEN.len()..]).ok()?;
                Some(u64::from_be_bytes(b))
            });
        for pack in open {
            self.drop_pack(pack)?;
            tracing::info!(pack, "dropped the chunks of an import that never committed");
        }
        Ok(())
    }

    /// Deletes every chunk of `pack` and its ingestion marker: for a pack
    /// whose commit did not land.
    fn drop_pack(&self, pack: u64) -> Result<(), StoreError> {
        let (from, to) = (pack_key(pack, 0), pack_key(pack + 1, 0));
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(self.cf(CF_PACKS), from, to);
        batch.delete_cf(self.cf(CF_META), pack_open_key(pack));
        self.db
            .write_opt(batch, &Self::synced())
            .map_err(|e| self.db_err(e))?;
        self.db
            .compact_range_cf(self.cf(CF_PACKS), Some(&from[..]), Some(&to[..]));
        Ok(())
    }

    /// Allocates the next pack number, durably.
    fn next_pack(&self) -> Result<u64, StoreError> {
        let _counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let n = self.meta_u64(META_NEXT_PACK)? + 1;
        self.db
            .put_cf_opt(
                self.cf(CF_META),
                META_NEXT_PACK,
                n.to_le_bytes(),
                &Self::synced(),
            )
            .map_err(|e| self.db_err(e))?;
        Ok(n)
    }

    /// The [`CF_INDEX`] entry of a chunk.
    fn entry(&self, id: &ChunkId) -> Result<Option<Entry>, StoreError> {
        Ok(self
            .db
            .get_pinned_cf(self.cf(CF_INDEX), id.as_bytes())
            .map_err(|e| self.db_err(e))?
            .and_then(|v| Entry::parse(&v)))
    }

    /// Hands the stored bytes of a chunk to `f`, wherever they are, without
    /// hashing them (they were hashed when imported); RocksDB's block
    /// checksums catch a bad read. Chunk blocks are read once per request
    /// and would only push the index out of the block cache, so they bypass
    /// it.
    pub fn with_chunk<R>(&self, id: &ChunkId, f: impl FnOnce(&[u8]) -> R) -> Result<R, StoreError> {
        self.chunk_bytes(id, true, f)
    }

    /// [`with_chunk`](Self::with_chunk) for a chunk on its way to a DP,
    /// without RocksDB's block checksums: the DP hashes every chunk against
    /// its id (end to end, and stronger), asks again for one that does not
    /// match, then fails naming the chunk and the site's copy. Checksumming
    /// here as well was a sixth of the site's CPU per gigabyte served
    /// (BENCHMARKS.md). `content verify`, exports and servicing keep the
    /// checksums.
    pub fn with_chunk_for_dp<R>(
        &self,
        id: &ChunkId,
        f: impl FnOnce(&[u8]) -> R,
    ) -> Result<R, StoreError> {
        self.chunk_bytes(id, false, f)
    }

    fn chunk_bytes<R>(
        &self,
        id: &ChunkId,
        verify: bool,
        f: impl FnOnce(&[u8]) -> R,
    ) -> Result<R, StoreError> {
        let Some(entry) = self.entry(id)? else {
            return Err(StoreError::MissingChunk(*id));
        };
        let mut ro = ReadOptions::default();
        ro.fill_cache(false);
        ro.set_verify_checksums(verify);
        let got = match &entry.pack {
            Some(k) => self.db.get_pinned_cf_opt(self.cf(CF_PACKS), k, &ro),
            None => self
                .db
                .get_pinned_cf_opt(self.cf(CF_CHUNKS), id.as_bytes(), &ro),
        };
        match got {
            Ok(Some(v)) => Ok(f(&v)),
            Ok(None) => Err(StoreError::MissingChunk(*id)),
            Err(e) if e.kind() == rocksdb::ErrorKind::Corruption => Err(StoreError::Damaged {
                id: *id,
                detail: format!("storage checksum failed: {e}"),
            }),
            Err(e) => Err(self.db_err(e)),
        }
    }

    /// Deletes a chunk's bytes and index entry in `batch`.
    fn delete_chunk(&self, batch: &mut WriteBatch, id: &ChunkId, entry: &Entry) {
        batch.delete_cf(self.cf(CF_INDEX), id.as_bytes());
        match &entry.pack {
            Some(k) => batch.delete_cf(self.cf(CF_PACKS), k),
            None => batch.delete_cf(self.cf(CF_CHUNKS), id.as_bytes()),
        }
    }

    fn cf(&self, name: &str) -> &ColumnFamily {
        // Every name in ALL_CFS is opened in `open`; a missing one is a bug.
        self.db
            .cf_handle(name)
            .unwrap_or_else(|| panic!("column family {name} not opened"))
    }

    fn db_err(&self, source: rocksdb::Error) -> StoreError {
        StoreError::Db {
            path: self.path.clone(),
            source,
        }
    }

    fn synced() -> WriteOptions {
        let mut w = WriteOptions::default();
        w.set_sync(true);
        w
    }

    /// The state records whose keys start with `prefix`, in key order.
    pub fn state(&self, prefix: &[u8]) -> Result<Vec<StateRecord>, StoreError> {
        self.scan(CF_STATE, prefix)
    }

    /// The records of column family `cf` whose keys start with `prefix`, in
    /// key order.
    fn scan(&self, cf: &str, prefix: &[u8]) -> Result<Vec<StateRecord>, StoreError> {
        let mut out = Vec::new();
        let it = self
            .db
            .iterator_cf(self.cf(cf), IteratorMode::From(prefix, Direction::Forward));
        for item in it {
            let (k, v) = item.map_err(|e| self.db_err(e))?;
            if !k.starts_with(prefix) {
                break;
            }
            out.push((k.into_vec(), v.into_vec()));
        }
        Ok(out)
    }

    /// Puts (`Some`) and deletes (`None`) state records, all or none, synced.
    pub fn write_state(&self, changes: &[StateChange]) -> Result<(), StoreError> {
        if changes.is_empty() {
            return Ok(());
        }
        let mut b = WriteBatch::default();
        for (k, v) in changes {
            match v {
                Some(v) => b.put_cf(self.cf(CF_STATE), k, v),
                None => b.delete_cf(self.cf(CF_STATE), k),
            }
        }
        self.db
            .write_opt(b, &Self::synced())
            .map_err(|e| self.db_err(e))
    }

    /// Chunks and bytes stored (referenced or awaiting collection).
    pub fn stats(&self) -> LibraryStats {
        LibraryStats {
            chunks: self.chunks.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
        }
    }

    /// Starts an import. Chunks it writes stay uncommitted until
    /// [`Import::commit`]; dropping it uncommitted leaves them for
    /// [`Library::collect`].
    pub fn begin_import(&self) -> Import<'_> {
        Import {
            lib: self,
            _shared: self.gate.shared(),
            writer: None,
            pack: None,
            files: Vec::new(),
            written: HashMap::new(),
        }
    }

    /// Deletes every chunk that is listed as pending and has no reference,
    /// and clears the pending lists. Waits for running imports to end.
    pub fn collect(&self) -> Result<RemoveStats, StoreError> {
        let exclusive = self.gate.exclusive();
        self.collect_locked(&exclusive)
    }

    /// Runs [`Library::collect`] only if no import is running right now.
    pub fn try_collect(&self) -> Result<Option<RemoveStats>, StoreError> {
        match self.gate.try_exclusive() {
            Some(exclusive) => self.collect_locked(&exclusive).map(Some),
            None => Ok(None),
        }
    }

    /// [`Library::collect`] with the gate held exclusively by the caller.
    fn collect_locked(&self, _exclusive: &Exclusive<'_>) -> Result<RemoveStats, StoreError> {
        let _counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let mut batch = WriteBatch::default();
        let mut freed = RemoveStats::default();
        let mut seen = HashSet::new();
        for item in self
            .db
            .iterator_cf(self.cf(CF_PENDING), IteratorMode::Start)
        {
            let (k, _) = item.map_err(|e| self.db_err(e))?;
            batch.delete_cf(self.cf(CF_PENDING), &k);
            let Some(id) = ChunkId::from_slice(&k[8..]) else {
                continue;
            };
            if !seen.insert(id) {
                continue;
            }
            if let Some(e) = self.entry(&id)?.filter(|e| e.count == 0) {
                self.delete_chunk(&mut batch, &id, &e);
                freed.freed_chunks += 1;
                freed.freed_bytes += u64::from(e.len);
            }
        }
        let garbage = self.meta_u64(META_GARBAGE)? + freed.freed_bytes;
        batch.put_cf(self.cf(CF_META), META_GARBAGE, garbage.to_le_bytes());
        self.db
            .write_opt(batch, &Self::synced())
            .map_err(|e| self.db_err(e))?;
        self.chunks.fetch_sub(freed.freed_chunks, Ordering::Relaxed);
        self.bytes.fetch_sub(freed.freed_bytes, Ordering::Relaxed);
        let live = self.bytes.load(Ordering::Relaxed);
        if garbage >= RECLAIM_MIN_BYTES.max(live / RECLAIM_SHARE) {
            self.reclaim_space()?;
        }
        Ok(freed)
    }

    fn meta_u64(&self, key: &[u8]) -> Result<u64, StoreError> {
        Ok(self
            .db
            .get_cf(self.cf(CF_META), key)
            .map_err(|e| self.db_err(e))?
            .and_then(|v| v.try_into().ok().map(u64::from_le_bytes))
            .unwrap_or(0))
    }

    /// Rewrites the chunk files without the chunks deleted since the last
    /// time: a compaction of the packs, and of the older chunk keys with blob
    /// garbage collection on. Runs by itself once enough was freed; callable
    /// any time.
    pub fn reclaim_space(&self) -> Result<(), StoreError> {
        let mut opts = rocksdb::CompactOptions::default();
        opts.set_bottommost_level_compaction(rocksdb::BottommostLevelCompaction::Force);
        self.db
            .compact_range_cf_opt(self.cf(CF_PACKS), None::<&[u8]>, None::<&[u8]>, &opts);
        let cf = self.cf(CF_CHUNKS);
        let set = |on: &str| {
            self.db
                .set_options_cf(
                    cf,
                    &[
                        ("enable_blob_garbage_collection", on),
                        ("blob_garbage_collection_age_cutoff", "1.0"),
                    ],
                )
                .map_err(|e| self.db_err(e))
        };
        set("true")?;
        self.db
            .compact_range_cf_opt(cf, None::<&[u8]>, None::<&[u8]>, &opts);
        set("false")?;
        self.db
            .put_cf_opt(
                self.cf(CF_META),
                META_GARBAGE,
                0u64.to_le_bytes(),
                &Self::synced(),
            )
            .map_err(|e| self.db_err(e))?;
        tracing::info!(path = %self.path.display(), "reclaimed the space of deleted chunks");
        Ok(())
    }

    /// Allocates the next package number (1, 2, …), durably.
    pub fn next_package_number(&self) -> Result<u64, StoreError> {
        let _counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let cur = self
            .db
            .get_cf(self.cf(CF_META), b"next-package")
            .map_err(|e| self.db_err(e))?
            .and_then(|v| v.try_into().ok().map(u64::from_le_bytes))
            .unwrap_or(1);
        self.db
            .put_cf_opt(
                self.cf(CF_META),
                b"next-package",
                (cur + 1).to_le_bytes(),
                &Self::synced(),
            )
            .map_err(|e| self.db_err(e))?;
        Ok(cur)
    }

    /// The catalog record of a package.
    pub fn package(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.db
            .get_cf(self.cf(CF_PACKAGES), id.as_bytes())
            .map_err(|e| self.db_err(e))
    }

    /// Every package id with its record, in id order.
    pub fn packages(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.db
            .iterator_cf(self.cf(CF_PACKAGES), IteratorMode::Start)
            .map(|item| {
                let (k, v) = item.map_err(|e| self.db_err(e))?;
                Ok((String::from_utf8_lossy(&k).into_owned(), v.into_vec()))
            })
            .collect()
    }

    /// The manifests of one revision of a package, in file order.
    pub fn manifests(&self, package: &str, revision: u32) -> Result<Vec<Manifest>, StoreError> {
        let prefix = manifest_prefix(package, revision);
        let mut out = Vec::new();
        let it = self.db.iterator_cf(
            self.cf(CF_MANIFESTS),
            IteratorMode::From(&prefix, Direction::Forward),
        );
        for item in it {
            let (k, v) = item.map_err(|e| self.db_err(e))?;
            if !k.starts_with(&prefix) {
                break;
            }
            out.push(Manifest::decode(&v).map_err(|e| StoreError::Corrupt {
                what: format!("manifest of {package} revision {revision}"),
                detail: e.to_string(),
            })?);
        }
        Ok(out)
    }

    /// Revisions of `package` that have manifests.
    pub fn revisions(&self, package: &str) -> Result<Vec<u32>, StoreError> {
        let mut prefix = package.as_bytes().to_vec();
        prefix.push(0);
        let mut out = Vec::new();
        let it = self.db.iterator_cf(
            self.cf(CF_MANIFESTS),
            IteratorMode::From(&prefix, Direction::Forward),
        );
        for item in it {
            let (k, _) = item.map_err(|e| self.db_err(e))?;
            if !k.starts_with(&prefix) || k.len() < prefix.len() + 8 {
                break;
            }
            let rev = u32::from_be_bytes([
                k[prefix.len()],
                k[prefix.len() + 1],
                k[prefix.len() + 2],
                k[prefix.len() + 3],
            ]);
            if out.last() != Some(&rev) {
                out.push(rev);
            }
        }
        Ok(out)
    }

    /// Whether the chunk is stored (referenced or not).
    pub fn has_chunk(&self, id: &ChunkId) -> Result<bool, StoreError> {
        Ok(self
            .db
            .get_pinned_cf(self.cf(CF_INDEX), id.as_bytes())
            .map_err(|e| self.db_err(e))?
            .is_some())
    }

    /// Reads a chunk and checks it against its id.
    pub fn read_chunk(&self, id: &ChunkId) -> Result<Vec<u8>, StoreError> {
        let v = self.with_chunk(id, <[u8]>::to_vec)?;
        if ChunkId::of(&v) != *id {
            return Err(StoreError::Damaged {
                id: *id,
                detail: "its bytes do not hash to its id".into(),
            });
        }
        Ok(v)
    }

    /// Checks each chunk of `ids` (each once) and returns the damaged or
    /// missing ones. `on_chunk` is told each chunk's length as it is checked.
    pub fn verify(
        &self,
        ids: impl IntoIterator<Item = ChunkId>,
        mut on_chunk: impl FnMut(u64),
    ) -> Result<Vec<Damage>, StoreError> {
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for id in ids {
            if !seen.insert(id) {
                continue;
            }
            match self.read_chunk(&id) {
                Ok(v) => on_chunk(v.len() as u64),
                Err(StoreError::MissingChunk(id)) => out.push(Damage {
                    id,
                    detail: "missing".into(),
                }),
                Err(StoreError::Damaged { id, detail }) => out.push(Damage { id, detail }),
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// Every stored chunk id, from the index.
    pub fn chunk_ids(&self) -> Result<Vec<ChunkId>, StoreError> {
        self.db
            .iterator_cf(self.cf(CF_INDEX), IteratorMode::Start)
            .filter_map(|item| match item {
                Ok((k, _)) => ChunkId::from_slice(&k).map(Ok),
                Err(e) => Some(Err(self.db_err(e))),
            })
            .collect()
    }

    /// Reference count and length of a chunk, if stored.
    pub fn chunk_info(&self, id: &ChunkId) -> Result<Option<(u64, u32)>, StoreError> {
        Ok(self.entry(id)?.map(|e| (e.count, e.len)))
    }

    /// Chunk lists of segments seen before with this
    /// [`fingerprint`](ferry_core::segment::fingerprint) and at most
    /// `max_len` bytes, longest first.
    pub fn hints(&self, fp: &[u8; 16], max_len: u64) -> Result<Vec<Vec<ChunkRef>>, StoreError> {
        let lib = self;
        let mut out = Vec::new();
        let it = lib.db.iterator_cf(
            lib.cf(CF_HINTS),
            IteratorMode::From(fp.as_slice(), Direction::Forward),
        );
        for item in it {
            let (k, v) = item.map_err(|e| lib.db_err(e))?;
            if !k.starts_with(fp) || k.len() != 24 {
                break;
            }
            let len = u64::from_be_bytes(k[16..24].try_into().unwrap_or([0xFF; 8]));
            if len > max_len {
                break;
            }
            if let Ok(chunks) = postcard::from_bytes::<Vec<ChunkRef>>(&v) {
                out.push(chunks);
            }
        }
        out.reverse();
        Ok(out)
    }

    /// Rewrites a package's catalog record with `f` (given the stored
    /// bytes), synced, serialised with commits and removals.
    pub fn update_package(
        &self,
        package: &str,
        f: impl FnOnce(&[u8]) -> Result<Vec<u8>, StoreError>,
    ) -> Result<(), StoreError> {
        let _counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let old = self
            .package(package)?
            .ok_or_else(|| StoreError::NoPackage(package.to_string()))?;
        let new = f(&old)?;
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(CF_PACKAGES), package.as_bytes(), new);
        self.db
            .write_opt(batch, &Self::synced())
            .map_err(|e| self.db_err(e))
    }

    /// Deletes a package: its record, every revision's manifests, and one
    /// reference per manifest entry. Chunks left unreferenced are freed at
    /// once when no import runs, else by the next [`Library::collect`].
    pub fn remove_package(&self, package: &str) -> Result<RemoveStats, StoreError> {
        if self.package(package)?.is_none() {
            return Err(StoreError::NoPackage(package.to_string()));
        }
        let revs = self.revisions(package)?;
        self.remove_revisions(package, &revs, true, |_| Ok(None))
    }

    /// Deletes one revision's manifests and their references, keeping the
    /// package and its other revisions. `record` is given the package's
    /// catalog record as stored now (read under the library's lock); what it
    /// returns replaces it in the same write (to drop the revision from it).
    pub fn remove_revision(
        &self,
        package: &str,
        revision: u32,
        record: impl FnOnce(Option<&[u8]>) -> Result<Option<Vec<u8>>, StoreError>,
    ) -> Result<RemoveStats, StoreError> {
        self.remove_revisions(package, &[revision], false, record)
    }

    fn remove_revisions(
        &self,
        package: &str,
        revisions: &[u32],
        record_too: bool,
        new_record: impl FnOnce(Option<&[u8]>) -> Result<Option<Vec<u8>>, StoreError>,
    ) -> Result<RemoveStats, StoreError> {
        let mut batch = WriteBatch::default();
        if record_too {
            batch.delete_cf(self.cf(CF_PACKAGES), package.as_bytes());
        }
        {
            let _counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(r) = new_record(self.package(package)?.as_deref())? {
                batch.put_cf(self.cf(CF_PACKAGES), package.as_bytes(), r);
            }
            let mut drops: HashMap<ChunkId, u64> = HashMap::new();
            let mut hints = Vec::new();
            for &rev in revisions {
                let prefix = manifest_prefix(package, rev);
                let mut end = prefix.clone();
                end.extend([0xFF; 8]);
                batch.delete_range_cf(self.cf(CF_MANIFESTS), &prefix, &end);
                for m in self.manifests(package, rev)? {
                    for c in &m.chunks {
                        *drops.entry(c.id).or_default() += 1;
                    }
                    hints.extend(hints_of(&m).map(|(k, _)| k));
                }
            }
            for (id, n) in drops {
                let Some(e) = self.entry(&id)? else {
                    continue;
                };
                let left = e.count.saturating_sub(n);
                batch.put_cf(
                    self.cf(CF_INDEX),
                    id.as_bytes(),
                    e.with_count(left).encode(),
                );
                if left == 0 {
                    batch.put_cf(self.cf(CF_PENDING), pending_key(GARBAGE_IMPORT, &id), []);
                }
            }
            for k in hints {
                batch.delete_cf(self.cf(CF_HINTS), k);
            }
            self.db
                .write_opt(batch, &Self::synced())
                .map_err(|e| self.db_err(e))?;
        }
        Ok(self.try_collect()?.unwrap_or_default())
    }
}

fn pack_open_key(pack: u64) -> Vec<u8> {
    [META_PACK_OPEN, &pack.to_be_bytes()].concat()
}

/// One import in progress. See [`Library::begin_import`].
pub struct Import<'a> {
    lib: &'a Library,
    _shared: Shared<'a>,
    /// The table file being written (declared before `files`: it is closed
    /// before they are deleted).
    writer: Option<SstFileWriter<'a>>,
    /// This import's pack number, taken at its first new chunk.
    pack: Option<u64>,
    /// The pack's table files, in key order; the last one is being written.
    files: Vec<PathBuf>,
    /// The chunks this import wrote: id → (length, sequence number in the
    /// pack).
    written: HashMap<ChunkId, (u32, u32)>,
}

impl Drop for Import<'_> {
    fn drop(&mut self) {
        // Uncommitted (or committed: the files were moved into the library).
        self.writer = None;
        for f in &self.files {
            let _ = std::fs::remove_file(f);
        }
    }
}

impl<'a> Import<'a> {
    /// The library this import writes to.
    pub fn library(&self) -> &'a Library {
        self.lib
    }

    /// Whether the chunk is stored already (or written by this import).
    pub fn has_chunk(&self, id: &ChunkId) -> Result<bool, StoreError> {
        Ok(self.written.contains_key(id) || self.lib.has_chunk(id)?)
    }

    /// Stores a chunk unless it is there already. Returns whether it was new.
    /// The caller has hashed `data` to `id`. The bytes go to this import's
    /// pack file; they join the library at [`Import::commit`].
    pub fn put_chunk(&mut self, id: &ChunkId, data: &[u8]) -> Result<bool, StoreError> {
        if self.has_chunk(id)? {
            return Ok(false);
        }
        let lib = self.lib;
        let pack = match self.pack {
            Some(p) => p,
            None => {
                let p = lib.next_pack()?;
                self.pack = Some(p);
                p
            }
        };
        if self
            .writer
            .as_ref()
            .is_none_or(|w| w.file_size() >= PACK_FILE_BYTES)
        {
            self.finish_file()?;
            let path = lib
                .incoming()
                .join(format!("{pack:016x}-{}.sst", self.files.len()));
            let w = SstFileWriter::create(&lib.pack_options);
            w.open(&path).map_err(|e| lib.db_err(e))?;
            self.files.push(path);
            self.writer = Some(w);
        }
        let seq = u32::try_from(self.written.len())
            .map_err(|_| StoreError::Refused("an import of more than 4 billion chunks".into()))?;
        let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
        if let Some(w) = self.writer.as_mut() {
            w.put(pack_key(pack, seq), data)
                .map_err(|e| lib.db_err(e))?;
        }
        self.written.insert(*id, (len, seq));
        Ok(true)
    }

    /// Finishes (and syncs) the table file being written, if any.
    fn finish_file(&mut self) -> Result<(), StoreError> {
        if let Some(mut w) = self.writer.take() {
            w.finish().map_err(|e| self.lib.db_err(e))?;
        }
        Ok(())
    }

    /// Makes the import visible: hands its pack files to RocksDB, then
    /// writes the manifests as `revision` of `package`, the catalog record,
    /// the index entries of its new chunks, one reference per manifest
    /// entry, and the segment hints, all in one synced batch. `record`
    /// builds the catalog record from the commit's figures and the record
    /// stored now (if any), both read under the lock that serialises
    /// commits, removals and record updates: the figures are exact and no
    /// concurrent change to the record is lost.
    pub fn commit(
        mut self,
        package: &str,
        revision: u32,
        manifests: &[Manifest],
        record: impl FnOnce(&CommitStats, Option<&[u8]>) -> Result<Vec<u8>, StoreError>,
    ) -> Result<CommitStats, StoreError> {
        self.finish_file()?;
        let lib = self.lib;
        let mut batch = WriteBatch::default();
        let mut stats = CommitStats::default();
        let mut adds: HashMap<ChunkId, u64> = HashMap::new();
        for (n, m) in manifests.iter().enumerate() {
            let mut key = manifest_prefix(package, revision);
            key.extend((n as u32).to_be_bytes());
            batch.put_cf(lib.cf(CF_MANIFESTS), key, m.encode());
            stats.logical_bytes += m.size;
            stats.chunks += m.chunks.len() as u64;
            for c in &m.chunks {
                *adds.entry(c.id).or_default() += 1;
            }
            for (key, chunks) in hints_of(m) {
                batch.put_cf(
                    lib.cf(CF_HINTS),
                    key,
                    postcard::to_stdvec(chunks).unwrap_or_default(),
                );
            }
        }

        let _counts = lib.counts.lock().unwrap_or_else(|p| p.into_inner());
        // Committing a revision twice would count its references twice.
        if !lib.manifests(package, revision)?.is_empty() {
            return Err(StoreError::RevisionExists {
                package: package.to_string(),
                revision,
            });
        }
        if let Some(pack) = self.pack {
            lib.db
                .put_cf_opt(lib.cf(CF_META), pack_open_key(pack), [], &Library::synced())
                .map_err(|e| lib.db_err(e))?;
            let mut io = IngestExternalFileOptions::default();
            io.set_move_files(true);
            lib.db
                .ingest_external_file_cf_opts(lib.cf(CF_PACKS), &io, self.files.clone())
                .map_err(|e| lib.db_err(e))?;
            batch.delete_cf(lib.cf(CF_META), pack_open_key(pack));
        }
        let done = self.index_and_write(batch, adds, &mut stats, package, record);
        if let (Err(_), Some(pack)) = (&done, self.pack) {
            // Ingested but not committed: nothing names these chunks. (If
            // this fails too, the marker stays and the next open does it.)
            let _ = lib.drop_pack(pack);
        }
        done.map(|()| stats)
    }

    /// The second half of [`Import::commit`], under its lock, after the
    /// pack is ingested: index entries and references, then the batch.
    fn index_and_write(
        &self,
        mut batch: WriteBatch,
        adds: HashMap<ChunkId, u64>,
        stats: &mut CommitStats,
        package: &str,
        record: impl FnOnce(&CommitStats, Option<&[u8]>) -> Result<Vec<u8>, StoreError>,
    ) -> Result<(), StoreError> {
        let lib = self.lib;
        let mut used = HashSet::new();
        let mut added = LibraryStats::default();
        for (id, n) in adds {
            let entry = match lib.entry(&id)? {
                Some(e) => e,
                None => {
                    let &(len, seq) = self.written.get(&id).ok_or(StoreError::MissingChunk(id))?;
                    used.insert(id);
                    added.chunks += 1;
                    added.bytes += u64::from(len);
                    Entry {
                        count: 0,
                        len,
                        pack: self.pack.map(|p| pack_key(p, seq)),
                    }
                }
            };
            if entry.count == 0 {
                stats.new_chunks += 1;
                stats.new_bytes += u64::from(entry.len);
            }
            batch.put_cf(
                lib.cf(CF_INDEX),
                id.as_bytes(),
                entry.with_count(entry.count + n).encode(),
            );
        }
        // Chunks another import committed meanwhile, or that no manifest
        // names: this pack's copies are garbage from the start.
        let mut garbage = 0u64;
        if let Some(pack) = self.pack {
            for (id, &(len, seq)) in &self.written {
                if !used.contains(id) {
                    batch.delete_cf(lib.cf(CF_PACKS), pack_key(pack, seq));
                    garbage += u64::from(len);
                }
            }
        }
        if garbage > 0 {
            let total = lib.meta_u64(META_GARBAGE)? + garbage;
            batch.put_cf(lib.cf(CF_META), META_GARBAGE, total.to_le_bytes());
        }
        let current = lib.package(package)?;
        batch.put_cf(
            lib.cf(CF_PACKAGES),
            package.as_bytes(),
            record(stats, current.as_deref())?,
        );
        lib.db
            .write_opt(batch, &Library::synced())
            .map_err(|e| lib.db_err(e))?;
        lib.chunks.fetch_add(added.chunks, Ordering::Relaxed);
        lib.bytes.fetch_add(added.bytes, Ordering::Relaxed);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_core::manifest::SegmentRecord;
    use ferry_core::{FileHash, SegmentKind};

    /// Stores `data` as one file of `package` cut into 64 KiB chunks.
    fn import(lib: &Library, package: &str, data: &[u8]) -> CommitStats {
        let mut imp = lib.begin_import();
        let chunks: Vec<ChunkRef> = data
            .chunks(64 << 10)
            .map(|c| {
                let id = ChunkId::of(c);
                imp.put_chunk(&id, c).unwrap();
                ChunkRef {
                    id,
                    len: c.len() as u32,
                }
            })
            .collect();
        let m = Manifest {
            path: "f.bin".into(),
            size: data.len() as u64,
            hash: FileHash::of(data),
            segments: vec![SegmentRecord {
                kind: SegmentKind::Data,
                offset: 0,
                len: data.len() as u64,
                first_chunk: 0,
                chunk_count: chunks.len() as u32,
                fingerprint: None,
            }],
            chunks,
        };
        imp.commit(package, 1, &[m], |_, _| Ok(b"{}".to_vec()))
            .unwrap()
    }

    /// `len` pseudo-random bytes: no two 64 KiB chunks alike.
    fn data(len: usize, seed: u8) -> Vec<u8> {
        use rand::{RngCore, SeedableRng};
        let mut out = vec![0u8; len];
        rand::rngs::SmallRng::seed_from_u64(u64::from(seed)).fill_bytes(&mut out);
        out
    }

    fn disk_bytes(dir: &Path) -> u64 {
        std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.metadata().unwrap().len())
            .sum()
    }

    #[test]
    fn shared_chunks_are_counted_and_freed_once_unreferenced() {
        let dir = tempfile::tempdir().unwrap();
        let lib = Library::open(dir.path()).unwrap();
        let a = data(1 << 20, 1);
        let s1 = import(&lib, "A", &a);
        assert_eq!(s1.new_bytes, 1 << 20);
        let s2 = import(&lib, "B", &a);
        assert_eq!(s2.new_bytes, 0, "the same content is stored once");
        assert_eq!(lib.stats().bytes, 1 << 20);
        assert_eq!(lib.remove_package("A").unwrap().freed_bytes, 0);
        assert_eq!(lib.remove_package("B").unwrap().freed_bytes, 1 << 20);
        assert_eq!(lib.stats(), LibraryStats::default());
        assert!(matches!(
            lib.remove_package("B"),
            Err(StoreError::NoPackage(_))
        ));
    }

    #[test]
    fn uncommitted_chunks_are_reclaimed_at_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let lib = Library::open(dir.path()).unwrap();
            let mut imp = lib.begin_import();
            let d = data(100_000, 3);
            imp.put_chunk(&ChunkId::of(&d), &d).unwrap();
            imp.finish_file().unwrap();
            assert_eq!(imp.files.len(), 1);
            assert!(imp.files[0].exists(), "the pack file is on disk");
            // Killed before commit: nothing runs at the end.
            std::mem::forget(imp);
        }
        let lib = Library::open(dir.path()).unwrap();
        assert_eq!(lib.stats(), LibraryStats::default());
        assert!(lib.chunk_ids().unwrap().is_empty());
        let left = std::fs::read_dir(lib.incoming()).unwrap().count();
        assert_eq!(left, 0, "the unfinished pack file was deleted");
    }

    #[test]
    fn a_pack_ingested_but_never_committed_is_dropped_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let d = data(2 << 20, 8);
        let (pack, before) = {
            let lib = Library::open(dir.path()).unwrap();
            let before = disk_bytes(dir.path());
            let mut imp = lib.begin_import();
            imp.put_chunk(&ChunkId::of(&d), &d).unwrap();
            imp.finish_file().unwrap();
            // What `commit` does before its batch, then a crash.
            let pack = imp.pack.unwrap();
            lib.db
                .put_cf(lib.cf(CF_META), pack_open_key(pack), [])
                .unwrap();
            let mut io = IngestExternalFileOptions::default();
            io.set_move_files(true);
            lib.db
                .ingest_external_file_cf_opts(lib.cf(CF_PACKS), &io, imp.files.clone())
                .unwrap();
            let k = pack_key(pack, 0);
            assert!(lib.db.get_cf(lib.cf(CF_PACKS), k).unwrap().is_some());
            std::mem::forget(imp);
            (pack, before)
        };
        let lib = Library::open(dir.path()).unwrap();
        assert!(
            lib.db
                .get_cf(lib.cf(CF_PACKS), pack_key(pack, 0))
                .unwrap()
                .is_none(),
            "the pack's chunks are gone"
        );
        assert!(lib.meta_u64(&pack_open_key(pack)).unwrap() == 0);
        assert_eq!(lib.stats(), LibraryStats::default());
        let after = disk_bytes(dir.path());
        assert!(after < before + (1 << 20), "space came back: {after}");
        // The next import takes a new pack and commits as usual.
        assert_eq!(import(&lib, "A", &d).new_bytes, 2 << 20);
        assert!(lib.next_pack().unwrap() > pack + 1);
    }

    #[test]
    fn chunks_of_an_earlier_release_are_read_counted_and_freed() {
        let dir = tempfile::tempdir().unwrap();
        // One 64 KiB chunk, as `import` cuts it.
        let d = data(64 << 10, 7);
        let id = ChunkId::of(&d);
        {
            let lib = Library::open(dir.path()).unwrap();
            // As releases before packs stored a chunk: bytes under its id,
            // a 12-byte index entry, then a commit that references it.
            let mut b = WriteBatch::default();
            b.put_cf(lib.cf(CF_CHUNKS), id.as_bytes(), &d);
            let old = Entry {
                count: 0,
                len: d.len() as u32,
                pack: None,
            };
            assert_eq!(old.encode().len(), 12);
            b.put_cf(lib.cf(CF_INDEX), id.as_bytes(), old.encode());
            lib.db.write(b).unwrap();
        }
        let lib = Library::open(dir.path()).unwrap();
        assert_eq!(lib.stats().bytes, 64 << 10);
        let s = import(&lib, "A", &d);
        assert_eq!(
            s.new_bytes,
            64 << 10,
            "unreferenced before: new to the catalog"
        );
        assert_eq!(lib.stats().bytes, 64 << 10, "but not stored again");
        assert_eq!(lib.meta_u64(META_NEXT_PACK).unwrap(), 0, "no pack written");
        assert_eq!(lib.read_chunk(&id).unwrap(), d);
        assert_eq!(lib.remove_package("A").unwrap().freed_bytes, 64 << 10);
        assert!(!lib.has_chunk(&id).unwrap());
        assert!(lib
            .db
            .get_cf(lib.cf(CF_CHUNKS), id.as_bytes())
            .unwrap()
            .is_none());
    }

    #[test]
    fn a_revision_commits_once() {
        let dir = tempfile::tempdir().unwrap();
        let lib = Library::open(dir.path()).unwrap();
        let a = data(100_000, 9);
        import(&lib, "A", &a);
        let again = lib.begin_import();
        let m = lib.manifests("A", 1).unwrap();
        let e = again
            .commit("A", 1, &m, |_, _| Ok(b"{}".to_vec()))
            .unwrap_err();
        assert!(
            matches!(e, StoreError::RevisionExists { revision: 1, .. }),
            "{e}"
        );
        assert!(e.is_retryable());
        // One reference, not two: removing the package frees the chunks.
        assert_eq!(lib.remove_package("A").unwrap().freed_bytes, 100_000);
    }

    #[test]
    fn removal_waits_for_no_import_before_deleting() {
        let dir = tempfile::tempdir().unwrap();
        let lib = Library::open(dir.path()).unwrap();
        let a = data(200_000, 4);
        import(&lib, "A", &a);
        let imp = lib.begin_import();
        // An import is running: the chunks lose their reference but stay.
        let freed = lib.remove_package("A").unwrap();
        assert_eq!(freed, RemoveStats::default());
        assert!(lib.has_chunk(&ChunkId::of(&a[..64 << 10])).unwrap());
        drop(imp);
        assert_eq!(lib.collect().unwrap().freed_bytes, 200_000);
    }

    #[test]
    fn freed_space_returns_to_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let lib = Library::open(dir.path()).unwrap();
        let big = data(96 << 20, 5);
        import(&lib, "A", &big);
        let full = disk_bytes(dir.path());
        assert!(full > 90 << 20, "chunks are on disk: {full}");
        lib.remove_package("A").unwrap();
        let after = disk_bytes(dir.path());
        assert!(after < 16 << 20, "space came back: {full} → {after}");
    }
}
