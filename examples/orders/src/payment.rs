//! The simulated payment provider: a rate limit (the throttled downstream),
//! a latency per call, a transient failure rate, and its own books.
//!
//! Like a real provider it honours an idempotency key: a second charge with
//! a key it has seen returns the first charge and moves no money. Its books
//! count, per order, the calls that reached it, those it failed (its
//! simulated transient errors), and the charges it made. Charges cannot
//! exceed one per order whatever its callers do (the key sees to that);
//! answered calls beyond the first are what the callers' claims failed to
//! prevent — the figure the tests bound and the chaos run reports as
//! duplicate provider calls.
//! They live outside the worker that calls it (in Redis when
//! `[orders] redis_url` is set, the provider being another service), so a
//! SIGKILLed worker cannot take them along.

use crate::config::OrdersConfig;
use crate::ledger::redis_manager;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use redis::aio::ConnectionManager;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::Duration;

/// Why a call failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PaymentError {
    /// The provider answered "try again" (a simulated 503, or its books
    /// were unreachable).
    #[error("payment provider temporarily unavailable")]
    Unavailable,
}

/// What a call to the provider found.
#[derive(Debug, PartialEq, Eq)]
pub struct CallReport {
    /// True when the call had to wait for the rate limit.
    pub throttled: bool,
}

/// The provider's books, per order id.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProviderReport {
    /// Calls that reached the provider (failed ones and replays included).
    pub calls: BTreeMap<String, u64>,
    /// Calls the provider failed (its simulated transient errors).
    pub failures: BTreeMap<String, u64>,
    /// Charges made (money moved); a replayed idempotency key adds none.
    pub charges: BTreeMap<String, u64>,
}

impl ProviderReport {
    /// Calls for this order.
    pub fn calls_of(&self, order_id: &str) -> u64 {
        self.calls.get(order_id).copied().unwrap_or(0)
    }
    /// Charges made for this order.
    pub fn charges_of(&self, order_id: &str) -> u64 {
        self.charges.get(order_id).copied().unwrap_or(0)
    }
    /// Calls for this order the provider failed.
    pub fn failures_of(&self, order_id: &str) -> u64 {
        self.failures.get(order_id).copied().unwrap_or(0)
    }
    /// Calls for this order that the provider answered with a charge (a
    /// new one, or the first one replayed for its idempotency key).
    pub fn answered_of(&self, order_id: &str) -> u64 {
        self.calls_of(order_id)
            .saturating_sub(self.failures_of(order_id))
    }
    /// Answered calls beyond the first, over all orders: each is a copy of
    /// an order that called the provider again after a charge was made.
    pub fn duplicate_calls(&self) -> u64 {
        self.calls
            .keys()
            .map(|id| self.answered_of(id).saturating_sub(1))
            .sum()
    }
    /// Orders charged more than once (the provider's idempotency key keeps
    /// this at 0; a test that reads it checks the provider, not the caller).
    pub fn double_charges(&self) -> u64 {
        self.charges.values().filter(|n| **n > 1).count() as u64
    }
}

#[derive(Default)]
struct MemBook {
    /// idempotency key → charge id
    by_key: HashMap<String, String>,
    calls: HashMap<String, u64>,
    failures: HashMap<String, u64>,
    charges: HashMap<String, u64>,
    /// first-seen order of orders and keys, for the capacity bound
    orders: VecDeque<String>,
    keys: VecDeque<String>,
}

enum Book {
    Memory {
        state: Mutex<MemBook>,
        capacity: usize,
    },
    Redis {
        con: ConnectionManager,
        prefix: String,
        ttl_secs: u64,
        charge: redis::Script,
    },
}

/// Keys of the provider's books under `[orders] key_prefix`.
const BOOK_KEYS: [&str; 4] = [
    "provider-keys",
    "provider-calls",
    "provider-charges",
    "provider-failures",
];

const CHARGE_LUA: &str = r#"
-- KEYS: by key, calls, charges. ARGV: idempotency key, order id, new charge id, ttl
redis.call('HINCRBY', KEYS[2], ARGV[2], 1)
local c = redis.call('HGET', KEYS[1], ARGV[1])
if not c then
  c = ARGV[3]
  redis.call('HSET', KEYS[1], ARGV[1], c)
  redis.call('HINCRBY', KEYS[3], ARGV[2], 1)
end
for i = 1, 3 do redis.call('EXPIRE', KEYS[i], ARGV[4]) end
return c
"#;

/// The simulated provider. The rate limit is per process; the books are
/// per process (memory) or shared (Redis).
pub struct PaymentProvider {
    limiter: Option<DefaultDirectRateLimiter>,
    latency: Duration,
    failure_rate: f64,
    book: Book,
}

fn bump(m: &mut HashMap<String, u64>, k: &str) {
    *m.entry(k.to_owned()).or_insert(0) += 1;
}

impl PaymentProvider {
    /// From `[orders] payment_rate`, `payment_latency`,
    /// `payment_failure_rate`; the books in Redis under `key_prefix` when
    /// `redis_url` is set (connected lazily), else in memory bounded to
    /// `record_capacity` orders.
    pub fn from_config(cfg: &OrdersConfig) -> Result<Self, crate::ledger::LedgerError> {
        let p = Self::new(
            cfg.payment_rate,
            cfg.payment_latency,
            cfg.payment_failure_rate,
        );
        Ok(match &cfg.redis_url {
            Some(url) => Self {
                book: Book::Redis {
                    con: redis_manager(url)?,
                    prefix: cfg.key_prefix.clone(),
                    ttl_secs: cfg.record_ttl.as_secs().max(1),
                    charge: redis::Script::new(CHARGE_LUA),
                },
                ..p
            },
            None => Self {
                book: Book::Memory {
                    state: Mutex::default(),
                    capacity: cfg.record_capacity.max(1),
                },
                ..p
            },
        })
    }

    /// At most `rate` calls per second (0: unlimited), each taking `latency`
    /// and failing transiently with probability `failure_rate`; books in
    /// memory.
    pub fn new(rate: u32, latency: Duration, failure_rate: f64) -> Self {
        let limiter = NonZeroU32::new(rate).map(|r| {
            // A burst of a tenth of a second keeps the rate smooth.
            let burst = NonZeroU32::new((rate / 10).max(1)).unwrap_or(NonZeroU32::MIN);
            RateLimiter::direct(Quota::per_second(r).allow_burst(burst))
        });
        Self {
            limiter,
            latency,
            failure_rate,
            book: Book::Memory {
                state: Mutex::default(),
                capacity: 100_000,
            },
        }
    }

    fn mem(state: &Mutex<MemBook>) -> std::sync::MutexGuard<'_, MemBook> {
        // Nothing panics while holding the lock; the maps stay consistent.
        state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One charge of `order_id`: waits for the rate limit, spends the
    /// latency, fails transiently at the configured rate, and otherwise
    /// answers the charge id — the one made before for `idempotency_key`
    /// if there was one (no second charge), a new one if not.
    pub async fn charge(
        &self,
        order_id: &str,
        idempotency_key: &str,
    ) -> (CallReport, Result<String, PaymentError>) {
        let mut throttled = false;
        if let Some(l) = &self.limiter {
            if l.check().is_err() {
                throttled = true;
                l.until_ready().await;
            }
        }
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
        let fail = self.failure_rate > 0.0 && fastrand::f64() < self.failure_rate;
        (
            CallReport { throttled },
            self.book(order_id, idempotency_key, fail).await,
        )
    }

    async fn book(&self, order_id: &str, key: &str, fail: bool) -> Result<String, PaymentError> {
        let new_id = uuid::Uuid::new_v4().to_string();
        match &self.book {
            Book::Memory { state, capacity } => {
                let mut b = Self::mem(state);
                if !b.calls.contains_key(order_id) {
                    b.orders.push_back(order_id.to_owned());
                    while b.orders.len() > *capacity {
                        if let Some(old) = b.orders.pop_front() {
                            b.calls.remove(&old);
                            b.failures.remove(&old);
                            b.charges.remove(&old);
                        }
                    }
                }
                bump(&mut b.calls, order_id);
                if fail {
                    bump(&mut b.failures, order_id);
                    return Err(PaymentError::Unavailable);
                }
                if let Some(c) = b.by_key.get(key) {
                    return Ok(c.clone());
                }
                b.by_key.insert(key.to_owned(), new_id.clone());
                b.keys.push_back(key.to_owned());
                while b.keys.len() > *capacity {
                    if let Some(old) = b.keys.pop_front() {
                        b.by_key.remove(&old);
                    }
                }
                bump(&mut b.charges, order_id);
                Ok(new_id)
            }
            Book::Redis {
                con,
                prefix,
                ttl_secs,
                charge,
            } => {
                let mut con = con.clone();
                if fail {
                    let _: Result<(), _> = redis::pipe()
                        .atomic()
                        .hincr(format!("{prefix}{}", BOOK_KEYS[1]), order_id, 1)
                        .ignore()
                        .hincr(format!("{prefix}{}", BOOK_KEYS[3]), order_id, 1)
                        .ignore()
                        .expire(
                            format!("{prefix}{}", BOOK_KEYS[3]),
                            i64::try_from(*ttl_secs).unwrap_or(i64::MAX),
                        )
                        .ignore()
                        .query_async(&mut con)
                        .await;
                    return Err(PaymentError::Unavailable);
                }
                let mut inv = charge.prepare_invoke();
                for k in &BOOK_KEYS[..3] {
                    inv.key(format!("{prefix}{k}"));
                }
                inv.arg(key).arg(order_id).arg(new_id).arg(*ttl_secs);
                inv.invoke_async(&mut con).await.map_err(|e| {
                    tracing::debug!(error = %e, "provider books unreachable");
                    PaymentError::Unavailable
                })
            }
        }
    }

    /// The provider's books: calls and charges per order.
    pub async fn report(&self) -> Result<ProviderReport, crate::ledger::LedgerError> {
        match &self.book {
            Book::Memory { state, .. } => {
                let b = Self::mem(state);
                let sorted =
                    |m: &HashMap<String, u64>| m.iter().map(|(k, v)| (k.clone(), *v)).collect();
                Ok(ProviderReport {
                    calls: sorted(&b.calls),
                    failures: sorted(&b.failures),
                    charges: sorted(&b.charges),
                })
            }
            Book::Redis { con, prefix, .. } => {
                let mut con = con.clone();
                let mut get = async |k: &str| {
                    redis::cmd("HGETALL")
                        .arg(format!("{prefix}{k}"))
                        .query_async::<BTreeMap<String, u64>>(&mut con)
                        .await
                        .map_err(|e| crate::ledger::LedgerError(e.to_string()))
                };
                let calls = get(BOOK_KEYS[1]).await?;
                let charges = get(BOOK_KEYS[2]).await?;
                let failures = get(BOOK_KEYS[3]).await?;
                Ok(ProviderReport {
                    calls,
                    failures,
                    charges,
                })
            }
        }
    }

    /// Deletes the books (demo and test cleanup).
    pub async fn clear(&self) -> Result<(), crate::ledger::LedgerError> {
        match &self.book {
            Book::Memory { state, .. } => {
                *Self::mem(state) = MemBook::default();
                Ok(())
            }
            Book::Redis { con, prefix, .. } => {
                let mut del = redis::cmd("DEL");
                for k in BOOK_KEYS {
                    del.arg(format!("{prefix}{k}"));
                }
                let mut con = con.clone();
                del.query_async::<i64>(&mut con)
                    .await
                    .map(|_| ())
                    .map_err(|e| crate::ledger::LedgerError(e.to_string()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn failure_rate_bounds() {
        let never = PaymentProvider::new(0, Duration::ZERO, 0.0);
        let always = PaymentProvider::new(0, Duration::ZERO, 1.0);
        for i in 0..50 {
            let k = format!("o{i}");
            assert!(never.charge(&k, &k).await.1.is_ok());
            assert_eq!(
                always.charge(&k, &k).await.1,
                Err(PaymentError::Unavailable)
            );
        }
        let r = always.report().await.unwrap();
        assert_eq!((r.calls.len(), r.charges.len()), (50, 0));
        assert_eq!((r.failures_of("o7"), r.answered_of("o7")), (1, 0));
        assert_eq!(r.duplicate_calls(), 0, "a failed call is not a duplicate");
    }

    #[tokio::test]
    async fn calls_beyond_the_burst_are_throttled() {
        // rate 10/s: burst of 1, so the second immediate call must wait.
        let p = PaymentProvider::new(10, Duration::ZERO, 0.0);
        assert!(!p.charge("a", "a").await.0.throttled);
        assert!(p.charge("b", "b").await.0.throttled);
    }

    #[tokio::test]
    async fn a_replayed_idempotency_key_charges_once_and_a_new_key_again() {
        let p = PaymentProvider::new(0, Duration::ZERO, 0.0);
        let c1 = p.charge("o1", "o1").await.1.unwrap();
        assert_eq!(p.charge("o1", "o1").await.1.unwrap(), c1);
        let r = p.report().await.unwrap();
        assert_eq!((r.calls_of("o1"), r.charges_of("o1")), (2, 1));
        assert_eq!(r.double_charges(), 0);
        assert_eq!(r.duplicate_calls(), 1, "the replay is a duplicate call");
        // The books count per order, not per key: a second key for the
        // same order is a second charge, and shows.
        assert_ne!(p.charge("o1", "other-key").await.1.unwrap(), c1);
        let r = p.report().await.unwrap();
        assert_eq!(r.charges_of("o1"), 2);
        assert_eq!(r.double_charges(), 1);
    }
}
