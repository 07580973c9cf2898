//! Distribution to DPs: what the site knows of them ([`records`]:
//! enrollment, groups, assignments, reports; kept in memory by
//! [`registry`]'s `Hub` and written by [`persist`]'s one writer into the
//! library's `state`), the QUIC endpoint they talk to ([`endpoint`]) and
//! the connections it holds open ([`live`]), the
//! views operators read ([`status`]), DP content validation on demand and
//! on a schedule ([`validation`], on `crate::schedule`'s cron), the tokens
//! of the computers that download from DPs ([`clients`]) and multicast
//! settings ([`multicast`]).

pub mod admission;
pub mod clients;
pub(crate) mod endpoint;
pub mod live;
pub mod multicast;
pub(crate) mod persist;
pub mod prestage;
pub(crate) mod pull;
pub mod records;
pub(crate) mod registry;
pub mod settings;
pub mod status;
pub mod validation;
