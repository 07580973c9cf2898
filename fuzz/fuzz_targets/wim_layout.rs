//! The WIM layout parser (header, blob table, segments) on any bytes: an
//! error or a layout whose segments lie inside the file, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut r = std::io::Cursor::new(data);
    if let Ok(layout) = ferry_wim::layout::Layout::read(&mut r, data.len() as u64) {
        for s in &layout.segments {
            assert!(s
                .offset
                .checked_add(s.len)
                .is_some_and(|e| e <= data.len() as u64));
        }
    }
});
