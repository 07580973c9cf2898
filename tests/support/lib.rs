//! Fixtures and harness for Ferry's end-to-end tests, benches and demo.
//!
//! What it is: [`tree`] generates folder trees that look like an OS image
//! (thousands of files of realistic sizes, some duplicates, compressible
//! content); [`wimtools`] builds and services real WIMs with wimlib's own
//! command-line tools (`wimcapture`, `wimappend`, `wimupdate`, `wimoptimize`)
//! and reads them back with `wiminfo`, independent of Ferry's parser;
//! [`updates`] writes software updates in Ferry's format;
//! [`harness`] runs real `ferry site serve` processes and the `ferry` CLI.
//!
//! What it is not: a fake of anything. Nothing here stands in for RocksDB,
//! wimlib or the network.

pub mod harness;
pub mod tree;
pub mod updates;
pub mod wimtools;
