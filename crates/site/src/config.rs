//! `site.toml`: the site server's configuration.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// File name of the configuration inside the data folder.
pub const CONFIG_FILE: &str = "site.toml";
/// File name of the operator API token inside the data folder.
pub const TOKEN_FILE: &str = "operator.token";
/// Default address of the operator API.
pub const DEFAULT_OPERATOR_LISTEN: &str = "127.0.0.1:4480";
/// Default address of the QUIC endpoint distribution points dial.
pub const DEFAULT_DP_LISTEN: &str = "0.0.0.0:4433";

/// The site server's configuration, read from `DIR/site.toml`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteConfig {
    /// Three letters or digits that start every package id (`FRY00001`).
    pub site_code: String,
    /// Revisions kept per package once every DP holds the released one: the
    /// newest ones (and always the released one). A package's own `--keep`
    /// overrides it.
    #[serde(default = "default_keep")]
    pub keep_revisions: u32,
    /// The operator API (CLI, status page).
    pub operator: OperatorConfig,
    /// The endpoint distribution points connect to.
    #[serde(default)]
    pub dp: DpEndpointConfig,
}

fn default_keep() -> u32 {
    1
}

/// Where distribution points reach the site.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DpEndpointConfig {
    /// UDP address of the QUIC endpoint (mutual TLS with the site CA).
    pub listen: SocketAddr,
    /// Congestion control of what the site sends: `bbr` (default; keeps
    /// lossy WAN links full) or `cubic`.
    #[serde(default)]
    pub congestion: ferry_net::tls::Congestion,
    /// Preferred cipher: `aes-128-gcm` (default), `aes-256-gcm` or
    /// `chacha20-poly1305`.
    #[serde(default)]
    pub cipher: ferry_net::tls::Cipher,
    /// Connections without a DP certificate (enrolling DPs) held open at
    /// once; more are closed at once.
    #[serde(default = "default_max_enrolling")]
    pub max_enrolling: usize,
    /// Of those, from one source address.
    #[serde(default = "default_max_enrolling_per_address")]
    pub max_enrolling_per_address: usize,
}

fn default_max_enrolling() -> usize {
    crate::distribution::admission::DEFAULT_TOTAL
}

fn default_max_enrolling_per_address() -> usize {
    crate::distribution::admission::DEFAULT_PER_ADDRESS
}

impl DpEndpointConfig {
    /// The transport settings this section gives.
    pub fn transport(&self) -> ferry_net::tls::TransportOptions {
        ferry_net::tls::TransportOptions {
            congestion: self.congestion,
            cipher: self.cipher,
        }
    }
}

impl Default for DpEndpointConfig {
    fn default() -> Self {
        Self {
            // A constant that parses.
            listen: DEFAULT_DP_LISTEN
                .parse()
                .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 4433))),
            congestion: Default::default(),
            cipher: Default::default(),
            max_enrolling: default_max_enrolling(),
            max_enrolling_per_address: default_max_enrolling_per_address(),
        }
    }
}

/// Where operators reach the site.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperatorConfig {
    /// Address the operator API and the status page listen on; every
    /// request needs the token in `operator.token`.
    pub listen: SocketAddr,
    /// HTTPS with a certificate from the site CA. Off loopback it is always
    /// on (`false` is refused: a bearer token never crosses a network in
    /// clear); on loopback it is off unless `true`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<bool>,
    /// Names the HTTPS certificate holds besides the defaults (this host's
    /// name, `localhost`, 127.0.0.1 and the listen address).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub names: Vec<String>,
}

impl OperatorConfig {
    /// Whether the listener speaks HTTPS.
    pub fn https(&self) -> bool {
        self.tls.unwrap_or(!self.listen.ip().is_loopback())
    }

    /// The URL a CLI on this host uses: `https://` or `http://`, with a
    /// wildcard listen address (0.0.0.0, ::) reached on loopback.
    pub fn url(&self) -> String {
        let mut at = self.listen;
        if at.ip().is_unspecified() {
            at.set_ip(match at {
                SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        format!("{}://{at}", if self.https() { "https" } else { "http" })
    }

    /// The names the HTTPS certificate holds: `host` (this machine's name),
    /// `localhost`, both loopback addresses, the listen address when it is
    /// a specific one, and [`OperatorConfig::names`].
    pub fn cert_names(&self, host: Option<&str>) -> Vec<String> {
        let mut names: Vec<String> = host.into_iter().map(str::to_string).collect();
        names.extend(["localhost", "127.0.0.1", "::1"].map(String::from));
        if !self.listen.ip().is_unspecified() {
            names.push(self.listen.ip().to_string());
        }
        names.extend(self.names.iter().cloned());
        let mut seen = std::collections::HashSet::new();
        names.retain(|n| seen.insert(n.clone()));
        names
    }
}

/// A configuration file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid configuration.
    #[error("{path} is not a valid site configuration: {detail}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message (names the line and key).
        detail: String,
    },
}

impl SiteConfig {
    /// The commented default written by `ferry site init`.
    pub fn template(site_code: &str, listen: SocketAddr, dp_listen: SocketAddr) -> String {
        format!(
            "# Ferry site server configuration.\n\
             # Read by `ferry site serve --data DIR` and by the CLI to find the site.\n\
             \n\
             # Three letters or digits that start every package id (FRY00001).\n\
             site_code = \"{site_code}\"\n\
             \n\
             # Revisions kept per package once every DP holds the released one:\n\
             # the newest ones, and always the released one (`ferry image rollback`\n\
             # can go back to any kept revision). `ferry image set ID --keep N`\n\
             # sets it for one package.\n\
             keep_revisions = 1\n\
             \n\
             [operator]\n\
             # Address of the operator API and the status page (/ui/). Every\n\
             # request needs the token in operator.token. Off loopback it speaks\n\
             # HTTPS only, with a certificate from the site CA (the CLI pins\n\
             # ca.pem); `tls = true` turns HTTPS on for loopback too, and\n\
             # `names = [\"site.example\"]` adds names to its certificate.\n\
             listen = \"{listen}\"\n\
             \n\
             [dp]\n\
             # UDP address of the QUIC endpoint distribution points dial\n\
             # (`ferry dp init --site HOST:PORT`). Mutual TLS with the site CA.\n\
             listen = \"{dp_listen}\"\n\
             # Congestion control of what the site sends to DPs: \"bbr\" keeps\n\
             # lossy WAN links full, \"cubic\" backs off on every loss.\n\
             congestion = \"bbr\"\n\
             # Preferred cipher: \"aes-128-gcm\", \"aes-256-gcm\" or \"chacha20-poly1305\".\n\
             cipher = \"aes-128-gcm\"\n\
             # Connections without a DP certificate (DPs enrolling) held at once, in\n\
             # all and from one address; each lasts at most a minute.\n\
             max_enrolling = 64\n\
             max_enrolling_per_address = 4\n"
        )
    }

    /// Parses configuration text; `path` only names the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let cfg: SiteConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
        let code_ok =
            cfg.site_code.len() == 3 && cfg.site_code.chars().all(|c| c.is_ascii_alphanumeric());
        if cfg.keep_revisions == 0 {
            return Err(ConfigError::Parse {
                path: path.to_path_buf(),
                detail: "keep_revisions must be 1 or more (the released revision is always kept)"
                    .into(),
            });
        }
        if cfg.dp.max_enrolling == 0 || cfg.dp.max_enrolling_per_address == 0 {
            return Err(ConfigError::Parse {
                path: path.to_path_buf(),
                detail: "[dp] max_enrolling and max_enrolling_per_address must be 1 or more (0 would refuse every new DP)".into(),
            });
        }
        if !cfg.operator.listen.ip().is_loopback() && cfg.operator.tls == Some(false) {
            return Err(ConfigError::Parse {
                path: path.to_path_buf(),
                detail: format!(
                    "[operator] tls = false with listen = \"{}\": off loopback the operator API speaks HTTPS only \
                     (a bearer token must not cross a network in clear); remove `tls = false`, or listen on 127.0.0.1",
                    cfg.operator.listen
                ),
            });
        }
        if !cfg.operator.names.is_empty() {
            ferry_net::pki::check_server_names(&cfg.operator.names).map_err(|e| {
                ConfigError::Parse {
                    path: path.to_path_buf(),
                    detail: format!("[operator] names: {e}"),
                }
            })?;
        }
        if !code_ok {
            return Err(ConfigError::Parse {
                path: path.to_path_buf(),
                detail: format!(
                    "site_code {:?} must be three letters or digits",
                    cfg.site_code
                ),
            });
        }
        Ok(cfg)
    }

    /// Reads `DIR/site.toml`.
    pub fn load(dir: &Path) -> Result<Self, ConfigError> {
        let path = dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        Self::parse(&text, &path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_parses_back() {
        let addr: SocketAddr = DEFAULT_OPERATOR_LISTEN.parse().unwrap();
        let dp: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let cfg =
            SiteConfig::parse(&SiteConfig::template("FRY", addr, dp), Path::new("x")).unwrap();
        assert_eq!(cfg.site_code, "FRY");
        assert_eq!(cfg.operator.listen, addr);
        assert_eq!(cfg.dp.listen, dp);
    }

    #[test]
    fn rejects_unknown_keys_and_bad_codes() {
        let e = SiteConfig::parse(
            "site_code = \"FRY\"\ncolour = 1\n[operator]\nlisten = \"127.0.0.1:1\"\n",
            Path::new("s.toml"),
        );
        assert!(e.unwrap_err().to_string().contains("colour"));
        let e = SiteConfig::parse(
            "site_code = \"TOOLONG\"\n[operator]\nlisten = \"127.0.0.1:1\"\n",
            Path::new("s.toml"),
        );
        assert!(e.unwrap_err().to_string().contains("three letters"));
    }
}

#[cfg(test)]
mod operator_tls {
    use super::*;

    fn parse(operator: &str) -> Result<SiteConfig, ConfigError> {
        SiteConfig::parse(
            &format!("site_code = \"FRY\"\n[operator]\n{operator}\n"),
            Path::new("site.toml"),
        )
    }

    #[test]
    fn off_loopback_the_api_speaks_https_only() {
        let lo = parse("listen = \"127.0.0.1:4480\"").unwrap().operator;
        assert!(!lo.https());
        assert_eq!(lo.url(), "http://127.0.0.1:4480");
        let lo = parse("listen = \"127.0.0.1:4480\"\ntls = true")
            .unwrap()
            .operator;
        assert!(lo.https());
        let any = parse("listen = \"0.0.0.0:4480\"").unwrap().operator;
        assert!(any.https());
        assert_eq!(any.url(), "https://127.0.0.1:4480");
        let e = parse("listen = \"0.0.0.0:4480\"\ntls = false")
            .unwrap_err()
            .to_string();
        assert!(e.contains("HTTPS only") && e.contains("site.toml"), "{e}");
        let e = parse("listen = \"[::]:4480\"\ntls = false")
            .unwrap_err()
            .to_string();
        assert!(e.contains("HTTPS only"), "{e}");
    }

    #[test]
    fn the_certificate_names_this_host_loopback_and_the_listen_address() {
        let c = parse("listen = \"10.1.2.3:4480\"\nnames = [\"site.example\"]")
            .unwrap()
            .operator;
        assert_eq!(
            c.cert_names(Some("ferry1")),
            [
                "ferry1",
                "localhost",
                "127.0.0.1",
                "::1",
                "10.1.2.3",
                "site.example"
            ]
        );
        let e = parse("listen = \"10.1.2.3:4480\"\nnames = [\"*.example\"]").unwrap_err();
        assert!(e.to_string().contains("[operator] names"), "{e}");
    }
}

#[cfg(test)]
mod deploy_examples {
    use super::*;

    #[test]
    fn deploy_site_toml_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/site.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let cfg = SiteConfig::parse(&text, &path).unwrap();
        assert_eq!(cfg.operator.listen.to_string(), DEFAULT_OPERATOR_LISTEN);
        assert_eq!(cfg.dp.listen.to_string(), DEFAULT_DP_LISTEN);
    }
}
