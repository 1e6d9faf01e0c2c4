//! The crate's one error type, grouped by what failed.

use std::sync::Arc;
use std::time::Duration;

/// An underlying error (redb, bincode, redis, a join error...) kept as an
/// error's [`source`](std::error::Error::source); shared, so the errors
/// holding one stay `Clone`.
pub(crate) type Source = Arc<dyn std::error::Error + Send + Sync + 'static>;

/// A timeout, as a source error.
#[derive(Debug, thiserror::Error)]
#[error("{what} timed out after {after:?}")]
pub(crate) struct TimedOut {
    /// What timed out.
    pub(crate) what: String,
    /// The bound.
    pub(crate) after: Duration,
}

/// Renders `: <source>` after an error's own words, or nothing.
pub(crate) fn colon_source(source: &Option<Source>) -> String {
    source
        .as_ref()
        .map(|s| format!(": {s}"))
        .unwrap_or_default()
}

/// Result alias for the actor runtime.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong inside the actor runtime.
///
/// Per-message failures (a handler error, a poison message) are never an
/// `Error`: they become an [`Outcome`](crate::Outcome). An `Error` means a
/// part of the engine could not do its job, and [`Error::is_transient`] tells
/// the supervisor whether waiting and retrying can help.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The AMQP client reported a failure (I/O, protocol, channel closed).
    #[error("amqp: {0}")]
    Amqp(#[from] lapin::Error),
    /// No connection to the broker right now.
    #[error("not connected to the broker")]
    NotConnected,
    /// The broker could not be reached in time at start-up.
    #[error("could not connect to the broker within {0:?}: {1}")]
    ConnectTimeout(Duration, String),
    /// A broker URL that does not parse.
    #[error("invalid broker URL: {0}")]
    InvalidUrl(String),
    /// The broker cannot be used as configured (credentials, vhost, TLS
    /// certificates): the first connect failed with this and waiting does
    /// not cure it.
    #[error("the broker refuses the connection: {0}")]
    Refused(String),
    /// The broker answered a publish with `basic.nack`.
    #[error("publish nacked by the broker")]
    Nacked,
    /// The broker returned a `mandatory` publish: no queue is bound for it.
    #[error("unroutable: returned by the broker ({code} {text})")]
    Unroutable {
        /// AMQP reply code of the `basic.return` (312 NO_ROUTE).
        code: u16,
        /// The broker's reply text.
        text: String,
    },
    /// The broker answered a publish without a confirm: the channel is not
    /// in confirm mode, so nothing says the message is safe.
    #[error("publish not confirmed: the channel is not in confirm mode")]
    NotConfirmed,
    /// No confirm arrived within the confirm timeout.
    #[error("no publisher confirm within {0:?}")]
    ConfirmTimeout(Duration),
    /// The publish path is saturated: the caller should back off and retry.
    #[error("backpressure: {0}")]
    Backpressure(String),
    /// The engine is shutting down and takes no new work.
    #[error("shutting down")]
    ShuttingDown,
    /// An actor's mailbox is gone (it stopped for good).
    #[error("actor {0} is not running")]
    ActorGone(&'static str),
    /// The durable spool failed (its redb file, a record's encoding, the
    /// blocking task running it).
    #[error("spool: {0}")]
    Spool(#[from] SpoolError),
    /// The message cannot be published as it is (an exchange or routing key
    /// over 255 bytes, ...): trying again cannot help.
    #[error("invalid message: {0}")]
    Invalid(#[from] crate::envelope::InvalidShortString),
    /// A task panicked: a permanent failure, never retried.
    #[error("task panicked: {0}")]
    Panicked(String),
}

impl Error {
    /// Whether retrying later can succeed. Supervisors restart on transient
    /// errors and escalate on the others.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Amqp(e) => e.can_be_recovered(),
            Error::NotConnected
            | Error::ConnectTimeout(..)
            | Error::Nacked
            | Error::NotConfirmed
            | Error::ConfirmTimeout(_)
            | Error::Backpressure(_)
            | Error::Spool(_) => true,
            Error::Unroutable { .. }
            | Error::ShuttingDown
            | Error::ActorGone(_)
            | Error::Invalid(_)
            | Error::InvalidUrl(_)
            | Error::Refused(_)
            | Error::Panicked(_) => false,
        }
    }
}

impl From<actix::MailboxError> for Error {
    fn from(_: actix::MailboxError) -> Self {
        Error::ActorGone("mailbox closed")
    }
}

/// Errors returned by the durable spool (the publisher's `Spool`).
///
/// Hand-written `Error`, not derived: the source is the shared underlying
/// error itself (downcastable to redb's or bincode's type), not the `Arc`
/// around it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum SpoolError {
    /// Appending the record would exceed the configured bound; nothing was
    /// written. The caller should apply backpressure (or drop with a metric).
    Full {
        /// Encoded bytes currently stored in the spool (before the rejected
        /// record), so the caller can log how close to the limit it is.
        bytes: u64,
        /// The configured limit the spool was opened with.
        max_bytes: u64,
    },
    /// The underlying redb database (or the blocking task running it)
    /// failed; the redb (or join) error is the source.
    Storage(Source),
    /// A record could not be encoded or a stored record could not be
    /// decoded: the bincode error is the source, if it was bincode's.
    Codec {
        /// What was wrong.
        reason: String,
        /// The bincode error, if any.
        source: Option<Source>,
    },
}

impl std::fmt::Display for SpoolError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SpoolError::Full { bytes, max_bytes } => {
                write!(
                    f,
                    "spool full: {bytes} bytes stored, limit {max_bytes} bytes"
                )
            }
            SpoolError::Storage(e) => write!(f, "spool storage error: {e}"),
            SpoolError::Codec { reason, source } => {
                write!(f, "spool codec error: {reason}{}", colon_source(source))
            }
        }
    }
}

impl std::error::Error for SpoolError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            SpoolError::Full { .. } => None,
            SpoolError::Storage(e) => Some(&**e),
            SpoolError::Codec { source, .. } => source.as_deref().map(|e| e as _),
        }
    }
}

impl SpoolError {
    /// `true` for [`SpoolError::Full`], the only error that is expected in
    /// normal operation and that clears by itself once the spool drains.
    pub fn is_full(&self) -> bool {
        matches!(self, SpoolError::Full { .. })
    }

    /// Wraps any storage-layer error (redb's error types) into
    /// [`SpoolError::Storage`], keeping it as the source.
    pub(crate) fn storage(e: impl std::error::Error + Send + Sync + 'static) -> SpoolError {
        SpoolError::Storage(Arc::new(e))
    }

    /// A codec error of this crate's own finding (no underlying error).
    pub(crate) fn codec(reason: impl Into<String>) -> SpoolError {
        SpoolError::Codec {
            reason: reason.into(),
            source: None,
        }
    }
}

/// The text of a caught panic's payload (`"panic"` when it is not a string).
pub(crate) fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic".to_owned()
    }
}
