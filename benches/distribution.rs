//! Site → DP distribution on loopback, beside what a user would otherwise
//! run, in the same run:
//!
//! 1. initial distribution of a ≥ 1 GiB WIM to one DP vs an rsync daemon on
//!    127.0.0.1 (whole file) and a plain copy;
//! 2. redistribution after servicing: wire bytes vs `rsync --no-whole-file`
//!    (through the daemon), casync (new chunks a client needs), zsync (blocks
//!    the seed lacks), and the blob floor;
//! 3. fan-out of a ~200 MiB WIM to 10 DPs: total time and bytes leaving the
//!    site;
//! 4. peak memory (VmHWM) of site and DP.
//!
//! ```text
//! scripts/bench.sh --bench distribution
//! ```
//! Writes `$CARGO_TARGET_DIR/ferry-bench/distribution.md` and `.json`.

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ferry_benches::{
    big_wim, casync_new_chunks, mbps, peak_rss, root, rsync_daemon, rsync_get, serviced_pair,
    small_wim, timed,
};
use ferry_tests::harness::{wait_for, DpProc, SiteProc};
use ferry_tests::wimtools;
use serde_json::json;

const LIMIT: Duration = Duration::from_secs(1800);

/// zsync: bytes of the blocks a client holding `base` lacks for `new`,
/// from zsync's own "Target N% complete" after reading the seed. (Fetching
/// them needs an HTTP server with multi-range support, which this machine
/// lacks; the figure excludes HTTP overhead, so it flatters zsync.)
fn zsync_needed(base: &Path, new: &Path, work: &Path) -> anyhow::Result<u64> {
    let dir = work.join("zsync");
    fs::create_dir_all(&dir)?;
    let target = dir.join("new.wim");
    fs::copy(new, &target)?;
    timed(
        Command::new("zsyncmake")
            .args(["-u", "http://127.0.0.1:9/new.wim", "-o"])
            .arg(dir.join("new.zsync"))
            .arg(&target),
    )?;
    // Fails at the fetch, after reporting what the seed covers.
    let out = Command::new("zsync")
        .arg("-i")
        .arg(base)
        .arg("-o")
        .arg(dir.join("out.wim"))
        .arg(dir.join("new.zsync"))
        .current_dir(&dir)
        .output()?;
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let pct: f64 = text
        .split("Target ")
        .last()
        .and_then(|r| r.split('%').next())
        .and_then(|n| n.trim().parse().ok())
        .with_context(|| format!("zsync printed no completeness: {text}"))?;
    let size = fs::metadata(new)?.len();
    Ok(((100.0 - pct) / 100.0 * size as f64) as u64)
}

fn installed_at(
    site: &SiteProc,
    id: &str,
    dps: &[&DpProc],
    rev: u64,
) -> anyhow::Result<Vec<serde_json::Value>> {
    let mut rows = Vec::new();
    for dp in dps {
        rows.push(site.wait_installed(id, &dp.name, rev, LIMIT)?);
    }
    Ok(rows)
}

fn main() -> anyhow::Result<()> {
    if ferry_benches::listing() {
        return Ok(());
    }
    fs::create_dir_all(root())?;
    let mut report = String::new();
    let mut results = serde_json::Map::new();

    // --- 1. initial distribution of a 1 GiB+ WIM --------------------------
    let big = big_wim()?;
    let big_len = fs::metadata(&big)?.len();
    let work = tempfile::tempdir_in(root())?;
    let (_rsyncd, rport) = rsync_daemon(big.parent().context("folder")?, work.path())?;
    timed(Command::new("cat").arg(&big).stdout(Stdio::null()))?;
    let (t_rsync, rsync_bytes) = rsync_get(rport, "big.wim", &work.path().join("rsync.wim"), true)?;
    let t = Instant::now();
    fs::copy(&big, work.path().join("copy.wim"))?;
    let t_copy = t.elapsed();
    let _ = fs::remove_file(work.path().join("rsync.wim"));
    let _ = fs::remove_file(work.path().join("copy.wim"));

    let site = SiteProc::start(work.path())?;
    let mut dp = DpProc::start(work.path(), "dp1", &site)?;
    let id = site.add_image(&big, &[])?["id"]
        .as_str()
        .context("id")?
        .to_string();
    wait_for("dp1 online", LIMIT, || {
        Ok((site.dp_row("dp1")?["online"] == true).then_some(()))
    })?;
    let t = Instant::now();
    site.cli_ok(&["distribute", &id, "--dp", "dp1"])?;
    let row = site.wait_installed(&id, "dp1", 1, LIMIT)?;
    let t_ferry = t.elapsed();
    let wire = row["wire_bytes"].as_u64().unwrap_or(0);
    let rss_site = peak_rss(site.pid().context("pid")?)?;
    let rss_dp = peak_rss(dp.pid().context("pid")?)?;
    dp.stop()?;
    drop(site);
    drop(work);
    report += &format!(
        "## Initial distribution of a {:.2} GiB WIM to one DP (loopback)\n\n\
         | tool | time | MB/s | bytes on the wire | time ÷ ferry |\n|---|---|---|---|---|\n\
         | `ferry distribute` (QUIC, until installed and verified) | {:.2} s | {:.0} | {wire} (UDP) | 1.00 |\n\
         | `rsync --whole-file` from an rsync daemon | {:.2} s | {:.0} | {rsync_bytes} (TCP payload) | {:.2} |\n\
         | `cp` (same disk, no network) | {:.2} s | {:.0} | - | {:.2} |\n\n\
         Peak memory: site {:.0} MiB, DP {:.0} MiB.\n\n",
        big_len as f64 / (1u64 << 30) as f64,
        t_ferry.as_secs_f64(), mbps(big_len, t_ferry),
        t_rsync.as_secs_f64(), mbps(big_len, t_rsync), t_rsync.as_secs_f64() / t_ferry.as_secs_f64(),
        t_copy.as_secs_f64(), mbps(big_len, t_copy), t_copy.as_secs_f64() / t_ferry.as_secs_f64(),
        rss_site as f64 / 1048576.0, rss_dp as f64 / 1048576.0,
    );
    results.insert(
        "initial".into(),
        json!({"wim_bytes": big_len, "ferry_s": t_ferry.as_secs_f64(), "ferry_wire": wire,
               "rsync_s": t_rsync.as_secs_f64(), "rsync_bytes": rsync_bytes, "cp_s": t_copy.as_secs_f64(),
               "peak_rss_site": rss_site, "peak_rss_dp": rss_dp}),
    );

    // --- 2. redistribution after servicing --------------------------------
    let pair_dir = root().join("dist-pair");
    let pair = serviced_pair(&pair_dir)?;
    let floor = wimtools::blob_floor(&pair.base, &pair.serviced)?;
    let new_len = fs::metadata(&pair.serviced)?.len();
    let work = tempfile::tempdir_in(root())?;
    let (_rsyncd, rport) = rsync_daemon(&pair_dir, work.path())?;
    let seeded = work.path().join("seeded.wim");
    fs::copy(&pair.base, &seeded)?;
    let (t_rsync, rsync_bytes) = rsync_get(rport, "serviced.wim", &seeded, false)?;
    let casync = casync_new_chunks(&pair.base, &pair.serviced)?;
    let zsync = zsync_needed(&pair.base, &pair.serviced, work.path())?;

    let site = SiteProc::start(work.path())?;
    let mut dp = DpProc::start(work.path(), "dp1", &site)?;
    let id = site.add_image(&pair.base, &[])?["id"]
        .as_str()
        .context("id")?
        .to_string();
    site.cli_ok(&["distribute", &id, "--dp", "dp1"])?;
    site.wait_installed(&id, "dp1", 1, LIMIT)?;
    let out = site.cli(&[
        "content",
        "refresh",
        &id,
        "--source",
        &pair.serviced.to_string_lossy(),
    ]);
    if !out.status.success() {
        bail!("refresh failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let t = Instant::now();
    let row = site.wait_installed(&id, "dp1", 2, LIMIT)?;
    let t_ferry = t.elapsed();
    let wire = row["wire_bytes"].as_u64().unwrap_or(0);
    let chunk_bytes = row["bytes_done"].as_u64().unwrap_or(0);
    dp.stop()?;
    drop(site);
    drop(work);
    let ratio = |b: u64| b as f64 / wire.max(1) as f64;
    report += &format!(
        "## Redistribution after servicing ({new_len} byte image; blob floor {floor})\n\n\
         | method | bytes | ÷ ferry wire | ÷ floor | time |\n|---|---|---|---|---|\n\
         | ferry, UDP bytes at the DP socket | {wire} | 1.00 | {:.3} | {:.2} s (from refresh to installed) |\n\
         | ferry, chunk payload | {chunk_bytes} | {:.2} | {:.3} | |\n\
         | `rsync --no-whole-file` via daemon (bytes received) | {rsync_bytes} | {:.2} | {:.3} | {:.2} s |\n\
         | casync, new chunks a client needs | {casync} | {:.2} | {:.3} | |\n\
         | zsync, blocks the seed lacks (no HTTP overhead) | {zsync} | {:.2} | {:.3} | |\n\
         | lower bound: blob floor | {floor} | {:.2} | 1.000 | |\n\n",
        wire as f64 / floor as f64, t_ferry.as_secs_f64(),
        ratio(chunk_bytes), chunk_bytes as f64 / floor as f64,
        ratio(rsync_bytes), rsync_bytes as f64 / floor as f64, t_rsync.as_secs_f64(),
        ratio(casync), casync as f64 / floor as f64,
        ratio(zsync), zsync as f64 / floor as f64,
        ratio(floor),
    );
    results.insert(
        "redistribution".into(),
        json!({"image": new_len, "floor": floor, "ferry_wire": wire, "ferry_chunks": chunk_bytes,
               "ferry_s": t_ferry.as_secs_f64(), "rsync": rsync_bytes, "rsync_s": t_rsync.as_secs_f64(),
               "casync": casync, "zsync": zsync}),
    );

    // --- 3. fan-out to 10 DPs ----------------------------------------------
    let small = small_wim()?;
    let small_len = fs::metadata(&small)?.len();
    let work = tempfile::tempdir_in(root())?;
    let site = SiteProc::start(work.path())?;
    let id = site.add_image(&small, &[])?["id"]
        .as_str()
        .context("id")?
        .to_string();
    site.cli_ok(&["group", "create", "all"])?;
    let mut dps = Vec::new();
    for i in 0..10 {
        let dp = DpProc::start(work.path(), &format!("dp{i:02}"), &site)?;
        site.cli_ok(&["group", "add", "all", &dp.name])?;
        dps.push(dp);
    }
    wait_for("all DPs online", LIMIT, || {
        let list = site.cli_json(&["dp", "list"])?;
        Ok(list
            .as_array()
            .is_some_and(|a| a.iter().all(|d| d["online"] == true))
            .then_some(()))
    })?;
    let t = Instant::now();
    site.cli_ok(&["distribute", &id, "--group", "all"])?;
    let refs: Vec<&DpProc> = dps.iter().collect();
    let rows = installed_at(&site, &id, &refs, 1)?;
    let t_fan = t.elapsed();
    let wire_total: u64 = rows
        .iter()
        .map(|r| r["wire_bytes"].as_u64().unwrap_or(0))
        .sum();
    let rss_site = peak_rss(site.pid().context("pid")?)?;
    let rss_dp = dps
        .iter()
        .filter_map(|d| d.pid().and_then(|p| peak_rss(p).ok()))
        .max()
        .unwrap_or(0);
    for mut d in dps {
        d.stop()?;
    }
    drop(site);
    report += &format!(
        "## Fan-out: one site to 10 DPs ({small_len} byte WIM)\n\n\
         | figure | value |\n|---|---|\n\
         | time from `distribute` until all 10 installed | {:.2} s |\n\
         | bytes leaving the site (sum of UDP bytes at the DPs) | {wire_total} ({:.2}× 10 copies of the file) |\n\
         | aggregate rate | {:.0} MB/s |\n\
         | peak memory, site | {:.0} MiB |\n\
         | peak memory, largest DP | {:.0} MiB |\n\n",
        t_fan.as_secs_f64(),
        wire_total as f64 / (10 * small_len) as f64,
        mbps(10 * small_len, t_fan),
        rss_site as f64 / 1048576.0,
        rss_dp as f64 / 1048576.0,
    );
    results.insert(
        "fanout".into(),
        json!({"wim_bytes": small_len, "dps": 10, "seconds": t_fan.as_secs_f64(), "wire_total": wire_total,
               "peak_rss_site": rss_site, "peak_rss_dp": rss_dp}),
    );

    ferry_benches::save("distribution", &report, &serde_json::Value::Object(results))
}
