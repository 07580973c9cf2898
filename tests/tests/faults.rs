//! Faults: a site killed mid-import, chunks damaged on disk.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferry_tests::harness::SiteProc;
use ferry_tests::tree::Content;
use ferry_tests::wimtools;

fn blob_files(library: &Path) -> Vec<PathBuf> {
    fs::read_dir(library)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "blob"))
                .collect()
        })
        .unwrap_or_default()
}

/// A WIM of `n` files of 4 MiB of incompressible bytes, stored uncompressed:
/// quick to make, large enough that an import flushes chunks to disk midway.
fn big_wim(dir: &Path, n: usize) -> PathBuf {
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
    wimtools::capture(&tree, &wim, "Big", "none", &[]).unwrap();
    wim
}

#[test]
fn site_killed_mid_import_keeps_nothing_and_reclaims_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let wim = big_wim(dir.path(), 80);
    let mut site = SiteProc::start(dir.path()).unwrap();
    let library = site.data.join("library");
    let before = blob_files(&library).len();
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
    while blob_files(&library).len() == before {
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

    // Flip bytes in the middle of the largest blob file, as a bad disk would.
    let mut blobs = blob_files(&site.data.join("library"));
    blobs.sort_by_key(|p| fs::metadata(p).map(|m| m.len()).unwrap_or(0));
    let target = blobs.last().expect("chunks live in blob files");
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

    let dest = dir.path().join("out.wim");
    let out = site.cli(&["content", "export", &id, "--out", dest.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(!dest.exists(), "no partial file where the export was to go");
    let leftovers: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with(".ferry-export"))
        .collect();
    assert!(leftovers.is_empty(), "temporary export removed");
}
