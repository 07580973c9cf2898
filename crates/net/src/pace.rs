//! The pace of the chunk bytes a sender (the site, or a source DP) sends
//! one DP: a [`Plan`] says what holds when (a rate, nothing, or anything),
//! and a [`Pacer`] holds the bytes to it with a token bucket over bytes
//! (governor's GCRA), so the link sees the rate on average and never more
//! than [`BURST_SECS`] of it at once above it. While the plan says closed,
//! nothing goes.
//!
//! The site's plan of a DP is its rate limit and transfer windows (site
//! crate, `distribution::live`); a source DP follows the plan the site
//! worked out for the puller and sent in its grant ([`Segments`],
//! [`crate::grant`]).

use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use time::OffsetDateTime;

/// What a pacer lets through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Allowed {
    /// Anything.
    All,
    /// At most this many bytes per second.
    Rate(u64),
    /// Nothing.
    Closed,
}

/// What holds when.
pub trait Plan: Send + Sync + std::fmt::Debug {
    /// What holds at `now`, and until when (after `now`).
    fn at(&self, now: OffsetDateTime) -> (Allowed, OffsetDateTime);
}

/// A plan as a list of spans, each until its time, in order; past the
/// last, closed (a source DP sends nothing on an expired grant).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Segments(pub Vec<(OffsetDateTime, Allowed)>);

/// How far ahead "closed for good" looks.
const FAR: time::Duration = time::Duration::days(7);

impl Plan for Segments {
    fn at(&self, now: OffsetDateTime) -> (Allowed, OffsetDateTime) {
        self.0
            .iter()
            .find(|(until, _)| *until > now)
            .map_or((Allowed::Closed, now + FAR), |&(until, a)| (a, until))
    }
}

/// `plan` from `from` to `to` as [`Segments`] (neighbours that allow the
/// same are merged; the last ends at `to`).
pub fn segments(plan: &dyn Plan, from: OffsetDateTime, to: OffsetDateTime) -> Segments {
    let mut out: Vec<(OffsetDateTime, Allowed)> = Vec::new();
    let mut t = from;
    while t < to {
        let (allowed, until) = plan.at(t);
        let until = until.min(to).max(t + time::Duration::SECOND);
        match out.last_mut() {
            Some(last) if last.1 == allowed => last.0 = until,
            _ => out.push((until, allowed)),
        }
        t = until;
    }
    Segments(out)
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

/// Holds the bytes sent to one DP, across all its chunk streams, to a
/// plan. Without one it costs one lock per batch of frames.
#[derive(Debug, Default)]
pub struct Pacer {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    plan: Option<Arc<dyn Plan>>,
    /// What holds now, until when (worked out again past it).
    now: Option<(Allowed, Instant, OffsetDateTime)>,
    /// The bucket of the rate in force, and that rate.
    bucket: Option<(u64, Arc<DefaultDirectRateLimiter>)>,
}

impl State {
    fn allowed(&mut self) -> (Allowed, Instant, OffsetDateTime) {
        let instant = Instant::now();
        if let Some(n) = self.now.filter(|n| n.1 > instant) {
            return n;
        }
        let now = OffsetDateTime::now_utc();
        let (allowed, until) = match &self.plan {
            Some(p) => p.at(now),
            None => (Allowed::All, now + FAR),
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
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Follows `plan` from now on (`None`: anything goes). A bucket of the
    /// same rate keeps its state.
    pub fn set_plan(&self, plan: Option<Arc<dyn Plan>>) {
        let mut s = self.lock();
        s.plan = plan;
        s.now = None;
    }

    /// Until when the plan holds everything back, if it does now.
    pub fn closed_until(&self) -> Option<OffsetDateTime> {
        let (allowed, _, until) = self.lock().allowed();
        (allowed == Allowed::Closed).then_some(until)
    }

    /// Waits until `n` more bytes may be sent: while closed, until it
    /// opens; then at the rate in force.
    pub async fn take(&self, n: usize) {
        let mut left = u32::try_from(n).unwrap_or(u32::MAX);
        let piece = NonZeroU32::MIN.saturating_add(MIN_BURST - 1);
        while left > 0 {
            let (allowed, until, bucket) = {
                let mut s = self.lock();
                let (allowed, until, _) = s.allowed();
                (allowed, until, s.bucket.as_ref().map(|b| b.1.clone()))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: i64) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_800_000_000 + s).unwrap()
    }

    /// Closed in [100, 200), 5 MB/s in [200, 300), open otherwise.
    #[derive(Debug)]
    struct Day;
    impl Plan for Day {
        fn at(&self, now: OffsetDateTime) -> (Allowed, OffsetDateTime) {
            let s = (now - t(0)).whole_seconds();
            match s {
                ..100 => (Allowed::All, t(100)),
                100..200 => (Allowed::Closed, t(200)),
                200..300 => (Allowed::Rate(5_000_000), t(300)),
                _ => (Allowed::All, now + time::Duration::days(1)),
            }
        }
    }

    #[test]
    fn a_plan_becomes_segments_that_say_the_same() {
        let s = segments(&Day, t(50), t(400));
        assert_eq!(
            s.0,
            vec![
                (t(100), Allowed::All),
                (t(200), Allowed::Closed),
                (t(300), Allowed::Rate(5_000_000)),
                (t(400), Allowed::All),
            ]
        );
        for at in [50, 99, 100, 150, 199, 200, 250, 299, 300, 350] {
            assert_eq!(s.at(t(at)).0, Day.at(t(at)).0, "at {at}");
        }
        // Past the end: closed.
        assert_eq!(s.at(t(400)).0, Allowed::Closed);
        // Nothing to cover: nothing.
        assert!(segments(&Day, t(10), t(10)).0.is_empty());
    }

    #[tokio::test]
    async fn a_closed_plan_holds_bytes_and_an_open_one_does_not() {
        let p = Pacer::default();
        assert_eq!(p.closed_until(), None);
        let now = OffsetDateTime::now_utc();
        let until = now + time::Duration::seconds(2);
        p.set_plan(Some(Arc::new(Segments(vec![
            (until, Allowed::Closed),
            (now + time::Duration::hours(1), Allowed::All),
        ]))));
        assert_eq!(p.closed_until(), Some(until));
        let held = tokio::time::timeout(std::time::Duration::from_millis(300), p.take(1000)).await;
        assert!(held.is_err(), "closed: nothing may pass");
        p.set_plan(None);
        tokio::time::timeout(std::time::Duration::from_millis(300), p.take(1 << 20))
            .await
            .expect("no plan: anything passes");
    }
}
