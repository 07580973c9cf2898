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

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context};
use base64::Engine as _;
use ferry_core::Manifest;
use ferry_dp::http::PackageIndex;
use ferry_wire::pb;
use serde::Serialize;

/// Bytes asked for per range request (whole chunks, so a little more).
const RANGE_BYTES: u64 = 8 << 20;
/// Suffix of a file being downloaded.
pub(crate) const PART_SUFFIX: &str = ".ferry-part";

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

    async fn file(
        &self,
        http: &reqwest::Client,
        m: &Manifest,
        bar: &indicatif::ProgressBar,
        report: &Mutex<FetchReport>,
    ) -> anyhow::Result<()> {
        let dest = self.out.join(&m.path);
        let add =
            |f: &dyn Fn(&mut FetchReport)| f(&mut report.lock().unwrap_or_else(|e| e.into_inner()));
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        // Done before (a run interrupted after this file).
        let (d, size) = (dest.clone(), m.size);
        let hash = m.hash;
        let complete = tokio::task::spawn_blocking(move || {
            std::fs::metadata(&d).is_ok_and(|md| md.len() == size)
                && ferry_site::library::packages::hash_file(&d)
                    .is_ok_and(|h| ferry_core::FileHash::from(h) == hash)
        })
        .await?;
        if complete {
            bar.inc(m.size);
            add(&|r| r.bytes_reused += m.size);
            return Ok(());
        }
        let part = PathBuf::from(format!("{}{PART_SUFFIX}", dest.display()));
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&part)
            .with_context(|| format!("cannot open {}", part.display()))?;
        let had = f.metadata()?.len();
        f.set_len(m.size)
            .with_context(|| format!("cannot size {} to {} bytes", part.display(), m.size))?;
        let f = Arc::new(f);
        // What a part file from an earlier run holds already.
        let (ff, mm) = (f.clone(), m.clone());
        let missing: Vec<bool> = tokio::task::spawn_blocking(move || {
            let mut buf = Vec::new();
            mm.offsets()
                .map(|(off, c)| {
                    if off + u64::from(c.len) > had {
                        return true;
                    }
                    buf.resize(c.len as usize, 0);
                    ff.read_exact_at(&mut buf, off).is_err()
                        || ferry_core::ChunkId::of(&buf) != c.id
                })
                .collect()
        })
        .await?;
        let reused: u64 = m
            .chunks
            .iter()
            .zip(&missing)
            .filter(|(_, miss)| !**miss)
            .map(|(c, _)| u64::from(c.len))
            .sum();
        bar.inc(reused);
        add(&|r| r.bytes_reused += reused);
        // Runs of missing chunks, cut at RANGE_BYTES.
        let offsets: Vec<(u64, ferry_core::ChunkRef)> = m.offsets().map(|(o, c)| (o, *c)).collect();
        let mut jobs: Vec<Vec<(u64, ferry_core::ChunkRef)>> = Vec::new();
        let mut cur: Vec<(u64, ferry_core::ChunkRef)> = Vec::new();
        let mut cur_bytes = 0u64;
        for (i, (off, c)) in offsets.iter().enumerate() {
            if !missing[i] {
                if !cur.is_empty() {
                    jobs.push(std::mem::take(&mut cur));
                    cur_bytes = 0;
                }
                continue;
            }
            cur.push((*off, *c));
            cur_bytes += u64::from(c.len);
            if cur_bytes >= RANGE_BYTES {
                jobs.push(std::mem::take(&mut cur));
                cur_bytes = 0;
            }
        }
        if !cur.is_empty() {
            jobs.push(cur);
        }
        // Workers take from the end: the file fills from its start.
        jobs.reverse();
        let url = self.url(&m.path);
        let etag = format!("\"{}\"", m.hash.to_hex());
        let queue = Arc::new(Mutex::new(jobs));
        let downloaded = Arc::new(AtomicU64::new(0));
        let requests = Arc::new(AtomicU64::new(0));
        let mut workers = tokio::task::JoinSet::new();
        for _ in 0..self.parallel.max(1) {
            let (queue, f, http, url, etag, bar) = (
                queue.clone(),
                f.clone(),
                http.clone(),
                url.clone(),
                etag.clone(),
                bar.clone(),
            );
            let (downloaded, requests) = (downloaded.clone(), requests.clone());
            let token = self.token.clone();
            let path = m.path.clone();
            workers.spawn(async move {
                // The previous range's check and write run while the next
                // range downloads (one at a time per worker).
                let mut writing: Option<tokio::task::JoinHandle<anyhow::Result<()>>> = None;
                loop {
                    let job = queue.lock().unwrap_or_else(|e| e.into_inner()).pop();
                    let Some(job) = job else {
                        if let Some(w) = writing.take() {
                            w.await??;
                        }
                        return Ok::<(), anyhow::Error>(());
                    };
                    let first = job[0].0;
                    let last = job.last().map_or(first, |(o, c)| o + u64::from(c.len) - 1);
                    let mut req = http
                        .get(&url)
                        .header(reqwest::header::RANGE, format!("bytes={first}-{last}"))
                        .header(reqwest::header::IF_MATCH, &etag);
                    if let Some(t) = &token {
                        req = req.bearer_auth(t);
                    }
                    let resp = req
                        .send()
                        .await
                        .with_context(|| format!("cannot reach {url}"))?;
                    requests.fetch_add(1, Ordering::Relaxed);
                    if resp.status() != reqwest::StatusCode::PARTIAL_CONTENT {
                        return Err(refusal(&url, resp).await);
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
                    let f = f.clone();
                    let path = path.clone();
                    let (downloaded, bar) = (downloaded.clone(), bar.clone());
                    if let Some(w) = writing.take() {
                        w.await??;
                    }
                    writing = Some(tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
                        for (off, c) in &job {
                            let at = (off - first) as usize;
                            let bytes = &data[at..at + c.len as usize];
                            if ferry_core::ChunkId::of(bytes) != c.id {
                                bail!(
                                    "{path}: the chunk at offset {off} ({} bytes) does not match the signed manifest: refused",
                                    c.len
                                );
                            }
                        }
                        f.write_all_at(&data, first)
                            .with_context(|| format!("cannot write {path}"))?;
                        downloaded.fetch_add(last - first + 1, Ordering::Relaxed);
                        bar.inc(last - first + 1);
                        Ok(())
                    }));
                }
            });
        }
        let mut failed = None;
        while let Some(r) = workers.join_next().await {
            if let Err(e) = r.map_err(anyhow::Error::from).and_then(|r| r) {
                workers.abort_all();
                failed.get_or_insert(e);
            }
        }
        add(&|r| {
            r.bytes_downloaded += downloaded.load(Ordering::Relaxed);
            r.requests += requests.load(Ordering::Relaxed);
        });
        if let Some(e) = failed {
            return Err(e.context(format!(
                "{}: interrupted; run the same command again to resume (what {} holds is kept)",
                m.path,
                part.display()
            )));
        }
        // Every chunk of the file is now one checked against the signed
        // manifest (downloaded or found in the part file), and the
        // manifest's chunks cover the file exactly (checked when it was
        // decoded): the file is the signed one without reading it again.
        ferry_store::file::place(&f, &part, &dest)?;
        Ok(())
    }
}
