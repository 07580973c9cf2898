//! The multicast routes: requests for sessions, reports, the session
//! list ([`crate::multicast`] runs the sessions).

use std::fs::File;
use std::sync::Arc;

use axum::extract::{Path as UrlPath, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tracing::info;

use crate::multicast::{Content, Done, Refused, Report, SessionOffer, SessionView};
use crate::served::{installed, internal, Refusal, Shared};

/// The routes of multicast sessions, under the listener's client check.
pub(crate) fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/multicast", get(list))
        .route("/multicast/", get(list))
        .route("/multicast/{package}", post(request))
        .route("/multicast/session/{id}/report", post(take_report))
        .route("/multicast/session/{id}/done", post(take_done))
}

/// What `GET /multicast/` answers.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct MulticastList {
    /// Whether the DP runs sessions.
    pub enabled: bool,
    /// Packages it may send by multicast.
    pub packages: Vec<String>,
    /// Running sessions, then recent ones.
    pub sessions: Vec<SessionView>,
}

async fn list(State(sh): State<Arc<Shared>>) -> Response {
    let policy = sh.gate.multicast();
    Json(MulticastList {
        enabled: policy.is_some(),
        packages: policy
            .map(|p| p.packages.into_iter().map(|p| p.package).collect())
            .unwrap_or_default(),
        sessions: sh.multicast.views(),
    })
    .into_response()
}

impl From<Refused> for Refusal {
    fn from(r: Refused) -> Self {
        Refusal(
            StatusCode::from_u16(r.0).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            r.1,
        )
    }
}

async fn request(
    State(sh): State<Arc<Shared>>,
    UrlPath(package): UrlPath<String>,
    headers: HeaderMap,
) -> Response {
    match offer(&sh, &package, &headers).await {
        Ok(o) => Json(o).into_response(),
        Err(r) => r.into_response(),
    }
}

async fn offer(sh: &Shared, package: &str, headers: &HeaderMap) -> Result<SessionOffer, Refusal> {
    let Some(policy) = sh.gate.multicast() else {
        return Err(Refusal(
            StatusCode::CONFLICT,
            "this DP does not run multicast sessions (on the site: ferry dp multicast NAME --enable); download over HTTPS instead".into(),
        ));
    };
    let inst = installed(sh, package).await?;
    let Some(pkg) = policy.packages.iter().find(|p| p.package == package) else {
        return Err(Refusal(
            StatusCode::FORBIDDEN,
            format!("package {package} does not allow multicast (on the site: ferry image multicast {package} --allow)"),
        ));
    };
    let auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let client = sh
        .gate
        .check(auth)
        .map_err(|e| Refusal(StatusCode::UNAUTHORIZED, e))?;
    if pkg.encrypt && auth.is_none() {
        return Err(Refusal(
            StatusCode::UNAUTHORIZED,
            format!("package {package} is sent encrypted: its session key goes only to clients with a client token"),
        ));
    }
    if let Some(o) = sh.multicast.join_running(package)? {
        info!(package, %client, session = %o.session, n = o.client, "client joined a multicast session");
        return Ok(o);
    }
    let store = sh.store()?;
    let (p, rev, dir) = (package.to_string(), inst.revision, inst.dir.clone());
    let content = tokio::task::spawn_blocking(move || -> Result<Content, Refusal> {
        let rec = store.record(&p, rev).map_err(internal)?.ok_or_else(|| {
            Refusal(
                StatusCode::NOT_FOUND,
                format!("this DP holds no package {p:?}"),
            )
        })?;
        let manifests = store.manifests(&p, rev).map_err(internal)?;
        let files = manifests
            .iter()
            .map(|m| {
                File::open(dir.join(&m.path))
                    .map(Arc::new)
                    .map_err(|e| internal(format!("cannot open {} of {p}: {e}", m.path)))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Content {
            revision: rev,
            name: rec.name,
            files,
            manifests,
            body: rec.body,
            signature: rec.signature,
        })
    })
    .await
    .map_err(internal)??;
    let o = sh
        .multicast
        .start(package, &policy, pkg, content, &sh.manifest_key)?;
    info!(package, %client, session = %o.session, n = o.client, "client joined a multicast session");
    Ok(o)
}

fn no_session(id: &str) -> Response {
    Refusal(
        StatusCode::NOT_FOUND,
        format!("no multicast session {id} runs on this DP (it ended)"),
    )
    .into_response()
}

async fn take_report(
    State(sh): State<Arc<Shared>>,
    UrlPath(id): UrlPath<String>,
    Json(r): Json<Report>,
) -> Response {
    if sh.multicast.report(&id, r) {
        Json(serde_json::json!({})).into_response()
    } else {
        no_session(&id)
    }
}

async fn take_done(
    State(sh): State<Arc<Shared>>,
    UrlPath(id): UrlPath<String>,
    Json(d): Json<Done>,
) -> Response {
    if sh.multicast.done(&id, d) {
        Json(serde_json::json!({})).into_response()
    } else {
        no_session(&id)
    }
}
