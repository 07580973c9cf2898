//! Tables and JSON for operators.

use comfy_table::{presets::UTF8_BORDERS_ONLY, ContentArrangement, Table};
use serde::Serialize;

pub(crate) use ferry_core::units::bytes;

/// A table with Ferry's look.
pub(crate) fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_BORDERS_ONLY)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header(header.to_vec());
    t
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
