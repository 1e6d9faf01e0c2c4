//! Restart policy: capped exponential backoff and a restart budget.
//!
//! actix's `Supervisor` restarts an actor right after it calls `ctx.stop()`,
//! reusing the same value. Each supervised actor embeds a [`Restarts`]
//! tracker: `restarting()` records the restart (and the metric), and
//! `started()` waits [`Restarts::delay`] before reconnecting, so a broker that
//! is down is not hammered. When more than `max_restarts` happen inside
//! `window`, the actor escalates: it reports an [`Escalation`] and stays idle,
//! and the engine decides (the daemon shuts down and exits non-zero, so the
//! process supervisor — systemd, Kubernetes — takes over).
//!
//! Every wait between attempts in the runtime (actor restarts, reconnects,
//! publish retries, dedup claims) comes from [`backoff`]: capped exponential
//! with full jitter, so many instances that failed together do not retry in
//! lockstep.

use std::collections::VecDeque;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// The wait before retry number `attempt` (0 for the first retry): a
/// uniformly random duration in `[0, min(max, min · 2^attempt)]` ("full
/// jitter"). The one backoff formula of the runtime.
pub(crate) fn backoff(min: Duration, max: Duration, attempt: u32) -> Duration {
    let cap = min.saturating_mul(1u32 << attempt.min(16)).min(max);
    let nanos = u64::try_from(cap.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(fastrand::u64(0..=nanos))
}

/// Successive waits of [`backoff`] for a retry loop.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    /// Waits starting at `min`, capped at `max`.
    pub(crate) fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max,
            attempt: 0,
        }
    }

    /// The next wait.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let d = backoff(self.min, self.max, self.attempt);
        self.attempt = self.attempt.saturating_add(1);
        d
    }
}

/// How an actor is restarted.
#[derive(Clone, Debug)]
pub struct RestartPolicy {
    /// First backoff after a failure.
    pub backoff_min: Duration,
    /// Backoff cap.
    pub backoff_max: Duration,
    /// Restarts allowed inside `window` before escalating.
    pub max_restarts: u32,
    /// The sliding window the budget is counted over.
    pub window: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        Self {
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            max_restarts: 20,
            window: Duration::from_secs(60),
        }
    }
}

/// An actor that spent its restart budget.
#[derive(Clone, Debug)]
pub struct Escalation {
    /// Which actor (e.g. `stage:reserve`).
    pub actor: String,
    /// The last failure.
    pub reason: String,
}

/// Where escalations go. Bounded: escalations are rare and one is enough to
/// act on, so a full channel drops the extra ones (they are also logged and
/// counted).
pub(crate) type EscalationSender = mpsc::Sender<Escalation>;

/// Restart bookkeeping embedded in a supervised actor.
#[derive(Debug)]
pub(crate) struct Restarts {
    policy: RestartPolicy,
    recent: VecDeque<Instant>,
    consecutive: u32,
    escalated: bool,
}

impl Restarts {
    /// A tracker with this policy.
    pub(crate) fn new(policy: RestartPolicy) -> Self {
        Self {
            policy,
            recent: VecDeque::new(),
            consecutive: 0,
            escalated: false,
        }
    }

    /// Records a restart. Returns false when the budget is spent.
    pub(crate) fn record(&mut self, now: Instant) -> bool {
        while let Some(t) = self.recent.front() {
            if now.duration_since(*t) > self.policy.window {
                self.recent.pop_front();
            } else {
                break;
            }
        }
        self.recent.push_back(now);
        // bounded: at most max_restarts + 1 entries, older ones were popped or we escalate
        self.consecutive = self.consecutive.saturating_add(1);
        if self.recent.len() > self.policy.max_restarts as usize {
            self.escalated = true;
        }
        !self.escalated
    }

    /// Records a retry that is not a failure of the actor (the broker is
    /// unreachable: waiting for it is the actor's job): the backoff grows,
    /// the restart budget is not touched.
    pub(crate) fn retry(&mut self) {
        self.consecutive = self.consecutive.saturating_add(1);
    }

    /// Spends the whole budget at once: the failure is one no restart can
    /// cure (the next [`Restarts::record`] reports it spent).
    pub(crate) fn give_up(&mut self) {
        self.escalated = true;
    }

    /// Marks a successful (re)start: the backoff starts over next time.
    pub(crate) fn succeeded(&mut self) {
        self.consecutive = 0;
    }

    /// How long to wait before working again after the latest restart
    /// ([`backoff`]: jittered, at most `backoff_max`).
    pub(crate) fn delay(&self) -> Duration {
        if self.consecutive == 0 {
            return Duration::ZERO;
        }
        backoff(
            self.policy.backoff_min,
            self.policy.backoff_max,
            self.consecutive - 1,
        )
    }

    /// True once the budget is spent.
    pub(crate) fn escalated(&self) -> bool {
        self.escalated
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RestartPolicy {
        RestartPolicy {
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(1),
            max_restarts: 3,
            window: Duration::from_secs(10),
        }
    }

    /// The largest of many draws: close to the cap when the jitter spans it.
    fn max_of(mut f: impl FnMut() -> Duration) -> Duration {
        (0..2000).map(|_| f()).max().unwrap_or_default()
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_doubles_up_to_the_cap_and_resets_on_success() {
        let mut r = Restarts::new(policy());
        assert_eq!(r.delay(), Duration::ZERO);
        let now = Instant::now();
        for cap_ms in [100u64, 200, 400] {
            r.record(now);
            let top = max_of(|| r.delay());
            assert!(top <= Duration::from_millis(cap_ms), "{top:?}");
            assert!(top >= Duration::from_millis(cap_ms * 9 / 10), "{top:?}");
        }
        r.succeeded();
        assert_eq!(r.delay(), Duration::ZERO);
        let mut r = Restarts::new(RestartPolicy {
            max_restarts: 100,
            ..policy()
        });
        for _ in 0..10 {
            r.record(now);
        }
        assert!(max_of(|| r.delay()) <= Duration::from_secs(1));
    }

    #[test]
    fn the_jitter_is_full_so_instances_spread_out() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(10));
        let draws: Vec<Duration> = (0..2000).map(|_| backoff(min, max, 20)).collect();
        assert!(draws.iter().all(|d| *d <= max));
        // Full jitter: draws cover [0, cap], not a band just under it.
        assert!(draws.iter().any(|d| *d < max / 10), "no short wait");
        assert!(draws.iter().any(|d| *d > max * 9 / 10), "no long wait");
        let mut b = Backoff::new(Duration::from_millis(20), Duration::from_secs(2));
        let caps = [20u64, 40, 80, 160, 320, 640, 1280, 2000, 2000];
        for cap in caps {
            assert!(b.next_delay() <= Duration::from_millis(cap));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn retries_back_off_without_spending_the_budget() {
        let mut r = Restarts::new(policy());
        for _ in 0..100 {
            r.retry();
        }
        assert!(!r.escalated());
        let top = max_of(|| r.delay());
        assert!(top <= Duration::from_secs(1), "{top:?}");
        assert!(
            top >= Duration::from_millis(900),
            "backoff did not grow: {top:?}"
        );
        for _ in 0..3 {
            assert!(r.record(Instant::now()), "retries spent the budget");
        }
        assert!(!r.record(Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn budget_is_a_sliding_window() {
        let mut r = Restarts::new(policy());
        for _ in 0..3 {
            assert!(r.record(Instant::now()));
            tokio::time::advance(Duration::from_secs(4)).await;
        }
        // the first restart left the window, so a fourth fits
        assert!(r.record(Instant::now()));
        assert!(!r.escalated());
        // four inside one window escalates
        let mut r = Restarts::new(policy());
        for _ in 0..3 {
            assert!(r.record(Instant::now()));
        }
        assert!(!r.record(Instant::now()));
        assert!(r.escalated());
    }
}
