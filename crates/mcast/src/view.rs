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

/// The sessions of `views` still running, and the computers in them by
/// state (`joined`, `done`, `left`), as metrics count them.
pub fn running(views: &[SessionView]) -> (usize, [(&'static str, u64); 3]) {
    let live: Vec<&SessionView> = views.iter().filter(|s| s.ended.is_none()).collect();
    let sum = |f: fn(&SessionView) -> u32| live.iter().map(|s| u64::from(f(s))).sum();
    (
        live.len(),
        [
            ("joined", sum(|s| s.clients_joined)),
            ("done", sum(|s| s.clients_done)),
            ("left", sum(|s| s.clients_left)),
        ],
    )
}

#[cfg(test)]
mod running_tests {
    use super::*;

    #[test]
    fn only_running_sessions_and_their_computers_count() {
        let s = |joined, done, ended| SessionView {
            clients_joined: joined,
            clients_done: done,
            clients_left: 1,
            ended,
            ..SessionView::default()
        };
        let (n, clients) = running(&[s(3, 1, None), s(9, 9, Some(5)), s(2, 0, None)]);
        assert_eq!(n, 2);
        assert_eq!(clients, [("joined", 5), ("done", 1), ("left", 2)]);
        assert_eq!(running(&[]), (0, [("joined", 0), ("done", 0), ("left", 0)]));
    }
}
