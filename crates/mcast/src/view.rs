//! A session as operators see it: what the DP's `GET /multicast/` lists,
//! what travels to the site, and what `ferry status` and `ferry dp list`
//! print.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One session's counters.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionView {
    /// Session id, 16 hex digits.
    pub session: String,
    /// Package id.
    pub package: String,
    /// Revision sent.
    pub revision: u32,
    /// Group and port.
    pub address: String,
    /// Whether datagrams are sealed.
    pub encrypted: bool,
    /// `waiting`, `sending`, `ended`.
    pub state: String,
    /// Clients that joined.
    pub clients_joined: u32,
    /// Of them, done.
    pub clients_done: u32,
    /// Of them, left unfinished or dropped as silent.
    pub clients_left: u32,
    /// Passes sent (the one under way included).
    pub passes: u32,
    /// Bytes per second of the current pass.
    pub rate: u64,
    /// Datagrams sent.
    pub datagrams_sent: u64,
    /// UDP payload bytes sent.
    pub bytes_sent: u64,
    /// Bytes of the package (what one copy costs).
    pub package_bytes: u64,
    /// Sends the kernel refused.
    pub send_errors: u64,
    /// Datagrams the clients dropped, by reason, as they last reported.
    #[serde(default)]
    pub dropped: BTreeMap<String, u64>,
    /// When it opened (Unix seconds).
    #[serde(default)]
    pub opened: i64,
    /// When it ended (Unix seconds; absent while it runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended: Option<i64>,
}

impl SessionView {
    /// Bytes sent per byte of the package (0 before anything was sent).
    pub fn cost(&self) -> f64 {
        if self.package_bytes == 0 {
            0.0
        } else {
            self.bytes_sent as f64 / self.package_bytes as f64
        }
    }

    /// Datagrams the clients dropped, summed over the reasons.
    pub fn dropped_total(&self) -> u64 {
        self.dropped.values().sum()
    }
}
