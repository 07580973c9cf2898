//! The one builder of the reports a DP sends the site about a package.

use std::time::Duration;

use ferry_core::transfer::Progress;
use ferry_wire::pb;

/// A report of `a` in `state`, with no figures.
pub(crate) fn of(a: &pb::Assignment, state: pb::State) -> pb::Report {
    pb::Report {
        package: a.package.clone(),
        revision: a.revision,
        state: state as i32,
        ..pb::Report::default()
    }
}

/// A report of `a` in `state` with a transfer's figures: `wire` bytes
/// received so far and `manifest_bytes` for its manifest.
pub(crate) fn progress(
    a: &pb::Assignment,
    state: pb::State,
    p: &Progress,
    wire: u64,
    manifest_bytes: u64,
) -> pb::Report {
    pb::Report {
        manifest_bytes,
        bytes_needed: p.bytes_needed,
        bytes_done: p.bytes_done,
        full_bytes: p.full_bytes,
        wire_bytes: wire,
        bytes_local: p.bytes_local,
        ..of(a, state)
    }
}

/// `a` failed with `error`; the DP tries again in `retry_in` (at least a
/// second, as the site shows whole seconds).
pub(crate) fn failed(a: &pb::Assignment, error: String, retry_in: Duration) -> pb::Report {
    pb::Report {
        error,
        retry_in_secs: retry_in.as_secs().max(1),
        ..of(a, pb::State::Failed)
    }
}

/// The disk as the site wants it.
pub(crate) fn disk(d: ferry_store::disk::Disk) -> pb::Disk {
    pb::Disk {
        used_bytes: d.used,
        free_bytes: d.free,
        total_bytes: d.total,
    }
}
