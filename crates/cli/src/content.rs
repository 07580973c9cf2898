//! `ferry content …`: export files from the library and verify chunks.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Subcommand;
use ferry_site::api::{RefreshRequest, VerifyRequest, HASH_HEADER};
use ferry_site::library::catalog::PackageView;
use ferry_site::library::packages::VerifyReport;
use ferry_store::file::{Durability, Streamed};
use futures_util::StreamExt;
use reqwest::Method;

use crate::client::Client;
use crate::output::{bytes, emit, failed_with, table};
use crate::Global;

#[derive(Subcommand, Debug)]
pub(crate) enum ContentCmd {
    /// Rebuild a package's file from the library, byte for byte.
    Export {
        /// Package id.
        id: String,
        /// Where to write the file (replaced only once complete and
        /// verified), or an existing folder: every file of the package is
        /// written into it under its path in the package (without --path).
        #[arg(long)]
        out: PathBuf,
        /// Revision (default: the latest).
        #[arg(long)]
        revision: Option<u32>,
        /// The file inside the package (upgrade packages hold many; default:
        /// the first).
        #[arg(long)]
        path: Option<String>,
    },
    /// Write a prestage bundle for a DP: the revision it is to hold, with
    /// the site-signed manifest and the chunks none of its installed
    /// revisions holds (all of them with --full). Carried to the DP,
    /// `ferry dp prestage` imports it offline.
    Prestage {
        /// Package id.
        id: String,
        /// The DP the bundle is for.
        #[arg(long)]
        dp: String,
        /// Where to write the bundle (replaced only once complete and
        /// checked).
        #[arg(long)]
        out: PathBuf,
        /// Every chunk of the revision, not only those the DP lacks.
        #[arg(long)]
        full: bool,
    },
    /// Re-hash stored chunks and report damaged ones (all packages, or one).
    Verify {
        /// Package id; the whole library when omitted.
        id: Option<String>,
    },
    /// Re-read a package's source (or a new file or setup folder) into a new
    /// revision; every DP holding the package moves to it, receiving only
    /// what it lacks.
    Refresh {
        /// Package id.
        id: String,
        /// A new source file instead of the recorded one.
        #[arg(long)]
        source: Option<PathBuf>,
        /// Do not check every WIM resource against its SHA-1.
        #[arg(long)]
        no_verify: bool,
    },
}

pub(crate) async fn run(cmd: ContentCmd, g: &Global) -> anyhow::Result<()> {
    let client = Client::new(g)?;
    match cmd {
        ContentCmd::Export {
            id,
            out,
            revision,
            path,
        } => export(&client, g, &id, &out, revision, path.as_deref()).await,
        ContentCmd::Prestage { id, dp, out, full } => {
            let r = prestage(&client, &id, &dp, &out, full).await?;
            emit(g, &r, || {
                println!(
                    "{}: {} r{} for {}: {} chunks, {} ({} in the file), checked",
                    r.out.display(),
                    r.package,
                    r.revision,
                    r.dp,
                    r.chunks,
                    bytes(r.chunk_bytes),
                    bytes(r.file_bytes)
                );
            })
        }
        ContentCmd::Refresh {
            id,
            source,
            no_verify,
        } => {
            let source =
                match source {
                    Some(p) => Some(std::path::absolute(&p).with_context(|| {
                        format!("{}: cannot make the path absolute", p.display())
                    })?),
                    None => None,
                };
            let resp = client
                .send(
                    client
                        .request(Method::POST, &format!("/images/{id}/refresh"))
                        .json(&RefreshRequest { source, no_verify }),
                )
                .await?;
            crate::image::follow_import(resp, g, "refreshing").await
        }
        ContentCmd::Verify { id } => {
            let report: VerifyReport = client
                .json(
                    client
                        .request(Method::POST, "/content/verify")
                        .json(&VerifyRequest { id }),
                )
                .await?;
            let human = || {
                println!(
                    "checked {} chunks ({}) of {} package(s): {} damaged",
                    report.chunks,
                    bytes(report.bytes),
                    report.packages.len(),
                    report.damaged.len()
                );
                if !report.damaged.is_empty() {
                    let mut t = table(&["CHUNK", "PROBLEM", "USED BY"]);
                    for d in &report.damaged {
                        let used = if d.used_by.is_empty() {
                            "(unreferenced)".to_string()
                        } else {
                            d.used_by.join("\n")
                        };
                        t.add_row(vec![d.chunk.to_hex(), d.detail.clone(), used]);
                    }
                    println!("{t}");
                }
            };
            if report.damaged.is_empty() {
                return emit(g, &report, human);
            }
            Err(failed_with(
                g,
                &report,
                "damaged",
                format!("{} damaged chunk(s) in the library", report.damaged.len()),
                human,
            ))
        }
    }
}

async fn export(
    client: &Client,
    g: &Global,
    id: &str,
    out: &Path,
    revision: Option<u32>,
    path: Option<&str>,
) -> anyhow::Result<()> {
    if path.is_some() || !out.is_dir() {
        let (size, hash) = export_file(client, id, out, revision, path).await?;
        return emit(
            g,
            &serde_json::json!({ "id": id, "path": out, "size": size, "blake3": hash }),
            || println!("wrote {} ({}, blake3 {hash})", out.display(), bytes(size)),
        );
    }
    // Into a folder: every file of the revision under its own path.
    let view: PackageView = client
        .json(client.request(Method::GET, &format!("/images/{id}")))
        .await?;
    let rev = match revision {
        Some(n) => view.record.revision(n),
        None => view.record.latest(),
    }
    .with_context(|| {
        format!(
            "package {id} has no revision {}",
            revision.map_or("at all".to_string(), |n| n.to_string())
        )
    })?;
    let mut written = Vec::new();
    for f in &rev.files {
        let rel = ferry_core::manifest::check_rel_path(&f.path)
            .map(|()| f.path.clone())
            .map_err(|e| {
                anyhow::anyhow!("{id} names a file {:?} that cannot be written: {e}", f.path)
            })?;
        let dest = out.join(&rel);
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        let (size, hash) =
            export_file(client, id, &dest, Some(rev.revision), Some(&f.path)).await?;
        written.push(serde_json::json!({ "path": dest, "size": size, "blake3": hash }));
    }
    emit(
        g,
        &serde_json::json!({ "id": id, "revision": rev.revision, "files": written }),
        || {
            println!(
                "wrote {} file(s) of {id} revision {} into {} ({})",
                rev.files.len(),
                rev.revision,
                out.display(),
                bytes(rev.files.iter().map(|f| f.size).sum())
            )
        },
    )
}

/// What `ferry content prestage` wrote.
#[derive(Debug, serde::Serialize)]
struct PrestageReport {
    package: String,
    revision: u32,
    dp: String,
    full: bool,
    chunks: u64,
    chunk_bytes: u64,
    file_bytes: u64,
    out: PathBuf,
}

/// Streams the site's bundle into `out`'s part file, reads it back through
/// the bundle reader (every chunk and the end checked), then puts it in
/// place.
async fn prestage(
    client: &Client,
    id: &str,
    dp: &str,
    out: &Path,
    full: bool,
) -> anyhow::Result<PrestageReport> {
    let req = client
        .request(Method::GET, &format!("/content/{id}/prestage"))
        .query(&ferry_site::api::PrestageQuery {
            dp: dp.to_string(),
            full,
        });
    let resp = client.send(req).await?;
    let number = |h: &str| -> u64 {
        resp.headers()
            .get(h)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let chunk_bytes = number(ferry_site::api::PRESTAGE_BYTES_HEADER);
    let part = ferry_store::file::part_path(out);
    let mut file = std::io::BufWriter::new(
        std::fs::File::create(&part)
            .with_context(|| format!("cannot create {}", part.display()))?,
    );
    let mut stream = resp.bytes_stream();
    let mut written = 0u64;
    let result: anyhow::Result<()> = async {
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.with_context(|| {
                format!("the bundle stopped at byte {written}: the site log says why")
            })?;
            std::io::Write::write_all(&mut file, &chunk)
                .with_context(|| format!("cannot write {}", part.display()))?;
            written += chunk.len() as u64;
        }
        Ok(())
    }
    .await;
    let checked = result.and_then(|()| {
        let file = file
            .into_inner()
            .map_err(|e| anyhow::anyhow!("cannot write {}: {}", part.display(), e.error()))?;
        let (header, chunks) = check_bundle(&part)?;
        ferry_store::file::place(&file, &part, out)?;
        Ok((header, chunks))
    });
    let (header, chunks) = match checked {
        Ok(h) => h,
        Err(e) => {
            let _ = std::fs::remove_file(&part);
            return Err(e);
        }
    };
    Ok(PrestageReport {
        package: header.package,
        revision: header.revision,
        dp: header.dp,
        full: header.full,
        chunks,
        chunk_bytes,
        file_bytes: written,
        out: out.to_path_buf(),
    })
}

/// Reads a bundle through, checking every chunk and its end; its header
/// and chunk count.
pub(crate) fn check_bundle(path: &Path) -> anyhow::Result<(ferry_wire::pb::PrestageHeader, u64)> {
    let f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let (mut r, header) = ferry_wire::prestage::BundleReader::open(std::io::BufReader::new(f))
        .with_context(|| path.display().to_string())?;
    let mut n = 0u64;
    while r
        .next_chunk()
        .with_context(|| path.display().to_string())?
        .is_some()
    {
        n += 1;
    }
    Ok((header, n))
}

/// Writes one file of a package to `out`; returns its size and BLAKE3.
async fn export_file(
    client: &Client,
    id: &str,
    out: &Path,
    revision: Option<u32>,
    path: Option<&str>,
) -> anyhow::Result<(u64, String)> {
    let mut req = client.request(Method::GET, &format!("/content/{id}/file"));
    if let Some(r) = revision {
        req = req.query(&[("revision", r)]);
    }
    if let Some(p) = path {
        req = req.query(&[("path", p)]);
    }
    let resp = client.send(req).await?;
    let expected = resp
        .headers()
        .get(HASH_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .context("the site sent no file hash")?;
    let expected: ferry_core::FileHash = expected
        .parse()
        .map_err(|e| anyhow::anyhow!("the site sent a malformed file hash {expected:?}: {e}"))?;
    let size = resp.content_length().unwrap_or(0);
    let mut file = Streamed::create(out, size)?;
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let written = file.written();
        let chunk = chunk.with_context(|| {
            format!("the transfer of {id} stopped at byte {written} of {size}; `ferry content verify {id}` checks the library")
        })?;
        file.write(&chunk)?;
    }
    let written = file.written();
    file.finish::<std::convert::Infallible>(size, expected, Durability::Synced)
        .with_context(|| format!("{} was left as it was", out.display()))?;
    Ok((written, expected.to_hex()))
}
