//! Deduplication store behind flowgate's idempotent consumers.
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

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use dashmap::DashMap;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use sha2::{Digest, Sha256};
use tokio::time::Instant;

/// Default lease of a claim: how long a handler may run before a redelivery
/// may claim the same key again.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);

/// Default time a committed key is remembered as done.
pub const DEFAULT_DONE_TTL: Duration = Duration::from_secs(24 * 60 * 60);

/// Default timeout of each Redis call (and of connecting).
pub const DEFAULT_REDIS_TIMEOUT: Duration = Duration::from_secs(2);

/// Shortest lease or TTL applied: Redis rejects `PX 0`, so zero durations are
/// rounded up to this in both stores to keep their behaviour identical.
const MIN_DURATION: Duration = Duration::from_millis(1);

/// Errors of a [`DedupStore`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DedupError {
    /// The backend cannot be reached right now (connection refused, timeout,
    /// I/O error, server loading or failing over). Transient: the caller must
    /// pause consumption and must not ack the message.
    #[error("dedup store unavailable: {0}")]
    Unavailable(String),
    /// The backend answered with an error that retrying will not fix
    /// (bad configuration, authentication, unexpected reply).
    #[error("dedup store error: {0}")]
    Backend(String),
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
}

/// What to do with a message that carries no (or an empty) message id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MissingId {
    /// Derive the key from a SHA-256 of the routing key and body.
    #[default]
    Hash,
    /// Refuse to derive a key ([`MissingIdRejected`]).
    Reject,
}

/// Returned by [`key_for`] when a message has no id and [`MissingId::Reject`] is in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("message has no message id and the dedup policy rejects such messages")]
pub struct MissingIdRejected;

/// Computes the dedup key of a message.
///
/// The message id is used as is when present and non-empty. Otherwise, with
/// [`MissingId::Hash`], the key is `"h:"` followed by the lowercase hex SHA-256
/// of the routing key (length-prefixed, so `("ab", "c")` and `("a", "bc")`
/// differ) and the body; this is stable across Rust versions and processes.
pub fn key_for(
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

fn new_owner() -> String {
    uuid::Uuid::new_v4().to_string()
}

fn at_least_min(d: Duration) -> Duration {
    d.max(MIN_DURATION)
}

/// `now + d`, saturating to a far future instead of panicking on overflow.
fn deadline(now: Instant, d: Duration) -> Instant {
    const FAR: Duration = Duration::from_secs(100 * 365 * 24 * 60 * 60);
    now.checked_add(at_least_min(d))
        .or_else(|| now.checked_add(FAR))
        .unwrap_or(now)
}

// ---------------------------------------------------------------------------
// Memory store
// ---------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum State {
    Leased { owner: String, until: Instant },
    Done { until: Instant },
}

#[derive(Debug, Clone)]
struct Entry {
    state: State,
    /// Sequence number of this entry's current record in [`Order`]; records
    /// with another sequence number for the same key are stale.
    seq: u64,
}

impl Entry {
    /// The claim answer this entry gives at `now`, or `None` if it expired.
    fn live_claim(&self, now: Instant) -> Option<Claim> {
        match &self.state {
            State::Leased { until, .. } if *until > now => Some(Claim::InProgress),
            State::Done { until } if *until > now => Some(Claim::AlreadyDone),
            _ => None,
        }
    }
}

/// Insertion/commit order of the entries, oldest first.
#[derive(Debug, Default)]
struct Order {
    next_seq: u64,
    records: VecDeque<(u64, Arc<str>)>,
}

impl Order {
    fn take_seq(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        seq
    }
}

/// An in-process, capacity-bounded [`DedupStore`].
///
/// Times are [`tokio::time::Instant`]s, so tests with a paused clock work.
/// Expired entries count as absent. When a new key would exceed the capacity,
/// the oldest entries (by claim or commit time) are evicted, done or expired
/// ones first; a live lease is evicted only if every entry is a live lease.
/// Both the map and its auxiliary order queue are bounded by the capacity
/// (the queue by capacity plus a slack of a quarter of it, plus 16).
#[derive(Debug)]
pub struct MemoryStore {
    entries: DashMap<Arc<str>, Entry>,
    /// Lock order: `order` first, then map shards; never the reverse.
    /// Every insertion of a key and every commit happens under this lock.
    order: Mutex<Order>,
    capacity: usize,
    slack: usize,
    evictions: AtomicU64,
}

impl MemoryStore {
    /// Creates a store holding at most `capacity` keys (at least 1).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            entries: DashMap::new(),
            order: Mutex::new(Order::default()),
            capacity,
            slack: capacity / 4 + 16,
            evictions: AtomicU64::new(0),
        }
    }

    /// The maximum number of keys held.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The number of keys held, including expired ones not yet purged.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the store holds no key.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// How many unexpired entries were evicted to respect the capacity.
    pub fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }

    fn lock_order(&self) -> MutexGuard<'_, Order> {
        // A panic while holding the lock can at worst leave a stale record or a
        // map entry one record short; both are harmless, so ignore poisoning.
        self.order
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn live_claim(&self, key: &str, now: Instant) -> Option<Claim> {
        self.entries.get(key).and_then(|e| e.live_claim(now))
    }

    /// Removes one entry to make room. Returns false if nothing could be removed.
    fn evict_one(&self, order: &mut Order, now: Instant) -> bool {
        let mut idx = 0;
        while idx < order.records.len() {
            let (seq, key) = &order.records[idx];
            let seq = *seq;
            // None: stale record; Some(true): live lease; Some(false): evictable.
            let (status, live) = match self.entries.get(&**key) {
                Some(e) if e.seq == seq => {
                    let live = e.live_claim(now);
                    (
                        Some(matches!(live, Some(Claim::InProgress))),
                        live.is_some(),
                    )
                }
                _ => (None, false),
            };
            match status {
                Some(true) => idx += 1,
                None => {
                    order.records.remove(idx);
                }
                Some(false) => {
                    if let Some((seq, key)) = order.records.remove(idx) {
                        self.entries.remove_if(&*key, |_, e| e.seq == seq);
                        if live {
                            self.evictions.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    return true;
                }
            }
        }
        // Only live leases remain: the oldest one has to go.
        if let Some((seq, key)) = order.records.pop_front() {
            self.entries.remove_if(&*key, |_, e| e.seq == seq);
            self.evictions.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                key = %key,
                capacity = self.capacity,
                "dedup memory store full of live leases; evicted the oldest lease"
            );
            return true;
        }
        false
    }

    /// Appends a record and drops stale records if the queue grew past its bound.
    fn push_record(&self, order: &mut Order, seq: u64, key: Arc<str>) {
        order.records.push_back((seq, key));
        if order.records.len() > self.capacity + self.slack {
            order
                .records
                .retain(|(seq, key)| self.entries.get(&**key).is_some_and(|e| e.seq == *seq));
        }
    }

    fn claim_now(&self, key: &str, lease: Duration) -> Claim {
        let now = Instant::now();
        if let Some(claim) = self.live_claim(key, now) {
            return claim;
        }
        let mut order = self.lock_order();
        // Re-check: another claimer may have inserted while we waited for the lock.
        if let Some(claim) = self.live_claim(key, now) {
            return claim;
        }
        if !self.entries.contains_key(key) {
            while self.entries.len() >= self.capacity {
                if !self.evict_one(&mut order, now) {
                    break;
                }
            }
        }
        let owner = new_owner();
        let seq = order.take_seq();
        let key_arc: Arc<str> = Arc::from(key);
        self.entries.insert(
            Arc::clone(&key_arc),
            Entry {
                state: State::Leased {
                    owner: owner.clone(),
                    until: deadline(now, lease),
                },
                seq,
            },
        );
        self.push_record(&mut order, seq, key_arc);
        Claim::Acquired(ClaimToken {
            key: key.to_owned(),
            owner,
        })
    }

    fn commit_now(&self, token: &ClaimToken, ttl: Duration) -> CommitOutcome {
        let now = Instant::now();
        let mut order = self.lock_order();
        let seq = order.next_seq;
        let committed_key = match self.entries.get_mut(token.key.as_str()) {
            Some(mut e) => match &e.state {
                State::Leased { owner, until } if *owner == token.owner && *until > now => {
                    e.state = State::Done {
                        until: deadline(now, ttl),
                    };
                    e.seq = seq;
                    Some(Arc::clone(e.key()))
                }
                _ => None,
            },
            None => None,
        };
        // The shard guard is dropped here, before push_record reads the map.
        match committed_key {
            Some(key) => {
                order.next_seq += 1;
                self.push_record(&mut order, seq, key);
                CommitOutcome::Committed
            }
            None => CommitOutcome::LeaseLost,
        }
    }

    fn release_now(&self, token: &ClaimToken) {
        // Only removes; the entry's record becomes stale and is dropped later.
        self.entries.remove_if(
            token.key.as_str(),
            |_, e| matches!(&e.state, State::Leased { owner, .. } if *owner == token.owner),
        );
    }

    #[cfg(test)]
    fn order_len(&self) -> usize {
        self.lock_order().records.len()
    }
}

#[async_trait]
impl DedupStore for MemoryStore {
    async fn claim(&self, key: &str, lease: Duration) -> Result<Claim, DedupError> {
        Ok(self.claim_now(key, lease))
    }

    async fn commit(&self, token: &ClaimToken, ttl: Duration) -> Result<CommitOutcome, DedupError> {
        Ok(self.commit_now(token, ttl))
    }

    async fn release(&self, token: &ClaimToken) -> Result<(), DedupError> {
        self.release_now(token);
        Ok(())
    }

    async fn ping(&self) -> Result<(), DedupError> {
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Redis store
// ---------------------------------------------------------------------------

const LEASE_PREFIX: &str = "lease:";
const DONE_VALUE: &str = "done";

/// KEYS[1] = key, ARGV[1] = expected lease value, ARGV[2] = ttl in ms.
const COMMIT_LUA: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], 'done', 'PX', ARGV[2])
  return 1
end
return 0
"#;

/// KEYS[1] = key, ARGV[1] = expected lease value.
const RELEASE_LUA: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;

/// Settings of a [`RedisStore`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisStoreConfig {
    /// Timeout of each Redis call, and of connecting. Default [`DEFAULT_REDIS_TIMEOUT`].
    pub op_timeout: Duration,
    /// Whether [`RedisStore::connect_with`] returns without connecting; the
    /// connection is then made by the first call. Default false.
    pub lazy: bool,
}

impl Default for RedisStoreConfig {
    fn default() -> Self {
        Self {
            op_timeout: DEFAULT_REDIS_TIMEOUT,
            lazy: false,
        }
    }
}

/// A [`DedupStore`] in Redis, shared between processes.
///
/// A lease is the value `lease:<owner>` set with `NX PX`; a done key is `done`
/// with `PX ttl`. All keys are `<prefix><key>`. Each call is bounded by the
/// configured timeout and yields [`DedupError::Unavailable`] when Redis cannot
/// be reached. A call that times out may still have been applied: a claim then
/// looks [`Claim::InProgress`] until its lease expires, which delays but never
/// loses the message.
#[derive(Clone)]
pub struct RedisStore {
    con: ConnectionManager,
    prefix: String,
    op_timeout: Duration,
    commit_script: redis::Script,
    release_script: redis::Script,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .field("op_timeout", &self.op_timeout)
            .finish_non_exhaustive()
    }
}

fn map_redis_error(err: redis::RedisError) -> DedupError {
    use redis::{ErrorKind, ServerErrorKind};
    let transient = err.is_io_error()
        || err.is_timeout()
        || err.is_connection_refusal()
        || err.is_connection_dropped()
        || matches!(
            err.kind(),
            ErrorKind::ClusterConnectionNotFound
                | ErrorKind::Server(
                    ServerErrorKind::BusyLoading
                        | ServerErrorKind::TryAgain
                        | ServerErrorKind::MasterDown
                        | ServerErrorKind::ClusterDown
                        | ServerErrorKind::ReadOnly
                )
        );
    if transient {
        DedupError::Unavailable(err.to_string())
    } else {
        DedupError::Backend(err.to_string())
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(at_least_min(d).as_millis()).unwrap_or(u64::MAX)
}

impl RedisStore {
    /// Connects to `url` (e.g. `redis://127.0.0.1:6379/`) with default settings;
    /// keys are stored as `<prefix><key>`.
    pub async fn connect(url: &str, prefix: &str) -> Result<Self, DedupError> {
        Self::connect_with(url, prefix, RedisStoreConfig::default()).await
    }

    /// Connects to `url` with the given settings.
    pub async fn connect_with(
        url: &str,
        prefix: &str,
        config: RedisStoreConfig,
    ) -> Result<Self, DedupError> {
        let client = redis::Client::open(url)
            .map_err(|e| DedupError::Backend(format!("invalid redis url: {e}")))?;
        let op_timeout = config.op_timeout;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(op_timeout))
            .set_response_timeout(Some(op_timeout))
            // The caller pauses and retries on Unavailable, so retry connecting
            // only once here: a refused connection then fails in ~150 ms.
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1));
        let con = if config.lazy {
            ConnectionManager::new_lazy_with_config(client, manager_config)
                .map_err(map_redis_error)?
        } else {
            match tokio::time::timeout(
                op_timeout,
                ConnectionManager::new_with_config(client, manager_config),
            )
            .await
            {
                Ok(Ok(con)) => con,
                Ok(Err(e)) => return Err(map_redis_error(e)),
                Err(_) => {
                    return Err(DedupError::Unavailable(format!(
                        "connecting to redis timed out after {op_timeout:?}"
                    )))
                }
            }
        };
        Ok(Self {
            con,
            prefix: prefix.to_owned(),
            op_timeout,
            commit_script: redis::Script::new(COMMIT_LUA),
            release_script: redis::Script::new(RELEASE_LUA),
        })
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn full_key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    async fn timed<T>(
        &self,
        what: &str,
        fut: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, DedupError> {
        match tokio::time::timeout(self.op_timeout, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(map_redis_error(e)),
            Err(_) => Err(DedupError::Unavailable(format!(
                "redis {what} timed out after {:?}",
                self.op_timeout
            ))),
        }
    }
}

#[async_trait]
impl DedupStore for RedisStore {
    async fn claim(&self, key: &str, lease: Duration) -> Result<Claim, DedupError> {
        let full = self.full_key(key);
        let owner = new_owner();
        let value = format!("{LEASE_PREFIX}{owner}");
        let lease_ms = millis(lease);
        let mut con = self.con.clone();
        // If the key vanishes between a failed SET NX and the GET (it just
        // expired or was released), try again a few times.
        for _ in 0..3 {
            let mut set = redis::cmd("SET");
            set.arg(&full).arg(&value).arg("NX").arg("PX").arg(lease_ms);
            let set: Option<String> = self.timed("SET NX", set.query_async(&mut con)).await?;
            if set.is_some() {
                return Ok(Claim::Acquired(ClaimToken {
                    key: key.to_owned(),
                    owner,
                }));
            }
            let mut get = redis::cmd("GET");
            get.arg(&full);
            let current: Option<String> = self.timed("GET", get.query_async(&mut con)).await?;
            match current {
                Some(v) if v.starts_with(DONE_VALUE) => return Ok(Claim::AlreadyDone),
                Some(_) => return Ok(Claim::InProgress),
                None => continue,
            }
        }
        Ok(Claim::InProgress)
    }

    async fn commit(&self, token: &ClaimToken, ttl: Duration) -> Result<CommitOutcome, DedupError> {
        let mut con = self.con.clone();
        let mut invocation = self.commit_script.key(self.full_key(&token.key));
        invocation
            .arg(format!("{LEASE_PREFIX}{}", token.owner))
            .arg(millis(ttl));
        let done: i64 = self
            .timed("commit", invocation.invoke_async(&mut con))
            .await?;
        if done == 1 {
            Ok(CommitOutcome::Committed)
        } else {
            tracing::warn!(key = %token.key, "dedup commit after the lease was lost");
            Ok(CommitOutcome::LeaseLost)
        }
    }

    async fn release(&self, token: &ClaimToken) -> Result<(), DedupError> {
        let mut con = self.con.clone();
        let mut invocation = self.release_script.key(self.full_key(&token.key));
        invocation.arg(format!("{LEASE_PREFIX}{}", token.owner));
        let deleted: i64 = self
            .timed("release", invocation.invoke_async(&mut con))
            .await?;
        if deleted == 0 {
            tracing::debug!(key = %token.key, "dedup release of a lease no longer held");
        }
        Ok(())
    }

    async fn ping(&self) -> Result<(), DedupError> {
        let mut con = self.con.clone();
        let ping = redis::cmd("PING");
        let _pong: String = self.timed("PING", ping.query_async(&mut con)).await?;
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const LEASE: Duration = Duration::from_secs(30);
    const TTL: Duration = Duration::from_secs(3600);

    fn acquired(c: Claim) -> ClaimToken {
        match c {
            Claim::Acquired(t) => t,
            other => panic!("expected Acquired, got {other:?}"),
        }
    }

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
        assert!(DedupError::Unavailable("x".into()).is_transient());
        assert!(!DedupError::Backend("x".into()).is_transient());
    }

    // ----- memory store -----

    #[tokio::test(start_paused = true)]
    async fn memory_claim_commit_already_done() {
        let s = MemoryStore::new(16);
        let t = acquired(s.claim("m1", LEASE).await.unwrap());
        assert_eq!(t.key, "m1");
        assert_eq!(s.commit(&t, TTL).await.unwrap(), CommitOutcome::Committed);
        assert_eq!(s.claim("m1", LEASE).await.unwrap(), Claim::AlreadyDone);
        // Committing twice is not allowed: the lease is gone.
        assert_eq!(s.commit(&t, TTL).await.unwrap(), CommitOutcome::LeaseLost);
        assert_eq!(s.claim("m1", LEASE).await.unwrap(), Claim::AlreadyDone);
        s.ping().await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn memory_in_progress_while_leased() {
        let s = MemoryStore::new(16);
        let t = acquired(s.claim("m", LEASE).await.unwrap());
        tokio::time::advance(LEASE - Duration::from_millis(1)).await;
        assert_eq!(s.claim("m", LEASE).await.unwrap(), Claim::InProgress);
        assert_eq!(s.commit(&t, TTL).await.unwrap(), CommitOutcome::Committed);
    }

    #[tokio::test(start_paused = true)]
    async fn memory_lease_expiry_allows_reclaim_and_late_commit_is_lost() {
        let s = MemoryStore::new(16);
        let first = acquired(s.claim("m", LEASE).await.unwrap());
        tokio::time::advance(LEASE + Duration::from_millis(1)).await;
        let second = acquired(s.claim("m", LEASE).await.unwrap());
        assert_ne!(first.owner, second.owner);
        assert_eq!(
            s.commit(&first, TTL).await.unwrap(),
            CommitOutcome::LeaseLost
        );
        // The late commit did not clobber the new lease, and a stale release neither.
        s.release(&first).await.unwrap();
        assert_eq!(s.claim("m", LEASE).await.unwrap(), Claim::InProgress);
        assert_eq!(
            s.commit(&second, TTL).await.unwrap(),
            CommitOutcome::Committed
        );
        assert_eq!(s.claim("m", LEASE).await.unwrap(), Claim::AlreadyDone);
    }

    #[tokio::test(start_paused = true)]
    async fn memory_expired_lease_commit_is_lost_even_unclaimed() {
        let s = MemoryStore::new(16);
        let t = acquired(s.claim("m", LEASE).await.unwrap());
        tokio::time::advance(LEASE).await;
        assert_eq!(s.commit(&t, TTL).await.unwrap(), CommitOutcome::LeaseLost);
        acquired(s.claim("m", LEASE).await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn memory_release_allows_reclaim() {
        let s = MemoryStore::new(16);
        let t = acquired(s.claim("m", LEASE).await.unwrap());
        s.release(&t).await.unwrap();
        let t2 = acquired(s.claim("m", LEASE).await.unwrap());
        assert_eq!(s.commit(&t, TTL).await.unwrap(), CommitOutcome::LeaseLost);
        assert_eq!(s.commit(&t2, TTL).await.unwrap(), CommitOutcome::Committed);
        // Releasing a committed key does not undo the commit.
        s.release(&t2).await.unwrap();
        assert_eq!(s.claim("m", LEASE).await.unwrap(), Claim::AlreadyDone);
    }

    #[tokio::test(start_paused = true)]
    async fn memory_done_expires_after_ttl() {
        let s = MemoryStore::new(16);
        let t = acquired(s.claim("m", LEASE).await.unwrap());
        let ttl = Duration::from_secs(60);
        s.commit(&t, ttl).await.unwrap();
        tokio::time::advance(ttl - Duration::from_millis(1)).await;
        assert_eq!(s.claim("m", LEASE).await.unwrap(), Claim::AlreadyDone);
        tokio::time::advance(Duration::from_millis(1)).await;
        acquired(s.claim("m", LEASE).await.unwrap());
        assert_eq!(s.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn memory_capacity_bound_under_10x_inserts() {
        let cap = 100;
        let s = MemoryStore::new(cap);
        for i in 0..10 * cap {
            let t = acquired(s.claim(&format!("k{i}"), LEASE).await.unwrap());
            s.commit(&t, TTL).await.unwrap();
            assert!(s.len() <= cap);
            assert!(s.order_len() <= cap + s.slack);
        }
        assert_eq!(s.len(), cap);
        assert_eq!(s.evictions(), 9 * cap as u64);
        // The newest keys survive, the oldest were evicted.
        assert_eq!(
            s.claim(&format!("k{}", 10 * cap - 1), LEASE).await.unwrap(),
            Claim::AlreadyDone
        );
        acquired(s.claim("k0", LEASE).await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn memory_eviction_prefers_done_over_live_lease() {
        let s = MemoryStore::new(3);
        let lease = acquired(s.claim("leased", LEASE).await.unwrap());
        for k in ["d1", "d2"] {
            let t = acquired(s.claim(k, LEASE).await.unwrap());
            s.commit(&t, TTL).await.unwrap();
        }
        acquired(s.claim("new", LEASE).await.unwrap());
        assert_eq!(s.len(), 3);
        assert_eq!(s.evictions(), 1);
        // The oldest entry was the live lease, but a done entry went instead.
        assert_eq!(s.claim("leased", LEASE).await.unwrap(), Claim::InProgress);
        assert_eq!(s.claim("d2", LEASE).await.unwrap(), Claim::AlreadyDone);
        // d1 was the one evicted; reclaiming it evicts d2, the only done entry.
        acquired(s.claim("d1", LEASE).await.unwrap());
        assert_eq!(s.evictions(), 2);
        assert_eq!(s.claim("leased", LEASE).await.unwrap(), Claim::InProgress);
        assert_eq!(
            s.commit(&lease, TTL).await.unwrap(),
            CommitOutcome::Committed
        );
    }

    #[tokio::test(start_paused = true)]
    async fn memory_expired_entries_go_first_and_are_not_counted() {
        let s = MemoryStore::new(2);
        let t = acquired(s.claim("a", LEASE).await.unwrap());
        s.commit(&t, Duration::from_secs(1)).await.unwrap();
        tokio::time::advance(Duration::from_secs(2)).await;
        acquired(s.claim("b", LEASE).await.unwrap());
        acquired(s.claim("c", LEASE).await.unwrap());
        assert_eq!(s.len(), 2);
        assert_eq!(s.evictions(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn memory_all_leases_evicts_oldest_lease() {
        let s = MemoryStore::new(2);
        let a = acquired(s.claim("a", LEASE).await.unwrap());
        acquired(s.claim("b", LEASE).await.unwrap());
        acquired(s.claim("c", LEASE).await.unwrap());
        assert_eq!(s.len(), 2);
        assert_eq!(s.evictions(), 1);
        assert_eq!(s.commit(&a, TTL).await.unwrap(), CommitOutcome::LeaseLost);
        assert_eq!(s.claim("b", LEASE).await.unwrap(), Claim::InProgress);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn memory_concurrent_claims_one_winner() {
        let s = Arc::new(MemoryStore::new(10_000));
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..4 {
            let s = Arc::clone(&s);
            set.spawn(async move {
                let mut won = Vec::new();
                for i in 0..1000 {
                    if let Claim::Acquired(t) = s.claim(&format!("k{i}"), LEASE).await.unwrap() {
                        won.push(t.key);
                    }
                }
                won
            });
        }
        let mut all = Vec::new();
        while let Some(r) = set.join_next().await {
            all.extend(r.unwrap());
        }
        all.sort();
        let n = all.len();
        all.dedup();
        assert_eq!(n, 1000);
        assert_eq!(all.len(), 1000);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Claim(usize),
        CommitLast,
        ReleaseLast,
        Advance(u64),
    }

    fn op_strategy(keys: usize) -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..keys).prop_map(Op::Claim),
            3 => Just(Op::CommitLast),
            1 => Just(Op::ReleaseLast),
            1 => (0u64..5_000).prop_map(Op::Advance),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn memory_len_never_exceeds_capacity(
            (cap, ops) in (1usize..40).prop_flat_map(|cap| {
                (Just(cap), proptest::collection::vec(op_strategy(cap * 10), 0..(cap * 10 + 50)))
            })
        ) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .start_paused(true)
                .build()
                .unwrap();
            rt.block_on(async {
                let s = MemoryStore::new(cap);
                let mut tokens: Vec<ClaimToken> = Vec::new();
                for op in ops {
                    match op {
                        Op::Claim(k) => {
                            if let Claim::Acquired(t) = s.claim(&format!("k{k}"), Duration::from_secs(3)).await.unwrap() {
                                tokens.push(t);
                            }
                        }
                        Op::CommitLast => {
                            if let Some(t) = tokens.pop() {
                                s.commit(&t, Duration::from_secs(10)).await.unwrap();
                            }
                        }
                        Op::ReleaseLast => {
                            if let Some(t) = tokens.pop() {
                                s.release(&t).await.unwrap();
                            }
                        }
                        Op::Advance(ms) => tokio::time::advance(Duration::from_millis(ms)).await,
                    }
                    prop_assert!(s.len() <= cap, "len {} > cap {}", s.len(), cap);
                    prop_assert!(s.order_len() <= cap + s.slack);
                }
                Ok(())
            })?;
        }
    }

    // ----- redis store -----
    //
    // These need a Redis at FLOWGATE_TEST_REDIS_URL (default
    // redis://127.0.0.1:6379/); set FLOWGATE_SKIP_REDIS_TESTS=1 to skip them.
    // Every test uses its own key prefix, short TTLs, and deletes its keys.

    fn redis_url() -> Option<String> {
        if std::env::var("FLOWGATE_SKIP_REDIS_TESTS").is_ok_and(|v| v == "1") {
            return None;
        }
        Some(
            std::env::var("FLOWGATE_TEST_REDIS_URL")
                .unwrap_or_else(|_| "redis://127.0.0.1:6379/".to_owned()),
        )
    }

    fn test_prefix() -> String {
        format!("flowgate-test:dedup:{}:", uuid::Uuid::new_v4())
    }

    async fn redis_store(prefix: &str) -> Option<RedisStore> {
        let url = redis_url()?;
        Some(
            RedisStore::connect(&url, prefix)
                .await
                .expect("redis must be reachable (or set FLOWGATE_SKIP_REDIS_TESTS=1)"),
        )
    }

    /// Deletes every key under `prefix`.
    async fn cleanup(store: &RedisStore) {
        let mut con = store.con.clone();
        let pattern = format!("{}*", store.prefix);
        let mut cursor: u64 = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut con)
                .await
                .unwrap();
            if !keys.is_empty() {
                let _: i64 = redis::cmd("DEL")
                    .arg(&keys)
                    .query_async(&mut con)
                    .await
                    .unwrap();
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }

    /// Polls `claim` until it is acquired or the deadline passes.
    async fn claim_when_expired(s: &RedisStore, key: &str, lease: Duration) -> ClaimToken {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            match s.claim(key, lease).await.unwrap() {
                Claim::Acquired(t) => return t,
                other => {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "still {other:?} after deadline"
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }

    const SHORT: Duration = Duration::from_millis(200);
    const RTTL: Duration = Duration::from_secs(60);

    #[tokio::test]
    async fn redis_claim_commit_already_done() {
        let prefix = test_prefix();
        let Some(s) = redis_store(&prefix).await else {
            return;
        };
        s.ping().await.unwrap();
        let t = acquired(s.claim("m1", LEASE).await.unwrap());
        assert_eq!(s.claim("m1", LEASE).await.unwrap(), Claim::InProgress);
        assert_eq!(s.commit(&t, RTTL).await.unwrap(), CommitOutcome::Committed);
        assert_eq!(s.claim("m1", LEASE).await.unwrap(), Claim::AlreadyDone);
        assert_eq!(s.commit(&t, RTTL).await.unwrap(), CommitOutcome::LeaseLost);
        // Keys are prefixed.
        let mut con = s.con.clone();
        let v: Option<String> = redis::cmd("GET")
            .arg(format!("{prefix}m1"))
            .query_async(&mut con)
            .await
            .unwrap();
        assert_eq!(v.as_deref(), Some("done"));
        let pttl: i64 = redis::cmd("PTTL")
            .arg(format!("{prefix}m1"))
            .query_async(&mut con)
            .await
            .unwrap();
        assert!(pttl > 50_000 && pttl <= 60_000, "pttl {pttl}");
        cleanup(&s).await;
    }

    #[tokio::test]
    async fn redis_lease_expiry_allows_reclaim_and_late_commit_is_lost() {
        let Some(s) = redis_store(&test_prefix()).await else {
            return;
        };
        let first = acquired(s.claim("m", SHORT).await.unwrap());
        assert_eq!(s.claim("m", SHORT).await.unwrap(), Claim::InProgress);
        let second = claim_when_expired(&s, "m", LEASE).await;
        assert_ne!(first.owner, second.owner);
        assert_eq!(
            s.commit(&first, RTTL).await.unwrap(),
            CommitOutcome::LeaseLost
        );
        s.release(&first).await.unwrap();
        assert_eq!(s.claim("m", LEASE).await.unwrap(), Claim::InProgress);
        assert_eq!(
            s.commit(&second, RTTL).await.unwrap(),
            CommitOutcome::Committed
        );
        assert_eq!(s.claim("m", LEASE).await.unwrap(), Claim::AlreadyDone);
        cleanup(&s).await;
    }

    #[tokio::test]
    async fn redis_expired_lease_commit_is_lost_even_unclaimed() {
        let Some(s) = redis_store(&test_prefix()).await else {
            return;
        };
        let t = acquired(s.claim("m", SHORT).await.unwrap());
        // Wait until the lease is gone (observed through a probe claim on the
        // same key would take it, so poll PTTL instead).
        let mut con = s.con.clone();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let exists: i64 = redis::cmd("EXISTS")
                .arg(s.full_key("m"))
                .query_async(&mut con)
                .await
                .unwrap();
            if exists == 0 {
                break;
            }
            assert!(std::time::Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(s.commit(&t, RTTL).await.unwrap(), CommitOutcome::LeaseLost);
        acquired(s.claim("m", LEASE).await.unwrap());
        cleanup(&s).await;
    }

    #[tokio::test]
    async fn redis_release_allows_reclaim() {
        let Some(s) = redis_store(&test_prefix()).await else {
            return;
        };
        let t = acquired(s.claim("m", LEASE).await.unwrap());
        s.release(&t).await.unwrap();
        let t2 = acquired(s.claim("m", LEASE).await.unwrap());
        assert_eq!(s.commit(&t, RTTL).await.unwrap(), CommitOutcome::LeaseLost);
        s.release(&t).await.unwrap(); // stale release is a no-op
        assert_eq!(s.claim("m", LEASE).await.unwrap(), Claim::InProgress);
        assert_eq!(s.commit(&t2, RTTL).await.unwrap(), CommitOutcome::Committed);
        s.release(&t2).await.unwrap();
        assert_eq!(s.claim("m", LEASE).await.unwrap(), Claim::AlreadyDone);
        cleanup(&s).await;
    }

    #[tokio::test]
    async fn redis_done_expires_after_ttl() {
        let Some(s) = redis_store(&test_prefix()).await else {
            return;
        };
        let t = acquired(s.claim("m", LEASE).await.unwrap());
        s.commit(&t, SHORT).await.unwrap();
        assert_eq!(s.claim("m", LEASE).await.unwrap(), Claim::AlreadyDone);
        claim_when_expired(&s, "m", LEASE).await;
        cleanup(&s).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_two_stores_race_exactly_one_winner_per_key() {
        let prefix = test_prefix();
        let (Some(a), Some(b)) = (redis_store(&prefix).await, redis_store(&prefix).await) else {
            return;
        };
        const N: usize = 1000;
        let mut set = tokio::task::JoinSet::new();
        for store in [a.clone(), b.clone()] {
            for chunk in 0..4 {
                let store = store.clone();
                set.spawn(async move {
                    let mut won = Vec::new();
                    // Interleave directions so the two stores collide on keys.
                    let keys: Vec<usize> = if chunk % 2 == 0 {
                        (0..N).collect()
                    } else {
                        (0..N).rev().collect()
                    };
                    for i in keys {
                        match store.claim(&format!("k{i}"), LEASE).await.unwrap() {
                            Claim::Acquired(_) => won.push(i),
                            Claim::InProgress => {}
                            Claim::AlreadyDone => panic!("nothing was committed"),
                        }
                    }
                    won
                });
            }
        }
        let mut wins = vec![0usize; N];
        while let Some(r) = set.join_next().await {
            for i in r.unwrap() {
                wins[i] += 1;
            }
        }
        assert!(wins.iter().all(|&w| w == 1), "some key had != 1 winner");
        cleanup(&a).await;
    }

    #[tokio::test]
    async fn redis_unreachable_is_unavailable_not_a_hang() {
        let timeout = Duration::from_millis(500);
        let config = RedisStoreConfig {
            op_timeout: timeout,
            lazy: false,
        };
        let started = std::time::Instant::now();
        let err = RedisStore::connect_with("redis://127.0.0.1:1/", "x:", config.clone())
            .await
            .unwrap_err();
        assert!(err.is_transient(), "{err:?}");
        assert!(started.elapsed() < timeout + Duration::from_millis(500));

        // A lazily connected store fails each call quickly too.
        let lazy = RedisStore::connect_with(
            "redis://127.0.0.1:1/",
            "x:",
            RedisStoreConfig {
                lazy: true,
                ..config
            },
        )
        .await
        .unwrap();
        for _ in 0..2 {
            let started = std::time::Instant::now();
            let err = lazy.claim("k", LEASE).await.unwrap_err();
            assert!(err.is_transient(), "{err:?}");
            assert!(started.elapsed() < timeout + Duration::from_millis(500));
            let err = lazy.ping().await.unwrap_err();
            assert!(matches!(err, DedupError::Unavailable(_)), "{err:?}");
        }
    }

    /// Starts a private `redis-server` on a free port, or `None` if the binary is missing.
    fn spawn_private_redis(port: u16) -> Option<std::process::Child> {
        std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .ok()
    }

    fn free_port() -> u16 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    }

    /// Kills the child on drop so a failing test does not leak a server.
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    async fn wait_until_ok(s: &RedisStore) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while s.ping().await.is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "redis did not come back"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    #[tokio::test]
    async fn redis_reconnects_after_server_restart() {
        if redis_url().is_none() {
            return;
        }
        let port = free_port();
        let Some(child) = spawn_private_redis(port) else {
            eprintln!("redis-server binary not found; skipping");
            return;
        };
        let mut server = KillOnDrop(child);
        let url = format!("redis://127.0.0.1:{port}/");
        let config = RedisStoreConfig {
            op_timeout: Duration::from_millis(500),
            lazy: true,
        };
        let s = RedisStore::connect_with(&url, "p:", config).await.unwrap();
        wait_until_ok(&s).await;
        let t = acquired(s.claim("m", LEASE).await.unwrap());

        let _ = server.0.kill();
        let _ = server.0.wait();
        let started = std::time::Instant::now();
        let err = s.commit(&t, RTTL).await.unwrap_err();
        assert!(err.is_transient(), "{err:?}");
        assert!(started.elapsed() < Duration::from_secs(1));
        let err = s.claim("m", LEASE).await.unwrap_err();
        assert!(err.is_transient(), "{err:?}");

        // The restarted server is empty (no persistence): the same store
        // reconnects by itself and can claim again.
        let Some(child) = spawn_private_redis(port) else {
            return;
        };
        let _server = KillOnDrop(child);
        wait_until_ok(&s).await;
        acquired(s.claim("m", LEASE).await.unwrap());
    }

    #[tokio::test]
    async fn redis_silent_server_times_out_as_unavailable() {
        // Accepts connections but never answers.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accept = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((sock, _)) = listener.accept().await {
                held.push(sock);
            }
        });
        let timeout = Duration::from_millis(300);
        let url = format!("redis://127.0.0.1:{port}/");
        let config = RedisStoreConfig {
            op_timeout: timeout,
            lazy: false,
        };
        let started = std::time::Instant::now();
        let err = RedisStore::connect_with(&url, "x:", config.clone())
            .await
            .unwrap_err();
        assert!(err.is_transient(), "{err:?}");
        assert!(started.elapsed() < timeout + Duration::from_millis(500));

        let lazy = RedisStore::connect_with(
            &url,
            "x:",
            RedisStoreConfig {
                lazy: true,
                ..config
            },
        )
        .await
        .unwrap();
        let started = std::time::Instant::now();
        let err = lazy.claim("k", LEASE).await.unwrap_err();
        assert!(err.is_transient(), "{err:?}");
        assert!(started.elapsed() < timeout + Duration::from_millis(500));
        accept.abort();
    }

    #[tokio::test]
    async fn redis_bad_url_is_backend_error() {
        let err = RedisStore::connect("not a url", "x:").await.unwrap_err();
        assert!(!err.is_transient(), "{err:?}");
    }
}
