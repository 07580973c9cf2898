//! Pull DPs as the site sees them (`ferry dp set NAME --pull-from SRC`):
//! the sources a pull DP's assignments name, which of them hold or are
//! getting each revision, and the signed grants that let a source serve
//! the puller ([`ferry_net::grant`]).

use ferry_net::pki::SigningKey;
use ferry_wire::pb;
use time::OffsetDateTime;

use crate::distribution::live::Pacer;
use crate::distribution::records::{Registry, TransferState};

/// The sources of DP `dp` as its assignments carry them, lowest rank
/// first: enrolled, not revoked (an unknown address is sent empty).
pub(crate) fn sources(reg: &Registry, dp: &str) -> Vec<pb::PullSource> {
    let Some(d) = reg.dps.get(dp) else {
        return Vec::new();
    };
    d.pull_from
        .iter()
        .filter_map(|s| {
            let src = reg.dps.get(&s.dp).filter(|r| r.revoked.is_none())?;
            Some(pb::PullSource {
                dp: s.dp.clone(),
                address: src.peer_address.clone().unwrap_or_default(),
                fingerprint: src.cert_fingerprint.clone()?,
                rank: s.rank,
            })
        })
        .collect()
}

/// When the grants of `now` were made: grants change only at these
/// boundaries, so assignments stay the same between them.
fn period_start(now: OffsetDateTime) -> OffsetDateTime {
    let every = ferry_net::grant::RENEW_EVERY.whole_seconds();
    let t = now.unix_timestamp();
    OffsetDateTime::from_unix_timestamp(t - t.rem_euclid(every)).unwrap_or(now)
}

/// When a pull DP's grants are next renewed.
pub(crate) fn next_renewal(now: OffsetDateTime) -> OffsetDateTime {
    period_start(now) + ferry_net::grant::RENEW_EVERY
}

/// What the grants of one pull DP's assignments share.
pub(crate) struct Grants<'a> {
    key: &'a SigningKey,
    site_code: &'a str,
    dp: String,
    fingerprint: Option<String>,
    expires: OffsetDateTime,
    pace: Vec<pb::Pace>,
}

impl<'a> Grants<'a> {
    /// The grants of DP `dp` for the current period: its pace (rate
    /// limit and windows, from `pacer`) until they expire.
    pub(crate) fn new(
        reg: &Registry,
        dp: &str,
        pacer: &Pacer,
        key: &'a SigningKey,
        site_code: &'a str,
    ) -> Self {
        let start = period_start(OffsetDateTime::now_utc());
        let expires = start + ferry_net::grant::LIFETIME;
        let pace = pacer
            .plan()
            .map(|p| ferry_net::grant::to_wire(&ferry_net::pace::segments(&*p, start, expires)))
            .unwrap_or_default();
        Self {
            key,
            site_code,
            dp: dp.to_string(),
            fingerprint: reg.dps.get(dp).and_then(|d| d.cert_fingerprint.clone()),
            expires,
            pace,
        }
    }

    /// Fills in assignment `a`'s grant, and which of `sources` (connected
    /// now: `online`) hold its revision or are getting it.
    pub(crate) fn fill(
        &self,
        a: &mut pb::Assignment,
        sources: &[pb::PullSource],
        reg: &Registry,
        online: impl Fn(&str) -> bool,
    ) {
        let Some(fingerprint) = &self.fingerprint else {
            return;
        };
        a.grant = Some(ferry_net::grant::sign(
            self.key,
            &pb::Grant {
                site_code: self.site_code.to_string(),
                dp: self.dp.clone(),
                fingerprint: fingerprint.clone(),
                package: a.package.clone(),
                revision: a.revision,
                expires: self.expires.unix_timestamp(),
                pace: self.pace.clone(),
            },
        ));
        for s in sources.iter().filter(|s| !s.address.is_empty()) {
            let Some(src) = reg.dps.get(&s.dp) else {
                continue;
            };
            if !online(&s.dp) {
                continue;
            }
            let t = src.transfers.get(&a.package);
            if t.is_some_and(|t| t.revision == a.revision && t.state.holds()) {
                a.holders.push(s.dp.clone());
                continue;
            }
            // It will have it: assigned, connected, taking transfers, and
            // not failing at this revision.
            let failing =
                t.is_some_and(|t| t.revision == a.revision && t.state == TransferState::Failed);
            if !failing
                && !src.maintenance
                && !src.prestaged
                && reg.assigned(&s.dp).contains(&a.package)
            {
                a.coming.push(s.dp.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_change_only_at_period_boundaries() {
        let at = |s| OffsetDateTime::from_unix_timestamp(s).unwrap();
        let every = ferry_net::grant::RENEW_EVERY.whole_seconds();
        let base = 1_800_000_000 - 1_800_000_000 % every;
        assert_eq!(period_start(at(base)), at(base));
        assert_eq!(period_start(at(base + every - 1)), at(base));
        assert_eq!(next_renewal(at(base + 5)), at(base + every));
        assert_eq!(period_start(at(base + every)), at(base + every));
    }
}
