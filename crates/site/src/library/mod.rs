//! The content library: what the site holds and how it gets there.
//!
//! [`catalog`] is what the site records per package (revisions, sources,
//! servicing history); [`images`] imports, shows, exports, verifies and
//! removes packages; [`ingest`] streams one file into the RocksDB library
//! (chunks and manifest); [`upgrade`] imports an upgrade package's setup
//! folder. Nothing here knows about DPs or jobs.

pub mod catalog;
pub mod images;
pub mod ingest;
pub mod upgrade;
