//! The DPs connected right now: their QUIC connections, kept by the
//! endpoint that accepted them ([`crate::distribution::endpoint`]) and read
//! by the operator API (who is online; a revoked or removed DP's connection
//! is closed here), and the pace of the chunks sent to each ([`Pacer`]).
//! Nothing of it is recorded: a DP's record keeps its last contact and
//! address ([`crate::distribution::registry::Hub::contact`]) and its rate.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

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

/// The connections of the DPs online, by name, and their pacers.
#[derive(Debug, Default)]
pub struct Connections {
    online: Mutex<HashMap<String, Online>>,
    pacers: Mutex<HashMap<String, Arc<Pacer>>>,
}

/// The pace of the chunk bytes sent to one DP, across all its chunk
/// streams: its rate limit (`ferry dp set NAME --rate`) as a token bucket
/// over bytes (governor's GCRA), so the link sees the rate on average and
/// never more than [`BURST_SECS`] of it at once above it. Without a limit
/// it costs one lock per batch of frames.
#[derive(Debug, Default)]
pub struct Pacer {
    limit: Mutex<Option<(u64, Arc<DefaultDirectRateLimiter>)>>,
}

/// The most a pacer lets through at once, in seconds of its rate: a tenth
/// of a second keeps every one-second interval within 1.1× of the rate.
pub const BURST_SECS: f64 = 0.1;

/// The smallest burst: one batch of chunk frames goes in a few pieces.
const MIN_BURST: u32 = 16 << 10;

impl Pacer {
    /// Sets the rate in bytes per second (`None`: no limit). The same rate
    /// keeps the bucket as it is.
    pub fn set(&self, rate: Option<u64>) {
        let mut limit = self.limit.lock().unwrap_or_else(|p| p.into_inner());
        // Above 4 GB/s (u32 cells per second) there is nothing to pace.
        let rate = rate.and_then(|r| NonZeroU32::new(u32::try_from(r).ok()?));
        match (rate, limit.as_ref()) {
            (None, _) => *limit = None,
            (Some(r), Some((now, _))) if u64::from(r.get()) == *now => {}
            (Some(r), _) => {
                let burst = ((f64::from(r.get()) * BURST_SECS) as u32).max(MIN_BURST);
                let quota =
                    Quota::per_second(r).allow_burst(NonZeroU32::MIN.saturating_add(burst - 1));
                *limit = Some((u64::from(r.get()), Arc::new(RateLimiter::direct(quota))));
            }
        }
    }

    /// The rate, if limited.
    pub fn rate(&self) -> Option<u64> {
        self.limit
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|(r, _)| *r)
    }

    /// Waits until `n` more bytes may be sent.
    pub async fn take(&self, n: usize) {
        let Some(limiter) = self
            .limit
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|(_, l)| l.clone())
        else {
            return;
        };
        let mut left = u32::try_from(n).unwrap_or(u32::MAX);
        let piece = NonZeroU32::MIN.saturating_add(MIN_BURST - 1);
        while let Some(now) = NonZeroU32::new(left.min(piece.get())) {
            // Never more than the burst: a piece of at most MIN_BURST is.
            let _ = limiter.until_n_ready(now).await;
            left -= now.get();
        }
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

    /// Whether `dp` is connected.
    pub fn is_online(&self, dp: &str) -> bool {
        self.lock().contains_key(dp)
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
