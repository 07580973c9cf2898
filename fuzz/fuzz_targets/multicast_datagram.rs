//! Multicast datagrams as a client receives them: the header decoded and
//! the datagram opened, clear and sealed; a forged sealed datagram never
//! opens.
#![no_main]
use ferry_mcast::datagram::{self, Header, SessionKey};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(h) = Header::decode(data) else {
        return;
    };
    let mut clear = data.to_vec();
    let _ = datagram::open(&mut clear, h.session, None);
    let key = SessionKey::new(&[9u8; 32]).expect("a key");
    let mut sealed = data.to_vec();
    if datagram::open(&mut sealed, h.session, Some(&key)).is_ok() {
        panic!("a datagram nobody sealed opened");
    }
});
