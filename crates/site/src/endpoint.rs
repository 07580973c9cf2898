//! The site's QUIC endpoint: what distribution points talk to.
//!
//! One task per connection, one per stream. A connection without a client
//! certificate may only enroll; one with a certificate must be the one
//! issued to a DP that is not revoked. Each stream starts with one
//! [`pb::Request`] (see `proto/ferry/v1/ferry.proto`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use ferry_core::ChunkId;
use ferry_net::pki::{fingerprint, CaFiles, SigningKey};
use ferry_store::{Library, StoreError};
use ferry_wire::pb::{self, reply, request, Code};
use ferry_wire::{read_frame, write_frame, MAX_BATCH_CHUNKS, MAX_REPLY_BYTES, MAX_REQUEST_BYTES};
use prost::Message;
use tracing::{debug, info, warn, Instrument};

use crate::images;
use crate::registry::{now, Hub, Transfer, TransferState, CLOSE_NOT_ALLOWED, CLOSE_REVOKED};

/// Chunks read from the library per blocking call while answering.
const READ_GROUP: usize = 16;

/// Fault injection for tests, from the environment of `ferry site serve`:
/// `FERRY_FAULT_CORRUPT_CHUNKS=N` flips a bit in the first N chunks sent;
/// `FERRY_FAULT_TAMPER_MANIFEST=1` changes every manifest after signing.
#[derive(Debug, Default)]
struct Faults {
    corrupt_chunks: AtomicU64,
    tamper_manifest: bool,
}

impl Faults {
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

/// What the endpoint serves from.
pub struct DpServer {
    hub: Arc<Hub>,
    lib: Arc<Library>,
    ca: CaFiles,
    ca_der: Vec<u8>,
    key: SigningKey,
    site_code: String,
    faults: Faults,
}

impl DpServer {
    /// A server over the site's registry, library, CA and signing key.
    pub fn new(
        hub: Arc<Hub>,
        lib: Arc<Library>,
        ca: CaFiles,
        ca_der: Vec<u8>,
        key: SigningKey,
        site_code: String,
    ) -> Self {
        Self {
            hub,
            lib,
            ca,
            ca_der,
            key,
            site_code,
            faults: Faults::from_env(),
        }
    }

    /// Accepts connections until the endpoint is closed.
    pub async fn serve(self: Arc<Self>, endpoint: quinn::Endpoint) {
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
                    let code = if reason.contains("revoked") {
                        CLOSE_REVOKED
                    } else {
                        CLOSE_NOT_ALLOWED
                    };
                    conn.close(code.into(), reason.as_bytes());
                    return;
                }
            },
        };
        let span = tracing::info_span!("dp", name = who.as_deref().unwrap_or("-"), %remote);
        async {
            if let Some(dp) = &who {
                if let Err(e) = self.hub.connected(dp, &conn) {
                    warn!(error = %e, "cannot record the DP's contact");
                }
                info!("DP connected");
            }
            loop {
                match conn.accept_bi().await {
                    Ok((send, recv)) => {
                        // Checked again per stream: a DP revoked while
                        // connected gets nothing more on any connection.
                        if let Some(fp) = &cert_fp {
                            if let Err(reason) = self.hub.identify(fp) {
                                warn!(%reason, "DP connection refused");
                                conn.close(CLOSE_REVOKED.into(), reason.as_bytes());
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
                self.hub.disconnected(dp, &conn);
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
            (Some(request::Kind::GetChunks(g)), Some(dp)) => self.chunks(&dp, g, &mut send).await,
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

    /// The assignment set of `dp`: each assigned package at its released
    /// revision.
    fn assignments(&self, dp: &str) -> pb::Assignments {
        let reg = self.hub.snapshot();
        let items = reg
            .assigned(dp)
            .into_iter()
            .filter_map(|p| {
                let rec = images::record(&self.lib, &p).ok()?;
                let rev = rec.target()?;
                Some(pb::Assignment {
                    package: p,
                    revision: rev,
                    name: rec.name,
                })
            })
            .collect();
        pb::Assignments { items }
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
                if last.as_ref() != Some(&a) {
                    let msg = pb::Reply {
                        kind: Some(reply::Kind::Assignments(a.clone())),
                    };
                    write_frame(send, &msg).await?;
                    debug!(packages = a.items.len(), "assignments sent");
                    last = Some(a);
                }
                if changes.changed().await.is_err() {
                    return Ok::<(), ferry_wire::WireError>(());
                }
            }
        };
        tokio::select! {
            _ = reports => Ok(()),
            r = pushes => r,
        }
    }

    fn on_report(&self, dp: &str, r: pb::Report) {
        let reg = self.hub.snapshot();
        let known = reg.assigned(dp).contains(&r.package)
            || reg
                .dps
                .get(dp)
                .is_some_and(|d| d.transfers.contains_key(&r.package));
        if !known {
            debug!(package = %r.package, "report about a package this DP neither holds nor is assigned; ignored");
            return;
        }
        let state = match pb::State::try_from(r.state) {
            Ok(pb::State::Pending) => TransferState::Pending,
            Ok(pb::State::InProgress) => TransferState::InProgress,
            Ok(pb::State::Installed) => TransferState::Installed,
            Ok(pb::State::Failed) => TransferState::Failed,
            Ok(pb::State::Removing) => TransferState::Removing,
            Ok(pb::State::Removed) => {
                info!(package = %r.package, "DP removed package");
                let _ = self.hub.report(dp, &r.package, None);
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
            let at = time::OffsetDateTime::now_utc() + time::Duration::seconds(secs);
            at.format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default()
        });
        let t = Transfer {
            revision: r.revision,
            state,
            bytes_needed: r.bytes_needed,
            bytes_done: r.bytes_done,
            full_bytes: r.full_bytes,
            wire_bytes: r.wire_bytes,
            error: (!r.error.is_empty()).then_some(r.error),
            next_retry,
            started: None,
            updated,
        };
        let package = r.package.clone();
        if let Err(e) = self.hub.report(dp, &r.package, Some(t)) {
            warn!(error = %e, "cannot record the DP's report");
        }
        if state == TransferState::Installed {
            // An old revision may be unused by every DP now.
            let (lib, hub) = (self.lib.clone(), self.hub.clone());
            tokio::task::spawn_blocking(move || {
                if let Err(e) = images::prune(&lib, &hub.snapshot(), &package) {
                    warn!(package = %package, error = %e, "cannot remove unused revisions");
                }
            });
        }
    }

    async fn manifest(
        &self,
        dp: &str,
        m: pb::GetManifest,
        send: &mut quinn::SendStream,
    ) -> Result<(), ferry_wire::WireError> {
        if !self.hub.snapshot().assigned(dp).contains(&m.package) {
            warn!(package = %m.package, "manifest refused: package not assigned to this DP");
            return reply_error(
                send,
                Code::NotAllowed,
                format!("package {} is not assigned to DP {dp}", m.package),
            )
            .await;
        }
        let lib = self.lib.clone();
        let (package, revision) = (m.package.clone(), m.revision);
        let base_revision = m.base_revision;
        let found = tokio::task::spawn_blocking(move || {
            let rec = images::record(&lib, &package).ok();
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

    async fn chunks(
        &self,
        dp: &str,
        g: pb::GetChunks,
        send: &mut quinn::SendStream,
    ) -> Result<(), ferry_wire::WireError> {
        if g.ids.len() > MAX_BATCH_CHUNKS {
            warn!(ids = g.ids.len(), "chunk request refused: too many ids");
            return reply_error(
                send,
                Code::BadRequest,
                format!(
                    "{} chunk ids in one request; the limit is {MAX_BATCH_CHUNKS}",
                    g.ids.len()
                ),
            )
            .await;
        }
        let mut ids = Vec::with_capacity(g.ids.len());
        for raw in &g.ids {
            match ChunkId::from_slice(raw) {
                Some(id) => ids.push(id),
                None => {
                    return reply_error(send, Code::BadRequest, "a chunk id is not 32 bytes").await
                }
            }
        }
        for group in ids.chunks(READ_GROUP) {
            let lib = self.lib.clone();
            let group = group.to_vec();
            let read = tokio::task::spawn_blocking(move || {
                group
                    .into_iter()
                    .map(|id| (id, lib.read_chunk(&id)))
                    .collect::<Vec<_>>()
            })
            .await
            .unwrap_or_default();
            for (id, data) in read {
                let reply = match data {
                    Ok(mut data) => {
                        self.hub.served(dp, data.len() as u64);
                        if self.faults.corrupt_next_chunk() {
                            if let Some(b) = data.first_mut() {
                                *b ^= 0x80;
                            }
                        }
                        pb::Reply {
                            kind: Some(reply::Kind::Chunk(pb::Chunk {
                                id: id.as_bytes().to_vec().into(),
                                data: data.into(),
                            })),
                        }
                    }
                    Err(StoreError::MissingChunk(_)) => {
                        warn!(chunk = %id, "DP asked for a chunk the library does not have");
                        pb::Reply::error(
                            Code::NotFound,
                            format!("chunk {id} is not in the site's content library"),
                        )
                    }
                    Err(e) => {
                        warn!(chunk = %id, error = %e, "cannot read a chunk for a DP");
                        pb::Reply::error(Code::Internal, e.to_string())
                    }
                };
                write_frame(send, &reply).await?;
            }
        }
        write_frame(
            send,
            &pb::Reply {
                kind: Some(reply::Kind::Done(pb::ChunksDone {})),
            },
        )
        .await
    }
}

async fn reply_error(
    send: &mut quinn::SendStream,
    code: Code,
    message: impl Into<String>,
) -> Result<(), ferry_wire::WireError> {
    write_frame(send, &pb::Reply::error(code, message)).await
}
