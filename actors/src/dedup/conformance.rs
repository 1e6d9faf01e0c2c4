//! One conformance suite every [`DedupStore`] must pass: claim → commit →
//! already done, leases that block and expire, late commits that do not
//! clobber, stale releases that are no-ops, done keys that expire, one
//! winner among concurrent claims — interleaved on one runtime ([`run`]),
//! and racing on real threads ([`parallel_claims_have_one_winner`]).
//!
//! A store's test module provides a [`Fixture`] (how to let time pass for a
//! key, and which capabilities it has) and calls [`run`].

use super::contract::{Claim, ClaimToken, CommitOutcome, DedupStore};
use async_trait::async_trait;
use std::sync::Arc;
use std::time::Duration;

/// How the suite drives one store.
#[async_trait]
pub(crate) trait Fixture: Send + Sync {
    /// The store under test (a fresh, empty namespace).
    fn store(&self) -> Arc<dyn DedupStore>;
    /// A lease or TTL short enough to wait out.
    fn short(&self) -> Duration;
    /// Lets the `short()` lease or TTL of `key` run out.
    async fn expire(&self, key: &str);
    /// True when time can be stepped exactly (in-process clock): the suite
    /// then also checks that a lease still holds just before it ends.
    fn exact_clock(&self) -> bool;
}

const LONG: Duration = Duration::from_secs(30);
const TTL: Duration = Duration::from_secs(60);

fn acquired(case: &str, c: Claim) -> ClaimToken {
    match c {
        Claim::Acquired(t) => t,
        other => panic!("{case}: expected Acquired, got {other:?}"),
    }
}

/// Runs every case against the fixture's store.
pub(crate) async fn run(f: &dyn Fixture) {
    claim_commit_already_done(f).await;
    lease_blocks_until_it_ends(f).await;
    expired_lease_allows_reclaim_and_late_commit_is_lost(f).await;
    expired_lease_commit_is_lost_even_unclaimed(f).await;
    release_allows_reclaim(f).await;
    done_expires_after_ttl(f).await;
    concurrent_claims_have_one_winner(f).await;
}

async fn claim_commit_already_done(f: &dyn Fixture) {
    let case = "claim_commit_already_done";
    let s = f.store();
    s.ping().await.expect(case);
    let t = acquired(case, s.claim("a", LONG).await.expect(case));
    assert_eq!(t.key, "a", "{case}: the token names the key");
    assert_eq!(
        s.claim("a", LONG).await.expect(case),
        Claim::InProgress,
        "{case}"
    );
    assert_eq!(
        s.commit(&t, TTL).await.expect(case),
        CommitOutcome::Committed,
        "{case}"
    );
    assert_eq!(
        s.claim("a", LONG).await.expect(case),
        Claim::AlreadyDone,
        "{case}"
    );
    assert_eq!(
        s.commit(&t, TTL).await.expect(case),
        CommitOutcome::LeaseLost,
        "{case}: a second commit finds no lease"
    );
    assert_eq!(
        s.claim("a", LONG).await.expect(case),
        Claim::AlreadyDone,
        "{case}"
    );
}

async fn lease_blocks_until_it_ends(f: &dyn Fixture) {
    let case = "lease_blocks_until_it_ends";
    let s = f.store();
    let t = acquired(case, s.claim("b", f.short()).await.expect(case));
    if f.exact_clock() {
        tokio::time::advance(f.short() - Duration::from_millis(1)).await;
    }
    assert_eq!(
        s.claim("b", LONG).await.expect(case),
        Claim::InProgress,
        "{case}"
    );
    assert_eq!(
        s.commit(&t, TTL).await.expect(case),
        CommitOutcome::Committed,
        "{case}"
    );
}

async fn expired_lease_allows_reclaim_and_late_commit_is_lost(f: &dyn Fixture) {
    let case = "expired_lease_allows_reclaim_and_late_commit_is_lost";
    let s = f.store();
    let first = acquired(case, s.claim("c", f.short()).await.expect(case));
    f.expire("c").await;
    let second = acquired(case, s.claim("c", LONG).await.expect(case));
    assert_ne!(first.owner, second.owner, "{case}: a new owner");
    assert_eq!(
        s.commit(&first, TTL).await.expect(case),
        CommitOutcome::LeaseLost,
        "{case}: the late commit"
    );
    s.release(&first).await.expect(case);
    assert_eq!(
        s.claim("c", LONG).await.expect(case),
        Claim::InProgress,
        "{case}: neither the late commit nor a stale release touched the new lease"
    );
    assert_eq!(
        s.commit(&second, TTL).await.expect(case),
        CommitOutcome::Committed,
        "{case}"
    );
    assert_eq!(
        s.claim("c", LONG).await.expect(case),
        Claim::AlreadyDone,
        "{case}"
    );
}

async fn expired_lease_commit_is_lost_even_unclaimed(f: &dyn Fixture) {
    let case = "expired_lease_commit_is_lost_even_unclaimed";
    let s = f.store();
    let t = acquired(case, s.claim("d", f.short()).await.expect(case));
    f.expire("d").await;
    assert_eq!(
        s.commit(&t, TTL).await.expect(case),
        CommitOutcome::LeaseLost,
        "{case}"
    );
    acquired(case, s.claim("d", LONG).await.expect(case));
}

async fn release_allows_reclaim(f: &dyn Fixture) {
    let case = "release_allows_reclaim";
    let s = f.store();
    let t = acquired(case, s.claim("e", LONG).await.expect(case));
    s.release(&t).await.expect(case);
    let t2 = acquired(case, s.claim("e", LONG).await.expect(case));
    assert_eq!(
        s.commit(&t, TTL).await.expect(case),
        CommitOutcome::LeaseLost,
        "{case}"
    );
    s.release(&t).await.expect(case);
    assert_eq!(
        s.claim("e", LONG).await.expect(case),
        Claim::InProgress,
        "{case}: a stale release is a no-op"
    );
    assert_eq!(
        s.commit(&t2, TTL).await.expect(case),
        CommitOutcome::Committed,
        "{case}"
    );
    s.release(&t2).await.expect(case);
    assert_eq!(
        s.claim("e", LONG).await.expect(case),
        Claim::AlreadyDone,
        "{case}: releasing a committed key does not undo the commit"
    );
}

async fn done_expires_after_ttl(f: &dyn Fixture) {
    let case = "done_expires_after_ttl";
    let s = f.store();
    let t = acquired(case, s.claim("f", LONG).await.expect(case));
    s.commit(&t, f.short()).await.expect(case);
    assert_eq!(
        s.claim("f", LONG).await.expect(case),
        Claim::AlreadyDone,
        "{case}"
    );
    f.expire("f").await;
    acquired(case, s.claim("f", LONG).await.expect(case));
}

async fn concurrent_claims_have_one_winner(f: &dyn Fixture) {
    let case = "concurrent_claims_have_one_winner";
    const KEYS: usize = 200;
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let s = f.store();
        set.spawn(async move {
            let mut won = Vec::new();
            for i in 0..KEYS {
                match s.claim(&format!("g{i}"), LONG).await {
                    Ok(Claim::Acquired(_)) => won.push(i),
                    Ok(Claim::InProgress) => {}
                    other => panic!("concurrent claim: {other:?}"),
                }
            }
            won
        });
    }
    let mut wins = vec![0usize; KEYS];
    while let Some(r) = set.join_next().await {
        for i in r.expect(case) {
            wins[i] += 1;
        }
    }
    assert!(
        wins.iter().all(|&w| w == 1),
        "{case}: every key has exactly one winner: {wins:?}"
    );
}

/// Claims of one key made at the same instant on real threads (as many as
/// the machine runs at once, at least 2), round after round: every key has
/// exactly one winner (`rounds` keys). Call it from a plain `#[test]`, with a multi-threaded
/// runtime for stores whose claims do I/O. The threads meet at a spinning
/// barrier before each round, so their claims start within nanoseconds of
/// each other: a store that checks and then inserts without one atomic
/// step shows two winners here within a few rounds.
pub(crate) fn parallel_claims_have_one_winner(
    store: &dyn DedupStore,
    rt: &tokio::runtime::Handle,
    prefix: &str,
    rounds: usize,
) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let threads = std::thread::available_parallelism()
        .map(usize::from)
        .unwrap_or(2)
        .clamp(2, 4);
    let arrived = AtomicUsize::new(0);
    let generation = AtomicUsize::new(0);
    // Spins instead of parking: woken threads would start microseconds apart.
    let meet = || {
        let gen = generation.load(Ordering::Acquire);
        if arrived.fetch_add(1, Ordering::AcqRel) + 1 == threads {
            arrived.store(0, Ordering::Relaxed);
            generation.fetch_add(1, Ordering::Release);
        } else {
            while generation.load(Ordering::Acquire) == gen {
                std::hint::spin_loop();
            }
        }
    };
    let wins: Vec<AtomicUsize> = (0..rounds).map(|_| AtomicUsize::new(0)).collect();
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                for (round, won) in wins.iter().enumerate() {
                    let key = format!("{prefix}{round}");
                    let _in_runtime = rt.enter();
                    meet();
                    match futures::executor::block_on(store.claim(&key, LONG)) {
                        Ok(Claim::Acquired(_)) => {
                            won.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(Claim::InProgress) => {}
                        other => panic!("parallel claim of {key}: {other:?}"),
                    }
                }
            });
        }
    });
    let wrong: Vec<(usize, usize)> = wins
        .iter()
        .map(|w| w.load(Ordering::Relaxed))
        .enumerate()
        .filter(|(_, w)| *w != 1)
        .collect();
    assert!(
        wrong.is_empty(),
        "{threads} threads claiming each of {rounds} keys at once: rounds without exactly one winner (round, winners): {:?}",
        &wrong[..wrong.len().min(20)]
    );
}
