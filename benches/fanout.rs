//! Fan-out (issue 13): how a site reaches many DPs.
//!
//! 1. `tree`: a ≥ 1 GiB WIM to 10 DPs on one Ethernet segment (a bridge, a
//!    namespace per DP) as a two-level pull tree — dp00 from the site,
//!    dp01–dp03 pull from dp00, dp04–dp09 from dp01–dp03 (two each) — beside
//!    the same image to one DP alone: time until all are installed, the
//!    bytes that left the site (the kernel's counter on the bridge, which
//!    does not see what DPs send each other), the site's peak memory and
//!    CPU.
//! 2. `direct`: the same WIM to 10 DPs at once straight from the site,
//!    beside one DP alone: time, the site's CPU per GB sent.
//! 3. `agents`: 100 DP agents on loopback, each a real `ferry dp serve`
//!    with its own index, and a small image: time until all installed, the
//!    site's CPU and peak memory, and `ferry status` latency (the whole CLI
//!    command, 100 rows) once they are.
//!
//! ```text
//! scripts/bench.sh --bench fanout                       # both
//! FERRY_BENCH_ONLY=agents scripts/bench.sh --bench fanout
//! ```
//! Writes `$CARGO_TARGET_DIR/ferry-bench/fanout.md` and `.json`.

use std::fs;
use std::time::{Duration, Instant};

use anyhow::Context;
use ferry_benches::{big_wim, cpu_time, mbps, peak_rss, root, section};
use ferry_tests::harness::{wait_for, DpProc, SiteProc};
use ferry_tests::netns::Bridge;
use serde_json::json;

const LIMIT: Duration = Duration::from_secs(1800);
const PEER_LISTEN: &str = "0.0.0.0:7444";

/// Waits until `n` DPs have `id` installed at `rev`: the status rows.
fn all_installed(
    site: &SiteProc,
    id: &str,
    n: usize,
    rev: u64,
) -> anyhow::Result<Vec<serde_json::Value>> {
    wait_for(&format!("{n} DPs to install {id} r{rev}"), LIMIT, || {
        let rows = site.status(Some(id))?;
        if let Some(f) = rows.iter().find(|r| r["state"] == "failed") {
            anyhow::bail!("{} failed: {}", f["dp"], f["error"]);
        }
        let done = rows
            .iter()
            .filter(|r| r["state"] == "installed" && r["revision"] == rev)
            .count();
        Ok((done == n).then_some(rows))
    })
}

/// CPU time of the site and the DPs so far.
fn total_cpu(site: &SiteProc, dps: &[DpProc]) -> anyhow::Result<Duration> {
    let mut t = cpu_time(site.pid().context("pid")?)?;
    for d in dps {
        t += cpu_time(d.pid().context("pid")?)?;
    }
    Ok(t)
}

/// Imports `wim` on the site: its package id.
fn add(site: &SiteProc, wim: &std::path::Path) -> anyhow::Result<String> {
    Ok(site.add_image(wim, &[])?["id"]
        .as_str()
        .context("id")?
        .to_string())
}

/// One distribution, measured from the command until every DP named has
/// it installed.
struct Run {
    time: Duration,
    /// Bytes that left the site's namespace (the bridge's tx counter).
    sent: u64,
    site_rss: u64,
    site_cpu: Duration,
    /// CPU of the site and every DP.
    all_cpu: Duration,
    /// The status rows at the end.
    rows: Vec<serde_json::Value>,
}

impl Run {
    fn distribute(
        seg: &Bridge,
        site: &SiteProc,
        dps: &[DpProc],
        id: &str,
        to: &[&str],
    ) -> anyhow::Result<Self> {
        let pid = site.pid().context("pid")?;
        let (sent0, cpu0, all0) = (
            seg.local_sent_bytes()?,
            cpu_time(pid)?,
            total_cpu(site, dps)?,
        );
        let mut args = vec!["distribute", id, "--dp"];
        args.extend(to);
        let t = Instant::now();
        site.cli_ok(&args)?;
        let rows = all_installed(site, id, to.len(), 1)?;
        Ok(Self {
            time: t.elapsed(),
            sent: seg.local_sent_bytes()? - sent0,
            site_rss: peak_rss(pid)?,
            site_cpu: cpu_time(pid)? - cpu0,
            all_cpu: total_cpu(site, dps)? - all0,
            rows,
        })
    }
}

/// A site on bridge `seg` and a DP per host (`sources` serve pull DPs);
/// waits until all are online and the sources' peer addresses known.
fn segment(
    seg: &Bridge,
    work: &std::path::Path,
    names: &[String],
    sources: &[&str],
) -> anyhow::Result<(SiteProc, Vec<DpProc>)> {
    let site = SiteProc::start_at(work, "site", &seg.ip, &[])?;
    let mut dps = Vec::new();
    for (name, host) in names.iter().zip(&seg.hosts) {
        let args: &[&str] = if sources.contains(&name.as_str()) {
            &["--peer-listen", PEER_LISTEN]
        } else {
            &[]
        };
        let mut dp = DpProc::enroll_with(
            work,
            name,
            &site,
            &site.dp_addr(),
            &host.exec_prefix(),
            args,
        )?;
        dp.serve()?;
        dps.push(dp);
    }
    wait_for(
        "the DPs online, the sources' addresses known",
        LIMIT,
        || {
            let list = site.cli_json(&["dp", "list"])?;
            let a = list.as_array().context("dp list")?;
            let ready = a.iter().all(|d| {
                d["online"] == true
                    && (!sources.contains(&d["name"].as_str().unwrap_or_default())
                        || d["peer_address"].is_string())
            });
            Ok(ready.then_some(()))
        },
    )?;
    Ok((site, dps))
}

/// The ten DPs' names.
fn ten() -> Vec<String> {
    (0..10).map(|i| format!("dp{i:02}")).collect()
}

/// The big WIM to one DP alone on a segment: what the ten are held to.
fn one_dp(big: &std::path::Path) -> anyhow::Result<Run> {
    let seg = Bridge::create("fan1", 71, &["dp00"])?;
    let work = tempfile::tempdir_in(root())?;
    let (site, dps) = segment(&seg, work.path(), &ten()[..1], &[])?;
    let id = add(&site, big)?;
    Run::distribute(&seg, &site, &dps, &id, &["dp00"])
}

fn tree(
    report: &mut String,
    results: &mut serde_json::Map<String, serde_json::Value>,
    big: &std::path::Path,
    one: &Run,
) -> anyhow::Result<()> {
    let len = fs::metadata(big)?.len();
    let names = ten();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (t_one, sent_one, rss_one, cpu_one, all_one) =
        (one.time, one.sent, one.site_rss, one.site_cpu, one.all_cpu);

    // The tree.
    let names_ref: Vec<&str> = names.iter().map(String::as_str).collect();
    let seg = Bridge::create("fan10", 72, &names_ref)?;
    let work = tempfile::tempdir_in(root())?;
    let (site, dps) = segment(&seg, work.path(), &names, &["dp00", "dp01", "dp02", "dp03"])?;
    for (dp, from) in [
        ("dp01", "dp00"),
        ("dp02", "dp00"),
        ("dp03", "dp00"),
        ("dp04", "dp01"),
        ("dp05", "dp01"),
        ("dp06", "dp02"),
        ("dp07", "dp02"),
        ("dp08", "dp03"),
        ("dp09", "dp03"),
    ] {
        site.cli_ok(&["dp", "set", dp, "--pull-from", from])?;
    }
    let id = add(&site, big)?;
    let Run {
        time: t_tree,
        sent,
        site_rss: rss,
        site_cpu: cpu,
        all_cpu: all,
        rows,
    } = Run::distribute(&seg, &site, &dps, &id, &names_ref)?;
    let rss_dp = dps
        .iter()
        .filter_map(|d| d.pid().and_then(|p| peak_rss(p).ok()))
        .max()
        .unwrap_or(0);
    let from: Vec<String> = rows
        .iter()
        .map(|r| {
            let s: Vec<&str> = r["sources"]
                .as_array()
                .map(|a| a.iter().filter_map(|s| s["source"].as_str()).collect())
                .unwrap_or_default();
            format!("{} ← {}", r["dp"].as_str().unwrap_or("?"), s.join(" + "))
        })
        .collect();
    drop(dps);
    drop(site);

    *report += &format!(
        "## Pull tree: one site to 10 DPs ({len} byte WIM, {:.2} GiB)\n\n\
         dp00 from the site; dp01–dp03 pull from dp00; dp04–dp09 from dp01–dp03. \
         Each DP in its own network namespace on one bridge; the site's bytes are \
         the kernel's tx counter of the bridge itself.\n\n\
         | figure | one DP alone | 10 DPs, pull tree | tree ÷ one |\n|---|---|---|---|\n\
         | time until all installed | {:.2} s | {:.2} s | {:.2} |\n\
         | bytes that left the site | {sent_one} ({:.3} images) | {sent} ({:.3} images) | {:.2} |\n\
         | site CPU | {:.2} s | {:.2} s | {:.2} |\n\
         | CPU of site and DPs together | {:.2} s | {:.2} s | {:.2} |\n\
         | that CPU spread over the machine's {cores} cores | {:.2} s | {:.2} s | |\n\
         | site peak memory (VmHWM) | {:.0} MiB | {:.0} MiB | |\n\
         | largest DP peak memory | | {:.0} MiB | |\n\
         | aggregate rate (10 copies) | {:.0} MB/s | {:.0} MB/s | |\n\n\
         Where each DP's bytes came from: {}.\n\n",
        len as f64 / (1u64 << 30) as f64,
        t_one.as_secs_f64(),
        t_tree.as_secs_f64(),
        t_tree.as_secs_f64() / t_one.as_secs_f64(),
        sent_one as f64 / len as f64,
        sent as f64 / len as f64,
        sent as f64 / sent_one.max(1) as f64,
        cpu_one.as_secs_f64(),
        cpu.as_secs_f64(),
        cpu.as_secs_f64() / cpu_one.as_secs_f64().max(0.001),
        all_one.as_secs_f64(),
        all.as_secs_f64(),
        all.as_secs_f64() / all_one.as_secs_f64().max(0.001),
        all_one.as_secs_f64() / cores as f64,
        all.as_secs_f64() / cores as f64,
        rss_one as f64 / 1048576.0,
        rss as f64 / 1048576.0,
        rss_dp as f64 / 1048576.0,
        mbps(len, t_one),
        mbps(10 * len, t_tree),
        from.join(", "),
    );
    results.insert(
        "tree".into(),
        json!({"wim_bytes": len, "one_s": t_one.as_secs_f64(), "one_sent": sent_one,
               "one_site_cpu_s": cpu_one.as_secs_f64(), "one_site_rss": rss_one,
               "tree_s": t_tree.as_secs_f64(), "tree_sent": sent, "tree_site_cpu_s": cpu.as_secs_f64(),
               "tree_site_rss": rss, "tree_dp_rss_max": rss_dp, "from": from,
               "one_cpu_all_s": all_one.as_secs_f64(), "tree_cpu_all_s": all.as_secs_f64(), "cores": cores}),
    );
    Ok(())
}

/// Ten DPs straight from the site at once (no pull tree): the site sends
/// ten copies over ten connections, which the runtime spreads over its
/// threads. Site CPU per GB sent, and the time against one DP's.
fn direct(
    report: &mut String,
    results: &mut serde_json::Map<String, serde_json::Value>,
    big: &std::path::Path,
    one: &Run,
) -> anyhow::Result<()> {
    let len = fs::metadata(big)?.len();
    let names = ten();
    let names_ref: Vec<&str> = names.iter().map(String::as_str).collect();
    let seg = Bridge::create("fan10d", 73, &names_ref)?;
    let work = tempfile::tempdir_in(root())?;
    let (site, dps) = segment(&seg, work.path(), &names, &[])?;
    let id = add(&site, big)?;
    let ten = Run::distribute(&seg, &site, &dps, &id, &names_ref)?;
    drop(dps);
    drop(site);
    let per_gb = |cpu: Duration, sent: u64| cpu.as_secs_f64() / (sent as f64 / 1e9);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    *report += &format!(
        "## Ten DPs at once, straight from the site ({len} byte WIM)\n\n\
         Each DP in its own network namespace on one bridge, all ten named in one \
         `ferry distribute`; beside the same image to one DP alone. Site CPU per GB \
         is per GB that left the site (the bridge's tx counter). Site and DPs share \
         this machine's {cores} cores.\n\n\
         | figure | one DP | 10 DPs | 10 ÷ one |\n|---|---|---|---|\n\
         | time until all installed | {:.2} s | {:.2} s | {:.2} |\n\
         | bytes that left the site | {} | {} | {:.2} |\n\
         | site CPU | {:.2} s | {:.2} s | {:.2} |\n\
         | site CPU per GB sent | {:.2} CPU-s/GB | {:.2} CPU-s/GB | {:.2} |\n\
         | CPU of site and DPs together | {:.2} s | {:.2} s | {:.2} |\n\
         | aggregate rate | {:.0} MB/s | {:.0} MB/s | {:.2} |\n\n",
        one.time.as_secs_f64(),
        ten.time.as_secs_f64(),
        ten.time.as_secs_f64() / one.time.as_secs_f64(),
        one.sent,
        ten.sent,
        ten.sent as f64 / one.sent.max(1) as f64,
        one.site_cpu.as_secs_f64(),
        ten.site_cpu.as_secs_f64(),
        ten.site_cpu.as_secs_f64() / one.site_cpu.as_secs_f64().max(0.001),
        per_gb(one.site_cpu, one.sent),
        per_gb(ten.site_cpu, ten.sent),
        per_gb(ten.site_cpu, ten.sent) / per_gb(one.site_cpu, one.sent),
        one.all_cpu.as_secs_f64(),
        ten.all_cpu.as_secs_f64(),
        ten.all_cpu.as_secs_f64() / one.all_cpu.as_secs_f64().max(0.001),
        mbps(len, one.time),
        mbps(10 * len, ten.time),
        mbps(10 * len, ten.time) / mbps(len, one.time),
    );
    results.insert(
        "direct".into(),
        json!({"wim_bytes": len, "one_s": one.time.as_secs_f64(), "one_sent": one.sent,
               "one_site_cpu_s": one.site_cpu.as_secs_f64(),
               "ten_s": ten.time.as_secs_f64(), "ten_sent": ten.sent,
               "ten_site_cpu_s": ten.site_cpu.as_secs_f64(),
               "one_cpu_all_s": one.all_cpu.as_secs_f64(), "ten_cpu_all_s": ten.all_cpu.as_secs_f64(),
               "cores": cores}),
    );
    Ok(())
}

fn agents(
    report: &mut String,
    results: &mut serde_json::Map<String, serde_json::Value>,
) -> anyhow::Result<()> {
    const N: usize = 100;
    let work = tempfile::tempdir_in(root())?;
    let wim = ferry_tests::wimtools::tree_wim(work.path(), "small", 800, 100, &[])?;
    let len = fs::metadata(&wim)?.len();
    let site = SiteProc::start(work.path())?;
    let t = Instant::now();
    let mut dps = Vec::new();
    for i in 0..N {
        dps.push(DpProc::start(work.path(), &format!("dp{i:03}"), &site)?);
    }
    let t_enroll = t.elapsed();
    wait_for("100 DPs online", LIMIT, || {
        let list = site.cli_json(&["dp", "list"])?;
        let a = list.as_array().context("dp list")?;
        Ok((a.iter().filter(|d| d["online"] == true).count() == N).then_some(()))
    })?;
    site.cli_ok(&["group", "create", "all"])?;
    let mut args = vec!["group", "add", "all"];
    let names: Vec<String> = dps.iter().map(|d| d.name.clone()).collect();
    args.extend(names.iter().map(String::as_str));
    site.cli_ok(&args)?;
    let id = site.add_image(&wim, &[])?["id"]
        .as_str()
        .context("id")?
        .to_string();
    let pid = site.pid().context("pid")?;
    let cpu0 = cpu_time(pid)?;
    let t = Instant::now();
    site.cli_ok(&["distribute", &id, "--group", "all"])?;
    all_installed(&site, &id, N, 1)?;
    let t_all = t.elapsed();
    let cpu = cpu_time(pid)? - cpu0;
    let rss = peak_rss(pid)?;
    let rss_dps: u64 = dps
        .iter()
        .filter_map(|d| d.pid().and_then(|p| peak_rss(p).ok()))
        .sum();
    // `ferry status`, as an operator runs it: the whole command.
    let mut lat = Vec::new();
    for json in [false, true] {
        for _ in 0..20 {
            let args: &[&str] = if json {
                &["status", "--json"]
            } else {
                &["status"]
            };
            let t = Instant::now();
            let out = site.cli(args);
            lat.push((json, t.elapsed()));
            anyhow::ensure!(out.status.success(), "ferry status failed");
        }
    }
    let pick = |json: bool| {
        let mut v: Vec<f64> = lat
            .iter()
            .filter(|l| l.0 == json)
            .map(|l| l.1.as_secs_f64() * 1000.0)
            .collect();
        v.sort_by(f64::total_cmp);
        (v[v.len() / 2], v[v.len() - 1])
    };
    let (table_med, table_max) = pick(false);
    let (json_med, json_max) = pick(true);
    let idle0 = cpu_time(pid)?;
    std::thread::sleep(Duration::from_secs(10));
    let idle = (cpu_time(pid)? - idle0).as_secs_f64() / 10.0;
    drop(dps);
    drop(site);
    *report += &format!(
        "## 100 DP agents on one machine ({len} byte WIM)\n\n\
         Each DP a real `ferry dp serve` (its own RocksDB index and QUIC connection) \
         on loopback; site and agents share the machine's 2 cores.\n\n\
         | figure | value |\n|---|---|\n\
         | enrolling and starting 100 agents (`dp add`, `dp init`, `dp serve`) | {:.1} s |\n\
         | time from `distribute --group all` until all 100 installed | {:.2} s |\n\
         | site CPU over that time | {:.2} s ({:.0} % of one core) |\n\
         | site CPU with 100 agents connected, idle | {:.1} % of one core |\n\
         | site peak memory (VmHWM) | {:.0} MiB |\n\
         | 100 agents' peak memory, summed | {:.0} MiB ({:.0} MiB each) |\n\
         | `ferry status` (table, 100 rows), whole command: median / max of 20 | {table_med:.0} / {table_max:.0} ms |\n\
         | `ferry status --json`: median / max of 20 | {json_med:.0} / {json_max:.0} ms |\n\n",
        t_enroll.as_secs_f64(),
        t_all.as_secs_f64(),
        cpu.as_secs_f64(),
        100.0 * cpu.as_secs_f64() / t_all.as_secs_f64(),
        100.0 * idle,
        rss as f64 / 1048576.0,
        rss_dps as f64 / 1048576.0,
        rss_dps as f64 / 1048576.0 / N as f64,
    );
    results.insert(
        "agents".into(),
        json!({"dps": N, "wim_bytes": len, "enroll_s": t_enroll.as_secs_f64(), "all_installed_s": t_all.as_secs_f64(),
               "site_cpu_s": cpu.as_secs_f64(), "site_idle_core_share": idle, "site_rss": rss, "dps_rss_sum": rss_dps,
               "status_table_ms": [table_med, table_max], "status_json_ms": [json_med, json_max]}),
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    if ferry_benches::listing() {
        return Ok(());
    }
    fs::create_dir_all(root())?;
    let mut report = String::new();
    let mut results = serde_json::Map::new();
    if section("tree") || section("direct") {
        let big = big_wim()?;
        let one = one_dp(&big)?;
        if section("direct") {
            direct(&mut report, &mut results, &big, &one)?;
        }
        if section("tree") {
            tree(&mut report, &mut results, &big, &one)?;
        }
    }
    if section("agents") {
        agents(&mut report, &mut results)?;
    }
    ferry_benches::save("fanout", &report, &serde_json::Value::Object(results))
}
