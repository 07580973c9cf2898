//! OS upgrade packages: a Windows setup folder (`setup.exe`, `sources/`
//! with `install.wim` and many other files) imported as one package.
//!
//! Every file is chunked; `.wim` files get the resource-aware split. With
//! `--extract-index`, the package's `install.wim` is a one-image export made
//! in Ferry's work folder: the operator's folder is only ever read. Names
//! that Windows cannot hold, links that leave the folder, special and
//! unreadable files are refused with their path, before anything is stored.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ferry_core::{FileHash, Manifest};
use ferry_wim::Layout;

use crate::library::catalog::{
    FileRecord, ImportStats, PackageKind, PackageRecord, PackageView, RevisionRecord, SourceRecord,
    INSTALL_WIM,
};
use crate::library::packages::{self, ImageError, Progress};

pub use ferry_api::requests::UpgradeRequest;

/// Characters Windows does not allow in a file name.
const WINDOWS_FORBIDDEN: &[char] = &['<', '>', ':', '"', '\\', '|', '?', '*'];

/// Why `name` cannot be a file or folder name on Windows, if it cannot.
pub fn windows_name_problem(name: &str) -> Option<String> {
    if let Some(c) = name
        .chars()
        .find(|c| WINDOWS_FORBIDDEN.contains(c) || (*c as u32) < 0x20)
    {
        return Some(format!(
            "contains {c:?}, which Windows does not allow in a name"
        ));
    }
    if name.ends_with('.') || name.ends_with(' ') {
        return Some("ends with a dot or a space, which Windows strips".into());
    }
    let stem = name
        .split('.')
        .next()
        .unwrap_or("")
        .trim_end()
        .to_ascii_uppercase();
    let reserved = matches!(stem.as_str(), "CON" | "PRN" | "AUX" | "NUL")
        || ((stem.starts_with("COM") || stem.starts_with("LPT"))
            && stem.len() == 4
            && stem.as_bytes()[3].is_ascii_digit()
            && stem.as_bytes()[3] != b'0');
    if reserved {
        return Some(format!("{stem} is a device name reserved by Windows"));
    }
    None
}

/// One file found in a setup folder.
#[derive(Debug)]
struct Found {
    /// `/`-separated path inside the package.
    rel: String,
    /// Where to read it (the link's target for a link inside the folder).
    read_from: PathBuf,
    size: u64,
}

fn bad(path: &Path, reason: impl Into<String>) -> ImageError {
    ImageError::Source {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

/// Walks the folder and checks every entry; returns its files sorted by
/// path and the warnings.
fn scan(root: &Path) -> Result<Vec<Found>, ImageError> {
    let canon_root = root.canonicalize().map_err(|e| bad(root, e.to_string()))?;
    let mut out = Vec::new();
    let mut seen: BTreeMap<String, String> = BTreeMap::new();
    let walker = walkdir::WalkDir::new(root)
        .follow_links(false)
        .sort_by_file_name();
    for entry in walker {
        let entry = entry.map_err(|e| {
            let p = e
                .path()
                .map(Path::to_path_buf)
                .unwrap_or_else(|| root.to_path_buf());
            bad(
                &p,
                e.io_error()
                    .map_or_else(|| e.to_string(), |io| io.to_string()),
            )
        })?;
        let path = entry.path();
        if entry.depth() == 0 {
            continue;
        }
        let rel = path
            .strip_prefix(root)
            .map_err(|e| bad(path, e.to_string()))?;
        let rel = rel
            .to_str()
            .ok_or_else(|| bad(path, "the name is not valid UTF-8"))?
            .to_string();
        let name = entry.file_name().to_string_lossy();
        if let Some(problem) = windows_name_problem(&name) {
            return Err(bad(path, format!("{name:?} {problem}")));
        }
        if let Some(other) = seen.insert(rel.to_lowercase(), rel.clone()) {
            return Err(bad(
                path,
                format!("differs from {other} only in case; Windows cannot hold both"),
            ));
        }
        let ft = entry.file_type();
        if ft.is_dir() {
            continue;
        }
        let read_from = if ft.is_symlink() {
            let target = path
                .canonicalize()
                .map_err(|e| bad(path, format!("symbolic link that cannot be followed: {e}")))?;
            if !target.starts_with(&canon_root) {
                return Err(bad(
                    path,
                    format!(
                        "symbolic link to {} points outside the folder",
                        target.display()
                    ),
                ));
            }
            if !target.is_file() {
                return Err(bad(
                    path,
                    "symbolic link to a folder; only links to files inside the folder are followed",
                ));
            }
            target
        } else if ft.is_file() {
            path.to_path_buf()
        } else {
            return Err(bad(
                path,
                "is not a regular file (a device, socket or pipe cannot be in a setup folder)",
            ));
        };
        let file = std::fs::File::open(&read_from)
            .map_err(|e| bad(path, format!("cannot be read: {e}")))?;
        let size = file.metadata().map_err(|e| bad(path, e.to_string()))?.len();
        out.push(Found {
            rel,
            read_from,
            size,
        });
    }
    Ok(out)
}

fn find<'a>(files: &'a [Found], rel: &str) -> Option<&'a Found> {
    files.iter().find(|f| f.rel.eq_ignore_ascii_case(rel))
}

/// Checks that `req.path` is a folder and settles the package's name: the
/// existing package's, or `--name`, unique among upgrade packages.
/// A new upgrade package's record: architecture and language as given, or
/// as `install.wim`'s first image says.
fn new_upgrade(
    lib: &ferry_store::Library,
    site_code: &str,
    req: &UpgradeRequest,
    name: String,
    revision: RevisionRecord,
    first_image: &ferry_wim::ImageInfo,
) -> Result<PackageRecord, ImageError> {
    Ok(PackageRecord {
        architecture: req
            .arch
            .clone()
            .unwrap_or_else(|| first_image.architecture.clone()),
        language: req
            .lang
            .clone()
            .or_else(|| first_image.languages.first().cloned())
            .unwrap_or_default(),
        ..packages::new_record(
            lib,
            site_code,
            PackageKind::Upgrade,
            name,
            req.version.as_ref(),
            req.comment.as_ref(),
            revision,
        )?
    })
}

/// The upgrade package `req` refreshes, if it names one (an image is
/// refused).
fn existing_upgrade(
    lib: &ferry_store::Library,
    req: &UpgradeRequest,
) -> Result<Option<PackageRecord>, ImageError> {
    let Some(id) = &req.package else {
        return Ok(None);
    };
    let rec = packages::record(lib, id)?;
    if rec.kind != PackageKind::Upgrade {
        return Err(bad(
            &req.path,
            format!("{} is an image, not an upgrade package", rec.id),
        ));
    }
    Ok(Some(rec))
}

/// The folder's `install.wim`, and warnings for what a setup folder lacks
/// (no `setup.exe`, no `install.wim`); no `install.wim` to `extract` from
/// is an error.
fn look_for_setup<'a>(
    root: &Path,
    files: &'a [Found],
    extract: Option<u32>,
) -> Result<(Option<&'a Found>, Vec<String>), ImageError> {
    let mut warnings = Vec::new();
    if find(files, "setup.exe").is_none() {
        warnings.push(format!(
            "{}: no setup.exe at the top of the folder",
            root.display()
        ));
    }
    let install = find(files, INSTALL_WIM);
    if install.is_none() {
        if extract.is_some() {
            return Err(bad(
                root,
                format!("no {INSTALL_WIM}, so there is no image to extract with --extract-index"),
            ));
        }
        warnings.push(format!("{}: no {INSTALL_WIM}", root.display()));
    }
    Ok((install, warnings))
}

/// Bytes the import reads: every file, `install.wim` as its export when
/// one index is extracted.
fn bytes_to_ingest(files: &[Found], install: Option<&Found>, export: Option<&Path>) -> u64 {
    files
        .iter()
        .map(|f| {
            if Some(f.rel.as_str()) == install.map(|i| i.rel.as_str()) {
                export
                    .and_then(|p| std::fs::metadata(p).ok())
                    .map_or(f.size, |m| m.len())
            } else {
                f.size
            }
        })
        .sum()
}

/// The folder's identity: its files' paths and hashes in one BLAKE3.
fn folder_hash(manifests: &[ferry_core::Manifest]) -> FileHash {
    let mut h = blake3::Hasher::new();
    for m in manifests {
        h.update(m.path.as_bytes());
        h.update(&[0]);
        h.update(m.hash.as_bytes());
    }
    FileHash::from(h.finalize())
}

fn check_folder_and_name(
    lib: &ferry_store::Library,
    req: &UpgradeRequest,
    existing: Option<&PackageRecord>,
) -> Result<String, ImageError> {
    let root = &req.path;
    let meta = std::fs::metadata(root).map_err(|e| {
        bad(
            root,
            if e.kind() == std::io::ErrorKind::NotFound {
                "no such folder".to_string()
            } else {
                e.to_string()
            },
        )
    })?;
    if !meta.is_dir() {
        return Err(bad(
            root,
            "is not a folder; an upgrade package is a Windows setup folder (a single WIM is added with `ferry image add`)",
        ));
    }
    let name = match (existing, &req.name) {
        (Some(rec), _) => rec.name.clone(),
        (None, Some(n)) if !n.trim().is_empty() => n.trim().to_string(),
        (None, _) => return Err(bad(root, "an upgrade package needs --name")),
    };
    if existing.is_none() {
        for (id, bytes) in lib.packages()? {
            let other: PackageRecord = match serde_json::from_slice(&bytes) {
                Ok(r) => r,
                Err(_) => continue,
            };
            if other.kind == PackageKind::Upgrade && other.name.eq_ignore_ascii_case(&name) {
                return Err(bad(
                    root,
                    format!(
                        "an upgrade package named {name:?} exists already ({id}); names are unique"
                    ),
                ));
            }
        }
    }
    Ok(name)
}

/// Opens install.wim, if there is one, for its properties; with an index
/// to extract, Ferry's own one-image export of it (a temporary file) is
/// what the package stores instead.
fn open_install(
    install: Option<&Found>,
    extract: Option<u32>,
    data: &Path,
) -> Result<packages::OpenedWim, ImageError> {
    match install {
        Some(f) => packages::open_wim(
            &f.read_from,
            extract,
            data,
            &f.read_from.display().to_string(),
        ),
        None => Ok((None, Default::default(), Vec::new())),
    }
}

/// The files of a setup folder as they are read in.
#[derive(Clone, Copy)]
struct Files<'a> {
    root: &'a Path,
    files: &'a [Found],
    install: Option<&'a Found>,
    /// Read in place of install.wim (an extracted image).
    export: Option<&'a Path>,
    /// Bytes in all, for progress.
    total: u64,
}

/// Reads every file into `import` (WIMs by resource, checked unless
/// `no_verify`; a `.wim` that is not one is stored as data with a
/// warning, except install.wim, which must be one). On an error the import
/// is dropped and what it wrote collected.
fn ingest_files<'l>(
    lib: &'l ferry_store::Library,
    mut import: ferry_store::Import<'l>,
    f_in: &Files<'_>,
    no_verify: bool,
    warnings: &mut Vec<String>,
    progress: &mut impl FnMut(Progress),
) -> Result<(ferry_store::Import<'l>, Vec<Manifest>), ImageError> {
    let Files {
        root,
        files,
        install,
        export,
        total,
    } = *f_in;
    let mut done_before = 0u64;
    let mut manifests: Vec<Manifest> = Vec::with_capacity(files.len());
    for f in files {
        let is_install = Some(f.rel.as_str()) == install.map(|i| i.rel.as_str());
        let read_from: &Path = match (export, is_install) {
            (Some(tmp), true) => tmp,
            _ => &f.read_from,
        };
        let looks_wim = f.rel.to_ascii_lowercase().ends_with(".wim");
        let as_wim = looks_wim && {
            let ok = std::fs::File::open(read_from)
                .map(std::io::BufReader::new)
                .map_err(|e| e.to_string())
                .and_then(|mut r| Layout::read(&mut r, f.size).map_err(|e| e.to_string()));
            match ok {
                Ok(_) => true,
                Err(e) if is_install => {
                    drop(import);
                    lib.try_collect()?;
                    return Err(ImageError::NotWim {
                        path: f.read_from.display().to_string(),
                        reason: e,
                    });
                }
                Err(e) => {
                    warnings.push(format!(
                        "{}: not a usable WIM ({e}); stored as plain data",
                        f.read_from.display()
                    ));
                    false
                }
            }
        };
        let shown = root.join(&f.rel).display().to_string();
        let read = match (as_wim, no_verify) {
            (false, _) => packages::Read::Data,
            (true, true) => packages::Read::Wim,
            (true, false) => packages::Read::VerifiedWim,
        };
        let m = packages::ingest_path(&mut import, read_from, &f.rel, read, &shown, None, |p| {
            progress(Progress {
                done: done_before + p.done,
                total,
            })
        });
        match m {
            Ok(m) => {
                done_before += m.size;
                manifests.push(m);
            }
            Err(e) => {
                drop(import);
                lib.try_collect()?;
                return Err(e);
            }
        }
    }
    Ok((import, manifests))
}

/// Imports a setup folder as a new upgrade package (or, with
/// `req.package`, as its next revision). Nothing is stored unless all of it
/// is.
pub fn import(
    lib: &ferry_store::Library,
    data: &Path,
    site_code: &str,
    req: &UpgradeRequest,
    mut progress: impl FnMut(Progress),
) -> Result<PackageView, ImageError> {
    let root = &req.path;
    let existing = existing_upgrade(lib, req)?;
    let name = check_folder_and_name(lib, req, existing.as_ref())?;
    let stamp_before = packages::folder_stamp(root).map_err(|e| bad(root, e.to_string()))?;
    let files = scan(root)?;
    if files.is_empty() {
        return Err(bad(root, "the folder holds no files"));
    }
    let extract = req.extract_index.or_else(|| {
        existing
            .as_ref()
            .and_then(|r| r.latest())
            .and_then(|r| r.exported_index)
    });
    let (install, mut warnings) = look_for_setup(root, &files, extract)?;

    // With --extract-index, Ferry's own one-image export replaces install.wim.
    let (export, wim_info, image_infos) = open_install(install, extract, data)?;
    let import = lib.begin_import();
    let files_in = Files {
        root,
        files: &files,
        install,
        export: export.as_deref(),
        total: bytes_to_ingest(&files, install, export.as_deref()),
    };
    let (import, manifests) = ingest_files(
        lib,
        import,
        &files_in,
        req.no_verify,
        &mut warnings,
        &mut progress,
    )?;
    let stamp_after = packages::folder_stamp(root).map_err(|e| bad(root, e.to_string()))?;
    if stamp_after != stamp_before {
        drop(import);
        lib.try_collect()?;
        return Err(ImageError::Changed {
            path: root.display().to_string(),
        });
    }

    let first_image = image_infos.first().cloned().unwrap_or_default();
    let revision = RevisionRecord {
        revision: 1,
        created: crate::now(),
        source: SourceRecord {
            path: root.display().to_string(),
            size: stamp_before.0,
            modified_ns: stamp_before.1,
            hash: folder_hash(&manifests),
        },
        exported_index: extract,
        wim: wim_info,
        images: image_infos,
        files: manifests.iter().map(FileRecord::of).collect(),
        stats: ImportStats::default(),
        service: None,
        warnings: warnings.clone(),
        verified: !req.no_verify,
    };
    if let Some(rec) = existing
        .as_ref()
        .filter(|r| packages::same_as_latest(r, &revision))
    {
        return packages::unchanged(lib, import, rec, &revision);
    }
    let mut record = match existing {
        Some(mut rec) => {
            // A refresh is an update of the DPs: they get the new revision.
            rec.push_refreshed(revision, req.version.as_ref());
            rec
        }
        None => new_upgrade(lib, site_code, req, name, revision, &first_image)?,
    };
    let id = record.id.clone();
    packages::commit(import, &mut record, &manifests, packages::Release::Newest)?;
    lib.try_collect()?;
    for w in &warnings {
        tracing::warn!(package = %id, "{w}");
    }
    Ok(PackageView {
        source_state: packages::source_state(&record),
        record,
        unchanged: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_names() {
        for ok in [
            "setup.exe",
            "install.wim",
            "Boot",
            "COM0.txt",
            "console.log",
            "LPT",
        ] {
            assert_eq!(windows_name_problem(ok), None, "{ok}");
        }
        for bad in [
            "a:b", "what?", "x*", "pipe|", "CON", "con.txt", "Aux.dll", "COM1", "lpt9.log", "dot.",
            "space ", "tab\t",
        ] {
            assert!(windows_name_problem(bad).is_some(), "{bad}");
        }
    }

    #[test]
    fn scan_refuses_links_out_case_clashes_and_specials() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("media");
        std::fs::create_dir_all(root.join("sources")).unwrap();
        std::fs::write(root.join("setup.exe"), b"MZ").unwrap();
        std::fs::write(root.join("sources/a.txt"), b"a").unwrap();
        std::os::unix::fs::symlink("a.txt", root.join("sources/b.txt")).unwrap();
        let files = scan(&root).unwrap();
        let rels: Vec<&str> = files.iter().map(|f| f.rel.as_str()).collect();
        assert_eq!(rels, ["setup.exe", "sources/a.txt", "sources/b.txt"]);

        std::fs::write(dir.path().join("secret"), b"s").unwrap();
        std::os::unix::fs::symlink("../../secret", root.join("sources/out")).unwrap();
        let e = scan(&root).unwrap_err().to_string();
        assert!(
            e.contains("sources/out") && e.contains("outside the folder"),
            "{e}"
        );
        std::fs::remove_file(root.join("sources/out")).unwrap();

        std::fs::write(root.join("sources/A.TXT"), b"A").unwrap();
        let e = scan(&root).unwrap_err().to_string();
        assert!(e.contains("only in case"), "{e}");
        std::fs::remove_file(root.join("sources/A.TXT")).unwrap();

        std::fs::write(root.join("sources/nul.txt"), b"").unwrap();
        let e = scan(&root).unwrap_err().to_string();
        assert!(e.contains("nul.txt") && e.contains("reserved"), "{e}");
        std::fs::remove_file(root.join("sources/nul.txt")).unwrap();

        let fifo = root.join("sources/pipe");
        assert!(std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success());
        let e = scan(&root).unwrap_err().to_string();
        assert!(
            e.contains("sources/pipe") && e.contains("not a regular file"),
            "{e}"
        );
    }
}
