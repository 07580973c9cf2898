//! The [`Library`]: RocksDB column families and the operations over them.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use ferry_core::{ChunkId, ChunkRef, Manifest};
use rocksdb::{
    BlockBasedOptions, ColumnFamily, ColumnFamilyDescriptor, DBCompressionType, Direction,
    FlushOptions, IteratorMode, Options, WriteBatch, WriteOptions, DB,
};
use thiserror::Error;

/// key: [`ChunkId`] (32 bytes) → value: the chunk's bytes. Large values live
/// in RocksDB blob files, so compaction does not rewrite them.
pub const CF_CHUNKS: &str = "chunks";
/// key: [`ChunkId`] → value: reference count (u64 LE) ++ chunk length (u32
/// LE). Present exactly when the chunk is in [`CF_CHUNKS`]; a count of 0
/// means stored but not (yet, or no longer) referenced.
pub const CF_INDEX: &str = "index";
/// key: package id (UTF-8) → value: the catalog record, opaque to the store.
pub const CF_PACKAGES: &str = "packages";
/// key: package id ++ 0x00 ++ revision (u32 BE) ++ file number (u32 BE) →
/// value: [`Manifest::encode`] bytes.
pub const CF_MANIFESTS: &str = "manifests";
/// key: import id (u64 BE) ++ [`ChunkId`] → empty. Chunks written by an
/// import that has not committed, and (import id 0) chunks whose count fell
/// to 0; [`Library::collect`] deletes those still unreferenced.
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

const ALL_CFS: [&str; 8] = [
    CF_CHUNKS,
    CF_INDEX,
    CF_PACKAGES,
    CF_MANIFESTS,
    CF_PENDING,
    CF_HINTS,
    CF_META,
    CF_STATE,
];
/// Unlogged chunk writes are batched up to this many bytes.
const CHUNK_BATCH_BYTES: usize = 8 * 1024 * 1024;
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
/// Import ids with this bit set belong to named, durable stages
/// ([`Library::begin_staged`]); their pending chunks survive a restart.
const STAGE_BIT: u64 = 1 << 63;
/// Meta key prefix of a stage: `stage\0` ++ name → import id (u64 LE).
const META_STAGE: &[u8] = b"stage\0";
const META_NEXT_STAGE: &[u8] = b"next-stage";

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
    gate: RwLock<()>,
    /// Serialises reference-count read-modify-write between commits and removals.
    counts: Mutex<()>,
    next_import: AtomicU64,
    chunks: AtomicU64,
    bytes: AtomicU64,
}

fn index_value(count: u64, len: u32) -> [u8; 12] {
    let mut v = [0u8; 12];
    v[..8].copy_from_slice(&count.to_le_bytes());
    v[8..].copy_from_slice(&len.to_le_bytes());
    v
}

fn parse_index(v: &[u8]) -> Option<(u64, u32)> {
    if v.len() != 12 {
        return None;
    }
    let count = u64::from_le_bytes(v[..8].try_into().ok()?);
    let len = u32::from_le_bytes(v[8..].try_into().ok()?);
    Some((count, len))
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
        table.set_block_cache(&rocksdb::Cache::new_lru_cache(BLOCK_CACHE_BYTES));
        let cfs = ALL_CFS.iter().map(|&name| {
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
            gate: RwLock::new(()),
            counts: Mutex::new(()),
            next_import: AtomicU64::new(GARBAGE_IMPORT + 1),
            chunks: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
        };
        let (mut n, mut b) = (0u64, 0u64);
        for item in lib.db.iterator_cf(lib.cf(CF_INDEX), IteratorMode::Start) {
            let (_, v) = item.map_err(|e| lib.db_err(e))?;
            if let Some((_, len)) = parse_index(&v) {
                n += 1;
                b += u64::from(len);
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
        let mut out = Vec::new();
        let it = self.db.iterator_cf(
            self.cf(CF_STATE),
            IteratorMode::From(prefix, Direction::Forward),
        );
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
            _shared: self.gate.read().unwrap_or_else(|p| p.into_inner()),
            id: self.next_import.fetch_add(1, Ordering::Relaxed),
            batch: WriteBatch::default(),
            batch_bytes: 0,
            batch_ids: HashSet::new(),
            stage: None,
        }
    }

    /// Starts or resumes the durable import called `name`. Its chunks are
    /// written through the write-ahead log ([`Import::persist`]) and, unlike
    /// those of [`Library::begin_import`], survive a restart: beginning the
    /// same name again finds them stored ([`Import::has_chunk`]). Ends with
    /// [`Import::commit`] or [`Library::abandon_stage`].
    pub fn begin_staged(&self, name: &str) -> Result<Import<'_>, StoreError> {
        let key = [META_STAGE, name.as_bytes()].concat();
        let id = {
            let _counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
            match self.meta_u64(&key)? {
                0 => {
                    let n = self.meta_u64(META_NEXT_STAGE)? + 1;
                    let mut b = WriteBatch::default();
                    b.put_cf(self.cf(CF_META), META_NEXT_STAGE, n.to_le_bytes());
                    b.put_cf(self.cf(CF_META), &key, (STAGE_BIT | n).to_le_bytes());
                    self.db
                        .write_opt(b, &Self::synced())
                        .map_err(|e| self.db_err(e))?;
                    STAGE_BIT | n
                }
                id => id,
            }
        };
        Ok(Import {
            lib: self,
            _shared: self.gate.read().unwrap_or_else(|p| p.into_inner()),
            id,
            batch: WriteBatch::default(),
            batch_bytes: 0,
            batch_ids: HashSet::new(),
            stage: Some(key),
        })
    }

    /// Names of the durable imports begun and not yet committed or abandoned.
    pub fn stages(&self) -> Result<Vec<String>, StoreError> {
        Ok(self
            .live_stages()?
            .into_iter()
            .map(|(name, _)| name)
            .collect())
    }

    fn live_stages(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let mut out = Vec::new();
        let it = self.db.iterator_cf(
            self.cf(CF_META),
            IteratorMode::From(META_STAGE, Direction::Forward),
        );
        for item in it {
            let (k, v) = item.map_err(|e| self.db_err(e))?;
            let Some(name) = k.strip_prefix(META_STAGE) else {
                break;
            };
            let id = v.as_ref().try_into().map(u64::from_le_bytes).unwrap_or(0);
            out.push((String::from_utf8_lossy(name).into_owned(), id));
        }
        Ok(out)
    }

    /// Gives up the durable import `name`: its chunks that nothing references
    /// are freed by the next [`Library::collect`].
    pub fn abandon_stage(&self, name: &str) -> Result<(), StoreError> {
        let key = [META_STAGE, name.as_bytes()].concat();
        self.db
            .delete_cf_opt(self.cf(CF_META), key, &Self::synced())
            .map_err(|e| self.db_err(e))?;
        self.try_collect()?;
        Ok(())
    }

    /// Deletes every chunk that is listed as pending and has no reference,
    /// and clears the pending lists. Waits for running imports to end.
    pub fn collect(&self) -> Result<RemoveStats, StoreError> {
        let exclusive = self.gate.write().unwrap_or_else(|p| p.into_inner());
        self.collect_locked(&exclusive)
    }

    /// Runs [`Library::collect`] only if no import is running right now.
    pub fn try_collect(&self) -> Result<Option<RemoveStats>, StoreError> {
        match self.gate.try_write() {
            Ok(exclusive) => self.collect_locked(&exclusive).map(Some),
            Err(_) => Ok(None),
        }
    }

    /// [`Library::collect`] with the gate held exclusively by the caller.
    fn collect_locked(
        &self,
        _exclusive: &RwLockWriteGuard<'_, ()>,
    ) -> Result<RemoveStats, StoreError> {
        let _counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let mut batch = WriteBatch::default();
        let mut freed = RemoveStats::default();
        let mut seen = HashSet::new();
        let staged: HashSet<u64> = self.live_stages()?.into_iter().map(|(_, id)| id).collect();
        for item in self
            .db
            .iterator_cf(self.cf(CF_PENDING), IteratorMode::Start)
        {
            let (k, _) = item.map_err(|e| self.db_err(e))?;
            let import = k
                .get(..8)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_be_bytes)
                .unwrap_or(GARBAGE_IMPORT);
            if staged.contains(&import) {
                continue;
            }
            batch.delete_cf(self.cf(CF_PENDING), &k);
            let Some(id) = ChunkId::from_slice(&k[8..]) else {
                continue;
            };
            if !seen.insert(id) {
                continue;
            }
            let idx = self
                .db
                .get_cf(self.cf(CF_INDEX), id.as_bytes())
                .map_err(|e| self.db_err(e))?;
            if let Some((0, len)) = idx.as_deref().and_then(parse_index) {
                batch.delete_cf(self.cf(CF_INDEX), id.as_bytes());
                batch.delete_cf(self.cf(CF_CHUNKS), id.as_bytes());
                freed.freed_chunks += 1;
                freed.freed_bytes += u64::from(len);
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
    /// time: a compaction of the chunk keys with blob garbage collection on.
    /// Runs by itself once enough was freed; callable any time.
    pub fn reclaim_space(&self) -> Result<(), StoreError> {
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
        let mut opts = rocksdb::CompactOptions::default();
        opts.set_bottommost_level_compaction(rocksdb::BottommostLevelCompaction::Force);
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
        let v = match self.db.get_cf(self.cf(CF_CHUNKS), id.as_bytes()) {
            Ok(Some(v)) => v,
            Ok(None) => return Err(StoreError::MissingChunk(*id)),
            Err(e) if e.kind() == rocksdb::ErrorKind::Corruption => {
                return Err(StoreError::Damaged {
                    id: *id,
                    detail: format!("storage checksum failed: {e}"),
                })
            }
            Err(e) => return Err(self.db_err(e)),
        };
        if ChunkId::of(&v) != *id {
            return Err(StoreError::Damaged {
                id: *id,
                detail: "its bytes do not hash to its id".into(),
            });
        }
        Ok(v)
    }

    /// Hands the stored bytes of a chunk to `f` without hashing them (they
    /// were hashed when imported; RocksDB's checksums still catch a bad
    /// read; `content verify` and scrubs catch rot). For serving chunks.
    pub fn with_chunk<R>(&self, id: &ChunkId, f: impl FnOnce(&[u8]) -> R) -> Result<R, StoreError> {
        match self.db.get_pinned_cf(self.cf(CF_CHUNKS), id.as_bytes()) {
            Ok(Some(v)) => Ok(f(&v)),
            Ok(None) => Err(StoreError::MissingChunk(*id)),
            Err(e) if e.kind() == rocksdb::ErrorKind::Corruption => Err(StoreError::Damaged {
                id: *id,
                detail: format!("storage checksum failed: {e}"),
            }),
            Err(e) => Err(self.db_err(e)),
        }
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
        Ok(self
            .db
            .get_pinned_cf(self.cf(CF_INDEX), id.as_bytes())
            .map_err(|e| self.db_err(e))?
            .and_then(|v| parse_index(&v)))
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
                let Some((count, len)) = self.chunk_info(&id)? else {
                    continue;
                };
                let left = count.saturating_sub(n);
                batch.put_cf(self.cf(CF_INDEX), id.as_bytes(), index_value(left, len));
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

/// One import in progress. See [`Library::begin_import`].
pub struct Import<'a> {
    lib: &'a Library,
    _shared: RwLockReadGuard<'a, ()>,
    id: u64,
    batch: WriteBatch,
    batch_bytes: usize,
    batch_ids: HashSet<ChunkId>,
    /// Meta key of a durable import ([`Library::begin_staged`]).
    stage: Option<Vec<u8>>,
}

impl Import<'_> {
    /// Writes the chunks put so far. For a durable import they are then in
    /// the write-ahead log and survive the process being killed.
    pub fn persist(&mut self) -> Result<(), StoreError> {
        self.write_batch()
    }

    /// Whether the chunk is stored already (or written by this import).
    pub fn has_chunk(&self, id: &ChunkId) -> Result<bool, StoreError> {
        Ok(self.batch_ids.contains(id) || self.lib.has_chunk(id)?)
    }

    /// Stores a chunk unless it is there already. Returns whether it was new.
    /// The caller has hashed `data` to `id`.
    pub fn put_chunk(&mut self, id: &ChunkId, data: &[u8]) -> Result<bool, StoreError> {
        if self.has_chunk(id)? {
            return Ok(false);
        }
        let lib = self.lib;
        let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
        self.batch.put_cf(lib.cf(CF_CHUNKS), id.as_bytes(), data);
        self.batch
            .put_cf(lib.cf(CF_INDEX), id.as_bytes(), index_value(0, len));
        self.batch
            .put_cf(lib.cf(CF_PENDING), pending_key(self.id, id), []);
        self.batch_ids.insert(*id);
        self.batch_bytes += data.len();
        lib.chunks.fetch_add(1, Ordering::Relaxed);
        lib.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
        if self.batch_bytes >= CHUNK_BATCH_BYTES {
            self.write_batch()?;
        }
        Ok(true)
    }

    fn write_batch(&mut self) -> Result<(), StoreError> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let mut w = WriteOptions::default();
        // A plain import is made durable by the flush in `commit`; a crash
        // before that loses chunks and their pending entries together. A
        // durable one goes through the log.
        w.disable_wal(self.stage.is_none());
        let batch = std::mem::take(&mut self.batch);
        self.lib
            .db
            .write_opt(batch, &w)
            .map_err(|e| self.lib.db_err(e))?;
        self.batch_bytes = 0;
        self.batch_ids.clear();
        Ok(())
    }

    /// Chunk lists of segments seen before with this
    /// [`fingerprint`](ferry_core::segment::fingerprint) and at most
    /// `max_len` bytes, longest first.
    pub fn hints(&self, fp: &[u8; 16], max_len: u64) -> Result<Vec<Vec<ChunkRef>>, StoreError> {
        let lib = self.lib;
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

    /// Makes the import visible: writes the manifests as `revision` of
    /// `package`, the catalog record, one reference per manifest entry, and
    /// the segment hints, all in one synced batch after the import's chunks
    /// are flushed to disk. `record` builds the catalog record from the
    /// commit's figures and the record stored now (if any), both read under
    /// the lock that serialises commits, removals and record updates: the
    /// figures are exact and no concurrent change to the record is lost.
    pub fn commit(
        mut self,
        package: &str,
        revision: u32,
        manifests: &[Manifest],
        record: impl FnOnce(&CommitStats, Option<&[u8]>) -> Result<Vec<u8>, StoreError>,
    ) -> Result<CommitStats, StoreError> {
        self.write_batch()?;
        let lib = self.lib;
        let mut fo = FlushOptions::default();
        fo.set_wait(true);
        let cfs = [lib.cf(CF_CHUNKS), lib.cf(CF_INDEX), lib.cf(CF_PENDING)];
        lib.db.flush_cfs_opt(&cfs, &fo).map_err(|e| lib.db_err(e))?;

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
        let mut start = self.id.to_be_bytes().to_vec();
        start.extend([0u8; 32]);
        let mut end = (self.id + 1).to_be_bytes().to_vec();
        end.extend([0u8; 32]);
        batch.delete_range_cf(lib.cf(CF_PENDING), start, end);
        if let Some(key) = &self.stage {
            batch.delete_cf(lib.cf(CF_META), key);
        }

        let _counts = lib.counts.lock().unwrap_or_else(|p| p.into_inner());
        // Committing a revision twice would count its references twice.
        if !lib.manifests(package, revision)?.is_empty() {
            return Err(StoreError::RevisionExists {
                package: package.to_string(),
                revision,
            });
        }
        for (id, n) in adds {
            let (count, len) = lib.chunk_info(&id)?.ok_or(StoreError::MissingChunk(id))?;
            if count == 0 {
                stats.new_chunks += 1;
                stats.new_bytes += u64::from(len);
            }
            batch.put_cf(lib.cf(CF_INDEX), id.as_bytes(), index_value(count + n, len));
        }
        let current = lib.package(package)?;
        batch.put_cf(
            lib.cf(CF_PACKAGES),
            package.as_bytes(),
            record(&stats, current.as_deref())?,
        );
        lib.db
            .write_opt(batch, &Library::synced())
            .map_err(|e| lib.db_err(e))?;
        Ok(stats)
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
            imp.write_batch().unwrap();
            lib.db.flush().unwrap();
            // Dropped without commit, as a failed import is.
        }
        let lib = Library::open(dir.path()).unwrap();
        assert_eq!(lib.stats(), LibraryStats::default());
        assert!(lib.chunk_ids().unwrap().is_empty());
    }

    #[test]
    fn staged_chunks_survive_reopening_until_committed_or_abandoned() {
        let dir = tempfile::tempdir().unwrap();
        let d = data(300_000, 7);
        let id = ChunkId::of(&d);
        {
            let lib = Library::open(dir.path()).unwrap();
            let mut st = lib.begin_staged("FRY00001/2").unwrap();
            st.put_chunk(&id, &d).unwrap();
            st.persist().unwrap();
            // Killed before commit: no flush, only the log.
        }
        let lib = Library::open(dir.path()).unwrap();
        assert_eq!(lib.stages().unwrap(), vec!["FRY00001/2".to_string()]);
        assert!(lib.has_chunk(&id).unwrap(), "staged chunk kept at open");
        let st = lib.begin_staged("FRY00001/2").unwrap();
        assert!(st.has_chunk(&id).unwrap());
        drop(st);
        lib.abandon_stage("FRY00001/2").unwrap();
        assert!(!lib.has_chunk(&id).unwrap(), "abandoned stage freed");
        assert!(lib.stages().unwrap().is_empty());

        let mut st = lib.begin_staged("FRY00001/3").unwrap();
        st.put_chunk(&id, &d).unwrap();
        let m = Manifest {
            path: "f".into(),
            size: d.len() as u64,
            hash: FileHash::of(&d),
            chunks: vec![ChunkRef {
                id,
                len: d.len() as u32,
            }],
            segments: vec![SegmentRecord {
                kind: SegmentKind::Data,
                offset: 0,
                len: d.len() as u64,
                first_chunk: 0,
                chunk_count: 1,
                fingerprint: None,
            }],
        };
        st.commit("FRY00001", 3, &[m], |_, _| Ok(b"{}".to_vec()))
            .unwrap();
        assert!(lib.stages().unwrap().is_empty());
        drop(lib);
        let lib = Library::open(dir.path()).unwrap();
        assert!(lib.has_chunk(&id).unwrap());
        assert_eq!(
            lib.remove_revision("FRY00001", 3, |_| Ok(None))
                .unwrap()
                .freed_bytes,
            300_000
        );
        assert!(lib.package("FRY00001").unwrap().is_some(), "record kept");
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
