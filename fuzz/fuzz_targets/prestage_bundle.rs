//! A prestage bundle from any bytes: the reader gives the header and
//! checked chunks or an error, and says the bundle is whole only after its
//! end frame checked out.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((mut r, _header)) = ferry_wire::prestage::BundleReader::open(data) {
        let mut n = 0u64;
        while let Ok(Some((id, bytes))) = r.next_chunk() {
            assert_eq!(
                ferry_core::ChunkId::of(&bytes),
                id,
                "chunks come out checked"
            );
            n += 1;
            if n > 1 << 16 {
                break;
            }
        }
    }
});
