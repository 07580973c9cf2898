//! Content validation: re-hash what the DP holds against the signed
//! manifests, refetch each damaged chunk alone and write it in place.
//!
//! The site asks with a request number in the assignments (on demand with
//! `ferry dp validate`, or on the DP's schedule); the DP answers each
//! number once, reporting `Validating` with progress, then the result per
//! package: what was checked, and every damaged chunk with its file,
//! offset and whether the repair worked.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ferry_core::ChunkId;
use ferry_store::ContentStore;
use ferry_wire::pb::{self, reply};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::chunks::{self, Incoming};
use crate::error::{Context as _, DpError, Failure, Result};
use crate::report;

/// Least time between two progress reports of a validation.
const REPORT_EVERY: Duration = Duration::from_millis(500);

/// Answers validation request `request` for `packages` (all when empty)
/// among those installed and still `wanted`.
pub(crate) async fn run(
    conn: &quinn::Connection,
    store: &Arc<ContentStore>,
    request: u64,
    packages: &[String],
    wanted: &BTreeMap<String, u32>,
    reports: &mpsc::UnboundedSender<pb::Report>,
    metrics: &crate::metrics::Metrics,
) -> Result<(), Failure> {
    let named = |p: &String| packages.is_empty() || packages.contains(p);
    let s = store.clone();
    let installed = match tokio::task::spawn_blocking(move || s.installed()).await {
        Ok(Ok(i)) => Ok(i),
        Ok(Err(e)) => Err(DpError::from(e)),
        Err(e) => Err(DpError::from(e)),
    }
    .inspect_err(|e| {
        // Each package named hears why; the whole request is retried.
        for (package, &revision) in wanted.iter().filter(|(p, _)| named(p)) {
            let _ = reports.send(could_not_run(package, revision, request, e));
        }
    })
    .context("cannot list the installed packages to validate")
    .map_err(Failure::Job)?;
    for (package, revision) in installed {
        if !named(&package) || wanted.get(&package) != Some(&revision) {
            continue;
        }
        let a = pb::Assignment {
            package: package.clone(),
            revision,
            ..pb::Assignment::default()
        };
        let result = one(conn, store, request, &a, reports, metrics).await;
        match result {
            Ok(v) => {
                let mut r = report::of(&a, pb::State::Installed);
                r.full_bytes = v.bytes_total;
                r.validation = Some(v);
                let _ = reports.send(r);
            }
            Err(f) if !f.is_retryable() => return Err(f),
            Err(f) => {
                let e = f.into_inner();
                warn!(%package, error = %e, "validation failed");
                let _ = reports.send(could_not_run(&package, revision, request, &e));
            }
        }
    }
    let s = store.clone();
    tokio::task::spawn_blocking(move || s.set_validated(request))
        .await
        .map_err(Failure::job)?
        .map_err(Failure::job)?;
    Ok(())
}

/// The result of a validation of `package` that could not run.
fn could_not_run(package: &str, revision: u32, request: u64, e: &DpError) -> pb::Report {
    let a = pb::Assignment {
        package: package.to_string(),
        revision,
        ..pb::Assignment::default()
    };
    pb::Report {
        validation: Some(pb::Validation {
            request,
            done: true,
            damaged: vec![pb::Damage {
                error: format!("validation could not run: {e}"),
                ..pb::Damage::default()
            }],
            ..pb::Validation::default()
        }),
        ..report::of(&a, pb::State::Installed)
    }
}

async fn one(
    conn: &quinn::Connection,
    store: &Arc<ContentStore>,
    request: u64,
    a: &pb::Assignment,
    reports: &mpsc::UnboundedSender<pb::Report>,
    metrics: &crate::metrics::Metrics,
) -> Result<pb::Validation, Failure> {
    let (s, p, rev) = (store.clone(), a.package.clone(), a.revision);
    let total: u64 = tokio::task::spawn_blocking(move || {
        s.manifests(&p, rev)
            .map(|ms| ms.iter().map(|m| m.size).sum::<u64>())
    })
    .await
    .map_err(Failure::job)?
    .unwrap_or(0);
    let progress = |checked: u64, chunks: u64| pb::Validation {
        request,
        bytes_checked: checked,
        chunks_checked: chunks,
        bytes_total: total,
        ..pb::Validation::default()
    };
    let mut r = report::of(a, pb::State::Validating);
    r.validation = Some(progress(0, 0));
    let _ = reports.send(r);
    info!(package = %a.package, revision = a.revision, bytes = total, "validating");

    let (s, p, tx, a2) = (store.clone(), a.package.clone(), reports.clone(), a.clone());
    let checked = tokio::task::spawn_blocking(move || {
        let (mut done, mut last) = (0u64, Instant::now());
        s.validate(&p, |n| {
            done += n;
            if last.elapsed() >= REPORT_EVERY {
                last = Instant::now();
                let mut r = report::of(&a2, pb::State::Validating);
                r.validation = Some(pb::Validation {
                    request,
                    bytes_checked: done,
                    bytes_total: total,
                    ..pb::Validation::default()
                });
                let _ = tx.send(r);
            }
        })
    })
    .await
    .map_err(Failure::job)?
    .map_err(Failure::job)?;
    let (revision, checked) = checked;
    let mut v = progress(checked.bytes, checked.chunks);
    v.done = true;
    if checked.damaged.is_empty() {
        info!(package = %a.package, bytes = checked.bytes, "validated: no damage");
        return Ok(v);
    }
    warn!(package = %a.package, damaged = checked.damaged.len(), "damaged chunks found; refetching them");
    let mut ids: Vec<ChunkId> = checked.damaged.iter().map(|d| d.id).collect();
    ids.sort();
    ids.dedup();
    let fetched = fetch_few(conn, &a.package, revision, &ids).await;
    let mut outcome: HashMap<ChunkId, Result<(), String>> = HashMap::new();
    match fetched {
        Ok(got) => {
            for (id, data) in got {
                let (s, p) = (store.clone(), a.package.clone());
                let r = tokio::task::spawn_blocking(move || s.repair(&p, &id, &data))
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|r| r.map(drop).map_err(|e| e.to_string()));
                outcome.insert(id, r);
            }
        }
        Err(e) => {
            if let Some(reason) = conn.close_reason() {
                return Err(Failure::lost(&reason));
            }
            for id in &ids {
                outcome.insert(*id, Err(format!("{e:#}")));
            }
        }
    }
    for d in &checked.damaged {
        let r = outcome
            .get(&d.id)
            .cloned()
            .unwrap_or_else(|| Err("the site did not send it".into()));
        match &r {
            Ok(()) => {
                info!(package = %a.package, path = %d.path, offset = d.offset, len = d.len, "repaired a damaged chunk")
            }
            Err(e) => {
                warn!(package = %a.package, path = %d.path, offset = d.offset, error = %e, "cannot repair a damaged chunk")
            }
        }
        metrics.damaged(r.is_ok());
        v.damaged.push(pb::Damage {
            path: d.path.clone(),
            offset: d.offset,
            len: d.len,
            chunk: Bytes::copy_from_slice(d.id.as_bytes()),
            repaired: r.is_ok(),
            error: r.err().unwrap_or_default(),
        });
    }
    Ok(v)
}

/// Fetches a few chunks of one revision on one chunk stream, each checked
/// against its id.
pub(crate) async fn fetch_few(
    conn: &quinn::Connection,
    package: &str,
    revision: u32,
    ids: &[ChunkId],
) -> Result<Vec<(ChunkId, Bytes)>> {
    let (mut ask, mut replies) = chunks::open(conn, package, revision, None).await?;
    ask.want(ids).await?;
    ask.finish();
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        let got = tokio::time::timeout(ferry_wire::REPLY_TIMEOUT, replies.next())
            .await
            .map_err(|_| {
                DpError::protocol(format!(
                    "the site sent nothing for {:?}",
                    ferry_wire::REPLY_TIMEOUT
                ))
            })??;
        match got {
            Some(Incoming::Chunk { id: got, data }) if got == *id => {
                if ChunkId::of(&data) != *id {
                    return Err(DpError::protocol(format!(
                        "chunk {id} from the site failed verification"
                    )));
                }
                out.push((*id, data));
            }
            Some(Incoming::Chunk { .. }) => {
                return Err(DpError::protocol(
                    "the site answered with a chunk not asked for",
                ))
            }
            Some(Incoming::Other(pb::Reply {
                kind: Some(reply::Kind::Error(e)),
            })) => {
                return Err(DpError::Refused {
                    what: format!("chunk {id}"),
                    message: e.message,
                })
            }
            _ => return Err(DpError::protocol("the chunk stream ended early")),
        }
    }
    Ok(out)
}
