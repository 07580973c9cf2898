//! The DP agent: connect, watch assignments, converge.
//!
//! One connection to the site at a time, redialled with backoff. On it:
//! a control stream (`Watch`) that receives the full assignment set whenever
//! it changes and carries the DP's reports back, plus short streams for
//! manifests and chunk batches. Transfers run one package revision at a
//! time, each with up to [`FETCH_STREAMS`] chunk requests in flight.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use ferry_core::sync::{backoff, batches, plan};
use ferry_core::{ChunkId, ChunkRef, Manifest};
use ferry_store::Library;
use ferry_wire::pb::{self, reply, request, Code};
use ferry_wire::{read_frame, write_frame, MAX_BATCH_CHUNKS, MAX_REPLY_BYTES};
use futures_util::{stream, StreamExt};
use prost::Message;
use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn, Instrument};

use crate::config::{self, DpConfig};
use crate::content;

/// Chunk requests in flight at once (each on its own QUIC stream).
pub const FETCH_STREAMS: usize = 8;
/// Bytes asked for in one chunk request.
pub const BATCH_BYTES: u64 = 4 << 20;
/// Rounds a chunk that fails verification is asked for before the transfer
/// fails.
pub const MAX_CHUNK_ATTEMPTS: u32 = 3;
/// Space kept free besides a transfer's chunks and files (RocksDB logs,
/// compaction).
pub const SPACE_MARGIN: u64 = 64 << 20;
/// Least time between two progress reports.
const REPORT_EVERY: Duration = Duration::from_millis(250);

/// A DP, opened and ready to run.
pub struct DpAgent {
    data: PathBuf,
    cfg: DpConfig,
    lib: Arc<Library>,
    content: PathBuf,
    manifest_key: Vec<u8>,
    client: quinn::ClientConfig,
    max_rate: Option<u64>,
}

/// How a transfer ended badly.
enum Failure {
    /// The connection is gone: end the session and redial.
    Disconnected(anyhow::Error),
    /// This transfer failed; report it and retry later.
    Transfer(anyhow::Error),
}

impl Failure {
    fn of(conn: &quinn::Connection, e: anyhow::Error) -> Self {
        if conn.close_reason().is_some() {
            Self::Disconnected(e)
        } else {
            Self::Transfer(e)
        }
    }
}

fn read(data: &Path, file: &str, what: &str) -> anyhow::Result<String> {
    let p = data.join(file);
    std::fs::read_to_string(&p).with_context(|| format!("cannot read the {what} {}", p.display()))
}

/// Explains a lost connection in operator terms.
fn explain(e: &quinn::ConnectionError) -> String {
    match e {
        quinn::ConnectionError::ApplicationClosed(c) => format!(
            "the site closed the connection: {}",
            String::from_utf8_lossy(&c.reason)
        ),
        other => other.to_string(),
    }
}

impl DpAgent {
    /// Opens the DP in `data` (its library is locked while the agent runs).
    pub fn open(data: &Path) -> anyhow::Result<Self> {
        let cfg = DpConfig::load(data)?;
        let ca = ferry_net::pki::cert_der(&read(data, config::CA_FILE, "site CA")?, "site CA")?;
        let identity = ferry_net::tls::Identity::from_pem(
            &read(data, config::CERT_FILE, "DP certificate")?,
            &read(data, config::KEY_FILE, "DP key")?,
            "DP certificate",
        )?;
        let client = ferry_net::tls::dp_client(&ca, identity)?;
        let manifest_key =
            hex::decode(read(data, config::MANIFEST_KEY_FILE, "manifest key")?.trim())
                .context("the manifest key file is not hex")?;
        let lib = Library::open(&data.join(config::LIBRARY_DIR)).with_context(|| {
            format!(
                "cannot open the library of the DP in {} (is another `ferry dp serve` running on it?)",
                data.display()
            )
        })?;
        let content = cfg.content_dir(data);
        std::fs::create_dir_all(&content)
            .with_context(|| format!("cannot create {}", content.display()))?;
        Ok(Self {
            data: data.to_path_buf(),
            cfg,
            lib: Arc::new(lib),
            content,
            manifest_key,
            client,
            max_rate: None,
        })
    }

    /// Limits chunk downloads to `bytes_per_sec` on average (for DPs behind
    /// slow or shared links).
    pub fn with_max_rate(mut self, bytes_per_sec: Option<u64>) -> Self {
        self.max_rate = bytes_per_sec.filter(|&r| r > 0);
        self
    }

    /// The DP's configuration.
    pub fn config(&self) -> &DpConfig {
        &self.cfg
    }

    /// Runs until `shutdown` completes: connects, converges, reconnects
    /// with backoff whenever the site is away.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
        let span = tracing::info_span!("dp", name = %self.cfg.name, site = %self.cfg.site);
        let main = async {
            info!(data = %self.data.display(), content = %self.content.display(), "DP agent starting");
            let mut failures = 0u32;
            loop {
                match self.connect().await {
                    Ok(conn) => {
                        info!("connected to the site");
                        failures = 0;
                        let err = self.session(&conn).await;
                        conn.close(0u32.into(), b"");
                        warn!(reason = %format!("{err:#}"), "lost the site");
                    }
                    Err(e) => error!(error = %format!("{e:#}"), "cannot connect to the site"),
                }
                let delay = backoff(failures);
                failures += 1;
                info!(retry_in = ?delay, "reconnecting");
                tokio::time::sleep(delay).await;
            }
        };
        tokio::select! {
            _ = main.instrument(span) => Ok(()),
            _ = shutdown => {
                info!("DP agent stopping");
                Ok(())
            }
        }
    }

    async fn connect(&self) -> anyhow::Result<quinn::Connection> {
        let addr = crate::resolve(&self.cfg.site).await?;
        let endpoint = crate::client_endpoint(addr)?;
        let conn = endpoint
            .connect_with(self.client.clone(), addr, ferry_net::pki::SITE_SERVER_NAME)?
            .await
            .map_err(|e| anyhow!(explain(&e)))?;
        Ok(conn)
    }

    /// One connection's life; returns why it ended.
    async fn session(&self, conn: &quinn::Connection) -> anyhow::Error {
        match self.session_inner(conn).await {
            Ok(()) => anyhow!("the site ended the session"),
            Err(e) => match conn.close_reason() {
                Some(reason) => anyhow!(explain(&reason)),
                None => e,
            },
        }
    }

    async fn session_inner(&self, conn: &quinn::Connection) -> anyhow::Result<()> {
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| anyhow!(explain(&e)))?;
        let holdings = content::holdings(&self.content)
            .into_iter()
            .map(|(package, revision)| pb::Holding { package, revision })
            .collect();
        let hello = pb::Request {
            kind: Some(request::Kind::Watch(pb::Watch {
                protocol: ferry_wire::PROTOCOL_VERSION,
                holdings,
            })),
        };
        write_frame(&mut send, &hello).await?;
        let (report_tx, mut report_rx) = mpsc::unbounded_channel::<pb::Report>();
        let (desired_tx, desired_rx) = watch::channel::<Option<Vec<pb::Assignment>>>(None);

        let writer = async {
            while let Some(r) = report_rx.recv().await {
                write_frame(&mut send, &r).await?;
            }
            Ok::<(), anyhow::Error>(())
        };
        let reader = async {
            loop {
                match read_frame::<pb::Reply>(&mut recv, MAX_REPLY_BYTES).await? {
                    Some(pb::Reply {
                        kind: Some(reply::Kind::Assignments(a)),
                    }) => {
                        info!(packages = a.items.len(), "assignments received");
                        let _ = desired_tx.send(Some(a.items));
                    }
                    Some(pb::Reply {
                        kind: Some(reply::Kind::Error(e)),
                    }) => bail!("the site refused the session: {}", e.message),
                    Some(_) => bail!("unexpected message on the control stream"),
                    None => bail!("the site closed the control stream"),
                }
            }
        };
        let worker = self.converge(conn, desired_rx, report_tx);
        tokio::select! {
            r = reader => r,
            r = writer => r,
            r = worker => r,
        }
    }

    /// Brings the DP in line with the latest assignments, again whenever
    /// they change or a failed transfer is due for retry.
    async fn converge(
        &self,
        conn: &quinn::Connection,
        mut desired_rx: watch::Receiver<Option<Vec<pb::Assignment>>>,
        reports: mpsc::UnboundedSender<pb::Report>,
    ) -> anyhow::Result<()> {
        let mut failures: HashMap<(String, u32), u32> = HashMap::new();
        let mut told_installed: HashSet<(String, u32)> = HashSet::new();
        loop {
            let desired = loop {
                if let Some(d) = desired_rx.borrow_and_update().clone() {
                    break d;
                }
                desired_rx.changed().await?;
            };
            let mut retry_at: Option<Instant> = None;
            let wanted: BTreeMap<String, u32> = desired
                .iter()
                .map(|a| (a.package.clone(), a.revision))
                .collect();

            // Packages no longer assigned go first: that frees space. A
            // failed removal is tried again like a failed transfer.
            let mut removal_failed = false;
            for (package, revision) in content::holdings(&self.content) {
                if !wanted.contains_key(&package) {
                    removal_failed |= !self.remove(&package, revision, &reports).await;
                }
            }
            for package in self.library_packages()? {
                if !wanted.contains_key(&package) {
                    removal_failed |= !self.remove(&package, 0, &reports).await;
                }
            }
            if removal_failed {
                retry_at = Some(Instant::now() + backoff(2));
            }
            for stage in self.lib.stages()? {
                let keep = stage
                    .split_once('/')
                    .is_some_and(|(p, r)| wanted.get(p).map(u32::to_string).as_deref() == Some(r));
                if !keep {
                    info!(%stage, "dropping chunks of a transfer no longer wanted");
                    self.lib.abandon_stage(&stage)?;
                }
            }

            for a in &desired {
                if desired_rx.has_changed().unwrap_or(false) {
                    break;
                }
                if !safe_package_id(&a.package) {
                    warn!(package = %a.package, "assignment with an unusable package id ignored");
                    continue;
                }
                let key = (a.package.clone(), a.revision);
                if content::installed(&self.content, &a.package) == Some(a.revision) {
                    if told_installed.insert(key) {
                        // Revisions left behind by an interrupted switch.
                        for old in self.lib.revisions(&a.package)? {
                            if old != a.revision {
                                self.lib.remove_revision(&a.package, old, |_| Ok(None))?;
                            }
                        }
                        let _ = reports.send(report(a, pb::State::Installed));
                    }
                    continue;
                }
                let _ = reports.send(report(a, pb::State::Pending));
                let span =
                    tracing::info_span!("transfer", package = %a.package, revision = a.revision);
                match self.transfer(conn, a, &reports).instrument(span).await {
                    Ok(()) => {
                        failures.remove(&key);
                        told_installed.insert(key);
                    }
                    Err(Failure::Disconnected(e)) => return Err(e),
                    Err(Failure::Transfer(e)) => {
                        let n = failures.entry(key).or_default();
                        let delay = backoff(*n);
                        *n += 1;
                        let msg = format!("{e:#}");
                        warn!(package = %a.package, revision = a.revision, error = %msg, retry_in = ?delay, "transfer failed");
                        let mut r = report(a, pb::State::Failed);
                        r.error = msg;
                        r.retry_in_secs = delay.as_secs().max(1);
                        let _ = reports.send(r);
                        let at = Instant::now() + delay;
                        retry_at = Some(retry_at.map_or(at, |t: Instant| t.min(at)));
                    }
                }
            }

            match retry_at {
                Some(at) if !desired_rx.has_changed().unwrap_or(false) => {
                    tokio::select! {
                        r = desired_rx.changed() => r?,
                        _ = tokio::time::sleep_until(at.into()) => {}
                    }
                }
                Some(_) => {}
                None => desired_rx.changed().await?,
            }
        }
    }

    /// Fails when the disk cannot take the chunks and the rebuilt files.
    fn check_space(&self, chunk_bytes: u64, file_bytes: u64) -> anyhow::Result<()> {
        let lib_dir = self.data.join(config::LIBRARY_DIR);
        let lib_free = available_space(&lib_dir)
            .with_context(|| format!("cannot read the free space of {}", lib_dir.display()))?;
        let content_free = available_space(&self.content)
            .with_context(|| format!("cannot read the free space of {}", self.content.display()))?;
        let same_disk = lib_free == content_free;
        let need_lib = chunk_bytes + SPACE_MARGIN;
        let need_content = file_bytes + SPACE_MARGIN;
        let short = if same_disk {
            (need_lib + file_bytes > lib_free)
                .then(|| (need_lib + file_bytes, lib_free, lib_dir.clone()))
        } else if need_lib > lib_free {
            Some((need_lib, lib_free, lib_dir.clone()))
        } else {
            (need_content > content_free)
                .then(|| (need_content, content_free, self.content.clone()))
        };
        match short {
            Some((need, free, path)) => bail!(
                "not enough space on the DP: this revision needs {} ({} of chunks, {} of rebuilt files, {} margin), {} free at {}",
                ferry_core::units::bytes(need),
                ferry_core::units::bytes(chunk_bytes),
                ferry_core::units::bytes(file_bytes),
                ferry_core::units::bytes(SPACE_MARGIN),
                ferry_core::units::bytes(free),
                path.display()
            ),
            None => Ok(()),
        }
    }

    fn library_packages(&self) -> anyhow::Result<Vec<String>> {
        Ok(self.lib.packages()?.into_iter().map(|(p, _)| p).collect())
    }

    async fn remove(
        &self,
        package: &str,
        revision: u32,
        reports: &mpsc::UnboundedSender<pb::Report>,
    ) -> bool {
        let a = pb::Assignment {
            package: package.to_string(),
            revision,
            name: String::new(),
        };
        info!(%package, "removing a package no longer assigned");
        let _ = reports.send(report(&a, pb::State::Removing));
        let (lib, content, p) = (self.lib.clone(), self.content.clone(), package.to_string());
        let done = tokio::task::spawn_blocking(move || -> anyhow::Result<u64> {
            content::uninstall(&content, &p)?;
            let freed = match lib.remove_package(&p) {
                Ok(s) => s.freed_bytes,
                Err(ferry_store::StoreError::NoPackage(_)) => 0,
                Err(e) => return Err(e.into()),
            };
            Ok(freed)
        })
        .await;
        match done {
            Ok(Ok(freed)) => {
                info!(%package, freed_bytes = freed, "package removed");
                let _ = reports.send(report(&a, pb::State::Removed));
                true
            }
            Ok(Err(e)) => {
                let mut r = report(&a, pb::State::Failed);
                r.error = format!("cannot remove {package}: {e:#}");
                warn!(%package, error = %r.error, "removal failed");
                let _ = reports.send(r);
                false
            }
            Err(e) => {
                warn!(%package, error = %e, "removal task failed");
                false
            }
        }
    }

    async fn transfer(
        &self,
        conn: &quinn::Connection,
        a: &pb::Assignment,
        reports: &mpsc::UnboundedSender<pb::Report>,
    ) -> Result<(), Failure> {
        let rx_start = conn.stats().udp_rx.bytes;
        let wire = || conn.stats().udp_rx.bytes.saturating_sub(rx_start);
        let manifests = self
            .manifest(conn, a)
            .await
            .map_err(|e| Failure::of(conn, e))?;
        let fail = |e: anyhow::Error| Failure::of(conn, e);

        let mut progress = report(a, pb::State::InProgress);
        let already = self
            .lib
            .revisions(&a.package)
            .map_err(|e| fail(e.into()))?
            .contains(&a.revision);
        if !already {
            let mut stage = self
                .lib
                .begin_staged(&format!("{}/{}", a.package, a.revision))
                .map_err(|e| fail(e.into()))?;
            let p = plan(&manifests, |id| stage.has_chunk(id)).map_err(|e| fail(e.into()))?;
            progress.bytes_needed = p.needed_bytes;
            progress.full_bytes = p.full_bytes;
            info!(
                chunks = p.missing.len(),
                needed_bytes = p.needed_bytes,
                full_bytes = p.full_bytes,
                "transfer planned"
            );
            let _ = reports.send(progress.clone());
            self.check_space(p.needed_bytes, p.full_bytes)
                .map_err(Failure::Transfer)?;

            let mut todo = p.missing;
            let mut rounds = 0u32;
            let mut last_report = Instant::now();
            let (started, mut fetched) = (Instant::now(), 0u64);
            while !todo.is_empty() {
                rounds += 1;
                if rounds > MAX_CHUNK_ATTEMPTS {
                    return Err(Failure::Transfer(anyhow!(
                        "{} chunk(s) failed verification {MAX_CHUNK_ATTEMPTS} times (first {}); the site's copy or the path to it is damaged",
                        todo.len(),
                        todo[0].id
                    )));
                }
                let mut bad = Vec::new();
                let mut replies = stream::iter(batches(&todo, BATCH_BYTES, MAX_BATCH_CHUNKS))
                    .map(|b| fetch(conn, b))
                    .buffer_unordered(FETCH_STREAMS);
                while let Some(got) = replies.next().await {
                    let got = got.map_err(fail)?;
                    fetched += got.iter().map(|(_, d)| d.len() as u64).sum::<u64>();
                    if let Some(rate) = self.max_rate {
                        let due = Duration::from_secs_f64(fetched as f64 / rate as f64);
                        if let Some(wait) = due.checked_sub(started.elapsed()) {
                            tokio::time::sleep(wait).await;
                        }
                    }
                    for (c, data) in got {
                        if data.len() != c.len as usize || ChunkId::of(&data) != c.id {
                            warn!(chunk = %c.id, "chunk failed verification; asking again");
                            bad.push(c);
                            continue;
                        }
                        stage.put_chunk(&c.id, &data).map_err(|e| fail(e.into()))?;
                        progress.bytes_done += u64::from(c.len);
                    }
                    // Persisted before it counts: a restart finds these.
                    stage.persist().map_err(|e| fail(e.into()))?;
                    if last_report.elapsed() >= REPORT_EVERY {
                        progress.wire_bytes = wire();
                        let _ = reports.send(progress.clone());
                        last_report = Instant::now();
                    }
                }
                todo = bad;
            }
            let record =
                serde_json::json!({ "package": a.package, "revision": a.revision, "name": a.name });
            stage
                .commit(&a.package, a.revision, &manifests, |_, _| {
                    Ok(serde_json::to_vec(&record).unwrap_or_default())
                })
                .map_err(|e| fail(e.into()))?;
        } else {
            progress.full_bytes = manifests.iter().map(|m| m.size).sum();
        }

        let (lib, dir, package, revision) = (
            self.lib.clone(),
            self.content.clone(),
            a.package.clone(),
            a.revision,
        );
        let built = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            if let Err(e) = content::install(&lib, &dir, &package, revision, &manifests) {
                // Chunks that cannot be read back or do not add up: forget
                // the revision so the next attempt fetches it again.
                if matches!(
                    e,
                    content::ContentError::Store(_) | content::ContentError::Mismatch { .. }
                ) {
                    let _ = lib.remove_revision(&package, revision, |_| Ok(None));
                }
                return Err(e.into());
            }
            for old in lib.revisions(&package)? {
                if old != revision {
                    lib.remove_revision(&package, old, |_| Ok(None))?;
                }
            }
            Ok(())
        })
        .await
        .map_err(|e| Failure::Transfer(anyhow!("rebuild task failed: {e}")))?;
        built.map_err(Failure::Transfer)?;

        progress.state = pb::State::Installed as i32;
        progress.wire_bytes = wire();
        info!(
            needed_bytes = progress.bytes_needed,
            wire_bytes = progress.wire_bytes,
            full_bytes = progress.full_bytes,
            "installed"
        );
        let _ = reports.send(progress);
        Ok(())
    }

    /// Fetches and checks the signed manifest of an assignment.
    async fn manifest(
        &self,
        conn: &quinn::Connection,
        a: &pb::Assignment,
    ) -> anyhow::Result<Vec<Manifest>> {
        match self.manifest_from(conn, a, true).await {
            // A compact manifest that does not check out against this DP's
            // copy of the base revision: ask once more for the full form.
            Err(e) if e.to_string().contains("compact form") => {
                warn!(package = %a.package, error = %e, "asking for the full manifest");
                self.manifest_from(conn, a, false).await
            }
            other => other,
        }
    }

    /// Fetches the manifest, offering the installed revision as a base
    /// when `compact`.
    async fn manifest_from(
        &self,
        conn: &quinn::Connection,
        a: &pb::Assignment,
        compact: bool,
    ) -> anyhow::Result<Vec<Manifest>> {
        // The revision installed now: the site can name its chunks by
        // position, which makes a small update's manifest small too.
        let base_revision = content::installed(&self.content, &a.package)
            .filter(|&r| r != a.revision && compact)
            .unwrap_or(0);
        let base: Vec<ferry_core::ChunkId> = if base_revision == 0 {
            Vec::new()
        } else {
            self.lib
                .manifests(&a.package, base_revision)?
                .iter()
                .flat_map(|m| m.chunks.iter().map(|c| c.id))
                .collect()
        };
        let base_revision = if base.is_empty() { 0 } else { base_revision };
        let (mut send, mut recv) = conn.open_bi().await?;
        let req = pb::Request {
            kind: Some(request::Kind::GetManifest(pb::GetManifest {
                package: a.package.clone(),
                revision: a.revision,
                base_revision,
            })),
        };
        write_frame(&mut send, &req).await?;
        let _ = send.finish();
        let signed = match reply(&mut recv).await?.and_then(|r| r.kind) {
            Some(reply::Kind::Manifest(m)) => m,
            Some(reply::Kind::Error(e)) => bail!("the site refused the manifest: {}", e.message),
            _ => bail!("the site answered the manifest request with something else"),
        };
        if signed.base_revision != 0 && signed.base_revision != base_revision {
            bail!(
                "the site answered with a manifest relative to revision {}, which this DP did not offer",
                signed.base_revision
            );
        }
        verify_manifest(&self.manifest_key, a, &signed, &base)
    }
}

/// Checks the site's signature, then decodes and checks every file manifest
/// of a revision.
pub fn verify_manifest(
    key: &[u8],
    a: &pb::Assignment,
    signed: &pb::SignedManifest,
    base: &[ferry_core::ChunkId],
) -> anyhow::Result<Vec<Manifest>> {
    let not_signed = || {
        anyhow!(
            "the manifest of {} revision {} is not signed by the site's key: refused (tampered in transit or a different site)",
            a.package,
            a.revision
        )
    };
    let body = if signed.base_revision == 0 {
        if !ferry_net::pki::verify_signature(key, &signed.body, &signed.signature) {
            return Err(not_signed());
        }
        pb::ManifestBody::decode(signed.body.as_ref())
            .map_err(|e| anyhow!("the manifest of {} is malformed: {e}", a.package))?
    } else {
        // Compact form: fill the ids in from the base revision, then check
        // the signature over the full form.
        let compact_err = |why: String| {
            anyhow!(
                "the manifest of {} revision {} in compact form does not check out against revision {} held here: {why}",
                a.package,
                a.revision,
                signed.base_revision
            )
        };
        let mut body = pb::ManifestBody::decode(signed.body.as_ref())
            .map_err(|e| compact_err(e.to_string()))?;
        ferry_wire::expand(&mut body, base).map_err(|e| compact_err(e.to_string()))?;
        if !ferry_net::pki::verify_signature(key, &body.encode_to_vec(), &signed.signature) {
            return Err(compact_err(not_signed().to_string()));
        }
        body
    };
    if body.package != a.package || body.revision != a.revision {
        bail!(
            "asked for the manifest of {} revision {}, got {} revision {}",
            a.package,
            a.revision,
            body.package,
            body.revision
        );
    }
    let mut paths = HashSet::new();
    let mut out = Vec::with_capacity(body.files.len());
    for f in &body.files {
        let m = ferry_wire::file_from_wire(f)?;
        if !paths.insert(m.path.clone()) {
            bail!("the manifest of {} names {} twice", a.package, m.path);
        }
        out.push(m);
    }
    if out.is_empty() {
        bail!("the manifest of {} lists no files", a.package);
    }
    Ok(out)
}

/// Asks for one batch of chunks on a new stream. Chunks are returned
/// unverified, in request order.
async fn fetch(
    conn: &quinn::Connection,
    batch: Vec<ChunkRef>,
) -> anyhow::Result<Vec<(ChunkRef, Bytes)>> {
    let (mut send, mut recv) = conn.open_bi().await?;
    let req = pb::Request {
        kind: Some(request::Kind::GetChunks(pb::GetChunks {
            ids: batch
                .iter()
                .map(|c| Bytes::copy_from_slice(c.id.as_bytes()))
                .collect(),
        })),
    };
    write_frame(&mut send, &req).await?;
    let _ = send.finish();
    let mut out = Vec::with_capacity(batch.len());
    for c in &batch {
        match reply(&mut recv).await?.and_then(|r| r.kind) {
            Some(reply::Kind::Chunk(ch)) if ch.id.as_ref() == c.id.as_bytes() => {
                out.push((*c, ch.data))
            }
            Some(reply::Kind::Chunk(_)) => bail!("the site answered with a chunk not asked for"),
            Some(reply::Kind::Error(e)) if e.code == Code::NotFound as i32 => {
                bail!(
                    "the manifest names a chunk the site does not have: {}",
                    e.message
                )
            }
            Some(reply::Kind::Error(e)) => {
                bail!("the site failed to send chunk {}: {}", c.id, e.message)
            }
            _ => bail!("the chunk stream ended early"),
        }
    }
    Ok(out)
}

/// Bytes an unprivileged writer can still use on the filesystem of `path`.
fn available_space(path: &Path) -> std::io::Result<u64> {
    let st = rustix::fs::statvfs(path)?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Reads one reply frame, giving up after [`ferry_wire::REPLY_TIMEOUT`].
async fn reply(recv: &mut quinn::RecvStream) -> anyhow::Result<Option<pb::Reply>> {
    match tokio::time::timeout(
        ferry_wire::REPLY_TIMEOUT,
        read_frame::<pb::Reply>(recv, MAX_REPLY_BYTES),
    )
    .await
    {
        Ok(r) => Ok(r?),
        Err(_) => bail!("the site sent nothing for {:?}", ferry_wire::REPLY_TIMEOUT),
    }
}

/// Whether a package id from the site can name a folder: letters and
/// digits only (site code and number, `FRY00001`).
fn safe_package_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 32 && id.bytes().all(|b| b.is_ascii_alphanumeric())
}

fn report(a: &pb::Assignment, state: pb::State) -> pb::Report {
    pb::Report {
        package: a.package.clone(),
        revision: a.revision,
        state: state as i32,
        ..pb::Report::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compact_manifests_are_accepted_only_when_they_expand_to_the_signed_body() {
        let key = ferry_net::pki::SigningKey::from_text(
            &ferry_net::pki::SigningKey::generate().unwrap(),
            "key",
        )
        .unwrap();
        let data: Vec<Vec<u8>> = (0u8..4).map(|n| vec![n; 100]).collect();
        let ids: Vec<ChunkId> = data.iter().map(|d| ChunkId::of(d)).collect();
        let whole: Vec<u8> = data.concat();
        let m = Manifest {
            path: "a.wim".into(),
            size: whole.len() as u64,
            hash: ferry_core::FileHash::of(&whole),
            chunks: ids.iter().map(|&id| ChunkRef { id, len: 100 }).collect(),
            segments: Vec::new(),
        };
        let mut full = pb::ManifestBody {
            package: "FRY00001".into(),
            revision: 2,
            name: "x".into(),
            files: vec![ferry_wire::file_to_wire(&m)],
        };
        let signature = key.sign(&full.encode_to_vec());
        let base = &ids[..3];
        ferry_wire::compact(&mut full, base);
        let signed = pb::SignedManifest {
            body: full.encode_to_vec().into(),
            signature: signature.into(),
            base_revision: 1,
        };
        let a = pb::Assignment {
            package: "FRY00001".into(),
            revision: 2,
            name: "x".into(),
        };
        let got = verify_manifest(&key.public(), &a, &signed, base).unwrap();
        assert_eq!(got[0].chunks, m.chunks);
        // A DP whose copy of the base differs cannot be fooled into another
        // manifest: the expanded body no longer matches the signature.
        let mut other = base.to_vec();
        other.swap(0, 1);
        let e = verify_manifest(&key.public(), &a, &signed, &other).unwrap_err();
        assert!(e.to_string().contains("compact form"), "{e}");
        let e = verify_manifest(&key.public(), &a, &signed, &base[..1]).unwrap_err();
        assert!(e.to_string().contains("compact form"), "{e}");
    }

    #[test]
    fn only_plain_package_ids_name_folders() {
        assert!(safe_package_id("FRY00001"));
        for bad in ["", "../x", "a/b", ".ferry", "FRY 1", &"A".repeat(33)] {
            assert!(!safe_package_id(bad), "{bad:?}");
        }
    }
}
