//! Offline servicing, end to end: real site (and DP) processes, real WIMs
//! made with wimlib's tools, real updates in Ferry's format made here. What
//! a serviced image holds is checked with `wimdir`/`wimextract`/`wimverify`,
//! independent of Ferry's own bookkeeping.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ferry_tests::harness::{wait_for, DpProc, SiteProc};
use ferry_tests::tree::{make_tree, Content, TreeSpec};
use ferry_tests::updates::UpdateSpec;
use ferry_tests::wimtools::{self, WINDOWS_PROPS};

const LIMIT: Duration = Duration::from_secs(120);

/// A captured image: the tree, its files, the WIM.
struct Base {
    tree: PathBuf,
    files: Vec<PathBuf>,
    wim: PathBuf,
}

fn base(dir: &Path, files: usize, seed: u64) -> Base {
    let tree = dir.join("tree");
    let files = make_tree(
        &tree,
        &TreeSpec {
            files,
            seed,
            ..TreeSpec::default()
        },
    )
    .unwrap();
    let wim = dir.join("install.wim");
    wimtools::capture(&tree, &wim, "Windows 11 Enterprise", "LZX", WINDOWS_PROPS).unwrap();
    Base { tree, files, wim }
}

/// [`base`], and a site that imported it: (base, site, package id).
fn imported(dir: &Path, files: usize, seed: u64) -> (Base, SiteProc, String) {
    let b = base(dir, files, seed);
    let site = SiteProc::start(dir).unwrap();
    let id = site.add_image(&b.wim, &[]).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    (b, site, id)
}

fn image_path(rel: &Path) -> String {
    rel.to_string_lossy().into_owned()
}

fn import_update(site: &SiteProc, spec: &UpdateSpec, dir: &Path) {
    let folder = spec.write(&dir.join("updates")).unwrap();
    site.cli_ok(&["update", "import", folder.to_str().unwrap()])
        .unwrap();
}

/// Exports the latest revision of `id` and returns its path.
fn export(site: &SiteProc, id: &str, dir: &Path, name: &str) -> PathBuf {
    let out = dir.join(name);
    site.export(id, &out).unwrap();
    out
}

/// The files of image 1 of `wim`, as wimlib lists them (folders included).
fn listing(wim: &Path) -> Vec<String> {
    let mut l = wimtools::list_files(wim, 1).unwrap();
    l.sort();
    l
}

/// One file's bytes out of image 1 of `wim`, extracted by wimlib.
fn extract(wim: &Path, path: &str, dir: &Path) -> Vec<u8> {
    let dest = dir.join(format!("x-{}", blake3::hash(path.as_bytes()).to_hex()));
    let out = Command::new("wimextract")
        .arg(wim)
        .arg("1")
        .arg(format!("/{path}"))
        .arg(format!("--dest-dir={}", dest.display()))
        .arg("--no-acls")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let name = Path::new(path).file_name().unwrap();
    fs::read(dest.join(name)).unwrap()
}

fn job(site: &SiteProc, n: u64) -> serde_json::Value {
    site.cli_json(&["jobs", "show", &n.to_string()]).unwrap()
}

fn revisions(site: &SiteProc, id: &str) -> Vec<u64> {
    site.cli_json(&["image", "show", id]).unwrap()["revisions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["revision"].as_u64().unwrap())
        .collect()
}

fn updates_view(site: &SiteProc, id: &str) -> serde_json::Value {
    site.cli_json(&["image", "updates", id]).unwrap()
}

fn ids(rows: &serde_json::Value) -> Vec<String> {
    rows.as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn two_updates_one_superseding_the_other_make_a_revision_with_exactly_their_files() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (b, site, id) = imported(d, 200, 41);
    let history = site.cli_json(&["image", "history", &id]).unwrap();
    assert!(history["entries"].as_array().unwrap().is_empty());
    assert!(
        history["note"]
            .as_str()
            .unwrap()
            .contains("as it was imported"),
        "an image imported as is says its history is empty: {history}"
    );

    let mut c = Content::new(99);
    let replaced = image_path(&b.files[3]);
    let deleted = image_path(&b.files[7]);
    let deleted_by_kb2 = image_path(&b.files[11]);
    let kb2_fix = c.bytes(20_000);
    let mut kb0 = UpdateSpec::new("KB5000000", "2025-12-09");
    kb0.add = vec![("Windows/System32/kb0.dll".into(), c.bytes(5000))];
    let mut kb1 = UpdateSpec::new("KB5000001", "2026-01-13");
    kb1.add = vec![
        ("Windows/System32/kb.dll".into(), c.bytes(30_000)),
        (replaced.clone(), c.bytes(12_000)),
    ];
    // Paths in an image ignore case, as on Windows.
    kb1.delete = vec![deleted.to_uppercase()];
    let mut kb2 = UpdateSpec::new("KB5000002", "2026-02-10");
    kb2.supersedes = vec!["KB5000001".into(), "KB5000000".into()];
    kb2.add = vec![
        ("Windows/System32/kb.dll".into(), kb2_fix.clone()),
        ("windows/SYSTEM32/kb2-only.dll".into(), c.bytes(7000)),
    ];
    kb2.delete = vec![deleted_by_kb2.clone()];
    let mut arm = UpdateSpec::new("KB5000009", "2026-02-10");
    arm.architectures = vec!["arm64".into()];
    arm.add = vec![("Windows/arm.dll".into(), c.bytes(100))];
    for u in [&kb1, &kb2, &arm] {
        import_update(&site, u, d);
    }
    // An update may also come as a .tar.gz of its folder.
    let folder = kb0.write(&d.join("archived")).unwrap();
    let tgz = d.join("kb0.tar.gz");
    let status = Command::new("tar")
        .arg("czf")
        .arg(&tgz)
        .arg("-C")
        .arg(folder.parent().unwrap())
        .arg("KB5000000")
        .status()
        .unwrap();
    assert!(status.success());
    site.cli_ok(&["update", "import", tgz.to_str().unwrap()])
        .unwrap();
    fs::remove_dir_all(&folder).unwrap();
    fs::remove_file(&tgz).unwrap();
    let listed = site.cli_json(&["update", "list"]).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 4);

    let v = updates_view(&site, &id);
    assert_eq!(
        ids(&v["applicable"]),
        ["KB5000000", "KB5000001", "KB5000002"],
        "the arm64 update is not for an x64 image: {v}"
    );
    assert_eq!(v["not_applicable"], 1);

    let j = site
        .cli_json(&["image", "service", &id, "--updates", "KB5000001,KB5000002"])
        .unwrap();
    assert_eq!(j["state"], "succeeded", "{j}");
    let run = &j["runs"][0];
    assert_eq!(run["revision"], 2);
    let results: Vec<(&str, &str)> = run["updates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| (u["id"].as_str().unwrap(), u["result"].as_str().unwrap()))
        .collect();
    assert_eq!(
        results,
        [("KB5000001", "applied"), ("KB5000002", "applied")]
    );

    // The image, listed by wimlib: the base's files, minus the deleted, plus
    // the added; the replaced and superseded files hold the newest bytes.
    let serviced = export(&site, &id, d, "serviced.wim");
    wimtools::verify(&serviced).unwrap();
    let mut expected = listing(&b.wim);
    expected.retain(|p| p != &format!("/{deleted}") && p != &format!("/{deleted_by_kb2}"));
    expected.push("/Windows/System32/kb.dll".into());
    expected.push("/Windows/System32/kb2-only.dll".into());
    expected.sort();
    assert_eq!(listing(&serviced), expected);
    assert_eq!(
        extract(&serviced, "Windows/System32/kb.dll", d),
        kb2_fix,
        "KB5000002 replaced KB5000001's file"
    );
    assert_eq!(extract(&serviced, &replaced, d), kb1.add[1].1);
    let untouched = image_path(&b.files[20]);
    assert_eq!(
        extract(&serviced, &untouched, d),
        fs::read(b.tree.join(&b.files[20])).unwrap()
    );

    let h = site.cli_json(&["image", "history", &id]).unwrap();
    assert_eq!(h["applied"], serde_json::json!(["KB5000001", "KB5000002"]));
    let entries = h["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 2);
    for (e, want) in entries.iter().zip(["KB5000001", "KB5000002"]) {
        assert_eq!(e["update"], want);
        assert_eq!(e["result"], "applied");
        assert_eq!(e["job"], j["id"]);
        assert_eq!(e["revision"], 2);
        assert!(!e["time"].as_str().unwrap().is_empty());
    }
    assert!(h["note"].is_null(), "{h}");

    let v = updates_view(&site, &id);
    assert!(ids(&v["applicable"]).is_empty(), "{v}");
    assert_eq!(ids(&v["applied"]), ["KB5000001", "KB5000002"]);
    assert_eq!(ids(&v["superseded"]), ["KB5000000"]);
    assert_eq!(v["superseded"][0]["detail"], "superseded by KB5000002");

    // Asking again does nothing: the updates are in the image.
    let again = site
        .cli_json(&["image", "service", &id, "--updates", "KB5000002"])
        .unwrap();
    assert_eq!(again["state"], "nothing-to-do");
    assert_eq!(revisions(&site, &id).last(), Some(&2));
}

#[test]
fn a_broken_update_stops_the_job_unless_continue_on_error() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_, site, id) = imported(d, 120, 42);
    // Well formed, but deletes a path this image does not have.
    let mut broken = UpdateSpec::new("KB6000001", "2026-03-10");
    broken.delete = vec!["Windows/System32/not-there.dll".into()];
    let mut good = UpdateSpec::new("KB6000002", "2026-03-10");
    good.add = vec![("Windows/System32/good.dll".into(), b"good".to_vec())];
    import_update(&site, &broken, d);
    import_update(&site, &good, d);

    let out = site.cli(&["image", "service", &id, "--updates", "KB6000001,KB6000002"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("KB6000001") && err.contains("not-there.dll"),
        "the error names the update and the path: {err}"
    );
    assert_eq!(
        revisions(&site, &id),
        [1],
        "no revision without --continue-on-error"
    );
    let j = job(&site, 1);
    assert_eq!(j["state"], "failed");
    assert_eq!(j["runs"][0]["updates"][0]["result"], "failed");
    assert_eq!(j["runs"][0]["updates"][1]["result"], "not-run");
    assert!(fs::read_dir(site.data.join("work"))
        .map(|mut d| d.next().is_none())
        .unwrap_or(true));

    let out = site.cli(&[
        "image",
        "service",
        &id,
        "--updates",
        "KB6000001,KB6000002",
        "--continue-on-error",
    ]);
    assert!(!out.status.success(), "a partly failed job exits non-zero");
    let j = job(&site, 2);
    assert_eq!(j["state"], "partly-succeeded", "{j}");
    assert_eq!(j["runs"][0]["revision"], 2);
    let serviced = export(&site, &id, d, "serviced.wim");
    assert!(listing(&serviced).contains(&"/Windows/System32/good.dll".to_string()));
    let h = site.cli_json(&["image", "history", &id]).unwrap();
    assert_eq!(h["applied"], serde_json::json!(["KB6000002"]));
    let last: Vec<(String, String)> = h["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["update"].as_str().unwrap().to_string(),
                e["result"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        last,
        [
            ("KB6000001".into(), "failed".into()),
            ("KB6000002".into(), "not-run".into()),
            ("KB6000001".into(), "failed".into()),
            ("KB6000002".into(), "applied".into()),
        ]
    );
    // The broken one is still applicable: it never made it in.
    assert_eq!(ids(&updates_view(&site, &id)["applicable"]), ["KB6000001"]);
}

#[test]
fn requests_that_cannot_work_are_refused_before_a_job_exists() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_, site, id) = imported(d, 40, 43);
    let mut arm = UpdateSpec::new("KB7000001", "2026-03-10");
    arm.architectures = vec!["arm64".into()];
    arm.add = vec![("a.dll".into(), b"a".to_vec())];
    import_update(&site, &arm, d);
    let cases: [(&[&str], &str); 6] = [
        (&["--updates", "KB404"], "no update KB404"),
        (&["--updates", "KB7000001"], "does not apply"),
        (&["--updates", "KB7000001", "--at", "soon"], "not a time"),
        (&["--optimize", "--at", "2020-01-01 00:00"], "in the past"),
        (&["--updates", "KB7000001", "--schedule", "* *"], "5 fields"),
        (&[], "--updates"),
    ];
    for (extra, want) in cases {
        let mut args = vec!["image", "service", id.as_str()];
        args.extend_from_slice(extra);
        let out = site.cli(&args);
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{args:?}: {want:?} not in {err}");
    }
    assert!(site
        .cli_json(&["jobs"])
        .unwrap()
        .as_array()
        .unwrap()
        .is_empty());
    let out = site.cli(&["image", "service", "FRY0FFFF", "--updates", "KB7000001"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no package FRY0FFFF"));

    // Bad updates never reach the catalog.
    let bad = d.join("bad");
    fs::create_dir_all(bad.join("payload")).unwrap();
    let out = site.cli(&["update", "import", bad.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no update.toml"));
    let mut escape = UpdateSpec::new("KB7000002", "2026-03-10");
    escape.delete = vec!["../../etc/passwd".into()];
    let f = escape.write(d).unwrap();
    let out = site.cli(&["update", "import", f.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("update.toml") && err.contains("step out"),
        "{err}"
    );
    let mut missing = UpdateSpec::new("KB7000003", "2026-03-10");
    missing.add = vec![("Windows/x.dll".into(), b"x".to_vec())];
    let f = missing.write(d).unwrap();
    fs::remove_file(f.join("payload/Windows/x.dll")).unwrap();
    let out = site.cli(&["update", "import", f.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("Windows/x.dll") && err.contains("payload lacks it"),
        "{err}"
    );
    let text = fs::read_to_string(f.join("update.toml")).unwrap();
    fs::write(f.join("update.toml"), format!("colour = \"red\"\n{text}")).unwrap();
    let out = site.cli(&["update", "import", f.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown field `colour`"));
    let out = site.cli(&["update", "import", &format!("{}/nowhere", d.display())]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no such file or folder"));
    assert_eq!(
        ids(&site.cli_json(&["update", "list"]).unwrap()),
        ["KB7000001"]
    );
    // An id is imported once.
    let again = arm.write(&d.join("again")).unwrap();
    let out = site.cli(&["update", "import", again.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("already in the catalog"));
}

#[test]
fn scheduled_jobs_run_by_themselves_and_cancelled_ones_never_run() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_, site, id) = imported(d, 60, 44);
    let mut u1 = UpdateSpec::new("KB8000001", "2026-04-14");
    u1.add = vec![("Windows/one.dll".into(), b"one".to_vec())];
    let mut u2 = UpdateSpec::new("KB8000002", "2026-04-14");
    u2.add = vec![("Windows/two.dll".into(), b"two".to_vec())];
    let mut u3 = UpdateSpec::new("KB8000003", "2026-04-14");
    u3.add = vec![("Windows/three.dll".into(), b"three".to_vec())];
    for u in [&u1, &u2, &u3] {
        import_update(&site, u, d);
    }
    let a = site
        .cli_json(&[
            "image",
            "service",
            &id,
            "--updates",
            "KB8000001",
            "--at",
            "+3s",
        ])
        .unwrap();
    let c = site
        .cli_json(&[
            "image",
            "service",
            &id,
            "--updates",
            "KB8000002",
            "--at",
            "+3s",
        ])
        .unwrap();
    assert_eq!(a["state"], "scheduled");
    let c_id = c["id"].as_u64().unwrap().to_string();
    site.cli_ok(&["jobs", "cancel", &c_id]).unwrap();
    assert_eq!(revisions(&site, &id), [1], "nothing ran yet");

    let done = wait_for("the scheduled job to run", LIMIT, || {
        let j = job(&site, a["id"].as_u64().unwrap());
        Ok((j["state"] == "succeeded").then_some(j))
    })
    .unwrap();
    assert_eq!(done["runs"][0]["revision"], 2);
    // Well past its time, the cancelled one has not run.
    std::thread::sleep(Duration::from_secs(2));
    let c = job(&site, c["id"].as_u64().unwrap());
    assert_eq!(c["state"], "cancelled");
    assert!(c["runs"].as_array().unwrap().is_empty());
    let listing = listing(&export(&site, &id, d, "after.wim"));
    assert!(listing.contains(&"/Windows/one.dll".to_string()));
    assert!(!listing.contains(&"/Windows/two.dll".to_string()));
    let out = site.cli(&[
        "jobs",
        "cancel",
        a["id"].as_u64().unwrap().to_string().as_str(),
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("can no longer be cancelled"));

    // A cron job (every 2 s) runs by itself, then has nothing left to do.
    let cron = site
        .cli_json(&[
            "image",
            "service",
            &id,
            "--updates",
            "KB8000003",
            "--schedule",
            "*/2 * * * * *",
        ])
        .unwrap();
    let n = cron["id"].as_u64().unwrap();
    let j = wait_for("the cron job to run twice", LIMIT, || {
        let j = job(&site, n);
        Ok(
            (j["runs"].as_array().unwrap().len() >= 2 && j["runs"][1]["finished"].is_string())
                .then_some(j),
        )
    })
    .unwrap();
    assert_eq!(j["runs"][0]["outcome"], "succeeded");
    assert_eq!(j["runs"][1]["outcome"], "nothing-to-do");
    // Between two runs (a run may be under way at this instant).
    wait_for("the cron job to cancel", LIMIT, || {
        Ok(site
            .cli(&["jobs", "cancel", &n.to_string()])
            .status
            .success()
            .then_some(()))
    })
    .unwrap();
    let runs = job(&site, n)["runs"].as_array().unwrap().len();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(job(&site, n)["runs"].as_array().unwrap().len(), runs);
    assert_eq!(revisions(&site, &id).last(), Some(&3));
}

#[test]
fn optimize_drops_what_nothing_refers_to_and_the_file_still_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (b, site, id) = imported(d, 150, 45);
    // Replace the 20 largest files: appended, the old data stays behind.
    let mut by_size: Vec<&PathBuf> = b.files.iter().collect();
    by_size.sort_by_key(|f| std::cmp::Reverse(fs::metadata(b.tree.join(f)).unwrap().len()));
    let mut c = Content::new(7);
    let mut u = UpdateSpec::new("KB9000001", "2026-05-12");
    u.add = by_size[..20]
        .iter()
        .map(|f| (image_path(f), c.bytes(4000)))
        .collect();
    import_update(&site, &u, d);
    site.cli_ok(&["image", "service", &id, "--updates", "KB9000001"])
        .unwrap();
    let appended = export(&site, &id, d, "appended.wim");
    let appended_len = fs::metadata(&appended).unwrap().len();
    assert!(appended_len > fs::metadata(&b.wim).unwrap().len());

    let j = site
        .cli_json(&["image", "service", &id, "--optimize"])
        .unwrap();
    assert_eq!(j["state"], "succeeded", "{j}");
    let run = &j["runs"][0];
    assert_eq!(run["size_before"].as_u64().unwrap(), appended_len);
    let after = run["size_after"].as_u64().unwrap();
    let optimized = export(&site, &id, d, "optimized.wim");
    assert_eq!(fs::metadata(&optimized).unwrap().len(), after);
    assert!(
        after < appended_len * 3 / 4,
        "the rebuild drops the replaced data: {after} vs {appended_len}"
    );
    wimtools::verify(&optimized).unwrap();
    assert_eq!(listing(&optimized), listing(&appended));
    let show = site.cli_json(&["image", "show", &id]).unwrap();
    let last = show["revisions"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert_eq!(
        last["service"]["optimized"],
        serde_json::json!([appended_len, after])
    );
    assert_eq!(
        site.cli_json(&["image", "history", &id]).unwrap()["applied"],
        serde_json::json!(["KB9000001"]),
        "optimizing keeps what was applied"
    );
}

#[test]
fn distribute_sends_the_serviced_revision_to_a_dp_as_a_delta() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let b = base(d, 800, 46);
    let site = SiteProc::start(d).unwrap();
    let dp = DpProc::start(d, "dp1", &site).unwrap();
    let id = site.add_image(&b.wim, &[]).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    site.cli_ok(&["distribute", &id, "--dp", "dp1"]).unwrap();
    site.wait_installed(&id, "dp1", 1, LIMIT).unwrap();

    // An update touching about 5 % of the files.
    let mut c = Content::new(8);
    let mut u = UpdateSpec::new("KB9100001", "2026-06-09");
    u.add = b
        .files
        .iter()
        .step_by(20)
        .map(|f| {
            let len = fs::metadata(b.tree.join(f)).unwrap().len() as usize;
            (image_path(f), c.bytes(len.max(1)))
        })
        .collect();
    import_update(&site, &u, d);
    let j = site
        .cli_json(&[
            "image",
            "service",
            &id,
            "--updates",
            "KB9100001",
            "--distribute",
        ])
        .unwrap();
    assert_eq!(j["runs"][0]["distributed"], true);
    let row = site.wait_installed(&id, "dp1", 2, LIMIT).unwrap();
    let serviced = export(&site, &id, d, "serviced.wim");
    let on_dp = dp.content().join(&id).join("install.wim");
    assert_eq!(fs::read(&on_dp).unwrap(), fs::read(&serviced).unwrap());
    let floor = wimtools::blob_floor(&b.wim, &serviced).unwrap();
    let wire = row["wire_bytes"].as_u64().unwrap();
    let full = fs::metadata(&serviced).unwrap().len();
    eprintln!(
        "redistribution after servicing: {wire} bytes at the DP's socket = {:.3}x the floor {floor}, {:.2}% of the image {full}",
        wire as f64 / floor as f64,
        wire as f64 * 100.0 / full as f64
    );
    assert!(
        (wire as f64) <= 1.10 * floor as f64,
        "redistribution sent {wire} bytes at the DP's socket, floor {floor}, image {full}"
    );
    assert!(wire < full / 4, "a delta, not the image: {wire} of {full}");
    // Once the DP holds revision 2, revision 1 is used by nobody.
    wait_for("revision 1 to be removed", LIMIT, || {
        Ok((revisions(&site, &id) == [2]).then_some(()))
    })
    .unwrap();

    // Without --distribute the DP stays on what it has until `distribute`.
    let mut u2 = UpdateSpec::new("KB9100002", "2026-07-14");
    u2.add = vec![("Windows/later.dll".into(), c.bytes(3000))];
    import_update(&site, &u2, d);
    site.cli_ok(&["image", "service", &id, "--updates", "KB9100002"])
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let row = site.row(&id, "dp1").unwrap().unwrap();
    assert_eq!(
        (row["revision"].as_u64(), row["state"].as_str()),
        (Some(2), Some("installed"))
    );
    assert_eq!(
        revisions(&site, &id),
        [2, 3],
        "revision 2 stays: dp1 uses it"
    );
    site.cli_ok(&["distribute", &id, "--dp", "dp1"]).unwrap();
    site.wait_installed(&id, "dp1", 3, LIMIT).unwrap();
    assert!(wimtools::list_files(&on_dp, 1)
        .unwrap()
        .contains(&"/Windows/later.dll".to_string()));
}

#[test]
fn jobs_start_from_a_copy_of_the_tables_only_unless_an_integrity_table_needs_the_whole_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let b = base(d, 120, 52);
    // The same image with an integrity table (`wimcapture --check`):
    // wimlib recomputes it over the whole file, so that job needs it whole.
    let checked = d.join("checked.wim");
    wimtools::capture_with(
        &b.tree,
        &checked,
        "Windows 11 Enterprise",
        "LZX",
        WINDOWS_PROPS,
        &["--check"],
    )
    .unwrap();
    let site = SiteProc::start(d).unwrap();
    let add = |wim: &Path| {
        site.add_image(wim, &[]).unwrap()["id"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let (plain, with_table) = (add(&b.wim), add(&checked));
    let mut c = Content::new(7);
    let specs: Vec<UpdateSpec> = (1..=2)
        .map(|n| {
            let mut u = UpdateSpec::new(&format!("KB60000{n:02}"), "2026-03-10");
            u.add = vec![(format!("Windows/System32/kb{n}.dll"), c.bytes(40_000))];
            u.add.push((image_path(&b.files[n]), c.bytes(9_000)));
            u
        })
        .collect();
    for u in &specs {
        import_update(&site, u, d);
    }
    // The site logs, per job, how it made the work copy.
    let sparse = |job: u64| {
        let log = fs::read_to_string(&site.log).unwrap();
        let line = log
            .lines()
            .find(|l| l.contains("servicing job committed") && l.contains(&format!("job={job} ")))
            .unwrap_or_else(|| panic!("job {job} committed nothing: {log}"));
        line.contains("sparse=true")
    };
    for (id, want_sparse) in [(&plain, true), (&with_table, false)] {
        for (n, kb) in ["KB6000001", "KB6000002"].into_iter().enumerate() {
            let j = site
                .cli_json(&["image", "service", id, "--updates", kb])
                .unwrap();
            assert_eq!(j["state"], "succeeded", "{j}");
            assert_eq!(sparse(j["id"].as_u64().unwrap()), want_sparse, "{id} {kb}");
            // The revision, rebuilt from the library, is a whole, valid WIM
            // holding the updates so far and every untouched file.
            let wim = export(&site, id, d, &format!("{id}-{n}.wim"));
            wimtools::verify(&wim).unwrap();
            for (k, u) in specs.iter().enumerate().take(n + 1) {
                for (path, bytes) in &u.add {
                    assert_eq!(&extract(&wim, path, d), bytes, "{id} after {kb}: {k}");
                }
            }
            assert_eq!(
                extract(&wim, &image_path(&b.files[30]), d),
                fs::read(b.tree.join(&b.files[30])).unwrap()
            );
        }
    }
}

#[test]
fn a_schedule_is_standard_cron_saturday_is_6_and_sunday_is_0_or_7() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_, site, id) = imported(d, 20, 61);
    let mut u = UpdateSpec::new("KB6100001", "2026-03-10");
    u.add = vec![("Windows/x.dll".into(), vec![1; 100])];
    import_update(&site, &u, d);
    use time::format_description::well_known::Rfc3339;
    for (expr, day) in [
        ("0 2 * * 6", time::Weekday::Saturday),
        ("0 2 * * 0", time::Weekday::Sunday),
        ("0 2 * * 7", time::Weekday::Sunday),
        ("30 4 * * mon", time::Weekday::Monday),
    ] {
        let j = site
            .cli_json(&[
                "image",
                "service",
                &id,
                "--updates",
                "KB6100001",
                "--schedule",
                expr,
            ])
            .unwrap_or_else(|e| panic!("{expr}: {e}"));
        let next = j["next_run"].as_str().expect("a next run");
        let at = time::OffsetDateTime::parse(next, &Rfc3339).unwrap();
        assert_eq!(at.weekday(), day, "{expr}: {next}");
        assert_eq!(at.offset(), time::UtcOffset::UTC);
        let n = j["id"].as_u64().unwrap().to_string();
        site.cli_ok(&["jobs", "cancel", &n]).unwrap();
    }
    let out = site.cli(&[
        "image",
        "service",
        &id,
        "--updates",
        "KB6100001",
        "--schedule",
        "0 2 * * 8",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("\"0 2 * * 8\"") && !err.contains("0 0 2"),
        "the error quotes what was typed: {err}"
    );
}
