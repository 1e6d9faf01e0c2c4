//! [`MemoryStore`]: the in-process, capacity-bounded dedup store.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use dashmap::DashMap;
use tokio::time::Instant;

use super::contract::{
    deadline, new_owner, Claim, ClaimToken, CommitOutcome, DedupError, DedupStore,
};

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

    fn evictions(&self) -> u64 {
        MemoryStore::evictions(self)
    }
}

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

    struct Memory(Arc<MemoryStore>);

    #[async_trait]
    impl crate::dedup::conformance::Fixture for Memory {
        fn store(&self) -> Arc<dyn DedupStore> {
            self.0.clone()
        }
        fn short(&self) -> Duration {
            Duration::from_secs(2)
        }
        async fn expire(&self, _key: &str) {
            tokio::time::advance(self.short() + Duration::from_millis(1)).await;
        }
        fn exact_clock(&self) -> bool {
            true
        }
    }

    #[tokio::test(start_paused = true)]
    async fn memory_store_conforms() {
        crate::dedup::conformance::run(&Memory(Arc::new(MemoryStore::new(10_000)))).await;
    }

    #[test]
    fn memory_store_has_one_winner_among_parallel_claims() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let store = MemoryStore::new(10_000);
        crate::dedup::conformance::parallel_claims_have_one_winner(&store, rt.handle(), "p", 3000);
    }

    #[tokio::test(start_paused = true)]
    async fn memory_capacity_bound_under_10x_inserts() {
        let cap = 100;
        let s = MemoryStore::new(cap);
        assert_eq!(s.capacity(), cap);
        assert_eq!(MemoryStore::new(0).capacity(), 1, "at least one key");
        assert!(s.is_empty());
        for i in 0..10 * cap {
            let t = acquired(s.claim(&format!("k{i}"), LEASE).await.unwrap());
            s.commit(&t, TTL).await.unwrap();
            assert!(s.len() <= cap);
            assert!(s.order_len() <= cap + s.slack);
        }
        assert_eq!(s.len(), cap);
        assert!(!s.is_empty());
        assert_eq!(s.evictions(), 9 * cap as u64);
        // The engine reads it through the trait.
        let store: &dyn DedupStore = &s;
        assert_eq!(store.evictions(), 9 * cap as u64);
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
    async fn a_released_and_reclaimed_key_counts_from_its_latest_claim() {
        let s = MemoryStore::new(2);
        let a = acquired(s.claim("a", LEASE).await.unwrap());
        s.release(&a).await.unwrap();
        acquired(s.claim("b", LEASE).await.unwrap());
        acquired(s.claim("a", LEASE).await.unwrap());
        // Full of live leases: the oldest goes, and that is b, not the
        // record a left behind when it was released.
        acquired(s.claim("d", LEASE).await.unwrap());
        assert_eq!(s.claim("a", LEASE).await.unwrap(), Claim::InProgress);
        assert_eq!(s.evictions(), 1);
        acquired(s.claim("b", LEASE).await.unwrap());
    }

    /// A commit takes a sequence number of its own: a key claimed again
    /// right after its done mark expired has one current record, not two,
    /// so the order queue stays within its bound however keys come back.
    #[tokio::test(start_paused = true)]
    async fn a_key_claimed_again_after_its_commit_has_one_current_record() {
        let cap = 40;
        let s = MemoryStore::new(cap);
        let (lease, ttl) = (Duration::from_secs(3600), Duration::from_secs(1));
        for i in 0..cap {
            let k = format!("k{i}");
            let t = acquired(s.claim(&k, lease).await.unwrap());
            assert_eq!(s.commit(&t, ttl).await.unwrap(), CommitOutcome::Committed);
            tokio::time::advance(ttl).await;
            acquired(s.claim(&k, lease).await.unwrap());
            assert!(
                s.order_len() <= cap + s.slack,
                "{} records for {} keys (bound {})",
                s.order_len(),
                s.len(),
                cap + s.slack
            );
        }
        assert_eq!(s.len(), cap);
    }

    /// As a Redis key set with `PX`: gone at its deadline, not after it.
    #[tokio::test(start_paused = true)]
    async fn a_lease_and_a_done_key_end_exactly_at_their_deadline() {
        let s = MemoryStore::new(10);
        let (lease, ttl) = (Duration::from_secs(2), Duration::from_secs(5));
        let ms = Duration::from_millis(1);
        let t = acquired(s.claim("a", lease).await.unwrap());
        tokio::time::advance(lease - ms).await;
        assert_eq!(s.claim("a", lease).await.unwrap(), Claim::InProgress);
        tokio::time::advance(ms).await;
        assert_eq!(s.commit(&t, ttl).await.unwrap(), CommitOutcome::LeaseLost);
        let t = acquired(s.claim("a", lease).await.unwrap());
        assert_eq!(s.commit(&t, ttl).await.unwrap(), CommitOutcome::Committed);
        tokio::time::advance(ttl - ms).await;
        assert_eq!(s.claim("a", lease).await.unwrap(), Claim::AlreadyDone);
        tokio::time::advance(ms).await;
        acquired(s.claim("a", lease).await.unwrap());
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
}
