//! The sender's plan: what each carousel pass sends.
//!
//! The first pass sends every block's source symbols as they are (no coding
//! cost; a receiver writes them in place) plus a share of repair symbols.
//! Every later pass sends, for each block some receiver still lacks, fresh
//! repair symbols only — ids never sent before — as many as the receiver
//! that lacks most asked for, grown by the loss it reported, so that one
//! pass usually completes every block and no receiver needs a
//! retransmission of its own. A receiver that joined late asks for
//! [`Need::Everything`] and is served by repair symbols like any other:
//! any K (+2) symbols of a block rebuild it.

use crate::layout::Block;

/// One step of a pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Send {
    /// Every source symbol of the block, in order.
    Source {
        /// The block.
        block: u32,
    },
    /// `count` repair symbols of the block, the `from`th repair symbol
    /// onwards (encoding symbol ids K + from …).
    Repair {
        /// The block.
        block: u32,
        /// The first repair symbol's index among the block's repair symbols.
        from: u32,
        /// How many.
        count: u32,
    },
}

/// What one receiver reported it lacks after a pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need<'a> {
    /// It has nothing yet (it joined after the first pass began).
    Everything,
    /// These blocks, with how many more symbols each needs.
    Blocks(&'a [(u32, u32)]),
}

/// The default share of repair symbols the first pass adds to each block.
pub const REPAIR_SHARE: f64 = 0.05;
/// The highest loss a pass plans for: beyond it, more passes do the rest.
const MAX_PLANNED_LOSS: f64 = 0.5;
/// Symbols added to every block of a later pass beyond its need: RaptorQ
/// decodes from K symbols with high probability, from K + 2 almost always.
const OVERHEAD: u32 = 2;

/// The carousel's state: the blocks and the next fresh repair symbol of each.
#[derive(Clone, Debug)]
pub struct Schedule {
    symbols: Vec<u32>,
    next_repair: Vec<u32>,
    repair_share: f64,
    passes: u32,
}

impl Schedule {
    /// The schedule of a session over `blocks`, whose first pass adds
    /// `repair_share` (0 to 1, e.g. [`REPAIR_SHARE`]) repair symbols per
    /// source symbol.
    pub fn new(blocks: &[Block], repair_share: f64) -> Schedule {
        Schedule {
            symbols: blocks.iter().map(Block::symbols).collect(),
            next_repair: vec![0; blocks.len()],
            repair_share: repair_share.clamp(0.0, 1.0),
            passes: 0,
        }
    }

    /// Passes planned so far.
    pub fn passes(&self) -> u32 {
        self.passes
    }

    /// The first pass: each block's source symbols, then its share of
    /// repair symbols.
    pub fn first_pass(&mut self) -> Vec<Send> {
        self.passes += 1;
        let mut out = Vec::with_capacity(self.symbols.len() * 2);
        for b in 0..self.symbols.len() {
            out.push(Send::Source { block: b as u32 });
            let extra = (f64::from(self.symbols[b]) * self.repair_share).ceil() as u32;
            out.extend(self.repair(b, extra));
        }
        out
    }

    /// A later pass for what the receivers still lack, given the worst
    /// loss any of them saw (0 to 1). Blocks no receiver needs are
    /// skipped; an empty plan means nobody lacks anything. Reports naming
    /// blocks outside the session are ignored.
    pub fn next_pass(&mut self, needs: &[Need<'_>], loss: f64) -> Vec<Send> {
        let mut want = vec![0u32; self.symbols.len()];
        for n in needs {
            match n {
                Need::Everything => {
                    for (w, &k) in want.iter_mut().zip(&self.symbols) {
                        *w = (*w).max(k);
                    }
                }
                Need::Blocks(bs) => {
                    for &(b, n) in bs.iter() {
                        if let Some(w) = want.get_mut(b as usize) {
                            // Never more than a whole block's worth.
                            *w = (*w).max(n.min(self.symbols[b as usize]));
                        }
                    }
                }
            }
        }
        self.passes += 1;
        let planned = loss.clamp(0.0, MAX_PLANNED_LOSS);
        let mut out = Vec::new();
        for (b, &w) in want.iter().enumerate() {
            if w == 0 {
                continue;
            }
            let count = (f64::from(w) / (1.0 - planned)).ceil() as u32 + OVERHEAD;
            out.extend(self.repair(b, count));
        }
        out
    }

    fn repair(&mut self, b: usize, count: u32) -> Option<Send> {
        if count == 0 {
            return None;
        }
        let from = self.next_repair[b];
        self.next_repair[b] = from.saturating_add(count);
        Some(Send::Repair {
            block: b as u32,
            from,
            count,
        })
    }
}

/// The rate of the next pass from the loss of the last one: back off to
/// 60% when more than a tenth was lost, grow by a quarter up to `max` when
/// under 2% was, never below `min`.
pub fn next_rate(rate: u64, loss: f64, max: u64, min: u64) -> u64 {
    let r = if loss > 0.10 {
        (rate as f64 * 0.6) as u64
    } else if loss < 0.02 {
        (rate as f64 * 1.25) as u64
    } else {
        rate
    };
    r.clamp(min.min(max), max)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datagram::SYMBOL_SIZE;

    fn blocks(lens: &[u64]) -> Vec<Block> {
        let mut off = 0;
        lens.iter()
            .map(|&len| {
                let b = Block {
                    file: 0,
                    offset: off,
                    len,
                };
                off += len;
                b
            })
            .collect()
    }

    #[test]
    fn first_pass_sends_every_source_block_and_five_percent_repair() {
        let t = u64::from(SYMBOL_SIZE);
        let mut s = Schedule::new(&blocks(&[100 * t, 40 * t + 1]), REPAIR_SHARE);
        assert_eq!(
            s.first_pass(),
            vec![
                Send::Source { block: 0 },
                Send::Repair {
                    block: 0,
                    from: 0,
                    count: 5
                },
                Send::Source { block: 1 },
                // 41 symbols × 5% = 2.05, rounded up.
                Send::Repair {
                    block: 1,
                    from: 0,
                    count: 3
                },
            ]
        );
        assert_eq!(s.passes(), 1);
    }

    #[test]
    fn later_passes_send_fresh_repair_ids_for_the_worst_need() {
        let t = u64::from(SYMBOL_SIZE);
        let mut s = Schedule::new(&blocks(&[100 * t, 100 * t, 100 * t]), REPAIR_SHARE);
        s.first_pass();
        let a = [(0, 10), (2, 3)];
        let b = [(0, 4)];
        let plan = s.next_pass(&[Need::Blocks(&a), Need::Blocks(&b)], 0.0);
        assert_eq!(
            plan,
            vec![
                Send::Repair {
                    block: 0,
                    from: 5,
                    count: 12
                },
                Send::Repair {
                    block: 2,
                    from: 5,
                    count: 5
                },
            ]
        );
        // The next pass starts where this one stopped: no id twice.
        let plan = s.next_pass(&[Need::Blocks(&b)], 0.0);
        assert_eq!(
            plan,
            vec![Send::Repair {
                block: 0,
                from: 17,
                count: 6
            }]
        );
    }

    #[test]
    fn loss_grows_the_plan_and_is_capped_at_half() {
        let t = u64::from(SYMBOL_SIZE);
        let mut s = Schedule::new(&blocks(&[100 * t]), 0.0);
        assert_eq!(s.first_pass(), vec![Send::Source { block: 0 }]);
        let need = [(0, 20)];
        // 20 / (1 - 0.2) = 25, + 2.
        assert_eq!(
            s.next_pass(&[Need::Blocks(&need)], 0.2),
            vec![Send::Repair {
                block: 0,
                from: 0,
                count: 27
            }]
        );
        // 90% loss plans for 50%: 40 + 2.
        assert_eq!(
            s.next_pass(&[Need::Blocks(&need)], 0.9),
            vec![Send::Repair {
                block: 0,
                from: 27,
                count: 42
            }]
        );
    }

    #[test]
    fn a_late_joiner_gets_every_block_and_bad_reports_are_ignored() {
        let t = u64::from(SYMBOL_SIZE);
        let mut s = Schedule::new(&blocks(&[10 * t, 20 * t]), REPAIR_SHARE);
        s.first_pass();
        let bogus = [(7, 1000), (1, u32::MAX)];
        let plan = s.next_pass(&[Need::Everything, Need::Blocks(&bogus)], 0.0);
        assert_eq!(
            plan,
            vec![
                Send::Repair {
                    block: 0,
                    from: 1,
                    count: 12
                },
                Send::Repair {
                    block: 1,
                    from: 1,
                    count: 22
                },
            ]
        );
        assert!(s.next_pass(&[], 0.0).is_empty());
    }

    #[test]
    fn rate_backs_off_on_loss_and_grows_back_to_the_cap() {
        assert_eq!(next_rate(100, 0.2, 100, 10), 60);
        assert_eq!(next_rate(60, 0.05, 100, 10), 60);
        assert_eq!(next_rate(60, 0.0, 100, 10), 75);
        assert_eq!(next_rate(90, 0.0, 100, 10), 100);
        assert_eq!(next_rate(12, 0.5, 100, 10), 10);
    }
}
