//! The operator API: JSON over HTTP, every route behind the operator token.
//!
//! | method | path | body / answer |
//! |---|---|---|
//! | GET | `/healthz` | `ok` (no token needed) |
//! | GET | `/api/v1/images` | `[PackageSummary]` |
//! | POST | `/api/v1/images` | `ImportRequest` → NDJSON `ImportEvent`s |
//! | GET | `/api/v1/images/{id}` | `PackageView` |
//! | DELETE | `/api/v1/images/{id}` | `RemoveView` |
//! | GET | `/api/v1/content/{id}/file?revision=&path=` | the file's bytes; `x-ferry-blake3` header |
//! | POST | `/api/v1/content/verify` | `VerifyRequest` → `VerifyReport` |
//! | POST | `/api/v1/images/{id}/refresh` | `RefreshRequest` → NDJSON `ImportEvent`s (new revision) |
//! | GET | `/api/v1/dps` | `[DpView]` |
//! | POST | `/api/v1/dps` | `AddDpRequest` → `AddDpReply` (one-time token) |
//! | POST | `/api/v1/dps/{name}/revoke` | `{}` |
//! | POST | `/api/v1/dps/{name}/validate` | `ValidateRequest` → `ValidateReply` |
//! | GET | `/api/v1/dps/{name}/validation` | `ValidationView` |
//! | POST | `/api/v1/dps/{name}/settings` | `DpSettings` → `ValidationView` |
//! | POST | `/api/v1/dps/{name}/multicast` | `MulticastChange` → `DpMulticast` |
//! | GET | `/api/v1/groups` | `{name: GroupRecord}` |
//! | POST | `/api/v1/groups` | `GroupRequest` |
//! | POST | `/api/v1/groups/{name}/members` | `MembersRequest` |
//! | POST | `/api/v1/groups/{name}/members/remove` | `MembersRequest` |
//! | DELETE | `/api/v1/groups/{name}` | |
//! | POST | `/api/v1/distribute` | `DistributeRequest` → `DistributeReply` |
//! | POST | `/api/v1/undistribute` | `DistributeRequest` |
//! | GET | `/api/v1/status?package=&dp=` | `[StatusRow]` |
//! | GET | `/api/v1/updates` | `[UpdateRecord]` |
//! | POST | `/api/v1/updates` | `UpdateImportRequest` → `UpdateRecord` |
//! | GET | `/api/v1/updates/{id}` | `UpdateRecord` |
//! | GET | `/api/v1/images/{id}/updates` | `UpdatesView` |
//! | GET | `/api/v1/images/{id}/history` | `HistoryView` |
//! | POST | `/api/v1/images/{id}/service` | `ServiceRequest` → `JobRecord` |
//! | GET | `/api/v1/jobs?package=` | `[JobRecord]` |
//! | GET | `/api/v1/jobs/{n}` | `JobRecord` |
//! | POST | `/api/v1/jobs/{n}/cancel` | `JobRecord` |
//! | POST | `/api/v1/upgrades` | `UpgradeRequest` → NDJSON `ImportEvent`s |
//! | PATCH | `/api/v1/images/{id}` | `Properties` → `PackageRecord` |
//! | GET | `/api/v1/images/{id}/revisions` | `RevisionsView` |
//! | POST | `/api/v1/images/{id}/multicast` | `MulticastSettings` → `PackageRecord` |
//! | POST | `/api/v1/images/{id}/rollback` | `RollbackRequest` → `RevisionsView` |
//! | DELETE | `/api/v1/dps/{name}?force=` | `{}` |
//! | POST | `/api/v1/redistribute` | `DistributeRequest` |
//! | DELETE | `/api/v1/updates/{id}` | `{}` |
//! | GET | `/api/v1/client-tokens` | `[ClientTokenView]` |
//! | POST | `/api/v1/client-tokens` | `ClientTokenRequest` → `IssuedToken` (shown once) |
//! | POST | `/api/v1/client-tokens/{name}/revoke` | `{}` |
//!
//! Errors answer `{"error": "..."}` with 4xx for bad input, 5xx for site
//! failures. Bodies over [`MAX_REQUEST_BYTES`] are answered 413, request
//! targets over [`MAX_URI_BYTES`] 414. The status page (`/ui/`,
//! [`crate::web`]) shares the listener.

use std::path::PathBuf;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use ferry_store::Library;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::sync::mpsc;

use crate::distribution::prestage::{self, PrestageError};
use crate::distribution::registry::{Hub, HubError};
use crate::distribution::status;
use crate::distribution::validation;
use crate::library::catalog::PackageView;
use crate::library::packages::{self, ImageError, ImportRequest, Progress};
use crate::library::upgrade::UpgradeRequest;
use crate::servicing::jobs::{JobError, Jobs, ServiceRequest};
use crate::servicing::updates::UpdateError;

pub use ferry_api::requests::{
    AddDpRequest, ClientTokenRequest, DistributeRequest, FileQuery, GroupRequest, JobsQuery,
    MembersRequest, PrestageQuery, RefreshRequest, RemoveDpQuery, RollbackRequest, StatusQuery,
    UpdateImportRequest, VerifyRequest,
};

/// Header carrying the exported file's whole-file BLAKE3.
pub const HASH_HEADER: &str = "x-ferry-blake3";
/// Header carrying the exported file's path inside the package.
pub const PATH_HEADER: &str = "x-ferry-path";
/// Largest request body accepted (JSON requests are small).
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// Longest request target (path and query) accepted on the operator
/// listener; longer ones are answered 414.
pub const MAX_URI_BYTES: usize = 4096;

/// One line of the import response stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum ImportEvent {
    /// Bytes processed so far.
    Progress(Progress),
    /// The package was added.
    Done {
        /// The new package.
        package: Box<PackageView>,
    },
    /// The import failed; nothing was added.
    Failed {
        /// What went wrong, for the operator.
        error: String,
    },
}

/// Answer of `POST /api/v1/dps`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddDpReply {
    /// The DP's name.
    pub name: String,
    /// The one-time enrollment token for `ferry dp init --token`.
    pub token: String,
    /// The site's DP endpoint for `ferry dp init --site` (HOST:PORT).
    pub site: String,
}

/// Answer of `POST /api/v1/distribute`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DistributeReply {
    /// The package.
    pub package: String,
    /// Its latest revision, which the DPs will hold.
    pub revision: u32,
    /// Whether anything was assigned (false for a dry run).
    pub assigned: bool,
    /// Cost per DP reached (groups expanded), computed before assigning.
    pub needs: Vec<status::Need>,
}

/// What handlers share.
#[derive(Clone)]
pub struct ApiState {
    /// What the site knows of its DPs.
    pub hub: Arc<Hub>,
    /// The DPs connected now (the QUIC endpoint's).
    pub conns: Arc<crate::distribution::live::Connections>,
    /// The content library.
    pub lib: Arc<Library>,
    /// The site's data folder.
    pub data: PathBuf,
    /// Site code for new package ids.
    pub site_code: String,
    /// BLAKE3 of the operator token (compared in constant time).
    pub token_hash: blake3::Hash,
    /// Servicing jobs.
    pub jobs: Arc<Jobs>,
    /// Where the QUIC endpoint for DPs listens.
    pub dp_listen: std::net::SocketAddr,
    /// The site's `keep_revisions`.
    pub keep_revisions: u32,
    /// The manifest signing key, which signs client tokens.
    pub signing_key: Arc<ferry_net::pki::SigningKey>,
    /// What `/metrics` counts as it happens.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// The status page's logged-in browsers.
    pub sessions: Arc<crate::web::Sessions>,
    /// Whether the operator listener speaks HTTPS (session cookies are
    /// then `Secure`).
    pub https: bool,
}

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(serde_json::json!({ "error": self.message, "code": error_code(self.status) })),
        )
            .into_response()
    }
}

/// The stable word for an error answer's status, for scripts (`code` beside
/// `error`).
pub fn error_code(status: StatusCode) -> &'static str {
    match status {
        StatusCode::NOT_FOUND => "not-found",
        StatusCode::CONFLICT => "conflict",
        StatusCode::UNPROCESSABLE_ENTITY | StatusCode::BAD_REQUEST => "invalid",
        StatusCode::UNAUTHORIZED => "unauthorized",
        StatusCode::PAYLOAD_TOO_LARGE | StatusCode::URI_TOO_LONG => "too-large",
        s if s.is_server_error() => "site-failure",
        _ => "error",
    }
}

impl ApiError {
    /// An answer with `status` and `e`'s text; site failures are logged.
    fn logged(status: StatusCode, e: &dyn std::fmt::Display) -> Self {
        if status.is_server_error() {
            tracing::error!(error = %e, "request failed");
        }
        Self {
            status,
            message: e.to_string(),
        }
    }
}

impl From<ImageError> for ApiError {
    fn from(e: ImageError) -> Self {
        let status = match &e {
            ImageError::NoPackage(_) | ImageError::NoRevision { .. } | ImageError::NoFile(_) => {
                StatusCode::NOT_FOUND
            }
            e if e.is_input() => StatusCode::UNPROCESSABLE_ENTITY,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self::logged(status, &e)
    }
}

impl From<HubError> for ApiError {
    fn from(e: HubError) -> Self {
        let status = match &e {
            HubError::NoDp(_) | HubError::NoGroup(_) | HubError::NoClientToken(_) => {
                StatusCode::NOT_FOUND
            }
            HubError::Exists { .. } | HubError::Conflict(_) => StatusCode::CONFLICT,
            HubError::BadName(_) | HubError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            HubError::Storage { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self::logged(status, &e)
    }
}

impl From<PrestageError> for ApiError {
    fn from(e: PrestageError) -> Self {
        match e {
            PrestageError::Hub(e) => e.into(),
            PrestageError::Package(e) => e.into(),
            PrestageError::NoRevision(_) => Self::logged(StatusCode::NOT_FOUND, &e),
            _ => Self::logged(StatusCode::INTERNAL_SERVER_ERROR, &e),
        }
    }
}

impl From<UpdateError> for ApiError {
    fn from(e: UpdateError) -> Self {
        let status = match &e {
            UpdateError::Unknown(_) => StatusCode::NOT_FOUND,
            UpdateError::Exists { .. } => StatusCode::CONFLICT,
            e if e.is_input() => StatusCode::UNPROCESSABLE_ENTITY,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self::logged(status, &e)
    }
}

impl From<JobError> for ApiError {
    fn from(e: JobError) -> Self {
        let status = match &e {
            JobError::NoJob(_) => StatusCode::NOT_FOUND,
            JobError::Started { .. } => StatusCode::CONFLICT,
            JobError::Bad(_) => StatusCode::UNPROCESSABLE_ENTITY,
            JobError::Storage { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self::logged(status, &e)
    }
}

/// A refusal caused by the operator's input.
fn unprocessable(message: String) -> ApiError {
    ApiError {
        status: StatusCode::UNPROCESSABLE_ENTITY,
        message,
    }
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        message: e.to_string(),
    }
}

/// Runs blocking library work off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ImageError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(internal)?
        .map_err(ApiError::from)
}

/// The router for the operator API.
pub fn router(state: ApiState) -> Router {
    let api = Router::new()
        .route("/images", get(list_images).post(add_image))
        .route(
            "/images/{id}",
            get(show_image).delete(remove_image).patch(set_properties),
        )
        .route("/content/{id}/file", get(export_file))
        .route("/content/{id}/prestage", get(prestage_bundle))
        .route("/content/verify", post(verify))
        .route("/images/{id}/refresh", post(refresh_image))
        .route("/images/{id}/rollback", post(rollback_image))
        .route("/images/{id}/revisions", get(image_revisions))
        .route("/images/{id}/multicast", post(set_multicast))
        .route("/dps", get(list_dps).post(add_dp))
        .route("/dps/{name}", delete(remove_dp))
        .route("/dps/{name}/revoke", post(revoke_dp))
        .route("/dps/{name}/validate", post(validate_dp))
        .route("/dps/{name}/validation", get(dp_validation))
        .route("/dps/{name}/settings", post(dp_settings))
        .route("/dps/{name}/multicast", post(dp_multicast))
        .route("/groups", get(list_groups).post(create_group))
        .route("/groups/{name}", delete(delete_group))
        .route("/groups/{name}/members", post(add_members))
        .route("/groups/{name}/members/remove", post(remove_members))
        .route("/distribute", post(distribute))
        .route("/undistribute", post(undistribute))
        .route("/redistribute", post(redistribute))
        .route("/status", get(status_rows))
        .route("/updates", get(list_updates).post(import_update))
        .route("/updates/{id}", get(show_update).delete(remove_update))
        .route("/images/{id}/updates", get(image_updates))
        .route("/images/{id}/history", get(image_history))
        .route("/images/{id}/service", post(service_image))
        .route("/jobs", get(list_jobs))
        .route("/jobs/{n}", get(show_job))
        .route("/jobs/{n}/cancel", post(cancel_job))
        .route("/upgrades", post(add_upgrade))
        .route(
            "/client-tokens",
            get(list_client_tokens).post(create_client_token),
        )
        .route("/client-tokens/{name}/revoke", post(revoke_client_token))
        .layer(middleware::from_fn_with_state(state.clone(), authenticate))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_REQUEST_BYTES));
    // Prometheus scrapes with the operator token too
    // (`authorization: credentials_file:` in its scrape config).
    let metrics = Router::new()
        .route("/metrics", get(metrics))
        .layer(middleware::from_fn_with_state(state.clone(), authenticate));
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .merge(metrics)
        .merge(crate::web::router(state.clone()))
        .nest("/api/v1", api)
        .with_state(state)
        .layer(middleware::from_fn(limit_uri))
}

/// Refuses request targets longer than [`MAX_URI_BYTES`] before any route
/// sees them.
async fn limit_uri(req: Request, next: Next) -> Response {
    let n = req.uri().path_and_query().map_or(0, |p| p.as_str().len());
    if n > MAX_URI_BYTES {
        tracing::warn!(bytes = n, "operator request refused: path too long");
        return ApiError {
            status: StatusCode::URI_TOO_LONG,
            message: format!("the request's path and query are {n} bytes: at most {MAX_URI_BYTES}"),
        }
        .into_response();
    }
    next.run(req).await
}

async fn authenticate(
    State(state): State<ApiState>,
    headers: HeaderMap,
    req: Request,
    next: Next,
) -> Response {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    // blake3::Hash compares in constant time.
    match given {
        Some(t) if blake3::hash(t.trim().as_bytes()) == state.token_hash => next.run(req).await,
        _ => {
            tracing::warn!(path = %req.uri().path(), "operator request refused: missing or wrong token");
            ApiError {
                status: StatusCode::UNAUTHORIZED,
                message:
                    "operator token missing or wrong (see operator.token in the site's data folder)"
                        .into(),
            }
            .into_response()
        }
    }
}

/// `GET /metrics`: the site's Prometheus metrics ([`crate::metrics`]).
async fn metrics(State(s): State<ApiState>, headers: HeaderMap) -> Result<Response, ApiError> {
    let (hub, conns, lib, jobs) = (
        s.hub.clone(),
        s.conns.clone(),
        s.lib.clone(),
        s.jobs.clone(),
    );
    let now = blocking(move || {
        Ok(crate::metrics::Snapshot {
            rows: status::rows(&hub, &conns, &lib, None, None)?,
            dps: status::dps(&hub, &conns),
            jobs: jobs.list(None),
        })
    })
    .await?;
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let (kind, text) = s.metrics.encode(now, accept).map_err(internal)?;
    Ok(([(header::CONTENT_TYPE, kind)], text).into_response())
}

async fn list_images(State(s): State<ApiState>) -> Result<Response, ApiError> {
    let lib = s.lib.clone();
    Ok(Json(blocking(move || packages::list(&lib)).await?).into_response())
}

async fn show_image(
    State(s): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let lib = s.lib.clone();
    Ok(Json(blocking(move || packages::show(&lib, &id)).await?).into_response())
}

async fn set_properties(
    State(s): State<ApiState>,
    Path(id): Path<String>,
    Json(p): Json<packages::Properties>,
) -> Result<Response, ApiError> {
    let lib = s.lib.clone();
    let rec = blocking(move || packages::set_properties(&lib, &id, &p)).await?;
    tracing::info!(package = %rec.id, "package properties changed");
    Ok(Json(rec).into_response())
}

async fn set_multicast(
    State(s): State<ApiState>,
    Path(id): Path<String>,
    Json(m): Json<crate::library::catalog::MulticastSettings>,
) -> Result<Response, ApiError> {
    let lib = s.lib.clone();
    let rec = blocking(move || packages::set_multicast(&lib, &id, m)).await?;
    tracing::info!(package = %rec.id, allow = m.allow, encrypt = m.encrypt, only = m.only, "multicast settings changed");
    // DPs learn which packages they must not serve over HTTPS.
    s.hub.notify();
    Ok(Json(rec).into_response())
}

async fn rollback_image(
    State(s): State<ApiState>,
    Path(id): Path<String>,
    Json(r): Json<RollbackRequest>,
) -> Result<Response, ApiError> {
    let lib = s.lib.clone();
    let rec = blocking(move || packages::rollback(&lib, &id, r.to)).await?;
    tracing::warn!(package = %rec.id, revision = r.to, "revision released by rollback");
    s.hub.notify();
    let view = revisions_view(&s, rec);
    Ok(Json(view).into_response())
}

/// One revision as `ferry image revisions` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevisionRow {
    /// Its number.
    pub revision: u32,
    /// When it was made (RFC 3339).
    #[serde(with = "time::serde::rfc3339")]
    pub created: OffsetDateTime,
    /// Where it came from (a path, or the job that serviced it).
    pub source: String,
    /// Bytes of its files.
    pub size: u64,
    /// Bytes it stored that the library did not hold.
    pub new_bytes: u64,
    /// Its WIM resources were checked against their SHA-1 at import.
    pub verified: bool,
    /// The revision DPs receive.
    pub released: bool,
    /// The newest.
    pub latest: bool,
    /// DPs that hold it installed.
    pub installed_on: Vec<String>,
}

/// Answer of `GET /api/v1/images/{id}/revisions` and of a rollback.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevisionsView {
    /// Package id.
    pub package: String,
    /// Revisions kept (the package's `--keep`, or the site's).
    pub keep: u32,
    /// Every kept revision, oldest first.
    pub revisions: Vec<RevisionRow>,
}

pub(crate) fn revisions_view(
    s: &ApiState,
    rec: crate::library::catalog::PackageRecord,
) -> RevisionsView {
    let reg = s.hub.snapshot();
    let (target, latest) = (rec.target(), rec.latest().map(|r| r.revision));
    let revisions = rec
        .revisions
        .iter()
        .map(|r| RevisionRow {
            revision: r.revision,
            created: r.created,
            source: r.source.path.clone(),
            size: r.files.iter().map(|f| f.size).sum(),
            new_bytes: r.stats.new_bytes,
            verified: r.verified,
            released: target == Some(r.revision),
            latest: latest == Some(r.revision),
            installed_on: reg
                .dps
                .values()
                .filter(|d| {
                    d.revoked.is_none()
                        && d.transfers
                            .get(&rec.id)
                            .is_some_and(|t| t.state.holds() && t.revision == r.revision)
                })
                .map(|d| d.name.clone())
                .collect(),
        })
        .collect();
    RevisionsView {
        keep: rec.keep.unwrap_or(s.keep_revisions),
        package: rec.id,
        revisions,
    }
}

async fn image_revisions(
    State(s): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let lib = s.lib.clone();
    let rec = blocking(move || packages::record(&lib, &id)).await?;
    Ok(Json(revisions_view(&s, rec)).into_response())
}

async fn remove_image(
    State(s): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let rid = id.clone();
    let holders = s.hub.snapshot().holders(&id);
    if !holders.is_empty() {
        return Err(ApiError {
            status: StatusCode::CONFLICT,
            message: format!(
                "{id} is distributed to {}: `ferry undistribute {id}` from them first",
                holders.join(", ")
            ),
        });
    }
    let pending = s.jobs.pending_for(&id);
    if !pending.is_empty() {
        return Err(ApiError {
            status: StatusCode::CONFLICT,
            message: format!(
                "{id} has servicing job(s) {pending:?} scheduled or running: `ferry jobs cancel N` first"
            ),
        });
    }
    let lib = s.lib.clone();
    let out = blocking(move || {
        let r = packages::remove(&lib, &id)?;
        tracing::info!(package = %id, freed_bytes = r.freed_bytes, "package removed");
        Ok(r)
    })
    .await?;
    s.hub.forget_package(&rid)?;
    Ok(Json(out).into_response())
}

async fn verify(
    State(s): State<ApiState>,
    Json(req): Json<VerifyRequest>,
) -> Result<Response, ApiError> {
    let lib = s.lib.clone();
    Ok(Json(blocking(move || packages::verify(&lib, req.id.as_deref())).await?).into_response())
}

fn ndjson_line<T: Serialize>(v: &T) -> Bytes {
    let mut line = serde_json::to_vec(v).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

async fn refresh_image(
    State(s): State<ApiState>,
    Path(id): Path<String>,
    Json(r): Json<RefreshRequest>,
) -> Result<Response, ApiError> {
    let lib = s.lib.clone();
    let rid = id.clone();
    let rec = blocking(move || packages::record(&lib, &rid)).await?;
    let last = rec
        .latest()
        .ok_or_else(|| internal(format!("{id} has no revision")))?;
    if rec.kind == crate::library::catalog::PackageKind::Upgrade {
        let source = match (r.source, &last.service) {
            (Some(p), _) => p,
            (None, None) => PathBuf::from(&last.source.path),
            (None, Some(_)) => {
                return Err(unprocessable(format!(
                    "{id} revision {} was made by servicing; give the setup folder to refresh from with --source",
                    last.revision
                )))
            }
        };
        let req = UpgradeRequest {
            path: source,
            package: Some(id),
            no_verify: r.no_verify,
            ..UpgradeRequest::default()
        };
        return import_stream(s, req.path.clone(), move |lib, data, site, progress| {
            crate::library::upgrade::import(lib, data, site, &req, progress)
        });
    }
    if last.service.is_some() && r.source.is_none() {
        return Err(unprocessable(format!(
            "{id} revision {} was made by servicing; give the file to refresh from with --source",
            last.revision
        )));
    }
    let req = ImportRequest {
        path: r.source.unwrap_or_else(|| PathBuf::from(&last.source.path)),
        index: last.exported_index,
        package: Some(id),
        no_verify: r.no_verify,
        ..ImportRequest::default()
    };
    import_stream(s, req.path.clone(), move |lib, data, site, progress| {
        packages::import(lib, data, site, &req, progress)
    })
}

async fn add_image(
    State(s): State<ApiState>,
    Json(req): Json<ImportRequest>,
) -> Result<Response, ApiError> {
    if req.package.is_some() {
        return Err(ApiError {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            message: "a new revision goes through /images/{id}/refresh".into(),
        });
    }
    import_stream(s, req.path.clone(), move |lib, data, site, progress| {
        packages::import(lib, data, site, &req, progress)
    })
}

async fn add_upgrade(
    State(s): State<ApiState>,
    Json(req): Json<UpgradeRequest>,
) -> Result<Response, ApiError> {
    if req.package.is_some() {
        return Err(unprocessable(
            "a new revision goes through /images/{id}/refresh".into(),
        ));
    }
    import_stream(s, req.path.clone(), move |lib, data, site, progress| {
        crate::library::upgrade::import(lib, data, site, &req, progress)
    })
}

/// The blocking half of an import: library, data folder, site code, and a
/// progress callback.
type ImportFn = dyn FnOnce(
        &Library,
        &std::path::Path,
        &str,
        &mut dyn FnMut(Progress),
    ) -> Result<PackageView, ImageError>
    + Send;

/// Imports on a blocking thread, streaming progress as NDJSON.
fn import_stream(
    s: ApiState,
    path: PathBuf,
    work: impl FnOnce(
            &Library,
            &std::path::Path,
            &str,
            &mut dyn FnMut(Progress),
        ) -> Result<PackageView, ImageError>
        + Send
        + 'static,
) -> Result<Response, ApiError> {
    if !path.is_absolute() {
        return Err(unprocessable(format!(
            "{}: the path must be absolute (the CLI makes it so)",
            path.display()
        )));
    }
    let work: Box<ImportFn> = Box::new(work);
    let (tx, rx) = mpsc::channel::<Bytes>(16);
    let lib = s.lib.clone();
    tokio::task::spawn_blocking(move || {
        let span = tracing::info_span!("import", path = %path.display());
        let _g = span.enter();
        let started = std::time::Instant::now();
        let mut last_percent = u64::MAX;
        let result = work(&lib, &s.data, &s.site_code, &mut |p: Progress| {
            let percent = (p.done * 100).checked_div(p.total).unwrap_or(100);
            if percent != last_percent {
                last_percent = percent;
                // A slow reader only misses progress lines, never the result.
                let _ = tx.try_send(ndjson_line(&ImportEvent::Progress(p)));
            }
        });
        s.metrics.imported(result.is_ok(), started.elapsed());
        let event = match result {
            Ok(view) => {
                let st = view.record.latest().map(|r| r.stats).unwrap_or_default();
                tracing::info!(package = %view.record.id, revision = view.record.latest().map_or(1, |r| r.revision), new_bytes = st.new_bytes, logical = st.logical_bytes, "image imported");
                if view.record.revisions.len() > 1 {
                    // DPs holding the package move to the new revision.
                    s.hub.notify();
                    s.hub.prune(&lib, &view.record.id, s.keep_revisions);
                }
                ImportEvent::Done {
                    package: Box::new(view),
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "import failed");
                ImportEvent::Failed {
                    error: e.to_string(),
                }
            }
        };
        let _ = tx.blocking_send(ndjson_line(&event));
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, std::io::Error>(b), rx))
    });
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(stream),
    )
        .into_response())
}

async fn export_file(
    State(s): State<ApiState>,
    Path(id): Path<String>,
    Query(q): Query<FileQuery>,
) -> Result<Response, ApiError> {
    let lib = s.lib.clone();
    let m = blocking(move || packages::manifest(&lib, &id, q.revision, q.path.as_deref())).await?;
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(8);
    let lib = s.lib.clone();
    let (size, hash, path) = (m.size, m.hash, m.path.clone());
    tokio::task::spawn_blocking(move || {
        for c in &m.chunks {
            let item = lib.read_chunk(&c.id).map(Bytes::from).map_err(|e| {
                tracing::error!(error = %e, file = %m.path, "export stopped");
                std::io::Error::other(e.to_string())
            });
            let failed = item.is_err();
            if tx.blocking_send(item).is_err() || failed {
                break;
            }
        }
    });
    let stream =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|b| (b, rx)) });
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
    headers.insert(
        HASH_HEADER,
        HeaderValue::from_str(&hash.to_hex()).map_err(internal)?,
    );
    if let Ok(v) = HeaderValue::from_str(&path) {
        headers.insert(PATH_HEADER, v);
    }
    Ok((headers, Body::from_stream(stream)).into_response())
}

/// Header of a prestage bundle: the chunks in it.
pub const PRESTAGE_CHUNKS_HEADER: &str = "x-ferry-prestage-chunks";
/// Header of a prestage bundle: their bytes.
pub const PRESTAGE_BYTES_HEADER: &str = "x-ferry-prestage-bytes";
/// Header of a prestage bundle: the revision in it.
pub const PRESTAGE_REVISION_HEADER: &str = "x-ferry-prestage-revision";

/// A prestage bundle of package `id` for a DP, streamed as it is written.
async fn prestage_bundle(
    State(s): State<ApiState>,
    Path(id): Path<String>,
    Query(q): Query<PrestageQuery>,
) -> Result<Response, ApiError> {
    let (lib, hub, key, code) = (
        s.lib.clone(),
        s.hub.clone(),
        s.signing_key.clone(),
        s.site_code.clone(),
    );
    let plan = tokio::task::spawn_blocking(move || {
        prestage::plan(&hub.snapshot(), &lib, &key, &code, &id, &q.dp, q.full)
    })
    .await
    .map_err(internal)??;
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert(PRESTAGE_CHUNKS_HEADER, HeaderValue::from(plan.chunks.len()));
    headers.insert(PRESTAGE_BYTES_HEADER, HeaderValue::from(plan.chunk_bytes));
    headers.insert(
        PRESTAGE_REVISION_HEADER,
        HeaderValue::from(plan.header.revision),
    );
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(8);
    let lib = s.lib.clone();
    tokio::task::spawn_blocking(move || {
        let out = std::io::BufWriter::with_capacity(1 << 20, ChannelWriter(tx.clone()));
        if let Err(e) = prestage::write(&lib, &plan, out) {
            tracing::error!(error = %e, package = %plan.header.package, "prestage bundle stopped");
            let _ = tx.blocking_send(Err(std::io::Error::other(e.to_string())));
        }
    });
    let stream =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|b| (b, rx)) });
    Ok((headers, Body::from_stream(stream)).into_response())
}

/// Bytes written to it go to a response body, in order.
struct ChannelWriter(mpsc::Sender<Result<Bytes, std::io::Error>>);

impl std::io::Write for ChannelWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .blocking_send(Ok(Bytes::copy_from_slice(buf)))
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the client went away")
            })?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

async fn list_dps(State(s): State<ApiState>) -> Json<Vec<status::DpView>> {
    Json(status::dps(&s.hub, &s.conns))
}

async fn add_dp(
    State(s): State<ApiState>,
    Json(req): Json<AddDpRequest>,
) -> Result<Response, ApiError> {
    let secret = s.hub.add_dp(&req.name, req.reissue)?;
    let ca_file = s.data.join(crate::CA_CERT_FILE);
    let ca_pem = tokio::fs::read_to_string(&ca_file)
        .await
        .map_err(|e| internal(format!("cannot read {}: {e}", ca_file.display())))?;
    let ca = ferry_net::pki::cert_der(&ca_pem, "site CA certificate").map_err(internal)?;
    let token = ferry_net::pki::EnrollToken {
        secret,
        ca_fingerprint: ferry_net::pki::fingerprint(&ca),
    };
    tracing::info!(dp = %req.name, "DP added; waiting for enrollment");
    Ok(Json(AddDpReply {
        name: req.name,
        token: token.to_string(),
        site: dp_endpoint(s.dp_listen),
    })
    .into_response())
}

/// The DP endpoint as a DP elsewhere dials it: an unspecified listen
/// address (`0.0.0.0`, `[::]`) becomes this host's name.
fn dp_endpoint(listen: std::net::SocketAddr) -> String {
    if !listen.ip().is_unspecified() {
        return listen.to_string();
    }
    let host = crate::host_name().unwrap_or_else(|| "SITE_HOST".into());
    format!("{host}:{}", listen.port())
}

async fn remove_dp(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    Query(q): Query<RemoveDpQuery>,
) -> Result<Response, ApiError> {
    s.hub.remove_dp(&name, q.force, &s.conns)?;
    tracing::warn!(dp = %name, force = q.force, "DP removed");
    Ok(Json(serde_json::json!({ "removed": name })).into_response())
}

async fn revoke_dp(
    State(s): State<ApiState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    s.hub.revoke(&name)?;
    s.conns
        .close_refused(&name, b"this DP was revoked by the site");
    tracing::warn!(dp = %name, "DP revoked");
    Ok(Json(serde_json::json!({})).into_response())
}

async fn validate_dp(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    Json(req): Json<validation::ValidateRequest>,
) -> Result<Json<validation::ValidateReply>, ApiError> {
    Ok(Json(validation::request(&s.hub, &s.conns, &name, &req)?))
}

async fn dp_validation(
    State(s): State<ApiState>,
    Path(name): Path<String>,
) -> Result<Json<validation::ValidationView>, ApiError> {
    Ok(Json(validation::view(&s.hub, &s.conns, &name)?))
}

async fn dp_settings(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    Json(req): Json<crate::distribution::settings::DpSettings>,
) -> Result<Json<validation::ValidationView>, ApiError> {
    crate::distribution::settings::set(&s.hub, &name, &req)?;
    Ok(Json(validation::view(&s.hub, &s.conns, &name)?))
}

async fn dp_multicast(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    Json(req): Json<crate::distribution::multicast::MulticastChange>,
) -> Result<Json<crate::distribution::multicast::DpMulticast>, ApiError> {
    let m = s.hub.set_multicast(&name, &req)?;
    tracing::info!(dp = %name, settings = %m.describe(), "multicast settings changed");
    Ok(Json(m))
}

async fn list_client_tokens(State(s): State<ApiState>) -> Response {
    Json(s.hub.client_tokens()).into_response()
}

async fn create_client_token(
    State(s): State<ApiState>,
    Json(req): Json<ClientTokenRequest>,
) -> Result<Json<crate::distribution::clients::IssuedToken>, ApiError> {
    let t = s
        .hub
        .create_client_token(&s.signing_key, &s.site_code, &req.name, req.valid_secs)?;
    tracing::info!(name = %t.name, expires = ?t.expires, "client token issued");
    Ok(Json(t))
}

async fn revoke_client_token(
    State(s): State<ApiState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    s.hub.revoke_client_token(&name)?;
    tracing::info!(%name, "client token revoked");
    Ok(Json(serde_json::json!({})).into_response())
}

async fn list_groups(State(s): State<ApiState>) -> Response {
    Json(s.hub.snapshot().groups).into_response()
}

async fn create_group(
    State(s): State<ApiState>,
    Json(req): Json<GroupRequest>,
) -> Result<Response, ApiError> {
    s.hub.create_group(&req.name)?;
    Ok(Json(serde_json::json!({})).into_response())
}

async fn add_members(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    Json(req): Json<MembersRequest>,
) -> Result<Response, ApiError> {
    s.hub.add_members(&name, &req.dps)?;
    Ok(Json(serde_json::json!({})).into_response())
}

async fn remove_members(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    Json(req): Json<MembersRequest>,
) -> Result<Response, ApiError> {
    s.hub.remove_members(&name, &req.dps)?;
    tracing::info!(group = %name, dps = ?req.dps, "DPs removed from a group");
    Ok(Json(serde_json::json!({})).into_response())
}

async fn delete_group(
    State(s): State<ApiState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    s.hub.delete_group(&name)?;
    tracing::info!(group = %name, "group deleted");
    Ok(Json(serde_json::json!({})).into_response())
}

/// DPs reached by a request: named ones and the members of named groups.
fn reached(s: &ApiState, req: &DistributeRequest) -> Result<Vec<String>, ApiError> {
    if req.dps.is_empty() && req.groups.is_empty() {
        return Err(ApiError {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            message: "name at least one --dp or --group".into(),
        });
    }
    let reg = s.hub.snapshot();
    let mut out = std::collections::BTreeSet::new();
    for d in &req.dps {
        if !reg.dps.contains_key(d) {
            return Err(HubError::NoDp(d.clone()).into());
        }
        out.insert(d.clone());
    }
    for g in &req.groups {
        let group = reg
            .groups
            .get(g)
            .ok_or_else(|| HubError::NoGroup(g.clone()))?;
        out.extend(group.members.iter().cloned());
    }
    Ok(out.into_iter().collect())
}

async fn distribute(
    State(s): State<ApiState>,
    Json(req): Json<DistributeRequest>,
) -> Result<Response, ApiError> {
    let dps = reached(&s, &req)?;
    let (lib, reg, package) = (s.lib.clone(), s.hub.snapshot(), req.package.clone());
    let (revision, needs) = blocking(move || status::needs(&reg, &lib, &package, &dps)).await?;
    if !req.dry_run {
        s.hub.distribute(&req.package, &req.dps, &req.groups)?;
        // Distributing sends the newest revision, here and to every DP that
        // holds the package already.
        let (lib, package) = (s.lib.clone(), req.package.clone());
        blocking(move || packages::release_latest(&lib, &package)).await?;
        s.hub.notify();
        tracing::info!(package = %req.package, dps = ?req.dps, groups = ?req.groups, "package distributed");
    }
    Ok(Json(DistributeReply {
        package: req.package,
        revision,
        assigned: !req.dry_run,
        needs,
    })
    .into_response())
}

async fn undistribute(
    State(s): State<ApiState>,
    Json(req): Json<DistributeRequest>,
) -> Result<Response, ApiError> {
    reached(&s, &req)?;
    s.hub.undistribute(&req.package, &req.dps, &req.groups)?;
    tracing::info!(package = %req.package, dps = ?req.dps, groups = ?req.groups, "package undistributed");
    Ok(Json(serde_json::json!({})).into_response())
}

async fn redistribute(
    State(s): State<ApiState>,
    Json(req): Json<DistributeRequest>,
) -> Result<Response, ApiError> {
    // A group stands for its members.
    let dps = reached(&s, &req)?;
    s.hub.redistribute(&req.package, &dps)?;
    tracing::info!(package = %req.package, dps = ?dps, "rebuild from scratch asked");
    Ok(Json(serde_json::json!({ "package": req.package, "dps": dps })).into_response())
}

async fn status_rows(
    State(s): State<ApiState>,
    Query(q): Query<StatusQuery>,
) -> Result<Response, ApiError> {
    if let Some(d) = &q.dp {
        if !s.hub.snapshot().dps.contains_key(d) {
            return Err(HubError::NoDp(d.clone()).into());
        }
    }
    let (hub, conns, lib) = (s.hub.clone(), s.conns.clone(), s.lib.clone());
    let rows =
        blocking(move || status::rows(&hub, &conns, &lib, q.package.as_deref(), q.dp.as_deref()))
            .await?;
    Ok(Json(rows).into_response())
}

async fn list_updates(State(s): State<ApiState>) -> Result<Response, ApiError> {
    let data = s.data.clone();
    let list = tokio::task::spawn_blocking(move || crate::servicing::updates::list(&data))
        .await
        .map_err(internal)??;
    Ok(Json(list).into_response())
}

async fn show_update(
    State(s): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let data = s.data.clone();
    let rec = tokio::task::spawn_blocking(move || crate::servicing::updates::read(&data, &id))
        .await
        .map_err(internal)??;
    Ok(Json(rec).into_response())
}

async fn remove_update(
    State(s): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let (data, what) = (s.data.clone(), id.clone());
    tokio::task::spawn_blocking(move || crate::servicing::updates::read(&data, &what))
        .await
        .map_err(internal)??;
    let waiting: Vec<String> = s
        .jobs
        .list(None)
        .into_iter()
        .filter(|j| !j.state.is_final() && j.request.updates.contains(&id))
        .map(|j| format!("{} ({})", j.id, j.package))
        .collect();
    if !waiting.is_empty() {
        return Err(ApiError {
            status: StatusCode::CONFLICT,
            message: format!(
                "{id} is named by servicing job(s) {} that have not run yet: `ferry jobs cancel N` first",
                waiting.join(", ")
            ),
        });
    }
    let (data, what) = (s.data.clone(), id.clone());
    let r = tokio::task::spawn_blocking(move || crate::servicing::updates::remove(&data, &what))
        .await
        .map_err(internal)??;
    tracing::info!(update = %id, "update removed from the catalog");
    Ok(Json(r).into_response())
}

async fn import_update(
    State(s): State<ApiState>,
    Json(req): Json<UpdateImportRequest>,
) -> Result<Response, ApiError> {
    if !req.path.is_absolute() {
        return Err(unprocessable(format!(
            "{}: the path must be absolute (the CLI makes it so)",
            req.path.display()
        )));
    }
    let data = s.data.clone();
    let rec =
        tokio::task::spawn_blocking(move || crate::servicing::updates::import(&data, &req.path))
            .await
            .map_err(internal)??;
    tracing::info!(update = %rec.manifest.id, "update imported into the catalog");
    Ok((StatusCode::CREATED, Json(rec)).into_response())
}

async fn image_updates(
    State(s): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let (lib, data) = (s.lib.clone(), s.data.clone());
    let view = blocking(move || {
        packages::record(&lib, &id)?;
        Ok(crate::servicing::service::image_updates(&lib, &data, &id))
    })
    .await?
    .map_err(unprocessable)?;
    Ok(Json(view).into_response())
}

async fn image_history(
    State(s): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let (lib, jobs) = (s.lib.clone(), s.jobs.list(None));
    let view = blocking(move || {
        packages::record(&lib, &id)?;
        Ok(crate::servicing::service::history(&lib, &jobs, &id))
    })
    .await?
    .map_err(unprocessable)?;
    Ok(Json(view).into_response())
}

async fn service_image(
    State(s): State<ApiState>,
    Path(id): Path<String>,
    Json(req): Json<ServiceRequest>,
) -> Result<Response, ApiError> {
    let (lib, data, pkg, r) = (s.lib.clone(), s.data.clone(), id.clone(), req.clone());
    blocking(move || {
        packages::record(&lib, &pkg)?;
        Ok(crate::servicing::service::check(&lib, &data, &pkg, &r))
    })
    .await?
    .map_err(unprocessable)?;
    let job = s.jobs.create(&id, req)?;
    tracing::info!(job = job.id, package = %id, next_run = ?job.next_run, "servicing job created");
    Ok((StatusCode::CREATED, Json(job)).into_response())
}

async fn list_jobs(State(s): State<ApiState>, Query(q): Query<JobsQuery>) -> Response {
    Json(s.jobs.list(q.package.as_deref())).into_response()
}

async fn show_job(State(s): State<ApiState>, Path(n): Path<u64>) -> Result<Response, ApiError> {
    Ok(Json(s.jobs.get(n)?).into_response())
}

async fn cancel_job(State(s): State<ApiState>, Path(n): Path<u64>) -> Result<Response, ApiError> {
    let job = s.jobs.cancel(n)?;
    tracing::info!(job = n, "servicing job cancelled");
    Ok(Json(job).into_response())
}
