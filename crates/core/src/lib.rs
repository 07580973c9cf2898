//! Sans-io core of Ferry.
//!
//! What it is: the pure logic every other crate builds on — BLAKE3 chunk ids
//! ([`ChunkId`]), the chunkers that split a byte stream ([`chunker::Cdc`] for
//! unstructured data, [`chunker::ResourceChunker`] for a compressed WIM
//! resource), the segment description of a file ([`segment::Segment`]) and the
//! manifest that lists a file's chunks ([`manifest::Manifest`]), sync
//! planning for distribution points ([`sync::plan`]) and the state machine
//! of one revision arriving at a DP ([`transfer::Transfer`]).
//!
//! What it deliberately is not: it does no I/O, reads no clock and depends on
//! no runtime, database or network crate. Drivers in `ferry-site` and
//! `ferry-store` feed it bytes and persist what it returns.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod chunker;
pub mod id;
pub mod manifest;
pub mod segment;
pub mod session;
pub mod sync;
pub mod transfer;
pub mod units;

pub use id::{ChunkId, FileHash};
pub use manifest::{ChunkRef, Manifest, ManifestError};
pub use segment::{Segment, SegmentKind, Split};
