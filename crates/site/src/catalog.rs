//! What the site records about each package (the catalog), and the views
//! the operator API returns.

use ferry_core::FileHash;
use ferry_wim::{ImageInfo, WimInfo};
use serde::{Deserialize, Serialize};

/// The kinds of content a site holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PackageKind {
    /// One WIM file.
    Image,
}

/// A package as stored in the catalog (JSON in `CF_PACKAGES`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackageRecord {
    /// Site code plus five hex digits: `FRY00001`.
    pub id: String,
    /// What it is.
    pub kind: PackageKind,
    /// Operator-facing name (defaults to the WIM's first image name).
    pub name: String,
    /// The organisation's own version string.
    pub version: String,
    /// Free text.
    pub comment: String,
    /// When it was first imported (RFC 3339).
    pub created: String,
    /// Its revisions, oldest first.
    pub revisions: Vec<RevisionRecord>,
}

/// One revision: one import of the content.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevisionRecord {
    /// 1, 2, … within the package.
    pub revision: u32,
    /// When it was imported (RFC 3339).
    pub created: String,
    /// Where it came from.
    pub source: SourceRecord,
    /// With `--index`: the image index exported from the source.
    pub exported_index: Option<u32>,
    /// The WIM as a whole.
    pub wim: WimInfo,
    /// Every image in the imported WIM.
    pub images: Vec<ImageInfo>,
    /// The files of the revision.
    pub files: Vec<FileRecord>,
    /// What the import did to the library.
    pub stats: ImportStats,
}

/// The source of an import, to detect later changes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceRecord {
    /// Absolute path on the site server.
    pub path: String,
    /// Size when imported.
    pub size: u64,
    /// Modification time when imported, nanoseconds since the Unix epoch.
    pub modified_ns: i64,
    /// BLAKE3 of the source file when imported.
    pub hash: FileHash,
}

/// One file of a revision.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRecord {
    /// Path inside the package.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// Whole-file BLAKE3.
    pub hash: FileHash,
}

/// Library figures for one import.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportStats {
    /// Bytes of the files.
    pub logical_bytes: u64,
    /// Chunks the files are made of.
    pub chunks: u64,
    /// Segments the files were cut into.
    pub segments: u64,
    /// Chunks the library did not have before.
    pub new_chunks: u64,
    /// Bytes the library stored for this import.
    pub new_bytes: u64,
    /// Bytes shared with content already in the library (logical − new).
    pub shared_bytes: u64,
}

/// Whether a package's source still matches what was imported.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SourceState {
    /// Same size and modification time as at import.
    Unchanged,
    /// Size or modification time differ: the source changed after import.
    Changed,
    /// The source path no longer exists.
    Missing,
    /// The package has no revision to compare.
    NotChecked,
}

/// A package as `image list` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackageSummary {
    /// Package id.
    pub id: String,
    /// Name.
    pub name: String,
    /// Version.
    pub version: String,
    /// Latest revision number.
    pub revision: u32,
    /// Images in the latest revision.
    pub image_count: usize,
    /// Bytes of the latest revision's files.
    pub size: u64,
    /// Bytes the latest revision added to the library.
    pub new_bytes: u64,
    /// When it was first imported.
    pub created: String,
}

/// A package as `image show` shows it: the record plus live facts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackageView {
    /// The stored record.
    #[serde(flatten)]
    pub record: PackageRecord,
    /// Whether the latest revision's source still matches.
    pub source_state: SourceState,
}

impl PackageRecord {
    /// The newest revision. Every stored package has at least one.
    pub fn latest(&self) -> Option<&RevisionRecord> {
        self.revisions.last()
    }

    /// The list row for this package.
    pub fn summary(&self) -> PackageSummary {
        let latest = self.latest();
        PackageSummary {
            id: self.id.clone(),
            name: self.name.clone(),
            version: self.version.clone(),
            revision: latest.map_or(0, |r| r.revision),
            image_count: latest.map_or(0, |r| r.images.len()),
            size: latest.map_or(0, |r| r.stats.logical_bytes),
            new_bytes: latest.map_or(0, |r| r.stats.new_bytes),
            created: self.created.clone(),
        }
    }
}
