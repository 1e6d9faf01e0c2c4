//! Circuit breaker for the publisher: a pure state machine (no I/O, no
//! clocks of its own) driven by [`tokio::time::Instant`] values passed in by
//! the caller, so it is deterministic under paused tokio time.
//!
//! ```text
//!            `failures` consecutive failures / force_open
//!   Closed ───────────────────────────────────────────────▶ Open
//!     ▲                                                      │  ▲
//!     │ `half_open_probes` probe successes     `reset` elapsed │  │ probe failure /
//!     │                                                      ▼  │ force_open
//!     └──────────────────────────────────────────────────── HalfOpen
//! ```
//!
//! # Reporting transitions
//!
//! Every method that can change the state returns the change as
//! `Option<`[`Transition`]`>` and is `#[must_use]`, so the caller can bump
//! `flowgate_breaker_transitions_total{to}` for each one. The timed
//! Open → HalfOpen move happens lazily: [`CircuitBreaker::state`] is a pure
//! query that already *reports* `HalfOpen` once the cooldown has elapsed,
//! while the corresponding [`Transition`] is returned by the next mutating
//! call ([`allow`](CircuitBreaker::allow), [`poll`](CircuitBreaker::poll),
//! [`on_success`](CircuitBreaker::on_success),
//! [`on_failure`](CircuitBreaker::on_failure)). A single call returns the
//! *net* change since the last returned transition, so at most one
//! transition is produced per call and none is ever dropped: summing the
//! returned transitions always reproduces the state sequence the caller has
//! been told about.

use std::time::Duration;

use tokio::time::Instant;

pub use crate::metrics::events::BreakerState;

/// A state change, handed back to the caller so it can be counted and
/// logged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[must_use = "count every breaker transition (flowgate_breaker_transitions_total{to})"]
pub(crate) struct Transition {
    /// State before the change (as last reported to the caller).
    pub from: BreakerState,
    /// State after the change; the metric's `to` label.
    pub to: BreakerState,
}

/// What the breaker says about one publish attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Admission {
    /// Breaker closed: publish normally and report the outcome.
    Admit,
    /// Breaker half-open and this caller holds the single probe slot:
    /// publish and report the outcome with `on_success`/`on_failure`.
    Probe,
    /// Breaker open, or half-open with a probe already in flight: do not
    /// publish (spool instead).
    Reject,
}

impl Admission {
    /// `true` for [`Admission::Admit`] and [`Admission::Probe`].
    pub(crate) fn is_allowed(self) -> bool {
        !matches!(self, Admission::Reject)
    }
}

/// Tuning knobs of the breaker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Consecutive failures (while closed) that open the breaker; any
    /// success resets the count. `0` is treated as `1`.
    pub failures: u32,
    /// Cooldown while open before probes are allowed. Also the lease of a
    /// probe: a probe whose outcome is not reported within `reset` is
    /// presumed lost and its slot is handed to the next caller, so a dropped
    /// probe cannot wedge the breaker in half-open forever.
    pub reset: Duration,
    /// Probe successes needed in half-open to close the breaker. `0` is
    /// treated as `1`.
    pub half_open_probes: u32,
}

impl Default for BreakerConfig {
    /// 5 failures, 5 s cooldown, 1 probe.
    fn default() -> Self {
        BreakerConfig {
            failures: 5,
            reset: Duration::from_secs(5),
            half_open_probes: 1,
        }
    }
}

/// Internal state, with the data each state needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Inner {
    /// Counting consecutive failures.
    Closed { consecutive_failures: u32 },
    /// Rejecting until `since + reset`.
    Open { since: Instant },
    /// Probing; `probe_started` is `Some` while a probe is in flight.
    HalfOpen {
        successes: u32,
        probe_started: Option<Instant>,
    },
}

impl Inner {
    /// The public state this internal state corresponds to.
    fn public(self) -> BreakerState {
        match self {
            Inner::Closed { .. } => BreakerState::Closed,
            Inner::Open { .. } => BreakerState::Open,
            Inner::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }
}

/// The circuit breaker. Not internally synchronised: own it from a single
/// actor/task (or wrap it in a mutex).
#[derive(Clone, Debug)]
pub(crate) struct CircuitBreaker {
    /// Configuration, with zero counts already clamped to one.
    cfg: BreakerConfig,
    /// Current internal state.
    inner: Inner,
}

impl CircuitBreaker {
    /// A closed breaker with the given configuration.
    pub(crate) fn new(cfg: BreakerConfig) -> Self {
        CircuitBreaker {
            cfg: BreakerConfig {
                failures: cfg.failures.max(1),
                reset: cfg.reset,
                half_open_probes: cfg.half_open_probes.max(1),
            },
            inner: Inner::Closed {
                consecutive_failures: 0,
            },
        }
    }

    /// The effective configuration (zero counts clamped to one).
    #[cfg(test)]
    pub(crate) fn config(&self) -> &BreakerConfig {
        &self.cfg
    }

    /// The state at `now`, for the gauge and for logs. Pure: reports
    /// `HalfOpen` as soon as the cooldown has elapsed, but the matching
    /// [`Transition`] is returned by the next mutating call (see the
    /// [module docs](self)).
    pub(crate) fn state(&self, now: Instant) -> BreakerState {
        match self.inner {
            Inner::Open { since } if self.cooldown_over(since, now) => BreakerState::HalfOpen,
            other => other.public(),
        }
    }

    /// Consecutive failures counted while closed (0 in other states).
    #[cfg(test)]
    pub(crate) fn consecutive_failures(&self) -> u32 {
        match self.inner {
            Inner::Closed {
                consecutive_failures,
            } => consecutive_failures,
            _ => 0,
        }
    }

    /// Applies the timed Open → HalfOpen move if the cooldown has elapsed
    /// and returns it. Call it from a periodic tick if you want the
    /// transition counted without waiting for the next publish attempt.
    #[must_use = "count every breaker transition"]
    pub(crate) fn poll(&mut self, now: Instant) -> Option<Transition> {
        let before = self.inner.public();
        self.advance(now);
        self.transition_from(before)
    }

    /// Asks whether a publish may go out at `now`.
    ///
    /// Closed → [`Admission::Admit`]. Open → [`Admission::Reject`] until
    /// `reset` has elapsed, then the breaker moves to half-open. Half-open →
    /// [`Admission::Probe`] for exactly one caller at a time; others get
    /// [`Admission::Reject`] until that probe's outcome is reported (or its
    /// lease of `reset` runs out).
    #[must_use = "check the admission and count the transition"]
    pub(crate) fn allow(&mut self, now: Instant) -> (Admission, Option<Transition>) {
        let before = self.inner.public();
        self.advance(now);
        let reset = self.cfg.reset;
        let admission = match &mut self.inner {
            Inner::Closed { .. } => Admission::Admit,
            Inner::Open { .. } => Admission::Reject,
            Inner::HalfOpen { probe_started, .. } => match *probe_started {
                // A probe whose outcome was not reported within `reset` is
                // presumed lost; its lease expires.
                Some(started) if !elapsed(started, now, reset) => Admission::Reject,
                _ => {
                    *probe_started = Some(now);
                    Admission::Probe
                }
            },
        };
        (admission, self.transition_from(before))
    }

    /// Reports a successful publish (broker ack).
    ///
    /// Closed: resets the failure count. Half-open with a probe in flight:
    /// counts a probe success and closes after `half_open_probes` of them.
    /// Open, or half-open without a probe in flight: a late outcome of a
    /// publish admitted before the breaker opened; ignored.
    #[must_use = "count every breaker transition"]
    pub(crate) fn on_success(&mut self, now: Instant) -> Option<Transition> {
        let before = self.inner.public();
        self.advance(now);
        match &mut self.inner {
            Inner::Closed {
                consecutive_failures,
            } => *consecutive_failures = 0,
            Inner::Open { .. } => {}
            Inner::HalfOpen {
                successes,
                probe_started,
            } => {
                if probe_started.take().is_some() {
                    *successes += 1;
                    if *successes >= self.cfg.half_open_probes {
                        self.inner = Inner::Closed {
                            consecutive_failures: 0,
                        };
                    }
                }
            }
        }
        self.transition_from(before)
    }

    /// Reports a failed publish (nack, timeout, channel error).
    ///
    /// Closed: counts it and opens after `failures` consecutive ones.
    /// Half-open with a probe in flight: re-opens with a fresh cooldown
    /// starting at `now`. Open, or half-open without a probe in flight:
    /// ignored (a late outcome; it must not extend the cooldown).
    #[must_use = "count every breaker transition"]
    pub(crate) fn on_failure(&mut self, now: Instant) -> Option<Transition> {
        let before = self.inner.public();
        self.advance(now);
        match &mut self.inner {
            Inner::Closed {
                consecutive_failures,
            } => {
                *consecutive_failures = consecutive_failures.saturating_add(1);
                if *consecutive_failures >= self.cfg.failures {
                    self.inner = Inner::Open { since: now };
                }
            }
            Inner::Open { .. } => {}
            Inner::HalfOpen { probe_started, .. } => {
                if probe_started.is_some() {
                    self.inner = Inner::Open { since: now };
                }
            }
        }
        self.transition_from(before)
    }

    /// Opens the breaker immediately with a fresh cooldown starting at
    /// `now`, whatever its state (used when the broker has blocked the
    /// connection for longer than `blocked_timeout`). Already open: the
    /// cooldown is restarted and no transition is returned.
    #[must_use = "count every breaker transition"]
    pub(crate) fn force_open(&mut self, now: Instant) -> Option<Transition> {
        // No `advance` here: an elapsed-but-unreported Open stays Open, so
        // the net change is Open → Open and nothing is reported.
        let before = self.inner.public();
        self.inner = Inner::Open { since: now };
        self.transition_from(before)
    }

    /// `true` once the cooldown that started at `since` is over at `now`.
    fn cooldown_over(&self, since: Instant, now: Instant) -> bool {
        elapsed(since, now, self.cfg.reset)
    }

    /// Applies the time-driven Open → HalfOpen move.
    fn advance(&mut self, now: Instant) {
        if let Inner::Open { since } = self.inner {
            if self.cooldown_over(since, now) {
                self.inner = Inner::HalfOpen {
                    successes: 0,
                    probe_started: None,
                };
            }
        }
    }

    /// The net transition from `before` to the current state, if any.
    fn transition_from(&self, before: BreakerState) -> Option<Transition> {
        let to = self.inner.public();
        (to != before).then_some(Transition { from: before, to })
    }
}

/// `true` once at least `d` has passed between `since` and `now`.
fn elapsed(since: Instant, now: Instant, d: Duration) -> bool {
    now.saturating_duration_since(since) >= d
}

impl Default for CircuitBreaker {
    /// A closed breaker with [`BreakerConfig::default`].
    fn default() -> Self {
        CircuitBreaker::new(BreakerConfig::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::advance;
    use BreakerState::{Closed, HalfOpen, Open};

    fn cfg(failures: u32, reset_ms: u64, probes: u32) -> BreakerConfig {
        BreakerConfig {
            failures,
            reset: Duration::from_millis(reset_ms),
            half_open_probes: probes,
        }
    }

    fn t(from: BreakerState, to: BreakerState) -> Option<Transition> {
        Some(Transition { from, to })
    }

    /// Trips a closed breaker with `cfg.failures` failures.
    fn trip(b: &mut CircuitBreaker) {
        let n = b.config().failures;
        for _ in 1..n {
            assert_eq!(b.on_failure(Instant::now()), None);
        }
        assert_eq!(b.on_failure(Instant::now()), t(Closed, Open));
    }

    #[test]
    fn gauge_and_names() {
        assert_eq!(Closed.as_str(), "closed");
        assert_eq!(Open.as_str(), "open");
        assert_eq!(HalfOpen.to_string(), "half_open");
        assert_eq!(
            BreakerConfig::default(),
            cfg(5, 5000, 1),
            "default is 5 failures / 5 s / 1 probe"
        );
        assert!(Admission::Probe.is_allowed() && !Admission::Reject.is_allowed());
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_n_consecutive_failures() {
        let mut b = CircuitBreaker::new(cfg(3, 1000, 1));
        assert_eq!(b.allow(Instant::now()), (Admission::Admit, None));
        assert_eq!(b.on_failure(Instant::now()), None);
        assert_eq!(b.on_failure(Instant::now()), None);
        assert_eq!(b.consecutive_failures(), 2);
        assert_eq!(b.state(Instant::now()), Closed);
        assert_eq!(b.on_failure(Instant::now()), t(Closed, Open));
        assert_eq!(b.state(Instant::now()), Open);
        assert_eq!(b.allow(Instant::now()), (Admission::Reject, None));
    }

    #[tokio::test(start_paused = true)]
    async fn success_in_between_resets_the_count() {
        let mut b = CircuitBreaker::new(cfg(3, 1000, 1));
        for _ in 0..5 {
            assert_eq!(b.on_failure(Instant::now()), None);
            assert_eq!(b.on_failure(Instant::now()), None);
            assert_eq!(b.on_success(Instant::now()), None);
            assert_eq!(b.consecutive_failures(), 0);
        }
        assert_eq!(b.state(Instant::now()), Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn stays_open_for_reset_then_half_opens() {
        let mut b = CircuitBreaker::new(cfg(1, 1000, 1));
        trip(&mut b);
        advance(Duration::from_millis(999)).await;
        assert_eq!(b.state(Instant::now()), Open);
        assert_eq!(b.allow(Instant::now()), (Admission::Reject, None));
        assert_eq!(b.poll(Instant::now()), None);
        advance(Duration::from_millis(1)).await;
        // The pure query already shows half-open ...
        assert_eq!(b.state(Instant::now()), HalfOpen);
        // ... and the transition is reported exactly once, by the next
        // mutating call.
        assert_eq!(
            b.allow(Instant::now()),
            (Admission::Probe, t(Open, HalfOpen))
        );
        assert_eq!(b.poll(Instant::now()), None);
    }

    #[tokio::test(start_paused = true)]
    async fn poll_reports_the_timed_transition() {
        let mut b = CircuitBreaker::new(cfg(1, 1000, 1));
        trip(&mut b);
        advance(Duration::from_secs(2)).await;
        assert_eq!(b.poll(Instant::now()), t(Open, HalfOpen));
        assert_eq!(b.poll(Instant::now()), None);
        assert_eq!(b.allow(Instant::now()), (Admission::Probe, None));
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_admits_exactly_one_probe() {
        let mut b = CircuitBreaker::new(cfg(1, 1000, 1));
        trip(&mut b);
        advance(Duration::from_secs(1)).await;
        assert_eq!(
            b.allow(Instant::now()),
            (Admission::Probe, t(Open, HalfOpen))
        );
        for _ in 0..10 {
            assert_eq!(b.allow(Instant::now()), (Admission::Reject, None));
        }
        assert_eq!(b.state(Instant::now()), HalfOpen);
    }

    #[tokio::test(start_paused = true)]
    async fn probe_success_closes() {
        let mut b = CircuitBreaker::new(cfg(2, 1000, 1));
        trip(&mut b);
        advance(Duration::from_secs(1)).await;
        let (adm, _) = b.allow(Instant::now());
        assert_eq!(adm, Admission::Probe);
        assert_eq!(b.on_success(Instant::now()), t(HalfOpen, Closed));
        assert_eq!(b.state(Instant::now()), Closed);
        assert_eq!(b.allow(Instant::now()), (Admission::Admit, None));
        // The failure count starts from zero again.
        assert_eq!(b.on_failure(Instant::now()), None);
        assert_eq!(b.on_failure(Instant::now()), t(Closed, Open));
    }

    #[tokio::test(start_paused = true)]
    async fn probe_failure_reopens_with_fresh_cooldown() {
        let mut b = CircuitBreaker::new(cfg(1, 1000, 1));
        trip(&mut b);
        advance(Duration::from_millis(1500)).await;
        assert_eq!(b.allow(Instant::now()).0, Admission::Probe);
        advance(Duration::from_millis(300)).await;
        assert_eq!(b.on_failure(Instant::now()), t(HalfOpen, Open));
        // Cooldown counts from the probe failure, not from the first trip.
        advance(Duration::from_millis(999)).await;
        assert_eq!(b.state(Instant::now()), Open);
        assert_eq!(b.allow(Instant::now()), (Admission::Reject, None));
        advance(Duration::from_millis(1)).await;
        assert_eq!(
            b.allow(Instant::now()),
            (Admission::Probe, t(Open, HalfOpen))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn multiple_probes_needed_to_close() {
        let mut b = CircuitBreaker::new(cfg(1, 1000, 3));
        trip(&mut b);
        advance(Duration::from_secs(1)).await;
        for i in 0..3 {
            let (adm, _) = b.allow(Instant::now());
            assert_eq!(adm, Admission::Probe);
            assert_eq!(b.allow(Instant::now()).0, Admission::Reject);
            let tr = b.on_success(Instant::now());
            if i < 2 {
                assert_eq!(tr, None);
                assert_eq!(b.state(Instant::now()), HalfOpen);
            } else {
                assert_eq!(tr, t(HalfOpen, Closed));
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn late_outcomes_are_ignored_while_open_or_without_probe() {
        let mut b = CircuitBreaker::new(cfg(1, 1000, 1));
        trip(&mut b);
        advance(Duration::from_millis(500)).await;
        // Late failure must not extend the cooldown; late success must not close.
        assert_eq!(b.on_failure(Instant::now()), None);
        assert_eq!(b.on_success(Instant::now()), None);
        advance(Duration::from_millis(500)).await;
        // Cooldown over: the late success reports the timed transition but
        // does not count as a probe success.
        assert_eq!(b.on_success(Instant::now()), t(Open, HalfOpen));
        assert_eq!(b.state(Instant::now()), HalfOpen);
        assert_eq!(b.on_failure(Instant::now()), None);
        assert_eq!(b.state(Instant::now()), HalfOpen);
        assert_eq!(b.allow(Instant::now()), (Admission::Probe, None));
    }

    #[tokio::test(start_paused = true)]
    async fn lost_probe_lease_expires() {
        let mut b = CircuitBreaker::new(cfg(1, 1000, 1));
        trip(&mut b);
        advance(Duration::from_secs(1)).await;
        assert_eq!(b.allow(Instant::now()).0, Admission::Probe);
        advance(Duration::from_millis(999)).await;
        assert_eq!(b.allow(Instant::now()).0, Admission::Reject);
        advance(Duration::from_millis(1)).await;
        assert_eq!(b.allow(Instant::now()), (Admission::Probe, None));
    }

    #[tokio::test(start_paused = true)]
    async fn force_open_from_every_state() {
        let mut b = CircuitBreaker::new(cfg(5, 1000, 1));
        assert_eq!(b.force_open(Instant::now()), t(Closed, Open));
        advance(Duration::from_millis(800)).await;
        // Already open: restarts the cooldown, no transition.
        assert_eq!(b.force_open(Instant::now()), None);
        advance(Duration::from_millis(800)).await;
        assert_eq!(b.state(Instant::now()), Open);
        advance(Duration::from_millis(200)).await;
        assert_eq!(b.state(Instant::now()), HalfOpen);
        // Elapsed but unreported: net change Open -> Open, nothing reported.
        assert_eq!(b.force_open(Instant::now()), None);
        assert_eq!(b.state(Instant::now()), Open);
        advance(Duration::from_secs(1)).await;
        assert_eq!(b.allow(Instant::now()).1, t(Open, HalfOpen));
        assert_eq!(b.force_open(Instant::now()), t(HalfOpen, Open));
    }

    #[test]
    fn zero_counts_are_clamped() {
        let mut b = CircuitBreaker::new(cfg(0, 0, 0));
        assert_eq!(b.config().failures, 1);
        assert_eq!(b.config().half_open_probes, 1);
        let now = Instant::now();
        assert_eq!(b.on_failure(now), t(Closed, Open));
        // reset = 0: immediately half-open.
        assert_eq!(b.allow(now), (Admission::Probe, t(Open, HalfOpen)));
        assert_eq!(b.on_success(now), t(HalfOpen, Closed));
    }

    /// Replays a pseudo-random op sequence and checks that the reported
    /// transitions chain: each `from` equals the previous `to`, and the last
    /// `to` is the state the breaker is in.
    #[tokio::test(start_paused = true)]
    async fn reported_transitions_always_chain() {
        let mut b = CircuitBreaker::new(cfg(2, 100, 2));
        let mut reported = Closed;
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..5000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let now = Instant::now();
            let tr = match x % 6 {
                0 => b.allow(now).1,
                1 => b.on_success(now),
                2 => b.on_failure(now),
                3 => b.force_open(now),
                4 => b.poll(now),
                _ => {
                    advance(Duration::from_millis(x % 70)).await;
                    None
                }
            };
            if let Some(tr) = tr {
                assert_eq!(tr.from, reported);
                assert_ne!(tr.from, tr.to);
                reported = tr.to;
            }
            assert_eq!(b.inner.public(), reported);
        }
    }
}
