//! Offline servicing: the update catalog ([`updates`]), servicing jobs and
//! their scheduler ([`jobs`]), the run of one job ([`service`]: copy the
//! image out, apply the updates with wimlib, ingest the result as the next
//! revision).

pub mod jobs;
pub mod service;

pub use ferry_api::updates;
