//! Standard five-field cron expressions (minute hour day-of-month month
//! weekday), in UTC unless they start with `CRON_TZ=ZONE` (as cronie's
//! crontab(5) has it; `TZ=` too), ZONE a name of the system's tz database
//! (`Europe/Berlin`): servicing jobs' `--schedule` and DPs' validation
//! schedules. In a zone, times follow its daylight saving changes. Six
//! fields, with seconds first, are taken too (for schedules finer than a
//! minute, as tests use).
//!
//! Parsed and evaluated by `croner`, which follows crontab(5): weekdays
//! 0–6 from Sunday (7 is Sunday too) or `SUN`…`SAT`, and a restricted day
//! of the month with a restricted weekday matches either (`0 0 1 * 1`: the
//! 1st of every month and every Monday).

use croner::parser::{CronParser, Seconds, Year};
use croner::Cron;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// A parsed schedule.
#[derive(Clone, Debug)]
pub struct Schedule {
    expr: String,
    inner: Cron,
    /// The stated zone; UTC when `None`.
    zone: Option<tzfile::ArcTz>,
}

/// Names of the fields, for messages.
const FIELDS: [&str; 5] = ["minute", "hour", "day-of-month", "month", "weekday"];

fn parser() -> CronParser {
    CronParser::builder()
        .seconds(Seconds::Optional)
        .year(Year::Disallowed)
        .build()
}

impl Schedule {
    /// Parses a five-field expression (or six, seconds first). Errors name
    /// the expression and the field that is wrong, for the flag's user.
    pub fn parse(expr: &str) -> Result<Self, String> {
        let mut fields: Vec<&str> = expr.split_whitespace().collect();
        let zone_name = fields.first().and_then(|f| {
            f.strip_prefix("CRON_TZ=")
                .or_else(|| f.strip_prefix("TZ="))
                .map(str::to_string)
        });
        let zone = match &zone_name {
            Some(name) => {
                fields.remove(0);
                let tz = tzfile::Tz::named(name).map_err(|e| {
                    format!(
                        "{expr:?}: {name:?} is not a time zone of this system's tz database ({e}); give a name such as Europe/Berlin or America/New_York, or leave CRON_TZ= out for UTC"
                    )
                })?;
                Some(tzfile::ArcTz::new(tz))
            }
            None => None,
        };
        let five = match fields.len() {
            5 => &fields[..],
            6 => &fields[1..],
            _ => {
                return Err(format!(
                    "{expr:?} is not a cron expression: it needs 5 fields (minute hour day-of-month month weekday), e.g. \"0 2 * * 6\" for Saturdays at 02:00 UTC"
                ))
            }
        };
        // croner reads an empty item of a list (`0 , , * 6`) as a field
        // that matches nothing: a schedule that never fires, found only
        // after searching years ahead.
        for (i, f) in five.iter().enumerate() {
            if f.split(',').any(str::is_empty) {
                return Err(format!(
                    "{expr:?}: {} field {f:?} has an empty item in its list",
                    FIELDS[i]
                ));
            }
        }
        let inner = parser().parse(&fields.join(" ")).map_err(|e| {
            // Name the field: the first that fails alone among stars.
            let field = (0..5).find(|&i| {
                let mut alone = ["*"; 5];
                alone[i] = five[i];
                parser().parse(&alone.join(" ")).is_err()
            });
            match field {
                Some(i) => format!("{expr:?}: {} field {:?}: {e}", FIELDS[i], five[i]),
                None => format!("{expr:?}: {e}"),
            }
        })?;
        let schedule = Self {
            expr: expr.split_whitespace().collect::<Vec<_>>().join(" "),
            inner,
            zone,
        };
        // A day that does not exist (`0 0 30 2 *`) reads, and never comes.
        if schedule.next_after(OffsetDateTime::now_utc()).is_none() {
            return Err(format!(
                "{expr:?} never fires: no such day comes (the 30th of February, the 31st of April?)"
            ));
        }
        Ok(schedule)
    }

    /// The zone the expression is read in: a tz database name, or "UTC".
    pub fn zone(&self) -> &str {
        self.expr
            .split_whitespace()
            .next()
            .and_then(|f| f.strip_prefix("CRON_TZ=").or_else(|| f.strip_prefix("TZ=")))
            .unwrap_or("UTC")
    }

    /// The expression as given (spaces normalised).
    pub fn expr(&self) -> &str {
        &self.expr
    }

    /// The first time strictly after `after`.
    pub fn next_after(&self, after: OffsetDateTime) -> Option<OffsetDateTime> {
        let after = chrono::DateTime::<chrono::Utc>::from_timestamp(after.unix_timestamp(), 0)?;
        let next = match &self.zone {
            Some(tz) => self
                .inner
                .find_next_occurrence(&after.with_timezone(tz), false)
                .ok()?
                .timestamp(),
            None => self
                .inner
                .find_next_occurrence(&after, false)
                .ok()?
                .timestamp(),
        };
        OffsetDateTime::from_unix_timestamp(next).ok()
    }
}

/// Reads `--at`: RFC 3339, `YYYY-MM-DD HH:MM[:SS]` (UTC), or `+N[s|m|h|d]`.
pub fn parse_at(at: &str, now: OffsetDateTime) -> Result<OffsetDateTime, String> {
    let at = at.trim();
    if let Some(rel) = at.strip_prefix('+') {
        let d = humantime::parse_duration(rel.trim()).map_err(|e| match e {
            humantime::DurationError::NumberOverflow => format!("--at {at:?} is too far ahead"),
            e => {
                format!("--at {at:?}: expected + and a duration such as +90s, +30m or +1h30m ({e})")
            }
        })?;
        return time::Duration::try_from(d)
            .ok()
            .and_then(|d| now.checked_add(d))
            .ok_or_else(|| format!("--at {at:?} is too far ahead"));
    }
    if let Ok(t) = OffsetDateTime::parse(at, &Rfc3339) {
        return Ok(t);
    }
    for fmt in [
        "[year]-[month]-[day] [hour]:[minute]:[second]",
        "[year]-[month]-[day] [hour]:[minute]",
    ] {
        let Ok(f) = time::format_description::parse_borrowed::<2>(fmt) else {
            continue;
        };
        if let Ok(t) = time::PrimitiveDateTime::parse(at, &f) {
            return Ok(t.assume_utc());
        }
    }
    Err(format!(
        "--at {at:?} is not a time: give RFC 3339 (2026-11-22T03:00:00Z), \"2026-11-22 03:00\" (UTC) or +30m"
    ))
}

/// Parses a `--schedule`: standard five-field cron (minute hour
/// day-of-month month weekday, weekdays 0–6 from Sunday, 7 also Sunday,
/// or names), in UTC ([`Schedule`]).
pub fn parse_cron(expr: &str) -> Result<Schedule, String> {
    Schedule::parse(expr).map_err(|e| format!("--schedule {e}"))
}

/// The next occurrence of `expr` strictly after `after`.
pub fn next_occurrence(expr: &str, after: OffsetDateTime) -> Result<OffsetDateTime, String> {
    parse_cron(expr)?
        .next_after(after)
        .ok_or_else(|| format!("--schedule {expr:?} never fires again"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::Weekday;

    fn datetime(s: &str) -> OffsetDateTime {
        OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).unwrap()
    }

    fn next(expr: &str, after: OffsetDateTime) -> OffsetDateTime {
        Schedule::parse(expr).unwrap().next_after(after).unwrap()
    }

    #[test]
    fn weekdays_count_from_sunday_as_crontab_does() {
        // 2026-12-01 is a Tuesday.
        let t = datetime("2026-12-01T12:00:00Z");
        assert_eq!(next("0 2 * * 6", t).weekday(), Weekday::Saturday);
        assert_eq!(next("0 2 * * 0", t).weekday(), Weekday::Sunday);
        assert_eq!(next("0 2 * * 7", t).weekday(), Weekday::Sunday);
        assert_eq!(next("0 2 * * sat", t).weekday(), Weekday::Saturday);
        assert_eq!(next("30 3 * * 1-5", t), datetime("2026-12-02T03:30:00Z"));
        let fri = next("0 0 * * 5-7", t);
        assert_eq!(fri, datetime("2026-12-04T00:00:00Z"));
        assert_eq!(next("0 0 * * 5-7", fri).weekday(), Weekday::Saturday);
        assert_eq!(next("0 3 * * *", t), datetime("2026-12-02T03:00:00Z"));
        assert_eq!(next("*/15 * * * *", t), datetime("2026-12-01T12:15:00Z"));
        assert_eq!(next("0 0 1 * *", t), datetime("2027-01-01T00:00:00Z"));
    }

    #[test]
    fn a_day_of_month_with_a_weekday_matches_either_as_crontab_has_it() {
        // 2026-12-01 is a Tuesday: the next Monday is the 7th, then the
        // 14th, 21st, 28th; then the 1st of January (a Friday).
        let s = Schedule::parse("0 0 1 * 1").unwrap();
        let mut t = datetime("2026-12-01T12:00:00Z");
        let mut runs = Vec::new();
        for _ in 0..5 {
            t = s.next_after(t).unwrap();
            runs.push(t);
        }
        assert_eq!(
            runs,
            [
                "2026-12-07T00:00:00Z",
                "2026-12-14T00:00:00Z",
                "2026-12-21T00:00:00Z",
                "2026-12-28T00:00:00Z",
                "2027-01-01T00:00:00Z",
            ]
            .map(datetime)
        );
        assert_eq!(runs[4].weekday(), Weekday::Friday, "the 1st, not a Monday");
    }

    #[test]
    fn a_stated_zone_is_followed_through_daylight_saving() {
        // Saturdays at 02:00 in Berlin: 01:00 UTC in winter, 00:00 in summer.
        let s = Schedule::parse("CRON_TZ=Europe/Berlin 0 2 * * 6").unwrap();
        assert_eq!(s.zone(), "Europe/Berlin");
        let winter = s.next_after(datetime("2026-12-01T12:00:00Z")).unwrap();
        assert_eq!(winter, datetime("2026-12-05T01:00:00Z"));
        let summer = s.next_after(datetime("2026-07-01T12:00:00Z")).unwrap();
        assert_eq!(summer, datetime("2026-07-04T00:00:00Z"));
        let ny = next(
            "TZ=America/New_York 30 8 * * 1-5",
            datetime("2026-12-01T12:00:00Z"),
        );
        assert_eq!(ny, datetime("2026-12-01T13:30:00Z"));
        assert_eq!(Schedule::parse("0 2 * * 6").unwrap().zone(), "UTC");
        let e = Schedule::parse("CRON_TZ=Mars/Olympus 0 2 * * 6").unwrap_err();
        assert!(e.contains("not a time zone"), "{e}");
    }

    #[test]
    fn malformed_expressions_say_what_is_wrong() {
        let e = Schedule::parse("* * *").unwrap_err();
        assert!(e.contains("5 fields"), "{e}");
        assert!(Schedule::parse("0 0 * * 8")
            .unwrap_err()
            .contains("weekday field \"8\""));
        let e = Schedule::parse("0 0 * * 5-2").unwrap_err();
        assert!(e.contains("weekday field \"5-2\""), "{e}");
        let e = Schedule::parse("0 25 * * *").unwrap_err();
        assert!(e.contains("hour field \"25\""), "{e}");
        assert!(Schedule::parse("99 * * * *").is_err());
        assert_eq!(Schedule::parse(" 0  3 * * * ").unwrap().expr(), "0 3 * * *");
    }

    #[test]
    fn at_accepts_rfc3339_plain_utc_and_relative() {
        let now = datetime("2026-11-22T01:00:00Z");
        assert_eq!(
            parse_at("2026-11-22T03:00:00Z", now).unwrap(),
            datetime("2026-11-22T03:00:00Z")
        );
        assert_eq!(
            parse_at("2026-11-22 03:00", now).unwrap(),
            datetime("2026-11-22T03:00:00Z")
        );
        assert_eq!(
            parse_at("+90s", now).unwrap(),
            datetime("2026-11-22T01:01:30Z")
        );
        assert_eq!(
            parse_at("+2h", now).unwrap(),
            datetime("2026-11-22T03:00:00Z")
        );
        assert!(parse_at("tomorrow", now)
            .unwrap_err()
            .contains("not a time"));
        assert_eq!(
            parse_at("+1h30m", now).unwrap(),
            datetime("2026-11-22T02:30:00Z")
        );
        assert!(parse_at("+3 fortnights", now)
            .unwrap_err()
            .contains("+1h30m"));
        assert!(parse_at("+9223372036854775807d", now)
            .unwrap_err()
            .contains("too far"));
    }

    #[test]
    fn cron_is_standard_five_fields_in_utc_with_weekdays_from_sunday() {
        // 2026-11-22 is a Sunday.
        let now = datetime("2026-11-22T01:00:00Z");
        assert_eq!(
            next_occurrence("30 3 * * *", now).unwrap(),
            datetime("2026-11-22T03:30:00Z")
        );
        // The README's "Saturday at 02:00".
        assert_eq!(
            next_occurrence("0 2 * * 6", now).unwrap(),
            datetime("2026-11-28T02:00:00Z")
        );
        for sunday in ["0 2 * * 0", "0 2 * * 7", "0 2 * * sun"] {
            assert_eq!(
                next_occurrence(sunday, now).unwrap(),
                datetime("2026-11-22T02:00:00Z"),
                "{sunday}"
            );
        }
        assert_eq!(
            next_occurrence("0 2 * * MON-FRI", now).unwrap(),
            datetime("2026-11-23T02:00:00Z")
        );
        let e = parse_cron("* * *").unwrap_err();
        assert!(e.contains("5 fields") && e.contains("\"* * *\""), "{e}");
        let e = parse_cron("0 2 * * 8").unwrap_err();
        assert!(
            e.contains("\"0 2 * * 8\"") && !e.contains("0 0 2"),
            "names what was typed: {e}"
        );
        assert!(parse_cron("99 * * * *").is_err());
        // Found by fuzzing: an empty item read as "never", then searched
        // for years ahead at every evaluation.
        let e = parse_cron("0 , , * 6").unwrap_err();
        assert!(e.contains("hour field \",\" has an empty item"), "{e}");
        assert!(parse_cron("0 0 1, * *").unwrap_err().contains("empty item"));
        let e = parse_cron("0 0 30 2 *").unwrap_err();
        assert!(e.contains("never fires"), "{e}");
        assert!(parse_cron("0 0 29 2 *").is_ok(), "leap days come");
        // Six fields: seconds first, weekdays as in five.
        assert_eq!(
            next_occurrence("*/10 * * * * *", now).unwrap(),
            datetime("2026-11-22T01:00:10Z")
        );
        assert_eq!(
            next_occurrence("0 0 2 * * 6", now).unwrap(),
            datetime("2026-11-28T02:00:00Z")
        );
    }
}
