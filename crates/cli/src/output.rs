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

pub(crate) use ferry_site::human::{ago, when};

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
