//! Importing a prestage bundle offline (`ferry dp prestage --data DIR
//! FILE`): the bundle is read through once and checked whole — every
//! chunk against its id, its end frame, the manifest against the site's
//! key this DP holds — before anything is written; then its chunks go into
//! a stage of the revision, recorded and synced as a transfer would. When
//! the site assigns the revision, the agent resumes that stage: what the
//! bundle brought is written, the rest is copied from the DP's own files,
//! and only what neither holds crosses the network.

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ferry_core::transfer::Slot;
use ferry_core::ChunkId;
use ferry_store::content::RevisionRecord;
use ferry_wire::pb;
use ferry_wire::prestage::BundleReader;
use serde::Serialize;

use crate::config::{self, DpConfig};
use crate::error::{Context as _, DpError, Result};

/// What an import did.
#[derive(Clone, Debug, Serialize)]
pub struct Imported {
    /// The package.
    pub package: String,
    /// Its revision.
    pub revision: u32,
    /// Chunks the bundle held.
    pub chunks: u64,
    /// Their bytes.
    pub chunk_bytes: u64,
    /// Places in the revision's files they filled (a chunk may appear in
    /// several).
    pub slots_written: u64,
    /// Places left: the DP copies them from its own files, or fetches
    /// them, when the site assigns the revision.
    pub slots_left: u64,
    /// The revision was installed already: nothing was written.
    pub already_installed: bool,
    /// The bundle.
    pub bundle: PathBuf,
}

fn open(bundle: &Path) -> Result<(BundleReader<BufReader<File>>, pb::PrestageHeader)> {
    let f = File::open(bundle).map_err(|e| DpError::io("open the bundle", bundle, e))?;
    BundleReader::open(BufReader::new(f))
        .map_err(|e| DpError::Usage(format!("{}: {e}", bundle.display())))
}

/// Imports `bundle` into the DP in `data` (the agent must not be running:
/// its index is locked while it runs).
pub fn import(data: &Path, bundle: &Path) -> Result<Imported> {
    let cfg = DpConfig::load(data)?;
    let key_path = data.join(config::MANIFEST_KEY_FILE);
    let key = std::fs::read_to_string(&key_path)
        .map_err(|e| DpError::io("read the manifest key", &key_path, e))
        .and_then(|k| {
            hex::decode(k.trim()).map_err(|e| {
                DpError::io(
                    "read the manifest key (not hex)",
                    &key_path,
                    std::io::Error::new(std::io::ErrorKind::InvalidData, e),
                )
            })
        })?;

    // First pass: the whole bundle checked, nothing written.
    let (mut reader, header) = open(bundle)?;
    if header.site_code != cfg.site_code {
        return Err(DpError::Usage(format!(
            "{}: the bundle is from site {}, this DP belongs to site {}: refused",
            bundle.display(),
            header.site_code,
            cfg.site_code
        )));
    }
    let a = pb::Assignment {
        package: header.package.clone(),
        revision: header.revision,
        ..pb::Assignment::default()
    };
    let signed = header
        .manifest
        .as_ref()
        .ok_or_else(|| DpError::Usage(format!("{}: the bundle has no manifest", bundle.display())))
        .and_then(|m| crate::manifest::verify(&key, &a, m, &[]))
        .with_context(|| format!("{}", bundle.display()))?;
    let (mut chunks, mut chunk_bytes) = (0u64, 0u64);
    while let Some((_, d)) = reader
        .next_chunk()
        .map_err(|e| DpError::Usage(format!("{}: {e}", bundle.display())))?
    {
        chunks += 1;
        chunk_bytes += d.len() as u64;
    }
    let mut out = Imported {
        package: header.package.clone(),
        revision: header.revision,
        chunks,
        chunk_bytes,
        slots_written: 0,
        slots_left: 0,
        already_installed: false,
        bundle: bundle.to_path_buf(),
    };
    let store = Arc::new(crate::open_store(data, &cfg)?);
    if store.installed_revision(&header.package)? == Some(header.revision) {
        out.already_installed = true;
        return Ok(out);
    }

    // Second pass: into the stage.
    let record = RevisionRecord {
        installed: false,
        name: signed.name.clone(),
        body: signed.body.clone(),
        signature: signed.signature.clone(),
    };
    let stage = store.stage(&header.package, header.revision, record, signed.manifests)?;
    let mut places: HashMap<ChunkId, Vec<(Slot, u64)>> = HashMap::new();
    for (file, m) in stage.manifests().iter().enumerate() {
        for (index, (offset, c)) in m.offsets().enumerate() {
            let slot = Slot {
                file: file as u32,
                index: index as u32,
            };
            places.entry(c.id).or_default().push((slot, offset));
        }
    }
    let total: u64 = places.values().map(|p| p.len() as u64).sum();
    let (mut reader, _) = open(bundle)?;
    let mut marks = ferry_store::content::Marks::default();
    while let Some((id, d)) = reader
        .next_chunk()
        .map_err(|e| DpError::Usage(format!("{}: {e}", bundle.display())))?
    {
        let Some(at) = places.get(&id) else {
            continue;
        };
        stage.write(at, &d)?;
        for (slot, _) in at {
            stage.mark(&mut marks, slot.file, slot.index, 1);
        }
        out.slots_written += at.len() as u64;
    }
    stage.record(marks)?;
    stage.checkpoint()?;
    out.slots_left = total - out.slots_written;
    Ok(out)
}
