//! A distribution point's content: its content folder is the store, RocksDB
//! only the index.
//!
//! ```text
//! CONTENT/<ID>                   symlink → .ferry/<ID>.r<REV>: what clients read
//! CONTENT/.ferry/<ID>.r<REV>/    an installed revision's files
//! CONTENT/.ferry/stage-<ID>.r<REV>/   a revision being written, files preallocated
//! INDEX/                         RocksDB: revisions, manifests, chunk locations,
//!                                written ranges of stages
//! ```
//!
//! Every chunk byte is on disk once, in the file it belongs to. A revision
//! arriving is a [`Stage`]: each chunk is written at its offsets when it
//! arrives (or copied from an installed file that holds it), and the ranges
//! written are recorded in the index. A killed DP finds them at the next
//! start. Recorded ranges carry an epoch; a [`Stage::checkpoint`] syncs the
//! files and then the epoch, so after a crash only ranges newer than the
//! last checkpoint are re-hashed from disk before they are trusted (the
//! bytes may not have reached the disk). [`Stage::install`] syncs
//! everything, renames the folder and switches the link: readers see the
//! old revision or the new one, whole.
//!
//! The index (keys big-endian, values little-endian):
//!
//! | column family | key | value |
//! |---|---|---|
//! | `revisions` | package ++ 0 ++ revision | postcard [`RevisionRecord`] |
//! | `manifests` | package ++ 0 ++ revision ++ file number | `Manifest::encode` |
//! | `locations` | chunk id ++ package | revision, file number (u32), offset (u64) of one occurrence in an installed file |
//! | `written` | package ++ 0 ++ revision ++ file number ++ chunk index | chunk count (u32), epoch (u32): a range of slots written in a stage |
//! | `meta` | `epoch\0` ++ package ++ 0 ++ revision | the stage's last checkpointed epoch (u32) |
//! | | `validated` | the last validation request answered (u64) |
//! | | `rebuilt\0<package>` | the last from-scratch rebuild of the package done (u64) |
//! | | `clients` | the site's last `ClientPolicy` (protobuf) |

use std::collections::HashSet;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use ferry_core::transfer::{CopyOp, Slot};
use ferry_core::{ChunkId, Manifest};
use rocksdb::{
    BlockBasedOptions, ColumnFamily, ColumnFamilyDescriptor, DBCompressionType, Direction,
    IteratorMode, Options, SliceTransform, WriteBatch, WriteOptions, DB,
};
use serde::{Deserialize, Serialize};

use crate::file::{sync_dir, FileError, OutFile};

/// key: package ++ 0 ++ revision (u32 BE) → value: postcard [`RevisionRecord`].
pub const CF_REVISIONS: &str = "revisions";
/// key: package ++ 0 ++ revision (u32 BE) ++ file number (u32 BE) → value:
/// [`Manifest::encode`] bytes.
pub const CF_DP_MANIFESTS: &str = "manifests";
/// key: chunk id (32 bytes) ++ package → value: revision (u32 LE) ++ file
/// number (u32 LE) ++ offset (u64 LE): where the chunk lies in an installed
/// file of that package.
pub const CF_LOCATIONS: &str = "locations";
/// key: package ++ 0 ++ revision (u32 BE) ++ file number (u32 BE) ++ first
/// chunk index (u32 BE) → value: count (u32 LE) ++ epoch (u32 LE): chunks
/// written in a stage.
pub const CF_WRITTEN: &str = "written";
/// key: setting name → value (see the module documentation).
pub const CF_DP_META: &str = "meta";

const CFS: [&str; 5] = [
    CF_REVISIONS,
    CF_DP_MANIFESTS,
    CF_LOCATIONS,
    CF_WRITTEN,
    CF_DP_META,
];
/// Ferry's own folder inside the content folder.
pub const INTERNAL_DIR: &str = ".ferry";
const META_VALIDATED: &[u8] = b"validated";
/// Meta key of the client policy the site last sent (its protobuf bytes).
const META_CLIENTS: &[u8] = b"clients";

/// Key of the last rebuild number done for `package`.
fn rebuilt_key(package: &str) -> Vec<u8> {
    [b"rebuilt\0".as_slice(), package.as_bytes()].concat()
}
/// Chunk locations written per batch when a revision is installed.
const LOCATION_BATCH: usize = 32 << 10;

/// Why the content store failed. The text names the file or package.
#[derive(Debug, thiserror::Error)]
pub enum ContentError {
    /// A file or folder operation failed (disk full, permissions).
    #[error(transparent)]
    File(#[from] FileError),
    /// The index failed.
    #[error("index at {path}: {source}")]
    Db {
        /// The index folder.
        path: PathBuf,
        /// RocksDB's error.
        source: rocksdb::Error,
    },
    /// A stored record cannot be read.
    #[error("stored {what} is unreadable: {detail}")]
    Corrupt {
        /// Which record.
        what: String,
        /// Why.
        detail: String,
    },
    /// The package (revision) is not held here.
    #[error("{0} is not installed on this DP")]
    NotInstalled(String),
    /// Data handed in does not hash to the chunk it should be.
    #[error("data for chunk {0} does not hash to its id")]
    WrongData(ChunkId),
}

impl ContentError {
    /// Whether the disk is full (freeing space and trying again helps).
    pub fn is_no_space(&self) -> bool {
        match self {
            Self::File(f) => f.is_no_space(),
            Self::Db { source, .. } => {
                let s = source.to_string().to_ascii_lowercase();
                s.contains("no space") || s.contains("nospace")
            }
            _ => false,
        }
    }

    /// Whether trying again later may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::File(_) => true,
            Self::Db { source, .. } => matches!(
                source.kind(),
                rocksdb::ErrorKind::IOError
                    | rocksdb::ErrorKind::Busy
                    | rocksdb::ErrorKind::TryAgain
            ),
            _ => false,
        }
    }
}

fn io(path: &Path, op: &str) -> impl FnOnce(std::io::Error) -> ContentError {
    let (path, op) = (path.to_path_buf(), op.to_string());
    move |source| ContentError::File(FileError { path, op, source })
}

/// What the index keeps of one revision.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevisionRecord {
    /// Whether its files are installed (else a stage).
    pub installed: bool,
    /// The package's name at the site.
    pub name: String,
    /// The site-signed manifest body (full form) and its signature, so the
    /// revision can be proven again (validation, clients).
    pub body: Vec<u8>,
    /// Ed25519 signature over `body`.
    pub signature: Vec<u8>,
}

/// Where a chunk lies in an installed file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Location {
    /// Its revision.
    pub revision: u32,
    /// File number in that revision.
    pub file: u32,
    /// Offset of the chunk.
    pub offset: u64,
}

/// One damaged chunk occurrence found by [`ContentStore::validate`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Damaged {
    /// File number and path inside the package.
    pub file: u32,
    /// The path.
    pub path: String,
    /// Offset and length of the chunk in the file.
    pub offset: u64,
    /// Its length.
    pub len: u32,
    /// The chunk it should hold.
    pub id: ChunkId,
}

/// A package's validation result.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Checked {
    /// Bytes re-hashed.
    pub bytes: u64,
    /// Chunk occurrences re-hashed.
    pub chunks: u64,
    /// What did not match.
    pub damaged: Vec<Damaged>,
}

fn rev_key(package: &str, revision: u32) -> Vec<u8> {
    let mut k = package.as_bytes().to_vec();
    k.push(0);
    k.extend(revision.to_be_bytes());
    k
}

fn file_key(package: &str, revision: u32, file: u32) -> Vec<u8> {
    let mut k = rev_key(package, revision);
    k.extend(file.to_be_bytes());
    k
}

fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    end.extend([0xFF; 16]);
    end
}

fn epoch_key(package: &str, revision: u32) -> Vec<u8> {
    [b"epoch\0".as_slice(), &rev_key(package, revision)].concat()
}

fn location_key(id: &ChunkId, package: &str) -> Vec<u8> {
    [id.as_bytes().as_slice(), package.as_bytes()].concat()
}

fn location_value(l: &Location) -> [u8; 16] {
    let mut v = [0u8; 16];
    v[..4].copy_from_slice(&l.revision.to_le_bytes());
    v[4..8].copy_from_slice(&l.file.to_le_bytes());
    v[8..].copy_from_slice(&l.offset.to_le_bytes());
    v
}

fn parse_location(v: &[u8]) -> Option<Location> {
    Some(Location {
        revision: u32::from_le_bytes(v.get(..4)?.try_into().ok()?),
        file: u32::from_le_bytes(v.get(4..8)?.try_into().ok()?),
        offset: u64::from_le_bytes(v.get(8..16)?.try_into().ok()?),
    })
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .map(u32::from_be_bytes)
}

/// A key and its value, as RocksDB hands them out.
type Entry = (Box<[u8]>, Box<[u8]>);

/// Name of an installed revision's folder.
pub fn revision_dir_name(package: &str, revision: u32) -> String {
    format!("{package}.r{revision}")
}

fn stage_dir_name(package: &str, revision: u32) -> String {
    format!("stage-{package}.r{revision}")
}

/// Packages whose link in `content` points at an installed-looking folder
/// `.ferry/<ID>.r<REV>`, with that revision (any layout).
pub fn linked(content: &Path) -> Vec<(String, u32)> {
    let Ok(rd) = std::fs::read_dir(content) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Ok(target) = std::fs::read_link(e.path()) else {
            continue;
        };
        let Some(t) = target.file_name().map(|t| t.to_string_lossy().into_owned()) else {
            continue;
        };
        if let Some((false, p, r)) = parse_dir_name(&t) {
            if p == name {
                out.push((p, r));
            }
        }
    }
    out.sort();
    out
}

/// Splits `name.rN` (or `stage-name.rN`) into package and revision.
fn parse_dir_name(name: &str) -> Option<(bool, String, u32)> {
    let (staged, rest) = match name.strip_prefix("stage-") {
        Some(r) => (true, r),
        None => (false, name),
    };
    let (p, r) = rest.rsplit_once(".r")?;
    Some((staged, p.to_string(), r.parse().ok()?))
}

/// The DP's content folder and its index.
pub struct ContentStore {
    db: DB,
    index: PathBuf,
    content: PathBuf,
}

impl std::fmt::Debug for ContentStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContentStore")
            .field("index", &self.index)
            .field("content", &self.content)
            .finish()
    }
}

impl ContentStore {
    /// Opens (creating) the index in `index` over the content folder
    /// `content`, and brings the two in line: an install a crash
    /// interrupted after its rename is finished, records of folders that
    /// are gone are dropped, folders no record names are removed.
    pub fn open(index: &Path, content: &Path) -> Result<Self, ContentError> {
        Self::open_adopting(index, content, Vec::new())
    }

    /// [`Self::open`], first recording `adopt` — (package, revision,
    /// manifests) of folders `.ferry/<ID>.r<REV>` installed by a DP of the
    /// older layout — as installed revisions without a signed manifest
    /// (the agent fetches it, [`Self::set_signed`]).
    pub fn open_adopting(
        index: &Path,
        content: &Path,
        adopt: Vec<(String, u32, Vec<Manifest>)>,
    ) -> Result<Self, ContentError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.increase_parallelism(2);
        opts.set_keep_log_file_num(3);
        // The index is small: small memtables and logs keep the DP's disk
        // use at its content plus little.
        opts.set_max_total_wal_size(16 << 20);
        let cfs = CFS.iter().map(|&name| {
            let mut o = Options::default();
            let mut table = BlockBasedOptions::default();
            table.set_bloom_filter(10.0, false);
            if name == CF_LOCATIONS {
                // Lookups are by chunk id: a prefix bloom filter makes a
                // miss (a chunk the DP lacks) cheap.
                o.set_prefix_extractor(SliceTransform::create_fixed_prefix(32));
                table.set_whole_key_filtering(false);
            }
            o.set_block_based_table_factory(&table);
            o.set_compression_type(DBCompressionType::Lz4);
            o.set_write_buffer_size(8 << 20);
            ColumnFamilyDescriptor::new(name, o)
        });
        let db = DB::open_cf_descriptors(&opts, index, cfs).map_err(|source| ContentError::Db {
            path: index.to_path_buf(),
            source,
        })?;
        std::fs::create_dir_all(content.join(INTERNAL_DIR))
            .map_err(io(&content.join(INTERNAL_DIR), "create"))?;
        let store = Self {
            db,
            index: index.to_path_buf(),
            content: content.to_path_buf(),
        };
        for (package, revision, manifests) in adopt {
            if !store.revision_dir(&package, revision).is_dir() {
                continue;
            }
            let mut b = WriteBatch::default();
            let rec = RevisionRecord {
                installed: false,
                name: String::new(),
                body: Vec::new(),
                signature: Vec::new(),
            };
            b.put_cf(
                store.cf(CF_REVISIONS),
                rev_key(&package, revision),
                postcard::to_stdvec(&rec).unwrap_or_default(),
            );
            for (n, m) in manifests.iter().enumerate() {
                b.put_cf(
                    store.cf(CF_DP_MANIFESTS),
                    file_key(&package, revision, n as u32),
                    m.encode(),
                );
            }
            store.write(b, true)?;
            store.record_installed(&package, revision, &manifests)?;
        }
        store.reconcile()?;
        Ok(store)
    }

    /// Stores the site-signed manifest of an installed revision adopted
    /// without one. The caller checked it describes the same chunks.
    pub fn set_signed(
        &self,
        package: &str,
        revision: u32,
        name: &str,
        body: Vec<u8>,
        signature: Vec<u8>,
    ) -> Result<(), ContentError> {
        let Some(mut rec) = self.record(package, revision)? else {
            return Err(ContentError::NotInstalled(format!("{package} r{revision}")));
        };
        rec.name = name.to_string();
        rec.body = body;
        rec.signature = signature;
        let mut b = WriteBatch::default();
        b.put_cf(
            self.cf(CF_REVISIONS),
            rev_key(package, revision),
            postcard::to_stdvec(&rec).unwrap_or_default(),
        );
        self.write(b, true)
    }

    /// The content folder.
    pub fn content_dir(&self) -> &Path {
        &self.content
    }

    fn cf(&self, name: &str) -> &ColumnFamily {
        // Every name in CFS is opened in `open`; a missing one is a bug.
        self.db
            .cf_handle(name)
            .unwrap_or_else(|| panic!("column family {name} not opened"))
    }

    fn db_err(&self, source: rocksdb::Error) -> ContentError {
        ContentError::Db {
            path: self.index.clone(),
            source,
        }
    }

    /// The entries of `cf` whose keys start with `prefix`, in key order.
    fn scan<'a>(
        &'a self,
        cf: &str,
        prefix: &'a [u8],
    ) -> impl Iterator<Item = Result<Entry, ContentError>> + 'a {
        self.db
            .iterator_cf(self.cf(cf), IteratorMode::From(prefix, Direction::Forward))
            .map(move |item| item.map_err(|e| self.db_err(e)))
            .take_while(move |item| item.as_ref().map_or(true, |(k, _)| k.starts_with(prefix)))
    }

    fn write(&self, batch: WriteBatch, sync: bool) -> Result<(), ContentError> {
        let mut w = WriteOptions::default();
        w.set_sync(sync);
        self.db.write_opt(batch, &w).map_err(|e| self.db_err(e))
    }

    fn internal(&self) -> PathBuf {
        self.content.join(INTERNAL_DIR)
    }

    /// The folder of an installed revision.
    pub fn revision_dir(&self, package: &str, revision: u32) -> PathBuf {
        self.internal().join(revision_dir_name(package, revision))
    }

    fn stage_dir(&self, package: &str, revision: u32) -> PathBuf {
        self.internal().join(stage_dir_name(package, revision))
    }

    /// Every revision record, in key order.
    pub fn records(&self) -> Result<Vec<(String, u32, RevisionRecord)>, ContentError> {
        let mut out = Vec::new();
        for item in self
            .db
            .iterator_cf(self.cf(CF_REVISIONS), IteratorMode::Start)
        {
            let (k, v) = item.map_err(|e| self.db_err(e))?;
            let Some(nul) = k.iter().position(|&b| b == 0) else {
                continue;
            };
            let package = String::from_utf8_lossy(&k[..nul]).into_owned();
            let Some(revision) = u32_at(&k, nul + 1) else {
                continue;
            };
            let rec: RevisionRecord =
                postcard::from_bytes(&v).map_err(|e| ContentError::Corrupt {
                    what: format!("record of {package} revision {revision}"),
                    detail: e.to_string(),
                })?;
            out.push((package, revision, rec));
        }
        Ok(out)
    }

    /// One revision's record.
    pub fn record(
        &self,
        package: &str,
        revision: u32,
    ) -> Result<Option<RevisionRecord>, ContentError> {
        let Some(v) = self
            .db
            .get_cf(self.cf(CF_REVISIONS), rev_key(package, revision))
            .map_err(|e| self.db_err(e))?
        else {
            return Ok(None);
        };
        postcard::from_bytes(&v)
            .map(Some)
            .map_err(|e| ContentError::Corrupt {
                what: format!("record of {package} revision {revision}"),
                detail: e.to_string(),
            })
    }

    /// Installed packages and their revisions.
    pub fn installed(&self) -> Result<Vec<(String, u32)>, ContentError> {
        Ok(self
            .records()?
            .into_iter()
            .filter(|(_, _, r)| r.installed)
            .map(|(p, r, _)| (p, r))
            .collect())
    }

    /// The installed revision of `package`.
    pub fn installed_revision(&self, package: &str) -> Result<Option<u32>, ContentError> {
        Ok(self
            .installed()?
            .into_iter()
            .find(|(p, _)| p == package)
            .map(|(_, r)| r))
    }

    /// Revisions being staged.
    pub fn stages(&self) -> Result<Vec<(String, u32)>, ContentError> {
        Ok(self
            .records()?
            .into_iter()
            .filter(|(_, _, r)| !r.installed)
            .map(|(p, r, _)| (p, r))
            .collect())
    }

    /// The manifests of a revision (installed or staged), in file order.
    pub fn manifests(&self, package: &str, revision: u32) -> Result<Vec<Manifest>, ContentError> {
        let prefix = rev_key(package, revision);
        let mut out = Vec::new();
        for item in self.scan(CF_DP_MANIFESTS, &prefix) {
            let (_, v) = item?;
            out.push(Manifest::decode(&v).map_err(|e| ContentError::Corrupt {
                what: format!("manifest of {package} revision {revision}"),
                detail: e.to_string(),
            })?);
        }
        Ok(out)
    }

    /// An installed file that holds chunk `id`, if any.
    pub fn locate(&self, id: &ChunkId) -> Result<Option<(String, Location)>, ContentError> {
        let mut it = self
            .db
            .prefix_iterator_cf(self.cf(CF_LOCATIONS), id.as_bytes());
        match it.next() {
            Some(item) => {
                let (k, v) = item.map_err(|e| self.db_err(e))?;
                if !k.starts_with(id.as_bytes()) {
                    return Ok(None);
                }
                let package = String::from_utf8_lossy(&k[32..]).into_owned();
                Ok(parse_location(&v).map(|l| (package, l)))
            }
            None => Ok(None),
        }
    }

    /// The path of file `file` of an installed revision.
    pub fn installed_path(
        &self,
        package: &str,
        revision: u32,
        file: u32,
    ) -> Result<PathBuf, ContentError> {
        let ms = self.manifests(package, revision)?;
        let m = ms.get(file as usize).ok_or_else(|| {
            ContentError::NotInstalled(format!("{package} r{revision} file {file}"))
        })?;
        Ok(self.revision_dir(package, revision).join(&m.path))
    }

    /// The last validation request answered.
    pub fn validated(&self) -> Result<u64, ContentError> {
        Ok(self
            .db
            .get_cf(self.cf(CF_DP_META), META_VALIDATED)
            .map_err(|e| self.db_err(e))?
            .and_then(|v| v.try_into().ok().map(u64::from_le_bytes))
            .unwrap_or(0))
    }

    /// Checks that the index still takes synced writes (RocksDB refuses all
    /// writes after an I/O error such as a full disk until it is reopened).
    pub fn probe(&self) -> Result<(), ContentError> {
        let mut b = WriteBatch::default();
        b.put_cf(self.cf(CF_DP_META), b"probe", []);
        self.write(b, true)
    }

    /// The number of the last from-scratch rebuild of `package` done (0:
    /// none).
    pub fn rebuilt(&self, package: &str) -> Result<u64, ContentError> {
        Ok(self
            .db
            .get_cf(self.cf(CF_DP_META), rebuilt_key(package))
            .map_err(|e| self.db_err(e))?
            .and_then(|v| v.try_into().ok().map(u64::from_le_bytes))
            .unwrap_or(0))
    }

    /// Records that rebuild `n` of `package` is done.
    pub fn set_rebuilt(&self, package: &str, n: u64) -> Result<(), ContentError> {
        let mut b = WriteBatch::default();
        b.put_cf(self.cf(CF_DP_META), rebuilt_key(package), n.to_le_bytes());
        self.write(b, true)
    }

    /// The client policy the site last sent, as stored by
    /// [`Self::set_client_policy`] (empty when none yet).
    pub fn client_policy(&self) -> Result<Vec<u8>, ContentError> {
        Ok(self
            .db
            .get_cf(self.cf(CF_DP_META), META_CLIENTS)
            .map_err(|e| self.db_err(e))?
            .unwrap_or_default())
    }

    /// Keeps the site's client policy across restarts (a DP the site cannot
    /// reach still refuses revoked tokens).
    pub fn set_client_policy(&self, bytes: &[u8]) -> Result<(), ContentError> {
        let mut b = WriteBatch::default();
        b.put_cf(self.cf(CF_DP_META), META_CLIENTS, bytes);
        self.write(b, true)
    }

    /// Records that validation request `n` was answered.
    pub fn set_validated(&self, n: u64) -> Result<(), ContentError> {
        let mut b = WriteBatch::default();
        b.put_cf(self.cf(CF_DP_META), META_VALIDATED, n.to_le_bytes());
        self.write(b, true)
    }

    /// Starts or resumes writing `revision` of `package`: the record (with
    /// the signed manifest) and the staging folder with every file
    /// preallocated. A stage begun before (a killed DP) is picked up with
    /// what it had written.
    pub fn stage(
        self: &Arc<Self>,
        package: &str,
        revision: u32,
        record: RevisionRecord,
        manifests: Vec<Manifest>,
    ) -> Result<Stage, ContentError> {
        let dir = self.stage_dir(package, revision);
        let resumed = match self.record(package, revision)? {
            Some(r) if r.installed => {
                return Err(ContentError::Corrupt {
                    what: format!("{package} revision {revision}"),
                    detail: "it is installed already".into(),
                })
            }
            Some(_) => dir.is_dir() && self.manifests(package, revision)? == manifests,
            None => false,
        };
        if !resumed {
            self.drop_stage(package, revision)?;
        }
        // On resume the chunks are the same; the signed body may differ (a
        // renamed package), so the record is written either way.
        let mut b = WriteBatch::default();
        let rec = RevisionRecord {
            installed: false,
            ..record
        };
        b.put_cf(
            self.cf(CF_REVISIONS),
            rev_key(package, revision),
            postcard::to_stdvec(&rec).unwrap_or_default(),
        );
        if !resumed {
            for (n, m) in manifests.iter().enumerate() {
                b.put_cf(
                    self.cf(CF_DP_MANIFESTS),
                    file_key(package, revision, n as u32),
                    m.encode(),
                );
            }
            b.put_cf(
                self.cf(CF_DP_META),
                epoch_key(package, revision),
                0u32.to_le_bytes(),
            );
        }
        self.write(b, true)?;
        std::fs::create_dir_all(&dir).map_err(io(&dir, "create"))?;
        let mut files = Vec::with_capacity(manifests.len());
        for m in &manifests {
            // Paths were checked when the manifest was decoded (relative,
            // no `..`).
            let path = dir.join(&m.path);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(io(parent, "create"))?;
            }
            files.push(OutFile::open(&path, m.size)?);
        }
        let durable = self.durable_epoch(package, revision)?;
        let offsets = manifests
            .iter()
            .map(|m| m.offsets().map(|(o, _)| o).collect())
            .collect();
        Ok(Stage {
            store: self.clone(),
            package: package.to_string(),
            revision,
            dir,
            files,
            manifests,
            offsets,
            epoch: AtomicU32::new(durable + 1),
            rehashed: AtomicU64::new(0),
        })
    }

    fn durable_epoch(&self, package: &str, revision: u32) -> Result<u32, ContentError> {
        Ok(self
            .db
            .get_cf(self.cf(CF_DP_META), epoch_key(package, revision))
            .map_err(|e| self.db_err(e))?
            .and_then(|v| v.try_into().ok().map(u32::from_le_bytes))
            .unwrap_or(0))
    }

    /// Gives up a stage: its folder and records go.
    pub fn drop_stage(&self, package: &str, revision: u32) -> Result<(), ContentError> {
        let dir = self.stage_dir(package, revision);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(io(&dir, "remove"))?;
        }
        if self.record(package, revision)?.is_some_and(|r| r.installed) {
            return Ok(());
        }
        let key = rev_key(package, revision);
        let mut b = WriteBatch::default();
        b.delete_cf(self.cf(CF_REVISIONS), &key);
        b.delete_range_cf(self.cf(CF_DP_MANIFESTS), &key, &prefix_end(&key));
        b.delete_range_cf(self.cf(CF_WRITTEN), &key, &prefix_end(&key));
        b.delete_cf(self.cf(CF_DP_META), epoch_key(package, revision));
        self.write(b, true)
    }

    /// Removes a package: the link first (clients stop seeing it), then its
    /// records and folders.
    pub fn uninstall(&self, package: &str) -> Result<(), ContentError> {
        let link = self.content.join(package);
        match std::fs::remove_file(&link) {
            Ok(()) => sync_dir(&self.content)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&link, "remove")(e)),
        }
        for (p, r, rec) in self.records()? {
            if p != package {
                continue;
            }
            if rec.installed {
                self.forget_installed(&p, r)?;
            } else {
                self.drop_stage(&p, r)?;
            }
        }
        Ok(())
    }

    /// Drops an installed revision's records and locations, then its folder.
    fn forget_installed(&self, package: &str, revision: u32) -> Result<(), ContentError> {
        let mut b = WriteBatch::default();
        self.forget_into(&mut b, package, revision)?;
        self.write(b, true)?;
        let dir = self.revision_dir(package, revision);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(io(&dir, "remove"))?;
        }
        Ok(())
    }

    /// Points `CONTENT/<package>` at an installed revision's folder, with a
    /// rename: readers see the old target or the new one.
    fn switch_link(&self, package: &str, revision: u32) -> Result<(), ContentError> {
        let internal = self.internal();
        let tmp = internal.join(format!("link-{package}"));
        let _ = std::fs::remove_file(&tmp);
        let target = Path::new(INTERNAL_DIR).join(revision_dir_name(package, revision));
        std::os::unix::fs::symlink(&target, &tmp).map_err(io(&tmp, "create the link"))?;
        let link = self.content.join(package);
        std::fs::rename(&tmp, &link).map_err(io(&link, "replace the link"))?;
        sync_dir(&self.content)?;
        Ok(())
    }

    /// Deletes, into `b`, an installed revision's record, manifests and
    /// the locations that point at it.
    fn forget_into(
        &self,
        b: &mut WriteBatch,
        package: &str,
        revision: u32,
    ) -> Result<(), ContentError> {
        let key = rev_key(package, revision);
        b.delete_cf(self.cf(CF_REVISIONS), &key);
        b.delete_range_cf(self.cf(CF_DP_MANIFESTS), &key, &prefix_end(&key));
        for m in &self.manifests(package, revision)? {
            for c in &m.chunks {
                let lk = location_key(&c.id, package);
                if let Some(v) = self
                    .db
                    .get_cf(self.cf(CF_LOCATIONS), &lk)
                    .map_err(|e| self.db_err(e))?
                {
                    if parse_location(&v).is_some_and(|l| l.revision == revision) {
                        b.delete_cf(self.cf(CF_LOCATIONS), &lk);
                    }
                }
            }
        }
        Ok(())
    }

    /// Records `revision` of `package` as installed (its folder is in
    /// place): the locations of its chunks, then in one synced batch the
    /// record and the package's other installed revisions forgotten. Then
    /// the link is switched and the old folders go.
    fn record_installed(
        &self,
        package: &str,
        revision: u32,
        manifests: &[Manifest],
    ) -> Result<(), ContentError> {
        let Some(mut rec) = self.record(package, revision)? else {
            return Err(ContentError::NotInstalled(format!("{package} r{revision}")));
        };
        let older: Vec<u32> = self
            .records()?
            .into_iter()
            .filter(|(p, r, old)| p == package && *r != revision && old.installed)
            .map(|(_, r, _)| r)
            .collect();
        // The locations first, in bounded batches (a large image has
        // hundreds of thousands: one batch of them all would be the DP's
        // peak memory). They point into the folder already in place, so a
        // crash before the record below leaves them true, and the start
        // after it finishes this install again.
        let mut b = WriteBatch::default();
        let mut seen = HashSet::new();
        for (f, m) in manifests.iter().enumerate() {
            for (offset, c) in m.offsets() {
                if seen.insert(c.id) {
                    b.put_cf(
                        self.cf(CF_LOCATIONS),
                        location_key(&c.id, package),
                        location_value(&Location {
                            revision,
                            file: f as u32,
                            offset,
                        }),
                    );
                    if b.len() >= LOCATION_BATCH {
                        self.write(std::mem::take(&mut b), false)?;
                    }
                }
            }
        }
        drop(seen);
        // All of them in place before the older revisions are read below:
        // a put still in this batch would lose to the delete after it.
        if !b.is_empty() {
            self.write(std::mem::take(&mut b), false)?;
        }
        // Then, in one synced batch: the older revisions forgotten (their
        // locations that still point at them: the chunks this one lacks),
        // the record, the staging state gone.
        for &r in &older {
            self.forget_into(&mut b, package, r)?;
        }
        rec.installed = true;
        let key = rev_key(package, revision);
        b.put_cf(
            self.cf(CF_REVISIONS),
            &key,
            postcard::to_stdvec(&rec).unwrap_or_default(),
        );
        b.delete_range_cf(self.cf(CF_WRITTEN), &key, &prefix_end(&key));
        b.delete_cf(self.cf(CF_DP_META), epoch_key(package, revision));
        self.write(b, true)?;
        self.switch_link(package, revision)?;
        for r in older {
            let dir = self.revision_dir(package, r);
            if dir.exists() {
                std::fs::remove_dir_all(&dir).map_err(io(&dir, "remove"))?;
            }
        }
        Ok(())
    }

    /// Brings index and folders in line after a start (see [`Self::open`]).
    fn reconcile(&self) -> Result<(), ContentError> {
        let records = self.records()?;
        let mut known: HashSet<String> = HashSet::new();
        for (p, r, rec) in &records {
            let done = self.revision_dir(p, *r);
            if rec.installed {
                if done.is_dir() {
                    known.insert(revision_dir_name(p, *r));
                    let link_ok = std::fs::read_link(self.content.join(p))
                        .is_ok_and(|t| t.file_name() == done.file_name());
                    if !link_ok {
                        self.switch_link(p, *r)?;
                    }
                } else {
                    tracing::warn!(package = %p, revision = r, "installed folder is gone; forgetting the revision");
                    self.forget_installed(p, *r)?;
                }
            } else if done.is_dir() {
                // Renamed into place, not yet recorded: finish the install.
                tracing::info!(package = %p, revision = r, "finishing an interrupted install");
                self.record_installed(p, *r, &self.manifests(p, *r)?)?;
                known.insert(revision_dir_name(p, *r));
            } else if self.stage_dir(p, *r).is_dir() {
                known.insert(stage_dir_name(p, *r));
            } else {
                self.drop_stage(p, *r)?;
            }
        }
        // Folders no record names: leftovers.
        let internal = self.internal();
        if let Ok(rd) = std::fs::read_dir(&internal) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if known.contains(&name) || !e.path().is_dir() {
                    if !e.path().is_dir() && name.starts_with("link-") {
                        let _ = std::fs::remove_file(e.path());
                    }
                    continue;
                }
                if parse_dir_name(&name).is_some() || name.starts_with("tmp-") {
                    tracing::info!(folder = %name, "removing a folder no revision owns");
                    std::fs::remove_dir_all(e.path()).map_err(io(&e.path(), "remove"))?;
                }
            }
        }
        // Links to nothing.
        let installed: HashSet<String> = self.installed()?.into_iter().map(|(p, _)| p).collect();
        if let Ok(rd) = std::fs::read_dir(&self.content) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let is_link = e.file_type().is_ok_and(|t| t.is_symlink());
                if is_link && !installed.contains(&name) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        Ok(())
    }

    /// Re-hashes every chunk of the installed revision of `package` from
    /// its files against the manifest. `progress` is told bytes checked.
    pub fn validate(
        &self,
        package: &str,
        mut progress: impl FnMut(u64),
    ) -> Result<(u32, Checked), ContentError> {
        let revision = self
            .installed_revision(package)?
            .ok_or_else(|| ContentError::NotInstalled(package.to_string()))?;
        let dir = self.revision_dir(package, revision);
        let mut out = Checked::default();
        let mut buf = Vec::new();
        for (f, m) in self.manifests(package, revision)?.iter().enumerate() {
            let path = dir.join(&m.path);
            let file = File::open(&path).map_err(io(&path, "open"))?;
            let len = file
                .metadata()
                .map_err(io(&path, "read the size of"))?
                .len();
            let mut reader = std::io::BufReader::with_capacity(8 << 20, file);
            for (offset, c) in m.offsets() {
                buf.resize(c.len as usize, 0);
                let ok = if offset + u64::from(c.len) > len {
                    false
                } else {
                    std::io::Read::read_exact(&mut reader, &mut buf)
                        .map_err(io(&path, &format!("read at offset {offset}")))?;
                    ChunkId::of(&buf) == c.id
                };
                if !ok {
                    out.damaged.push(Damaged {
                        file: f as u32,
                        path: m.path.clone(),
                        offset,
                        len: c.len,
                        id: c.id,
                    });
                }
                out.bytes += u64::from(c.len);
                out.chunks += 1;
                progress(u64::from(c.len));
            }
        }
        Ok((revision, out))
    }

    /// Writes the right bytes of chunk `id` over every occurrence of it in
    /// the installed revision of `package` (a repair after validation).
    /// Returns the occurrences written.
    pub fn repair(&self, package: &str, id: &ChunkId, data: &[u8]) -> Result<usize, ContentError> {
        if ChunkId::of(data) != *id {
            return Err(ContentError::WrongData(*id));
        }
        let revision = self
            .installed_revision(package)?
            .ok_or_else(|| ContentError::NotInstalled(package.to_string()))?;
        let dir = self.revision_dir(package, revision);
        let mut n = 0;
        for m in self.manifests(package, revision)? {
            let places: Vec<u64> = m
                .offsets()
                .filter(|(_, c)| c.id == *id)
                .map(|(o, _)| o)
                .collect();
            if places.is_empty() {
                continue;
            }
            let path = dir.join(&m.path);
            let f = OutFile::open(&path, m.size)?;
            for o in places {
                f.write_at(data, o)?;
                n += 1;
            }
            f.sync()?;
        }
        Ok(n)
    }

    /// Bytes on disk of the index and the content folder (what `du` counts).
    pub fn disk_bytes(&self) -> u64 {
        crate::disk::usage(&self.index) + crate::disk::usage(&self.content)
    }
}

/// Range marks waiting to be recorded: see [`Stage::mark`].
#[derive(Default)]
pub struct Marks {
    batch: WriteBatch,
    count: usize,
}

impl Marks {
    /// Ranges waiting.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether none are waiting.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

/// Which slots of a stage hold their chunk: per file, per chunk index.
pub type WrittenSlots = Vec<Vec<bool>>;

/// A revision being written. See the module documentation.
pub struct Stage {
    store: Arc<ContentStore>,
    package: String,
    revision: u32,
    dir: PathBuf,
    files: Vec<OutFile>,
    manifests: Vec<Manifest>,
    /// Per file, the offset of each chunk.
    offsets: Vec<Vec<u64>>,
    /// Epoch of marks recorded now; the last checkpoint is this − 1.
    epoch: AtomicU32,
    /// Bytes [`Stage::written`] re-hashed (recorded after the last
    /// checkpoint of a killed DP).
    rehashed: AtomicU64,
}

impl std::fmt::Debug for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stage")
            .field("package", &self.package)
            .field("revision", &self.revision)
            .field("dir", &self.dir)
            .finish()
    }
}

impl Stage {
    /// The revision's manifests.
    pub fn manifests(&self) -> &[Manifest] {
        &self.manifests
    }

    /// The staging folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The staged file `file`.
    pub fn file(&self, file: u32) -> Option<&OutFile> {
        self.files.get(file as usize)
    }

    /// What a killed DP had written. Ranges recorded since the last
    /// checkpoint are re-hashed from the files first (their bytes may not
    /// have reached the disk); those that do not match are forgotten. Ends
    /// with a checkpoint, so everything returned is durable.
    pub fn written(&self) -> Result<WrittenSlots, ContentError> {
        self.rehashed.store(0, Ordering::Relaxed);
        let durable = self.epoch.load(Ordering::SeqCst).saturating_sub(1);
        let mut out: WrittenSlots = self
            .manifests
            .iter()
            .map(|m| vec![false; m.chunks.len()])
            .collect();
        let prefix = rev_key(&self.package, self.revision);
        let store = &self.store;
        let mut forget = WriteBatch::default();
        let mut buf = Vec::new();
        for item in store.scan(CF_WRITTEN, &prefix) {
            let (k, v) = item?;
            let (Some(file), Some(first)) =
                (u32_at(&k, prefix.len()), u32_at(&k, prefix.len() + 4))
            else {
                continue;
            };
            let count = v
                .get(..4)
                .and_then(|b| b.try_into().ok())
                .map(u32::from_le_bytes)
                .unwrap_or(0);
            let epoch = v
                .get(4..8)
                .and_then(|b| b.try_into().ok())
                .map(u32::from_le_bytes)
                .unwrap_or(u32::MAX);
            let (Some(m), Some(f)) = (
                self.manifests.get(file as usize),
                self.files.get(file as usize),
            ) else {
                continue;
            };
            let slots = out.get_mut(file as usize).map(|v| v.len()).unwrap_or(0);
            let end = (first as usize).saturating_add(count as usize).min(slots);
            if epoch > durable {
                // Not checkpointed: trust it only if the bytes are there.
                let mut offset = self.offsets[file as usize]
                    .get(first as usize)
                    .copied()
                    .unwrap_or(u64::MAX);
                let mut all = true;
                for c in &m.chunks[(first as usize).min(end)..end] {
                    self.rehashed.fetch_add(u64::from(c.len), Ordering::Relaxed);
                    buf.resize(c.len as usize, 0);
                    if f.read_at(&mut buf, offset).is_err() || ChunkId::of(&buf) != c.id {
                        all = false;
                        break;
                    }
                    offset += u64::from(c.len);
                }
                if !all {
                    forget.delete_cf(store.cf(CF_WRITTEN), &k);
                    continue;
                }
            }
            if let Some(w) = out.get_mut(file as usize) {
                for s in w.iter_mut().take(end).skip(first as usize) {
                    *s = true;
                }
            }
        }
        store.write(forget, false)?;
        self.checkpoint()?;
        Ok(out)
    }

    /// Bytes the last [`Stage::written`] re-hashed: what was recorded but
    /// not checkpointed when the DP stopped.
    pub fn rehashed_bytes(&self) -> u64 {
        self.rehashed.load(Ordering::Relaxed)
    }

    /// Writes a verified chunk at each place; the caller then records the
    /// slots with [`Stage::mark`].
    pub fn write(&self, places: &[(Slot, u64)], data: &[u8]) -> Result<(), ContentError> {
        for (s, offset) in places {
            let f = self
                .files
                .get(s.file as usize)
                .ok_or_else(|| ContentError::NotInstalled(format!("file {}", s.file)))?;
            f.write_at(data, *offset)?;
        }
        Ok(())
    }

    /// Writes many verified chunks: `items` are (file number, offset,
    /// bytes). They are sorted and every run of consecutive ones goes to the
    /// disk in one `pwritev`. The caller then records the slots.
    pub fn write_many(&self, items: &mut [(u32, u64, &[u8])]) -> Result<(), ContentError> {
        items.sort_unstable_by_key(|(f, o, _)| (*f, *o));
        let mut i = 0;
        while i < items.len() {
            let (file, start, _) = items[i];
            let mut end = start;
            let mut j = i;
            while j < items.len() && items[j].0 == file && items[j].1 == end {
                end += items[j].2.len() as u64;
                j += 1;
            }
            if j == i {
                // Overlapping slots cannot happen in one revision; write it
                // alone rather than loop.
                j = i + 1;
            }
            let f = self
                .files
                .get(file as usize)
                .ok_or_else(|| ContentError::NotInstalled(format!("file {file}")))?;
            let bufs: Vec<&[u8]> = items[i..j].iter().map(|(_, _, b)| *b).collect();
            f.write_vectored_at(&bufs, start)?;
            i = j;
        }
        Ok(())
    }

    /// Runs a local copy. `origin` is the open file and path it reads from
    /// (a staged file for [`ferry_core::transfer::OriginFile::Stage`]).
    pub fn copy(&self, op: &CopyOp, origin: &File, origin_path: &Path) -> Result<(), ContentError> {
        let f = self
            .files
            .get(op.file as usize)
            .ok_or_else(|| ContentError::NotInstalled(format!("file {}", op.file)))?;
        f.copy_from(origin, origin_path, op.origin.offset, op.offset, op.len)?;
        Ok(())
    }

    /// Adds `count` slots of `file` from chunk index `first` to `marks`,
    /// as written in the current epoch. Call after the bytes are written.
    pub fn mark(&self, marks: &mut Marks, file: u32, first: u32, count: u32) {
        // Read after the write: a checkpoint that began before this load
        // synced a file that already held the bytes.
        let epoch = self.epoch.load(Ordering::SeqCst);
        let mut key = file_key(&self.package, self.revision, file);
        key.extend(first.to_be_bytes());
        let mut v = [0u8; 8];
        v[..4].copy_from_slice(&count.to_le_bytes());
        v[4..].copy_from_slice(&epoch.to_le_bytes());
        marks.batch.put_cf(self.store.cf(CF_WRITTEN), key, v);
        marks.count += 1;
    }

    /// Records marks in the index (through its log, not synced: a killed
    /// process keeps them; a checkpoint makes them durable).
    pub fn record(&self, marks: Marks) -> Result<(), ContentError> {
        if marks.count == 0 {
            return Ok(());
        }
        self.store.write(marks.batch, false)
    }

    /// Makes everything written so far durable: bumps the epoch, syncs the
    /// files, then records the previous epoch as checkpointed (synced).
    pub fn checkpoint(&self) -> Result<(), ContentError> {
        let done = self.epoch.fetch_add(1, Ordering::SeqCst);
        for f in &self.files {
            f.sync()?;
        }
        let mut b = WriteBatch::default();
        b.put_cf(
            self.store.cf(CF_DP_META),
            epoch_key(&self.package, self.revision),
            done.to_le_bytes(),
        );
        self.store.write(b, true)
    }

    /// Installs the revision: files and folders synced, the staging folder
    /// renamed to the revision's folder, the link switched, the index
    /// updated; the package's previous revision goes. The old revision is
    /// served until the switch.
    pub fn install(self) -> Result<(), ContentError> {
        for f in &self.files {
            f.sync()?;
        }
        let mut dirs: Vec<PathBuf> = self
            .manifests
            .iter()
            .filter_map(|m| self.dir.join(&m.path).parent().map(Path::to_path_buf))
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        for d in &dirs {
            sync_dir(d)?;
        }
        let store = self.store.clone();
        let done = store.revision_dir(&self.package, self.revision);
        if done.exists() {
            std::fs::remove_dir_all(&done).map_err(io(&done, "remove"))?;
        }
        std::fs::rename(&self.dir, &done).map_err(io(&done, "rename into place"))?;
        sync_dir(&store.internal())?;
        store.record_installed(&self.package, self.revision, &self.manifests)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    use ferry_core::transfer::{Origin, OriginFile, Transfer, TransferOptions};
    use ferry_core::{ChunkRef, FileHash};

    fn data(len: usize, seed: u8) -> Vec<u8> {
        use rand::{RngCore, SeedableRng};
        let mut out = vec![0u8; len];
        rand::rngs::SmallRng::seed_from_u64(u64::from(seed)).fill_bytes(&mut out);
        out
    }

    /// A manifest of `bytes` cut every `cut` bytes.
    fn manifest(path: &str, bytes: &[u8], cut: usize) -> Manifest {
        Manifest::of_parts(path, bytes.chunks(cut))
    }

    fn record(tag: u8) -> RevisionRecord {
        RevisionRecord {
            installed: false,
            name: "test".into(),
            body: vec![tag; 4],
            signature: vec![0; 64],
        }
    }

    struct Dp {
        _dir: tempfile::TempDir,
        index: PathBuf,
        content: PathBuf,
    }

    impl Dp {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            Self {
                index: dir.path().join("index"),
                content: dir.path().join("content"),
                _dir: dir,
            }
        }
        fn open(&self) -> Arc<ContentStore> {
            Arc::new(ContentStore::open(&self.index, &self.content).unwrap())
        }
    }

    /// Drives a transfer to the end with `source` as the site, the way the
    /// agent does: copies first, then fetched chunks written and marked.
    fn run(store: &Arc<ContentStore>, stage: &Stage, source: &HashMap<ChunkId, Vec<u8>>) -> u64 {
        let written = stage.written().unwrap();
        let mut origins: Vec<(File, PathBuf)> = Vec::new();
        let mut t = Transfer::new(
            stage.manifests(),
            TransferOptions::default(),
            |s| written[s.file as usize][s.index as usize],
            |id| {
                let (p, l) = store.locate(id).unwrap()?;
                let path = store.installed_path(&p, l.revision, l.file).unwrap();
                origins.push((File::open(&path).unwrap(), path));
                Some(Origin {
                    file: OriginFile::Other(origins.len() as u64 - 1),
                    offset: l.offset,
                })
            },
        );
        let now = std::time::Instant::now();
        let mut fetched = 0u64;
        while let Some(op) = t.poll_copy() {
            let (f, p) = match op.origin.file {
                OriginFile::Other(h) => {
                    let (f, p) = &origins[h as usize];
                    (f.try_clone().unwrap(), p.clone())
                }
                OriginFile::Stage(n) => {
                    let f = stage.file(n).unwrap();
                    (f.file().try_clone().unwrap(), f.path().to_path_buf())
                }
            };
            stage.copy(&op, &f, &p).unwrap();
            let mut m = Marks::default();
            stage.mark(&mut m, op.file, op.first, op.count);
            stage.record(m).unwrap();
            t.handle_copied(op.id, true, now);
        }
        while let Some(batch) = t.poll_request(0, now) {
            for c in batch {
                let p = t.handle_chunk(0, &c.id, now).unwrap();
                let bytes = &source[&c.id];
                stage.write(&p.places, bytes).unwrap();
                let mut m = Marks::default();
                for (s, _) in &p.places {
                    stage.mark(&mut m, s.file, s.index, 1);
                }
                stage.record(m).unwrap();
                t.handle_written(&c.id, now);
                fetched += u64::from(c.len);
            }
        }
        assert!(t.is_complete());
        fetched
    }

    fn chunks_of(files: &[&[u8]], cut: usize) -> HashMap<ChunkId, Vec<u8>> {
        files
            .iter()
            .flat_map(|f| f.chunks(cut))
            .map(|c| (ChunkId::of(c), c.to_vec()))
            .collect()
    }

    #[test]
    fn a_revision_is_written_in_place_then_the_next_copies_what_it_shares() {
        let dp = Dp::new();
        let store = dp.open();
        let a = data(100_000, 1);
        let m1 = vec![manifest("sources/install.wim", &a, 1000)];
        let st = store.stage("FRY00001", 1, record(1), m1.clone()).unwrap();
        let fetched = run(&store, &st, &chunks_of(&[&a], 1000));
        assert_eq!(fetched, 100_000);
        st.install().unwrap();
        let path = dp.content.join("FRY00001/sources/install.wim");
        assert_eq!(std::fs::read(&path).unwrap(), a);
        assert_eq!(
            store.installed().unwrap(),
            vec![("FRY00001".to_string(), 1)]
        );
        assert!(store.locate(&m1[0].chunks[5].id).unwrap().is_some());

        // Revision 2 appends 5000 new bytes and changes one chunk: only
        // those travel; the rest is copied from revision 1.
        let mut b = a.clone();
        b[20_500] ^= 1;
        b.extend(data(5000, 2));
        let m2 = vec![manifest("sources/install.wim", &b, 1000)];
        let st = store.stage("FRY00001", 2, record(2), m2).unwrap();
        let fetched = run(&store, &st, &chunks_of(&[&b], 1000));
        assert_eq!(fetched, 6000);
        // Revision 1 is served until the switch.
        assert_eq!(std::fs::read(&path).unwrap(), a);
        st.install().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b);
        assert_eq!(
            store.installed().unwrap(),
            vec![("FRY00001".to_string(), 2)]
        );
        assert!(!store.revision_dir("FRY00001", 1).exists(), "r1 is gone");
        let (_, l) = store.locate(&ChunkId::of(&b[..1000])).unwrap().unwrap();
        assert_eq!(l.revision, 2, "locations point at the installed revision");
        // Disk: the content once, plus a small index.
        let used = store.disk_bytes();
        assert!(used < b.len() as u64 + (2 << 20), "{used} bytes on disk");

        store.uninstall("FRY00001").unwrap();
        assert!(store.installed().unwrap().is_empty());
        assert!(!dp.content.join("FRY00001").exists());
        assert!(store.locate(&ChunkId::of(&b[..1000])).unwrap().is_none());
    }

    #[test]
    fn a_killed_stage_resumes_with_what_it_wrote_and_rehashes_what_was_not_checkpointed() {
        let dp = Dp::new();
        let a = data(50_000, 3);
        let m = vec![manifest("a.wim", &a, 1000)];
        {
            let store = dp.open();
            let st = store.stage("FRY00001", 1, record(1), m.clone()).unwrap();
            assert!(st.written().unwrap()[0].iter().all(|w| !w));
            // Chunks 0..20 written and checkpointed, 20..30 only marked.
            for i in 0..30u32 {
                let off = u64::from(i) * 1000;
                st.write(
                    &[(Slot { file: 0, index: i }, off)],
                    &a[off as usize..off as usize + 1000],
                )
                .unwrap();
                let mut marks = Marks::default();
                st.mark(&mut marks, 0, i, 1);
                st.record(marks).unwrap();
                if i == 19 {
                    st.checkpoint().unwrap();
                }
            }
            // Killed here; then the disk lost chunk 25's bytes.
            let f = st.file(0).unwrap();
            f.write_at(&[0u8; 1000], 25_000).unwrap();
        }
        let store = dp.open();
        assert_eq!(store.stages().unwrap(), vec![("FRY00001".to_string(), 1)]);
        let st = store.stage("FRY00001", 1, record(1), m).unwrap();
        let w = st.written().unwrap();
        let held: Vec<usize> = (0..50).filter(|&i| w[0][i]).collect();
        let want: Vec<usize> = (0..30).filter(|&i| i != 25).collect();
        assert_eq!(
            held, want,
            "unsynced chunk 25 was checked and found missing"
        );
        let fetched = run(&store, &st, &chunks_of(&[&a], 1000));
        assert_eq!(fetched, 21_000, "chunk 25 and 30..50");
        st.install().unwrap();
        assert_eq!(std::fs::read(dp.content.join("FRY00001/a.wim")).unwrap(), a);
    }

    #[test]
    fn a_dp_killed_past_the_checkpoint_bytes_rehashes_at_most_that_much() {
        let dp = Dp::new();
        let a = data(100_000, 5);
        let m = vec![manifest("a.wim", &a, 1000)];
        let limit = 10_000u64;
        let opts = TransferOptions {
            checkpoint_bytes: limit,
            // The clock never triggers one: only bytes do.
            checkpoint_every: std::time::Duration::from_secs(3600),
            streams: 1,
            ..TransferOptions::default()
        };
        {
            let store = dp.open();
            let st = store.stage("FRY00001", 1, record(1), m.clone()).unwrap();
            let w = st.written().unwrap();
            let mut t = Transfer::new(
                st.manifests(),
                opts,
                |s| w[s.file as usize][s.index as usize],
                |_| None,
            );
            // The agent's order: write, record, report written, then a
            // checkpoint when the machine says one is due.
            let now = std::time::Instant::now();
            let mut n = 0;
            'kill: while let Some(batch) = t.poll_request(0, now) {
                for c in batch {
                    let p = t.handle_chunk(0, &c.id, now).unwrap();
                    let (_, off) = p.places[0];
                    st.write(&p.places, &a[off as usize..off as usize + 1000])
                        .unwrap();
                    let mut marks = Marks::default();
                    st.mark(&mut marks, 0, p.places[0].0.index, 1);
                    st.record(marks).unwrap();
                    t.handle_written(&c.id, now);
                    if t.poll_checkpoint(now) {
                        st.checkpoint().unwrap();
                        t.handle_checkpointed();
                    }
                    n += 1;
                    if n == 75 {
                        break 'kill;
                    }
                }
            }
        }
        let store = dp.open();
        let st = store.stage("FRY00001", 1, record(1), m).unwrap();
        let w = st.written().unwrap();
        assert_eq!(w[0].iter().filter(|&&x| x).count(), 75);
        let rehashed = st.rehashed_bytes();
        assert!(
            rehashed > 0 && rehashed <= limit,
            "re-hashed {rehashed} bytes after a kill at 75,000 written; one checkpoint is {limit}"
        );
    }

    #[test]
    fn an_install_interrupted_after_its_rename_is_finished_at_open() {
        let dp = Dp::new();
        let a = data(10_000, 4);
        let m = vec![manifest("x/a.wim", &a, 1000)];
        {
            let store = dp.open();
            let st = store.stage("FRY00002", 3, record(3), m.clone()).unwrap();
            run(&store, &st, &chunks_of(&[&a], 1000));
            // Crash between the rename and the index update.
            std::fs::rename(st.dir(), store.revision_dir("FRY00002", 3)).unwrap();
            // And a leftover of some older layout.
            std::fs::create_dir_all(dp.content.join(".ferry/tmp-FRY00009.r1")).unwrap();
        }
        let store = dp.open();
        assert_eq!(
            store.installed().unwrap(),
            vec![("FRY00002".to_string(), 3)]
        );
        assert_eq!(
            std::fs::read(dp.content.join("FRY00002/x/a.wim")).unwrap(),
            a
        );
        assert!(store.stages().unwrap().is_empty());
        assert!(!dp.content.join(".ferry/tmp-FRY00009.r1").exists());
    }

    #[test]
    fn validation_names_a_flipped_byte_and_repair_rewrites_the_chunk() {
        let dp = Dp::new();
        let store = dp.open();
        let a = data(30_000, 5);
        let mut b = data(9_000, 6);
        b.extend_from_slice(&a[..1000]); // chunk 0 of a.wim, again
        let m = vec![manifest("a.wim", &a, 1000), manifest("b/b.bin", &b, 1000)];
        let st = store.stage("FRY00003", 1, record(1), m).unwrap();
        run(&store, &st, &chunks_of(&[&a, &b], 1000));
        st.install().unwrap();
        let (_, clean) = store.validate("FRY00003", |_| {}).unwrap();
        assert!(clean.damaged.is_empty());
        assert_eq!(clean.bytes, 40_000);

        let path = dp.content.join("FRY00003/a.wim");
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[500] ^= 0x40;
        std::fs::write(&path, &bytes).unwrap();
        let (rev, found) = store.validate("FRY00003", |_| {}).unwrap();
        assert_eq!(rev, 1);
        assert_eq!(found.damaged.len(), 1);
        let d = &found.damaged[0];
        assert_eq!((d.path.as_str(), d.offset, d.len), ("a.wim", 0, 1000));
        assert!(matches!(
            store.repair("FRY00003", &d.id, &[0u8; 1000]),
            Err(ContentError::WrongData(_))
        ));
        let n = store.repair("FRY00003", &d.id, &a[..1000]).unwrap();
        assert_eq!(n, 2, "both occurrences of the chunk rewritten");
        assert_eq!(std::fs::read(&path).unwrap(), a);
        assert!(store
            .validate("FRY00003", |_| {})
            .unwrap()
            .1
            .damaged
            .is_empty());
        assert!(matches!(
            store.validate("FRY09999", |_| {}),
            Err(ContentError::NotInstalled(_))
        ));
    }

    #[test]
    fn a_full_disk_at_preallocation_is_an_error_that_says_so() {
        let dp = Dp::new();
        let store = dp.open();
        // More than any test machine has free: fallocate refuses at once.
        let m = Manifest {
            path: "huge.wim".into(),
            size: 1 << 60,
            hash: FileHash::of(b""),
            chunks: vec![ChunkRef {
                id: ChunkId::of(b"x"),
                len: u32::MAX,
            }],
            segments: vec![],
        };
        let e = store.stage("FRY00004", 1, record(1), vec![m]).unwrap_err();
        assert!(
            e.is_no_space() || e.to_string().contains("preallocate"),
            "{e}"
        );
        assert!(e.to_string().contains("huge.wim"), "{e}");
    }
}
