//! Pull grants: the site's leave for one DP to read one package revision
//! from a source DP.
//!
//! A pull DP (`ferry dp set NAME --pull-from SRC`) takes its chunks from
//! other DPs. A source must serve only what the site assigned to the DP
//! that asks, and must not ask the site each time: the site signs a
//! [`pb::Grant`] per assigned revision with its Ed25519 manifest key (every
//! DP holds the public half) over [`SIGNING_CONTEXT`] and the grant's
//! bytes, and sends it with the assignment. The puller shows it when it
//! opens a chunk stream; the source checks the signature, the site code,
//! the puller's certificate, the revision and the expiry. The grant also
//! carries how fast the source may send (the puller's rate limit and
//! windows, worked out by the site: [`pace`]).

use prost::Message as _;
use thiserror::Error;
use time::OffsetDateTime;

use crate::pace::{Allowed, Segments};
use crate::pki::{verify_signature, SigningKey};
use ferry_wire::pb;

/// Signed before the grant: a grant signature signs nothing else (no
/// manifest, no client token).
pub const SIGNING_CONTEXT: &[u8] = b"ferry pull grant v1\0";
/// How long a grant holds.
pub const LIFETIME: time::Duration = time::Duration::hours(1);
/// A fresh grant is sent this often (so one is never older than this when
/// a transfer needs it).
pub const RENEW_EVERY: time::Duration = time::Duration::minutes(30);
/// Longest encoded grant a source reads.
pub const MAX_GRANT_BYTES: usize = 16 << 10;

/// Signs `grant`.
pub fn sign(key: &SigningKey, grant: &pb::Grant) -> pb::SignedGrant {
    let body = grant.encode_to_vec();
    let signature = key.sign(&[SIGNING_CONTEXT, &body].concat());
    pb::SignedGrant {
        body: body.into(),
        signature: signature.into(),
    }
}

/// Why a source refuses a grant.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum GrantError {
    /// No grant came with the request.
    #[error("no grant from the site came with the request")]
    Missing,
    /// Not a grant this build reads.
    #[error("the grant is not readable ({0})")]
    Malformed(&'static str),
    /// Not signed by this site's key.
    #[error("the grant is not signed by this site (forged, altered or another site's)")]
    Signature,
    /// Signed by this site's key but naming another site code.
    #[error("the grant is for site {0}")]
    OtherSite(String),
    /// For another DP's certificate.
    #[error("the grant is for DP {0}, not the certificate this connection shows")]
    OtherDp(String),
    /// For another revision than the one asked for.
    #[error("the grant is for {package} revision {revision}")]
    OtherRevision {
        /// What it grants.
        package: String,
        /// Which revision.
        revision: u32,
    },
    /// Past its expiry.
    #[error("the grant expired at {0} (Unix seconds)")]
    Expired(i64),
}

/// What a source checks a grant against.
#[derive(Clone, Copy, Debug)]
pub struct Expect<'a> {
    /// The site's public manifest key.
    pub public: &'a [u8],
    /// The site's code.
    pub site_code: &'a str,
    /// The fingerprint of the certificate the asking connection shows.
    pub fingerprint: &'a str,
    /// The package and revision asked for.
    pub package: &'a str,
    /// The revision.
    pub revision: u32,
    /// Now, Unix seconds.
    pub now: i64,
}

/// Checks `signed` as [`Expect`] says; the grant when it holds.
pub fn verify(signed: Option<&pb::SignedGrant>, e: &Expect<'_>) -> Result<pb::Grant, GrantError> {
    let signed = signed.ok_or(GrantError::Missing)?;
    if signed.body.len() > MAX_GRANT_BYTES {
        return Err(GrantError::Malformed(
            "larger than any grant the site signs",
        ));
    }
    if !verify_signature(
        e.public,
        &[SIGNING_CONTEXT, &signed.body].concat(),
        &signed.signature,
    ) {
        return Err(GrantError::Signature);
    }
    let g = pb::Grant::decode(&signed.body[..])
        .map_err(|_| GrantError::Malformed("the body does not decode"))?;
    if g.site_code != e.site_code {
        return Err(GrantError::OtherSite(g.site_code));
    }
    if g.fingerprint != e.fingerprint {
        return Err(GrantError::OtherDp(g.dp));
    }
    if g.package != e.package || g.revision != e.revision {
        return Err(GrantError::OtherRevision {
            package: g.package,
            revision: g.revision,
        });
    }
    if g.expires <= e.now {
        return Err(GrantError::Expired(g.expires));
    }
    Ok(g)
}

/// The pace a grant allows, as a plan a [`crate::pace::Pacer`] follows;
/// past the grant's expiry nothing goes.
pub fn pace(g: &pb::Grant) -> Segments {
    let at = |s: i64| OffsetDateTime::from_unix_timestamp(s).unwrap_or(OffsetDateTime::UNIX_EPOCH);
    let mut spans: Vec<(OffsetDateTime, Allowed)> = g
        .pace
        .iter()
        .map(|p| {
            let allowed = match (p.closed, p.rate) {
                (true, _) => Allowed::Closed,
                (false, 0) => Allowed::All,
                (false, r) => Allowed::Rate(r),
            };
            (at(p.until.min(g.expires)), allowed)
        })
        .collect();
    if spans.is_empty() {
        spans.push((at(g.expires), Allowed::All));
    }
    Segments(spans)
}

/// A plan's spans as a grant carries them.
pub fn to_wire(s: &Segments) -> Vec<pb::Pace> {
    s.0.iter()
        .map(|&(until, allowed)| pb::Pace {
            until: until.unix_timestamp(),
            rate: match allowed {
                Allowed::Rate(r) => r,
                _ => 0,
            },
            closed: allowed == Allowed::Closed,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pace::Plan as _;

    fn key() -> SigningKey {
        SigningKey::from_text(&SigningKey::generate().unwrap(), "k").unwrap()
    }

    fn grant() -> pb::Grant {
        pb::Grant {
            site_code: "FRY".into(),
            dp: "dp2".into(),
            fingerprint: "ab".repeat(32),
            package: "FRY00001".into(),
            revision: 3,
            expires: 2000,
            pace: Vec::new(),
        }
    }

    fn expect<'a>(public: &'a [u8], fp: &'a str) -> Expect<'a> {
        Expect {
            public,
            site_code: "FRY",
            fingerprint: fp,
            package: "FRY00001",
            revision: 3,
            now: 1500,
        }
    }

    #[test]
    fn a_grant_holds_for_its_dp_revision_site_and_time_only() {
        let k = key();
        let pk = k.public();
        let fp = "ab".repeat(32);
        let s = sign(&k, &grant());
        assert_eq!(verify(Some(&s), &expect(&pk, &fp)).unwrap(), grant());
        assert_eq!(verify(None, &expect(&pk, &fp)), Err(GrantError::Missing));
        let other_key = key().public();
        assert_eq!(
            verify(Some(&s), &expect(&other_key, &fp)),
            Err(GrantError::Signature)
        );
        let mut flipped = s.clone();
        let mut body = flipped.body.to_vec();
        body[3] ^= 1;
        flipped.body = body.into();
        assert_eq!(
            verify(Some(&flipped), &expect(&pk, &fp)),
            Err(GrantError::Signature)
        );
        let other_fp = "cd".repeat(32);
        assert_eq!(
            verify(Some(&s), &expect(&pk, &other_fp)),
            Err(GrantError::OtherDp("dp2".into()))
        );
        let e = Expect {
            revision: 4,
            ..expect(&pk, &fp)
        };
        assert!(matches!(
            verify(Some(&s), &e),
            Err(GrantError::OtherRevision { revision: 3, .. })
        ));
        let e = Expect {
            site_code: "OTH",
            ..expect(&pk, &fp)
        };
        assert_eq!(
            verify(Some(&s), &e),
            Err(GrantError::OtherSite("FRY".into()))
        );
        let e = Expect {
            now: 2000,
            ..expect(&pk, &fp)
        };
        assert_eq!(verify(Some(&s), &e), Err(GrantError::Expired(2000)));
        // A client token signature over the same bytes is no grant.
        let token_sig = k.sign(&[crate::client_token::SIGNING_CONTEXT, &s.body].concat());
        let forged = pb::SignedGrant {
            body: s.body.clone(),
            signature: token_sig.into(),
        };
        assert_eq!(
            verify(Some(&forged), &expect(&pk, &fp)),
            Err(GrantError::Signature)
        );
    }

    #[test]
    fn a_grants_pace_goes_to_the_wire_and_back_and_closes_at_expiry() {
        let at = |s| OffsetDateTime::from_unix_timestamp(s).unwrap();
        let spans = Segments(vec![
            (at(1200), Allowed::All),
            (at(1800), Allowed::Closed),
            (at(2500), Allowed::Rate(5_000_000)),
        ]);
        let g = pb::Grant {
            pace: to_wire(&spans),
            ..grant()
        };
        let p = pace(&g);
        assert_eq!(p.at(at(1100)).0, Allowed::All);
        assert_eq!(p.at(at(1500)), (Allowed::Closed, at(1800)));
        // Cut at the expiry (2000), closed after.
        assert_eq!(p.at(at(1900)), (Allowed::Rate(5_000_000), at(2000)));
        assert_eq!(p.at(at(2000)).0, Allowed::Closed);
        // No pace: anything until the expiry.
        assert_eq!(pace(&grant()).at(at(1999)).0, Allowed::All);
        assert_eq!(pace(&grant()).at(at(2000)).0, Allowed::Closed);
    }
}
