//! Offline servicing of a ≥ 1 GiB image inside Ferry, and what the DP then
//! receives, beside what a user would otherwise run in the same run:
//! `cp` + `wimupdate` (wimlib's own tool, the same update applied to a copy)
//! for the servicing, and an rsync daemon (`--no-whole-file`) for the
//! redistribution.
//!
//! ```text
//! scripts/bench.sh --bench servicing
//! ```
//! Writes `$CARGO_TARGET_DIR/ferry-bench/servicing.md` and `.json`.

use std::fs;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use ferry_benches::{big_wim, mbps, peak_rss, root, rsync_daemon, rsync_get, timed};
use ferry_tests::harness::{wait_for, DpProc, SiteProc};
use ferry_tests::tree::Content;
use ferry_tests::updates::UpdateSpec;
use ferry_tests::wimtools;
use serde_json::json;

const LIMIT: Duration = Duration::from_secs(1800);

fn main() -> anyhow::Result<()> {
    if ferry_benches::listing() {
        return Ok(());
    }
    let big = big_wim()?;
    let big_len = fs::metadata(&big)?.len();
    let work = tempfile::tempdir_in(root())?;
    let w = work.path();

    // An update replacing every 20th file (5 %) with new content.
    let files: Vec<String> = wimtools::list_files(&big, 1)?
        .into_iter()
        .filter(|p| p.ends_with(".dll"))
        .map(|p| p.trim_start_matches('/').to_string())
        .collect();
    let mut c = Content::new(2026);
    let mut spec = UpdateSpec::new("KB9990001", "2026-11-10");
    for f in files.iter().step_by(20) {
        let len = c.size(2.5);
        spec.add.push((f.clone(), c.bytes(len)));
    }
    let payload: u64 = spec.add.iter().map(|(_, b)| b.len() as u64).sum();
    let update = spec.write(&w.join("updates"))?;
    // A second one, a month later, replacing another 5 %.
    let mut spec2 = UpdateSpec::new("KB9990002", "2026-12-08");
    for f in files.iter().skip(10).step_by(20) {
        let len = c.size(2.5);
        spec2.add.push((f.clone(), c.bytes(len)));
    }
    let update2 = spec2.write(&w.join("updates"))?;

    // Without Ferry: copy the image, apply the same files with wimupdate.
    // Best of three: this VM's file writes vary 3× from run to run.
    timed(Command::new("cat").arg(&big).stdout(Stdio::null()))?;
    let cmds = w.join("cmds.txt");
    let mut f = fs::File::create(&cmds)?;
    for (p, _) in &spec.add {
        writeln!(
            f,
            "add '{}' '/{p}'",
            update.join("payload").join(p).display()
        )?;
    }
    drop(f);
    let mut t_wimupdate = Duration::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        let copy = w.join("copy.wim");
        fs::copy(&big, &copy)?;
        let out = Command::new("wimupdate")
            .arg(&copy)
            .arg("1")
            .stdin(fs::File::open(&cmds)?)
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "wimupdate failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        t_wimupdate = t_wimupdate.min(t.elapsed());
        fs::remove_file(&copy)?;
    }

    // Ferry: site + one DP holding revision 1.
    let site = SiteProc::start(w)?;
    let mut dp = DpProc::start(w, "dp1", &site)?;
    let id = site.add_image(&big, &[])?["id"]
        .as_str()
        .context("id")?
        .to_string();
    site.cli_ok(&["distribute", &id, "--dp", "dp1"])?;
    site.wait_installed(&id, "dp1", 1, LIMIT)?;
    site.cli_ok(&["update", "import", update.to_str().context("path")?])?;

    let t = Instant::now();
    let job = site.cli_json(&[
        "image",
        "service",
        &id,
        "--updates",
        "KB9990001",
        "--distribute",
    ])?;
    let t_service = t.elapsed();
    anyhow::ensure!(job["state"] == "succeeded", "servicing failed: {job}");
    let job_secs = job["runs"][0]["seconds"].as_f64().unwrap_or(0.0);
    let row = site.wait_installed(&id, "dp1", 2, LIMIT)?;
    let t_total = t.elapsed();
    let wire = row["wire_bytes"].as_u64().unwrap_or(0);
    let chunk_bytes = row["bytes_done"].as_u64().unwrap_or(0);
    let rss_site = peak_rss(site.pid().context("pid")?)?;
    // The job's phases, as the site logs them.
    let phases: String = fs::read_to_string(&site.log)?
        .lines()
        .find(|l| l.contains("servicing job committed"))
        .and_then(|l| l.find("sparse").map(|i| l[i..].to_string()))
        .unwrap_or_default();

    let serviced = w.join("serviced.wim");
    site.export(&id, &serviced)?;
    let serviced_len = fs::metadata(&serviced)?.len();
    let floor = wimtools::blob_floor(&big, &serviced)?;

    // rsync of the same serviced file to a holder of the base.
    let served = w.join("served");
    fs::create_dir_all(&served)?;
    fs::rename(&serviced, served.join("serviced.wim"))?;
    let (_d, port) = rsync_daemon(&served, w)?;
    let dest = w.join("rsync.wim");
    fs::copy(&big, &dest)?;
    let (t_rsync, rsync_bytes) = rsync_get(port, "serviced.wim", &dest, false)?;
    dp.stop()?;

    // The next job of the same package.
    site.cli_ok(&["update", "import", update2.to_str().context("path")?])?;
    let t = Instant::now();
    let job2 = site.cli_json(&["image", "service", &id, "--updates", "KB9990002"])?;
    let t_service2 = t.elapsed();
    anyhow::ensure!(job2["state"] == "succeeded", "servicing failed: {job2}");
    let phases2: String = fs::read_to_string(&site.log)?
        .lines()
        .filter(|l| l.contains("servicing job committed"))
        .nth(1)
        .and_then(|l| l.find("sparse").map(|i| l[i..].to_string()))
        .unwrap_or_default();
    wait_for("site to settle", Duration::from_secs(5), || Ok(Some(())))?;

    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let report = format!(
        "## Offline servicing of a {:.2} GiB image (update touching 5 % of its files)\n\n\
Image: {} bytes, {} files; update {} replaces {} files ({:.1} MiB payload).\n\n\
| step | time | |\n|---|---:|---|\n\
| `ferry image service --distribute`, first job (CLI until the job ends) | {:.2} s | job's own time {:.2} s |\n\
| until the DP installed revision 2 | {:.2} s | |\n\
| `cp` + `wimupdate` on a copy, same files (best of 3) | {:.2} s | ferry / wimupdate = {:.2}× |\n\
| the next job (another 5 %) | {t_service2:.2?} | ferry / wimupdate = {:.2}× |\n\n\
| redistribution | bytes | × floor | % of image |\n|---|---:|---:|---:|\n\
| Ferry, UDP bytes at the DP's socket | {wire} | {:.3} | {:.2} % |\n\
| Ferry, chunk payload | {chunk_bytes} | {:.3} | {:.2} % |\n\
| rsync daemon, `--no-whole-file` | {rsync_bytes} | {:.3} | {:.2} % |\n\
| blob floor | {floor} | 1.000 | {:.2} % |\n\
| serviced image | {serviced_len} | | 100 % |\n\n\
Job phases (site log): first `{phases}`; next `{phases2}`.\n\n\
rsync took {:.2} s. Peak memory of the site: {:.0} MiB.\n",
        big_len as f64 / (1u64 << 30) as f64,
        big_len,
        files.len(),
        spec.id,
        spec.add.len(),
        mib(payload),
        t_service.as_secs_f64(),
        job_secs,
        t_total.as_secs_f64(),
        t_wimupdate.as_secs_f64(),
        t_service.as_secs_f64() / t_wimupdate.as_secs_f64(),
        t_service2.as_secs_f64() / t_wimupdate.as_secs_f64(),
        wire as f64 / floor as f64,
        wire as f64 * 100.0 / serviced_len as f64,
        chunk_bytes as f64 / floor as f64,
        chunk_bytes as f64 * 100.0 / serviced_len as f64,
        rsync_bytes as f64 / floor as f64,
        rsync_bytes as f64 * 100.0 / serviced_len as f64,
        floor as f64 * 100.0 / serviced_len as f64,
        t_rsync.as_secs_f64(),
        mib(rss_site),
    );
    let results = json!({
        "image_bytes": big_len,
        "files": files.len(),
        "files_replaced": spec.add.len(),
        "payload_bytes": payload,
        "service_secs": t_service.as_secs_f64(),
        "job_secs": job_secs,
        "until_installed_secs": t_total.as_secs_f64(),
        "wimupdate_secs": t_wimupdate.as_secs_f64(),
        "phases": phases,
        "next_service_secs": t_service2.as_secs_f64(),
        "next_phases": phases2,
        "wire_bytes": wire,
        "chunk_bytes": chunk_bytes,
        "rsync_bytes": rsync_bytes,
        "rsync_secs": t_rsync.as_secs_f64(),
        "blob_floor": floor,
        "serviced_bytes": serviced_len,
        "site_peak_rss": rss_site,
        "service_mbps": mbps(big_len, t_service),
    });
    ferry_benches::save("servicing", &report, &results)
}
