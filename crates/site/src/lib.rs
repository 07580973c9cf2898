//! The Ferry site server as a library.
//!
//! What it is: [`init`] lays down a site's data folder (configuration,
//! operator token, CA, content library); [`Site::open`] and [`Site::run`]
//! serve the operator API and the QUIC endpoint for distribution points over
//! it. Three concerns, a folder each: [`library`] (the content library:
//! packages, import, export), [`servicing`] (update catalog, jobs, the run of
//! a job) and [`distribution`] (the DP registry, the QUIC endpoint, status,
//! validation); [`api`] is the operator API over all three, [`config`] the
//! site's `site.toml`.
//!
//! What it is not: a command-line program (that is `ferry-cli`), and the only
//! process that opens the site's RocksDB: the CLI always goes through the API.

pub mod api;
pub mod config;
pub mod distribution;
pub mod human;
pub mod library;
pub mod metrics;
pub mod servicing;
pub mod web;

pub use ferry_api::{schedule, windows};

use distribution::{endpoint, registry, validation};
use library::packages;
use servicing::{jobs, service};

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ferry_net::pki::PkiError;
use ferry_store::{Library, StoreError};

pub use config::{SiteConfig, CONFIG_FILE, TOKEN_FILE};

/// Folder of the content library inside the data folder.
pub const LIBRARY_DIR: &str = "library";
/// The CA certificate inside the data folder.
pub const CA_CERT_FILE: &str = "ca.pem";
/// The CA private key inside the data folder.
pub const CA_KEY_FILE: &str = "ca.key";
/// The site's QUIC certificate (issued by its CA) inside the data folder.
pub const SITE_CERT_FILE: &str = "site.pem";
/// The key of [`SITE_CERT_FILE`].
pub const SITE_KEY_FILE: &str = "site.key";
/// The manifest signing key (Ed25519, PKCS#8 hex) inside the data folder.
pub const SIGNING_KEY_FILE: &str = "manifest.key";
/// The operator listener's HTTPS certificate (issued by the site CA at
/// start when HTTPS is on and it is missing or its names changed).
pub const OPERATOR_CERT_FILE: &str = "operator-https.pem";
/// The key of [`OPERATOR_CERT_FILE`].
pub const OPERATOR_KEY_FILE: &str = "operator-https.key";
/// The names [`OPERATOR_CERT_FILE`] was issued for, one per line.
const OPERATOR_NAMES_FILE: &str = "operator-https.names";

/// Why a site could not be made, opened or run.
#[derive(Debug, thiserror::Error)]
pub enum SiteError {
    /// `ferry site init` on a folder that holds a site.
    #[error("{} already exists: {} holds a site already", .config.display(), .data.display())]
    Exists {
        /// The site's configuration file.
        config: PathBuf,
        /// The data folder.
        data: PathBuf,
    },
    /// A file or folder of the site.
    #[error("cannot {op} {}: {source}", .path.display())]
    Io {
        /// What was being done ("read the site CA key").
        op: String,
        /// The file or folder.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// `site.toml`.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// A key or certificate.
    #[error(transparent)]
    Pki(#[from] PkiError),
    /// The content library.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The library is open already, most likely by another site.
    #[error("cannot open the content library of the site in {} (is another `ferry site serve` running on it?): {source}", .data.display())]
    Locked {
        /// The data folder.
        data: PathBuf,
        /// What the library said.
        source: StoreError,
    },
    /// DPs, groups and client tokens.
    #[error(transparent)]
    Registry(#[from] registry::HubError),
    /// Servicing jobs.
    #[error(transparent)]
    Jobs(#[from] jobs::JobError),
    /// A listener could not be bound.
    #[error("cannot listen on {what} {addr} ({setting} in {}): {source}", .config.display())]
    Listen {
        /// "UDP" for DPs, "TCP" for the operator API.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// Its setting in `site.toml`.
        setting: &'static str,
        /// `site.toml`.
        config: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The operator API's server stopped.
    #[error("operator API stopped: {0}")]
    Api(std::io::Error),
}

impl SiteError {
    fn io(op: impl Into<String>, path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            op: op.into(),
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Options of `ferry site init`.
#[derive(Clone, Debug)]
pub struct InitOptions {
    /// Site code (three letters or digits).
    pub site_code: String,
    /// Operator API address.
    pub listen: SocketAddr,
    /// QUIC address distribution points dial.
    pub dp_listen: SocketAddr,
}

/// Creates a site in `data`: `site.toml`, `operator.token`, the CA, and an
/// empty content library. Refuses a folder that already holds a site.
pub fn init(data: &Path, opts: &InitOptions) -> Result<(), SiteError> {
    let cfg_path = data.join(CONFIG_FILE);
    if cfg_path.exists() {
        return Err(SiteError::Exists {
            config: cfg_path,
            data: data.to_path_buf(),
        });
    }
    std::fs::create_dir_all(data).map_err(|e| SiteError::io("create", data, e))?;
    let text = SiteConfig::template(&opts.site_code, opts.listen, opts.dp_listen);
    SiteConfig::parse(&text, &cfg_path)?;
    let ca = ferry_net::pki::make_ca(&opts.site_code)?;
    ferry_net::pki::write_secret(&data.join(CA_KEY_FILE), &ca.key_pem)?;
    ferry_net::pki::write_public(&data.join(CA_CERT_FILE), &ca.cert_pem)?;
    ferry_net::pki::write_secret(&data.join(TOKEN_FILE), &ferry_net::pki::random_token()?)?;
    ensure_keys(data, &opts.site_code)?;
    Library::open(&data.join(LIBRARY_DIR))?;
    // The config goes last: its presence marks a complete site.
    std::fs::write(&cfg_path, text).map_err(|e| SiteError::io("write", &cfg_path, e))?;
    Ok(())
}

/// Creates the site certificate and the manifest signing key when missing
/// (sites made before DPs existed have neither).
fn ensure_keys(data: &Path, site_code: &str) -> Result<(), SiteError> {
    if !data.join(SITE_CERT_FILE).exists() {
        let site = ferry_net::pki::issue_site_cert(&read_ca(data)?, site_code)?;
        let _ = std::fs::remove_file(data.join(SITE_KEY_FILE));
        ferry_net::pki::write_secret(&data.join(SITE_KEY_FILE), &site.key_pem)?;
        ferry_net::pki::write_public(&data.join(SITE_CERT_FILE), &site.cert_pem)?;
    }
    if !data.join(SIGNING_KEY_FILE).exists() {
        let key = ferry_net::pki::SigningKey::generate()?;
        ferry_net::pki::write_secret(&data.join(SIGNING_KEY_FILE), &key)?;
    }
    Ok(())
}

pub use ferry_api::{now, rfc3339, to_the_second};

/// Writes `value` as JSON to `path` whole or not at all: a synced temporary
/// file in the same folder, renamed over it, and the folder synced so the
/// rename itself survives a crash.
/// This host's name (`uname -n`), if it has one.
pub fn host_name() -> Option<String> {
    let name = rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .trim()
        .to_string();
    (!name.is_empty()).then_some(name)
}

/// Serves `app` over HTTPS on `listener` until `shutdown` completes; each
/// connection as [`ferry_net::https::connection`] serves it.
async fn serve_https(
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    app: axum::Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((sock, peer)) => {
                    let _ = sock.set_nodelay(true);
                    tokio::spawn(ferry_net::https::connection(sock, peer, tls.clone(), app.clone()));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot accept an operator connection");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            },
        }
    }
}

/// Runs `f`, which waits for the disk, without stalling the async
/// runtime: on a worker of the multi-threaded runtime the worker's other
/// tasks move to another thread while it waits (`block_in_place`); outside
/// one (tests, start-up) it just runs.
pub(crate) fn off_runtime<T>(f: impl FnOnce() -> T) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(h) if h.runtime_flavor() == RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}

pub(crate) fn save_json<T: serde::Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    let body = serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?;
    tmp.write_all(&body)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    std::fs::File::open(dir)?.sync_all()
}

fn read_file(path: &Path, what: &str) -> Result<String, SiteError> {
    std::fs::read_to_string(path).map_err(|e| SiteError::io(format!("read the {what}"), path, e))
}

fn read_ca(data: &Path) -> Result<ferry_net::pki::CaFiles, SiteError> {
    Ok(ferry_net::pki::CaFiles {
        cert_pem: read_file(&data.join(CA_CERT_FILE), "site CA certificate")?,
        key_pem: read_file(&data.join(CA_KEY_FILE), "site CA key")?,
    })
}

/// Reads the operator token from a data folder.
pub fn read_token(data: &Path) -> Result<String, SiteError> {
    Ok(read_file(&data.join(TOKEN_FILE), "operator token")?
        .trim()
        .to_string())
}

/// A site server, open and ready to serve.
pub struct Site {
    data: PathBuf,
    config: SiteConfig,
    token: String,
    lib: Arc<Library>,
    hub: Arc<registry::Hub>,
    jobs: Arc<jobs::Jobs>,
}

impl Site {
    /// Opens the site in `data` (its library is locked while the site runs).
    pub fn open(data: &Path) -> Result<Self, SiteError> {
        let config = SiteConfig::load(data)?;
        let token = read_token(data)?;
        let lib = Library::open(&data.join(LIBRARY_DIR)).map_err(|source| SiteError::Locked {
            data: data.to_path_buf(),
            source,
        })?;
        let lib = Arc::new(lib);
        ensure_keys(data, &config.site_code)?;
        let hub = registry::Hub::open(data, lib.clone())?;
        let jobs = jobs::Jobs::load(data, |package, job| {
            let rec = packages::record(&lib, package).ok()?;
            rec.revisions.iter().find_map(|r| {
                let s = r.service.as_ref().filter(|s| s.job == job)?;
                Some((r.revision, !s.failed.is_empty()))
            })
        })?;
        // Work files a stopped site left behind (exports, job copies).
        let _ = std::fs::remove_dir_all(packages::work_dir(data));
        Ok(Self {
            data: data.to_path_buf(),
            config,
            token,
            lib,
            hub: Arc::new(hub),
            jobs: Arc::new(jobs),
        })
    }

    /// The site's configuration.
    pub fn config(&self) -> &SiteConfig {
        &self.config
    }

    /// The manifest signing key (it signs client tokens too).
    fn signing_key(&self) -> Result<ferry_net::pki::SigningKey, SiteError> {
        Ok(ferry_net::pki::SigningKey::from_text(
            &read_file(&self.data.join(SIGNING_KEY_FILE), "manifest signing key")?,
            "manifest signing key",
        )?)
    }

    /// The operator listener's TLS: its certificate, issued by the site CA
    /// for [`config::OperatorConfig::cert_names`] when missing or when the
    /// names changed.
    fn operator_tls(&self) -> Result<Arc<rustls::ServerConfig>, SiteError> {
        let (cert, key, names_file) = (
            self.data.join(OPERATOR_CERT_FILE),
            self.data.join(OPERATOR_KEY_FILE),
            self.data.join(OPERATOR_NAMES_FILE),
        );
        let names = self.config.operator.cert_names(host_name().as_deref());
        let want = names.join("\n");
        let have = std::fs::read_to_string(&names_file).ok();
        if !cert.exists() || !key.exists() || have.as_deref() != Some(want.as_str()) {
            let (key_pem, csr) = ferry_net::pki::make_csr("ferry-site-operator")?;
            let der = ferry_net::pki::sign_server_csr(
                &read_ca(&self.data)?,
                &csr,
                "ferry-site-operator",
                &names,
            )?;
            // Written new (the writers refuse to overwrite): an old pair
            // goes, as the names it was issued for do.
            for old in [&key, &cert, &names_file] {
                let _ = std::fs::remove_file(old);
            }
            ferry_net::pki::write_secret(&key, &key_pem)?;
            ferry_net::pki::write_public(&cert, &ferry_net::pki::cert_pem(&der))?;
            ferry_net::pki::write_public(&names_file, &want)?;
            tracing::info!(?names, "operator HTTPS certificate issued by the site CA");
        }
        // Damaged files name themselves and the way out: deleted, they are
        // issued again at the next start.
        let what = format!(
            "operator HTTPS certificate {} with key {} (delete both to have the site CA issue them again)",
            cert.display(),
            key.display()
        );
        let id = ferry_net::tls::Identity::from_pem(
            &read_file(&cert, "operator HTTPS certificate")?,
            &read_file(&key, "operator HTTPS key")?,
            &what,
        )?;
        Ok(ferry_net::tls::https_server(id)?)
    }

    /// Binds the QUIC endpoint for DPs and starts answering them.
    /// Returns the endpoint and the connections it holds.
    fn start_dp_endpoint(
        &self,
    ) -> Result<(quinn::Endpoint, Arc<distribution::live::Connections>), SiteError> {
        let ca = read_ca(&self.data)?;
        let ca_der = ferry_net::pki::cert_der(&ca.cert_pem, "site CA certificate")?;
        let identity = ferry_net::tls::Identity::from_pem(
            &read_file(&self.data.join(SITE_CERT_FILE), "site certificate")?,
            &read_file(&self.data.join(SITE_KEY_FILE), "site key")?,
            "site certificate",
        )?;
        let key = self.signing_key()?;
        let server = ferry_net::tls::site_server(&ca_der, identity, self.config.dp.transport())?;
        let listen = self.config.dp.listen;
        let endpoint =
            ferry_net::tls::endpoint(listen, Some(server)).map_err(|source| SiteError::Listen {
                what: "UDP",
                addr: listen,
                setting: "[dp] listen",
                config: self.data.join(CONFIG_FILE),
                source,
            })?;
        let srv = Arc::new(
            endpoint::DpServer::new(
                self.hub.clone(),
                self.lib.clone(),
                ca,
                ca_der.to_vec(),
                key,
                self.config.site_code.clone(),
                self.config.keep_revisions,
            )
            .admitting(distribution::admission::Admission::new(
                self.config.dp.max_enrolling_per_address,
                self.config.dp.max_enrolling,
            )),
        );
        let conns = srv.connections();
        tokio::spawn(srv.serve(endpoint.clone()));
        tracing::info!(%listen, "site serving distribution points (QUIC)");
        Ok((endpoint, conns))
    }

    /// Serves the operator API and the DP endpoint until `shutdown`
    /// completes.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), SiteError> {
        let listen = self.config.operator.listen;
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|source| SiteError::Listen {
                what: "TCP",
                addr: listen,
                setting: "operator.listen",
                config: self.data.join(CONFIG_FILE),
                source,
            })?;
        let tls = match self.config.operator.https() {
            true => Some(self.operator_tls()?),
            false => None,
        };
        let (endpoint, conns) = self.start_dp_endpoint()?;
        let (lib, data, hub) = (self.lib.clone(), self.data.clone(), self.hub.clone());
        let keep = self.config.keep_revisions;
        let metrics = Arc::new(metrics::Metrics::default());
        let counted = metrics.clone();
        tokio::spawn(self.jobs.clone().scheduler(move |job| {
            let started = std::time::Instant::now();
            let mut run = service::run(&lib, &data, job);
            counted.serviced(run.outcome.name(), started.elapsed());
            if run.revision.is_some() {
                if run.distributed {
                    hub.notify();
                }
                run.pruned = hub.prune(&lib, &job.package, keep);
            }
            run
        }));
        tokio::spawn(validation::scheduler(self.hub.clone()));
        let state = api::ApiState {
            hub: self.hub.clone(),
            conns,
            lib: self.lib.clone(),
            data: self.data.clone(),
            site_code: self.config.site_code.clone(),
            token_hash: blake3::hash(self.token.as_bytes()),
            jobs: self.jobs.clone(),
            dp_listen: endpoint.local_addr().unwrap_or(self.config.dp.listen),
            keep_revisions: self.config.keep_revisions,
            signing_key: Arc::new(self.signing_key()?),
            metrics,
            sessions: Default::default(),
            https: tls.is_some(),
        };
        let app = api::router(state);
        match tls {
            Some(tls) => {
                tracing::info!(%listen, data = %self.data.display(), "site serving the operator API over HTTPS");
                serve_https(listener, tls, app, shutdown).await;
            }
            None => {
                tracing::info!(%listen, data = %self.data.display(), "site serving the operator API");
                axum::serve(listener, app)
                    .with_graceful_shutdown(shutdown)
                    .await
                    .map_err(SiteError::Api)?;
            }
        }
        endpoint.close(0u32.into(), b"site stopping");
        // Progress reports kept in memory only.
        self.hub.flush()?;
        Ok(())
    }
}
