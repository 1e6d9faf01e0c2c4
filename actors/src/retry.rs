//! The broker-side retry ladder.
//!
//! A stage with a [`RetryPolicy`] owns one *tier queue* per distinct backoff
//! delay, named `<queue>.retry.<n>` (`n` from 1). A tier queue has
//! `x-message-ttl` = its delay and dead-letters (through the default
//! exchange, routing key = the stage's queue) back into the stage's queue.
//!
//! When attempt `k` of a message fails with [`Outcome::Retry`](crate::Outcome)
//! (or a handler error), the stage publishes a copy to the tier of
//! `backoff[min(k-1, len-1)]` with the engine-owned header
//! [`envelope::ATTEMPT`](crate::envelope::ATTEMPT) = `k+1`, waits for the confirm and only then acks the
//! original: while the copy waits in the tier, nothing in the process holds a
//! credit or a task for it. After attempt `max_attempts` fails, the message
//! is dead-lettered with reason `max-attempts`.
//!
//! `x-death` counts are not used: their semantics changed across RabbitMQ
//! versions (3.13/4.0), the attempt header is ours.

use crate::envelope;
use std::time::Duration;

/// Where a retried message came from before the tier's dead-lettering
/// rewrote its exchange and routing key. See [`envelope::ORIGINAL_EXCHANGE`].
pub(crate) const ORIGINAL_EXCHANGE_HEADER: &str = envelope::ORIGINAL_EXCHANGE;
/// See [`envelope::ORIGINAL_ROUTING_KEY`].
pub(crate) const ORIGINAL_ROUTING_KEY_HEADER: &str = envelope::ORIGINAL_ROUTING_KEY;

/// A stage's retry ladder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Handling attempts in total (the first one included); at least 1.
    pub max_attempts: u32,
    /// Delay before attempt 2, 3, ...; the last step repeats. Non-empty.
    pub backoff: Vec<Duration>,
}

impl RetryPolicy {
    /// The distinct delays, in first-use order: tier `n` (1-based) holds
    /// messages for `tiers()[n-1]`.
    pub fn tiers(&self) -> Vec<Duration> {
        let mut out: Vec<Duration> = Vec::new();
        for d in &self.backoff {
            if !out.contains(d) {
                out.push(*d);
            }
        }
        out
    }

    /// Name of tier `n` (1-based) of `queue`.
    pub fn tier_queue(queue: &str, n: usize) -> String {
        format!("{queue}.retry.{n}")
    }

    /// The delay after failed attempt `attempt` (1-based).
    pub fn delay_after(&self, attempt: u32) -> Duration {
        let i = (attempt.max(1) as usize - 1).min(self.backoff.len().saturating_sub(1));
        self.backoff.get(i).copied().unwrap_or_default()
    }

    /// How long an ordered stage waits before retrying, in place, a message
    /// whose attempt `attempt` failed: the ladder's delay for it, or the
    /// wait the handler asked for (at most the ladder's longest step, as a
    /// tier would give).
    pub fn delay_in_place(&self, attempt: u32, after: Option<Duration>) -> Duration {
        match after {
            Some(after) => after.min(self.backoff.iter().max().copied().unwrap_or_default()),
            None => self.delay_after(attempt),
        }
    }

    /// The tier queue a message whose attempt `attempt` failed goes to, or
    /// `None` when the attempts are used up.
    pub fn next_tier(&self, queue: &str, attempt: u32) -> Option<String> {
        if attempt >= self.max_attempts || self.backoff.is_empty() {
            return None;
        }
        let delay = self.delay_after(attempt);
        let n = self.tiers().iter().position(|d| *d == delay)? + 1;
        Some(Self::tier_queue(queue, n))
    }

    /// Like [`next_tier`](Self::next_tier), for a retry that must wait at
    /// least `after`: the first tier whose delay is `>= after`, or the
    /// longest tier when none is (the broker has no other delays to offer).
    pub fn next_tier_after(&self, queue: &str, attempt: u32, after: Duration) -> Option<String> {
        if attempt >= self.max_attempts || self.backoff.is_empty() {
            return None;
        }
        let tiers = self.tiers();
        let n = match tiers.iter().position(|d| *d >= after) {
            Some(i) => i + 1,
            None => {
                let longest = tiers.iter().max()?;
                tiers.iter().position(|d| d == longest)? + 1
            }
        };
        Some(Self::tier_queue(queue, n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(max: u32, ms: &[u64]) -> RetryPolicy {
        RetryPolicy {
            max_attempts: max,
            backoff: ms.iter().map(|m| Duration::from_millis(*m)).collect(),
        }
    }

    #[test]
    fn last_step_repeats_and_attempts_run_out() {
        let r = p(5, &[1000, 10_000, 60_000]);
        assert_eq!(r.next_tier("q", 1).as_deref(), Some("q.retry.1"));
        assert_eq!(r.next_tier("q", 2).as_deref(), Some("q.retry.2"));
        assert_eq!(r.next_tier("q", 3).as_deref(), Some("q.retry.3"));
        assert_eq!(r.next_tier("q", 4).as_deref(), Some("q.retry.3"));
        assert_eq!(r.next_tier("q", 5), None);
        assert_eq!(r.delay_after(9), Duration::from_secs(60));
    }

    #[test]
    fn in_place_delays_follow_the_ladder_and_cap_a_handler_s_wait() {
        let r = p(5, &[100, 1000]);
        assert_eq!(r.delay_in_place(1, None), Duration::from_millis(100));
        assert_eq!(r.delay_in_place(4, None), Duration::from_millis(1000));
        let asked = |ms| r.delay_in_place(1, Some(Duration::from_millis(ms)));
        assert_eq!(asked(300), Duration::from_millis(300));
        assert_eq!(asked(9000), Duration::from_millis(1000));
    }

    #[test]
    fn equal_delays_share_a_tier() {
        let r = p(4, &[200, 200, 400]);
        assert_eq!(r.tiers().len(), 2);
        assert_eq!(r.next_tier("q", 2).as_deref(), Some("q.retry.1"));
        assert_eq!(r.next_tier("q", 3).as_deref(), Some("q.retry.2"));
    }

    #[test]
    fn a_minimum_delay_picks_the_first_tier_long_enough() {
        let r = p(5, &[100, 2000, 500]);
        let s = Duration::from_millis;
        assert_eq!(
            r.next_tier_after("q", 1, s(0)).as_deref(),
            Some("q.retry.1")
        );
        assert_eq!(
            r.next_tier_after("q", 1, s(100)).as_deref(),
            Some("q.retry.1")
        );
        // First in ladder order, not the shortest that fits.
        assert_eq!(
            r.next_tier_after("q", 1, s(400)).as_deref(),
            Some("q.retry.2")
        );
        assert_eq!(
            r.next_tier_after("q", 3, s(1500)).as_deref(),
            Some("q.retry.2")
        );
        // Nothing is long enough: the longest there is.
        assert_eq!(
            r.next_tier_after("q", 1, s(60_000)).as_deref(),
            Some("q.retry.2")
        );
        // Attempts still run out.
        assert_eq!(r.next_tier_after("q", 5, s(0)), None);
        assert_eq!(p(1, &[100]).next_tier_after("q", 1, s(0)), None);
    }

    #[test]
    fn one_attempt_never_retries() {
        assert_eq!(p(1, &[100]).next_tier("q", 1), None);
    }

    use proptest::prelude::*;

    proptest! {
        /// For any ladder: a tier exists exactly while attempts remain, it
        /// is one of the policy's tiers, and its delay is the step for that
        /// attempt (the last step repeating).
        #[test]
        fn ladder_arithmetic(max in 1u32..12, steps in proptest::collection::vec(1u64..5, 1..6), attempt in 1u32..20) {
            let r = p(max, &steps.iter().map(|s| s * 100).collect::<Vec<_>>());
            let tier = r.next_tier("q", attempt);
            prop_assert_eq!(tier.is_some(), attempt < max);
            let want = steps[(attempt as usize - 1).min(steps.len() - 1)] * 100;
            prop_assert_eq!(r.delay_after(attempt), Duration::from_millis(want));
            if let Some(t) = tier {
                let n: usize = t.strip_prefix("q.retry.").unwrap().parse().unwrap();
                prop_assert!(n >= 1 && n <= r.tiers().len());
                prop_assert_eq!(r.tiers()[n - 1], r.delay_after(attempt));
                prop_assert!(envelope::is_tier_of("q", &t));
            }
        }
    }
}
