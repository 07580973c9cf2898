//! Content validation on DPs, as the site drives it: requests on demand
//! (`ferry dp validate`), on each DP's schedule (`ferry dp set
//! --validate-schedule`), and the results the DPs report.
//!
//! A request is a number in the DP's record, pushed with its assignments;
//! the DP re-hashes what it holds and answers that number once per
//! package (see `ferry_dp::validate`). A DP that is offline when a request
//! is made answers when it next connects.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tracing::{info, warn};

use crate::distribution::live::Connections;
use crate::distribution::records::ValidationResult;
use crate::distribution::registry::{Hub, HubError};
use crate::schedule::Schedule;

pub use ferry_api::requests::ValidateRequest;

/// Answer of `POST /api/v1/dps/{name}/validate`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ValidateReply {
    /// The DP.
    pub dp: String,
    /// The request's number: results answering it carry it.
    pub request: u64,
    /// Whether the DP is connected (else it validates when it connects).
    pub online: bool,
    /// Packages the DP holds that it will validate.
    pub packages: Vec<String>,
}

/// One package's last validation on a DP.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ValidationRow {
    /// The package.
    pub package: String,
    /// The result (or the progress of a run in progress).
    #[serde(flatten)]
    pub result: ValidationResult,
}

/// Answer of `GET /api/v1/dps/{name}/validation`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ValidationView {
    /// The DP.
    pub dp: String,
    /// Whether it is connected.
    pub online: bool,
    /// Its schedule, if any.
    pub schedule: Option<String>,
    /// When the schedule runs next (RFC 3339, UTC).
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub next_run: Option<OffsetDateTime>,
    /// The latest request's number.
    pub requested: u64,
    /// When it was made.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub requested_at: Option<OffsetDateTime>,
    /// Packages the DP holds now (what a request covers).
    pub holds: Vec<String>,
    /// Last result per package.
    pub results: Vec<ValidationRow>,
}

/// Packages DP `dp` holds whole now.
fn holds(hub: &Hub, dp: &str) -> Vec<String> {
    let reg = hub.snapshot();
    let assigned = reg.assigned(dp);
    reg.dps
        .get(dp)
        .map(|d| {
            d.transfers
                .iter()
                .filter(|(p, t)| t.state.holds() && assigned.contains(*p))
                .map(|(p, _)| p.clone())
                .collect()
        })
        .unwrap_or_default()
}

/// Asks `dp` to validate.
pub fn request(
    hub: &Hub,
    conns: &Connections,
    dp: &str,
    req: &ValidateRequest,
) -> Result<ValidateReply, HubError> {
    let held = holds(hub, dp);
    for p in &req.packages {
        if !held.contains(p) {
            return Err(HubError::Conflict(format!(
                "DP {dp} does not hold {p} (see `ferry status --dp {dp}`)"
            )));
        }
    }
    let n = hub.request_validation(dp, &req.packages)?;
    info!(%dp, request = n, packages = ?req.packages, "validation requested");
    Ok(ValidateReply {
        dp: dp.to_string(),
        request: n,
        online: conns.is_online(dp),
        packages: if req.packages.is_empty() {
            held
        } else {
            req.packages.clone()
        },
    })
}

/// What `ferry dp validation NAME` shows.
pub fn view(hub: &Hub, conns: &Connections, dp: &str) -> Result<ValidationView, HubError> {
    let reg = hub.snapshot();
    let d = reg.dps.get(dp).ok_or_else(|| HubError::NoDp(dp.into()))?;
    let v = &d.validation;
    let next_run = v.schedule.as_deref().and_then(|s| {
        let sched = Schedule::parse(s).ok()?;
        let after = v.last_scheduled.unwrap_or_else(OffsetDateTime::now_utc);
        sched.next_after(after)
    });
    Ok(ValidationView {
        dp: dp.to_string(),
        online: conns.is_online(dp),
        schedule: v.schedule.clone(),
        next_run,
        requested: v.requested,
        requested_at: v.requested_at,
        holds: holds(hub, dp),
        results: v
            .results
            .iter()
            .map(|(p, r)| ValidationRow {
                package: p.clone(),
                result: r.clone(),
            })
            .collect(),
    })
}

/// Longest sleep of the scheduler (it also wakes on registry changes).
const SCHEDULER_NAP: Duration = Duration::from_secs(60);

/// Requests the scheduled validations when they fall due, for as long as
/// the site runs.
pub async fn scheduler(hub: Arc<Hub>) {
    let mut changes = hub.subscribe();
    loop {
        let now = OffsetDateTime::now_utc();
        let mut earliest: Option<OffsetDateTime> = None;
        for d in hub.snapshot().dps.values() {
            let Some(expr) = d.validation.schedule.as_deref() else {
                continue;
            };
            if d.revoked.is_some() {
                continue;
            }
            let sched = match Schedule::parse(expr) {
                Ok(s) => s,
                Err(e) => {
                    warn!(dp = %d.name, error = %e, "unusable validation schedule");
                    continue;
                }
            };
            let last = d.validation.last_scheduled.unwrap_or(now);
            let Some(next) = sched.next_after(last) else {
                continue;
            };
            if next <= now {
                match hub.scheduled_validation(&d.name, next) {
                    Ok(n) => info!(dp = %d.name, request = n, "scheduled validation requested"),
                    Err(e) => {
                        warn!(dp = %d.name, error = %e, "cannot request a scheduled validation")
                    }
                }
                if let Some(after) = sched.next_after(next.max(now)) {
                    earliest = Some(earliest.map_or(after, |e| e.min(after)));
                }
            } else {
                earliest = Some(earliest.map_or(next, |e| e.min(next)));
            }
        }
        let nap = earliest
            .map(|t| (t - now).unsigned_abs())
            .unwrap_or(SCHEDULER_NAP)
            .min(SCHEDULER_NAP)
            .max(Duration::from_millis(200));
        tokio::select! {
            _ = tokio::time::sleep(nap) => {}
            r = changes.changed() => if r.is_err() { return },
        }
    }
}
