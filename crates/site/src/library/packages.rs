//! Packages in the library: what every package shares, images and upgrade
//! packages alike (its record, the commit of a new revision, show, export,
//! verify, remove, rollback), and what is an image's own (importing and
//! refreshing a WIM, its properties).
//!
//! These are the blocking halves of the operator API's handlers; each runs
//! on a blocking thread and talks to the [`Library`] directly.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use ferry_core::{ChunkId, FileHash, Manifest};
use ferry_store::{Import, Library, StoreError};
use ferry_wim::{Layout, Wim};
use serde::{Deserialize, Serialize};

use crate::library::catalog::{
    FileRecord, ImportStats, PackageKind, PackageRecord, PackageSummary, PackageView,
    RevisionRecord, SourceRecord, SourceState,
};
use crate::library::ingest::{ingest, IngestError};

pub use ferry_api::requests::{ImportRequest, Properties};

/// Why an operation on images failed. The text is shown to operators as is.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The path cannot be imported (missing, a folder, empty, unreadable).
    #[error("{path}: {reason}")]
    Source {
        /// The path given.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The file is not a usable WIM.
    #[error("{path}: not a usable WIM: {reason}")]
    NotWim {
        /// The path given.
        path: String,
        /// wimlib's or the layout parser's explanation.
        reason: String,
    },
    /// `--index` names an image the WIM does not have.
    #[error("{path}: there is no image index {index}; the WIM has {count} image(s) (1..={count})")]
    NoIndex {
        /// The path given.
        path: String,
        /// The index asked for.
        index: u32,
        /// How many images there are.
        count: u32,
    },
    /// The file changed while it was being imported.
    #[error(
        "{path}: the file changed while it was being imported; nothing was added, import it again"
    )]
    Changed {
        /// The path given.
        path: String,
    },
    /// No package with that id.
    #[error("no package {0}; `ferry image list` shows the ids")]
    NoPackage(String),
    /// No such revision.
    #[error("package {id} has no revision {revision}")]
    NoRevision {
        /// Package id.
        id: String,
        /// Revision asked for.
        revision: u32,
    },
    /// The revision has no such file, or several and none was named.
    #[error("{0}")]
    NoFile(String),
    /// A resource of the WIM does not match its SHA-1 (checked while
    /// importing).
    #[error("{path}: {detail}; nothing was added (`wimverify` checks the file the same way; `--no-verify` imports it as it is)")]
    Damaged {
        /// The path given.
        path: String,
        /// Which resource, and how.
        detail: String,
    },
    /// A property given to `ferry image set` is not acceptable.
    #[error("{0}")]
    Property(String),
    /// Reading the source failed midway.
    #[error("{path}: {source}")]
    Ingest {
        /// The path given.
        path: String,
        /// What failed.
        source: IngestError,
    },
    /// The library failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A temporary export could not be written.
    #[error("cannot prepare a work file in {dir}: {source}")]
    Work {
        /// The work folder.
        dir: String,
        /// The I/O error.
        source: std::io::Error,
    },
}

impl ImageError {
    /// True when the operator's input is at fault (HTTP 4xx), false when the
    /// site failed (5xx).
    pub fn is_input(&self) -> bool {
        matches!(
            self,
            ImageError::Source { .. }
                | ImageError::NotWim { .. }
                | ImageError::NoIndex { .. }
                | ImageError::Changed { .. }
                | ImageError::NoPackage(_)
                | ImageError::NoRevision { .. }
                | ImageError::NoFile(_)
                | ImageError::Property(_)
                | ImageError::Damaged { .. }
        )
    }
}

/// Import progress, as the API streams it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// Bytes processed.
    pub done: u64,
    /// Bytes in all.
    pub total: u64,
}

fn modified_ns(meta: &std::fs::Metadata) -> i64 {
    meta.modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

fn decode_record(id: &str, bytes: &[u8]) -> Result<PackageRecord, ImageError> {
    serde_json::from_slice(bytes).map_err(|e| {
        ImageError::Store(StoreError::Corrupt {
            what: format!("catalog record of {id}"),
            detail: e.to_string(),
        })
    })
}

/// Checks the path the way an operator would want it explained.
pub(crate) fn check_source(path: &Path) -> Result<std::fs::Metadata, ImageError> {
    let err = |reason: String| ImageError::Source {
        path: path.display().to_string(),
        reason,
    };
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => err("no such file".into()),
        std::io::ErrorKind::PermissionDenied => err("permission denied".into()),
        _ => err(e.to_string()),
    })?;
    if meta.is_dir() {
        return Err(err("is a folder, not a WIM file (upgrade packages from a folder are added with `ferry upgrade add`)".into()));
    }
    if !meta.is_file() {
        return Err(err("is not a regular file".into()));
    }
    if meta.len() == 0 {
        return Err(err("is empty (0 bytes)".into()));
    }
    Ok(meta)
}

/// Where the site keeps temporary files (exports for `--index`).
pub fn work_dir(data: &Path) -> PathBuf {
    data.join("work")
}

/// Exports image `index` of `wim` (read from `shown`) into a WIM of its
/// own in the site's work folder; returns it opened, with its path (the file
/// goes when the path is dropped). The source is only read.
pub(crate) fn export_index(
    wim: &mut Wim,
    index: u32,
    data: &Path,
    shown: &str,
) -> Result<(Wim, tempfile::TempPath), ImageError> {
    let not_wim = |reason: String| ImageError::NotWim {
        path: shown.to_string(),
        reason,
    };
    let count = wim.info().image_count;
    if index == 0 || index > count {
        return Err(ImageError::NoIndex {
            path: shown.to_string(),
            index,
            count,
        });
    }
    let dir = work_dir(data);
    let work_err = |source| ImageError::Work {
        dir: dir.display().to_string(),
        source,
    };
    std::fs::create_dir_all(&dir).map_err(work_err)?;
    let tmp = tempfile::Builder::new()
        .prefix("export-")
        .suffix(".wim")
        .tempfile_in(&dir)
        .map_err(work_err)?
        .into_temp_path();
    std::fs::remove_file(&tmp).map_err(work_err)?;
    wim.export_image(index, &tmp)
        .map_err(|e| not_wim(e.to_string()))?;
    let one = Wim::open(&tmp).map_err(|e| not_wim(e.to_string()))?;
    Ok((one, tmp))
}

/// Imports a WIM as a new package. Nothing is added unless everything
/// succeeds; chunks written by a failed import are reclaimed.
pub fn import(
    lib: &Library,
    data: &Path,
    site_code: &str,
    req: &ImportRequest,
    progress: impl FnMut(Progress),
) -> Result<PackageView, ImageError> {
    let shown = req.path.display().to_string();
    let existing = match &req.package {
        Some(id) => Some(record(lib, id)?),
        None => None,
    };
    let source_meta = check_source(&req.path)?;
    // With --index, import a single-image export of Ferry's own; the source
    // file is only read.
    let (export, wim_info, images) = open_wim(&req.path, req.index, data, &shown)?;
    let file_path: &Path = export.as_deref().unwrap_or(&req.path);
    let file_name = package_file_name(existing.as_ref(), &req.path);
    let read = if req.no_verify {
        Read::Wim
    } else {
        Read::VerifiedWim
    };
    let (import, manifest) = ingest_unchanged(
        lib,
        &Source {
            read_from: file_path,
            name: &file_name,
            read,
            original: &req.path,
            meta: &source_meta,
            shown: &shown,
        },
        progress,
    )?;

    let source_hash = if export.is_some() {
        FileHash::from(hash_file(&req.path).map_err(|e| ImageError::Source {
            path: shown.clone(),
            reason: e.to_string(),
        })?)
    } else {
        manifest.hash
    };
    let revision = RevisionRecord {
        revision: 1,
        created: crate::now(),
        source: SourceRecord {
            path: shown.clone(),
            size: source_meta.len(),
            modified_ns: modified_ns(&source_meta),
            hash: source_hash,
        },
        exported_index: req.index,
        wim: wim_info,
        images: images.clone(),
        files: vec![FileRecord::of(&manifest)],
        stats: ImportStats::default(),
        service: None,
        warnings: Vec::new(),
        verified: !req.no_verify,
    };
    if let Some(rec) = existing.as_ref().filter(|r| same_as_latest(r, &revision)) {
        return unchanged(lib, import, rec, &revision);
    }
    let mut record = match existing {
        Some(mut rec) => {
            // A refresh is an update of the DPs: they get the new revision.
            rec.push_refreshed(revision, req.version.as_ref());
            rec
        }
        None => {
            let name = req
                .name
                .clone()
                .filter(|n| !n.trim().is_empty())
                .or_else(|| {
                    images
                        .first()
                        .map(|i| i.name.clone())
                        .filter(|n| !n.is_empty())
                })
                .unwrap_or_else(|| file_name.clone());
            new_record(
                lib,
                site_code,
                PackageKind::Image,
                name,
                req.version.as_ref(),
                req.comment.as_ref(),
                revision,
            )?
        }
    };
    commit(
        import,
        &mut record,
        std::slice::from_ref(&manifest),
        Release::Newest,
    )?;
    lib.try_collect()?;
    Ok(PackageView {
        source_state: source_state(&record),
        record,
        unchanged: false,
    })
}

/// A WIM opened for import: Ferry's export of one image of it, when one
/// was asked for (a temporary file, imported instead), and its properties.
pub(crate) type OpenedWim = (
    Option<tempfile::TempPath>,
    ferry_wim::WimInfo,
    Vec<ferry_wim::ImageInfo>,
);

/// Opens the WIM at `path` for its properties; with `index`, Ferry's own
/// single-image export of it is what gets imported. `shown` names it in
/// errors.
pub(crate) fn open_wim(
    path: &Path,
    index: Option<u32>,
    data: &Path,
    shown: &str,
) -> Result<OpenedWim, ImageError> {
    let not_wim = |reason: String| ImageError::NotWim {
        path: shown.to_string(),
        reason,
    };
    let mut wim =
        Wim::open(path).map_err(|e| not_wim(format!("{} (wimlib error {})", e.message, e.code)))?;
    let mut export: Option<tempfile::TempPath> = None;
    if let Some(index) = index {
        let (one, tmp) = export_index(&mut wim, index, data, shown)?;
        wim = one;
        export = Some(tmp);
    }
    Ok((export, wim.info(), wim.images()))
}

/// The file name of the package's WIM: a new revision keeps the package's,
/// whatever the new source is called (task sequences refer to it); a new
/// package takes the source's when it is a usable name.
fn package_file_name(existing: Option<&PackageRecord>, source: &Path) -> String {
    let kept_name = existing
        .and_then(|r| r.latest())
        .and_then(|r| r.files.first())
        .map(|f| f.path.clone());
    kept_name.unwrap_or_else(|| {
        source
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .filter(|n| ferry_core::manifest::check_rel_path(n).is_ok())
            .unwrap_or_else(|| "image.wim".into())
    })
}

/// One file to import and the source it stands for.
struct Source<'a> {
    /// What is read (the source, or Ferry's export of one image of it).
    read_from: &'a Path,
    /// Its path in the package.
    name: &'a str,
    read: Read,
    /// The operator's file, which must not change meanwhile.
    original: &'a Path,
    /// Its metadata before the import.
    meta: &'a std::fs::Metadata,
    /// How messages name it.
    shown: &'a str,
}

/// Ingests `src` into a new import, then checks that the operator's file
/// did not change meanwhile (without `--index` it was read directly; with
/// it, the export was read and the source is compared). On an error the
/// import is dropped and what it wrote collected.
fn ingest_unchanged<'l>(
    lib: &'l Library,
    src: &Source<'_>,
    progress: impl FnMut(Progress),
) -> Result<(Import<'l>, Manifest), ImageError> {
    let mut import = lib.begin_import();
    let manifest = match ingest_path(
        &mut import,
        src.read_from,
        src.name,
        src.read,
        src.shown,
        None,
        progress,
    ) {
        Ok(m) => m,
        Err(e) => {
            drop(import);
            lib.try_collect()?;
            return Err(e);
        }
    };
    let after = std::fs::metadata(src.original).ok();
    if after.as_ref().map(|m| (m.len(), modified_ns(m)))
        != Some((src.meta.len(), modified_ns(src.meta)))
    {
        drop(import);
        lib.try_collect()?;
        return Err(ImageError::Changed {
            path: src.shown.to_string(),
        });
    }
    Ok((import, manifest))
}

/// Whether `next` holds the files the latest revision of `rec` holds (a
/// refresh of an unchanged source).
pub(crate) fn same_as_latest(rec: &PackageRecord, next: &RevisionRecord) -> bool {
    rec.latest()
        .is_some_and(|last| last.files == next.files && last.exported_index == next.exported_index)
}

/// A refresh that [`same_as_latest`] found unchanged makes no revision: the
/// import is dropped (it stored nothing new), the source's new stamp is
/// recorded so it no longer shows as changed, and the view says
/// `unchanged`.
pub(crate) fn unchanged(
    lib: &Library,
    import: ferry_store::Import<'_>,
    rec: &PackageRecord,
    next: &RevisionRecord,
) -> Result<PackageView, ImageError> {
    drop(import);
    lib.try_collect()?;
    let number = rec.latest().map_or(0, |r| r.revision);
    let source = next.source.clone();
    let record = edit_record(lib, &rec.id, |r| {
        if let Some(x) = r.revisions.iter_mut().find(|x| x.revision == number) {
            x.source = source;
        }
        Ok(())
    })?;
    tracing::info!(package = %rec.id, revision = number, "refresh: the source holds what the latest revision holds; no revision made");
    Ok(PackageView {
        source_state: source_state(&record),
        record,
        unchanged: true,
    })
}

/// How [`ingest_path`] reads a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Read {
    /// By content-defined chunking.
    Data,
    /// A WIM, cut at its resources.
    Wim,
    /// A WIM, cut at its resources, and every resource checked against its
    /// SHA-1 on other threads meanwhile.
    VerifiedWim,
}

/// Checks every resource of the WIM at `path` against its SHA-1: Ferry's
/// own reader for ordinary resources, wimlib's verify for a WIM with solid
/// ones.
fn verify_wim(path: &Path, layout: &Layout, shown: &str) -> Result<(), ImageError> {
    let damaged = |detail: String| ImageError::Damaged {
        path: shown.to_string(),
        detail,
    };
    match ferry_wim::verify_blobs_from(path, layout, 0) {
        Ok(Some(c)) => {
            tracing::debug!(path = %shown, blobs = c.blobs, bytes = c.bytes, "every resource verified");
            Ok(())
        }
        Ok(None) => Wim::open(path)
            .and_then(|mut w| w.verify())
            .map_err(|e| damaged(format!("{} (wimlib error {})", e.message, e.code))),
        Err(ferry_wim::VerifyError::Bad {
            offset,
            sha1,
            reason,
            ..
        }) => Err(damaged(format!(
            "the resource at offset {offset} (SHA-1 {sha1}) {reason}"
        ))),
        Err(ferry_wim::VerifyError::Read { offset, source, .. }) => Err(damaged(format!(
            "reading its resources at offset {offset}: {source}"
        ))),
    }
}

/// Reads the file at `path` into `import` as `name` (see [`Read`]).
/// `shown` names the file in errors.
pub(crate) fn ingest_path(
    import: &mut ferry_store::Import<'_>,
    path: &Path,
    name: &str,
    read: Read,
    shown: &str,
    kept: Option<&crate::library::ingest::Kept<'_>>,
    mut progress: impl FnMut(Progress),
) -> Result<Manifest, ImageError> {
    let source = |e: std::io::Error| ImageError::Source {
        path: shown.to_string(),
        reason: e.to_string(),
    };
    let file = File::open(path).map_err(source)?;
    let file_len = file.metadata().map_err(source)?.len();
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut layout = None;
    let segments = if read != Read::Data {
        let l = Layout::read(&mut reader, file_len).map_err(|e| ImageError::NotWim {
            path: shown.to_string(),
            reason: e.to_string(),
        })?;
        std::io::Seek::seek(&mut reader, std::io::SeekFrom::Start(0)).map_err(source)?;
        let segments = l.segments.clone();
        layout = Some(l);
        segments
    } else if file_len == 0 {
        Vec::new()
    } else {
        vec![ferry_core::Segment {
            offset: 0,
            len: file_len,
            kind: ferry_core::SegmentKind::Data,
            split: ferry_core::Split::Cdc,
        }]
    };
    let verify = layout.filter(|_| read == Read::VerifiedWim);
    std::thread::scope(|s| {
        // The check reads the file beside the chunking (the page cache
        // serves both) and decompresses on the other core.
        let check = verify.map(|l| {
            std::thread::Builder::new()
                .name("ferry-verify".into())
                .spawn_scoped(s, move || verify_wim(path, &l, shown))
        });
        let m = ingest(import, &mut reader, &segments, name, kept, |done| {
            progress(Progress {
                done,
                total: file_len,
            })
        })
        .map_err(|source| ImageError::Ingest {
            path: shown.to_string(),
            source,
        });
        match check {
            Some(Ok(h)) => {
                let checked = h.join().unwrap_or_else(|_| {
                    Err(ImageError::Damaged {
                        path: shown.to_string(),
                        detail: "the verifying thread failed".into(),
                    })
                });
                // Damage is the more useful message.
                checked.and(m)
            }
            Some(Err(e)) => Err(source(e)),
            None => m,
        }
    })
}

/// A new package (its next id from the library) whose first revision is
/// `revision`; created when that revision was.
pub(crate) fn new_record(
    lib: &Library,
    site_code: &str,
    kind: PackageKind,
    name: String,
    version: Option<&String>,
    comment: Option<&String>,
    revision: RevisionRecord,
) -> Result<PackageRecord, ImageError> {
    Ok(PackageRecord {
        id: format!("{site_code}{:05X}", lib.next_package_number()?),
        kind,
        name,
        version: version.cloned().unwrap_or_default(),
        comment: comment.cloned().unwrap_or_default(),
        created: revision.created,
        revisions: vec![revision],
        released: None,
        architecture: String::new(),
        language: String::new(),
        keep: None,
        multicast: Default::default(),
    })
}

/// What a new revision does to the revision DPs receive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Release {
    /// DPs get the newest revision (an import or refresh); the version
    /// string is the new one.
    Newest,
    /// DPs keep the revision they were sent (a servicing job without
    /// `--distribute`).
    Unchanged,
}

/// Commits `manifests` as the newest revision of `record` (its last entry).
/// The stored record is read again under the library's lock and only the
/// new revision (and `release`) is applied to it, so a concurrent prune or
/// `distribute` is not undone; a record whose newest revision is no longer
/// the one before it is refused. On success `record` is what was stored,
/// with the revision's exact figures.
pub(crate) fn commit(
    import: ferry_store::Import<'_>,
    record: &mut PackageRecord,
    manifests: &[Manifest],
    release: Release,
) -> Result<(), ImageError> {
    let id = record.id.clone();
    let number = record.latest().map_or(1, |r| r.revision);
    let segments: u64 = manifests.iter().map(|m| m.segments.len() as u64).sum();
    let corrupt = |e: serde_json::Error| StoreError::Corrupt {
        what: format!("catalog record of {id}"),
        detail: e.to_string(),
    };
    let mut stored: Option<PackageRecord> = None;
    let committed = import.commit(&id, number, manifests, |c, current| {
        let mut rec = match current {
            None if number == 1 => record.clone(),
            None => {
                return Err(StoreError::Refused(format!(
                    "{id} was removed while revision {number} was being made"
                )))
            }
            Some(bytes) => {
                let mut cur: PackageRecord = serde_json::from_slice(bytes).map_err(corrupt)?;
                let newest = cur.latest().map_or(0, |r| r.revision);
                if newest + 1 != number {
                    return Err(StoreError::Refused(format!(
                        "{id} changed while revision {number} was being made (its newest revision is now {newest}); try again"
                    )));
                }
                let pinned = cur.target();
                cur.revisions.extend(record.revisions.last().cloned());
                match release {
                    Release::Newest => {
                        cur.released = None;
                        cur.version = record.version.clone();
                    }
                    Release::Unchanged => cur.released = pinned,
                }
                cur
            }
        };
        if let Some(r) = rec.revisions.last_mut() {
            r.stats = import_stats(c, segments);
        }
        let bytes = serde_json::to_vec(&rec).map_err(corrupt)?;
        stored = Some(rec);
        Ok(bytes)
    })?;
    if let Some(rec) = stored {
        *record = rec;
    }
    if let Some(r) = record.revisions.last_mut() {
        r.stats = import_stats(&committed, segments);
    }
    Ok(())
}

pub(crate) fn import_stats(c: &ferry_store::CommitStats, segments: u64) -> ImportStats {
    ImportStats {
        logical_bytes: c.logical_bytes,
        chunks: c.chunks,
        segments,
        new_chunks: c.new_chunks,
        new_bytes: c.new_bytes,
        shared_bytes: c.logical_bytes.saturating_sub(c.new_bytes),
    }
}

/// BLAKE3 of the file at `path`.
pub fn hash_file(path: &Path) -> std::io::Result<blake3::Hash> {
    let mut h = blake3::Hasher::new();
    h.update_reader(File::open(path)?)?;
    Ok(h.finalize())
}

/// Compares the latest revision's source with the file on disk now.
pub fn source_state(record: &PackageRecord) -> SourceState {
    let Some(rev) = record.latest() else {
        return SourceState::NotChecked;
    };
    if rev.service.is_some() {
        return SourceState::Serviced;
    }
    let now = match record.kind {
        PackageKind::Image => {
            std::fs::metadata(&rev.source.path).map(|m| (m.len(), modified_ns(&m)))
        }
        PackageKind::Upgrade => folder_stamp(Path::new(&rev.source.path)),
    };
    match now {
        Err(_) => SourceState::Missing,
        Ok(stamp) if stamp == (rev.source.size, rev.source.modified_ns) => SourceState::Unchanged,
        Ok(_) => SourceState::Changed,
    }
}

/// Total bytes and newest modification time of the files below `root`: what
/// `image show` compares to tell whether the folder changed since import.
pub fn folder_stamp(root: &Path) -> std::io::Result<(u64, i64)> {
    let mut size = 0;
    let mut newest = 0i64;
    for entry in walkdir::WalkDir::new(root).follow_links(false) {
        let entry = entry.map_err(std::io::Error::other)?;
        if entry.file_type().is_file() {
            let m = entry.metadata().map_err(std::io::Error::other)?;
            size += m.len();
            newest = newest.max(modified_ns(&m));
        }
    }
    if !root.is_dir() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "not a folder",
        ));
    }
    Ok((size, newest))
}

/// Every package, in id order.
pub fn list(lib: &Library) -> Result<Vec<PackageSummary>, ImageError> {
    lib.packages()?
        .into_iter()
        .map(|(id, bytes)| decode_record(&id, &bytes).map(|r| r.summary()))
        .collect()
}

/// One package's record.
pub fn record(lib: &Library, id: &str) -> Result<PackageRecord, ImageError> {
    let bytes = lib
        .package(id)?
        .ok_or_else(|| ImageError::NoPackage(id.to_string()))?;
    decode_record(id, &bytes)
}

/// One package with live facts.
pub fn show(lib: &Library, id: &str) -> Result<PackageView, ImageError> {
    let record = record(lib, id)?;
    Ok(PackageView {
        source_state: source_state(&record),
        record,
        unchanged: false,
    })
}

/// What a removal freed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoveView {
    /// Chunks freed now.
    pub freed_chunks: u64,
    /// Their bytes.
    pub freed_bytes: u64,
}

/// Deletes a package and frees chunks nothing else references.
pub fn remove(lib: &Library, id: &str) -> Result<RemoveView, ImageError> {
    match lib.remove_package(id) {
        Ok(s) => Ok(RemoveView {
            freed_chunks: s.freed_chunks,
            freed_bytes: s.freed_bytes,
        }),
        Err(StoreError::NoPackage(id)) => Err(ImageError::NoPackage(id)),
        Err(e) => Err(e.into()),
    }
}

/// The manifest of one file of a package revision (latest when `revision`
/// is `None`; first file when `path` is `None`).
pub fn manifest(
    lib: &Library,
    id: &str,
    revision: Option<u32>,
    path: Option<&str>,
) -> Result<Manifest, ImageError> {
    let rec = record(lib, id)?;
    let rev = match revision {
        Some(r) => r,
        None => rec.latest().map_or(0, |r| r.revision),
    };
    let mut manifests = lib.manifests(id, rev)?;
    if manifests.is_empty() {
        return Err(ImageError::NoRevision {
            id: id.to_string(),
            revision: rev,
        });
    }
    let listed = |ms: &[Manifest]| {
        const SHOWN: usize = 10;
        let mut names: Vec<&str> = ms.iter().take(SHOWN).map(|m| m.path.as_str()).collect();
        let more = ms.len().saturating_sub(SHOWN);
        if more > 0 {
            names.push("…");
        }
        format!(
            "{}{}",
            names.join(", "),
            if more > 0 {
                format!(" ({more} more; `ferry upgrade show {id}` lists them)")
            } else {
                String::new()
            }
        )
    };
    match path {
        Some(p) => match manifests.iter().position(|m| m.path == p) {
            Some(i) => Ok(manifests.swap_remove(i)),
            None => Err(ImageError::NoFile(format!(
                "package {id} revision {rev} has no file {p}; its files: {}",
                listed(&manifests)
            ))),
        },
        None if manifests.len() == 1 => Ok(manifests.swap_remove(0)),
        None => Err(ImageError::NoFile(format!(
            "package {id} revision {rev} holds {} files: name one with --path, or give --out an existing folder for them all ({})",
            manifests.len(),
            listed(&manifests)
        ))),
    }
}

/// One damaged chunk and the packages that use it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DamagedChunk {
    /// The chunk id.
    pub chunk: ChunkId,
    /// What is wrong.
    pub detail: String,
    /// `ID rREV path@offset` of every place that uses it.
    pub used_by: Vec<String>,
}

/// The result of `ferry content verify`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyReport {
    /// Packages whose chunks were checked.
    pub packages: Vec<String>,
    /// Distinct chunks checked.
    pub chunks: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Chunks that are damaged or missing.
    pub damaged: Vec<DamagedChunk>,
}

/// Re-hashes the chunks of one package (every revision), or of the whole
/// library, and names every damaged chunk with where it is used.
pub fn verify(lib: &Library, id: Option<&str>) -> Result<VerifyReport, ImageError> {
    let ids: Vec<String> = match id {
        Some(id) => {
            record(lib, id)?;
            vec![id.to_string()]
        }
        None => lib.packages()?.into_iter().map(|(id, _)| id).collect(),
    };
    let mut uses: std::collections::HashMap<ChunkId, Vec<String>> =
        std::collections::HashMap::new();
    let mut order = Vec::new();
    for pkg in &ids {
        for rev in lib.revisions(pkg)? {
            for m in lib.manifests(pkg, rev)? {
                for (offset, c) in m.offsets() {
                    let e = uses.entry(c.id).or_default();
                    if e.is_empty() {
                        order.push(c.id);
                    }
                    e.push(format!("{pkg} r{rev} {}@{offset}", m.path));
                }
            }
        }
    }
    if id.is_none() {
        // Unreferenced chunks are checked too: they may be needed again.
        for c in lib.chunk_ids()? {
            if let std::collections::hash_map::Entry::Vacant(e) = uses.entry(c) {
                e.insert(Vec::new());
                order.push(c);
            }
        }
    }
    let mut report = VerifyReport {
        packages: ids,
        ..VerifyReport::default()
    };
    let damage = lib.verify(order.iter().copied(), |len| {
        report.chunks += 1;
        report.bytes += len;
    })?;
    report.chunks += damage.len() as u64;
    report.damaged = damage
        .into_iter()
        .map(|d| DamagedChunk {
            used_by: uses.remove(&d.id).unwrap_or_default(),
            chunk: d.id,
            detail: d.detail,
        })
        .collect();
    Ok(report)
}

/// Removes the revisions of `id` no DP uses any more: every one but the
/// newest and the released one. While a DP that holds the package has not
/// installed the released revision, nothing goes: it may still serve an
/// older one to its clients. `settled(target)` says whether every DP that
/// holds the package has the released revision `target` installed (the
/// site asks its DP registry).
/// Returns the revisions removed.
pub fn prune(
    lib: &Library,
    id: &str,
    keep_default: u32,
    settled: impl FnOnce(u32) -> bool,
) -> Result<Vec<u32>, ImageError> {
    let rec = record(lib, id)?;
    let (Some(latest), Some(target)) = (rec.latest().map(|r| r.revision), rec.target()) else {
        return Ok(Vec::new());
    };
    if !settled(target) {
        return Ok(Vec::new());
    }
    // The newest `keep` revisions stay, and the released one.
    let keep = rec.keep.unwrap_or(keep_default).max(1) as usize;
    let newest: Vec<u32> = rec
        .revisions
        .iter()
        .rev()
        .take(keep)
        .map(|r| r.revision)
        .collect();
    let old: Vec<u32> = rec
        .revisions
        .iter()
        .map(|r| r.revision)
        .filter(|&r| r != latest && r != target && !newest.contains(&r))
        .collect();
    let mut removed = Vec::new();
    for &r in &old {
        // Decided on a copy; checked again on the record as stored now.
        let result = lib.remove_revision(id, r, |current| {
            let Some(bytes) = current else {
                return Err(StoreError::NoPackage(id.to_string()));
            };
            let mut rec: PackageRecord =
                serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
                    what: format!("catalog record of {id}"),
                    detail: e.to_string(),
                })?;
            if rec.latest().map(|x| x.revision) == Some(r) || rec.target() == Some(r) {
                return Err(StoreError::Refused(format!(
                    "{id} revision {r} is in use again"
                )));
            }
            rec.revisions.retain(|x| x.revision != r);
            serde_json::to_vec(&rec)
                .map(Some)
                .map_err(|e| StoreError::Corrupt {
                    what: format!("catalog record of {id}"),
                    detail: e.to_string(),
                })
        });
        match result {
            Ok(_) => {
                tracing::info!(package = %id, revision = r, "old revision removed: no DP uses it");
                removed.push(r);
            }
            Err(StoreError::Refused(why)) => {
                tracing::info!(package = %id, revision = r, "old revision kept: {why}");
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(removed)
}

/// Changes package `id`'s record with `f`, in one synced write against the
/// record as stored.
fn edit_record(
    lib: &Library,
    id: &str,
    f: impl FnOnce(&mut PackageRecord) -> Result<(), String>,
) -> Result<PackageRecord, ImageError> {
    let mut out = None;
    let corrupt = |e: &dyn std::fmt::Display| StoreError::Corrupt {
        what: format!("catalog record of {id}"),
        detail: e.to_string(),
    };
    lib.update_package(id, |bytes| {
        let mut rec = decode_record(id, bytes).map_err(|e| corrupt(&e))?;
        f(&mut rec).map_err(StoreError::Refused)?;
        let v = serde_json::to_vec(&rec).map_err(|e| corrupt(&e))?;
        out = Some(rec);
        Ok(v)
    })
    .map_err(|e| match e {
        StoreError::Refused(why) => ImageError::Property(why),
        StoreError::NoPackage(p) => ImageError::NoPackage(p),
        e => e.into(),
    })?;
    out.ok_or_else(|| ImageError::NoPackage(id.to_string()))
}

/// Makes the newest revision of `id` the one DPs receive (what
/// `ferry distribute` does); returns it.
pub fn release_latest(lib: &Library, id: &str) -> Result<u32, ImageError> {
    let rec = record(lib, id)?;
    let latest = rec.latest().map_or(0, |r| r.revision);
    if rec.released.is_some() {
        edit_record(lib, id, |rec| {
            rec.released = None;
            Ok(())
        })?;
    }
    Ok(latest)
}

/// Releases kept revision `to` of `id` to the DPs (a rollback: each DP
/// fetches what it lacks of it, as for any revision); `to` being the latest
/// releases the latest. Returns the record.
pub fn rollback(lib: &Library, id: &str, to: u32) -> Result<PackageRecord, ImageError> {
    edit_record(lib, id, |rec| {
        let kept: Vec<String> = rec
            .revisions
            .iter()
            .map(|r| r.revision.to_string())
            .collect();
        if rec.revision(to).is_none() {
            return Err(format!(
                "{id} has no revision {to} any more; kept: {} (`--keep N` keeps more)",
                kept.join(", ")
            ));
        }
        let latest = rec.latest().map_or(0, |r| r.revision);
        rec.released = (to != latest).then_some(to);
        Ok(())
    })
}

/// Sets package `id`'s multicast settings (`--only` and `--encrypt` need
/// `--allow`); returns the record.
pub fn set_multicast(
    lib: &Library,
    id: &str,
    m: crate::library::catalog::MulticastSettings,
) -> Result<PackageRecord, ImageError> {
    if !m.allow && (m.only || m.encrypt) {
        return Err(ImageError::Property(
            "--only and --encrypt need --allow (or give --off)".into(),
        ));
    }
    edit_record(lib, id, |rec| {
        rec.multicast = m;
        Ok(())
    })
}

/// Longest property text, in bytes.
pub const MAX_PROPERTY_LEN: usize = 1024;

/// Sets the properties given in `p` on package `id`; returns the record.
pub fn set_properties(
    lib: &Library,
    id: &str,
    p: &Properties,
) -> Result<PackageRecord, ImageError> {
    let given = [
        ("--name", &p.name),
        ("--version", &p.version),
        ("--comment", &p.comment),
        ("--arch", &p.architecture),
        ("--lang", &p.language),
    ];
    if given.iter().all(|(_, v)| v.is_none()) && p.keep.is_none() {
        return Err(ImageError::Property(
            "nothing to set: give --name, --version, --comment or --keep (upgrade packages also --arch, --lang)".into(),
        ));
    }
    for (flag, v) in given {
        let Some(v) = v else { continue };
        if v.len() > MAX_PROPERTY_LEN || v.chars().any(char::is_control) {
            return Err(ImageError::Property(format!(
                "{flag}: at most {MAX_PROPERTY_LEN} bytes of text without control characters"
            )));
        }
    }
    if p.name.as_deref().is_some_and(|n| n.trim().is_empty()) {
        return Err(ImageError::Property("--name cannot be empty".into()));
    }
    edit_record(lib, id, |rec| {
        if rec.kind == PackageKind::Image && (p.architecture.is_some() || p.language.is_some()) {
            return Err(format!(
                "{id} is an OS image: its architecture and languages are those of its WIM; --arch and --lang are for upgrade packages"
            ));
        }
        let set = |field: &mut String, v: &Option<String>| {
            if let Some(v) = v {
                *field = v.trim().to_string();
            }
        };
        set(&mut rec.name, &p.name);
        set(&mut rec.version, &p.version);
        set(&mut rec.comment, &p.comment);
        set(&mut rec.architecture, &p.architecture);
        set(&mut rec.language, &p.language);
        if let Some(k) = p.keep {
            rec.keep = (k > 0).then_some(k);
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_core::manifest::SegmentRecord;
    use ferry_core::{ChunkRef, SegmentKind};

    /// Commits a one-chunk file holding `seed` as the next revision of
    /// `record` (a copy the caller may hold for as long as it likes).
    fn add_revision(lib: &Library, record: &mut PackageRecord, seed: u8, release: Release) {
        let data = vec![seed; 64];
        let id = ChunkId::of(&data);
        let mut imp = lib.begin_import();
        imp.put_chunk(&id, &data).unwrap();
        let m = Manifest {
            path: "f.wim".into(),
            size: 64,
            hash: FileHash::of(&data),
            chunks: vec![ChunkRef { id, len: 64 }],
            segments: vec![SegmentRecord {
                kind: SegmentKind::Data,
                offset: 0,
                len: 64,
                first_chunk: 0,
                chunk_count: 1,
                fingerprint: None,
            }],
        };
        let next = record.latest().map_or(1, |r| r.revision + 1);
        record.revisions.push(RevisionRecord {
            verified: false,
            revision: next,
            created: time::OffsetDateTime::UNIX_EPOCH,
            source: SourceRecord {
                path: String::new(),
                size: 64,
                modified_ns: 0,
                hash: m.hash,
            },
            exported_index: None,
            wim: Default::default(),
            images: Vec::new(),
            files: vec![FileRecord::of(&m)],
            stats: ImportStats::default(),
            service: None,
            warnings: Vec::new(),
        });
        commit(imp, record, &[m], release).unwrap();
    }

    fn revisions(lib: &Library) -> Vec<u32> {
        let rec = record(lib, "FRY00001").unwrap();
        rec.revisions.iter().map(|r| r.revision).collect()
    }

    #[test]
    fn record_changes_made_meanwhile_survive_a_commit_from_an_older_copy() {
        let dir = tempfile::tempdir().unwrap();
        let lib = Library::open(dir.path()).unwrap();
        let mut rec = PackageRecord {
            id: "FRY00001".into(),
            kind: PackageKind::Image,
            name: "x".into(),
            version: String::new(),
            comment: String::new(),
            created: time::OffsetDateTime::UNIX_EPOCH,
            revisions: Vec::new(),
            released: None,
            architecture: String::new(),
            language: String::new(),
            keep: None,
            multicast: Default::default(),
        };
        add_revision(&lib, &mut rec, 1, Release::Newest);
        // A job without --distribute: DPs stay on revision 1.
        add_revision(&lib, &mut rec, 2, Release::Unchanged);
        assert_eq!(record(&lib, "FRY00001").unwrap().target(), Some(1));
        // The job that makes revision 3 started from this copy…
        let mut stale = rec.clone();
        // …and meanwhile the operator distributes (revision 2 released).
        assert_eq!(release_latest(&lib, "FRY00001").unwrap(), 2);
        add_revision(&lib, &mut stale, 3, Release::Unchanged);
        let now = record(&lib, "FRY00001").unwrap();
        assert_eq!(
            now.target(),
            Some(2),
            "the distribute is kept: DPs stay on 2, not back on 1"
        );
        assert_eq!(stale, now, "the caller gets what was stored");

        // While a DP is not on the released revision, nothing goes; once
        // every DP is (or none holds it), everything but the newest goes.
        add_revision(&lib, &mut stale, 4, Release::Newest);
        assert_eq!(revisions(&lib), [1, 2, 3, 4]);
        let mut asked = None;
        let removed = prune(&lib, "FRY00001", 1, |t| {
            asked = Some(t);
            false
        })
        .unwrap();
        assert!(removed.is_empty());
        assert_eq!(asked, Some(4), "asked about the released revision");
        assert_eq!(revisions(&lib), [1, 2, 3, 4]);
        // Keeping three: the oldest goes.
        let removed = prune(&lib, "FRY00001", 3, |_| true).unwrap();
        assert_eq!(removed, [1]);
        assert_eq!(revisions(&lib), [2, 3, 4]);
        // A rollback releases a kept revision, which then stays with the
        // newest; one no longer kept is refused, naming those kept.
        assert_eq!(rollback(&lib, "FRY00001", 2).unwrap().target(), Some(2));
        let e = rollback(&lib, "FRY00001", 1).unwrap_err().to_string();
        assert!(e.contains("kept: 2, 3, 4"), "{e}");
        let removed = prune(&lib, "FRY00001", 1, |_| true).unwrap();
        assert_eq!(removed, [3]);
        let rec = rollback(&lib, "FRY00001", 4).unwrap();
        assert_eq!((rec.target(), rec.released), (Some(4), None));
        // A package's own --keep wins over the site's.
        set_properties(
            &lib,
            "FRY00001",
            &Properties {
                keep: Some(2),
                ..Properties::default()
            },
        )
        .unwrap();
        assert!(prune(&lib, "FRY00001", 1, |_| true).unwrap().is_empty());
        set_properties(
            &lib,
            "FRY00001",
            &Properties {
                keep: Some(0),
                ..Properties::default()
            },
        )
        .unwrap();
        let removed = prune(&lib, "FRY00001", 1, |_| true).unwrap();
        assert_eq!(removed, [2]);
        assert_eq!(revisions(&lib), [4]);
        assert!(lib.manifests("FRY00001", 1).unwrap().is_empty());
        assert_eq!(lib.manifests("FRY00001", 4).unwrap().len(), 1);
    }
}
