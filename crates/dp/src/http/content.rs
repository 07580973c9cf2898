//! The content routes: a package's index and its files, with ranges and
//! validators.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Path as UrlPath, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use headers::{ETag, HeaderMapExt, IfMatch, IfNoneMatch, IfRange};
use serde::{Deserialize, Serialize};

use crate::ranges::{self, Plan};
use crate::served::{error, installed, internal, Shared};

/// Bytes read from disk per step of a response body.
const READ_BLOCK: usize = 256 * 1024;

/// What `GET /content/{package}/` answers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackageIndex {
    /// The package id.
    pub package: String,
    /// The installed revision.
    pub revision: u32,
    /// The package's name at the site.
    pub name: String,
    /// Its files.
    pub files: Vec<IndexFile>,
    /// The site-signed manifest body (protobuf `ManifestBody`, full form),
    /// base64.
    pub manifest: String,
    /// Ed25519 signature over it, hex.
    pub signature: String,
    /// The site's public manifest key, hex.
    pub manifest_key: String,
}

/// One file of a [`PackageIndex`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexFile {
    /// Path inside the package.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// BLAKE3 of the whole file, hex (its ETag, quoted).
    pub blake3: String,
}

pub(super) async fn index(
    State(sh): State<Arc<Shared>>,
    UrlPath(package): UrlPath<String>,
) -> Response {
    let inst = match installed(&sh, &package).await {
        Ok(x) => x,
        Err(r) => return r.into_response(),
    };
    let store = match sh.store() {
        Ok(s) => s,
        Err(r) => return r.into_response(),
    };
    let (p, rev) = (package.clone(), inst.revision);
    let rec = match tokio::task::spawn_blocking(move || store.record(&p, rev)).await {
        Ok(Ok(Some(rec))) => rec,
        Ok(Ok(None)) => {
            return error(
                StatusCode::NOT_FOUND,
                format!("this DP holds no package {package:?}"),
            )
        }
        Ok(Err(e)) => return internal(e).into_response(),
        Err(e) => return internal(e).into_response(),
    };
    // Pin the revision: a download of it finishes on it.
    for f in &inst.files {
        let _ = sh.pin(&package, &f.path, &f.etag, &inst.dir.join(&f.path), f.size);
    }
    Json(PackageIndex {
        package: package.clone(),
        revision: inst.revision,
        name: rec.name,
        files: inst
            .files
            .iter()
            .map(|f| IndexFile {
                path: f.path.clone(),
                size: f.size,
                blake3: f.etag.trim_matches('"').to_string(),
            })
            .collect(),
        manifest: base64::engine::general_purpose::STANDARD.encode(&rec.body),
        signature: hex::encode(&rec.signature),
        manifest_key: sh.manifest_key.clone(),
    })
    .into_response()
}

/// What a request's validators choose: the current file or a pinned one.
enum Choice {
    Current,
    Pinned(String, Arc<File>, u64),
    /// `If-Match` names nothing this DP can serve.
    Failed,
}

/// An ETag of ours as the `headers` crate compares them.
fn tag(etag: &str) -> Option<ETag> {
    etag.parse().ok()
}

/// Whether `etag` satisfies the request's validators: `If-Match` by the
/// strong comparison (RFC 9110 13.1.1: a weak `W/"…"` never matches), else
/// an `If-Range` entity tag (strong too). No validator: any does.
fn satisfies(headers: &HeaderMap, etag: &str) -> bool {
    let Some(etag) = tag(etag) else {
        return false;
    };
    if headers.contains_key(header::IF_MATCH) {
        // Present but unreadable: nothing satisfies it.
        return headers
            .typed_get::<IfMatch>()
            .is_some_and(|m| m.precondition_passes(&etag));
    }
    headers
        .typed_get::<IfRange>()
        .is_none_or(|r| !r.is_modified(Some(&etag), None))
}

fn choose(
    sh: &Shared,
    headers: &HeaderMap,
    package: &str,
    path: &str,
    current: Option<&str>,
) -> Choice {
    if !headers.contains_key(header::IF_MATCH) && !headers.contains_key(header::IF_RANGE) {
        return Choice::Current;
    }
    if current.is_some_and(|c| satisfies(headers, c)) {
        return Choice::Current;
    }
    for (e, f, size) in sh.pinned_versions(package, path) {
        if satisfies(headers, &e) {
            return Choice::Pinned(e, f, size);
        }
    }
    if headers.contains_key(header::IF_MATCH) {
        Choice::Failed
    } else {
        // An If-Range that matches nothing: the whole current file.
        Choice::Current
    }
}

pub(super) async fn file(
    State(sh): State<Arc<Shared>>,
    UrlPath((package, path)): UrlPath<(String, String)>,
    method: Method,
    headers: HeaderMap,
) -> Response {
    if sh.gate.multicast_only(&package) {
        return error(
            StatusCode::FORBIDDEN,
            format!("package {package} is sent by multicast only: join a multicast session of this DP instead of downloading it over HTTPS"),
        );
    }
    let inst = installed(&sh, &package).await;
    let current = inst
        .as_ref()
        .ok()
        .and_then(|i| i.file(&path).map(|f| (f, &i.dir)));
    let current_tag = current.map(|(f, _)| f.etag.clone());
    let (etag, handle, size) = match choose(&sh, &headers, &package, &path, current_tag.as_deref()) {
        Choice::Pinned(e, f, size) => (e, f, size),
        Choice::Failed => {
            return error(
                StatusCode::PRECONDITION_FAILED,
                "the version asked for (If-Match) is no longer on this DP: read the package index again",
            )
        }
        Choice::Current => {
            let Some((f, dir)) = current else {
                return match inst {
                    Err(r) => r.into_response(),
                    Ok(_) => error(
                        StatusCode::NOT_FOUND,
                        format!("package {package:?} has no file {path:?}"),
                    ),
                };
            };
            match sh.pin(&package, &f.path, &f.etag, &dir.join(&f.path), f.size) {
                Ok(handle) => (f.etag.clone(), handle, f.size),
                Err(e) => {
                    return error(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        format!("cannot open {path}: {e}"),
                    )
                }
            }
        }
    };
    let text = |h: header::HeaderName| headers.get(h).and_then(|v| v.to_str().ok());
    let mut resp = Response::builder()
        .header(header::ETAG, &etag)
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::CACHE_CONTROL, "no-cache");
    // If-None-Match compares weakly (RFC 9110 13.1.2).
    let unchanged = headers
        .typed_get::<IfNoneMatch>()
        .zip(tag(&etag))
        .is_some_and(|(m, e)| !m.precondition_passes(&e));
    if unchanged {
        return resp
            .status(StatusCode::NOT_MODIFIED)
            .body(Body::empty())
            .unwrap_or_default();
    }
    // If-Range that names another version: the whole file.
    let if_range_ok = !headers.contains_key(header::IF_RANGE)
        || headers
            .typed_get::<IfRange>()
            .zip(tag(&etag))
            .is_some_and(|(r, e)| !r.is_modified(Some(&e), None));
    let plan = match text(header::RANGE) {
        Some(r) if if_range_ok => ranges::plan(r, size),
        _ => Plan::Whole,
    };
    let head = method == Method::HEAD;
    let (status, len, segments) = match plan {
        Plan::Unsatisfiable => {
            return resp
                .status(StatusCode::RANGE_NOT_SATISFIABLE)
                .header(header::CONTENT_RANGE, format!("bytes */{size}"))
                .body(Body::empty())
                .unwrap_or_default()
        }
        Plan::Whole => {
            resp = resp.header(header::CONTENT_TYPE, "application/octet-stream");
            (StatusCode::OK, size, vec![Segment::File(0, size)])
        }
        Plan::Parts(parts) if parts.len() == 1 => {
            let (a, b) = parts[0];
            resp = resp
                .header(header::CONTENT_TYPE, "application/octet-stream")
                .header(header::CONTENT_RANGE, ranges::content_range(a, b, size));
            (
                StatusCode::PARTIAL_CONTENT,
                b - a + 1,
                vec![Segment::File(a, b - a + 1)],
            )
        }
        Plan::Parts(parts) => {
            let boundary = format!("ferry-{:016x}", rand::random::<u64>());
            let len = ranges::multipart_len(&boundary, &parts, size);
            let mut segs = Vec::new();
            for &(a, b) in &parts {
                segs.push(Segment::Text(ranges::part_head(&boundary, a, b, size)));
                segs.push(Segment::File(a, b - a + 1));
            }
            segs.push(Segment::Text(ranges::closing(&boundary)));
            resp = resp.header(
                header::CONTENT_TYPE,
                format!("multipart/byteranges; boundary={boundary}"),
            );
            (StatusCode::PARTIAL_CONTENT, len, segs)
        }
    };
    let body = if head {
        Body::empty()
    } else {
        stream(handle, segments)
    };
    resp.status(status)
        .header(header::CONTENT_LENGTH, len)
        .body(body)
        .unwrap_or_default()
}

enum Segment {
    Text(String),
    /// Offset and length in the file.
    File(u64, u64),
}

/// A body read from `file` off the async threads, a block at a time.
fn stream(file: Arc<File>, segments: Vec<Segment>) -> Body {
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(4);
    tokio::task::spawn_blocking(move || {
        for seg in segments {
            match seg {
                Segment::Text(t) => {
                    if tx.blocking_send(Ok(Bytes::from(t))).is_err() {
                        return;
                    }
                }
                Segment::File(mut off, len) => {
                    let end = off + len;
                    while off < end {
                        let n = READ_BLOCK.min((end - off) as usize);
                        let mut buf = vec![0u8; n];
                        let r = file.read_exact_at(&mut buf, off).map(|()| Bytes::from(buf));
                        let failed = r.is_err();
                        if tx.blocking_send(r).is_err() || failed {
                            return;
                        }
                        off += n as u64;
                    }
                }
            }
        }
    });
    Body::from_stream(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|x| (x, rx))
    }))
}
