//! Checking the blobs an append wrote, each against the SHA-1 in the blob
//! table, without reading the rest of the WIM. wimlib's `wimverify` reads
//! and decompresses every blob; after an in-place append only the resources
//! past the old end of the file are new, and those are all this reads.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use sha1::{Digest, Sha1};
use thiserror::Error;

use crate::layout::{BlobEntry, Layout, RESHDR_FLAG_COMPRESSED, RESHDR_FLAG_SOLID};
use crate::wimlib::{Compression, Decompressor};

/// Header flag bits naming the compression format.
const HDR_FLAG_COMPRESS_XPRESS: u32 = 0x0002_0000;
const HDR_FLAG_COMPRESS_LZX: u32 = 0x0004_0000;
const HDR_FLAG_COMPRESS_LZMS: u32 = 0x0008_0000;

/// Uncompressed resources are hashed this many bytes at a time.
const PLAIN_READ_BYTES: usize = 1 << 20;

/// What [`verify_blobs_from`] checked.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Checked {
    /// Blobs (file data and image metadata) checked.
    pub blobs: u64,
    /// Their uncompressed bytes.
    pub bytes: u64,
}

/// A blob that does not check, or a file that cannot be read.
#[derive(Debug, Error)]
pub enum VerifyError {
    /// Reading failed.
    #[error("{path}: reading at offset {offset}: {source}")]
    Read {
        /// The WIM.
        path: String,
        /// Where.
        offset: u64,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A blob's bytes are not what its blob table entry says.
    #[error("{path}: the blob with SHA-1 {sha1} at offset {offset} {reason}")]
    Bad {
        /// The WIM.
        path: String,
        /// Where its resource starts.
        offset: u64,
        /// Its SHA-1 (hex), as the blob table gives it.
        sha1: String,
        /// What is wrong.
        reason: String,
    },
}

/// Below this many bytes to check, one thread does it all.
const PARALLEL_MIN_BYTES: u64 = 64 << 20;
/// At most this many threads check one WIM.
const MAX_THREADS: usize = 4;

/// Checks every blob whose resource starts at or after offset `from`
/// against its SHA-1, decompressing chunk by chunk, on as many threads as
/// the machine has cores (up to [`MAX_THREADS`]; decompression is what
/// costs). `Ok(None)`: one of them lies in a solid resource, which this
/// does not read; verify the whole WIM with wimlib instead. Of several
/// damaged blobs, the one first in the file is named.
pub fn verify_blobs_from(
    path: &Path,
    layout: &Layout,
    from: u64,
) -> Result<Option<Checked>, VerifyError> {
    let total: u64 = layout
        .blobs
        .iter()
        .filter(|b| b.reshdr.offset >= from && b.reshdr.is_present())
        .map(|b| b.reshdr.uncompressed)
        .sum();
    let threads = if total < PARALLEL_MIN_BYTES {
        1
    } else {
        std::thread::available_parallelism()
            .map_or(1, usize::from)
            .clamp(1, MAX_THREADS)
    };
    verify_blobs_on(path, layout, from, threads)
}

/// [`verify_blobs_from`] on `threads` threads (at least one).
pub fn verify_blobs_on(
    path: &Path,
    layout: &Layout,
    from: u64,
    threads: usize,
) -> Result<Option<Checked>, VerifyError> {
    let threads = threads.max(1);
    let shown = path.display().to_string();
    let new: Vec<_> = layout
        .blobs
        .iter()
        .filter(|b| b.reshdr.offset >= from && b.reshdr.is_present())
        .collect();
    if new.iter().any(|b| b.reshdr.flags & RESHDR_FLAG_SOLID != 0) {
        return Ok(None);
    }
    let file = File::open(path).map_err(|source| VerifyError::Read {
        path: shown.clone(),
        offset: 0,
        source,
    })?;
    let chunk_size = layout.header.chunk_size as usize;
    let flags = layout.header.flags;
    let kind = if flags & HDR_FLAG_COMPRESS_LZX != 0 {
        Some(Compression::Lzx)
    } else if flags & HDR_FLAG_COMPRESS_XPRESS != 0 {
        Some(Compression::Xpress)
    } else if flags & HDR_FLAG_COMPRESS_LZMS != 0 {
        Some(Compression::Lzms)
    } else {
        None
    };
    // Largest first onto the least loaded thread: even shares of bytes.
    let mut order = new;
    order.sort_by_key(|b| std::cmp::Reverse(b.reshdr.uncompressed));
    let mut shares: Vec<(u64, Vec<&BlobEntry>)> = vec![(0, Vec::new()); threads];
    for b in order {
        if let Some(s) = shares.iter_mut().min_by_key(|s| s.0) {
            s.0 += b.reshdr.uncompressed;
            s.1.push(b);
        }
    }
    let check = |blobs: &[&BlobEntry]| check_blobs(blobs, &file, &shown, kind, chunk_size);
    let results: Vec<Result<Checked, VerifyError>> = if threads == 1 {
        shares.iter().map(|(_, blobs)| check(blobs)).collect()
    } else {
        std::thread::scope(|scope| {
            let handles: Vec<_> = shares
                .iter()
                .map(|(_, blobs)| scope.spawn(|| check(blobs)))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(VerifyError::Read {
                            path: shown.clone(),
                            offset: 0,
                            source: std::io::Error::other("a verifying thread panicked"),
                        })
                    })
                })
                .collect()
        })
    };
    let mut checked = Checked::default();
    let mut first_bad: Option<VerifyError> = None;
    for r in results {
        match r {
            Ok(c) => {
                checked.blobs += c.blobs;
                checked.bytes += c.bytes;
            }
            Err(e) => {
                let at = |e: &VerifyError| match e {
                    VerifyError::Read { offset, .. } | VerifyError::Bad { offset, .. } => *offset,
                };
                if first_bad.as_ref().is_none_or(|f| at(&e) < at(f)) {
                    first_bad = Some(e);
                }
            }
        }
    }
    match first_bad {
        Some(e) => Err(e),
        None => Ok(Some(checked)),
    }
}

/// Checks `blobs` of the WIM open as `file` (one thread's share).
fn check_blobs(
    blobs: &[&BlobEntry],
    file: &File,
    shown: &str,
    kind: Option<Compression>,
    chunk_size: usize,
) -> Result<Checked, VerifyError> {
    let mut decompressor = None;
    let mut checked = Checked::default();
    let mut packed = Vec::new();
    let mut out = vec![0u8; chunk_size.max(PLAIN_READ_BYTES)];
    for b in blobs {
        let r = &b.reshdr;
        let bad = |reason: String| VerifyError::Bad {
            path: shown.to_string(),
            offset: r.offset,
            sha1: b.sha1.iter().map(|x| format!("{x:02x}")).collect(),
            reason,
        };
        let read = |buf: &mut [u8], at: u64| {
            file.read_exact_at(buf, at)
                .map_err(|source| VerifyError::Read {
                    path: shown.to_string(),
                    offset: at,
                    source,
                })
        };
        let mut h = Sha1::new();
        if r.flags & RESHDR_FLAG_COMPRESSED == 0 {
            if r.size_in_wim != r.uncompressed {
                return Err(bad(format!(
                    "is stored uncompressed in {} bytes but is {} bytes long",
                    r.size_in_wim, r.uncompressed
                )));
            }
            let mut at = 0u64;
            while at < r.size_in_wim {
                let n = ((r.size_in_wim - at) as usize).min(PLAIN_READ_BYTES);
                read(&mut out[..n], r.offset + at)?;
                h.update(&out[..n]);
                at += n as u64;
            }
        } else {
            let Some(kind) = kind else {
                return Err(bad(
                    "is compressed in a WIM that names no compression".into()
                ));
            };
            if chunk_size == 0 {
                return Err(bad("is compressed in a WIM with chunk size 0".into()));
            }
            let d = match &mut decompressor {
                Some(d) => d,
                None => decompressor
                    .insert(Decompressor::new(kind, chunk_size).map_err(|e| bad(e.to_string()))?),
            };
            let chunks = r.uncompressed.div_ceil(chunk_size as u64);
            let entry = if r.uncompressed > u64::from(u32::MAX) {
                8
            } else {
                4
            };
            let table_len = (chunks.saturating_sub(1)) * entry;
            if table_len > r.size_in_wim {
                return Err(bad("has a chunk table larger than itself".into()));
            }
            let mut table = vec![0u8; table_len as usize];
            read(&mut table, r.offset)?;
            let data_len = r.size_in_wim - table_len;
            // Start of chunk i within the data after the table.
            let start = |i: u64| -> u64 {
                if i == 0 {
                    return 0;
                }
                let at = ((i - 1) * entry) as usize;
                let e = &table[at..at + entry as usize];
                if entry == 8 {
                    u64::from_le_bytes(e.try_into().unwrap_or([0xFF; 8]))
                } else {
                    u64::from(u32::from_le_bytes(e.try_into().unwrap_or([0xFF; 4])))
                }
            };
            for i in 0..chunks {
                let (s, e) = (
                    start(i),
                    if i + 1 < chunks {
                        start(i + 1)
                    } else {
                        data_len
                    },
                );
                let usize_ = if i + 1 < chunks {
                    chunk_size
                } else {
                    (r.uncompressed - i * chunk_size as u64) as usize
                };
                if e < s || e > data_len || e - s > usize_ as u64 {
                    return Err(bad(format!(
                        "has a chunk table entry out of order at chunk {i}"
                    )));
                }
                let clen = (e - s) as usize;
                let at = r.offset + table_len + s;
                if clen == usize_ {
                    read(&mut out[..usize_], at)?;
                } else {
                    packed.resize(clen, 0);
                    read(&mut packed, at)?;
                    if !d.decompress(&packed, &mut out[..usize_]) {
                        return Err(bad(format!("does not decompress at chunk {i}")));
                    }
                }
                h.update(&out[..usize_]);
            }
        }
        if h.finalize().as_slice() != b.sha1 {
            return Err(bad("does not match its SHA-1".into()));
        }
        checked.blobs += 1;
        checked.bytes += r.uncompressed;
    }
    Ok(checked)
}
