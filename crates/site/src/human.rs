//! Times and spans as a person reads them, for the CLI's tables and the
//! web status page alike (JSON keeps RFC 3339).

use time::OffsetDateTime;

/// How long ago `t` was, as a person says it: "12 s ago", "5 min ago",
/// "3 h ago", "2 d ago" (or "in 10 min").
pub fn ago(t: OffsetDateTime) -> String {
    ago_at(t, OffsetDateTime::now_utc())
}

/// [`ago`] seen from `now`.
pub fn ago_at(t: OffsetDateTime, now: OffsetDateTime) -> String {
    let s = (now - t).whole_seconds();
    match s {
        s if s < -5 => format!("in {}", short_span(-s)),
        s if s < 1 => "now".into(),
        s => format!("{} ago", short_span(s)),
    }
}

fn short_span(s: i64) -> String {
    match s {
        s if s < 60 => format!("{s} s"),
        s if s < 3600 => format!("{} min", s / 60),
        s if s < 86_400 => format!("{} h", s / 3600),
        s => format!("{} d", s / 86_400),
    }
}

/// A time in UTC, short: "Sat 02:00" within a week of now, else
/// "2026-12-24 02:00". Tables say "UTC" in their header: every time Ferry
/// shows is in UTC.
pub fn when(t: OffsetDateTime) -> String {
    when_at(t, OffsetDateTime::now_utc())
}

/// [`when`] seen from `now`.
pub fn when_at(t: OffsetDateTime, now: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    let fmt = if (t - now).whole_days().abs() < 7 {
        "[weekday repr:short] [hour]:[minute]"
    } else {
        "[year]-[month]-[day] [hour]:[minute]"
    };
    time::format_description::parse_borrowed::<2>(fmt)
        .ok()
        .and_then(|f| t.format(&f).ok())
        .unwrap_or_else(|| crate::rfc3339(t))
}

/// Seconds left, short: "42s", "3m05s", "2h10m".
pub fn eta(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{:02}s", s / 60, s % 60),
        s => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

/// A rate in bytes per second: "12.5 MiB/s".
pub fn rate(bytes_per_sec: u64) -> String {
    format!("{}/s", ferry_core::units::bytes(bytes_per_sec))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> OffsetDateTime {
        OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).unwrap()
    }

    #[test]
    fn times_are_short_and_in_utc() {
        let now = t("2026-11-22T01:00:00Z"); // a Sunday
        assert_eq!(ago_at(t("2026-11-22T00:59:48Z"), now), "12 s ago");
        assert_eq!(ago_at(t("2026-11-22T00:55:00+00:00"), now), "5 min ago");
        assert_eq!(ago_at(t("2026-11-21T22:00:00Z"), now), "3 h ago");
        assert_eq!(ago_at(t("2026-11-22T01:10:00Z"), now), "in 10 min");
        assert_eq!(when_at(t("2026-11-28T02:00:00Z"), now), "Sat 02:00");
        // Another zone is shown in UTC.
        assert_eq!(when_at(t("2026-11-28T03:00:00+01:00"), now), "Sat 02:00");
        assert_eq!(when_at(t("2026-12-24T02:00:00Z"), now), "2026-12-24 02:00");
    }

    #[test]
    fn spans_and_rates_are_short() {
        assert_eq!(eta(42), "42s");
        assert_eq!(eta(185), "3m05s");
        assert_eq!(eta(7800), "2h10m");
        assert_eq!(rate(1536), "1.5 KiB/s");
    }
}
