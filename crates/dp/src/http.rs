//! The DP's HTTPS listener: what the computers being deployed download.
//!
//! | method | path | answer |
//! |---|---|---|
//! | GET | `/content/{package}/` | JSON [`PackageIndex`]: installed revision, files, the site-signed manifest |
//! | GET, HEAD | `/content/{package}/{path}` | the file, with `ETag` (its BLAKE3), `Accept-Ranges`, single and multi-range (`multipart/byteranges`), `If-Range`, `If-Match`, `If-None-Match`; 403 for a package the site marked multicast-only |
//! | POST | `/multicast/{package}`, `/multicast/session/{id}/report`, `…/done`; GET `/multicast/` | multicast sessions: [`crate::multicast`] |
//!
//! Every request shows `Authorization: Bearer <client token>` (checked
//! with the site's manifest key, the site code and the revoked ids the site
//! sent: [`ClientGate`]) unless the site lets the DP serve anonymous
//! clients. A refusal is 401 and a warning in the DP's log naming the
//! client's address and why.
//!
//! Paths are looked up among the manifest's file paths, never joined onto
//! the content folder, so `..` or a symlink cannot reach anything else.
//!
//! A download that started on revision N finishes on N: every file served
//! (and every file of a package whose index was read) stays open, keyed by
//! its package, path and ETag, for [`PIN_IDLE`] after its last use. A request whose
//! `If-Match` or `If-Range` names such an ETag is served from that file even
//! after the DP installed N+1 and deleted N's folder (the open file keeps
//! its bytes).

use std::collections::HashMap;
use std::fs::File;
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Path as UrlPath, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use base64::Engine as _;
use ferry_core::Manifest;
use ferry_store::ContentStore;
use ferry_wire::pb;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::{self, ClientsConfig};
use crate::ranges::{self, Plan};

/// How long a file stays open after its last request.
pub const PIN_IDLE: Duration = Duration::from_secs(10 * 60);
/// At most this many files are kept open for downloads in progress.
pub const MAX_PINS: usize = 4096;
/// Bytes read from disk per step of a response body.
const READ_BLOCK: usize = 256 * 1024;

/// The store as the agent holds it: `None` while it is being reopened.
pub(crate) type StoreSlot = Arc<Mutex<Option<Arc<ContentStore>>>>;

/// Who may download: the site's key and code check a token's signature,
/// the policy the site last sent says what a signature cannot.
pub struct ClientGate {
    key: Vec<u8>,
    site_code: String,
    policy: RwLock<pb::ClientPolicy>,
}

impl ClientGate {
    /// A gate for tokens of site `site_code`, signed with `key`.
    pub fn new(key: Vec<u8>, site_code: String, policy: pb::ClientPolicy) -> Self {
        Self {
            key,
            site_code,
            policy: RwLock::new(policy),
        }
    }

    /// Takes the site's latest policy.
    pub fn set_policy(&self, p: pb::ClientPolicy) {
        *self.policy.write().unwrap_or_else(|e| e.into_inner()) = p;
    }

    /// Whether the site marked `package` multicast-only.
    pub fn multicast_only(&self, package: &str) -> bool {
        self.policy
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .multicast_only
            .iter()
            .any(|p| p == package)
    }

    /// The DP's multicast settings and packages, when it runs sessions.
    pub fn multicast(&self) -> Option<pb::MulticastPolicy> {
        self.policy
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .multicast
            .clone()
    }

    /// The client's name (`anonymous` without a token), or why it is
    /// refused.
    pub fn check(&self, authorization: Option<&str>) -> Result<String, String> {
        let policy = self.policy.read().unwrap_or_else(|e| e.into_inner());
        let Some(auth) = authorization else {
            return if policy.anonymous {
                Ok("anonymous".into())
            } else {
                Err("no client token (Authorization: Bearer …); this DP serves only clients with one".into())
            };
        };
        let Some(token) = auth
            .strip_prefix("Bearer ")
            .or_else(|| auth.strip_prefix("bearer "))
        else {
            return Err("the Authorization header is not a bearer token".into());
        };
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let claims = ferry_net::client_token::verify(&self.key, &self.site_code, token, now)
            .map_err(|e| e.to_string())?;
        if policy.revoked.contains(&claims.id) {
            return Err(ferry_net::client_token::TokenError::Revoked(claims.name).to_string());
        }
        Ok(claims.name)
    }
}

/// What `GET /content/{package}/` answers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackageIndex {
    /// The package id.
    pub package: String,
    /// The installed revision.
    pub revision: u32,
    /// The package's name at the site.
    pub name: String,
    /// Its files.
    pub files: Vec<IndexFile>,
    /// The site-signed manifest body (protobuf `ManifestBody`, full form),
    /// base64.
    pub manifest: String,
    /// Ed25519 signature over it, hex.
    pub signature: String,
    /// The site's public manifest key, hex.
    pub manifest_key: String,
}

/// One file of a [`PackageIndex`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexFile {
    /// Path inside the package.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// BLAKE3 of the whole file, hex (its ETag, quoted).
    pub blake3: String,
}

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
    pub(crate) multicast: Arc<crate::multicast::Sessions>,
    pins: Mutex<HashMap<String, Pin>>,
    /// Per package, its installed revision as last read.
    installed: Mutex<HashMap<String, Arc<Installed>>>,
}

impl Shared {
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
    fn pin(
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

    /// File `path` of `package` as it was with `etag`, if kept open.
    fn pinned(&self, package: &str, path: &str, etag: &str) -> Option<(Arc<File>, u64)> {
        let mut pins = self.pins.lock().unwrap_or_else(|e| e.into_inner());
        let p = pins.get_mut(&pin_key(package, path, etag))?;
        p.last = Instant::now();
        Some((p.file.clone(), p.size))
    }

    fn expire(&self) {
        let cutoff = Instant::now() - PIN_IDLE;
        self.pins
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, p| p.last > cutoff);
    }
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
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
struct FileEntry {
    path: String,
    size: u64,
    etag: String,
}

/// What a request needs of the installed revision of a package.
pub(crate) struct Installed {
    pub(crate) revision: u32,
    pub(crate) dir: PathBuf,
    files: Vec<FileEntry>,
}

impl Installed {
    fn file(&self, path: &str) -> Option<&FileEntry> {
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

async fn index(State(sh): State<Arc<Shared>>, UrlPath(package): UrlPath<String>) -> Response {
    let inst = match installed(&sh, &package).await {
        Ok(x) => x,
        Err(r) => return r.into_response(),
    };
    let store = match sh.store() {
        Ok(s) => s,
        Err(r) => return r.into_response(),
    };
    let (p, rev) = (package.clone(), inst.revision);
    let rec = match tokio::task::spawn_blocking(move || store.record(&p, rev)).await {
        Ok(Ok(Some(rec))) => rec,
        Ok(Ok(None)) => {
            return error(
                StatusCode::NOT_FOUND,
                format!("this DP holds no package {package:?}"),
            )
        }
        Ok(Err(e)) => return internal(e).into_response(),
        Err(e) => return internal(e).into_response(),
    };
    // Pin the revision: a download of it finishes on it.
    for f in &inst.files {
        let _ = sh.pin(&package, &f.path, &f.etag, &inst.dir.join(&f.path), f.size);
    }
    Json(PackageIndex {
        package: package.clone(),
        revision: inst.revision,
        name: rec.name,
        files: inst
            .files
            .iter()
            .map(|f| IndexFile {
                path: f.path.clone(),
                size: f.size,
                blake3: f.etag.trim_matches('"').to_string(),
            })
            .collect(),
        manifest: base64::engine::general_purpose::STANDARD.encode(&rec.body),
        signature: hex::encode(&rec.signature),
        manifest_key: sh.manifest_key.clone(),
    })
    .into_response()
}

/// What a request's validators choose: the current file or a pinned one.
enum Choice {
    Current,
    Pinned(String, Arc<File>, u64),
    /// `If-Match` names nothing this DP can serve.
    Failed,
}

fn choose(
    sh: &Shared,
    headers: &HeaderMap,
    package: &str,
    path: &str,
    current: Option<&str>,
) -> Choice {
    let text = |h: header::HeaderName| headers.get(h).and_then(|v| v.to_str().ok());
    let validators = text(header::IF_MATCH).or_else(|| text(header::IF_RANGE));
    let Some(v) = validators else {
        return Choice::Current;
    };
    if current.is_some_and(|c| ranges::etag_matches(v, c)) {
        return Choice::Current;
    }
    for e in ranges::etags(v) {
        if let Some((f, size)) = sh.pinned(package, path, e) {
            return Choice::Pinned(e.to_string(), f, size);
        }
    }
    if headers.contains_key(header::IF_MATCH) {
        Choice::Failed
    } else {
        // An If-Range that matches nothing: the whole current file.
        Choice::Current
    }
}

async fn file(
    State(sh): State<Arc<Shared>>,
    UrlPath((package, path)): UrlPath<(String, String)>,
    method: Method,
    headers: HeaderMap,
) -> Response {
    if sh.gate.multicast_only(&package) {
        return error(
            StatusCode::FORBIDDEN,
            format!("package {package} is sent by multicast only: join a multicast session of this DP instead of downloading it over HTTPS"),
        );
    }
    let inst = installed(&sh, &package).await;
    let current = inst
        .as_ref()
        .ok()
        .and_then(|i| i.file(&path).map(|f| (f, &i.dir)));
    let current_tag = current.map(|(f, _)| f.etag.clone());
    let (etag, handle, size) = match choose(&sh, &headers, &package, &path, current_tag.as_deref()) {
        Choice::Pinned(e, f, size) => (e, f, size),
        Choice::Failed => {
            return error(
                StatusCode::PRECONDITION_FAILED,
                "the version asked for (If-Match) is no longer on this DP: read the package index again",
            )
        }
        Choice::Current => {
            let Some((f, dir)) = current else {
                return match inst {
                    Err(r) => r.into_response(),
                    Ok(_) => error(
                        StatusCode::NOT_FOUND,
                        format!("package {package:?} has no file {path:?}"),
                    ),
                };
            };
            match sh.pin(&package, &f.path, &f.etag, &dir.join(&f.path), f.size) {
                Ok(handle) => (f.etag.clone(), handle, f.size),
                Err(e) => {
                    return error(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        format!("cannot open {path}: {e}"),
                    )
                }
            }
        }
    };
    let text = |h: header::HeaderName| headers.get(h).and_then(|v| v.to_str().ok());
    let mut resp = Response::builder()
        .header(header::ETAG, &etag)
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::CACHE_CONTROL, "no-cache");
    if text(header::IF_NONE_MATCH).is_some_and(|v| ranges::etag_matches(v, &etag)) {
        return resp
            .status(StatusCode::NOT_MODIFIED)
            .body(Body::empty())
            .unwrap_or_default();
    }
    // If-Range that names another version: the whole file.
    let if_range_ok = text(header::IF_RANGE).is_none_or(|v| ranges::etag_matches(v, &etag));
    let plan = match text(header::RANGE) {
        Some(r) if if_range_ok => ranges::plan(r, size),
        _ => Plan::Whole,
    };
    let head = method == Method::HEAD;
    let (status, len, segments) = match plan {
        Plan::Unsatisfiable => {
            return resp
                .status(StatusCode::RANGE_NOT_SATISFIABLE)
                .header(header::CONTENT_RANGE, format!("bytes */{size}"))
                .body(Body::empty())
                .unwrap_or_default()
        }
        Plan::Whole => {
            resp = resp.header(header::CONTENT_TYPE, "application/octet-stream");
            (StatusCode::OK, size, vec![Segment::File(0, size)])
        }
        Plan::Parts(parts) if parts.len() == 1 => {
            let (a, b) = parts[0];
            resp = resp
                .header(header::CONTENT_TYPE, "application/octet-stream")
                .header(header::CONTENT_RANGE, ranges::content_range(a, b, size));
            (
                StatusCode::PARTIAL_CONTENT,
                b - a + 1,
                vec![Segment::File(a, b - a + 1)],
            )
        }
        Plan::Parts(parts) => {
            let boundary = format!("ferry-{:016x}", rand::random::<u64>());
            let len = ranges::multipart_len(&boundary, &parts, size);
            let mut segs = Vec::new();
            for &(a, b) in &parts {
                segs.push(Segment::Text(ranges::part_head(&boundary, a, b, size)));
                segs.push(Segment::File(a, b - a + 1));
            }
            segs.push(Segment::Text(ranges::closing(&boundary)));
            resp = resp.header(
                header::CONTENT_TYPE,
                format!("multipart/byteranges; boundary={boundary}"),
            );
            (StatusCode::PARTIAL_CONTENT, len, segs)
        }
    };
    let body = if head {
        Body::empty()
    } else {
        stream(handle, segments)
    };
    resp.status(status)
        .header(header::CONTENT_LENGTH, len)
        .body(body)
        .unwrap_or_default()
}

enum Segment {
    Text(String),
    /// Offset and length in the file.
    File(u64, u64),
}

/// A body read from `file` off the async threads, a block at a time.
fn stream(file: Arc<File>, segments: Vec<Segment>) -> Body {
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(4);
    tokio::task::spawn_blocking(move || {
        for seg in segments {
            match seg {
                Segment::Text(t) => {
                    if tx.blocking_send(Ok(Bytes::from(t))).is_err() {
                        return;
                    }
                }
                Segment::File(mut off, len) => {
                    let end = off + len;
                    while off < end {
                        let n = READ_BLOCK.min((end - off) as usize);
                        let mut buf = vec![0u8; n];
                        let r = file.read_exact_at(&mut buf, off).map(|()| Bytes::from(buf));
                        let failed = r.is_err();
                        if tx.blocking_send(r).is_err() || failed {
                            return;
                        }
                        off += n as u64;
                    }
                }
            }
        }
    });
    Body::from_stream(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|x| (x, rx))
    }))
}

async fn authorize(State(sh): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.to_string())
        .unwrap_or_else(|| "?".into());
    let auth = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.to_str().unwrap_or("(not text)"));
    match sh.gate.check(auth) {
        Ok(_client) => next.run(req).await,
        Err(reason) => {
            warn!(client = %peer, path = %req.uri().path(), %reason, "client refused");
            let mut r = error(StatusCode::UNAUTHORIZED, reason);
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"ferry\""),
            );
            r
        }
    }
}

fn router(sh: Arc<Shared>) -> Router {
    Router::new()
        .route("/content/{package}", get(index))
        .route("/content/{package}/", get(index))
        .route("/content/{package}/{*path}", get(file))
        .merge(crate::multicast::routes())
        .fallback(|| async {
            error(
                StatusCode::NOT_FOUND,
                "no such path: see /content/{package}/",
            )
        })
        .layer(middleware::from_fn_with_state(sh.clone(), authorize))
        .with_state(sh)
}

/// The HTTPS listener, started by [`crate::DpAgent::run`].
pub(crate) struct Listener {
    pub(crate) cfg: ClientsConfig,
    pub(crate) data: PathBuf,
    pub(crate) store: StoreSlot,
    pub(crate) gate: Arc<ClientGate>,
    pub(crate) manifest_key: Vec<u8>,
    /// The multicast sessions.
    pub(crate) multicast: Arc<crate::multicast::Sessions>,
    /// Bumped whenever a new certificate was written.
    pub(crate) cert: watch::Receiver<u64>,
}

fn load_tls(data: &Path) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let read = |f: &str| {
        let p = data.join(f);
        std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))
    };
    let id = ferry_net::tls::Identity::from_pem(
        &read(config::HTTPS_CERT_FILE)?,
        &read(config::HTTPS_KEY_FILE)?,
        "HTTPS certificate",
    )?;
    Ok(ferry_net::tls::https_server(id)?)
}

impl Listener {
    /// Serves until the task is dropped. Waits for a certificate first
    /// (the agent asks the site for one when it connects).
    pub(crate) async fn run(mut self) -> anyhow::Result<()> {
        let mut tls = loop {
            match load_tls(&self.data) {
                Ok(t) => break t,
                Err(e) if self.data.join(config::HTTPS_CERT_FILE).exists() => return Err(e),
                Err(_) => {
                    info!("HTTPS listener waits for its certificate from the site");
                    self.cert.changed().await?;
                }
            }
        };
        let listen = self.cfg.listen;
        let tcp = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| {
                format!(
                    "cannot listen for clients on TCP {listen} ([clients] listen in {})",
                    self.data.join(config::CONFIG_FILE).display()
                )
            })?;
        info!(%listen, names = ?self.cfg.names, "serving clients over HTTPS");
        let sh = Arc::new(Shared {
            store: self.store,
            gate: self.gate,
            manifest_key: hex::encode(&self.manifest_key),
            multicast: self.multicast,
            pins: Mutex::new(HashMap::new()),
            installed: Mutex::new(HashMap::new()),
        });
        let app = router(sh.clone());
        let mut sweep = tokio::time::interval(Duration::from_secs(60));
        loop {
            tokio::select! {
                accepted = tcp.accept() => {
                    let (sock, peer) = match accepted {
                        Ok(x) => x,
                        Err(e) => {
                            warn!(error = %e, "cannot accept a client connection");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    };
                    // Each response's last segment goes out at once: with
                    // Nagle it waits for the client's delayed ACK (40 ms)
                    // before the next range request of a keep-alive
                    // connection can start.
                    let _ = sock.set_nodelay(true);
                    tokio::spawn(connection(sock, peer, tls.clone(), app.clone()));
                }
                changed = self.cert.changed() => {
                    changed?;
                    match load_tls(&self.data) {
                        Ok(t) => {
                            info!("HTTPS certificate renewed");
                            tls = t;
                        }
                        Err(e) => warn!(error = %format!("{e:#}"), "cannot load the new HTTPS certificate; keeping the old one"),
                    }
                }
                _ = sweep.tick() => sh.expire(),
            }
        }
    }
}

/// How long a client may take for the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

async fn connection(
    sock: tokio::net::TcpStream,
    peer: SocketAddr,
    tls: Arc<rustls::ServerConfig>,
    app: Router,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(sock)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            warn!(client = %peer, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            warn!(client = %peer, "TLS handshake timed out");
            return;
        }
    };
    let service =
        hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(ConnectInfo(peer));
            let app = app.clone();
            async move {
                use tower::ServiceExt as _;
                app.oneshot(req.map(Body::new)).await
            }
        });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30))
        .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
    if let Err(e) = conn.await {
        tracing::debug!(client = %peer, error = %e, "client connection ended");
    }
}

/// Requests a certificate for the HTTPS listener over `conn` when there is
/// none yet or its names changed, and writes it (key 0600). Returns whether
/// a new one was written.
pub(crate) async fn ensure_cert(
    conn: &quinn::Connection,
    data: &Path,
    cfg: &ClientsConfig,
) -> anyhow::Result<bool> {
    let names_file = data.join(HTTPS_NAMES_FILE);
    let have = std::fs::read_to_string(&names_file).ok();
    let want = cfg.names.join("\n");
    if data.join(config::HTTPS_CERT_FILE).exists() && have.as_deref() == Some(want.as_str()) {
        return Ok(false);
    }
    let (key_pem, csr) = ferry_net::pki::make_csr("ferry-dp-https")?;
    let (mut send, mut recv) = conn.open_bi().await?;
    let req = pb::Request {
        kind: Some(pb::request::Kind::IssueServerCert(pb::IssueServerCert {
            csr_der: csr.into(),
            names: cfg.names.clone(),
        })),
    };
    ferry_wire::write_frame(&mut send, &req).await?;
    let _ = send.finish();
    let reply: Option<pb::Reply> =
        ferry_wire::read_frame(&mut recv, ferry_wire::MAX_REPLY_BYTES).await?;
    let cert = match reply.and_then(|r| r.kind) {
        Some(pb::reply::Kind::ServerCert(c)) => c.cert_der,
        Some(pb::reply::Kind::Error(e)) => {
            anyhow::bail!("the site refused the HTTPS certificate: {}", e.message)
        }
        _ => anyhow::bail!("the site answered the HTTPS certificate request with something else"),
    };
    let pem = pem::encode(&pem::Pem::new("CERTIFICATE", cert.to_vec()));
    replace(data, config::HTTPS_KEY_FILE, &key_pem, true)?;
    replace(data, config::HTTPS_CERT_FILE, &pem, false)?;
    replace(data, HTTPS_NAMES_FILE, &want, false)?;
    info!(names = ?cfg.names, "HTTPS certificate received from the site");
    Ok(true)
}

/// The names the HTTPS certificate was issued for, one per line.
const HTTPS_NAMES_FILE: &str = "https.names";

/// Writes `name` in `data` through a temporary file and a rename.
fn replace(data: &Path, name: &str, text: &str, secret: bool) -> anyhow::Result<()> {
    let tmp = data.join(format!(".{name}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    if secret {
        ferry_net::pki::write_secret(&tmp, text)?;
    } else {
        ferry_net::pki::write_public(&tmp, text)?;
    }
    let to = data.join(name);
    std::fs::rename(&tmp, &to).with_context(|| format!("cannot write {}", to.display()))
}
