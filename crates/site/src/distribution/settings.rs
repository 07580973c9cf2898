//! A DP's operator settings (`ferry dp set NAME …`): validation
//! schedule, client access, maintenance, rate limit, transfer windows,
//! prestaging and the DPs it pulls from. A request is checked whole, then written as one change: a
//! setting that does not read leaves every other as it was.

use tracing::info;

use crate::distribution::records::Registry;
use crate::distribution::registry::{Hub, HubError};
use crate::schedule::Schedule;
use crate::windows::Windows;

pub use ferry_api::requests::DpSettings;

/// `text`, unless it says "off" (or nothing): `None`.
fn unless_off(text: &str) -> Option<&str> {
    let t = text.trim();
    (!t.is_empty() && !t.eq_ignore_ascii_case("off")).then_some(t)
}

/// Sets what `s` names of DP `dp`'s settings; the DP hears at once.
pub fn set(hub: &Hub, dp: &str, s: &DpSettings) -> Result<(), HubError> {
    // Checked first: nothing changes when one does not read.
    let schedule = match s.validate_schedule.as_deref().map(unless_off) {
        Some(Some(expr)) => Some(Some(
            Schedule::parse(expr)
                .map_err(|e| HubError::Invalid(format!("--validate-schedule {e}")))?
                .expr()
                .to_string(),
        )),
        Some(None) => Some(None),
        None => None,
    };
    let window = match s.window.as_deref().map(unless_off) {
        Some(Some(text)) => Some(Some(
            Windows::parse(text)
                .map_err(|e| HubError::Invalid(format!("--window {e}")))?
                .text()
                .to_string(),
        )),
        Some(None) => Some(None),
        None => None,
    };
    hub.update(true, |reg| {
        let d = reg
            .dps
            .get_mut(dp)
            .ok_or_else(|| HubError::NoDp(dp.to_string()))?;
        if let Some(schedule) = schedule {
            d.validation.schedule = schedule;
            d.validation.last_scheduled = Some(crate::now());
        }
        if let Some(on) = s.anonymous_clients {
            d.anonymous_clients = on;
        }
        if let Some(on) = s.maintenance {
            d.maintenance = on;
        }
        if let Some(rate) = s.rate {
            d.rate = (rate > 0).then_some(rate);
        }
        if let Some(window) = window {
            d.window = window;
        }
        if let Some(on) = s.prestaged {
            d.prestaged = on;
        }
        if let Some(sources) = &s.pull_from {
            let mut sources = sources.clone();
            sources.sort_by(|a, b| (a.rank, &a.dp).cmp(&(b.rank, &b.dp)));
            d.pull_from = sources;
            check_sources(reg, dp)?;
        }
        Ok(())
    })?;
    info!(%dp, settings = ?s, "DP settings changed");
    Ok(())
}

/// Checks the sources of pull DP `dp` in `reg`: each an enrolled DP, not
/// revoked, named once, not `dp` itself, and no loop back to `dp` (the
/// registry had none before this change, so a new one runs through `dp`).
fn check_sources(reg: &Registry, dp: &str) -> Result<(), HubError> {
    let Some(d) = reg.dps.get(dp) else {
        return Err(HubError::NoDp(dp.to_string()));
    };
    let mut seen = std::collections::BTreeSet::new();
    for s in &d.pull_from {
        if s.dp == dp {
            return Err(HubError::Invalid(format!(
                "--pull-from: DP {dp} cannot pull from itself"
            )));
        }
        if !seen.insert(&s.dp) {
            return Err(HubError::Invalid(format!(
                "--pull-from: {} is named twice",
                s.dp
            )));
        }
        match reg.dps.get(&s.dp) {
            None => return Err(HubError::NoDp(s.dp.clone())),
            Some(src) if src.revoked.is_some() => {
                return Err(HubError::Invalid(format!(
                    "--pull-from: DP {} is revoked",
                    s.dp
                )))
            }
            Some(_) => {}
        }
    }
    // Depth first from dp's sources; a path back to dp is the loop.
    let mut stack: Vec<Vec<&str>> = d.pull_from.iter().map(|s| vec![dp, &s.dp]).collect();
    let mut done = std::collections::BTreeSet::new();
    while let Some(path) = stack.pop() {
        let at = path[path.len() - 1];
        if at == dp {
            return Err(HubError::Invalid(format!(
                "--pull-from would make a loop: {} (each pulls from the next)",
                path.join(" → ")
            )));
        }
        if !done.insert(at) {
            continue;
        }
        for s in reg
            .dps
            .get(at)
            .map(|d| d.pull_from.as_slice())
            .unwrap_or(&[])
        {
            let mut next = path.clone();
            next.push(&s.dp);
            stack.push(next);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distribution::records::{DpRecord, PullFrom};

    fn reg(edges: &[(&str, &[&str])]) -> Registry {
        let mut r = Registry::default();
        for (dp, from) in edges {
            let mut d = DpRecord::new(dp);
            d.pull_from = from
                .iter()
                .map(|s| PullFrom {
                    dp: s.to_string(),
                    rank: 1,
                })
                .collect();
            r.dps.insert(dp.to_string(), d);
        }
        r
    }

    #[test]
    fn chains_and_trees_pass_and_a_loop_through_the_dp_is_named() {
        // a ← b ← c, a ← d: a tree of chains.
        let r = reg(&[("a", &[]), ("b", &["a"]), ("c", &["b"]), ("d", &["a", "b"])]);
        for dp in ["a", "b", "c", "d"] {
            check_sources(&r, dp).unwrap();
        }
        // a now pulls from c: a → c → b → a.
        let r = reg(&[("a", &["c"]), ("b", &["a"]), ("c", &["b"])]);
        let e = check_sources(&r, "a").unwrap_err().to_string();
        assert!(e.contains("a → c → b → a"), "{e}");
        let r = reg(&[("a", &["a"])]);
        assert!(check_sources(&r, "a")
            .unwrap_err()
            .to_string()
            .contains("itself"));
        let r = reg(&[("a", &["b", "b"]), ("b", &[])]);
        assert!(check_sources(&r, "a")
            .unwrap_err()
            .to_string()
            .contains("twice"));
        let r = reg(&[("a", &["x"])]);
        assert!(matches!(check_sources(&r, "a"), Err(HubError::NoDp(n)) if n == "x"));
        let mut r = reg(&[("a", &["b"]), ("b", &[])]);
        r.dps.get_mut("b").unwrap().revoked = Some(crate::now());
        assert!(check_sources(&r, "a")
            .unwrap_err()
            .to_string()
            .contains("revoked"));
    }
}
