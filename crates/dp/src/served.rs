//! What the HTTPS routes share: the store, the client gate, the installed
//! revisions as requests need them, and the files kept open for downloads
//! in progress.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use ferry_core::Manifest;
use ferry_store::ContentStore;

use crate::gate::ClientGate;
use crate::multicast::Sessions;

/// How long a file stays open after its last request.
pub const PIN_IDLE: Duration = Duration::from_secs(10 * 60);
/// At most this many files are kept open for downloads in progress.
pub const MAX_PINS: usize = 4096;

/// The store as the agent holds it: `None` while it is being reopened.
pub(crate) type StoreSlot = Arc<Mutex<Option<Arc<ContentStore>>>>;

/// The key of an open file: package, path and ETag.
fn pin_key(package: &str, path: &str, etag: &str) -> String {
    format!("{package}\0{path}\0{etag}")
}

struct Pin {
    file: Arc<File>,
    size: u64,
    last: Instant,
}

pub(crate) struct Shared {
    store: StoreSlot,
    pub(crate) gate: Arc<ClientGate>,
    pub(crate) manifest_key: String,
    pub(crate) multicast: Arc<Sessions>,
    pins: Mutex<HashMap<String, Pin>>,
    /// Per package, its installed revision as last read.
    installed: Mutex<HashMap<String, Arc<Installed>>>,
}

impl Shared {
    pub(crate) fn new(
        store: StoreSlot,
        gate: Arc<ClientGate>,
        manifest_key: String,
        multicast: Arc<Sessions>,
    ) -> Self {
        Self {
            store,
            gate,
            manifest_key,
            multicast,
            pins: Mutex::new(HashMap::new()),
            installed: Mutex::new(HashMap::new()),
        }
    }

    pub(crate) fn store(&self) -> Result<Arc<ContentStore>, Refusal> {
        self.store
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| {
                Refusal(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the DP's index is being reopened; try again shortly".into(),
                )
            })
    }

    /// Opens (or finds open) file `path` of `package` with `etag`, from
    /// `disk` on the disk.
    pub(crate) fn pin(
        &self,
        package: &str,
        path: &str,
        etag: &str,
        disk: &Path,
        size: u64,
    ) -> std::io::Result<Arc<File>> {
        let key = pin_key(package, path, etag);
        let mut pins = self.pins.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = pins.get_mut(&key) {
            p.last = Instant::now();
            return Ok(p.file.clone());
        }
        let file = Arc::new(File::open(disk)?);
        if pins.len() >= MAX_PINS {
            let cutoff = Instant::now() - PIN_IDLE;
            pins.retain(|_, p| p.last > cutoff);
            if pins.len() >= MAX_PINS {
                if let Some(oldest) = pins
                    .iter()
                    .min_by_key(|(_, p)| p.last)
                    .map(|(k, _)| k.clone())
                {
                    pins.remove(&oldest);
                }
            }
        }
        pins.insert(
            key,
            Pin {
                file: file.clone(),
                size,
                last: Instant::now(),
            },
        );
        Ok(file)
    }

    /// Every version of file `path` of `package` kept open: ETag, file,
    /// size.
    pub(crate) fn pinned_versions(
        &self,
        package: &str,
        path: &str,
    ) -> Vec<(String, Arc<File>, u64)> {
        let prefix = pin_key(package, path, "");
        let mut pins = self.pins.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        pins.iter_mut()
            .filter_map(|(k, p)| {
                let etag = k.strip_prefix(&prefix)?;
                p.last = now;
                Some((etag.to_string(), p.file.clone(), p.size))
            })
            .collect()
    }

    pub(crate) fn expire(&self) {
        let cutoff = Instant::now() - PIN_IDLE;
        self.pins
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, p| p.last > cutoff);
    }
}

pub(crate) fn error(status: StatusCode, message: impl Into<String>) -> Response {
    Refusal(status, message.into()).into_response()
}

/// An answer other than the content: its status and message (JSON
/// `{"error": …}`).
pub(crate) struct Refusal(pub(crate) StatusCode, pub(crate) String);

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

fn etag_of(m: &Manifest) -> String {
    format!("\"{}\"", m.hash.to_hex())
}

/// One file of an installed revision, as requests need it.
pub(crate) struct FileEntry {
    pub(crate) path: String,
    pub(crate) size: u64,
    pub(crate) etag: String,
}

/// What a request needs of the installed revision of a package.
pub(crate) struct Installed {
    pub(crate) revision: u32,
    pub(crate) dir: PathBuf,
    pub(crate) files: Vec<FileEntry>,
}

impl Installed {
    pub(crate) fn file(&self, path: &str) -> Option<&FileEntry> {
        self.files.iter().find(|f| f.path == path)
    }
}

pub(crate) fn internal(e: impl std::fmt::Display) -> Refusal {
    Refusal(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
}

/// The installed revision of `package`: read from the index once per
/// revision (a large image's manifests are megabytes), then from memory.
pub(crate) async fn installed(sh: &Shared, package: &str) -> Result<Arc<Installed>, Refusal> {
    let store = sh.store()?;
    let p = package.to_string();
    let s2 = store.clone();
    let rev = tokio::task::spawn_blocking(move || s2.installed_revision(&p))
        .await
        .map_err(internal)?
        .map_err(internal)?;
    let Some(rev) = rev else {
        return Err(Refusal(
            StatusCode::NOT_FOUND,
            format!("this DP holds no package {package:?}"),
        ));
    };
    if let Some(i) = sh
        .installed
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(package)
        .filter(|i| i.revision == rev)
    {
        return Ok(i.clone());
    }
    let p = package.to_string();
    let ms = tokio::task::spawn_blocking(move || {
        store
            .manifests(&p, rev)
            .map(|ms| (ms, store.revision_dir(&p, rev)))
    })
    .await
    .map_err(internal)?
    .map_err(internal)?;
    let inst = Arc::new(Installed {
        revision: rev,
        dir: ms.1,
        files: ms
            .0
            .iter()
            .map(|m| FileEntry {
                path: m.path.clone(),
                size: m.size,
                etag: etag_of(m),
            })
            .collect(),
    });
    sh.installed
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(package.to_string(), inst.clone());
    Ok(inst)
}
