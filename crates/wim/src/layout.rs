//! The on-disk layout of a WIM: header, blob table, and the segments they
//! imply.
//!
//! Format (as wimlib and Microsoft's WIM documents describe it, all little
//! endian): a 208-byte header naming the blob table, the XML data, the boot
//! metadata and the integrity table by *resource header* (24 bytes: 7-byte
//! stored size, 1 flag byte, 8-byte offset, 8-byte uncompressed size). The blob
//! table is an array of 50-byte entries (resource header, part number, reference
//! count, SHA-1); it locates every file-data and metadata resource.

use std::io::{self, Read, Seek, SeekFrom};

use ferry_core::segment::{cover, CoverError};
use ferry_core::{Segment, SegmentKind, Split};
use thiserror::Error;

/// Size of the WIM header.
pub const HEADER_BYTES: u64 = 208;
/// Size of one blob table entry.
pub const BLOB_ENTRY_BYTES: u64 = 50;
/// Magic at offset 0 of a WIM.
pub const MAGIC: [u8; 8] = *b"MSWIM\0\0\0";
/// Magic at offset 0 of a pipable WIM (a different layout).
pub const PIPABLE_MAGIC: [u8; 8] = *b"WLPWM\0\0\0";
/// The blob table may not exceed this (about 20 million blobs).
pub const MAX_BLOB_TABLE_BYTES: u64 = 1 << 30;

/// Resource flag: the resource is free space.
pub const RESHDR_FLAG_FREE: u8 = 0x01;
/// Resource flag: an image's metadata resource.
pub const RESHDR_FLAG_METADATA: u8 = 0x02;
/// Resource flag: the resource is compressed in chunks.
pub const RESHDR_FLAG_COMPRESSED: u8 = 0x04;
/// Resource flag: the resource spans WIM parts.
pub const RESHDR_FLAG_SPANNED: u8 = 0x08;
/// Resource flag: the blob lives in a solid resource.
pub const RESHDR_FLAG_SOLID: u8 = 0x10;
/// Uncompressed size that marks the entry describing a solid resource itself.
pub const SOLID_RESOURCE_MAGIC: u64 = 0x1_0000_0000;

/// A resource header: where a resource lies and how big it is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ResHdr {
    /// Bytes the resource occupies in the file.
    pub size_in_wim: u64,
    /// `RESHDR_FLAG_*` bits.
    pub flags: u8,
    /// Offset of the resource in the file.
    pub offset: u64,
    /// Size once decompressed.
    pub uncompressed: u64,
}

impl ResHdr {
    fn parse(b: &[u8; 24]) -> Self {
        let mut size = [0u8; 8];
        size[..7].copy_from_slice(&b[..7]);
        Self {
            size_in_wim: u64::from_le_bytes(size),
            flags: b[7],
            offset: le64(&b[8..16]),
            uncompressed: le64(&b[16..24]),
        }
    }

    /// Whether the header names any bytes at all.
    pub fn is_present(&self) -> bool {
        self.size_in_wim > 0
    }
}

/// The fields of the WIM header Ferry uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// Format version (0x10d00 for ordinary WIMs, 0xe00 for solid ones).
    pub version: u32,
    /// Header flags (compression type and state bits).
    pub flags: u32,
    /// Uncompressed bytes per compressed chunk.
    pub chunk_size: u32,
    /// The WIM's GUID; kept by tools that modify it in place.
    pub guid: [u8; 16],
    /// This part's number (1-based).
    pub part_number: u16,
    /// How many parts the WIM is split into.
    pub total_parts: u16,
    /// Number of images.
    pub image_count: u32,
    /// Where the blob table is.
    pub blob_table: ResHdr,
    /// Where the XML data is.
    pub xml: ResHdr,
    /// The bootable image's metadata resource (also in the blob table).
    pub boot_metadata: ResHdr,
    /// 1-based index of the bootable image, 0 for none.
    pub boot_index: u32,
    /// Where the integrity table is (absent when its size is 0).
    pub integrity: ResHdr,
}

/// One entry of the blob table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlobEntry {
    /// Where the blob's resource is.
    pub reshdr: ResHdr,
    /// Which part holds it.
    pub part_number: u16,
    /// How many references images hold to it.
    pub refcnt: u32,
    /// SHA-1 of the uncompressed blob.
    pub sha1: [u8; 20],
}

impl BlobEntry {
    /// True for an entry that is not a physical resource of its own: a blob
    /// stored inside a solid resource (its offset is within the solid data).
    pub fn is_solid_member(&self) -> bool {
        self.reshdr.flags & RESHDR_FLAG_SOLID != 0
            && self.reshdr.uncompressed != SOLID_RESOURCE_MAGIC
    }
}

/// A WIM whose layout cannot be used.
#[derive(Debug, Error)]
pub enum LayoutError {
    /// Reading the file failed.
    #[error("cannot read: {0}")]
    Io(#[from] io::Error),
    /// The file is shorter than a WIM header.
    #[error("file is {0} bytes, too short to be a WIM (the header alone is 208 bytes)")]
    TooShort(u64),
    /// The magic bytes are wrong.
    #[error("not a WIM file: it does not start with the WIM magic \"MSWIM\"")]
    NotWim,
    /// A pipable WIM: a different layout Ferry does not split.
    #[error("pipable WIMs are not supported; convert it with `wimoptimize --not-pipable`")]
    Pipable,
    /// The header's own size field is wrong.
    #[error("WIM header claims {0} bytes, expected 208")]
    HeaderSize(u32),
    /// One part of a split (spanned) WIM.
    #[error("part {part} of a {total}-part split WIM; join it first with `wimjoin`")]
    Split {
        /// This part's number.
        part: u16,
        /// How many parts there are.
        total: u16,
    },
    /// The blob table cannot be read as entries.
    #[error("blob table at offset {offset} is unusable: {reason}")]
    BlobTable {
        /// Offset of the blob table.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// Extents point past the end of the file or overlap.
    #[error("{0}")]
    Extents(#[from] CoverError),
}

/// A parsed WIM layout: header, blob table and the segments covering the file.
#[derive(Clone, Debug)]
pub struct Layout {
    /// The header.
    pub header: Header,
    /// The blob table entries, in file order of the table.
    pub blobs: Vec<BlobEntry>,
    /// Segments covering `0..file_len` exactly once.
    pub segments: Vec<Segment>,
}

fn le16(b: &[u8]) -> u16 {
    u16::from_le_bytes([b[0], b[1]])
}
fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}
fn le64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}
fn reshdr_at(b: &[u8], at: usize) -> ResHdr {
    let mut a = [0u8; 24];
    a.copy_from_slice(&b[at..at + 24]);
    ResHdr::parse(&a)
}

/// Parses the 208-byte header.
pub fn parse_header(b: &[u8; HEADER_BYTES as usize]) -> Result<Header, LayoutError> {
    if b[..8] == PIPABLE_MAGIC {
        return Err(LayoutError::Pipable);
    }
    if b[..8] != MAGIC {
        return Err(LayoutError::NotWim);
    }
    let cb = le32(&b[8..]);
    if u64::from(cb) != HEADER_BYTES {
        return Err(LayoutError::HeaderSize(cb));
    }
    let mut guid = [0u8; 16];
    guid.copy_from_slice(&b[24..40]);
    Ok(Header {
        version: le32(&b[12..]),
        flags: le32(&b[16..]),
        chunk_size: le32(&b[20..]),
        guid,
        part_number: le16(&b[40..]),
        total_parts: le16(&b[42..]),
        image_count: le32(&b[44..]),
        blob_table: reshdr_at(b, 48),
        xml: reshdr_at(b, 72),
        boot_metadata: reshdr_at(b, 96),
        boot_index: le32(&b[120..]),
        integrity: reshdr_at(b, 124),
    })
}

/// Parses one 50-byte blob table entry.
pub fn parse_blob_entry(b: &[u8]) -> BlobEntry {
    let mut sha1 = [0u8; 20];
    sha1.copy_from_slice(&b[30..50]);
    BlobEntry {
        reshdr: reshdr_at(b, 0),
        part_number: le16(&b[24..]),
        refcnt: le32(&b[26..]),
        sha1,
    }
}

impl Layout {
    /// Reads header and blob table from `r` (a file of `file_len` bytes) and
    /// works out the segments. Every extent is checked against the file's
    /// length and against every other extent before anything is read from it.
    pub fn read<R: Read + Seek>(r: &mut R, file_len: u64) -> Result<Self, LayoutError> {
        if file_len < HEADER_BYTES {
            return Err(LayoutError::TooShort(file_len));
        }
        let mut hb = [0u8; HEADER_BYTES as usize];
        r.seek(SeekFrom::Start(0))?;
        r.read_exact(&mut hb)?;
        let header = parse_header(&hb)?;
        if header.total_parts > 1 {
            return Err(LayoutError::Split {
                part: header.part_number,
                total: header.total_parts,
            });
        }
        let bt = header.blob_table;
        let bad_table = |reason: String| LayoutError::BlobTable {
            offset: bt.offset,
            reason,
        };
        if bt.flags & RESHDR_FLAG_COMPRESSED != 0 {
            return Err(bad_table(
                "it is compressed, which Ferry does not read".into(),
            ));
        }
        if bt.size_in_wim % BLOB_ENTRY_BYTES != 0 {
            return Err(bad_table(format!(
                "its size {} is not a multiple of {BLOB_ENTRY_BYTES}",
                bt.size_in_wim
            )));
        }
        if bt.size_in_wim > MAX_BLOB_TABLE_BYTES {
            return Err(bad_table(format!("it claims {} bytes", bt.size_in_wim)));
        }
        if bt
            .offset
            .checked_add(bt.size_in_wim)
            .is_none_or(|e| e > file_len)
        {
            return Err(bad_table(format!(
                "its {} bytes end past the end of the file ({file_len} bytes)",
                bt.size_in_wim
            )));
        }
        let mut table = vec![0u8; bt.size_in_wim as usize];
        r.seek(SeekFrom::Start(bt.offset))?;
        r.read_exact(&mut table)?;
        let blobs: Vec<BlobEntry> = table
            .chunks_exact(BLOB_ENTRY_BYTES as usize)
            .map(parse_blob_entry)
            .collect();
        let segments = segments_of(&header, &blobs, file_len)?;
        Ok(Self {
            header,
            blobs,
            segments,
        })
    }
}

/// The segments of a WIM: header, every physical resource, the tables, and
/// gaps for whatever lies between.
pub fn segments_of(
    header: &Header,
    blobs: &[BlobEntry],
    file_len: u64,
) -> Result<Vec<Segment>, LayoutError> {
    let table = |r: ResHdr, kind| Segment {
        offset: r.offset,
        len: r.size_in_wim,
        kind,
        split: Split::Cdc,
    };
    let mut extents = vec![Segment {
        offset: 0,
        len: HEADER_BYTES,
        kind: SegmentKind::Header,
        split: Split::Cdc,
    }];
    extents.push(table(header.blob_table, SegmentKind::BlobTable));
    if header.xml.is_present() {
        extents.push(table(header.xml, SegmentKind::Xml));
    }
    if header.integrity.is_present() && header.integrity.offset != 0 {
        extents.push(table(header.integrity, SegmentKind::Integrity));
    }
    for b in blobs {
        let r = b.reshdr;
        if b.is_solid_member() || !r.is_present() {
            continue;
        }
        let kind = if r.flags & RESHDR_FLAG_METADATA != 0 {
            SegmentKind::Metadata
        } else {
            SegmentKind::Blob
        };
        let split = if r.flags & RESHDR_FLAG_SOLID == 0 && r.flags & RESHDR_FLAG_COMPRESSED != 0 {
            Split::Resource {
                uncompressed: r.uncompressed,
                chunk_size: header.chunk_size,
            }
        } else {
            Split::Cdc
        };
        extents.push(Segment {
            offset: r.offset,
            len: r.size_in_wim,
            kind,
            split,
        });
    }
    Ok(cover(file_len, extents)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reshdr_bytes(size: u64, flags: u8, offset: u64, unc: u64) -> Vec<u8> {
        let mut v = size.to_le_bytes()[..7].to_vec();
        v.push(flags);
        v.extend(offset.to_le_bytes());
        v.extend(unc.to_le_bytes());
        v
    }

    /// A synthetic WIM: header, two blobs, a metadata resource, table, XML.
    fn synthetic(blobs: &[(u64, u64, u8)], file_len: u64) -> Vec<u8> {
        let table_off = file_len - 100 - blobs.len() as u64 * 50;
        let mut h = MAGIC.to_vec();
        h.extend(208u32.to_le_bytes());
        h.extend(0x10d00u32.to_le_bytes());
        h.extend(0x40002u32.to_le_bytes());
        h.extend(32768u32.to_le_bytes());
        h.extend([7u8; 16]);
        h.extend(1u16.to_le_bytes());
        h.extend(1u16.to_le_bytes());
        h.extend(1u32.to_le_bytes());
        h.extend(reshdr_bytes(
            blobs.len() as u64 * 50,
            0,
            table_off,
            blobs.len() as u64 * 50,
        ));
        h.extend(reshdr_bytes(100, 0, file_len - 100, 100));
        h.extend(reshdr_bytes(0, 0, 0, 0));
        h.extend(0u32.to_le_bytes());
        h.extend(reshdr_bytes(0, 0, 0, 0));
        h.resize(208, 0);
        let mut f = h;
        f.resize(file_len as usize, 0xEE);
        let mut t = Vec::new();
        for (i, (off, len, flags)) in blobs.iter().enumerate() {
            t.extend(reshdr_bytes(*len, *flags, *off, *len));
            t.extend(1u16.to_le_bytes());
            t.extend(1u32.to_le_bytes());
            t.extend([i as u8; 20]);
        }
        f[table_off as usize..table_off as usize + t.len()].copy_from_slice(&t);
        f
    }

    fn read(bytes: &[u8]) -> Result<Layout, LayoutError> {
        Layout::read(&mut io::Cursor::new(bytes), bytes.len() as u64)
    }

    #[test]
    fn segments_cover_a_synthetic_wim() {
        let f = synthetic(&[(208, 1000, 0), (1300, 500, RESHDR_FLAG_METADATA)], 4000);
        let l = read(&f).unwrap();
        let kinds: Vec<_> = l
            .segments
            .iter()
            .map(|s| (s.kind, s.offset, s.len))
            .collect();
        assert_eq!(
            kinds,
            vec![
                (SegmentKind::Header, 0, 208),
                (SegmentKind::Blob, 208, 1000),
                (SegmentKind::Gap, 1208, 92),
                (SegmentKind::Metadata, 1300, 500),
                (SegmentKind::Gap, 1800, 4000 - 100 - 100 - 1800),
                (SegmentKind::BlobTable, 3800, 100),
                (SegmentKind::Xml, 3900, 100),
            ]
        );
    }

    #[test]
    fn rejects_blob_past_end_and_overlap() {
        let f = synthetic(&[(208, 10_000, 0)], 4000);
        let e = read(&f).unwrap_err().to_string();
        assert!(e.contains("past the end"), "{e}");
        let f = synthetic(&[(208, 1000, 0), (700, 1000, 0)], 4000);
        let e = read(&f).unwrap_err().to_string();
        assert!(e.contains("overlaps"), "{e}");
        let f = synthetic(&[(100, 1000, 0)], 4000);
        assert!(read(&f).unwrap_err().to_string().contains("overlaps"));
    }

    #[test]
    fn rejects_garbage_and_short_files() {
        assert!(matches!(read(&[0u8; 10]), Err(LayoutError::TooShort(10))));
        assert!(matches!(read(&[0u8; 500]), Err(LayoutError::NotWim)));
        let mut f = synthetic(&[(208, 1000, 0)], 4000);
        f[..8].copy_from_slice(&PIPABLE_MAGIC);
        assert!(matches!(read(&f), Err(LayoutError::Pipable)));
        let mut f = synthetic(&[(208, 1000, 0)], 4000);
        f[48] = 49; // blob table size not a multiple of 50
        assert!(matches!(read(&f), Err(LayoutError::BlobTable { .. })));
    }

    #[test]
    fn any_header_bytes_never_panic() {
        let base = synthetic(&[(208, 1000, 0), (1300, 500, RESHDR_FLAG_METADATA)], 4000);
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
        for _ in 0..5000 {
            let mut f = base.clone();
            for _ in 0..4 {
                let at = rng.random_range(0..208);
                f[at] = rng.random();
            }
            if let Ok(l) = read(&f) {
                let total: u64 = l.segments.iter().map(|s| s.len).sum();
                assert_eq!(total, 4000);
            }
        }
    }
}
