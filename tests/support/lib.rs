//! Fixtures and harness for Ferry's end-to-end tests, benches and demo.
//!
//! What it is: [`tree`] generates folder trees that look like an OS image
//! (thousands of files of realistic sizes, some duplicates, compressible
//! content); [`wimtools`] builds and services real WIMs with wimlib's own
//! command-line tools (`wimcapture`, `wimappend`, `wimupdate`, `wimoptimize`)
//! and reads them back with `wiminfo`, independent of Ferry's parser;
//! [`updates`] writes software updates in Ferry's format;
//! [`harness`] runs real `ferry site serve` processes and the `ferry` CLI;
//! [`netns`] puts test hosts in network namespaces behind veth links whose
//! bytes the kernel counts; [`relay`] adds delay, loss, reordering and rate
//! limits to UDP in userspace (this kernel has no `netem`).
//!
//! What it is not: a fake of anything. Nothing here stands in for RocksDB,
//! wimlib or the network.

pub mod disk;
pub mod harness;
pub mod netns;
pub mod relay;
pub mod tree;
pub mod updates;
pub mod wimtools;
