//! Ferry's WIM layout parser against wimlib's own view (`wiminfo`), on WIMs
//! made by `wimcapture` and serviced in place by `wimupdate`.

use std::collections::HashMap;
use std::fs::File;

use ferry_core::SegmentKind;
use ferry_tests::tree::TreeSpec;
use ferry_tests::wimtools::{self, ServiceSpec};
use ferry_wim::{verify_blobs_from, Layout, VerifyError};

#[test]
fn segments_match_wiminfo_and_cover_every_byte_once() {
    let dir = tempfile::tempdir().unwrap();
    let spec = TreeSpec {
        files: 300,
        seed: 5,
        size_scale: 0.5,
        ..TreeSpec::default()
    };
    let pair =
        wimtools::serviced_pair(dir.path(), &spec, "XPRESS", &ServiceSpec::default()).unwrap();
    for (wim, expect_gaps) in [(&pair.base, false), (&pair.serviced, true)] {
        let len = std::fs::metadata(wim).unwrap().len();
        let layout = Layout::read(&mut File::open(wim).unwrap(), len).unwrap();
        // Coverage: contiguous, non-empty, ends at the file's end.
        let mut pos = 0;
        for s in &layout.segments {
            assert_eq!(s.offset, pos);
            assert!(s.len > 0);
            pos = s.end();
        }
        assert_eq!(pos, len);
        // Every resource wiminfo lists is one segment of the right kind.
        let by_offset: HashMap<u64, _> = layout.segments.iter().map(|s| (s.offset, *s)).collect();
        let blobs = wimtools::blobs(wim).unwrap();
        for b in &blobs {
            if b.compressed == 0 {
                continue;
            }
            let s = by_offset
                .get(&b.offset)
                .unwrap_or_else(|| panic!("no segment at {}", b.offset));
            assert_eq!(s.len, b.compressed);
            let kind = if b.metadata {
                SegmentKind::Metadata
            } else {
                SegmentKind::Blob
            };
            assert_eq!(s.kind, kind);
        }
        let h = wimtools::header(wim).unwrap();
        let table_off: u64 = h["Blob Table Offset"].parse().unwrap();
        assert_eq!(by_offset[&table_off].kind, SegmentKind::BlobTable);
        let xml_off: u64 = h["XML Data Offset"].parse().unwrap();
        assert_eq!(by_offset[&xml_off].kind, SegmentKind::Xml);
        let gaps = layout
            .segments
            .iter()
            .filter(|s| s.kind == SegmentKind::Gap)
            .count();
        assert_eq!(
            gaps > 0,
            expect_gaps,
            "an in-place append leaves the old tables behind as gaps"
        );
    }
}

#[test]
fn the_blobs_an_append_wrote_check_against_their_sha1_and_a_damaged_one_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let spec = TreeSpec {
        files: 120,
        seed: 11,
        size_scale: 0.5,
        ..TreeSpec::default()
    };
    for compress in ["none", "XPRESS", "LZX", "LZMS"] {
        let sub = dir.path().join(compress);
        std::fs::create_dir_all(&sub).unwrap();
        let pair = wimtools::serviced_pair(&sub, &spec, compress, &ServiceSpec::default()).unwrap();
        let base_len = std::fs::metadata(&pair.base).unwrap().len();
        let read = |wim: &std::path::Path| {
            let len = std::fs::metadata(wim).unwrap().len();
            Layout::read(&mut File::open(wim).unwrap(), len).unwrap()
        };
        let layout = read(&pair.serviced);
        let present = layout
            .blobs
            .iter()
            .filter(|b| b.reshdr.is_present())
            .count() as u64;
        let all = verify_blobs_from(&pair.serviced, &layout, 0)
            .unwrap()
            .expect("no solid resources");
        assert_eq!(all.blobs, present, "{compress}: every blob checked");
        let new = verify_blobs_from(&pair.serviced, &layout, base_len)
            .unwrap()
            .unwrap();
        assert!(
            new.blobs > 0 && new.blobs < all.blobs,
            "{compress}: only the appended blobs: {new:?} of {all:?}"
        );

        // One byte of the largest appended resource flipped.
        let target = layout
            .blobs
            .iter()
            .filter(|b| b.reshdr.offset >= base_len)
            .max_by_key(|b| b.reshdr.size_in_wim)
            .unwrap()
            .reshdr;
        let mut bytes = std::fs::read(&pair.serviced).unwrap();
        bytes[(target.offset + target.size_in_wim / 2) as usize] ^= 0x55;
        let damaged = sub.join("damaged.wim");
        std::fs::write(&damaged, bytes).unwrap();
        let e = verify_blobs_from(&damaged, &layout, base_len).unwrap_err();
        match &e {
            VerifyError::Bad { offset, .. } => assert_eq!(*offset, target.offset, "{e}"),
            other => panic!("{compress}: {other}"),
        }
        assert!(e.to_string().contains("damaged.wim"), "{e}");
    }
}
