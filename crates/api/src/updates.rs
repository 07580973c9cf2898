//! The update catalog: software updates the site can apply to its images.
//!
//! An update is a folder (or a `.tar`/`.tar.gz` of one) holding
//! `update.toml` and `payload/`; the format is documented in
//! `docs/updates.md`. `ferry update import` checks it whole and copies it
//! into `DATA/updates/<ID>/`, so the operator's copy may go away afterwards.
//! Nothing here touches an image: [`applicability`] decides whether an
//! update is for an image, and `service` applies it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use ferry_wim::{ImageInfo, UpdateCmd};

use crate::{now, rfc3339};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// The manifest's file name inside an update.
pub const MANIFEST_FILE: &str = "update.toml";
/// The payload folder inside an update.
pub const PAYLOAD_DIR: &str = "payload";
/// Where the site keeps imported updates, inside its data folder.
pub const UPDATES_DIR: &str = "updates";
/// What the site records about an import, beside the manifest.
const IMPORTED_FILE: &str = "imported.json";

/// Why an update cannot be imported or used. The text is shown as is.
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    /// The update is malformed; `path` names the file or folder at fault.
    #[error("{path}: {reason}")]
    Bad {
        /// The file or folder.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// No update with that id in the catalog.
    #[error("no update {0} in the catalog; `ferry update list` shows the ids")]
    Unknown(String),
    /// The id is in the catalog already.
    #[error("update {id} is already in the catalog (imported {}); updates are immutable, give a changed one a new id", rfc3339(*imported))]
    Exists {
        /// The id.
        id: String,
        /// When it was imported.
        imported: time::OffsetDateTime,
    },
    /// The site's own files failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
}

impl UpdateError {
    /// Whether the operator's input is at fault (4xx) rather than the site.
    pub fn is_input(&self) -> bool {
        !matches!(self, UpdateError::Io { .. })
    }
}

fn bad(path: &Path, reason: impl Into<String>) -> UpdateError {
    UpdateError::Bad {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> UpdateError + '_ {
    move |source| UpdateError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// What kind of update it is (the classifications Windows Update uses).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Classification {
    /// Fixes a security vulnerability.
    SecurityUpdate,
    /// A critical, non-security fix.
    CriticalUpdate,
    /// A cumulative set of fixes.
    UpdateRollup,
    /// A non-critical fix.
    Update,
    /// New functionality.
    FeaturePack,
    /// A service pack.
    ServicePack,
    /// Definition files (antimalware and the like).
    DefinitionUpdate,
    /// A driver.
    Driver,
}

/// Which images an update is for. Every field given must match.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct AppliesTo {
    /// Matched, ignoring case, within the image's name or description
    /// (`Windows 11`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub product: Option<String>,
    /// Architectures (`x86`, `x64`, `arm64`); empty means any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub architectures: Vec<String>,
    /// Lowest build, inclusive (`10.0.22621.0`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_build: Option<String>,
    /// Highest build, inclusive (`10.0.22631.65535`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_build: Option<String>,
}

/// What the update does to an image.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Payload {
    /// Files to add or replace: `payload/<path>` goes to `/<path>`.
    #[serde(default)]
    pub add: Vec<String>,
    /// Paths to delete from the image (files, or folders with their contents).
    #[serde(default)]
    pub delete: Vec<String>,
}

/// `update.toml`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateManifest {
    /// `KB5031356`: letters, digits, `-`, `_`, `.`; at most 64.
    pub id: String,
    /// One line for operators.
    pub title: String,
    /// What kind of update.
    pub classification: Classification,
    /// Release date, `YYYY-MM-DD`.
    pub released: String,
    /// Ids of the updates this one replaces.
    #[serde(default)]
    pub supersedes: Vec<String>,
    /// Which images it is for.
    #[serde(rename = "applies-to")]
    pub applies_to: AppliesTo,
    /// What it changes.
    pub payload: Payload,
}

/// An update in the catalog.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateRecord {
    /// The manifest.
    #[serde(flatten)]
    pub manifest: UpdateManifest,
    /// When it was imported (RFC 3339).
    #[serde(with = "time::serde::rfc3339")]
    pub imported: OffsetDateTime,
    /// Where it was imported from.
    pub source: String,
    /// Bytes of the payload files.
    pub payload_bytes: u64,
}

/// Checks a path inside an image or the payload: relative, `/` or `\`
/// separated, no `..`, `.` or empty component, no drive. Returns it with
/// `/` separators.
pub fn clean_path(p: &str) -> Result<String, String> {
    if p.is_empty() {
        return Err("an empty path".into());
    }
    let unified = p.replace('\\', "/");
    if unified.starts_with('/') || unified.as_bytes().get(1) == Some(&b':') {
        return Err(format!(
            "{p:?} is absolute; paths are relative to the image's root"
        ));
    }
    let mut parts = Vec::new();
    for c in unified.split('/') {
        match c {
            "" => return Err(format!("{p:?} has an empty component")),
            "." | ".." => return Err(format!("{p:?} contains {c:?}; paths may not step out")),
            c if c.contains(['\0', ':']) => {
                return Err(format!("{p:?} contains a character not allowed in a path"))
            }
            c => parts.push(c),
        }
    }
    Ok(parts.join("/"))
}

fn check_id(id: &str) -> Result<(), String> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !id.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "id {id:?} must be 1–64 letters, digits, '-', '_' or '.' (like KB5031356)"
        ))
    }
}

/// A build number `10.0.22631.2861` (1 to 4 parts) as comparable numbers.
pub fn parse_build(b: &str) -> Option<[u64; 4]> {
    let mut out = [0u64; 4];
    let parts: Vec<&str> = b.trim().split('.').collect();
    if parts.is_empty() || parts.len() > 4 {
        return None;
    }
    for (i, p) in parts.iter().enumerate() {
        out[i] = p.parse().ok()?;
    }
    Some(out)
}

impl UpdateManifest {
    /// Parses and checks `update.toml`; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, UpdateError> {
        let mut m: UpdateManifest =
            toml::from_str(text).map_err(|e| bad(path, e.message().to_string()))?;
        check_id(&m.id).map_err(|r| bad(path, r))?;
        if m.title.trim().is_empty() {
            return Err(bad(path, "title is empty"));
        }
        let date = time::format_description::parse_borrowed::<2>("[year]-[month]-[day]")
            .map_err(|e| bad(path, e.to_string()))?;
        time::Date::parse(&m.released, &date).map_err(|_| {
            bad(
                path,
                format!("released = {:?} is not a date YYYY-MM-DD", m.released),
            )
        })?;
        for s in &m.supersedes {
            check_id(s).map_err(|r| bad(path, format!("supersedes: {r}")))?;
            if s == &m.id {
                return Err(bad(path, format!("{} supersedes itself", m.id)));
            }
        }
        let a = &m.applies_to;
        for (name, b) in [("min-build", &a.min_build), ("max-build", &a.max_build)] {
            if let Some(b) = b {
                if parse_build(b).is_none() {
                    return Err(bad(
                        path,
                        format!(
                            "applies-to.{name} = {b:?} is not a build number like 10.0.22631.0"
                        ),
                    ));
                }
            }
        }
        if let (Some(lo), Some(hi)) = (
            a.min_build.as_deref().and_then(parse_build),
            a.max_build.as_deref().and_then(parse_build),
        ) {
            if lo > hi {
                return Err(bad(path, "applies-to.min-build is above max-build"));
            }
        }
        let clean = |list: &[String], what: &str| -> Result<Vec<String>, UpdateError> {
            list.iter()
                .map(|p| clean_path(p).map_err(|r| bad(path, format!("payload.{what}: {r}"))))
                .collect()
        };
        m.payload.add = clean(&m.payload.add, "add")?;
        m.payload.delete = clean(&m.payload.delete, "delete")?;
        if m.payload.add.is_empty() && m.payload.delete.is_empty() {
            return Err(bad(path, "payload adds and deletes nothing"));
        }
        let mut seen = BTreeSet::new();
        for p in m.payload.add.iter().chain(&m.payload.delete) {
            if !seen.insert(p.to_ascii_lowercase()) {
                return Err(bad(
                    path,
                    format!("{p} is named twice in payload (paths in an image ignore case)"),
                ));
            }
        }
        Ok(m)
    }

    /// The wimlib commands for this update, payload files taken from
    /// `dir/payload`: deletes first, then adds.
    pub fn commands(&self, dir: &Path) -> Vec<UpdateCmd> {
        let payload = dir.join(PAYLOAD_DIR);
        let deletes = self
            .payload
            .delete
            .iter()
            .map(|p| UpdateCmd::Delete { path: p.clone() });
        let adds = self.payload.add.iter().map(|p| UpdateCmd::Add {
            source: payload.join(p),
            target: p.clone(),
        });
        deletes.chain(adds).collect()
    }
}

/// Whether `u` is for image `img`; the reason when it is not.
pub fn applicability(u: &UpdateManifest, img: &ImageInfo) -> Result<(), String> {
    let a = &u.applies_to;
    if !a.architectures.is_empty()
        && !a
            .architectures
            .iter()
            .any(|x| x.eq_ignore_ascii_case(&img.architecture))
    {
        return Err(format!(
            "for {}, image {} is {}",
            a.architectures.join("/"),
            img.index,
            if img.architecture.is_empty() {
                "of unknown architecture"
            } else {
                &img.architecture
            }
        ));
    }
    if let Some(p) = &a.product {
        let p = p.to_lowercase();
        if !img.name.to_lowercase().contains(&p) && !img.description.to_lowercase().contains(&p) {
            return Err(format!("for {p:?}, image {} is {:?}", img.index, img.name));
        }
    }
    if a.min_build.is_some() || a.max_build.is_some() {
        let Some(build) = parse_build(&img.build) else {
            return Err(format!(
                "for builds {}..{}, image {} has no build number",
                a.min_build.as_deref().unwrap_or(""),
                a.max_build.as_deref().unwrap_or(""),
                img.index
            ));
        };
        let lo = a.min_build.as_deref().and_then(parse_build);
        let hi = a.max_build.as_deref().and_then(parse_build);
        if lo.is_some_and(|lo| build < lo) || hi.is_some_and(|hi| build > hi) {
            return Err(format!(
                "for builds {}..{}, image {} is {}",
                a.min_build.as_deref().unwrap_or(""),
                a.max_build.as_deref().unwrap_or(""),
                img.index,
                img.build
            ));
        }
    }
    Ok(())
}

/// Checks an update folder whole: manifest, and a payload that holds
/// exactly the files `add` names, all regular files. Returns the manifest
/// and the payload's bytes.
pub fn check_folder(dir: &Path) -> Result<(UpdateManifest, u64), UpdateError> {
    let mpath = dir.join(MANIFEST_FILE);
    let text = match std::fs::read_to_string(&mpath) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(bad(
                dir,
                format!("no {MANIFEST_FILE}: an update is a folder with {MANIFEST_FILE} and {PAYLOAD_DIR}/ (see docs/updates.md)"),
            ))
        }
        Err(e) => return Err(bad(&mpath, e.to_string())),
    };
    let m = UpdateManifest::parse(&text, &mpath)?;
    let payload = dir.join(PAYLOAD_DIR);
    let mut found: BTreeMap<String, u64> = BTreeMap::new();
    if payload.exists() {
        for entry in walkdir::WalkDir::new(&payload).follow_links(false) {
            let entry = entry.map_err(|e| bad(&payload, e.to_string()))?;
            let ft = entry.file_type();
            if ft.is_dir() {
                continue;
            }
            let rel = entry
                .path()
                .strip_prefix(&payload)
                .map_err(|e| bad(entry.path(), e.to_string()))?;
            if !ft.is_file() {
                return Err(bad(
                    entry.path(),
                    "is not a regular file (symbolic links and special files are not allowed in a payload)",
                ));
            }
            let rel = rel
                .to_str()
                .ok_or_else(|| bad(entry.path(), "name is not UTF-8"))?;
            let len = entry
                .metadata()
                .map_err(|e| bad(entry.path(), e.to_string()))?
                .len();
            // Reading it proves it is readable now, not only at apply time.
            std::fs::File::open(entry.path()).map_err(|e| bad(entry.path(), e.to_string()))?;
            found.insert(rel.to_string(), len);
        }
    }
    let mut bytes = 0;
    for p in &m.payload.add {
        match found.remove(p) {
            Some(len) => bytes += len,
            None => {
                return Err(bad(
                    &payload.join(p),
                    format!("{MANIFEST_FILE} adds {p} but the payload lacks it"),
                ))
            }
        }
    }
    if let Some(extra) = found.keys().next() {
        return Err(bad(
            &payload.join(extra),
            format!("is in the payload but {MANIFEST_FILE} does not add it"),
        ));
    }
    Ok((m, bytes))
}

/// The catalog folder of a site.
pub fn catalog_dir(data: &Path) -> PathBuf {
    data.join(UPDATES_DIR)
}

/// Most bytes an update archive may unpack to, whatever its size.
pub const MAX_UNPACKED_BYTES: u64 = 32 << 30;
/// Most bytes an update archive may unpack to per byte of itself: update
/// payloads (`.msu`, `.cab`, WIM files) are compressed already, so a real
/// archive unpacks to about its own size; a gzip bomb to a thousand times.
pub const MAX_UNPACK_RATIO: u64 = 100;
/// Most entries an update archive may hold.
pub const MAX_ENTRIES: usize = 100_000;

/// Unpacks a `.tar`, `.tar.gz` or `.tgz` into `into`, refusing links,
/// special files and paths that step out, and stopping (with an error) at
/// [`MAX_ENTRIES`] entries or once the files written pass
/// [`MAX_UNPACK_RATIO`] × the archive's size or [`MAX_UNPACKED_BYTES`].
pub fn unpack(archive: &Path, into: &Path) -> Result<(), UpdateError> {
    use std::io::Read as _;
    let file = std::fs::File::open(archive).map_err(|e| bad(archive, e.to_string()))?;
    let packed = file.metadata().map_err(io(archive))?.len();
    let limit = packed
        .saturating_mul(MAX_UNPACK_RATIO)
        .clamp(1 << 20, MAX_UNPACKED_BYTES);
    let mut written = 0u64;
    let name = archive.to_string_lossy().to_ascii_lowercase();
    let reader: Box<dyn std::io::Read> = if name.ends_with(".tar.gz") || name.ends_with(".tgz") {
        Box::new(flate2::read::GzDecoder::new(file))
    } else {
        Box::new(file)
    };
    let mut ar = tar::Archive::new(reader);
    let entries = ar.entries().map_err(|e| bad(archive, e.to_string()))?;
    for (n, entry) in entries.enumerate() {
        if n >= MAX_ENTRIES {
            return Err(bad(
                archive,
                format!("holds more than {MAX_ENTRIES} entries; an update has a few files"),
            ));
        }
        let mut entry = entry.map_err(|e| bad(archive, format!("not a readable archive: {e}")))?;
        let path = entry
            .path()
            .map_err(|e| bad(archive, e.to_string()))?
            .to_string_lossy()
            .into_owned();
        let kind = entry.header().entry_type();
        if kind.is_dir() {
            continue;
        }
        if !kind.is_file() {
            return Err(bad(
                archive,
                format!("{path}: only files and folders may be in an update archive"),
            ));
        }
        let rel = clean_path(path.trim_start_matches("./"))
            .map_err(|r| bad(archive, format!("entry {r}")))?;
        let dest = into.join(&rel);
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent).map_err(io(parent))?;
        }
        let mut out = std::fs::File::create(&dest).map_err(io(&dest))?;
        // One byte past what is left tells an entry that goes over.
        let left = limit - written;
        let copied = std::io::copy(&mut (&mut entry).take(left + 1), &mut out)
            .map_err(|e| bad(archive, format!("{path}: {e}")))?;
        written += copied;
        if copied > left {
            let bytes = ferry_core::units::bytes;
            return Err(bad(
                archive,
                format!(
                    "unpacks to more than {} ({MAX_UNPACK_RATIO}× the archive's {}, and at most {} for any archive): \
                     stopped in {path}; is it a compression bomb?",
                    bytes(limit),
                    bytes(packed),
                    bytes(MAX_UNPACKED_BYTES),
                ),
            ));
        }
    }
    // An archive of the folder itself (`KB123/update.toml`) is accepted too.
    if !into.join(MANIFEST_FILE).exists() {
        let dirs: Vec<_> = std::fs::read_dir(into)
            .map_err(io(into))?
            .flatten()
            .collect();
        if let [only] = dirs.as_slice() {
            if only.path().join(MANIFEST_FILE).exists() {
                let inner = only.path();
                for e in std::fs::read_dir(&inner).map_err(io(&inner))?.flatten() {
                    let to = into.join(e.file_name());
                    std::fs::rename(e.path(), &to).map_err(io(&to))?;
                }
                std::fs::remove_dir(&inner).map_err(io(&inner))?;
            }
        }
    }
    Ok(())
}

fn copy_tree(from: &Path, to: &Path) -> Result<(), UpdateError> {
    for entry in walkdir::WalkDir::new(from).follow_links(false) {
        let entry = entry.map_err(|e| bad(from, e.to_string()))?;
        let rel = entry
            .path()
            .strip_prefix(from)
            .map_err(|e| bad(entry.path(), e.to_string()))?;
        let dest = to.join(rel);
        if entry.file_type().is_dir() {
            std::fs::create_dir_all(&dest).map_err(io(&dest))?;
        } else if entry.file_type().is_file() {
            std::fs::copy(entry.path(), &dest).map_err(io(&dest))?;
            std::fs::File::open(&dest)
                .and_then(|f| f.sync_all())
                .map_err(io(&dest))?;
        }
    }
    Ok(())
}

/// Imports the update at `source` (a folder or an archive) into the
/// catalog of the site in `data`. Nothing is added unless it is whole.
pub fn import(data: &Path, source: &Path) -> Result<UpdateRecord, UpdateError> {
    let meta = std::fs::metadata(source).map_err(|e| {
        bad(
            source,
            if e.kind() == std::io::ErrorKind::NotFound {
                "no such file or folder".to_string()
            } else {
                e.to_string()
            },
        )
    })?;
    let catalog = catalog_dir(data);
    std::fs::create_dir_all(&catalog).map_err(io(&catalog))?;
    let work = tempfile::Builder::new()
        .prefix(".import-")
        .tempdir_in(&catalog)
        .map_err(io(&catalog))?;
    let folder = if meta.is_dir() {
        source.to_path_buf()
    } else {
        let unpacked = work.path().join("unpacked");
        std::fs::create_dir(&unpacked).map_err(io(&unpacked))?;
        unpack(source, &unpacked)?;
        unpacked
    };
    let (manifest, payload_bytes) = check_folder(&folder)?;
    let dest = catalog.join(&manifest.id);
    if let Ok(existing) = read(data, &manifest.id) {
        return Err(UpdateError::Exists {
            id: manifest.id,
            imported: existing.imported,
        });
    }
    let staged = work.path().join("update");
    copy_tree(&folder, &staged)?;
    // Checked again: the copy is what will be applied.
    let (copied, _) = check_folder(&staged)?;
    if copied != manifest {
        return Err(bad(
            source,
            "changed while it was being imported; import it again",
        ));
    }
    let record = UpdateRecord {
        manifest,
        imported: now(),
        source: source.display().to_string(),
        payload_bytes,
    };
    let json = serde_json::to_vec_pretty(&record).map_err(|e| bad(source, e.to_string()))?;
    // The record marks a whole import: it and every folder of the copy
    // are on disk before the rename makes it visible.
    let rec_path = staged.join(IMPORTED_FILE);
    std::fs::write(&rec_path, json)
        .and_then(|()| std::fs::File::open(&rec_path)?.sync_all())
        .map_err(io(&rec_path))?;
    for d in walkdir::WalkDir::new(&staged)
        .contents_first(true)
        .into_iter()
        .flatten()
        .filter(|e| e.file_type().is_dir())
    {
        std::fs::File::open(d.path())
            .and_then(|f| f.sync_all())
            .map_err(io(d.path()))?;
    }
    std::fs::rename(&staged, &dest).map_err(io(&dest))?;
    std::fs::File::open(&catalog)
        .and_then(|f| f.sync_all())
        .map_err(io(&catalog))?;
    Ok(record)
}

/// The folder of update `id` in the catalog.
pub fn folder(data: &Path, id: &str) -> Result<PathBuf, UpdateError> {
    check_id(id).map_err(|_| UpdateError::Unknown(id.to_string()))?;
    let dir = catalog_dir(data).join(id);
    if dir.join(IMPORTED_FILE).is_file() {
        Ok(dir)
    } else {
        Err(UpdateError::Unknown(id.to_string()))
    }
}

/// One update from the catalog.
pub fn read(data: &Path, id: &str) -> Result<UpdateRecord, UpdateError> {
    let dir = folder(data, id)?;
    let p = dir.join(IMPORTED_FILE);
    let bytes = std::fs::read(&p).map_err(io(&p))?;
    serde_json::from_slice(&bytes).map_err(|e| UpdateError::Io {
        path: p.display().to_string(),
        source: std::io::Error::other(e),
    })
}

/// Removes update `id` from the catalog and returns its record. The folder
/// is first renamed out of sight (one synced rename: it is in the catalog
/// or not), then deleted.
pub fn remove(data: &Path, id: &str) -> Result<UpdateRecord, UpdateError> {
    let record = read(data, id)?;
    let dir = folder(data, id)?;
    let catalog = catalog_dir(data);
    let gone = tempfile::Builder::new()
        .prefix(".removing-")
        .tempdir_in(&catalog)
        .map_err(io(&catalog))?;
    let to = gone.path().join(id);
    std::fs::rename(&dir, &to).map_err(io(&dir))?;
    std::fs::File::open(&catalog)
        .and_then(|f| f.sync_all())
        .map_err(io(&catalog))?;
    gone.close().map_err(io(&to))?;
    Ok(record)
}

/// Every update in the catalog, by release date then id.
pub fn list(data: &Path) -> Result<Vec<UpdateRecord>, UpdateError> {
    let dir = catalog_dir(data);
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(&dir)(e)),
    };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        // One unreadable entry is reported, not a reason to hide the rest.
        match read(data, &name) {
            Ok(u) => out.push(u),
            Err(err) => tracing::error!(
                folder = %e.path().display(),
                error = %err,
                "an entry of the update catalog cannot be read; skipped"
            ),
        }
    }
    out.sort_by(|a, b| {
        (&a.manifest.released, &a.manifest.id).cmp(&(&b.manifest.released, &b.manifest.id))
    });
    Ok(out)
}

/// Every update that `ids` supersede, directly or through others in
/// `catalog`, each with the update that supersedes it.
pub fn superseded_by(ids: &[String], catalog: &[UpdateRecord]) -> BTreeMap<String, String> {
    let by_id: BTreeMap<&str, &UpdateManifest> = catalog
        .iter()
        .map(|u| (u.manifest.id.as_str(), &u.manifest))
        .collect();
    let mut out = BTreeMap::new();
    for root in ids {
        let mut stack = vec![root.as_str()];
        while let Some(id) = stack.pop() {
            let Some(m) = by_id.get(id) else { continue };
            for s in &m.supersedes {
                if s != root && !out.contains_key(s) {
                    out.insert(s.clone(), root.clone());
                    stack.push(s);
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
id = "KB5031356"
title = "2023-10 Cumulative Update"
classification = "security-update"
released = "2023-10-10"
supersedes = ["KB5030310"]

[applies-to]
product = "Windows 11"
architectures = ["x64"]
min-build = "10.0.22621.0"
max-build = "10.0.22631.65535"

[payload]
add = ['Windows\System32\ntoskrnl.exe']
delete = ["Windows/System32/old.dll"]
"#;

    fn parse(text: &str) -> Result<UpdateManifest, String> {
        UpdateManifest::parse(text, Path::new("u/update.toml")).map_err(|e| e.to_string())
    }

    fn image(arch: &str, build: &str, name: &str) -> ImageInfo {
        ImageInfo {
            index: 1,
            name: name.into(),
            architecture: arch.into(),
            build: build.into(),
            ..ImageInfo::default()
        }
    }

    #[test]
    fn a_good_manifest_parses_with_paths_normalised() {
        let m = parse(GOOD).unwrap();
        assert_eq!(m.id, "KB5031356");
        assert_eq!(m.classification, Classification::SecurityUpdate);
        assert_eq!(m.payload.add, vec!["Windows/System32/ntoskrnl.exe"]);
    }

    #[test]
    fn bad_manifests_are_refused_with_the_reason() {
        let cases = [
            (
                GOOD.replace("title =", "colour = \"red\"\ntitle ="),
                "unknown field `colour`",
            ),
            (
                GOOD.replace("[applies-to]", "[applies-to]\nedition = \"Pro\""),
                "unknown field `edition`",
            ),
            (
                GOOD.replace("Windows/System32/old.dll", "../../etc/passwd"),
                "may not step out",
            ),
            (
                GOOD.replace("Windows/System32/old.dll", "/Windows/x.dll"),
                "is absolute",
            ),
            (
                GOOD.replace("Windows/System32/old.dll", "C:/Windows/x.dll"),
                "is absolute",
            ),
            (GOOD.replace("2023-10-10", "October"), "not a date"),
            (GOOD.replace("KB5031356", "KB 5031356"), "must be 1–64"),
            (GOOD.replace("KB5030310", "KB5031356"), "supersedes itself"),
            (GOOD.replace("10.0.22621.0", "ten"), "not a build number"),
            (
                GOOD.replace("10.0.22621.0", "10.0.30000.0"),
                "above max-build",
            ),
            (
                GOOD.replace("security-update", "hotfix"),
                "unknown variant `hotfix`",
            ),
            (
                GOOD.replace("Windows/System32/old.dll", "windows/system32/NTOSKRNL.EXE"),
                "named twice",
            ),
            (
                GOOD.replace("title = \"2023-10 Cumulative Update\"\n", ""),
                "missing field `title`",
            ),
        ];
        for (text, want) in cases {
            let e = parse(&text).unwrap_err();
            assert!(e.contains(want), "{want:?} not in {e:?}");
            assert!(e.starts_with("u/update.toml: "), "{e}");
        }
        let empty = GOOD
            .replace("add = ['Windows\\System32\\ntoskrnl.exe']\n", "")
            .replace("delete = [\"Windows/System32/old.dll\"]\n", "");
        assert!(parse(&empty)
            .unwrap_err()
            .contains("adds and deletes nothing"));
    }

    #[test]
    fn applicability_checks_architecture_product_and_build() {
        let m = parse(GOOD).unwrap();
        assert!(applicability(
            &m,
            &image("x64", "10.0.22631.2861", "Windows 11 Enterprise")
        )
        .is_ok());
        let e =
            applicability(&m, &image("arm64", "10.0.22631.2861", "Windows 11 Pro")).unwrap_err();
        assert!(e.contains("arm64"), "{e}");
        let e = applicability(&m, &image("x64", "10.0.19045.1", "Windows 11 Pro")).unwrap_err();
        assert!(e.contains("10.0.19045.1"), "{e}");
        assert!(applicability(&m, &image("x64", "10.0.22631.2861", "Windows 10 Pro")).is_err());
        assert!(applicability(&m, &image("x64", "", "Windows 11 Pro"))
            .unwrap_err()
            .contains("no build number"));
    }

    #[test]
    fn builds_compare_numerically() {
        assert!(parse_build("10.0.9999.0") < parse_build("10.0.22631.0"));
        assert_eq!(parse_build("10"), Some([10, 0, 0, 0]));
        assert_eq!(parse_build("1.2.3.4.5"), None);
        assert_eq!(parse_build("1.x"), None);
    }

    #[test]
    fn supersedence_is_followed_through_the_catalog() {
        let rec = |id: &str, sup: &[&str]| UpdateRecord {
            manifest: UpdateManifest {
                supersedes: sup.iter().map(|s| s.to_string()).collect(),
                id: id.into(),
                ..parse(GOOD).unwrap()
            },
            imported: time::OffsetDateTime::UNIX_EPOCH,
            source: String::new(),
            payload_bytes: 0,
        };
        let cat = vec![rec("KB3", &["KB2"]), rec("KB2", &["KB1"]), rec("KB1", &[])];
        let s = superseded_by(&["KB3".into()], &cat);
        assert_eq!(s.get("KB2").map(String::as_str), Some("KB3"));
        assert_eq!(s.get("KB1").map(String::as_str), Some("KB3"));
        assert!(!s.contains_key("KB3"));
    }

    /// A tar archive with one entry of `kind` named by the raw bytes `name`
    /// (written into the header as is, so `..` gets through the builder).
    fn archive_with(dir: &Path, name: &[u8], kind: tar::EntryType) -> PathBuf {
        let p = dir.join("u.tar");
        let mut b = tar::Builder::new(std::fs::File::create(&p).unwrap());
        let mut h = tar::Header::new_old();
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.set_entry_type(kind);
        h.set_size(0);
        if kind == tar::EntryType::Symlink {
            h.set_link_name("/etc/passwd").unwrap();
        }
        h.set_cksum();
        b.append(&h, std::io::empty()).unwrap();
        b.finish().unwrap();
        p
    }

    #[test]
    fn hostile_archives_are_refused_and_write_nothing_outside() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("site");
        let out = dir.path().join("escaped");
        let a = archive_with(dir.path(), b"../escaped", tar::EntryType::Regular);
        let e = import(&data, &a).unwrap_err().to_string();
        assert!(e.contains("u.tar") && e.contains("step out"), "{e}");
        assert!(!out.exists());
        let a = archive_with(dir.path(), b"payload/link", tar::EntryType::Symlink);
        let e = import(&data, &a).unwrap_err().to_string();
        assert!(
            e.contains("payload/link") && e.contains("only files and folders"),
            "{e}"
        );
        let junk = dir.path().join("junk.tar");
        std::fs::write(&junk, vec![0x55u8; 2048]).unwrap();
        assert!(import(&data, &junk).is_err());
        assert!(
            list(&data).unwrap().is_empty(),
            "nothing reached the catalog"
        );
    }

    #[test]
    fn a_compression_bomb_is_stopped_at_the_stated_size() {
        use std::io::{Read as _, Write as _};
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("site");
        // 256 MiB of zeros: a .tar.gz of about 250 KiB, 1000 × its size.
        let p = dir.path().join("bomb.tar.gz");
        let gz = flate2::write::GzEncoder::new(
            std::fs::File::create(&p).unwrap(),
            flate2::Compression::best(),
        );
        let mut b = tar::Builder::new(gz);
        let mut h = tar::Header::new_gnu();
        let size = 256u64 << 20;
        h.set_size(size);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, "payload/zeros.bin", std::io::repeat(0).take(size))
            .unwrap();
        b.into_inner().unwrap().finish().unwrap().flush().unwrap();
        let packed = std::fs::metadata(&p).unwrap().len();
        assert!(packed * MAX_UNPACK_RATIO < size, "{packed}");
        let e = import(&data, &p).unwrap_err().to_string();
        assert!(
            e.contains("bomb.tar.gz")
                && e.contains("unpacks to more than")
                && e.contains("zeros.bin"),
            "{e}"
        );
        assert!(
            list(&data).unwrap().is_empty(),
            "nothing reached the catalog"
        );
        // Nothing of it is left in the site's work folders either.
        let left: u64 = walkdir::WalkDir::new(&data)
            .into_iter()
            .flatten()
            .filter(|e| e.file_type().is_file())
            .map(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
            .sum();
        assert!(left < packed * MAX_UNPACK_RATIO, "{left} bytes left behind");
    }

    #[test]
    fn folders_must_hold_exactly_the_named_payload() {
        let dir = tempfile::tempdir().unwrap();
        let u = dir.path();
        std::fs::write(u.join(MANIFEST_FILE), GOOD).unwrap();
        let e = check_folder(u).unwrap_err().to_string();
        assert!(
            e.contains("payload lacks it") && e.contains("ntoskrnl.exe"),
            "{e}"
        );
        let f = u.join("payload/Windows/System32");
        std::fs::create_dir_all(&f).unwrap();
        std::fs::write(f.join("ntoskrnl.exe"), b"kernel").unwrap();
        let (m, bytes) = check_folder(u).unwrap();
        assert_eq!((m.id.as_str(), bytes), ("KB5031356", 6));
        std::fs::write(f.join("extra.dll"), b"x").unwrap();
        let e = check_folder(u).unwrap_err().to_string();
        assert!(
            e.contains("extra.dll") && e.contains("does not add it"),
            "{e}"
        );
        std::fs::remove_file(f.join("extra.dll")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", f.join("link.dll")).unwrap();
        let e = check_folder(u).unwrap_err().to_string();
        assert!(
            e.contains("link.dll") && e.contains("not a regular file"),
            "{e}"
        );
        let empty = tempfile::tempdir().unwrap();
        let e = check_folder(empty.path()).unwrap_err().to_string();
        assert!(e.contains("no update.toml"), "{e}");
    }
    #[test]
    fn an_unreadable_catalog_entry_hides_none_of_the_others() {
        let data = tempfile::tempdir().unwrap();
        let src = tempfile::tempdir().unwrap();
        for id in ["KB1000001", "KB1000002"] {
            let u = src.path().join(id);
            let f = u.join("payload/Windows/System32");
            std::fs::create_dir_all(&f).unwrap();
            std::fs::write(f.join("ntoskrnl.exe"), b"kernel").unwrap();
            std::fs::write(u.join(MANIFEST_FILE), GOOD.replace("KB5031356", id)).unwrap();
            let rec = import(data.path(), &u).unwrap();
            assert_eq!(rec.manifest.id, id);
        }
        assert_eq!(list(data.path()).unwrap().len(), 2);
        let damaged = folder(data.path(), "KB1000001")
            .unwrap()
            .join(IMPORTED_FILE);
        std::fs::write(&damaged, b"{ not json").unwrap();
        let left = list(data.path()).unwrap();
        assert_eq!(left.len(), 1, "the readable one is listed");
        assert_eq!(left[0].manifest.id, "KB1000002");
        let e = read(data.path(), "KB1000001").unwrap_err().to_string();
        assert!(e.contains("imported.json"), "{e}");
    }
}

#[cfg(test)]
mod deploy_example {
    #[test]
    fn the_example_update_in_deploy_is_valid() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/updates/KB5031356");
        let (m, bytes) = super::check_folder(&dir).unwrap();
        assert_eq!(m.id, "KB5031356");
        assert!(bytes > 0);
    }
}
