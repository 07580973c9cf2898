//! The receiver's anti-replay window over packet numbers.

use crate::Dropped;

/// Packet numbers a receiver remembers behind the highest it accepted.
pub const REPLAY_WINDOW: u64 = 4096;
/// How far ahead of the highest accepted packet number a clear datagram
/// may be (a forged one far ahead would otherwise close the window on the
/// real ones). Sealed datagrams cannot be forged, so they may jump.
pub const MAX_SEQ_JUMP: u64 = 1 << 20;

/// The packet numbers a receiver has accepted: the highest, and a bitmap
/// of the [`REPLAY_WINDOW`] numbers before it (as IPsec's anti-replay
/// window, RFC 4303 §3.4.3).
#[derive(Clone, Debug)]
pub struct ReplayWindow {
    highest: u64,
    bits: Vec<u64>,
}

impl Default for ReplayWindow {
    fn default() -> Self {
        Self {
            highest: 0,
            bits: vec![0; (REPLAY_WINDOW / 64) as usize],
        }
    }
}

impl ReplayWindow {
    fn bit(&mut self, seq: u64) -> (&mut u64, u64) {
        let i = seq % REPLAY_WINDOW;
        (&mut self.bits[(i / 64) as usize], 1 << (i % 64))
    }

    /// The highest packet number accepted (0 before any).
    pub fn highest(&self) -> u64 {
        self.highest
    }

    /// Accepts `seq` once: a number seen before, older than the window or
    /// (`limit_jump`, for clear sessions) too far ahead is refused.
    pub fn accept(&mut self, seq: u64, limit_jump: bool) -> Result<(), Dropped> {
        if seq > self.highest {
            let gap = seq - self.highest;
            if limit_jump && self.highest > 0 && gap > MAX_SEQ_JUMP {
                return Err(Dropped::Replayed);
            }
            if gap >= REPLAY_WINDOW {
                self.bits.iter_mut().for_each(|b| *b = 0);
            } else {
                for s in self.highest + 1..=seq {
                    let (w, m) = self.bit(s);
                    *w &= !m;
                }
            }
            self.highest = seq;
            let (w, m) = self.bit(seq);
            *w |= m;
            return Ok(());
        }
        if self.highest - seq >= REPLAY_WINDOW {
            return Err(Dropped::Replayed);
        }
        let (w, m) = self.bit(seq);
        if *w & m != 0 {
            return Err(Dropped::Replayed);
        }
        *w |= m;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    #[test]
    fn the_window_takes_each_number_once() {
        let mut w = ReplayWindow::default();
        assert_eq!(w.accept(5, true), Ok(()));
        assert_eq!(w.accept(5, true), Err(Dropped::Replayed));
        assert_eq!(w.accept(3, true), Ok(()), "late but new");
        assert_eq!(w.accept(3, true), Err(Dropped::Replayed));
        assert_eq!(w.accept(5 + REPLAY_WINDOW, true), Ok(()));
        assert_eq!(
            w.accept(5, true),
            Err(Dropped::Replayed),
            "older than the window"
        );
        assert_eq!(w.accept(10 + REPLAY_WINDOW, true), Ok(()));
        let far = 10 + REPLAY_WINDOW + MAX_SEQ_JUMP + 1;
        assert_eq!(w.accept(far, true), Err(Dropped::Replayed));
        assert_eq!(w.accept(far, false), Ok(()), "sealed datagrams may jump");
        assert_eq!(w.highest(), far);
    }

    proptest! {
        /// Against a model that remembers every number: the window never
        /// accepts a number twice, and accepts every new number within the
        /// window of the highest.
        #[test]
        fn the_window_agrees_with_a_set(seqs in proptest::collection::vec(1u64..20_000, 1..2000)) {
            let mut w = ReplayWindow::default();
            let mut seen = HashSet::new();
            let mut highest = 0u64;
            for s in seqs {
                let got = w.accept(s, false).is_ok();
                let fresh = !seen.contains(&s);
                if got {
                    prop_assert!(fresh, "{} accepted twice", s);
                    seen.insert(s);
                    highest = highest.max(s);
                } else {
                    prop_assert!(!fresh || highest - s >= REPLAY_WINDOW, "{} refused", s);
                }
            }
        }
    }
}
