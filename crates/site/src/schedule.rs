//! Standard five-field cron expressions (minute hour day-of-month month
//! weekday), in UTC unless they start with `CRON_TZ=ZONE` (as cronie's
//! crontab(5) has it; `TZ=` too), ZONE a name of the system's tz database
//! (`Europe/Berlin`): servicing jobs' `--schedule` and DPs' validation
//! schedules. In a zone, times follow its daylight saving changes. Six
//! fields, with seconds first, are taken too (for schedules finer than a
//! minute, as tests use).
//!
//! Weekdays are 0–6 from Sunday (7 is Sunday too) or `SUN`…`SAT`, as in
//! crontab(5). The `cron` crate counts weekdays from 1 = Sunday and wants a
//! seconds field, so expressions are translated for it here: every weekday
//! is spelled out by name. Standard cron ORs a restricted day of the month
//! with a restricted weekday; the `cron` crate ANDs them, so such an
//! expression is refused rather than scheduled differently.

use std::str::FromStr;

use time::OffsetDateTime;

const DAYS: [&str; 7] = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"];

/// A parsed schedule.
#[derive(Clone, Debug)]
pub struct Schedule {
    expr: String,
    inner: cron::Schedule,
    /// The stated zone; UTC when `None`.
    zone: Option<tzfile::ArcTz>,
}

fn weekday(token: &str) -> Option<usize> {
    if let Ok(n) = token.parse::<usize>() {
        return (n <= 7).then_some(n % 7);
    }
    DAYS.iter().position(|d| d.eq_ignore_ascii_case(token))
}

/// The set of weekdays (0 = Sunday) a weekday field names.
fn weekdays(field: &str) -> Result<[bool; 7], String> {
    let mut set = [false; 7];
    for part in field.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((r, s)) => (
                r,
                s.parse::<usize>()
                    .ok()
                    .filter(|&s| s > 0)
                    .ok_or_else(|| format!("{s:?} is not a step"))?,
            ),
            None => (part, 1),
        };
        let (from, to) = if range == "*" {
            (0, 6)
        } else if let Some((a, b)) = range.split_once('-') {
            let a = weekday(a).ok_or_else(|| format!("{a:?} is not a weekday"))?;
            // `5-7` (Friday to Sunday) ends on 7, not 0.
            let b = if b == "7" {
                7
            } else {
                weekday(b).ok_or_else(|| format!("{b:?} is not a weekday"))?
            };
            if b < a {
                return Err(format!("{range:?} runs backwards"));
            }
            (a, b)
        } else {
            let d = weekday(range).ok_or_else(|| format!("{range:?} is not a weekday"))?;
            (d, if step > 1 { 6 } else { d })
        };
        for d in (from..=to).step_by(step) {
            set[d % 7] = true;
        }
    }
    Ok(set)
}

impl Schedule {
    /// Parses a five-field expression (or six, seconds first). Errors name
    /// the expression and say what is wrong, for the flag's user.
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
        let second = if fields.len() == 6 {
            fields.remove(0)
        } else {
            "0"
        };
        let [minute, hour, dom, month, dow] = fields[..] else {
            return Err(format!(
                "{expr:?} is not a cron expression: it needs 5 fields (minute hour day-of-month month weekday), e.g. \"0 2 * * 6\" for Saturdays at 02:00 UTC"
            ));
        };
        if dom != "*" && dow != "*" {
            return Err(format!(
                "{expr:?}: give a day of the month or a weekday, not both"
            ));
        }
        let days = weekdays(dow).map_err(|e| format!("{expr:?}: weekday field: {e}"))?;
        let dow = if days.iter().all(|&d| d) {
            "*".to_string()
        } else {
            DAYS.iter()
                .zip(days)
                .filter(|(_, on)| *on)
                .map(|(d, _)| *d)
                .collect::<Vec<_>>()
                .join(",")
        };
        let full = format!("{second} {minute} {hour} {dom} {month} {dow}");
        let inner = cron::Schedule::from_str(&full).map_err(|e| format!("{expr:?}: {e}"))?;
        Ok(Self {
            expr: expr.split_whitespace().collect::<Vec<_>>().join(" "),
            inner,
            zone,
        })
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
                .after(&after.with_timezone(tz))
                .next()?
                .timestamp(),
            None => self.inner.after(&after).next()?.timestamp(),
        };
        OffsetDateTime::from_unix_timestamp(next).ok()
    }
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
        let e = Schedule::parse("0 0 1 * 1").unwrap_err();
        assert!(e.contains("not both"), "{e}");
        assert!(Schedule::parse("0 0 * * 8")
            .unwrap_err()
            .contains("weekday"));
        assert!(Schedule::parse("0 0 * * 5-2")
            .unwrap_err()
            .contains("backwards"));
        assert!(Schedule::parse("99 * * * *").is_err());
        assert_eq!(Schedule::parse(" 0  3 * * * ").unwrap().expr(), "0 3 * * *");
    }
}
