//! Reaching the site's operator API.

use anyhow::{bail, Context};
use ferry_site::SiteConfig;
use reqwest::{Method, RequestBuilder, Response};
use serde::de::DeserializeOwned;

use crate::Global;

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
        let (base, token) = match (&g.site, &g.token, &g.data) {
            (Some(site), Some(token), _) => (site.trim_end_matches('/').to_string(), token.clone()),
            (site, token, Some(data)) => {
                let cfg = SiteConfig::load(data)?;
                let base = site
                    .clone()
                    .unwrap_or_else(|| format!("http://{}", cfg.operator.listen));
                let token = match token {
                    Some(t) => t.clone(),
                    None => ferry_site::read_token(data)?,
                };
                (base, token)
            }
            _ => bail!(
                "which site? pass --data DIR (the folder made by `ferry site init`), \
                 or --site URL and --token TOKEN (or set FERRY_DATA, or FERRY_SITE and FERRY_TOKEN)"
            ),
        };
        Ok(Self {
            http: reqwest::Client::new(),
            base,
            token,
        })
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
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        let msg = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
            .unwrap_or(body);
        bail!("{msg} (HTTP {})", status.as_u16())
    }

    pub(crate) async fn json<T: DeserializeOwned>(&self, req: RequestBuilder) -> anyhow::Result<T> {
        let resp = self.send(req).await?;
        resp.json()
            .await
            .context("the site's answer is not what this CLI expects (versions differ?)")
    }
}
