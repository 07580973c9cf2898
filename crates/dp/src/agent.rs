//! The DP agent: connect, watch assignments, converge.
//!
//! One connection to the site at a time, redialled with backoff. On it: a
//! control stream (`Watch`) that receives the full assignment set whenever
//! it changes and carries the DP's reports back, a stream per manifest, and
//! a few long-lived chunk streams per transfer ([`crate::transfer`]).
//! Transfers run one package revision at a time; validation requests from
//! the site run after them ([`crate::validate`]).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use ferry_core::session::{Confirmed, Desired, Held, Job, Session, Want};
use ferry_core::sync::backoff;
use ferry_core::ChunkRef;
use ferry_store::ContentStore;
use ferry_wire::pb::{self, reply, request};
use ferry_wire::{read_frame, write_frame, MAX_REPLY_BYTES};
use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn, Instrument};

use crate::config::{self, DpConfig};
use crate::error::{Context as _, DpError, Failure, Result};
use crate::manifest;
use crate::pull;
use crate::report::{self, of as report};
use crate::transfer;

/// A DP, opened and ready to run.
pub struct DpAgent {
    data: PathBuf,
    cfg: DpConfig,
    /// The content store; `None` while it must be opened again (its index
    /// hit an I/O error, such as a full disk, and RocksDB stays in that
    /// state until reopened).
    store: crate::served::StoreSlot,
    manifest_key: Vec<u8>,
    client: quinn::ClientConfig,
    max_rate: Option<u64>,
    /// Who may download from the HTTPS listener.
    gate: Arc<crate::gate::ClientGate>,
    /// Bumped when a new HTTPS certificate was written.
    cert: watch::Sender<u64>,
    /// The multicast sessions the HTTPS listener runs.
    multicast: Arc<crate::multicast::Sessions>,
    /// Whether the site holds chunks back now (a closed transfer window):
    /// a transfer under way waits without counting it a stall.
    paused: watch::Sender<bool>,
    /// The site's latest assignments: a pull DP's sources, who holds what,
    /// and its grants.
    latest: watch::Sender<Option<Arc<pb::Assignments>>>,
    /// The DP's certificate and key (PEM), for the connections to its
    /// sources.
    identity: (String, String),
    /// The listener for pull DPs, when `[peers]` says where.
    peers: Option<Arc<crate::peers::PeerServer>>,
    /// What `/metrics` shows.
    metrics: Arc<crate::metrics::Metrics>,
}

fn read(data: &Path, file: &str, what: &str) -> Result<String> {
    let p = data.join(file);
    std::fs::read_to_string(&p).map_err(|e| DpError::io(format!("read the {what}"), &p, e))
}

/// Waits on a listener's task: never while it runs; when it stops, why.
async fn stopped(
    task: Option<tokio::task::JoinHandle<Result<(), DpError>>>,
    what: &str,
) -> Result<(), DpError> {
    match task {
        Some(task) => match task.await {
            Ok(Ok(())) => std::future::pending().await,
            Ok(Err(e)) => Err(e).with_context(|| format!("{what} stopped")),
            Err(e) => Err(e).with_context(|| format!("{what} failed")),
        },
        None => std::future::pending().await,
    }
}

/// The site's reason, when it closed `conn` because this DP is revoked.
fn revoked(conn: &quinn::Connection) -> Option<String> {
    match conn.close_reason()? {
        quinn::ConnectionError::ApplicationClosed(c)
            if c.error_code == quinn::VarInt::from_u32(ferry_wire::CLOSE_REVOKED) =>
        {
            Some(String::from_utf8_lossy(&c.reason).into_owned())
        }
        _ => None,
    }
}

impl DpAgent {
    /// Opens the DP in `data` (its index is locked while the agent runs).
    pub fn open(data: &Path) -> Result<Self, DpError> {
        let cfg = DpConfig::load(data)?;
        let ca = ferry_net::pki::cert_der(&read(data, config::CA_FILE, "site CA")?, "site CA")?;
        let pem = (
            read(data, config::CERT_FILE, "DP certificate")?,
            read(data, config::KEY_FILE, "DP key")?,
        );
        let identity = || ferry_net::tls::Identity::from_pem(&pem.0, &pem.1, "DP certificate");
        let client = ferry_net::tls::dp_client(&ca, identity()?, cfg.transport())?;
        let manifest_key = hex::decode(
            read(data, config::MANIFEST_KEY_FILE, "manifest key")?.trim(),
        )
        .map_err(|e| {
            DpError::io(
                "read the manifest key (not hex)",
                &data.join(config::MANIFEST_KEY_FILE),
                std::io::Error::new(std::io::ErrorKind::InvalidData, e),
            )
        })?;
        let content = cfg.content_dir(data);
        std::fs::create_dir_all(&content).map_err(|e| DpError::io("create", &content, e))?;
        let opened = Arc::new(crate::open_store(data, &cfg)?);
        let store = Arc::new(std::sync::Mutex::new(Some(opened.clone())));
        let metrics = Arc::new(crate::metrics::Metrics::default());
        let peers = match &cfg.peers {
            Some(p) => Some(Arc::new(crate::peers::PeerServer::new(
                p.clone(),
                ferry_net::tls::dp_peer_server(&ca, identity()?, cfg.transport())?,
                store.clone(),
                manifest_key.clone(),
                cfg.site_code.clone(),
                metrics.clone(),
            ))),
            None => None,
        };
        let policy = <pb::ClientPolicy as prost::Message>::decode(&opened.client_policy()?[..])
            .unwrap_or_default();
        let gate = Arc::new(crate::gate::ClientGate::new(
            manifest_key.clone(),
            cfg.site_code.clone(),
            policy,
        ));
        Ok(Self {
            data: data.to_path_buf(),
            cfg,
            store,
            manifest_key,
            client,
            max_rate: None,
            gate,
            cert: watch::channel(0).0,
            multicast: Arc::new(crate::multicast::Sessions::default()),
            paused: watch::channel(false).0,
            latest: watch::channel(None).0,
            identity: pem,
            peers,
            metrics,
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
    /// Ends with an error when the site says this DP was revoked: it will
    /// never be let in again, so redialling would only fill both logs.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) -> Result<(), DpError> {
        let span = tracing::info_span!("dp", name = %self.cfg.name, site = %self.cfg.site);
        let https = self.cfg.clients.clone().map(|cfg| {
            let listener = crate::http::Listener {
                cfg,
                data: self.data.clone(),
                store: self.store.clone(),
                gate: self.gate.clone(),
                manifest_key: self.manifest_key.clone(),
                multicast: self.multicast.clone(),
                cert: self.cert.subscribe(),
            };
            tokio::spawn(listener.run().instrument(span.clone()))
        });
        let peers = self
            .peers
            .clone()
            .map(|p| tokio::spawn(p.run().instrument(span.clone())));
        let metrics = self.cfg.metrics.clone().map(|cfg| {
            let serve = crate::metrics::serve(cfg, self.metrics.clone(), self.multicast.clone());
            tokio::spawn(serve.instrument(span.clone()))
        });
        let main = async {
            info!(data = %self.data.display(), content = %self.cfg.content_dir(&self.data).display(), "DP agent starting");
            let mut failures = 0u32;
            loop {
                match self.connect().await {
                    Ok(conn) => {
                        info!("connected to the site");
                        self.metrics.connected(true);
                        failures = 0;
                        let err = self.session(&conn).await;
                        self.metrics.connected(false);
                        if let Some(reason) = revoked(&conn) {
                            error!(%reason, "revoked by the site; stopping");
                            return Err(DpError::Revoked(reason));
                        }
                        conn.close(0u32.into(), b"");
                        warn!(reason = %err, "lost the site");
                    }
                    Err(e) => error!(error = %e, "cannot connect to the site"),
                }
                let delay = backoff(failures);
                failures += 1;
                info!(retry_in = ?delay, "reconnecting");
                tokio::time::sleep(delay).await;
            }
        };
        let aborts: Vec<_> = https
            .iter()
            .chain(&peers)
            .chain(&metrics)
            .map(|t| t.abort_handle())
            .collect();
        let out = tokio::select! {
            r = main.instrument(span) => r,
            r = stopped(https, "the HTTPS listener for clients") => r,
            r = stopped(peers, "the QUIC listener for pull DPs") => r,
            r = stopped(metrics, "the metrics listener") => r,
            _ = shutdown => {
                info!("DP agent stopping");
                Ok(())
            }
        };
        for a in aborts {
            a.abort();
        }
        out
    }

    async fn connect(&self) -> Result<quinn::Connection> {
        let addr = crate::resolve(&self.cfg.site).await?;
        let endpoint = crate::client_endpoint(addr)?;
        let conn = endpoint
            .connect_with(self.client.clone(), addr, ferry_net::pki::SITE_SERVER_NAME)
            .map_err(|e| DpError::net("cannot dial the site", std::io::Error::other(e)))?
            .await?;
        Ok(conn)
    }

    /// One connection's life; returns why it ended.
    async fn session(&self, conn: &quinn::Connection) -> DpError {
        match self.session_inner(conn).await {
            Ok(()) => DpError::Disconnected("the site ended the session".into()),
            Err(e) => match conn.close_reason() {
                Some(reason) => DpError::lost(&reason),
                None => e,
            },
        }
    }

    /// The content store, opened again if it had to be closed.
    async fn store(&self) -> Result<Arc<ContentStore>> {
        if let Some(s) = self.store.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            return Ok(s);
        }
        let (data, cfg) = (self.data.clone(), self.cfg.clone());
        let s =
            Arc::new(tokio::task::spawn_blocking(move || crate::open_store(&data, &cfg)).await??);
        info!("the DP's index is open again");
        *self.store.lock().unwrap_or_else(|p| p.into_inner()) = Some(s.clone());
        Ok(s)
    }

    /// After a failure: if the index no longer takes writes (RocksDB keeps
    /// an I/O error such as a full disk until it is reopened), close it so
    /// the next use opens it again.
    async fn heal_store(&self) {
        let Ok(store) = self.store().await else {
            return;
        };
        let probe = {
            let s = store.clone();
            tokio::task::spawn_blocking(move || s.probe()).await
        };
        if matches!(probe, Ok(Ok(()))) {
            return;
        }
        warn!("the DP's index stopped taking writes; closing it to open it again");
        let mut store = Some(store);
        self.store.lock().unwrap_or_else(|p| p.into_inner()).take();
        // Other holders (a finished transfer's helpers) let go quickly.
        for _ in 0..100 {
            match store.take().map(Arc::try_unwrap) {
                Some(Ok(s)) => {
                    drop(s);
                    return;
                }
                Some(Err(s)) => store = Some(s),
                None => return,
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// Takes the site's client policy and keeps it for the next start.
    async fn set_client_policy(&self, p: &pb::ClientPolicy) {
        self.gate.set_policy(p.clone());
        let bytes = prost::Message::encode_to_vec(p);
        let Ok(store) = self.store().await else {
            return;
        };
        match tokio::task::spawn_blocking(move || store.set_client_policy(&bytes)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(error = %e, "cannot keep the client policy"),
            Err(e) => warn!(error = %e, "cannot keep the client policy"),
        }
    }

    /// The DP's disk use and free space, measured off the async threads.
    async fn disk(&self) -> pb::Disk {
        let (data, content) = (self.data.clone(), self.cfg.content_dir(&self.data));
        tokio::task::spawn_blocking(move || report::disk(ferry_store::disk::of(&data, &content)))
            .await
            .unwrap_or_default()
    }

    async fn installed(&self) -> Result<Vec<(String, u32)>> {
        let store = self.store().await?;
        Ok(tokio::task::spawn_blocking(move || store.installed()).await??)
    }

    async fn session_inner(&self, conn: &quinn::Connection) -> Result<()> {
        if let Some(clients) = &self.cfg.clients {
            match crate::http::ensure_cert(conn, &self.data, clients).await {
                Ok(true) => self.cert.send_modify(|n| *n += 1),
                Ok(false) => {}
                Err(e) => {
                    error!(error = %e, "no HTTPS certificate for the client listener")
                }
            }
        }
        let (mut send, mut recv) = conn.open_bi().await?;
        let holdings = self
            .installed()
            .await?
            .into_iter()
            .map(|(package, revision)| pb::Holding { package, revision })
            .collect();
        let hello = pb::Request {
            kind: Some(request::Kind::Watch(pb::Watch {
                protocol: ferry_wire::PROTOCOL_VERSION,
                holdings,
                disk: Some(self.disk().await),
                peer_address: self
                    .cfg
                    .peers
                    .as_ref()
                    .map(|p| p.listen.to_string())
                    .unwrap_or_default(),
            })),
        };
        write_frame(&mut send, &hello).await?;
        let (report_tx, mut report_rx) = mpsc::unbounded_channel::<pb::Report>();
        let (desired_tx, desired_rx) = watch::channel::<Option<pb::Assignments>>(None);

        let writer = async {
            while let Some(mut r) = report_rx.recv().await {
                // What the disk holds changes when content is installed or
                // removed (or a transfer gives up, maybe for want of space).
                let changed = [pb::State::Installed, pb::State::Removed, pb::State::Failed]
                    .iter()
                    .any(|s| *s as i32 == r.state);
                if changed && r.validation.is_none() {
                    r.disk = Some(self.disk().await);
                }
                write_frame(&mut send, &r).await?;
            }
            Ok::<(), DpError>(())
        };
        let reader = async {
            loop {
                match read_frame::<pb::Reply>(&mut recv, MAX_REPLY_BYTES).await? {
                    Some(pb::Reply {
                        kind: Some(reply::Kind::Assignments(a)),
                    }) => {
                        info!(
                            packages = a.items.len(),
                            validate = a.validate,
                            maintenance = a.maintenance,
                            "assignments received"
                        );
                        if let Some(p) = &a.clients {
                            self.set_client_policy(p).await;
                        }
                        if a.paused_until > 0 {
                            info!(
                                until = a.paused_until,
                                "a transfer window of this DP is closed"
                            );
                        }
                        self.paused.send_replace(a.paused_until > 0);
                        self.latest.send_replace(Some(Arc::new(a.clone())));
                        let _ = desired_tx.send(Some(a));
                    }
                    Some(pb::Reply {
                        kind: Some(reply::Kind::Error(e)),
                    }) => {
                        return Err(DpError::Refused {
                            what: "the session".into(),
                            message: e.message,
                        })
                    }
                    Some(_) => {
                        return Err(DpError::protocol(
                            "unexpected message on the control stream",
                        ))
                    }
                    None => {
                        return Err(DpError::Disconnected(
                            "the site closed the control stream".into(),
                        ))
                    }
                }
            }
        };
        // The multicast sessions, when they change (at most twice a second)
        // and at connection.
        let sessions = {
            let reports = report_tx.clone();
            let mut changed = self.multicast.subscribe();
            changed.mark_changed();
            async move {
                let mut running = false;
                loop {
                    // Every 2 s while a session sends: its bytes and passes.
                    tokio::select! {
                        r = changed.changed() => if r.is_err() { break },
                        _ = tokio::time::sleep(std::time::Duration::from_secs(2)), if running => {}
                    }
                    let views = self.multicast.views();
                    running = views.iter().any(|v| v.ended.is_none());
                    if !views.is_empty() {
                        let _ = reports.send(crate::multicast::report(&views));
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                }
                std::future::pending::<Result<()>>().await
            }
        };
        let worker = self.converge(conn, desired_rx, report_tx);
        tokio::select! {
            r = reader => r,
            r = writer => r,
            r = worker => r,
            r = sessions => r,
        }
    }

    /// What the store holds, as the session machine starts from it.
    async fn held(&self) -> Result<Held> {
        let store = self.store().await?;
        tokio::task::spawn_blocking(move || -> Result<Held> {
            let installed: BTreeMap<String, u32> = store.installed()?.into_iter().collect();
            let stages = store.stages()?;
            let mut rebuilt = HashMap::new();
            for p in installed.keys().chain(stages.iter().map(|(p, _)| p)) {
                rebuilt.insert(p.clone(), store.rebuilt(p)?);
            }
            Ok(Held {
                installed,
                stages,
                rebuilt,
                validated: store.validated()?,
            })
        })
        .await?
    }

    /// Brings the DP in line with the latest assignments, again whenever
    /// they change or a failed job is due for retry: the session machine
    /// ([`ferry_core::session`]) says what to do, this runs it.
    async fn converge(
        &self,
        conn: &quinn::Connection,
        mut desired_rx: watch::Receiver<Option<pb::Assignments>>,
        reports: mpsc::UnboundedSender<pb::Report>,
    ) -> Result<()> {
        let mut session = Session::new(self.held().await?);
        // Whether the latest assignments are still to be handed over
        // (`changed()` marks them seen when it wakes).
        let mut fresh = true;
        loop {
            if fresh || desired_rx.has_changed()? {
                fresh = false;
                if let Some(a) = desired_rx.borrow_and_update().clone() {
                    let next = desired(&a);
                    // In maintenance: what is held stays, nothing new starts.
                    session.assign(if a.maintenance {
                        session.frozen(&next)
                    } else {
                        next
                    });
                }
            }
            if let Some(job) = session.poll_job(Instant::now()) {
                self.run_job(conn, &mut session, job, &reports).await?;
                continue;
            }
            match session.poll_timeout(Instant::now()) {
                Some(at) => tokio::select! {
                    r = desired_rx.changed() => {
                        r?;
                        fresh = true;
                    }
                    _ = tokio::time::sleep_until(at.into()) => {}
                },
                None => {
                    desired_rx.changed().await?;
                    fresh = true;
                }
            }
        }
    }

    /// Runs one job of the session and tells the machine how it went.
    /// Only a lost connection ends the session.
    async fn run_job(
        &self,
        conn: &quinn::Connection,
        session: &mut Session,
        job: Job,
        reports: &mpsc::UnboundedSender<pb::Report>,
    ) -> Result<()> {
        let outcome: Result<(), Failure> = match &job {
            Job::Remove { package, revision } => self.remove(package, *revision, reports).await,
            Job::DropStage {
                package,
                revision,
                uninstall,
            } => self.drop_stage(package, *revision, *uninstall).await,
            Job::Rebuild(w) => self.rebuild(w).await,
            Job::Confirm(w) => {
                let how = self.confirm(conn, w, reports).await;
                session.handle_confirmed(&job, how);
                return Ok(());
            }
            Job::Fetch {
                want,
                base,
                from_scratch,
            } => {
                let a = assignment(want);
                let _ = reports.send(report(&a, pb::State::Pending));
                let span =
                    tracing::info_span!("transfer", package = %a.package, revision = a.revision);
                let r = self
                    .transfer(conn, &a, *base, reports, *from_scratch)
                    .instrument(span)
                    .await;
                match r {
                    Ok(()) if a.rebuild > 0 => self.set_rebuilt(&a).await,
                    other => other,
                }
            }
            Job::Validate {
                request,
                packages,
                wanted,
            } => match self.store().await {
                Ok(store) => {
                    let m = &self.metrics;
                    crate::validate::run(conn, &store, *request, packages, wanted, reports, m).await
                }
                Err(e) => Err(Failure::Job(e)),
            },
        };
        match outcome {
            Ok(()) => session.handle_done(&job),
            Err(f) if !f.is_retryable() => return Err(f.into_inner()),
            Err(f) => {
                self.heal_store().await;
                let delay = session.handle_failed(&job, Instant::now());
                let e = f.into_inner();
                let msg = format!("{e:#}");
                match &job {
                    Job::Validate { request, .. } => {
                        warn!(request, error = %msg, retry_in = ?delay, "validation failed");
                    }
                    Job::Fetch { want, .. } => {
                        warn!(package = %want.package, revision = want.revision, error = %msg, retry_in = ?delay, "transfer failed");
                        let _ = reports.send(report::failed(&assignment(want), msg, delay));
                    }
                    Job::Rebuild(w) => {
                        warn!(package = %w.package, error = %msg, retry_in = ?delay, "cannot delete the copy to rebuild");
                        let _ = reports.send(report::failed(
                            &assignment(w),
                            format!("cannot delete the copy to rebuild it: {msg}"),
                            delay,
                        ));
                    }
                    // Reported where they failed.
                    Job::Remove { .. } | Job::DropStage { .. } | Job::Confirm(_) => {
                        warn!(error = %msg, retry_in = ?delay, "cannot tidy the content folder");
                    }
                }
            }
        }
        Ok(())
    }

    async fn drop_stage(
        &self,
        package: &str,
        revision: u32,
        uninstall: bool,
    ) -> Result<(), Failure> {
        let store = self.store().await.map_err(Failure::Job)?;
        let p = package.to_string();
        info!(%package, revision, "dropping a transfer no longer wanted");
        tokio::task::spawn_blocking(move || {
            if uninstall {
                // Never installed: its record goes with the stage.
                store.uninstall(&p)
            } else {
                store.drop_stage(&p, revision)
            }
        })
        .await
        .map_err(Failure::job)?
        .context("cannot drop an unwanted transfer")
        .map_err(Failure::Job)
    }

    /// Deletes the copy held so it is fetched again from scratch, as the
    /// site asked.
    async fn rebuild(&self, w: &Want) -> Result<(), Failure> {
        info!(package = %w.package, rebuild = w.rebuild, "rebuilding from scratch, as the site asked: the copy held is deleted and every chunk fetched again");
        let store = self.store().await.map_err(Failure::Job)?;
        let p = w.package.clone();
        tokio::task::spawn_blocking(move || store.uninstall(&p))
            .await
            .map_err(Failure::job)?
            .map_err(Failure::job)
    }

    async fn set_rebuilt(&self, a: &pb::Assignment) -> Result<(), Failure> {
        let store = self.store().await.map_err(Failure::Job)?;
        let (p, n) = (a.package.clone(), a.rebuild);
        tokio::task::spawn_blocking(move || store.set_rebuilt(&p, n))
            .await
            .map_err(Failure::job)?
            .map_err(Failure::job)
    }

    /// Reports an installed revision, after proving a copy adopted from the
    /// older layout against the site's manifest.
    async fn confirm(
        &self,
        conn: &quinn::Connection,
        w: &Want,
        reports: &mpsc::UnboundedSender<pb::Report>,
    ) -> Confirmed {
        let a = assignment(w);
        match self.prove_adopted(conn, &a).await {
            Ok(true) => {}
            Ok(false) => return Confirmed::Dropped,
            Err(e) => {
                warn!(package = %a.package, error = %format!("{e:#}"), "cannot prove an adopted revision against the site's manifest")
            }
        }
        let mut r = report(&a, pb::State::Installed);
        r.full_bytes = self.full_bytes(&a.package, a.revision).await;
        let _ = reports.send(r);
        Confirmed::Kept
    }

    /// A revision adopted from the older DP layout has no signed manifest
    /// yet: fetch it, and keep it if it names the same chunks (else the
    /// revision is dropped, to be fetched again). Whether it stays.
    async fn prove_adopted(&self, conn: &quinn::Connection, a: &pb::Assignment) -> Result<bool> {
        let store = self.store().await?;
        let (s, p, r) = (store.clone(), a.package.clone(), a.revision);
        let held = tokio::task::spawn_blocking(move || -> Result<_> {
            let rec = s.record(&p, r)?;
            Ok((rec, s.manifests(&p, r)?))
        })
        .await??;
        let (Some(rec), ours) = held else {
            return Ok(true);
        };
        if !rec.signature.is_empty() {
            return Ok(true);
        }
        let signed = manifest::fetch(conn, &self.manifest_key, a, None).await?;
        let same = signed.manifests.len() == ours.len()
            && signed
                .manifests
                .iter()
                .zip(&ours)
                .all(|(x, y)| x.path == y.path && x.chunks == y.chunks);
        let (p, r) = (a.package.clone(), a.revision);
        tokio::task::spawn_blocking(move || -> Result<bool> {
            if same {
                store.set_signed(&p, r, &signed.name, signed.body, signed.signature)?;
                info!(package = %p, revision = r, "adopted revision proven against the site's signed manifest");
            } else {
                warn!(package = %p, revision = r, "adopted revision differs from the site's manifest; fetching it again");
                store.uninstall(&p)?;
            }
            Ok(same)
        })
        .await?
    }

    async fn full_bytes(&self, package: &str, revision: u32) -> u64 {
        let Ok(store) = self.store().await else {
            return 0;
        };
        let p = package.to_string();
        tokio::task::spawn_blocking(move || {
            store
                .manifests(&p, revision)
                .map(|ms| ms.iter().map(|m| m.size).sum())
                .unwrap_or(0)
        })
        .await
        .unwrap_or(0)
    }

    async fn remove(
        &self,
        package: &str,
        revision: u32,
        reports: &mpsc::UnboundedSender<pb::Report>,
    ) -> Result<(), Failure> {
        let a = pb::Assignment {
            package: package.to_string(),
            revision,
            ..pb::Assignment::default()
        };
        info!(%package, "removing a package no longer assigned");
        let _ = reports.send(report(&a, pb::State::Removing));
        let store = self
            .store()
            .await
            .context("cannot remove: the index is not open")
            .map_err(Failure::Job)?;
        let p = package.to_string();
        match tokio::task::spawn_blocking(move || store.uninstall(&p))
            .await
            .map_err(Failure::job)?
        {
            Ok(()) => {
                info!(%package, "package removed");
                let _ = reports.send(report(&a, pb::State::Removed));
                Ok(())
            }
            Err(e) => {
                let mut r = report(&a, pb::State::Failed);
                r.error = format!("cannot remove {package}: {e}");
                let _ = reports.send(r);
                Err(Failure::job(e))
            }
        }
    }

    async fn transfer(
        &self,
        conn: &quinn::Connection,
        a: &pb::Assignment,
        installed: Option<u32>,
        reports: &mpsc::UnboundedSender<pb::Report>,
        from_scratch: bool,
    ) -> Result<(), Failure> {
        let signed = self
            .manifest(conn, a, installed)
            .await
            .map_err(|e| Failure::of(conn, e))?;
        let store = self.store().await.map_err(Failure::Job)?;
        let manifest_bytes = signed.wire_bytes;
        // A pull DP tries its sources that hold the revision, by rank,
        // each once; waits for one that is getting it; else (or when none
        // is left) takes it from the site.
        let mut failed: Vec<String> = Vec::new();
        let mut earlier: Vec<pb::SourceBytes> = Vec::new();
        let (progress, wire, sources) = loop {
            let received = AtomicU64::new(0);
            let pick = pull::pick(self.latest.borrow().as_deref(), a, &failed);
            let src = match pick {
                pull::Pick::Site => {
                    let supply = transfer::Supply {
                        conn,
                        name: "site",
                        grants: None,
                        earlier: &earlier,
                        received: &received,
                        metrics: &self.metrics,
                    };
                    let (p, w) = transfer::run(self.request(
                        supply,
                        &store,
                        a,
                        signed.clone(),
                        reports,
                        from_scratch,
                    ))
                    .await?;
                    break (p, w, transfer::tally(&earlier, "site", &received));
                }
                pull::Pick::Wait(src) => {
                    self.wait_for_source(conn, a, &src, reports).await?;
                    continue;
                }
                pull::Pick::Source(src) => src,
            };
            let attempt = async {
                let peer = pull::dial(&src, &self.identity, self.cfg.transport()).await?;
                let supply = transfer::Supply {
                    conn: &peer,
                    name: &src.dp,
                    grants: Some(self.latest.subscribe()),
                    earlier: &earlier,
                    received: &received,
                    metrics: &self.metrics,
                };
                info!(source = %src.dp, address = %src.address, "fetching from a source DP");
                let r = transfer::run(self.request(
                    supply,
                    &store,
                    a,
                    signed.clone(),
                    reports,
                    from_scratch,
                ))
                .await;
                peer.close(0u32.into(), b"done");
                r.map_err(Failure::into_inner)
            };
            let r = attempt.await;
            if let Some(reason) = conn.close_reason() {
                return Err(Failure::lost(&reason));
            }
            let n = received.load(Ordering::Relaxed);
            match r {
                Ok((p, w)) => break (p, w, transfer::tally(&earlier, &src.dp, &received)),
                Err(e) => {
                    warn!(source = %src.dp, error = %format!("{e:#}"), received_bytes = n, "a source DP failed; turning to the next source, or the site");
                    earlier = transfer::tally(&earlier, &src.dp, &received);
                    failed.push(src.dp.clone());
                }
            }
        };
        info!(
            needed_bytes = progress.bytes_needed,
            local_bytes = progress.bytes_local,
            manifest_bytes,
            wire_bytes = wire,
            full_bytes = progress.full_bytes,
            sources = ?sources.iter().map(|s| (&s.source, s.bytes)).collect::<Vec<_>>(),
            "installed"
        );
        let mut r = report::progress(a, pb::State::Installed, &progress, wire, manifest_bytes);
        r.sources = sources;
        let _ = reports.send(r);
        Ok(())
    }

    /// A transfer of `a` from `supply`.
    fn request<'a>(
        &'a self,
        supply: transfer::Supply<'a>,
        store: &'a Arc<ContentStore>,
        a: &'a pb::Assignment,
        signed: manifest::Signed,
        reports: &'a mpsc::UnboundedSender<pb::Report>,
        from_scratch: bool,
    ) -> transfer::Request<'a> {
        transfer::Request {
            supply,
            store,
            assignment: a,
            signed,
            max_rate: self.max_rate,
            dp: &self.cfg.name,
            reports,
            from_scratch,
            paused: self.paused.subscribe(),
        }
    }

    /// Reports that the transfer waits for source `src` to get the
    /// revision, and waits until the site's assignments change.
    async fn wait_for_source(
        &self,
        conn: &quinn::Connection,
        a: &pb::Assignment,
        src: &str,
        reports: &mpsc::UnboundedSender<pb::Report>,
    ) -> Result<(), Failure> {
        info!(source = %src, "waiting for a source DP to get the revision first");
        let mut r = report(a, pb::State::Pending);
        r.waiting_for = src.to_string();
        let _ = reports.send(r);
        let mut latest = self.latest.subscribe();
        latest.borrow_and_update();
        tokio::select! {
            r = latest.changed() => r.map_err(|_| Failure::job(DpError::stopped("the session ended")))?,
            e = conn.closed() => return Err(Failure::lost(&e)),
        }
        Ok(())
    }

    /// Fetches and checks the signed manifest of an assignment, in compact
    /// form against the revision installed here when there is one.
    async fn manifest(
        &self,
        conn: &quinn::Connection,
        a: &pb::Assignment,
        installed: Option<u32>,
    ) -> Result<manifest::Signed> {
        let base_rev = installed.filter(|&r| r != a.revision);
        let base: Vec<ChunkRef> = match base_rev {
            Some(r) => {
                let (store, p) = (self.store().await?, a.package.clone());
                tokio::task::spawn_blocking(move || store.manifests(&p, r))
                    .await??
                    .iter()
                    .flat_map(|m| m.chunks.iter().copied())
                    .collect()
            }
            None => Vec::new(),
        };
        let offer = base_rev
            .filter(|_| !base.is_empty())
            .map(|r| (r, base.as_slice()));
        match manifest::fetch(conn, &self.manifest_key, a, offer).await {
            // A compact manifest that does not check out against this DP's
            // copy of the base revision: ask once more for the full form.
            Err(e) if e.is_compact_mismatch() => {
                warn!(package = %a.package, error = %e, "asking for the full manifest");
                manifest::fetch(conn, &self.manifest_key, a, None).await
            }
            other => other,
        }
    }
}

/// The site's assignments as the session machine takes them; ids that
/// cannot name a folder are left out (and logged).
fn desired(a: &pb::Assignments) -> Desired {
    Desired {
        items: a
            .items
            .iter()
            .filter(|a| {
                let ok = safe_package_id(&a.package);
                if !ok {
                    warn!(package = %a.package, "assignment with an unusable package id ignored");
                }
                ok
            })
            .map(|a| Want {
                package: a.package.clone(),
                revision: a.revision,
                rebuild: a.rebuild,
            })
            .collect(),
        validate: a.validate,
        validate_packages: a.validate_packages.clone(),
    }
}

/// A job's revision as the wire names it.
fn assignment(w: &Want) -> pb::Assignment {
    pb::Assignment {
        package: w.package.clone(),
        revision: w.revision,
        rebuild: w.rebuild,
        ..pb::Assignment::default()
    }
}

/// Whether a package id from the site can name a folder: letters and
/// digits only (site code and number, `FRY00001`).
fn safe_package_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 32 && id.bytes().all(|b| b.is_ascii_alphanumeric())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_package_ids_name_folders() {
        assert!(safe_package_id("FRY00001"));
        for bad in ["", "../x", "a/b", ".ferry", "FRY 1", &"A".repeat(33)] {
            assert!(!safe_package_id(bad), "{bad:?}");
        }
    }
}
