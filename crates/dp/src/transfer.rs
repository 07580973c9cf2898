//! The driver of one revision's transfer: the sans-io
//! [`ferry_core::transfer::Transfer`] plus the I/O it asks for.
//!
//! - a few long-lived QUIC streams per transfer (`Fetch`, then `Want`
//!   frames as the window opens), each with a task that sends requests and
//!   one that reads chunk frames;
//! - writer threads that hash every arriving chunk against its id, write it
//!   at its offsets in the staged files, record the slots in the index, and
//!   only then report it written (a killed DP keeps it);
//! - local copies (`copy_file_range`) of chunks the DP holds in installed
//!   files, on the same threads;
//! - checkpoints every few seconds (files synced, then the epoch), and the
//!   install when every slot is written.
//!
//! The async loop only moves messages; hashing and disk I/O stay on the
//! writer threads.

use std::collections::HashMap;
use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ferry_core::transfer::{
    CopyOp, Event, Origin, OriginFile, Progress, Slot, Transfer, TransferOptions,
};
use ferry_core::{ChunkId, ChunkRef};
use ferry_store::content::{ContentError, Marks, RevisionRecord, Stage};
use ferry_store::ContentStore;
use ferry_wire::pb::{self, reply, Code};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::chunks::{self, Incoming};
use crate::error::{Context as _, DpError, Failure, Result};
use crate::manifest::Signed;
use crate::report;

/// Streams a transfer spreads its requests over.
pub const FETCH_STREAMS: usize = 4;
/// Threads that verify and write chunks.
pub const WRITERS: usize = 2;
/// Least bytes asked for and not yet written, over all streams. On a LAN
/// twice the bandwidth-delay product is far less; this much rides out the
/// scheduling hiccups of a busy machine (8 MiB: 280–300 MB/s on the bench
/// machine's veth where 1 MiB gave 250; BENCHMARKS.md).
pub const MIN_WINDOW: u64 = 8 << 20;
/// Most bytes asked for and not yet written on one stream.
pub const MAX_STREAM_WINDOW: u64 = 8 << 20;
/// Space kept free besides a revision's files (the index, logs).
pub const SPACE_MARGIN: u64 = 32 << 20;
/// How often written data is made durable (files synced, then recorded).
pub const CHECKPOINT_EVERY: Duration = Duration::from_secs(5);
/// Bytes written to disk between checkpoints at most: a killed DP
/// re-hashes no more than this when it resumes.
pub const CHECKPOINT_BYTES: u64 = 512 << 20;
/// A transfer that waits this long for any chunk fails (and is retried).
pub const STALL_TIMEOUT: Duration = ferry_wire::REPLY_TIMEOUT;

/// [`STALL_TIMEOUT`], or with the `fault-injection` feature the seconds in
/// `FERRY_FAULT_STALL_SECS` (tests that must see a stall, or its absence,
/// in seconds).
fn stall_timeout() -> Duration {
    #[cfg(feature = "fault-injection")]
    if let Some(s) = std::env::var("FERRY_FAULT_STALL_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        return Duration::from_secs(s);
    }
    STALL_TIMEOUT
}
/// Chunks a writer reports at most before it records them.
const WRITER_FLUSH: usize = 64;
/// Events handled before the loop hands jobs to the writers.
const EVENT_BATCH: usize = 256;
/// Times a broken chunk stream is opened again before the transfer fails.
const MAX_STREAM_RESTARTS: u32 = 8;

/// What the loop hears from its helpers.
enum Ev {
    /// `generation` tells a reopened stream's chunks from its old ones.
    Chunk {
        stream: usize,
        generation: u64,
        id: ChunkId,
        data: Bytes,
    },
    /// The site answered an id with an error: the transfer cannot finish.
    SiteError(String),
    /// A stream broke (reset, closed early).
    StreamLost {
        stream: usize,
        generation: u64,
        error: String,
    },
    Written(ChunkId),
    Corrupt(ChunkId),
    /// Several events at once (a writer's flush).
    Batch(Vec<Ev>),
    Copied {
        id: u64,
        ok: bool,
    },
    WriteFailed(ContentError),
}

enum Job {
    Write {
        id: ChunkId,
        len: u32,
        data: Bytes,
        places: Vec<(Slot, u64)>,
    },
    Copy(CopyOp),
}

/// A chunk that hashed to its id, and the places to write it.
type Verified = (ChunkId, Bytes, Vec<(Slot, u64)>);

/// Files copies read from: installed files, by handle.
type Origins = Vec<(File, PathBuf)>;

/// Where a transfer's chunks come from: the site, or a source DP a pull
/// DP takes them from.
pub(crate) struct Supply<'a> {
    /// The connection to it.
    pub conn: &'a quinn::Connection,
    /// "site", or the source DP's name (reports and errors name it).
    pub name: &'a str,
    /// From a source DP: the latest assignments, whose grant for the
    /// revision each chunk stream shows, and hands on when it is renewed.
    pub grants: Option<watch::Receiver<Option<Arc<pb::Assignments>>>>,
    /// Chunk bytes this transfer took from other sources before this one.
    pub earlier: &'a [pb::SourceBytes],
    /// Chunk bytes received from this one, counted as they arrive.
    pub received: &'a AtomicU64,
    /// The DP's metrics, which count them too.
    pub metrics: &'a crate::metrics::Metrics,
}

impl Supply<'_> {
    /// Where the bytes came from, for a report.
    fn sources(&self) -> Vec<pb::SourceBytes> {
        tally(self.earlier, self.name, self.received)
    }

    /// "the site" or "source DP NAME".
    fn who(&self) -> String {
        if self.grants.is_some() {
            format!("source DP {}", self.name)
        } else {
            "the site".to_string()
        }
    }
}

/// `earlier` with the bytes `received` from `name` added.
pub(crate) fn tally(
    earlier: &[pb::SourceBytes],
    name: &str,
    received: &AtomicU64,
) -> Vec<pb::SourceBytes> {
    let mut out = earlier.to_vec();
    let n = received.load(Ordering::Relaxed);
    match out.iter_mut().find(|s| s.source == name) {
        Some(s) => s.bytes += n,
        None if n > 0 => out.push(pb::SourceBytes {
            source: name.to_string(),
            bytes: n,
        }),
        None => {}
    }
    out
}

/// The grant for `package` revision `revision` in `a`, if it carries one.
pub(crate) fn grant_of(
    a: Option<&pb::Assignments>,
    package: &str,
    revision: u32,
) -> Option<pb::SignedGrant> {
    a?.items
        .iter()
        .find(|i| i.package == package && i.revision == revision)?
        .grant
        .clone()
}

/// One revision to fetch.
pub(crate) struct Request<'a> {
    /// Where its chunks come from.
    pub supply: Supply<'a>,
    pub store: &'a Arc<ContentStore>,
    pub assignment: &'a pb::Assignment,
    pub signed: Signed,
    pub max_rate: Option<u64>,
    pub dp: &'a str,
    pub reports: &'a mpsc::UnboundedSender<pb::Report>,
    /// Fetch every chunk from the site: nothing is copied from installed
    /// files (a rebuild the operator asked for).
    pub from_scratch: bool,
    /// Whether the site holds chunks back (a closed transfer window).
    pub paused: watch::Receiver<bool>,
}

/// What staging a revision needs, moved to a blocking thread.
struct StageRequest {
    store: Arc<ContentStore>,
    signed: Signed,
    package: String,
    revision: u32,
    dp: String,
    max_rate: Option<u64>,
    from_scratch: bool,
}

/// A staged revision and its plan.
type Staged = (Arc<Stage>, Transfer, Arc<Origins>);

/// Checks the space a revision needs (every file is preallocated up front,
/// so a full disk shows now), stages it, reads back what a killed DP had
/// written, and plans the transfer: what is written, what is copied from
/// installed files, what is fetched. Blocking.
fn stage_revision(r: StageRequest) -> Result<Staged> {
    let StageRequest {
        store,
        signed: sig,
        package,
        revision,
        dp,
        max_rate,
        from_scratch,
    } = r;
    let available_space = ferry_store::disk::available;
    let content = store.content_dir().to_path_buf();
    let files: u64 = sig.manifests.iter().map(|m| m.size).sum();
    let stage_dir = content
        .join(ferry_store::content::INTERNAL_DIR)
        .join(format!("stage-{package}.r{revision}"));
    let have = ferry_store::disk::usage(&stage_dir);
    let free = available_space(&content)
        .map_err(|e| DpError::io("read the free space of", &content, e))?;
    let need = (files + SPACE_MARGIN).saturating_sub(have);
    let short = |free: u64| DpError::NoSpace {
        dp: dp.clone(),
        package: package.clone(),
        revision,
        need,
        files,
        margin: SPACE_MARGIN,
        at: content.clone(),
        free,
    };
    if need > free {
        return Err(short(free));
    }
    let record = RevisionRecord {
        installed: false,
        name: sig.name,
        body: sig.body,
        signature: sig.signature,
    };
    let stage = match store.stage(&package, revision, record, sig.manifests) {
        Ok(s) => Arc::new(s),
        // Preallocating the files ran out of space.
        Err(e @ ContentError::File(_)) if e.is_no_space() => {
            return Err(e).context(short(available_space(&content).unwrap_or(0)).to_string())
        }
        Err(e) => return Err(e.into()),
    };
    let written = stage.written()?;
    if stage.rehashed_bytes() > 0 {
        info!(
            rehashed_bytes = stage.rehashed_bytes(),
            "resuming: checked what was written after the last checkpoint"
        );
    }
    let (machine, origins) = plan(&store, &stage, &written, max_rate, from_scratch)?;
    Ok((stage, machine, Arc::new(origins)))
}

/// The transfer machine of a staged revision, and the installed files its
/// copies read from.
fn plan(
    store: &ContentStore,
    stage: &Stage,
    written: &ferry_store::content::WrittenSlots,
    max_rate: Option<u64>,
    from_scratch: bool,
) -> Result<(Transfer, Origins)> {
    let mut origins: Origins = Vec::new();
    let mut handles: HashMap<(String, u32, u32), u64> = HashMap::new();
    let opts = TransferOptions {
        streams: FETCH_STREAMS,
        max_stream_window: MAX_STREAM_WINDOW,
        max_batch_chunks: ferry_wire::MAX_BATCH_CHUNKS,
        max_rate,
        min_window: MIN_WINDOW,
        checkpoint_every: CHECKPOINT_EVERY,
        checkpoint_bytes: CHECKPOINT_BYTES,
        stall_timeout: stall_timeout(),
        max_stream_restarts: MAX_STREAM_RESTARTS,
        ..TransferOptions::default()
    };
    let mut lookup_error = None;
    let machine = Transfer::new(
        stage.manifests(),
        opts,
        |s| written[s.file as usize][s.index as usize],
        |id| {
            if from_scratch {
                return None;
            }
            let (p, l) = match store.locate(id) {
                Ok(found) => found?,
                Err(e) => {
                    lookup_error.get_or_insert(e);
                    return None;
                }
            };
            let key = (p.clone(), l.revision, l.file);
            let h = match handles.get(&key) {
                Some(&h) => h,
                None => {
                    let path = store.installed_path(&p, l.revision, l.file).ok()?;
                    let f = File::open(&path).ok()?;
                    origins.push((f, path));
                    let h = origins.len() as u64 - 1;
                    handles.insert(key, h);
                    h
                }
            };
            Some(Origin {
                file: OriginFile::Other(h),
                offset: l.offset,
            })
        },
    );
    match lookup_error {
        Some(e) => Err(e.into()),
        None => Ok((machine, origins)),
    }
}

/// Starts the writer threads of a stage: their job queues and handles.
#[allow(clippy::type_complexity)]
fn start_writers(
    stage: &Arc<Stage>,
    origins: &Arc<Origins>,
    ev_tx: &mpsc::UnboundedSender<Ev>,
) -> Result<
    (
        Vec<std::sync::mpsc::Sender<Vec<Job>>>,
        Vec<std::thread::JoinHandle<()>>,
    ),
    Failure,
> {
    let mut jobs = Vec::with_capacity(WRITERS);
    let mut threads = Vec::with_capacity(WRITERS);
    for n in 0..WRITERS {
        let (tx, rx) = std::sync::mpsc::channel::<Vec<Job>>();
        let (stage, origins, ev) = (stage.clone(), origins.clone(), ev_tx.clone());
        let t = std::thread::Builder::new()
            .name(format!("ferry-writer-{n}"))
            .spawn(move || writer(&stage, &origins, rx, ev))
            .map_err(|e| {
                Failure::job(DpError::stopped(format!(
                    "cannot start a writer thread: {e}"
                )))
            })?;
        jobs.push(tx);
        threads.push(t);
    }
    Ok((jobs, threads))
}

/// Installs a stage whose every slot is written (blocking thread).
async fn install(stage: Arc<Stage>) -> Result<()> {
    tokio::task::spawn_blocking(move || match Arc::try_unwrap(stage) {
        Ok(s) => s.install().map_err(DpError::from),
        Err(_) => Err(DpError::stopped("the stage is still in use by a writer")),
    })
    .await?
    .context("cannot install the revision")
}

/// Fetches, writes and installs one revision. Returns its figures.
pub(crate) async fn run(r: Request<'_>) -> Result<(Progress, u64), Failure> {
    let a = r.assignment;
    let conn = r.supply.conn;
    let rx_start = conn.stats().udp_rx.bytes;
    let wire = || conn.stats().udp_rx.bytes.saturating_sub(rx_start);
    let manifest_bytes = r.signed.wire_bytes;
    // Moved, not copied: a large image's manifests and signed body are tens
    // of MiB each, and the stage keeps the only copy from here on.
    let req = StageRequest {
        store: r.store.clone(),
        signed: r.signed,
        package: a.package.clone(),
        revision: a.revision,
        dp: r.dp.to_string(),
        max_rate: r.max_rate,
        from_scratch: r.from_scratch,
    };
    let (stage, machine, origins) = tokio::task::spawn_blocking(move || stage_revision(req))
        .await
        .map_err(Failure::job)?
        .map_err(Failure::Job)?;
    let planned = machine.progress();
    info!(
        needed_bytes = planned.bytes_needed,
        local_bytes = planned.bytes_local_planned,
        full_bytes = planned.full_bytes,
        "transfer planned"
    );
    let _ = r.reports.send(report::progress(
        a,
        pb::State::InProgress,
        &planned,
        wire(),
        manifest_bytes,
    ));
    let supply = r.supply;

    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel::<Ev>();
    let (jobs, threads) = start_writers(&stage, &origins, &ev_tx)?;
    let mut lp = Loop {
        conn,
        supply: &supply,
        dp: r.dp,
        manifest_bytes,
        a,
        machine,
        pending: (0..jobs.len()).map(|_| Vec::new()).collect(),
        jobs,
        streams: Vec::new(),
        ev_tx,
        generations: 0,
        stage: stage.clone(),
        reports: r.reports,
        next_writer: 0,
        rx_start,
    };
    let result = lp.drive(&mut ev_rx, r.paused).await;
    lp.stop(threads).await;
    let progress = result?;
    install(stage).await.map_err(|e| Failure::of(conn, e))?;
    Ok((progress, wire()))
}

/// The helpers of one stream.
struct StreamTasks {
    generation: u64,
    wants: mpsc::UnboundedSender<Vec<ChunkRef>>,
    sender: tokio::task::JoinHandle<()>,
    receiver: tokio::task::JoinHandle<()>,
}

impl StreamTasks {
    fn stop(self) {
        drop(self.wants);
        self.sender.abort();
        self.receiver.abort();
    }
}

struct Loop<'a> {
    conn: &'a quinn::Connection,
    supply: &'a Supply<'a>,
    dp: &'a str,
    manifest_bytes: u64,
    a: &'a pb::Assignment,
    machine: Transfer,
    jobs: Vec<std::sync::mpsc::Sender<Vec<Job>>>,
    /// Jobs gathered while events are drained, per writer.
    pending: Vec<Vec<Job>>,
    streams: Vec<StreamTasks>,
    ev_tx: mpsc::UnboundedSender<Ev>,
    generations: u64,
    stage: Arc<Stage>,
    reports: &'a mpsc::UnboundedSender<pb::Report>,
    next_writer: usize,
    rx_start: u64,
}

impl Loop<'_> {
    /// Stops the stream tasks and the writers (joined off the async
    /// threads) before anything else touches the stage; the machine's
    /// per-chunk state goes before the install needs memory.
    async fn stop(self, threads: Vec<std::thread::JoinHandle<()>>) {
        let Loop {
            streams,
            jobs,
            stage,
            ev_tx,
            machine,
            ..
        } = self;
        for s in streams {
            s.stop();
        }
        drop((jobs, stage, ev_tx, machine));
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await;
    }

    fn wire(&self) -> u64 {
        self.conn.stats().udp_rx.bytes.saturating_sub(self.rx_start)
    }

    fn open_stream(&mut self, stream: usize) -> StreamTasks {
        self.generations += 1;
        let generation = self.generations;
        let (wants, mut want_rx) = mpsc::unbounded_channel::<Vec<ChunkRef>>();
        let (conn, ev) = (self.conn.clone(), self.ev_tx.clone());
        let (package, revision) = (self.a.package.clone(), self.a.revision);
        let (recv_tx, recv_rx) = tokio::sync::oneshot::channel::<chunks::Replies>();
        let ev2 = ev.clone();
        let who = self.supply.who();
        let mut grants = self.supply.grants.clone();
        let sender = tokio::spawn(async move {
            let r: Result<()> = async {
                let mut shown = grants
                    .as_mut()
                    .and_then(|g| grant_of(g.borrow_and_update().as_deref(), &package, revision));
                let (mut ask, replies) =
                    chunks::open(&conn, &package, revision, shown.clone()).await?;
                let _ = recv_tx.send(replies);
                loop {
                    // A source DP gets the site's renewed grant as it comes.
                    let renewed = async {
                        match grants.as_mut() {
                            Some(g) => g.changed().await,
                            None => std::future::pending().await,
                        }
                    };
                    tokio::select! {
                        batch = want_rx.recv() => match batch {
                            Some(batch) => ask.want(batch.iter().map(|c| &c.id)).await?,
                            None => break,
                        },
                        Ok(()) = renewed => {
                            let next = grants
                                .as_mut()
                                .and_then(|g| grant_of(g.borrow_and_update().as_deref(), &package, revision));
                            if let Some(next) = next.filter(|n| Some(n) != shown.as_ref()) {
                                ask.renew(next.clone()).await?;
                                shown = Some(next);
                            }
                        }
                    }
                }
                ask.finish();
                Ok(())
            }
            .await;
            if let Err(e) = r {
                let _ = ev.send(Ev::StreamLost {
                    stream,
                    generation,
                    error: e.to_string(),
                });
            }
        });
        let receiver = tokio::spawn(async move {
            let Ok(mut replies) = recv_rx.await else {
                return;
            };
            loop {
                match replies.next().await {
                    Ok(Some(Incoming::Chunk { id, data })) => {
                        let chunk = Ev::Chunk {
                            stream,
                            generation,
                            id,
                            data,
                        };
                        if ev2.send(chunk).is_err() {
                            return;
                        }
                    }
                    Ok(Some(Incoming::Other(pb::Reply {
                        kind: Some(reply::Kind::Error(e)),
                    }))) => {
                        let what = if e.code == Code::NotFound as i32 {
                            format!("{who} does not have a chunk the manifest names")
                        } else {
                            format!("{who} refused to send chunks")
                        };
                        let _ = ev2.send(Ev::SiteError(format!("{what}: {}", e.message)));
                        return;
                    }
                    Ok(Some(Incoming::Other(_))) => {
                        let _ = ev2.send(Ev::SiteError(format!(
                            "{who} answered a chunk request with something else"
                        )));
                        return;
                    }
                    Ok(None) => return,
                    Err(e) => {
                        let _ = ev2.send(Ev::StreamLost {
                            stream,
                            generation,
                            error: e.to_string(),
                        });
                        return;
                    }
                }
            }
        });
        StreamTasks {
            generation,
            wants,
            sender,
            receiver,
        }
    }

    /// Explains a failed write; a full disk says how much to free.
    fn write_failed(&self, e: ContentError) -> DpError {
        let what = format!("{} revision {}", self.a.package, self.a.revision);
        if !e.is_no_space() {
            return DpError::Context {
                what: format!("cannot write {what}"),
                source: Box::new(DpError::from(e)),
            };
        }
        let at = self.stage.dir().to_path_buf();
        DpError::DiskFull {
            dp: self.dp.to_string(),
            what,
            free: ferry_store::disk::available(&at).unwrap_or(0),
            at,
            margin: SPACE_MARGIN,
            source: Box::new(e),
        }
    }

    /// Whether an event comes from the stream's current helpers.
    fn current(&self, stream: usize, generation: u64) -> bool {
        self.streams
            .get(stream)
            .is_some_and(|s| s.generation == generation)
    }

    /// Queues a job for a writer; [`Self::flush_jobs`] hands them over.
    fn send_job(&mut self, job: Job, id: Option<&ChunkId>) {
        // A chunk always goes to the same writer (by id): its two places
        // never race. Copies go round-robin.
        let n = match id {
            Some(id) => id.as_bytes()[0] as usize % self.jobs.len(),
            None => {
                self.next_writer = (self.next_writer + 1) % self.jobs.len();
                self.next_writer
            }
        };
        self.pending[n].push(job);
    }

    /// Hands the queued jobs to the writers, one batch each.
    fn flush_jobs(&mut self) -> Result<(), Failure> {
        for (tx, jobs) in self.jobs.iter().zip(self.pending.iter_mut()) {
            if !jobs.is_empty() {
                tx.send(std::mem::take(jobs))
                    .map_err(|_| Failure::job(DpError::stopped("a writer thread stopped")))?;
            }
        }
        Ok(())
    }

    /// Runs the machine until every slot is written.
    async fn drive(
        &mut self,
        ev_rx: &mut mpsc::UnboundedReceiver<Ev>,
        mut paused: watch::Receiver<bool>,
    ) -> Result<Progress, Failure> {
        let paused_now = *paused.borrow_and_update();
        self.machine.set_paused(paused_now, Instant::now());
        let mut checkpoint: Option<tokio::task::JoinHandle<Result<(), ContentError>>> = None;
        loop {
            let now = Instant::now();
            // Timers (the stall above all) even while events keep coming.
            self.machine.handle_timeout(now);
            while let Some(op) = self.machine.poll_copy() {
                self.send_job(Job::Copy(op), None);
            }
            self.flush_jobs()?;
            self.machine.set_rtt(self.conn.rtt());
            for s in 0..FETCH_STREAMS {
                while let Some(batch) = self.machine.poll_request(s, now) {
                    while self.streams.len() <= s {
                        let t = self.open_stream(self.streams.len());
                        self.streams.push(t);
                    }
                    if self.streams[s].wants.send(batch).is_err() {
                        return Err(Failure::job(DpError::stopped("a chunk stream stopped")));
                    }
                }
            }
            while let Some(ev) = self.machine.poll_event() {
                match ev {
                    Event::Progress(p) => {
                        let mut r = report::progress(
                            self.a,
                            pb::State::InProgress,
                            &p,
                            self.wire(),
                            self.manifest_bytes,
                        );
                        r.sources = self.supply.sources();
                        let _ = self.reports.send(r);
                    }
                    Event::Complete(p) => {
                        if let Some(c) = checkpoint.take() {
                            let _ = c.await;
                        }
                        return Ok(p);
                    }
                    Event::Failed(msg) => return Err(Failure::job(DpError::Transfer(msg))),
                }
            }
            if checkpoint.as_ref().is_some_and(|c| c.is_finished()) {
                if let Some(c) = checkpoint.take() {
                    match c.await {
                        Ok(Ok(())) => self.machine.handle_checkpointed(),
                        Ok(Err(e)) => return Err(Failure::Job(self.write_failed(e))),
                        Err(e) => return Err(Failure::job(e)),
                    }
                }
            }
            if self.machine.poll_checkpoint(now) {
                let stage = self.stage.clone();
                checkpoint = Some(tokio::task::spawn_blocking(move || stage.checkpoint()));
            }
            let timeout = self
                .machine
                .poll_timeout(now)
                .unwrap_or(now + Duration::from_secs(1))
                .min(now + Duration::from_secs(1));
            let ev = tokio::select! {
                ev = ev_rx.recv() => ev,
                _ = tokio::time::sleep_until(timeout.into()) => {
                    self.machine.handle_timeout(Instant::now());
                    continue;
                }
                Ok(()) = paused.changed() => {
                    let p = *paused.borrow_and_update();
                    info!(paused = p, "the site {} sending", if p { "stopped" } else { "goes on" });
                    self.machine.set_paused(p, Instant::now());
                    continue;
                }
                e = self.conn.closed() => return Err(Failure::lost(&e)),
            };
            let Some(ev) = ev else {
                return Err(Failure::job(DpError::stopped(
                    "the transfer's helpers stopped",
                )));
            };
            // Everything that is waiting, then one hand-over per writer.
            let now = Instant::now();
            self.handle(ev, now)?;
            for _ in 0..EVENT_BATCH {
                match ev_rx.try_recv() {
                    Ok(ev) => self.handle(ev, now)?,
                    Err(_) => break,
                }
            }
            self.flush_jobs()?;
        }
    }

    /// Feeds one event to the machine.
    fn handle(&mut self, ev: Ev, now: Instant) -> Result<(), Failure> {
        match ev {
            Ev::Chunk {
                stream,
                generation,
                id,
                data,
            } => {
                if !self.current(stream, generation) {
                    return Ok(());
                }
                let p = self.machine.handle_chunk(stream, &id, now).map_err(|e| {
                    Failure::job(DpError::protocol(format!(
                        "{} broke the protocol: {e}",
                        self.supply.who()
                    )))
                })?;
                self.supply
                    .received
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
                self.supply
                    .metrics
                    .received(self.supply.name, data.len() as u64);
                let job = Job::Write {
                    id,
                    len: p.chunk.len,
                    data,
                    places: p.places,
                };
                self.send_job(job, Some(&id));
            }
            Ev::Batch(events) => {
                for e in events {
                    self.handle(e, now)?;
                }
            }
            Ev::Written(id) => self.machine.handle_written(&id, now),
            Ev::Corrupt(id) => {
                warn!(chunk = %id, "chunk failed verification; asking again");
                self.supply.metrics.refetched();
                self.machine.handle_corrupt(&id);
            }
            Ev::Copied { id, ok } => self.machine.handle_copied(id, ok, now),
            Ev::WriteFailed(e) => return Err(Failure::Job(self.write_failed(e))),
            Ev::SiteError(msg) => return Err(Failure::job(DpError::protocol(msg))),
            Ev::StreamLost {
                stream,
                generation,
                error,
            } => {
                if !self.current(stream, generation) {
                    return Ok(());
                }
                if let Some(reason) = self.conn.close_reason() {
                    return Err(Failure::lost(&reason));
                }
                // Over the restart budget the machine fails the transfer
                // (its event ends the loop).
                if !self.machine.handle_stream_lost(stream, &error) {
                    return Ok(());
                }
                warn!(stream, %error, "a chunk stream broke; opening it again");
                if stream < self.streams.len() {
                    let fresh = self.open_stream(stream);
                    std::mem::replace(&mut self.streams[stream], fresh).stop();
                }
            }
        }
        Ok(())
    }
}

/// A writer thread: verifies, writes, records, then reports. Each batch of
/// jobs is recorded in the index in one write when the queue runs dry (or
/// every [`WRITER_FLUSH`] chunks), and its chunks are reported written only
/// once recorded.
fn writer(
    stage: &Stage,
    origins: &Origins,
    rx: std::sync::mpsc::Receiver<Vec<Job>>,
    ev: mpsc::UnboundedSender<Ev>,
) {
    let mut marks = Marks::default();
    let mut done: Vec<Ev> = Vec::new();
    let flush = |marks: &mut Marks, done: &mut Vec<Ev>| -> bool {
        if let Err(e) = stage.record(std::mem::take(marks)) {
            let _ = ev.send(Ev::WriteFailed(e));
            return false;
        }
        if !done.is_empty() {
            let _ = ev.send(Ev::Batch(std::mem::take(done)));
        }
        true
    };
    loop {
        let jobs = if done.is_empty() {
            match rx.recv() {
                Ok(j) => j,
                Err(_) => return,
            }
        } else {
            match rx.try_recv() {
                Ok(j) => j,
                Err(std::sync::mpsc::TryRecvError::Empty) => {
                    if !flush(&mut marks, &mut done) {
                        return;
                    }
                    continue;
                }
                Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                    flush(&mut marks, &mut done);
                    return;
                }
            }
        };
        // Verify every arriving chunk, write them all in runs, then record.
        let mut writes: Vec<Verified> = Vec::new();
        for job in jobs {
            match job {
                Job::Write {
                    id,
                    len,
                    data,
                    places,
                } => {
                    if data.len() != len as usize || ChunkId::of(&data) != id {
                        // Nothing written: no mark to wait for.
                        let _ = ev.send(Ev::Corrupt(id));
                    } else {
                        writes.push((id, data, places));
                    }
                }
                Job::Copy(op) => match run_copy(stage, origins, op, &mut marks) {
                    e @ Ev::Copied { ok: true, .. } => done.push(e),
                    e => {
                        let _ = ev.send(e);
                    }
                },
            }
        }
        let mut items: Vec<(u32, u64, &[u8])> = Vec::new();
        for (_, data, places) in &writes {
            for (s, offset) in places {
                items.push((s.file, *offset, data.as_ref()));
            }
        }
        if let Err(e) = stage.write_many(&mut items) {
            let _ = ev.send(Ev::WriteFailed(e));
            return;
        }
        drop(items);
        for (id, _, places) in &writes {
            for (s, _) in places {
                stage.mark(&mut marks, s.file, s.index, 1);
            }
            done.push(Ev::Written(*id));
        }
        if done.len() >= WRITER_FLUSH && !flush(&mut marks, &mut done) {
            return;
        }
    }
}

/// Runs one local copy; the event says whether it worked.
fn run_copy(stage: &Stage, origins: &Origins, op: CopyOp, marks: &mut Marks) -> Ev {
    let origin = match op.origin.file {
        OriginFile::Other(h) => origins.get(h as usize).map(|(f, p)| (f, p.as_path())),
        OriginFile::Stage(n) => stage.file(n).map(|f| (f.file(), f.path())),
    };
    let ok = match origin {
        Some((f, path)) => match stage.copy(&op, f, path) {
            Ok(()) => true,
            Err(e) => {
                warn!(error = %e, "a local copy failed; fetching those chunks instead");
                false
            }
        },
        None => false,
    };
    if ok {
        stage.mark(marks, op.file, op.first, op.count);
    }
    Ev::Copied { id: op.id, ok }
}
