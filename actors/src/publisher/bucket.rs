//! Publish token bucket: limits the publish rate, with a bounded number of
//! callers allowed to wait for a token.
//!
//! The rate limiting itself is [`governor`]'s GCRA (a direct, not keyed,
//! [`governor::RateLimiter`]). governor's default clock is the `quanta`
//! clock, which knows nothing about tokio's paused/test time, so this module
//! plugs a tiny [`TokioClock`] adapter (governor's
//! [`Clock`] over [`tokio::time::Instant`]) into the
//! limiter. Waiting uses [`tokio::time::sleep_until`] on the instant governor
//! reports, so under `#[tokio::test(start_paused = true)]` the bucket runs
//! entirely in virtual time.

use std::fmt;
use std::num::NonZeroU32;
use std::ops::Add;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use governor::clock::{Clock, Reference};
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

/// A [`tokio::time::Instant`] usable as a governor clock reading (a newtype
/// because governor needs `Add<Nanos>`, which cannot be implemented for a
/// foreign type here).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct TokioInstant(pub tokio::time::Instant);

impl Add<Nanos> for TokioInstant {
    type Output = TokioInstant;

    fn add(self, rhs: Nanos) -> TokioInstant {
        // Overflow would need an instant ~centuries ahead (Nanos is a u64 of
        // nanoseconds); saturate to `self` rather than panic.
        TokioInstant(self.0.checked_add(Duration::from(rhs)).unwrap_or(self.0))
    }
}

impl Reference for TokioInstant {
    fn duration_since(&self, earlier: Self) -> Nanos {
        Nanos::from(self.0.saturating_duration_since(earlier.0))
    }

    fn saturating_sub(&self, duration: Nanos) -> Self {
        TokioInstant(
            self.0
                .checked_sub(Duration::from(duration))
                .unwrap_or(self.0),
        )
    }
}

/// governor clock reading [`tokio::time::Instant::now`], so rate limiting
/// follows tokio's (possibly paused) clock.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct TokioClock;

impl Clock for TokioClock {
    type Instant = TokioInstant;

    fn now(&self) -> TokioInstant {
        TokioInstant(tokio::time::Instant::now())
    }
}

/// The concrete governor limiter used by [`TokenBucket`].
type Limiter = RateLimiter<NotKeyed, InMemoryState, TokioClock, NoOpMiddleware<TokioInstant>>;

/// Returned by [`TokenBucket::acquire`] when `max_waiters` callers are
/// already waiting for a token; the caller should push back (nack/requeue or
/// spool) instead of queueing unboundedly.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
#[error("publish rate limit: too many waiters")]
pub(crate) struct Backpressure;

/// Token bucket limiting publishes to `rate_per_sec` with bursts of up to
/// `burst`, and at most `max_waiters` callers waiting for a token at once.
///
/// `Send + Sync`; share it behind an `Arc`. Waiters are not queued fairly:
/// when a token frees up, whichever caller checks first gets it (a waiter
/// that loses simply sleeps until the next one).
pub(crate) struct TokenBucket {
    /// The GCRA limiter; `None` when the rate is unlimited (`rate = 0`).
    /// Swapped whole by [`TokenBucket::set_rate`].
    limiter: ArcSwapOption<Limiter>,
    /// Callers currently waiting inside [`TokenBucket::acquire`]; exported
    /// as a gauge via [`TokenBucket::waiters`].
    waiters: AtomicUsize,
    /// Most callers allowed to wait at once before [`Backpressure`].
    max_waiters: usize,
    /// Configured rate, as [`TokenBucket::rate`] reports it.
    rate_per_sec: AtomicU32,
    /// Effective burst (at least 1), as [`TokenBucket::rate`] reports it.
    burst: AtomicU32,
}

impl fmt::Debug for TokenBucket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenBucket")
            .field("rate", &self.rate())
            .field("max_waiters", &self.max_waiters)
            .field("waiters", &self.waiters())
            .finish()
    }
}

/// Decrements the waiter count when a waiting [`TokenBucket::acquire`]
/// finishes or is dropped (cancelled).
struct WaiterGuard<'a> {
    /// The counter incremented when the guard was created.
    waiters: &'a AtomicUsize,
}

impl Drop for WaiterGuard<'_> {
    fn drop(&mut self) {
        self.waiters.fetch_sub(1, Ordering::AcqRel);
    }
}

impl TokenBucket {
    /// Creates a bucket admitting `rate_per_sec` publishes per second on
    /// average, with up to `burst` admitted back-to-back when idle (a
    /// `burst` of 0 is treated as 1). `rate_per_sec = 0` means unlimited:
    /// [`acquire`](TokenBucket::acquire) always returns `Ok` at once.
    /// `max_waiters = 0` means callers never wait: no token, no admission.
    pub(crate) fn new(rate_per_sec: u32, burst: u32, max_waiters: usize) -> Self {
        let bucket = TokenBucket {
            limiter: ArcSwapOption::empty(),
            waiters: AtomicUsize::new(0),
            max_waiters,
            rate_per_sec: AtomicU32::new(0),
            burst: AtomicU32::new(1),
        };
        bucket.set_rate(rate_per_sec, burst);
        bucket
    }

    /// Changes the rate and burst live (same meaning as in
    /// [`TokenBucket::new`]). The new limiter starts with a full burst;
    /// callers already waiting finish their current wait on the old one,
    /// then take their token from the new one.
    pub(crate) fn set_rate(&self, rate_per_sec: u32, burst: u32) {
        let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
        let limiter = NonZeroU32::new(rate_per_sec).map(|rate| {
            Arc::new(RateLimiter::direct_with_clock(
                Quota::per_second(rate).allow_burst(burst),
                TokioClock,
            ))
        });
        self.limiter.store(limiter);
        self.rate_per_sec.store(rate_per_sec, Ordering::Release);
        self.burst.store(burst.get(), Ordering::Release);
    }

    /// The rate (publishes per second, `0`: unlimited) and burst in force.
    pub(crate) fn rate(&self) -> (u32, u32) {
        (
            self.rate_per_sec.load(Ordering::Acquire),
            self.burst.load(Ordering::Acquire),
        )
    }

    /// Takes a token, waiting for one if necessary.
    ///
    /// Returns at once if a token is available (or the bucket is
    /// unlimited). Otherwise, if fewer than `max_waiters` callers are
    /// waiting, sleeps (on tokio's clock) until a token can be taken;
    /// if `max_waiters` are already waiting, returns [`Backpressure`] at
    /// once. Cancel-safe: dropping the future gives up the waiter slot and
    /// consumes no token.
    pub(crate) async fn acquire(&self) -> Result<(), Backpressure> {
        let mut not_until = match self.limiter.load().as_deref().map(Limiter::check) {
            None | Some(Ok(())) => return Ok(()),
            Some(Err(not_until)) => not_until,
        };
        let _slot = self.enter_wait()?;
        loop {
            tokio::time::sleep_until(not_until.earliest_possible().0).await;
            // Loaded again: the rate may have changed while we slept.
            match self.limiter.load().as_deref().map(Limiter::check) {
                None | Some(Ok(())) => return Ok(()),
                // Another caller took the token first; wait for the next one.
                Some(Err(next)) => not_until = next,
            }
        }
    }

    /// Takes a token if one is available right now, never waiting.
    #[cfg(test)]
    pub(crate) fn try_acquire(&self) -> bool {
        self.limiter
            .load()
            .as_deref()
            .is_none_or(|l| l.check().is_ok())
    }

    /// Number of callers currently waiting in
    /// [`acquire`](TokenBucket::acquire), for the waiters gauge.
    pub(crate) fn waiters(&self) -> usize {
        self.waiters.load(Ordering::Acquire)
    }

    /// `true` when the bucket was built with `rate_per_sec = 0`.
    #[cfg(test)]
    pub(crate) fn is_unlimited(&self) -> bool {
        self.limiter.load().is_none()
    }

    /// Claims a waiter slot, or fails with [`Backpressure`] if all
    /// `max_waiters` slots are taken.
    fn enter_wait(&self) -> Result<WaiterGuard<'_>, Backpressure> {
        self.waiters
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
                (w < self.max_waiters).then_some(w + 1)
            })
            .map(|_| WaiterGuard {
                waiters: &self.waiters,
            })
            .map_err(|_| Backpressure)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::pin::pin;
    use std::sync::Arc;
    use std::task::{Context, Poll, Waker};
    use tokio::time::Instant;

    use proptest::prelude::*;

    /// Polls a future once with a no-op waker.
    fn poll_once<F: Future>(f: std::pin::Pin<&mut F>) -> Poll<F::Output> {
        f.poll(&mut Context::from_waker(Waker::noop()))
    }

    #[test]
    fn is_send_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<TokenBucket>();
        assert_send_sync::<Backpressure>();
        assert_eq!(
            Backpressure.to_string(),
            "publish rate limit: too many waiters"
        );
        let text = format!("{:?}", TokenBucket::new(50, 7, 3));
        assert!(
            text.contains("rate: (50, 7)") && text.contains("max_waiters: 3"),
            "{text}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn unlimited_when_rate_is_zero() {
        let b = TokenBucket::new(0, 0, 0);
        assert!(b.is_unlimited());
        let start = Instant::now();
        for _ in 0..10_000 {
            b.acquire().await.unwrap();
            assert!(b.try_acquire());
        }
        assert_eq!(Instant::now(), start);
    }

    #[tokio::test(start_paused = true)]
    async fn burst_then_rate() {
        let b = TokenBucket::new(100, 10, 1);
        let start = Instant::now();
        for _ in 0..10 {
            b.acquire().await.unwrap();
        }
        assert_eq!(Instant::now(), start, "burst must be immediate");
        assert!(!b.try_acquire());
        for _ in 0..100 {
            b.acquire().await.unwrap();
        }
        let took = Instant::now() - start;
        assert!(
            took >= Duration::from_millis(999) && took <= Duration::from_millis(1001),
            "100 tokens at 100/s took {took:?}"
        );
        assert_eq!(b.waiters(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_live_rate_change_takes_effect_for_waiters_too() {
        let b = TokenBucket::new(1, 1, 4);
        assert!(b.try_acquire());
        assert!(!b.try_acquire());
        // A waiter on the 1/s limiter...
        let start = Instant::now();
        let waiter = b.acquire();
        tokio::pin!(waiter);
        assert!(poll_once(waiter.as_mut()).is_pending());
        b.set_rate(1000, 50);
        assert_eq!(b.rate(), (1000, 50));
        // ...takes its token from the new one; the new burst is there at once.
        waiter.await.unwrap();
        assert!(Instant::now() - start <= Duration::from_secs(1));
        let got = (0..100).filter(|_| b.try_acquire()).count();
        assert_eq!(got, 49, "the new burst, minus the waiter's token");
        b.set_rate(0, 0);
        assert!(b.is_unlimited());
        assert_eq!(b.rate(), (0, 1));
        for _ in 0..1000 {
            assert!(b.try_acquire());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn burst_refills_when_idle() {
        let b = TokenBucket::new(10, 5, 0);
        for _ in 0..5 {
            assert!(b.try_acquire());
        }
        assert!(!b.try_acquire());
        tokio::time::advance(Duration::from_secs(10)).await;
        // Refills only up to `burst`, however long it was idle.
        let got = (0..20).filter(|_| b.try_acquire()).count();
        assert_eq!(got, 5);
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_beyond_max_get_backpressure_at_once() {
        let b = Arc::new(TokenBucket::new(1, 1, 2));
        b.acquire().await.unwrap();
        let start = Instant::now();
        let tasks: Vec<_> = (0..2)
            .map(|_| {
                let b = b.clone();
                tokio::spawn(async move { b.acquire().await })
            })
            .collect();
        // Let the spawned tasks run up to their sleep.
        tokio::task::yield_now().await;
        assert_eq!(b.waiters(), 2);
        let mut third = pin!(b.acquire());
        assert_eq!(poll_once(third.as_mut()), Poll::Ready(Err(Backpressure)));
        assert_eq!(Instant::now(), start);
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        assert_eq!(b.waiters(), 0);
        // Two tokens at 1/s after the initial one: 2 s of virtual time.
        assert_eq!(Instant::now() - start, Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn zero_max_waiters_never_waits() {
        let b = TokenBucket::new(1, 1, 0);
        assert_eq!(b.acquire().await, Ok(()));
        assert_eq!(b.acquire().await, Err(Backpressure));
    }

    #[tokio::test(start_paused = true)]
    async fn cancelled_waiter_frees_its_slot() {
        let b = TokenBucket::new(1, 1, 1);
        b.acquire().await.unwrap();
        {
            let mut waiting = pin!(b.acquire());
            assert!(poll_once(waiting.as_mut()).is_pending());
            assert_eq!(b.waiters(), 1);
            let mut rejected = pin!(b.acquire());
            assert_eq!(poll_once(rejected.as_mut()), Poll::Ready(Err(Backpressure)));
            // `waiting` is dropped (cancelled) here.
        }
        assert_eq!(b.waiters(), 0);
        // Also via a timeout, the common real-world cancellation.
        let r = tokio::time::timeout(Duration::from_millis(100), b.acquire()).await;
        assert!(r.is_err(), "should have timed out waiting");
        assert_eq!(b.waiters(), 0);
        // The slot is usable again and the cancelled waiters took no token.
        let start = Instant::now();
        b.acquire().await.unwrap();
        assert_eq!(Instant::now() - start, Duration::from_millis(900));
    }

    #[derive(Debug, Clone)]
    enum Step {
        /// Let virtual time pass.
        Sleep(u64),
        /// Non-waiting attempts.
        Try(u8),
        /// One waiting acquisition.
        Wait,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (0u64..500).prop_map(Step::Sleep),
            (1u8..50).prop_map(Step::Try),
            Just(Step::Wait),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        #[test]
        fn admitted_never_exceeds_burst_plus_rate_times_elapsed(
            rate in 1u32..2000,
            burst in 1u32..50,
            steps in proptest::collection::vec(step(), 1..60),
        ) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .start_paused(true)
                .build()
                .unwrap();
            rt.block_on(async move {
                let b = TokenBucket::new(rate, burst, 4);
                let start = Instant::now();
                let mut admitted: u64 = 0;
                for s in steps {
                    match s {
                        Step::Sleep(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
                        Step::Try(n) => {
                            admitted += (0..n).filter(|_| b.try_acquire()).count() as u64;
                        }
                        Step::Wait => {
                            b.acquire().await.unwrap();
                            admitted += 1;
                        }
                    }
                    let t = (Instant::now() - start).as_secs_f64();
                    let bound = f64::from(burst) + f64::from(rate) * t + 1e-6;
                    prop_assert!(
                        admitted as f64 <= bound,
                        "admitted {} > bound {} (rate {}, burst {}, t {})",
                        admitted, bound, rate, burst, t
                    );
                }
                Ok(())
            })?;
        }
    }
}
