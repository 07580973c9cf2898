//! Writing a file from its manifest: the one place that does it.
//!
//! [`OutFile`] is a file of known size, preallocated, whose chunks are
//! written at their offsets in any order ([`OutFile::write_at`]) or copied
//! from another file without passing through user space
//! ([`OutFile::copy_from`]: `copy_file_range`, which shares extents — a
//! reflink — where the filesystem can). A DP writes arriving chunks this way;
//! [`write_file`] writes a whole file in order from any chunk source (the
//! site's library for exports and servicing), checks it against the
//! manifest's BLAKE3 and renames it into place.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use ferry_core::manifest::SegmentRecord;
use ferry_core::{ChunkRef, FileHash, Manifest};

/// A file operation that failed, naming the file.
#[derive(Debug, thiserror::Error)]
#[error("{path}: cannot {op}: {source}")]
pub struct FileError {
    /// The file.
    pub path: PathBuf,
    /// What was being done ("preallocate 1.2 GiB", "write", "sync").
    pub op: String,
    /// The OS error.
    pub source: std::io::Error,
}

impl FileError {
    fn new(path: &Path, op: impl Into<String>, source: std::io::Error) -> Self {
        Self {
            path: path.to_path_buf(),
            op: op.into(),
            source,
        }
    }

    /// Whether the disk (or quota) is full: freeing space and trying again
    /// helps.
    pub fn is_no_space(&self) -> bool {
        is_no_space(&self.source)
    }
}

/// Buffers per `pwritev` call (Linux allows 1024).
const MAX_IOVECS: usize = 512;

/// Whether an OS error means the disk (or quota) is full.
pub fn is_no_space(e: &std::io::Error) -> bool {
    let code = e.raw_os_error();
    code == Some(rustix::io::Errno::NOSPC.raw_os_error())
        || code == Some(rustix::io::Errno::DQUOT.raw_os_error())
}

/// A file being written at chunk offsets.
#[derive(Debug)]
pub struct OutFile {
    file: File,
    path: PathBuf,
    size: u64,
}

impl OutFile {
    /// Opens `path` (creating it) with `size` bytes allocated on disk, so a
    /// full disk shows here and not in the middle of writing. What it held
    /// before is kept: a resumed write continues where it was.
    pub fn open(path: &Path, size: u64) -> Result<Self, FileError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| FileError::new(path, "create", e))?;
        let len = file
            .metadata()
            .map_err(|e| FileError::new(path, "read the size of", e))?
            .len();
        if len > size {
            file.set_len(size)
                .map_err(|e| FileError::new(path, "truncate", e))?;
        }
        if size > 0 {
            match rustix::fs::fallocate(&file, rustix::fs::FallocateFlags::empty(), 0, size) {
                Ok(()) => {}
                // Filesystems without fallocate: a sparse file of the size.
                Err(e) if e == rustix::io::Errno::OPNOTSUPP => file
                    .set_len(size)
                    .map_err(|e| FileError::new(path, "set the size of", e))?,
                Err(e) => {
                    return Err(FileError::new(
                        path,
                        format!("preallocate {}", ferry_core::units::bytes(size)),
                        e.into(),
                    ))
                }
            }
        }
        Ok(Self {
            file,
            path: path.to_path_buf(),
            size,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Its size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The open file (for reads).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Writes `data` at `offset`. Positional: several threads may write
    /// different ranges at once.
    pub fn write_at(&self, data: &[u8], offset: u64) -> Result<(), FileError> {
        self.file
            .write_all_at(data, offset)
            .map_err(|e| FileError::new(&self.path, format!("write at offset {offset}"), e))
    }

    /// Writes `bufs` one after another from `offset` in one system call
    /// each round (`pwritev`): consecutive chunks in one write, whole
    /// pages rather than pieces of them.
    pub fn write_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> Result<(), FileError> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let (mut done, mut first, mut skip) = (0usize, 0usize, 0usize);
        while done < total {
            let slices: Vec<std::io::IoSlice<'_>> = bufs[first..]
                .iter()
                .take(MAX_IOVECS)
                .enumerate()
                .map(|(i, b)| std::io::IoSlice::new(if i == 0 { &b[skip..] } else { b }))
                .collect();
            let at = offset + done as u64;
            let mut n = rustix::io::pwritev(&self.file, &slices, at).map_err(|e| {
                FileError::new(&self.path, format!("write at offset {at}"), e.into())
            })?;
            if n == 0 {
                return Err(FileError::new(
                    &self.path,
                    format!("write at offset {at}"),
                    std::io::ErrorKind::WriteZero.into(),
                ));
            }
            done += n;
            // Step over what was written.
            while n > 0 && first < bufs.len() {
                let left = bufs[first].len() - skip;
                if n >= left {
                    n -= left;
                    first += 1;
                    skip = 0;
                } else {
                    skip += n;
                    n = 0;
                }
            }
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), FileError> {
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| FileError::new(&self.path, format!("read at offset {offset}"), e))
    }

    /// Copies `len` bytes at `src_offset` of `src` to `offset` of this file,
    /// in the kernel (`copy_file_range`; extents are shared where the
    /// filesystem supports it). Falls back to reading and writing where the
    /// kernel cannot copy between the two files.
    pub fn copy_from(
        &self,
        src: &File,
        src_path: &Path,
        src_offset: u64,
        offset: u64,
        len: u64,
    ) -> Result<(), FileError> {
        let (mut from, mut to, mut left) = (src_offset, offset, len);
        while left > 0 {
            let want = usize::try_from(left.min(1 << 30)).unwrap_or(1 << 30);
            match rustix::fs::copy_file_range(src, Some(&mut from), &self.file, Some(&mut to), want)
            {
                Ok(0) => {
                    return Err(FileError::new(
                        src_path,
                        format!("copy {left} bytes from offset {from}"),
                        std::io::ErrorKind::UnexpectedEof.into(),
                    ))
                }
                Ok(n) => left -= n as u64,
                Err(e)
                    if [
                        rustix::io::Errno::XDEV,
                        rustix::io::Errno::INVAL,
                        rustix::io::Errno::NOSYS,
                        rustix::io::Errno::OPNOTSUPP,
                    ]
                    .contains(&e) =>
                {
                    return self.copy_by_reading(src, src_path, from, to, left);
                }
                Err(e) => {
                    return Err(FileError::new(
                        &self.path,
                        format!("copy {left} bytes from {}", src_path.display()),
                        e.into(),
                    ))
                }
            }
        }
        Ok(())
    }

    fn copy_by_reading(
        &self,
        src: &File,
        src_path: &Path,
        mut from: u64,
        mut to: u64,
        mut left: u64,
    ) -> Result<(), FileError> {
        let mut buf = vec![0u8; left.min(4 << 20) as usize];
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            src.read_exact_at(&mut buf[..n], from)
                .map_err(|e| FileError::new(src_path, format!("read at offset {from}"), e))?;
            self.write_at(&buf[..n], to)?;
            (from, to, left) = (from + n as u64, to + n as u64, left - n as u64);
        }
        Ok(())
    }

    /// Flushes the file's data to disk.
    pub fn sync(&self) -> Result<(), FileError> {
        self.file
            .sync_data()
            .map_err(|e| FileError::new(&self.path, "sync", e))
    }
}

/// Syncs a folder, so renames and new entries in it are durable.
pub fn sync_dir(path: &Path) -> Result<(), FileError> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| FileError::new(path, "sync the folder", e))
}

/// Puts a finished file in place: `file` (open at `part`) synced, renamed
/// to `dest`, and `dest`'s folder synced, so the file and its name survive
/// a crash. The one way every finished file lands: [`write_file`], `ferry
/// content export`, `ferry client fetch` and `ferry client multicast`.
pub fn place(file: &File, part: &Path, dest: &Path) -> Result<(), FileError> {
    file.sync_all()
        .map_err(|e| FileError::new(part, "sync", e))?;
    std::fs::rename(part, dest).map_err(|e| FileError::new(dest, "rename into place", e))?;
    match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => sync_dir(p),
        _ => sync_dir(Path::new(".")),
    }
}

/// Why writing a file failed.
#[derive(Debug, thiserror::Error)]
pub enum WriteError<E> {
    /// The chunk source failed (a missing or damaged chunk).
    #[error(transparent)]
    Source(E),
    /// The file system failed.
    #[error(transparent)]
    File(#[from] FileError),
    /// The bytes written are not the file the manifest (or the sender)
    /// describes.
    #[error(
        "{path}: the rebuilt file does not match: {written} bytes with BLAKE3 {got}, \
         expected {size} bytes with {expected}"
    )]
    Mismatch {
        /// The file that was to be written (nothing was put there).
        path: PathBuf,
        /// The bytes written.
        written: u64,
        /// Their BLAKE3.
        got: FileHash,
        /// The size expected.
        size: u64,
        /// The BLAKE3 expected.
        expected: FileHash,
    },
}

/// A chunk's bytes that do not hash to the id its manifest gives.
#[derive(Debug, thiserror::Error)]
#[error("{path}: the chunk at offset {offset} ({len} bytes) does not match the signed manifest: refused")]
pub struct ChunkMismatch {
    /// The file's path in its package.
    pub path: String,
    /// The chunk's offset in the file.
    pub offset: u64,
    /// Its length.
    pub len: u32,
}

/// Whether [`write_file`] makes its file durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// Synced, and its folder too, before it is renamed into place: a file
    /// that must survive a crash.
    Synced,
    /// Not synced: a work file that a crash makes worthless anyway (the
    /// page cache writes it back, or it is deleted first).
    Scratch,
}

/// The suffix of a file while it is written: `DEST.ferry-part`, beside
/// `DEST` so the rename into place is atomic and a resumed run finds it.
pub const PART_SUFFIX: &str = ".ferry-part";

/// The part file of `dest`.
pub fn part_path(dest: &Path) -> PathBuf {
    let mut part = dest.as_os_str().to_owned();
    part.push(PART_SUFFIX);
    PathBuf::from(part)
}

/// Creates the folder `dest` goes in, if it has one.
fn create_parent(dest: &Path) -> Result<(), FileError> {
    match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => {
            std::fs::create_dir_all(p).map_err(|e| FileError::new(p, "create the folder", e))
        }
        _ => Ok(()),
    }
}

/// A file that arrives in order (a stream, or chunks read one after
/// another), hashed as it is written into its part file and checked
/// against the whole-file BLAKE3 before it takes its name. Dropped before
/// [`Streamed::finish`], or failing there, it leaves nothing behind.
#[derive(Debug)]
pub struct Streamed {
    out: OutFile,
    dest: PathBuf,
    hasher: blake3::Hasher,
    written: u64,
}

impl Streamed {
    /// Starts `dest` (its folder created, `size` bytes preallocated); a part
    /// file an earlier run left is started over.
    pub fn create(dest: &Path, size: u64) -> Result<Self, FileError> {
        create_parent(dest)?;
        let part = part_path(dest);
        match std::fs::remove_file(&part) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(FileError::new(&part, "remove the old", e))
            }
            _ => {}
        }
        Ok(Self {
            out: OutFile::open(&part, size)?,
            dest: dest.to_path_buf(),
            hasher: blake3::Hasher::new(),
            written: 0,
        })
    }

    /// Appends `data`.
    pub fn write(&mut self, data: &[u8]) -> Result<(), FileError> {
        self.hasher.update(data);
        self.out.write_at(data, self.written)?;
        self.written += data.len() as u64;
        Ok(())
    }

    /// The bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Checks what was written is `size` bytes hashing to `expected`, then
    /// puts it in place ([`place`] when [`Durability::Synced`], a bare
    /// rename for a scratch file).
    pub fn finish<E>(
        self,
        size: u64,
        expected: FileHash,
        durability: Durability,
    ) -> Result<(), WriteError<E>> {
        let got = FileHash::from(self.hasher.finalize());
        let part = self.out.path();
        if got != expected || self.written != size {
            return Err(WriteError::Mismatch {
                path: self.dest.clone(),
                written: self.written,
                got,
                size,
                expected,
            });
        }
        match durability {
            Durability::Synced => place(self.out.file(), part, &self.dest)?,
            Durability::Scratch => std::fs::rename(part, &self.dest)
                .map_err(|e| FileError::new(&self.dest, "rename into place", e))?,
        }
        Ok(())
    }
}

impl Drop for Streamed {
    fn drop(&mut self) {
        // Gone already when it was put in place.
        let _ = std::fs::remove_file(self.out.path());
    }
}

/// A file written at its chunks' offsets, in any order and over several
/// runs, into its part file: a run that stops keeps every chunk written,
/// and the next one writes only the rest. Each chunk is checked against
/// its id as it is written, so the finished file needs no second read.
#[derive(Debug)]
pub struct PartFile {
    out: OutFile,
    dest: PathBuf,
    /// The part file's length before this run: bytes past it were never
    /// written.
    had: u64,
}

impl PartFile {
    /// Opens `dest`'s part file at `size` bytes (its folder created),
    /// keeping what an earlier run wrote.
    pub fn open(dest: &Path, size: u64) -> Result<Self, FileError> {
        create_parent(dest)?;
        let part = part_path(dest);
        let had = std::fs::metadata(&part).map_or(0, |m| m.len());
        Ok(Self {
            out: OutFile::open(&part, size)?,
            dest: dest.to_path_buf(),
            had: had.min(size),
        })
    }

    /// The part file.
    pub fn out(&self) -> &OutFile {
        &self.out
    }

    /// Whether the `len` bytes at `offset`, as an earlier run left them,
    /// pass `verify` (read into `buf`).
    pub fn holds(
        &self,
        offset: u64,
        len: usize,
        buf: &mut Vec<u8>,
        verify: impl FnOnce(&[u8]) -> bool,
    ) -> bool {
        if offset + len as u64 > self.had {
            return false;
        }
        buf.resize(len, 0);
        self.out.file.read_exact_at(buf, offset).is_ok() && verify(buf)
    }

    /// Per chunk of `m`, whether the part file holds it already.
    pub fn held_chunks(&self, m: &Manifest) -> Vec<bool> {
        let mut buf = Vec::new();
        m.offsets()
            .map(|(off, c)| {
                self.holds(off, c.len as usize, &mut buf, |b| {
                    ferry_core::ChunkId::of(b) == c.id
                })
            })
            .collect()
    }

    /// Writes `data`, the chunks `chunks` (each at its offset in the file)
    /// laid end to end from the first one's offset, once every chunk
    /// hashes to its id; `path` names the file in the error.
    pub fn write_checked(
        &self,
        path: &str,
        data: &[u8],
        chunks: &[(u64, ChunkRef)],
    ) -> Result<(), WriteError<ChunkMismatch>> {
        let Some(&(first, _)) = chunks.first() else {
            return Ok(());
        };
        let mut at = 0usize;
        for (off, c) in chunks {
            let bytes = data.get(at..at + c.len as usize);
            if bytes.is_none_or(|b| ferry_core::ChunkId::of(b) != c.id) {
                return Err(WriteError::Source(ChunkMismatch {
                    path: path.to_string(),
                    offset: *off,
                    len: c.len,
                }));
            }
            at += c.len as usize;
        }
        Ok(self.out.write_at(data, first)?)
    }

    /// Puts the finished file in place with [`place`]. The caller has
    /// written (or found) every chunk.
    pub fn place(&self) -> Result<(), FileError> {
        place(self.out.file(), self.out.path(), &self.dest)
    }
}

/// Whether `dest` is the file `m` describes already (its size, then its
/// BLAKE3): a run that was interrupted after this file.
pub fn is_complete(dest: &Path, m: &Manifest) -> bool {
    let same = || -> std::io::Result<bool> {
        let f = File::open(dest)?;
        if f.metadata()?.len() != m.size {
            return Ok(false);
        }
        let mut h = blake3::Hasher::new();
        h.update_reader(f)?;
        Ok(FileHash::from(h.finalize()) == m.hash)
    };
    same().unwrap_or(false)
}

/// Chunks are gathered into blocks of this many bytes, each hashed and
/// written while it is still in the CPU's cache. (Handing blocks to a
/// second thread was measured slower on 2 cores: 4.4 s against 2.9 s for a
/// 1.39 GiB WIM, the writes copying from the other core's cache.)
const WRITE_BLOCK_BYTES: usize = 256 << 10;

/// Writes the file `m` describes to `dest`; `chunk` appends each chunk's
/// bytes, in order, to the buffer it is given. A [`Streamed`] file:
/// checked against the whole-file BLAKE3 (and synced, if asked), then
/// renamed over `dest`. On any error nothing is left at `dest` and the
/// part file is removed.
pub fn write_file<E>(
    dest: &Path,
    m: &Manifest,
    durability: Durability,
    mut chunk: impl FnMut(&ChunkRef, &mut Vec<u8>) -> Result<(), E>,
) -> Result<(), WriteError<E>> {
    let mut out = Streamed::create(dest, m.size)?;
    let mut block = Vec::with_capacity(WRITE_BLOCK_BYTES);
    for c in &m.chunks {
        chunk(c, &mut block).map_err(WriteError::Source)?;
        if block.len() >= WRITE_BLOCK_BYTES {
            out.write(&block)?;
            block.clear();
        }
    }
    out.write(&block)?;
    out.finish(m.size, m.hash, durability)
}

/// Writes, of the file `m` describes, only the segments `wanted` picks, at
/// their offsets, into `dest` of the file's full size: the rest stays a
/// hole (reads as zeros, costs no disk). `chunk` appends each chunk's bytes
/// to the buffer it is given. For a work copy a tool reads only parts of:
/// not synced, and not checked against the whole-file hash (the caller
/// checks the chunks it gives).
pub fn write_sparse<E>(
    dest: &Path,
    m: &Manifest,
    wanted: impl Fn(&SegmentRecord) -> bool,
    mut chunk: impl FnMut(&ChunkRef, &mut Vec<u8>) -> Result<(), E>,
) -> Result<(), WriteError<E>> {
    let result = (|| {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(dest)
            .map_err(|e| FileError::new(dest, "create", e))?;
        file.set_len(m.size)
            .map_err(|e| FileError::new(dest, "set the size of", e))?;
        let mut buf = Vec::new();
        for seg in m.segments.iter().filter(|s| wanted(s)) {
            buf.clear();
            for c in m.segment_chunks(seg) {
                chunk(c, &mut buf).map_err(WriteError::Source)?;
            }
            file.write_all_at(&buf, seg.offset)
                .map_err(|e| FileError::new(dest, format!("write at offset {}", seg.offset), e))?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(dest);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(parts: &[&[u8]]) -> Manifest {
        Manifest::of_parts("f", parts.iter().copied())
    }

    #[test]
    fn a_placed_file_lands_under_its_name_in_a_nested_folder() {
        let dir = tempfile::tempdir().unwrap();
        let nested = dir.path().join("a/b");
        std::fs::create_dir_all(&nested).unwrap();
        let part = part_path(&nested.join("f"));
        std::fs::write(&part, b"bytes").unwrap();
        let f = File::open(&part).unwrap();
        place(&f, &part, &nested.join("f")).unwrap();
        assert_eq!(std::fs::read(nested.join("f")).unwrap(), b"bytes");
        assert!(!part.exists());
        let e = place(&f, &part, &nested.join("g")).unwrap_err();
        assert!(
            e.to_string().contains("f.ferry-part") || e.to_string().contains("g"),
            "{e}"
        );
    }

    #[test]
    fn chunks_land_at_their_offsets_in_any_order_and_copies_move_ranges() {
        let dir = tempfile::tempdir().unwrap();
        let a = OutFile::open(&dir.path().join("a"), 10).unwrap();
        assert_eq!(std::fs::metadata(a.path()).unwrap().len(), 10);
        a.write_at(b"6789", 6).unwrap();
        a.write_at(b"012345", 0).unwrap();
        assert_eq!(std::fs::read(a.path()).unwrap(), b"0123456789");
        let many: Vec<Vec<u8>> = (0..1500u32)
            .map(|n| vec![(n % 251) as u8; 1 + n as usize % 7])
            .collect();
        let total: usize = many.iter().map(Vec::len).sum();
        let v = OutFile::open(&dir.path().join("v"), total as u64 + 3).unwrap();
        let refs: Vec<&[u8]> = many.iter().map(Vec::as_slice).collect();
        v.write_vectored_at(&refs, 3).unwrap();
        assert_eq!(
            std::fs::read(v.path()).unwrap()[3..],
            many.concat()[..],
            "more buffers than one call takes"
        );
        let b = OutFile::open(&dir.path().join("b"), 6).unwrap();
        b.copy_from(a.file(), a.path(), 4, 1, 5).unwrap();
        assert_eq!(std::fs::read(b.path()).unwrap(), b"\x0045678");
        // Past the end of the source: an error naming the source.
        let e = b.copy_from(a.file(), a.path(), 8, 0, 5).unwrap_err();
        assert!(
            e.to_string().contains(&a.path().display().to_string()),
            "{e}"
        );
        // Reopening keeps what was written (a resumed transfer).
        drop(a);
        let again = OutFile::open(&dir.path().join("a"), 10).unwrap();
        let mut buf = [0u8; 10];
        again.read_at(&mut buf, 0).unwrap();
        assert_eq!(&buf, b"0123456789");
    }

    #[test]
    fn write_file_checks_the_hash_and_leaves_nothing_behind_on_error() {
        let dir = tempfile::tempdir().unwrap();
        let parts: [&[u8]; 3] = [b"hello ", b"big ", b"world"];
        let m = manifest(&parts);
        let dest = dir.path().join("out.bin");
        for durability in [Durability::Synced, Durability::Scratch] {
            let mut n = 0;
            write_file::<()>(&dest, &m, durability, |_, buf| {
                n += 1;
                buf.extend_from_slice(parts[n - 1]);
                Ok(())
            })
            .unwrap();
            assert_eq!(std::fs::read(&dest).unwrap(), b"hello big world");
        }
        // More than one block's worth: blocks land at their offsets.
        let big: Vec<Vec<u8>> = (0..40u8).map(|i| vec![i; 300_000]).collect();
        let mb = Manifest::of_parts("big", big.iter().map(Vec::as_slice));
        let big_dest = dir.path().join("big.bin");
        let mut n = 0;
        write_file::<()>(&big_dest, &mb, Durability::Scratch, |_, buf| {
            buf.extend_from_slice(&big[n]);
            n += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(std::fs::read(&big_dest).unwrap(), big.concat());
        std::fs::remove_file(&big_dest).unwrap();

        let wrong = dir.path().join("wrong.bin");
        let e = write_file::<()>(&wrong, &m, Durability::Synced, |_, buf| {
            buf.extend_from_slice(b"xxxx");
            Ok(())
        })
        .unwrap_err();
        assert!(matches!(e, WriteError::Mismatch { .. }), "{e:?}");
        let e = write_file(&wrong, &m, Durability::Synced, |_, _| Err("chunk gone")).unwrap_err();
        assert!(matches!(e, WriteError::Source("chunk gone")));
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, vec!["out.bin"], "no partial files");
    }

    #[test]
    fn a_streamed_file_lands_only_when_size_and_hash_match() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("a/b/out.wim");
        let whole = b"hello big world";
        let hash = FileHash::of(whole);
        let mut s = Streamed::create(&dest, whole.len() as u64).unwrap();
        s.write(b"hello ").unwrap();
        s.write(b"big world").unwrap();
        assert_eq!(s.written(), 15);
        s.finish::<()>(15, hash, Durability::Synced).unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), whole);
        assert!(!part_path(&dest).exists());

        // Short, or other bytes: nothing lands, the part file is gone and
        // the file already there is untouched.
        let mut s = Streamed::create(&dest, 15).unwrap();
        s.write(b"hello ").unwrap();
        let e = s
            .finish::<std::convert::Infallible>(15, hash, Durability::Synced)
            .unwrap_err();
        assert!(
            matches!(
                e,
                WriteError::Mismatch {
                    written: 6,
                    size: 15,
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains("6 bytes"), "{e}");
        let mut s = Streamed::create(&dest, 15).unwrap();
        s.write(b"HELLO BIG WORLD").unwrap();
        assert!(s.finish::<()>(15, hash, Durability::Scratch).is_err());
        // Dropped half way (a broken download).
        let mut s = Streamed::create(&dest, 15).unwrap();
        s.write(b"hel").unwrap();
        drop(s);
        assert_eq!(std::fs::read(&dest).unwrap(), whole);
        let left: Vec<_> = std::fs::read_dir(dest.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, vec!["out.wim"], "no part files");
    }

    #[test]
    fn a_part_file_keeps_checked_chunks_across_runs_and_refuses_wrong_ones() {
        let dir = tempfile::tempdir().unwrap();
        let parts: [&[u8]; 3] = [b"first ", b"second ", b"third"];
        let m = manifest(&parts);
        let at: Vec<(u64, ChunkRef)> = m.offsets().map(|(o, c)| (o, *c)).collect();
        let dest = dir.path().join("nested/f.bin");
        assert!(!is_complete(&dest, &m));
        let p = PartFile::open(&dest, m.size).unwrap();
        assert_eq!(
            p.held_chunks(&m),
            vec![false; 3],
            "a new part file holds nothing"
        );
        p.write_checked("f.bin", parts[2], &at[2..]).unwrap();
        // A wrong chunk is refused, naming the file and offset, and not written.
        let e = p.write_checked("f.bin", b"SECOND ", &at[1..2]).unwrap_err();
        assert!(
            e.to_string().contains("f.bin") && e.to_string().contains("offset 6"),
            "{e}"
        );
        // Too few bytes for the chunks named: refused, not a panic.
        assert!(p.write_checked("f.bin", b"sec", &at[1..2]).is_err());
        drop(p);

        // The next run finds the third chunk and writes the rest.
        let p = PartFile::open(&dest, m.size).unwrap();
        assert_eq!(p.held_chunks(&m), vec![false, false, true]);
        p.write_checked("f.bin", b"first second ", &at[..2])
            .unwrap();
        assert_eq!(p.held_chunks(&m), vec![true; 3]);
        p.place().unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"first second third");
        assert!(!part_path(&dest).exists());
        assert!(is_complete(&dest, &m));
        std::fs::write(&dest, b"first second thirD").unwrap();
        assert!(!is_complete(&dest, &m), "same size, other bytes");
    }

    #[test]
    fn a_sparse_copy_holds_the_wanted_segments_and_zeros_elsewhere() {
        use ferry_core::SegmentKind;
        let dir = tempfile::tempdir().unwrap();
        let parts: [&[u8]; 3] = [b"head", b"big middle", b"tail"];
        let mut m = manifest(&parts);
        let kinds = [SegmentKind::Header, SegmentKind::Blob, SegmentKind::Xml];
        let mut at = 0;
        m.segments = parts
            .iter()
            .zip(kinds)
            .enumerate()
            .map(|(i, (p, kind))| {
                let r = SegmentRecord {
                    kind,
                    offset: at,
                    len: p.len() as u64,
                    first_chunk: i as u32,
                    chunk_count: 1,
                    fingerprint: None,
                };
                at += p.len() as u64;
                r
            })
            .collect();
        let dest = dir.path().join("sparse.bin");
        let mut n = 0;
        write_sparse::<()>(
            &dest,
            &m,
            |s| s.kind != SegmentKind::Blob,
            |c, buf| {
                let i = m.chunks.iter().position(|x| x == c).unwrap();
                buf.extend_from_slice(parts[i]);
                n += 1;
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(n, 2, "only the wanted segments' chunks are asked for");
        assert_eq!(
            std::fs::read(&dest).unwrap(),
            b"head\0\0\0\0\0\0\0\0\0\0tail"
        );
        let e = write_sparse(&dest, &m, |_| true, |_, _| Err("gone")).unwrap_err();
        assert!(matches!(e, WriteError::Source("gone")));
        assert!(!dest.exists(), "nothing left on error");
    }

    #[test]
    fn a_full_disk_is_named_as_such() {
        let e = FileError::new(
            Path::new("/x"),
            "preallocate",
            std::io::Error::from_raw_os_error(rustix::io::Errno::NOSPC.raw_os_error()),
        );
        assert!(e.is_no_space());
        let other = FileError::new(Path::new("/x"), "write", std::io::ErrorKind::Other.into());
        assert!(!other.is_no_space());
    }
}
