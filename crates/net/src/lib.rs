//! Ferry's trust material.
//!
//! What it is: [`pki`] makes the site's certificate authority, certificates
//! for the site and its DPs, enrollment and operator tokens, the manifest
//! signing key, and writes key files readable by their owner only.
//! [`client_token`] signs and checks the bearer tokens of the computers that
//! download from DPs, [`grant`] the site's leave for a pull DP to read a
//! revision from a source DP. [`pace`] holds chunk bytes to a rate and to
//! transfer windows, and [`chunk_stream`] serves a chunk stream with it.
//! [`tls`]
//! builds the QUIC (quinn + rustls, TLS 1.3) configurations with mutual
//! authentication by that CA.
//!
//! What it is not: a general X.509 toolkit; it issues what Ferry needs and
//! nothing else.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod chunk_stream;
pub mod client_token;
pub mod grant;
pub mod https;
pub mod metrics;
pub mod pace;
pub mod pki;
pub mod tls;
