//! WIM files for Ferry.
//!
//! What it is: [`layout`] reads a WIM's header and blob table with safe Rust
//! and turns them into the [`ferry_core::Segment`]s the importer chunks;
//! [`wimlib`] is a small safe wrapper over `wimlib-sys` for what needs the real
//! library — opening and validating a WIM, reading each image's properties,
//! exporting one image into a new WIM, decompressing chunks; [`verify`]
//! checks the blobs an append wrote against their SHA-1. This crate holds
//! Ferry's only `unsafe` code, all of it in [`wimlib`].
//!
//! What it is not: it never writes into a WIM it was given; exports and
//! rebuilds always go to a new path chosen by the caller.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod layout;
pub mod verify;
pub mod wimlib;

pub use layout::{BlobEntry, Header, Layout, LayoutError, ResHdr};
pub use verify::{verify_blobs_from, verify_blobs_on, Checked, VerifyError};
pub use wimlib::{Compression, Decompressor, ImageInfo, UpdateCmd, Wim, WimError, WimInfo};
