//! The Ferry distribution point (DP) agent as a library.
//!
//! What it is: [`enroll`] turns an empty folder into an enrolled DP (key,
//! certificate from the site CA, pinned CA, the site's manifest key);
//! [`agent::DpAgent`] keeps the DP's content in step with what the site
//! assigned to it: it fetches signed manifests ([`manifest`]), copies what
//! it holds already and asks for the chunks it lacks over a few long-lived
//! QUIC streams ([`transfer`]), verifies each against its id and writes it
//! in place in the revision's files (the content folder is the store;
//! RocksDB only indexes it: `ferry_store::ContentStore`), and re-hashes and
//! repairs what it holds when the site asks ([`validate`]).
//!
//! [`http`] serves the installed content to the computers being deployed
//! over HTTPS (client tokens, byte ranges: [`ranges`]), and sends a
//! package to many of them at once by multicast ([`multicast`]).
//!
//! The DP dials the site; the site never dials the DP.

pub mod agent;
mod chunks;
pub mod config;
mod error;
mod gate;
pub mod http;
pub mod manifest;
pub mod metrics;
pub mod multicast;
mod peers;
pub mod prestage;
mod pull;
pub mod ranges;
mod report;
mod served;
pub mod transfer;
pub mod validate;

use std::net::SocketAddr;
use std::path::Path;

use ferry_net::pki::EnrollToken;
use ferry_wire::pb::{self, reply, request};
use ferry_wire::{read_frame, write_frame, MAX_REPLY_BYTES};

pub use agent::DpAgent;
pub use config::DpConfig;
pub use error::DpError;

use error::Context as _;

/// Opens the DP's content store. A DP of the layout before protocol
/// version 2 (a `library/` with a second copy of every chunk) keeps its
/// installed packages: they are adopted into the index and the old library
/// goes.
pub fn open_store(data: &Path, cfg: &DpConfig) -> Result<ferry_store::ContentStore, DpError> {
    let index = data.join(config::INDEX_DIR);
    let content = cfg.content_dir(data);
    let old = data.join(config::OLD_LIBRARY_DIR);
    let mut adopt = Vec::new();
    if old.is_dir() {
        tracing::info!(library = %old.display(), "migrating a DP of the older layout");
        let lib = ferry_store::Library::open(&old)
            .with_context(|| format!("cannot open the old library {}", old.display()))?;
        for (package, revision) in ferry_store::content::linked(&content) {
            let ms = lib.manifests(&package, revision)?;
            if !ms.is_empty() {
                adopt.push((package, revision, ms));
            }
        }
    }
    let store =
        ferry_store::ContentStore::open_adopting(&index, &content, adopt).with_context(|| {
            format!(
                "cannot open the DP's index in {} (is another `ferry dp serve` running on it?)",
                index.display()
            )
        })?;
    if old.is_dir() {
        std::fs::remove_dir_all(&old)
            .map_err(|e| DpError::io("remove the old library", &old, e))?;
        tracing::info!("migrated: installed packages kept, the old chunk library removed");
    }
    Ok(store)
}

/// Resolves `HOST:PORT`.
pub async fn resolve(site: &str) -> Result<SocketAddr, DpError> {
    tokio::net::lookup_host(site)
        .await
        .map_err(|e| {
            DpError::net(
                format!("cannot resolve the site address {site:?} (expected HOST:PORT)"),
                e,
            )
        })?
        .next()
        .ok_or_else(|| DpError::Usage(format!("the site address {site:?} resolves to nothing")))
}

/// A client endpoint on an ephemeral port of the right address family.
pub fn client_endpoint(site: SocketAddr) -> Result<quinn::Endpoint, DpError> {
    let bind: SocketAddr = if site.is_ipv6() {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    };
    ferry_net::tls::endpoint(bind, None)
        .map_err(|e| DpError::net(format!("cannot open a UDP socket on {bind}"), e))
}

/// What marks a site's data folder (`ferry site init` writes it).
const SITE_CONFIG_FILE: &str = "site.toml";

/// Refuses, before anything is sent to the site (the token stays unused),
/// a folder that is a site's or holds anything else already: a DP's files
/// must not land among another's.
fn check_folder(data: &Path) -> Result<(), DpError> {
    if data.join(SITE_CONFIG_FILE).exists() {
        return Err(DpError::Usage(format!(
            "{} is a site's data folder (it holds {SITE_CONFIG_FILE}): give the DP a folder of its own with --data DIR (FERRY_DATA may point at the site)",
            data.display()
        )));
    }
    match std::fs::read_dir(data) {
        Ok(mut entries) => {
            if let Some(e) = entries.next() {
                let first = e.map(|e| e.file_name().to_string_lossy().into_owned());
                return Err(DpError::Usage(format!(
                    "{} is not empty ({} and maybe more) and is not a DP's folder: give the DP an empty or new folder with --data DIR",
                    data.display(),
                    first.unwrap_or_else(|_| "an unreadable entry".into())
                )));
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(DpError::io("read", data, e)),
    }
}

/// How long `dp init` waits for the site to answer at all.
const ENROLL_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Enrolls the folder `data` with the site at `site` using a token from
/// `ferry dp add`. Writes `dp.toml`, the key, the certificate, the pinned
/// CA and the manifest key, and creates the library and content folder.
/// Nothing is written until the site has answered. With `clients`, the DP
/// also serves computers over HTTPS there (its certificate comes from the
/// site when the agent first connects); with `peers`, pull DPs over QUIC.
pub async fn enroll(
    data: &Path,
    site: &str,
    token: &str,
    clients: Option<config::ClientsConfig>,
    peers: Option<config::PeersConfig>,
) -> Result<DpConfig, DpError> {
    let cfg_path = data.join(config::CONFIG_FILE);
    if cfg_path.exists() {
        return Err(DpError::Usage(format!(
            "{} exists: {} is enrolled already",
            cfg_path.display(),
            data.display()
        )));
    }
    check_folder(data)?;
    if let Some(c) = &clients {
        ferry_net::pki::check_server_names(&c.names).context("--client-name")?;
    }
    let token: EnrollToken = token.parse()?;
    let addr = resolve(site).await?;
    let (key_pem, csr) = ferry_net::pki::make_csr("ferry-dp")?;
    let endpoint = client_endpoint(addr)?;
    let client = ferry_net::tls::enroll_client(&token.ca_fingerprint)?;
    let connecting = endpoint
        .connect_with(client, addr, ferry_net::pki::SITE_SERVER_NAME)
        .map_err(|e| {
            DpError::net(
                format!("cannot dial the site at {site}"),
                std::io::Error::other(e),
            )
        })?;
    let conn = match tokio::time::timeout(ENROLL_CONNECT_TIMEOUT, connecting).await {
        Ok(c) => c.with_context(|| format!("cannot enroll with the site at {site}"))?,
        Err(_) => return Err(DpError::protocol(format!(
            "no site answered at {site} (UDP {addr}) within {} s: is `ferry site serve` running there, and is this its [dp] listen address? (`ferry dp add` prints it)",
            ENROLL_CONNECT_TIMEOUT.as_secs()
        ))),
    };
    let (mut send, mut recv) = conn.open_bi().await?;
    let req = pb::Request {
        kind: Some(request::Kind::Enroll(pb::Enroll {
            token: token.secret.clone(),
            csr_der: csr.into(),
        })),
    };
    write_frame(&mut send, &req).await?;
    let _ = send.finish();
    let reply: Option<pb::Reply> = read_frame(&mut recv, MAX_REPLY_BYTES).await?;
    conn.close(0u32.into(), b"enrolled");
    let e = error::answer(reply, "the enrollment", |k| match k {
        reply::Kind::Enrolled(e) => Some(e),
        _ => None,
    })?;
    if ferry_net::pki::fingerprint(&e.ca_der) != token.ca_fingerprint {
        return Err(DpError::protocol(
            "the site sent a CA other than the one the token names",
        ));
    }
    std::fs::create_dir_all(data).map_err(|e| DpError::io("create", data, e))?;
    ferry_net::pki::write_secret(&data.join(config::KEY_FILE), &key_pem)?;
    ferry_net::pki::write_public(
        &data.join(config::CERT_FILE),
        &ferry_net::pki::cert_pem(&e.cert_der),
    )?;
    ferry_net::pki::write_public(
        &data.join(config::CA_FILE),
        &ferry_net::pki::cert_pem(&e.ca_der),
    )?;
    ferry_net::pki::write_public(
        &data.join(config::MANIFEST_KEY_FILE),
        &hex::encode(&e.manifest_key),
    )?;
    let cfg = DpConfig {
        name: e.dp_name,
        site: site.to_string(),
        site_code: e.site_code,
        content: config::CONTENT_DIR.into(),
        congestion: Default::default(),
        cipher: Default::default(),
        clients,
        peers,
        metrics: None,
    };
    let content = cfg.content_dir(data);
    std::fs::create_dir_all(&content).map_err(|e| DpError::io("create", &content, e))?;
    open_store(data, &cfg)?;
    // The configuration goes last: its presence marks a complete enrollment.
    std::fs::write(&cfg_path, cfg.to_text()).map_err(|e| DpError::io("write", &cfg_path, e))?;
    Ok(cfg)
}
