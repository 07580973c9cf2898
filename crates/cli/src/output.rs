//! Tables and JSON for operators.

use comfy_table::{presets::UTF8_BORDERS_ONLY, ContentArrangement, Table};
use serde::Serialize;
use time::OffsetDateTime;

pub(crate) use ferry_core::units::bytes;

/// Width of tables when stdout is not a terminal (a pipe, a log, a mail).
pub(crate) const PIPE_WIDTH: u16 = 100;

/// A table with Ferry's look: as wide as the terminal, or [`PIPE_WIDTH`]
/// columns when not on one; long cells wrap.
pub(crate) fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_BORDERS_ONLY)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header(header.to_vec());
    if !std::io::IsTerminal::is_terminal(&std::io::stdout()) {
        t.set_width(PIPE_WIDTH);
    }
    t
}

/// How long ago `t` was, as a person says it: "12 s ago", "5 min ago",
/// "3 h ago", "2 d ago" (or "in 10 min").
pub(crate) fn ago(t: OffsetDateTime) -> String {
    ago_at(t, OffsetDateTime::now_utc())
}

fn ago_at(t: OffsetDateTime, now: OffsetDateTime) -> String {
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
pub(crate) fn when(t: OffsetDateTime) -> String {
    when_at(t, OffsetDateTime::now_utc())
}

fn when_at(t: OffsetDateTime, now: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    let fmt = if (t - now).whole_days().abs() < 7 {
        "[weekday repr:short] [hour]:[minute]"
    } else {
        "[year]-[month]-[day] [hour]:[minute]"
    };
    time::format_description::parse_borrowed::<2>(fmt)
        .ok()
        .and_then(|f| t.format(&f).ok())
        .unwrap_or_else(|| rfc3339(t))
}

/// `t` as RFC 3339, where a table shows the whole time.
pub(crate) fn rfc3339(t: OffsetDateTime) -> String {
    ferry_site::rfc3339(t)
}

/// Under `--json` prints `v`, else runs `human` (which prints the text).
pub(crate) fn emit<T: Serialize>(
    g: &crate::Global,
    v: &T,
    human: impl FnOnce(),
) -> anyhow::Result<()> {
    if g.json {
        return print_json(v);
    }
    human();
    Ok(())
}

/// A failure whose outcome is printed already (main prints nothing more).
#[derive(Debug)]
pub(crate) struct Reported;

impl std::fmt::Display for Reported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("(reported above)")
    }
}

impl std::error::Error for Reported {}

/// Prints `v`, the outcome of a command that failed: under `--json` as one
/// document, `v` with `error` and `code` added (the error is [`Reported`]);
/// else `human` prints the text and the error is `message`.
pub(crate) fn failed_with<T: Serialize>(
    g: &crate::Global,
    v: &T,
    code: &str,
    message: String,
    human: impl FnOnce(),
) -> anyhow::Error {
    if !g.json {
        human();
        return anyhow::anyhow!(message);
    }
    let mut doc = serde_json::to_value(v).unwrap_or_default();
    match doc.as_object_mut() {
        Some(o) => {
            o.insert("error".into(), message.into());
            o.insert("code".into(), code.into());
        }
        None => doc = serde_json::json!({ "error": message, "code": code, "result": doc }),
    }
    match print_json(&doc) {
        Ok(()) => Reported.into(),
        Err(e) => e,
    }
}

/// Prints `v` as pretty JSON.
pub(crate) fn print_json<T: Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// `part / whole` as a percentage with one decimal.
pub(crate) fn percent(part: u64, whole: u64) -> String {
    if whole == 0 {
        return "-".into();
    }
    format!("{:.1}%", part as f64 * 100.0 / whole as f64)
}

/// A progress bar of bytes on stderr, drawn only when `show` and stderr is
/// a terminal (hidden otherwise: logs and pipes get no control codes).
pub(crate) fn byte_bar(show: bool, total: u64, msg: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::hidden();
    bar.set_length(total);
    if show && std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_message(msg.to_string());
    }
    bar
}

/// One multicast session of DP `dp` on one line or two (status, dp list).
pub(crate) fn session_line(dp: &str, v: &ferry_mcast::SessionView) -> String {
    let state = match v.state.as_str() {
        "sending" => format!("sending pass {}", v.passes),
        "ended" => format!("ended after {} pass(es)", v.passes),
        s => s.to_string(),
    };
    let mut line = format!(
        "multicast {dp} {} r{} session {}{}: {state}; clients {} joined, {} done, {} left",
        v.package,
        v.revision,
        v.session,
        if v.encrypted { " (encrypted)" } else { "" },
        v.clients_joined,
        v.clients_done,
        v.clients_left,
    );
    line += &format!(
        "\n  {} at {} Mbit/s, {} sent ({:.2}x the package)",
        v.address,
        v.rate * 8 / 1_000_000,
        bytes(v.bytes_sent),
        v.cost()
    );
    if !v.dropped.is_empty() {
        let why: Vec<String> = v.dropped.iter().map(|(k, n)| format!("{k} {n}")).collect();
        line += &format!("; clients dropped {}", why.join(", "));
    }
    if v.send_errors > 0 {
        line += &format!("; {} sends refused", v.send_errors);
    }
    line
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
}
