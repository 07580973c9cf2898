//! Importing, inspecting, exporting, verifying and removing OS images,
//! end to end: a real `ferry site serve`, the real CLI, real WIMs.

use std::fs;
use std::path::Path;

use ferry_tests::harness::{stats_of, SiteProc};
use ferry_tests::tree::{make_tree, TreeSpec};
use ferry_tests::wimtools::{self, WINDOWS_PROPS};

fn b3(path: &Path) -> String {
    let mut h = blake3::Hasher::new();
    h.update_reader(fs::File::open(path).unwrap()).unwrap();
    h.finalize().to_hex().to_string()
}

fn small_tree(dir: &Path, seed: u64) -> Vec<std::path::PathBuf> {
    make_tree(
        dir,
        &TreeSpec {
            files: 400,
            seed,
            size_scale: 0.5,
            duplicates: 0.05,
        },
    )
    .unwrap()
}

/// A two-image WIM: image 1 from one tree, image 2 from another.
fn two_image_wim(dir: &Path) -> std::path::PathBuf {
    small_tree(&dir.join("t1"), 1);
    small_tree(&dir.join("t2"), 2);
    let wim = dir.join("install.wim");
    wimtools::capture(
        &dir.join("t1"),
        &wim,
        "Windows 11 Pro",
        "XPRESS",
        WINDOWS_PROPS,
    )
    .unwrap();
    wimtools::append(
        &dir.join("t2"),
        &wim,
        "Windows 11 Education",
        &[("WINDOWS/ARCH", "12"), ("WINDOWS/EDITIONID", "Education")],
    )
    .unwrap();
    wim
}

#[test]
fn import_show_export_verify_remove() {
    let dir = tempfile::tempdir().unwrap();
    let wim = two_image_wim(dir.path());
    let site = SiteProc::start(dir.path()).unwrap();

    let pkg = site
        .add_image(&wim, &["--version", "23H2", "--comment", "golden"])
        .unwrap();
    let id = pkg["id"].as_str().unwrap().to_string();
    assert_eq!(id, "FRY00001");
    assert_eq!(
        pkg["name"], "Windows 11 Pro",
        "name defaults to the first image's name"
    );
    assert_eq!(pkg["version"], "23H2");
    let rev = &pkg["revisions"][0];
    let images = rev["images"].as_array().unwrap();
    assert_eq!(images.len(), 2);
    assert_eq!(images[0]["architecture"], "x64");
    assert_eq!(images[0]["build"], "10.0.22631.2861");
    assert_eq!(images[0]["edition"], "Enterprise");
    assert_eq!(images[0]["languages"], serde_json::json!(["en-US"]));
    assert_eq!(images[1]["name"], "Windows 11 Education");
    assert_eq!(images[1]["architecture"], "arm64");
    assert!(images[0]["file_count"].as_u64().unwrap() >= 400);
    assert!(images[0]["total_bytes"].as_u64().unwrap() > 1_000_000);
    assert_eq!(rev["source"]["hash"], b3(&wim));
    let (logical, new) = stats_of(&pkg);
    assert_eq!(logical, fs::metadata(&wim).unwrap().len());
    assert!(new > 0 && new <= logical);

    // Human output names the package; list and show agree with the import.
    let list = site.cli_json(&["image", "list"]).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["id"], id.as_str());
    let table = site.cli_ok(&["image", "show", &id]).unwrap();
    assert!(
        table.contains("Windows 11 Education") && table.contains("arm64"),
        "{table}"
    );
    assert!(table.contains("unchanged since import"), "{table}");

    // Export rebuilds the exact bytes, and wimlib accepts the result.
    let out = dir.path().join("exported.wim");
    site.export(&id, &out).unwrap();
    assert_eq!(b3(&out), b3(&wim));
    wimtools::verify(&out).unwrap();

    let report = site.cli_json(&["content", "verify", &id]).unwrap();
    assert_eq!(report["damaged"].as_array().unwrap().len(), 0);
    assert!(report["chunks"].as_u64().unwrap() > 0);

    // A second identical import stores nothing new.
    let again = site.add_image(&wim, &["--name", "copy"]).unwrap();
    assert_eq!(stats_of(&again).1, 0, "identical content is stored once");
    assert_eq!(again["id"], "FRY00002");

    // Removing one copy frees nothing; removing the other frees everything.
    let r1 = site.cli_json(&["image", "remove", "FRY00002"]).unwrap();
    assert_eq!(r1["freed_bytes"], 0);
    let r2 = site.cli_json(&["image", "remove", &id]).unwrap();
    assert_eq!(r2["freed_bytes"].as_u64().unwrap(), new);
    assert_eq!(site.package_count().unwrap(), 0);
    assert_eq!(site.stored_chunks().unwrap(), 0, "no chunk left behind");

    // The source changing after import is noticed.
    let pkg = site.add_image(&wim, &[]).unwrap();
    let id = pkg["id"].as_str().unwrap();
    fs::OpenOptions::new()
        .append(true)
        .open(&wim)
        .unwrap()
        .set_len(fs::metadata(&wim).unwrap().len() + 1)
        .unwrap();
    assert_eq!(
        site.cli_json(&["image", "show", id]).unwrap()["source_state"],
        "changed"
    );
}

#[test]
fn index_import_exports_one_image_and_leaves_the_source_alone() {
    let dir = tempfile::tempdir().unwrap();
    let wim = two_image_wim(dir.path());
    let before = b3(&wim);
    let site = SiteProc::start(dir.path()).unwrap();
    let pkg = site.add_image(&wim, &["--index", "2"]).unwrap();
    assert_eq!(b3(&wim), before, "the source WIM is never written");
    assert_eq!(pkg["name"], "Windows 11 Education");
    let rev = &pkg["revisions"][0];
    assert_eq!(rev["exported_index"], 2);
    assert_eq!(rev["images"].as_array().unwrap().len(), 1);
    assert_eq!(rev["source"]["hash"], before);

    let out = dir.path().join("index2.wim");
    site.export(pkg["id"].as_str().unwrap(), &out).unwrap();
    wimtools::verify(&out).unwrap();
    assert_eq!(
        wimtools::list_files(&out, 1).unwrap(),
        wimtools::list_files(&wim, 2).unwrap()
    );
    // Exported resources are copied, not recompressed: the full import of the
    // same WIM afterwards shares image 2's file data.
    let full = site.add_image(&wim, &[]).unwrap();
    let (logical, new) = stats_of(&full);
    assert!(
        new < logical * 3 / 4,
        "image 2's blobs are shared: {new} new of {logical}"
    );
    // No temporary export is left in the work folder.
    let left: Vec<_> = fs::read_dir(site.data.join("work")).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn bad_inputs_get_one_clear_error_and_add_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    small_tree(&d.join("t"), 3);
    let good = d.join("good.wim");
    wimtools::capture(&d.join("t"), &good, "Good", "XPRESS", &[]).unwrap();
    let bytes = fs::read(&good).unwrap();
    let site = SiteProc::start(d).unwrap();

    let empty = d.join("empty.wim");
    fs::write(&empty, b"").unwrap();
    let text = d.join("notes.txt");
    fs::write(&text, b"setup notes\n").unwrap();
    let random = d.join("random.wim");
    fs::write(
        &random,
        (0..100_000u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect::<Vec<_>>(),
    )
    .unwrap();
    let truncated = d.join("truncated.wim");
    fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let header_only = d.join("header-only.wim");
    fs::write(&header_only, &bytes[..208]).unwrap();
    // Blob table offset moved past the end of the file.
    let mut past = bytes.clone();
    let far = (bytes.len() as u64 + 4096).to_le_bytes();
    past[56..64].copy_from_slice(&far);
    let past_end = d.join("table-past-end.wim");
    fs::write(&past_end, &past).unwrap();
    // A blob table entry that overlaps another: point the first entry at the
    // second one's offset.
    let layout = ferry_wim_layout(&bytes);
    let overlap = d.join("overlap.wim");
    fs::write(&overlap, layout).unwrap();

    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![d.join("missing.wim").display().to_string()],
            "no such file",
        ),
        (vec![d.join("t").display().to_string()], "is a folder"),
        (vec![empty.display().to_string()], "empty"),
        (vec![text.display().to_string()], "not a WIM file"),
        (vec![random.display().to_string()], "not a WIM file"),
        (vec![truncated.display().to_string()], "not a usable WIM"),
        (vec![header_only.display().to_string()], "not a usable WIM"),
        (vec![past_end.display().to_string()], "not a usable WIM"),
        (vec![overlap.display().to_string()], "overlaps"),
        (
            vec![good.display().to_string(), "--index".into(), "9".into()],
            "no image index 9",
        ),
    ];
    for (args, expect) in &cases {
        let mut a = vec!["image", "add"];
        a.extend(args.iter().map(String::as_str));
        let out = site.cli(&a);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} should fail");
        assert!(
            err.contains(expect),
            "{args:?}: expected {expect:?} in {err}"
        );
        let named = Path::new(&args[0])
            .file_name()
            .unwrap()
            .to_string_lossy()
            .to_string();
        assert!(
            err.contains(&named),
            "{args:?}: the error names the file: {err}"
        );
        assert!(!err.contains("panick"), "{err}");
    }
    assert_eq!(site.package_count().unwrap(), 0);
    assert_eq!(site.stored_chunks().unwrap(), 0, "nothing was stored");
    // The site is still up and imports the good file afterwards.
    site.add_image(&good, &[]).unwrap();
}

/// `bytes` (a WIM) with one file blob's table entry pointing at another
/// blob's resource, so two entries claim the same bytes.
fn ferry_wim_layout(bytes: &[u8]) -> Vec<u8> {
    let mut out = bytes.to_vec();
    let table = u64::from_le_bytes(bytes[56..64].try_into().unwrap()) as usize;
    let size =
        (u64::from_le_bytes(bytes[48..56].try_into().unwrap()) & 0x00FF_FFFF_FFFF_FFFF) as usize;
    let files: Vec<usize> = (0..size / 50)
        .map(|i| table + i * 50)
        .filter(|&e| bytes[e + 7] & 0x02 == 0)
        .collect();
    let (a, b) = (files[0], files[1]);
    out.copy_within(b..b + 24, a);
    out
}

#[test]
fn operator_api_refuses_a_wrong_token() {
    let dir = tempfile::tempdir().unwrap();
    let site = SiteProc::start(dir.path()).unwrap();
    let out = std::process::Command::new(ferry_tests::harness::ferry_bin())
        .args([
            "image",
            "list",
            "--site",
            &format!("http://127.0.0.1:{}", site.port),
            "--token",
            "wrong",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("operator token"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let site = SiteProc::start(dir.path()).unwrap();
    let mut child = std::process::Command::new(ferry_tests::harness::ferry_bin())
        .arg("--data")
        .arg(&site.data)
        .args(["image", "list"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Close the reading end before the CLI writes, as `| head` does.
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert!(!out.status.success(), "killed by SIGPIPE, not a success");
}

#[test]
fn a_wim_with_damaged_compressed_data_is_refused_unless_no_verify() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let tree = d.join("tree");
    make_tree(
        &tree,
        &TreeSpec {
            files: 40,
            seed: 17,
            ..TreeSpec::default()
        },
    )
    .unwrap();
    let wim = d.join("install.wim");
    wimtools::capture(&tree, &wim, "Windows 11 Pro", "LZX", WINDOWS_PROPS).unwrap();
    let damaged = d.join("damaged.wim");
    fs::copy(&wim, &damaged).unwrap();
    // 4 KiB overwritten in the middle of the largest compressed resource.
    let mut f = fs::File::open(&damaged).unwrap();
    let len = f.metadata().unwrap().len();
    let layout = ferry_wim::Layout::read(&mut f, len).unwrap();
    let big = layout
        .blobs
        .iter()
        .filter(|b| b.reshdr.size_in_wim < b.reshdr.uncompressed)
        .max_by_key(|b| b.reshdr.size_in_wim)
        .expect("a compressed resource");
    assert!(big.reshdr.size_in_wim > 16 << 10, "{:?}", big.reshdr);
    let mut bytes = fs::read(&damaged).unwrap();
    let at = (big.reshdr.offset + big.reshdr.size_in_wim / 2) as usize;
    bytes[at..at + 4096].fill(0x5a);
    fs::write(&damaged, &bytes).unwrap();
    let wimverify = std::process::Command::new("wimverify")
        .arg(&damaged)
        .output()
        .unwrap();
    assert!(!wimverify.status.success(), "wimlib sees the damage too");
    // Split over threads or not, the check passes the good file whole and
    // names the damaged resource of the other.
    let one = ferry_wim::verify_blobs_on(&wim, &layout, 0, 1)
        .unwrap()
        .unwrap();
    assert_eq!(
        one.blobs as usize,
        layout
            .blobs
            .iter()
            .filter(|b| b.reshdr.is_present())
            .count()
    );
    for threads in [2, 3] {
        let c = ferry_wim::verify_blobs_on(&wim, &layout, 0, threads)
            .unwrap()
            .unwrap();
        assert_eq!(c, one, "{threads} threads check every blob once");
        match ferry_wim::verify_blobs_on(&damaged, &layout, 0, threads) {
            Err(ferry_wim::VerifyError::Bad { offset, .. }) => {
                assert_eq!(offset, big.reshdr.offset, "{threads} threads")
            }
            other => panic!("{threads} threads: {other:?}"),
        }
    }

    let site = SiteProc::start(d).unwrap();
    let out = site.cli(&["image", "add", damaged.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(damaged.to_str().unwrap()) && err.contains("nothing was added"),
        "{err}"
    );
    assert_eq!(site.package_count().unwrap(), 0);
    assert_eq!(
        site.stored_chunks().unwrap(),
        0,
        "its chunks were reclaimed"
    );

    // Verified by default, and the record says so; --no-verify takes the
    // damaged file as it is, and says that too.
    let good = site.add_image(&wim, &[]).unwrap();
    assert_eq!(good["revisions"][0]["verified"], true);
    let taken = site.add_image(&damaged, &["--no-verify"]).unwrap();
    assert_eq!(taken["revisions"][0]["verified"], false);
    let shown = site
        .cli_ok(&["image", "show", taken["id"].as_str().unwrap()])
        .unwrap();
    assert!(shown.contains("imported with --no-verify"), "{shown}");
}
