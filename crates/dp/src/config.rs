//! `dp.toml` and the files of a DP's data folder.

use std::path::{Path, PathBuf};

use crate::error::{Context as _, DpError};
use serde::{Deserialize, Serialize};

/// The DP's configuration file inside its data folder.
pub const CONFIG_FILE: &str = "dp.toml";
/// The site CA certificate, pinned at enrollment.
pub const CA_FILE: &str = "ca.pem";
/// The DP's certificate, issued by the site CA.
pub const CERT_FILE: &str = "dp.pem";
/// The DP's private key.
pub const KEY_FILE: &str = "dp.key";
/// The site's manifest signing key (Ed25519 public key, hex).
pub const MANIFEST_KEY_FILE: &str = "manifest.pub";
/// The certificate of the DP's HTTPS listener, issued by the site CA.
pub const HTTPS_CERT_FILE: &str = "https.pem";
/// Its private key.
pub const HTTPS_KEY_FILE: &str = "https.key";
/// The DP's index of its content (RocksDB).
pub const INDEX_DIR: &str = "index";
/// Where DPs before protocol version 2 kept a second copy of every chunk;
/// migrated (and removed) at the first start.
pub const OLD_LIBRARY_DIR: &str = "library";
/// Default content folder.
pub const CONTENT_DIR: &str = "content";

/// A DP's configuration, read from `DIR/dp.toml`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DpConfig {
    /// The name the site knows this DP by (set at enrollment).
    pub name: String,
    /// The site's QUIC endpoint, `HOST:PORT`.
    pub site: String,
    /// The site's code.
    pub site_code: String,
    /// Where assigned packages stand rebuilt, one folder per package id;
    /// relative paths are inside the data folder.
    #[serde(default = "default_content")]
    pub content: PathBuf,
    /// Congestion control of what the DP sends (`bbr` or `cubic`).
    #[serde(default)]
    pub congestion: ferry_net::tls::Congestion,
    /// Preferred cipher (`aes-128-gcm`, `aes-256-gcm`, `chacha20-poly1305`).
    #[serde(default)]
    pub cipher: ferry_net::tls::Cipher,
    /// The HTTPS listener for clients, when the DP serves them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clients: Option<ClientsConfig>,
    /// The QUIC listener pull DPs take chunks from, when it is a source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peers: Option<PeersConfig>,
    /// Where Prometheus reads the DP's metrics, when it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<MetricsConfig>,
}

/// `[metrics]` of `dp.toml`: where the DP serves `/metrics` (plain HTTP).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// TCP address to listen on, `IP:PORT` (`127.0.0.1:9464`, or the
    /// address Prometheus reaches).
    pub listen: std::net::SocketAddr,
}

/// `[peers]` of `dp.toml`: where the DP serves chunks to pull DPs
/// (`ferry dp set OTHER --pull-from THIS`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeersConfig {
    /// UDP address to listen on, `IP:PORT`; an unspecified IP (0.0.0.0)
    /// listens everywhere, and pull DPs dial the address this DP reaches
    /// the site from.
    pub listen: std::net::SocketAddr,
}

/// `[clients]` of `dp.toml`: where the DP serves computers over HTTPS.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientsConfig {
    /// Address to listen on, `IP:PORT`.
    pub listen: std::net::SocketAddr,
    /// Host names and addresses clients use to reach it: the names of its
    /// certificate (the site CA issues it when the DP first connects, and
    /// again when these change).
    pub names: Vec<String>,
}

fn default_content() -> PathBuf {
    PathBuf::from(CONTENT_DIR)
}

impl DpConfig {
    /// The commented text written at enrollment.
    pub fn to_text(&self) -> String {
        format!(
            "# Ferry distribution point, enrolled with site {code}.\n\
             # Read by `ferry dp serve --data DIR`.\n\
             \n\
             # The name the site knows this DP by (the subject of dp.pem).\n\
             name = \"{name}\"\n\
             # The site's QUIC endpoint (its [dp] listen address).\n\
             site = \"{site}\"\n\
             site_code = \"{code}\"\n\
             # Where assigned packages stand rebuilt, one folder per package id.\n\
             content = \"{content}\"\n",
            name = self.name,
            site = self.site,
            code = self.site_code,
            content = self.content.display(),
        ) + &self
            .clients
            .as_ref()
            .map(|c| {
                format!(
                    "\n# HTTPS for the computers that download from this DP.\n\
                     [clients]\n\
                     listen = \"{}\"\n\
                     # The names of its certificate (from the site CA).\n\
                     names = [{}]\n",
                    c.listen,
                    c.names
                        .iter()
                        .map(|n| format!("{n:?}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })
            .unwrap_or_default()
            + &self
                .peers
                .as_ref()
                .map(|p| {
                    format!(
                        "\n# QUIC for the pull DPs that take chunks from this DP.\n\
                         [peers]\n\
                         listen = \"{}\"\n",
                        p.listen
                    )
                })
                .unwrap_or_default()
            + &self
                .metrics
                .as_ref()
                .map(|m| {
                    format!(
                        "\n# Prometheus metrics at http://ADDR/metrics.\n\
                         [metrics]\n\
                         listen = \"{}\"\n",
                        m.listen
                    )
                })
                .unwrap_or_default()
    }

    /// Parses configuration text; `path` only names the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, DpError> {
        toml::from_str(text).map_err(|e| DpError::Config {
            path: path.to_path_buf(),
            source: Box::new(e),
        })
    }

    /// Reads `DIR/dp.toml`.
    pub fn load(data: &Path) -> Result<Self, DpError> {
        let path = data.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&path)
            .map_err(|e| DpError::io("read", &path, e))
            .with_context(|| {
                format!(
                    "{} is not an enrolled DP folder (enroll it first: `ferry dp init --data {} --site HOST:PORT --token TOKEN`)",
                    data.display(),
                    data.display()
                )
            })?;
        Self::parse(&text, &path)
    }

    /// The transport settings.
    pub fn transport(&self) -> ferry_net::tls::TransportOptions {
        ferry_net::tls::TransportOptions {
            congestion: self.congestion,
            cipher: self.cipher,
        }
    }

    /// The content folder, resolved against the data folder.
    pub fn content_dir(&self, data: &Path) -> PathBuf {
        data.join(&self.content)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_parses_back_and_unknown_keys_fail() {
        let c = DpConfig {
            name: "dp1".into(),
            site: "127.0.0.1:4433".into(),
            site_code: "FRY".into(),
            content: "content".into(),
            congestion: Default::default(),
            cipher: Default::default(),
            clients: None,
            peers: None,
            metrics: None,
        };
        assert_eq!(DpConfig::parse(&c.to_text(), Path::new("x")).unwrap(), c);
        let with = DpConfig {
            clients: Some(ClientsConfig {
                listen: "0.0.0.0:8443".parse().unwrap(),
                names: vec!["dp1.example".into(), "10.0.0.5".into()],
            }),
            peers: Some(PeersConfig {
                listen: "0.0.0.0:7444".parse().unwrap(),
            }),
            metrics: Some(MetricsConfig {
                listen: "127.0.0.1:9464".parse().unwrap(),
            }),
            ..c.clone()
        };
        assert_eq!(
            DpConfig::parse(&with.to_text(), Path::new("x")).unwrap(),
            with
        );
        let e = DpConfig::parse(&format!("{}colour = 1\n", c.to_text()), Path::new("d.toml"));
        assert!(format!("{:#}", e.unwrap_err()).contains("colour"));
    }

    #[test]
    fn deploy_dp_toml_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/dp.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        DpConfig::parse(&text, &path).unwrap();
    }
}
