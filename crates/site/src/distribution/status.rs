//! What operators see of distribution: DP rows, package × DP status rows,
//! and the dry-run cost of a distribution.

use std::collections::{BTreeSet, HashSet};

use ferry_core::units::bytes;
use ferry_core::ChunkId;
use ferry_store::Library;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::distribution::live::Connections;
use crate::distribution::records::{Registry, TransferState};
use crate::distribution::registry::Hub;
use crate::library::packages::{self, ImageError};

/// One DP as `ferry dp list` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DpView {
    /// Name.
    pub name: String,
    /// `waiting-enrollment`, `enrolled` or `revoked`.
    pub enrollment: String,
    /// Connected now.
    pub online: bool,
    /// Address it is (or was last) connected from.
    pub address: Option<String>,
    /// The largest UDP payload its connection carries now (path MTU
    /// discovery: 1,452 on Ethernet, up to `ferry_net::tls::MAX_DATAGRAM`
    /// with jumbo frames); absent when it is offline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_mtu: Option<u16>,
    /// Last time it was connected.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub last_contact: Option<OffsetDateTime>,
    /// Groups it belongs to.
    pub groups: Vec<String>,
    /// Packages it must hold.
    pub assigned: Vec<String>,
    /// Package revisions it holds whole.
    pub installed: Vec<Holding>,
    /// Chunk bytes sent to it (restarts of the site included).
    pub served_bytes: u64,
    /// Its disk as it last reported.
    pub disk: Option<crate::distribution::records::DiskRecord>,
    /// The names of its HTTPS listener for clients (empty: it serves none).
    #[serde(default)]
    pub client_names: Vec<String>,
    /// Whether it serves clients without a token.
    #[serde(default)]
    pub anonymous_clients: bool,
    /// Whether it is in maintenance (no transfer starts).
    #[serde(default)]
    pub maintenance: bool,
    /// Its rate limit in bytes per second, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<u64>,
    /// Its transfer windows (site time), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<String>,
    /// Whether it takes its content from prestage bundles only.
    #[serde(default)]
    pub prestaged: bool,
    /// The DPs it pulls its chunks from, by rank (empty: a push DP).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pull_from: Vec<crate::distribution::records::PullFrom>,
    /// Where it serves chunks to pull DPs, if it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_address: Option<String>,
    /// Its multicast settings (absent: never set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multicast: Option<crate::distribution::multicast::DpMulticast>,
    /// Its multicast sessions as it last reported them: running, then the
    /// recent ones that ended.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub multicast_sessions: Vec<ferry_mcast::SessionView>,
}

/// A package revision a DP holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holding {
    /// Package id.
    pub package: String,
    /// Revision.
    pub revision: u32,
}

/// The DP list.
pub fn dps(hub: &Hub, conns: &Connections) -> Vec<DpView> {
    let reg = hub.snapshot();
    reg.dps
        .values()
        .map(|d| DpView {
            name: d.name.clone(),
            enrollment: if d.revoked.is_some() {
                "revoked"
            } else if d.enrolled.is_some() {
                "enrolled"
            } else {
                "waiting-enrollment"
            }
            .into(),
            online: conns.is_online(&d.name),
            address: d.address.clone(),
            path_mtu: conns.path_mtu(&d.name),
            last_contact: d.last_contact,
            groups: reg.groups_of(&d.name),
            assigned: reg.assigned(&d.name).into_iter().collect(),
            installed: d
                .transfers
                .iter()
                .filter(|(_, t)| t.state.holds())
                .map(|(p, t)| Holding {
                    package: p.clone(),
                    revision: t.revision,
                })
                .collect(),
            served_bytes: hub.served_bytes(&d.name),
            disk: d.disk.clone(),
            client_names: d.client_names.clone(),
            anonymous_clients: d.anonymous_clients,
            maintenance: d.maintenance,
            rate: d.rate,
            window: d.window.clone(),
            prestaged: d.prestaged,
            pull_from: d.pull_from.clone(),
            peer_address: d.peer_address.clone(),
            multicast: d.multicast.clone(),
            multicast_sessions: d.multicast_sessions.clone(),
        })
        .collect()
}

/// One package on one DP.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusRow {
    /// Package id.
    pub package: String,
    /// Package name.
    pub name: String,
    /// DP name.
    pub dp: String,
    /// The revision the DP must hold (none when it is being removed).
    pub revision: Option<u32>,
    /// `pending`, `in-progress`, `installed`, `validating`, `failed`,
    /// `removing`, or `revoked` (the DP's; not counted as distributed).
    pub state: String,
    /// Revision the DP holds now, when it is an older one.
    pub holds_revision: Option<u32>,
    /// Chunk bytes needed for the revision (as the DP planned it).
    pub bytes_needed: u64,
    /// Of those, received.
    pub bytes_done: u64,
    /// What a full copy costs.
    pub full_bytes: u64,
    /// UDP bytes received at the DP for this revision.
    pub wire_bytes: u64,
    /// Bytes the DP copied from files it held (no network).
    #[serde(default)]
    pub bytes_local: u64,
    /// Bytes of the signed manifest the DP received for this revision.
    #[serde(default)]
    pub manifest_bytes: u64,
    /// The package's last validation on the DP (progress while
    /// `validating`).
    #[serde(default)]
    pub validation: Option<crate::distribution::records::ValidationResult>,
    /// Percent of `bytes_needed` received (in progress).
    pub percent: Option<u64>,
    /// Estimated seconds left (in progress).
    pub eta_secs: Option<u64>,
    /// Bytes per second received since the transfer started (in progress).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_bps: Option<u64>,
    /// Why it failed.
    pub error: Option<String>,
    /// When the DP tries again.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub next_retry: Option<OffsetDateTime>,
    /// The DP's last contact.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub last_contact: Option<OffsetDateTime>,
    /// Whether the DP is connected.
    pub online: bool,
    /// Whether the DP is in maintenance: what it does not hold yet waits.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub maintenance: bool,
    /// A transfer window of the DP is closed: its transfer waits until
    /// then (in progress or pending).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "time::serde::rfc3339::option"
    )]
    pub paused_until: Option<OffsetDateTime>,
    /// The same in the site's local time, as an operator reads it
    /// ("13:00", "Mon 08:00").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused_until_site: Option<String>,
    /// The DP takes its content from prestage bundles only: what it lacks
    /// waits for one (`ferry content prestage`, `ferry dp prestage`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub waits_for_prestage: bool,
    /// Where the transfer's chunk bytes came from: `site` or a source DP
    /// (a pull DP), with the bytes from each.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sources: Vec<crate::distribution::records::SourceBytes>,
    /// A pull DP waiting for this source DP to get the revision first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting_for: Option<String>,
    /// The DP's multicast sessions of this package: those running, and
    /// the last that ended.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub multicast: Vec<ferry_mcast::SessionView>,
    /// What stands in the way of the package's multicast settings on this
    /// DP (a multicast-only package on a DP that runs no sessions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multicast_warning: Option<String>,
}

impl StatusRow {
    /// The state as an operator reads it, with why it waits or failed:
    /// "pending (holds r1; DP in maintenance)", "failed: … (retry in 2 min)",
    /// "installed, validated".
    pub fn describe(&self) -> String {
        match self.state.as_str() {
            s @ ("in-progress" | "pending") if self.waits_for_prestage => {
                format!("{s}, waiting for a prestage bundle")
            }
            "pending" if self.waiting_for.is_some() => format!(
                "pending, waiting for {} to get it first",
                self.waiting_for.as_deref().unwrap_or_default()
            ),
            s @ ("in-progress" | "pending") if self.paused_until_site.is_some() => format!(
                "{s}, paused until {} (site time)",
                self.paused_until_site.as_deref().unwrap_or_default()
            ),
            "failed" => format!(
                "failed: {}{}",
                self.error.clone().unwrap_or_default(),
                self.next_retry
                    .map(|n| format!(" (retry {})", crate::human::ago(n)))
                    .unwrap_or_default()
            ),
            "pending" => match (self.holds_revision, self.maintenance) {
                (Some(h), true) => format!("pending (holds r{h}; DP in maintenance)"),
                (None, true) => "pending (DP in maintenance)".into(),
                (Some(h), false) => format!("pending (holds r{h})"),
                (None, false) => "pending".into(),
            },
            "installed" => match self.validation.as_ref().filter(|v| v.done) {
                Some(v) if v.damaged.is_empty() => "installed, validated".into(),
                Some(v) => {
                    let fixed = v.damaged.iter().filter(|d| d.repaired).count();
                    format!(
                        "installed, {} damaged chunk(s) found, {fixed} repaired",
                        v.damaged.len()
                    )
                }
                None => "installed".into(),
            },
            s => s.to_string(),
        }
    }

    /// How far along: "42% 12 MiB/30 MiB eta 3m05s", "100%",
    /// "validating 40%", or "-".
    pub fn progress(&self) -> String {
        match (self.state.as_str(), self.percent) {
            ("in-progress", Some(p)) => format!(
                "{p}% {}/{}{}",
                bytes(self.bytes_done),
                bytes(self.bytes_needed),
                self.eta_secs
                    .map(|s| format!(" eta {}", crate::human::eta(s)))
                    .unwrap_or_default()
            ),
            ("installed", _) => "100%".into(),
            ("validating", Some(p)) => format!("validating {p}%"),
            _ => "-".into(),
        }
    }

    /// Bytes received, and where they came from when the DP said: "12 MiB
    /// from dp3", "60 MiB from dp3 + site".
    pub fn received(&self) -> String {
        if self.sources.is_empty() {
            return bytes(self.bytes_done);
        }
        let from: Vec<&str> = self.sources.iter().map(|s| s.source.as_str()).collect();
        format!("{} from {}", bytes(self.bytes_done), from.join(" + "))
    }
}

fn seconds_since(t: OffsetDateTime) -> f64 {
    (OffsetDateTime::now_utc() - t).as_seconds_f64()
}

/// Status rows for every package × DP, optionally only one package or DP.
pub fn rows(
    hub: &Hub,
    conns: &Connections,
    lib: &Library,
    package: Option<&str>,
    dp: Option<&str>,
) -> Result<Vec<StatusRow>, ImageError> {
    let reg = hub.snapshot();
    if let Some(p) = package {
        packages::record(lib, p)?;
    }
    let mut out = Vec::new();
    /// What the rows need of a package's record.
    #[derive(Clone)]
    struct Rec {
        name: String,
        target: Option<u32>,
        multicast_only: bool,
    }
    // Each package's record, read once for all its rows.
    let mut records: std::collections::BTreeMap<String, Option<Rec>> = Default::default();
    for d in reg.dps.values() {
        if dp.is_some_and(|n| n != d.name) {
            continue;
        }
        let assigned = reg.assigned(&d.name);
        let mut packages: BTreeSet<String> = assigned.clone();
        packages.extend(d.transfers.keys().cloned());
        for p in packages {
            if package.is_some_and(|q| q != p) {
                continue;
            }
            let rec = records
                .entry(p.clone())
                .or_insert_with(|| {
                    packages::record(lib, &p).ok().map(|r| Rec {
                        name: r.name.clone(),
                        target: r.target(),
                        multicast_only: r.multicast.only,
                    })
                })
                .clone();
            let want = assigned
                .contains(&p)
                .then(|| rec.as_ref().and_then(|r| r.target))
                .flatten();
            let t = d.transfers.get(&p);
            let only = rec.as_ref().is_some_and(|r| r.multicast_only);
            let mut sessions: Vec<ferry_mcast::SessionView> = Vec::new();
            let mut ended = false;
            for v in d.multicast_sessions.iter().filter(|v| v.package == p) {
                // Running first, then the newest that ended.
                if v.ended.is_none() || !std::mem::replace(&mut ended, true) {
                    sessions.push(v.clone());
                }
            }
            let runs_sessions = d.multicast.as_ref().is_some_and(|m| m.enabled);
            let mut row = StatusRow {
                package: p.clone(),
                name: rec.map(|r| r.name).unwrap_or_default(),
                dp: d.name.clone(),
                revision: want,
                state: "pending".into(),
                holds_revision: None,
                bytes_needed: 0,
                bytes_done: 0,
                full_bytes: 0,
                wire_bytes: 0,
                bytes_local: 0,
                manifest_bytes: 0,
                validation: d.validation.results.get(&p).cloned(),
                percent: None,
                eta_secs: None,
                rate_bps: None,
                error: None,
                next_retry: None,
                last_contact: d.last_contact,
                online: conns.is_online(&d.name),
                maintenance: d.maintenance,
                paused_until: None,
                paused_until_site: None,
                waits_for_prestage: false,
                sources: Vec::new(),
                waiting_for: None,
                multicast: sessions,
                multicast_warning: (only && !runs_sessions && want.is_some()).then(|| {
                    format!(
                        "{p} is multicast-only, but {} runs no multicast sessions: its clients get nothing (ferry dp multicast {} --enable)",
                        d.name, d.name
                    )
                }),
            };
            if d.revoked.is_some() {
                // Not reached any more, and not counted as distributed.
                row.state = "revoked".into();
                out.push(row);
                continue;
            }
            match (want, t) {
                (None, _) => row.state = "removing".into(),
                (Some(w), Some(t)) if t.revision == w => {
                    row.state = serde_json::to_value(t.state)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_string))
                        .unwrap_or_default();
                    row.bytes_needed = t.bytes_needed;
                    row.bytes_done = t.bytes_done;
                    row.full_bytes = t.full_bytes;
                    row.wire_bytes = t.wire_bytes;
                    row.bytes_local = t.bytes_local;
                    row.manifest_bytes = t.manifest_bytes;
                    row.error = t.error.clone();
                    row.next_retry = t.next_retry;
                    row.sources = t.sources.clone();
                    row.waiting_for = t.waiting_for.clone();
                    if t.state == TransferState::Validating {
                        row.percent = row.validation.as_ref().map(|v| {
                            (v.bytes_checked.saturating_mul(100))
                                .checked_div(v.bytes_total)
                                .unwrap_or(0)
                                .min(100)
                        });
                    }
                    if t.state == TransferState::InProgress {
                        row.percent = Some(
                            (t.bytes_done.saturating_mul(100))
                                .checked_div(t.bytes_needed)
                                .unwrap_or(100)
                                .min(100),
                        );
                        let elapsed = t.started.map(seconds_since);
                        if let Some(el) = elapsed.filter(|&e| e > 0.5 && t.bytes_done > 0) {
                            let rate = t.bytes_done as f64 / el;
                            let left = t.bytes_needed.saturating_sub(t.bytes_done) as f64;
                            row.eta_secs = Some((left / rate).ceil() as u64);
                            row.rate_bps = Some(rate as u64);
                        }
                    }
                }
                (Some(_), Some(t)) => {
                    if t.state.holds() {
                        row.holds_revision = Some(t.revision);
                    }
                }
                (Some(_), None) => {}
            }
            if matches!(row.state.as_str(), "in-progress" | "pending") && d.prestaged {
                row.waits_for_prestage = true;
            } else if matches!(row.state.as_str(), "in-progress" | "pending") {
                let pacer = conns.pacer(&d.name);
                if let (Some(until), Some(w)) = (pacer.closed_until(), pacer.windows()) {
                    row.paused_until = Some(until);
                    row.paused_until_site = Some(w.clock_at(until, OffsetDateTime::now_utc()));
                }
            }
            out.push(row);
        }
    }
    Ok(out)
}

/// What distributing a package would cost one DP.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Need {
    /// DP name.
    pub dp: String,
    /// Bytes the DP still needs: chunks of the revision that none of the
    /// revisions it has installed contains. Chunks of an interrupted
    /// transfer are not known to the site, so this is an upper bound.
    pub needed_bytes: u64,
    /// What a full copy costs.
    pub full_bytes: u64,
}

/// The chunks DP `dp` holds: those of every revision it reported
/// installed (a transfer copies them from its own files).
pub(crate) fn held_chunks(
    reg: &Registry,
    lib: &Library,
    dp: &str,
) -> Result<HashSet<ChunkId>, ferry_store::StoreError> {
    let mut have: HashSet<ChunkId> = HashSet::new();
    if let Some(d) = reg.dps.get(dp) {
        for (p, t) in &d.transfers {
            if t.state.holds() {
                for m in lib.manifests(p, t.revision)? {
                    have.extend(m.chunks.iter().map(|c| c.id));
                }
            }
        }
    }
    Ok(have)
}

/// The cost for each DP of holding the latest revision of `package`.
pub fn needs(
    reg: &Registry,
    lib: &Library,
    package: &str,
    dps: &[String],
) -> Result<(u32, Vec<Need>), ImageError> {
    let rec = packages::record(lib, package)?;
    let rev = rec.latest().map_or(1, |r| r.revision);
    let manifests = lib.manifests(package, rev)?;
    let mut out = Vec::new();
    for dp in dps {
        let have = held_chunks(reg, lib, dp)?;
        let plan = ferry_core::sync::plan::<()>(&manifests, |id| Ok(have.contains(id)))
            .unwrap_or_default();
        out.push(Need {
            dp: dp.clone(),
            needed_bytes: plan.needed_bytes,
            full_bytes: plan.full_bytes,
        });
    }
    Ok((rev, out))
}
