//! The WIM a servicing job leaves behind, kept per package in
//! `DATA/servicing/`: the next job of that package starts from it (a
//! rename into its work folder) instead of rebuilding the image from the
//! library. It costs one copy of the newest serviced WIM per package on the
//! site's disk; it goes when the package is removed or gets a revision some
//! other way, and is never trusted unless its stamp (revision, size,
//! modification time) still matches and its bytes still hash to the
//! revision's BLAKE3 (one read, far cheaper than a rebuild from the
//! library).

use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use ferry_core::{FileHash, Manifest};
use ferry_store::Library;
use serde::{Deserialize, Serialize};

/// The folder, under the site's data folder.
const DIR: &str = "servicing";

/// What the kept file was when it was kept.
#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Stamp {
    revision: u32,
    size: u64,
    /// Whole-file BLAKE3 (hex), as the revision's manifest gives it.
    blake3: String,
    /// Modification time, ns since the epoch: anything that wrote to the
    /// file since changed it.
    modified_ns: u128,
}

fn dir(data: &Path) -> PathBuf {
    data.join(DIR)
}

fn paths(data: &Path, package: &str) -> (PathBuf, PathBuf) {
    let d = dir(data);
    (
        d.join(format!("{package}.wim")),
        d.join(format!("{package}.json")),
    )
}

fn modified_ns(path: &Path) -> Option<u128> {
    let m = std::fs::metadata(path).ok()?.modified().ok()?;
    Some(m.duration_since(UNIX_EPOCH).ok()?.as_nanos())
}

/// Moves the kept WIM of `package` to `dest` if it is the file `wim` (of
/// `revision`) describes: untouched since it was kept, and hashing to the
/// manifest's BLAKE3. Deletes any other. True when moved.
pub fn take(data: &Path, package: &str, revision: u32, wim: &Manifest, dest: &Path) -> bool {
    let (file, stamp) = paths(data, package);
    let Ok(text) = std::fs::read(&stamp) else {
        let _ = std::fs::remove_file(&file);
        return false;
    };
    let fits = serde_json::from_slice::<Stamp>(&text).is_ok_and(|s| {
        s.revision == revision
            && s.size == wim.size
            && s.blake3 == wim.hash.to_hex()
            && std::fs::metadata(&file).is_ok_and(|m| m.len() == s.size)
            && modified_ns(&file) == Some(s.modified_ns)
            && hashes_to(&file, wim)
    });
    // The stamp goes first: a file without one is never used.
    let _ = std::fs::remove_file(&stamp);
    if fits && std::fs::rename(&file, dest).is_ok() {
        return true;
    }
    let _ = std::fs::remove_file(&file);
    false
}

fn hashes_to(file: &Path, wim: &Manifest) -> bool {
    let mut h = blake3::Hasher::new();
    std::fs::File::open(file)
        .and_then(|f| h.update_reader(f).map(drop))
        .is_ok()
        && FileHash::from(h.finalize()) == wim.hash
}

/// Keeps `file` (the WIM of `revision`, described by `wim`) for the next
/// job of `package`.
pub fn keep(
    data: &Path,
    package: &str,
    revision: u32,
    wim: &Manifest,
    file: &Path,
) -> std::io::Result<()> {
    let (dest, stamp) = paths(data, package);
    std::fs::create_dir_all(dir(data))?;
    let _ = std::fs::remove_file(&stamp);
    std::fs::rename(file, &dest)?;
    let s = Stamp {
        revision,
        size: wim.size,
        blake3: wim.hash.to_hex(),
        modified_ns: modified_ns(&dest).ok_or_else(|| {
            std::io::Error::other(format!("cannot read the time of {}", dest.display()))
        })?,
    };
    crate::save_json(&stamp, &s)
}

/// Drops the kept WIM of `package`, if any.
pub fn forget(data: &Path, package: &str) {
    let (file, stamp) = paths(data, package);
    let _ = std::fs::remove_file(stamp);
    let _ = std::fs::remove_file(file);
}

/// Drops the kept WIMs no job can start from: of packages removed, or whose
/// newest revision is not the kept one's (at startup).
pub fn sweep(data: &Path, lib: &Library) {
    let Ok(entries) = std::fs::read_dir(dir(data)) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        let Some(package) = path.file_stem().and_then(|s| s.to_str()) else {
            continue;
        };
        let kept = std::fs::read(paths(data, package).1)
            .ok()
            .and_then(|t| serde_json::from_slice::<Stamp>(&t).ok());
        let newest = crate::images::record(lib, package)
            .ok()
            .and_then(|r| r.latest().map(|l| l.revision));
        if kept.is_none() || kept.map(|k| k.revision) != newest {
            forget(data, package);
        }
    }
}
