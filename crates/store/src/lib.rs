//! Ferry's content library over RocksDB.
//!
//! What it is: [`Library`] stores chunks once, keyed by BLAKE3, counts how
//! many manifests reference each, keeps manifests and opaque catalog records
//! per package, and frees chunks nothing references any more. An
//! [`Import`] writes its new chunks into table files of its own (a pack),
//! which [`Import::commit`] hands to RocksDB whole before one synced write
//! batch makes the package visible; an import that fails or is killed
//! leaves only its pack, deleted at the next open. Freed chunks are
//! reclaimed by [`Library::collect`]. See `DESIGN.md` beside this crate for
//! the keyspace.
//!
//! A distribution point keeps no chunk copies: its content folder is its
//! store and RocksDB only the index ([`content::ContentStore`]; chunks are
//! written in place as they arrive). Writing a file from its manifest has
//! one home, [`file`], used by both.
//!
//! What it is not: it does not know what a package *means* (images, upgrade
//! packages — that is `ferry-site`), and it does no chunking.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod content;
pub mod disk;
pub mod file;
mod gate;
mod library;

pub use content::{ContentError, ContentStore, RevisionRecord, Stage};
pub use library::{
    CommitStats, Damage, Import, Library, LibraryStats, RemoveStats, StateChange, StateRecord,
    StoreError, CF_CHUNKS, CF_HINTS, CF_INDEX, CF_MANIFESTS, CF_META, CF_PACKAGES, CF_PACKS,
    CF_PENDING,
};
