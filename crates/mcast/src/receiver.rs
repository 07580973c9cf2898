//! The client's side of a session as a state machine: datagrams in; source
//! symbols to write in place, blocks ready to decode, verified blocks,
//! pass summaries and counters out.
//!
//! The driver (`ferry client multicast`) owns the socket and the part
//! files. For each datagram it calls [`Receiver::handle`]; a
//! [`SourceWrite`] it gets back is written at its place in the file at
//! once (so a source symbol is never held in memory), then it drains
//! [`Receiver::poll_event`]. On [`Event::Ready`] it reads the block back
//! as written and calls [`Receiver::complete`], which decodes with the
//! repair symbols held here when source symbols were lost, checks every
//! chunk against the signed manifest, and answers what to write.

use std::collections::{HashSet, VecDeque};

use serde::Serialize;

use crate::datagram::{self, Dropped, Kind, SessionKey, SYMBOL_SIZE};
use crate::fec;
use crate::layout::Layout;
use crate::replay::ReplayWindow;

/// Datagrams and blocks as a receiver counted them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Counters {
    /// Data datagrams taken (a new symbol of an incomplete block).
    pub accepted: u64,
    /// Symbols held already, or of blocks already complete.
    pub duplicate: u64,
    /// Not a datagram of this format.
    pub garbage: u64,
    /// Of another session.
    pub other_session: u64,
    /// Whose seal did not open (or clear in a sealed session).
    pub forged: u64,
    /// Replayed (a packet number seen before, or too old).
    pub replayed: u64,
    /// Naming a block or symbol outside the session's layout.
    pub out_of_range: u64,
    /// Blocks rebuilt with repair symbols.
    pub blocks_repaired: u64,
    /// Blocks whose chunks did not match the manifest (thrown away and
    /// collected again).
    pub blocks_refused: u64,
}

impl Counters {
    fn count(&mut self, d: Dropped) {
        *match d {
            Dropped::Garbage => &mut self.garbage,
            Dropped::OtherSession => &mut self.other_session,
            Dropped::Forged => &mut self.forged,
            Dropped::Replayed => &mut self.replayed,
            Dropped::OutOfRange => &mut self.out_of_range,
            Dropped::Duplicate => &mut self.duplicate,
        } += 1;
    }

    /// Datagrams dropped for any reason but being a duplicate.
    pub fn dropped(&self) -> u64 {
        self.garbage + self.other_session + self.forged + self.replayed + self.out_of_range
    }

    /// Adds `o` to these.
    pub fn add(&mut self, o: &Counters) {
        self.accepted += o.accepted;
        self.duplicate += o.duplicate;
        self.garbage += o.garbage;
        self.other_session += o.other_session;
        self.forged += o.forged;
        self.replayed += o.replayed;
        self.out_of_range += o.out_of_range;
        self.blocks_repaired += o.blocks_repaired;
        self.blocks_refused += o.blocks_refused;
    }
}

/// A source symbol to write: `data` at `offset` of file `file` (the
/// symbol's zero padding past the block's end is cut off).
#[derive(Debug, PartialEq, Eq)]
pub struct SourceWrite<'a> {
    /// The block it belongs to.
    pub block: u32,
    /// The file, by index in the package.
    pub file: u32,
    /// Where in the file.
    pub offset: u64,
    /// The bytes.
    pub data: &'a [u8],
}

/// What a pass brought: from the packet numbers of its data datagrams.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PassSummary {
    /// The pass.
    pub pass: u32,
    /// Data datagrams the pass sent while this receiver listened (from
    /// the first to the last packet number it saw).
    pub expected: u64,
    /// Data datagrams of the pass this receiver took in (before any
    /// check of their contents).
    pub received: u64,
}

impl PassSummary {
    /// The share of the pass's datagrams lost on the way, 0 to 1.
    pub fn loss(&self) -> f64 {
        if self.expected == 0 {
            0.0
        } else {
            1.0 - (self.received as f64 / self.expected as f64).min(1.0)
        }
    }
}

/// What the driver is told.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The block has enough symbols to try: read it as written and call
    /// [`Receiver::complete`].
    Ready(u32),
    /// A pass ended (its end datagram, or the first datagram of a later
    /// pass, whichever came first): time to report what is missing.
    PassEnded(PassSummary),
    /// The sender ended the session.
    SessionEnded,
}

/// What [`Receiver::complete`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Completion {
    /// Every chunk of the block matches the manifest. When it was rebuilt
    /// from repair symbols, its bytes are here to be written over what the
    /// file holds.
    Verified {
        /// The decoded block, when it differs from what was written.
        repaired: Option<Vec<u8>>,
    },
    /// Not enough symbols yet (decoding needs one or two more).
    NotYet,
    /// The rebuilt block does not match the manifest (a forged or damaged
    /// symbol): everything held of it was dropped; it is collected again.
    Refused,
}

#[derive(Debug, Default)]
struct Collect {
    done: bool,
    have: Vec<bool>,
    have_count: u32,
    repair: Vec<(u32, Vec<u8>)>,
    repair_ids: HashSet<u32>,
    /// Symbols held when decoding was last tried (0: never).
    tried_at: u32,
}

impl Collect {
    fn open(k: u32) -> Collect {
        Collect {
            have: vec![false; k as usize],
            ..Default::default()
        }
    }

    fn got(&self) -> u32 {
        self.have_count + self.repair.len() as u32
    }
}

/// One client's view of one session.
#[derive(Debug)]
pub struct Receiver {
    session: u64,
    key: Option<SessionKey>,
    window: ReplayWindow,
    layout: Layout,
    blocks: Vec<Collect>,
    remaining: usize,
    bytes_done: u64,
    counters: Counters,
    current: PassSummary,
    first_seq: u64,
    last_seq: u64,
    /// The highest pass whose end was announced.
    ended: u32,
    session_ended: bool,
    events: VecDeque<Event>,
}

impl Receiver {
    /// A receiver of session `session` (sealed under `key` when given)
    /// with this checked layout; blocks for which `held` is true are in
    /// place already (an earlier run verified them).
    pub fn new(
        session: u64,
        key: Option<SessionKey>,
        layout: Layout,
        held: impl Fn(usize) -> bool,
    ) -> Receiver {
        let mut remaining = 0;
        let mut bytes_done = 0;
        let blocks = layout
            .blocks()
            .iter()
            .enumerate()
            .map(|(i, b)| {
                if held(i) {
                    bytes_done += b.len;
                    Collect {
                        done: true,
                        ..Default::default()
                    }
                } else {
                    remaining += 1;
                    Collect::open(b.symbols())
                }
            })
            .collect();
        Receiver {
            session,
            key,
            window: ReplayWindow::default(),
            layout,
            blocks,
            remaining,
            bytes_done,
            counters: Counters::default(),
            current: PassSummary::default(),
            first_seq: 0,
            last_seq: 0,
            ended: 0,
            session_ended: false,
            events: VecDeque::new(),
        }
    }

    /// The layout.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Blocks still lacking.
    pub fn remaining(&self) -> usize {
        self.remaining
    }

    /// Bytes of the blocks in place.
    pub fn bytes_done(&self) -> u64 {
        self.bytes_done
    }

    /// Whether block `b` is in place.
    pub fn is_done(&self, b: usize) -> bool {
        self.blocks.get(b).is_some_and(|c| c.done)
    }

    /// The counters.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// The pass being received and what it brought so far.
    pub fn current_pass(&self) -> PassSummary {
        self.current
    }

    /// Whether the sender said the session is over.
    pub fn session_ended(&self) -> bool {
        self.session_ended
    }

    /// The blocks lacking and how many more symbols each needs (at least
    /// 2: decoding may need K + 2), for the report to the sender.
    pub fn missing(&self) -> Vec<(u32, u32)> {
        self.blocks
            .iter()
            .enumerate()
            .filter(|(_, c)| !c.done)
            .map(|(b, c)| {
                let k = self.layout.blocks()[b].symbols();
                (b as u32, k.saturating_sub(c.got()).max(2))
            })
            .collect()
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    fn end_pass(&mut self) {
        if self.current.pass > self.ended {
            self.ended = self.current.pass;
            self.events.push_back(Event::PassEnded(self.current));
        }
    }

    /// Takes one datagram (opened in place): the source symbol to write,
    /// if it brought one, or why it was dropped (counted either way).
    pub fn handle<'a>(&mut self, d: &'a mut [u8]) -> Result<Option<SourceWrite<'a>>, Dropped> {
        let r = self.take(d);
        if let Err(e) = &r {
            self.counters.count(*e);
        }
        r
    }

    fn take<'a>(&mut self, d: &'a mut [u8]) -> Result<Option<SourceWrite<'a>>, Dropped> {
        let (h, payload) = datagram::open(d, self.session, self.key.as_ref())?;
        if h.kind == Kind::Data {
            let b = self
                .layout
                .blocks()
                .get(h.block as usize)
                .ok_or(Dropped::OutOfRange)?;
            if h.esi >= b.symbols() + crate::datagram::MAX_ESI / 2 {
                return Err(Dropped::OutOfRange);
            }
        }
        self.window.accept(h.seq, self.key.is_none())?;
        if h.pass > self.current.pass {
            self.end_pass();
            self.current = PassSummary {
                pass: h.pass,
                ..Default::default()
            };
            self.first_seq = 0;
            self.last_seq = 0;
        }
        match h.kind {
            Kind::PassEnd => {
                if h.pass == self.current.pass {
                    self.end_pass();
                }
                Ok(None)
            }
            Kind::SessionEnd => {
                if !self.session_ended {
                    self.session_ended = true;
                    self.end_pass();
                    self.events.push_back(Event::SessionEnded);
                }
                Ok(None)
            }
            Kind::Data => {
                if h.pass == self.current.pass {
                    if self.first_seq == 0 {
                        self.first_seq = h.seq;
                    }
                    self.last_seq = self.last_seq.max(h.seq);
                    self.current.received += 1;
                    self.current.expected = self.last_seq - self.first_seq + 1;
                }
                self.symbol(h.block, h.esi, payload)
            }
        }
    }

    fn symbol<'a>(
        &mut self,
        block: u32,
        esi: u32,
        sym: &'a [u8],
    ) -> Result<Option<SourceWrite<'a>>, Dropped> {
        let bi = block as usize;
        let blk = self.layout.blocks()[bi];
        let k = blk.symbols();
        let c = &mut self.blocks[bi];
        if c.done {
            return Err(Dropped::Duplicate);
        }
        let write = if esi < k {
            if c.have[esi as usize] {
                return Err(Dropped::Duplicate);
            }
            c.have[esi as usize] = true;
            c.have_count += 1;
            let t = u64::from(SYMBOL_SIZE);
            let start = u64::from(esi) * t;
            let len = (blk.len - start).min(t) as usize;
            Some(SourceWrite {
                block,
                file: blk.file,
                offset: blk.offset + start,
                data: &sym[..len],
            })
        } else {
            if !c.repair_ids.insert(esi) {
                return Err(Dropped::Duplicate);
            }
            c.repair.push((esi, sym.to_vec()));
            None
        };
        self.counters.accepted += 1;
        let got = c.got();
        if got >= k && (c.tried_at == 0 || got >= c.tried_at + 2 || c.have_count == k) {
            c.tried_at = got;
            self.events.push_back(Event::Ready(block));
        }
        Ok(write)
    }

    /// Tries block `b`, whose bytes as written so far are `written` (its
    /// length; what was never written may be anything).
    pub fn complete(&mut self, b: u32, written: &[u8]) -> Completion {
        let bi = b as usize;
        let (Some(blk), Some(c)) = (self.layout.blocks().get(bi).copied(), self.blocks.get(bi))
        else {
            return Completion::NotYet;
        };
        if c.done || written.len() as u64 != blk.len {
            return Completion::NotYet;
        }
        let k = blk.symbols();
        let decoded = if c.have_count == k {
            None
        } else {
            let t = usize::from(SYMBOL_SIZE);
            let source: Vec<(u32, Vec<u8>)> = (0..k)
                .filter(|&i| c.have[i as usize])
                .map(|i| (i, fec::source_symbol(written, i)))
                .collect();
            let all = source
                .iter()
                .chain(c.repair.iter())
                .map(|(e, s)| (*e, s.as_slice()))
                .filter(|(_, s)| s.len() == t);
            match fec::decode(blk.len, all) {
                Some(d) => Some(d),
                None => return Completion::NotYet,
            }
        };
        let data = decoded.as_deref().unwrap_or(written);
        if !self.layout.verify(bi, data) {
            self.counters.blocks_refused += 1;
            self.blocks[bi] = Collect::open(k);
            return Completion::Refused;
        }
        self.blocks[bi] = Collect {
            done: true,
            ..Default::default()
        };
        self.remaining -= 1;
        self.bytes_done += blk.len;
        if decoded.is_some() {
            self.counters.blocks_repaired += 1;
        }
        Completion::Verified { repaired: decoded }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datagram::{seal, Header};
    use crate::fec::{source_symbol, BlockEncoder};
    use crate::layout::{self, Block};
    use ferry_core::Manifest;
    use proptest::prelude::*;

    /// A package of two files (one empty) cut into blocks at 20 000 bytes.
    fn package(seed: u8) -> (Vec<Vec<u8>>, Vec<Manifest>, Vec<Block>) {
        let a: Vec<u8> = (0..70_000u32)
            .map(|i| (i as u8) ^ seed ^ (i >> 9) as u8)
            .collect();
        let b: Vec<u8> = (0..9_000u32).map(|i| (i * 3) as u8 ^ seed).collect();
        let m = vec![
            Manifest::of_parts("a", a.chunks(9_000)),
            Manifest::of_parts("empty", std::iter::empty()),
            Manifest::of_parts("b", b.chunks(4_000)),
        ];
        let lens: Vec<Vec<u32>> = m
            .iter()
            .map(|m| m.chunks.iter().map(|c| c.len).collect())
            .collect();
        let blocks = layout::layout(&lens, 20_000);
        (vec![a, Vec::new(), b], m, blocks)
    }

    struct Tx {
        seq: u64,
        key: Option<SessionKey>,
    }

    impl Tx {
        fn data(&mut self, pass: u32, block: u32, esi: u32, sym: &[u8]) -> Vec<u8> {
            self.seq += 1;
            let h = Header {
                sealed: false,
                kind: Kind::Data,
                session: 42,
                seq: self.seq,
                pass,
                block,
                esi,
            };
            seal(h, sym, self.key.as_ref())
        }

        fn control(&mut self, kind: Kind, pass: u32) -> Vec<u8> {
            self.seq += 1;
            let h = Header {
                sealed: false,
                kind,
                session: 42,
                seq: self.seq,
                pass,
                block: 0,
                esi: 0,
            };
            seal(h, &[], self.key.as_ref())
        }
    }

    /// Drives a receiver as the client does: writes source symbols into
    /// `files`, completes ready blocks.
    fn feed(
        rx: &mut Receiver,
        files: &mut [Vec<u8>],
        mut d: Vec<u8>,
    ) -> Result<Vec<Event>, Dropped> {
        if let Some(w) = rx.handle(&mut d)? {
            let f = &mut files[w.file as usize];
            f[w.offset as usize..w.offset as usize + w.data.len()].copy_from_slice(w.data);
        }
        let mut seen = Vec::new();
        while let Some(e) = rx.poll_event() {
            if let Event::Ready(b) = e {
                let blk = rx.layout().blocks()[b as usize];
                let f = &mut files[blk.file as usize];
                let range = blk.offset as usize..(blk.offset + blk.len) as usize;
                if let Completion::Verified { repaired: Some(d) } =
                    rx.complete(b, &f[range.clone()])
                {
                    f[range].copy_from_slice(&d);
                }
            }
            seen.push(e);
        }
        Ok(seen)
    }

    fn empty_like(files: &[Vec<u8>]) -> Vec<Vec<u8>> {
        files.iter().map(|f| vec![0u8; f.len()]).collect()
    }

    fn receiver(m: &[Manifest], blocks: &[Block], key: Option<&[u8]>) -> Receiver {
        let l = Layout::check(blocks, m).unwrap();
        Receiver::new(42, key.map(|k| SessionKey::new(k).unwrap()), l, |_| false)
    }

    #[test]
    fn a_clean_pass_brings_every_block_and_ends_with_a_summary() {
        let (files, m, blocks) = package(1);
        let mut rx = receiver(&m, &blocks, Some(&[5; 32]));
        let mut out = empty_like(&files);
        let mut tx = Tx {
            seq: 0,
            key: SessionKey::new(&[5; 32]),
        };
        let mut events = Vec::new();
        for (bi, b) in blocks.iter().enumerate() {
            let data = &files[b.file as usize][b.offset as usize..(b.offset + b.len) as usize];
            for esi in 0..b.symbols() {
                let d = tx.data(1, bi as u32, esi, &source_symbol(data, esi));
                events.extend(feed(&mut rx, &mut out, d).unwrap());
            }
        }
        assert_eq!(rx.remaining(), 0);
        assert_eq!(out, files);
        assert_eq!(rx.bytes_done(), 79_000);
        assert_eq!(rx.counters().blocks_repaired, 0);
        events.extend(feed(&mut rx, &mut out, tx.control(Kind::PassEnd, 1)).unwrap());
        // The end is sent three times; the pass ends once.
        events.extend(feed(&mut rx, &mut out, tx.control(Kind::PassEnd, 1)).unwrap());
        let ends: Vec<&Event> = events
            .iter()
            .filter(|e| matches!(e, Event::PassEnded(_)))
            .collect();
        let k: u64 = blocks.iter().map(|b| u64::from(b.symbols())).sum();
        assert_eq!(
            ends,
            [&Event::PassEnded(PassSummary {
                pass: 1,
                expected: k,
                received: k
            })]
        );
        // A symbol of a complete block is a duplicate.
        let d = tx.data(2, 0, 0, &[0; 1400]);
        assert_eq!(feed(&mut rx, &mut out, d), Err(Dropped::Duplicate));
    }

    #[test]
    fn bad_datagrams_are_dropped_and_counted() {
        let (_, m, blocks) = package(2);
        let mut rx = receiver(&m, &blocks, None);
        let mut out = vec![Vec::new(); 3];
        let mut tx = Tx { seq: 0, key: None };
        let d = tx.data(1, 99, 0, &[0; 1400]);
        assert_eq!(feed(&mut rx, &mut out, d), Err(Dropped::OutOfRange));
        let d = tx.data(1, 0, crate::datagram::MAX_ESI - 1, &[0; 1400]);
        assert_eq!(feed(&mut rx, &mut out, d), Err(Dropped::OutOfRange));
        assert_eq!(
            feed(&mut rx, &mut out, b"hello".to_vec()),
            Err(Dropped::Garbage)
        );
        let mut other = tx.data(1, 0, 0, &[0; 1400]);
        other[8] ^= 0xff;
        assert_eq!(feed(&mut rx, &mut out, other), Err(Dropped::OtherSession));
        let sealed = Tx {
            seq: 50,
            key: SessionKey::new(&[1; 32]),
        }
        .data(1, 0, 0, &[0; 1400]);
        assert_eq!(feed(&mut rx, &mut out, sealed), Err(Dropped::Forged));
        let mut out = empty_like(&package(2).0);
        let d = tx.data(1, 0, 1, &[7; 1400]);
        feed(&mut rx, &mut out, d.clone()).unwrap();
        assert_eq!(feed(&mut rx, &mut out, d), Err(Dropped::Replayed));
        let c = rx.counters();
        assert_eq!(
            (
                c.out_of_range,
                c.garbage,
                c.other_session,
                c.forged,
                c.replayed,
                c.accepted
            ),
            (2, 1, 1, 1, 1, 1)
        );
        assert_eq!(c.dropped(), 6);
    }

    #[test]
    fn a_forged_symbol_costs_the_block_not_a_wrong_byte() {
        let (files, m, blocks) = package(3);
        let mut rx = receiver(&m, &blocks, None);
        let mut out = empty_like(&files);
        let mut tx = Tx { seq: 0, key: None };
        let b = blocks[0];
        let data = &files[0][..b.len as usize];
        for esi in 0..b.symbols() {
            let mut sym = source_symbol(data, esi);
            if esi == 3 {
                sym[10] ^= 1;
            }
            let _ = feed(&mut rx, &mut out, tx.data(1, 0, esi, &sym));
        }
        assert!(!rx.is_done(0));
        assert_eq!(rx.counters().blocks_refused, 1);
        assert_eq!(
            rx.missing()[0],
            (0, b.symbols()),
            "the block is collected again"
        );
        // Repair symbols of a later pass bring it.
        let enc = BlockEncoder::new(data);
        for (esi, sym) in enc.repair(0, b.symbols() + 2) {
            // Symbols after the block decoded are duplicates, nothing else.
            match feed(&mut rx, &mut out, tx.data(2, 0, esi, &sym)) {
                Ok(_) => {}
                Err(e) => assert!(e == Dropped::Duplicate && rx.is_done(0), "{e}"),
            }
        }
        assert!(rx.is_done(0));
        assert_eq!(&out[0][..b.len as usize], data);
        assert_eq!(rx.counters().blocks_repaired, 1);
    }

    #[test]
    fn held_blocks_are_not_collected_again() {
        let (_, m, blocks) = package(4);
        let l = Layout::check(&blocks, &m).unwrap();
        let rx = Receiver::new(42, None, l, |b| b == 0);
        assert!(rx.is_done(0));
        assert_eq!(rx.remaining(), blocks.len() - 1);
        assert_eq!(rx.bytes_done(), blocks[0].len);
        assert!(rx.missing().iter().all(|(b, _)| *b != 0));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(16))]
        /// Random loss in the first pass; the second pass carries, per
        /// block, as many repair symbols as the report asked for plus a
        /// margin: every file comes out byte for byte, and the late pass's
        /// first datagram ends the first pass if its end was lost.
        #[test]
        fn loss_is_made_up_by_the_next_pass(loss in 0u32..40, seed in any::<u64>()) {
            use rand::{Rng, SeedableRng};
            let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
            let (files, m, blocks) = package(seed as u8);
            let mut rx = receiver(&m, &blocks, None);
            let mut out = empty_like(&files);
            let mut tx = Tx { seq: 0, key: None };
            let mut events = Vec::new();
            for (bi, b) in blocks.iter().enumerate() {
                let data = &files[b.file as usize][b.offset as usize..(b.offset + b.len) as usize];
                for esi in 0..b.symbols() {
                    let d = tx.data(1, bi as u32, esi, &source_symbol(data, esi));
                    if rng.random_range(0..100) >= loss {
                        events.extend(feed(&mut rx, &mut out, d).unwrap());
                    }
                }
            }
            let missing = rx.missing();
            for (bi, need) in missing {
                let b = blocks[bi as usize];
                let data = &files[b.file as usize][b.offset as usize..(b.offset + b.len) as usize];
                for (esi, sym) in BlockEncoder::new(data).repair(0, need + 2) {
                    match feed(&mut rx, &mut out, tx.data(2, bi, esi, &sym)) {
                        Ok(e) => events.extend(e),
                        // Symbols after the block decoded, nothing else.
                        Err(e) => prop_assert!(e == Dropped::Duplicate && rx.is_done(bi as usize), "{}", e),
                    }
                }
            }
            prop_assert_eq!(rx.remaining(), 0);
            prop_assert_eq!(&out, &files);
            let first = events.iter().find_map(|e| match e {
                Event::PassEnded(s) => Some(*s),
                _ => None,
            });
            if rx.counters().blocks_repaired > 0 {
                prop_assert_eq!(first.map(|s| s.pass), Some(1));
            }
        }
    }
}
