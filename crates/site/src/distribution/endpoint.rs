//! The site's QUIC endpoint: what distribution points talk to.
//!
//! One task per connection, one per stream. A connection without a client
//! certificate may only enroll; one with a certificate must be the one
//! issued to a DP that is not revoked. Each stream starts with one
//! [`pb::Request`] (see `proto/ferry/v1/ferry.proto`).

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::BytesMut;
use ferry_core::ChunkId;
use ferry_net::pki::{fingerprint, CaFiles, SigningKey};
use ferry_store::{Library, StoreError};
use ferry_wire::pb::{self, reply, request, Code};
use ferry_wire::{
    put_chunk_frame, put_frame, read_frame, write_frame, MAX_REPLY_BYTES, MAX_REQUEST_BYTES,
};
use prost::Message;
use tracing::{debug, info, warn, Instrument};

use crate::distribution::live::Connections;
use crate::distribution::pull;
use crate::distribution::records::{SourceBytes, TransferReport, TransferState};
use crate::distribution::registry::{now, Hub, Unknown, CLOSE_NOT_ALLOWED, CLOSE_REVOKED};
use crate::library::packages;
use ferry_wire::CLOSE_BUSY;

/// Longest report string kept (errors, paths): a DP cannot grow the
/// registry without bound.
const MAX_REPORT_TEXT: usize = 2048;
/// Sources kept per transfer report.
const MAX_SOURCES: usize = 16;
/// Damaged chunks kept per validation result.
const MAX_DAMAGE_RECORDS: usize = 1000;

/// `text` cut to [`MAX_REPORT_TEXT`] bytes at a character boundary.
fn bounded(text: &str) -> String {
    if text.len() <= MAX_REPORT_TEXT {
        return text.to_string();
    }
    let mut end = MAX_REPORT_TEXT;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// Revisions whose chunk sets are kept for scoping fetch streams.
const CHUNK_SET_CACHE: usize = 8;

/// Fault injection for tests, from the environment of `ferry site serve`
/// when built with the `fault-injection` feature (the end-to-end tests'
/// build; never a release build): `FERRY_FAULT_CORRUPT_CHUNKS=N` flips a
/// bit in the first N chunks sent; `FERRY_FAULT_TAMPER_MANIFEST=1` changes
/// every manifest after signing. Without the feature nothing is read.
#[derive(Debug, Default)]
pub(crate) struct Faults {
    corrupt_chunks: AtomicU64,
    tamper_manifest: bool,
}

impl Faults {
    #[cfg(not(feature = "fault-injection"))]
    fn from_env() -> Self {
        Self::default()
    }

    #[cfg(feature = "fault-injection")]
    fn from_env() -> Self {
        let n = |k: &str| {
            std::env::var(k)
                .ok()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        let f = Self {
            corrupt_chunks: AtomicU64::new(n("FERRY_FAULT_CORRUPT_CHUNKS")),
            tamper_manifest: n("FERRY_FAULT_TAMPER_MANIFEST") > 0,
        };
        if f.tamper_manifest || f.corrupt_chunks.load(Ordering::Relaxed) > 0 {
            warn!(
                ?f,
                "fault injection is on: this site sends bad data on purpose"
            );
        }
        f
    }

    fn corrupt_next_chunk(&self) -> bool {
        self.corrupt_chunks
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok()
    }
}

/// A package revision.
type Revision = (String, u32);
/// The distinct chunks of a revision.
type ChunkSet = Arc<HashSet<ChunkId>>;

/// What the endpoint serves from.
pub(crate) struct DpServer {
    hub: Arc<Hub>,
    /// The DPs connected to this endpoint now.
    conns: Arc<Connections>,
    lib: Arc<Library>,
    ca: CaFiles,
    ca_der: Vec<u8>,
    key: SigningKey,
    site_code: String,
    /// The site's `keep_revisions`.
    keep_revisions: u32,
    faults: Arc<Faults>,
    /// Caps on connections without a DP certificate (enrollment).
    admission: Arc<crate::distribution::admission::Admission>,
    chunk_sets: Mutex<Vec<(Revision, ChunkSet)>>,
    /// Held while a chunk set is built: a DP opens its fetch streams at
    /// once, and each building its own copy of a large revision's set (and
    /// manifests) would multiply the site's peak memory.
    chunk_set_build: tokio::sync::Mutex<()>,
}

impl DpServer {
    /// A server over the site's registry, library, CA and signing key.
    pub(crate) fn new(
        hub: Arc<Hub>,
        lib: Arc<Library>,
        ca: CaFiles,
        ca_der: Vec<u8>,
        key: SigningKey,
        site_code: String,
        keep_revisions: u32,
    ) -> Self {
        use crate::distribution::admission::{Admission, DEFAULT_PER_ADDRESS, DEFAULT_TOTAL};
        Self {
            keep_revisions,
            admission: Admission::new(DEFAULT_PER_ADDRESS, DEFAULT_TOTAL),
            hub,
            conns: Arc::new(Connections::default()),
            lib,
            ca,
            ca_der,
            key,
            site_code,
            faults: Arc::new(Faults::from_env()),
            chunk_sets: Mutex::new(Vec::new()),
            chunk_set_build: tokio::sync::Mutex::new(()),
        }
    }

    /// This server with `admission` capping the connections without a DP
    /// certificate (the defaults otherwise).
    pub(crate) fn admitting(
        mut self,
        admission: Arc<crate::distribution::admission::Admission>,
    ) -> Self {
        self.admission = admission;
        self
    }

    /// The DPs connected now (the operator API reads them and closes a
    /// revoked or removed DP's connection).
    pub(crate) fn connections(&self) -> Arc<Connections> {
        self.conns.clone()
    }

    /// Accepts connections until the endpoint is closed.
    pub(crate) async fn serve(self: Arc<Self>, endpoint: quinn::Endpoint) {
        while let Some(incoming) = endpoint.accept().await {
            let me = self.clone();
            tokio::spawn(async move { me.connection(incoming).await });
        }
    }

    async fn connection(self: Arc<Self>, incoming: quinn::Incoming) {
        let remote = incoming.remote_address();
        let conn = match incoming.await {
            Ok(c) => c,
            Err(e) => {
                warn!(%remote, error = %e, "DP connection refused in the TLS handshake");
                return;
            }
        };
        let cert_fp = ferry_net::tls::peer_cert(&conn).map(|c| fingerprint(&c));
        let who = match &cert_fp {
            None => None,
            Some(fp) => match self.hub.identify(fp) {
                Ok(name) => Some(name),
                Err(reason) => {
                    warn!(%remote, %reason, "DP connection refused");
                    let code = match reason {
                        Unknown::Revoked { .. } => CLOSE_REVOKED,
                        Unknown::NotIssued => CLOSE_NOT_ALLOWED,
                    };
                    conn.close(code.into(), reason.to_string().as_bytes());
                    return;
                }
            },
        };
        // Without a certificate it may only enroll: capped per address and
        // in total, and closed at the deadline.
        let _slot = match &who {
            Some(_) => None,
            None => match self.admission.admit(remote.ip()) {
                Ok(slot) => Some(slot),
                Err(refused) => {
                    warn!(%remote, %refused, "enrollment connection refused");
                    conn.close(CLOSE_BUSY.into(), refused.to_string().as_bytes());
                    return;
                }
            },
        };
        if who.is_none() {
            let c = conn.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = c.closed() => {}
                    _ = tokio::time::sleep(crate::distribution::admission::ENROLL_DEADLINE) => {
                        warn!(%remote, "enrollment connection closed: open longer than the deadline");
                        c.close(CLOSE_BUSY.into(), b"an enrollment connection lasts at most 60 s");
                    }
                }
            });
        }
        let span = tracing::info_span!("dp", name = who.as_deref().unwrap_or("-"), %remote);
        async {
            if let Some(dp) = &who {
                let address = self.conns.add(dp, &conn);
                if let Err(e) = self.hub.contact(dp, Some(address)) {
                    warn!(error = %e, "cannot record the DP's contact");
                }
                info!("DP connected");
                // Its pull DPs may wait for it now.
                if self.hub.is_source(dp) {
                    self.hub.notify();
                }
            }
            loop {
                match conn.accept_bi().await {
                    Ok((send, recv)) => {
                        // Checked again per stream: a DP revoked while
                        // connected gets nothing more on any connection.
                        if let Some(fp) = &cert_fp {
                            if let Err(reason) = self.hub.identify(fp) {
                                warn!(%reason, "DP connection refused");
                                conn.close(CLOSE_REVOKED.into(), reason.to_string().as_bytes());
                                break;
                            }
                        }
                        let me = self.clone();
                        let who = who.clone();
                        tokio::spawn(
                            async move { me.stream(who, send, recv).await }
                                .instrument(tracing::Span::current()),
                        );
                    }
                    Err(e) => {
                        info!(reason = %e, "DP disconnected");
                        break;
                    }
                }
            }
            if let Some(dp) = &who {
                self.conns.remove(dp, &conn);
                if let Err(e) = self.hub.contact(dp, None) {
                    warn!(error = %e, "cannot record the DP's last contact");
                }
                if self.hub.is_source(dp) {
                    self.hub.notify();
                }
            }
        }
        .instrument(span)
        .await
    }

    async fn stream(
        self: Arc<Self>,
        who: Option<String>,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
    ) {
        let max = if who.is_some() {
            MAX_REQUEST_BYTES
        } else {
            ferry_wire::MAX_ENROLL_BYTES
        };
        let read = tokio::time::timeout(ferry_wire::REQUEST_TIMEOUT, read_frame(&mut recv, max))
            .await
            .unwrap_or_else(|_| {
                Err(ferry_wire::WireError::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no request within the time limit",
                )))
            });
        let req: pb::Request = match read {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(e) => {
                warn!(error = %e, "bad request from DP");
                let _ = write_frame(
                    &mut send,
                    &pb::Reply::error(Code::BadRequest, e.to_string()),
                )
                .await;
                let _ = send.finish();
                return;
            }
        };
        let result = match (req.kind, who) {
            (Some(request::Kind::Enroll(e)), None) => self.enroll(e, &mut send).await,
            (Some(request::Kind::Enroll(_)), Some(dp)) => {
                warn!("enrollment refused: DP {dp} is enrolled already");
                reply_error(
                    &mut send,
                    Code::BadRequest,
                    format!("DP {dp} is enrolled already"),
                )
                .await
            }
            (Some(_), None) => {
                warn!("request refused: connection has no DP certificate");
                reply_error(
                    &mut send,
                    Code::NotAllowed,
                    "this connection has no DP certificate: enroll first (`ferry dp init`)",
                )
                .await
            }
            (Some(request::Kind::Watch(w)), Some(dp)) => self.watch(&dp, w, &mut send, recv).await,
            (Some(request::Kind::GetManifest(m)), Some(dp)) => {
                self.manifest(&dp, m, &mut send).await
            }
            (Some(request::Kind::Fetch(f)), Some(dp)) => self.fetch(&dp, f, &mut send, recv).await,
            (Some(request::Kind::IssueServerCert(c)), Some(dp)) => {
                self.issue_server_cert(&dp, c, &mut send).await
            }
            (None, _) => {
                warn!("empty request from DP");
                reply_error(&mut send, Code::BadRequest, "empty request").await
            }
        };
        if let Err(e) = result {
            debug!(error = %e, "stream ended early");
        }
        let _ = send.finish();
    }

    async fn enroll(
        &self,
        e: pb::Enroll,
        send: &mut quinn::SendStream,
    ) -> Result<(), ferry_wire::WireError> {
        let Some(name) = self.hub.token_owner(&e.token) else {
            warn!("enrollment refused: unknown or already used token");
            return reply_error(
                send,
                Code::BadToken,
                "the enrollment token is unknown or was used already; \
                 ask the site operator for a new one (`ferry dp add NAME`)",
            )
            .await;
        };
        let cert = match ferry_net::pki::sign_csr(&self.ca, &e.csr_der, &name) {
            Ok(c) => c,
            Err(err) => {
                warn!(dp = %name, error = %err, "enrollment refused: bad certificate request");
                return reply_error(send, Code::BadRequest, err.to_string()).await;
            }
        };
        match self.hub.enroll(&name, &e.token, &fingerprint(&cert)) {
            Ok(true) => {}
            Ok(false) => {
                warn!(dp = %name, "enrollment refused: token used meanwhile");
                return reply_error(
                    send,
                    Code::BadToken,
                    "the enrollment token was used already",
                )
                .await;
            }
            Err(err) => {
                warn!(dp = %name, error = %err, "enrollment failed");
                return reply_error(send, Code::Internal, err.to_string()).await;
            }
        }
        info!(dp = %name, "DP enrolled");
        let reply = pb::Reply {
            kind: Some(reply::Kind::Enrolled(pb::EnrollReply {
                dp_name: name,
                cert_der: cert.into(),
                ca_der: self.ca_der.clone().into(),
                manifest_key: self.key.public().into(),
                site_code: self.site_code.clone(),
            })),
        };
        write_frame(send, &reply).await
    }

    /// Signs the certificate of DP `dp`'s HTTPS listener for the names it
    /// asks, and records them.
    async fn issue_server_cert(
        &self,
        dp: &str,
        c: pb::IssueServerCert,
        send: &mut quinn::SendStream,
    ) -> Result<(), ferry_wire::WireError> {
        let cert = match ferry_net::pki::sign_server_csr(&self.ca, &c.csr_der, dp, &c.names) {
            Ok(cert) => cert,
            Err(err) => {
                warn!(%dp, error = %err, "HTTPS certificate refused");
                return reply_error(send, Code::BadRequest, err.to_string()).await;
            }
        };
        if let Err(err) = self.hub.set_client_names(dp, &c.names) {
            warn!(%dp, error = %err, "cannot record the DP's client names");
            return reply_error(send, Code::Internal, err.to_string()).await;
        }
        info!(%dp, names = ?c.names, "HTTPS certificate issued");
        let reply = pb::Reply {
            kind: Some(reply::Kind::ServerCert(pb::ServerCert {
                cert_der: cert.into(),
            })),
        };
        write_frame(send, &reply).await
    }

    /// The assignment set of `dp`: each assigned package at its released
    /// revision; for a pull DP with its sources, who holds each revision
    /// and the grants to read it from them.
    fn assignments(&self, dp: &str) -> pb::Assignments {
        let reg = self.hub.snapshot();
        let d = reg.dps.get(dp);
        // The rate limit and windows take effect with the assignments
        // that carry them.
        let pacer = self.conns.pacer(dp);
        pacer.set(
            d.and_then(|d| d.rate),
            d.and_then(|d| d.window.as_deref()),
            d.is_some_and(|d| d.prestaged),
        );
        let sources = pull::sources(&reg, dp);
        let grants = (!sources.is_empty())
            .then(|| pull::Grants::new(&reg, dp, &pacer, &self.key, &self.site_code));
        let items = reg
            .assigned(dp)
            .into_iter()
            .filter_map(|p| {
                let rec = packages::record(&self.lib, &p).ok()?;
                let rev = rec.target()?;
                let rebuild = d.and_then(|d| d.rebuilds.get(&p).copied()).unwrap_or(0);
                let mut a = pb::Assignment {
                    package: p,
                    revision: rev,
                    name: rec.name,
                    rebuild,
                    ..pb::Assignment::default()
                };
                if let Some(g) = &grants {
                    g.fill(&mut a, &sources, &reg, |dp| self.conns.is_online(dp));
                }
                Some(a)
            })
            .collect();
        let v = d.map(|d| d.validation.clone()).unwrap_or_default();
        pb::Assignments {
            items,
            maintenance: d.is_some_and(|d| d.maintenance),
            paused_until: pacer
                .closed_until()
                .map_or(0, |t| u64::try_from(t.unix_timestamp()).unwrap_or(0)),
            validate: v.requested,
            validate_packages: v.packages,
            clients: Some(ferry_wire::pb::ClientPolicy {
                multicast: crate::distribution::multicast::policy_for(&reg, dp, |p| {
                    let m = packages::record(&self.lib, p).ok()?.multicast;
                    m.allow.then_some((m.encrypt, m.only))
                }),
                ..crate::distribution::clients::policy_for(&reg, dp, |p| {
                    packages::record(&self.lib, p).is_ok_and(|r| r.multicast.only)
                })
            }),
            sources,
        }
    }

    async fn watch(
        &self,
        dp: &str,
        w: pb::Watch,
        send: &mut quinn::SendStream,
        mut recv: quinn::RecvStream,
    ) -> Result<(), ferry_wire::WireError> {
        if w.protocol != ferry_wire::PROTOCOL_VERSION {
            warn!(protocol = w.protocol, "DP speaks another protocol version");
            return reply_error(
                send,
                Code::BadRequest,
                format!(
                    "protocol version {} is not supported; this site speaks {}",
                    w.protocol,
                    ferry_wire::PROTOCOL_VERSION
                ),
            )
            .await;
        }
        if let Some(d) = &w.disk {
            self.hub
                .set_disk(dp, d.used_bytes, d.free_bytes, d.total_bytes);
        }
        let peer = self.peer_address(dp, &w.peer_address);
        if let Err(e) = self.hub.set_peer_address(dp, peer) {
            warn!(error = %e, "cannot record where the DP serves pull DPs");
        }
        let mut changes = self.hub.subscribe();
        let reports = async {
            loop {
                match read_frame::<pb::Report>(&mut recv, MAX_REQUEST_BYTES).await {
                    Ok(Some(r)) => self.on_report(dp, r),
                    Ok(None) => break,
                    Err(e) => {
                        if !e.is_retryable() {
                            warn!(error = %e, "bad report from DP; closing its control stream");
                        }
                        break;
                    }
                }
            }
        };
        let pushes = async {
            let mut last = None;
            loop {
                let a = self.assignments(dp);
                let pulls = !a.sources.is_empty();
                if last.as_ref() != Some(&a) {
                    let msg = pb::Reply {
                        kind: Some(reply::Kind::Assignments(a.clone())),
                    };
                    write_frame(send, &msg).await?;
                    debug!(packages = a.items.len(), "assignments sent");
                    last = Some(a);
                }
                // Again when the registry changes, a window of the DP
                // opens or closes, or a pull DP's grants are renewed.
                let now = time::OffsetDateTime::now_utc();
                let window = self.conns.pacer(dp).windows().map(|w| w.at(now).1);
                let renewal = pulls.then(|| pull::next_renewal(now));
                let boundary = window
                    .into_iter()
                    .chain(renewal)
                    .min()
                    .map(|next| std::time::Duration::try_from(next - now).unwrap_or_default());
                tokio::select! {
                    r = changes.changed() => if r.is_err() {
                        return Ok::<(), ferry_wire::WireError>(());
                    },
                    () = tokio::time::sleep(boundary.unwrap_or(std::time::Duration::MAX / 4)), if boundary.is_some() => {}
                }
            }
        };
        tokio::select! {
            _ = reports => Ok(()),
            r = pushes => r,
        }
    }

    /// Where DP `dp` serves pull DPs, from what it said (`None`: it does
    /// not, or said nothing usable): an unspecified IP stands for the
    /// address it connects from.
    fn peer_address(&self, dp: &str, said: &str) -> Option<String> {
        if said.is_empty() {
            return None;
        }
        let Ok(mut addr) = said.parse::<std::net::SocketAddr>() else {
            warn!(address = %bounded(said), "the DP's peer address is not IP:PORT; ignored");
            return None;
        };
        if addr.ip().is_unspecified() {
            let from = self.conns.get(dp)?.conn.remote_address().ip();
            addr.set_ip(from.to_canonical());
        }
        Some(addr.to_string())
    }

    fn on_report(&self, dp: &str, r: pb::Report) {
        if let Some(m) = r.multicast {
            self.hub.set_multicast_sessions(dp, &m);
            return;
        }
        if let Some(d) = &r.disk {
            self.hub
                .set_disk(dp, d.used_bytes, d.free_bytes, d.total_bytes);
        }
        if !self.hub.concerns(dp, &r.package) {
            debug!(package = %r.package, "report about a package this DP neither holds nor is assigned; ignored");
            return;
        }
        let state = match pb::State::try_from(r.state) {
            Ok(pb::State::Pending) => TransferState::Pending,
            Ok(pb::State::InProgress) => TransferState::InProgress,
            Ok(pb::State::Installed) => TransferState::Installed,
            Ok(pb::State::Failed) => TransferState::Failed,
            Ok(pb::State::Removing) => TransferState::Removing,
            Ok(pb::State::Validating) => TransferState::Validating,
            Ok(pb::State::Removed) => {
                info!(package = %r.package, "DP removed package");
                let _ = self.hub.report(dp, &r.package, None);
                if self.hub.is_source(dp) {
                    self.hub.notify();
                }
                return;
            }
            _ => {
                warn!(state = r.state, "DP reported an unknown state");
                return;
            }
        };
        match state {
            TransferState::Failed => {
                warn!(package = %r.package, revision = r.revision, error = %r.error, "DP reports a failed transfer")
            }
            TransferState::Installed => info!(
                package = %r.package,
                revision = r.revision,
                bytes_needed = r.bytes_needed,
                wire_bytes = r.wire_bytes,
                full_bytes = r.full_bytes,
                "DP installed package"
            ),
            _ => {}
        }
        let updated = now();
        let next_retry = (state == TransferState::Failed).then(|| {
            // A DP retries within minutes; clamp what it claims.
            let secs = r.retry_in_secs.min(86_400) as i64;
            updated + time::Duration::seconds(secs)
        });
        // "Still installed" without figures keeps those of the transfer
        // that installed it (`Hub::report`).
        let t = TransferReport {
            revision: r.revision,
            state,
            bytes_needed: r.bytes_needed,
            bytes_done: r.bytes_done.min(r.bytes_needed),
            full_bytes: r.full_bytes,
            wire_bytes: r.wire_bytes,
            bytes_local: r.bytes_local,
            manifest_bytes: r.manifest_bytes,
            error: (!r.error.is_empty()).then_some(bounded(&r.error)),
            next_retry,
            started: None,
            updated,
            sources: r
                .sources
                .iter()
                .take(MAX_SOURCES)
                .map(|s| SourceBytes {
                    source: bounded(&s.source),
                    bytes: s.bytes,
                })
                .collect(),
            waiting_for: (!r.waiting_for.is_empty()).then(|| bounded(&r.waiting_for)),
        };
        if let Some(v) = &r.validation {
            let result = crate::distribution::records::ValidationResult {
                request: v.request,
                revision: r.revision,
                done: v.done,
                bytes_checked: v.bytes_checked.min(v.bytes_total.max(v.bytes_checked)),
                bytes_total: v.bytes_total,
                chunks_checked: v.chunks_checked,
                damaged: v
                    .damaged
                    .iter()
                    .take(MAX_DAMAGE_RECORDS)
                    .map(|d| crate::distribution::records::DamageRecord {
                        path: bounded(&d.path),
                        offset: d.offset,
                        len: d.len,
                        chunk: hex::encode(&d.chunk[..d.chunk.len().min(32)]),
                        repaired: d.repaired,
                        error: bounded(&d.error),
                    })
                    .collect(),
                updated,
            };
            if v.done {
                let repaired = result.damaged.iter().filter(|d| d.repaired).count();
                if result.damaged.is_empty() {
                    info!(package = %r.package, bytes = v.bytes_checked, "DP validated package: no damage");
                } else {
                    warn!(package = %r.package, damaged = result.damaged.len(), repaired, "DP validated package: damage found");
                }
            }
            if let Err(e) = self.hub.record_validation(dp, &r.package, result) {
                warn!(error = %e, "cannot record the DP's validation");
            }
        }
        let package = r.package.clone();
        if let Err(e) = self.hub.report(dp, &r.package, Some(t)) {
            warn!(error = %e, "cannot record the DP's report");
        }
        // Its pull DPs wait for it, or stop waiting.
        if matches!(state, TransferState::Installed | TransferState::Failed)
            && self.hub.is_source(dp)
        {
            self.hub.notify();
        }
        if state == TransferState::Installed {
            // An old revision may be unused by every DP now.
            let (lib, hub, keep) = (self.lib.clone(), self.hub.clone(), self.keep_revisions);
            tokio::task::spawn_blocking(move || hub.prune(&lib, &package, keep));
        }
    }

    async fn manifest(
        &self,
        dp: &str,
        m: pb::GetManifest,
        send: &mut quinn::SendStream,
    ) -> Result<(), ferry_wire::WireError> {
        if let Some(why) = self.out_of_scope(dp, &m.package, m.revision) {
            warn!(package = %m.package, revision = m.revision, %why, "manifest refused");
            return reply_error(send, Code::NotAllowed, why).await;
        }
        let lib = self.lib.clone();
        let (package, revision) = (m.package.clone(), m.revision);
        let base_revision = m.base_revision;
        let found = tokio::task::spawn_blocking(move || {
            let rec = packages::record(&lib, &package).ok();
            // The chunks of the revision the DP holds, when the site still
            // has it: the manifest can then name them by position.
            let base: Vec<ferry_core::ChunkId> = if base_revision != 0 && base_revision != revision
            {
                lib.manifests(&package, base_revision)
                    .unwrap_or_default()
                    .iter()
                    .flat_map(|m| m.chunks.iter().map(|c| c.id))
                    .collect()
            } else {
                Vec::new()
            };
            lib.manifests(&package, revision)
                .map(|ms| (ms, rec.map(|r| r.name).unwrap_or_default(), base))
        })
        .await;
        let (manifests, name, base) = match found {
            Ok(Ok((ms, name, base))) if !ms.is_empty() => (ms, name, base),
            Ok(Ok(_)) => {
                return reply_error(
                    send,
                    Code::NotFound,
                    format!("package {} has no revision {}", m.package, m.revision),
                )
                .await
            }
            Ok(Err(e)) => return reply_error(send, Code::Internal, e.to_string()).await,
            Err(e) => return reply_error(send, Code::Internal, e.to_string()).await,
        };
        let mut full = pb::ManifestBody {
            package: m.package.clone(),
            revision: m.revision,
            name,
            files: manifests.iter().map(ferry_wire::file_to_wire).collect(),
        };
        let body = full.encode_to_vec();
        if body.len() + 1024 > MAX_REPLY_BYTES {
            return reply_error(
                send,
                Code::Internal,
                format!(
                    "the manifest of {} is {} bytes, above the protocol limit",
                    m.package,
                    body.len()
                ),
            )
            .await;
        }
        let signature = self.key.sign(&body);
        let (mut body, base_revision) = if base.is_empty() {
            (body, 0)
        } else {
            ferry_wire::compact(&mut full, &base);
            (full.encode_to_vec(), m.base_revision)
        };
        if self.faults.tamper_manifest {
            if let Some(b) = body.last_mut() {
                *b ^= 1;
            }
        }
        let reply = pb::Reply {
            kind: Some(reply::Kind::Manifest(pb::SignedManifest {
                body: body.into(),
                signature: signature.into(),
                base_revision,
            })),
        };
        write_frame(send, &reply).await
    }

    /// Why `dp` may not read `revision` of `package`, or `None` when it
    /// may: the package is assigned to it and the revision is the one it
    /// must hold, or the one it reported holding or fetching (validation
    /// repairs it until it moves on). In maintenance only the latter.
    fn out_of_scope(&self, dp: &str, package: &str, revision: u32) -> Option<String> {
        let reg = self.hub.snapshot();
        if !reg.assigned(dp).contains(package) {
            return Some(format!("package {package} is not assigned to DP {dp}"));
        }
        let target = packages::record(&self.lib, package)
            .ok()
            .and_then(|r| r.target());
        let d = reg.dps.get(dp);
        let holds = d
            .and_then(|d| d.transfers.get(package))
            .is_some_and(|t| t.revision == revision && t.state != TransferState::Pending);
        if holds {
            return None;
        }
        if d.is_some_and(|d| d.maintenance) {
            return Some(format!(
                "DP {dp} is in maintenance: no transfer of {package} revision {revision} starts"
            ));
        }
        (target != Some(revision))
            .then(|| format!("{package} revision {revision} is not assigned to DP {dp}"))
    }

    /// The distinct chunks of a revision, cached for the streams that ask.
    async fn chunk_set(
        &self,
        package: &str,
        revision: u32,
    ) -> Result<Arc<HashSet<ChunkId>>, StoreError> {
        let key = (package.to_string(), revision);
        let cached = || {
            let cache = self.chunk_sets.lock().unwrap_or_else(|p| p.into_inner());
            cache
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, s)| s.clone())
        };
        if let Some(s) = cached() {
            return Ok(s);
        }
        let _building = self.chunk_set_build.lock().await;
        if let Some(s) = cached() {
            return Ok(s);
        }
        let lib = self.lib.clone();
        let (p, r) = key.clone();
        let set = tokio::task::spawn_blocking(move || {
            lib.manifests(&p, r).map(|ms| {
                ms.iter()
                    .flat_map(|m| m.chunks.iter().map(|c| c.id))
                    .collect::<HashSet<ChunkId>>()
            })
        })
        .await
        .map_err(|e| StoreError::Corrupt {
            what: format!("chunk list of {package} revision {revision}"),
            detail: e.to_string(),
        })??;
        let set = Arc::new(set);
        let mut cache = self.chunk_sets.lock().unwrap_or_else(|p| p.into_inner());
        cache.push((key, set.clone()));
        if cache.len() > CHUNK_SET_CACHE {
            cache.remove(0);
        }
        Ok(set)
    }

    /// A chunk stream of a revision assigned to `dp`
    /// ([`ferry_net::chunk_stream`]): RocksDB's buffer straight into the
    /// frame, not hashed again.
    async fn fetch(
        &self,
        dp: &str,
        f: pb::Fetch,
        send: &mut quinn::SendStream,
        recv: quinn::RecvStream,
    ) -> Result<(), ferry_wire::WireError> {
        if let Some(why) = self.out_of_scope(dp, &f.package, f.revision) {
            warn!(package = %f.package, revision = f.revision, %why, "chunks refused");
            return reply_error(send, Code::NotAllowed, why).await;
        }
        let set = {
            match self.chunk_set(&f.package, f.revision).await {
                Ok(s) if !s.is_empty() => s,
                Ok(_) => {
                    return reply_error(
                        send,
                        Code::NotFound,
                        format!("package {} has no revision {}", f.package, f.revision),
                    )
                    .await
                }
                Err(e) => return reply_error(send, Code::Internal, e.to_string()).await,
            }
        };
        let source = LibrarySource {
            lib: self.lib.clone(),
            faults: self.faults.clone(),
            set,
            package: f.package.clone(),
            revision: f.revision,
        };
        let served = self.hub.served_counter(dp);
        let pacer = self.conns.pacer(dp);
        // Held while the stream runs: its connection's share of the
        // site's send buffer.
        let _sending = self.conns.sending(dp);
        // A grant means nothing here: the site checks its own registry.
        ferry_net::chunk_stream::serve(source, send, recv, pacer.pace(), &served, |_| Ok(())).await
    }
}

/// The chunks of one revision in the site's content library.
struct LibrarySource {
    lib: Arc<Library>,
    faults: Arc<Faults>,
    /// The revision's chunks: nothing else is sent on its stream.
    set: ChunkSet,
    package: String,
    revision: u32,
}

impl ferry_net::chunk_stream::ChunkSource for LibrarySource {
    fn put(&mut self, id: &ChunkId, out: &mut BytesMut) -> u64 {
        let (package, revision) = (&self.package, self.revision);
        if !self.set.contains(id) {
            ferry_net::chunk_stream::put_not_in_revision(out, id, package, revision);
            return 0;
        }
        match self.lib.with_chunk_for_dp(id, |data| {
            put_chunk_frame(out, id, data);
            data.len() as u64
        }) {
            Ok(n) => {
                if self.faults.corrupt_next_chunk() {
                    if let Some(b) = out.last_mut() {
                        *b ^= 0x80;
                    }
                }
                n
            }
            Err(StoreError::MissingChunk(_)) => {
                warn!(chunk = %id, "DP asked for a chunk the library does not have");
                put_frame(
                    out,
                    &pb::Reply::error(
                        Code::NotFound,
                        format!("chunk {id} is not in the site's content library"),
                    ),
                );
                0
            }
            Err(e) => {
                warn!(chunk = %id, error = %e, "cannot read a chunk for a DP");
                put_frame(out, &pb::Reply::error(Code::Internal, e.to_string()));
                0
            }
        }
    }
}

async fn reply_error(
    send: &mut quinn::SendStream,
    code: Code,
    message: impl Into<String>,
) -> Result<(), ferry_wire::WireError> {
    write_frame(send, &pb::Reply::error(code, message)).await
}
