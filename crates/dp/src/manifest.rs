//! Fetching and checking the site-signed manifest of a revision.

use std::collections::HashSet;

use ferry_core::{ChunkRef, Manifest};
use ferry_wire::pb::{self, reply, request};
use ferry_wire::{write_frame, MAX_REPLY_BYTES};
use prost::Message;

use crate::error::DpError;
pub use crate::error::{CompactMismatch, ManifestError};

/// A revision's manifest as the site signed it, checked.
#[derive(Clone, Debug)]
pub struct Signed {
    /// The body in full form, as signed.
    pub body: Vec<u8>,
    /// The site's signature over it.
    pub signature: Vec<u8>,
    /// The package name in the body.
    pub name: String,
    /// The decoded, checked file manifests.
    pub manifests: Vec<Manifest>,
    /// Bytes of the manifest as it travelled (compact or full form).
    pub wire_bytes: u64,
}

/// Asks the site for the manifest of `a` and checks it. With `base` (the
/// revision installed here and its chunk list) the site may answer in
/// compact form.
pub async fn fetch(
    conn: &quinn::Connection,
    key: &[u8],
    a: &pb::Assignment,
    base: Option<(u32, &[ChunkRef])>,
) -> Result<Signed, DpError> {
    let (mut send, mut recv) = conn.open_bi().await?;
    let req = pb::Request {
        kind: Some(request::Kind::GetManifest(pb::GetManifest {
            package: a.package.clone(),
            revision: a.revision,
            base_revision: base.map_or(0, |(r, _)| r),
        })),
    };
    write_frame(&mut send, &req).await?;
    let _ = send.finish();
    let reply = tokio::time::timeout(
        ferry_wire::REPLY_TIMEOUT,
        ferry_wire::read_frame::<pb::Reply>(&mut recv, MAX_REPLY_BYTES),
    )
    .await
    .map_err(|_| {
        DpError::protocol(format!(
            "the site sent no manifest for {:?}",
            ferry_wire::REPLY_TIMEOUT
        ))
    })??;
    let signed = crate::error::answer(reply, "the manifest", |k| match k {
        reply::Kind::Manifest(m) => Some(m),
        _ => None,
    })?;
    let base_rev = base.map_or(0, |(r, _)| r);
    if signed.base_revision != 0 && signed.base_revision != base_rev {
        return Err(DpError::protocol(format!(
            "the site answered with a manifest relative to revision {}, which this DP did not offer",
            signed.base_revision
        )));
    }
    verify(key, a, &signed, base.map_or(&[], |(_, b)| b))
}

/// Checks the site's signature, then decodes and checks every file manifest
/// of a revision. A compact body is expanded against `base` first.
pub fn verify(
    key: &[u8],
    a: &pb::Assignment,
    signed: &pb::SignedManifest,
    base: &[ChunkRef],
) -> Result<Signed, DpError> {
    let package = || a.package.clone();
    let not_signed = || ManifestError::NotSigned {
        package: package(),
        revision: a.revision,
    };
    let (body, full) = if signed.base_revision == 0 {
        if !ferry_net::pki::verify_signature(key, &signed.body, &signed.signature) {
            return Err(not_signed().into());
        }
        let body = pb::ManifestBody::decode(signed.body.as_ref()).map_err(|e| {
            ManifestError::Malformed {
                package: package(),
                detail: e.to_string(),
            }
        })?;
        (body, signed.body.to_vec())
    } else {
        let compact_err = |why: String| CompactMismatch {
            package: package(),
            revision: a.revision,
            base: signed.base_revision,
            why,
        };
        let mut body = pb::ManifestBody::decode(signed.body.as_ref())
            .map_err(|e| compact_err(e.to_string()))?;
        ferry_wire::expand(&mut body, base).map_err(|e| compact_err(e.to_string()))?;
        let full = body.encode_to_vec();
        if !ferry_net::pki::verify_signature(key, &full, &signed.signature) {
            return Err(compact_err(not_signed().to_string()).into());
        }
        (body, full)
    };
    if body.package != a.package || body.revision != a.revision {
        return Err(ManifestError::Other {
            package: package(),
            revision: a.revision,
            got: body.package,
            got_revision: body.revision,
        }
        .into());
    }
    let mut paths = HashSet::new();
    let mut out = Vec::with_capacity(body.files.len());
    for f in &body.files {
        let m = ferry_wire::file_from_wire(f)?;
        if !paths.insert(m.path.clone()) {
            return Err(ManifestError::Twice {
                package: package(),
                path: m.path,
            }
            .into());
        }
        out.push(m);
    }
    if out.is_empty() {
        return Err(ManifestError::Empty { package: package() }.into());
    }
    // A file whose path is a folder of another cannot exist on disk.
    for m in &out {
        let mut prefix = m.path.as_str();
        while let Some((parent, _)) = prefix.rsplit_once('/') {
            if paths.contains(parent) {
                return Err(ManifestError::FileAndFolder {
                    package: package(),
                    path: parent.to_string(),
                }
                .into());
            }
            prefix = parent;
        }
    }
    Ok(Signed {
        body: full,
        signature: signed.signature.to_vec(),
        name: body.name,
        manifests: out,
        wire_bytes: (signed.body.len() + signed.signature.len()) as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_core::ChunkId;

    fn key() -> ferry_net::pki::SigningKey {
        ferry_net::pki::SigningKey::from_text(
            &ferry_net::pki::SigningKey::generate().unwrap(),
            "key",
        )
        .unwrap()
    }

    fn assignment() -> pb::Assignment {
        pb::Assignment {
            package: "FRY00001".into(),
            revision: 2,
            name: "x".into(),
            ..pb::Assignment::default()
        }
    }

    fn body(files: Vec<Manifest>) -> pb::ManifestBody {
        pb::ManifestBody {
            package: "FRY00001".into(),
            revision: 2,
            name: "x".into(),
            files: files.iter().map(ferry_wire::file_to_wire).collect(),
        }
    }

    fn file(path: &str, parts: &[Vec<u8>]) -> Manifest {
        Manifest::of_parts(path, parts.iter().map(Vec::as_slice))
    }

    #[test]
    fn compact_manifests_are_accepted_only_when_they_expand_to_the_signed_body() {
        let key = key();
        let data: Vec<Vec<u8>> = (0u8..4).map(|n| vec![n; 100]).collect();
        let m = file("a.wim", &data);
        let mut full = body(vec![m.clone()]);
        let signature = key.sign(&full.encode_to_vec());
        let base = &m.chunks[..3];
        let ids: Vec<ChunkId> = base.iter().map(|c| c.id).collect();
        ferry_wire::compact(&mut full, &ids);
        let signed = pb::SignedManifest {
            body: full.encode_to_vec().into(),
            signature: signature.into(),
            base_revision: 1,
        };
        let got = verify(&key.public(), &assignment(), &signed, base).unwrap();
        assert_eq!(got.manifests[0].chunks, m.chunks);
        assert_eq!(
            got.body,
            body(vec![m.clone()]).encode_to_vec(),
            "the signed full form is kept"
        );
        // A DP whose copy of the base differs cannot be fooled into another
        // manifest: the expanded body no longer matches the signature.
        let mut other = base.to_vec();
        other.swap(0, 1);
        let e = verify(&key.public(), &assignment(), &signed, &other).unwrap_err();
        assert!(e.is_compact_mismatch(), "{e}");
        let e = verify(&key.public(), &assignment(), &signed, &base[..1]).unwrap_err();
        assert!(e.is_compact_mismatch(), "{e}");
    }

    #[test]
    fn unsigned_misnamed_and_impossible_manifests_are_refused() {
        let key = key();
        let sign = |b: &pb::ManifestBody| pb::SignedManifest {
            body: b.encode_to_vec().into(),
            signature: key.sign(&b.encode_to_vec()).into(),
            base_revision: 0,
        };
        let a = file("a", &[vec![1; 10]]);
        let nested = file("a/b.txt", &[vec![2; 10]]);
        let e = verify(
            &key.public(),
            &assignment(),
            &sign(&body(vec![a.clone(), nested])),
            &[],
        )
        .unwrap_err();
        assert!(e.to_string().contains("as a file and as a folder"), "{e}");
        let mut other = body(vec![a.clone()]);
        other.revision = 3;
        let e = verify(&key.public(), &assignment(), &sign(&other), &[]).unwrap_err();
        assert!(e.to_string().contains("got FRY00001 revision 3"), "{e}");
        let mut s = sign(&body(vec![a]));
        let mut b = s.body.to_vec();
        b[3] ^= 1;
        s.body = b.into();
        let e = verify(&key.public(), &assignment(), &s, &[]).unwrap_err();
        assert!(e.to_string().contains("not signed by the site"), "{e}");
    }
}
