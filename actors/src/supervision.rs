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

use std::collections::VecDeque;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

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
pub type EscalationSender = mpsc::Sender<Escalation>;

/// Restart bookkeeping embedded in a supervised actor.
#[derive(Debug)]
pub struct Restarts {
    policy: RestartPolicy,
    recent: VecDeque<Instant>,
    consecutive: u32,
    escalated: bool,
}

impl Restarts {
    /// A tracker with this policy.
    pub fn new(policy: RestartPolicy) -> Self {
        Self {
            policy,
            recent: VecDeque::new(),
            consecutive: 0,
            escalated: false,
        }
    }

    /// Records a restart. Returns false when the budget is spent.
    pub fn record(&mut self, now: Instant) -> bool {
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

    /// Marks a successful (re)start: the backoff starts over next time.
    pub fn succeeded(&mut self) {
        self.consecutive = 0;
    }

    /// How long to wait before working again after the latest restart.
    pub fn delay(&self) -> Duration {
        if self.consecutive == 0 {
            return Duration::ZERO;
        }
        let exp = self.consecutive.saturating_sub(1).min(16);
        let d = self.policy.backoff_min.saturating_mul(1u32 << exp);
        d.min(self.policy.backoff_max)
    }

    /// True once the budget is spent.
    pub fn escalated(&self) -> bool {
        self.escalated
    }

    /// Restarts inside the current window.
    pub fn in_window(&self) -> usize {
        self.recent.len()
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

    #[tokio::test(start_paused = true)]
    async fn backoff_doubles_up_to_the_cap_and_resets_on_success() {
        let mut r = Restarts::new(policy());
        assert_eq!(r.delay(), Duration::ZERO);
        let now = Instant::now();
        r.record(now);
        assert_eq!(r.delay(), Duration::from_millis(100));
        r.record(now);
        assert_eq!(r.delay(), Duration::from_millis(200));
        r.record(now);
        assert_eq!(r.delay(), Duration::from_millis(400));
        r.succeeded();
        assert_eq!(r.delay(), Duration::ZERO);
        let mut r = Restarts::new(RestartPolicy {
            max_restarts: 100,
            ..policy()
        });
        for _ in 0..10 {
            r.record(now);
        }
        assert_eq!(r.delay(), Duration::from_secs(1));
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
