//! OS upgrade packages, end to end: a Windows-like setup folder made here
//! (setup.exe, sources/ with a real two-image install.wim, boot.wim and many
//! other files), imported, distributed to a real DP, serviced, and checked
//! file by file against the source with wimlib's own tools.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ferry_tests::harness::{DpProc, SiteProc};
use ferry_tests::tree::{make_tree_of, Content};
use ferry_tests::updates::{tree_hashes, UpdateSpec};
use ferry_tests::wimtools::{self, WINDOWS_PROPS};

const LIMIT: Duration = Duration::from_secs(120);

/// A generated tree of `files` files at `dir`.
fn tree(dir: &Path, files: usize, seed: u64) {
    make_tree_of(dir, files, seed).unwrap();
}

/// Makes a setup folder in `dir/media`: install.wim with two images (the
/// second a serviced variant of the first), boot.wim, setup.exe, and a few
/// hundred other files in nested folders, one of them empty.
fn media(dir: &Path) -> PathBuf {
    let root = dir.join("media");
    let sources = root.join("sources");
    fs::create_dir_all(&sources).unwrap();
    let mut c = Content::new(5);
    fs::write(root.join("setup.exe"), c.bytes(300_000)).unwrap();
    fs::write(root.join("autorun.inf"), b"[AutoRun]\nopen=setup.exe\n").unwrap();
    for i in 0..300 {
        let sub = root.join(format!(
            "sources/{}/x{:02}",
            ["en-us", "dlmanifests", "sxs"][i % 3],
            i % 7
        ));
        fs::create_dir_all(&sub).unwrap();
        let len = c.size(0.5);
        fs::write(sub.join(format!("f{i:04}.mui")), c.bytes(len)).unwrap();
    }
    fs::write(sources.join("empty.dat"), b"").unwrap();

    let t1 = dir.join("img1");
    tree(&t1, 120, 51);
    let t2 = dir.join("img2");
    tree(&t2, 140, 52);
    let install = sources.join("install.wim");
    wimtools::capture(&t1, &install, "Windows 11 Pro", "LZX", WINDOWS_PROPS).unwrap();
    wimtools::append(&t2, &install, "Windows 11 Enterprise", WINDOWS_PROPS).unwrap();
    let tb = dir.join("boot");
    tree(&tb, 30, 53);
    wimtools::capture(
        &tb,
        &sources.join("boot.wim"),
        "Microsoft Windows Setup",
        "XPRESS",
        &[],
    )
    .unwrap();
    root
}

/// `dir` holds the same relative paths as `source` and nothing else, and
/// every file but `sources/install.wim` holds the same bytes.
fn same_tree_but_install_wim(source: &BTreeMap<String, String>, dir: &Path, when: &str) {
    let got = tree_hashes(dir).unwrap();
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        source.keys().collect::<Vec<_>>(),
        "paths differ {when}"
    );
    for (path, hash) in source {
        if path != "sources/install.wim" {
            assert_eq!(&got[path], hash, "{path} differs {when}");
        }
    }
}

/// `wimapply WIM INDEX DIR`, then the tree's hashes.
fn applied(wim: &Path, index: u32, dir: &Path) -> BTreeMap<String, String> {
    let out = Command::new("wimapply")
        .arg(wim)
        .arg(index.to_string())
        .arg(dir)
        .arg("--no-acls")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    tree_hashes(dir).unwrap()
}

#[test]
fn an_upgrade_package_with_one_index_reaches_a_dp_byte_for_byte_and_can_be_serviced() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let root = media(d);
    let before = tree_hashes(&root).unwrap();
    let site = SiteProc::start(d).unwrap();
    let dp = DpProc::start(d, "dp1", &site).unwrap();

    let pkg = site
        .cli_json(&[
            "upgrade",
            "add",
            root.to_str().unwrap(),
            "--name",
            "Windows 11 23H2",
            "--version",
            "23H2",
            "--extract-index",
            "2",
            "--lang",
            "en-US",
        ])
        .unwrap();
    assert_eq!(
        tree_hashes(&root).unwrap(),
        before,
        "the operator's folder is only read"
    );
    let id = pkg["id"].as_str().unwrap().to_string();
    assert_eq!(pkg["kind"], "upgrade");
    assert_eq!(pkg["architecture"], "x64", "read from install.wim");
    assert_eq!(pkg["language"], "en-US");
    assert_eq!(pkg["revisions"][0]["exported_index"], 2);
    assert_eq!(
        pkg["revisions"][0]["files"].as_array().unwrap().len(),
        before.len()
    );
    assert!(pkg["revisions"][0]["warnings"]
        .as_array()
        .is_none_or(Vec::is_empty));

    // Export of a package of many files names the one it wants; a wrong
    // path is named, and nothing is written either way.
    let out_file = dir.path().join("exported.bin");
    let out = out_file.to_str().unwrap();
    let e = site.cli(&["content", "export", &id, "--out", out]);
    let err = String::from_utf8_lossy(&e.stderr);
    assert!(!e.status.success());
    assert!(
        err.contains("name one with --path") && err.contains("setup.exe"),
        "{err}"
    );
    let e = site.cli(&["content", "export", &id, "--out", out, "--path", "nope.txt"]);
    let err = String::from_utf8_lossy(&e.stderr);
    assert!(!e.status.success());
    assert!(err.contains("has no file nope.txt"), "{err}");
    assert!(!out_file.exists(), "nothing written");
    site.cli_ok(&[
        "content",
        "export",
        &id,
        "--out",
        out,
        "--path",
        "setup.exe",
    ])
    .unwrap();
    assert_eq!(
        fs::read(&out_file).unwrap(),
        fs::read(root.join("setup.exe")).unwrap()
    );
    // --out an existing folder: every file under its path, byte for byte.
    let all = dir.path().join("all");
    fs::create_dir(&all).unwrap();
    let r = site
        .cli_json(&["content", "export", &id, "--out", all.to_str().unwrap()])
        .unwrap();
    assert_eq!(r["files"].as_array().unwrap().len(), before.len(), "{r}");
    // (Ferry's install.wim holds the one index kept, so it differs.)
    same_tree_but_install_wim(&before, &all, "exported into a folder");
    let listed = site.cli_json(&["upgrade", "list"]).unwrap();
    assert_eq!(listed[0]["id"], id.as_str());
    assert!(site
        .cli_json(&["image", "list"])
        .unwrap()
        .as_array()
        .unwrap()
        .is_empty());
    let dup = site.cli(&[
        "upgrade",
        "add",
        root.to_str().unwrap(),
        "--name",
        "windows 11 23h2",
    ]);
    assert!(String::from_utf8_lossy(&dup.stderr).contains("exists already"));

    site.cli_ok(&["distribute", &id, "--dp", "dp1"]).unwrap();
    site.wait_installed(&id, "dp1", 1, LIMIT).unwrap();
    let on_dp = dp.content().join(&id);
    same_tree_but_install_wim(&before, &on_dp, "on the DP");
    let dp_install = on_dp.join("sources/install.wim");
    wimtools::verify(&dp_install).unwrap();
    assert_eq!(
        ferry_wim::Wim::open(&dp_install)
            .unwrap()
            .info()
            .image_count,
        1
    );
    let want = applied(
        &root.join("sources/install.wim"),
        2,
        &d.join("apply-source"),
    );
    let have = applied(&dp_install, 1, &d.join("apply-dp"));
    let differ: Vec<&String> = want
        .keys()
        .chain(have.keys())
        .filter(|k| want.get(*k) != have.get(*k))
        .collect();
    assert!(
        want.len() > 100 && differ.is_empty(),
        "index 2 of the source, file by file; these differ: {differ:?}"
    );

    // Servicing works on the install.wim inside; the other files carry over.
    let mut u = UpdateSpec::new("KB5100001", "2026-08-11");
    u.add = vec![("Windows/System32/upgrade-fix.dll".into(), b"fix".to_vec())];
    let f = u.write(&d.join("updates")).unwrap();
    site.cli_ok(&["update", "import", f.to_str().unwrap()])
        .unwrap();
    let v = site.cli_json(&["upgrade", "updates", &id]).unwrap();
    assert_eq!(v["applicable"][0]["id"], "KB5100001");
    let j = site
        .cli_json(&[
            "upgrade",
            "service",
            &id,
            "--updates",
            "KB5100001",
            "--distribute",
        ])
        .unwrap();
    assert_eq!(j["state"], "succeeded", "{j}");
    site.wait_installed(&id, "dp1", 2, LIMIT).unwrap();
    same_tree_but_install_wim(&before, &on_dp, "after servicing");
    assert!(wimtools::list_files(&dp_install, 1)
        .unwrap()
        .contains(&"/Windows/System32/upgrade-fix.dll".to_string()));
    let h = site.cli_json(&["upgrade", "history", &id]).unwrap();
    assert_eq!(h["applied"], serde_json::json!(["KB5100001"]));

    // A refresh from the setup folder is a new revision that keeps the
    // extracted index; the operator's folder is still only read.
    let out = site.cli(&["content", "refresh", &id]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("made by servicing"),
        "a serviced revision has no folder to refresh from by itself"
    );
    site.cli_ok(&[
        "content",
        "refresh",
        &id,
        "--source",
        root.to_str().unwrap(),
    ])
    .unwrap();
    site.wait_installed(&id, "dp1", 3, LIMIT).unwrap();
    assert_eq!(
        ferry_wim::Wim::open(&dp_install)
            .unwrap()
            .info()
            .image_count,
        1
    );
    assert!(!wimtools::list_files(&dp_install, 1)
        .unwrap()
        .contains(&"/Windows/System32/upgrade-fix.dll".to_string()));
    assert_eq!(tree_hashes(&root).unwrap(), before);

    site.cli_ok(&["undistribute", &id, "--dp", "dp1"]).unwrap();
    ferry_tests::harness::wait_for("dp1 to drop the package", LIMIT, || {
        Ok((!on_dp.exists()).then_some(()))
    })
    .unwrap();
    ferry_tests::harness::wait_for("the package to be removable", LIMIT, || {
        Ok(site
            .cli(&["upgrade", "remove", &id])
            .status
            .success()
            .then_some(()))
    })
    .unwrap();
    assert!(site
        .cli_json(&["upgrade", "list"])
        .unwrap()
        .as_array()
        .unwrap()
        .is_empty());
}

/// Spoils a good setup folder in one way.
type Spoil = Box<dyn Fn(&Path)>;

#[test]
fn bad_setup_folders_are_refused_or_warned_about_by_path() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let site = SiteProc::start(d).unwrap();
    let add = |root: &Path, name: &str, extra: &[&str]| {
        let mut args = vec!["upgrade", "add", root.to_str().unwrap(), "--name", name];
        args.extend_from_slice(extra);
        site.cli(&args)
    };
    let err = |o: std::process::Output| String::from_utf8_lossy(&o.stderr).into_owned();

    // No setup.exe, no install.wim: a warning, still imported.
    let plain = d.join("plain");
    fs::create_dir_all(plain.join("sources")).unwrap();
    fs::write(plain.join("sources/readme.txt"), b"hello").unwrap();
    let pkg = site
        .cli_json(&["upgrade", "add", plain.to_str().unwrap(), "--name", "plain"])
        .unwrap();
    let warnings = pkg["revisions"][0]["warnings"].to_string();
    assert!(
        warnings.contains("setup.exe") && warnings.contains("sources/install.wim"),
        "{warnings}"
    );
    // With --extract-index, a missing install.wim is an error.
    let e = err(add(&plain, "plain2", &["--extract-index", "1"]));
    assert!(e.contains("no sources/install.wim"), "{e}");

    let cases: Vec<(&str, Spoil, &str)> = vec![
        (
            "link-out",
            Box::new(|r: &Path| {
                std::os::unix::fs::symlink("/etc/passwd", r.join("sources/passwd")).unwrap()
            }),
            "sources/passwd",
        ),
        (
            "bad-name",
            Box::new(|r: &Path| fs::write(r.join("sources/what?.txt"), b"x").unwrap()),
            "what?.txt",
        ),
        (
            "reserved",
            Box::new(|r: &Path| fs::write(r.join("sources/aux.log"), b"x").unwrap()),
            "aux.log",
        ),
        (
            "case",
            Box::new(|r: &Path| fs::write(r.join("sources/README.TXT"), b"x").unwrap()),
            "only in case",
        ),
        (
            "fifo",
            Box::new(|r: &Path| {
                assert!(Command::new("mkfifo")
                    .arg(r.join("sources/pipe"))
                    .status()
                    .unwrap()
                    .success())
            }),
            "sources/pipe",
        ),
    ];
    for (name, make, want) in cases {
        let root = d.join(name);
        fs::create_dir_all(root.join("sources")).unwrap();
        fs::write(root.join("setup.exe"), b"MZ").unwrap();
        fs::write(root.join("sources/readme.txt"), b"hello").unwrap();
        make(&root);
        let e = err(add(&root, name, &[]));
        assert!(e.contains(want), "{name}: {want:?} not in {e}");
    }
    let bad_index = d.join("bad-index");
    fs::create_dir_all(bad_index.join("sources")).unwrap();
    let t = d.join("t");
    tree(&t, 5, 3);
    wimtools::capture(
        &t,
        &bad_index.join("sources/install.wim"),
        "x",
        "XPRESS",
        &[],
    )
    .unwrap();
    let e = err(add(&bad_index, "bad-index", &["--extract-index", "3"]));
    assert!(
        e.contains("no image index 3") && e.contains("install.wim"),
        "{e}"
    );
    let e = err(add(&d.join("nowhere"), "nowhere", &[]));
    assert!(e.contains("no such folder"), "{e}");
    let e = err(add(&plain.join("sources/readme.txt"), "file", &[]));
    assert!(e.contains("is not a folder"), "{e}");

    let ids: Vec<String> = site
        .cli_json(&["upgrade", "list"])
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, ["plain"], "nothing else was added");
}
