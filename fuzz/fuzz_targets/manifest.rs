//! A stored manifest decoded from any bytes, checked, and written back:
//! what decodes and validates encodes to something that decodes the same.
#![no_main]
use ferry_core::manifest::Manifest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Manifest::decode(data) {
        if m.validate().is_ok() {
            let again = Manifest::decode(&m.encode()).expect("a manifest it wrote decodes");
            assert_eq!(again, m);
        }
    }
});
