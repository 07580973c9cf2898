//! One package revision arriving at a distribution point, as a state
//! machine.
//!
//! The DP's files are written in place: every chunk occurrence (a [`Slot`]:
//! file number and chunk index) has a fixed offset in a preallocated file of
//! the revision's staging folder. For each distinct chunk the machine
//! decides once, at [`Transfer::new`], where its bytes come from:
//!
//! - every slot is written already (a resumed transfer): nothing to do;
//! - some slots are written: the others are copied from one of them;
//! - the DP holds the chunk in an installed file: all slots are copied from
//!   there ([`Transfer::poll_copy`] yields coalesced [`CopyOp`]s, so an
//!   unchanged prefix of an appended WIM is one copy);
//! - else it is fetched: [`Transfer::poll_request`] hands out batches per
//!   stream within a window sized for the bandwidth-delay product (and an
//!   optional rate cap), [`Transfer::handle_chunk`] checks each arrival
//!   against what that stream was asked for, in order, and names the
//!   places to write it.
//!
//! The driver hashes and writes (off its async threads) and answers
//! [`Transfer::handle_written`] or [`Transfer::handle_corrupt`]; a chunk
//! counts only once it is written. [`Transfer::poll_event`] yields progress
//! reports, completion and failure. Time comes in as `now` arguments; the
//! machine never reads a clock.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::{ChunkId, ChunkRef, Manifest};

/// One occurrence of a chunk: chunk `index` of file `file` (manifest order).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Slot {
    /// File number in the revision's manifest list.
    pub file: u32,
    /// Chunk index inside that file.
    pub index: u32,
}

/// A file a copy reads from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum OriginFile {
    /// A file of this revision's staging folder (by file number).
    Stage(u32),
    /// A file the driver knows by this handle (an installed revision's).
    Other(u64),
}

/// Where bytes of a chunk can be copied from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Origin {
    /// The file.
    pub file: OriginFile,
    /// The chunk's offset in it.
    pub offset: u64,
}

/// A byte range to copy into a staged file: consecutive slots of one file
/// whose chunks lie consecutively in the origin.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CopyOp {
    /// Identifies the op in [`Transfer::handle_copied`].
    pub id: u64,
    /// Destination file number.
    pub file: u32,
    /// Offset in the destination file.
    pub offset: u64,
    /// Where the bytes are.
    pub origin: Origin,
    /// Bytes to copy.
    pub len: u64,
    /// First chunk index written (slots `first..first + count` of `file`).
    pub first: u32,
    /// Chunks covered.
    pub count: u32,
}

/// Where to write a chunk that arrived: every slot not written yet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    /// The chunk.
    pub chunk: ChunkRef,
    /// (slot, offset in its file) for each place to write.
    pub places: Vec<(Slot, u64)>,
}

/// Settings of one transfer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TransferOptions {
    /// Streams requests are spread over.
    pub streams: usize,
    /// Least bytes asked for and not yet arrived, over all streams.
    pub min_window: u64,
    /// Most bytes asked for and not yet arrived on one stream (the QUIC
    /// stream receive window).
    pub max_stream_window: u64,
    /// Most chunk ids in one request.
    pub max_batch_chunks: usize,
    /// Average bytes per second asked for, if capped.
    pub max_rate: Option<u64>,
    /// Times a chunk may fail verification before the transfer fails.
    pub max_attempts: u32,
    /// Least time between two progress events.
    pub report_every: Duration,
    /// Most time between two checkpoints while bytes are written.
    pub checkpoint_every: Duration,
    /// Most bytes written to disk (copies included) between checkpoints.
    pub checkpoint_bytes: u64,
    /// A stream that waits this long for any chunk fails the transfer.
    pub stall_timeout: Duration,
    /// Times broken streams may be opened again before the transfer fails.
    pub max_stream_restarts: u32,
}

impl Default for TransferOptions {
    fn default() -> Self {
        Self {
            streams: 4,
            min_window: 1 << 20,
            max_stream_window: 16 << 20,
            max_batch_chunks: 1024,
            max_rate: None,
            max_attempts: 3,
            report_every: Duration::from_millis(250),
            checkpoint_every: Duration::from_secs(5),
            checkpoint_bytes: 512 << 20,
            stall_timeout: Duration::from_secs(60),
            max_stream_restarts: 8,
        }
    }
}

/// Figures of a transfer, as reports carry them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// Bytes of distinct chunks to fetch, as planned.
    pub bytes_needed: u64,
    /// Of those, fetched, verified and written.
    pub bytes_done: u64,
    /// Bytes copied from files the DP held (no network).
    pub bytes_local: u64,
    /// Bytes of local copies planned.
    pub bytes_local_planned: u64,
    /// Size of all files of the revision: what a full copy costs.
    pub full_bytes: u64,
}

/// What the machine tells its driver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// Time for a progress report.
    Progress(Progress),
    /// Every slot of every file is written.
    Complete(Progress),
    /// The transfer cannot finish.
    Failed(String),
}

/// The site answered something the machine did not ask for.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TransferError {
    /// A chunk other than the next one asked for on that stream.
    #[error("stream {stream} delivered chunk {got}, expected {expected}")]
    Unexpected {
        /// The stream.
        stream: usize,
        /// What arrived.
        got: ChunkId,
        /// What was next.
        expected: String,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Done,
    /// Slots are being copied from elsewhere.
    Copying,
    /// Waiting in the fetch queue.
    Queued,
    /// Asked for on a stream.
    Asked,
    /// Arrived; being verified and written.
    Writing,
}

#[derive(Clone, Debug)]
struct Entry {
    chunk: ChunkRef,
    state: State,
    /// Slots of this chunk in `Transfer::slots`.
    slots: std::ops::Range<u32>,
    attempts: u32,
    /// The stream it was last asked for on.
    stream: u32,
}

/// One revision arriving. See the module documentation.
#[derive(Debug)]
pub struct Transfer {
    opts: TransferOptions,
    /// Per file: offset of each chunk, and the file size at the end.
    offsets: Vec<Vec<u64>>,
    /// Per file: the entry of each chunk index.
    entry_of: Vec<Vec<u32>>,
    /// Per file: whether each chunk index is written.
    written: Vec<Vec<bool>>,
    entries: Vec<Entry>,
    by_id: HashMap<ChunkId, u32>,
    /// Slots grouped by entry.
    slots: Vec<Slot>,
    queue: VecDeque<u32>,
    asked: Vec<VecDeque<u32>>,
    asked_bytes: Vec<u64>,
    copies: VecDeque<CopyOp>,
    copying: HashMap<u64, CopyOp>,
    open: usize,
    progress: Progress,
    events: VecDeque<Event>,
    finished: bool,
    started: Option<Instant>,
    requested_bytes: u64,
    last_report: Option<Instant>,
    reported: Progress,
    rtt: Duration,
    /// Delivery rate estimate, bytes per second.
    rate: f64,
    rate_mark: Option<(Instant, u64)>,
    /// Bytes written to disk since the last checkpoint began.
    unsynced: u64,
    /// When the last checkpoint began (the first poll, before any).
    last_checkpoint: Option<Instant>,
    /// Whether the driver runs a checkpoint now.
    checkpointing: bool,
    /// When a chunk last arrived, or the first request went out.
    /// The sender holds the chunks back on purpose (a closed transfer
    /// window): no stall.
    paused: bool,
    last_arrival: Option<Instant>,
    /// Broken streams opened again so far.
    restarts: u32,
}

impl Transfer {
    /// Plans a revision. `written(slot)` says whether a slot of the staging
    /// folder holds its chunk already (a resumed transfer); `locate(id)`
    /// names a file the DP holds the chunk in, if any.
    pub fn new(
        manifests: &[Manifest],
        opts: TransferOptions,
        mut written: impl FnMut(Slot) -> bool,
        mut locate: impl FnMut(&ChunkId) -> Option<Origin>,
    ) -> Self {
        let mut offsets = Vec::with_capacity(manifests.len());
        let mut entry_of = Vec::with_capacity(manifests.len());
        let mut done_slots = Vec::with_capacity(manifests.len());
        let mut entries: Vec<Entry> = Vec::new();
        let mut by_id: HashMap<ChunkId, u32> = HashMap::new();
        let mut counts: Vec<u32> = Vec::new();
        let mut progress = Progress::default();
        for (f, m) in manifests.iter().enumerate() {
            progress.full_bytes += m.size;
            let mut offs = Vec::with_capacity(m.chunks.len() + 1);
            let mut of = Vec::with_capacity(m.chunks.len());
            let mut w = Vec::with_capacity(m.chunks.len());
            let mut pos = 0u64;
            for (i, c) in m.chunks.iter().enumerate() {
                offs.push(pos);
                pos += u64::from(c.len);
                let e = *by_id.entry(c.id).or_insert_with(|| {
                    entries.push(Entry {
                        chunk: *c,
                        state: State::Queued,
                        slots: 0..0,
                        attempts: 0,
                        stream: 0,
                    });
                    counts.push(0);
                    (entries.len() - 1) as u32
                });
                counts[e as usize] += 1;
                of.push(e);
                w.push(written(Slot {
                    file: f as u32,
                    index: i as u32,
                }));
            }
            offs.push(pos);
            offsets.push(offs);
            entry_of.push(of);
            done_slots.push(w);
        }
        // Group the slots by entry.
        let mut start = 0u32;
        for (e, n) in entries.iter_mut().zip(&counts) {
            e.slots = start..start + n;
            start += n;
        }
        let mut fill: Vec<u32> = entries.iter().map(|e| e.slots.start).collect();
        let mut slots = vec![Slot { file: 0, index: 0 }; start as usize];
        for (f, of) in entry_of.iter().enumerate() {
            for (i, &e) in of.iter().enumerate() {
                slots[fill[e as usize] as usize] = Slot {
                    file: f as u32,
                    index: i as u32,
                };
                fill[e as usize] += 1;
            }
        }

        let streams = opts.streams.max(1);
        let mut t = Self {
            opts: TransferOptions { streams, ..opts },
            offsets,
            entry_of,
            written: done_slots,
            entries,
            by_id,
            slots,
            queue: VecDeque::new(),
            asked: vec![VecDeque::new(); streams],
            asked_bytes: vec![0; streams],
            copies: VecDeque::new(),
            copying: HashMap::new(),
            open: 0,
            progress,
            events: VecDeque::new(),
            finished: false,
            started: None,
            requested_bytes: 0,
            last_report: None,
            reported: Progress::default(),
            rtt: Duration::from_millis(1),
            rate: 0.0,
            rate_mark: None,
            unsynced: 0,
            last_checkpoint: None,
            checkpointing: false,
            last_arrival: None,
            paused: false,
            restarts: 0,
        };
        let mut copy_slots: Vec<(Slot, Origin)> = Vec::new();
        for e in 0..t.entries.len() {
            let (range, chunk) = (t.entries[e].slots.clone(), t.entries[e].chunk);
            let here: Vec<Slot> = t.slots[range.start as usize..range.end as usize].to_vec();
            let first_written = here.iter().copied().find(|s| t.is_written(*s));
            let todo: Vec<Slot> = here.into_iter().filter(|s| !t.is_written(*s)).collect();
            if todo.is_empty() {
                t.entries[e].state = State::Done;
                continue;
            }
            t.open += 1;
            let origin = match first_written {
                Some(s) => Some(Origin {
                    file: OriginFile::Stage(s.file),
                    offset: t.offset(s),
                }),
                None => locate(&chunk.id),
            };
            match origin {
                Some(o) => {
                    t.entries[e].state = State::Copying;
                    copy_slots.extend(todo.into_iter().map(|s| (s, o)));
                }
                None => {
                    t.progress.bytes_needed += u64::from(chunk.len);
                    t.queue.push_back(e as u32);
                }
            }
        }
        t.plan_copies(copy_slots);
        if t.open == 0 {
            t.finish();
        }
        t
    }

    fn is_written(&self, s: Slot) -> bool {
        self.written[s.file as usize][s.index as usize]
    }

    fn offset(&self, s: Slot) -> u64 {
        self.offsets[s.file as usize][s.index as usize]
    }

    fn chunk_len(&self, s: Slot) -> u64 {
        let o = &self.offsets[s.file as usize];
        o[s.index as usize + 1] - o[s.index as usize]
    }

    /// Coalesces copies: consecutive slots of one file whose origins are
    /// consecutive in one origin file become one op.
    fn plan_copies(&mut self, mut v: Vec<(Slot, Origin)>) {
        v.sort_by_key(|(s, _)| *s);
        let mut next_id = 0u64;
        let mut cur: Option<CopyOp> = None;
        for (s, o) in v {
            let len = self.chunk_len(s);
            self.progress.bytes_local_planned += len;
            if let Some(c) = cur.as_mut() {
                let continues = c.file == s.file
                    && c.first + c.count == s.index
                    && c.origin.file == o.file
                    && c.origin.offset + c.len == o.offset;
                if continues {
                    c.len += len;
                    c.count += 1;
                    continue;
                }
                self.copies.extend(cur.take());
            }
            cur = Some(CopyOp {
                id: next_id,
                file: s.file,
                offset: self.offset(s),
                origin: o,
                len,
                first: s.index,
                count: 1,
            });
            next_id += 1;
        }
        self.copies.extend(cur);
    }

    /// The next local copy to run.
    pub fn poll_copy(&mut self) -> Option<CopyOp> {
        let op = self.copies.pop_front()?;
        self.copying.insert(op.id, op.clone());
        Some(op)
    }

    /// A copy ended: on success its slots are written; on failure their
    /// chunks are fetched instead.
    pub fn handle_copied(&mut self, id: u64, ok: bool, now: Instant) {
        let Some(op) = self.copying.remove(&id) else {
            return;
        };
        for index in op.first..op.first + op.count {
            let s = Slot {
                file: op.file,
                index,
            };
            let e = self.entry_of[s.file as usize][s.index as usize];
            if ok {
                self.written[s.file as usize][s.index as usize] = true;
                let len = self.chunk_len(s);
                self.progress.bytes_local += len;
                self.unsynced += len;
                self.settle(e);
            } else if self.entries[e as usize].state == State::Copying {
                self.entries[e as usize].state = State::Queued;
                self.progress.bytes_needed += u64::from(self.entries[e as usize].chunk.len);
                self.queue.push_back(e);
            }
        }
        self.maybe_report(now);
    }

    /// An entry whose every slot is written is done.
    fn settle(&mut self, e: u32) {
        let entry = &self.entries[e as usize];
        if entry.state == State::Done {
            return;
        }
        let all = self.slots[entry.slots.start as usize..entry.slots.end as usize]
            .iter()
            .all(|s| self.written[s.file as usize][s.index as usize]);
        if all && entry.state == State::Copying {
            self.entries[e as usize].state = State::Done;
            self.open -= 1;
            if self.open == 0 {
                self.finish();
            }
        }
    }

    fn finish(&mut self) {
        if !self.finished {
            self.finished = true;
            self.events.push_back(Event::Complete(self.progress));
        }
    }

    /// The current figures.
    pub fn progress(&self) -> Progress {
        self.progress
    }

    /// Whether every slot is written.
    pub fn is_complete(&self) -> bool {
        self.finished && self.open == 0
    }

    /// The path's round-trip time, for the window.
    pub fn set_rtt(&mut self, rtt: Duration) {
        self.rtt = rtt.max(Duration::from_micros(50));
    }

    /// Bytes that may be asked for and not yet arrived, over all streams:
    /// twice the bandwidth-delay product at the measured delivery rate.
    pub fn window(&self) -> u64 {
        let bdp = 2.0 * self.rate * self.rtt.as_secs_f64();
        let max = self.opts.max_stream_window * self.opts.streams as u64;
        (bdp as u64).clamp(self.opts.min_window, max.max(self.opts.min_window))
    }

    /// The next batch to ask for on `stream`, if its share of the window
    /// and the rate cap allow one.
    pub fn poll_request(&mut self, stream: usize, now: Instant) -> Option<Vec<ChunkRef>> {
        if stream >= self.opts.streams || self.queue.is_empty() || self.finished {
            return None;
        }
        let started = *self.started.get_or_insert(now);
        let share = (self.window() / self.opts.streams as u64).max(1);
        let mut budget = share.saturating_sub(self.asked_bytes[stream]);
        if let Some(rate) = self.opts.max_rate {
            // A bucket of a tenth of a second on top of the average.
            let allowed = (now - started).as_secs_f64() * rate as f64 + rate as f64 / 10.0;
            let left = (allowed - self.requested_bytes as f64).max(0.0) as u64;
            budget = budget.min(left);
        }
        if budget == 0 {
            return None;
        }
        if !(0..self.asked.len()).any(|s| self.is_waiting(s)) {
            // The stall clock starts when something is awaited.
            self.last_arrival = Some(now);
        }
        let mut out = Vec::new();
        let mut bytes = 0u64;
        while let Some(&e) = self.queue.front() {
            let len = u64::from(self.entries[e as usize].chunk.len);
            let fits = bytes + len <= budget || (out.is_empty() && self.asked_bytes[stream] == 0);
            if !fits || out.len() >= self.opts.max_batch_chunks {
                break;
            }
            self.queue.pop_front();
            self.entries[e as usize].state = State::Asked;
            self.entries[e as usize].stream = stream as u32;
            self.asked[stream].push_back(e);
            out.push(self.entries[e as usize].chunk);
            bytes += len;
        }
        if out.is_empty() {
            return None;
        }
        self.asked_bytes[stream] += bytes;
        self.requested_bytes += bytes;
        Some(out)
    }

    /// When the rate cap lets the next request out, if it holds one back.
    pub fn poll_timeout(&self, now: Instant) -> Option<Instant> {
        let mut at: Option<Instant> = None;
        if let (Some(rate), Some(started)) = (self.opts.max_rate, self.started) {
            if let Some(&next) = self.queue.front().filter(|_| !self.finished) {
                let next = u64::from(self.entries[next as usize].chunk.len);
                let due = Duration::from_secs_f64(
                    ((self.requested_bytes + next) as f64 - rate as f64 / 10.0).max(0.0)
                        / rate as f64,
                );
                at = Some((started + due).max(now + Duration::from_millis(1)));
            }
        }
        if let Some(last) = self.last_report {
            if self.progress != self.reported && !self.finished {
                let r = last + self.opts.report_every;
                at = Some(at.map_or(r, |a| a.min(r)));
            }
        }
        let mut also = |t: Instant| at = Some(at.map_or(t, |a| a.min(t)));
        if let Some(last) = self.last_checkpoint {
            if self.unsynced > 0 && !self.checkpointing && !self.finished {
                also(last + self.opts.checkpoint_every);
            }
        }
        if let Some(last) = self.last_arrival.filter(|_| !self.paused) {
            if !self.finished && (0..self.asked.len()).any(|s| self.is_waiting(s)) {
                also(last + self.opts.stall_timeout);
            }
        }
        at
    }

    /// The sender pauses (a transfer window closed) or goes on: while
    /// paused, waiting for chunks is no stall; on resuming, the stall clock
    /// starts again.
    pub fn set_paused(&mut self, paused: bool, now: Instant) {
        if self.paused && !paused {
            self.last_arrival = Some(now);
        }
        self.paused = paused;
    }

    /// Timers: a progress report that was held back; a transfer whose
    /// streams waited [`TransferOptions::stall_timeout`] for any chunk
    /// fails.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.maybe_report(now);
        let waiting = (0..self.asked.len()).any(|s| self.is_waiting(s));
        if let Some(last) = self.last_arrival.filter(|_| waiting && !self.paused) {
            if now.saturating_duration_since(last) >= self.opts.stall_timeout {
                self.fail(format!(
                    "the site sent no chunk for {:?}",
                    self.opts.stall_timeout
                ));
            }
        }
    }

    /// Whether the driver should make what is written durable now: bytes
    /// were written since the last checkpoint, and either
    /// [`TransferOptions::checkpoint_bytes`] of them or
    /// [`TransferOptions::checkpoint_every`] has passed. A `true` starts
    /// the checkpoint: none is due again until
    /// [`Transfer::handle_checkpointed`].
    pub fn poll_checkpoint(&mut self, now: Instant) -> bool {
        let last = *self.last_checkpoint.get_or_insert(now);
        let due = self.unsynced > 0
            && !self.checkpointing
            && (self.unsynced >= self.opts.checkpoint_bytes
                || now.saturating_duration_since(last) >= self.opts.checkpoint_every);
        if due {
            self.checkpointing = true;
            self.unsynced = 0;
            self.last_checkpoint = Some(now);
        }
        due
    }

    /// The checkpoint [`Transfer::poll_checkpoint`] asked for is done.
    pub fn handle_checkpointed(&mut self) {
        self.checkpointing = false;
    }

    /// Bytes written to disk and not yet in a checkpoint.
    pub fn unsynced_bytes(&self) -> u64 {
        self.unsynced
    }

    /// A chunk arrived on `stream`. It must be the next one asked for there;
    /// the answer says where to write it once it is verified.
    pub fn handle_chunk(
        &mut self,
        stream: usize,
        id: &ChunkId,
        now: Instant,
    ) -> Result<Placement, TransferError> {
        let q = self
            .asked
            .get_mut(stream)
            .ok_or(TransferError::Unexpected {
                stream,
                got: *id,
                expected: "nothing: no such stream".into(),
            })?;
        let Some(&e) = q.front() else {
            return Err(TransferError::Unexpected {
                stream,
                got: *id,
                expected: "nothing".into(),
            });
        };
        let entry = &self.entries[e as usize];
        if entry.chunk.id != *id {
            return Err(TransferError::Unexpected {
                stream,
                got: *id,
                expected: entry.chunk.id.to_string(),
            });
        }
        q.pop_front();
        self.last_arrival = Some(now);
        // Its bytes stay in the window until written: a slow disk slows
        // the requests instead of filling memory.
        let len = u64::from(entry.chunk.len);
        self.entries[e as usize].state = State::Writing;
        self.measure(now, len);
        let entry = &self.entries[e as usize];
        let places = self.slots[entry.slots.start as usize..entry.slots.end as usize]
            .iter()
            .filter(|s| !self.is_written(**s))
            .map(|&s| (s, self.offset(s)))
            .collect();
        Ok(Placement {
            chunk: entry.chunk,
            places,
        })
    }

    fn measure(&mut self, now: Instant, arrived: u64) {
        match self.rate_mark {
            None => self.rate_mark = Some((now, 0)),
            Some((t0, n)) => {
                let n = n + arrived;
                let dt = (now - t0).as_secs_f64();
                if dt >= 0.05 {
                    let r = n as f64 / dt;
                    self.rate = if self.rate == 0.0 {
                        r
                    } else {
                        0.7 * self.rate + 0.3 * r
                    };
                    self.rate_mark = Some((now, 0));
                } else {
                    self.rate_mark = Some((t0, n));
                }
            }
        }
    }

    /// A chunk from [`Transfer::handle_chunk`] is verified and written at
    /// every place named.
    pub fn handle_written(&mut self, id: &ChunkId, now: Instant) {
        let Some(&e) = self.by_id.get(id) else {
            return;
        };
        if self.entries[e as usize].state != State::Writing {
            return;
        }
        let range = self.entries[e as usize].slots.clone();
        let len = u64::from(self.entries[e as usize].chunk.len);
        for i in range {
            let s = self.slots[i as usize];
            let w = &mut self.written[s.file as usize][s.index as usize];
            if !*w {
                // One write of the chunk per place it was missing from.
                self.unsynced += len;
            }
            *w = true;
        }
        self.release(e);
        self.entries[e as usize].state = State::Done;
        self.progress.bytes_done += u64::from(self.entries[e as usize].chunk.len);
        self.open -= 1;
        if self.open == 0 {
            self.finish();
        }
        self.maybe_report(now);
    }

    /// A chunk from [`Transfer::handle_chunk`] did not hash to its id (or
    /// could not be written): it is asked for again, up to the attempt
    /// limit.
    pub fn handle_corrupt(&mut self, id: &ChunkId) {
        let Some(&e) = self.by_id.get(id) else {
            return;
        };
        if self.entries[e as usize].state != State::Writing {
            return;
        }
        self.release(e);
        let entry = &mut self.entries[e as usize];
        entry.attempts += 1;
        if entry.attempts >= self.opts.max_attempts {
            let msg = format!(
                "chunk {} failed verification {} times; the site's copy or the path to it is damaged",
                entry.chunk.id, entry.attempts
            );
            self.fail(msg);
            return;
        }
        entry.state = State::Queued;
        self.queue.push_front(e);
    }

    /// Takes an arrived chunk's bytes out of its stream's window.
    fn release(&mut self, e: u32) {
        let entry = &self.entries[e as usize];
        if let Some(b) = self.asked_bytes.get_mut(entry.stream as usize) {
            *b = b.saturating_sub(u64::from(entry.chunk.len));
        }
    }

    /// A stream broke with `error`: what it was asked for goes back in
    /// the queue, and the driver opens it again (`true`), unless streams
    /// broke more than [`TransferOptions::max_stream_restarts`] times:
    /// then the transfer fails (`false`).
    pub fn handle_stream_lost(&mut self, stream: usize, error: &str) -> bool {
        if stream >= self.asked.len() || self.finished {
            return false;
        }
        self.restarts += 1;
        if self.restarts > self.opts.max_stream_restarts {
            self.fail(format!("chunk streams keep breaking: {error}"));
            return false;
        }
        let Some(q) = self.asked.get_mut(stream) else {
            return false;
        };
        let lost: Vec<u32> = q.drain(..).collect();
        for &e in &lost {
            let len = u64::from(self.entries[e as usize].chunk.len);
            self.asked_bytes[stream] = self.asked_bytes[stream].saturating_sub(len);
        }
        for &e in lost.iter().rev() {
            self.entries[e as usize].state = State::Queued;
            self.queue.push_front(e);
        }
        true
    }

    /// Ends the transfer with an error.
    pub fn fail(&mut self, reason: String) {
        if !self.finished {
            self.finished = true;
            self.events.push_back(Event::Failed(reason));
        }
    }

    /// Whether `stream` waits for chunks it asked for.
    pub fn is_waiting(&self, stream: usize) -> bool {
        self.asked.get(stream).is_some_and(|q| !q.is_empty())
    }

    fn maybe_report(&mut self, now: Instant) {
        if self.finished || self.progress == self.reported {
            return;
        }
        let due = self
            .last_report
            .is_none_or(|t| now.saturating_duration_since(t) >= self.opts.report_every);
        if due {
            self.last_report = Some(now);
            self.reported = self.progress;
            self.events.push_back(Event::Progress(self.progress));
        }
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::FileHash;

    fn chunk(n: u32, len: u32) -> ChunkRef {
        ChunkRef {
            id: ChunkId::of(&n.to_le_bytes()),
            len,
        }
    }

    fn manifest(path: &str, chunks: Vec<ChunkRef>) -> Manifest {
        Manifest {
            path: path.into(),
            size: chunks.iter().map(|c| u64::from(c.len)).sum(),
            hash: FileHash::of(b""),
            chunks,
            segments: vec![],
        }
    }

    fn opts() -> TransferOptions {
        TransferOptions {
            streams: 2,
            min_window: 250,
            max_stream_window: 1000,
            max_batch_chunks: 3,
            ..TransferOptions::default()
        }
    }

    /// Runs a transfer to the end, delivering every request at once.
    fn drain(t: &mut Transfer, now: Instant) -> Vec<Vec<ChunkRef>> {
        let mut asked = Vec::new();
        loop {
            let mut any = false;
            while let Some(op) = t.poll_copy() {
                t.handle_copied(op.id, true, now);
                any = true;
            }
            for s in 0..2 {
                if let Some(batch) = t.poll_request(s, now) {
                    any = true;
                    for c in &batch {
                        let p = t.handle_chunk(s, &c.id, now).unwrap();
                        assert!(!p.places.is_empty());
                        t.handle_written(&c.id, now);
                    }
                    asked.push(batch);
                }
            }
            if !any {
                return asked;
            }
        }
    }

    #[test]
    fn duplicates_are_fetched_once_and_written_everywhere() {
        let a = manifest("a", vec![chunk(1, 100), chunk(2, 100), chunk(1, 100)]);
        let b = manifest("b", vec![chunk(2, 100), chunk(3, 50)]);
        let now = Instant::now();
        let mut t = Transfer::new(&[a, b], opts(), |_| false, |_| None);
        assert_eq!(t.progress().bytes_needed, 250);
        assert_eq!(t.progress().full_bytes, 450);
        t.poll_request(0, now).unwrap();
        let p = t.handle_chunk(0, &chunk(1, 100).id, now).unwrap();
        assert_eq!(
            p.places,
            vec![
                (Slot { file: 0, index: 0 }, 0),
                (Slot { file: 0, index: 2 }, 200)
            ]
        );
        t.handle_written(&chunk(1, 100).id, now);
        let fetched: Vec<ChunkId> = drain(&mut t, now).concat().iter().map(|c| c.id).collect();
        assert_eq!(fetched, vec![chunk(2, 100).id, chunk(3, 50).id]);
        assert!(t.is_complete());
        let mut last = None;
        while let Some(e) = t.poll_event() {
            last = Some(e);
        }
        assert!(matches!(last, Some(Event::Complete(p)) if p.bytes_done == 250));
    }

    #[test]
    fn held_chunks_are_copied_in_coalesced_ranges_and_the_rest_fetched() {
        // Base: chunks 1..=6 at consecutive offsets of an installed file;
        // the new file keeps 1..3, inserts 9, keeps 4..6.
        let new = manifest(
            "x.wim",
            [1, 2, 3, 9, 4, 5, 6]
                .iter()
                .map(|&n| chunk(n, 10))
                .collect(),
        );
        let base_off = |id: &ChunkId| {
            (1..=6).find(|&n| chunk(n, 10).id == *id).map(|n| Origin {
                file: OriginFile::Other(7),
                offset: u64::from(n - 1) * 10,
            })
        };
        let mut t = Transfer::new(&[new], opts(), |_| false, base_off);
        let now = Instant::now();
        let a = t.poll_copy().unwrap();
        let b = t.poll_copy().unwrap();
        assert!(t.poll_copy().is_none(), "two runs, not six copies");
        assert_eq!((a.offset, a.len, a.origin.offset, a.count), (0, 30, 0, 3));
        assert_eq!((b.offset, b.len, b.origin.offset, b.first), (40, 30, 30, 4));
        assert_eq!(t.progress().bytes_needed, 10);
        t.handle_copied(a.id, true, now);
        // A copy that fails: its chunks are fetched instead.
        t.handle_copied(b.id, false, now);
        assert_eq!(t.progress().bytes_needed, 40);
        let fetched = drain(&mut t, now).concat();
        assert_eq!(fetched.len(), 4);
        assert!(t.is_complete());
        assert_eq!(t.progress().bytes_local, 30);
    }

    #[test]
    fn a_resumed_transfer_asks_only_for_what_is_not_written() {
        let m = manifest("a", (0..6).map(|n| chunk(n, 10)).collect());
        let dup = manifest("b", vec![chunk(0, 10), chunk(5, 10)]);
        // Slots 0..3 of file a were written before the restart.
        let mut t = Transfer::new(&[m, dup], opts(), |s| s.file == 0 && s.index < 3, |_| None);
        let now = Instant::now();
        // Chunk 0 of file b is copied from file a's written slot.
        let c = t.poll_copy().unwrap();
        assert_eq!(c.origin.file, OriginFile::Stage(0));
        assert_eq!((c.file, c.first, c.count), (1, 0, 1));
        t.handle_copied(c.id, true, now);
        let fetched: Vec<ChunkId> = drain(&mut t, now).concat().iter().map(|c| c.id).collect();
        assert_eq!(
            fetched,
            vec![chunk(3, 10).id, chunk(4, 10).id, chunk(5, 10).id]
        );
        assert!(t.is_complete());

        let everything = Transfer::new(
            &[manifest("a", vec![chunk(1, 10)])],
            opts(),
            |_| true,
            |_| None,
        );
        assert!(
            everything.is_complete(),
            "nothing to do is complete at once"
        );
    }

    #[test]
    fn arrivals_out_of_order_or_unasked_are_refused() {
        let m = manifest("a", (0..4).map(|n| chunk(n, 10)).collect());
        let mut t = Transfer::new(&[m], opts(), |_| false, |_| None);
        let now = Instant::now();
        let batch = t.poll_request(0, now).unwrap();
        assert!(
            t.handle_chunk(0, &batch[1].id, now).is_err(),
            "out of order"
        );
        assert!(
            t.handle_chunk(1, &batch[0].id, now).is_err(),
            "other stream"
        );
        assert!(t.handle_chunk(9, &batch[0].id, now).is_err(), "no stream");
        assert!(t.handle_chunk(0, &chunk(77, 1).id, now).is_err());
        t.handle_chunk(0, &batch[0].id, now).unwrap();
    }

    #[test]
    fn corrupt_chunks_are_asked_again_then_fail_the_transfer() {
        let m = manifest("a", vec![chunk(1, 10)]);
        let mut t = Transfer::new(&[m], opts(), |_| false, |_| None);
        let now = Instant::now();
        for attempt in 1..=3 {
            let b = t.poll_request(0, now).unwrap();
            t.handle_chunk(0, &b[0].id, now).unwrap();
            t.handle_corrupt(&b[0].id);
            if attempt < 3 {
                assert!(t
                    .poll_event()
                    .is_none_or(|e| !matches!(e, Event::Failed(_))));
            }
        }
        let events: Vec<Event> = std::iter::from_fn(|| t.poll_event()).collect();
        assert!(
            matches!(events.last(), Some(Event::Failed(m)) if m.contains("3 times")),
            "{events:?}"
        );
        assert!(t.poll_request(0, now).is_none());
    }

    #[test]
    fn a_lost_stream_gives_its_chunks_back_first() {
        let m = manifest("a", (0..6).map(|n| chunk(n, 10)).collect());
        let mut t = Transfer::new(&[m], opts(), |_| false, |_| None);
        let now = Instant::now();
        let a = t.poll_request(0, now).unwrap();
        let _b = t.poll_request(1, now).unwrap();
        assert!(t.is_waiting(0));
        assert!(t.handle_stream_lost(0, "reset"));
        assert!(!t.is_waiting(0));
        let again = t.poll_request(0, now).unwrap();
        assert_eq!(again[0].id, a[0].id);
    }

    #[test]
    fn streams_that_keep_breaking_fail_the_transfer_after_the_budget() {
        let m = manifest("a", (0..6).map(|n| chunk(n, 10)).collect());
        let o = TransferOptions {
            max_stream_restarts: 2,
            ..opts()
        };
        let mut t = Transfer::new(&[m], o, |_| false, |_| None);
        let now = Instant::now();
        assert!(t.handle_stream_lost(0, "reset 1"));
        assert!(t.handle_stream_lost(1, "reset 2"));
        assert!(t.poll_event().is_none());
        assert!(!t.handle_stream_lost(0, "reset 3"));
        assert_eq!(
            t.poll_event(),
            Some(Event::Failed("chunk streams keep breaking: reset 3".into()))
        );
        assert!(t.poll_request(0, now).is_none());
    }

    #[test]
    fn a_stream_that_waits_past_the_stall_timeout_fails_the_transfer() {
        let m = manifest("a", (0..6).map(|n| chunk(n, 10)).collect());
        let o = TransferOptions {
            stall_timeout: Duration::from_secs(60),
            ..opts()
        };
        let mut t = Transfer::new(&[m], o, |_| false, |_| None);
        let t0 = Instant::now();
        let asked = t.poll_request(0, t0).unwrap();
        assert_eq!(t.poll_timeout(t0), Some(t0 + Duration::from_secs(60)));
        // An arrival at 50 s moves the deadline.
        let at50 = t0 + Duration::from_secs(50);
        t.handle_chunk(0, &asked[0].id, at50).unwrap();
        t.handle_timeout(t0 + Duration::from_secs(61));
        assert!(t
            .poll_event()
            .is_none_or(|e| !matches!(e, Event::Failed(_))));
        t.handle_timeout(at50 + Duration::from_secs(60));
        let events: Vec<Event> = std::iter::from_fn(|| t.poll_event()).collect();
        assert!(
            matches!(events.last(), Some(Event::Failed(m)) if m.contains("no chunk for 60s")),
            "{events:?}"
        );
    }

    #[test]
    fn a_paused_sender_is_no_stall_and_the_clock_restarts_on_resuming() {
        let m = manifest("a", (0..6).map(|n| chunk(n, 10)).collect());
        let mut t = Transfer::new(&[m], opts(), |_| false, |_| None);
        let t0 = Instant::now();
        let asked = t.poll_request(0, t0).unwrap();
        t.set_paused(true, t0 + Duration::from_secs(5));
        assert_eq!(t.poll_timeout(t0 + Duration::from_secs(5)), None);
        // An hour paused: nothing fails.
        let hour = t0 + Duration::from_secs(3600);
        t.handle_timeout(hour);
        assert!(std::iter::from_fn(|| t.poll_event()).all(|e| !matches!(e, Event::Failed(_))));
        // Resumed: the stall timeout counts from now.
        t.set_paused(false, hour);
        assert_eq!(t.poll_timeout(hour), Some(hour + Duration::from_secs(60)));
        t.handle_chunk(0, &asked[0].id, hour + Duration::from_secs(1))
            .unwrap();
        t.handle_timeout(hour + Duration::from_secs(59));
        assert!(std::iter::from_fn(|| t.poll_event()).all(|e| !matches!(e, Event::Failed(_))));
        t.handle_timeout(hour + Duration::from_secs(62));
        let events: Vec<Event> = std::iter::from_fn(|| t.poll_event()).collect();
        assert!(
            matches!(events.last(), Some(Event::Failed(_))),
            "a stall after resuming still fails: {events:?}"
        );
    }

    #[test]
    fn nothing_awaited_is_no_stall() {
        let m = manifest("a", vec![chunk(0, 10)]);
        let mut t = Transfer::new(&[m], opts(), |_| false, |_| None);
        let t0 = Instant::now();
        t.handle_timeout(t0 + Duration::from_secs(3600));
        let events: Vec<Event> = std::iter::from_fn(|| t.poll_event()).collect();
        assert!(
            !events.iter().any(|e| matches!(e, Event::Failed(_))),
            "{events:?}"
        );
        assert!(t.poll_request(0, t0).is_some(), "still running");
    }

    /// Delivers and writes every chunk asked for on stream 0 at `now`.
    fn write_all(t: &mut Transfer, now: Instant) -> Vec<bool> {
        let mut due = Vec::new();
        while let Some(batch) = t.poll_request(0, now) {
            for c in batch {
                t.handle_chunk(0, &c.id, now).unwrap();
                t.handle_written(&c.id, now);
                due.push(t.poll_checkpoint(now));
                if due.last() == Some(&true) {
                    t.handle_checkpointed();
                }
            }
        }
        due
    }

    #[test]
    fn a_checkpoint_is_due_after_checkpoint_bytes_written_without_the_clock_moving() {
        // 40 chunks of 100 bytes, one place each: 4000 bytes.
        let m = manifest("a", (0..40).map(|n| chunk(n, 100)).collect());
        let o = TransferOptions {
            checkpoint_bytes: 1000,
            checkpoint_every: Duration::from_secs(3600),
            max_batch_chunks: 1000,
            min_window: 1 << 20,
            max_stream_window: 1 << 20,
            streams: 1,
            ..TransferOptions::default()
        };
        let mut t = Transfer::new(&[m], o, |_| false, |_| None);
        let due = write_all(&mut t, Instant::now());
        let at: Vec<usize> = (0..due.len()).filter(|&i| due[i]).collect();
        assert_eq!(at, vec![9, 19, 29, 39], "every 1000 bytes, by bytes");
    }

    #[test]
    fn a_chunk_at_several_places_counts_each_write_and_copies_count_too() {
        let c = chunk(1, 300);
        let m = manifest("a", vec![c, c, c, chunk(2, 300)]);
        let o = TransferOptions {
            checkpoint_bytes: 1000,
            checkpoint_every: Duration::from_secs(3600),
            ..opts()
        };
        let held = |id: &ChunkId| {
            (*id == chunk(2, 300).id).then_some(Origin {
                file: OriginFile::Other(0),
                offset: 0,
            })
        };
        let mut t = Transfer::new(&[m], o, |_| false, held);
        let now = Instant::now();
        let op = t.poll_copy().unwrap();
        t.handle_copied(op.id, true, now);
        assert_eq!(t.unsynced_bytes(), 300);
        assert!(!t.poll_checkpoint(now));
        let asked = t.poll_request(0, now).unwrap();
        t.handle_chunk(0, &asked[0].id, now).unwrap();
        t.handle_written(&asked[0].id, now);
        assert_eq!(t.unsynced_bytes(), 1200, "three places of 300, one copy");
        assert!(t.poll_checkpoint(now));
        assert_eq!(t.unsynced_bytes(), 0);
    }

    #[test]
    fn a_checkpoint_is_due_after_its_interval_when_little_was_written() {
        let m = manifest("a", (0..4).map(|n| chunk(n, 10)).collect());
        let o = TransferOptions {
            checkpoint_every: Duration::from_secs(5),
            ..opts()
        };
        let mut t = Transfer::new(&[m], o, |_| false, |_| None);
        let t0 = Instant::now();
        assert!(!t.poll_checkpoint(t0), "nothing written");
        let asked = t.poll_request(0, t0).unwrap();
        t.handle_chunk(0, &asked[0].id, t0).unwrap();
        t.handle_written(&asked[0].id, t0);
        assert!(!t.poll_checkpoint(t0 + Duration::from_secs(4)));
        assert!(t.poll_timeout(t0).unwrap() <= t0 + Duration::from_secs(5));
        assert!(t.poll_checkpoint(t0 + Duration::from_secs(5)));
        // One at a time: none is due while it runs.
        t.handle_chunk(0, &asked[1].id, t0).unwrap();
        t.handle_written(&asked[1].id, t0);
        assert!(!t.poll_checkpoint(t0 + Duration::from_secs(20)));
        t.handle_checkpointed();
        assert!(t.poll_checkpoint(t0 + Duration::from_secs(20)));
    }

    #[test]
    fn the_window_follows_rate_and_rtt_within_bounds() {
        let m = manifest("a", (0..1000).map(|n| chunk(n, 100)).collect());
        let o = TransferOptions {
            streams: 1,
            min_window: 300,
            max_stream_window: 5000,
            max_batch_chunks: 1000,
            ..TransferOptions::default()
        };
        let mut t = Transfer::new(&[m], o, |_| false, |_| None);
        let t0 = Instant::now();
        assert_eq!(t.window(), 300, "no rate measured yet");
        let first = t.poll_request(0, t0).unwrap();
        assert_eq!(first.len(), 3, "the window holds three chunks");
        assert!(t.poll_request(0, t0).is_none(), "full");
        // 1000 bytes per 10 ms = 100 kB/s; with a 20 ms RTT the window is
        // 2 × 100 kB/s × 20 ms = 4000 bytes.
        t.set_rtt(Duration::from_millis(20));
        let mut now = t0;
        for c in first {
            now += Duration::from_millis(1);
            t.handle_chunk(0, &c.id, now).unwrap();
            t.handle_written(&c.id, now);
        }
        for _ in 0..30 {
            let b = t.poll_request(0, now).unwrap_or_default();
            for c in b {
                now += Duration::from_millis(1);
                t.handle_chunk(0, &c.id, now).unwrap();
                t.handle_written(&c.id, now);
            }
        }
        let w = t.window();
        assert!((3000..=5000).contains(&w), "window {w}");
        t.set_rtt(Duration::from_secs(10));
        assert_eq!(t.window(), 5000, "capped at the stream window");
    }

    #[test]
    fn a_rate_cap_holds_requests_back_until_due() {
        let m = manifest("a", (0..100).map(|n| chunk(n, 100)).collect());
        let o = TransferOptions {
            streams: 1,
            min_window: 100_000,
            max_stream_window: 100_000,
            max_batch_chunks: 1000,
            max_rate: Some(10_000),
            ..TransferOptions::default()
        };
        let mut t = Transfer::new(&[m], o, |_| false, |_| None);
        let t0 = Instant::now();
        // The first tenth of a second's worth, no more.
        let b = t.poll_request(0, t0).unwrap();
        assert_eq!(b.len(), 10);
        assert!(t.poll_request(0, t0).is_none());
        let due = t.poll_timeout(t0).unwrap();
        assert!(due > t0 && due <= t0 + Duration::from_millis(10), "{due:?}");
        let later = t.poll_request(0, t0 + Duration::from_millis(500)).unwrap();
        assert_eq!(later.len(), 50, "half a second at 10 kB/s");
    }

    #[test]
    fn progress_is_reported_at_most_every_interval() {
        let m = manifest("a", (0..10).map(|n| chunk(n, 10)).collect());
        let mut t = Transfer::new(&[m], opts(), |_| false, |_| None);
        let t0 = Instant::now();
        let b = t.poll_request(0, t0).unwrap();
        for (i, c) in b.iter().enumerate() {
            let now = t0 + Duration::from_millis(i as u64);
            t.handle_chunk(0, &c.id, now).unwrap();
            t.handle_written(&c.id, now);
        }
        let reports: Vec<Event> = std::iter::from_fn(|| t.poll_event()).collect();
        assert_eq!(reports.len(), 1, "{reports:?}");
        let due = t.poll_timeout(t0).unwrap();
        assert_eq!(due, t0 + Duration::from_millis(250));
        t.handle_timeout(due);
        assert!(matches!(t.poll_event(), Some(Event::Progress(p)) if p.bytes_done == 30));
    }
}
