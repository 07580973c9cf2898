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

mod content;
mod multicast;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::error::{DpError, Result};
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use ferry_wire::pb;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::{self, ClientsConfig};
pub use crate::gate::ClientGate;
use crate::served::{error, Shared, StoreSlot};
pub use crate::served::{MAX_PINS, PIN_IDLE};
pub use content::{IndexFile, PackageIndex};
pub use multicast::MulticastList;

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
        .route("/content/{package}", get(content::index))
        .route("/content/{package}/", get(content::index))
        .route("/content/{package}/{*path}", get(content::file))
        .merge(multicast::routes())
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

fn load_tls(data: &Path) -> Result<Arc<rustls::ServerConfig>> {
    let read = |f: &str| {
        let p = data.join(f);
        std::fs::read_to_string(&p).map_err(|e| DpError::io("read", &p, e))
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
    pub(crate) async fn run(mut self) -> Result<()> {
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
        let tcp = tokio::net::TcpListener::bind(listen).await.map_err(|e| {
            DpError::net(
                format!(
                    "cannot listen for clients on TCP {listen} ([clients] listen in {})",
                    self.data.join(config::CONFIG_FILE).display()
                ),
                e,
            )
        })?;
        info!(%listen, names = ?self.cfg.names, "serving clients over HTTPS");
        let sh = Arc::new(Shared::new(
            self.store,
            self.gate,
            hex::encode(&self.manifest_key),
            self.multicast,
        ));
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
                    tokio::spawn(ferry_net::https::connection(sock, peer, tls.clone(), app.clone()));
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

/// Requests a certificate for the HTTPS listener over `conn` when there is
/// none yet or its names changed, and writes it (key 0600). Returns whether
/// a new one was written.
pub(crate) async fn ensure_cert(
    conn: &quinn::Connection,
    data: &Path,
    cfg: &ClientsConfig,
) -> Result<bool> {
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
    let cert = crate::error::answer(reply, "the HTTPS certificate", |k| match k {
        pb::reply::Kind::ServerCert(c) => Some(c.cert_der),
        _ => None,
    })?;
    let pem = ferry_net::pki::cert_pem(&cert);
    replace(data, config::HTTPS_KEY_FILE, &key_pem, true)?;
    replace(data, config::HTTPS_CERT_FILE, &pem, false)?;
    replace(data, HTTPS_NAMES_FILE, &want, false)?;
    info!(names = ?cfg.names, "HTTPS certificate received from the site");
    Ok(true)
}

/// The names the HTTPS certificate was issued for, one per line.
const HTTPS_NAMES_FILE: &str = "https.names";

/// Writes `name` in `data` through a temporary file and a rename.
fn replace(data: &Path, name: &str, text: &str, secret: bool) -> Result<()> {
    let tmp = data.join(format!(".{name}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    if secret {
        ferry_net::pki::write_secret(&tmp, text)?;
    } else {
        ferry_net::pki::write_public(&tmp, text)?;
    }
    let to = data.join(name);
    std::fs::rename(&tmp, &to).map_err(|e| DpError::io("write", &to, e))
}
