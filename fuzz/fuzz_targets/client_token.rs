//! A client token as a computer presents it to a DP: any text is refused
//! with a reason, unless it is a token the site's key signed.
#![no_main]
use libfuzzer_sys::fuzz_target;

fn public() -> &'static [u8] {
    static KEY: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    KEY.get_or_init(|| {
        // A key of this process: the fuzzer cannot sign with it, so
        // nothing it makes may pass.
        let text = ferry_net::pki::SigningKey::generate().expect("a key");
        let key = ferry_net::pki::SigningKey::from_text(&text, "fuzz key").expect("key");
        key.public()
    })
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(claims) = ferry_net::client_token::verify(public(), "FRY", &text, 1_800_000_000) {
        panic!("a token nobody signed was accepted: {claims:?}");
    }
});
