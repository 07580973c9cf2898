//! Prestage bundles for a DP (`ferry content prestage ID --dp NAME`): the
//! revision a DP is to hold, with the site-signed manifest and the chunks
//! the DP lacks (or all of them), in the layout of
//! [`ferry_wire::prestage`]. An operator carries the file to the DP, which
//! imports it offline (`ferry dp prestage`).

use std::collections::HashSet;
use std::io::Write;

use ferry_core::ChunkId;
use ferry_net::pki::SigningKey;
use ferry_store::Library;
use ferry_wire::pb;
use ferry_wire::prestage::{BundleError, BundleWriter};
use prost::Message;

use crate::distribution::records::Registry;
use crate::distribution::registry::HubError;
use crate::library::packages::{self, ImageError};

/// Why a bundle could not be made.
#[derive(Debug, thiserror::Error)]
pub enum PrestageError {
    /// No such DP.
    #[error(transparent)]
    Hub(#[from] HubError),
    /// No such package, or the library failed.
    #[error(transparent)]
    Package(#[from] ImageError),
    /// The library failed while reading chunks.
    #[error(transparent)]
    Store(#[from] ferry_store::StoreError),
    /// Writing the bundle failed (the reader went away).
    #[error(transparent)]
    Bundle(#[from] BundleError),
    /// The package has no revision.
    #[error("{0} has no revision to prestage")]
    NoRevision(String),
    /// The package's manifest is too large to sign into one frame.
    #[error("the manifest of {0} is above the protocol limit")]
    TooLarge(String),
}

/// What a bundle will hold.
#[derive(Debug)]
pub struct Plan {
    /// Its header.
    pub header: pb::PrestageHeader,
    /// The chunks, in the order of the revision's files.
    pub chunks: Vec<ChunkId>,
    /// Their bytes.
    pub chunk_bytes: u64,
}

/// Works out the bundle of `package` for DP `dp`: the revision it is to
/// hold (the released one), signed with `key`, and every chunk of it
/// (`full`) or those none of the DP's installed revisions holds.
pub fn plan(
    reg: &Registry,
    lib: &Library,
    key: &SigningKey,
    site_code: &str,
    package: &str,
    dp: &str,
    full: bool,
) -> Result<Plan, PrestageError> {
    let d = reg
        .dps
        .get(dp)
        .ok_or_else(|| HubError::NoDp(dp.to_string()))?;
    let rec = packages::record(lib, package)?;
    let revision = rec
        .target()
        .ok_or_else(|| PrestageError::NoRevision(package.to_string()))?;
    let manifests = lib.manifests(package, revision)?;
    let body = pb::ManifestBody {
        package: package.to_string(),
        revision,
        name: rec.name.clone(),
        files: manifests.iter().map(ferry_wire::file_to_wire).collect(),
    }
    .encode_to_vec();
    if body.len() + 1024 > ferry_wire::prestage::MAX_FRAME_BYTES {
        return Err(PrestageError::TooLarge(package.to_string()));
    }
    let have = if full {
        HashSet::new()
    } else {
        crate::distribution::status::held_chunks(reg, lib, dp)?
    };
    let mut seen = HashSet::new();
    let mut chunks = Vec::new();
    let mut chunk_bytes = 0u64;
    for c in manifests.iter().flat_map(|m| &m.chunks) {
        if !have.contains(&c.id) && seen.insert(c.id) {
            chunks.push(c.id);
            chunk_bytes += u64::from(c.len);
        }
    }
    let base_revision = d
        .transfers
        .get(package)
        .filter(|t| t.state.holds() && !full)
        .map_or(0, |t| t.revision);
    let signature = key.sign(&body);
    Ok(Plan {
        header: pb::PrestageHeader {
            site_code: site_code.to_string(),
            dp: dp.to_string(),
            package: package.to_string(),
            revision,
            manifest: Some(pb::SignedManifest {
                body: body.into(),
                signature: signature.into(),
                base_revision: 0,
            }),
            chunks: chunks.len() as u64,
            full,
            base_revision,
        },
        chunks,
        chunk_bytes,
    })
}

/// Writes the bundle `plan` describes to `out`, the chunks read from
/// `lib` (blocking).
pub fn write(lib: &Library, plan: &Plan, out: impl Write) -> Result<(), PrestageError> {
    let mut w = BundleWriter::new(out, &plan.header)?;
    for id in &plan.chunks {
        let data = lib.read_chunk(id)?;
        w.chunk(id, &data)?;
    }
    w.finish()?;
    Ok(())
}
