//! The site's Prometheus metrics, served at `/metrics` on the operator
//! listener (behind the operator token, as the API).
//!
//! Two kinds. What happens — imports and servicing runs, their outcomes
//! and durations — is counted as it happens ([`Metrics`]) and lives as long
//! as the process. Where content is — transfers by state, the bytes each DP
//! still needs, where its bytes came from, who is online, validation and
//! multicast — is read at each scrape from what `ferry status` reads
//! ([`Snapshot`]), so the two never disagree.

use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::distribution::status::{DpView, StatusRow};
use crate::servicing::jobs::JobRecord;

use ferry_net::metrics::Labels;

/// The states a transfer row can be in (`ferry status`), each exported
/// even when no row is in it, so a rate or an alert sees a 0, not a gap.
const STATES: [&str; 7] = [
    "pending",
    "in-progress",
    "installed",
    "validating",
    "failed",
    "removing",
    "revoked",
];

/// What is counted as it happens.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    imports: Family<Labels, Counter>,
    import_seconds: Family<Labels, Histogram>,
    servicing: Family<Labels, Counter>,
    servicing_seconds: Family<Labels, Histogram>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let imports = Family::<Labels, Counter>::default();
        // 1 s to about an hour.
        let import_seconds = Family::<Labels, Histogram>::new_with_constructor(
            (|| Histogram::new(exponential_buckets(1.0, 2.0, 12))) as fn() -> Histogram,
        );
        let servicing = Family::<Labels, Counter>::default();
        // 5 s to about 3 h.
        let servicing_seconds = Family::<Labels, Histogram>::new_with_constructor(
            (|| Histogram::new(exponential_buckets(5.0, 2.0, 12))) as fn() -> Histogram,
        );
        registry.register(
            "ferry_imports",
            "Imports of WIMs and upgrade packages (a new package or a revision), by outcome",
            imports.clone(),
        );
        registry.register(
            "ferry_import_duration_seconds",
            "How long imports took, by outcome",
            import_seconds.clone(),
        );
        registry.register(
            "ferry_servicing_runs",
            "Offline servicing runs, by outcome (a job state: succeeded, partly-succeeded, failed, cancelled, nothing-to-do)",
            servicing.clone(),
        );
        registry.register(
            "ferry_servicing_duration_seconds",
            "How long servicing runs took, by outcome",
            servicing_seconds.clone(),
        );
        // Every outcome from the start: "rate(...failed...)" is 0, not absent.
        for outcome in ["succeeded", "failed"] {
            let l = vec![("outcome", outcome.to_string())];
            let _ = imports.get_or_create(&l);
            let _ = import_seconds.get_or_create(&l);
            let _ = servicing.get_or_create(&l);
            let _ = servicing_seconds.get_or_create(&l);
        }
        Self {
            registry,
            imports,
            import_seconds,
            servicing,
            servicing_seconds,
        }
    }
}

impl Metrics {
    /// An import ended, `ok` or not, after `took`.
    pub fn imported(&self, ok: bool, took: Duration) {
        let l = vec![(
            "outcome",
            if ok { "succeeded" } else { "failed" }.to_string(),
        )];
        self.imports.get_or_create(&l).inc();
        self.import_seconds
            .get_or_create(&l)
            .observe(took.as_secs_f64());
    }

    /// A servicing run ended with `outcome` (a job state's name) after
    /// `took`.
    pub fn serviced(&self, outcome: &str, took: Duration) {
        let l = vec![("outcome", outcome.to_string())];
        self.servicing.get_or_create(&l).inc();
        self.servicing_seconds
            .get_or_create(&l)
            .observe(took.as_secs_f64());
    }

    /// The exposition, these counters then `now`, in the format `accept`
    /// asks for ([`ferry_net::metrics::exposition`]), with its content type.
    pub fn encode(
        &self,
        now: Snapshot,
        accept: &str,
    ) -> Result<(&'static str, String), std::fmt::Error> {
        let mut snap = Registry::default();
        snap.register_collector(Box::new(now));
        ferry_net::metrics::exposition(&[&self.registry, &snap], accept)
    }
}

/// Where content is, as `ferry status`, `dp list` and `jobs` show it now.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Every package × DP row.
    pub rows: Vec<StatusRow>,
    /// Every DP.
    pub dps: Vec<DpView>,
    /// Every servicing job.
    pub jobs: Vec<JobRecord>,
}

/// Bytes `row`'s DP still needs for the revision it must hold: what it
/// planned and has not received, a full copy while it has planned nothing,
/// none once installed (or when nothing is to be held).
pub fn need_bytes(row: &StatusRow) -> u64 {
    match row.state.as_str() {
        "installed" | "validating" | "removing" | "revoked" => 0,
        _ if row.revision.is_none() => 0,
        _ if row.bytes_needed > 0 => row.bytes_needed.saturating_sub(row.bytes_done),
        _ => row.full_bytes,
    }
}

/// One metric family of constant values.
fn family<M: EncodeMetric>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    series: impl IntoIterator<Item = (Labels, M)>,
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, kind)?;
    for (labels, value) in series {
        value.encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

fn gauges(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (Labels, i64)>,
) -> Result<(), std::fmt::Error> {
    family(
        enc,
        name,
        help,
        MetricType::Gauge,
        series.into_iter().map(|(l, v)| (l, ConstGauge::new(v))),
    )
}

fn pair(package: &str, dp: &str) -> Labels {
    vec![("package", package.to_string()), ("dp", dp.to_string())]
}

fn int(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl Collector for Snapshot {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let rows = &self.rows;
        gauges(
            &mut enc,
            "ferry_transfers",
            "Package × DP assignments by state, as ferry status shows them",
            STATES.iter().map(|s| {
                let n = rows.iter().filter(|r| r.state == *s).count();
                (vec![("state", s.to_string())], n as i64)
            }),
        )?;
        gauges(
            &mut enc,
            "ferry_need_bytes",
            "Bytes a DP still needs of the revision it must hold (0 once installed); \
             alert when above 0 for long",
            rows.iter()
                .map(|r| (pair(&r.package, &r.dp), int(need_bytes(r)))),
        )?;
        gauges(
            &mut enc,
            "ferry_transfer_received_bytes",
            "Chunk bytes a DP received for its current transfer, by where they came from \
             (site or a source DP)",
            rows.iter().flat_map(|r| {
                r.sources.iter().map(|s| {
                    let mut l = pair(&r.package, &r.dp);
                    l.push(("source", s.source.clone()));
                    (l, int(s.bytes))
                })
            }),
        )?;
        gauges(
            &mut enc,
            "ferry_validation_damaged_chunks",
            "Damaged chunks the last validation of a package on a DP found, by whether \
             they were repaired",
            rows.iter().flat_map(|r| {
                r.validation.iter().flat_map(|v| {
                    let fixed = v.damaged.iter().filter(|d| d.repaired).count();
                    [("yes", fixed), ("no", v.damaged.len() - fixed)].map(|(rep, n)| {
                        let mut l = pair(&r.package, &r.dp);
                        l.push(("repaired", rep.to_string()));
                        (l, n as i64)
                    })
                })
            }),
        )?;
        let dps = &self.dps;
        let dp = |d: &DpView| vec![("dp", d.name.clone())];
        family(
            &mut enc,
            "ferry_dp_sent_bytes",
            "Chunk bytes the site sent to a DP (restarts of the site included)",
            MetricType::Counter,
            dps.iter()
                .map(|d| (dp(d), ConstCounter::new(d.served_bytes))),
        )?;
        gauges(
            &mut enc,
            "ferry_dp_online",
            "Whether a DP is connected to the site (1) or not (0)",
            dps.iter().map(|d| (dp(d), i64::from(d.online))),
        )?;
        gauges(
            &mut enc,
            "ferry_dp_last_contact_timestamp_seconds",
            "When a DP was last heard from (Unix time)",
            dps.iter()
                .filter_map(|d| Some((dp(d), d.last_contact?.unix_timestamp()))),
        )?;
        gauges(
            &mut enc,
            "ferry_dp_maintenance",
            "Whether a DP is in maintenance mode (no new transfers)",
            dps.iter().map(|d| (dp(d), i64::from(d.maintenance))),
        )?;
        let running = |d: &DpView| ferry_mcast::view::running(&d.multicast_sessions);
        gauges(
            &mut enc,
            "ferry_multicast_sessions",
            "Multicast sessions running on a DP",
            dps.iter().map(|d| (dp(d), running(d).0 as i64)),
        )?;
        gauges(
            &mut enc,
            "ferry_multicast_clients",
            "Computers in a DP's running multicast sessions, by state (joined and \
             receiving, done, left)",
            dps.iter().flat_map(|d| {
                running(d).1.map(|(state, n)| {
                    let mut l = dp(d);
                    l.push(("state", state.to_string()));
                    (l, int(n))
                })
            }),
        )?;
        gauges(
            &mut enc,
            "ferry_servicing_jobs",
            "Servicing jobs by state",
            [
                "scheduled",
                "running",
                "succeeded",
                "partly-succeeded",
                "failed",
                "cancelled",
                "nothing-to-do",
            ]
            .map(|s| {
                let n = self.jobs.iter().filter(|j| j.state.name() == s).count();
                (vec![("state", s.to_string())], n as i64)
            }),
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_net::metrics::{OPENMETRICS, TEXT};

    fn row(state: &str, needed: u64, done: u64, full: u64) -> StatusRow {
        serde_json::from_value(serde_json::json!({
            "package": "P", "name": "n", "dp": "dp1", "revision": 2, "state": state,
            "bytes_needed": needed, "bytes_done": done, "full_bytes": full, "wire_bytes": 0,
            "percent": null, "eta_secs": null, "error": null, "online": true,
        }))
        .unwrap()
    }

    #[test]
    fn need_bytes_is_what_is_left_of_the_plan_else_a_full_copy_and_none_once_installed() {
        assert_eq!(need_bytes(&row("in-progress", 100, 30, 1000)), 70);
        assert_eq!(need_bytes(&row("pending", 0, 0, 1000)), 1000);
        assert_eq!(need_bytes(&row("failed", 100, 100, 1000)), 0);
        assert_eq!(need_bytes(&row("installed", 100, 100, 1000)), 0);
        assert_eq!(need_bytes(&row("removing", 0, 0, 1000)), 0);
    }

    #[test]
    fn the_exposition_names_every_state_and_ends_once() {
        let m = Metrics::default();
        m.imported(true, Duration::from_secs(3));
        let snap = || Snapshot {
            rows: vec![row("in-progress", 100, 30, 1000)],
            ..Snapshot::default()
        };
        let (kind, text) = m.encode(snap(), "application/openmetrics-text").unwrap();
        assert_eq!(kind, OPENMETRICS);
        for s in STATES {
            assert!(
                text.contains(&format!("ferry_transfers{{state=\"{s}\"}}")),
                "{text}"
            );
        }
        assert!(
            text.contains("ferry_transfers{state=\"in-progress\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("ferry_need_bytes{package=\"P\",dp=\"dp1\"} 70"),
            "{text}"
        );
        assert!(
            text.contains("ferry_imports_total{outcome=\"succeeded\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("ferry_imports_total{outcome=\"failed\"} 0"),
            "{text}"
        );
        assert_eq!(text.matches("# EOF").count(), 1);
        assert!(text.ends_with("# EOF\n"));
        assert!(text.contains("# TYPE ferry_imports counter\n"), "{text}");

        // The older format: a counter's metadata names its samples.
        let (kind, old) = m.encode(snap(), "*/*").unwrap();
        assert_eq!(kind, TEXT);
        assert!(
            old.contains("# TYPE ferry_imports_total counter\n"),
            "{old}"
        );
        assert!(old.contains("# HELP ferry_imports_total Imports"), "{old}");
        assert!(old.contains("# TYPE ferry_need_bytes gauge\n"), "{old}");
        assert!(
            old.contains("ferry_imports_total{outcome=\"succeeded\"} 1\n"),
            "{old}"
        );
        assert!(!old.contains("# EOF"), "{old}");
    }
}
