//! Distribution to DPs over QUIC, end to end: real site and DP processes on
//! loopback, real WIMs, real RocksDB libraries on both sides.

use std::fs;
use std::path::Path;
use std::time::Duration;

use ferry_tests::harness::{wait_for, DpProc, SiteProc};
use ferry_tests::tree::TreeSpec;
use ferry_tests::wimtools::{self, ServiceSpec};

/// The redistribution bound from the replication issue.
const MAX_WIRE_OVER_FLOOR: f64 = 1.10;
const LIMIT: Duration = Duration::from_secs(120);

fn same_file(a: &Path, b: &Path) -> bool {
    let (x, y) = (fs::read(a).unwrap(), fs::read(b).unwrap());
    x.len() == y.len() && blake3::hash(&x) == blake3::hash(&y)
}

fn id_of(pkg: &serde_json::Value) -> String {
    pkg["id"].as_str().unwrap().to_string()
}

#[test]
fn two_dps_get_the_image_then_only_the_delta_and_undistribute_frees_it() {
    let dir = tempfile::tempdir().unwrap();
    let spec = TreeSpec {
        files: 1500,
        seed: 11,
        ..TreeSpec::default()
    };
    let pair = wimtools::serviced_pair(dir.path(), &spec, "LZX", &ServiceSpec::default()).unwrap();
    let floor = wimtools::blob_floor(&pair.base, &pair.serviced).unwrap();

    let site = SiteProc::start(dir.path()).unwrap();
    let mut dp1 = DpProc::start(dir.path(), "dp1", &site).unwrap();
    let mut dp2 = DpProc::start(dir.path(), "dp2", &site).unwrap();
    let pkg = site.add_image(&pair.base, &[]).unwrap();
    let id = id_of(&pkg);

    // dp1 directly, dp2 through a group.
    let dry = site
        .cli_json(&["distribute", &id, "--dp", "dp1", "--dry-run"])
        .unwrap();
    let full = fs::metadata(&pair.base).unwrap().len();
    assert_eq!(dry["assigned"], false);
    // An empty DP needs every distinct chunk: what the import stored.
    let (_, stored) = ferry_tests::harness::stats_of(&pkg);
    assert_eq!(dry["needs"][0]["needed_bytes"].as_u64().unwrap(), stored);
    assert_eq!(dry["needs"][0]["full_bytes"].as_u64().unwrap(), full);
    site.cli_ok(&["distribute", &id, "--dp", "dp1"]).unwrap();
    site.cli_ok(&["group", "create", "branch"]).unwrap();
    site.cli_ok(&["distribute", &id, "--group", "branch"])
        .unwrap();
    site.cli_ok(&["group", "add", "branch", "dp2"]).unwrap();

    for dp in [&dp1, &dp2] {
        site.wait_installed(&id, &dp.name, 1, LIMIT).unwrap();
        let got = dp.content().join(&id).join("base.wim");
        assert!(
            same_file(&got, &pair.base),
            "{} holds a different file",
            dp.name
        );
        wimtools::verify(&got).unwrap();
    }
    let dry = site
        .cli_json(&["distribute", &id, "--dp", "dp1", "--dry-run"])
        .unwrap();
    assert_eq!(dry["needs"][0]["needed_bytes"], 0, "dp1 holds it all");

    // Service and refresh: a new revision of the same package.
    site.refresh(&id, &pair.serviced).unwrap();
    let show = site.cli_json(&["image", "show", &id]).unwrap();
    assert_eq!(show["revisions"].as_array().unwrap().len(), 2);
    for dp in [&dp1, &dp2] {
        let row = site.wait_installed(&id, &dp.name, 2, LIMIT).unwrap();
        let wire = row["wire_bytes"].as_u64().unwrap();
        let received = row["bytes_done"].as_u64().unwrap();
        eprintln!(
            "{}: redistribution received {received} chunk bytes, {wire} bytes at the socket; blob floor {floor} ({:.3}×)",
            dp.name,
            wire as f64 / floor as f64
        );
        assert!(wire > 0 && received > 0);
        assert!(
            wire as f64 <= floor as f64 * MAX_WIRE_OVER_FLOOR,
            "{}: {wire} wire bytes > {MAX_WIRE_OVER_FLOOR}× floor {floor}",
            dp.name
        );
        // The file at the package's path is now the serviced image.
        let got = dp.content().join(&id).join("base.wim");
        assert!(
            same_file(&got, &pair.serviced),
            "{} did not move to r2",
            dp.name
        );
        wimtools::verify(&got).unwrap();
    }

    // Undistribute from dp1: it holds nothing afterwards.
    let e = site.cli(&["undistribute", &id, "--dp", "dp2"]);
    assert!(!e.status.success(), "dp2 gets it through a group");
    assert!(String::from_utf8_lossy(&e.stderr).contains("group branch"));
    let e = site.cli(&["image", "remove", &id]);
    assert!(
        !e.status.success(),
        "a distributed package cannot be removed"
    );
    site.cli_ok(&["undistribute", &id, "--dp", "dp1"]).unwrap();
    wait_for("dp1 to drop the package", LIMIT, || {
        Ok(site.row(&id, "dp1")?.is_none().then_some(()))
    })
    .unwrap();
    assert!(!dp1.content().join(&id).exists());
    dp1.stop().unwrap();
    let lib = ferry_store::Library::open(&dp1.data.join("library")).unwrap();
    assert_eq!(
        lib.stats().chunks,
        0,
        "a DP with nothing assigned holds no chunks"
    );
    drop(lib);
    // dp2 still holds it, untouched.
    assert!(same_file(
        &dp2.content().join(&id).join("base.wim"),
        &pair.serviced
    ));
    dp2.stop().unwrap();
}

fn big_wim(dir: &Path, mib: usize) -> std::path::PathBuf {
    wimtools::big_wim(dir, mib, 5).unwrap()
}

#[test]
fn a_killed_dp_resumes_without_fetching_again_and_waits_for_a_killed_site() {
    let dir = tempfile::tempdir().unwrap();
    let wim = big_wim(dir.path(), 128);
    let mut site = SiteProc::start(dir.path()).unwrap();
    let mut dp = DpProc::enroll(dir.path(), "dp1", &site).unwrap();
    // Slow enough to stop it in the middle on any machine.
    dp.serve_args = vec!["--max-rate".into(), "32M".into()];
    dp.serve().unwrap();
    let id = id_of(&site.add_image(&wim, &[]).unwrap());
    site.cli_ok(&["distribute", &id, "--dp", "dp1"]).unwrap();

    let progress = |site: &SiteProc, at_least: f64| {
        wait_for("the transfer to progress", LIMIT, || {
            let Some(r) = site.row(&id, "dp1")? else {
                return Ok(None);
            };
            let (done, needed) = (
                r["bytes_done"].as_u64().unwrap_or(0),
                r["bytes_needed"].as_u64().unwrap_or(0),
            );
            assert_ne!(
                r["state"], "installed",
                "finished before it could be stopped"
            );
            Ok((needed > 0 && done as f64 >= needed as f64 * at_least).then_some((done, needed)))
        })
        .unwrap()
    };
    let (done_before, full_needed) = progress(&site, 0.3);
    dp.kill();
    // Let the site notice the connection is gone before reading its count.
    std::thread::sleep(Duration::from_millis(500));
    let served_before_restart = site.dp_row("dp1").unwrap()["served_bytes"]
        .as_u64()
        .unwrap();
    dp.serve().unwrap();
    // The resumed plan lacks what had arrived.
    let resumed_needed = wait_for("the resumed plan", LIMIT, || {
        let r = site.row(&id, "dp1")?.unwrap();
        let n = r["bytes_needed"].as_u64().unwrap_or(0);
        Ok((r["state"] == "in-progress" && n > 0 && n < full_needed).then_some(n))
    })
    .unwrap();
    assert!(
        resumed_needed + done_before <= full_needed,
        "resumed plan {resumed_needed} + received before {done_before} > {full_needed}: chunks fetched twice"
    );

    // Now the site dies in the middle; the DP waits and finishes after.
    progress(&site, 0.3);
    let served_total = site.dp_row("dp1").unwrap()["served_bytes"]
        .as_u64()
        .unwrap();
    site.kill();
    std::thread::sleep(Duration::from_secs(2));
    site.serve().unwrap();
    let row = site.wait_installed(&id, "dp1", 1, LIMIT).unwrap();
    let got = dp.content().join(&id).join(wim.file_name().unwrap());
    assert!(same_file(&got, &wim));
    wimtools::verify(&got).unwrap();
    // Before the site restart: what was sent in all is the first session's
    // chunks plus the resumed plan's share, not the image twice.
    assert!(
        served_total <= served_before_restart + resumed_needed,
        "site sent {served_total} bytes"
    );
    assert!(row["full_bytes"].as_u64().unwrap() >= full_needed);
    assert!(
        dp.log_text().contains("lost the site"),
        "the DP noticed the site was gone"
    );
}

#[test]
fn revoked_dps_used_tokens_and_foreign_cas_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let site = SiteProc::start(dir.path()).unwrap();
    let mut dp = DpProc::start(dir.path(), "dp1", &site).unwrap();
    wait_for("dp1 online", LIMIT, || {
        Ok((site.dp_row("dp1")?["online"] == true).then_some(()))
    })
    .unwrap();

    // A used token and an unknown one.
    let token = site.cli_json(&["dp", "add", "dp2"]).unwrap()["token"]
        .as_str()
        .unwrap()
        .to_string();
    let init = |data: &str, token: &str, addr: &str| {
        std::process::Command::new(ferry_tests::harness::ferry_bin())
            .args(["dp", "init", "--site", addr, "--token", token, "--data"])
            .arg(dir.path().join(data))
            .output()
            .unwrap()
    };
    // The site's own folder (FERRY_DATA of the quick start), and a folder
    // holding something else, are refused before the token is spent.
    for (folder, says) in [
        (site.data.clone(), "is a site's data folder"),
        (dir.path().to_path_buf(), "is not empty"),
    ] {
        let before: Vec<_> = fs::read_dir(&folder)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        let out = std::process::Command::new(ferry_tests::harness::ferry_bin())
            .args([
                "dp",
                "init",
                "--site",
                &site.dp_addr(),
                "--token",
                &token,
                "--data",
            ])
            .arg(&folder)
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{err}");
        let after: Vec<_> = fs::read_dir(&folder)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(before, after, "nothing written into {}", folder.display());
    }
    assert!(
        init("dp2", &token, &site.dp_addr()).status.success(),
        "the token is still good"
    );
    // A DP that never finished enrolling gets a new token; the old one is
    // dead, and an enrolled DP gets none.
    let add = |args: &[&str]| {
        let r = site.cli_json(&[&["dp", "add"], args].concat()).unwrap();
        assert_eq!(r["site"], site.dp_addr(), "the site's real DP endpoint");
        r["token"].as_str().unwrap().to_string()
    };
    let first = add(&["dp9"]);
    let out = site.cli(&["dp", "add", "dp9"]);
    assert!(
        !out.status.success(),
        "a second add is not a silent reissue"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("ferry dp add dp9 --reissue"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let second = add(&["dp9", "--reissue"]);
    assert_ne!(first, second);
    assert!(!init("dp9-old", &first, &site.dp_addr()).status.success());
    assert!(init("dp9", &second, &site.dp_addr()).status.success());
    assert!(
        !site.cli(&["dp", "add", "dp9"]).status.success(),
        "enrolled: no new token"
    );
    let again = init("dp2-again", &token, &site.dp_addr());
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("unknown or was used"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    // A port where no site answers is named as such, within seconds.
    let dead = ferry_tests::harness::free_udp_port().unwrap();
    let start = std::time::Instant::now();
    let out = init("dp2-dead", &token, &format!("127.0.0.1:{dead}"));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no site answered at 127.0.0.1"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        start.elapsed() < Duration::from_secs(15),
        "{:?}",
        start.elapsed()
    );
    let forged = token.replacen(&token[7..15], "00000000", 1);
    assert!(!init("dp2-forged", &forged, &site.dp_addr())
        .status
        .success());

    // A token pins the CA: the same token against another site fails before
    // anything is sent, and the other site's DP cannot talk to this site.
    let other = SiteProc::start_with(dir.path(), "other", &[]).unwrap();
    let token3 = site.cli_json(&["dp", "add", "dp3"]).unwrap()["token"]
        .as_str()
        .unwrap()
        .to_string();
    let wrong = init("dp3", &token3, &other.dp_addr());
    assert!(!wrong.status.success());
    assert!(
        String::from_utf8_lossy(&wrong.stderr)
            .contains("not the one named in the enrollment token"),
        "{}",
        String::from_utf8_lossy(&wrong.stderr)
    );
    let mut foreign = DpProc::enroll(dir.path(), "foreign", &other).unwrap();
    let cfg = foreign.data.join("dp.toml");
    let text = fs::read_to_string(&cfg)
        .unwrap()
        .replace(&other.dp_addr(), &site.dp_addr());
    fs::write(&cfg, text).unwrap();
    foreign.serve().unwrap();
    wait_for("the foreign DP to be refused", LIMIT, || {
        Ok(fs::read_to_string(&site.log)?
            .contains("DP connection refused in the TLS handshake")
            .then_some(()))
    })
    .unwrap();
    wait_for("the foreign DP to log the refusal", LIMIT, || {
        Ok(foreign
            .log_text()
            .contains("cannot connect to the site")
            .then_some(()))
    })
    .unwrap();
    foreign.kill();

    // Revocation closes the live connection and refuses new ones.
    site.cli_ok(&["dp", "revoke", "dp1"]).unwrap();
    let row = site.dp_row("dp1").unwrap();
    assert_eq!(row["enrollment"], "revoked");
    // The agent stops with the reason instead of redialling for ever.
    let status = wait_for("dp1's agent to stop", LIMIT, || dp.exited()).unwrap();
    assert!(!status.success(), "a revoked agent exits non-zero");
    assert!(
        dp.log_text().contains("revoked by the site"),
        "{}",
        dp.log_text()
    );
    assert_eq!(site.dp_row("dp1").unwrap()["online"], false);
    // And the site is not asked again: at most the refusals of its last
    // attempts, none once it has stopped.
    let refusals = || {
        fs::read_to_string(&site.log)
            .unwrap()
            .matches("DP connection refused")
            .count()
    };
    let settled = refusals();
    std::thread::sleep(std::time::Duration::from_secs(3));
    assert_eq!(
        refusals(),
        settled,
        "no refusal per second after it stopped"
    );
}

#[test]
fn tampered_manifests_are_refused_and_corrupted_chunks_asked_again() {
    let dir = tempfile::tempdir().unwrap();
    let wim = wimtools::tree_wim(dir.path(), "small", 300, 3, &[]).unwrap();

    // A site that alters every manifest after signing it.
    let bad = SiteProc::start_with(
        dir.path(),
        "bad-site",
        &[("FERRY_FAULT_TAMPER_MANIFEST", "1")],
    )
    .unwrap();
    let _dp = DpProc::start(dir.path(), "dp1", &bad).unwrap();
    let id = id_of(&bad.add_image(&wim, &[]).unwrap());
    bad.cli_ok(&["distribute", &id, "--dp", "dp1"]).unwrap();
    let row = wait_for("the DP to refuse the manifest", LIMIT, || {
        let r = bad.row(&id, "dp1")?;
        Ok(r.filter(|r| r["state"] == "failed"))
    })
    .unwrap();
    let err = row["error"].as_str().unwrap();
    assert!(err.contains("not signed by the site"), "{err}");
    assert!(row["next_retry"].is_string());
    assert!(!_dp.content().join(&id).exists(), "nothing installed");

    // A site that flips a bit in its first five chunks: the DP asks again.
    let flaky = SiteProc::start_with(
        dir.path(),
        "flaky-site",
        &[("FERRY_FAULT_CORRUPT_CHUNKS", "5")],
    )
    .unwrap();
    let dp2 = DpProc::start(dir.path(), "dp2", &flaky).unwrap();
    let id = id_of(&flaky.add_image(&wim, &[]).unwrap());
    flaky.cli_ok(&["distribute", &id, "--dp", "dp2"]).unwrap();
    flaky.wait_installed(&id, "dp2", 1, LIMIT).unwrap();
    assert!(same_file(&dp2.content().join(&id).join("small.wim"), &wim));
    assert!(dp2
        .log_text()
        .contains("chunk failed verification; asking again"));
}

#[test]
fn a_package_too_big_for_the_dp_disk_is_refused_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let wim = big_wim(dir.path(), 96);
    let small = wimtools::tree_wim(dir.path(), "small", 100, 5, &[]).unwrap();

    let site = SiteProc::start(dir.path()).unwrap();
    let disk_dir = dir.path().join("dpdisk");
    // The 96 MiB image plus the space kept free does not fit in 100 MiB.
    let _disk = ferry_tests::disk::SmallDisk::mount(&disk_dir, 100).unwrap();
    let mut dp = DpProc::start(&disk_dir, "dp1", &site).unwrap();
    let big_id = id_of(&site.add_image(&wim, &[]).unwrap());
    site.cli_ok(&["distribute", &big_id, "--dp", "dp1"])
        .unwrap();
    let row = wait_for("the DP to report the full disk", LIMIT, || {
        Ok(site.row(&big_id, "dp1")?.filter(|r| r["state"] == "failed"))
    })
    .unwrap();
    let err = row["error"].as_str().unwrap();
    assert!(err.contains("not enough space on DP dp1"), "{err}");
    assert!(err.contains("needs"), "{err}");
    assert!(row["next_retry"].is_string());
    let content = dp.content();
    assert!(!content.join(&big_id).exists(), "no package folder");
    let partial: Vec<_> = fs::read_dir(content.join(".ferry"))
        .map(|rd| rd.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(partial.is_empty(), "no partial rebuild: {partial:?}");
    // The site lost nothing.
    let verify = site.cli_json(&["content", "verify"]).unwrap();
    assert!(verify["damaged"].as_array().unwrap().is_empty());

    // Taking the package away, a package that fits installs.
    site.cli_ok(&["undistribute", &big_id, "--dp", "dp1"])
        .unwrap();
    let small_id = id_of(&site.add_image(&small, &[]).unwrap());
    site.cli_ok(&["distribute", &small_id, "--dp", "dp1"])
        .unwrap();
    site.wait_installed(&small_id, "dp1", 1, LIMIT).unwrap();
    assert!(same_file(
        &content.join(&small_id).join("small.wim"),
        &small
    ));
    wait_for("the big package to be forgotten", LIMIT, || {
        Ok(site.row(&big_id, "dp1")?.is_none().then_some(()))
    })
    .unwrap();
    dp.kill();
}

#[test]
fn what_status_and_dp_list_show_survives_a_restart_of_the_site() {
    let dir = tempfile::tempdir().unwrap();
    let wim = wimtools::tree_wim(dir.path(), "small", 150, 91, &[]).unwrap();
    let mut site = SiteProc::start(dir.path()).unwrap();
    let _dp = DpProc::start(dir.path(), "dp1", &site).unwrap();
    let id = id_of(&site.add_image(&wim, &[]).unwrap());
    site.cli_ok(&["distribute", &id, "--dp", "dp1"]).unwrap();
    site.wait_installed(&id, "dp1", 1, LIMIT).unwrap();
    let figures = |site: &SiteProc| {
        let r = site.row(&id, "dp1").unwrap().unwrap();
        let d = site.dp_row("dp1").unwrap();
        serde_json::json!({
            "state": r["state"], "bytes_needed": r["bytes_needed"], "bytes_done": r["bytes_done"],
            "full_bytes": r["full_bytes"], "wire_bytes": r["wire_bytes"],
            "served_bytes": d["served_bytes"], "installed": d["installed"],
        })
    };
    let before = figures(&site);
    // What a DP holds, as objects; its disk as it reported it after the
    // install: at least the image, and the free space of a real filesystem.
    assert_eq!(
        before["installed"],
        serde_json::json!([{ "package": id, "revision": 1 }])
    );
    let disk = wait_for("dp1 to report its disk", LIMIT, || {
        let d = site.dp_row("dp1")?["disk"].clone();
        Ok((!d.is_null()).then_some(d))
    })
    .unwrap();
    let wim_size = fs::metadata(&wim).unwrap().len();
    assert!(disk["used_bytes"].as_u64().unwrap() >= wim_size, "{disk}");
    assert!(disk["free_bytes"].as_u64().unwrap() > 0, "{disk}");
    assert!(
        disk["total_bytes"].as_u64().unwrap() > disk["free_bytes"].as_u64().unwrap(),
        "{disk}"
    );
    let table = site.cli_ok(&["dp", "list"]).unwrap();
    assert!(table.contains(&format!("{id} r1 /")), "{table}");
    let status = site.cli_ok(&["status"]).unwrap();
    for t in [&table, &status] {
        assert!(
            t.lines().all(|l| l.chars().count() <= 100),
            "fits 100 columns:\n{t}"
        );
    }
    assert!(
        status.contains("installed") && status.contains("now"),
        "{status}"
    );
    assert!(before["served_bytes"].as_u64().unwrap() > 0, "{before}");
    assert!(before["wire_bytes"].as_u64().unwrap() > 0, "{before}");
    for restart in ["stopped", "killed"] {
        if restart == "stopped" {
            site.stop().unwrap();
        } else {
            site.kill();
        }
        site.serve().unwrap();
        assert_eq!(figures(&site), before, "after the site was {restart}");
    }
}

#[test]
fn dps_leave_groups_and_a_group_is_deleted_only_without_packages() {
    let dir = tempfile::tempdir().unwrap();
    let wim = wimtools::tree_wim(dir.path(), "small", 30, 93, &[]).unwrap();
    let site = SiteProc::start(dir.path()).unwrap();
    let _dp1 = DpProc::enroll(dir.path(), "dp1", &site).unwrap();
    let _dp2 = DpProc::enroll(dir.path(), "dp2", &site).unwrap();
    let id = id_of(&site.add_image(&wim, &[]).unwrap());
    site.cli_ok(&["group", "create", "branch"]).unwrap();
    site.cli_ok(&["group", "add", "branch", "dp1", "dp2"])
        .unwrap();
    site.cli_ok(&["distribute", &id, "--group", "branch"])
        .unwrap();
    let assigned = |dp: &str| site.dp_row(dp).unwrap()["assigned"].clone();
    assert_eq!(assigned("dp2"), serde_json::json!([id]));
    let fails = |args: &[&str], says: &str| {
        let out = site.cli(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert!(err.contains(says), "{args:?}: {err}");
    };

    site.cli_ok(&["group", "remove", "branch", "dp2"]).unwrap();
    let groups = site.cli_json(&["group", "list"]).unwrap();
    assert_eq!(groups["branch"]["members"], serde_json::json!(["dp1"]));
    assert_eq!(
        assigned("dp2"),
        serde_json::json!([]),
        "the group's package left dp2"
    );
    assert_eq!(assigned("dp1"), serde_json::json!([id]));
    fails(
        &["group", "remove", "branch", "dp1", "dp9"],
        "dp9 is not in group branch",
    );
    assert_eq!(
        site.cli_json(&["group", "list"]).unwrap()["branch"]["members"],
        serde_json::json!(["dp1"]),
        "all or none"
    );

    fails(&["group", "delete", "branch"], "ferry undistribute");
    site.cli_ok(&["undistribute", &id, "--group", "branch"])
        .unwrap();
    site.cli_ok(&["group", "delete", "branch"]).unwrap();
    assert_eq!(
        site.cli_json(&["group", "list"]).unwrap(),
        serde_json::json!({})
    );
    fails(&["group", "delete", "branch"], "branch");
}

#[test]
fn a_revoked_dp_stops_counting_and_dp_remove_frees_its_name() {
    let dir = tempfile::tempdir().unwrap();
    let wim = wimtools::tree_wim(dir.path(), "small", 30, 94, &[]).unwrap();
    let site = SiteProc::start(dir.path()).unwrap();
    let mut dp1 = DpProc::start(dir.path(), "dp1", &site).unwrap();
    let mut dp2 = DpProc::start(dir.path(), "dp2", &site).unwrap();
    let id = id_of(&site.add_image(&wim, &[]).unwrap());
    site.cli_ok(&["group", "create", "branch"]).unwrap();
    site.cli_ok(&["group", "add", "branch", "dp1"]).unwrap();
    site.cli_ok(&["distribute", &id, "--dp", "dp1", "dp2"])
        .unwrap();
    site.wait_installed(&id, "dp1", 1, LIMIT).unwrap();
    site.wait_installed(&id, "dp2", 1, LIMIT).unwrap();

    // Revoked: its row says so, and taking the package away ends at once
    // (a revoked DP reports no removal).
    site.cli_ok(&["dp", "revoke", "dp1"]).unwrap();
    assert_eq!(site.row(&id, "dp1").unwrap().unwrap()["state"], "revoked");
    site.cli_ok(&["undistribute", &id, "--dp", "dp1"]).unwrap();
    assert!(
        site.row(&id, "dp1").unwrap().is_none(),
        "no row left removing"
    );
    wait_for("the revoked agent to stop", LIMIT, || dp1.exited()).unwrap();

    // An online DP is removed only with --force; errors are JSON under
    // --json, with a code.
    let out = site.cli(&["dp", "remove", "dp2", "--json"]);
    assert!(!out.status.success());
    let err: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(err["code"], "conflict", "{err}");
    assert!(err["error"].as_str().unwrap().contains("--force"), "{err}");
    let out = site.cli(&["dp", "remove", "dp7", "--json"]);
    let err: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(err["code"], "not-found", "{err}");

    site.cli_ok(&["undistribute", &id, "--dp", "dp2"]).unwrap();
    wait_for("dp2 to remove the package", LIMIT, || {
        Ok(site.row(&id, "dp2")?.is_none().then_some(()))
    })
    .unwrap();
    // Nothing counts dp1's copy any more: the image may go.
    site.cli_ok(&["image", "remove", &id]).unwrap();

    site.cli_ok(&["dp", "remove", "dp1"]).unwrap();
    site.cli_ok(&["dp", "remove", "dp2", "--force"]).unwrap();
    wait_for("the removed agent to stop", LIMIT, || dp2.exited()).unwrap();
    let list = site.cli_json(&["dp", "list"]).unwrap();
    assert_eq!(list, serde_json::json!([]), "both records are gone");
    assert_eq!(
        site.cli_json(&["group", "list"]).unwrap()["branch"]["members"],
        serde_json::json!([]),
        "dp1 left its group"
    );
    // The name is free again: a new DP enrolls under it.
    let r = site.cli_json(&["dp", "add", "dp1"]).unwrap();
    assert!(r["token"].as_str().unwrap().starts_with("ferry1."), "{r}");
}

#[test]
fn redistribute_rebuilds_a_dps_copy_from_scratch_copying_nothing_it_holds() {
    let dir = tempfile::tempdir().unwrap();
    let wim = wimtools::tree_wim(dir.path(), "small", 60, 95, &[]).unwrap();
    let site = SiteProc::start(dir.path()).unwrap();
    let dp = DpProc::start(dir.path(), "dp1", &site).unwrap();
    // Two packages of the same content: the second one's first copy is
    // made from the first one's files.
    let a = id_of(&site.add_image(&wim, &[]).unwrap());
    site.cli_ok(&["distribute", &a, "--dp", "dp1"]).unwrap();
    site.wait_installed(&a, "dp1", 1, LIMIT).unwrap();
    let b = id_of(&site.add_image(&wim, &[]).unwrap());
    site.cli_ok(&["distribute", &b, "--dp", "dp1"]).unwrap();
    let first = site.wait_installed(&b, "dp1", 1, LIMIT).unwrap();
    assert!(first["bytes_local"].as_u64().unwrap() > 0, "{first}");

    // The operator distrusts dp1's copy of b (a byte of it is damaged).
    let file = dp.content().join(&b).join("small.wim");
    let mut bytes = fs::read(&file).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0xff;
    fs::write(&file, &bytes).unwrap();
    let out = site.cli_json(&["redistribute", &b, "--dp", "dp1"]).unwrap();
    assert_eq!(out["dps"], serde_json::json!(["dp1"]));
    let row = wait_for("dp1 to rebuild b from scratch", LIMIT, || {
        let r = site.row(&b, "dp1")?;
        Ok(r.filter(|r| {
            r["state"] == "installed" && r["bytes_local"] == 0 && r["bytes_done"].as_u64() > Some(0)
        }))
    })
    .unwrap();
    // Every chunk came from the site: as many bytes as the package holds.
    assert_eq!(row["bytes_done"], row["bytes_needed"]);
    let whole = first["bytes_needed"].as_u64().unwrap() + first["bytes_local"].as_u64().unwrap();
    assert!(
        row["bytes_needed"].as_u64().unwrap() >= whole,
        "{row} after {first}"
    );
    assert!(same_file(&file, &wim), "the damaged byte is gone");
    assert!(
        same_file(&dp.content().join(&a).join("small.wim"), &wim),
        "a is untouched"
    );
    // The console's pie: counts per package.
    let sums = site.cli_json(&["status", "--summary"]).unwrap();
    assert_eq!(sums.as_array().unwrap().len(), 2, "{sums}");
    for s in sums.as_array().unwrap() {
        assert_eq!(
            (s["dps"].as_u64(), s["installed"].as_u64()),
            (Some(1), Some(1)),
            "{s}"
        );
        assert_eq!(s["failed"], 0, "{s}");
    }
    // Refused where it means nothing.
    let out = site.cli(&["redistribute", &b, "--dp", "dp9"]);
    assert!(!out.status.success());
    site.cli_ok(&["undistribute", &a, "--dp", "dp1"]).unwrap();
    let out = site.cli(&["redistribute", &a, "--dp", "dp1"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("not distributed to dp1"));
}

#[test]
fn a_rollback_releases_a_kept_revision_and_dps_fetch_only_the_delta() {
    let dir = tempfile::tempdir().unwrap();
    let spec = TreeSpec {
        files: 300,
        seed: 12,
        ..TreeSpec::default()
    };
    let pair = wimtools::serviced_pair(dir.path(), &spec, "LZX", &ServiceSpec::default()).unwrap();
    let site = SiteProc::start(dir.path()).unwrap();
    let dp = DpProc::start(dir.path(), "dp1", &site).unwrap();
    let id = id_of(&site.add_image(&pair.base, &[]).unwrap());
    site.cli_ok(&["image", "set", &id, "--keep", "2"]).unwrap();
    site.cli_ok(&["distribute", &id, "--dp", "dp1"]).unwrap();
    site.wait_installed(&id, "dp1", 1, LIMIT).unwrap();
    site.refresh(&id, &pair.serviced).unwrap();
    site.wait_installed(&id, "dp1", 2, LIMIT).unwrap();
    let revs = site.cli_json(&["image", "revisions", &id]).unwrap();
    assert_eq!(revs["keep"], 2);
    let numbers: Vec<_> = revs["revisions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["revision"].clone(), r["released"].clone()))
        .collect();
    assert_eq!(
        numbers,
        [(1.into(), false.into()), (2.into(), true.into())],
        "both kept: {revs}"
    );

    let out = site
        .cli_json(&["image", "rollback", &id, "--to", "1"])
        .unwrap();
    assert_eq!(out["revisions"][0]["released"], true, "{out}");
    let row = site.wait_installed(&id, "dp1", 1, LIMIT).unwrap();
    let file = dp.content().join(&id).join("base.wim");
    assert!(same_file(&file, &pair.base), "dp1 holds revision 1 again");
    // A delta: what revision 2 already held was copied, not fetched.
    assert!(row["bytes_local"].as_u64().unwrap() > 0, "{row}");
    assert!(
        row["bytes_needed"].as_u64().unwrap() < row["full_bytes"].as_u64().unwrap() / 4,
        "{row}"
    );
    let revs = site.cli_json(&["image", "revisions", &id]).unwrap();
    assert_eq!(
        revs["revisions"][0]["installed_on"],
        serde_json::json!(["dp1"])
    );
    // Revision 2 is still kept (the newest), and distribute goes back to it.
    site.cli_ok(&["distribute", &id, "--dp", "dp1"]).unwrap();
    site.wait_installed(&id, "dp1", 2, LIMIT).unwrap();
    assert!(same_file(&file, &pair.serviced));
    let out = site.cli(&["image", "rollback", &id, "--to", "7"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("has no revision 7"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A serviced pair of a 200-file tree, a site, and DP `dp1` holding the
/// base as revision 1 of a package (its id).
fn base_on_dp1(dir: &Path, seed: u64) -> (wimtools::ServicedPair, SiteProc, DpProc, String) {
    let spec = TreeSpec {
        files: 200,
        seed,
        ..TreeSpec::default()
    };
    let pair = wimtools::serviced_pair(dir, &spec, "LZX", &ServiceSpec::default()).unwrap();
    let site = SiteProc::start(dir).unwrap();
    let dp = DpProc::start(dir, "dp1", &site).unwrap();
    let id = site.install(&pair.base, "dp1", LIMIT).unwrap();
    (pair, site, dp, id)
}

#[test]
fn a_dp_in_maintenance_starts_no_transfer_and_catches_up_after() {
    let dir = tempfile::tempdir().unwrap();
    let (pair, site, dp, id) = base_on_dp1(dir.path(), 31);
    let file = dp.content().join(&id).join("base.wim");

    site.cli_ok(&["dp", "set", "dp1", "--maintenance", "on"])
        .unwrap();
    let dps = site.cli_json(&["dp", "list"]).unwrap();
    assert_eq!(dps[0]["maintenance"], true, "{dps}");
    let list = site.cli(&["dp", "list"]);
    assert!(
        String::from_utf8_lossy(&list.stdout).contains("maintenance"),
        "{}",
        String::from_utf8_lossy(&list.stdout)
    );
    wait_for("the DP to hear of its maintenance", LIMIT, || {
        Ok(dp.log_text().contains("maintenance=true").then_some(()))
    })
    .unwrap();
    // A new revision is released: the DP in maintenance does not start it.
    site.refresh(&id, &pair.serviced).unwrap();
    let row = wait_for("the new revision to be assigned", LIMIT, || {
        Ok(site
            .row(&id, "dp1")?
            .filter(|r| r["revision"] == 2 && r["state"] == "pending"))
    })
    .unwrap();
    assert_eq!(row["maintenance"], true, "{row}");
    std::thread::sleep(Duration::from_secs(5));
    let row = site.row(&id, "dp1").unwrap().unwrap();
    assert_eq!(row["state"], "pending", "nothing started: {row}");
    assert_eq!(row["holds_revision"], 1, "{row}");
    assert!(same_file(&file, &pair.base), "dp1 still holds revision 1");
    // The table wraps the state; its words are there.
    let status = String::from_utf8_lossy(&site.cli(&["status", &id]).stdout).into_owned();
    let words: Vec<&str> = status.split_whitespace().collect();
    assert!(
        words.contains(&"maintenance)") && words.contains(&"(holds"),
        "{status}"
    );

    // Out of maintenance, it catches up.
    site.cli_ok(&["dp", "set", "dp1", "--maintenance", "off"])
        .unwrap();
    site.wait_installed(&id, "dp1", 2, LIMIT).unwrap();
    assert!(same_file(&file, &pair.serviced), "dp1 holds revision 2");
    let dps = site.cli_json(&["dp", "list"]).unwrap();
    assert_eq!(dps[0]["maintenance"], false, "{dps}");
}

#[test]
fn a_prestage_bundle_holds_what_the_dp_lacks_signed_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let (pair, site, dp, id) = base_on_dp1(dir.path(), 44);
    // Revision 2 is released while the DP holds revision 1.
    site.cli_ok(&["dp", "set", "dp1", "--maintenance", "on"])
        .unwrap();
    site.refresh(&id, &pair.serviced).unwrap();
    let dry = site
        .cli_json(&["distribute", &id, "--dp", "dp1", "--dry-run"])
        .unwrap();
    let needed = dry["needs"][0]["needed_bytes"].as_u64().unwrap();
    let full_size = dry["needs"][0]["full_bytes"].as_u64().unwrap();
    assert!(needed > 0 && needed < full_size / 4, "a delta: {dry}");

    let prestage = |out: &Path, more: &[&str]| {
        let mut args = vec!["content", "prestage", &id, "--dp", "dp1"];
        args.extend(["--out", out.to_str().unwrap()]);
        args.extend_from_slice(more);
        site.cli_json(&args).unwrap()
    };
    let out = dir.path().join("dp1.bundle");
    let r = prestage(&out, &[]);
    assert_eq!(r["revision"], 2, "{r}");
    assert_eq!(r["chunk_bytes"], needed, "exactly what the DP lacks: {r}");
    assert!(!ferry_store::file::part_path(&out).exists());

    // The file: the site-signed manifest of revision 2, proven with the
    // key the DP holds, and the chunks, each checked.
    let f = std::io::BufReader::new(fs::File::open(&out).unwrap());
    let (mut reader, header) = ferry_wire::prestage::BundleReader::open(f).unwrap();
    assert_eq!((header.package.as_str(), header.revision), (id.as_str(), 2));
    assert_eq!(
        (header.dp.as_str(), header.base_revision, header.full),
        ("dp1", 1, false)
    );
    let key = hex::decode(
        fs::read_to_string(dp.data.join("manifest.pub"))
            .unwrap()
            .trim(),
    )
    .unwrap();
    let assignment = ferry_wire::pb::Assignment {
        package: id.clone(),
        revision: 2,
        ..Default::default()
    };
    let signed =
        ferry_dp::manifest::verify(&key, &assignment, header.manifest.as_ref().unwrap(), &[])
            .unwrap();
    let mut got = 0u64;
    let mut chunk_bytes = 0u64;
    while let Some((_, data)) = reader.next_chunk().unwrap() {
        got += 1;
        chunk_bytes += data.len() as u64;
    }
    assert_eq!(got, r["chunks"].as_u64().unwrap());
    assert_eq!(chunk_bytes, needed);
    let total: u64 = signed.manifests.iter().map(|m| m.size).sum();
    assert_eq!(total, full_size);

    // --full: every distinct chunk of the revision.
    let r = prestage(&dir.path().join("full.bundle"), &["--full"]);
    assert!(r["chunk_bytes"].as_u64().unwrap() > needed * 4, "{r}");
    assert_eq!(r["full"], true);

    // Unknown DP or package: named, nothing written.
    let nowhere = dir.path().join("none.bundle");
    for (args, what) in [
        (["content", "prestage", id.as_str(), "--dp", "dp9"], "dp9"),
        (
            ["content", "prestage", "FRY09999", "--dp", "dp1"],
            "FRY09999",
        ),
    ] {
        let mut a = args.to_vec();
        a.extend(["--out", nowhere.to_str().unwrap()]);
        let o = site.cli(&a);
        assert!(!o.status.success());
        assert!(
            String::from_utf8_lossy(&o.stderr).contains(what),
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(!nowhere.exists() && !ferry_store::file::part_path(&nowhere).exists());
    }
}

/// Rewrites the bundle at `from` into `to` with `change` applied to its
/// header (the chunks as they were): what another site or a forger makes.
fn rewrite_bundle(
    from: &Path,
    to: &Path,
    change: impl FnOnce(&mut ferry_wire::pb::PrestageHeader),
) {
    let f = std::io::BufReader::new(fs::File::open(from).unwrap());
    let (mut r, mut header) = ferry_wire::prestage::BundleReader::open(f).unwrap();
    change(&mut header);
    let out = fs::File::create(to).unwrap();
    let mut w = ferry_wire::prestage::BundleWriter::new(out, &header).unwrap();
    while let Some((id, data)) = r.next_chunk().unwrap() {
        w.chunk(&id, &data).unwrap();
    }
    w.finish().unwrap();
}

#[test]
fn a_prestaged_dp_installs_with_no_chunk_bytes_over_the_network_and_bad_bundles_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (pair, site, mut dp, id) = base_on_dp1(dir.path(), 45);
    // The site waits for a bundle instead of sending.
    site.cli_ok(&["dp", "set", "dp1", "--prestaged", "on"])
        .unwrap();
    assert_eq!(site.dp_row("dp1").unwrap()["prestaged"], true);
    let served_before = site.dp_row("dp1").unwrap()["served_bytes"]
        .as_u64()
        .unwrap();
    site.refresh(&id, &pair.serviced).unwrap();
    wait_for("revision 2 to wait for a bundle", LIMIT, || {
        Ok(site
            .row(&id, "dp1")?
            .filter(|r| r["revision"] == 2 && r["waits_for_prestage"] == true))
    })
    .unwrap();
    let status = String::from_utf8_lossy(&site.cli(&["status", &id]).stdout).into_owned();
    let words: Vec<&str> = status.split_whitespace().collect();
    assert!(words.contains(&"prestage"), "{status}");
    std::thread::sleep(Duration::from_secs(2));
    let row = site.row(&id, "dp1").unwrap().unwrap();
    assert_ne!(row["state"], "installed", "nothing sent: {row}");
    assert_ne!(row["state"], "failed", "waiting is no failure: {row}");
    let bundle = dir.path().join("dp1.bundle");
    let made = site
        .cli_json(&[
            "content",
            "prestage",
            &id,
            "--dp",
            "dp1",
            "--out",
            bundle.to_str().unwrap(),
        ])
        .unwrap();
    dp.stop().unwrap();
    let data = dp.data.to_str().unwrap().to_string();
    // What the DP's content folder holds, every file hashed.
    let content = || {
        let mut all = Vec::new();
        let mut dirs = vec![dp.content()];
        while let Some(d) = dirs.pop() {
            for e in fs::read_dir(&d).unwrap().filter_map(Result::ok) {
                let p = e.path();
                if p.is_dir() {
                    dirs.push(p);
                } else {
                    all.push((p.clone(), *blake3::hash(&fs::read(&p).unwrap()).as_bytes()));
                }
            }
        }
        all.sort();
        all
    };
    let before = content();
    let import = |file: &Path| {
        std::process::Command::new(ferry_tests::harness::ferry_bin())
            .args([
                "dp",
                "prestage",
                "--json",
                "--data",
                &data,
                file.to_str().unwrap(),
            ])
            .output()
            .unwrap()
    };

    // Cut short, a byte changed, signed by another key, from another site:
    // each refused with what is wrong, nothing staged.
    let bytes = fs::read(&bundle).unwrap();
    let cut = dir.path().join("cut.bundle");
    fs::write(&cut, &bytes[..bytes.len() * 2 / 3]).unwrap();
    let flipped = dir.path().join("flipped.bundle");
    let mut b = bytes.clone();
    let mid = b.len() / 2;
    b[mid] ^= 0x40;
    fs::write(&flipped, &b).unwrap();
    let forged = dir.path().join("forged.bundle");
    let other = ferry_net::pki::SigningKey::from_text(
        &ferry_net::pki::SigningKey::generate().unwrap(),
        "key",
    )
    .unwrap();
    rewrite_bundle(&bundle, &forged, |h| {
        let m = h.manifest.as_mut().unwrap();
        m.signature = other.sign(&m.body).into();
    });
    let foreign = dir.path().join("foreign.bundle");
    rewrite_bundle(&bundle, &foreign, |h| h.site_code = "ZZZ".into());
    for (file, why) in [
        (&cut, "cut short"),
        (&flipped, "bundle"),
        (&forged, "not signed by the site's key"),
        (&foreign, "from site ZZZ"),
    ] {
        let o = import(file);
        // Under --json the error is the document on stdout.
        let err = String::from_utf8_lossy(&o.stdout);
        assert!(!o.status.success(), "{} imported", file.display());
        assert!(err.contains(why), "{}: {err}", file.display());
        assert!(content() == before, "{} changed nothing", file.display());
    }

    // The bundle as made: staged, the agent finishes it from its own files.
    let o = import(&bundle);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["chunk_bytes"], made["chunk_bytes"], "{r}");
    assert!(r["slots_written"].as_u64().unwrap() > 0, "{r}");
    assert!(content() != before, "the chunks were staged");
    dp.serve().unwrap();
    site.wait_installed(&id, "dp1", 2, LIMIT).unwrap();
    let served_after = site.dp_row("dp1").unwrap()["served_bytes"]
        .as_u64()
        .unwrap();
    assert_eq!(
        served_after, served_before,
        "no chunk byte crossed the network"
    );
    let file = dp.content().join(&id).join("base.wim");
    assert!(same_file(&file, &pair.serviced), "dp1 holds revision 2");
}

#[test]
fn status_watch_redraws_until_the_transfer_is_installed() {
    let dir = tempfile::tempdir().unwrap();
    let wim = big_wim(dir.path(), 64);
    let site = SiteProc::start(dir.path()).unwrap();
    let _dp = DpProc::start(dir.path(), "dp1", &site).unwrap();
    let id = id_of(&site.add_image(&wim, &[]).unwrap());
    // Several seconds long, so frames catch it in progress.
    site.cli_ok(&["dp", "set", "dp1", "--rate", "16M"]).unwrap();
    let watch = |json: bool| {
        let mut c = std::process::Command::new(ferry_tests::harness::ferry_bin());
        c.arg("--data").arg(&site.data);
        if json {
            c.arg("--json");
        }
        c.args(["status", &id, "--watch", "300ms"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (table, json) = (watch(false), watch(true));
    site.cli_ok(&["distribute", &id, "--dp", "dp1"]).unwrap();
    site.wait_installed(&id, "dp1", 1, LIMIT).unwrap();
    // A few frames more after it is installed.
    std::thread::sleep(Duration::from_secs(1));
    let stop = |mut c: std::process::Child| {
        c.kill().unwrap();
        String::from_utf8(c.wait_with_output().unwrap().stdout).unwrap()
    };
    let (table, json) = (stop(table), stop(json));

    // Frames one after another, each with its time, the transfer moving
    // through them and the last one installed.
    let frames: Vec<&str> = table.split("every 300ms: ferry status, ").skip(1).collect();
    assert!(frames.len() >= 5, "{table}");
    let first_progress = frames
        .iter()
        .position(|f| f.contains("in-progress"))
        .unwrap_or_else(|| panic!("no frame shows it in progress:\n{table}"));
    let installed = frames.iter().position(|f| f.contains("installed")).unwrap();
    assert!(first_progress < installed, "{table}");
    assert!(frames.last().unwrap().contains("installed"), "{table}");
    // The percent shown grows.
    let percents: Vec<u64> = frames
        .iter()
        .filter_map(|f| {
            let at = f.find("% ")?;
            let digits: String = f[..at]
                .chars()
                .rev()
                .take_while(char::is_ascii_digit)
                .collect();
            digits.chars().rev().collect::<String>().parse().ok()
        })
        .collect();
    assert!(percents.windows(2).all(|w| w[0] <= w[1]), "{percents:?}");

    // With --json: one array of rows per line.
    let states: Vec<String> = json
        .lines()
        .map(|l| {
            let rows: serde_json::Value = serde_json::from_str(l).unwrap();
            rows[0]["state"].as_str().unwrap_or("none").to_string()
        })
        .collect();
    assert!(states.len() >= 5, "{json}");
    assert!(states.iter().any(|s| s == "in-progress"), "{states:?}");
    assert_eq!(states.last().unwrap(), "installed", "{states:?}");
}
