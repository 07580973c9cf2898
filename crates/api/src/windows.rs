//! Transfer windows of a DP (`ferry dp set NAME --window …`): when the
//! site sends it chunks, and how fast, in the site's local time.
//!
//! A window is rules separated by `;`, each `[DAYS] FROM-TO (rate RATE |
//! closed)`: `Mon-Fri 08:00-18:00 rate 5M; daily 12:00-13:00 closed`.
//! DAYS is `daily` (the default) or day names, three letters or whole, any
//! case (`Mon`, `Sat,Sun`, `Mon-Fri`, `Monday-Friday`,
//! `Fri-Mon`); FROM and TO are `HH:MM` or `HH:MM:SS`, TO may be `24:00`,
//! and a TO at or before FROM runs past midnight into the next day (the
//! rule belongs to the day it starts). At any moment the rules in force
//! combine to the strictest: `closed` if one says so, else the lowest
//! rate; outside every rule the DP's own `--rate` (or none) holds.

use chrono::{Datelike, Duration as Days, NaiveDate, TimeZone, Timelike};
use time::OffsetDateTime;

/// What a window allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    /// At most this many bytes per second.
    Rate(u64),
    /// Nothing is sent.
    Closed,
}

/// One rule: its days (Monday first), its span in seconds from midnight
/// (`end` past 86 400 runs into the next day) and its limit.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Rule {
    days: [bool; 7],
    start: u32,
    end: u32,
    limit: Limit,
}

/// A DP's windows, in the site's time zone.
#[derive(Clone, Debug)]
pub struct Windows {
    text: String,
    rules: Vec<Rule>,
    zone: tzfile::ArcTz,
}

const DAY_NAMES: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
const DAY_SECS: u32 = 86_400;

/// Full day names, Monday first.
const DAY_FULL: [&str; 7] = [
    "monday",
    "tuesday",
    "wednesday",
    "thursday",
    "friday",
    "saturday",
    "sunday",
];

/// A day by its three-letter or full name, any case.
fn day(name: &str) -> Option<usize> {
    let n = name.to_ascii_lowercase();
    (0..7).find(|&i| n == DAY_NAMES[i] || n == DAY_FULL[i])
}

fn days(spec: &str) -> Result<[bool; 7], String> {
    let mut out = [false; 7];
    if spec.eq_ignore_ascii_case("daily") {
        return Ok([true; 7]);
    }
    for item in spec.split(',') {
        let bad =
            || format!("{item:?} is not a day or a range of days (Mon, Sat,Sun, Mon-Fri, daily)");
        match item.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (day(a).ok_or_else(bad)?, day(b).ok_or_else(bad)?);
                let mut d = a;
                loop {
                    out[d] = true;
                    if d == b {
                        break;
                    }
                    d = (d + 1) % 7;
                }
            }
            None => out[day(item).ok_or_else(bad)?] = true,
        }
    }
    Ok(out)
}

/// Seconds from midnight of `HH:MM[:SS]` (`24:00` allowed).
fn clock(s: &str) -> Result<u32, String> {
    let bad = || format!("{s:?} is not a time of day (HH:MM or HH:MM:SS)");
    let parts: Vec<&str> = s.split(':').collect();
    if !(2..=3).contains(&parts.len()) || parts.iter().any(|p| p.len() != 2) {
        return Err(bad());
    }
    let n: Vec<u32> = parts
        .iter()
        .map(|p| p.parse::<u32>().map_err(|_| bad()))
        .collect::<Result<_, _>>()?;
    let secs = n[0] * 3600 + n[1] * 60 + n.get(2).copied().unwrap_or(0);
    if n[1] > 59 || n.get(2).is_some_and(|&x| x > 59) || secs > DAY_SECS {
        return Err(bad());
    }
    Ok(secs)
}

fn rule(text: &str) -> Result<Rule, String> {
    let words: Vec<&str> = text.split_whitespace().collect();
    let (days_spec, rest) = match words.first() {
        Some(w) if w.contains(':') => ("daily", &words[..]),
        Some(w) => (*w, &words[1..]),
        None => return Err("an empty rule".into()),
    };
    let usage = || {
        format!("{text:?}: a rule is [DAYS] HH:MM-HH:MM rate RATE, or [DAYS] HH:MM-HH:MM closed")
    };
    let (span, limit) = match rest {
        [span, "closed"] => (*span, Limit::Closed),
        [span, "rate", r] => (
            *span,
            Limit::Rate(ferry_core::units::parse_rate(r).map_err(|e| format!("{text:?}: {e}"))?),
        ),
        _ => return Err(usage()),
    };
    let (from, to) = span.split_once('-').ok_or_else(usage)?;
    let (start, mut end) = (clock(from)?, clock(to)?);
    if start == DAY_SECS {
        return Err(format!("{text:?}: a window cannot start at 24:00"));
    }
    if end <= start {
        end += DAY_SECS;
    }
    Ok(Rule {
        days: days(days_spec)?,
        start,
        end,
        limit,
    })
}

impl Windows {
    /// Reads windows in the site's local time zone (`TZ`, else
    /// `/etc/localtime`).
    pub fn parse(text: &str) -> Result<Self, String> {
        let zone = tzfile::Tz::local()
            .map_err(|e| format!("cannot read the site's local time zone: {e}"))?;
        Self::parse_in(text, tzfile::ArcTz::new(zone))
    }

    /// Reads windows in `zone`.
    pub fn parse_in(text: &str, zone: tzfile::ArcTz) -> Result<Self, String> {
        let rules = text
            .split(';')
            .map(str::trim)
            .filter(|r| !r.is_empty())
            .map(rule)
            .collect::<Result<Vec<_>, _>>()?;
        if rules.is_empty() {
            return Err("no window given (\"off\" takes the windows away)".into());
        }
        Ok(Self {
            text: rules_text(text),
            rules,
            zone,
        })
    }

    /// The windows as given (spaces normalised).
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The limit in force at `t` (`None`: no window applies) and the next
    /// moment after `t` at which it may change.
    pub fn at(&self, t: OffsetDateTime) -> (Option<Limit>, OffsetDateTime) {
        let local = self.local(t);
        let date = local.date_naive();
        let tod = local.num_seconds_from_midnight();
        let weekday = date.weekday().num_days_from_monday() as usize;
        let mut limit: Option<Limit> = None;
        for r in &self.rules {
            let today = r.days[weekday] && tod >= r.start && tod < r.end;
            let yesterday = r.days[(weekday + 6) % 7] && r.end > DAY_SECS && tod < r.end - DAY_SECS;
            if today || yesterday {
                limit = Some(match (limit, r.limit) {
                    (Some(Limit::Closed), _) | (_, Limit::Closed) => Limit::Closed,
                    (Some(Limit::Rate(a)), Limit::Rate(b)) => Limit::Rate(a.min(b)),
                    (None, l) => l,
                });
            }
        }
        (limit, self.next_change(t, date))
    }

    fn local(&self, t: OffsetDateTime) -> chrono::DateTime<tzfile::ArcTz> {
        let utc = chrono::DateTime::<chrono::Utc>::from_timestamp(t.unix_timestamp(), 0)
            .unwrap_or_default();
        utc.with_timezone(&self.zone)
    }

    /// The first rule boundary after `t`, looking a week ahead (at most a
    /// week from `t`).
    fn next_change(&self, t: OffsetDateTime, today: NaiveDate) -> OffsetDateTime {
        let limit = t + time::Duration::days(7);
        let mut best = limit;
        for offset in -1..=8 {
            let d = today + Days::days(offset);
            let weekday = d.weekday().num_days_from_monday() as usize;
            for r in self.rules.iter().filter(|r| r.days[weekday]) {
                for secs in [r.start, r.end] {
                    let at = d.and_time(chrono::NaiveTime::MIN) + Days::seconds(i64::from(secs));
                    let Some(when) = self.zone.from_local_datetime(&at).earliest() else {
                        continue;
                    };
                    if let Ok(w) = OffsetDateTime::from_unix_timestamp(when.timestamp()) {
                        if w > t && w < best {
                            best = w;
                        }
                    }
                }
            }
        }
        best
    }

    /// `t` in the site's zone, as an operator reads it: "12:00" today,
    /// else "Tue 12:00".
    pub fn clock_at(&self, t: OffsetDateTime, now: OffsetDateTime) -> String {
        let (l, n) = (self.local(t), self.local(now));
        let hm = format!("{:02}:{:02}", l.hour(), l.minute());
        if l.date_naive() == n.date_naive() {
            hm
        } else {
            let day = DAY_NAMES[l.weekday().num_days_from_monday() as usize];
            format!("{}{} {hm}", day[..1].to_uppercase(), &day[1..])
        }
    }
}

/// The rules as given, one space between words and "; " between rules.
fn rules_text(text: &str) -> String {
    text.split(';')
        .map(|r| r.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|r| !r.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc() -> tzfile::ArcTz {
        tzfile::ArcTz::new(tzfile::Tz::from(chrono::Utc))
    }

    fn t(s: &str) -> OffsetDateTime {
        OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).unwrap()
    }

    #[test]
    fn the_strictest_rule_in_force_holds_and_the_next_boundary_is_found() {
        let w = Windows::parse_in(
            "Monday-FRI  08:00-18:00 rate 5M;daily 12:00-13:00 closed",
            utc(),
        )
        .unwrap();
        assert_eq!(
            w.text(),
            "Monday-FRI 08:00-18:00 rate 5M; daily 12:00-13:00 closed"
        );
        // 2026-12-07 is a Monday.
        let (l, next) = w.at(t("2026-12-07T09:30:00Z"));
        assert_eq!(l, Some(Limit::Rate(5_000_000)));
        assert_eq!(next, t("2026-12-07T12:00:00Z"));
        let (l, next) = w.at(t("2026-12-07T12:10:00Z"));
        assert_eq!(l, Some(Limit::Closed), "closed beats a rate");
        assert_eq!(next, t("2026-12-07T13:00:00Z"));
        let (l, next) = w.at(t("2026-12-07T19:00:00Z"));
        assert_eq!(l, None, "outside every rule");
        assert_eq!(next, t("2026-12-08T08:00:00Z"));
        // Saturday: only the daily rule.
        let (l, next) = w.at(t("2026-12-12T09:00:00Z"));
        assert_eq!(l, None);
        assert_eq!(next, t("2026-12-12T12:00:00Z"));
        assert_eq!(w.clock_at(next, t("2026-12-12T09:00:00Z")), "12:00");
        assert_eq!(
            w.clock_at(t("2026-12-15T08:00:00Z"), t("2026-12-12T09:00:00Z")),
            "Tue 08:00"
        );
    }

    #[test]
    fn a_window_past_midnight_belongs_to_the_day_it_starts() {
        let w = Windows::parse_in(
            "Fri 22:00-06:00 closed; Sat,Sun 10:00:30-10:00:45 rate 100Mbit",
            utc(),
        )
        .unwrap();
        // Friday night and Saturday morning: closed; Thursday night: not.
        assert_eq!(w.at(t("2026-12-11T23:00:00Z")).0, Some(Limit::Closed));
        let (l, next) = w.at(t("2026-12-12T05:59:59Z"));
        assert_eq!(l, Some(Limit::Closed));
        assert_eq!(next, t("2026-12-12T06:00:00Z"));
        assert_eq!(w.at(t("2026-12-10T23:00:00Z")).0, None);
        // Seconds are honoured.
        assert_eq!(
            w.at(t("2026-12-13T10:00:31Z")).0,
            Some(Limit::Rate(12_500_000))
        );
        assert_eq!(w.at(t("2026-12-13T10:00:45Z")).0, None);
    }

    #[test]
    fn a_zone_moves_the_windows_with_its_offset() {
        let berlin = match tzfile::Tz::named("Europe/Berlin") {
            Ok(z) => tzfile::ArcTz::new(z),
            // No tz database on this system: nothing to check.
            Err(_) => return,
        };
        let w = Windows::parse_in("daily 12:00-13:00 closed", berlin).unwrap();
        // 12:30 in Berlin in winter is 11:30 UTC.
        assert_eq!(w.at(t("2026-12-07T11:30:00Z")).0, Some(Limit::Closed));
        assert_eq!(w.at(t("2026-12-07T12:30:00Z")).0, None);
    }

    #[test]
    fn bad_windows_are_named() {
        for (text, what) in [
            ("", "no window"),
            ("Mon 08:00-18:00", "a rule is"),
            ("Funday 08:00-18:00 closed", "not a day"),
            ("Month 08:00-18:00 closed", "not a day"),
            ("08:00-25:00 closed", "not a time"),
            ("8:00-18:00 closed", "not a time"),
            ("08:00-18:00 rate fast", "is not a rate"),
            ("08:00 closed", "a rule is"),
            ("24:00-01:00 closed", "cannot start at 24:00"),
        ] {
            let e = Windows::parse_in(text, utc()).unwrap_err();
            assert!(e.contains(what), "{text:?}: {e}");
        }
    }
}
