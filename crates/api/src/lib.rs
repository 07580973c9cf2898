//! What operators send a Ferry site, free of the content library.
//!
//! The site's operator API reads JSON bodies and queries ([`requests`]) and
//! the text operators type into them: transfer windows ([`windows`]),
//! schedules and start times ([`schedule`]), update packages — their
//! `update.toml` and the archives they come in ([`updates`]). All of it is
//! here rather than in `ferry-site` so that it can be reached without
//! RocksDB: the fuzz targets in `fuzz/` feed it hostile input, and the CLI
//! builds the same request types it sends.

pub mod requests;
pub mod schedule;
pub mod updates;
pub mod windows;

/// Now (UTC), to the second: what every record keeps, written as RFC 3339.
pub fn now() -> time::OffsetDateTime {
    to_the_second(time::OffsetDateTime::now_utc())
}

/// `t` without its fraction of a second.
pub fn to_the_second(t: time::OffsetDateTime) -> time::OffsetDateTime {
    t.replace_nanosecond(0).unwrap_or(t)
}

/// `t` as RFC 3339, for messages and logs (records and views carry the
/// typed time and serialize it so themselves).
pub fn rfc3339(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}
