//! How a job of the DP (a transfer, a removal, a validation) ends badly,
//! and how a lost connection is told to an operator.

/// A failed job: either the connection to the site is gone (the session
/// ends and the agent redials) or this job failed and is reported and
/// retried on its own while the session goes on.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Failure {
    /// The connection is gone.
    #[error("{0:#}")]
    Disconnected(anyhow::Error),
    /// The job failed; the connection is fine.
    #[error("{0:#}")]
    Job(anyhow::Error),
}

impl Failure {
    /// `e` as a failure of a job on `conn`: a disconnection when the
    /// connection has closed (the error then is its consequence).
    pub(crate) fn of(conn: &quinn::Connection, e: anyhow::Error) -> Self {
        match conn.close_reason() {
            Some(_) => Self::Disconnected(e),
            None => Self::Job(e),
        }
    }

    /// The connection closed for `reason`.
    pub(crate) fn lost(reason: &quinn::ConnectionError) -> Self {
        Self::Disconnected(anyhow::anyhow!(explain(reason)))
    }

    /// A job's own failure.
    pub(crate) fn job(e: impl Into<anyhow::Error>) -> Self {
        Self::Job(e.into())
    }

    /// Whether the job is retried in this session (else the session ends).
    pub(crate) fn is_retryable(&self) -> bool {
        matches!(self, Self::Job(_))
    }

    /// The error inside, for the log or the session's end.
    pub(crate) fn into_inner(self) -> anyhow::Error {
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
