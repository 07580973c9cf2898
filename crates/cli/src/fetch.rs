//! `ferry client fetch`: download a package from a DP over HTTPS.
//!
//! An ordinary HTTPS downloader as far as the DP can tell: it reads the
//! package index (`GET /content/{id}/`), checks the site's signature over
//! the manifest in it, then fetches each file with range requests, several
//! at once, each range a run of whole chunks. Every chunk is checked
//! against its BLAKE3 before it is written; every range asks `If-Match`
//! the file's hash, so all of it comes from one revision. A file is written
//! as `PATH.ferry-part` and renamed once every chunk of it has checked (the
//! signed manifest's chunks cover the file exactly, so that proves the
//! whole file without reading it again). Run again
//! after an interruption, it re-hashes what the part files hold and asks
//! only for the chunks missing or wrong.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context};
use base64::Engine as _;
use ferry_core::{ChunkRef, Manifest};
use ferry_dp::http::PackageIndex;
use ferry_store::file::{self, PartFile};
use ferry_wire::pb;
use serde::Serialize;

/// Bytes asked for per range request (whole chunks, so a little more).
const RANGE_BYTES: u64 = 8 << 20;

/// What was done.
#[derive(Debug, Default, Serialize)]
pub(crate) struct FetchReport {
    pub(crate) package: String,
    pub(crate) revision: u32,
    pub(crate) name: String,
    pub(crate) files: usize,
    /// Bytes of the package.
    pub(crate) bytes_total: u64,
    /// Bytes downloaded by this run.
    pub(crate) bytes_downloaded: u64,
    /// Bytes already there (complete files, or chunks a part file held).
    pub(crate) bytes_reused: u64,
    /// Range requests made.
    pub(crate) requests: u64,
    pub(crate) out: PathBuf,
}

/// Where and how to fetch.
pub(crate) struct Fetch {
    pub(crate) dp: String,
    pub(crate) package: String,
    pub(crate) out: PathBuf,
    pub(crate) token: Option<String>,
    pub(crate) ca: PathBuf,
    pub(crate) parallel: usize,
    pub(crate) manifest_key: Option<String>,
}

pub(crate) fn http_client(ca: &Path) -> anyhow::Result<reqwest::Client> {
    let pem = std::fs::read_to_string(ca)
        .with_context(|| format!("cannot read the site CA {}", ca.display()))?;
    let der = ferry_net::pki::cert_der(&pem, &format!("site CA {}", ca.display()))?;
    let tls = ferry_net::tls::https_client(&der)?;
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .connect_timeout(std::time::Duration::from_secs(10))
        .build()
        .context("cannot set up the HTTPS client")
}

/// A refusal of the DP in its words.
pub(crate) async fn refusal(url: &str, resp: reqwest::Response) -> anyhow::Error {
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    let msg = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
        .unwrap_or(body);
    anyhow::anyhow!("{url}: HTTP {status}: {msg}")
}

/// Sends `req` (to `url` of the DP at `dp`) and reads its JSON answer,
/// `what` it should be; a refusal in the DP's words.
pub(crate) async fn answer<T: serde::de::DeserializeOwned>(
    req: reqwest::RequestBuilder,
    dp: &str,
    url: &str,
    what: &str,
) -> anyhow::Result<T> {
    let resp = req
        .send()
        .await
        .with_context(|| format!("cannot reach the DP at {dp}"))?;
    if !resp.status().is_success() {
        return Err(refusal(url, resp).await);
    }
    resp.json()
        .await
        .with_context(|| format!("{url} did not answer {what}"))
}

/// The manifests of `package` revision `revision` from a signed body
/// (base64) and signature (hex), proven with the site's manifest key (hex).
pub(crate) fn prove(
    package: &str,
    revision: u32,
    body: &str,
    signature: &str,
    key: &str,
) -> anyhow::Result<Vec<Manifest>> {
    let key = hex::decode(key).context("the manifest key is not hex")?;
    let body = base64::engine::general_purpose::STANDARD
        .decode(body)
        .context("the manifest is not base64")?;
    let signature = hex::decode(signature).context("the manifest's signature is not hex")?;
    let assignment = pb::Assignment {
        package: package.to_string(),
        revision,
        ..Default::default()
    };
    let signed = pb::SignedManifest {
        body: body.into(),
        signature: signature.into(),
        base_revision: 0,
    };
    Ok(ferry_dp::manifest::verify(&key, &assignment, &signed, &[])?.manifests)
}

impl Fetch {
    fn url(&self, rest: &str) -> String {
        format!(
            "{}/content/{}/{rest}",
            self.dp.trim_end_matches('/'),
            self.package
        )
    }

    fn get(&self, http: &reqwest::Client, url: &str) -> reqwest::RequestBuilder {
        let r = http.get(url);
        match &self.token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    /// Reads and proves the package index.
    async fn index(&self, http: &reqwest::Client) -> anyhow::Result<(PackageIndex, Vec<Manifest>)> {
        let url = self.url("");
        let index: PackageIndex =
            answer(self.get(http, &url), &self.dp, &url, "a package index").await?;
        let manifests = prove(
            &self.package,
            index.revision,
            &index.manifest,
            &index.signature,
            self.manifest_key.as_deref().unwrap_or(&index.manifest_key),
        )?;
        Ok((index, manifests))
    }

    /// Downloads the package into `out`.
    pub(crate) async fn run(&self, show: bool) -> anyhow::Result<FetchReport> {
        let http = http_client(&self.ca)?;
        let (index, manifests) = self.index(&http).await?;
        std::fs::create_dir_all(&self.out)
            .with_context(|| format!("cannot create {}", self.out.display()))?;
        let total: u64 = manifests.iter().map(|m| m.size).sum();
        let bar = crate::output::byte_bar(show, total, &format!("fetch {}", self.package));
        let report = Arc::new(Mutex::new(FetchReport {
            package: index.package.clone(),
            revision: index.revision,
            name: index.name.clone(),
            files: manifests.len(),
            bytes_total: total,
            out: self.out.clone(),
            ..Default::default()
        }));
        for m in &manifests {
            self.file(&http, m, &bar, &report).await?;
        }
        bar.finish_and_clear();
        let r = std::mem::take(&mut *report.lock().unwrap_or_else(|e| e.into_inner()));
        Ok(r)
    }

    /// Fetches one file: nothing when an earlier run finished it, else the
    /// chunks its part file lacks, then puts it in place.
    async fn file(
        &self,
        http: &reqwest::Client,
        m: &Manifest,
        bar: &indicatif::ProgressBar,
        report: &Mutex<FetchReport>,
    ) -> anyhow::Result<()> {
        let add =
            |f: &dyn Fn(&mut FetchReport)| f(&mut report.lock().unwrap_or_else(|e| e.into_inner()));
        let Some((part, missing)) = open_part(self.out.join(&m.path), m.clone()).await? else {
            bar.inc(m.size);
            add(&|r| r.bytes_reused += m.size);
            return Ok(());
        };
        let reused: u64 = m
            .chunks
            .iter()
            .zip(&missing)
            .filter(|(_, miss)| !**miss)
            .map(|(c, _)| u64::from(c.len))
            .sum();
        bar.inc(reused);
        add(&|r| r.bytes_reused += reused);
        let ranges = Ranges {
            queue: Mutex::new(missing_runs(m, &missing)),
            part: part.clone(),
            http: http.clone(),
            url: self.url(&m.path),
            etag: format!("\"{}\"", m.hash.to_hex()),
            token: self.token.clone(),
            path: m.path.clone(),
            downloaded: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            bar: bar.clone(),
        };
        let ranges = Arc::new(ranges);
        let failed = ranges.clone().download(self.parallel).await;
        add(&|r| {
            r.bytes_downloaded += ranges.downloaded.load(Ordering::Relaxed);
            r.requests += ranges.requests.load(Ordering::Relaxed);
        });
        if let Some(e) = failed {
            return Err(e.context(format!(
                "{}: interrupted; run the same command again to resume (what {} holds is kept)",
                m.path,
                part.out().path().display()
            )));
        }
        // Every chunk of the file is now one checked against the signed
        // manifest (downloaded or found in the part file), and the
        // manifest's chunks cover the file exactly (checked when it was
        // decoded): the file is the signed one without reading it again.
        tokio::task::spawn_blocking(move || part.place()).await??;
        Ok(())
    }
}

/// `dest`'s part file and, per chunk, whether it is still missing; `None`
/// when an earlier run finished the file.
async fn open_part(
    dest: PathBuf,
    m: Manifest,
) -> anyhow::Result<Option<(Arc<PartFile>, Vec<bool>)>> {
    tokio::task::spawn_blocking(move || {
        if file::is_complete(&dest, &m) {
            return Ok(None);
        }
        let part = PartFile::open(&dest, m.size)?;
        let missing = part.held_chunks(&m).iter().map(|held| !held).collect();
        Ok(Some((Arc::new(part), missing)))
    })
    .await?
}

/// A run of chunks fetched with one range request.
type Run = Vec<(u64, ChunkRef)>;

/// The runs of missing chunks, each cut at [`RANGE_BYTES`], last run
/// first (workers take from the end: the file fills from its start).
fn missing_runs(m: &Manifest, missing: &[bool]) -> Vec<Run> {
    let mut runs: Vec<Run> = Vec::new();
    let mut cur: Run = Vec::new();
    let mut cur_bytes = 0u64;
    for ((off, c), miss) in m.offsets().zip(missing) {
        if !miss {
            if !cur.is_empty() {
                runs.push(std::mem::take(&mut cur));
                cur_bytes = 0;
            }
            continue;
        }
        cur.push((off, *c));
        cur_bytes += u64::from(c.len);
        if cur_bytes >= RANGE_BYTES {
            runs.push(std::mem::take(&mut cur));
            cur_bytes = 0;
        }
    }
    if !cur.is_empty() {
        runs.push(cur);
    }
    runs.reverse();
    runs
}

/// The range requests of one file, shared by its workers.
struct Ranges {
    queue: Mutex<Vec<Run>>,
    part: Arc<PartFile>,
    http: reqwest::Client,
    url: String,
    etag: String,
    token: Option<String>,
    path: String,
    downloaded: AtomicU64,
    requests: AtomicU64,
    bar: indicatif::ProgressBar,
}

impl Ranges {
    /// Runs `parallel` workers until the queue is empty; the first error.
    async fn download(self: Arc<Self>, parallel: usize) -> Option<anyhow::Error> {
        let mut workers = tokio::task::JoinSet::new();
        for _ in 0..parallel.max(1) {
            workers.spawn(self.clone().worker());
        }
        let mut failed = None;
        while let Some(r) = workers.join_next().await {
            if let Err(e) = r.map_err(anyhow::Error::from).and_then(|r| r) {
                workers.abort_all();
                failed.get_or_insert(e);
            }
        }
        failed
    }

    /// Takes runs from the queue; each one's check and write run while the
    /// next one downloads (one at a time per worker).
    async fn worker(self: Arc<Self>) -> anyhow::Result<()> {
        let mut writing: Option<tokio::task::JoinHandle<anyhow::Result<()>>> = None;
        loop {
            let run = self.queue.lock().unwrap_or_else(|e| e.into_inner()).pop();
            let Some(run) = run else {
                if let Some(w) = writing.take() {
                    w.await??;
                }
                return Ok(());
            };
            let data = self.get(&run).await?;
            if let Some(w) = writing.take() {
                w.await??;
            }
            let me = self.clone();
            writing = Some(tokio::task::spawn_blocking(move || {
                me.part.write_checked(&me.path, &data, &run)?;
                let n = data.len() as u64;
                me.downloaded.fetch_add(n, Ordering::Relaxed);
                me.bar.inc(n);
                Ok(())
            }));
        }
    }

    /// One range request for `run`'s bytes.
    async fn get(&self, run: &Run) -> anyhow::Result<bytes::Bytes> {
        let first = run[0].0;
        let last = run.last().map_or(first, |(o, c)| o + u64::from(c.len) - 1);
        let mut req = self
            .http
            .get(&self.url)
            .header(reqwest::header::RANGE, format!("bytes={first}-{last}"))
            .header(reqwest::header::IF_MATCH, &self.etag);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        let url = &self.url;
        let resp = req
            .send()
            .await
            .with_context(|| format!("cannot reach {url}"))?;
        self.requests.fetch_add(1, Ordering::Relaxed);
        if resp.status() != reqwest::StatusCode::PARTIAL_CONTENT {
            return Err(refusal(url, resp).await);
        }
        let data = resp
            .bytes()
            .await
            .with_context(|| format!("{url}: the download broke off"))?;
        if data.len() as u64 != last - first + 1 {
            bail!(
                "{url}: asked for bytes {first}-{last}, got {} bytes",
                data.len()
            );
        }
        Ok(data)
    }
}
