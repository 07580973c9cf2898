//! What the site knows about its distribution points: enrollment, groups,
//! assignments, and the last state each DP reported per package.
//!
//! The site is the source of truth for what each DP should hold: a DP's
//! assignment is its own packages plus those of every group it belongs to,
//! each at the package's latest revision. The registry lives in
//! `DIR/registry.json`, rewritten atomically (temporary file, fsync, rename)
//! on every change; [`Hub`] wraps it with a lock, a change signal for
//! connected DPs, and what is only true while the site runs (who is online).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// File name of the registry inside the data folder.
pub const REGISTRY_FILE: &str = "registry.json";
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

/// The last report of one DP about one package.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transfer {
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
    pub transfers: BTreeMap<String, Transfer>,
    /// Last time it was connected (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_contact: Option<String>,
    /// Address it last connected from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Content validation: schedule, the latest request, results.
    #[serde(default)]
    pub validation: ValidationState,
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

    /// DPs that hold or must hold `package`.
    pub fn holders(&self, package: &str) -> Vec<String> {
        self.dps
            .keys()
            .filter(|n| {
                self.assigned(n).contains(package) || self.dps[*n].transfers.contains_key(package)
            })
            .cloned()
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
    path: PathBuf,
    reg: Mutex<Registry>,
    changed: watch::Sender<u64>,
    online: Mutex<HashMap<String, Online>>,
    served: Mutex<HashMap<String, Arc<AtomicU64>>>,
}

/// Now, RFC 3339.
pub fn now() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

fn check_name(name: &str) -> Result<(), HubError> {
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
    /// Loads `DIR/registry.json` (an empty registry when it does not exist).
    pub fn load(data: &Path) -> Result<Self, HubError> {
        let path = data.join(REGISTRY_FILE);
        let reg = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| HubError::Storage {
                path: path.clone(),
                detail: format!("not a valid registry: {e}"),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Registry::default(),
            Err(e) => {
                return Err(HubError::Storage {
                    path,
                    detail: e.to_string(),
                })
            }
        };
        Ok(Self {
            path,
            reg: Mutex::new(reg),
            changed: watch::channel(0).0,
            online: Mutex::new(HashMap::new()),
            served: Mutex::new(HashMap::new()),
        })
    }

    fn save(&self, reg: &Registry) -> Result<(), HubError> {
        crate::save_json(&self.path, reg).map_err(|e| HubError::Storage {
            path: self.path.clone(),
            detail: e.to_string(),
        })
    }

    /// Runs `f` on a copy of the registry and keeps the result only if it
    /// succeeds and is saved; signals connected DPs when `notify`.
    fn update<T>(
        &self,
        notify: bool,
        f: impl FnOnce(&mut Registry) -> Result<T, HubError>,
    ) -> Result<T, HubError> {
        let mut reg = self.reg.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = reg.clone();
        let out = f(&mut next)?;
        if next != *reg {
            self.save(&next)?;
            *reg = next;
            if notify {
                self.changed.send_modify(|n| *n += 1);
            }
        }
        Ok(out)
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
    /// returned (only its hash is kept). A DP that never enrolled may be
    /// added again for a new secret; the old one stops working.
    pub fn add_dp(&self, name: &str) -> Result<String, HubError> {
        check_name(name)?;
        let secret = ferry_net::pki::random_token().map_err(|e| HubError::Storage {
            path: self.path.clone(),
            detail: e.to_string(),
        })?;
        let hash = token_hash(&secret);
        self.update(false, |r| {
            match r.dps.get_mut(name) {
                Some(d) if d.enrolled.is_some() || d.revoked.is_some() => {
                    return Err(HubError::Exists {
                        what: "DP",
                        name: name.to_string(),
                    })
                }
                Some(d) => d.token_hash = Some(hash),
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

    /// The DP a certificate belongs to: `Ok(name)`, or `Err(reason)` for a
    /// certificate that is not (or no longer) accepted.
    pub fn identify(&self, fingerprint: &str) -> Result<String, String> {
        let reg = self.reg.lock().unwrap_or_else(|p| p.into_inner());
        let d = reg
            .dps
            .values()
            .find(|d| d.cert_fingerprint.as_deref() == Some(fingerprint))
            .ok_or_else(|| "certificate not issued to any enrolled DP".to_string())?;
        match &d.revoked {
            Some(when) => Err(format!("DP {} was revoked at {when}", d.name)),
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

    /// Removes DPs from a group.
    pub fn remove_members(&self, group: &str, dps: &[String]) -> Result<(), HubError> {
        self.update(true, |r| {
            let g = r
                .groups
                .get_mut(group)
                .ok_or_else(|| HubError::NoGroup(group.into()))?;
            for d in dps {
                g.members.remove(d);
            }
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
            // never finished leaves nothing to remove, so its row goes now.
            let names: Vec<String> = r.dps.keys().cloned().collect();
            for n in names {
                if r.assigned(&n).contains(package) {
                    continue;
                }
                if let Some(d) = r.dps.get_mut(&n) {
                    if d.transfers.get(package).is_some_and(|t| !t.state.holds()) {
                        d.transfers.remove(package);
                    }
                }
            }
            Ok(())
        })
    }

    /// Records a DP's report. `None` in `transfer` forgets the package (the
    /// DP removed it).
    pub fn report(
        &self,
        dp: &str,
        package: &str,
        transfer: Option<Transfer>,
    ) -> Result<(), HubError> {
        self.update(false, |r| {
            let Some(d) = r.dps.get_mut(dp) else {
                return Ok(());
            };
            match transfer {
                Some(mut t) => {
                    let prev = d.transfers.get(package);
                    t.started = match prev {
                        Some(p) if p.revision == t.revision && p.started.is_some() => {
                            p.started.clone()
                        }
                        _ => Some(t.updated.clone()),
                    };
                    d.transfers.insert(package.to_string(), t);
                }
                None => {
                    d.transfers.remove(package);
                    d.validation.results.remove(package);
                }
            }
            d.last_contact = Some(now());
            Ok(())
        })
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
        self.update(false, |r| {
            if let Some(d) = r.dps.get_mut(dp) {
                d.validation.results.insert(package.to_string(), result);
            }
            Ok(())
        })
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
        self.update(false, |r| {
            if let Some(d) = r.dps.get_mut(dp) {
                d.last_contact = Some(now());
                d.address = Some(address);
            }
            Ok(())
        })
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
        let _ = self.update(false, |r| {
            if let Some(d) = r.dps.get_mut(dp) {
                d.last_contact = Some(now());
            }
            Ok(())
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

    /// Chunk bytes sent to `dp` since the site started.
    pub fn served_bytes(&self, dp: &str) -> u64 {
        self.served
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(dp)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }
}

/// QUIC application close code: the DP was revoked.
pub const CLOSE_REVOKED: u32 = 0x10;
/// QUIC application close code: the certificate is not accepted.
pub const CLOSE_NOT_ALLOWED: u32 = 0x11;

fn constant_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_one_time_and_assignments_follow_groups() {
        let dir = tempfile::tempdir().unwrap();
        let hub = Hub::load(dir.path()).unwrap();
        let secret = hub.add_dp("dp1").unwrap();
        hub.add_dp("dp2").unwrap();
        assert!(hub.add_dp("../x").is_err());
        assert_eq!(hub.token_owner(&secret).as_deref(), Some("dp1"));
        assert!(hub.enroll("dp1", &secret, "fp1").unwrap());
        assert_eq!(hub.token_owner(&secret), None, "used");
        assert!(!hub.enroll("dp1", &secret, "fp2").unwrap(), "used");
        assert_eq!(hub.identify("fp1").unwrap(), "dp1");
        assert!(matches!(hub.add_dp("dp1"), Err(HubError::Exists { .. })));

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

        // Persisted.
        let again = Hub::load(dir.path()).unwrap();
        assert_eq!(again.snapshot(), hub.snapshot());
        hub.revoke("dp1").unwrap();
        assert!(hub.identify("fp1").unwrap_err().contains("revoked"));
        assert!(hub.identify("other").is_err());
    }
}
