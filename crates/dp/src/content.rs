//! The content folder: each installed package stands rebuilt as
//! `CONTENT/<ID>/…`, byte-identical to the site's files.
//!
//! Layout: `CONTENT/<ID>` is a symbolic link to `.ferry/<ID>.r<REV>`. A new
//! revision is rebuilt in `.ferry/tmp-<ID>.r<REV>`, every file checked
//! against its whole-file BLAKE3 and synced, the folder renamed to
//! `.ferry/<ID>.r<REV>`, and then the link replaced by a rename, so readers
//! see the old revision or the new one, whole, never a mix or a partial
//! file. The folder of the previous revision goes after the switch.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use ferry_core::Manifest;
use ferry_store::{Library, StoreError};

/// Ferry's own folder inside the content folder.
pub const INTERNAL_DIR: &str = ".ferry";

/// Why a package could not be rebuilt or removed.
#[derive(Debug, thiserror::Error)]
pub enum ContentError {
    /// Writing or renaming in the content folder failed (disk full, rights).
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A chunk could not be read from the DP's library.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The rebuilt file does not hash to what the manifest says.
    #[error("{path}: rebuilt file does not match its BLAKE3 {expected}")]
    Mismatch {
        /// The file.
        path: PathBuf,
        /// The manifest's hash.
        expected: String,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ContentError + '_ {
    move |source| ContentError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn sync_dir(path: &Path) -> Result<(), ContentError> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io(path))
}

/// The revision of `package` installed in `content`, read from its link.
pub fn installed(content: &Path, package: &str) -> Option<u32> {
    let target = std::fs::read_link(content.join(package)).ok()?;
    let name = target.file_name()?.to_str()?;
    let rev = name.strip_prefix(package)?.strip_prefix(".r")?;
    let rev: u32 = rev.parse().ok()?;
    content
        .join(INTERNAL_DIR)
        .join(format!("{package}.r{rev}"))
        .is_dir()
        .then_some(rev)
}

/// Every installed package with its revision.
pub fn holdings(content: &Path) -> Vec<(String, u32)> {
    let Ok(entries) = std::fs::read_dir(content) else {
        return Vec::new();
    };
    let mut out: Vec<(String, u32)> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_string();
            if name.starts_with('.') {
                return None;
            }
            installed(content, &name).map(|r| (name, r))
        })
        .collect();
    out.sort();
    out
}

/// Rebuilds revision `revision` of `package` from the library and switches
/// the package's link to it. On error nothing visible changes and the
/// temporary folder is removed.
pub fn install(
    lib: &Library,
    content: &Path,
    package: &str,
    revision: u32,
    manifests: &[Manifest],
) -> Result<(), ContentError> {
    let internal = content.join(INTERNAL_DIR);
    std::fs::create_dir_all(&internal).map_err(io(&internal))?;
    let tmp = internal.join(format!("tmp-{package}.r{revision}"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    std::fs::create_dir(&tmp).map_err(io(&tmp))?;
    let built = build(lib, &tmp, manifests);
    if let Err(e) = built {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    let done = internal.join(format!("{package}.r{revision}"));
    if done.exists() {
        std::fs::remove_dir_all(&done).map_err(io(&done))?;
    }
    std::fs::rename(&tmp, &done).map_err(io(&done))?;
    sync_dir(&internal)?;

    let link_tmp = internal.join(format!("link-{package}"));
    let _ = std::fs::remove_file(&link_tmp);
    let target = Path::new(INTERNAL_DIR).join(format!("{package}.r{revision}"));
    std::os::unix::fs::symlink(&target, &link_tmp).map_err(io(&link_tmp))?;
    let link = content.join(package);
    std::fs::rename(&link_tmp, &link).map_err(io(&link))?;
    sync_dir(content)?;
    remove_other_revisions(content, package, Some(revision))
}

fn build(lib: &Library, dir: &Path, manifests: &[Manifest]) -> Result<(), ContentError> {
    for m in manifests {
        // Paths were checked when the manifest was decoded (relative, no ..).
        let path = dir.join(&m.path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io(parent))?;
        }
        let file = File::create(&path).map_err(io(&path))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        let mut hasher = blake3::Hasher::new();
        for c in &m.chunks {
            let data = lib.read_chunk(&c.id)?;
            hasher.update(&data);
            out.write_all(&data).map_err(io(&path))?;
        }
        let file = out.into_inner().map_err(|e| ContentError::Io {
            path: path.clone(),
            source: e.into_error(),
        })?;
        file.sync_all().map_err(io(&path))?;
        if ferry_core::FileHash::from(hasher.finalize()) != m.hash {
            return Err(ContentError::Mismatch {
                path,
                expected: m.hash.to_hex(),
            });
        }
        if let Some(parent) = path.parent() {
            sync_dir(parent)?;
        }
    }
    Ok(())
}

fn remove_other_revisions(
    content: &Path,
    package: &str,
    keep: Option<u32>,
) -> Result<(), ContentError> {
    let internal = content.join(INTERNAL_DIR);
    let Ok(entries) = std::fs::read_dir(&internal) else {
        return Ok(());
    };
    let keep = keep.map(|r| format!("{package}.r{r}"));
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let ours = name
            .strip_prefix(package)
            .is_some_and(|rest| rest.starts_with(".r"))
            || name
                .strip_prefix("tmp-")
                .and_then(|n| n.strip_prefix(package))
                .is_some_and(|rest| rest.starts_with(".r"));
        if ours && Some(&name) != keep.as_ref() {
            let p = e.path();
            std::fs::remove_dir_all(&p).map_err(io(&p))?;
        }
    }
    Ok(())
}

/// Removes a package from the content folder: the link first, then its
/// folders.
pub fn uninstall(content: &Path, package: &str) -> Result<(), ContentError> {
    let link = content.join(package);
    match std::fs::remove_file(&link) {
        Ok(()) => sync_dir(content)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(&link)(e)),
    }
    remove_other_revisions(content, package, None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_core::{ChunkId, ChunkRef, FileHash};

    fn put(lib: &Library, pkg: &str, rev: u32, files: &[(&str, &[u8])]) -> Vec<Manifest> {
        let mut imp = lib.begin_import();
        let ms: Vec<Manifest> = files
            .iter()
            .map(|(p, d)| {
                let id = ChunkId::of(d);
                imp.put_chunk(&id, d).unwrap();
                Manifest {
                    path: (*p).into(),
                    size: d.len() as u64,
                    hash: FileHash::of(d),
                    chunks: vec![ChunkRef {
                        id,
                        len: d.len() as u32,
                    }],
                    segments: vec![],
                }
            })
            .collect();
        imp.commit(pkg, rev, &ms, |_, _| Ok(b"{}".to_vec()))
            .unwrap();
        ms
    }

    #[test]
    fn revisions_switch_whole_and_old_folders_go() {
        let dir = tempfile::tempdir().unwrap();
        let lib = Library::open(&dir.path().join("lib")).unwrap();
        let content = dir.path().join("content");
        std::fs::create_dir(&content).unwrap();
        let m1 = put(
            &lib,
            "FRY00001",
            1,
            &[("a/x.wim", b"one"), ("b.txt", b"bee")],
        );
        install(&lib, &content, "FRY00001", 1, &m1).unwrap();
        assert_eq!(
            std::fs::read(content.join("FRY00001/a/x.wim")).unwrap(),
            b"one"
        );
        assert_eq!(holdings(&content), vec![("FRY00001".to_string(), 1)]);

        let m2 = put(&lib, "FRY00001", 2, &[("a/x.wim", b"two")]);
        install(&lib, &content, "FRY00001", 2, &m2).unwrap();
        assert_eq!(
            std::fs::read(content.join("FRY00001/a/x.wim")).unwrap(),
            b"two"
        );
        assert!(!content.join("FRY00001/b.txt").exists());
        assert_eq!(installed(&content, "FRY00001"), Some(2));
        let internal: Vec<_> = std::fs::read_dir(content.join(INTERNAL_DIR))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(internal, vec!["FRY00001.r2"]);

        uninstall(&content, "FRY00001").unwrap();
        assert!(holdings(&content).is_empty());
        assert_eq!(
            std::fs::read_dir(content.join(INTERNAL_DIR))
                .unwrap()
                .count(),
            0
        );
    }

    #[test]
    fn a_bad_rebuild_leaves_the_old_revision_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let lib = Library::open(&dir.path().join("lib")).unwrap();
        let content = dir.path().join("content");
        std::fs::create_dir(&content).unwrap();
        let m1 = put(&lib, "FRY00001", 1, &[("x.wim", b"one")]);
        install(&lib, &content, "FRY00001", 1, &m1).unwrap();
        let mut m2 = put(&lib, "FRY00001", 2, &[("x.wim", b"two")]);
        m2[0].hash = FileHash::of(b"something else");
        let e = install(&lib, &content, "FRY00001", 2, &m2).unwrap_err();
        assert!(matches!(e, ContentError::Mismatch { .. }), "{e}");
        assert_eq!(
            std::fs::read(content.join("FRY00001/x.wim")).unwrap(),
            b"one"
        );
        assert!(!content.join(INTERNAL_DIR).join("tmp-FRY00001.r2").exists());
    }
}
