//! An update archive (`.tar`, `.tar.gz`) as `ferry update import` unpacks
//! it: any bytes unpack to files inside the folder given, or stop with an
//! error; what unpacks is then checked as an update folder. The first byte
//! picks the form: a tar, a tar this target gzips (so that tar mutations
//! reach the unpacker through gzip), or raw bytes read as gzip.
#![no_main]
use std::io::Write as _;
use std::path::Path;
use std::sync::OnceLock;

use ferry_api::updates;
use libfuzzer_sys::fuzz_target;

/// A tmpfs folder of this process, emptied after every input.
fn root() -> &'static Path {
    static ROOT: OnceLock<tempfile::TempDir> = OnceLock::new();
    ROOT.get_or_init(|| {
        let base = Path::new("/dev/shm");
        let mut b = tempfile::Builder::new();
        b.prefix("ferry-fuzz-update-");
        if base.is_dir() {
            b.tempdir_in(base)
        } else {
            b.tempdir()
        }
        .unwrap()
    })
    .path()
}

fuzz_target!(|data: &[u8]| {
    let Some((&form, body)) = data.split_first() else {
        return;
    };
    let root = root();
    let (name, bytes) = match form % 3 {
        0 => ("u.tar", body.to_vec()),
        1 => {
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            gz.write_all(body).unwrap();
            ("u.tar.gz", gz.finish().unwrap())
        }
        _ => ("u.tgz", body.to_vec()),
    };
    let archive = root.join(name);
    std::fs::write(&archive, &bytes).unwrap();
    let into = root.join("unpacked");
    std::fs::create_dir(&into).unwrap();
    if updates::unpack(&archive, &into).is_ok() {
        let _ = updates::check_folder(&into);
    }
    // Nothing but the archive and the folder it was given: no entry
    // stepped out.
    let mut left: Vec<_> = std::fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    left.sort();
    assert_eq!(left, [std::ffi::OsString::from(name), "unpacked".into()]);
    std::fs::remove_dir_all(&into).unwrap();
    std::fs::remove_file(&archive).unwrap();
});
