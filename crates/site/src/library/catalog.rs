//! What the site records about each package (the catalog), and the views
//! the operator API returns.

use ferry_core::FileHash;
use ferry_wim::{ImageInfo, WimInfo};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

pub use ferry_api::requests::MulticastSettings;

/// The kinds of content a site holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PackageKind {
    /// One WIM file.
    Image,
    /// A Windows setup folder (`setup.exe`, `sources/install.wim`, …).
    Upgrade,
}

impl PackageKind {
    /// How operators call it.
    pub fn noun(self) -> &'static str {
        match self {
            PackageKind::Image => "image",
            PackageKind::Upgrade => "upgrade package",
        }
    }
}

/// Where a package's serviceable WIM is in an upgrade package.
pub const INSTALL_WIM: &str = "sources/install.wim";

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
    #[serde(with = "time::serde::rfc3339")]
    pub created: OffsetDateTime,
    /// Its revisions, oldest first.
    pub revisions: Vec<RevisionRecord>,
    /// The revision DPs receive; `None` means the newest. A serviced
    /// revision made without `--distribute` leaves this on the old one until
    /// `ferry distribute` sends the newest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub released: Option<u32>,
    /// Upgrade packages: the architecture, for clients that pre-cache.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub architecture: String,
    /// Upgrade packages: the language, for clients that pre-cache.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub language: String,
    /// Revisions kept for this package (`ferry image set --keep N`); the
    /// site's `keep_revisions` when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep: Option<u32>,
    /// Whether and how DPs may send it by multicast.
    #[serde(default, skip_serializing_if = "MulticastSettings::is_off")]
    pub multicast: MulticastSettings,
}

/// One revision: one import of the content.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevisionRecord {
    /// 1, 2, … within the package.
    pub revision: u32,
    /// When it was imported (RFC 3339).
    #[serde(with = "time::serde::rfc3339")]
    pub created: OffsetDateTime,
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
    /// Set when Ferry made this revision by servicing an earlier one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<ServiceRecord>,
    /// What the import warned about (missing `setup.exe`, …).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// Every WIM resource was checked against its SHA-1 when it was read
    /// (false: imported with `--no-verify`, or by a release that did not
    /// check).
    #[serde(default)]
    pub verified: bool,
}

/// How a serviced revision was made.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceRecord {
    /// The job that made it.
    pub job: u64,
    /// The revision it was made from.
    pub base_revision: u32,
    /// Updates applied by that job, in order.
    pub applied: Vec<String>,
    /// Every update Ferry applied to reach this revision: those of the
    /// revision it was made from, then `applied`.
    pub all_applied: Vec<String>,
    /// Updates that failed (with `--continue-on-error`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed: Vec<String>,
    /// With `--optimize`: bytes of the WIM before and after the rebuild.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optimized: Option<(u64, u64)>,
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

impl FileRecord {
    /// The record of the file `m` describes.
    pub fn of(m: &ferry_core::Manifest) -> Self {
        Self {
            path: m.path.clone(),
            size: m.size,
            hash: m.hash,
        }
    }
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
    /// The latest revision was made by Ferry's servicing: no outside source.
    Serviced,
}

/// A package as `image list` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackageSummary {
    /// Package id.
    pub id: String,
    /// Image or upgrade package.
    pub kind: PackageKind,
    /// The revision DPs receive.
    pub released: u32,
    /// Files in the latest revision.
    pub file_count: usize,
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
    #[serde(with = "time::serde::rfc3339")]
    pub created: OffsetDateTime,
}

/// A package as `image show` shows it: the record plus live facts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackageView {
    /// The stored record.
    #[serde(flatten)]
    pub record: PackageRecord,
    /// Whether the latest revision's source still matches.
    pub source_state: SourceState,
    /// A refresh found the source holding what the latest revision holds:
    /// no revision was made.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unchanged: bool,
}

impl PackageRecord {
    /// The newest revision. Every stored package has at least one.
    pub fn latest(&self) -> Option<&RevisionRecord> {
        self.revisions.last()
    }

    /// Adds `revision` as the next revision, as a refresh does: a new
    /// version string when given, and released to the DPs.
    pub fn push_refreshed(&mut self, revision: RevisionRecord, version: Option<&String>) {
        let next = self.latest().map_or(1, |r| r.revision + 1);
        self.revisions.push(RevisionRecord {
            revision: next,
            ..revision
        });
        if let Some(v) = version {
            self.version = v.clone();
        }
        self.released = None;
    }

    /// The revision DPs should hold.
    pub fn target(&self) -> Option<u32> {
        let latest = self.latest()?.revision;
        Some(match self.released {
            Some(r) if self.revision(r).is_some() => r,
            _ => latest,
        })
    }

    /// One revision by number.
    pub fn revision(&self, number: u32) -> Option<&RevisionRecord> {
        self.revisions.iter().find(|r| r.revision == number)
    }

    /// The path of the WIM servicing works on in `rev`: the only file of an
    /// image, `sources/install.wim` of an upgrade package (any case).
    pub fn wim_path<'r>(&self, rev: &'r RevisionRecord) -> Option<&'r str> {
        match self.kind {
            PackageKind::Image => rev.files.first().map(|f| f.path.as_str()),
            PackageKind::Upgrade => rev
                .files
                .iter()
                .find(|f| f.path.eq_ignore_ascii_case(INSTALL_WIM))
                .map(|f| f.path.as_str()),
        }
    }

    /// Updates Ferry applied to reach revision `number`, oldest first. A
    /// revision imported from outside has none.
    pub fn applied_updates(&self, number: u32) -> Vec<String> {
        self.revision(number)
            .and_then(|r| r.service.as_ref())
            .map(|s| s.all_applied.clone())
            .unwrap_or_default()
    }

    /// The list row for this package.
    pub fn summary(&self) -> PackageSummary {
        let latest = self.latest();
        PackageSummary {
            id: self.id.clone(),
            kind: self.kind,
            released: self.target().unwrap_or(0),
            file_count: latest.map_or(0, |r| r.files.len()),
            name: self.name.clone(),
            version: self.version.clone(),
            revision: latest.map_or(0, |r| r.revision),
            image_count: latest.map_or(0, |r| r.images.len()),
            size: latest.map_or(0, |r| r.stats.logical_bytes),
            new_bytes: latest.map_or(0, |r| r.stats.new_bytes),
            created: self.created,
        }
    }
}
