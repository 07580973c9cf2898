//! The registry's durable records: what the site keeps about each DP,
//! group and client token, and the questions the whole registry answers
//! (what a DP must hold, who holds a package). Kept by
//! [`crate::distribution::registry::Hub`], written by [`crate::distribution::persist`].

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

pub use ferry_api::requests::PullFrom;

/// Where one package stands on one DP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TransferState {
    /// Assigned; the DP has not started it.
    Pending,
    /// Chunks are moving.
    InProgress,
    /// Every file stands rebuilt and verified in the DP's content folder.
    Installed,
    /// The last attempt failed; the DP retries.
    Failed,
    /// The DP is deleting it.
    Removing,
    /// Installed, and being re-hashed against its signed manifest.
    Validating,
}

impl TransferState {
    /// Whether the DP holds the revision whole (installed, or validating
    /// what it installed).
    pub fn holds(self) -> bool {
        matches!(self, Self::Installed | Self::Validating)
    }
}

/// The last report of one DP about one package.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferReport {
    /// The revision the report is about.
    pub revision: u32,
    /// Its state.
    pub state: TransferState,
    /// Chunk bytes the DP lacked when it planned the transfer.
    pub bytes_needed: u64,
    /// Of those, bytes received and stored.
    pub bytes_done: u64,
    /// What a full copy of the revision's files costs.
    pub full_bytes: u64,
    /// UDP bytes received at the DP's socket during the transfer.
    pub wire_bytes: u64,
    /// Bytes the DP copied from files it held (no network).
    #[serde(default)]
    pub bytes_local: u64,
    /// Bytes of the signed manifest as it travelled.
    #[serde(default)]
    pub manifest_bytes: u64,
    /// Why the last attempt failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// When the DP tries again after a failure (RFC 3339).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "time::serde::rfc3339::option"
    )]
    pub next_retry: Option<OffsetDateTime>,
    /// When the transfer of this revision started (RFC 3339).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "time::serde::rfc3339::option"
    )]
    pub started: Option<OffsetDateTime>,
    /// When the report arrived (RFC 3339).
    #[serde(with = "time::serde::rfc3339")]
    pub updated: OffsetDateTime,
    /// Where the chunk bytes came from: `site` or a source DP, with the
    /// bytes from each.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sources: Vec<SourceBytes>,
    /// A pull DP waiting for this source to get the revision first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting_for: Option<String>,
}

/// Chunk bytes a transfer received from one source.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceBytes {
    /// `site`, or a source DP's name.
    pub source: String,
    /// Bytes received from it.
    pub bytes: u64,
}

/// One distribution point.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DpRecord {
    /// Its name (the subject of its certificate).
    pub name: String,
    /// When `ferry dp add` created it.
    #[serde(with = "time::serde::rfc3339")]
    pub created: OffsetDateTime,
    /// When it enrolled.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "time::serde::rfc3339::option"
    )]
    pub enrolled: Option<OffsetDateTime>,
    /// Fingerprint of the certificate issued at enrollment; only that
    /// certificate is accepted for this DP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_fingerprint: Option<String>,
    /// When it was revoked; it is refused from then on.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "time::serde::rfc3339::option"
    )]
    pub revoked: Option<OffsetDateTime>,
    /// BLAKE3 (hex) of its unused enrollment token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_hash: Option<String>,
    /// Packages assigned to it directly.
    #[serde(default)]
    pub packages: BTreeSet<String>,
    /// Last report per package.
    #[serde(default)]
    pub transfers: BTreeMap<String, TransferReport>,
    /// Last time it was connected (RFC 3339).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "time::serde::rfc3339::option"
    )]
    pub last_contact: Option<OffsetDateTime>,
    /// Address it last connected from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Content validation: schedule, the latest request, results.
    #[serde(default)]
    pub validation: ValidationState,
    /// Chunk bytes the site has sent it, as of the record's last write (the
    /// live figure is [`Hub::served_bytes`]).
    #[serde(default)]
    pub served_bytes: u64,
    /// Per package, how many times the operator asked for a rebuild from
    /// scratch (`ferry redistribute ID --dp NAME`); kept after the package
    /// leaves, so a number is never reused.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub rebuilds: BTreeMap<String, u64>,
    /// Its disk, as it last reported (at connection and after each install,
    /// removal or failure).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<DiskRecord>,
    /// Clients without a token may download from it.
    #[serde(default)]
    pub anonymous_clients: bool,
    /// In maintenance (`ferry dp set NAME --maintenance on`): no transfer
    /// to or from it starts.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub maintenance: bool,
    /// The most chunk bytes per second the site (or a source DP) sends it
    /// (`ferry dp set NAME --rate`); `None`: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<u64>,
    /// Its transfer windows (`--window`, [`crate::windows`]) as given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<String>,
    /// Its content comes in prestage bundles (`--prestaged on`): the site
    /// sends it no chunk.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub prestaged: bool,
    /// The names in the certificate of its HTTPS listener, as last issued.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub client_names: Vec<String>,
    /// Its multicast settings (`ferry dp multicast`), kept while off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multicast: Option<DpMulticast>,
    /// Its multicast sessions as it last reported them: running, then
    /// recently ended.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub multicast_sessions: Vec<ferry_mcast::SessionView>,
    /// The DPs it pulls its chunks from (`--pull-from`), lowest rank
    /// first; empty: the site pushes to it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pull_from: Vec<PullFrom>,
    /// Where it serves chunks to pull DPs, as it last said (`[peers]` of
    /// its dp.toml).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_address: Option<String>,
}

impl DpRecord {
    /// A DP `ferry dp add` just created: nothing else known yet.
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_string(),
            created: crate::now(),
            enrolled: None,
            cert_fingerprint: None,
            revoked: None,
            token_hash: None,
            packages: BTreeSet::new(),
            transfers: BTreeMap::new(),
            last_contact: None,
            address: None,
            validation: ValidationState::default(),
            served_bytes: 0,
            rebuilds: BTreeMap::new(),
            disk: None,
            anonymous_clients: false,
            maintenance: false,
            rate: None,
            window: None,
            prestaged: false,
            client_names: Vec::new(),
            multicast: None,
            multicast_sessions: Vec::new(),
            pull_from: Vec::new(),
            peer_address: None,
        }
    }
}

/// A DP's disk as it reported it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskRecord {
    /// Allocated bytes of its data and content folders.
    pub used_bytes: u64,
    /// Free bytes on the content folder's filesystem.
    pub free_bytes: u64,
    /// Size of that filesystem.
    pub total_bytes: u64,
    /// When it reported them (RFC 3339).
    #[serde(with = "time::serde::rfc3339")]
    pub updated: OffsetDateTime,
}

/// A DP's content validation.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ValidationState {
    /// Five-field cron expression (UTC) for scheduled runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    /// The latest request's number (0: none yet); the DP answers each once.
    #[serde(default)]
    pub requested: u64,
    /// Packages of the latest request; empty for all.
    #[serde(default)]
    pub packages: Vec<String>,
    /// When the latest request was made (RFC 3339), and why.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "time::serde::rfc3339::option"
    )]
    pub requested_at: Option<OffsetDateTime>,
    /// Last scheduled run (RFC 3339): the next one is after it.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "time::serde::rfc3339::option"
    )]
    pub last_scheduled: Option<OffsetDateTime>,
    /// The last result per package.
    #[serde(default)]
    pub results: BTreeMap<String, ValidationResult>,
}

/// One validation run of one package on one DP.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ValidationResult {
    /// The request it answers.
    pub request: u64,
    /// The revision checked.
    pub revision: u32,
    /// Whether the run is over (else: progress so far).
    pub done: bool,
    /// Bytes re-hashed, and in all.
    pub bytes_checked: u64,
    /// Bytes of the revision.
    pub bytes_total: u64,
    /// Chunk occurrences re-hashed.
    pub chunks_checked: u64,
    /// Damaged chunks found, each with what became of it.
    #[serde(default)]
    pub damaged: Vec<DamageRecord>,
    /// When the DP reported it (RFC 3339).
    #[serde(with = "time::serde::rfc3339")]
    pub updated: OffsetDateTime,
}

/// One damaged chunk occurrence a DP found.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DamageRecord {
    /// File inside the package.
    pub path: String,
    /// Offset of the chunk in the file.
    pub offset: u64,
    /// Its length.
    pub len: u32,
    /// The chunk id (hex).
    pub chunk: String,
    /// Refetched and written in place.
    pub repaired: bool,
    /// Why it could not be repaired.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
}

/// A named set of DPs and the packages they all receive.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupRecord {
    /// Member DPs.
    pub members: BTreeSet<String>,
    /// Packages assigned to the group.
    pub packages: BTreeSet<String>,
}

/// Everything persisted.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registry {
    /// DPs by name.
    pub dps: BTreeMap<String, DpRecord>,
    /// Groups by name.
    pub groups: BTreeMap<String, GroupRecord>,
    /// Client tokens by name.
    #[serde(default)]
    pub clients: BTreeMap<String, ClientTokenRecord>,
}

impl Registry {
    /// Packages DP `name` must hold: its own and its groups'.
    pub fn assigned(&self, name: &str) -> BTreeSet<String> {
        let mut out = self
            .dps
            .get(name)
            .map(|d| d.packages.clone())
            .unwrap_or_default();
        for g in self.groups.values().filter(|g| g.members.contains(name)) {
            out.extend(g.packages.iter().cloned());
        }
        out
    }

    /// Groups DP `name` belongs to.
    pub fn groups_of(&self, name: &str) -> Vec<String> {
        self.groups
            .iter()
            .filter(|(_, g)| g.members.contains(name))
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Whether every DP that holds or must hold `package` has revision
    /// `target` installed (older revisions may then go).
    pub fn settled(&self, package: &str, target: u32) -> bool {
        self.holders(package).iter().all(|dp| {
            self.dps
                .get(dp)
                .and_then(|d| d.transfers.get(package))
                .is_none_or(|t| t.state.holds() && t.revision == target)
        })
    }

    /// DPs that hold or must hold `package`. A revoked DP is not one: the
    /// site no longer reaches it, so what it holds stops counting.
    pub fn holders(&self, package: &str) -> Vec<String> {
        self.dps
            .iter()
            .filter(|(n, d)| {
                d.revoked.is_none()
                    && (self.assigned(n).contains(package) || d.transfers.contains_key(package))
            })
            .map(|(n, _)| n.clone())
            .collect()
    }
}

/// A client token the site issued.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientTokenRecord {
    /// Its id (what revocation names).
    pub id: String,
    /// Issued at (Unix seconds).
    pub issued: i64,
    /// Expires at (Unix seconds); never when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<i64>,
    /// When it was revoked (RFC 3339).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "time::serde::rfc3339::option"
    )]
    pub revoked: Option<OffsetDateTime>,
}

/// The group range sessions use unless the operator gives one (inside
/// 239.255.0.0/16, the IPv4 local scope of RFC 2365).
pub const DEFAULT_GROUP: &str = "239.255.0.0/24";
/// The UDP ports sessions use unless the operator gives others.
pub const DEFAULT_PORTS: (u16, u16) = (63000, 64000);
/// Clients one session takes unless the operator says otherwise.
pub const DEFAULT_MAX_CLIENTS: u32 = 50;
/// Bytes per second a session sends at most by default: 100 Mbit/s.
pub const DEFAULT_RATE: u64 = 12_500_000;

/// A DP's multicast settings, as its record keeps them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DpMulticast {
    /// Whether the DP runs sessions (the settings are kept while it does
    /// not).
    pub enabled: bool,
    /// IPv4 group range, CIDR.
    pub group: String,
    /// First UDP port.
    pub port_first: u16,
    /// Last UDP port (inclusive).
    pub port_last: u16,
    /// Clients one session takes at most.
    pub max_clients: u32,
    /// Bytes per second a session sends at most.
    pub rate: u64,
    /// Seconds a session waits after its first client joined ...
    pub start_delay_secs: u64,
    /// ... unless this many clients joined first.
    pub min_clients: u32,
    /// IP time to live of the datagrams.
    pub ttl: u32,
    /// IPv4 address of the interface to send on (the routing table's
    /// choice when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
}

impl Default for DpMulticast {
    fn default() -> Self {
        Self {
            enabled: false,
            group: DEFAULT_GROUP.into(),
            port_first: DEFAULT_PORTS.0,
            port_last: DEFAULT_PORTS.1,
            max_clients: DEFAULT_MAX_CLIENTS,
            rate: DEFAULT_RATE,
            start_delay_secs: 0,
            min_clients: 1,
            ttl: 1,
            interface: None,
        }
    }
}
