//! A computer downloading from a DP over HTTPS: `ferry client fetch` (range
//! requests in parallel, every chunk checked against the signed manifest,
//! the whole file hashed at the end) beside `curl` of the same file from
//! the same DP listener, in one run. The DP runs in a network namespace,
//! the client on the host side of the veth; both write to the same disk.
//!
//! ```text
//! scripts/bench.sh --bench clients
//! ```
//! Uses `$FERRY_BIN` (bench.sh: the release build). Writes
//! `$CARGO_TARGET_DIR/ferry-bench/clients.md` and `.json`.

use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::Context;
use ferry_benches::{mbps, root, timed};
use ferry_tests::harness::{ferry_bin, wait_for, DpProc, SiteProc};
use ferry_tests::netns::Netns;
use ferry_tests::tree::Content;
use serde_json::json;

const LIMIT: Duration = Duration::from_secs(3600);
const BIG: usize = 1 << 30;
const RUNS: usize = 3;

/// User plus system CPU seconds of process `pid` so far.
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = &stat[stat.rfind(')').context("stat format")? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>()? + f[12].parse::<f64>()?;
    Ok(ticks / 100.0)
}

/// The agent's process (the DP runs under `ip netns exec`, which execs it).
fn dp_pid(dp: &DpProc) -> anyhow::Result<u32> {
    dp.pid().context("the DP is not running")
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    if ferry_benches::listing() {
        return Ok(());
    }
    fs::create_dir_all(root())?;
    let work = tempfile::tempdir_in(root())?;
    let w = work.path();
    let ns = Netns::create("bclients", 12)?;

    // A setup folder whose one large file is what both download.
    let media = w.join("media");
    fs::create_dir_all(media.join("sources"))?;
    let mut c = Content::new(3);
    fs::write(media.join("setup.exe"), c.bytes(200_000))?;
    let wim =
        ferry_tests::wimtools::tree_wim(w, "small", 20, 5, ferry_tests::wimtools::WINDOWS_PROPS)?;
    fs::copy(&wim, media.join("sources/install.wim"))?;
    {
        let mut f = fs::File::create(media.join("sources/install.esd"))?;
        for _ in 0..(BIG / (16 << 20)) {
            f.write_all(&c.bytes(16 << 20))?;
        }
        f.sync_all()?;
    }
    let site = SiteProc::start_at(w, "site", &ns.host_ip, &[])?;
    let listen = format!("{}:8443", ns.ns_ip);
    let mut dp = DpProc::enroll_with(
        w,
        "dp1",
        &site,
        &site.dp_addr(),
        &ns.exec_prefix(),
        &["--client-listen", &listen, "--client-name", &ns.ns_ip],
    )?;
    dp.serve()?;
    let id = site.cli_json(&[
        "upgrade",
        "add",
        media.to_str().context("path")?,
        "--name",
        "bench",
    ])?["id"]
        .as_str()
        .context("id")?
        .to_string();
    site.cli_ok(&["distribute", &id, "--dp", "dp1"])?;
    site.wait_installed(&id, "dp1", 1, LIMIT)?;
    let token = site.cli_json(&["client", "token", "create", "--name", "bench"])?["token"]
        .as_str()
        .context("token")?
        .to_string();
    let ca = site.data.join("ca.pem");
    let base = format!("https://{listen}");
    let url = format!("{base}/content/{id}/sources/install.esd");
    let auth = format!("Authorization: Bearer {token}");
    wait_for("the DP's HTTPS listener", LIMIT, || {
        let out = Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
            .arg(&ca)
            .args(["-H", &auth, &format!("{base}/content/{id}/")])
            .output()?;
        Ok((String::from_utf8_lossy(&out.stdout) == "200").then_some(()))
    })?;
    let pid = dp_pid(&dp)?;
    let want = blake3::hash(&fs::read(media.join("sources/install.esd"))?);
    let check = |p: &Path| -> anyhow::Result<()> {
        anyhow::ensure!(
            blake3::hash(&fs::read(p)?) == want,
            "{} differs from the source",
            p.display()
        );
        Ok(())
    };

    let (mut curl_t, mut curl_cpu, mut ferry_t, mut ferry_cpu) = (vec![], vec![], vec![], vec![]);
    let mut synced_t = vec![];
    for run in 0..RUNS {
        let out = w.join(format!("curl{run}.esd"));
        let cpu0 = cpu_seconds(pid)?;
        let (t, _) = timed(
            Command::new("curl")
                .args(["-sS", "--fail", "--cacert"])
                .arg(&ca)
                .args(["-H", &auth, "-o"])
                .arg(&out)
                .arg(&url),
        )?;
        curl_cpu.push(cpu_seconds(pid)? - cpu0);
        curl_t.push(t.as_secs_f64());
        check(&out)?;
        fs::remove_file(&out)?;
        // The same, and on the disk before it counts (as the fetch does:
        // it syncs each file before renaming it into place).
        let (t1, _) = timed(
            Command::new("curl")
                .args(["-sS", "--fail", "--cacert"])
                .arg(&ca)
                .args(["-H", &auth, "-o"])
                .arg(&out)
                .arg(&url),
        )?;
        let (t2, _) = timed(Command::new("sync").arg(&out))?;
        synced_t.push((t1 + t2).as_secs_f64());
        fs::remove_file(&out)?;

        let dir = w.join(format!("fetch{run}"));
        let cpu0 = cpu_seconds(pid)?;
        let (t, _) = timed(
            Command::new(ferry_bin())
                .args(["client", "fetch", "--dp", &base, &id, "--out"])
                .arg(&dir)
                .args(["--token", &token, "--ca"])
                .arg(&ca),
        )?;
        ferry_cpu.push(cpu_seconds(pid)? - cpu0);
        ferry_t.push(t.as_secs_f64());
        check(&dir.join("sources/install.esd"))?;
        fs::remove_dir_all(&dir)?;
    }
    // Fewer ranges in flight (the client shares these two cores with the DP).
    let mut by_parallel = Vec::new();
    for parallel in ["1", "2"] {
        let mut ts = Vec::new();
        for run in 0..RUNS {
            let dir = w.join(format!("fetch-p{parallel}-{run}"));
            let (t, _) = timed(
                Command::new(ferry_bin())
                    .args(["client", "fetch", "--dp", &base, &id, "--out"])
                    .arg(&dir)
                    .args(["--token", &token, "--parallel", parallel, "--ca"])
                    .arg(&ca),
            )?;
            check(&dir.join("sources/install.esd"))?;
            fs::remove_dir_all(&dir)?;
            ts.push(t.as_secs_f64());
        }
        by_parallel.push((parallel, ts));
    }
    let pkg_bytes = ferry_benches::dir_bytes(&media);
    let (ct, ft, st) = (
        median(curl_t.clone()),
        median(ferry_t.clone()),
        median(synced_t.clone()),
    );
    let runs = |v: &[f64]| {
        v.iter()
            .map(|t| format!("{t:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let report = format!(
        "### One client download from a DP over HTTPS (release build)\n\n\
         DP in a network namespace behind a veth, client on the host; a {:.2} GiB file \
         (`curl`: that file alone; `ferry client fetch`: the whole package, {:.2} GiB in {} files, \
         every chunk verified, 4 ranges in flight). Median of {RUNS} runs each, alternating.\n\n\
         | client | time (median) | MB/s | DP CPU s (median) | runs (s) |\n|---|---|---|---|---|\n\
         | `curl --cacert` | {ct:.2} s | {:.0} | {:.2} | {} |\n\
         | `curl --cacert`, then `sync FILE` | {st:.2} s | {:.0} | | {} |\n\
         | `ferry client fetch` (syncs each file before its rename) | {ft:.2} s | {:.0} | {:.2} | {} |\n\
         {}\n\
         ferry client fetch time / curl: **{:.2}×**; / curl + sync: **{:.2}×**\n",
        BIG as f64 / (1u64 << 30) as f64,
        pkg_bytes as f64 / (1u64 << 30) as f64,
        ferry_tests::updates::tree_hashes(&media)?.len(),
        mbps(BIG as u64, Duration::from_secs_f64(ct)),
        median(curl_cpu.clone()),
        runs(&curl_t),
        mbps(BIG as u64, Duration::from_secs_f64(st)),
        runs(&synced_t),
        mbps(pkg_bytes, Duration::from_secs_f64(ft)),
        median(ferry_cpu.clone()),
        runs(&ferry_t),
        by_parallel
            .iter()
            .map(|(p, ts)| format!(
                "| `ferry client fetch --parallel {p}` | {:.2} s | {:.0} | | {} |\n",
                median(ts.clone()),
                mbps(pkg_bytes, Duration::from_secs_f64(median(ts.clone()))),
                runs(ts)
            ))
            .collect::<String>(),
        ft / ct,
        ft / st,
    );
    ferry_benches::save(
        "clients",
        &report,
        &json!({
            "file_bytes": BIG, "package_bytes": pkg_bytes,
            "curl_seconds": curl_t, "curl_dp_cpu": curl_cpu, "curl_sync_seconds": synced_t,
            "fetch_seconds": ferry_t, "fetch_dp_cpu": ferry_cpu,
            "fetch_seconds_by_parallel": by_parallel.iter().map(|(p, ts)| json!({"parallel": p, "seconds": ts})).collect::<Vec<_>>(),
        }),
    )?;
    dp.stop()?;
    Ok(())
}
