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
    Spool(#[from] crate::publisher::SpoolError),
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
            | Error::Panicked(_) => false,
        }
    }
}

impl From<actix::MailboxError> for Error {
    fn from(_: actix::MailboxError) -> Self {
        Error::ActorGone("mailbox closed")
    }
}
