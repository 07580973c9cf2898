//! Distribution to DPs: what the site knows of them ([`registry`]: enrollment,
//! groups, assignments, reports, kept in the library's `state`), the QUIC
//! endpoint they talk to ([`endpoint`]), the views operators read
//! ([`status`]), and DP content validation on demand and on a schedule
//! ([`validation`], on `crate::schedule`'s five-field cron), and the tokens
//! of the computers that download from DPs ([`clients`]).

pub mod clients;
pub mod endpoint;
pub mod multicast;
pub mod registry;
pub mod status;
pub mod validation;
