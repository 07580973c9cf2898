//! A pull grant as a source DP receives it: any bytes are refused unless
//! the site's key signed them; and a grant body, whatever it holds, gives
//! a pace.
#![no_main]
use ferry_wire::pb;
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Ok(signed) = pb::SignedGrant::decode(data) else {
        return;
    };
    let public = [7u8; 32];
    let e = ferry_net::grant::Expect {
        public: &public,
        site_code: "FRY",
        fingerprint: "ab",
        package: "FRY00001",
        revision: 1,
        now: 1_800_000_000,
    };
    if let Ok(g) = ferry_net::grant::verify(Some(&signed), &e) {
        panic!("a grant nobody signed was accepted: {g:?}");
    }
    // What a signed grant's body turns into: its pace.
    if let Ok(g) = pb::Grant::decode(&signed.body[..]) {
        let _ = ferry_net::grant::to_wire(&ferry_net::grant::pace(&g));
    }
});
