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
//!    forced open and publishes spool;
//! 3. a credit from the unconfirmed window (`max_unconfirmed`);
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

pub(crate) mod breaker;
pub(crate) mod bucket;
pub(crate) mod spool;

pub(crate) use breaker::{Admission, CircuitBreaker, Transition};
pub use breaker::{BreakerConfig, BreakerState};
pub(crate) use bucket::TokenBucket;
pub use spool::{Spool, SpoolError, SpoolRecord};

use crate::connection::{ConnectionActor, LinkEvent, OpenChannel, Purpose, Subscribe};
use crate::credit::{Credit, Credits};
use crate::envelope;
use crate::envelope::{
    truncate, ERROR as ERROR_HEADER, MAX_ERROR_BYTES as MAX_ERROR_HEADER_BYTES,
    REASON as REASON_HEADER,
};
use crate::error::{Error, Result};
use crate::message::{set_header, Output};
use crate::metrics::events::{self, ActorKind, Event, PublishResult, SpoolOp};
use crate::metrics::Metrics;
use crate::retry::{ORIGINAL_EXCHANGE_HEADER, ORIGINAL_ROUTING_KEY_HEADER};
use crate::signing::{self, Keys};
use crate::supervision::{Escalation, EscalationSender, RestartPolicy, Restarts};
use actix::prelude::*;
use futures::FutureExt;
use lapin::message::BasicReturnMessage;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::PublisherConfirm;
use lapin::{BasicProperties, Channel, Confirmation};
use std::collections::BTreeSet;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

/// Most spooled records published per replay round before their confirms
/// are awaited and they are deleted (one spool transaction per round).
const REPLAY_BATCH: usize = 256;

/// How often the actor re-evaluates the breaker (open → half-open), the
/// blocked timeout and whether the spool should replay.
const TICK: Duration = Duration::from_millis(100);

/// The default queue for spooled records that turn out unroutable on
/// replay (see the module docs).
pub const UNROUTABLE_QUEUE: &str = "flowgate.unroutable";

/// Where and how large the durable spool is.
#[derive(Clone, Debug)]
pub struct SpoolConfig {
    /// The redb file.
    pub path: PathBuf,
    /// Bound on the encoded bytes stored; beyond it publishes get backpressure.
    pub max_bytes: u64,
}

/// Publisher settings.
#[derive(Clone, Debug)]
pub struct PublisherConfig {
    /// How long to wait for a broker confirm before calling the publish failed.
    pub confirm_timeout: Duration,
    /// Bound on publishes awaiting a confirm (the publish window).
    pub max_unconfirmed: usize,
    /// Token bucket rate in publishes per second; `0` is unlimited.
    pub rate: u32,
    /// Token bucket burst.
    pub burst: u32,
    /// Most callers allowed to wait (for a token, an unblock, or window
    /// room) before further publishes get [`Error::Backpressure`] at once.
    pub max_waiters: usize,
    /// The circuit breaker's thresholds.
    pub breaker: BreakerConfig,
    /// How long a broker block (resource alarm) may last before the breaker
    /// is forced open and publishes spool.
    pub blocked_timeout: Duration,
    /// The durable spool; `None`: an open breaker answers backpressure.
    pub spool: Option<SpoolConfig>,
    /// Restart backoff and budget.
    pub policy: RestartPolicy,
    /// Signs every publish (header `x-flowgate-signature`, see
    /// [`Keys`](crate::Keys)) just before it is sent, spool replays included;
    /// `None`: messages go out as they are.
    pub signing: Option<Keys>,
    /// Publish every message persistent (`delivery_mode = 2`) whatever it
    /// carries. Default `false`: the message's own delivery mode is kept, so
    /// `forward` republishes a transient input as transient and one without
    /// a delivery mode without one. Messages made with [`Output::new`] are
    /// persistent already.
    pub force_persistent: bool,
    /// Where a spooled record that comes back unroutable on replay is
    /// moved (through the default exchange), with reason headers. Declared
    /// durable by the publisher on first use. At most 255 bytes.
    pub unroutable_queue: String,
}

impl Default for PublisherConfig {
    fn default() -> Self {
        Self {
            confirm_timeout: Duration::from_secs(10),
            max_unconfirmed: 1024,
            rate: 0,
            burst: 1000,
            max_waiters: 1024,
            breaker: BreakerConfig::default(),
            blocked_timeout: Duration::from_secs(30),
            spool: None,
            policy: RestartPolicy::default(),
            signing: None,
            force_persistent: false,
            unroutable_queue: UNROUTABLE_QUEUE.to_owned(),
        }
    }
}

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

    /// Publishes (or spools) one message; the caller holds its window credit.
    async fn dispatch(&self, msg: &Output) -> Result<Published> {
        // A message the broker cannot take is its sender's fault: refuse it
        // before it touches the breaker or the spool.
        envelope::check_short("exchange", &msg.exchange)?;
        envelope::check_short("routing key", &msg.routing_key)?;
        if self.blocked_expired() {
            // Keep the breaker open for as long as the block lasts: no probe
            // can succeed on a blocked connection.
            self.with_breaker(|b, now| ((), b.force_open(now)));
            return self.spool(msg.clone()).await;
        }
        let admission = self.with_breaker(|b, now| b.allow(now));
        if !admission.is_allowed() {
            return self.spool(msg.clone()).await;
        }
        let res = match self.channel_for_publish().await {
            None => Err(Error::NotConnected),
            Some(ch) => self.publish_once(&ch, msg).await,
        };
        self.record(&res);
        match res {
            Ok(()) => Ok(Published::Confirmed),
            Err(e) => {
                debug!(error = %e, "publish failed");
                if matches!(e, Error::Unroutable { .. }) {
                    return Err(e);
                }
                if self.spool.is_some() && self.breaker_state() == BreakerState::Open {
                    warn!(error = %e, "publish failed and the breaker is open; spooling it");
                    return self.spool(msg.clone()).await;
                }
                Err(e)
            }
        }
    }

    /// Appends to the spool; resolves once the record is durable.
    async fn spool(&self, msg: Output) -> Result<Published> {
        self.spool_record(msg).await.map(|_| Published::Spooled)
    }

    /// Spools a copy of `msg`, whose publish still awaits its answer, held
    /// until [`Core::settle_held`] (see the module docs).
    async fn spool_held(&self, msg: &Output) -> Result<u64> {
        struct Appending<'a>(&'a AtomicUsize);
        impl Drop for Appending<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        self.holding.fetch_add(1, Ordering::SeqCst);
        let _appending = Appending(&self.holding);
        let seq = self.spool_record(msg.clone()).await?;
        // Before `holding` drops: a replay that read this record sees it held.
        lock(&self.held).insert(seq);
        Ok(seq)
    }

    /// The original publish of held record `seq` was answered: a confirm
    /// (or a copy of its own in the spool) supersedes the record, which is
    /// deleted; any other answer releases it for replay.
    async fn settle_held(&self, seq: u64, answer: &Result<Published>) {
        if let (Ok(_), Some(spool)) = (answer, &self.spool) {
            match spool.remove_async(seq).await {
                Ok(()) => events::SpoolSuperseded.emit(&self.metrics),
                // It stays, and is replayed: a copy too many, never one lost.
                Err(e) => events::SpoolFailed {
                    op: SpoolOp::Remove,
                    error: &e,
                }
                .emit(&self.metrics),
            }
        }
        lock(&self.held).remove(&seq);
        self.update_spool_gauges();
    }

    /// The part of a replay batch before the first held record; `None`
    /// while a held copy is being appended (it may be in the batch).
    fn unheld_prefix(&self, mut batch: Vec<(u64, SpoolRecord)>) -> Option<Vec<(u64, SpoolRecord)>> {
        if self.holding.load(Ordering::SeqCst) > 0 {
            return None;
        }
        let held = lock(&self.held);
        if let Some(first) = batch.iter().position(|(seq, _)| held.contains(seq)) {
            batch.truncate(first);
        }
        Some(batch)
    }

    /// Appends to the spool; its sequence number once the record is durable.
    async fn spool_record(&self, msg: Output) -> Result<u64> {
        let Some(spool) = &self.spool else {
            let e =
                Error::Backpressure("publish circuit breaker open (no spool configured)".into());
            events::PublishFinished {
                result: PublishResult::Failed(&e),
            }
            .emit(&self.metrics);
            return Err(e);
        };
        let rec = SpoolRecord {
            exchange: msg.exchange,
            routing_key: msg.routing_key,
            body: msg.body.to_vec(),
            properties: msg.properties,
        };
        let res = spool.append_async(rec).await;
        self.update_spool_gauges();
        match res {
            Ok(seq) => {
                events::PublishFinished {
                    result: PublishResult::Spooled,
                }
                .emit(&self.metrics);
                Ok(seq)
            }
            Err(e) if e.is_full() => {
                events::PublishFinished {
                    result: PublishResult::SpoolFull,
                }
                .emit(&self.metrics);
                debug!(error = %e, "spool full; backpressure");
                Err(Error::Backpressure(e.to_string()))
            }
            Err(e) => {
                events::SpoolFailed {
                    op: SpoolOp::Append,
                    error: &e,
                }
                .emit(&self.metrics);
                Err(Error::Spool(e))
            }
        }
    }

    /// Whether a replay round should start now.
    fn should_replay(&self) -> bool {
        self.spool.as_ref().is_some_and(|s| !s.is_empty())
            && !self.replaying.load(Ordering::Acquire)
            && !self.is_blocked()
            && self.breaker_state() != BreakerState::Open
            && self.usable_channel().is_some()
    }

    /// Replays the spool in order until it is empty or publishing fails.
    async fn replay(self: Arc<Self>) {
        struct Done<'a>(&'a AtomicBool);
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                self.0.store(false, Ordering::Release);
            }
        }
        if self.replaying.swap(true, Ordering::AcqRel) {
            return;
        }
        let _done = Done(&self.replaying);
        let Some(spool) = self.spool.clone() else {
            return;
        };
        info!(records = spool.len(), "replaying the spool");
        loop {
            if self.is_blocked() {
                return;
            }
            let Some(ch) = self.usable_channel() else {
                return;
            };
            let batch = match spool.peek_batch_async(REPLAY_BATCH).await {
                Ok(b) => b,
                Err(e) => {
                    events::SpoolFailed {
                        op: SpoolOp::Read,
                        error: &e,
                    }
                    .emit(&self.metrics);
                    return;
                }
            };
            if batch.is_empty() {
                info!("spool drained");
                return;
            }
            let Some(batch) = self.unheld_prefix(batch) else {
                return;
            };
            if batch.is_empty() {
                debug!("the next spooled record awaits its original publish's answer");
                return;
            }
            let admission = self.with_breaker(|b, now| b.allow(now));
            let take = match admission {
                Admission::Reject => return,
                Admission::Probe => 1,
                // A round holds a window credit per record until the
                // confirms are awaited: never more than the window.
                Admission::Admit => batch.len().min(self.window.total().max(1)),
            };
            let results = self.publish_batch(&ch, &batch[..take]).await;
            let mut remove = Vec::with_capacity(take);
            let mut failed = false;
            for ((seq, rec), res) in batch.iter().zip(results) {
                self.record(&res);
                match res {
                    Ok(()) => {
                        events::SpoolReplayed.emit(&self.metrics);
                        remove.push(*seq);
                    }
                    Err(e @ Error::Unroutable { .. }) => {
                        match self.dead_letter_unroutable(&ch, rec, &e).await {
                            Ok(()) => {
                                self.count_unroutable_dead_letter(
                                    rec,
                                    "spooled message is unroutable; moved to the unroutable queue",
                                );
                                remove.push(*seq);
                            }
                            Err(e) => {
                                error!(
                                    seq, error = %e, queue = %self.cfg.unroutable_queue,
                                    "cannot move an unroutable spooled message; it stays in the spool"
                                );
                                failed = true;
                            }
                        }
                    }
                    Err(e) => {
                        warn!(seq, error = %e, "replay publish failed; will retry");
                        failed = true;
                    }
                }
            }
            let removed = spool.remove_many_async(remove).await;
            self.update_spool_gauges();
            if let Err(e) = removed {
                events::SpoolFailed {
                    op: SpoolOp::Remove,
                    error: &e,
                }
                .emit(&self.metrics);
                return;
            }
            if failed {
                return;
            }
        }
    }
}

/// What we sent, to recognise our own message in a `basic.return`.
struct Sent<'a> {
    exchange: &'a str,
    routing_key: &'a str,
    body: &'a [u8],
    message_id: Option<&'a str>,
}

impl<'a> Sent<'a> {
    fn record(rec: &'a SpoolRecord) -> Self {
        Sent {
            exchange: &rec.exchange,
            routing_key: &rec.routing_key,
            body: &rec.body,
            message_id: rec
                .properties
                .message_id()
                .as_ref()
                .map(ShortString::as_str),
        }
    }

    /// The return is this message (two messages alike in all of these are
    /// interchangeable).
    fn is(&self, ret: &BasicReturnMessage) -> bool {
        let d = &ret.delivery;
        d.exchange.as_str() == self.exchange
            && d.routing_key.as_str() == self.routing_key
            && d.data == self.body
            && d.properties.message_id().as_ref().map(ShortString::as_str) == self.message_id
    }
}

impl Core {
    /// Declares the unroutable queue once, on a channel of its own (a
    /// failed declare closes its channel, not the confirm channel).
    async fn declare_unroutable_queue(&self) -> Result<()> {
        if self.unroutable_declared.load(Ordering::Acquire) {
            return Ok(());
        }
        let name = envelope::short_string("unroutable queue", &self.cfg.unroutable_queue)?;
        let ch = self.conn.send(OpenChannel(Purpose::Publish)).await??;
        let declared = ch
            .queue_declare(
                name,
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await;
        let _ = ch.close(200, "declared".into()).await;
        declared?;
        self.unroutable_declared.store(true, Ordering::Release);
        Ok(())
    }

    /// Moves a spooled record that came back unroutable to the unroutable
    /// queue, with reason headers; `Ok` once confirmed there. Also rescues
    /// any foreign return handed to this confirm.
    async fn dead_letter_unroutable(
        &self,
        ch: &Channel,
        rec: &SpoolRecord,
        returned: &Error,
    ) -> Result<()> {
        let foreign = self.publish_dead_letter(ch, rec, returned).await?;
        if let Some(ret) = foreign {
            self.rescue_returns(ch, ret).await;
        }
        Ok(())
    }

    /// Publishes `rec` to the unroutable queue with reason headers;
    /// `Ok(foreign)` once confirmed, with a return lapin attached to this
    /// confirm that belongs to another publish.
    async fn publish_dead_letter(
        &self,
        ch: &Channel,
        rec: &SpoolRecord,
        returned: &Error,
    ) -> Result<Option<BasicReturnMessage>> {
        self.declare_unroutable_queue().await?;
        let mut props = rec.properties.clone().with_delivery_mode(2);
        let text = |v: &str| AMQPValue::LongString(LongString::from(v.to_owned()));
        set_header(
            &mut props,
            REASON_HEADER,
            text(envelope::Reason::Unroutable.as_str()),
        );
        set_header(
            &mut props,
            ERROR_HEADER,
            text(&truncate(returned.to_string(), MAX_ERROR_HEADER_BYTES)),
        );
        set_header(&mut props, ORIGINAL_EXCHANGE_HEADER, text(&rec.exchange));
        set_header(
            &mut props,
            ORIGINAL_ROUTING_KEY_HEADER,
            text(&rec.routing_key),
        );
        envelope::stamp_dead_lettered(&mut props);
        let queue = self.cfg.unroutable_queue.as_str();
        let sent = Sent {
            exchange: "",
            routing_key: queue,
            body: &rec.body,
            message_id: rec
                .properties
                .message_id()
                .as_ref()
                .map(ShortString::as_str),
        };
        let confirmation = self
            .patiently(async {
                let confirm = self.send(ch, "", queue, &rec.body, props).await?;
                Ok(confirm.await)
            })
            .await?;
        match confirmation {
            Ok(Confirmation::Ack(Some(ret))) if !sent.is(&ret) => Ok(Some(ret)),
            other => {
                let res = confirmed(other);
                if matches!(res, Err(Error::Unroutable { .. })) {
                    // Deleted since we declared it: declare again next time.
                    self.unroutable_declared.store(false, Ordering::Release);
                }
                res.map(|()| None)
            }
        }
    }

    /// Waits for `fut` (a frame write or a confirm) for `confirm_timeout`,
    /// and for as long as the broker blocks the connection on top: the
    /// broker has read the publish's method frame and routes the message
    /// once it unblocks, so giving up (and spooling a copy) while blocked
    /// would deliver it twice.
    async fn patiently<T>(&self, fut: impl std::future::Future<Output = Result<T>>) -> Result<T> {
        let timeout = self.cfg.confirm_timeout;
        let mut fut = std::pin::pin!(fut);
        loop {
            match tokio::time::timeout(timeout, &mut fut).await {
                Ok(r) => return r,
                Err(_) if self.is_blocked() => continue,
                Err(_) => return Err(Error::ConfirmTimeout(timeout)),
            }
        }
    }

    /// Sends one message and waits for its confirm (see [`Core::patiently`]).
    async fn publish_once(&self, ch: &Channel, msg: &Output) -> Result<()> {
        let props = msg.properties.clone();
        let sent = Sent {
            exchange: &msg.exchange,
            routing_key: &msg.routing_key,
            body: &msg.body,
            message_id: msg
                .properties
                .message_id()
                .as_ref()
                .map(ShortString::as_str),
        };
        let confirmation = self
            .patiently(async {
                let started = std::time::Instant::now();
                let confirm = self
                    .send(ch, &msg.exchange, &msg.routing_key, &msg.body, props)
                    .await?;
                let answer = confirm.await;
                events::ConfirmAwaited {
                    elapsed: started.elapsed(),
                }
                .emit(&self.metrics);
                Ok(answer)
            })
            .await?;
        self.settle(ch, confirmation, &sent).await
    }

    /// Sends spooled records in order on one channel, then awaits their
    /// confirms; one result per record, in order.
    async fn publish_batch(&self, ch: &Channel, batch: &[(u64, SpoolRecord)]) -> Vec<Result<()>> {
        let mut confirms = Vec::with_capacity(batch.len());
        for (_, rec) in batch {
            // A replay is held to the rate and the window of live
            // publishes; a record that gets neither stays for the next round.
            if self.bucket.acquire().await.is_err() {
                break;
            }
            let Some(credit) = self.window.acquire().await else {
                break;
            };
            let props = rec.properties.clone();
            let sent = self
                .patiently(self.send(ch, &rec.exchange, &rec.routing_key, &rec.body, props))
                .await;
            confirms.push((credit, sent));
        }
        let mut out = Vec::with_capacity(confirms.len());
        for ((_credit, c), (_, rec)) in confirms.into_iter().zip(batch) {
            out.push(match c {
                Err(e) => Err(e),
                Ok(c) => match self.patiently(async { Ok(c.await) }).await {
                    Err(e) => Err(e),
                    Ok(confirmation) => self.settle(ch, confirmation, &Sent::record(rec)).await,
                },
            });
        }
        out
    }

    /// Settles the confirm of one message we sent.
    ///
    /// A `basic.return` carries no delivery tag, and lapin hands each one to
    /// whichever confirm it completes next — with confirms out of order
    /// (quorum queues) or `multiple`, that is often another publish's. So a
    /// return on our confirm is ours only if it is the message we sent; a
    /// foreign one (its owner was told "confirmed") is moved to the
    /// unroutable queue here, so it still ends in a countable place.
    async fn settle(
        &self,
        ch: &Channel,
        confirmation: lapin::Result<Confirmation>,
        sent: &Sent<'_>,
    ) -> Result<()> {
        let (ret, acked) = match confirmation {
            Ok(Confirmation::Ack(Some(ret))) => (ret, true),
            Ok(Confirmation::Nack(Some(ret))) => (ret, false),
            other => return confirmed(other),
        };
        if sent.is(&ret) {
            return confirmed(Ok(Confirmation::Ack(Some(ret))));
        }
        self.rescue_returns(ch, ret).await;
        if acked {
            Ok(())
        } else {
            Err(Error::Nacked)
        }
    }

    /// Moves returned messages whose publishers were told "confirmed" to
    /// the unroutable queue (each move may surface another such return).
    async fn rescue_returns(&self, ch: &Channel, first: BasicReturnMessage) {
        let mut next = Some(first);
        while let Some(ret) = next.take() {
            let returned = Error::Unroutable {
                code: ret.reply_code,
                text: ret.reply_text.to_string(),
            };
            let d = ret.delivery;
            let rec = SpoolRecord {
                exchange: d.exchange.to_string(),
                routing_key: d.routing_key.to_string(),
                body: d.data,
                properties: d.properties,
            };
            match self.publish_dead_letter(ch, &rec, &returned).await {
                Ok(foreign) => {
                    self.count_unroutable_dead_letter(
                        &rec,
                        "returned message moved to the unroutable queue",
                    );
                    next = foreign;
                }
                Err(e) => events::UnroutableDropped {
                    message: self.unroutable(&rec),
                    error: &e,
                }
                .emit(&self.metrics),
            }
        }
    }

    fn count_unroutable_dead_letter(&self, rec: &SpoolRecord, what: &'static str) {
        events::UnroutableDeadLettered {
            stage: events::PUBLISHER_STAGE,
            message: self.unroutable(rec),
            what,
        }
        .emit(&self.metrics);
    }

    fn unroutable<'a>(&'a self, rec: &'a SpoolRecord) -> events::Unroutable<'a> {
        events::Unroutable {
            exchange: &rec.exchange,
            routing_key: &rec.routing_key,
            message_id: rec.properties.message_id().as_ref().map(|id| id.as_str()),
            queue: &self.cfg.unroutable_queue,
        }
    }

    /// The one `basic.publish` of the actor: signs the message (unless it
    /// is marked [`signing::UNSIGNED_HEADER`]) right before sending, so
    /// live publishes and spool replays are signed alike.
    async fn send(
        &self,
        ch: &Channel,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        props: BasicProperties,
    ) -> Result<PublisherConfirm> {
        // The message's own delivery mode unless persistence is forced (the
        // one place it is decided, for live publishes and spool replays).
        let props = if self.cfg.force_persistent {
            props.with_delivery_mode(2)
        } else {
            props
        };
        let props = signing::prepare(self.cfg.signing.as_ref(), routing_key, body, props);
        send(ch, exchange, routing_key, body, props).await
    }
}

async fn send(
    ch: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    props: BasicProperties,
) -> Result<PublisherConfirm> {
    let exchange = envelope::short_string("exchange", exchange)?;
    let routing_key = envelope::short_string("routing key", routing_key)?;
    Ok(ch
        .basic_publish(
            exchange,
            routing_key,
            BasicPublishOptions {
                mandatory: true,
                immediate: false,
            },
            body,
            props,
        )
        .await?)
}

/// A panic in the publish path is that publish's (permanent) failure, not
/// its caller's.
fn publish_panicked(p: &(dyn std::any::Any + Send)) -> Error {
    Error::Panicked(format!("publish: {}", crate::error::panic_message(p)))
}

fn confirmed(c: lapin::Result<Confirmation>) -> Result<()> {
    match c {
        Err(e) => Err(Error::Amqp(e)),
        Ok(Confirmation::Ack(None)) => Ok(()),
        // A channel not in confirm mode: the broker said nothing.
        Ok(Confirmation::NotRequested) => Err(Error::NotConfirmed),
        Ok(Confirmation::Ack(Some(ret))) | Ok(Confirmation::Nack(Some(ret))) => {
            Err(Error::Unroutable {
                code: ret.reply_code,
                text: ret.reply_text.to_string(),
            })
        }
        Ok(Confirmation::Nack(None)) => Err(Error::Nacked),
    }
}

/// A cloneable handle for publishing.
#[derive(Clone)]
pub struct PublisherHandle {
    addr: Addr<PublisherActor>,
    window: Credits,
    core: Arc<Core>,
}

impl PublisherHandle {
    /// Publishes `msg`: resolves once the broker confirmed it
    /// ([`Published::Confirmed`]) or, with the breaker open, once it is
    /// durable in the spool ([`Published::Spooled`]).
    ///
    /// Waits for a rate token, for the broker to unblock and for room in the
    /// unconfirmed window — each wait bounded by `max_waiters` callers;
    /// beyond that, and when the spool is full, it fails at once with
    /// [`Error::Backpressure`].
    pub async fn send(&self, msg: Output) -> Result<Published> {
        self.send_ref(&msg).await
    }

    /// [`send`](Self::send) for a caller that keeps the message (to retry
    /// it): nothing is copied unless it has to be spooled.
    pub async fn send_ref(&self, msg: &Output) -> Result<Published> {
        let credit = self.admit().await?;
        // In place, in the caller's task (see the module docs).
        let res = AssertUnwindSafe(self.core.dispatch(msg))
            .catch_unwind()
            .await
            .unwrap_or_else(|p| Err(publish_panicked(p.as_ref())));
        self.release(credit);
        res
    }

    /// Like [`send`](Self::send), for a caller that must answer by
    /// `deadline` (the HTTP ingress).
    ///
    /// The waits for a token, the gate and the window are the caller's and
    /// end at the deadline (the message then goes to the spool, if there is
    /// one: it was never sent). Once admitted, the publish and its confirm
    /// run on a task of their own, so the deadline does not cancel them —
    /// the breaker still learns the outcome, and a message the broker may
    /// already have is not given up half-way. If the deadline passes first,
    /// a copy is spooled, *held* until the publish is answered: a confirm
    /// deletes the copy, anything else releases it for replay (see the
    /// module docs), so the message goes out once.
    ///
    /// `Ok(None)`: the deadline passed and there is no spool to keep a
    /// copy; the publish goes on, and its answer is only counted.
    pub async fn send_within(
        &self,
        msg: Output,
        deadline: tokio::time::Instant,
    ) -> Result<Option<Published>> {
        let credit = match tokio::time::timeout_at(deadline, self.admit()).await {
            Ok(credit) => credit?,
            Err(_) if self.has_spool() => return self.core.spool(msg).await.map(Some),
            Err(_) => return Ok(None),
        };
        let core = self.core.clone();
        let handle = self.clone();
        let (answer, answered) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let mut publish = std::pin::pin!(AssertUnwindSafe(core.dispatch(&msg)).catch_unwind());
            let early = tokio::select! {
                res = &mut publish => Some(res),
                () = tokio::time::sleep_until(deadline) => None,
            };
            let unwound = |p: Box<dyn std::any::Any + Send>| Err(publish_panicked(p.as_ref()));
            if let Some(res) = early {
                handle.release(credit);
                let _ = answer.send(res.unwrap_or_else(unwound).map(Some));
                return;
            }
            let held = if core.spool.is_some() {
                debug!(message_id = ?msg.properties.message_id(), "no confirm by the caller's deadline; spooling a held copy");
                match core.spool_held(&msg).await {
                    Ok(seq) => {
                        let _ = answer.send(Ok(Some(Published::Spooled)));
                        Some(seq)
                    }
                    Err(e) => {
                        let _ = answer.send(Err(e));
                        None
                    }
                }
            } else {
                let _ = answer.send(Ok(None));
                None
            };
            let res = publish.await.unwrap_or_else(unwound);
            handle.release(credit);
            if let Some(seq) = held {
                core.settle_held(seq, &res).await;
            }
        });
        // Only the runtime shutting down drops the task unanswered.
        answered.await.unwrap_or(Err(Error::ShuttingDown))
    }

    /// A publish's admission: a rate token, a window credit, then the
    /// blocked gate (waited for holding the credit, so that at most
    /// `max_unconfirmed` publishes are past the window at any time).
    async fn admit(&self) -> Result<Credit> {
        let core = &self.core;
        if core.bucket.acquire().await.is_err() {
            let e = Error::Backpressure("publish rate limit: too many waiting publishers".into());
            events::PublishFinished {
                result: PublishResult::Failed(&e),
            }
            .emit(&core.metrics);
            return Err(e);
        }
        let credit = match self.window.try_acquire() {
            Some(c) => c,
            None => {
                let _slot = core.slots.enter("publish window full")?;
                core.update_waiters();
                let c = self.window.acquire().await;
                drop(_slot);
                core.update_waiters();
                c.ok_or(Error::ShuttingDown)?
            }
        };
        if let Err(e) = core.wait_gate().await {
            events::PublishFinished {
                result: PublishResult::Failed(&e),
            }
            .emit(&core.metrics);
            return Err(e);
        }
        self.report_window();
        Ok(credit)
    }

    fn release(&self, credit: Credit) {
        drop(credit);
        self.report_window();
    }

    fn report_window(&self) {
        events::PublishWindow {
            unconfirmed: self.window.in_use(),
        }
        .emit(&self.core.metrics);
    }

    /// Like [`send`](Self::send), for callers that only need to know the
    /// message is safe (confirmed or spooled).
    pub async fn publish(&self, msg: Output) -> Result<()> {
        self.send(msg).await.map(|_| ())
    }

    /// [`publish`](Self::publish) by reference (see [`send_ref`](Self::send_ref)).
    pub async fn publish_ref(&self, msg: &Output) -> Result<()> {
        self.send_ref(msg).await.map(|_| ())
    }

    /// Whether a spool is configured.
    pub fn has_spool(&self) -> bool {
        self.core.spool.is_some()
    }

    /// Publishes currently awaiting a confirm.
    pub fn unconfirmed(&self) -> usize {
        self.window.in_use()
    }

    /// Waits until every publish in the window is confirmed or failed.
    pub async fn flush(&self) {
        self.window.drained().await;
    }

    /// Changes the publish rate (publishes per second, `0`: unlimited) and
    /// burst live, as `[publisher] rate`/`burst` set them at start.
    pub fn set_rate(&self, rate_per_sec: u32, burst: u32) {
        self.core.bucket.set_rate(rate_per_sec, burst);
        tracing::info!(rate = rate_per_sec, burst, "publish rate changed");
    }

    /// The publish rate (`0`: unlimited) and burst in force.
    pub fn rate(&self) -> (u32, u32) {
        self.core.bucket.rate()
    }

    /// The breaker's state now.
    pub fn breaker_state(&self) -> BreakerState {
        self.core.breaker_state()
    }

    /// Records in the spool (0 without a spool).
    pub fn spooled(&self) -> u64 {
        self.core.spool.as_ref().map_or(0, Spool::len)
    }

    /// True while the broker blocks publishing.
    pub fn broker_blocked(&self) -> bool {
        self.core.is_blocked()
    }

    /// The actor's address.
    pub fn addr(&self) -> &Addr<PublisherActor> {
        &self.addr
    }
}

/// Owns the confirm-mode channel. See the module docs.
pub struct PublisherActor {
    core: Arc<Core>,
    conn: Addr<ConnectionActor>,
    restarts: Restarts,
    escalations: Option<EscalationSender>,
    /// Link events are subscribed to once: the supervisor keeps the
    /// address across restarts, so the subscription stays valid.
    subscribed: bool,
}

impl PublisherActor {
    /// Opens the spool (if configured; on the blocking pool — redb may
    /// repair the file after a crash), starts the actor under a supervisor
    /// and returns a handle. Records left in the spool replay once the
    /// broker is reachable.
    pub async fn start_supervised(
        cfg: PublisherConfig,
        conn: Addr<ConnectionActor>,
        metrics: Metrics,
        escalations: Option<EscalationSender>,
    ) -> Result<PublisherHandle> {
        let spool = match &cfg.spool {
            Some(s) => Some(
                Spool::open_async(s.path.clone(), s.max_bytes)
                    .await
                    .map_err(|e| {
                        tracing::error!(path = %s.path.display(), error = %e, "cannot open the spool");
                        Error::Spool(e)
                    })?,
            ),
            None => None,
        };
        if let Some(s) = &spool {
            s.count_quarantined_in(metrics.clone());
            if !s.is_empty() {
                info!(
                    records = s.len(),
                    bytes = s.bytes(),
                    "spool holds records from an earlier run; they will be replayed"
                );
            }
        }
        let window = Credits::new(cfg.max_unconfirmed);
        let core = Arc::new(Core {
            bucket: TokenBucket::new(cfg.rate, cfg.burst, cfg.max_waiters),
            slots: WaitSlots {
                count: AtomicUsize::new(0),
                max: cfg.max_waiters,
            },
            breaker: Mutex::new(CircuitBreaker::new(cfg.breaker)),
            channel: Mutex::new(None),
            // The actor opens the channel once it hears the link is up
            // (see `started`).
            opening: watch::channel(true).0,
            spool,
            gate: watch::channel(false).0,
            blocked_since: Mutex::new(None),
            replaying: AtomicBool::new(false),
            conn: conn.clone(),
            window: window.clone(),
            unroutable_declared: AtomicBool::new(false),
            held: Mutex::new(BTreeSet::new()),
            holding: AtomicUsize::new(0),
            metrics,
            cfg,
        });
        core.update_spool_gauges();
        events::BreakerChecked {
            state: BreakerState::Closed,
        }
        .emit(&core.metrics);
        let c = core.clone();
        let addr = Supervisor::start(move |_| PublisherActor {
            restarts: Restarts::new(c.cfg.policy.clone()),
            core: c,
            conn,
            escalations,
            subscribed: false,
        });
        Ok(PublisherHandle { addr, window, core })
    }

    fn open_channel(&mut self, ctx: &mut Context<Self>) {
        let conn = self.conn.clone();
        let delay = self.restarts.delay();
        self.core.set_opening(true);
        ctx.wait(
            async move {
                tokio::time::sleep(delay).await;
                let ch = conn.send(OpenChannel(Purpose::Publish)).await??;
                ch.confirm_select(ConfirmSelectOptions::default()).await?;
                Ok::<_, Error>(ch)
            }
            .into_actor(self)
            .map(|res, act, ctx| match res {
                Ok(ch) => {
                    debug!("publisher channel open in confirm mode");
                    *lock(&act.core.channel) = Some(ch);
                    act.core.set_opening(false);
                    act.restarts.succeeded();
                }
                Err(Error::NotConnected) => {
                    // The connection actor will send LinkUp when it is back.
                    act.core.set_opening(false);
                }
                Err(e) => {
                    // `restarting` keeps publishes waiting for the next one.
                    warn!(error = %e, "could not open the publisher channel; restarting");
                    ctx.stop();
                }
            }),
        );
    }

    /// Periodic: breaker timing, the blocked timeout, spool replay.
    fn tick(&mut self, ctx: &mut Context<Self>) {
        let core = &self.core;
        core.with_breaker(|b, now| ((), b.poll(now)));
        if core.blocked_expired() && *core.gate.borrow() {
            warn!(
                timeout = ?core.cfg.blocked_timeout,
                "broker blocked longer than blocked_timeout; opening the breaker"
            );
            core.with_breaker(|b, now| ((), b.force_open(now)));
            core.gate.send_replace(false);
        }
        core.update_waiters();
        core.update_spool_gauges();
        if core.channel_dead() {
            // e.g. the broker closed the channel (a publish to a missing
            // exchange): replace it without a restart.
            *lock(&core.channel) = None;
            self.open_channel(ctx);
        }
        let core = &self.core;
        if core.should_replay() {
            ctx.spawn(core.clone().replay().into_actor(self));
        }
    }
}

impl Actor for PublisherActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        if self.restarts.escalated() {
            self.core.set_opening(false);
            return;
        }
        if !self.subscribed {
            self.subscribed = true;
            // Once, on the first start. The answer says whether the link is
            // up: if so a LinkUp follows and opens the channel (publishes
            // wait for it); if not, publishes fail at once until it is.
            ctx.wait(
                self.conn
                    .send(Subscribe(ctx.address().recipient()))
                    .into_actor(self)
                    .map(|up, act, _| {
                        if !matches!(up, Ok(true)) {
                            act.core.set_opening(false);
                        }
                    }),
            );
        } else {
            // A restart: the link may be up already (no LinkUp will come).
            self.open_channel(ctx);
        }
        ctx.run_interval(TICK, |act, ctx| act.tick(ctx));
    }
}

impl Supervised for PublisherActor {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        *lock(&self.core.channel) = None;
        // `started` opens the next channel (or gives up and clears this).
        self.core.set_opening(true);
        events::Restarted {
            kind: ActorKind::Publisher,
            stage: "",
        }
        .emit(&self.core.metrics);
        if !self.restarts.record(tokio::time::Instant::now()) {
            events::Escalated {
                kind: ActorKind::Publisher,
                stage: "",
            }
            .emit(&self.core.metrics);
            if let Some(tx) = &self.escalations {
                let _ = tx.try_send(Escalation {
                    actor: "publisher".into(),
                    reason: "publisher channel keeps failing".into(),
                });
            }
        }
    }
}

impl Handler<LinkEvent> for PublisherActor {
    type Result = ();

    fn handle(&mut self, ev: LinkEvent, ctx: &mut Context<Self>) {
        match ev {
            // lapin reports `Connected` before it has recovered the
            // channels, then re-opens the channel (and confirm mode) by
            // itself: open one only if we have none lapin still owns.
            LinkEvent::LinkUp(Purpose::Publish) if !self.core.channel_alive() => {
                self.open_channel(ctx);
            }
            // The connection under the channel was replaced: the channel
            // will not come back; the next LinkUp opens a new one.
            LinkEvent::Replaced(Purpose::Publish) => {
                *lock(&self.core.channel) = None;
            }
            LinkEvent::Blocked(reason) => {
                let mut since = lock(&self.core.blocked_since);
                if since.is_none() {
                    *since = Some(Instant::now());
                    info!(%reason, "broker blocked publishing; publishes wait");
                    self.core.gate.send_replace(true);
                }
            }
            LinkEvent::Unblocked => {
                *lock(&self.core.blocked_since) = None;
                self.core.gate.send_replace(false);
                info!("broker unblocked publishing; publishes resume");
            }
            // A block ends with its connection.
            LinkEvent::LinkDown(Purpose::Publish)
                if lock(&self.core.blocked_since).take().is_some() =>
            {
                self.core.gate.send_replace(false);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_broker_ack_without_a_return_confirms() {
        assert!(confirmed(Ok(Confirmation::Ack(None))).is_ok());
        assert!(matches!(
            confirmed(Ok(Confirmation::NotRequested)),
            Err(Error::NotConfirmed)
        ));
        assert!(matches!(
            confirmed(Ok(Confirmation::Nack(None))),
            Err(Error::Nacked)
        ));
    }
}
