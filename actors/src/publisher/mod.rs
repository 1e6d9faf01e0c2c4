//! The PublisherActor: confirmed, `mandatory` publishing through one
//! confirm-mode channel, with a token bucket, a circuit breaker and a durable
//! spool.
//!
//! Callers hold a [`PublisherHandle`]. A publish goes through, in order:
//!
//! 1. the [`TokenBucket`] (`rate`/`burst`): waits for a token; beyond
//!    `max_waiters` waiting callers it fails at once with
//!    [`Error::Backpressure`];
//! 2. the *blocked gate*: while the broker blocks the publishing connection
//!    (memory/disk alarm) callers wait (again at most `max_waiters` of them)
//!    until it unblocks or `blocked_timeout` passes — then the breaker is
//!    forced open, and kept open by the actor's tick while the block lasts
//!    (even when no publish comes by), and publishes spool;
//! 3. a credit from the unconfirmed window (`max_unconfirmed`) — taken
//!    before the gate; a caller waiting for one while the block is past
//!    `blocked_timeout` spools without it (the publishes holding the window
//!    are in flight, and their confirms wait out the block, see
//!    [`Core::patiently`]);
//! 4. the actor's [`CircuitBreaker`]: closed/probe → publish and wait for the
//!    confirm; open → append to the [`Spool`] and answer
//!    [`Published::Spooled`] once the record is durable (spool full →
//!    [`Error::Backpressure`]).
//!
//! With [`PublisherConfig::signing`] set, each message is signed (header
//! `x-flowgate-signature`, see [`Keys`](crate::Keys)) in the one place that
//! calls `basic.publish`, right before it: spooled records are stored
//! unsigned and signed when they are replayed.
//!
//! A publish runs in its caller's task: the handle awaits the breaker, the
//! `basic.publish` and the confirm in place, with no actor mailbox and no
//! task of its own on the way (each would be one more thread hand-off per
//! message). The actor owns the channel's life — opening it, replacing a dead
//! one, restarts, link events, the breaker's clock and the spool replay — and
//! publishes find the channel in the shared core. While the actor opens a
//! channel, publishes wait for it (at most `confirm_timeout`), as they would
//! have waited in its mailbox.
//!
//! Failures counted by the breaker: nack, confirm timeout, channel or
//! connection error. A `basic.return` is *not* one: the broker answered,
//! the link works, and the message itself has no route — a per-message
//! outcome. A live publish that comes back returned goes back to the caller
//! as [`Error::Unroutable`] (stages dead-letter their input with reason
//! `unroutable`) and is never spooled. A transient failure that leaves the
//! breaker open spools the message instead of failing it.
//!
//! When the breaker is no longer open the actor replays the spool in sequence
//! order, in batches, with confirms; the first replayed record is the
//! half-open probe. Each replayed record takes a rate token and a window
//! slot like a live publish, so a replay after an outage stays within
//! `rate` and `max_unconfirmed`. Each record is deleted only after its confirm, so a crash
//! mid-replay replays it again on restart (at-least-once; dedup downstream
//! removes the copy). A spooled record was never routed (a `basic.return`
//! only exists for a message actually published), so one can come back
//! returned on replay: it is then moved to the engine's dead-letter queue
//! for unroutable records ([`PublisherConfig::unroutable_queue`], default
//! [`UNROUTABLE_QUEUE`], declared durable by the publisher on first use)
//! with the reason headers (`x-flowgate-reason = unroutable`, the broker's
//! reply text, the original exchange and routing key) and only then
//! deleted from the spool — never dropped. Live publishes admitted while the
//! spool replays are not held back behind it: order is kept among spooled
//! records, not between spooled and live ones.
//!
//! A caller with a deadline of its own (the HTTP ingress) publishes with
//! [`PublisherHandle::send_within`]: when the deadline passes while the
//! publish is on the wire (the broker may have read it, e.g. just before a
//! memory alarm blocked the connection), a copy is spooled so the caller can
//! answer, but that copy is *held*: the replay stops before it until the
//! original publish is answered. A confirm (or the publish spooling a copy
//! of its own) supersedes it — the held record is deleted unreplayed and
//! counted in `flowgate_spool_superseded_total` — so the message goes out
//! once; any other answer (a nack, a return, a timeout, a lost channel)
//! releases it for replay. Holds live in memory: only a process that dies
//! before the late answer arrives replays such a copy (at least once).
//!
//! # Where each part lives
//!
//! * `config` — [`PublisherConfig`], [`SpoolConfig`], their defaults;
//! * `handle` — [`PublisherHandle`]: admission (token, window credit, blocked
//!   gate) and the publish in the caller's task, or on a task of its own
//!   for a caller with a deadline;
//! * `dispatch` — one publish through the breaker: publish and confirm, or
//!   spool; copies held for a deadline;
//! * `confirm` — the one `basic.publish` (signed right before it), confirm
//!   waits, `basic.return`s and the unroutable rescue (they call each other);
//! * `replay` — the spool replayed in order;
//! * `actor` — [`PublisherActor`]: the channel's life, link events, the tick;
//! * `breaker`, `bucket`, `spool` — the circuit breaker, the token bucket,
//!   the durable spool;
//! * here — the state they share ([`Published`], the core).

mod actor;
pub(crate) mod breaker;
pub(crate) mod bucket;
mod config;
mod confirm;
mod dispatch;
mod handle;
mod replay;
pub(crate) mod spool;

pub(crate) use breaker::{Admission, CircuitBreaker, Transition};
pub use breaker::{BreakerConfig, BreakerState};
pub(crate) use bucket::TokenBucket;
pub use spool::{Spool, SpoolError, SpoolRecord};

pub use actor::PublisherActor;
pub use config::{PublisherConfig, SpoolConfig, UNROUTABLE_QUEUE};
pub use handle::PublisherHandle;

use crate::connection::ConnectionActor;
use crate::credit::Credits;
use crate::error::{Error, Result};
use crate::metrics::events::{self, Event, PublishResult};
use crate::metrics::Metrics;
use actix::Addr;
use lapin::Channel;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use tokio::sync::watch;
use tokio::time::Instant;
/// How a publish ended when it did not fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Published {
    /// The broker confirmed it.
    Confirmed,
    /// The breaker is open: the message is durable in the local spool and
    /// will be replayed when the broker takes publishes again.
    Spooled,
}

/// A bounded set of waiting slots, shared by the blocked gate and the window.
struct WaitSlots {
    /// Callers waiting right now.
    count: AtomicUsize,
    /// Bound on `count`.
    max: usize,
}

/// Releases a waiting slot on drop.
struct SlotGuard<'a>(&'a AtomicUsize);

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl WaitSlots {
    fn enter(&self, why: &str) -> Result<SlotGuard<'_>> {
        self.count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
                (w < self.max).then_some(w + 1)
            })
            .map(|_| SlotGuard(&self.count))
            .map_err(|_| Error::Backpressure(format!("{why}: too many waiting publishers")))
    }
}

/// State shared by the actor, its handles and its publish futures. It
/// outlives actor restarts (the supervisor reuses the actor value).
struct Core {
    cfg: PublisherConfig,
    metrics: Metrics,
    bucket: TokenBucket,
    slots: WaitSlots,
    /// The confirm-mode channel, when open.
    channel: Mutex<Option<Channel>>,
    /// `true` while the actor is about to open, or is opening, the channel:
    /// publishes finding none wait for it instead of failing.
    opening: watch::Sender<bool>,
    breaker: Mutex<CircuitBreaker>,
    spool: Option<Spool>,
    /// `true` while callers must wait: the broker blocks us and
    /// `blocked_timeout` has not passed yet.
    gate: watch::Sender<bool>,
    /// When the current broker block started; `None` when not blocked.
    blocked_since: Mutex<Option<Instant>>,
    /// A replay round is running.
    replaying: AtomicBool,
    /// The unconfirmed window, shared with the handles: replayed records
    /// take a slot too.
    window: Credits,
    /// Opens the channel that declares [`PublisherConfig::unroutable_queue`].
    conn: Addr<ConnectionActor>,
    /// The unroutable queue was declared (by this process).
    unroutable_declared: AtomicBool,
    /// Spooled copies whose original publish still awaits the broker's
    /// answer (see the module docs): the replay stops before them. At most
    /// one per window credit.
    held: Mutex<BTreeSet<u64>>,
    /// Held copies being appended right now: their sequence numbers are
    /// not known yet, so no replay round may start its batch meanwhile.
    holding: AtomicUsize,
}

/// Locks a std mutex; the guarded values stay consistent across a panic
/// (each critical section is a single assignment or breaker call), so a
/// poisoned lock is recovered.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Core {
    fn update_waiters(&self) {
        let n = self.bucket.waiters() + self.slots.count.load(Ordering::Acquire);
        events::PublishWaiters { waiting: n }.emit(&self.metrics);
    }

    fn update_spool_gauges(&self) {
        if let Some(s) = &self.spool {
            events::SpoolLevel {
                records: s.len(),
                bytes: s.bytes(),
            }
            .emit(&self.metrics);
        }
    }

    /// Runs `f` on the breaker and reports the transition it returns.
    fn with_breaker<R>(
        &self,
        f: impl FnOnce(&mut CircuitBreaker, Instant) -> (R, Option<Transition>),
    ) -> R {
        let now = Instant::now();
        let (r, t, state) = {
            let mut b = lock(&self.breaker);
            let (r, t) = f(&mut b, now);
            (r, t, b.state(now))
        };
        events::BreakerChecked { state }.emit(&self.metrics);
        if let Some(t) = t {
            events::BreakerTransitioned {
                from: t.from.as_str(),
                to: t.to.as_str(),
                opened: t.to == BreakerState::Open,
            }
            .emit(&self.metrics);
        }
        r
    }

    fn breaker_state(&self) -> BreakerState {
        lock(&self.breaker).state(Instant::now())
    }

    /// Blocked for longer than `blocked_timeout`.
    fn blocked_expired(&self) -> bool {
        lock(&self.blocked_since).is_some_and(|s| s.elapsed() >= self.cfg.blocked_timeout)
    }

    /// Resolves once the broker has blocked us for longer than
    /// `blocked_timeout` (never, while it does not).
    async fn block_expired(&self) {
        let mut gate = self.gate.subscribe();
        // The tick flips the gate when the timeout passes: each change is
        // a moment to look again.
        while !self.blocked_expired() {
            if gate.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    fn is_blocked(&self) -> bool {
        lock(&self.blocked_since).is_some()
    }

    /// Counts a publish attempt's result and feeds it to the breaker; every
    /// attempt (live or replayed) goes through here once.
    fn record(&self, res: &Result<()>) {
        let result = match res {
            Ok(()) => PublishResult::Confirmed,
            Err(e) => PublishResult::Failed(e),
        };
        events::PublishFinished { result }.emit(&self.metrics);
        match res {
            // A return is the message's own fault: the broker answered, so
            // for the breaker the link works.
            Ok(()) | Err(Error::Unroutable { .. }) => {
                self.with_breaker(|b, now| ((), b.on_success(now)))
            }
            Err(_) => self.with_breaker(|b, now| ((), b.on_failure(now))),
        }
    }

    /// A channel exists that is connected or being recovered by lapin.
    fn channel_alive(&self) -> bool {
        lock(&self.channel)
            .as_ref()
            .is_some_and(crate::connection::channel_alive)
    }

    /// A channel exists and is unfit: lapin gave up on it (closed,
    /// errored), or it is not in confirm mode (its publishes would not be
    /// confirmed).
    fn channel_dead(&self) -> bool {
        lock(&self.channel).as_ref().is_some_and(|c| {
            let s = c.status();
            !crate::connection::channel_alive(c) || (s.connected() && !s.confirm())
        })
    }

    fn usable_channel(&self) -> Option<Channel> {
        lock(&self.channel)
            .as_ref()
            .filter(|c| c.status().connected())
            .cloned()
    }

    /// The usable channel; while the actor is opening one, waits for it (at
    /// most `confirm_timeout`: each waiter holds a window credit, so there
    /// are at most `max_unconfirmed` of them).
    async fn channel_for_publish(&self) -> Option<Channel> {
        if let Some(ch) = self.usable_channel() {
            return Some(ch);
        }
        let mut opening = self.opening.subscribe();
        let _ = tokio::time::timeout(self.cfg.confirm_timeout, opening.wait_for(|o| !*o)).await;
        self.usable_channel()
    }

    fn set_opening(&self, on: bool) {
        self.opening.send_replace(on);
    }

    /// Waits while the broker blocks us (bounded by `blocked_timeout`, after
    /// which the actor clears the gate and publishes spool).
    async fn wait_gate(&self) -> Result<()> {
        let mut rx = self.gate.subscribe();
        if !*rx.borrow_and_update() {
            return Ok(());
        }
        let _slot = self.slots.enter("broker blocked")?;
        self.update_waiters();
        let res = rx.wait_for(|paused| !*paused).await.map(|_| ());
        drop(_slot);
        self.update_waiters();
        res.map_err(|_| Error::ShuttingDown)
    }
}
