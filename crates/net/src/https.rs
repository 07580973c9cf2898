//! One HTTPS connection served by an axum router: the TLS handshake (with
//! a deadline), then HTTP/1.1 with a header deadline. The DP's client
//! listener and the site's operator API off loopback both serve this way.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::Router;

/// How long a client may take for the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client may take to send a request's headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves `sock` (accepted from `peer`) over TLS with `tls` until the
/// client leaves; handlers see the peer as `ConnectInfo<SocketAddr>`.
/// Failed handshakes are logged as warnings naming the peer.
pub async fn connection(
    sock: tokio::net::TcpStream,
    peer: SocketAddr,
    tls: Arc<rustls::ServerConfig>,
    app: Router,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(sock)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::warn!(client = %peer, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::warn!(client = %peer, "TLS handshake timed out");
            return;
        }
    };
    let service =
        hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(ConnectInfo(peer));
            let app = app.clone();
            async move {
                use tower::ServiceExt as _;
                app.oneshot(req.map(Body::new)).await
            }
        });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
    if let Err(e) = conn.await {
        tracing::debug!(client = %peer, error = %e, "client connection ended");
    }
}
