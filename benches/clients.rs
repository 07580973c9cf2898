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
    Ok(ferry_benches::cpu_time(pid)?.as_secs_f64())
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

    // Every variant once per round, rounds repeated; a `sync` before each
    // so none pays for the writeback another left behind.
    let variants: [(&str, Option<&str>); 5] = [
        ("`curl --cacert`", None),
        ("`curl --cacert`, then `sync FILE`", None),
        ("`ferry client fetch --parallel 1`", Some("1")),
        (
            "`ferry client fetch` (the default: 2 ranges in flight)",
            Some("2"),
        ),
        ("`ferry client fetch --parallel 4`", Some("4")),
    ];
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
    let mut cpus: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
    for run in 0..RUNS {
        for (v, (_, parallel)) in variants.iter().enumerate() {
            timed(&mut Command::new("sync"))?;
            let cpu0 = cpu_seconds(pid)?;
            let t = match parallel {
                None => {
                    let out = w.join(format!("curl{run}.esd"));
                    let (t, _) = timed(
                        Command::new("curl")
                            .args(["-sS", "--fail", "--cacert"])
                            .arg(&ca)
                            .args(["-H", &auth, "-o"])
                            .arg(&out)
                            .arg(&url),
                    )?;
                    // The second curl row: on the disk before it counts, as
                    // the fetch syncs each file before renaming it.
                    let t = if v == 1 {
                        t + timed(Command::new("sync").arg(&out))?.0
                    } else {
                        t
                    };
                    check(&out)?;
                    fs::remove_file(&out)?;
                    t
                }
                Some(p) => {
                    let dir = w.join(format!("fetch{run}-{p}"));
                    let (t, _) = timed(
                        Command::new(ferry_bin())
                            .args(["client", "fetch", "--dp", &base, &id, "--out"])
                            .arg(&dir)
                            .args(["--token", &token, "--parallel", p, "--ca"])
                            .arg(&ca),
                    )?;
                    check(&dir.join("sources/install.esd"))?;
                    fs::remove_dir_all(&dir)?;
                    t
                }
            };
            cpus[v].push(cpu_seconds(pid)? - cpu0);
            times[v].push(t.as_secs_f64());
        }
    }
    let pkg_bytes = ferry_benches::dir_bytes(&media);
    let runs = |v: &[f64]| {
        v.iter()
            .map(|t| format!("{t:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let med: Vec<f64> = times.iter().map(|t| median(t.clone())).collect();
    let mut report = format!(
        "### One client download from a DP over HTTPS (release build)\n\n\
         DP in a network namespace behind a veth, client on the host; a {:.2} GiB file \
         (`curl`: that file alone; `ferry client fetch`: the whole package, {:.2} GiB in {} files, \
         every chunk verified, each file synced before its rename). Median of {RUNS} rounds, \
         each variant once per round.\n\n\
         | client | time (median) | MB/s | DP CPU s (median) | runs (s) |\n|---|---|---|---|---|\n",
        BIG as f64 / (1u64 << 30) as f64,
        pkg_bytes as f64 / (1u64 << 30) as f64,
        ferry_tests::updates::tree_hashes(&media)?.len(),
    );
    for (v, (name, parallel)) in variants.iter().enumerate() {
        let bytes = if parallel.is_some() {
            pkg_bytes
        } else {
            BIG as u64
        };
        report += &format!(
            "| {name} | {:.2} s | {:.0} | {:.2} | {} |\n",
            med[v],
            mbps(bytes, Duration::from_secs_f64(med[v])),
            median(cpus[v].clone()),
            runs(&times[v])
        );
    }
    report += &format!(
        "\nferry client fetch (default) time / curl: **{:.2}×**; / curl + sync: **{:.2}×**\n",
        med[3] / med[0],
        med[3] / med[1]
    );
    ferry_benches::save(
        "clients",
        &report,
        &json!({
            "file_bytes": BIG, "package_bytes": pkg_bytes,
            "variants": variants.iter().enumerate().map(|(v, (name, _))| json!({
                "name": name, "seconds": times[v], "dp_cpu_seconds": cpus[v],
            })).collect::<Vec<_>>(),
        }),
    )?;
    dp.stop()?;
    Ok(())
}
