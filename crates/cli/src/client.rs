//! Reaching the site's operator API.

use anyhow::{bail, Context};
use ferry_site::SiteConfig;
use reqwest::{Method, RequestBuilder, Response};
use serde::de::DeserializeOwned;

use crate::Global;

/// An error answer of the site: its message, its `code` word and the HTTP
/// status.
#[derive(Debug)]
pub(crate) struct Refusal {
    pub(crate) code: String,
    pub(crate) message: String,
    pub(crate) status: u16,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (HTTP {})", self.message, self.status)
    }
}

impl std::error::Error for Refusal {}

/// The operator API URL: `http://` or `https://` and HOST:PORT.
fn check_url(site: &str) -> anyhow::Result<String> {
    let url = site.trim_end_matches('/');
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"));
    match rest {
        Some(host) if !host.is_empty() => Ok(url.to_string()),
        _ => bail!(
            "--site {site:?} is not the operator API's URL: use http(s)://HOST:PORT (e.g. http://{}); \
             `ferry dp init` is the command whose --site is the DP endpoint HOST:PORT",
            if rest.is_some() { ferry_site::config::DEFAULT_OPERATOR_LISTEN } else { site }
        ),
    }
}

/// An authenticated client for one site.
pub(crate) struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Client {
    /// Finds the site: `--site`/`--token` (or FERRY_SITE/FERRY_TOKEN) when
    /// given, else the address and token in the `--data` folder.
    pub(crate) fn new(g: &Global) -> anyhow::Result<Self> {
        let (base, token, data) = match (&g.site, &g.token, &g.data) {
            (Some(site), Some(token), data) => (check_url(site)?, token.clone(), data.as_deref()),
            (site, token, Some(data)) => {
                let cfg = SiteConfig::load(data)?;
                let base = match site {
                    Some(s) => check_url(s)?,
                    None => cfg.operator.url(),
                };
                let token = match token {
                    Some(t) => t.clone(),
                    None => ferry_site::read_token(data)?,
                };
                (base, token, Some(data.as_path()))
            }
            _ => bail!(
                "which site? pass --data DIR (the folder made by `ferry site init`), \
                 or --site URL and --token TOKEN (or set FERRY_DATA, or FERRY_SITE and FERRY_TOKEN)"
            ),
        };
        let http = if base.starts_with("https://") {
            // The site CA pins the operator certificate: no other CA is
            // trusted, so a bearer token goes only to this site.
            let ca = match (&g.ca, data) {
                (Some(ca), _) => ca.clone(),
                (None, Some(d)) => d.join(ferry_site::CA_CERT_FILE),
                (None, None) => bail!(
                    "{base} speaks HTTPS: pass --ca FILE, the site CA certificate (ca.pem in the site's data folder)"
                ),
            };
            crate::fetch::http_client(&ca)?
        } else {
            reqwest::Client::new()
        };
        Ok(Self { http, base, token })
    }

    pub(crate) fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.http
            .request(method, format!("{}/api/v1{path}", self.base))
            .bearer_auth(&self.token)
    }

    /// Sends and turns error answers into errors carrying the site's message.
    pub(crate) async fn send(&self, req: RequestBuilder) -> anyhow::Result<Response> {
        let resp = req.send().await.with_context(|| {
            format!(
                "cannot reach the site at {} (is `ferry site serve` running?)",
                self.base
            )
        })?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status().as_u16();
        let body = resp.text().await.unwrap_or_default();
        let v = serde_json::from_str::<serde_json::Value>(&body).ok();
        let field = |name: &str| {
            v.as_ref()
                .and_then(|v| v.get(name).and_then(|e| e.as_str()).map(str::to_string))
        };
        Err(Refusal {
            code: field("code").unwrap_or_else(|| "error".into()),
            message: field("error").unwrap_or(body),
            status,
        }
        .into())
    }

    pub(crate) async fn json<T: DeserializeOwned>(&self, req: RequestBuilder) -> anyhow::Result<T> {
        let resp = self.send(req).await?;
        resp.json()
            .await
            .context("the site's answer is not what this CLI expects (versions differ?)")
    }
}
