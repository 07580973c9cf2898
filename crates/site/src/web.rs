//! The web status page on the operator listener: where content is, how far
//! along, what failed and why.
//!
//! | path | page |
//! |---|---|
//! | `/ui/` | overview: one row per package × DP |
//! | `/ui/packages/{id}` | a package: revisions, where each is installed, servicing history, jobs |
//! | `/ui/dps/{name}` | a DP: online, windows, rate, disk, its rows, validation results |
//! | `/ui/jobs` | servicing jobs: scheduled, running, outcomes |
//! | `/ui/multicast` | multicast settings and sessions per DP |
//! | `/ui/login` | the login form (GET) and its answer (POST) |
//! | `/ui/logout` | POST: ends the session |
//!
//! Pages are rendered on the server ([`pages`]); `live.js` fetches the same
//! path every two seconds with `x-ferry-part: live` and swaps in the live
//! part, so the page follows the site without reloading. The login form
//! takes the operator token and answers with an `HttpOnly`,
//! `SameSite=Strict` session cookie (a random session id; the token itself
//! never goes into a cookie). The JSON API keeps bearer tokens and does not
//! accept the cookie. Pages send a content security policy that allows only
//! the site's own script and style.

pub mod pages;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::{Form, Router};
use headers::HeaderMapExt;
use serde::Deserialize;

use crate::api::ApiState;
use crate::distribution::{status, validation};
use crate::library::packages;

/// The session cookie's name.
pub const SESSION_COOKIE: &str = "ferry_session";
/// How long a session lasts after login.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// Sessions kept at once; the oldest is ended when a login would pass it.
pub const MAX_SESSIONS: usize = 256;
/// The header `live.js` sends to get only a page's live part.
pub const PART_HEADER: &str = "x-ferry-part";
/// Largest login form accepted.
pub const MAX_LOGIN_BYTES: usize = 4096;
/// How often pages refresh their live part, in milliseconds.
pub const REFRESH_MS: u64 = 2000;

const STYLE: &str = include_str!("web/style.css");
const SCRIPT: &str = include_str!("web/live.js");
const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                      connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// Logged-in browser sessions, in memory (a restart of the site logs
/// everyone out). Only each id's BLAKE3 is kept.
#[derive(Debug, Default)]
pub struct Sessions {
    open: Mutex<HashMap<blake3::Hash, Instant>>,
}

impl Sessions {
    /// Opens a session and returns its id for the cookie.
    pub fn open(&self) -> Result<String, ferry_net::pki::PkiError> {
        let id = ferry_net::pki::random_token()?;
        let now = Instant::now();
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.retain(|_, since| now.duration_since(*since) < SESSION_TTL);
        while open.len() >= MAX_SESSIONS {
            let Some(oldest) = open.iter().min_by_key(|(_, t)| **t).map(|(k, _)| *k) else {
                break;
            };
            open.remove(&oldest);
        }
        open.insert(blake3::hash(id.as_bytes()), now);
        Ok(id)
    }

    /// Whether `id` is a session that has not expired.
    pub fn check(&self, id: &str) -> bool {
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.get(&blake3::hash(id.as_bytes()))
            .is_some_and(|since| since.elapsed() < SESSION_TTL)
    }

    /// Ends session `id`.
    pub fn close(&self, id: &str) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.remove(&blake3::hash(id.as_bytes()));
    }
}

/// The routes of the status page (merged into the operator router).
pub fn router(state: ApiState) -> Router<ApiState> {
    let pages = Router::new()
        .route("/ui/", get(overview))
        .route("/ui/packages/{id}", get(package))
        .route("/ui/dps/{name}", get(dp))
        .route("/ui/jobs", get(jobs))
        .route("/ui/multicast", get(multicast))
        .route("/ui/logout", axum::routing::post(logout))
        .layer(middleware::from_fn_with_state(state, require_session));
    Router::new()
        .route("/", get(|| async { Redirect::to("/ui/") }))
        .route("/ui", get(|| async { Redirect::to("/ui/") }))
        .route(
            "/ui/login",
            get(login_form)
                .post(login)
                .layer(axum::extract::DefaultBodyLimit::max(MAX_LOGIN_BYTES)),
        )
        .route("/ui/assets/style.css", get(|| asset("text/css", STYLE)))
        .route(
            "/ui/assets/live.js",
            get(|| asset("text/javascript", SCRIPT)),
        )
        .merge(pages)
        .layer(middleware::map_response(secure_headers))
}

async fn asset(kind: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "public, max-age=300"),
        ],
        body,
    )
        .into_response()
}

async fn secure_headers(mut r: Response) -> Response {
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(POLICY),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    r
}

fn session_of(headers: &HeaderMap) -> Option<String> {
    headers
        .typed_get::<headers::Cookie>()
        .and_then(|c| c.get(SESSION_COOKIE).map(str::to_string))
}

fn wants_part(headers: &HeaderMap) -> bool {
    headers
        .get(PART_HEADER)
        .is_some_and(|v| v.as_bytes() == b"live")
}

async fn require_session(
    State(s): State<ApiState>,
    headers: HeaderMap,
    req: Request,
    next: Next,
) -> Response {
    if session_of(&headers).is_some_and(|id| s.sessions.check(&id)) {
        return next.run(req).await;
    }
    if wants_part(&headers) || req.method() != axum::http::Method::GET {
        // The page's script sends the browser to the login form.
        return (StatusCode::UNAUTHORIZED, "log in again").into_response();
    }
    let next_path = req
        .uri()
        .path_and_query()
        .map_or("/ui/", |p| p.as_str())
        .to_string();
    Redirect::to(&format!("/ui/login?next={}", pages::percent(&next_path))).into_response()
}

/// A path safe to go back to after login: one of the status pages, never
/// another site.
fn safe_next(next: Option<&str>) -> &str {
    match next {
        Some(n) if n.starts_with("/ui/") && !n.contains("//") && !n.contains('\\') => n,
        _ => "/ui/",
    }
}

/// Query of the login form.
#[derive(Debug, Default, Deserialize)]
pub struct LoginQuery {
    /// Where to go after logging in.
    pub next: Option<String>,
}

/// Body of `POST /ui/login`.
#[derive(Debug, Deserialize)]
pub struct LoginForm {
    /// The operator token.
    pub token: String,
    /// Where to go after logging in.
    #[serde(default)]
    pub next: Option<String>,
}

async fn login_form(Query(q): Query<LoginQuery>) -> Response {
    html(pages::login(safe_next(q.next.as_deref()), None))
}

async fn login(State(s): State<ApiState>, Form(f): Form<LoginForm>) -> Response {
    let next = safe_next(f.next.as_deref()).to_string();
    // blake3::Hash compares in constant time.
    if blake3::hash(f.token.trim().as_bytes()) != s.token_hash {
        tracing::warn!("status page login refused: wrong operator token");
        let mut r = html(pages::login(
            &next,
            Some("That is not the operator token (operator.token in the site's data folder)."),
        ));
        *r.status_mut() = StatusCode::UNAUTHORIZED;
        return r;
    }
    let id = match s.sessions.open() {
        Ok(id) => id,
        Err(e) => {
            tracing::error!(error = %e, "cannot open a status page session");
            return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response();
        }
    };
    tracing::info!("status page login");
    let cookie = format!(
        "{SESSION_COOKIE}={id}; Path=/ui; HttpOnly; SameSite=Strict; Max-Age={}{}",
        SESSION_TTL.as_secs(),
        if s.https { "; Secure" } else { "" }
    );
    let mut r = Redirect::to(&next).into_response();
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

async fn logout(State(s): State<ApiState>, headers: HeaderMap) -> Response {
    if let Some(id) = session_of(&headers) {
        s.sessions.close(&id);
    }
    let mut r = Redirect::to("/ui/login").into_response();
    r.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("ferry_session=; Path=/ui; HttpOnly; SameSite=Strict; Max-Age=0"),
    );
    r
}

fn html(body: maud::Markup) -> Response {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        body.into_string(),
    )
        .into_response()
}

/// The whole page, or only its live part when the script asks; gzipped
/// for a browser that takes it.
fn page(headers: &HeaderMap, p: pages::Page) -> Response {
    let body = if wants_part(headers) {
        p.live
    } else {
        pages::layout(&p)
    };
    if takes_gzip(headers) {
        gzipped_html(body.into_string())
    } else {
        html(body)
    }
}

/// Pages smaller than this go as they are.
const GZIP_FROM_BYTES: usize = 1024;

/// Whether `Accept-Encoding` takes gzip (and does not refuse it with q=0).
fn takes_gzip(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|coding| {
            let mut parts = coding.split(';').map(str::trim);
            let name = parts.next().unwrap_or("");
            let refused = parts.any(|p| {
                p.strip_prefix("q=")
                    .and_then(|q| q.parse::<f32>().ok())
                    .is_some_and(|q| q == 0.0)
            });
            (name.eq_ignore_ascii_case("gzip") || name.eq_ignore_ascii_case("x-gzip")) && !refused
        })
}

/// An HTML page gzipped. The page is rendered whole in memory, so one
/// call of flate2 (already a dependency) over it is all compression takes;
/// tower-http's `CompressionLayer` would bring async-compression and a
/// streaming body for the same result.
fn gzipped_html(body: String) -> Response {
    use std::io::Write as _;
    if body.len() < GZIP_FROM_BYTES {
        return html(maud::PreEscaped(body));
    }
    let mut gz = flate2::write::GzEncoder::new(
        Vec::with_capacity(body.len() / 8),
        flate2::Compression::fast(),
    );
    match gz.write_all(body.as_bytes()).and_then(|()| gz.finish()) {
        Ok(packed) => (
            [
                (header::CONTENT_TYPE, "text/html; charset=utf-8"),
                (header::CONTENT_ENCODING, "gzip"),
                (header::VARY, "accept-encoding"),
            ],
            packed,
        )
            .into_response(),
        Err(_) => html(maud::PreEscaped(body)),
    }
}

/// Why a page is not shown.
#[derive(Debug)]
enum Trouble {
    /// What it names does not exist (404).
    Missing(String),
    /// The site could not read it (500, logged).
    Failed(String),
}

impl Trouble {
    fn response(self) -> Response {
        let (status, why) = match self {
            Trouble::Missing(why) => (StatusCode::NOT_FOUND, why),
            Trouble::Failed(why) => {
                tracing::error!(error = %why, "status page failed");
                (StatusCode::INTERNAL_SERVER_ERROR, why)
            }
        };
        let mut r = html(pages::trouble(&why));
        *r.status_mut() = status;
        r
    }
}

fn failure(e: impl std::fmt::Display) -> Trouble {
    Trouble::Failed(e.to_string())
}

/// Runs `f` (blocking reads of the registry and library) off the async
/// threads and answers with its page.
async fn render(
    headers: HeaderMap,
    f: impl FnOnce() -> Result<pages::Page, Trouble> + Send + 'static,
) -> Response {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(p)) => page(&headers, p),
        Ok(Err(t)) => t.response(),
        Err(e) => failure(e).response(),
    }
}

/// What every page reads: the rows, the DPs, the packages and the jobs.
pub fn overview_data(s: &ApiState) -> Result<pages::Overview, packages::ImageError> {
    Ok(pages::Overview {
        rows: status::rows(&s.hub, &s.conns, &s.lib, None, None)?,
        dps: status::dps(&s.hub, &s.conns),
        packages: packages::list(&s.lib)?,
        jobs: s.jobs.list(None),
        now: time::OffsetDateTime::now_utc(),
    })
}

async fn overview(
    State(s): State<ApiState>,
    Query(f): Query<pages::RowFilter>,
    headers: HeaderMap,
) -> Response {
    render(headers, move || {
        overview_data(&s)
            .map(|o| pages::overview(&o, &f))
            .map_err(failure)
    })
    .await
}

async fn package(
    State(s): State<ApiState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    render(headers, move || {
        let rec = match packages::record(&s.lib, &id) {
            Ok(r) => r,
            Err(e @ packages::ImageError::NoPackage(_)) => {
                return Err(Trouble::Missing(e.to_string()))
            }
            Err(e) => return Err(failure(e)),
        };
        let jobs = s.jobs.list(Some(&id));
        let history = crate::servicing::service::history(&s.lib, &jobs, &id).ok();
        let rows = status::rows(&s.hub, &s.conns, &s.lib, Some(&id), None).map_err(failure)?;
        Ok(pages::package(&pages::PackagePage {
            revisions: crate::api::revisions_view(&s, rec.clone()),
            record: rec,
            rows,
            history,
            jobs,
            now: time::OffsetDateTime::now_utc(),
        }))
    })
    .await
}

async fn dp(State(s): State<ApiState>, Path(name): Path<String>, headers: HeaderMap) -> Response {
    render(headers, move || {
        let Some(view) = status::dps(&s.hub, &s.conns)
            .into_iter()
            .find(|d| d.name == name)
        else {
            return Err(Trouble::Missing(format!("no DP named {name}")));
        };
        let rows = status::rows(&s.hub, &s.conns, &s.lib, None, Some(&name)).map_err(failure)?;
        let validation = validation::view(&s.hub, &s.conns, &name).map_err(failure)?;
        Ok(pages::dp(&pages::DpPage {
            view,
            rows,
            validation,
            now: time::OffsetDateTime::now_utc(),
        }))
    })
    .await
}

async fn jobs(State(s): State<ApiState>, headers: HeaderMap) -> Response {
    render(headers, move || {
        Ok(pages::jobs(
            &s.jobs.list(None),
            time::OffsetDateTime::now_utc(),
        ))
    })
    .await
}

async fn multicast(State(s): State<ApiState>, headers: HeaderMap) -> Response {
    render(headers, move || {
        let pkgs = packages::list(&s.lib).map_err(failure)?;
        let settings = pkgs
            .iter()
            .filter_map(|p| {
                packages::record(&s.lib, &p.id)
                    .ok()
                    .map(|r| (p.id.clone(), p.name.clone(), r.multicast))
            })
            .collect::<Vec<_>>();
        Ok(pages::multicast(
            &status::dps(&s.hub, &s.conns),
            &settings,
            time::OffsetDateTime::now_utc(),
        ))
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_the_site_cannot_read_is_a_500_that_says_why_escaped() {
        let r = Trouble::Failed("library: <closed>".into()).response();
        assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(
            r.headers()[header::CONTENT_TYPE],
            "text/html; charset=utf-8"
        );
        let r = Trouble::Missing("no DP x".into()).response();
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        let html = pages::trouble("library: <closed>").into_string();
        assert!(html.contains("library: &lt;closed&gt;"), "{html}");
    }

    #[test]
    fn gzip_is_taken_when_offered_and_not_refused() {
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::ACCEPT_ENCODING, v.parse().unwrap());
            takes_gzip(&h)
        };
        assert!(with("gzip, deflate, br, zstd"));
        assert!(with("br;q=1.0, GZIP;q=0.5"));
        assert!(!with("br, deflate"));
        assert!(!with("gzip;q=0, br"));
        assert!(!with("gzipped"));
        assert!(!takes_gzip(&HeaderMap::new()));
        let small = gzipped_html("<p>hi</p>".into());
        assert!(small.headers().get(header::CONTENT_ENCODING).is_none());
        let big = gzipped_html("<tr><td>row</td></tr>".repeat(500));
        assert_eq!(big.headers()[header::CONTENT_ENCODING], "gzip");
        assert_eq!(big.headers()[header::VARY], "accept-encoding");
    }

    #[test]
    fn sessions_open_check_and_close() {
        let s = Sessions::default();
        let a = s.open().unwrap();
        let b = s.open().unwrap();
        assert_ne!(a, b);
        assert!(s.check(&a) && s.check(&b));
        assert!(!s.check("forged"));
        assert!(!s.check(""));
        s.close(&a);
        assert!(!s.check(&a) && s.check(&b));
    }

    #[test]
    fn sessions_are_capped_and_the_oldest_goes_first() {
        let s = Sessions::default();
        let first = s.open().unwrap();
        let rest: Vec<String> = (1..MAX_SESSIONS).map(|_| s.open().unwrap()).collect();
        assert!(s.check(&first));
        let newest = s.open().unwrap();
        assert!(!s.check(&first), "the oldest session was ended");
        assert!(s.check(&newest) && rest.iter().all(|r| s.check(r)));
    }

    #[test]
    fn only_status_pages_are_gone_back_to() {
        assert_eq!(safe_next(Some("/ui/dps/dp1")), "/ui/dps/dp1");
        assert_eq!(
            safe_next(Some("/ui/packages/SITE0001?x=1")),
            "/ui/packages/SITE0001?x=1"
        );
        for bad in [
            None,
            Some("https://evil.example/"),
            Some("//evil.example/ui/"),
            Some("/ui//evil.example"),
            Some("/api/v1/dps"),
            Some("/ui/\\evil"),
        ] {
            assert_eq!(safe_next(bad), "/ui/", "{bad:?}");
        }
        assert_eq!(
            pages::percent("/ui/dps/a b?x=1&y"),
            "/ui/dps/a%20b%3Fx%3D1%26y"
        );
    }
}
