//! The operator API's request bodies (JSON) and queries, one type per
//! route that takes input; the route table is in `ferry_site::api`. Each
//! is read whole before anything changes: serde rejects a body of the
//! wrong shape, and the texts inside (windows, schedules, start times,
//! port ranges) are read by the parsers of this crate.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

// ---- Content library ----

/// What `ferry image add` asks for.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportRequest {
    /// Absolute path of the WIM on the site server.
    pub path: PathBuf,
    /// Name; defaults to the first image's name in the WIM.
    pub name: Option<String>,
    /// Version string.
    pub version: Option<String>,
    /// Comment.
    pub comment: Option<String>,
    /// Import only this image index (exported into a new WIM first).
    pub index: Option<u32>,
    /// Add the file as the next revision of this existing package instead of
    /// creating one (`ferry content refresh`).
    #[serde(default)]
    pub package: Option<String>,
    /// Skip checking every resource against its SHA-1 while importing.
    #[serde(default)]
    pub no_verify: bool,
}

/// What `ferry upgrade add` asks for.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpgradeRequest {
    /// Absolute path of the setup folder on the site server.
    pub path: PathBuf,
    /// Unique name (required for a new package).
    #[serde(default)]
    pub name: Option<String>,
    /// Version string.
    #[serde(default)]
    pub version: Option<String>,
    /// Comment.
    #[serde(default)]
    pub comment: Option<String>,
    /// Architecture (`x64`, `arm64`, …); read from install.wim when absent.
    #[serde(default)]
    pub arch: Option<String>,
    /// Language (`en-US`, …); read from install.wim when absent.
    #[serde(default)]
    pub lang: Option<String>,
    /// Keep only this image of `sources/install.wim`.
    #[serde(default)]
    pub extract_index: Option<u32>,
    /// A new revision of this package (`ferry content refresh`).
    #[serde(default)]
    pub package: Option<String>,
    /// Skip checking every WIM resource against its SHA-1 while importing.
    #[serde(default)]
    pub no_verify: bool,
}

/// Body of `POST /api/v1/images/{id}/refresh`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefreshRequest {
    /// A new source file (absolute path); the recorded source when absent.
    pub source: Option<PathBuf>,
    /// Skip checking every WIM resource against its SHA-1.
    #[serde(default)]
    pub no_verify: bool,
}

/// What `ferry image set` may change; `None` leaves a property as it is.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Properties {
    /// Operator-facing name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The organisation's version string.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Free text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    /// Upgrade packages: architecture.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architecture: Option<String>,
    /// Upgrade packages: language.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub language: Option<String>,
    /// Revisions to keep (0: back to the site's `keep_revisions`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep: Option<u32>,
}

/// A package's multicast settings (Configuration Manager's three boxes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MulticastSettings {
    /// DPs may send it to clients by multicast.
    #[serde(default)]
    pub allow: bool,
    /// Every multicast packet is sealed under a per-session key.
    #[serde(default)]
    pub encrypt: bool,
    /// Only by multicast: DPs refuse HTTPS downloads of it.
    #[serde(default)]
    pub only: bool,
}

impl MulticastSettings {
    /// Not allowed at all.
    pub fn is_off(&self) -> bool {
        *self == Self::default()
    }

    /// How `image show` says it.
    pub fn describe(&self) -> String {
        match (self.allow, self.encrypt, self.only) {
            (false, _, _) => "off (HTTPS only)".into(),
            (true, enc, only) => format!(
                "allowed{}, {}",
                if only {
                    " and the only way (HTTPS downloads refused)"
                } else {
                    ""
                },
                if enc {
                    "packets encrypted per session"
                } else {
                    "packets in clear (not encrypted)"
                }
            ),
        }
    }
}

/// Body of `POST /api/v1/images/{id}/rollback`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RollbackRequest {
    /// The kept revision to release.
    pub to: u32,
}

/// Body of `POST /api/v1/content/verify`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyRequest {
    /// One package, or the whole library when absent.
    pub id: Option<String>,
}

/// Query of `GET /api/v1/content/{id}/file`.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct FileQuery {
    /// Revision; the latest when absent.
    pub revision: Option<u32>,
    /// File path inside the package; the first file when absent.
    pub path: Option<String>,
}

/// Query of `GET /api/v1/content/{id}/prestage`.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct PrestageQuery {
    /// The DP the bundle is for.
    pub dp: String,
    /// Every chunk of the revision, not only those the DP lacks.
    #[serde(default)]
    pub full: bool,
}

// ---- Distribution points and groups ----

/// Body of `POST /api/v1/dps`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddDpRequest {
    /// The DP's name.
    pub name: String,
    /// A new token for a DP that never finished enrolling (the old one
    /// stops working).
    #[serde(default)]
    pub reissue: bool,
}

/// Query of `DELETE /api/v1/dps/{name}`.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct RemoveDpQuery {
    /// Remove it even while it is connected.
    #[serde(default)]
    pub force: bool,
}

/// Body of `POST /api/v1/dps/{name}/settings`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DpSettings {
    /// Five-field cron (UTC) for scheduled validation; `"off"` clears it.
    #[serde(default)]
    pub validate_schedule: Option<String>,
    /// Let clients without a token download from the DP's HTTPS listener.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anonymous_clients: Option<bool>,
    /// Put the DP in maintenance (no transfer to or from it starts), or
    /// take it out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maintenance: Option<bool>,
    /// Limit the chunk bytes sent to the DP to this many per second; 0
    /// takes the limit away.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<u64>,
    /// Transfer windows in the site's local time ([`crate::windows`]);
    /// `"off"` takes them away.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<String>,
    /// The DP takes its content from prestage bundles only (the site sends
    /// it no chunk), or not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prestaged: Option<bool>,
    /// The DPs it takes its chunks from, by rank (`--pull-from`); empty:
    /// from the site again (`--push`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull_from: Option<Vec<PullFrom>>,
}

/// One of a pull DP's sources (`ferry dp set NAME --pull-from SRC:RANK`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PullFrom {
    /// The source DP.
    pub dp: String,
    /// Lower first; a random one among equals.
    pub rank: u32,
}

/// Body of `POST /api/v1/dps/{name}/multicast`: what to change; the rest
/// stays as it was (or at its default the first time).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MulticastChange {
    /// Turn sessions on (`true`) or off (`false`).
    pub enable: bool,
    /// Group range, CIDR.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Port range `FIRST-LAST`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<String>,
    /// Clients per session at most.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_clients: Option<u32>,
    /// Bytes per second at most.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<u64>,
    /// Seconds to wait after the first client joined.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_delay_secs: Option<u64>,
    /// Clients that start a session at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_clients: Option<u32>,
    /// IP time to live.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<u32>,
    /// Interface address; `""` goes back to the routing table's choice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
}

/// `FIRST-LAST` (or one port) as a range.
pub fn parse_ports(s: &str) -> Result<(u16, u16), String> {
    let bad = || format!("{s:?}: give UDP ports as FIRST-LAST, e.g. 63000-64000");
    let (a, b) = s.split_once('-').unwrap_or((s, s));
    let a: u16 = a.trim().parse().map_err(|_| bad())?;
    let b: u16 = b.trim().parse().map_err(|_| bad())?;
    if a == 0 || a > b {
        return Err(bad());
    }
    Ok((a, b))
}

/// Body of `POST /api/v1/dps/{name}/validate`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ValidateRequest {
    /// Only these packages (all the DP holds when empty).
    #[serde(default)]
    pub packages: Vec<String>,
}

/// Body of `POST /api/v1/groups`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupRequest {
    /// The group's name.
    pub name: String,
}

/// Body of `POST /api/v1/groups/{name}/members`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MembersRequest {
    /// DPs to add.
    pub dps: Vec<String>,
}

/// Body of `POST /api/v1/client-tokens`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientTokenRequest {
    /// The token's name.
    pub name: String,
    /// Seconds it is valid; forever when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid_secs: Option<u64>,
}

// ---- Distribution and status ----

/// Body of `POST /api/v1/distribute`, `/undistribute` and `/redistribute`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DistributeRequest {
    /// The package.
    pub package: String,
    /// DPs by name.
    #[serde(default)]
    pub dps: Vec<String>,
    /// Groups by name.
    #[serde(default)]
    pub groups: Vec<String>,
    /// Only report what each DP would need.
    #[serde(default)]
    pub dry_run: bool,
}

/// Query of `GET /api/v1/status`.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct StatusQuery {
    /// Only this package.
    pub package: Option<String>,
    /// Only this DP.
    pub dp: Option<String>,
}

// ---- Servicing ----

/// Body of `POST /api/v1/updates`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateImportRequest {
    /// Absolute path of the update folder or archive on the site server.
    pub path: PathBuf,
}

/// What `ferry image service` asks for.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceRequest {
    /// Update ids, applied in this order.
    #[serde(default)]
    pub updates: Vec<String>,
    /// Run once at this time (RFC 3339, `YYYY-MM-DD HH:MM[:SS]` in UTC, or
    /// `+N[s|m|h|d]` from now) instead of now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<String>,
    /// Run at every occurrence of this cron expression (UTC; 5 fields, or 6
    /// with seconds first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    /// Record a failing update and apply the rest.
    #[serde(default)]
    pub continue_on_error: bool,
    /// Send the new revision to every DP that holds the package.
    #[serde(default)]
    pub distribute: bool,
    /// Rebuild the WIM so data nothing refers to any more is dropped.
    #[serde(default)]
    pub optimize: bool,
}

/// Query of `GET /api/v1/jobs`.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct JobsQuery {
    /// Only this package's jobs.
    pub package: Option<String>,
}
