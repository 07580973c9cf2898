//! Faults: a site killed mid-import, mid-servicing or amid DP reports,
//! chunks damaged on disk; a registry of the previous release moved in.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferry_tests::harness::{wait_for, DpProc, SiteProc};
use ferry_tests::tree::Content;
use ferry_tests::wimtools;

/// Files in `dir` whose name ends in `.ext`.
fn files_with(dir: &Path, ext: &str) -> Vec<PathBuf> {
    fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == ext))
                .collect()
        })
        .unwrap_or_default()
}

/// Bytes an import has written so far into its pack files (in the
/// library's `incoming` folder until the commit moves them in).
fn incoming_bytes(library: &Path) -> u64 {
    files_with(&library.join("incoming"), "sst")
        .iter()
        .filter_map(|p| fs::metadata(p).ok())
        .map(|m| m.len())
        .sum()
}

/// A WIM of `n` files of 4 MiB of incompressible bytes, stored uncompressed:
/// quick to make, large enough that an import flushes chunks to disk midway.
fn big_wim(dir: &Path, n: usize) -> PathBuf {
    big_wim_with(dir, n, &[])
}

/// [`big_wim`] with image properties (`wimtools::WINDOWS_PROPS`: one that
/// updates apply to).
fn big_wim_with(dir: &Path, n: usize, props: &[(&str, &str)]) -> PathBuf {
    let tree = dir.join("big");
    fs::create_dir_all(&tree).unwrap();
    let mut c = Content::new(99);
    for i in 0..n {
        let mut b = c.bytes(4 << 20);
        for (j, x) in b.iter_mut().enumerate() {
            *x ^= (j as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1] ^ i as u8;
        }
        fs::write(tree.join(format!("f{i}.bin")), b).unwrap();
    }
    let wim = dir.join("big.wim");
    wimtools::capture(&tree, &wim, "Big", "none", props).unwrap();
    wim
}

#[test]
fn site_killed_mid_import_keeps_nothing_and_reclaims_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let wim = big_wim(dir.path(), 80);
    let mut site = SiteProc::start(dir.path()).unwrap();
    let library = site.data.join("library");
    let mut cli = std::process::Command::new(ferry_tests::harness::ferry_bin())
        .arg("--data")
        .arg(&site.data)
        .args(["image", "add"])
        .arg(&wim)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Wait until chunks of the import have reached disk, then kill -9.
    let start = Instant::now();
    while incoming_bytes(&library) < 32 << 20 {
        assert!(
            cli.try_wait().unwrap().is_none(),
            "the import finished before any chunk was flushed"
        );
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no chunk was ever flushed"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    site.kill();
    let _ = cli.wait();
    site.serve().unwrap();
    assert_eq!(
        site.package_count().unwrap(),
        0,
        "no half-registered package"
    );
    assert_eq!(
        incoming_bytes(&library),
        0,
        "the unfinished pack was deleted"
    );
    assert_eq!(
        site.stored_chunks().unwrap(),
        0,
        "orphaned chunks were reclaimed"
    );
    // And the same import works after the restart.
    let pkg = site.add_image(&wim, &[]).unwrap();
    assert_eq!(
        pkg["revisions"][0]["stats"]["logical_bytes"]
            .as_u64()
            .unwrap(),
        fs::metadata(&wim).unwrap().len()
    );
}

#[test]
fn damaged_chunk_is_named_and_export_refuses_it() {
    let dir = tempfile::tempdir().unwrap();
    let wim = big_wim(dir.path(), 3);
    let mut site = SiteProc::start(dir.path()).unwrap();
    let pkg = site.add_image(&wim, &[]).unwrap();
    let id = pkg["id"].as_str().unwrap().to_string();
    site.stop().unwrap();

    // Flip bytes in the middle of the largest table file (the pack of the
    // import), as a bad disk would.
    let mut tables = files_with(&site.data.join("library"), "sst");
    tables.sort_by_key(|p| fs::metadata(p).map(|m| m.len()).unwrap_or(0));
    let target = tables.last().expect("chunks live in table files");
    let mut bytes = fs::read(target).unwrap();
    let mid = bytes.len() / 2;
    for b in &mut bytes[mid..mid + 8] {
        *b ^= 0xFF;
    }
    fs::write(target, bytes).unwrap();

    site.serve().unwrap();
    let out = site.cli(&["content", "verify", &id]);
    assert!(
        !out.status.success(),
        "verify fails when a chunk is damaged"
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&id), "the report names the package: {text}");
    assert!(
        text.contains("damaged") || text.contains("checksum"),
        "{text}"
    );
    let report = site.cli_json(&["content", "verify"]);
    assert!(report.is_err(), "whole-library verify fails too");
    // Under --json: one document, the report with the error and its code.
    let out = site.cli(&["content", "verify", "--json"]);
    assert!(!out.status.success());
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["code"], "damaged", "{doc}");
    assert!(!doc["damaged"].as_array().unwrap().is_empty(), "{doc}");

    let dest = dir.path().join("out.wim");
    let out = site.cli(&["content", "export", &id, "--out", dest.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(!dest.exists(), "no partial file where the export was to go");
    let leftovers: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("out.wim"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "part file of the export removed: {leftovers:?}"
    );

    // Served to a DP (read without RocksDB's block checksum: the DP hashes
    // every chunk against its id), the damaged chunk is asked for again,
    // then the transfer fails naming it and the site's copy; nothing is
    // installed.
    let dp = DpProc::start(dir.path(), "dp1", &site).unwrap();
    site.cli_ok(&["distribute", &id, "--dp", "dp1"]).unwrap();
    let row = wait_for(
        "the DP to refuse the damaged chunk",
        Duration::from_secs(120),
        || Ok(site.row(&id, "dp1")?.filter(|r| r["state"] == "failed")),
    )
    .unwrap();
    let err = row["error"].as_str().unwrap();
    assert!(
        err.contains("failed verification 3 times") && err.contains("site's copy"),
        "{err}"
    );
    assert!(!dp.content().join(&id).exists(), "nothing installed");
}

/// What an operator sees of DPs, groups and assignments, without what
/// changes by itself (online, last contact, addresses).
fn registry_view(site: &SiteProc) -> serde_json::Value {
    let dps: Vec<serde_json::Value> = site
        .cli_json(&["dp", "list"])
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            serde_json::json!({
                "name": d["name"], "enrollment": d["enrollment"],
                "groups": d["groups"], "assigned": d["assigned"],
            })
        })
        .collect();
    serde_json::json!({"dps": dps, "groups": site.cli_json(&["group", "list"]).unwrap()})
}

/// The installed rows of `ferry status`, figures included.
fn installed_rows(site: &SiteProc) -> Vec<serde_json::Value> {
    site.status(None)
        .unwrap()
        .into_iter()
        .filter(|r| r["state"] == "installed")
        .map(|r| {
            serde_json::json!({
                "package": r["package"], "dp": r["dp"], "revision": r["revision"],
                "bytes_needed": r["bytes_needed"], "bytes_done": r["bytes_done"],
                "wire_bytes": r["wire_bytes"], "full_bytes": r["full_bytes"],
            })
        })
        .collect()
}

#[test]
fn a_site_killed_amid_dp_reports_keeps_dps_groups_assignments_and_counters() {
    let dir = tempfile::tempdir().unwrap();
    let small = wimtools::tree_wim(dir.path(), "small", 200, 71, &[]).unwrap();
    let big = big_wim(dir.path(), 12);
    let mut site = SiteProc::start(dir.path()).unwrap();
    let small_id = site.add_image(&small, &[]).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let big_id = site.add_image(&big, &[]).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let mut dp1 = DpProc::start(dir.path(), "dp1", &site).unwrap();
    let mut dp2 = DpProc::enroll(dir.path(), "dp2", &site).unwrap();
    // Slow enough that dp2 reports progress for seconds.
    dp2.serve_args = vec!["--max-rate".into(), "4M".into()];
    dp2.serve().unwrap();
    site.cli_ok(&["group", "create", "branch"]).unwrap();
    site.cli_ok(&["group", "add", "branch", "dp2"]).unwrap();
    site.cli_ok(&["distribute", &small_id, "--dp", "dp1"])
        .unwrap();
    site.wait_installed(&small_id, "dp1", 1, Duration::from_secs(60))
        .unwrap();
    site.cli_ok(&["distribute", &big_id, "--group", "branch"])
        .unwrap();
    // In the middle of dp2's progress reports.
    ferry_tests::harness::wait_for("dp2 to report progress", Duration::from_secs(60), || {
        Ok(site
            .row(&big_id, "dp2")?
            .filter(|r| r["state"] == "in-progress" && r["bytes_done"].as_u64() > Some(0)))
    })
    .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let view = registry_view(&site);
    let installed = installed_rows(&site);
    assert_eq!(installed.len(), 1, "{installed:?}");
    assert!(installed[0]["wire_bytes"].as_u64() > Some(0));
    site.kill();

    site.serve().unwrap();
    assert_eq!(registry_view(&site), view, "DPs, groups, assignments");
    // dp1's row (dp2 may finish meanwhile: it is not compared here).
    let dp1_rows = |site: &SiteProc| {
        installed_rows(site)
            .into_iter()
            .filter(|r| r["dp"] == "dp1")
            .collect::<Vec<_>>()
    };
    assert_eq!(dp1_rows(&site), installed, "counters of what is installed");
    // dp1 reconnects and says "installed" again: its figures stay.
    ferry_tests::harness::wait_for("dp1 to reconnect", Duration::from_secs(60), || {
        Ok(site.dp_row("dp1")?["online"].as_bool().filter(|&b| b))
    })
    .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(dp1_rows(&site), installed, "after dp1 reported again");
    // dp2 goes on and finishes.
    site.wait_installed(&big_id, "dp2", 1, Duration::from_secs(120))
        .unwrap();
    let rows = installed_rows(&site);
    site.kill();
    site.serve().unwrap();
    assert_eq!(installed_rows(&site), rows, "after a second kill");
    dp1.stop().unwrap();
    dp2.stop().unwrap();
}

#[test]
fn a_site_with_the_previous_releases_registry_json_keeps_every_dp_enrolled() {
    let dir = tempfile::tempdir().unwrap();
    let wim = wimtools::tree_wim(dir.path(), "img", 200, 72, &[]).unwrap();
    let mut site = SiteProc::start(dir.path()).unwrap();
    let id = site.add_image(&wim, &[]).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let mut dp = DpProc::start(dir.path(), "dp1", &site).unwrap();
    site.cli_ok(&["group", "create", "branch"]).unwrap();
    site.cli_ok(&["group", "add", "branch", "dp1"]).unwrap();
    site.cli_ok(&["distribute", &id, "--group", "branch"])
        .unwrap();
    site.wait_installed(&id, "dp1", 1, Duration::from_secs(60))
        .unwrap();
    let view = registry_view(&site);
    let installed = installed_rows(&site);
    dp.stop().unwrap();
    site.stop().unwrap();

    // What the previous release kept: registry.json beside a library with
    // no registry in it. Its records are the same JSON.
    let library = site.data.join("library");
    {
        let lib = ferry_store::Library::open(&library).unwrap();
        let records = lib.state(b"").unwrap();
        let mut dps = serde_json::Map::new();
        let mut groups = serde_json::Map::new();
        for (k, v) in &records {
            let k = String::from_utf8(k.clone()).unwrap();
            let v: serde_json::Value = serde_json::from_slice(v).unwrap();
            match k.split_once('/') {
                Some(("dp", name)) => dps.insert(name.to_string(), v),
                Some(("group", name)) => groups.insert(name.to_string(), v),
                _ => panic!("unexpected state record {k}"),
            };
        }
        assert_eq!(dps.len(), 1);
        let old = serde_json::json!({"dps": dps, "groups": groups});
        fs::write(
            site.data.join("registry.json"),
            serde_json::to_vec_pretty(&old).unwrap(),
        )
        .unwrap();
        let gone: Vec<ferry_store::StateChange> =
            records.into_iter().map(|(k, _)| (k, None)).collect();
        lib.write_state(&gone).unwrap();
        assert!(lib.state(b"").unwrap().is_empty());
    }

    site.serve().unwrap();
    assert!(!site.data.join("registry.json").exists());
    assert!(site.data.join("registry.json.migrated").exists());
    assert_eq!(registry_view(&site), view, "DPs, groups, assignments");
    assert_eq!(installed_rows(&site), installed, "counters");
    // The DP's certificate is still accepted: it reconnects and holds its
    // package.
    dp.serve().unwrap();
    ferry_tests::harness::wait_for("dp1 to reconnect", Duration::from_secs(60), || {
        Ok(site.dp_row("dp1")?["online"].as_bool().filter(|&b| b))
    })
    .unwrap();
    site.wait_installed(&id, "dp1", 1, Duration::from_secs(60))
        .unwrap();
    assert!(!dp.log_text().contains("revoked"));
    dp.stop().unwrap();
}

#[test]
fn a_site_killed_during_a_servicing_job_keeps_its_catalog_jobs_and_dps() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // ~160 MiB, serviced with ~96 MiB of new files.
    let wim = big_wim_with(d, 40, wimtools::WINDOWS_PROPS);
    let mut site = SiteProc::start(d).unwrap();
    let id = site.add_image(&wim, &[]).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let mut dp = DpProc::start(d, "dp1", &site).unwrap();
    site.cli_ok(&["group", "create", "branch"]).unwrap();
    site.cli_ok(&["group", "add", "branch", "dp1"]).unwrap();
    site.cli_ok(&["distribute", &id, "--group", "branch"])
        .unwrap();
    site.wait_installed(&id, "dp1", 1, Duration::from_secs(120))
        .unwrap();
    let mut update = ferry_tests::updates::UpdateSpec::new("KB7000001", "2026-04-14");
    // 96 MiB of new, incompressible files: the append, its verification
    // and the import take long enough to be caught running.
    let mut c = Content::new(5);
    update.add = (0..24)
        .map(|i| (format!("Windows/System32/new{i}.dll"), c.bytes(4 << 20)))
        .collect();
    let folder = update.write(&d.join("updates")).unwrap();
    site.cli_ok(&["update", "import", folder.to_str().unwrap()])
        .unwrap();
    let catalog_before = site.cli_json(&["image", "show", &id]).unwrap();
    let view = registry_view(&site);
    let installed = installed_rows(&site);

    let mut cli = std::process::Command::new(ferry_tests::harness::ferry_bin())
        .arg("--data")
        .arg(&site.data)
        .args(["image", "service", &id, "--updates", "KB7000001"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    ferry_tests::harness::wait_for("the job to run", Duration::from_secs(60), || {
        let j = site.cli_json(&["jobs", "show", "1"]).ok();
        Ok(j.filter(|j| j["state"] == "running"))
    })
    .unwrap();
    site.kill();
    let _ = cli.wait();

    site.serve().unwrap();
    let job = site.cli_json(&["jobs", "show", "1"]).unwrap();
    let catalog = site.cli_json(&["image", "show", &id]).unwrap();
    match job["state"].as_str() {
        // Killed before the revision was committed: nothing of it is kept.
        Some("failed") => {
            assert!(
                job["runs"][0]["error"]
                    .as_str()
                    .unwrap()
                    .contains("stopped"),
                "{job}"
            );
            assert_eq!(catalog["revisions"], catalog_before["revisions"]);
            // Nothing new to send: dp1 says "installed" again, figures kept.
            assert_eq!(installed_rows(&site), installed, "counters");
        }
        // Killed after: the revision is there and the job says so.
        Some("succeeded") => {
            assert_eq!(job["runs"][0]["revision"], 2, "{job}");
            assert_eq!(catalog["revisions"].as_array().unwrap().len(), 2);
        }
        other => panic!("job after the kill: {other:?} {job}"),
    }
    assert!(
        fs::read_dir(site.data.join("work"))
            .map(|mut e| e.next().is_none())
            .unwrap_or(true),
        "the job's work files are gone"
    );
    assert_eq!(registry_view(&site), view, "DPs, groups, assignments");
    // The site services again, and the DP gets the result.
    if job["state"] == "failed" {
        site.cli_ok(&["image", "service", &id, "--updates", "KB7000001"])
            .unwrap();
    }
    site.cli_ok(&["distribute", &id, "--group", "branch"])
        .unwrap();
    site.wait_installed(&id, "dp1", 2, Duration::from_secs(120))
        .unwrap();
    dp.stop().unwrap();
}
