//! Prometheus metrics at `/metrics` on the site's operator listener and on
//! a DP's `[metrics] listen`, read the way Prometheus reads them (curl, with
//! the operator token at the site) and checked by Prometheus's own
//! `promtool check metrics`, while a transfer runs and after it is
//! installed.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use ferry_tests::harness::{free_port, wait_for, DpProc, SiteProc};
use ferry_tests::wimtools;

const LIMIT: Duration = Duration::from_secs(120);

/// The site's `GET /metrics` with curl: the HTTP status, the content type
/// and the body (Prometheus's text format: what curl, and promtool, read).
fn scrape(site: &SiteProc, token: Option<&str>) -> (u16, String, String) {
    scrape_as(site.port, token, "*/*")
}

fn scrape_as(port: u16, token: Option<&str>, accept: &str) -> (u16, String, String) {
    let mut c = Command::new("curl");
    c.args(["-sS", "-w", "\n%{http_code} %{content_type}"]);
    c.args(["-H", &format!("Accept: {accept}")]);
    if let Some(t) = token {
        c.args(["-H", &format!("Authorization: Bearer {t}")]);
    }
    let out = c
        .arg(format!("http://127.0.0.1:{port}/metrics"))
        .output()
        .unwrap();
    assert!(out.status.success(), "curl: {out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    let (body, tail) = text.rsplit_once('\n').unwrap();
    let (code, ctype) = tail.split_once(' ').unwrap();
    (code.parse().unwrap(), ctype.to_string(), body.to_string())
}

/// `promtool check metrics` on `text`: what it says when it finds fault.
fn promtool(text: &str) -> Result<(), String> {
    let mut p = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package; scripts/setup.sh installs it)");
    p.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = p.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() && said.trim().is_empty() {
        Ok(())
    } else {
        Err(said)
    }
}

/// The value of the series written exactly `series` (name and labels).
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.split(' ').next()?.parse().ok())
}

#[test]
fn metrics_pass_promtool_and_move_as_a_transfer_runs() {
    let dir = tempfile::tempdir().unwrap();
    let wim = wimtools::big_wim(dir.path(), 96, 21).unwrap();
    let site = SiteProc::start(dir.path()).unwrap();
    let token = std::fs::read_to_string(site.data.join("operator.token")).unwrap();
    let token = token.trim();

    // Behind the operator token, as the API.
    let (code, _, _) = scrape(&site, None);
    assert_eq!(code, 401);
    let (code, _, _) = scrape(&site, Some("not-the-token"));
    assert_eq!(code, 401);

    // The DP serves its own, where dp.toml says.
    let mut dp = DpProc::enroll(dir.path(), "dp1", &site).unwrap();
    let dp_port = free_port().unwrap();
    let toml = dp.data.join("dp.toml");
    let mut cfg = std::fs::read_to_string(&toml).unwrap();
    cfg.push_str(&format!("\n[metrics]\nlisten = \"127.0.0.1:{dp_port}\"\n"));
    std::fs::write(&toml, cfg).unwrap();
    dp.serve().unwrap();
    let dp_scrape = || {
        wait_for("the DP's metrics", LIMIT, || {
            let out = Command::new("curl")
                .args(["-sf", &format!("http://127.0.0.1:{dp_port}/metrics")])
                .output()?;
            Ok(out
                .status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).into_owned()))
        })
        .unwrap()
    };
    let id = site.add_image(&wim, &[]).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    // Slow enough to be read in the middle on any machine.
    site.cli_ok(&["dp", "set", "dp1", "--rate", "16M"]).unwrap();
    let (code, ctype, before) = scrape(&site, Some(token));
    assert_eq!(code, 200);
    assert!(ctype.starts_with("text/plain; version=0.0.4"), "{ctype}");
    promtool(&before).unwrap();
    // Prometheus asks for OpenMetrics first, and gets it.
    let (code, ctype, om) = scrape_as(
        site.port,
        Some(token),
        "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
    );
    assert_eq!(code, 200);
    assert!(ctype.starts_with("application/openmetrics-text"), "{ctype}");
    assert!(om.ends_with("# EOF\n") && om.contains("# TYPE ferry_imports counter"));
    assert_eq!(
        value(&before, "ferry_imports_total{outcome=\"succeeded\"}"),
        Some(1.0)
    );
    assert_eq!(
        value(
            &before,
            "ferry_import_duration_seconds_count{outcome=\"succeeded\"}"
        ),
        Some(1.0)
    );
    assert_eq!(value(&before, "ferry_dp_online{dp=\"dp1\"}"), Some(1.0));
    let dp_before = dp_scrape();
    promtool(&dp_before).unwrap();
    let dp_received = "ferry_dp_received_bytes_total{source=\"site\"}";
    assert_eq!(value(&dp_before, dp_received), Some(0.0));
    assert_eq!(value(&dp_before, "ferry_dp_site_connected"), Some(1.0));
    assert_eq!(
        value(&before, "ferry_transfers{state=\"in-progress\"}"),
        Some(0.0)
    );

    site.cli_ok(&["distribute", &id, "--dp", "dp1"]).unwrap();
    let need = format!("ferry_need_bytes{{package=\"{id}\",dp=\"dp1\"}}");
    let received =
        format!("ferry_transfer_received_bytes{{package=\"{id}\",dp=\"dp1\",source=\"site\"}}");
    // Read while it runs: a third or more of it received, not all.
    let (mid, full) = wait_for("the transfer to be under way", LIMIT, || {
        let r = site.row(&id, "dp1")?.unwrap();
        assert_ne!(r["state"], "installed", "finished before it was read");
        let (done, needed) = (
            r["bytes_done"].as_u64().unwrap_or(0),
            r["bytes_needed"].as_u64().unwrap_or(0),
        );
        if needed == 0 || done * 3 < needed {
            return Ok(None);
        }
        let (_, _, text) = scrape(&site, Some(token));
        Ok(Some(((text, dp_scrape()), needed)))
    })
    .unwrap();
    let (mid, dp_mid) = mid;
    promtool(&dp_mid).unwrap();
    let got_mid = value(&dp_mid, dp_received).unwrap();
    assert!(
        got_mid > 0.0 && got_mid < full as f64,
        "DP received {got_mid} of {full}"
    );
    promtool(&mid).unwrap();
    assert_eq!(
        value(&mid, "ferry_transfers{state=\"in-progress\"}"),
        Some(1.0)
    );
    let need_mid = value(&mid, &need).unwrap();
    assert!(
        need_mid > 0.0 && need_mid < full as f64,
        "need {need_mid} of {full}"
    );
    let sent_mid = value(&mid, "ferry_dp_sent_bytes_total{dp=\"dp1\"}").unwrap();
    assert!(sent_mid > 0.0, "{mid}");

    site.wait_installed(&id, "dp1", 1, LIMIT).unwrap();
    let (_, _, after) = scrape(&site, Some(token));
    promtool(&after).unwrap();
    assert_eq!(
        value(&after, "ferry_transfers{state=\"installed\"}"),
        Some(1.0)
    );
    assert_eq!(
        value(&after, "ferry_transfers{state=\"in-progress\"}"),
        Some(0.0)
    );
    assert_eq!(value(&after, &need), Some(0.0));
    let sent = value(&after, "ferry_dp_sent_bytes_total{dp=\"dp1\"}").unwrap();
    assert!(
        sent > sent_mid,
        "sent {sent} after, {sent_mid} in the middle"
    );
    // Every chunk byte the DP needed came from the site, and was counted.
    assert_eq!(value(&after, &received), Some(full as f64));
    assert!(sent >= full as f64, "sent {sent} < needed {full}");
    let dp_after = dp_scrape();
    promtool(&dp_after).unwrap();
    assert_eq!(value(&dp_after, dp_received), Some(full as f64));
    assert_eq!(
        value(&dp_after, "ferry_dp_chunks_refetched_total"),
        Some(0.0)
    );

    // What deploy/ gives operators reads only what the two serve.
    let served = names(&format!("{after}{dp_after}"));
    let deploy = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let rules = deploy.join("prometheus/ferry-rules.yml");
    let config = deploy.join("prometheus/prometheus.yml");
    let dashboard = deploy.join("grafana/ferry-dashboard.json");
    check(
        Command::new("promtool")
            .args(["check", "rules"])
            .arg(&rules),
    );
    check(
        Command::new("promtool")
            .args(["check", "config", "--syntax-only"])
            .arg(&config),
    );
    let board: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&dashboard).unwrap()).unwrap();
    let exprs: Vec<String> = board["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap().clone())
        .map(|t| t["expr"].as_str().unwrap().to_string())
        .collect();
    assert!(exprs.len() >= 10, "{exprs:?}");
    for (file, text) in [
        (rules.clone(), std::fs::read_to_string(&rules).unwrap()),
        (dashboard.clone(), exprs.join("\n")),
    ] {
        let used = names(&text);
        assert!(!used.is_empty());
        for n in used {
            assert!(
                served.contains(&n) || served.contains(&format!("{n}_total")),
                "{} reads {n}, which neither /metrics serves",
                file.display()
            );
        }
    }
}

/// Every `ferry_…` metric name in `text`; a histogram's with its sample
/// suffixes when `text` is an exposition.
fn names(text: &str) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    for (i, _) in text.match_indices("ferry_") {
        if text[..i].ends_with(|c: char| c.is_ascii_alphanumeric() || c == '_') {
            continue;
        }
        let n: String = text[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        out.insert(n);
    }
    for l in text.lines() {
        if let Some(h) = l
            .strip_prefix("# TYPE ")
            .and_then(|r| r.strip_suffix(" histogram"))
        {
            for s in ["_bucket", "_sum", "_count"] {
                out.insert(format!("{h}{s}"));
            }
        }
    }
    out
}

/// Runs `c`; fails with what it said unless it succeeds.
fn check(c: &mut Command) {
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "{c:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
