//! The content library: what the site holds and how it gets there.
//!
//! [`catalog`] is what the site records per package (revisions, sources,
//! servicing history); [`packages`] what every package shares (its record
//! and the commit of a revision, used by images and upgrade packages alike)
//! and the image side: import, show, export, verify, remove; [`ingest`] streams one file into the RocksDB library
//! (chunks and manifest); [`upgrade`] imports an upgrade package's setup
//! folder. Nothing here knows about DPs or jobs.

pub mod catalog;
pub(crate) mod ingest;
pub mod packages;
pub mod upgrade;
