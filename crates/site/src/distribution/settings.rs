//! A DP's operator settings (`ferry dp set NAME …`): validation
//! schedule, client access, maintenance, rate limit, transfer windows and
//! prestaging. A request is checked whole, then written as one change: a
//! setting that does not read leaves every other as it was.

use serde::{Deserialize, Serialize};
use tracing::info;

use crate::distribution::registry::{Hub, HubError};
use crate::schedule::Schedule;
use crate::windows::Windows;

/// Body of `POST /api/v1/dps/{name}/settings`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DpSettings {
    /// Five-field cron (UTC) for scheduled validation; `"off"` clears it.
    #[serde(default)]
    pub validate_schedule: Option<String>,
    /// Let clients without a token download from the DP's HTTPS listener.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anonymous_clients: Option<bool>,
    /// Put the DP in maintenance (no transfer to or from it starts), or
    /// take it out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maintenance: Option<bool>,
    /// Limit the chunk bytes sent to the DP to this many per second; 0
    /// takes the limit away.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<u64>,
    /// Transfer windows in the site's local time ([`crate::windows`]);
    /// `"off"` takes them away.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<String>,
    /// The DP takes its content from prestage bundles only (the site sends
    /// it no chunk), or not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prestaged: Option<bool>,
}

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
    hub.set_dp(dp, |d| {
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
    })?;
    info!(%dp, settings = ?s, "DP settings changed");
    Ok(())
}
