//! How the registry lasts: its records in the site's library (the `state`
//! column family, one JSON record per DP, group and client token), the
//! move of an earlier release's `registry.json` into it, and the one writer
//! of them.
//!
//! Every durable change of the registry goes through [`Persist`]: a thread
//! of its own takes the changes in the order the registry made them, and
//! writes whatever is queued in one synced batch (group commit), so a
//! burst of DP connections and reports costs one sync, and no lock of the
//! registry and no async thread ever waits for the disk. An operator's
//! change waits for its batch ([`Persist::write_durable`]); a DP's report
//! or contact does not ([`Persist::write`]): if its batch fails, the DP's
//! record is marked unsaved and written whole with the next change.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use ferry_store::{Library, StateChange};
use serde::Serialize;

use crate::distribution::records::{DpRecord, Registry};

/// File name of the registry of earlier releases inside the data folder;
/// moved into the library on first start, then renamed to
/// [`MIGRATED_REGISTRY_FILE`].
pub(crate) const REGISTRY_FILE: &str = "registry.json";
/// What an earlier release's registry file is renamed to once moved in.
pub(crate) const MIGRATED_REGISTRY_FILE: &str = "registry.json.migrated";
/// Key prefixes of the records in the library's state.
const DP_PREFIX: &[u8] = b"dp/";
const GROUP_PREFIX: &[u8] = b"group/";
const CLIENT_PREFIX: &[u8] = b"client/";

/// DP names whose in-memory record has changes not written yet.
pub(crate) type Unsaved = Arc<Mutex<BTreeSet<String>>>;

/// One batch of changes for the writer.
struct Write {
    changes: Vec<StateChange>,
    /// The DPs whose records it writes (marked unsaved if it fails).
    dps: Vec<String>,
    /// Told the outcome, when the caller waits.
    done: Option<mpsc::SyncSender<Result<(), String>>>,
}

/// The registry's storage: reads, diffs and the writer thread.
pub(crate) struct Persist {
    lib: Arc<Library>,
    tx: Option<mpsc::Sender<Write>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Persist {
    fn drop(&mut self) {
        // The writer ends once its queue is empty and closed; joining it
        // lets the library go with the registry.
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The registry's storage failed: where, and what.
#[derive(Debug, thiserror::Error)]
#[error("registry {path}: {detail}")]
pub(crate) struct StorageError {
    /// The library or file.
    pub(crate) path: PathBuf,
    /// What failed.
    pub(crate) detail: String,
}

fn storage(lib: &Library, detail: impl std::fmt::Display) -> StorageError {
    StorageError {
        path: lib.path().to_path_buf(),
        detail: detail.to_string(),
    }
}

/// The writer: takes every queued batch, writes them as one synced batch,
/// tells those that wait.
fn writer(lib: Arc<Library>, rx: mpsc::Receiver<Write>, unsaved: Unsaved) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        batch.extend(rx.try_iter());
        let changes: Vec<StateChange> = batch
            .iter_mut()
            .flat_map(|w| std::mem::take(&mut w.changes))
            .collect();
        let result = lib.write_state(&changes).map_err(|e| e.to_string());
        if let Err(e) = &result {
            tracing::error!(error = %e, library = %lib.path().display(), "cannot write the registry; the DPs' records are written again with the next change");
            let mut u = unsaved.lock().unwrap_or_else(|p| p.into_inner());
            for w in batch.iter().filter(|w| w.done.is_none()) {
                u.extend(w.dps.iter().cloned());
            }
        }
        for w in batch {
            if let Some(done) = w.done {
                let _ = done.send(result.clone());
            }
        }
    }
}

impl Persist {
    /// Opens the registry kept in `lib`, with its writer; a
    /// `DIR/registry.json` of an earlier release is moved in first (when
    /// the library holds none). A record that cannot be read is reported
    /// and skipped, never hiding the others.
    pub(crate) fn open(
        data: &Path,
        lib: Arc<Library>,
        unsaved: Unsaved,
    ) -> Result<(Self, Registry), StorageError> {
        let (tx, rx) = mpsc::channel();
        let thread = {
            let lib = lib.clone();
            std::thread::Builder::new()
                .name("ferry-registry".into())
                .spawn(move || writer(lib, rx, unsaved))
        }
        .map_err(|e| storage(&lib, format!("cannot start the registry's writer: {e}")))?;
        let p = Self {
            lib,
            tx: Some(tx),
            thread: Some(thread),
        };
        let reg = p.migrate(data)?;
        Ok((p, reg))
    }

    /// The records, with an earlier release's file moved in.
    fn migrate(&self, data: &Path) -> Result<Registry, StorageError> {
        let old = data.join(REGISTRY_FILE);
        let mut reg = self.read()?;
        if reg.dps.is_empty() && reg.groups.is_empty() && old.exists() {
            let bytes = std::fs::read(&old).map_err(|e| StorageError {
                path: old.clone(),
                detail: e.to_string(),
            })?;
            reg = serde_json::from_slice(&bytes).map_err(|e| StorageError {
                path: old.clone(),
                detail: format!("not a valid registry: {e}"),
            })?;
            let all = self.changes(&Registry::default(), &reg, &BTreeSet::new())?;
            self.write_durable(all)?;
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
                .map_err(|e| StorageError {
                    path: old.clone(),
                    detail: format!("moved in, but cannot rename it to {}: {e}", to.display()),
                })?;
        }
        Ok(reg)
    }

    /// The library the records live in.
    pub(crate) fn path(&self) -> PathBuf {
        self.lib.path().to_path_buf()
    }

    /// Every record as stored (what is durable).
    pub(crate) fn read(&self) -> Result<Registry, StorageError> {
        fn read<T: serde::de::DeserializeOwned>(
            lib: &Library,
            prefix: &[u8],
            what: &str,
        ) -> Result<BTreeMap<String, T>, StorageError> {
            let mut out = BTreeMap::new();
            for (k, v) in lib.state(prefix).map_err(|e| storage(lib, e))? {
                let name = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
                match serde_json::from_slice(&v) {
                    Ok(rec) => {
                        out.insert(name, rec);
                    }
                    Err(e) => tracing::error!(
                        %name,
                        error = %e,
                        library = %lib.path().display(),
                        "skipping an unreadable {what} record of the registry"
                    ),
                }
            }
            Ok(out)
        }
        Ok(Registry {
            dps: read(&self.lib, DP_PREFIX, "DP")?,
            groups: read(&self.lib, GROUP_PREFIX, "group")?,
            clients: read(&self.lib, CLIENT_PREFIX, "client token")?,
        })
    }

    /// The writes that take the records from `old` to `new`, and those of
    /// the DPs in `also` (changed in memory only so far).
    pub(crate) fn changes(
        &self,
        old: &Registry,
        new: &Registry,
        also: &BTreeSet<String>,
    ) -> Result<Vec<StateChange>, StorageError> {
        fn diff<T: Serialize + PartialEq>(
            prefix: &[u8],
            old: &BTreeMap<String, T>,
            new: &BTreeMap<String, T>,
            also: &BTreeSet<String>,
            out: &mut Vec<StateChange>,
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
        let none = BTreeSet::new();
        let mut out = Vec::new();
        diff(DP_PREFIX, &old.dps, &new.dps, also, &mut out)
            .and_then(|()| diff(GROUP_PREFIX, &old.groups, &new.groups, &none, &mut out))
            .and_then(|()| diff(CLIENT_PREFIX, &old.clients, &new.clients, &none, &mut out))
            .map_err(|e| storage(&self.lib, e))?;
        Ok(out)
    }

    /// The write of DP `name`'s record.
    pub(crate) fn dp_change(
        &self,
        name: &str,
        rec: &DpRecord,
    ) -> Result<StateChange, StorageError> {
        let v = serde_json::to_vec(rec).map_err(|e| storage(&self.lib, e))?;
        Ok(([DP_PREFIX, name.as_bytes()].concat(), Some(v)))
    }

    fn send(&self, w: Write) -> Result<(), StorageError> {
        self.tx
            .as_ref()
            .and_then(|tx| tx.send(w).ok())
            .ok_or_else(|| storage(&self.lib, "the registry's writer stopped"))
    }

    /// Queues the records of `dps` for writing, without waiting. Call in
    /// the order the changes were made (under the registry's lock).
    pub(crate) fn write(
        &self,
        changes: Vec<StateChange>,
        dps: Vec<String>,
    ) -> Result<(), StorageError> {
        self.send(Write {
            changes,
            dps,
            done: None,
        })
    }

    /// Queues `changes` (under the registry's lock, for the order); the
    /// answer waits for them to be durable.
    pub(crate) fn queue_durable(&self, changes: Vec<StateChange>) -> Result<Durable, StorageError> {
        let (done, rx) = mpsc::sync_channel(1);
        self.send(Write {
            changes,
            dps: Vec::new(),
            done: Some(done),
        })?;
        Ok(Durable {
            rx,
            path: self.path(),
        })
    }

    /// Writes `changes` and waits until they are durable.
    pub(crate) fn write_durable(&self, changes: Vec<StateChange>) -> Result<(), StorageError> {
        self.queue_durable(changes)?.wait()
    }
}

/// Queued changes that are durable once [`Durable::wait`] says so.
#[must_use = "wait for the changes to be durable"]
pub(crate) struct Durable {
    rx: mpsc::Receiver<Result<(), String>>,
    path: PathBuf,
}

impl Durable {
    /// Blocks until the batch holding the changes is written.
    pub(crate) fn wait(self) -> Result<(), StorageError> {
        let err = |detail: String| StorageError {
            path: self.path.clone(),
            detail,
        };
        match crate::off_runtime(|| self.rx.recv()) {
            Ok(r) => r.map_err(err),
            Err(_) => Err(err("the registry's writer stopped".into())),
        }
    }
}
