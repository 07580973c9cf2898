//! A DP as a source for pull DPs (`ferry dp set OTHER --pull-from THIS`):
//! a QUIC listener (`[peers]` of dp.toml) for DPs with a certificate from
//! the site CA. Each stream is a chunk stream ([`ferry_net::chunk_stream`])
//! of one revision this DP holds installed, opened with the site's grant
//! for the asking DP ([`ferry_net::grant`]): the grant must be signed by
//! the site, for the certificate the connection shows, for that revision,
//! and not expired; else the stream is refused and logged. Chunks are read
//! from the installed files and hashed before they are sent (a damaged one
//! is refused, so the puller turns to its next source), at the pace the
//! grant carries (the puller's rate limit and windows).

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt as _;
use std::sync::{Arc, Mutex};

use bytes::BytesMut;
use ferry_core::ChunkId;
use ferry_net::grant::{self, Expect, GrantError};
use ferry_net::pace::Pacer;
use ferry_wire::pb::{self, request, Code};
use ferry_wire::{put_chunk_frame, put_frame, read_frame, write_frame, MAX_REQUEST_BYTES};
use tracing::{debug, info, warn, Instrument};

use crate::config::PeersConfig;
use crate::error::DpError;
use crate::served::StoreSlot;

/// Revisions whose chunk index is kept for the streams that ask.
const INDEX_CACHE: usize = 4;

/// A package revision.
type Revision = (String, u32);

/// Where each chunk of one installed revision is: file, offset, length.
struct RevisionIndex {
    chunks: HashMap<ChunkId, (u32, u64, u32)>,
    files: Vec<File>,
}

/// What the listener serves from.
pub(crate) struct PeerServer {
    pub(crate) cfg: PeersConfig,
    pub(crate) server: quinn::ServerConfig,
    pub(crate) store: StoreSlot,
    pub(crate) manifest_key: Vec<u8>,
    pub(crate) site_code: String,
    /// The pace of the chunks sent to each pull DP, over all its streams.
    pacers: Mutex<HashMap<String, Arc<Pacer>>>,
    indexes: Mutex<Vec<(Revision, Arc<RevisionIndex>)>>,
    metrics: Arc<crate::metrics::Metrics>,
}

impl PeerServer {
    pub(crate) fn new(
        cfg: PeersConfig,
        server: quinn::ServerConfig,
        store: StoreSlot,
        manifest_key: Vec<u8>,
        site_code: String,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Self {
        Self {
            cfg,
            server,
            store,
            manifest_key,
            site_code,
            pacers: Mutex::default(),
            indexes: Mutex::default(),
            metrics,
        }
    }

    /// Listens until the task is dropped; an error only when the address
    /// cannot be bound.
    pub(crate) async fn run(self: Arc<Self>) -> Result<(), DpError> {
        let listen = self.cfg.listen;
        let endpoint =
            ferry_net::tls::endpoint(listen, Some(self.server.clone())).map_err(|e| {
                DpError::net(
                    format!(
                        "cannot listen for pull DPs on UDP {listen} ([peers] listen in dp.toml)"
                    ),
                    e,
                )
            })?;
        info!(%listen, "serving chunks to pull DPs");
        while let Some(incoming) = endpoint.accept().await {
            let me = self.clone();
            tokio::spawn(async move { me.connection(incoming).await });
        }
        Ok(())
    }

    async fn connection(self: Arc<Self>, incoming: quinn::Incoming) {
        let remote = incoming.remote_address();
        let conn = match incoming.await {
            Ok(c) => c,
            Err(e) => {
                warn!(%remote, error = %e, "pull DP refused in the TLS handshake");
                return;
            }
        };
        let Some(fp) = ferry_net::tls::peer_cert(&conn).map(|c| ferry_net::pki::fingerprint(&c))
        else {
            // The handshake requires a certificate; never reached.
            return;
        };
        let span = tracing::info_span!("pull DP", %remote);
        async {
            debug!("pull DP connected");
            while let Ok((send, recv)) = conn.accept_bi().await {
                let (me, fp) = (self.clone(), fp.clone());
                tokio::spawn(
                    async move { me.stream(&fp, send, recv).await }
                        .instrument(tracing::Span::current()),
                );
            }
            debug!("pull DP disconnected");
        }
        .instrument(span)
        .await
    }

    async fn stream(&self, fp: &str, mut send: quinn::SendStream, recv: quinn::RecvStream) {
        let r = self.serve(fp, &mut send, recv).await;
        if let Err(e) = r {
            debug!(error = %e, "chunk stream to a pull DP ended early");
        }
        let _ = send.finish();
    }

    fn expect<'a>(&'a self, fp: &'a str, package: &'a str, revision: u32) -> Expect<'a> {
        Expect {
            public: &self.manifest_key,
            site_code: &self.site_code,
            fingerprint: fp,
            package,
            revision,
            now: time::OffsetDateTime::now_utc().unix_timestamp(),
        }
    }

    async fn serve(
        &self,
        fp: &str,
        send: &mut quinn::SendStream,
        mut recv: quinn::RecvStream,
    ) -> Result<(), ferry_wire::WireError> {
        let read = tokio::time::timeout(
            ferry_wire::REQUEST_TIMEOUT,
            read_frame::<pb::Request>(&mut recv, MAX_REQUEST_BYTES),
        )
        .await;
        let f = match read {
            Ok(Ok(Some(pb::Request {
                kind: Some(request::Kind::Fetch(f)),
            }))) => f,
            Ok(Ok(None)) => return Ok(()),
            Ok(Ok(Some(_))) => {
                warn!("a pull DP asked for something other than chunks; refused");
                return refuse(
                    send,
                    Code::BadRequest,
                    "a source DP serves chunk streams only",
                )
                .await;
            }
            Ok(Err(e)) => {
                warn!(error = %e, "bad request from a pull DP");
                return refuse(send, Code::BadRequest, e.to_string()).await;
            }
            Err(_) => {
                return refuse(send, Code::BadRequest, "no request within the time limit").await
            }
        };
        let (package, revision) = (f.package.clone(), f.revision);
        let g = match grant::verify(f.grant.as_ref(), &self.expect(fp, &package, revision)) {
            Ok(g) => g,
            Err(e) => {
                warn!(%package, revision, error = %e, "chunks refused to a pull DP");
                return refuse(send, Code::NotAllowed, refusal(&e, &package, revision)).await;
            }
        };
        let index = match self.index(&package, revision).await {
            Ok(i) => i,
            Err((code, why)) => {
                info!(dp = %g.dp, %package, revision, %why, "chunks refused to a pull DP");
                return refuse(send, code, why).await;
            }
        };
        let pacer = self.pacer(&g.dp);
        pacer.set_plan(Some(Arc::new(grant::pace(&g))));
        info!(dp = %g.dp, %package, revision, "serving a pull DP");
        let source = FileSource {
            index,
            package: package.clone(),
            revision,
            buf: Vec::new(),
        };
        let renew = |w: &pb::Want| {
            let Some(next) = &w.grant else {
                return Ok(());
            };
            match grant::verify(Some(next), &self.expect(fp, &package, revision)) {
                Ok(g) => {
                    pacer.set_plan(Some(Arc::new(grant::pace(&g))));
                    Ok(())
                }
                Err(e) => {
                    warn!(%package, revision, error = %e, "a renewed grant refused");
                    Err(refusal(&e, &package, revision))
                }
            }
        };
        // Counted as sent, straight into the pull DP's metric.
        let served = self.metrics.peer_sent(&g.dp);
        let r =
            ferry_net::chunk_stream::serve(source, send, recv, &pacer, served.inner(), renew).await;
        let sent_to_dp = served.get();
        info!(dp = %g.dp, %package, revision, sent_to_dp, "chunk stream to a pull DP ended");
        r
    }

    fn pacer(&self, dp: &str) -> Arc<Pacer> {
        self.pacers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(dp.to_string())
            .or_default()
            .clone()
    }

    /// Where the chunks of an installed revision are; why not when it is
    /// not installed here.
    async fn index(
        &self,
        package: &str,
        revision: u32,
    ) -> Result<Arc<RevisionIndex>, (Code, String)> {
        let key = (package.to_string(), revision);
        if let Some(i) = self
            .indexes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|(k, _)| *k == key)
        {
            return Ok(i.1.clone());
        }
        let store = self
            .store
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| {
                (
                    Code::Internal,
                    "the source DP's index is being reopened".to_string(),
                )
            })?;
        let (p, r) = key.clone();
        let built =
            tokio::task::spawn_blocking(move || -> Result<RevisionIndex, (Code, String)> {
                let internal =
                    |e: ferry_store::content::ContentError| (Code::Internal, e.to_string());
                let installed = store
                    .record(&p, r)
                    .map_err(internal)?
                    .is_some_and(|rec| rec.installed);
                if !installed {
                    return Err((
                        Code::NotFound,
                        format!("this source does not hold {p} revision {r} installed (yet)"),
                    ));
                }
                let manifests = store.manifests(&p, r).map_err(internal)?;
                let mut chunks = HashMap::new();
                let mut files = Vec::with_capacity(manifests.len());
                for (n, m) in manifests.iter().enumerate() {
                    let path = store.installed_path(&p, r, n as u32).map_err(internal)?;
                    let f = File::open(&path).map_err(|e| {
                        (
                            Code::Internal,
                            format!("cannot open {}: {e}", path.display()),
                        )
                    })?;
                    files.push(f);
                    for (offset, c) in m.offsets() {
                        chunks.entry(c.id).or_insert((n as u32, offset, c.len));
                    }
                }
                Ok(RevisionIndex { chunks, files })
            })
            .await
            .map_err(|e| (Code::Internal, e.to_string()))??;
        let built = Arc::new(built);
        let mut cache = self.indexes.lock().unwrap_or_else(|p| p.into_inner());
        cache.push((key, built.clone()));
        if cache.len() > INDEX_CACHE {
            cache.remove(0);
        }
        Ok(built)
    }
}

/// What a refused grant tells the pull DP.
fn refusal(e: &GrantError, package: &str, revision: u32) -> String {
    format!("no leave to read {package} revision {revision} from this source: {e}")
}

async fn refuse(
    send: &mut quinn::SendStream,
    code: Code,
    message: impl Into<String>,
) -> Result<(), ferry_wire::WireError> {
    write_frame(send, &pb::Reply::error(code, message)).await
}

/// The chunks of one installed revision, read from its files and hashed
/// before they go.
struct FileSource {
    index: Arc<RevisionIndex>,
    package: String,
    revision: u32,
    buf: Vec<u8>,
}

impl ferry_net::chunk_stream::ChunkSource for FileSource {
    fn put(&mut self, id: &ChunkId, out: &mut BytesMut) -> u64 {
        let (package, revision) = (&self.package, self.revision);
        let Some(&(file, offset, len)) = self.index.chunks.get(id) else {
            ferry_net::chunk_stream::put_not_in_revision(out, id, package, revision);
            return 0;
        };
        self.buf.resize(len as usize, 0);
        let read = self.index.files[file as usize].read_exact_at(&mut self.buf, offset);
        let why = match read {
            Ok(()) if ChunkId::of(&self.buf) == *id => {
                put_chunk_frame(out, id, &self.buf);
                return u64::from(len);
            }
            Ok(()) => "is damaged here (it does not hash to its id)".to_string(),
            Err(e) => format!("cannot be read here: {e}"),
        };
        warn!(chunk = %id, %package, revision, %why, "chunk not sent to a pull DP");
        put_frame(
            out,
            &pb::Reply::error(Code::NotFound, format!("chunk {id} of {package} {why}")),
        );
        0
    }
}
