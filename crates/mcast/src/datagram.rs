//! The datagram format and its sealing.
//!
//! Every datagram is a [`HEADER_LEN`]-byte header and at most one symbol:
//!
//! | bytes | field |
//! |---|---|
//! | 0..4 | magic `FMC1` |
//! | 4 | flags: bit 0 sealed |
//! | 5 | kind: 0 data, 1 end of pass, 2 end of session |
//! | 6..8 | zero |
//! | 8..16 | session id (big-endian, random per session) |
//! | 16..24 | packet (sequence) number, from 1, never repeated in a session |
//! | 24..28 | pass, from 1 |
//! | 28..32 | block |
//! | 32..36 | encoding symbol id (RFC 6330, < 2²⁴) |
//! | 36.. | the symbol ([`SYMBOL_SIZE`] bytes; none for control kinds), then, when sealed, a 16-byte tag |
//!
//! Sealed sessions use AES-256-GCM under a per-session key that only
//! clients the DP authenticated receive; the nonce is the packet number and
//! the header is the associated data, so a datagram cannot be altered,
//! moved to another block or session, or replayed past the
//! [`crate::ReplayWindow`]. In clear sessions anyone on the segment can
//! forge a datagram; receivers still check every chunk of a decoded block
//! against the signed manifest, so a forgery costs a block a pass, never a
//! wrong byte on disk.

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use thiserror::Error;

/// The first four bytes of every datagram.
pub const MAGIC: [u8; 4] = *b"FMC1";
/// Bytes of the header.
pub const HEADER_LEN: usize = 36;
/// Bytes of a symbol: header, symbol and tag fit an Ethernet MTU of 1500
/// with IPv4 and UDP headers (20 + 8 + 36 + 1400 + 16 = 1480).
pub const SYMBOL_SIZE: u16 = 1400;
/// Bytes of the AEAD tag of a sealed datagram.
pub const TAG_LEN: usize = 16;
/// The largest datagram a session sends.
pub const MAX_DATAGRAM: usize = HEADER_LEN + SYMBOL_SIZE as usize + TAG_LEN;
/// Bytes of a session key.
pub const KEY_LEN: usize = 32;
/// Encoding symbol ids are below this (RFC 6330's 24-bit ESI).
pub const MAX_ESI: u32 = 1 << 24;

/// What a datagram carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// One symbol of a block.
    Data,
    /// The pass in `pass` is over: receivers report what they still lack.
    PassEnd,
    /// The session is over.
    SessionEnd,
}

/// A datagram's header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Whether the datagram is sealed.
    pub sealed: bool,
    /// What it carries.
    pub kind: Kind,
    /// The session.
    pub session: u64,
    /// Its packet number.
    pub seq: u64,
    /// The pass it belongs to.
    pub pass: u32,
    /// The block (data only; 0 otherwise).
    pub block: u32,
    /// The encoding symbol id (data only; 0 otherwise).
    pub esi: u32,
}

/// Why a datagram was dropped. Every variant is counted by the receiver;
/// none is an error of the receiver itself.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq, Hash)]
pub enum Dropped {
    /// Not a datagram of this format: wrong magic, length or fields.
    #[error("not a Ferry multicast datagram")]
    Garbage,
    /// A datagram of another session.
    #[error("a datagram of another session")]
    OtherSession,
    /// Its seal does not open, or it is clear in a sealed session (or the
    /// other way round).
    #[error("a datagram whose seal does not open")]
    Forged,
    /// Its packet number was seen already, is older than the window, or
    /// (clear sessions) jumps implausibly far ahead.
    #[error("a replayed datagram")]
    Replayed,
    /// A block or symbol id outside the session's layout.
    #[error("a block or symbol outside the session")]
    OutOfRange,
    /// A symbol the receiver holds already, or of a block it completed.
    #[error("a symbol already received")]
    Duplicate,
}

impl Header {
    /// The header's bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[..4].copy_from_slice(&MAGIC);
        h[4] = u8::from(self.sealed);
        h[5] = match self.kind {
            Kind::Data => 0,
            Kind::PassEnd => 1,
            Kind::SessionEnd => 2,
        };
        h[8..16].copy_from_slice(&self.session.to_be_bytes());
        h[16..24].copy_from_slice(&self.seq.to_be_bytes());
        h[24..28].copy_from_slice(&self.pass.to_be_bytes());
        h[28..32].copy_from_slice(&self.block.to_be_bytes());
        h[32..36].copy_from_slice(&self.esi.to_be_bytes());
        h
    }

    /// Reads a header from the start of `d`.
    pub fn decode(d: &[u8]) -> Result<Header, Dropped> {
        let Some(h) = d.get(..HEADER_LEN) else {
            return Err(Dropped::Garbage);
        };
        if h[..4] != MAGIC || h[4] > 1 || h[6] != 0 || h[7] != 0 {
            return Err(Dropped::Garbage);
        }
        let kind = match h[5] {
            0 => Kind::Data,
            1 => Kind::PassEnd,
            2 => Kind::SessionEnd,
            _ => return Err(Dropped::Garbage),
        };
        let u32_at = |i: usize| u32::from_be_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
        let u64_at = |i: usize| (u64::from(u32_at(i)) << 32) | u64::from(u32_at(i + 4));
        let header = Header {
            sealed: h[4] == 1,
            kind,
            session: u64_at(8),
            seq: u64_at(16),
            pass: u32_at(24),
            block: u32_at(28),
            esi: u32_at(32),
        };
        if header.seq == 0 || header.pass == 0 || header.esi >= MAX_ESI {
            return Err(Dropped::Garbage);
        }
        if kind != Kind::Data && (header.block != 0 || header.esi != 0) {
            return Err(Dropped::Garbage);
        }
        Ok(header)
    }

    /// Bytes of payload this header's kind carries.
    pub fn payload_len(&self) -> usize {
        match self.kind {
            Kind::Data => usize::from(SYMBOL_SIZE),
            Kind::PassEnd | Kind::SessionEnd => 0,
        }
    }
}

/// A session's AES-256-GCM key.
pub struct SessionKey(LessSafeKey);

impl std::fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionKey(…)")
    }
}

impl SessionKey {
    /// The key of these [`KEY_LEN`] bytes; `None` for another length.
    pub fn new(bytes: &[u8]) -> Option<SessionKey> {
        let k = UnboundKey::new(&aead::AES_256_GCM, bytes).ok()?;
        Some(SessionKey(LessSafeKey::new(k)))
    }

    /// [`KEY_LEN`] random bytes for a new session's key.
    pub fn generate() -> Result<[u8; KEY_LEN], getrandom::Error> {
        let mut k = [0u8; KEY_LEN];
        getrandom::fill(&mut k)?;
        Ok(k)
    }
}

fn nonce(seq: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&seq.to_be_bytes());
    Nonce::assume_unique_for_key(n)
}

/// Writes into `out` (cleared first) the datagram of `h` carrying
/// `payload`, sealed when `key` is given (`h.sealed` is set to match).
pub fn seal_into(mut h: Header, payload: &[u8], key: Option<&SessionKey>, out: &mut Vec<u8>) {
    h.sealed = key.is_some();
    let head = h.encode();
    out.clear();
    out.extend_from_slice(&head);
    out.extend_from_slice(payload);
    if let Some(k) = key {
        let body = &mut out[HEADER_LEN..];
        // Sealing fails only for payloads of gigabytes; ours are one symbol.
        if let Ok(tag) =
            k.0.seal_in_place_separate_tag(nonce(h.seq), Aad::from(head), body)
        {
            out.extend_from_slice(tag.as_ref());
        }
    }
}

/// The datagram of `h` carrying `payload` (see [`seal_into`]).
pub fn seal(h: Header, payload: &[u8], key: Option<&SessionKey>) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len() + TAG_LEN);
    seal_into(h, payload, key, &mut out);
    out
}

/// Opens datagram `d` of session `session` in place: its header and
/// payload (the symbol for data, empty for control kinds), or why it was
/// dropped. The replay window is checked by the caller after this (a
/// forged datagram must not move it).
pub fn open<'a>(
    d: &'a mut [u8],
    session: u64,
    key: Option<&SessionKey>,
) -> Result<(Header, &'a [u8]), Dropped> {
    let h = Header::decode(d)?;
    if h.session != session {
        return Err(Dropped::OtherSession);
    }
    if h.sealed != key.is_some() {
        return Err(Dropped::Forged);
    }
    let (head, body) = d.split_at_mut(HEADER_LEN);
    let payload: &[u8] = match key {
        Some(k) => {
            let mut aad = [0u8; HEADER_LEN];
            aad.copy_from_slice(head);
            k.0.open_in_place(nonce(h.seq), Aad::from(aad), body)
                .map_err(|_| Dropped::Forged)?
        }
        None => body,
    };
    if payload.len() != h.payload_len() {
        return Err(Dropped::Garbage);
    }
    Ok((h, payload))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn data_header(seq: u64) -> Header {
        Header {
            sealed: false,
            kind: Kind::Data,
            session: 7,
            seq,
            pass: 1,
            block: 3,
            esi: 5,
        }
    }

    #[test]
    fn bad_headers_are_garbage() {
        let h = data_header(9);
        assert_eq!(Header::decode(&h.encode()), Ok(h));
        for (at, v) in [(0, b'X'), (4, 2), (5, 9), (6, 1)] {
            let mut bad = h.encode();
            bad[at] = v;
            assert_eq!(Header::decode(&bad), Err(Dropped::Garbage), "byte {at}");
        }
        assert_eq!(Header::decode(&h.encode()[..20]), Err(Dropped::Garbage));
        assert_eq!(Header::decode(&[]), Err(Dropped::Garbage));
        for f in [
            |h: &mut Header| h.seq = 0,
            |h: &mut Header| h.pass = 0,
            |h: &mut Header| h.esi = MAX_ESI,
        ] {
            let mut b = h;
            f(&mut b);
            assert_eq!(Header::decode(&b.encode()), Err(Dropped::Garbage));
        }
        let mut end = h;
        end.kind = Kind::PassEnd;
        assert_eq!(
            Header::decode(&end.encode()),
            Err(Dropped::Garbage),
            "a control datagram names no block"
        );
    }

    #[test]
    fn sealed_datagrams_open_only_with_their_key_header_and_session() {
        let k = SessionKey::new(&[1u8; 32]).unwrap();
        let other = SessionKey::new(&[2u8; 32]).unwrap();
        assert!(SessionKey::new(&[1u8; 16]).is_none());
        let sym = vec![0xabu8; SYMBOL_SIZE as usize];
        let d = seal(data_header(1), &sym, Some(&k));
        assert_eq!(d.len(), MAX_DATAGRAM);
        assert!(
            !d.windows(8).any(|w| w == [0xab; 8]),
            "payload is not in clear"
        );
        let (h, p) = open(&mut d.clone(), 7, Some(&k))
            .map(|(h, p)| (h, p.to_vec()))
            .unwrap();
        assert_eq!((h.block, h.esi, h.sealed), (3, 5, true));
        assert_eq!(p, sym);
        assert_eq!(
            open(&mut d.clone(), 7, Some(&other)).map(|x| x.0),
            Err(Dropped::Forged)
        );
        assert_eq!(
            open(&mut d.clone(), 8, Some(&k)).map(|x| x.0),
            Err(Dropped::OtherSession)
        );
        assert_eq!(
            open(&mut d.clone(), 7, None).map(|x| x.0),
            Err(Dropped::Forged)
        );
        // Moving the symbol to another block breaks the seal.
        let mut moved = d.clone();
        moved[31] ^= 1;
        assert_eq!(
            open(&mut moved, 7, Some(&k)).map(|x| x.0),
            Err(Dropped::Forged)
        );
        // Clear datagrams carry the payload as is; a short one is garbage.
        let c = seal(data_header(2), &sym, None);
        assert_eq!(open(&mut c.clone(), 7, None).unwrap().1, &sym[..]);
        assert_eq!(
            open(&mut c[..100].to_vec(), 7, None).map(|x| x.0),
            Err(Dropped::Garbage)
        );
        assert_eq!(
            open(&mut c.clone(), 7, Some(&k)).map(|x| x.0),
            Err(Dropped::Forged)
        );
    }

    fn any_header() -> impl Strategy<Value = Header> {
        (
            any::<bool>(),
            0u8..3,
            any::<u64>(),
            1u64..,
            1u32..,
            any::<u32>(),
            0..MAX_ESI,
        )
            .prop_map(|(sealed, kind, session, seq, pass, block, esi)| {
                let kind = [Kind::Data, Kind::PassEnd, Kind::SessionEnd][usize::from(kind)];
                let (block, esi) = if kind == Kind::Data {
                    (block, esi)
                } else {
                    (0, 0)
                };
                Header {
                    sealed,
                    kind,
                    session,
                    seq,
                    pass,
                    block,
                    esi,
                }
            })
    }

    proptest! {
        #[test]
        fn headers_round_trip(h in any_header()) {
            prop_assert_eq!(Header::decode(&h.encode()), Ok(h));
        }

        #[test]
        fn seal_then_open_gives_the_payload_back(
            h in any_header(),
            key in proptest::option::of(any::<[u8; 32]>()),
            fill in any::<u8>(),
        ) {
            let key = key.map(|k| SessionKey::new(&k).unwrap());
            let payload = vec![fill; h.payload_len()];
            let mut d = seal(h, &payload, key.as_ref());
            let (got, p) = open(&mut d, h.session, key.as_ref()).unwrap();
            prop_assert_eq!(got.seq, h.seq);
            prop_assert_eq!(got.sealed, key.is_some());
            prop_assert_eq!(p, &payload[..]);
        }

        #[test]
        fn any_bytes_open_or_drop_without_panic(
            mut d in proptest::collection::vec(any::<u8>(), 0..1600),
            sealed in any::<bool>(),
        ) {
            let key = SessionKey::new(&[9u8; 32]).unwrap();
            let key = sealed.then_some(&key);
            let _ = open(&mut d, 7, key);
        }

        #[test]
        fn a_flipped_bit_never_opens_a_sealed_datagram(
            h in any_header(),
            bit in 0usize..(MAX_DATAGRAM * 8),
        ) {
            let key = SessionKey::new(&[3u8; 32]).unwrap();
            let payload = vec![0x5a; h.payload_len()];
            let mut d = seal(h, &payload, Some(&key));
            let bit = bit % (d.len() * 8);
            d[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(open(&mut d, h.session, Some(&key)).is_err());
        }
    }
}
