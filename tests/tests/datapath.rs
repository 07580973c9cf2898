//! The DP data path end to end, with real site and DP processes: the
//! content folder as the only copy of the bytes, resuming after kills, a
//! disk that fills in the middle, validation and repair, impaired links.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use ferry_tests::disk::{du, SmallDisk};
use ferry_tests::harness::{wait_for, DpProc, SiteProc};
use ferry_tests::netns::Netns;
use ferry_tests::relay::{Impairment, Relay};
use ferry_tests::tree::TreeSpec;
use ferry_tests::wimtools::{self, ServiceSpec};
use rand::{Rng, SeedableRng};

const LIMIT: Duration = Duration::from_secs(180);

fn same_file(a: &Path, b: &Path) -> bool {
    let (x, y) = (fs::read(a).unwrap(), fs::read(b).unwrap());
    x.len() == y.len() && blake3::hash(&x) == blake3::hash(&y)
}

fn id_of(pkg: &serde_json::Value) -> String {
    pkg["id"].as_str().unwrap().to_string()
}

fn served(site: &SiteProc, dp: &str) -> u64 {
    site.dp_row(dp).unwrap()["served_bytes"].as_u64().unwrap()
}

#[test]
fn a_dps_disk_holds_its_content_once_after_a_copy_and_a_redistribution() {
    let dir = tempfile::tempdir().unwrap();
    let spec = TreeSpec {
        files: 2500,
        seed: 31,
        size_scale: 2.0,
        ..TreeSpec::default()
    };
    let pair = wimtools::serviced_pair(dir.path(), &spec, "LZX", &ServiceSpec::default()).unwrap();
    let site = SiteProc::start(dir.path()).unwrap();
    let dp = DpProc::start(dir.path(), "dp1", &site).unwrap();
    let id = site.install(&pair.base, "dp1", LIMIT).unwrap();
    let check = |wim: &Path, when: &str| {
        let size = fs::metadata(wim).unwrap().len();
        let used = du(&[&dp.content(), &dp.data.join("index")]).unwrap();
        eprintln!(
            "{when}: du of content + index {used} for a {size}-byte image ({:.4}×)",
            used as f64 / size as f64
        );
        assert!(
            used as f64 <= size as f64 * 1.05,
            "{when}: {used} bytes on disk for {size} bytes of content"
        );
        assert!(
            !dp.data.join("library").exists(),
            "no second copy of the chunks"
        );
    };
    assert!(same_file(
        &dp.content().join(&id).join("base.wim"),
        &pair.base
    ));
    check(&pair.base, "first copy");

    site.refresh(&id, &pair.serviced).unwrap();
    let row = site.wait_installed(&id, "dp1", 2, LIMIT).unwrap();
    assert!(same_file(
        &dp.content().join(&id).join("base.wim"),
        &pair.serviced
    ));
    // The unchanged resources were copied on the DP, not sent.
    let local = row["bytes_local"].as_u64().unwrap();
    let fetched = row["bytes_done"].as_u64().unwrap();
    assert!(local > fetched * 5, "local {local}, fetched {fetched}");
    check(&pair.serviced, "redistribution");
}

#[test]
fn a_dp_killed_twenty_times_finishes_byte_identical_without_fetching_twice() {
    let dir = tempfile::tempdir().unwrap();
    let wim = wimtools::big_wim(dir.path(), 256, 7).unwrap();
    let site = SiteProc::start(dir.path()).unwrap();
    let mut dp = DpProc::enroll(dir.path(), "dp1", &site).unwrap();
    // Slow enough that twenty kills land in the middle.
    dp.serve_args = vec!["--max-rate".into(), "12M".into()];
    dp.serve().unwrap();
    let id = id_of(&site.add_image(&wim, &[]).unwrap());
    site.cli_ok(&["distribute", &id, "--dp", "dp1"]).unwrap();
    let needed = wait_for("the transfer to start", LIMIT, || {
        let r = site.row(&id, "dp1")?;
        Ok(r.and_then(|r| r["bytes_needed"].as_u64())
            .filter(|&n| n > 0))
    })
    .unwrap();
    let mut rng = rand::rngs::SmallRng::seed_from_u64(20);
    let mut kills = 0;
    while kills < 20 {
        std::thread::sleep(Duration::from_millis(rng.random_range(300..1100)));
        let row = site.row(&id, "dp1").unwrap().unwrap();
        assert_ne!(
            row["state"], "installed",
            "finished after {kills} kills: the transfer is too fast for this test"
        );
        dp.kill();
        kills += 1;
        dp.serve().unwrap();
    }
    site.wait_installed(&id, "dp1", 1, LIMIT).unwrap();
    let got = dp.content().join(&id).join(wim.file_name().unwrap());
    assert!(same_file(&got, &wim), "byte-identical after {kills} kills");
    wimtools::verify(&got).unwrap();
    // Let the last counts reach the site.
    std::thread::sleep(Duration::from_millis(300));
    let sent = served(&site, "dp1");
    eprintln!(
        "{kills} kills: {sent} chunk bytes sent for {needed} needed ({:.4}×)",
        sent as f64 / needed as f64
    );
    assert!(
        sent as f64 <= needed as f64 * 1.1,
        "{sent} chunk bytes sent for {needed} needed"
    );
}

#[test]
fn a_disk_that_fills_mid_transfer_fails_clearly_keeps_the_old_revision_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let r1 = wimtools::big_wim(dir.path(), 64, 8).unwrap();
    let r2 = wimtools::big_wim(dir.path(), 64, 9).unwrap();
    let site = SiteProc::start(dir.path()).unwrap();
    let disk_dir = dir.path().join("dpdisk");
    // Room for both revisions and the margin, and not much more.
    let disk = SmallDisk::mount(&disk_dir, 190).unwrap();
    let mut dp = DpProc::enroll(&disk_dir, "dp1", &site).unwrap();
    dp.serve_args = vec!["--max-rate".into(), "8M".into()];
    dp.serve().unwrap();
    let id = id_of(&site.add_image(&r1, &[]).unwrap());
    site.cli_ok(&["distribute", &id, "--dp", "dp1"]).unwrap();
    site.wait_installed(&id, "dp1", 1, LIMIT).unwrap();
    let served_file = dp.content().join(&id).join("big-8.wim");
    assert!(same_file(&served_file, &r1));

    site.refresh(&id, &r2).unwrap();
    wait_for("the second revision to be under way", LIMIT, || {
        let r = site.row(&id, "dp1")?.unwrap();
        Ok((r["state"] == "in-progress" && r["bytes_done"].as_u64() > Some(4 << 20)).then_some(()))
    })
    .unwrap();
    // Something else fills the disk in the middle of the transfer.
    let filler = disk_dir.join("filler.bin");
    disk.fill(&filler).unwrap();
    let row = wait_for("the DP to report the full disk", LIMIT, || {
        Ok(site.row(&id, "dp1")?.filter(|r| r["state"] == "failed"))
    })
    .unwrap();
    let err = row["error"].as_str().unwrap();
    eprintln!("failed as: {err}");
    assert!(err.contains("DP dp1"), "names the DP: {err}");
    assert!(err.contains("full") || err.contains("space"), "{err}");
    assert!(
        err.contains("free at least"),
        "names the space needed: {err}"
    );
    assert!(row["next_retry"].is_string());
    // The old revision is still what clients see, whole.
    assert!(same_file(&served_file, &r1), "revision 1 still served");
    let entries: Vec<String> = fs::read_dir(dp.content())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(entries.len(), 2, "{entries:?}");
    assert!(!dp
        .content()
        .join(".ferry")
        .join(format!("{id}.r2"))
        .exists());
    // Space comes back: the DP finishes by itself.
    fs::remove_file(&filler).unwrap();
    site.wait_installed(&id, "dp1", 2, LIMIT).unwrap();
    // (A refreshed file keeps its name in the package.)
    assert!(same_file(&served_file, &r2), "revision 2 installed whole");
    assert!(
        dp.log_text().contains("open again"),
        "the index was reopened"
    );
    dp.kill();
}

#[test]
fn validation_names_a_flipped_byte_and_refetches_only_that_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let wim = wimtools::tree_wim(dir.path(), "v", 600, 41, wimtools::WINDOWS_PROPS).unwrap();
    let site = SiteProc::start(dir.path()).unwrap();
    let dp = DpProc::start(dir.path(), "dp1", &site).unwrap();
    let id = id_of(&site.add_image(&wim, &[]).unwrap());
    site.cli_ok(&["distribute", &id, "--dp", "dp1"]).unwrap();
    site.wait_installed(&id, "dp1", 1, LIMIT).unwrap();

    // A clean DP validates clean.
    let out = site.cli_json(&["dp", "validate", "dp1"]).unwrap();
    let clean = &out["results"][0];
    assert_eq!(clean["package"], id);
    assert_eq!(clean["damaged"].as_array().unwrap().len(), 0);
    assert_eq!(clean["bytes_checked"], fs::metadata(&wim).unwrap().len());

    // One byte flipped in the middle of the file on the DP's disk.
    let file = dp.content().join(&id).join("v.wim");
    let mut bytes = fs::read(&file).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x01;
    fs::write(&file, &bytes).unwrap();
    let before = served(&site, "dp1");
    let out = site.cli(&["dp", "validate", "dp1", &id]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("v.wim at offset"), "{text}");
    assert!(text.contains("repaired"), "{text}");
    let v = site.cli_json(&["dp", "validation", "dp1"]).unwrap();
    let r = &v["results"][0];
    let damaged = r["damaged"].as_array().unwrap();
    assert_eq!(damaged.len(), 1, "{v}");
    let d = &damaged[0];
    assert_eq!(d["path"], "v.wim");
    let (offset, len) = (d["offset"].as_u64().unwrap(), d["len"].as_u64().unwrap());
    assert!(
        offset <= at as u64 && (at as u64) < offset + len,
        "the chunk holds the byte"
    );
    assert_eq!(d["repaired"], true);
    assert!(same_file(&file, &wim), "byte-identical after the repair");
    std::thread::sleep(Duration::from_millis(300));
    let moved = served(&site, "dp1") - before;
    assert_eq!(moved, len, "exactly the one chunk moved");
    // The site saw the damage too.
    let log = fs::read_to_string(&site.log).unwrap();
    assert!(log.contains("damage found"), "site log names the damage");

    // A schedule: set, shown, refused when malformed.
    let set = site
        .cli_json(&["dp", "set", "dp1", "--validate-schedule", "0 3 * * 0"])
        .unwrap();
    assert_eq!(set["schedule"], "0 3 * * 0");
    assert!(set["next_run"].as_str().unwrap().ends_with("T03:00:00Z"));
    let bad = site.cli(&["dp", "set", "dp1", "--validate-schedule", "0 3 * *"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("5 fields"));
    // Every minute: the site asks by itself.
    let requested = v["requested"].as_u64().unwrap();
    site.cli_ok(&["dp", "set", "dp1", "--validate-schedule", "* * * * *"])
        .unwrap();
    let start = Instant::now();
    wait_for("a scheduled validation", Duration::from_secs(90), || {
        let v = site.cli_json(&["dp", "validation", "dp1"])?;
        let answered = v["results"][0]["request"].as_u64().unwrap_or(0);
        Ok((answered > requested && v["results"][0]["done"] == true).then_some(()))
    })
    .unwrap();
    eprintln!("scheduled validation after {:?}", start.elapsed());
}

#[test]
fn a_distribution_over_40ms_rtt_and_2_percent_loss_completes_byte_identical() {
    let dir = tempfile::tempdir().unwrap();
    let wim = wimtools::tree_wim(dir.path(), "far", 400, 51, &[]).unwrap();
    let site = SiteProc::start(dir.path()).unwrap();
    let relay = Relay::start(
        "127.0.0.1:0".parse().unwrap(),
        site.dp_addr().parse().unwrap(),
        Impairment {
            delay: Duration::from_millis(20),
            jitter: Duration::from_millis(2),
            loss: 0.02,
            reorder: 0.01,
            ..Impairment::default()
        },
    )
    .unwrap();
    let mut dp =
        DpProc::enroll_via(dir.path(), "far", &site, &relay.addr.to_string(), &[]).unwrap();
    dp.serve().unwrap();
    let id = id_of(&site.add_image(&wim, &[]).unwrap());
    let t = Instant::now();
    site.cli_ok(&["distribute", &id, "--dp", "far"]).unwrap();
    site.wait_installed(&id, "far", 1, LIMIT).unwrap();
    let size = fs::metadata(&wim).unwrap().len();
    let dropped = relay
        .stats
        .dropped
        .load(std::sync::atomic::Ordering::Relaxed);
    eprintln!(
        "{size} bytes over 40 ms RTT and 2 % loss in {:?} ({dropped} datagrams dropped)",
        t.elapsed()
    );
    assert!(dropped > 0, "the relay dropped datagrams");
    assert!(same_file(&dp.content().join(&id).join("far.wim"), &wim));
}

#[test]
fn a_dp_of_the_older_layout_keeps_what_it_holds_and_fetches_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let wim = wimtools::tree_wim(dir.path(), "old", 300, 61, &[]).unwrap();
    let mut site = SiteProc::start(dir.path()).unwrap();
    let mut dp = DpProc::enroll(dir.path(), "dp1", &site).unwrap();
    let id = id_of(&site.add_image(&wim, &[]).unwrap());
    site.cli_ok(&["distribute", &id, "--dp", "dp1"]).unwrap();

    // The layout DPs had before: a library with every chunk, and the file
    // rebuilt in content/.ferry/ID.r1 behind the content/ID link.
    site.stop().unwrap();
    {
        let src = ferry_store::Library::open(&site.data.join("library")).unwrap();
        let manifests = src.manifests(&id, 1).unwrap();
        let old = ferry_store::Library::open(&dp.data.join("library")).unwrap();
        let mut imp = old.begin_import();
        for c in manifests.iter().flat_map(|m| m.chunks.iter()) {
            imp.put_chunk(&c.id, &src.read_chunk(&c.id).unwrap())
                .unwrap();
        }
        imp.commit(&id, 1, &manifests, |_, _| Ok(b"{}".to_vec()))
            .unwrap();
    }
    let folder = dp.content().join(".ferry").join(format!("{id}.r1"));
    fs::create_dir_all(&folder).unwrap();
    fs::copy(&wim, folder.join("old.wim")).unwrap();
    std::os::unix::fs::symlink(format!(".ferry/{id}.r1"), dp.content().join(&id)).unwrap();
    site.serve().unwrap();

    dp.serve().unwrap();
    site.wait_installed(&id, "dp1", 1, LIMIT).unwrap();
    wait_for("the adopted revision to be proven", LIMIT, || {
        Ok(dp
            .log_text()
            .contains("adopted revision proven")
            .then_some(()))
    })
    .unwrap();
    assert_eq!(served(&site, "dp1"), 0, "nothing fetched");
    assert!(!dp.data.join("library").exists(), "the old library is gone");
    assert!(same_file(&dp.content().join(&id).join("old.wim"), &wim));
    // And it is a DP of the new layout now: validation proves it.
    let v = site.cli_json(&["dp", "validate", "dp1"]).unwrap();
    assert_eq!(
        v["results"][0]["damaged"].as_array().unwrap().len(),
        0,
        "{v}"
    );
}

#[test]
fn on_a_reflink_filesystem_a_package_sharing_an_installed_ones_content_costs_no_space() {
    let dir = tempfile::tempdir().unwrap();
    let wim = wimtools::big_wim(dir.path(), 96, 71).unwrap();
    let size = fs::metadata(&wim).unwrap().len();
    let site = SiteProc::start(dir.path()).unwrap();
    let disk_dir = dir.path().join("xfs");
    let disk = SmallDisk::xfs(&dir.path().join("xfs.img"), &disk_dir, 600).unwrap();
    let dp = DpProc::start(&disk_dir, "dp1", &site).unwrap();
    let a = id_of(&site.add_image(&wim, &[]).unwrap());
    site.cli_ok(&["distribute", &a, "--dp", "dp1"]).unwrap();
    site.wait_installed(&a, "dp1", 1, LIMIT).unwrap();
    let used_one = disk.used().unwrap();
    // The same image as a second package: the DP holds every chunk.
    let b = id_of(&site.add_image(&wim, &["--name", "copy"]).unwrap());
    site.cli_ok(&["distribute", &b, "--dp", "dp1"]).unwrap();
    let row = site.wait_installed(&b, "dp1", 1, LIMIT).unwrap();
    assert_eq!(row["bytes_done"], 0, "nothing fetched");
    assert_eq!(
        row["bytes_local"].as_u64(),
        Some(size),
        "all copied locally"
    );
    let grew = disk.used().unwrap().saturating_sub(used_one);
    eprintln!("a second {size}-byte package took {grew} more bytes on XFS");
    assert!(
        grew < size / 20,
        "the copy shares the extents: {grew} of {size} bytes"
    );
    let name = wim.file_name().unwrap();
    assert!(same_file(&dp.content().join(&b).join(name), &wim));
    assert!(same_file(&dp.content().join(&a).join(name), &wim));
}

/// Bytes per second a DP is limited to in the rate test.
const RATE: u64 = 20_000_000;

#[test]
fn a_rate_limit_set_on_the_site_holds_on_the_wire_second_by_second() {
    let dir = tempfile::tempdir().unwrap();
    let w = dir.path();
    // 256 MiB: about 13 s at 20 MB/s.
    let wim = wimtools::big_wim(w, 256, 13).unwrap();
    let ns = Netns::create("rate", 51).unwrap();
    let site = SiteProc::start_at(w, "site", &ns.host_ip, &[]).unwrap();
    let site_addr = format!("{}:{}", ns.host_ip, site.dp_port);
    let mut dp = DpProc::enroll_with(w, "dp1", &site, &site_addr, &ns.exec_prefix(), &[]).unwrap();
    dp.serve().unwrap();
    site.cli_ok(&["dp", "set", "dp1", "--rate", "20M"]).unwrap();
    let dps = site.cli_json(&["dp", "list"]).unwrap();
    assert_eq!(dps[0]["rate"], RATE, "{dps}");
    let id = id_of(&site.add_image(&wim, &[]).unwrap());

    // What the kernel counts into the DP's namespace, about once a second,
    // until the DP holds the image.
    let mut samples = vec![(Instant::now(), ns.host_bytes().unwrap().1)];
    site.cli_ok(&["distribute", &id, "--dp", "dp1"]).unwrap();
    loop {
        let last = samples.last().unwrap().0;
        std::thread::sleep(
            (last + Duration::from_secs(1)).saturating_duration_since(Instant::now()),
        );
        samples.push((Instant::now(), ns.host_bytes().unwrap().1));
        assert!(
            last.duration_since(samples[0].0) < LIMIT,
            "not installed in time"
        );
        let row = site.row(&id, "dp1").unwrap();
        if row.is_some_and(|r| r["state"] == "installed") {
            break;
        }
    }
    let rates: Vec<f64> = samples
        .windows(2)
        .map(|p| (p[1].1 - p[0].1) as f64 / p[1].0.duration_since(p[0].0).as_secs_f64())
        .collect();
    let shown: Vec<String> = rates.iter().map(|r| format!("{:.1}", r / 1e6)).collect();
    eprintln!("MB/s each second: {}", shown.join(" "));
    // The seconds of the transfer, without the first and the last (partly
    // idle): at least ten, on average within 10 % of the limit.
    let busy: Vec<f64> = rates
        .iter()
        .copied()
        .filter(|&r| r > RATE as f64 / 10.0)
        .collect();
    assert!(busy.len() >= 12, "a transfer of at least 10 s: {shown:?}");
    let inner = &busy[1..busy.len() - 1];
    let avg = inner.iter().sum::<f64>() / inner.len() as f64;
    assert!(
        (avg / RATE as f64 - 1.0).abs() <= 0.10,
        "average {:.2} MB/s against a limit of 20 MB/s: {shown:?}",
        avg / 1e6
    );
    let max = rates.iter().copied().fold(0.0, f64::max);
    assert!(
        max <= 1.5 * RATE as f64,
        "a second at {:.2} MB/s: {shown:?}",
        max / 1e6
    );
    let file = dp.content().join(&id).join(wim.file_name().unwrap());
    assert!(same_file(&file, &wim), "the DP's copy is the image");

    // Off again: the next transfer is not held to it.
    site.cli_ok(&["dp", "set", "dp1", "--rate", "off"]).unwrap();
    let dps = site.cli_json(&["dp", "list"]).unwrap();
    assert!(dps[0]["rate"].is_null(), "{dps}");
}

#[test]
fn a_window_that_closes_mid_transfer_pauses_it_and_it_resumes_where_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let w = dir.path();
    // 128 MiB at 20 MB/s: about 7 s of sending.
    let wim = wimtools::big_wim(w, 128, 17).unwrap();
    let site = SiteProc::start_at(w, "site", "127.0.0.1", &[("TZ", "UTC")]).unwrap();
    let mut dp = DpProc::enroll(w, "dp1", &site).unwrap();
    // A DP that calls 3 s without chunks a stall: the pause is longer.
    dp.exec_prefix = vec!["env".into(), "FERRY_FAULT_STALL_SECS=3".into()];
    dp.serve().unwrap();
    site.cli_ok(&["dp", "set", "dp1", "--rate", "20M"]).unwrap();
    let id = id_of(&site.add_image(&wim, &[]).unwrap());

    // Closed from 3 s from now for 8 s, in the site's time (UTC).
    let hms =
        |t: time::OffsetDateTime| format!("{:02}:{:02}:{:02}", t.hour(), t.minute(), t.second());
    let close = time::OffsetDateTime::now_utc() + time::Duration::seconds(3);
    let open = close + time::Duration::seconds(8);
    let window = format!("daily {}-{} closed", hms(close), hms(open));
    // A window that does not read is refused, naming what is wrong, and
    // changes nothing: not even the other setting of the same request.
    let bad = site.cli(&[
        "dp",
        "set",
        "dp1",
        "--rate",
        "1M",
        "--window",
        "Funday 08:00-09:00 closed",
    ]);
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("\"Funday\" is not a day"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
    let row = site.dp_row("dp1").unwrap();
    assert!(row["window"].is_null(), "{row}");
    assert_eq!(row["rate"], 20_000_000, "{row}");
    site.cli_ok(&["dp", "set", "dp1", "--window", &window])
        .unwrap();
    assert_eq!(site.dp_row("dp1").unwrap()["window"], window.as_str());
    site.cli_ok(&["distribute", &id, "--dp", "dp1"]).unwrap();

    let row = wait_for("the transfer to pause", LIMIT, || {
        Ok(site
            .row(&id, "dp1")?
            .filter(|r| r["state"] == "in-progress" && !r["paused_until"].is_null()))
    })
    .unwrap();
    assert!(
        row["bytes_done"].as_u64().unwrap() < row["bytes_needed"].as_u64().unwrap(),
        "paused mid-transfer: {row}"
    );
    assert_eq!(row["paused_until_site"], &hms(open)[..5], "{row}");
    let status = String::from_utf8_lossy(&site.cli(&["status", &id]).stdout).into_owned();
    let words: Vec<&str> = status.split_whitespace().collect();
    assert!(
        words.contains(&"paused") && words.contains(&"until"),
        "{status}"
    );
    // While closed, nothing arrives (what was on the wire lands first).
    std::thread::sleep(Duration::from_millis(1500));
    let before = site.row(&id, "dp1").unwrap().unwrap()["bytes_done"].clone();
    std::thread::sleep(Duration::from_secs(3));
    let after = site.row(&id, "dp1").unwrap().unwrap();
    assert_eq!(
        after["bytes_done"], before,
        "nothing sent while closed: {after}"
    );
    assert_eq!(after["state"], "in-progress", "paused, not failed: {after}");

    // The window opens: it goes on where it was, never failed, and no
    // chunk was sent twice.
    let row = site.wait_installed(&id, "dp1", 1, LIMIT).unwrap();
    let file = dp.content().join(&id).join(wim.file_name().unwrap());
    assert!(same_file(&file, &wim), "the DP's copy is the image");
    let served = site.dp_row("dp1").unwrap()["served_bytes"]
        .as_u64()
        .unwrap();
    assert_eq!(
        Some(served),
        row["bytes_needed"].as_u64(),
        "chunk bytes sent against those needed: {row}"
    );
    assert!(dp.log_text().contains("the site stopped sending"));
    assert!(dp.log_text().contains("the site goes on sending"));
    site.cli_ok(&["dp", "set", "dp1", "--window", "off"])
        .unwrap();
    assert!(site.dp_row("dp1").unwrap()["window"].is_null());
}

/// A site on the host distributes `wim` to a DP in `ns`; the packets and
/// bytes the host sent into the namespace meanwhile, and the path MTU
/// `dp list` shows after. Panics unless the DP installs it byte-identical.
fn distribute_into(ns: &Netns, w: &Path, wim: &Path) -> (u64, u64, u64) {
    let site = SiteProc::start_at(w, "site", &ns.host_ip, &[]).unwrap();
    let site_addr = format!("{}:{}", ns.host_ip, site.dp_port);
    let mut dp = DpProc::enroll_with(w, "dp1", &site, &site_addr, &ns.exec_prefix(), &[]).unwrap();
    dp.serve().unwrap();
    let id = id_of(&site.add_image(wim, &[]).unwrap());
    let (p0, b0) = (ns.host_packets().unwrap().1, ns.host_bytes().unwrap().1);
    site.cli_ok(&["distribute", &id, "--dp", "dp1"]).unwrap();
    wait_for("installed", LIMIT, || {
        Ok(site
            .row(&id, "dp1")?
            .is_some_and(|r| r["state"] == "installed")
            .then_some(()))
    })
    .unwrap();
    let (p1, b1) = (ns.host_packets().unwrap().1, ns.host_bytes().unwrap().1);
    let file = dp.content().join(&id).join(wim.file_name().unwrap());
    assert!(same_file(&file, wim), "the DP's copy is the image");
    let dps = site.cli_json(&["dp", "list"]).unwrap();
    let mtu = dps[0]["path_mtu"]
        .as_u64()
        .expect("a connected DP's path MTU");
    (p1 - p0, b1 - b0, mtu)
}

#[test]
fn over_jumbo_frames_the_chunks_go_in_datagrams_larger_than_ethernet_ones() {
    let dir = tempfile::tempdir().unwrap();
    let w = dir.path();
    let wim = wimtools::big_wim(w, 64, 61).unwrap();
    let ns = Netns::create("jumbo", 61).unwrap();
    ns.mtu(9000).unwrap();
    ns.datagrams_as_packets().unwrap();
    let (packets, bytes, mtu) = distribute_into(&ns, w, &wim);
    let average = bytes / packets.max(1);
    eprintln!("{packets} packets, {bytes} bytes into the DP's namespace: {average} bytes each");
    assert_eq!(
        mtu,
        u64::from(ferry_net::tls::MAX_DATAGRAM),
        "dp list's path MTU"
    );
    // At MTU 1500 the average stays below 1,500 bytes; past it, most of the
    // chunk bytes went in datagrams up to ferry_net::tls::MAX_DATAGRAM.
    assert!(
        average > 3000,
        "{average} bytes a packet on average: the datagrams stayed at Ethernet's size"
    );
    assert!(
        average <= u64::from(ferry_net::tls::MAX_DATAGRAM) + 28 + 14,
        "{average} bytes a packet: larger than Ferry's bound"
    );
}

#[test]
fn a_path_that_drops_datagrams_over_1500_bytes_still_carries_a_whole_copy() {
    let dir = tempfile::tempdir().unwrap();
    let w = dir.path();
    let wim = wimtools::big_wim(w, 64, 62).unwrap();
    let ns = Netns::create("blackhole", 62).unwrap();
    // Both ends say 9,000 bytes, the path between loses what is over 1,500.
    ns.mtu(9000).unwrap();
    ns.datagrams_as_packets().unwrap();
    ns.drop_udp_longer_than(1500).unwrap();
    let (packets, bytes, mtu) = distribute_into(&ns, w, &wim);
    assert!(
        mtu <= 1472,
        "dp list's path MTU {mtu} through a path that drops larger"
    );
    let average = bytes / packets.max(1);
    eprintln!("{packets} packets, {bytes} bytes into the DP's namespace: {average} bytes each");
    assert!(
        average <= 1500 + 14,
        "{average} bytes a packet on average through a path that drops larger ones"
    );
}
