//! Sans-io multicast sessions: how a DP sends one package to many clients
//! with one stream of UDP datagrams, and how a client rebuilds it.
//!
//! What it is:
//! - [`datagram`]: the datagram header, AES-256-GCM sealing and opening,
//!   and why a datagram is dropped ([`Dropped`]);
//! - [`replay`]: the receiver's anti-replay window over sequence numbers;
//! - [`layout`]: how a package's files are cut into FEC *blocks* (runs of
//!   whole manifest chunks, so a decoded block is checked against the
//!   site-signed manifest before a byte of it counts), and the check of a
//!   layout a DP sent;
//! - [`fec`]: RaptorQ (RFC 6330, the `raptorq` crate) over one block;
//! - [`receiver`]: the client's state machine — datagrams in; source
//!   symbols to write in place, blocks ready to decode, verified blocks,
//!   pass summaries and counters out;
//! - [`schedule`]: the sender's plan of each pass — source symbols plus a
//!   share of repair symbols first, then fresh repair symbols for what
//!   the clients still lack;
//! - [`group`]: the multicast group ranges a DP may use;
//! - [`view`]: a session's counters as operators see them.
//!
//! What it deliberately is not: it opens no socket, reads no clock, spawns
//! nothing and depends on no runtime. The DP's sender thread and `ferry
//! client multicast` drive it; their tests and the fuzzers hit it here.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod datagram;
pub mod fec;
pub mod group;
pub mod layout;
pub mod receiver;
pub mod replay;
pub mod schedule;
pub mod view;

pub use datagram::{Dropped, Header, Kind, SessionKey};
pub use layout::{Block, Layout, LayoutError};
pub use receiver::{Completion, Counters, Event, PassSummary, Receiver, SourceWrite};
pub use replay::ReplayWindow;
pub use schedule::{Need, Schedule, Send};
pub use view::SessionView;
