//! Client tokens: bearer tokens the site signs and every DP checks.
//!
//! A computer being deployed presents `Authorization: Bearer <token>` to a
//! DP's HTTPS listener. The token is `ferryc1.<claims>.<signature>`, both
//! parts base64url without padding: the claims are JSON ([`Claims`]), the
//! signature the site's Ed25519 manifest key over [`SIGNING_CONTEXT`] and
//! the claims' bytes. Every DP holds that public key already, so a DP
//! checks a token with no list to sync; the context keeps a token from ever
//! being taken for a signed manifest, or one for a token. Revoked tokens
//! reach the DPs by id with their assignments.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::pki::{verify_signature, PkiError, SigningKey};

/// Prefix of client tokens (format version 1).
pub const CLIENT_TOKEN_PREFIX: &str = "ferryc1";
/// Signed before the claims: a client token signature signs nothing else.
pub const SIGNING_CONTEXT: &[u8] = b"ferry client token v1\0";
/// Longest token text a DP reads (a bearer header of a sane size).
pub const MAX_TOKEN_LEN: usize = 2048;

/// What a client token says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Claims {
    /// The issuing site's code.
    pub site: String,
    /// The token's name (`ferry client token create --name NAME`).
    pub name: String,
    /// Random id, 32 hex digits: what a revocation names.
    pub id: String,
    /// Issued at, Unix seconds.
    pub issued: i64,
    /// Expires at, Unix seconds; `None` never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<i64>,
}

/// Why a DP refuses a token.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum TokenError {
    /// Not a token in the format this build reads.
    #[error("not a Ferry client token ({0})")]
    Malformed(&'static str),
    /// The signature is not the site's: forged, altered, or another
    /// site's token.
    #[error("the token is not signed by this site (forged, altered or another site's)")]
    Signature,
    /// Signed by this site's key but naming another site code.
    #[error("the token is for site {0}")]
    OtherSite(String),
    /// Past its expiry.
    #[error("token {name:?} expired at {at} (Unix seconds)")]
    Expired {
        /// The token's name.
        name: String,
        /// Its expiry.
        at: i64,
    },
    /// Revoked on the site.
    #[error("token {0:?} was revoked on the site")]
    Revoked(String),
}

/// Signs `claims` into a token.
pub fn issue(key: &SigningKey, claims: &Claims) -> Result<String, PkiError> {
    let body = serde_json::to_vec(claims).map_err(|e| PkiError::Invalid {
        what: "client token".into(),
        detail: e.to_string(),
    })?;
    let sig = key.sign(&[SIGNING_CONTEXT, &body].concat());
    Ok(format!(
        "{CLIENT_TOKEN_PREFIX}.{}.{}",
        URL_SAFE_NO_PAD.encode(&body),
        URL_SAFE_NO_PAD.encode(sig)
    ))
}

/// A fresh token id (128 random bits, hex).
pub fn new_id() -> Result<String, PkiError> {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).map_err(|e| PkiError::Random(e.to_string()))?;
    Ok(hex::encode(b))
}

/// Checks `token` against the site's public manifest key, its code and
/// the time `now` (Unix seconds); revocation is the caller's list.
pub fn verify(public: &[u8], site: &str, token: &str, now: i64) -> Result<Claims, TokenError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(TokenError::Malformed(
            "longer than any token the site issues",
        ));
    }
    let mut parts = token.trim().split('.');
    let (Some(CLIENT_TOKEN_PREFIX), Some(body), Some(sig), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Malformed(
            "expected ferryc1.<claims>.<signature>, as `ferry client token create` prints it",
        ));
    };
    let body = URL_SAFE_NO_PAD
        .decode(body)
        .map_err(|_| TokenError::Malformed("the claims are not base64url"))?;
    let sig = URL_SAFE_NO_PAD
        .decode(sig)
        .map_err(|_| TokenError::Malformed("the signature is not base64url"))?;
    if !verify_signature(public, &[SIGNING_CONTEXT, &body].concat(), &sig) {
        return Err(TokenError::Signature);
    }
    let claims: Claims = serde_json::from_slice(&body)
        .map_err(|_| TokenError::Malformed("the claims are not readable"))?;
    if claims.site != site {
        return Err(TokenError::OtherSite(claims.site));
    }
    if let Some(at) = claims.expires.filter(|&at| at <= now) {
        return Err(TokenError::Expired {
            name: claims.name,
            at,
        });
    }
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SigningKey {
        SigningKey::from_text(&SigningKey::generate().unwrap(), "k").unwrap()
    }

    fn claims(expires: Option<i64>) -> Claims {
        Claims {
            site: "FRY".into(),
            name: "lab".into(),
            id: new_id().unwrap(),
            issued: 1000,
            expires,
        }
    }

    #[test]
    fn a_token_verifies_with_its_site_key_only() {
        let k = key();
        let c = claims(Some(2000));
        let t = issue(&k, &c).unwrap();
        assert_eq!(verify(&k.public(), "FRY", &t, 1500).unwrap(), c);
        assert_eq!(
            verify(&key().public(), "FRY", &t, 1500),
            Err(TokenError::Signature)
        );
        assert_eq!(
            verify(&k.public(), "OTH", &t, 1500),
            Err(TokenError::OtherSite("FRY".into()))
        );
        assert!(matches!(
            verify(&k.public(), "FRY", &t, 2000),
            Err(TokenError::Expired { at: 2000, .. })
        ));
        let forever = issue(&k, &claims(None)).unwrap();
        assert!(verify(&k.public(), "FRY", &forever, i64::MAX).is_ok());
    }

    #[test]
    fn altered_or_garbage_tokens_are_refused() {
        let k = key();
        let t = issue(&k, &claims(None)).unwrap();
        let (head, sig) = t.rsplit_once('.').unwrap();
        // Claims of another token under this one's signature.
        let other = issue(&k, &claims(Some(5))).unwrap();
        let other_body = other.split('.').nth(1).unwrap();
        let spliced = format!("{CLIENT_TOKEN_PREFIX}.{other_body}.{sig}");
        assert_eq!(
            verify(&k.public(), "FRY", &spliced, 0),
            Err(TokenError::Signature)
        );
        // A manifest signature is not a token signature.
        let body = head.split('.').nth(1).unwrap();
        let raw = URL_SAFE_NO_PAD.decode(body).unwrap();
        let bare = format!(
            "{CLIENT_TOKEN_PREFIX}.{body}.{}",
            URL_SAFE_NO_PAD.encode(k.sign(&raw))
        );
        assert_eq!(
            verify(&k.public(), "FRY", &bare, 0),
            Err(TokenError::Signature)
        );
        for bad in [
            "",
            "ferryc1",
            "ferryc1.a.b.c",
            "ferryc2.e30.AAAA",
            "ferryc1.!!!.AAAA",
            &"x".repeat(MAX_TOKEN_LEN + 1),
        ] {
            assert!(
                matches!(
                    verify(&k.public(), "FRY", bad, 0),
                    Err(TokenError::Malformed(_))
                ),
                "{bad}"
            );
        }
    }
}
