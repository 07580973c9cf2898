//! End-to-end comparison: Ferry beside the tools a user would otherwise use,
//! on the same files, in the same run.
//!
//! ```text
//! scripts/bench.sh            # builds ferry, then runs this
//! ```
//! Fixtures are cached in `$CARGO_TARGET_DIR/ferry-bench/` (the 1 GiB WIM
//! takes a few minutes to make once). Prints a Markdown report and writes
//! `ferry-bench/results.json`.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context;
use ferry_benches::{
    big_wim, casync_new_chunks, mbps, peak_rss, root, serviced_pair, small_wim, timed,
};
use ferry_tests::harness::{stats_of, SiteProc};
use ferry_tests::wimtools;
use serde_json::json;

/// Imports `wim` into a fresh site; returns (time, peak site memory, package JSON).
fn import_fresh(wim: &Path, extra: &[&str]) -> anyhow::Result<(Duration, u64, serde_json::Value)> {
    let dir = tempfile::tempdir_in(root())?;
    let site = SiteProc::start(dir.path())?;
    let t = Instant::now();
    let pkg = site.add_image(wim, extra)?;
    let d = t.elapsed();
    let rss = peak_rss(site.pid().context("site pid")?)?;
    Ok((d, rss, pkg))
}

fn rsync_literal(base: &Path, new: &Path) -> anyhow::Result<(u64, u64)> {
    let dir = tempfile::tempdir_in(root())?;
    let dest = dir.path().join("dest.wim");
    fs::copy(base, &dest)?;
    let (_, out) = timed(
        Command::new("rsync")
            .args(["--no-whole-file", "--stats", "--inplace"])
            .arg(new)
            .arg(&dest),
    )?;
    let num = |key: &str| -> anyhow::Result<u64> {
        let line = out
            .lines()
            .find(|l| l.starts_with(key))
            .with_context(|| format!("rsync printed no {key}"))?;
        let n: String = line[key.len()..]
            .chars()
            .take_while(|c| *c != 'b')
            .filter(char::is_ascii_digit)
            .collect();
        Ok(n.parse()?)
    };
    Ok((num("Literal data:")?, num("Total bytes sent:")?))
}

fn main() -> anyhow::Result<()> {
    if ferry_benches::listing() {
        return Ok(());
    }
    fs::create_dir_all(root())?;
    let mut report = String::new();
    let mut results = serde_json::Map::new();
    let nproc = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);

    // --- import throughput, 1 GiB+ WIM -------------------------------------
    let big = big_wim()?;
    let small = small_wim()?;
    let big_len = fs::metadata(&big)?.len();
    let small_len = fs::metadata(&small)?.len();
    // Warm the page cache so every tool reads from memory alike.
    timed(
        Command::new("cat")
            .arg(&big)
            .stdout(std::process::Stdio::null()),
    )?;
    // What a file copy costs when it must be on disk: `cp` then `sync`,
    // from a clean start (nothing else dirty), best of two.
    let sync = || timed(&mut Command::new("sync"));
    let copy = root().join("cp-sync.wim");
    let mut t_cp = Duration::MAX;
    for _ in 0..2 {
        sync()?;
        let (t, _) = timed(Command::new("sh").arg("-c").arg(format!(
            "cp '{}' '{}' && sync",
            big.display(),
            copy.display()
        )))?;
        t_cp = t_cp.min(t);
        fs::remove_file(&copy)?;
    }
    sync()?;
    let (t_b3, _) = timed(Command::new("b3sum").arg(&big))?;
    let (t_b3_1, _) = timed(
        Command::new("b3sum")
            .arg("--num-threads")
            .arg("1")
            .arg(&big),
    )?;
    let t = Instant::now();
    let mut h = blake3::Hasher::new();
    h.update_reader(fs::File::open(&big)?)?;
    let t_blake3_lib = t.elapsed();
    let casync_dir = tempfile::tempdir_in(root())?;
    let (t_casync, _) = timed(
        Command::new("casync")
            .arg("make")
            .arg(format!(
                "--store={}",
                casync_dir.path().join("s.castr").display()
            ))
            .arg(casync_dir.path().join("i.caibx"))
            .arg(&big),
    )?;
    drop(casync_dir);
    sync()?;
    let (t_ferry, rss_big, _) = import_fresh(&big, &[])?;
    let (_, rss_small, _) = import_fresh(&small, &[])?;
    let (t_ferry_nv, _, _) = import_fresh(&big, &["--no-verify"])?;
    let (t_wimverify, _) = timed(Command::new("wimverify").arg(&big))?;
    report += &format!(
        "## Import of a {:.2} GiB WIM (page cache warm, {nproc} cores)\n\n\
         | tool | time | MB/s | time ÷ ferry |\n|---|---|---|---|\n\
         | `ferry image add` (every resource checked against its SHA-1) | {:.2} s | {:.0} | 1.00 |\n\
         | `ferry image add --no-verify` | {:.2} s | {:.0} | {:.2} |\n\
         | `wimverify` (the check alone, wimlib) | {:.2} s | {:.0} | {:.2} |\n\
         | `cp` + `sync` (best of two) | {:.2} s | {:.0} | {:.2} |\n\
         | `b3sum` ({nproc} threads) | {:.2} s | {:.0} | {:.2} |\n\
         | `b3sum --num-threads 1` | {:.2} s | {:.0} | {:.2} |\n\
         | blake3 crate, one thread, in process | {:.2} s | {:.0} | {:.2} |\n\
         | `casync make` | {:.2} s | {:.0} | {:.2} |\n\n\
         Ferry's import moves {:.2}× the throughput of `cp` + `sync` ({:.2}× with `--no-verify`) and takes {:.2}× the time of hashing alone (b3sum, all threads).\n\n\
         Peak site memory (VmHWM): {:.0} MiB importing {:.0} MiB, {:.0} MiB importing {:.0} MiB.\n\n",
        big_len as f64 / (1u64 << 30) as f64,
        t_ferry.as_secs_f64(), mbps(big_len, t_ferry),
        t_ferry_nv.as_secs_f64(), mbps(big_len, t_ferry_nv), t_ferry_nv.as_secs_f64() / t_ferry.as_secs_f64(),
        t_wimverify.as_secs_f64(), mbps(big_len, t_wimverify), t_wimverify.as_secs_f64() / t_ferry.as_secs_f64(),
        t_cp.as_secs_f64(), mbps(big_len, t_cp), t_cp.as_secs_f64() / t_ferry.as_secs_f64(),
        t_b3.as_secs_f64(), mbps(big_len, t_b3), t_b3.as_secs_f64() / t_ferry.as_secs_f64(),
        t_b3_1.as_secs_f64(), mbps(big_len, t_b3_1), t_b3_1.as_secs_f64() / t_ferry.as_secs_f64(),
        t_blake3_lib.as_secs_f64(), mbps(big_len, t_blake3_lib), t_blake3_lib.as_secs_f64() / t_ferry.as_secs_f64(),
        t_casync.as_secs_f64(), mbps(big_len, t_casync), t_casync.as_secs_f64() / t_ferry.as_secs_f64(),
        t_cp.as_secs_f64() / t_ferry.as_secs_f64(),
        t_cp.as_secs_f64() / t_ferry_nv.as_secs_f64(),
        t_ferry.as_secs_f64() / t_b3.as_secs_f64(),
        rss_small as f64 / 1048576.0, small_len as f64 / 1048576.0,
        rss_big as f64 / 1048576.0, big_len as f64 / 1048576.0,
    );
    results.insert(
        "import".into(),
        json!({"wim_bytes": big_len, "ferry_s": t_ferry.as_secs_f64(), "ferry_no_verify_s": t_ferry_nv.as_secs_f64(),
               "wimverify_s": t_wimverify.as_secs_f64(), "cp_sync_s": t_cp.as_secs_f64(), "b3sum_s": t_b3.as_secs_f64(),
               "b3sum_1t_s": t_b3_1.as_secs_f64(), "blake3_lib_s": t_blake3_lib.as_secs_f64(),
               "casync_make_s": t_casync.as_secs_f64(), "peak_rss_big": rss_big, "peak_rss_small": rss_small,
               "small_wim_bytes": small_len}),
    );

    // FERRY_BENCH_ONLY=import stops here.
    if !ferry_benches::section("storage") {
        return ferry_benches::save("results", &report, &serde_json::Value::Object(results));
    }

    // --- bytes stored for base + serviced ----------------------------------
    let pair_dir = root().join("pair");
    let pair = serviced_pair(&pair_dir)?;
    let rebuilt = pair_dir.join("rebuilt.wim");
    fs::copy(&pair.serviced, &rebuilt)?;
    wimtools::optimize(&rebuilt)?;
    report += "## Bytes stored for a serviced image (base already stored)\n\n\
               | serviced copy | image | blob floor | ferry stored | ferry ÷ floor | rsync literal | rsync sent | casync new chunks |\n\
               |---|---|---|---|---|---|---|---|\n";
    let mut pairs = Vec::new();
    for (label, new) in [
        ("appended (wimupdate)", &pair.serviced),
        ("rebuilt (wimoptimize)", &rebuilt),
    ] {
        let dir = tempfile::tempdir_in(root())?;
        let site = SiteProc::start(dir.path())?;
        site.add_image(&pair.base, &[])?;
        let (_, stored) = stats_of(&site.add_image(new, &[])?);
        let floor = wimtools::blob_floor(&pair.base, new)?;
        let (literal, sent) = rsync_literal(&pair.base, new)?;
        let casync = casync_new_chunks(&pair.base, new)?;
        let size = fs::metadata(new)?.len();
        report += &format!(
            "| {label} | {size} | {floor} | {stored} | {:.3} | {literal} | {sent} | {casync} |\n",
            stored as f64 / floor as f64
        );
        pairs.push(json!({"label": label, "image": size, "floor": floor, "ferry": stored, "rsync_literal": literal, "rsync_sent": sent, "casync": casync}));
    }
    report += &format!(
        "\nServicing: {} files replaced, {} patched in place, {} added, {} deleted (of 3000).\n",
        pair.changes.replaced.len(),
        pair.changes.patched.len(),
        pair.changes.added.len(),
        pair.changes.deleted.len()
    );
    results.insert("stored".into(), json!(pairs));
    ferry_benches::save("results", &report, &serde_json::Value::Object(results))
}
