//! The DPs connected right now: their QUIC connections, kept by the
//! endpoint that accepted them ([`crate::distribution::endpoint`]) and read
//! by the operator API (who is online; a revoked or removed DP's connection
//! is closed here), and the pace of the chunks sent to each ([`Pacer`]).
//! Nothing of it is recorded: a DP's record keeps its last contact and
//! address ([`crate::distribution::registry::Hub::contact`]) and its rate.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
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

/// The connections of the DPs online, by name, and their pacers.
#[derive(Debug, Default)]
pub struct Connections {
    online: Mutex<HashMap<String, Online>>,
    pacers: Mutex<HashMap<String, Arc<Pacer>>>,
}

/// The pace of the chunk bytes sent to one DP, across all its chunk
/// streams: its rate limit (`ferry dp set NAME --rate`) and its windows
/// (`--window`, [`crate::windows`]) as a token bucket over bytes
/// (governor's GCRA), so the link sees the rate on average and never more
/// than [`BURST_SECS`] of it at once above it; while a window is closed
/// nothing goes. Without either it costs one lock per batch of frames.
#[derive(Debug, Default)]
pub struct Pacer {
    state: Mutex<Pace>,
}

/// What a pacer knows and has worked out.
#[derive(Debug, Default)]
struct Pace {
    /// The DP's own rate limit.
    rate: Option<u64>,
    /// Its windows.
    windows: Option<Arc<Windows>>,
    /// It takes its content from prestage bundles: nothing is sent.
    prestaged: bool,
    /// What holds now, until when (worked out again past it).
    now: Option<(Allowed, Instant, OffsetDateTime)>,
    /// The bucket of the rate in force, and that rate.
    bucket: Option<(u64, Arc<DefaultDirectRateLimiter>)>,
}

/// What a pacer lets through now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Allowed {
    /// Anything.
    All,
    /// At most this many bytes per second.
    Rate(u64),
    /// Nothing.
    Closed,
}

/// The most a pacer lets through at once, in seconds of its rate: a tenth
/// of a second keeps every one-second interval within 1.1× of the rate.
pub const BURST_SECS: f64 = 0.1;

/// The smallest burst: one batch of chunk frames goes in a few pieces.
const MIN_BURST: u32 = 16 << 10;

fn bucket(rate: u64) -> Option<Arc<DefaultDirectRateLimiter>> {
    // Above 4 GB/s (u32 cells per second) there is nothing to pace.
    let r = NonZeroU32::new(u32::try_from(rate).ok()?)?;
    let burst = ((f64::from(r.get()) * BURST_SECS) as u32).max(MIN_BURST);
    let quota = Quota::per_second(r).allow_burst(NonZeroU32::MIN.saturating_add(burst - 1));
    Some(Arc::new(RateLimiter::direct(quota)))
}

impl Pace {
    /// What holds now, worked out again when its time is up.
    fn allowed(&mut self) -> (Allowed, Instant, OffsetDateTime) {
        let instant = Instant::now();
        if let Some(n) = self.now.filter(|n| n.1 > instant) {
            return n;
        }
        let now = OffsetDateTime::now_utc();
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
        let wait = std::time::Duration::try_from(until - now).unwrap_or_default();
        let n = (allowed, instant + wait, until);
        self.now = Some(n);
        match allowed {
            Allowed::Rate(r) if self.bucket.as_ref().map(|b| b.0) != Some(r) => {
                self.bucket = bucket(r).map(|b| (r, b));
            }
            Allowed::Rate(_) => {}
            _ => self.bucket = None,
        }
        n
    }
}

impl Pacer {
    /// Sets the DP's rate limit in bytes per second and its windows
    /// (`None`: none), and whether it takes its content from prestage
    /// bundles only (nothing is sent). What is unchanged keeps its state.
    pub fn set(&self, rate: Option<u64>, windows: Option<&str>, prestaged: bool) {
        let mut p = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if p.prestaged != prestaged {
            p.prestaged = prestaged;
            p.now = None;
        }
        let same_windows = match (&p.windows, windows) {
            (Some(w), Some(text)) => w.text() == text,
            (None, None) => true,
            _ => false,
        };
        if p.rate == rate && same_windows {
            return;
        }
        p.rate = rate;
        if !same_windows {
            // Checked when it was set; a zone that cannot be read now
            // leaves the windows out (and says so).
            p.windows = windows.and_then(|t| match Windows::parse(t) {
                Ok(w) => Some(Arc::new(w)),
                Err(e) => {
                    tracing::warn!(error = %e, "transfer windows not applied");
                    None
                }
            });
        }
        p.now = None;
    }

    /// Until when a closed window holds the DP's transfers, if one does
    /// now.
    pub fn closed_until(&self) -> Option<OffsetDateTime> {
        let (allowed, _, until) = self
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .allowed();
        (allowed == Allowed::Closed).then_some(until)
    }

    /// The DP's windows, if any.
    pub fn windows(&self) -> Option<Arc<Windows>> {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .windows
            .clone()
    }

    /// Waits until `n` more bytes may be sent: while a window is closed,
    /// until it opens; then at the rate in force.
    pub async fn take(&self, n: usize) {
        let mut left = u32::try_from(n).unwrap_or(u32::MAX);
        let piece = NonZeroU32::MIN.saturating_add(MIN_BURST - 1);
        while left > 0 {
            let (allowed, until, bucket) = {
                let mut p = self.state.lock().unwrap_or_else(|e| e.into_inner());
                let (allowed, until, _) = p.allowed();
                (allowed, until, p.bucket.as_ref().map(|b| b.1.clone()))
            };
            match (allowed, bucket) {
                (Allowed::Closed, _) => tokio::time::sleep_until(until.into()).await,
                (Allowed::Rate(_), Some(b)) => {
                    // Never more than the burst: a piece of at most
                    // MIN_BURST is.
                    let now = NonZeroU32::new(left.min(piece.get())).unwrap_or(piece);
                    let _ = b.until_n_ready(now).await;
                    left -= now.get();
                }
                _ => return,
            }
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
