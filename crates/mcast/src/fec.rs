//! RaptorQ (RFC 6330) over one block: one source block, one sub-block,
//! [`SYMBOL_SIZE`]-byte symbols. Systematic: encoding symbol ids below K
//! are the block's own bytes, ids from K on are repair symbols, and any K
//! distinct symbols (rarely K + 1 or K + 2) rebuild the block.

use crate::datagram::{MAX_ESI, SYMBOL_SIZE};
use crate::layout::symbols;

fn config(len: u64) -> raptorq::ObjectTransmissionInformation {
    raptorq::ObjectTransmissionInformation::new(len, SYMBOL_SIZE, 1, 1, 8)
}

/// Symbol `esi` (< K) of a block: its bytes, the last zero-padded.
pub fn source_symbol(data: &[u8], esi: u32) -> Vec<u8> {
    let t = usize::from(SYMBOL_SIZE);
    let start = (esi as usize).saturating_mul(t).min(data.len());
    let mut s = data[start..(start + t).min(data.len())].to_vec();
    s.resize(t, 0);
    s
}

/// Encodes repair symbols of one block.
pub struct BlockEncoder {
    inner: raptorq::SourceBlockEncoder,
    k: u32,
}

impl BlockEncoder {
    /// An encoder of `data`, one block's bytes (not empty, at most
    /// [`crate::layout::MAX_BLOCK_SYMBOLS`] symbols).
    pub fn new(data: &[u8]) -> BlockEncoder {
        let cfg = config(data.len() as u64);
        let t = usize::from(SYMBOL_SIZE);
        let mut padded = data.to_vec();
        padded.resize(data.len().div_ceil(t) * t, 0);
        BlockEncoder {
            inner: raptorq::SourceBlockEncoder::new(0, &cfg, &padded),
            k: symbols(data.len() as u64),
        }
    }

    /// `n` repair symbols, the `from`th repair symbol onwards: (encoding
    /// symbol id, symbol). Ids stop below the 24-bit limit.
    pub fn repair(&self, from: u32, n: u32) -> Vec<(u32, Vec<u8>)> {
        let room = MAX_ESI.saturating_sub(self.k).saturating_sub(from);
        self.inner
            .repair_packets(from, n.min(room))
            .into_iter()
            .map(|p| {
                let (id, data) = p.split();
                (id.encoding_symbol_id(), data)
            })
            .collect()
    }
}

/// Rebuilds a block of `len` bytes from `symbols` (encoding symbol id,
/// [`SYMBOL_SIZE`] bytes each; others are skipped): its bytes, or `None`
/// while they are not enough.
pub fn decode<'a>(len: u64, symbols: impl IntoIterator<Item = (u32, &'a [u8])>) -> Option<Vec<u8>> {
    if len == 0 {
        return Some(Vec::new());
    }
    let cfg = config(len);
    let mut dec = raptorq::SourceBlockDecoder::new(0, &cfg, len);
    let packets = symbols
        .into_iter()
        .filter(|(esi, d)| *esi < MAX_ESI && d.len() == usize::from(SYMBOL_SIZE))
        .map(|(esi, d)| raptorq::EncodingPacket::new(raptorq::PayloadId::new(0, esi), d.to_vec()));
    let mut out = dec.decode(packets)?;
    out.truncate(len as usize);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::{rngs::SmallRng, seq::SliceRandom, SeedableRng};

    fn view(g: &[(u32, Vec<u8>)]) -> Vec<(u32, &[u8])> {
        g.iter().map(|(e, s)| (*e, s.as_slice())).collect()
    }

    fn data(n: usize, seed: u32) -> Vec<u8> {
        (0..n as u32)
            .map(|i| (i.wrapping_mul(7) ^ seed ^ (i / 13)) as u8)
            .collect()
    }

    #[test]
    fn any_k_plus_a_few_symbols_rebuild_a_block() {
        let d = data(200_000, 1);
        let k = symbols(d.len() as u64);
        let enc = BlockEncoder::new(&d);
        // Every third source symbol lost, made up by repair symbols.
        let mut got: Vec<(u32, Vec<u8>)> = (0..k)
            .filter(|i| i % 3 != 0)
            .map(|i| (i, source_symbol(&d, i)))
            .collect();
        let lost = k - got.len() as u32;
        assert_eq!(decode(d.len() as u64, view(&got)), None, "too few");
        got.extend(enc.repair(0, lost + 2));
        assert_eq!(decode(d.len() as u64, view(&got)).as_deref(), Some(&d[..]));
        // Repair symbols alone, from later in the stream (a late joiner).
        let only = enc.repair(1000, k + 2);
        assert!(only.iter().all(|(e, _)| *e >= k + 1000));
        assert_eq!(decode(d.len() as u64, view(&only)).as_deref(), Some(&d[..]));
        // Symbols of the wrong size are skipped, not a panic.
        assert_eq!(decode(d.len() as u64, [(0u32, &[1u8, 2][..])]), None);
        assert_eq!(decode(0, []), Some(Vec::new()));
    }

    #[test]
    fn repair_ids_stop_below_the_24_bit_limit() {
        let d = data(3000, 2);
        let enc = BlockEncoder::new(&d);
        let k = symbols(3000);
        let near = MAX_ESI - k - 2;
        let r = enc.repair(near, 10);
        assert_eq!(r.len(), 2);
        assert!(r.iter().all(|(e, _)| *e < MAX_ESI));
        assert_eq!(source_symbol(&d, 2).len(), SYMBOL_SIZE as usize);
        assert_eq!(source_symbol(&d, 2)[200..], [0u8; 1200][..], "zero-padded");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// Whatever share of a block's symbols is lost, the survivors plus
        /// as many repair symbols as were lost and a margin of 2 give the
        /// block back.
        #[test]
        fn lost_symbols_are_made_up_by_as_many_repair_symbols(
            len in 1usize..120_000,
            loss in 0u32..60,
            seed in any::<u64>(),
        ) {
            let d = data(len, seed as u32);
            let k = symbols(len as u64);
            let enc = BlockEncoder::new(&d);
            let mut rng = SmallRng::seed_from_u64(seed);
            let mut ids: Vec<u32> = (0..k).collect();
            ids.shuffle(&mut rng);
            let keep = ids.len() - (ids.len() * loss as usize / 100);
            let mut got: Vec<(u32, Vec<u8>)> =
                ids[..keep].iter().map(|&i| (i, source_symbol(&d, i))).collect();
            got.extend(enc.repair(seed as u32 % 1000, (k - keep as u32) + 2));
            got.shuffle(&mut rng);
            let out = decode(len as u64, got.iter().map(|(e, s)| (*e, s.as_slice())));
            prop_assert_eq!(out.as_deref(), Some(&d[..]));
        }
    }
}
