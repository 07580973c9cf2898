//! The registry in memory: [`Hub`] keeps the records
//! ([`crate::distribution::records`]) under a lock, signals connected DPs
//! when their assignments change, and counts the bytes served per DP
//! (recorded with the DP). Who is online is the endpoint's
//! ([`crate::distribution::live`]).
//!
//! The site is the source of truth for what each DP should hold: a DP's
//! assignment is its own packages plus those of every group it belongs to,
//! each at the package's released revision. The lock is held while a
//! change is made and queued for [`crate::distribution::persist`]'s writer, never while
//! it is written: an operator's change then waits for the disk (off the
//! async threads), a DP's report or contact does not. A DP's progress
//! reports and bytes served change memory only; its record (with both) is
//! written when a transfer's state, revision or error changes, and for
//! every DP when the site stops.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

pub(crate) use crate::now;
use ferry_store::Library;
use tokio::sync::watch;

use crate::distribution::live::Connections;
use crate::distribution::persist::{Persist, StorageError, Unsaved};
use crate::distribution::records::{
    DiskRecord, DpRecord, GroupRecord, Registry, TransferReport, ValidationResult,
};

/// Longest DP or group name.
pub(crate) const MAX_NAME_LEN: usize = 64;

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

impl From<StorageError> for HubError {
    fn from(e: StorageError) -> Self {
        Self::Storage {
            path: e.path,
            detail: e.detail,
        }
    }
}

impl HubError {
    /// Whether the operator's input is at fault (not the site).
    pub fn is_input(&self) -> bool {
        !matches!(self, Self::Storage { .. })
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

/// The registry with its lock, change signal and byte counters.
pub struct Hub {
    reg: Mutex<Registry>,
    /// DPs whose in-memory record has progress not written yet.
    unsaved: Unsaved,
    /// The one writer of the records.
    persist: Persist,
    changed: watch::Sender<u64>,
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
pub(crate) fn token_hash(secret: &str) -> String {
    blake3::hash(secret.as_bytes()).to_hex().to_string()
}

impl Hub {
    /// Opens the registry kept in `lib` (see [`Persist::open`]).
    pub fn open(data: &Path, lib: Arc<Library>) -> Result<Self, HubError> {
        let unsaved = Unsaved::default();
        let (persist, reg) = Persist::open(data, lib, unsaved.clone())?;
        // Bytes served go on from what the records hold.
        let served = reg
            .dps
            .iter()
            .map(|(name, d)| (name.clone(), Arc::new(AtomicU64::new(d.served_bytes))))
            .collect();
        Ok(Self {
            reg: Mutex::new(reg),
            unsaved,
            persist,
            changed: watch::channel(0).0,
            served: Mutex::new(served),
        })
    }

    pub(crate) fn storage(&self, detail: impl std::fmt::Display) -> HubError {
        HubError::Storage {
            path: self.persist.path(),
            detail: detail.to_string(),
        }
    }

    /// Runs `f` on a copy of the registry and keeps the result only if it
    /// succeeds and is written; signals connected DPs when `notify`. The
    /// registry's lock is held while the change is made and queued, not
    /// while it is written: this blocks until it is durable, so async code
    /// calls it off its threads.
    pub(crate) fn update<T>(
        &self,
        notify: bool,
        f: impl FnOnce(&mut Registry) -> Result<T, HubError>,
    ) -> Result<T, HubError> {
        let (durable, touched, out) = {
            let mut reg = self.reg.lock().unwrap_or_else(|p| p.into_inner());
            let mut next = reg.clone();
            let out = f(&mut next)?;
            if next == *reg {
                return Ok(out);
            }
            // A changed DP's record is written whole, progress that was
            // only in memory included.
            let mut unsaved = self.unsaved.lock().unwrap_or_else(|p| p.into_inner());
            let changes = self.persist.changes(&reg, &next, &unsaved)?;
            let touched = Touched::of(&reg, &next);
            let durable = self.persist.queue_durable(changes)?;
            unsaved.clear();
            *reg = next;
            (durable, touched, out)
        };
        if let Err(e) = durable.wait() {
            self.restore(&touched);
            return Err(e.into());
        }
        if notify {
            self.changed.send_modify(|n| *n += 1);
        }
        Ok(out)
    }

    /// After a failed write: the records `touched` go back to what is
    /// durable.
    fn restore(&self, touched: &Touched) {
        let stored = match self.persist.read() {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the registry back after a failed write");
                return;
            }
        };
        let mut reg = self.reg.lock().unwrap_or_else(|p| p.into_inner());
        touched.restore(&mut reg, stored);
    }

    /// Changes DP `dp`'s record with `f`; queues it for writing when `f`
    /// says the change must last (without waiting for the disk), else
    /// keeps it in memory until the next write or [`Self::flush`].
    /// `Ok(None)` for an unknown DP.
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
            let change = self.persist.dp_change(dp, &next)?;
            self.persist.write(vec![change], vec![dp.to_string()])?;
            unsaved.remove(dp);
        } else if next != *d {
            unsaved.insert(dp.to_string());
        }
        *d = next;
        Ok(Some(out))
    }

    /// Writes every DP record whose progress or bytes served changed only
    /// in memory (at shutdown), and waits until all is durable.
    pub fn flush(&self) -> Result<(), HubError> {
        let durable = {
            let mut reg = self.reg.lock().unwrap_or_else(|p| p.into_inner());
            let mut unsaved = self.unsaved.lock().unwrap_or_else(|p| p.into_inner());
            let mut changes = Vec::new();
            for (dp, rec) in reg.dps.iter_mut() {
                let served = self.served_bytes(dp);
                if unsaved.contains(dp) || rec.served_bytes != served {
                    rec.served_bytes = served;
                    changes.push(self.persist.dp_change(dp, rec)?);
                }
            }
            unsaved.clear();
            self.persist.queue_durable(changes)?
        };
        Ok(durable.wait()?)
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

    /// Removes the revisions of `package` nothing needs any more, once
    /// every DP holding it has its released revision (`keep` revisions are
    /// kept unless the package says otherwise); a failure is logged.
    /// Returns the revisions removed.
    pub(crate) fn prune(&self, lib: &Library, package: &str, keep: u32) -> Vec<u32> {
        let settled = |t| {
            self.reg
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .settled(package, t)
        };
        crate::library::packages::prune(lib, package, keep, settled).unwrap_or_else(|e| {
            tracing::warn!(%package, error = %e, "cannot remove unused revisions");
            Vec::new()
        })
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
                            token_hash: Some(hash),
                            ..DpRecord::new(name)
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
        let reg = self.reg.lock().unwrap_or_else(|p| p.into_inner());
        reg.dps
            .values()
            .find(|d| d.revoked.is_none() && secret_matches(d.token_hash.as_deref(), secret))
            .map(|d| d.name.clone())
    }

    /// Uses up the secret of DP `name` and records the certificate issued
    /// to it. `false` when the secret was used (or revoked) meanwhile.
    pub fn enroll(&self, name: &str, secret: &str, fingerprint: &str) -> Result<bool, HubError> {
        self.update(true, |r| {
            let Some(d) = r.dps.get_mut(name) else {
                return Ok(false);
            };
            let valid = d.revoked.is_none() && secret_matches(d.token_hash.as_deref(), secret);
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
        })
    }

    /// Deletes DP `name`'s record: its assignments, status rows and
    /// membership of groups go, its certificate stops being accepted, and
    /// the name may be added again. Refused while it is connected (in
    /// `conns`) unless `force`; its connection is then closed.
    pub fn remove_dp(&self, name: &str, force: bool, conns: &Connections) -> Result<(), HubError> {
        if let (Some(o), false) = (conns.get(name), force) {
            return Err(HubError::Conflict(format!(
                "DP {name} is online (connected from {} since {}): `ferry dp revoke {name}` first, or `ferry dp remove {name} --force`",
                o.address,
                crate::rfc3339(o.since)
            )));
        }
        self.update(true, |r| {
            if r.dps.remove(name).is_none() {
                return Err(HubError::NoDp(name.into()));
            }
            for g in r.groups.values_mut() {
                g.members.remove(name);
            }
            // Its pull DPs take their chunks from their other sources, or
            // the site.
            for d in r.dps.values_mut() {
                d.pull_from.retain(|s| s.dp != name);
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
        conns.close_refused(name, b"this DP was removed by the site");
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
                at: crate::rfc3339(*when),
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
                t.started = p.started;
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
                t.started = Some(t.updated);
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

    /// A scheduled validation of every package is due for `name`: request
    /// it and remember when.
    pub fn scheduled_validation(
        &self,
        name: &str,
        at: time::OffsetDateTime,
    ) -> Result<u64, HubError> {
        self.update(true, |r| {
            let d = r
                .dps
                .get_mut(name)
                .ok_or_else(|| HubError::NoDp(name.into()))?;
            d.validation.requested += 1;
            d.validation.packages.clear();
            d.validation.requested_at = Some(now());
            d.validation.last_scheduled = Some(at);
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

    /// Records where DP `dp` serves chunks to pull DPs (`None`: it does
    /// not); written, and its pull DPs told, when it changed.
    pub fn set_peer_address(&self, dp: &str, address: Option<String>) -> Result<(), HubError> {
        let changed = self
            .update_dp(dp, |d| {
                let changed = d.peer_address != address;
                d.peer_address = address;
                (changed, changed)
            })?
            .unwrap_or(false);
        if changed {
            self.notify();
        }
        Ok(())
    }

    /// Whether some DP pulls from `dp`.
    pub fn is_source(&self, dp: &str) -> bool {
        self.reg
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .dps
            .values()
            .any(|d| d.pull_from.iter().any(|s| s.dp == dp))
    }

    /// Records a contact of DP `dp`: now, from `address` when it just
    /// connected (written, so the last contact survives the site).
    pub fn contact(&self, dp: &str, address: Option<String>) -> Result<(), HubError> {
        self.update_dp(dp, |d| {
            d.last_contact = Some(now());
            if address.is_some() {
                d.address = address;
            }
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

/// The records one change touched, by kind and name.
struct Touched {
    dps: BTreeSet<String>,
    groups: BTreeSet<String>,
    clients: BTreeSet<String>,
}

impl Touched {
    fn of(old: &Registry, new: &Registry) -> Self {
        fn names<T: PartialEq>(
            old: &std::collections::BTreeMap<String, T>,
            new: &std::collections::BTreeMap<String, T>,
        ) -> BTreeSet<String> {
            old.keys()
                .chain(new.keys())
                .filter(|n| old.get(*n) != new.get(*n))
                .cloned()
                .collect()
        }
        Self {
            dps: names(&old.dps, &new.dps),
            groups: names(&old.groups, &new.groups),
            clients: names(&old.clients, &new.clients),
        }
    }

    /// Puts the touched records of `reg` back as `stored` has them.
    fn restore(&self, reg: &mut Registry, mut stored: Registry) {
        fn put<T>(
            names: &BTreeSet<String>,
            mem: &mut std::collections::BTreeMap<String, T>,
            stored: &mut std::collections::BTreeMap<String, T>,
        ) {
            for n in names {
                match stored.remove(n) {
                    Some(r) => {
                        mem.insert(n.clone(), r);
                    }
                    None => {
                        mem.remove(n);
                    }
                }
            }
        }
        put(&self.dps, &mut reg.dps, &mut stored.dps);
        put(&self.groups, &mut reg.groups, &mut stored.groups);
        put(&self.clients, &mut reg.clients, &mut stored.clients);
    }
}

pub(crate) use ferry_wire::{CLOSE_NOT_ALLOWED, CLOSE_REVOKED};

/// Whether `secret` hashes to `stored` (hex, as [`token_hash`] writes
/// it). The hashes are compared as `blake3::Hash`es, in constant time.
fn secret_matches(stored: Option<&str>, secret: &str) -> bool {
    stored
        .and_then(|h| blake3::Hash::from_hex(h).ok())
        .is_some_and(|h| h == blake3::hash(secret.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distribution::persist::{MIGRATED_REGISTRY_FILE, REGISTRY_FILE};
    use crate::distribution::records::TransferState;

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
            sources: Vec::new(),
            waiting_for: None,
        }
    }

    #[test]
    fn a_failed_write_puts_back_only_the_records_it_touched() {
        let mut old = Registry::default();
        old.groups.insert("kept".into(), GroupRecord::default());
        old.groups.insert("changed".into(), GroupRecord::default());
        let mut new = old.clone();
        new.groups
            .get_mut("changed")
            .unwrap()
            .packages
            .insert("P".into());
        new.groups.insert("added".into(), GroupRecord::default());
        let touched = Touched::of(&old, &new);
        assert_eq!(
            touched.groups,
            ["added".to_string(), "changed".to_string()].into()
        );
        assert!(touched.dps.is_empty() && touched.clients.is_empty());
        // Meanwhile another change touched "kept" in memory: it stays.
        let mut mem = new.clone();
        mem.groups
            .get_mut("kept")
            .unwrap()
            .members
            .insert("dp9".into());
        touched.restore(&mut mem, old.clone());
        assert_eq!(mem.groups["changed"], old.groups["changed"]);
        assert!(!mem.groups.contains_key("added"));
        assert!(mem.groups["kept"].members.contains("dp9"));
    }

    #[test]
    fn changes_from_many_threads_all_last_and_reports_do_not_wait() {
        let dir = tempfile::tempdir().unwrap();
        {
            let hub = Arc::new(open(dir.path()));
            hub.add_dp("dp1", false).unwrap();
            let threads: Vec<_> = (0..8)
                .map(|t| {
                    let hub = hub.clone();
                    std::thread::spawn(move || {
                        for n in 0..25 {
                            hub.create_group(&format!("g{t}-{n}")).unwrap();
                            // A DP's report between them: queued, not waited for.
                            hub.report(
                                "dp1",
                                &format!("P{t}"),
                                Some(transfer(n + 1, TransferState::InProgress, 1)),
                            )
                            .unwrap();
                        }
                    })
                })
                .collect();
            for t in threads {
                t.join().unwrap();
            }
            // Dropped without a flush: the writer still writes what was
            // queued before it ends.
        }
        let hub = open(dir.path());
        let reg = hub.snapshot();
        assert_eq!(reg.groups.len(), 200);
        let d = &reg.dps["dp1"];
        for t in 0..8 {
            assert_eq!(d.transfers[&format!("P{t}")].revision, 25, "P{t}");
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
        let conns = Connections::default();
        hub.remove_dp("dp1", false, &conns).unwrap();
        let reg = hub.snapshot();
        assert!(!reg.dps.contains_key("dp1"));
        assert!(reg.groups["east"].members.is_empty());
        assert!(matches!(
            hub.remove_dp("dp1", false, &conns),
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
