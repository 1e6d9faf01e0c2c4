//! The DedupActor: owns a [`DedupStore`]'s health, and the handle message
//! tasks use to claim, commit and release.
//!
//! **Data path vs. control path.** Claims, commits and releases are called
//! by each message task *directly* on the store (through [`DedupHandle`]):
//! routing every claim through one actor mailbox would serialise all stages
//! on one thread and, since actix's `send` does not wait for mailbox room,
//! would be an unbounded queue in disguise. The actor is on the control
//! path only: it owns the store's availability.
//!
//! **Fail closed.** When a store call fails, the task reports
//! [`StoreFailed`] (with `try_send`: a full mailbox means the actor already
//! knows) and waits. The actor marks the store unavailable, which makes
//! every task of every stage using the store wait *before* its next store
//! call, and pings the store every [`PING_INTERVAL`] until it answers, then
//! marks it available again and the waiting tasks go on. A waiting task
//! keeps its delivery and its credit: nothing is handled or acked without a
//! dedup decision, credits stop coming back, so the stage's intake stops
//! (pauses) after at most `prefetch` deliveries, and the backlog stays in the
//! broker. Waiting tasks give their delivery back (nack-requeue) when the
//! stage drains.
//!
//! **A claim held by someone else** ([`Claim::InProgress`]): the task keeps
//! its delivery and re-claims with backoff (50 ms doubling to 500 ms) until
//! the holder commits (then [`Claimed::AlreadyDone`]: ack without handling)
//! or the lease expires (then the claim is ours). This never hot-loops and
//! never increments the broker's delivery count (a nack-requeue would, and
//! would push a healthy message towards the quorum queue's delivery limit);
//! the price is a credit held for at most one lease per such duplicate.

use super::contract::{Claim, ClaimToken, CommitOutcome, DedupError, DedupStore, MissingId};
use crate::metrics::events::{self, Event};
use crate::metrics::Metrics;
use actix::prelude::*;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// How often an unavailable store is pinged.
pub(crate) const PING_INTERVAL: Duration = Duration::from_millis(250);

/// Longest pause between two claims of a key someone else holds.
const IN_PROGRESS_BACKOFF_MAX: Duration = Duration::from_millis(500);

/// Lease, TTL and key policy of a stage's deduplication.
#[derive(Clone, Debug)]
pub struct DedupSettings {
    /// How long a claim holds before another consumer may take the key
    /// (a crash mid-handling delays the message by at most this).
    pub lease: Duration,
    /// How long a committed key is remembered as done.
    pub ttl: Duration,
    /// What to do with a message without a `message_id`.
    pub missing_id: MissingId,
}

/// A store call failed: the store is (probably) unavailable.
#[derive(Message)]
#[rtype(result = "()")]
pub struct StoreFailed {
    /// The error, for the log.
    pub error: String,
}

/// Owns one store's availability. See the module docs.
pub struct DedupActor {
    store: Arc<dyn DedupStore>,
    /// True while the store answers; message tasks wait while false.
    available: watch::Sender<bool>,
    /// A ping loop is running.
    probing: bool,
    /// `memory` or `redis`: the metric label.
    backend: String,
    metrics: Metrics,
}

impl DedupActor {
    /// Starts the actor for `store` (labelled `backend` in metrics) and
    /// returns the handle message tasks use.
    pub fn start(
        store: Arc<dyn DedupStore>,
        backend: &str,
        settings: DedupSettings,
        metrics: Metrics,
    ) -> DedupHandle {
        let (tx, rx) = watch::channel(true);
        events::DedupEvicted { backend, count: 0 }.emit(&metrics);
        events::DedupAvailability {
            backend,
            up: true,
            error: None,
        }
        .emit(&metrics);
        let addr = DedupActor {
            store: store.clone(),
            available: tx,
            probing: false,
            backend: backend.to_owned(),
            metrics: metrics.clone(),
        }
        .start();
        DedupHandle {
            store,
            settings,
            available: rx,
            actor: addr,
            metrics,
            backend: backend.into(),
            evictions_reported: Arc::new(AtomicU64::new(0)),
        }
    }
}

impl Actor for DedupActor {
    type Context = Context<Self>;
}

impl actix::Handler<StoreFailed> for DedupActor {
    type Result = ();

    fn handle(&mut self, msg: StoreFailed, ctx: &mut Context<Self>) {
        if self.probing {
            return;
        }
        self.probing = true;
        let _ = self.available.send(false);
        events::DedupAvailability {
            backend: &self.backend,
            up: false,
            error: Some(&msg.error),
        }
        .emit(&self.metrics);
        let store = self.store.clone();
        ctx.spawn(
            async move {
                loop {
                    tokio::time::sleep(PING_INTERVAL).await;
                    if store.ping().await.is_ok() {
                        return;
                    }
                }
            }
            .into_actor(self)
            .map(|(), act, _ctx| {
                act.probing = false;
                let _ = act.available.send(true);
                events::DedupAvailability {
                    backend: &act.backend,
                    up: true,
                    error: None,
                }
                .emit(&act.metrics);
            }),
        );
    }
}

/// The answer to [`DedupHandle::claim`].
#[derive(Debug)]
pub enum Claimed {
    /// Ours: handle, then commit or release.
    Acquired(ClaimToken),
    /// Already processed: ack without handling.
    AlreadyDone,
    /// The stage is draining: give the delivery back.
    Stopped,
    /// The store answered with an error retrying will not fix
    /// ([`DedupError::Backend`]): dead-letter instead of waiting forever
    /// while holding a credit.
    Failed(String),
}

/// What message tasks hold: the store plus its availability. Cheap to clone.
#[derive(Clone)]
pub struct DedupHandle {
    store: Arc<dyn DedupStore>,
    settings: DedupSettings,
    available: watch::Receiver<bool>,
    actor: Addr<DedupActor>,
    metrics: Metrics,
    /// `memory` or `redis`: the metric label.
    backend: Arc<str>,
    /// The store's eviction count last reported to the metric.
    evictions_reported: Arc<AtomicU64>,
}

impl DedupHandle {
    /// Counts the evictions the store made since the last report (the
    /// claim that made room for a key is what evicts).
    fn report_evictions(&self) {
        let now = self.store.evictions();
        let before = self.evictions_reported.fetch_max(now, Ordering::Relaxed);
        if now > before {
            events::DedupEvicted {
                backend: &self.backend,
                count: now - before,
            }
            .emit(&self.metrics);
        }
    }

    /// The stage's lease, TTL and key policy.
    pub fn settings(&self) -> &DedupSettings {
        &self.settings
    }

    /// True while the store is believed to answer.
    pub fn available(&self) -> bool {
        *self.available.borrow()
    }

    fn failed(&self, stage: &str, call: &'static str, e: &DedupError) {
        events::DedupStoreFailed {
            stage,
            call,
            error: e,
        }
        .emit(&self.metrics);
        let _ = self.actor.try_send(StoreFailed {
            error: e.to_string(),
        });
    }

    /// Waits until the store is available; `false` if `stop` was raised first.
    async fn wait_available(&self, stop: &AtomicBool) -> bool {
        let mut rx = self.available.clone();
        loop {
            if stop.load(Ordering::Acquire) {
                return false;
            }
            if *rx.borrow_and_update() {
                return true;
            }
            tokio::select! {
                _ = rx.changed() => {}
                _ = tokio::time::sleep(PING_INTERVAL) => {}
            }
        }
    }

    /// Claims `key`, waiting out an unavailable store and a lease someone
    /// else holds (see the module docs). Returns [`Claimed::Stopped`] only
    /// when `stop` is raised.
    pub async fn claim(&self, stage: &str, key: &str, stop: &AtomicBool) -> Claimed {
        let mut backoff =
            crate::supervision::Backoff::new(Duration::from_millis(50), IN_PROGRESS_BACKOFF_MAX);
        loop {
            if !self.wait_available(stop).await {
                return Claimed::Stopped;
            }
            match self.store.claim(key, self.settings.lease).await {
                Ok(Claim::Acquired(t)) => {
                    self.report_evictions();
                    return Claimed::Acquired(t);
                }
                Ok(Claim::AlreadyDone) => return Claimed::AlreadyDone,
                Ok(Claim::InProgress) => {
                    tokio::time::sleep(backoff.next_delay()).await;
                }
                // An answer, not an outage: the store stays available.
                Err(e) if !e.is_transient() => {
                    events::DedupStoreFailed {
                        stage,
                        call: "claim",
                        error: &e,
                    }
                    .emit(&self.metrics);
                    return Claimed::Failed(e.to_string());
                }
                Err(e) => {
                    self.failed(stage, "claim", &e);
                    // In case the notice was dropped and the store still
                    // looks available: never spin.
                    tokio::time::sleep(PING_INTERVAL).await;
                }
            }
        }
    }

    /// Marks the claimed key done, waiting out an unavailable store. `None`
    /// only when `stop` is raised first.
    pub async fn commit(
        &self,
        stage: &str,
        token: &ClaimToken,
        stop: &AtomicBool,
    ) -> Option<CommitOutcome> {
        loop {
            if !self.wait_available(stop).await {
                return None;
            }
            match self.store.commit(token, self.settings.ttl).await {
                Ok(o) => return Some(o),
                Err(e) => {
                    self.failed(stage, "commit", &e);
                    tokio::time::sleep(PING_INTERVAL).await;
                }
            }
        }
    }

    /// Drops the claim so a retry or a replay can claim at once. Best
    /// effort: if the store does not answer, the lease expires on its own.
    pub async fn release(&self, stage: &str, token: &ClaimToken) {
        if let Err(e) = self.store.release(token).await {
            self.failed(stage, "release", &e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dedup::MemoryStore;

    #[actix::test]
    async fn evictions_of_the_memory_store_are_counted() {
        let metrics = Metrics::new();
        let store = Arc::new(MemoryStore::new(2));
        let settings = DedupSettings {
            lease: Duration::from_secs(30),
            ttl: Duration::from_secs(3600),
            missing_id: MissingId::Hash,
        };
        let h = DedupActor::start(store.clone(), "memory", settings, metrics.clone());
        assert_eq!(metrics.counter(Metrics::DEDUP_EVICTIONS, &["memory"]), 0);
        let stop = AtomicBool::new(false);
        for k in ["a", "b", "c", "d", "e"] {
            let Claimed::Acquired(t) = h.claim("s", k, &stop).await else {
                panic!("{k} not acquired");
            };
            h.commit("s", &t, &stop).await;
        }
        assert!(store.evictions() >= 3, "a store of 2 keys evicted for 5");
        assert_eq!(
            metrics.counter(Metrics::DEDUP_EVICTIONS, &["memory"]),
            store.evictions()
        );
    }
}
