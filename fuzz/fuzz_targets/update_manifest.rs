//! `update.toml` as an operator's update package brings it: any text is a
//! manifest or an error naming the file, and what parses holds only clean
//! relative paths, gives wimlib commands inside the payload and answers
//! whether it is for an image.
#![no_main]
use std::path::Path;

use ferry_api::updates::{self, UpdateManifest};
use ferry_wim::{ImageInfo, UpdateCmd};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let file = Path::new("KB1/update.toml");
    let m = match UpdateManifest::parse(text, file) {
        Ok(m) => m,
        Err(e) => {
            assert!(e.to_string().contains("KB1/update.toml"), "{e}");
            return;
        }
    };
    for p in m.payload.add.iter().chain(&m.payload.delete) {
        assert_eq!(
            updates::clean_path(p).as_deref(),
            Ok(p.as_str()),
            "kept unclean: {p:?}"
        );
    }
    let dir = Path::new("/catalog/KB1");
    for c in m.commands(dir) {
        if let UpdateCmd::Add { source, .. } = c {
            assert!(
                source.starts_with(dir.join(updates::PAYLOAD_DIR)),
                "{source:?}"
            );
        }
    }
    for (arch, build) in [
        ("x64", "10.0.22631.2428"),
        ("arm64", "10.0.19045.1"),
        ("", ""),
    ] {
        let img = ImageInfo {
            index: 1,
            name: "Windows 11 Pro".into(),
            architecture: arch.into(),
            build: build.into(),
            ..ImageInfo::default()
        };
        let _ = updates::applicability(&m, &img);
    }
});
