//! Sync planning: what a distribution point lacks, in what batches to ask for
//! it, and how long to wait after a failure.
//!
//! Pure functions; the DP agent supplies "do I have this chunk" and does the
//! I/O.

use std::collections::HashSet;
use std::time::Duration;

use crate::{ChunkId, ChunkRef, Manifest};

/// What one package revision costs a DP.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Distinct chunks the DP lacks, in first-use order.
    pub missing: Vec<ChunkRef>,
    /// Their total length.
    pub needed_bytes: u64,
    /// Size of all files: what a full copy would move.
    pub full_bytes: u64,
}

/// Plans a revision: every distinct chunk of `manifests` for which `has`
/// says no. Each chunk is asked about once.
pub fn plan<E>(
    manifests: &[Manifest],
    mut has: impl FnMut(&ChunkId) -> Result<bool, E>,
) -> Result<Plan, E> {
    let mut seen = HashSet::new();
    let mut out = Plan::default();
    for m in manifests {
        out.full_bytes += m.size;
        for c in &m.chunks {
            if seen.insert(c.id) && !has(&c.id)? {
                out.needed_bytes += u64::from(c.len);
                out.missing.push(*c);
            }
        }
    }
    Ok(out)
}

/// Splits chunks into requests of at most `max_chunks` chunks and, unless a
/// single chunk is larger, at most `max_bytes` bytes.
pub fn batches(chunks: &[ChunkRef], max_bytes: u64, max_chunks: usize) -> Vec<Vec<ChunkRef>> {
    let mut out = Vec::new();
    let mut cur: Vec<ChunkRef> = Vec::new();
    let mut bytes = 0u64;
    for c in chunks {
        let len = u64::from(c.len);
        if !cur.is_empty() && (cur.len() >= max_chunks.max(1) || bytes + len > max_bytes) {
            out.push(std::mem::take(&mut cur));
            bytes = 0;
        }
        cur.push(*c);
        bytes += len;
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// First delay after a failure.
pub const BACKOFF_FIRST: Duration = Duration::from_secs(1);
/// Longest delay between attempts.
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Delay before attempt `failures + 1`: doubling from [`BACKOFF_FIRST`],
/// capped at [`BACKOFF_MAX`].
pub fn backoff(failures: u32) -> Duration {
    BACKOFF_FIRST
        .saturating_mul(1u32 << failures.min(16))
        .min(BACKOFF_MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::FileHash;

    fn chunk(n: u8, len: u32) -> ChunkRef {
        ChunkRef {
            id: ChunkId::of(&[n]),
            len,
        }
    }

    fn manifest(chunks: Vec<ChunkRef>) -> Manifest {
        Manifest {
            path: "f".into(),
            size: chunks.iter().map(|c| u64::from(c.len)).sum(),
            hash: FileHash::of(b""),
            chunks,
            segments: vec![],
        }
    }

    #[test]
    fn plan_counts_each_missing_chunk_once() {
        let a = manifest(vec![chunk(1, 10), chunk(2, 20), chunk(1, 10)]);
        let b = manifest(vec![chunk(2, 20), chunk(3, 30)]);
        let have = [chunk(2, 20).id];
        let mut asked = 0;
        let p = plan::<()>(&[a, b], |id| {
            asked += 1;
            Ok(have.contains(id))
        })
        .unwrap();
        assert_eq!(asked, 3, "three distinct chunks");
        assert_eq!(p.missing, vec![chunk(1, 10), chunk(3, 30)]);
        assert_eq!(p.needed_bytes, 40);
        assert_eq!(p.full_bytes, 40 + 50);
    }

    #[test]
    fn batches_respect_both_limits_and_keep_order() {
        let cs: Vec<_> = (0..10).map(|n| chunk(n, 100)).collect();
        let b = batches(&cs, 250, 100);
        assert_eq!(
            b.iter().map(Vec::len).collect::<Vec<_>>(),
            vec![2, 2, 2, 2, 2]
        );
        let b = batches(&cs, 10_000, 3);
        assert_eq!(b.iter().map(Vec::len).collect::<Vec<_>>(), vec![3, 3, 3, 1]);
        assert_eq!(b.concat(), cs);
        let big = [chunk(1, 500)];
        assert_eq!(
            batches(&big, 100, 10).len(),
            1,
            "an oversized chunk goes alone"
        );
    }

    #[test]
    fn backoff_doubles_then_caps() {
        assert_eq!(backoff(0), Duration::from_secs(1));
        assert_eq!(backoff(3), Duration::from_secs(8));
        assert_eq!(backoff(40), BACKOFF_MAX);
    }
}
