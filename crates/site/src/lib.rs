//! The Ferry site server as a library.
//!
//! What it is: [`init`] lays down a site's data folder (configuration,
//! operator token, CA, content library); [`Site::open`] and [`Site::run`]
//! serve the operator API over it. [`images`] holds the import, inspect,
//! export, verify and remove operations; [`ingest`] streams a file into the
//! library; [`catalog`] is what the site records per package.
//!
//! What it is not: a command-line program (that is `ferry-cli`), and the only
//! process that opens the site's RocksDB: the CLI always goes through the API.

pub mod api;
pub mod catalog;
pub mod config;
pub mod images;
pub mod ingest;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use ferry_store::Library;

pub use config::{SiteConfig, CONFIG_FILE, TOKEN_FILE};

/// Folder of the content library inside the data folder.
pub const LIBRARY_DIR: &str = "library";
/// The CA certificate inside the data folder.
pub const CA_CERT_FILE: &str = "ca.pem";
/// The CA private key inside the data folder.
pub const CA_KEY_FILE: &str = "ca.key";

/// Options of `ferry site init`.
#[derive(Clone, Debug)]
pub struct InitOptions {
    /// Site code (three letters or digits).
    pub site_code: String,
    /// Operator API address.
    pub listen: SocketAddr,
}

/// Creates a site in `data`: `site.toml`, `operator.token`, the CA, and an
/// empty content library. Refuses a folder that already holds a site.
pub fn init(data: &Path, opts: &InitOptions) -> anyhow::Result<()> {
    let cfg_path = data.join(CONFIG_FILE);
    if cfg_path.exists() {
        anyhow::bail!(
            "{} already exists: {} holds a site already",
            cfg_path.display(),
            data.display()
        );
    }
    std::fs::create_dir_all(data).with_context(|| format!("cannot create {}", data.display()))?;
    let text = SiteConfig::template(&opts.site_code, opts.listen);
    SiteConfig::parse(&text, &cfg_path)?;
    let ca = ferry_net::pki::make_ca(&opts.site_code)?;
    ferry_net::pki::write_secret(&data.join(CA_KEY_FILE), &ca.key_pem)?;
    ferry_net::pki::write_public(&data.join(CA_CERT_FILE), &ca.cert_pem)?;
    ferry_net::pki::write_secret(&data.join(TOKEN_FILE), &ferry_net::pki::random_token()?)?;
    Library::open(&data.join(LIBRARY_DIR))?;
    // The config goes last: its presence marks a complete site.
    std::fs::write(&cfg_path, text)
        .with_context(|| format!("cannot write {}", cfg_path.display()))?;
    Ok(())
}

/// Reads the operator token from a data folder.
pub fn read_token(data: &Path) -> anyhow::Result<String> {
    let p = data.join(TOKEN_FILE);
    let t = std::fs::read_to_string(&p)
        .with_context(|| format!("cannot read the operator token {}", p.display()))?;
    Ok(t.trim().to_string())
}

/// A site server, open and ready to serve.
pub struct Site {
    data: PathBuf,
    config: SiteConfig,
    token: String,
    lib: Arc<Library>,
}

impl Site {
    /// Opens the site in `data` (its library is locked while the site runs).
    pub fn open(data: &Path) -> anyhow::Result<Self> {
        let config = SiteConfig::load(data)?;
        let token = read_token(data)?;
        let lib = Library::open(&data.join(LIBRARY_DIR))
            .with_context(|| format!("cannot open the content library of the site in {} (is another `ferry site serve` running on it?)", data.display()))?;
        Ok(Self {
            data: data.to_path_buf(),
            config,
            token,
            lib: Arc::new(lib),
        })
    }

    /// The site's configuration.
    pub fn config(&self) -> &SiteConfig {
        &self.config
    }

    /// Serves the operator API until `shutdown` completes.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let listen = self.config.operator.listen;
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| {
                format!(
                    "cannot listen on {listen} (operator.listen in {})",
                    self.data.join(CONFIG_FILE).display()
                )
            })?;
        let state = api::ApiState {
            lib: self.lib.clone(),
            data: self.data.clone(),
            site_code: self.config.site_code.clone(),
            token_hash: blake3::hash(self.token.as_bytes()),
        };
        tracing::info!(%listen, data = %self.data.display(), "site serving the operator API");
        axum::serve(listener, api::router(state))
            .with_graceful_shutdown(shutdown)
            .await
            .context("operator API stopped")?;
        Ok(())
    }
}
