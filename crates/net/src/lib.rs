//! Ferry's trust material.
//!
//! What it is: [`pki`] makes the site's certificate authority and operator
//! tokens, and writes key files readable by their owner only. The QUIC
//! endpoints that use the CA for mutual TLS between site and distribution
//! points build on it.
//!
//! What it is not: a general X.509 toolkit; it issues what Ferry needs and
//! nothing else.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod pki;
