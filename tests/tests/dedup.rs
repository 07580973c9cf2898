//! The dedup Ferry must reach: a serviced image costs at most 1.05× its
//! blob floor, computed from the WIMs' own blob tables by `wiminfo`.

use std::fs;

use ferry_tests::harness::{stats_of, SiteProc};
use ferry_tests::tree::TreeSpec;
use ferry_tests::wimtools::{self, ServiceSpec};

/// The bound from the foundation issue.
const MAX_OVER_FLOOR: f64 = 1.05;

#[test]
fn serviced_and_rebuilt_images_store_at_most_the_blob_floor() {
    let dir = tempfile::tempdir().unwrap();
    let spec = TreeSpec {
        files: 1500,
        seed: 7,
        ..TreeSpec::default()
    };
    let pair = wimtools::serviced_pair(dir.path(), &spec, "LZX", &ServiceSpec::default()).unwrap();
    wimtools::verify(&pair.serviced).unwrap();
    assert!(
        !pair.changes.patched.is_empty()
            && !pair.changes.deleted.is_empty()
            && !pair.changes.added.is_empty()
    );
    let floor = wimtools::blob_floor(&pair.base, &pair.serviced).unwrap();

    let site = SiteProc::start(dir.path()).unwrap();
    let base = site.add_image(&pair.base, &[]).unwrap();
    let serviced = site.add_image(&pair.serviced, &[]).unwrap();
    let (logical, new) = stats_of(&serviced);
    eprintln!(
        "serviced: {logical} bytes, blob floor {floor}, newly stored {new} ({:.3}× floor)",
        new as f64 / floor as f64
    );
    assert!(
        (new as f64) <= floor as f64 * MAX_OVER_FLOOR,
        "stored {new} > {MAX_OVER_FLOOR}× floor {floor}"
    );
    // Patched files keep most of their compressed chunks: Ferry goes below
    // the floor, which counts every patched file's resource in full.
    assert!(
        new < floor,
        "stored {new}, floor {floor}: patched resources should be partly shared"
    );

    // Rebuilt (wimoptimize): resources at new offsets, no gaps. Measured
    // against the base alone, so the serviced import goes first.
    let rebuilt = dir.path().join("rebuilt.wim");
    fs::copy(&pair.serviced, &rebuilt).unwrap();
    wimtools::optimize(&rebuilt).unwrap();
    assert!(fs::metadata(&rebuilt).unwrap().len() < fs::metadata(&pair.serviced).unwrap().len());
    let rebuilt_floor = wimtools::blob_floor(&pair.base, &rebuilt).unwrap();
    site.cli_ok(&["image", "remove", serviced["id"].as_str().unwrap()])
        .unwrap();
    let after = site.add_image(&rebuilt, &[]).unwrap();
    let (_, new_rebuilt) = stats_of(&after);
    eprintln!(
        "rebuilt: blob floor {rebuilt_floor}, newly stored {new_rebuilt} ({:.3}× floor)",
        new_rebuilt as f64 / rebuilt_floor as f64
    );
    assert!((new_rebuilt as f64) <= rebuilt_floor as f64 * MAX_OVER_FLOOR);

    // Both still rebuild byte for byte.
    let out = dir.path().join("out.wim");
    site.export(after["id"].as_str().unwrap(), &out).unwrap();
    assert_eq!(fs::read(&out).unwrap(), fs::read(&rebuilt).unwrap());
    site.export(base["id"].as_str().unwrap(), &out).unwrap();
    assert_eq!(fs::read(&out).unwrap(), fs::read(&pair.base).unwrap());
}
