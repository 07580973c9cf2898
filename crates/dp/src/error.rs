//! What goes wrong on a DP, typed: [`DpError`] for every failure of the
//! crate (what failed, where), and [`Failure`] for how a job of a session
//! (a transfer, a removal, a validation) ends badly.

use std::path::{Path, PathBuf};

use ferry_net::pki::PkiError;
use ferry_store::content::ContentError;
use ferry_store::file::FileError;
use ferry_store::StoreError;
use ferry_wire::WireError;

use ferry_core::units::bytes as human;

/// A compact manifest that did not expand against this DP's copy of the
/// base revision (the agent asks again for the full form).
#[derive(Debug, thiserror::Error)]
#[error("the manifest of {package} revision {revision} in compact form does not check out against revision {base} held here: {why}")]
pub struct CompactMismatch {
    /// The package.
    pub package: String,
    /// The revision asked for.
    pub revision: u32,
    /// The revision it was relative to.
    pub base: u32,
    /// What did not check out.
    pub why: String,
}

/// Why a revision's manifest is refused.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The signature does not check with the site's key.
    #[error("the manifest of {package} revision {revision} is not signed by the site's key: refused (tampered in transit or a different site)")]
    NotSigned {
        /// The package.
        package: String,
        /// The revision.
        revision: u32,
    },
    /// The body does not decode.
    #[error("the manifest of {package} is malformed: {detail}")]
    Malformed {
        /// The package.
        package: String,
        /// What the decoder said.
        detail: String,
    },
    /// The manifest of another package or revision.
    #[error("asked for the manifest of {package} revision {revision}, got {got} revision {got_revision}")]
    Other {
        /// The package asked for.
        package: String,
        /// The revision asked for.
        revision: u32,
        /// The package sent.
        got: String,
        /// The revision sent.
        got_revision: u32,
    },
    /// A path twice.
    #[error("the manifest of {package} names {path} twice")]
    Twice {
        /// The package.
        package: String,
        /// The path.
        path: String,
    },
    /// No files.
    #[error("the manifest of {package} lists no files")]
    Empty {
        /// The package.
        package: String,
    },
    /// A path that is a file and a folder of another.
    #[error("the manifest of {package} names {path} as a file and as a folder")]
    FileAndFolder {
        /// The package.
        package: String,
        /// The path.
        path: String,
    },
}

/// A failure of the DP, naming what failed and where.
#[derive(Debug, thiserror::Error)]
pub enum DpError {
    /// A file or folder of the DP.
    #[error("cannot {op} {}: {source}", .path.display())]
    Io {
        /// What was being done ("read the DP certificate").
        op: String,
        /// The file or folder.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The network: a socket, a name lookup, a stream.
    #[error("{what}: {source}")]
    Net {
        /// What was being done.
        what: String,
        /// The OS or QUIC error.
        source: std::io::Error,
    },
    /// `dp.toml` does not parse.
    #[error("{} is not a valid DP configuration: {source}", .path.display())]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        source: Box<toml::de::Error>,
    },
    /// The folder or the command is not one the DP can use (given by the
    /// operator; the text says what to do instead).
    #[error("{0}")]
    Usage(String),
    /// The site refused a request, in its own words.
    #[error("the site refused {what}: {message}")]
    Refused {
        /// The request ("the session", "the enrollment").
        what: String,
        /// The site's message.
        message: String,
    },
    /// The site revoked this DP (its reason): redialling is pointless.
    #[error("revoked by the site ({0}): this DP is refused from now on; enroll a new one with `ferry dp add` and `ferry dp init` in a fresh folder")]
    Revoked(String),
    /// The site (or a DP it vouched for) sent what the protocol does not
    /// allow, or did not answer.
    #[error("{0}")]
    Protocol(String),
    /// The connection to the site is gone (why, in operator terms).
    #[error("{0}")]
    Disconnected(String),
    /// A revision's manifest is not what the site signed.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// A compact manifest did not expand against the base held here.
    #[error(transparent)]
    Compact(#[from] CompactMismatch),
    /// A key or certificate.
    #[error(transparent)]
    Pki(#[from] PkiError),
    /// The DP's content store.
    #[error(transparent)]
    Content(Box<ContentError>),
    /// The library of the older layout (read once, when migrating).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A file being written.
    #[error(transparent)]
    File(#[from] FileError),
    /// A frame of the protocol.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The transfer could not go on: its chunk streams kept breaking or
    /// stalled past the limits of the transfer machine.
    #[error("{0}")]
    Transfer(String),
    /// Not enough free space to stage a revision.
    #[error("not enough space on DP {dp} for {package} revision {revision}: it needs {} more ({} of files, {} margin) at {}, {} free; free at least {}", human(*.need), human(*.files), human(*.margin), .at.display(), human(*.free), human(.need.saturating_sub(*.free)))]
    NoSpace {
        /// The DP.
        dp: String,
        /// The package.
        package: String,
        /// The revision.
        revision: u32,
        /// Bytes still to allocate, margin included.
        need: u64,
        /// Bytes of the revision's files.
        files: u64,
        /// The margin kept free.
        margin: u64,
        /// The content folder.
        at: PathBuf,
        /// Bytes free there.
        free: u64,
    },
    /// The disk filled while a staged revision was written.
    #[error("the disk of DP {dp} is full while writing {what} ({} free at {}; the revision's files are allocated already): free at least {} so the DP can record its progress; it goes on by itself: {source}", human(*.free), .at.display(), human(*.margin))]
    DiskFull {
        /// The DP.
        dp: String,
        /// "PACKAGE revision N".
        what: String,
        /// Bytes free.
        free: u64,
        /// The stage's folder.
        at: PathBuf,
        /// The margin to free.
        margin: u64,
        /// What the store said.
        source: Box<ContentError>,
    },
    /// A task or thread of the DP itself stopped.
    #[error("{0}")]
    Stopped(String),
    /// One of the above, with what was being done.
    #[error("{what}: {source}")]
    Context {
        /// What was being done.
        what: String,
        /// What went wrong.
        source: Box<DpError>,
    },
}

impl DpError {
    /// A file system error on `path`.
    pub(crate) fn io(op: impl Into<String>, path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            op: op.into(),
            path: path.to_path_buf(),
            source,
        }
    }

    /// A network error while doing `what`.
    pub(crate) fn net(what: impl Into<String>, source: impl Into<std::io::Error>) -> Self {
        Self::Net {
            what: what.into(),
            source: source.into(),
        }
    }

    /// The site broke the protocol.
    pub(crate) fn protocol(what: impl Into<String>) -> Self {
        Self::Protocol(what.into())
    }

    /// A task or thread of the DP stopped.
    pub(crate) fn stopped(what: impl Into<String>) -> Self {
        Self::Stopped(what.into())
    }

    /// The connection closed for `reason`.
    pub(crate) fn lost(reason: &quinn::ConnectionError) -> Self {
        Self::Disconnected(explain(reason))
    }

    /// Whether the innermost error is a compact manifest that did not check
    /// out (the agent then asks for the full form).
    pub(crate) fn is_compact_mismatch(&self) -> bool {
        match self {
            Self::Compact(_) => true,
            Self::Context { source, .. } => source.is_compact_mismatch(),
            _ => false,
        }
    }
}

/// A result of the crate.
pub(crate) type Result<T, E = DpError> = std::result::Result<T, E>;

impl From<ContentError> for DpError {
    fn from(e: ContentError) -> Self {
        Self::Content(Box::new(e))
    }
}

/// A task that panicked or was cancelled.
impl From<tokio::task::JoinError> for DpError {
    fn from(e: tokio::task::JoinError) -> Self {
        Self::stopped(format!("a task of the DP stopped: {e}"))
    }
}

/// The sender of a watched value went away: the task that fed it stopped.
impl From<tokio::sync::watch::error::RecvError> for DpError {
    fn from(_: tokio::sync::watch::error::RecvError) -> Self {
        Self::stopped("the control stream's reader stopped")
    }
}

/// QUIC errors are network errors; a closed connection is explained.
impl From<quinn::ConnectionError> for DpError {
    fn from(e: quinn::ConnectionError) -> Self {
        Self::lost(&e)
    }
}

impl From<quinn::WriteError> for DpError {
    fn from(e: quinn::WriteError) -> Self {
        match e {
            quinn::WriteError::ConnectionLost(c) => Self::lost(&c),
            e => Self::net("cannot send to the site", e),
        }
    }
}

impl From<quinn::ReadError> for DpError {
    fn from(e: quinn::ReadError) -> Self {
        match e {
            quinn::ReadError::ConnectionLost(c) => Self::lost(&c),
            e => Self::net("cannot read from the site", e),
        }
    }
}

/// What the site answered a request for `what` with: the reply `pick`
/// takes, its refusal as [`DpError::Refused`], anything else (or nothing)
/// as a protocol error.
pub(crate) fn answer<T>(
    reply: Option<ferry_wire::pb::Reply>,
    what: &str,
    pick: impl FnOnce(ferry_wire::pb::reply::Kind) -> Option<T>,
) -> Result<T> {
    use ferry_wire::pb::reply::Kind;
    match reply.and_then(|r| r.kind) {
        Some(Kind::Error(e)) => Err(DpError::Refused {
            what: what.into(),
            message: e.message,
        }),
        other => other.and_then(pick).ok_or_else(|| {
            DpError::protocol(format!(
                "the site answered the request for {what} with something else"
            ))
        }),
    }
}

/// `.context(…)` for results and options, as the crate's errors take it.
pub(crate) trait Context<T> {
    /// Says what was being done when it failed.
    fn context(self, what: impl Into<String>) -> Result<T, DpError>;
    /// The same, with the text made only on failure.
    fn with_context<S: Into<String>>(self, what: impl FnOnce() -> S) -> Result<T, DpError>;
}

impl<T, E: Into<DpError>> Context<T> for Result<T, E> {
    fn context(self, what: impl Into<String>) -> Result<T, DpError> {
        self.map_err(|e| DpError::Context {
            what: what.into(),
            source: Box::new(e.into()),
        })
    }

    fn with_context<S: Into<String>>(self, what: impl FnOnce() -> S) -> Result<T, DpError> {
        self.map_err(|e| DpError::Context {
            what: what().into(),
            source: Box::new(e.into()),
        })
    }
}

/// A failed job: either the connection to the site is gone (the session
/// ends and the agent redials) or this job failed and is reported and
/// retried on its own while the session goes on.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Failure {
    /// The connection is gone.
    #[error(transparent)]
    Disconnected(DpError),
    /// The job failed; the connection is fine.
    #[error(transparent)]
    Job(DpError),
}

impl Failure {
    /// `e` as a failure of a job on `conn`: a disconnection when the
    /// connection has closed (the error then is its consequence).
    pub(crate) fn of(conn: &quinn::Connection, e: DpError) -> Self {
        match conn.close_reason() {
            Some(_) => Self::Disconnected(e),
            None => Self::Job(e),
        }
    }

    /// The connection closed for `reason`.
    pub(crate) fn lost(reason: &quinn::ConnectionError) -> Self {
        Self::Disconnected(DpError::lost(reason))
    }

    /// A job's own failure.
    pub(crate) fn job(e: impl Into<DpError>) -> Self {
        Self::Job(e.into())
    }

    /// Whether the job is retried in this session (else the session ends).
    pub(crate) fn is_retryable(&self) -> bool {
        matches!(self, Self::Job(_))
    }

    /// The error inside, for the log or the session's end.
    pub(crate) fn into_inner(self) -> DpError {
        match self {
            Self::Disconnected(e) | Self::Job(e) => e,
        }
    }
}

/// Explains a lost connection in operator terms.
pub(crate) fn explain(e: &quinn::ConnectionError) -> String {
    match e {
        quinn::ConnectionError::ApplicationClosed(c) => format!(
            "the site closed the connection: {}",
            String::from_utf8_lossy(&c.reason)
        ),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_reads_outside_in_and_a_mismatch_is_found_under_it() {
        let e: Result<(), DpError> = Err(CompactMismatch {
            package: "FRY00001".into(),
            revision: 3,
            base: 2,
            why: "chunk 7 missing".into(),
        }
        .into());
        let e = e.context("manifest of FRY00001").unwrap_err();
        assert!(e.is_compact_mismatch());
        let text = e.to_string();
        assert!(
            text.starts_with("manifest of FRY00001: ") && text.contains("chunk 7 missing"),
            "{text}"
        );
        let io = DpError::io(
            "read the DP certificate",
            Path::new("/d/dp.pem"),
            std::io::ErrorKind::NotFound.into(),
        );
        assert!(!io.is_compact_mismatch());
        assert!(
            io.to_string()
                .starts_with("cannot read the DP certificate /d/dp.pem: "),
            "{io}"
        );
    }
}
