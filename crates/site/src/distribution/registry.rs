//! What the site knows about its distribution points: enrollment, groups,
//! assignments, and the last state each DP reported per package.
//!
//! The site is the source of truth for what each DP should hold: a DP's
//! assignment is its own packages plus those of every group it belongs to,
//! each at the package's latest revision. The registry lives in the site's
//! RocksDB (the library's `state` column family): one record per DP and per
//! group, written in one synced batch per change. [`Hub`] keeps it in
//! memory with a lock, a change signal for connected DPs, and what is only
//! true while the site runs (who is online), and a counter of bytes served
//! per DP. A DP's progress reports and bytes served change memory only; its
//! record (with both) is written when a transfer's state, revision or error
//! changes, and for every DP when the site stops.
//! A `registry.json` of an earlier release is moved in on first start.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

pub use crate::now;
use ferry_store::Library;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// File name of the registry of earlier releases inside the data folder;
/// moved into the library on first start, then renamed to
/// [`MIGRATED_REGISTRY_FILE`].
pub const REGISTRY_FILE: &str = "registry.json";
/// What an earlier release's registry file is renamed to once moved in.
pub const MIGRATED_REGISTRY_FILE: &str = "registry.json.migrated";
/// Key prefixes of the records in the library's state.
const DP_PREFIX: &[u8] = b"dp/";
const GROUP_PREFIX: &[u8] = b"group/";
const CLIENT_PREFIX: &[u8] = b"client/";
/// Longest DP or group name.
pub const MAX_NAME_LEN: usize = 64;

/// Why a registry operation failed. The text is shown to operators.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// No DP of that name.
    #[error("there is no DP named {0:?} (see `ferry dp list`)")]
    NoDp(String),
    /// No group of that name.
    #[error("there is no group named {0:?} (create it with `ferry group create {0}`)")]
    NoGroup(String),
    /// No client token of that name.
    #[error("there is no client token named {0:?} (see `ferry client token list`)")]
    NoClientToken(String),
    /// The name is taken.
    #[error("{what} {name:?} exists already")]
    Exists {
        /// "DP" or "group".
        what: &'static str,
        /// The name.
        name: String,
    },
    /// The name has characters or a length Ferry does not allow.
    #[error("{0:?} is not a valid name: use 1 to 64 letters, digits, '.', '-' or '_'")]
    BadName(String),
    /// The operation does not fit the DP's state.
    #[error("{0}")]
    Conflict(String),
    /// A setting the operator gave cannot be used.
    #[error("{0}")]
    Invalid(String),
    /// The registry file could not be read or written.
    #[error("registry {path}: {detail}")]
    Storage {
        /// The file.
        path: PathBuf,
        /// What failed.
        detail: String,
    },
}

impl HubError {
    /// Whether the operator's input is at fault (not the site).
    pub fn is_input(&self) -> bool {
        !matches!(self, Self::Storage { .. })
    }
}

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

/// Why a DP's certificate does not let it in.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Unknown {
    /// No enrolled DP holds it.
    #[error("certificate not issued to any enrolled DP")]
    NotIssued,
    /// Its DP was revoked.
    #[error("DP {dp} was revoked at {at}")]
    Revoked {
        /// The DP.
        dp: String,
        /// When.
        at: String,
    },
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_retry: Option<String>,
    /// When the transfer of this revision started (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started: Option<String>,
    /// When the report arrived (RFC 3339).
    pub updated: String,
}

/// One distribution point.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DpRecord {
    /// Its name (the subject of its certificate).
    pub name: String,
    /// When `ferry dp add` created it.
    pub created: String,
    /// When it enrolled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enrolled: Option<String>,
    /// Fingerprint of the certificate issued at enrollment; only that
    /// certificate is accepted for this DP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_fingerprint: Option<String>,
    /// When it was revoked; it is refused from then on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked: Option<String>,
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_contact: Option<String>,
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
    /// The names in the certificate of its HTTPS listener, as last issued.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub client_names: Vec<String>,
    /// Its multicast settings (`ferry dp multicast`), kept while off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multicast: Option<crate::multicast::DpMulticast>,
    /// Its multicast sessions as it last reported them: running, then
    /// recently ended.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub multicast_sessions: Vec<ferry_mcast::SessionView>,
}

/// A DP's disk as it reported it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskRecord {
    /// Allocated bytes of its data and content folders.
    pub used_bytes: u64,
    /// Free bytes on the content folder's filesystem.
    pub free_bytes: u64,
    /// Size of that filesystem.
    pub total_bytes: u64,
    /// When it reported them (RFC 3339).
    pub updated: String,
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_at: Option<String>,
    /// Last scheduled run (RFC 3339): the next one is after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scheduled: Option<String>,
    /// The last result per package.
    #[serde(default)]
    pub results: BTreeMap<String, ValidationResult>,
}

/// One validation run of one package on one DP.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
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
    pub updated: String,
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
    pub clients: BTreeMap<String, crate::clients::ClientTokenRecord>,
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

/// A DP connected right now.
#[derive(Clone, Debug)]
pub struct Online {
    /// Its address.
    pub address: String,
    /// Since when (RFC 3339).
    pub since: String,
    /// The connection, closed when the DP is revoked.
    pub conn: quinn::Connection,
}

/// The registry with its lock, change signal and live state.
pub struct Hub {
    lib: Arc<Library>,
    reg: Mutex<Registry>,
    /// DPs whose in-memory record has progress not written yet.
    unsaved: Mutex<BTreeSet<String>>,
    changed: watch::Sender<u64>,
    online: Mutex<HashMap<String, Online>>,
    served: Mutex<HashMap<String, Arc<AtomicU64>>>,
}

pub(crate) fn check_name(name: &str) -> Result<(), HubError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(HubError::BadName(name.to_string()))
    }
}

/// BLAKE3 of an enrollment secret, hex.
pub fn token_hash(secret: &str) -> String {
    blake3::hash(secret.as_bytes()).to_hex().to_string()
}

impl Hub {
    /// Opens the registry kept in `lib`; a `DIR/registry.json` of an
    /// earlier release is moved in first (when the library holds none).
    /// A record that cannot be read is reported and skipped, never hiding
    /// the others.
    pub fn open(data: &Path, lib: Arc<Library>) -> Result<Self, HubError> {
        let hub = Self {
            lib,
            reg: Mutex::new(Registry::default()),
            unsaved: Mutex::new(BTreeSet::new()),
            changed: watch::channel(0).0,
            online: Mutex::new(HashMap::new()),
            served: Mutex::new(HashMap::new()),
        };
        let old = data.join(REGISTRY_FILE);
        let mut reg = hub.read_records()?;
        if reg.dps.is_empty() && reg.groups.is_empty() && old.exists() {
            let bytes = std::fs::read(&old).map_err(|e| HubError::Storage {
                path: old.clone(),
                detail: e.to_string(),
            })?;
            reg = serde_json::from_slice(&bytes).map_err(|e| HubError::Storage {
                path: old.clone(),
                detail: format!("not a valid registry: {e}"),
            })?;
            hub.save(&Registry::default(), &reg, &BTreeSet::new())?;
            tracing::info!(
                dps = reg.dps.len(),
                groups = reg.groups.len(),
                from = %old.display(),
                "registry moved into the site's library"
            );
        }
        if old.exists() {
            let to = data.join(MIGRATED_REGISTRY_FILE);
            std::fs::rename(&old, &to)
                .and_then(|()| std::fs::File::open(data)?.sync_all())
                .map_err(|e| HubError::Storage {
                    path: old.clone(),
                    detail: format!("moved in, but cannot rename it to {}: {e}", to.display()),
                })?;
        }
        // Bytes served go on from what the records hold.
        *hub.served.lock().unwrap_or_else(|p| p.into_inner()) = reg
            .dps
            .iter()
            .map(|(name, d)| (name.clone(), Arc::new(AtomicU64::new(d.served_bytes))))
            .collect();
        *hub.reg.lock().unwrap_or_else(|p| p.into_inner()) = reg;
        Ok(hub)
    }

    pub(crate) fn storage(&self, detail: impl std::fmt::Display) -> HubError {
        HubError::Storage {
            path: self.lib.path().to_path_buf(),
            detail: detail.to_string(),
        }
    }

    fn read_records(&self) -> Result<Registry, HubError> {
        fn read<T: serde::de::DeserializeOwned>(
            hub: &Hub,
            prefix: &[u8],
            what: &str,
        ) -> Result<BTreeMap<String, T>, HubError> {
            let mut out = BTreeMap::new();
            for (k, v) in hub.lib.state(prefix).map_err(|e| hub.storage(e))? {
                let name = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
                match serde_json::from_slice(&v) {
                    Ok(rec) => {
                        out.insert(name, rec);
                    }
                    Err(e) => tracing::error!(
                        %name,
                        error = %e,
                        library = %hub.lib.path().display(),
                        "skipping an unreadable {what} record of the registry"
                    ),
                }
            }
            Ok(out)
        }
        Ok(Registry {
            dps: read(self, DP_PREFIX, "DP")?,
            groups: read(self, GROUP_PREFIX, "group")?,
            clients: read(self, CLIENT_PREFIX, "client token")?,
        })
    }

    /// Writes the records that differ between `old` and `new`, and those
    /// of the DPs in `also`, in one synced batch.
    fn save(
        &self,
        old: &Registry,
        new: &Registry,
        also: &BTreeSet<String>,
    ) -> Result<(), HubError> {
        fn diff<T: Serialize + PartialEq>(
            prefix: &[u8],
            old: &BTreeMap<String, T>,
            new: &BTreeMap<String, T>,
            also: &BTreeSet<String>,
            out: &mut Vec<ferry_store::StateChange>,
        ) -> Result<(), serde_json::Error> {
            let key = |name: &str| [prefix, name.as_bytes()].concat();
            for (name, rec) in new {
                if old.get(name) != Some(rec) || also.contains(name) {
                    out.push((key(name), Some(serde_json::to_vec(rec)?)));
                }
            }
            for name in old.keys().filter(|n| !new.contains_key(*n)) {
                out.push((key(name), None));
            }
            Ok(())
        }
        let mut changes = Vec::new();
        diff(DP_PREFIX, &old.dps, &new.dps, also, &mut changes)
            .and_then(|()| {
                diff(
                    GROUP_PREFIX,
                    &old.groups,
                    &new.groups,
                    &BTreeSet::new(),
                    &mut changes,
                )
            })
            .and_then(|()| {
                diff(
                    CLIENT_PREFIX,
                    &old.clients,
                    &new.clients,
                    &BTreeSet::new(),
                    &mut changes,
                )
            })
            .map_err(|e| self.storage(e))?;
        self.lib.write_state(&changes).map_err(|e| self.storage(e))
    }

    /// Runs `f` on a copy of the registry and keeps the result only if it
    /// succeeds and is saved; signals connected DPs when `notify`.
    pub(crate) fn update<T>(
        &self,
        notify: bool,
        f: impl FnOnce(&mut Registry) -> Result<T, HubError>,
    ) -> Result<T, HubError> {
        let mut reg = self.reg.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = reg.clone();
        let out = f(&mut next)?;
        if next != *reg {
            // A changed DP's record is written whole, progress that was
            // only in memory included.
            let mut unsaved = self.unsaved.lock().unwrap_or_else(|p| p.into_inner());
            self.save(&reg, &next, &unsaved)?;
            unsaved.clear();
            *reg = next;
            if notify {
                self.changed.send_modify(|n| *n += 1);
            }
        }
        Ok(out)
    }

    /// Changes DP `dp`'s record with `f`; writes it (synced) when `f` says
    /// the change must last, else keeps it in memory until the next write
    /// or [`Self::flush`]. `Ok(None)` for an unknown DP.
    pub(crate) fn update_dp<T>(
        &self,
        dp: &str,
        f: impl FnOnce(&mut DpRecord) -> (bool, T),
    ) -> Result<Option<T>, HubError> {
        let mut reg = self.reg.lock().unwrap_or_else(|p| p.into_inner());
        let Some(d) = reg.dps.get_mut(dp) else {
            return Ok(None);
        };
        let mut next = d.clone();
        let (lasting, out) = f(&mut next);
        let mut unsaved = self.unsaved.lock().unwrap_or_else(|p| p.into_inner());
        if lasting {
            next.served_bytes = self.served_bytes(dp);
            let change = self.dp_change(dp, &next)?;
            self.lib
                .write_state(&[change])
                .map_err(|e| self.storage(e))?;
            unsaved.remove(dp);
        } else if next != *d {
            unsaved.insert(dp.to_string());
        }
        *d = next;
        Ok(Some(out))
    }

    /// The write of DP `name`'s record.
    fn dp_change(&self, name: &str, rec: &DpRecord) -> Result<ferry_store::StateChange, HubError> {
        let v = serde_json::to_vec(rec).map_err(|e| self.storage(e))?;
        Ok(([DP_PREFIX, name.as_bytes()].concat(), Some(v)))
    }

    /// Writes every DP record whose progress or bytes served changed only
    /// in memory (at shutdown).
    pub fn flush(&self) -> Result<(), HubError> {
        let mut reg = self.reg.lock().unwrap_or_else(|p| p.into_inner());
        let mut unsaved = self.unsaved.lock().unwrap_or_else(|p| p.into_inner());
        let mut changes = Vec::new();
        for (dp, rec) in reg.dps.iter_mut() {
            let served = self.served_bytes(dp);
            if unsaved.contains(dp) || rec.served_bytes != served {
                rec.served_bytes = served;
                changes.push(self.dp_change(dp, rec)?);
            }
        }
        self.lib
            .write_state(&changes)
            .map_err(|e| self.storage(e))?;
        unsaved.clear();
        Ok(())
    }

    /// Whether DP `dp` holds or is assigned `package` (what a report may
    /// be about), without copying the registry.
    pub fn concerns(&self, dp: &str, package: &str) -> bool {
        let reg = self.reg.lock().unwrap_or_else(|p| p.into_inner());
        reg.dps
            .get(dp)
            .is_some_and(|d| d.transfers.contains_key(package))
            || reg.assigned(dp).contains(package)
    }

    /// A copy of the registry.
    pub fn snapshot(&self) -> Registry {
        self.reg.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// A receiver that wakes when any assignment changes.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Creates DP `name` with a fresh one-time enrollment secret, which is
    /// returned (only its hash is kept). With `reissue`, a DP that never
    /// finished enrolling gets a new secret instead; the old one stops
    /// working.
    pub fn add_dp(&self, name: &str, reissue: bool) -> Result<String, HubError> {
        check_name(name)?;
        let secret = ferry_net::pki::random_token().map_err(|e| self.storage(e))?;
        let hash = token_hash(&secret);
        self.update(false, |r| {
            match r.dps.get_mut(name) {
                Some(d) if d.revoked.is_some() => {
                    return Err(HubError::Conflict(format!(
                        "DP {name} is revoked: `ferry dp remove {name}` frees the name"
                    )))
                }
                Some(d) if d.enrolled.is_some() => {
                    return Err(HubError::Conflict(format!(
                        "DP {name} exists and is enrolled: a new token needs `ferry dp revoke {name}` and `ferry dp remove {name}` first"
                    )))
                }
                Some(d) if reissue => d.token_hash = Some(hash),
                Some(_) => {
                    return Err(HubError::Conflict(format!(
                        "DP {name} exists and waits for enrollment: `ferry dp add {name} --reissue` prints a new token (the old one stops working)"
                    )))
                }
                None if reissue => return Err(HubError::NoDp(name.to_string())),
                None => {
                    r.dps.insert(
                        name.to_string(),
                        DpRecord {
                            name: name.to_string(),
                            created: now(),
                            token_hash: Some(hash),
                            ..DpRecord::default()
                        },
                    );
                }
            }
            Ok(())
        })?;
        Ok(secret)
    }

    /// The DP an unused enrollment secret belongs to, if any (not revoked).
    pub fn token_owner(&self, secret: &str) -> Option<String> {
        let hash = token_hash(secret);
        let reg = self.reg.lock().unwrap_or_else(|p| p.into_inner());
        reg.dps
            .values()
            .find(|d| {
                d.revoked.is_none()
                    && d.token_hash
                        .as_deref()
                        .is_some_and(|h| constant_eq(h.as_bytes(), hash.as_bytes()))
            })
            .map(|d| d.name.clone())
    }

    /// Uses up the secret of DP `name` and records the certificate issued
    /// to it. `false` when the secret was used (or revoked) meanwhile.
    pub fn enroll(&self, name: &str, secret: &str, fingerprint: &str) -> Result<bool, HubError> {
        let hash = token_hash(secret);
        self.update(true, |r| {
            let Some(d) = r.dps.get_mut(name) else {
                return Ok(false);
            };
            let valid = d.revoked.is_none()
                && d.token_hash
                    .as_deref()
                    .is_some_and(|h| constant_eq(h.as_bytes(), hash.as_bytes()));
            if valid {
                d.token_hash = None;
                d.enrolled = Some(now());
                d.cert_fingerprint = Some(fingerprint.to_string());
            }
            Ok(valid)
        })
    }

    /// Wakes every connected DP to recompute its assignments (after a new
    /// revision or a removed package).
    pub fn notify(&self) {
        self.changed.send_modify(|n| *n += 1);
    }

    /// Revokes `name`: its certificate and any unused token stop working,
    /// and its live connection is closed.
    pub fn revoke(&self, name: &str) -> Result<(), HubError> {
        self.update(true, |r| {
            let d = r
                .dps
                .get_mut(name)
                .ok_or_else(|| HubError::NoDp(name.into()))?;
            if d.revoked.is_none() {
                d.revoked = Some(now());
            }
            d.token_hash = None;
            Ok(())
        })?;
        if let Some(o) = self
            .online
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name)
        {
            o.conn
                .close(CLOSE_REVOKED.into(), b"this DP was revoked by the site");
        }
        Ok(())
    }

    /// Deletes DP `name`'s record: its assignments, status rows and
    /// membership of groups go, its certificate stops being accepted, and
    /// the name may be added again. Refused while it is connected unless
    /// `force` (then its connection is closed).
    pub fn remove_dp(&self, name: &str, force: bool) -> Result<(), HubError> {
        let online = self.online(name);
        if let (Some(o), false) = (&online, force) {
            return Err(HubError::Conflict(format!(
                "DP {name} is online (connected from {} since {}): `ferry dp revoke {name}` first, or `ferry dp remove {name} --force`",
                o.address, o.since
            )));
        }
        self.update(true, |r| {
            if r.dps.remove(name).is_none() {
                return Err(HubError::NoDp(name.into()));
            }
            for g in r.groups.values_mut() {
                g.members.remove(name);
            }
            Ok(())
        })?;
        self.unsaved
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        self.served
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        if let Some(o) = self
            .online
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name)
        {
            o.conn
                .close(CLOSE_REVOKED.into(), b"this DP was removed by the site");
        }
        Ok(())
    }

    /// Drops every mention of a removed package: assignments and rows
    /// (of revoked DPs: nobody else may hold one when it is removed) and
    /// group assignments.
    pub fn forget_package(&self, package: &str) -> Result<(), HubError> {
        self.update(true, |r| {
            for d in r.dps.values_mut() {
                d.packages.remove(package);
                d.transfers.remove(package);
                d.validation.results.remove(package);
            }
            for g in r.groups.values_mut() {
                g.packages.remove(package);
            }
            Ok(())
        })
    }

    /// The DP a certificate belongs to: `Ok(name)`, or `Err(reason)` for a
    /// certificate that is not (or no longer) accepted.
    pub fn identify(&self, fingerprint: &str) -> Result<String, Unknown> {
        let reg = self.reg.lock().unwrap_or_else(|p| p.into_inner());
        let d = reg
            .dps
            .values()
            .find(|d| d.cert_fingerprint.as_deref() == Some(fingerprint))
            .ok_or(Unknown::NotIssued)?;
        match &d.revoked {
            Some(when) => Err(Unknown::Revoked {
                dp: d.name.clone(),
                at: when.clone(),
            }),
            None => Ok(d.name.clone()),
        }
    }

    /// Creates an empty group.
    pub fn create_group(&self, group: &str) -> Result<(), HubError> {
        check_name(group)?;
        self.update(false, |r| {
            if r.groups.contains_key(group) {
                return Err(HubError::Exists {
                    what: "group",
                    name: group.into(),
                });
            }
            r.groups.insert(group.into(), GroupRecord::default());
            Ok(())
        })
    }

    /// Adds DPs to a group; they receive the group's packages from then on.
    pub fn add_members(&self, group: &str, dps: &[String]) -> Result<(), HubError> {
        self.update(true, |r| {
            for d in dps {
                if !r.dps.contains_key(d) {
                    return Err(HubError::NoDp(d.clone()));
                }
            }
            let g = r
                .groups
                .get_mut(group)
                .ok_or_else(|| HubError::NoGroup(group.into()))?;
            g.members.extend(dps.iter().cloned());
            Ok(())
        })
    }

    /// Removes DPs from a group: the group's packages are no longer
    /// theirs (unless assigned to them otherwise). All or none: a DP that is
    /// not a member is named.
    pub fn remove_members(&self, group: &str, dps: &[String]) -> Result<(), HubError> {
        self.update(true, |r| {
            let g = r
                .groups
                .get_mut(group)
                .ok_or_else(|| HubError::NoGroup(group.into()))?;
            if let Some(d) = dps.iter().find(|d| !g.members.contains(*d)) {
                return Err(HubError::Conflict(format!("{d} is not in group {group}")));
            }
            for d in dps {
                g.members.remove(d);
            }
            Ok(())
        })
    }

    /// Deletes a group, refused while packages are assigned to it (their
    /// DPs would lose them unasked).
    pub fn delete_group(&self, group: &str) -> Result<(), HubError> {
        self.update(true, |r| {
            let g = r
                .groups
                .get(group)
                .ok_or_else(|| HubError::NoGroup(group.into()))?;
            if let Some(p) = g.packages.iter().next() {
                return Err(HubError::Conflict(format!(
                    "group {group} has packages assigned ({}): `ferry undistribute {p} --group {group}` first",
                    g.packages.iter().cloned().collect::<Vec<_>>().join(", ")
                )));
            }
            r.groups.remove(group);
            Ok(())
        })
    }

    /// Assigns `package` to DPs and groups.
    pub fn distribute(
        &self,
        package: &str,
        dps: &[String],
        groups: &[String],
    ) -> Result<(), HubError> {
        self.update(true, |r| {
            for d in dps {
                let rec = r.dps.get_mut(d).ok_or_else(|| HubError::NoDp(d.clone()))?;
                if rec.revoked.is_some() {
                    return Err(HubError::Conflict(format!(
                        "DP {d} is revoked; it receives nothing"
                    )));
                }
                rec.packages.insert(package.to_string());
            }
            for g in groups {
                r.groups
                    .get_mut(g)
                    .ok_or_else(|| HubError::NoGroup(g.clone()))?
                    .packages
                    .insert(package.to_string());
            }
            Ok(())
        })
    }

    /// Asks each of `dps` to rebuild its copy of `package` from scratch
    /// (every chunk fetched again from the site). Each must be assigned the
    /// package and not revoked; all or none.
    pub fn redistribute(&self, package: &str, dps: &[String]) -> Result<(), HubError> {
        self.update(true, |r| {
            for d in dps {
                let assigned = r.assigned(d).contains(package);
                let rec = r.dps.get_mut(d).ok_or_else(|| HubError::NoDp(d.clone()))?;
                if rec.revoked.is_some() {
                    return Err(HubError::Conflict(format!("DP {d} is revoked")));
                }
                if !assigned {
                    return Err(HubError::Conflict(format!(
                        "{package} is not distributed to {d}: `ferry distribute {package} --dp {d}` sends it"
                    )));
                }
                *rec.rebuilds.entry(package.to_string()).or_default() += 1;
            }
            Ok(())
        })
    }

    /// Takes `package` away from DPs and groups. A DP that still receives it
    /// through a group is an error naming the group.
    pub fn undistribute(
        &self,
        package: &str,
        dps: &[String],
        groups: &[String],
    ) -> Result<(), HubError> {
        self.update(true, |r| {
            for g in groups {
                r.groups
                    .get_mut(g)
                    .ok_or_else(|| HubError::NoGroup(g.clone()))?
                    .packages
                    .remove(package);
            }
            for d in dps {
                r.dps
                    .get_mut(d)
                    .ok_or_else(|| HubError::NoDp(d.clone()))?
                    .packages
                    .remove(package);
                if let Some(g) = r
                    .groups_of(d)
                    .into_iter()
                    .find(|g| r.groups[g].packages.contains(package))
                {
                    return Err(HubError::Conflict(format!(
                        "{package} reaches DP {d} through group {g}: \
                         `ferry undistribute {package} --group {g}`, or remove {d} from {g}"
                    )));
                }
            }
            // A DP reports the removal of what it installed; a transfer that
            // never finished leaves nothing to remove, and a revoked DP
            // reports nothing, so their rows go now.
            let names: Vec<String> = r.dps.keys().cloned().collect();
            for n in names {
                if r.assigned(&n).contains(package) {
                    continue;
                }
                if let Some(d) = r.dps.get_mut(&n) {
                    let revoked = d.revoked.is_some();
                    if d.transfers
                        .get(package)
                        .is_some_and(|t| revoked || !t.state.holds())
                    {
                        d.transfers.remove(package);
                    }
                }
            }
            Ok(())
        })
    }

    /// Records a DP's report. `None` in `transfer` forgets the package (the
    /// DP removed it). Progress stays in memory; a new revision, state or
    /// error is written at once.
    pub fn report(
        &self,
        dp: &str,
        package: &str,
        transfer: Option<TransferReport>,
    ) -> Result<(), HubError> {
        self.update_dp(dp, |d| {
            d.last_contact = Some(now());
            let Some(mut t) = transfer else {
                let had = d.transfers.remove(package).is_some();
                let had_result = d.validation.results.remove(package).is_some();
                return (had || had_result, ());
            };
            let prev = d.transfers.get(package);
            let lasting = prev.is_none_or(|p| {
                p.revision != t.revision || p.state != t.state || p.error != t.error
            });
            if let Some(p) = prev.filter(|p| p.revision == t.revision) {
                t.started = p.started.clone();
                // A DP says "installed" again, without figures, each time it
                // connects or ends a validation: the figures of the
                // transfer that installed it stay.
                let again = p.state.holds()
                    && t.state.holds()
                    && t.bytes_needed == 0
                    && t.bytes_done == 0
                    && t.wire_bytes == 0;
                if again {
                    t.bytes_needed = p.bytes_needed;
                    t.bytes_done = p.bytes_done;
                    t.wire_bytes = p.wire_bytes;
                    t.bytes_local = p.bytes_local;
                    t.manifest_bytes = p.manifest_bytes;
                    t.full_bytes = t.full_bytes.max(p.full_bytes);
                }
            }
            if t.started.is_none() {
                t.started = Some(t.updated.clone());
            }
            d.transfers.insert(package.to_string(), t);
            (lasting, ())
        })
        .map(|_| ())
    }

    /// Asks DP `name` to validate `packages` (all when empty): a new
    /// request number the DP answers once. Returns the number.
    pub fn request_validation(&self, name: &str, packages: &[String]) -> Result<u64, HubError> {
        self.update(true, |r| {
            let d = r
                .dps
                .get_mut(name)
                .ok_or_else(|| HubError::NoDp(name.into()))?;
            if d.revoked.is_some() {
                return Err(HubError::Conflict(format!("DP {name} is revoked")));
            }
            d.validation.requested += 1;
            d.validation.packages = packages.to_vec();
            d.validation.requested_at = Some(now());
            Ok(d.validation.requested)
        })
    }

    /// Sets (or with `None` clears) DP `name`'s validation schedule.
    pub fn set_validate_schedule(
        &self,
        name: &str,
        schedule: Option<String>,
    ) -> Result<(), HubError> {
        self.update(false, |r| {
            let d = r
                .dps
                .get_mut(name)
                .ok_or_else(|| HubError::NoDp(name.into()))?;
            d.validation.schedule = schedule;
            d.validation.last_scheduled = Some(now());
            Ok(())
        })
    }

    /// A scheduled validation of every package is due for `name`: request
    /// it and remember when.
    pub fn scheduled_validation(&self, name: &str, at: &str) -> Result<u64, HubError> {
        self.update(true, |r| {
            let d = r
                .dps
                .get_mut(name)
                .ok_or_else(|| HubError::NoDp(name.into()))?;
            d.validation.requested += 1;
            d.validation.packages.clear();
            d.validation.requested_at = Some(now());
            d.validation.last_scheduled = Some(at.to_string());
            Ok(d.validation.requested)
        })
    }

    /// Records a DP's validation progress or result for `package`.
    pub fn record_validation(
        &self,
        dp: &str,
        package: &str,
        result: ValidationResult,
    ) -> Result<(), HubError> {
        // Progress of a run stays in memory; its end is written.
        let lasting = result.done;
        self.update_dp(dp, |d| {
            d.validation.results.insert(package.to_string(), result);
            (lasting, ())
        })
        .map(|_| ())
    }

    /// Marks a DP connected.
    pub fn connected(&self, dp: &str, conn: &quinn::Connection) -> Result<(), HubError> {
        let address = conn.remote_address().to_string();
        self.online
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                dp.to_string(),
                Online {
                    address: address.clone(),
                    since: now(),
                    conn: conn.clone(),
                },
            );
        self.update_dp(dp, |d| {
            d.last_contact = Some(now());
            d.address = Some(address);
            (true, ())
        })
        .map(|_| ())
    }

    /// Records DP `dp`'s disk as it reported it (kept in memory until the
    /// record's next write).
    pub fn set_disk(&self, dp: &str, used: u64, free: u64, total: u64) {
        let _ = self.update_dp(dp, |d| {
            d.disk = Some(DiskRecord {
                used_bytes: used,
                free_bytes: free,
                total_bytes: total,
                updated: now(),
            });
            (false, ())
        });
    }

    /// Marks a DP gone (if `conn` is still its current connection).
    pub fn disconnected(&self, dp: &str, conn: &quinn::Connection) {
        let mut online = self.online.lock().unwrap_or_else(|p| p.into_inner());
        if online
            .get(dp)
            .is_some_and(|o| o.conn.stable_id() == conn.stable_id())
        {
            online.remove(dp);
        }
        drop(online);
        let _ = self.update_dp(dp, |d| {
            d.last_contact = Some(now());
            (true, ())
        });
    }

    /// Whether `dp` is connected, and since when.
    pub fn online(&self, dp: &str) -> Option<Online> {
        self.online
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(dp)
            .cloned()
    }

    /// The counter of chunk bytes sent to `dp`: a chunk stream takes it
    /// once and adds to it without a lock.
    pub fn served_counter(&self, dp: &str) -> Arc<AtomicU64> {
        self.served
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(dp.to_string())
            .or_default()
            .clone()
    }

    /// Chunk bytes sent to `dp`, restarts of the site included (as of the
    /// record's last write before one).
    pub fn served_bytes(&self, dp: &str) -> u64 {
        self.served
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(dp)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }
}

pub use ferry_wire::{CLOSE_NOT_ALLOWED, CLOSE_REVOKED};

fn constant_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &Path) -> Hub {
        let lib = Arc::new(Library::open(&dir.join("library")).unwrap());
        Hub::open(dir, lib).unwrap()
    }

    fn transfer(revision: u32, state: TransferState, done: u64) -> TransferReport {
        TransferReport {
            revision,
            state,
            bytes_needed: 1000,
            bytes_done: done,
            full_bytes: 4000,
            wire_bytes: done + 10,
            bytes_local: 3000,
            manifest_bytes: 50,
            error: None,
            next_retry: None,
            started: None,
            updated: now(),
        }
    }

    #[test]
    fn tokens_are_one_time_and_assignments_follow_groups() {
        let dir = tempfile::tempdir().unwrap();
        let hub = open(dir.path());
        let secret = hub.add_dp("dp1", false).unwrap();
        hub.add_dp("dp2", false).unwrap();
        assert!(hub.add_dp("../x", false).is_err());
        assert_eq!(hub.token_owner(&secret).as_deref(), Some("dp1"));
        assert!(hub.enroll("dp1", &secret, "fp1").unwrap());
        assert_eq!(hub.token_owner(&secret), None, "used");
        assert!(!hub.enroll("dp1", &secret, "fp2").unwrap(), "used");
        assert_eq!(hub.identify("fp1").unwrap(), "dp1");
        assert!(matches!(
            hub.add_dp("dp1", true),
            Err(HubError::Conflict(_))
        ));

        hub.create_group("east").unwrap();
        hub.distribute("FRY00001", &[], &["east".into()]).unwrap();
        assert!(hub.snapshot().assigned("dp2").is_empty());
        hub.add_members("east", &["dp2".into()]).unwrap();
        assert!(hub.snapshot().assigned("dp2").contains("FRY00001"));
        let e = hub
            .undistribute("FRY00001", &["dp2".into()], &[])
            .unwrap_err();
        assert!(e.to_string().contains("group east"), "{e}");
        hub.undistribute("FRY00001", &[], &["east".into()]).unwrap();
        assert!(hub.snapshot().assigned("dp2").is_empty());
        assert!(matches!(
            hub.add_dp("dp2", false),
            Err(HubError::Conflict(_))
        ));
        assert!(hub.add_dp("dp2", true).is_ok(), "not enrolled: reissued");
        assert!(matches!(hub.add_dp("dp7", true), Err(HubError::NoDp(_))));
        hub.distribute("FRY00001", &["dp1".into()], &[]).unwrap();
        hub.report(
            "dp1",
            "FRY00001",
            Some(transfer(5, TransferState::Installed, 9)),
        )
        .unwrap();
        assert_eq!(hub.snapshot().holders("FRY00001"), vec!["dp1".to_string()]);
        hub.revoke("dp1").unwrap();
        assert!(matches!(
            hub.identify("fp1").unwrap_err(),
            Unknown::Revoked { .. }
        ));
        assert!(hub.identify("other").is_err());
        // A revoked DP's copy stops counting, and taking the package away
        // from it ends at once (it reports nothing any more).
        assert!(hub.snapshot().holders("FRY00001").is_empty());
        assert!(hub.snapshot().settled("FRY00001", 5));
        hub.undistribute("FRY00001", &["dp1".into()], &[]).unwrap();
        assert!(hub.snapshot().dps["dp1"].transfers.is_empty());

        // Persisted, in the library.
        let before = hub.snapshot();
        drop(hub);
        let again = open(dir.path());
        assert_eq!(again.snapshot(), before);
        assert!(!dir.path().join(REGISTRY_FILE).exists());
    }

    #[test]
    fn a_registry_json_of_the_previous_release_is_moved_in_with_every_dp_enrolled() {
        let dir = tempfile::tempdir().unwrap();
        // As the previous release wrote it.
        let old = r#"{
  "dps": {
    "dp1": {
      "name": "dp1",
      "created": "2026-11-20T10:00:00Z",
      "enrolled": "2026-11-20T10:01:00Z",
      "cert_fingerprint": "aa11",
      "packages": ["FRY00001"],
      "transfers": {
        "FRY00001": {
          "revision": 2, "state": "installed", "bytes_needed": 500,
          "bytes_done": 500, "full_bytes": 9000, "wire_bytes": 520,
          "updated": "2026-11-20T11:00:00Z"
        }
      },
      "last_contact": "2026-11-20T11:00:00Z"
    },
    "dp2": {
      "name": "dp2", "created": "2026-11-20T10:00:00Z",
      "enrolled": "2026-11-20T10:02:00Z", "cert_fingerprint": "bb22"
    },
    "dp3": {
      "name": "dp3", "created": "2026-11-20T10:00:00Z",
      "token_hash": "cc33"
    }
  },
  "groups": { "branch": { "members": ["dp2"], "packages": ["FRY00002"] } }
}"#;
        std::fs::write(dir.path().join(REGISTRY_FILE), old).unwrap();
        let hub = open(dir.path());
        let check = |hub: &Hub| {
            assert_eq!(hub.identify("aa11").unwrap(), "dp1");
            assert_eq!(hub.identify("bb22").unwrap(), "dp2");
            let reg = hub.snapshot();
            assert_eq!(reg.dps.len(), 3);
            assert_eq!(reg.dps["dp3"].token_hash.as_deref(), Some("cc33"));
            assert!(reg.assigned("dp2").contains("FRY00002"));
            assert!(reg.assigned("dp1").contains("FRY00001"));
            let t = &reg.dps["dp1"].transfers["FRY00001"];
            assert_eq!(
                (t.revision, t.state, t.wire_bytes),
                (2, TransferState::Installed, 520)
            );
        };
        check(&hub);
        assert!(!dir.path().join(REGISTRY_FILE).exists(), "renamed");
        assert!(
            dir.path().join(MIGRATED_REGISTRY_FILE).exists(),
            "kept aside"
        );
        drop(hub);
        // From the library now.
        check(&open(dir.path()));

        // A registry.json that is not one: a clear error naming it.
        let dir2 = tempfile::tempdir().unwrap();
        std::fs::write(dir2.path().join(REGISTRY_FILE), "{\"dps\": 3}").unwrap();
        let lib = Arc::new(Library::open(&dir2.path().join("library")).unwrap());
        let Err(e) = Hub::open(dir2.path(), lib) else {
            panic!("a broken registry.json was accepted");
        };
        assert!(e.to_string().contains("registry.json"), "{e}");
        assert!(e.to_string().contains("not a valid registry"), "{e}");
    }

    #[test]
    fn progress_stays_in_memory_and_a_new_state_is_written_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let hub = open(dir.path());
        hub.add_dp("dp1", false).unwrap();
        hub.report(
            "dp1",
            "P",
            Some(transfer(1, TransferState::InProgress, 100)),
        )
        .unwrap();
        hub.report(
            "dp1",
            "P",
            Some(transfer(1, TransferState::InProgress, 700)),
        )
        .unwrap();
        assert_eq!(hub.snapshot().dps["dp1"].transfers["P"].bytes_done, 700);
        drop(hub);
        // Killed without a flush: the state as it was last written.
        let hub = open(dir.path());
        let t = hub.snapshot().dps["dp1"].transfers["P"].clone();
        assert_eq!((t.state, t.bytes_done), (TransferState::InProgress, 100));

        hub.report(
            "dp1",
            "P",
            Some(transfer(1, TransferState::InProgress, 900)),
        )
        .unwrap();
        hub.flush().unwrap();
        drop(hub);
        let hub = open(dir.path());
        assert_eq!(
            hub.snapshot().dps["dp1"].transfers["P"].bytes_done,
            900,
            "flushed"
        );

        hub.report(
            "dp1",
            "P",
            Some(transfer(1, TransferState::Installed, 1000)),
        )
        .unwrap();
        // The DP says "installed" again, without figures, when it reconnects.
        let mut again = transfer(1, TransferState::Installed, 0);
        (again.bytes_needed, again.wire_bytes, again.bytes_local) = (0, 0, 0);
        hub.report("dp1", "P", Some(again)).unwrap();
        drop(hub);
        let t = open(dir.path()).snapshot().dps["dp1"].transfers["P"].clone();
        assert_eq!(t.state, TransferState::Installed);
        assert_eq!(
            (t.bytes_done, t.wire_bytes, t.bytes_local),
            (1000, 1010, 3000)
        );
    }

    #[test]
    fn a_removed_dp_leaves_its_groups_and_its_name_may_be_added_again() {
        let dir = tempfile::tempdir().unwrap();
        let hub = open(dir.path());
        let secret = hub.add_dp("dp1", false).unwrap();
        assert!(hub.enroll("dp1", &secret, "fp1").unwrap());
        hub.create_group("east").unwrap();
        hub.add_members("east", &["dp1".into()]).unwrap();
        hub.distribute("P", &["dp1".into()], &[]).unwrap();
        hub.revoke("dp1").unwrap();
        hub.remove_dp("dp1", false).unwrap();
        let reg = hub.snapshot();
        assert!(!reg.dps.contains_key("dp1"));
        assert!(reg.groups["east"].members.is_empty());
        assert!(matches!(
            hub.remove_dp("dp1", false),
            Err(HubError::NoDp(_))
        ));
        assert!(hub.identify("fp1").is_err(), "its certificate is refused");
        drop(hub);
        let again = open(dir.path());
        assert!(
            !again.snapshot().dps.contains_key("dp1"),
            "removed for good"
        );
        assert!(again.add_dp("dp1", false).is_ok(), "the name is free");
    }

    #[test]
    fn a_package_is_settled_when_every_holder_has_the_target_installed() {
        let dir = tempfile::tempdir().unwrap();
        let hub = open(dir.path());
        assert!(hub.snapshot().settled("P", 2), "no DP holds it");
        hub.add_dp("dp1", false).unwrap();
        hub.add_dp("dp2", false).unwrap();
        hub.distribute("P", &["dp1".into(), "dp2".into()], &[])
            .unwrap();
        assert!(
            hub.snapshot().settled("P", 2),
            "assigned, nothing reported yet"
        );
        hub.report(
            "dp1",
            "P",
            Some(transfer(1, TransferState::Installed, 1000)),
        )
        .unwrap();
        hub.report(
            "dp2",
            "P",
            Some(transfer(2, TransferState::Installed, 1000)),
        )
        .unwrap();
        assert!(!hub.snapshot().settled("P", 2), "dp1 still holds r1");
        hub.report("dp1", "P", Some(transfer(2, TransferState::InProgress, 10)))
            .unwrap();
        assert!(!hub.snapshot().settled("P", 2), "dp1 is not done");
        hub.report(
            "dp1",
            "P",
            Some(transfer(2, TransferState::Installed, 1000)),
        )
        .unwrap();
        assert!(hub.snapshot().settled("P", 2));
    }
}
