//! The dedup contract behind flowgate's idempotent consumers.
//!
//! Processing a message is **claim → handle → commit**:
//!
//! 1. [`DedupStore::claim`] takes a *lease* on the message's dedup key (default
//!    [`DEFAULT_LEASE`], 30 s). If the process crashes while handling, the lease
//!    expires and a redelivery can claim again, so a message is never lost.
//! 2. On success, [`DedupStore::commit`] marks the key as done for `ttl`
//!    (default [`DEFAULT_DONE_TTL`], 24 h); redeliveries within that window see
//!    [`Claim::AlreadyDone`] and can be acked without handling.
//! 3. On failure, [`DedupStore::release`] drops the lease so that a retry can
//!    claim immediately.
//!
//! Every claim carries an owner token (a random UUID), so only the current
//! lease holder can commit or release. A late commit after the lease expired
//! (and possibly someone else claimed) does not clobber anything and reports
//! [`CommitOutcome::LeaseLost`].
//!
//! Two implementations are provided: [`MemoryStore`] (bounded, in-process) and
//! [`RedisStore`] (shared between processes, on a reconnecting
//! [`redis::aio::ConnectionManager`]).
//!
//! This file holds the contract: the [`DedupStore`] trait, its answers and
//! errors, and [`key_for`]. The stores are in `memory.rs` and `redis.rs`,
//! and one conformance suite (`conformance.rs`) runs against both.

use std::time::Duration;

use async_trait::async_trait;
use sha2::{Digest, Sha256};
use tokio::time::Instant;

/// Default lease of a claim: how long a handler may run before a redelivery
/// may claim the same key again.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);

/// Default time a committed key is remembered as done.
pub const DEFAULT_DONE_TTL: Duration = Duration::from_secs(24 * 60 * 60);

/// Default timeout of each Redis call (and of connecting).
pub(crate) const DEFAULT_REDIS_TIMEOUT: Duration = Duration::from_secs(2);

/// Shortest lease or TTL applied: Redis rejects `PX 0`, so zero durations are
/// rounded up to this in both stores to keep their behaviour identical.
pub(super) const MIN_DURATION: Duration = Duration::from_millis(1);

/// Errors of a [`DedupStore`].
///
/// Hand-written `Error`, not derived: the source is the backend's error
/// itself (downcastable to `redis::RedisError`), not the `Arc` around it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum DedupError {
    /// The backend cannot be reached right now (connection refused, timeout,
    /// I/O error, server loading or failing over). Transient: the caller must
    /// pause consumption and must not ack the message.
    /// The source is the backend's error (a redis error, a timeout).
    Unavailable(crate::error::Source),
    /// The backend answered with an error that retrying will not fix
    /// (bad configuration, authentication, unexpected reply).
    /// The source is the backend's error.
    Backend(crate::error::Source),
}

impl std::fmt::Display for DedupError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DedupError::Unavailable(e) => write!(f, "dedup store unavailable: {e}"),
            DedupError::Backend(e) => write!(f, "dedup store error: {e}"),
        }
    }
}

impl std::error::Error for DedupError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            DedupError::Unavailable(e) | DedupError::Backend(e) => Some(&**e),
        }
    }
}

impl DedupError {
    /// Whether the error is transient, i.e. the same call may succeed later.
    pub fn is_transient(&self) -> bool {
        matches!(self, DedupError::Unavailable(_))
    }
}

/// Proof of a held lease, returned by a successful [`DedupStore::claim`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ClaimToken {
    /// The dedup key as passed to `claim` (without any store prefix).
    pub key: String,
    /// The random owner id of this lease.
    pub owner: String,
}

/// Result of [`DedupStore::claim`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The lease is ours: handle the message, then commit or release.
    Acquired(ClaimToken),
    /// The key was already processed (and committed within its TTL): ack and skip.
    AlreadyDone,
    /// Someone else holds a live lease on the key: do not handle now.
    InProgress,
}

/// Result of [`DedupStore::commit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitOutcome {
    /// The key is now marked done for the requested TTL.
    Committed,
    /// The lease had expired (and may have been claimed by someone else);
    /// nothing was written.
    LeaseLost,
}

/// A store that records which message keys are being handled or are done.
#[async_trait]
pub trait DedupStore: Send + Sync + 'static {
    /// Tries to take a lease of length `lease` on `key`.
    async fn claim(&self, key: &str, lease: Duration) -> Result<Claim, DedupError>;
    /// Marks the key of `token` as done for `ttl`, if `token` still holds the lease.
    async fn commit(&self, token: &ClaimToken, ttl: Duration) -> Result<CommitOutcome, DedupError>;
    /// Drops the lease of `token` so the key can be claimed again at once.
    /// A no-op if the lease was already lost.
    async fn release(&self, token: &ClaimToken) -> Result<(), DedupError>;
    /// Checks that the backend is reachable.
    async fn ping(&self) -> Result<(), DedupError>;
    /// Unexpired keys evicted so far to respect a capacity (a store that
    /// only expires keys, like Redis with TTLs, evicts none).
    fn evictions(&self) -> u64 {
        0
    }
}

/// What to do with a message that carries no (or an empty) message id
/// (`[dedup] missing_id`: `hash` or `reject`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MissingId {
    /// Derive the key from a SHA-256 of the routing key and body.
    #[default]
    Hash,
    /// Refuse to derive a key (the stage dead-letters it `missing-id`).
    Reject,
}

/// Returned by [`key_for`] when a message has no id and [`MissingId::Reject`] is in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("message has no message id and the dedup policy rejects such messages")]
pub(crate) struct MissingIdRejected;

/// Computes the dedup key of a message.
///
/// The message id is used as is when present and non-empty. Otherwise, with
/// [`MissingId::Hash`], the key is `"h:"` followed by the lowercase hex SHA-256
/// of the routing key (length-prefixed, so `("ab", "c")` and `("a", "bc")`
/// differ) and the body; this is stable across Rust versions and processes.
pub(crate) fn key_for(
    message_id: Option<&str>,
    body: &[u8],
    routing_key: &str,
    missing_id: MissingId,
) -> Result<String, MissingIdRejected> {
    if let Some(id) = message_id.filter(|id| !id.is_empty()) {
        return Ok(id.to_owned());
    }
    match missing_id {
        MissingId::Reject => Err(MissingIdRejected),
        MissingId::Hash => {
            let mut hasher = Sha256::new();
            hasher.update((routing_key.len() as u64).to_le_bytes());
            hasher.update(routing_key.as_bytes());
            hasher.update(body);
            Ok(format!("h:{}", hex::encode(hasher.finalize())))
        }
    }
}

pub(super) fn new_owner() -> String {
    uuid::Uuid::new_v4().to_string()
}

pub(super) fn at_least_min(d: Duration) -> Duration {
    d.max(MIN_DURATION)
}

/// `now + d`, saturating to a far future instead of panicking on overflow.
pub(super) fn deadline(now: Instant, d: Duration) -> Instant {
    const FAR: Duration = Duration::from_secs(100 * 365 * 24 * 60 * 60);
    now.checked_add(at_least_min(d))
        .or_else(|| now.checked_add(FAR))
        .unwrap_or(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    // ----- key_for -----

    #[test]
    fn key_for_uses_message_id() {
        assert_eq!(
            key_for(Some("abc"), b"x", "rk", MissingId::Reject),
            Ok("abc".to_owned())
        );
    }

    #[test]
    fn key_for_hashes_missing_or_empty_id() {
        let a = key_for(None, b"body", "rk", MissingId::Hash).unwrap();
        let b = key_for(Some(""), b"body", "rk", MissingId::Hash).unwrap();
        assert_eq!(a, b);
        assert!(a.starts_with("h:"));
        assert_eq!(a.len(), 2 + 64);
        // Known value: stable across versions and processes.
        let mut h = Sha256::new();
        h.update(2u64.to_le_bytes());
        h.update(b"rk");
        h.update(b"body");
        assert_eq!(a, format!("h:{}", hex::encode(h.finalize())));
        // Routing key and body are not ambiguous when concatenated.
        assert_ne!(
            key_for(None, b"c", "ab", MissingId::Hash),
            key_for(None, b"bc", "a", MissingId::Hash)
        );
        assert_ne!(a, key_for(None, b"body", "rk2", MissingId::Hash).unwrap());
    }

    #[test]
    fn key_for_rejects_missing_id() {
        assert_eq!(
            key_for(None, b"x", "rk", MissingId::Reject),
            Err(MissingIdRejected)
        );
        assert_eq!(
            key_for(Some(""), b"x", "rk", MissingId::Reject),
            Err(MissingIdRejected)
        );
    }

    #[test]
    fn error_transience() {
        let x = || std::sync::Arc::new(std::io::Error::other("x"));
        assert!(DedupError::Unavailable(x()).is_transient());
        assert!(!DedupError::Backend(x()).is_transient());
    }
}
