//! The DP's Prometheus metrics, served at `/metrics` on `[metrics] listen`
//! of `dp.toml` (plain HTTP, like a node exporter: nothing secret in it).
//!
//! Counted as it happens, for as long as the process runs: chunk bytes
//! received by source (the site or a source DP) and chunks that arrived
//! damaged and were asked again, chunk bytes served to each pull DP,
//! damaged chunks validation found (repaired or not), and whether the DP
//! is connected to its site. Read at each scrape: its multicast sessions.
//! The site's `/metrics` has the rest (need bytes, transfers by state).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use ferry_net::metrics::Labels;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tracing::info;

use crate::config::MetricsConfig;
use crate::error::DpError;
use crate::multicast::Sessions;

/// What the DP counts.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    received: Family<Labels, Counter>,
    refetched: Counter,
    peer_sent: Family<Labels, Counter>,
    damaged: Family<Labels, Counter>,
    connected: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let received = Family::<Labels, Counter>::default();
        let refetched = Counter::default();
        let peer_sent = Family::<Labels, Counter>::default();
        let damaged = Family::<Labels, Counter>::default();
        let connected = Gauge::default();
        registry.register(
            "ferry_dp_received_bytes",
            "Chunk bytes received, by source (site, or the source DP of a pull DP)",
            received.clone(),
        );
        registry.register(
            "ferry_dp_chunks_refetched",
            "Chunks that arrived damaged (their hash did not match) and were asked again",
            refetched.clone(),
        );
        registry.register(
            "ferry_dp_validation_damaged_chunks",
            "Damaged chunks validation found, by whether they were repaired",
            damaged.clone(),
        );
        registry.register(
            "ferry_dp_site_connected",
            "Whether the DP is connected to its site (1) or not (0)",
            connected.clone(),
        );
        for repaired in ["yes", "no"] {
            let _ = damaged.get_or_create(&vec![("repaired", repaired.to_string())]);
        }
        let _ = received.get_or_create(&source("site"));
        Self {
            registry,
            received,
            refetched,
            peer_sent,
            damaged,
            connected,
        }
    }
}

fn source(name: &str) -> Labels {
    vec![("source", name.to_string())]
}

impl Metrics {
    /// `n` chunk bytes arrived from `from` ("site" or a source DP).
    pub fn received(&self, from: &str, n: u64) {
        self.received.get_or_create(&source(from)).inc_by(n);
    }

    /// A chunk arrived damaged and is asked again.
    pub fn refetched(&self) {
        self.refetched.inc();
    }

    /// The counter of chunk bytes served to pull DP `dp`.
    pub fn peer_sent(&self, dp: &str) -> Counter {
        self.peer_sent
            .get_or_create_owned(&vec![("dp", dp.to_string())])
    }

    /// Validation found a damaged chunk; `repaired` or not.
    pub fn damaged(&self, repaired: bool) {
        let r = if repaired { "yes" } else { "no" };
        self.damaged
            .get_or_create(&vec![("repaired", r.to_string())])
            .inc();
    }

    /// The connection to the site is up or down.
    pub fn connected(&self, up: bool) {
        self.connected.set(i64::from(up));
    }
}

/// What a scrape reads as it is: the multicast sessions, and the bytes
/// served to pull DPs (written here so that the family is described before
/// any pull DP has come: a registered family without series is left out).
#[derive(Debug)]
struct Now {
    sessions: Vec<ferry_mcast::SessionView>,
    peer_sent: Family<Labels, Counter>,
}

impl Collector for Now {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let m = enc.encode_descriptor(
            "ferry_dp_peer_sent_bytes",
            "Chunk bytes served to pull DPs, by pull DP",
            None,
            MetricType::Counter,
        )?;
        self.peer_sent.encode(m)?;
        let (running, clients) = ferry_mcast::view::running(&self.sessions);
        let m = enc.encode_descriptor(
            "ferry_dp_multicast_sessions",
            "Multicast sessions running",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(running as i64).encode(m)?;
        let mut m = enc.encode_descriptor(
            "ferry_dp_multicast_clients",
            "Computers in the running multicast sessions, by state (joined, done, left)",
            None,
            MetricType::Gauge,
        )?;
        for (state, n) in clients {
            let l: Labels = vec![("state", state.to_string())];
            ConstGauge::new(n).encode(m.encode_family(&l)?)?;
        }
        let mut m = enc.encode_descriptor(
            "ferry_dp_multicast_sent_bytes",
            "Bytes multicast by the sessions listed (running, and the last ended), by package",
            None,
            MetricType::Counter,
        )?;
        for s in &self.sessions {
            let l: Labels = vec![
                ("package", s.package.clone()),
                ("session", s.session.clone()),
            ];
            ConstCounter::new(s.bytes_sent).encode(m.encode_family(&l)?)?;
        }
        Ok(())
    }
}

/// What the listener reads.
#[derive(Clone)]
struct Scraped {
    metrics: Arc<Metrics>,
    multicast: Arc<Sessions>,
}

async fn scrape(State(s): State<Scraped>, headers: HeaderMap) -> Response {
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mut now = Registry::default();
    now.register_collector(Box::new(Now {
        sessions: s.multicast.views(),
        peer_sent: s.metrics.peer_sent.clone(),
    }));
    match ferry_net::metrics::exposition(&[&s.metrics.registry, &now], accept) {
        Ok((kind, text)) => ([(header::CONTENT_TYPE, kind)], text).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// Serves `/metrics` on `cfg.listen` until the task is dropped; an error
/// only when the address cannot be bound.
pub(crate) async fn serve(
    cfg: MetricsConfig,
    metrics: Arc<Metrics>,
    multicast: Arc<Sessions>,
) -> Result<(), DpError> {
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| {
            DpError::net(
                format!("cannot listen on {} ([metrics] listen)", cfg.listen),
                e,
            )
        })?;
    let addr: SocketAddr = listener.local_addr().unwrap_or(cfg.listen);
    info!(listen = %addr, "serving metrics");
    let app = Router::new()
        .route("/metrics", get(scrape))
        .with_state(Scraped { metrics, multicast });
    axum::serve(listener, app)
        .await
        .map_err(|e| DpError::net("the metrics listener stopped", e))
}
