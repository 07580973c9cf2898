//! The DPs connected right now: their QUIC connections, kept by the
//! endpoint that accepted them ([`crate::distribution::endpoint`]) and read
//! by the operator API (who is online; a revoked or removed DP's connection
//! is closed here), and the pace of the chunks sent to each ([`Pacer`]).
//! Nothing of it is recorded: a DP's record keeps its last contact and
//! address ([`crate::distribution::registry::Hub::contact`]) and its rate.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use ferry_net::pace::{Allowed, Plan};
use time::OffsetDateTime;

use crate::windows::{Limit, Windows};

use ferry_wire::CLOSE_REVOKED;

/// A DP connected right now.
#[derive(Clone, Debug)]
pub struct Online {
    /// Its address.
    pub address: String,
    /// Since when.
    pub since: time::OffsetDateTime,
    /// The connection, closed when the DP is revoked.
    pub conn: quinn::Connection,
}

/// The connections of the DPs online, by name, their pacers, and the DPs
/// being sent chunks right now.
#[derive(Debug, Default)]
pub struct Connections {
    online: Mutex<HashMap<String, Online>>,
    pacers: Mutex<HashMap<String, Arc<Pacer>>>,
    /// The connections with chunk streams open, by DP, and how many.
    sending: Mutex<HashMap<String, (quinn::Connection, usize)>>,
}

/// What the site buffers for the chunk streams of all DPs together, sent
/// or not yet acknowledged: the QUIC send windows of the connections being
/// sent to share it, so a hundred DPs fetching at once do not hold a
/// hundred full windows ([`ferry_net::tls::SEND_WINDOW`] each) of the
/// site's memory.
pub const SEND_BUDGET: u64 = 256 << 20;

/// The least a connection being sent to may buffer however many share
/// [`SEND_BUDGET`]: a bandwidth-delay product of 100 Mbit/s at 160 ms.
pub const MIN_SEND_WINDOW: u64 = 2 << 20;

/// The send window of each of `n` connections sharing [`SEND_BUDGET`].
fn send_share(n: usize) -> u64 {
    (SEND_BUDGET / n.max(1) as u64).clamp(MIN_SEND_WINDOW, ferry_net::tls::SEND_WINDOW)
}

/// A chunk stream's hold on its DP's share of [`SEND_BUDGET`]
/// ([`Connections::sending`]); given back when dropped.
#[derive(Debug)]
pub struct Sending {
    conns: Arc<Connections>,
    dp: String,
}

impl Drop for Sending {
    fn drop(&mut self) {
        let mut sending = self.conns.lock_sending();
        if let Some((_, streams)) = sending.get_mut(&self.dp) {
            *streams -= 1;
            if *streams == 0 {
                sending.remove(&self.dp);
                rebalance(&sending);
            }
        }
    }
}

/// Gives every connection being sent to its share of [`SEND_BUDGET`].
fn rebalance(sending: &HashMap<String, (quinn::Connection, usize)>) {
    let window = send_share(sending.len());
    for (conn, _) in sending.values() {
        conn.set_send_window(window);
    }
}

/// The pace of the chunk bytes sent to one DP, across all its chunk
/// streams: its rate limit (`ferry dp set NAME --rate`) and its windows
/// (`--window`, [`crate::windows`]) as a [`ferry_net::pace`] plan. A pull
/// DP's grants carry the same plan to its sources ([`Pacer::plan`]).
#[derive(Debug, Default)]
pub struct Pacer {
    pacer: ferry_net::pace::Pacer,
    /// The settings the plan was made of.
    settings: Mutex<Option<Arc<DpPlan>>>,
}

/// A DP's rate limit, windows and prestaging as a plan.
#[derive(Debug)]
pub struct DpPlan {
    /// The DP's own rate limit.
    rate: Option<u64>,
    /// Its windows.
    windows: Option<Arc<Windows>>,
    /// It takes its content from prestage bundles: nothing is sent.
    prestaged: bool,
}

impl Plan for DpPlan {
    fn at(&self, now: OffsetDateTime) -> (Allowed, OffsetDateTime) {
        let (limit, until) = match &self.windows {
            Some(w) => w.at(now),
            None => (None, now + time::Duration::days(7)),
        };
        let allowed = match (limit, self.rate) {
            _ if self.prestaged => Allowed::Closed,
            (Some(Limit::Closed), _) => Allowed::Closed,
            (Some(Limit::Rate(w)), Some(r)) => Allowed::Rate(w.min(r)),
            (Some(Limit::Rate(w)), None) => Allowed::Rate(w),
            (None, Some(r)) => Allowed::Rate(r),
            (None, None) => Allowed::All,
        };
        (allowed, until)
    }
}

impl Pacer {
    fn settings(&self) -> std::sync::MutexGuard<'_, Option<Arc<DpPlan>>> {
        self.settings.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets the DP's rate limit in bytes per second and its windows
    /// (`None`: none), and whether it takes its content from prestage
    /// bundles only (nothing is sent). What is unchanged keeps its state.
    pub fn set(&self, rate: Option<u64>, windows: Option<&str>, prestaged: bool) {
        let mut settings = self.settings();
        let old = settings.as_deref();
        let same_windows = match (old.and_then(|o| o.windows.as_deref()), windows) {
            (Some(w), Some(text)) => w.text() == text,
            (None, None) => true,
            _ => false,
        };
        if same_windows && old.map_or((None, false), |o| (o.rate, o.prestaged)) == (rate, prestaged)
        {
            return;
        }
        let windows = if same_windows {
            old.and_then(|o| o.windows.clone())
        } else {
            // Checked when it was set; a zone that cannot be read now
            // leaves the windows out (and says so).
            windows.and_then(|t| match Windows::parse(t) {
                Ok(w) => Some(Arc::new(w)),
                Err(e) => {
                    tracing::warn!(error = %e, "transfer windows not applied");
                    None
                }
            })
        };
        let plan = Arc::new(DpPlan {
            rate,
            windows,
            prestaged,
        });
        *settings = Some(plan.clone());
        self.pacer.set_plan(Some(plan));
    }

    /// The DP's plan, as set.
    pub fn plan(&self) -> Option<Arc<DpPlan>> {
        self.settings().clone()
    }

    /// Until when a closed window holds the DP's transfers, if one does
    /// now.
    pub fn closed_until(&self) -> Option<OffsetDateTime> {
        self.pacer.closed_until()
    }

    /// The DP's windows, if any.
    pub fn windows(&self) -> Option<Arc<Windows>> {
        self.settings().as_ref().and_then(|p| p.windows.clone())
    }

    /// What holds the chunk bytes to the plan.
    pub fn pace(&self) -> &ferry_net::pace::Pacer {
        &self.pacer
    }
}

impl Connections {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Online>> {
        self.online.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `dp` is connected on `conn` (a newer connection replaces an older
    /// one). Returns its address.
    pub fn add(&self, dp: &str, conn: &quinn::Connection) -> String {
        let address = conn.remote_address().to_string();
        self.lock().insert(
            dp.to_string(),
            Online {
                address: address.clone(),
                since: crate::now(),
                conn: conn.clone(),
            },
        );
        address
    }

    /// `conn` of `dp` ended; only its current connection is forgotten.
    pub fn remove(&self, dp: &str, conn: &quinn::Connection) {
        let mut online = self.lock();
        if online
            .get(dp)
            .is_some_and(|o| o.conn.stable_id() == conn.stable_id())
        {
            online.remove(dp);
        }
    }

    /// Whether `dp` is connected, from where and since when.
    pub fn get(&self, dp: &str) -> Option<Online> {
        self.lock().get(dp).cloned()
    }

    /// The UDP payload `dp`'s connection carries now, if it is connected.
    pub fn path_mtu(&self, dp: &str) -> Option<u16> {
        self.get(dp).map(|o| o.conn.stats().path.current_mtu)
    }

    /// Whether `dp` is connected.
    pub fn is_online(&self, dp: &str) -> bool {
        self.lock().contains_key(dp)
    }

    fn lock_sending(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, (quinn::Connection, usize)>> {
        self.sending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A chunk stream to `dp` starts: its connection takes a share of
    /// [`SEND_BUDGET`] (and the others give some back) until every stream
    /// to it has dropped what this returns. `None` when `dp` is not
    /// connected.
    pub fn sending(self: &Arc<Self>, dp: &str) -> Option<Sending> {
        let conn = self.get(dp)?.conn;
        let mut sending = self.lock_sending();
        let entry = sending.entry(dp.to_string()).or_insert((conn.clone(), 0));
        // A newer connection of the DP's takes the older one's place.
        let newer = entry.0.stable_id() != conn.stable_id();
        entry.0 = conn;
        entry.1 += 1;
        if entry.1 == 1 || newer {
            rebalance(&sending);
        }
        Some(Sending {
            conns: self.clone(),
            dp: dp.to_string(),
        })
    }

    /// The pacer of the chunks sent to `dp`.
    pub fn pacer(&self, dp: &str) -> Arc<Pacer> {
        self.pacers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(dp.to_string())
            .or_default()
            .clone()
    }

    /// Closes `dp`'s connection, telling it `why` with the code that stops
    /// it from dialling again (it was revoked or removed).
    pub fn close_refused(&self, dp: &str, why: &'static [u8]) {
        if let Some(o) = self.lock().remove(dp) {
            o.conn.close(CLOSE_REVOKED.into(), why);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dps_sent_to_at_once_share_the_send_budget_within_bounds() {
        let full = ferry_net::tls::SEND_WINDOW;
        // Up to 16 DPs at once each keep the full window.
        assert_eq!(send_share(0), full);
        assert_eq!(send_share(1), full);
        assert_eq!(send_share(16), full);
        // More share the budget…
        assert_eq!(send_share(32), 8 << 20);
        assert_eq!(send_share(100), SEND_BUDGET / 100);
        assert!(send_share(100) * 100 <= SEND_BUDGET);
        // …down to the floor, past which memory grows with the DPs again.
        assert_eq!(send_share(128), MIN_SEND_WINDOW);
        assert_eq!(send_share(1000), MIN_SEND_WINDOW);
    }
}
