//! QUIC endpoint configuration: TLS 1.3 with the site CA on both sides.
//!
//! - The site serves with its own certificate (chain: site, CA) and accepts
//!   client certificates issued by its CA. A client without a certificate
//!   may connect, but the site answers only an enrollment request on such a
//!   connection; a certificate from any other CA fails the handshake.
//! - An enrolled DP trusts the site CA only (pinned at enrollment) and
//!   presents its own certificate.
//! - A DP enrolling has no CA yet: it accepts the site's chain only if the
//!   chain carries a CA whose fingerprint is the one in its token, and the
//!   site certificate verifies against that CA.

use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::pki::{fingerprint, PkiError};

/// A certificate chain and its private key.
#[derive(Debug)]
pub struct Identity {
    /// Own certificate first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The private key.
    pub key: PrivateKeyDer<'static>,
}

impl Identity {
    /// Reads PEM texts; `what` names them in errors.
    pub fn from_pem(cert_pem: &str, key_pem: &str, what: &str) -> Result<Self, PkiError> {
        use rustls::pki_types::pem::PemObject;
        let bad = |detail: String| PkiError::Invalid {
            what: what.to_string(),
            detail,
        };
        let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(e.to_string()))?;
        if chain.is_empty() {
            return Err(bad("no certificate in the PEM text".into()));
        }
        let key =
            PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| bad(e.to_string()))?;
        Ok(Self { chain, key })
    }
}

/// Congestion control of a QUIC endpoint (what the sender of the bulk —
/// the site — uses decides how a link is filled).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Congestion {
    /// BBR: paces at the measured bottleneck rate and does not back off on
    /// random loss (a lossy WAN link stays full; see BENCHMARKS.md).
    #[default]
    Bbr,
    /// CUBIC: quinn's default; halves its window on loss.
    Cubic,
}

/// The AEAD QUIC packets are sealed with (TLS 1.3 cipher suite) that an
/// endpoint prefers; the others stay allowed for peers that prefer them.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Cipher {
    /// AES-128-GCM (AES-NI and PCLMUL make it the fastest on x86-64).
    #[default]
    #[serde(rename = "aes-128-gcm")]
    Aes128Gcm,
    /// AES-256-GCM.
    #[serde(rename = "aes-256-gcm")]
    Aes256Gcm,
    /// ChaCha20-Poly1305 (fastest on CPUs without AES instructions).
    #[serde(rename = "chacha20-poly1305")]
    Chacha20Poly1305,
}

/// How an endpoint's connections behave.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TransportOptions {
    /// Congestion control.
    pub congestion: Congestion,
    /// Preferred cipher.
    pub cipher: Cipher,
}

fn provider_with(cipher: Cipher) -> Arc<CryptoProvider> {
    use rustls::crypto::ring::cipher_suite as cs;
    let first = match cipher {
        Cipher::Aes128Gcm => cs::TLS13_AES_128_GCM_SHA256,
        Cipher::Aes256Gcm => cs::TLS13_AES_256_GCM_SHA384,
        Cipher::Chacha20Poly1305 => cs::TLS13_CHACHA20_POLY1305_SHA256,
    };
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites.retain(|s| s.suite() != first.suite());
    p.cipher_suites.insert(0, first);
    Arc::new(p)
}

fn provider() -> Arc<CryptoProvider> {
    provider_with(Cipher::default())
}

fn tls_err(what: &str) -> impl FnOnce(rustls::Error) -> PkiError + '_ {
    move |e| PkiError::Invalid {
        what: what.to_string(),
        detail: e.to_string(),
    }
}

fn roots(ca: &CertificateDer<'static>) -> Result<Arc<RootCertStore>, PkiError> {
    let mut roots = RootCertStore::empty();
    roots.add(ca.clone()).map_err(tls_err("site CA"))?;
    Ok(Arc::new(roots))
}

/// What a sender buffers per connection, sent or not: several
/// bandwidth-delay products of a gigabit WAN link, and a bound on the
/// sender's memory per peer when it reads faster than it can encrypt. A
/// site sending to many DPs at once shares a budget among them instead
/// (`Connection::set_send_window`).
pub const SEND_WINDOW: u64 = 16 << 20;

/// Datagrams quinn 0.11 hands the kernel in one GSO send, at most
/// (`MAX_TRANSMIT_SEGMENTS` in quinn's `connection.rs`).
pub const GSO_SEGMENTS: u16 = 10;

/// The largest UDP payload the kernel takes in one GSO send over IPv4
/// (65,535 bytes of IP packet less its 20-byte header and UDP's 8; IPv6
/// allows 20 more).
pub const GSO_PAYLOAD_BYTES: u16 = 65_507;

/// The largest QUIC datagram (UDP payload) Ferry's path MTU discovery
/// probes for: [`GSO_SEGMENTS`] of them must fit one GSO send, or Linux
/// refuses the send and quinn drops the batch without a word (ten
/// 8,952-byte datagrams, what a 9,000-byte MTU holds, would be 89,520
/// bytes). 6,550 bytes on a jumbo-frame path: 4.5× the 1,452 of Ethernet.
pub const MAX_DATAGRAM: u16 = GSO_PAYLOAD_BYTES / GSO_SEGMENTS;
const _: () = assert!(MAX_DATAGRAM as u32 * GSO_SEGMENTS as u32 <= GSO_PAYLOAD_BYTES as u32);

/// Transport limits both sides use: at most
/// [`MAX_STREAMS`](ferry_wire::MAX_STREAMS) bidirectional streams open per
/// connection, none unidirectional, windows large enough for loopback and
/// LAN speeds, keep-alives so a dead peer is noticed in
/// [`IDLE_TIMEOUT`].
pub fn transport(congestion: Congestion) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    match congestion {
        Congestion::Bbr => {
            t.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()));
        }
        Congestion::Cubic => {
            t.congestion_controller_factory(Arc::new(quinn::congestion::CubicConfig::default()));
        }
    }
    // Path MTU discovery past Ethernet's 1,500 bytes where both ends and
    // the path allow (jumbo frames between a site and its large DPs): fewer
    // packets, and less CPU, per gigabyte. quinn probes up to the bound and
    // keeps 1,452 bytes where probes are lost; a path that starts dropping
    // large datagrams is a black hole it falls back from.
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(MAX_DATAGRAM);
    t.mtu_discovery_config(Some(mtu));
    t.max_concurrent_bidi_streams(ferry_wire::MAX_STREAMS.into());
    t.max_concurrent_uni_streams(0u32.into());
    // What a receiver buffers before its application reads, per stream and
    // per connection: a DP asks for at most 4 streams × 8 MiB at a time,
    // and each MiB buffered here is DP memory.
    t.stream_receive_window((8u32 << 20).into());
    t.receive_window((32u32 << 20).into());
    t.send_window(SEND_WINDOW);
    t.keep_alive_interval(Some(KEEP_ALIVE));
    // 20 s fits a u32 of milliseconds; the conversion cannot fail.
    t.max_idle_timeout(quinn::IdleTimeout::try_from(IDLE_TIMEOUT).ok());
    Arc::new(t)
}

/// Kernel buffer of each endpoint's UDP socket, each way. The default
/// (about 200 KiB) holds a millisecond at the rates Ferry moves; a receiver
/// busy for longer drops what the kernel cannot queue, and the sender
/// resends it.
pub const UDP_BUFFER_BYTES: usize = 16 << 20;

/// A UDP socket bound to `addr` with [`UDP_BUFFER_BYTES`] of kernel buffer
/// each way: forced past `net.core.rmem_max` when the process may
/// (CAP_NET_ADMIN), else as much as the limit allows.
pub fn udp_socket(addr: std::net::SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use rustix::net::sockopt;
    let s = std::net::UdpSocket::bind(addr)?;
    if sockopt::set_socket_recv_buffer_size_force(&s, UDP_BUFFER_BYTES).is_err() {
        let _ = sockopt::set_socket_recv_buffer_size(&s, UDP_BUFFER_BYTES);
    }
    if sockopt::set_socket_send_buffer_size_force(&s, UDP_BUFFER_BYTES).is_err() {
        let _ = sockopt::set_socket_send_buffer_size(&s, UDP_BUFFER_BYTES);
    }
    Ok(s)
}

/// A QUIC endpoint on [`udp_socket`]`(addr)`: a server when `server` is
/// given, else a client only.
pub fn endpoint(
    addr: std::net::SocketAddr,
    server: Option<quinn::ServerConfig>,
) -> std::io::Result<quinn::Endpoint> {
    let socket = udp_socket(addr)?;
    let runtime = quinn::default_runtime()
        .ok_or_else(|| std::io::Error::other("no async runtime for QUIC"))?;
    // What this endpoint tells peers it takes (quinn's default is 1,472,
    // which caps their path MTU discovery at Ethernet's size).
    let mut config = quinn::EndpointConfig::default();
    config
        .max_udp_payload_size(MAX_DATAGRAM)
        .map_err(|e| std::io::Error::other(format!("QUIC endpoint: {e}")))?;
    quinn::Endpoint::new(config, server, socket, runtime)
}

/// How often an idle connection is pinged.
pub const KEEP_ALIVE: Duration = Duration::from_secs(4);
/// A connection with no packet for this long is dead.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(20);

/// The site's QUIC server configuration.
pub fn site_server(
    ca: &CertificateDer<'static>,
    site: Identity,
    opts: TransportOptions,
) -> Result<quinn::ServerConfig, PkiError> {
    let provider = provider_with(opts.cipher);
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(ca)?, provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| PkiError::Invalid {
            what: "client verifier".into(),
            detail: e.to_string(),
        })?;
    let mut chain = site.chain;
    if !chain.iter().any(|c| c == ca) {
        chain.push(ca.clone());
    }
    server(
        provider,
        verifier,
        Identity {
            chain,
            key: site.key,
        },
        "site certificate",
        opts,
    )
}

/// A QUIC server configuration: TLS 1.3 only, Ferry's ALPN, clients
/// checked by `verifier`, `me` presented (`what` names it in errors).
fn server(
    provider: Arc<CryptoProvider>,
    verifier: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    me: Identity,
    what: &str,
    opts: TransportOptions,
) -> Result<quinn::ServerConfig, PkiError> {
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err("TLS versions"))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(me.chain, me.key)
        .map_err(tls_err(what))?;
    tls.alpn_protocols = vec![ferry_wire::ALPN.to_vec()];
    let quic = QuicServerConfig::try_from(tls).map_err(|e| PkiError::Invalid {
        what: "QUIC server config".into(),
        detail: e.to_string(),
    })?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(quic));
    cfg.transport_config(transport(opts.congestion));
    Ok(cfg)
}

fn client(
    tls: rustls::ClientConfig,
    congestion: Congestion,
) -> Result<quinn::ClientConfig, PkiError> {
    let mut tls = tls;
    tls.alpn_protocols = vec![ferry_wire::ALPN.to_vec()];
    let quic = QuicClientConfig::try_from(tls).map_err(|e| PkiError::Invalid {
        what: "QUIC client config".into(),
        detail: e.to_string(),
    })?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
    cfg.transport_config(transport(congestion));
    Ok(cfg)
}

/// An enrolled DP's client configuration: trusts `ca` only, presents `dp`.
pub fn dp_client(
    ca: &CertificateDer<'static>,
    dp: Identity,
    opts: TransportOptions,
) -> Result<quinn::ClientConfig, PkiError> {
    let tls = rustls::ClientConfig::builder_with_provider(provider_with(opts.cipher))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err("TLS versions"))?
        .with_root_certificates(roots(ca)?)
        .with_client_auth_cert(dp.chain, dp.key)
        .map_err(tls_err("DP certificate"))?;
    client(tls, opts.congestion)
}

/// The QUIC server configuration of a DP that pull DPs take chunks from:
/// it presents its own certificate and accepts only clients with a
/// certificate from the site CA `ca` (which DP, and what it may read, its
/// grant says).
pub fn dp_peer_server(
    ca: &CertificateDer<'static>,
    dp: Identity,
    opts: TransportOptions,
) -> Result<quinn::ServerConfig, PkiError> {
    let provider = provider_with(opts.cipher);
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(ca)?, provider.clone())
        .build()
        .map_err(|e| PkiError::Invalid {
            what: "client verifier".into(),
            detail: e.to_string(),
        })?;
    server(provider, verifier, dp, "DP certificate", opts)
}

/// A pull DP's configuration for one source DP: presents `dp`, and accepts
/// the source only with the certificate of fingerprint `fingerprint` (the
/// site's registry says which certificate it issued to that DP).
pub fn dp_peer_client(
    dp: Identity,
    fingerprint: &str,
    opts: TransportOptions,
) -> Result<quinn::ClientConfig, PkiError> {
    pinned_client(Pin::Cert(fingerprint.to_string()), Some(dp), opts)
}

/// The configuration of a DP enrolling: no client certificate; the site is
/// accepted only with a CA of fingerprint `ca_fingerprint` in its chain.
pub fn enroll_client(ca_fingerprint: &str) -> Result<quinn::ClientConfig, PkiError> {
    pinned_client(
        Pin::Ca(ca_fingerprint.to_string()),
        None,
        TransportOptions::default(),
    )
}

/// A client that verifies its server by `pin` and presents `me`, if given.
fn pinned_client(
    pin: Pin,
    me: Option<Identity>,
    opts: TransportOptions,
) -> Result<quinn::ClientConfig, PkiError> {
    let provider = provider_with(opts.cipher);
    let verifier = Pinned {
        pin,
        provider: provider.clone(),
    };
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err("TLS versions"))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier));
    let tls = match me {
        Some(me) => tls
            .with_client_auth_cert(me.chain, me.key)
            .map_err(tls_err("DP certificate"))?,
        None => tls.with_no_client_auth(),
    };
    client(tls, opts.congestion)
}

/// Makes ring the process's default TLS provider (HTTP clients built
/// without an explicit configuration use it). Call once at start; later
/// calls do nothing.
pub fn install_default_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The TLS configuration of a DP's HTTPS listener for clients: its
/// certificate from the site CA, no client certificates (clients show a
/// bearer token), HTTP/1.1, TLS 1.2 and 1.3 (BITS-era clients speak 1.2).
pub fn https_server(identity: Identity) -> Result<Arc<rustls::ServerConfig>, PkiError> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(tls_err("TLS versions"))?
        .with_no_client_auth()
        .with_single_cert(identity.chain, identity.key)
        .map_err(tls_err("HTTPS certificate"))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// The TLS configuration of a client of DPs: trusts the site CA `ca` only.
pub fn https_client(ca: &CertificateDer<'static>) -> Result<rustls::ClientConfig, PkiError> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(tls_err("TLS versions"))?
        .with_root_certificates(roots(ca)?)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

/// The certificate the peer presented, if any.
pub fn peer_cert(conn: &quinn::Connection) -> Option<CertificateDer<'static>> {
    conn.peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?
        .into_iter()
        .next()
}

/// A server verified by a fingerprint.
#[derive(Debug)]
enum Pin {
    /// The site, enrolling: its chain must carry the CA of this
    /// fingerprint (the enrollment token's), and verify against it.
    Ca(String),
    /// A source DP: only the certificate of this fingerprint (the one the
    /// site issued to it); the handshake's signatures are checked with its
    /// key.
    Cert(String),
}

/// Verifies a server by a [`Pin`].
#[derive(Debug)]
struct Pinned {
    pin: Pin,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca_fingerprint = match &self.pin {
            Pin::Cert(fp) if fingerprint(end_entity) == *fp => {
                return Ok(ServerCertVerified::assertion())
            }
            Pin::Cert(_) => {
                return Err(rustls::Error::General(
                    "the source DP's certificate is not the one the site issued to it".into(),
                ))
            }
            Pin::Ca(fp) => fp,
        };
        let ca = intermediates
            .iter()
            .find(|c| fingerprint(c) == *ca_fingerprint)
            .ok_or_else(|| {
                rustls::Error::General(
                    "the site's CA is not the one named in the enrollment token".into(),
                )
            })?;
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let inner =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // The configuration allows TLS 1.3 only.
        Err(rustls::Error::General("TLS 1.2 is not allowed".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
