//! The StageActor: one per consumed queue.
//!
//! A stage owns a consume channel with `basic_qos(prefetch)` and a pool of
//! `prefetch` [`Credits`]. Its intake task takes a credit *before* it pulls the
//! next delivery, and the credit travels with the delivery until it is acked
//! or rejected, so the process never holds more deliveries than the broker's
//! prefetch allows. Handlers run on `concurrency` worker slots; outputs are
//! published through the [`PublisherHandle`] and the input is acked only
//! after every output is confirmed (at-least-once across the hop).
//!
//! If outputs cannot be published (blocked broker, rate limit, full spool),
//! the task keeps its credit and retries with backoff; credits stop coming
//! back, intake stops, and the backlog stays in the broker.

mod ack;
mod batch;
mod lanes;
mod process;

pub use ack::AckPolicy;
pub use batch::BatchPolicy;
pub use lanes::{KeyFn, MissingKey, OrderKey, OrderPolicy};

use crate::connection::{ConnectionActor, LinkEvent, OpenChannel, Purpose, Subscribe};
use crate::credit::{Credit, Credits};
use crate::error::{Error, Result};
use crate::message::Handler;
pub(crate) use crate::metrics::events::PauseCause;
use crate::metrics::events::{self, ActorKind, Event};
use crate::metrics::Metrics;
use crate::publisher::PublisherHandle;
use crate::supervision::{Escalation, EscalationSender, RestartPolicy, Restarts};
use actix::prelude::*;
use futures::{Stream, StreamExt};
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Consumer};
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Semaphore};
use tracing::{debug, info, warn};

/// How long an ack, reject or nack may take to be handed to the connection.
/// It is a frame write with no reply, so only a channel that is gone takes
/// longer: lapin (4.12) drops the request of a channel it has just killed
/// (a recovery, a close) without ever resolving it, and a settle awaiting it
/// would hold its credit for good — after enough faults no credit is left
/// and the stage stops while its consumer looks healthy. Past this bound the
/// settle counts as failed, like any ack on a dead channel: the broker
/// redelivers the message (at-least-once; dedup catches the copy).
const SETTLE_TIMEOUT: Duration = Duration::from_secs(5);

/// Everything a stage needs to know about itself.
#[derive(Clone)]
pub struct StageSpec {
    /// Stage name: a metric label and the `x-flowgate-stage` header.
    pub name: String,
    /// The queue it consumes.
    pub queue: String,
    /// Broker prefetch, and the number of credits.
    pub prefetch: u16,
    /// Handler tasks running at once.
    pub concurrency: usize,
    /// The stage's processing logic.
    pub handler: Arc<dyn Handler>,
    /// Where dead letters are published (`<queue>.dlx`); `None` rejects
    /// without requeue and lets the queue's own policy decide.
    pub dead_letter_exchange: Option<String>,
    /// Restart backoff and budget.
    pub policy: RestartPolicy,
    /// The retry ladder (tier queues `<queue>.retry.<n>`); `None`: a
    /// `Retry` outcome dead-letters at once.
    pub retry: Option<crate::retry::RetryPolicy>,
    /// Deduplication (claim → handle → commit); `None`: off.
    pub dedup: Option<crate::dedup::DedupHandle>,
    /// What the handler expects in the body; others are dead-lettered as `malformed`.
    pub payload: crate::message::Payload,
    /// Larger bodies are dead-lettered as `oversized` before the handler runs.
    pub max_message_bytes: Option<usize>,
    /// HMAC signature verification of every delivery (see
    /// [`Keys`](crate::Keys)); `None`: off.
    pub signature: Option<crate::signing::Verifier>,
    /// Hand deliveries to [`Handler::handle_batch`] in batches (see
    /// [`BatchPolicy`]); `None`: one [`Handler::handle`] call per delivery.
    pub batch: Option<BatchPolicy>,
    /// Batched acknowledgement (see [`AckPolicy`]); `None`: one `basic.ack` per
    /// delivery.
    pub ack: Option<AckPolicy>,
    /// The longest one handler call (or batch call) may take: past it the
    /// call is cancelled and each of its deliveries fails like a handler
    /// error; `None`: no bound.
    pub handler_timeout: Option<Duration>,
    /// Per-key ordering (see [`OrderPolicy`]): deliveries with the same key
    /// are handled one at a time in delivery order, and a failed attempt
    /// retries in place; `None`: any order, retries through the tiers.
    pub order: Option<OrderPolicy>,
    /// The queue has a single active consumer (`x-single-active-consumer`):
    /// the stage reports whether its consumer is the active one (see
    /// [`StageProbe::consumer_role`]).
    pub single_active: bool,
}

/// Where a stage's consumer stands on a single-active-consumer queue.
///
/// AMQP 0-9-1 does not tell a consumer that it became the active one
/// (RabbitMQ 3.10 sends nothing; only its stream protocol has a consumer
/// update). What a stage can observe is deliveries: it reports `Active` once
/// a delivery has arrived on its current consumer, and `Standby` from
/// subscribing (or re-subscribing after a recovery, which puts the consumer
/// at the back of the broker's line) until then — so an instance the broker
/// made active on an empty queue says `Standby` until the first message.
/// The broker's own view: `rabbitmqctl list_consumers queue_name
/// consumer_tag active activity_status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ConsumerRole {
    /// Deliveries have arrived on the stage's current consumer.
    Active,
    /// Subscribed; no delivery yet (another instance's consumer is active,
    /// or the queue has been empty since this one subscribed).
    Standby,
}

/// Shared between the actor, its intake task and its message tasks.
pub(crate) struct Shared {
    pub spec: StageSpec,
    pub credits: Credits,
    pub workers: Arc<Semaphore>,
    pub publisher: PublisherHandle,
    pub metrics: Metrics,
    /// True while a consumer is registered and delivering.
    pub consuming: Arc<AtomicBool>,
    /// Set once draining starts: publish retries give up on it.
    pub draining: AtomicBool,
    /// Deliveries pulled and not yet acked/rejected (the intake may hold one
    /// more credit while it waits for the next delivery; that one is not
    /// in flight).
    pub in_flight: Arc<AtomicUsize>,
    /// Causes that currently pause intake (see [`Pause`]); empty: running.
    pub paused: watch::Sender<BTreeSet<PauseCause>>,
    /// Workers the stage should run; `workers` converges to it.
    pub worker_target: Arc<AtomicUsize>,
    /// Workers an operator pinned (see [`PinWorkers`]); `0`: not pinned,
    /// autoscaling (if configured) decides.
    pub pinned: Arc<AtomicUsize>,
    /// Deliveries intake may still take before pausing with cause
    /// [`PauseCause::Budget`] (see [`SetBudget`]); `u64::MAX`: unlimited.
    pub budget: AtomicU64,
    /// The batch collector, when the stage batches.
    pub batcher: Option<batch::Batcher>,
    /// The ack register, when the stage batches acks.
    pub acks: Option<Arc<ack::AckBatcher>>,
    /// The ordered lanes, when the stage keeps order by a key.
    pub lanes: Option<lanes::Lanes>,
    /// Turns true once draining starts: a retry waiting in place gives its
    /// delivery back instead of waiting on.
    pub drains: watch::Sender<bool>,
    /// A delivery arrived on the current consumer (see [`ConsumerRole`]).
    pub active: Arc<AtomicBool>,
    /// Bumped whenever the deliveries taken so far can no longer be acked
    /// (their channel failed, was replaced, or closed at the end of a
    /// drain): an ordered lane drops such deliveries it has not started —
    /// the broker redelivers them, in order — instead of handling them for
    /// nothing ahead of their redelivered copies.
    pub epoch: AtomicU64,
}

impl Shared {
    /// The deliveries taken so far can no longer be acked.
    pub(crate) fn channel_lost(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
    }
}

impl Shared {
    /// Counts one delivery against the intake budget; pauses intake when
    /// it is spent.
    fn spend_budget(&self) {
        let before = self
            .budget
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| {
                (b != u64::MAX).then(|| b.saturating_sub(1))
            });
        if before == Ok(1) {
            self.set_cause(PauseCause::Budget, true);
        }
    }

    /// Adds or removes a pause cause; logs and updates the gauge on change.
    fn set_cause(&self, cause: PauseCause, on: bool) {
        let changed = self.paused.send_if_modified(|set| {
            if on {
                set.insert(cause)
            } else {
                set.remove(&cause)
            }
        });
        if changed {
            events::Paused {
                stage: &self.spec.name,
                cause,
                on,
            }
            .emit(&self.metrics);
        }
    }
}

impl Shared {
    /// On a single-active-consumer queue: the stage's consumer is (`true`)
    /// or is no longer known to be (`false`) the active one.
    pub(crate) fn set_active(&self, active: bool) {
        if self.spec.single_active && self.active.swap(active, Ordering::AcqRel) != active {
            events::ConsumerRoleChanged {
                stage: &self.spec.name,
                active,
            }
            .emit(&self.metrics);
        }
    }

    /// A delivery entered (`+1`) or left (`-1`) the stage.
    pub(crate) fn track_in_flight(&self, entered: bool) {
        let n = if entered {
            self.in_flight.fetch_add(1, Ordering::AcqRel) + 1
        } else {
            self.in_flight
                .fetch_sub(1, Ordering::AcqRel)
                .saturating_sub(1)
        };
        events::InFlight {
            stage: &self.spec.name,
            count: n,
        }
        .emit(&self.metrics);
    }
}

/// Stops intake and waits (up to `grace`) for in-flight deliveries to finish.
#[derive(Message)]
#[rtype(result = "DrainReport")]
pub struct Drain {
    /// The longest to wait for in-flight work.
    pub grace: Duration,
}

/// What a [`Drain`] achieved.
#[derive(Debug, Clone, MessageResponse)]
pub struct DrainReport {
    /// The stage.
    pub stage: String,
    /// True if every in-flight delivery finished within the grace period.
    pub drained: bool,
    /// Deliveries still in flight when the channel closed (the broker requeues them).
    pub abandoned: usize,
}

/// Stops intake for `cause` (e.g. `watermark`: the stage's output queue is
/// above its high watermark) until a [`Resume`] with the same cause. Intake
/// runs again once no cause is left. Deliveries already in flight finish;
/// the paused stage takes no other delivery (not even one it was waiting
/// for, credit in hand, when the pause came) and holds no other credit.
#[derive(Message, Clone, Debug)]
#[rtype(result = "()")]
pub struct Pause {
    /// Why (a metric label).
    pub cause: PauseCause,
}

/// Clears a [`Pause`] cause.
#[derive(Message, Clone, Debug)]
#[rtype(result = "()")]
pub struct Resume {
    /// The cause given to [`Pause`].
    pub cause: PauseCause,
}

/// Sets how many more deliveries intake may take before it pauses (cause
/// [`PauseCause::Budget`]) until the next budget: the depth monitor hands out
/// `high - depth` of the stage's output queue each sample, so the stage
/// cannot overshoot the watermark between two samples. `None`: unlimited.
#[derive(Message, Clone, Copy, Debug)]
#[rtype(result = "()")]
pub struct SetBudget(pub Option<u64>);

/// Sets the number of handler workers (autoscaling). Growing adds worker
/// permits at once; shrinking retires permits as running handlers finish.
/// Ignored while an operator has pinned the count ([`PinWorkers`]).
#[derive(Message, Clone, Copy, Debug)]
#[rtype(result = "()")]
pub struct SetWorkers(pub usize);

/// An operator sets the number of handler workers (`Some(n)`, at least 1)
/// and pins it: autoscaling leaves the stage alone until `None` hands the
/// count back (the workers stay where they are until autoscaling moves them).
#[derive(Message, Clone, Copy, Debug)]
#[rtype(result = "()")]
pub struct PinWorkers(pub Option<usize>);

/// Reported by the intake task when it ends. `generation` names the intake
/// it came from: a replaced intake's end is stale and ignored.
#[derive(Message)]
#[rtype(result = "()")]
struct IntakeEnded {
    generation: u64,
    result: Result<()>,
}

/// How often a stage looks at its channel while lapin recovers it.
const CHANNEL_CHECK: Duration = Duration::from_millis(100);

pub(crate) use crate::connection::channel_alive;

/// A cheap view of a stage for readiness checks.
#[derive(Clone)]
pub struct StageProbe {
    /// Stage name.
    pub name: String,
    consuming: Arc<AtomicBool>,
    in_flight: Arc<AtomicUsize>,
    workers: Arc<Semaphore>,
    worker_target: Arc<AtomicUsize>,
    pinned: Arc<AtomicUsize>,
    paused: watch::Receiver<BTreeSet<PauseCause>>,
    single_active: bool,
    active: Arc<AtomicBool>,
}

impl StageProbe {
    /// On a single-active-consumer queue, whether this stage's consumer is
    /// the active one or a standby (see [`ConsumerRole`]); `None` on any
    /// other queue.
    pub fn consumer_role(&self) -> Option<ConsumerRole> {
        self.single_active.then(|| {
            if self.active.load(Ordering::Acquire) {
                ConsumerRole::Active
            } else {
                ConsumerRole::Standby
            }
        })
    }

    /// True while the stage's consumer is registered.
    pub fn consuming(&self) -> bool {
        self.consuming.load(Ordering::Acquire)
    }

    /// Deliveries holding a credit.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Handler workers the stage runs (its autoscaling target).
    pub fn workers(&self) -> usize {
        self.worker_target.load(Ordering::Acquire)
    }

    /// Workers running a handler right now.
    pub fn busy_workers(&self) -> usize {
        self.workers()
            .saturating_sub(self.workers.available_permits())
    }

    /// True while intake is paused (any cause).
    pub fn paused(&self) -> bool {
        !self.paused.borrow().is_empty()
    }

    /// Why intake is paused, in a stable order; empty while running.
    pub fn pause_causes(&self) -> Vec<PauseCause> {
        self.paused.borrow().iter().copied().collect()
    }

    /// The worker count an operator pinned ([`PinWorkers`]), if any.
    pub fn pinned_workers(&self) -> Option<usize> {
        match self.pinned.load(Ordering::Acquire) {
            0 => None,
            n => Some(n),
        }
    }
}

/// One per consumed queue. See the module docs.
pub struct StageActor {
    shared: Arc<Shared>,
    conn: Addr<ConnectionActor>,
    restarts: Restarts,
    escalations: Option<EscalationSender>,
    channel: Option<Channel>,
    consumer_tag: String,
    stop: watch::Sender<bool>,
    /// Bumped for every intake started; an [`IntakeEnded`] from an older
    /// one is stale.
    intake_generation: u64,
    subscribed: bool,
    starting: bool,
    draining: bool,
}

impl StageActor {
    /// Starts a stage under a supervisor. Returns its address and a probe.
    pub fn start_supervised(
        spec: StageSpec,
        conn: Addr<ConnectionActor>,
        publisher: PublisherHandle,
        metrics: Metrics,
        escalations: Option<EscalationSender>,
    ) -> (Addr<StageActor>, StageProbe) {
        let credits = Credits::new(spec.prefetch.max(1) as usize);
        let consuming = Arc::new(AtomicBool::new(false));
        let in_flight = Arc::new(AtomicUsize::new(0));
        let workers = Arc::new(Semaphore::new(spec.concurrency.max(1)));
        let worker_target = Arc::new(AtomicUsize::new(spec.concurrency.max(1)));
        let pinned = Arc::new(AtomicUsize::new(0));
        let paused = watch::channel(BTreeSet::new()).0;
        let active = Arc::new(AtomicBool::new(false));
        if spec.single_active {
            events::ConsumerRoleChanged {
                stage: &spec.name,
                active: false,
            }
            .emit(&metrics);
        }
        let tiers: Vec<String> = match (&spec.retry, &spec.order) {
            (None, _) => Vec::new(),
            (Some(_), Some(_)) => vec![lanes::IN_PLACE.to_owned()],
            (Some(r), None) => (1..=r.tiers().len())
                .map(|n| crate::retry::RetryPolicy::tier_queue(&spec.queue, n))
                .collect(),
        };
        events::StageKnown {
            stage: &spec.name,
            tiers: &tiers,
            prefetch: spec.prefetch,
        }
        .emit(&metrics);
        events::WorkersSet {
            stage: &spec.name,
            workers: spec.concurrency.max(1),
        }
        .emit(&metrics);
        let probe = StageProbe {
            name: spec.name.clone(),
            consuming: consuming.clone(),
            in_flight: in_flight.clone(),
            workers: workers.clone(),
            worker_target: worker_target.clone(),
            pinned: pinned.clone(),
            paused: paused.subscribe(),
            single_active: spec.single_active,
            active: active.clone(),
        };
        let restarts = Restarts::new(spec.policy.clone());
        let batcher = spec.batch.map(|policy| {
            batch::Batcher::start(
                policy,
                credits.total(),
                spec.handler.clone(),
                spec.handler_timeout,
                workers.clone(),
                metrics.clone(),
                spec.name.clone(),
            )
        });
        let acks = spec
            .ack
            .map(|p| ack::AckBatcher::start(p, spec.name.clone(), metrics.clone()));
        let lanes = spec.order.clone().map(lanes::Lanes::new);
        let shared = Arc::new(Shared {
            batcher,
            acks,
            lanes,
            drains: watch::channel(false).0,
            active,
            epoch: AtomicU64::new(0),
            workers,
            paused,
            worker_target,
            pinned,
            budget: AtomicU64::new(u64::MAX),
            spec,
            credits,
            publisher,
            metrics,
            consuming,
            draining: AtomicBool::new(false),
            in_flight,
        });
        let addr = Supervisor::start(move |_| StageActor {
            shared,
            conn,
            restarts,
            escalations,
            channel: None,
            consumer_tag: String::new(),
            stop: watch::channel(false).0,
            intake_generation: 0,
            subscribed: false,
            starting: false,
            draining: false,
        });
        (addr, probe)
    }

    fn start_consuming(&mut self, ctx: &mut Context<Self>) {
        if self.starting || self.channel.is_some() || self.draining || self.restarts.escalated() {
            return;
        }
        self.starting = true;
        let conn = self.conn.clone();
        let delay = self.restarts.delay();
        let spec = self.shared.spec.clone();
        let tag = format!("flowgate-{}-{}", spec.name, uuid::Uuid::new_v4().simple());
        let tag2 = tag.clone();
        ctx.spawn(
            async move {
                tokio::time::sleep(delay).await;
                let ch = conn.send(OpenChannel(Purpose::Consume)).await??;
                ch.basic_qos(spec.prefetch, BasicQosOptions::default()).await?;
                let consumer = ch
                    .basic_consume(
                        spec.queue.as_str().into(),
                        tag2.as_str().into(),
                        BasicConsumeOptions::default(),
                        FieldTable::default(),
                    )
                    .await?;
                Ok::<_, Error>((ch, consumer))
            }
            .into_actor(self)
            .map(move |res, act, ctx| {
                act.starting = false;
                match res {
                    Ok((ch, consumer)) => {
                        info!(stage = %act.shared.spec.name, queue = %act.shared.spec.queue, "consuming");
                        act.restarts.succeeded();
                        act.channel = Some(ch.clone());
                        act.consumer_tag = tag;
                        act.shared.consuming.store(true, Ordering::Release);
                        act.shared.set_active(false);
                        let (tx, rx) = watch::channel(false);
                        // Replacing the sender also ends an older intake.
                        act.stop = tx;
                        act.intake_generation += 1;
                        let generation = act.intake_generation;
                        let shared = act.shared.clone();
                        let me = ctx.address();
                        tokio::spawn(async move {
                            let result = intake(shared, ch, consumer, rx).await;
                            // bounded: once, when the intake task ends.
                            me.do_send(IntakeEnded { generation, result });
                        });
                    }
                    Err(Error::NotConnected) => {} // LinkUp will come
                    Err(e) => {
                        warn!(stage = %act.shared.spec.name, error = %e, "could not start consuming; restarting stage");
                        ctx.stop();
                    }
                }
            }),
        );
    }
}

/// What [`next_with_credit`] got.
enum Pulled<T> {
    /// An item and the credit it holds.
    Item(T, Credit),
    /// The stop signal fired, or the credit pool or pause watch closed.
    Stopped,
    /// The stream ended (the broker cancelled the consumer).
    Ended,
}

/// The credit gate of the intake: waits until the stage is not paused and a
/// credit is free, and only then pulls one item from `stream`. However fast
/// the stream is ready (a broker may grant more than prefetch, e.g. an old
/// channel incarnation's deliveries still held while the new one gets its
/// own), at most `credits.total()` items are out of the stream and not yet
/// given back.
async fn next_with_credit<S: Stream + Unpin, C>(
    credits: &Credits,
    paused: &mut watch::Receiver<BTreeSet<C>>,
    stop: &mut watch::Receiver<bool>,
    stream: &mut S,
) -> Pulled<S::Item> {
    loop {
        if *stop.borrow() {
            return Pulled::Stopped;
        }
        // While paused, take no credit: the backlog stays in the broker.
        tokio::select! {
            _ = stop.changed() => return Pulled::Stopped,
            r = paused.wait_for(BTreeSet::is_empty) => if r.is_err() { return Pulled::Stopped },
        }
        let credit = tokio::select! {
            _ = stop.changed() => return Pulled::Stopped,
            c = credits.acquire() => match c {
                Some(c) => c,
                None => return Pulled::Stopped,
            },
        };
        if !paused.borrow().is_empty() {
            continue; // paused while waiting for the credit: give it back
        }
        return tokio::select! {
            biased;
            _ = stop.changed() => Pulled::Stopped,
            // Paused while waiting for an item (the broker had not sent it
            // yet): give the credit back and take nothing. `next` is
            // cancel-safe, so an item that was on its way stays in the stream.
            r = paused.wait_for(|p| !p.is_empty()) => match r {
                Ok(_) => continue,
                Err(_) => Pulled::Stopped,
            },
            n = stream.next() => match n {
                Some(item) => Pulled::Item(item, credit),
                None => Pulled::Ended,
            },
        };
    }
}

/// Pulls deliveries while it holds credit; one task per delivery.
async fn intake(
    shared: Arc<Shared>,
    ch: Channel,
    mut consumer: Consumer,
    mut stop: watch::Receiver<bool>,
) -> Result<()> {
    let mut paused = shared.paused.subscribe();
    let mut last_tag = 0;
    loop {
        match next_with_credit(&shared.credits, &mut paused, &mut stop, &mut consumer).await {
            Pulled::Stopped | Pulled::Ended => return Ok(()),
            Pulled::Item(Ok(delivery), credit) => {
                if delivery.delivery_tag <= last_tag {
                    // lapin recovered the channel: its tags start again, and
                    // every delivery taken before can no longer be acked.
                    shared.channel_lost();
                }
                last_tag = delivery.delivery_tag;
                shared.set_active(true);
                shared.spend_budget();
                shared.track_in_flight(true);
                let ticket = shared
                    .acks
                    .as_ref()
                    .map(|a| a.register(delivery.delivery_tag));
                if shared.lanes.is_some() {
                    // The key is read here, in delivery order.
                    let taken = process::take(&shared, delivery, credit, ticket);
                    lanes::Lanes::dispatch(&shared, taken);
                } else {
                    tokio::spawn(process::process(shared.clone(), delivery, credit, ticket));
                }
            }
            Pulled::Item(Err(e), credit) => {
                drop(credit);
                shared.channel_lost();
                shared.consuming.store(false, Ordering::Release);
                shared.set_active(false);
                warn!(stage = %shared.spec.name, error = %e, "consumer error; waiting for recovery");
                let recovered = tokio::select! {
                    r = ch.wait_for_recovery(e) => r,
                    // Replaced meanwhile (a recovery lapin gave up on may
                    // never report back).
                    _ = stop.wait_for(|s| *s) => return Ok(()),
                };
                if let Err(e) = recovered {
                    // lapin gave up on the channel (or its connection): not
                    // this stage's failure. The actor replaces the channel
                    // (`check_channel`, or the connection's `Replaced`) and
                    // that ends this intake.
                    warn!(stage = %shared.spec.name, error = %e, "channel not recovered; waiting for a new one");
                    let _ = stop.wait_for(|s| *s).await;
                    return Ok(());
                }
                info!(stage = %shared.spec.name, "consumer recovered");
                shared.consuming.store(true, Ordering::Release);
            }
        }
    }
}

impl StageActor {
    /// Periodic: follows lapin's recovery of the channel. While it is
    /// reconnecting the stage waits (not consuming); once it is connected
    /// again the stage is consuming again; a channel lapin gave up on is
    /// replaced.
    fn check_channel(&mut self, ctx: &mut Context<Self>) {
        if self.draining {
            return;
        }
        let Some(ch) = &self.channel else {
            return;
        };
        let s = ch.status();
        if s.connected() {
            self.shared.consuming.store(true, Ordering::Release);
        } else if s.reconnecting() {
            self.shared.consuming.store(false, Ordering::Release);
            // lapin re-registers the consumer: at the back of the line.
            self.shared.set_active(false);
        } else {
            debug!(stage = %self.shared.spec.name, "channel closed for good; opening a new one");
            self.replace_channel(ctx);
        }
    }

    /// Ends the current intake (its end is stale) and consumes on a new channel.
    fn replace_channel(&mut self, ctx: &mut Context<Self>) {
        self.shared.channel_lost();
        let _ = self.stop.send(true);
        self.intake_generation += 1;
        self.channel = None;
        self.shared.consuming.store(false, Ordering::Release);
        self.start_consuming(ctx);
    }
}

impl Actor for StageActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.run_interval(CHANNEL_CHECK, |act, ctx| act.check_channel(ctx));
        if !self.subscribed {
            self.subscribed = true;
            // bounded: once, on the first start.
            self.conn.do_send(Subscribe(ctx.address().recipient()));
        } else {
            self.start_consuming(ctx);
        }
    }
}

impl Supervised for StageActor {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        self.shared.channel_lost();
        let _ = self.stop.send(true);
        self.intake_generation += 1;
        self.channel = None;
        self.starting = false;
        self.shared.consuming.store(false, Ordering::Release);
        self.shared.set_active(false);
        let name = format!("stage:{}", self.shared.spec.name);
        let stage = self.shared.spec.name.as_str();
        events::Restarted {
            kind: ActorKind::Stage,
            stage,
        }
        .emit(&self.shared.metrics);
        if !self.restarts.record(tokio::time::Instant::now()) {
            events::Escalated {
                kind: ActorKind::Stage,
                stage,
            }
            .emit(&self.shared.metrics);
            if let Some(tx) = &self.escalations {
                let _ = tx.try_send(Escalation {
                    actor: name,
                    reason: "stage keeps failing to consume".into(),
                });
            }
        }
    }
}

impl actix::Handler<LinkEvent> for StageActor {
    type Result = ();

    fn handle(&mut self, ev: LinkEvent, ctx: &mut Context<Self>) {
        match ev {
            // lapin reports `Connected` before it has recovered the
            // channels: a reconnecting channel is still ours (see
            // `channel_alive`), and `check_channel` sees it come back.
            LinkEvent::LinkUp(Purpose::Consume) => match &self.channel {
                Some(ch) if channel_alive(ch) => {}
                Some(_) => self.replace_channel(ctx),
                None => self.start_consuming(ctx),
            },
            LinkEvent::LinkDown(Purpose::Consume) => {
                self.shared.consuming.store(false, Ordering::Release);
                self.shared.set_active(false);
            }
            // The connection under the channel was replaced: the channel
            // will not come back (however lapin reports it). End its intake
            // (a stale end) and consume anew on the next LinkUp.
            LinkEvent::Replaced(Purpose::Consume) if self.channel.is_some() => {
                self.shared.channel_lost();
                let _ = self.stop.send(true);
                self.intake_generation += 1;
                self.channel = None;
                self.shared.consuming.store(false, Ordering::Release);
            }
            _ => {}
        }
    }
}

impl actix::Handler<IntakeEnded> for StageActor {
    type Result = ();

    fn handle(&mut self, msg: IntakeEnded, ctx: &mut Context<Self>) {
        if msg.generation != self.intake_generation {
            return; // a replaced intake
        }
        self.shared.consuming.store(false, Ordering::Release);
        if self.draining {
            return;
        }
        match msg.result {
            Ok(()) => {
                warn!(stage = %self.shared.spec.name, "consumer cancelled by the broker; restarting stage");
            }
            Err(e) => {
                warn!(stage = %self.shared.spec.name, error = %e, "consumer failed; restarting stage");
            }
        }
        ctx.stop();
    }
}

impl actix::Handler<Drain> for StageActor {
    type Result = ResponseActFuture<Self, DrainReport>;

    fn handle(&mut self, msg: Drain, _ctx: &mut Context<Self>) -> Self::Result {
        self.draining = true;
        self.shared.draining.store(true, Ordering::Release);
        self.shared.drains.send_replace(true);
        let _ = self.stop.send(true);
        let ch = self.channel.take();
        let tag = std::mem::take(&mut self.consumer_tag);
        let shared = self.shared.clone();
        Box::pin(
            async move {
                if let Some(ch) = &ch {
                    let _ = ch
                        .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
                        .await;
                }
                let drained = tokio::time::timeout(msg.grace, shared.credits.drained())
                    .await
                    .is_ok();
                let abandoned = shared.credits.in_use();
                if let Some(acks) = &shared.acks {
                    acks.drain().await;
                }
                if let Some(ch) = &ch {
                    // lapin may write the close ahead of acks still queued on
                    // the channel; one synchronous round trip first makes the
                    // broker process every ack sent before it.
                    let _ = ch
                        .basic_qos(shared.spec.prefetch, BasicQosOptions::default())
                        .await;
                    // Deliveries the broker sent but we never pulled go back to the queue.
                    let _ = ch.close(200, "flowgate stage drained".into()).await;
                    shared.channel_lost();
                }
                shared.consuming.store(false, Ordering::Release);
                DrainReport {
                    stage: shared.spec.name.clone(),
                    drained,
                    abandoned,
                }
            }
            .into_actor(self)
            .map(|r, _act, _ctx| r),
        )
    }
}

impl actix::Handler<Pause> for StageActor {
    type Result = ();

    fn handle(&mut self, msg: Pause, _ctx: &mut Context<Self>) {
        self.shared.set_cause(msg.cause, true);
    }
}

impl actix::Handler<Resume> for StageActor {
    type Result = ();

    fn handle(&mut self, msg: Resume, _ctx: &mut Context<Self>) {
        self.shared.set_cause(msg.cause, false);
    }
}

impl actix::Handler<SetBudget> for StageActor {
    type Result = ();

    fn handle(&mut self, msg: SetBudget, _ctx: &mut Context<Self>) {
        let b = msg.0.unwrap_or(u64::MAX);
        self.shared.budget.store(b, Ordering::Release);
        self.shared.set_cause(PauseCause::Budget, b == 0);
    }
}

impl actix::Handler<SetWorkers> for StageActor {
    type Result = ();

    fn handle(&mut self, msg: SetWorkers, _ctx: &mut Context<Self>) {
        if self.shared.pinned.load(Ordering::Acquire) == 0 {
            self.shared.resize_workers(msg.0);
        }
    }
}

impl actix::Handler<PinWorkers> for StageActor {
    type Result = ();

    fn handle(&mut self, msg: PinWorkers, _ctx: &mut Context<Self>) {
        let pin = msg.0.map_or(0, |n| n.max(1));
        self.shared.pinned.store(pin, Ordering::Release);
        if pin > 0 {
            self.shared.resize_workers(pin);
        }
    }
}

impl Shared {
    /// Converges the worker permits to `want` (at least 1). Growing adds
    /// permits at once; shrinking retires permits as running handlers finish.
    fn resize_workers(&self, want: usize) {
        let want = want.max(1);
        let had = self.worker_target.swap(want, Ordering::AcqRel);
        let sem = self.workers.clone();
        if want > had {
            sem.add_permits(want - had);
        } else if want < had {
            let debt = had - want;
            let forgotten = sem.forget_permits(debt);
            let rest = debt - forgotten;
            if rest > 0 {
                // Busy workers keep their permits until their handler ends;
                // retire those permits as they come back. The task ends
                // after at most `rest` permits (or when the stage closes).
                tokio::spawn(async move {
                    for _ in 0..rest {
                        match sem.clone().acquire_owned().await {
                            Ok(p) => p.forget(),
                            Err(_) => return,
                        }
                    }
                });
            }
        }
        events::WorkersSet {
            stage: &self.spec.name,
            workers: want,
        }
        .emit(&self.metrics);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// A stream that is always ready, counting what was pulled from it.
    fn never_blocking(pulled: Arc<AtomicUsize>) -> impl Stream<Item = usize> + Unpin {
        futures::stream::iter(0..).inspect(move |_| {
            pulled.fetch_add(1, Ordering::SeqCst);
        })
    }

    /// True if `fut` is still pending once every other task is idle (the
    /// paused test clock auto-advances through the timeout only then).
    async fn stays_pending<F: std::future::Future>(fut: F) -> bool {
        tokio::time::timeout(Duration::from_secs(3600), fut)
            .await
            .is_err()
    }

    #[tokio::test(start_paused = true)]
    async fn intake_pulls_no_more_than_its_credits_from_a_stream_that_never_blocks() {
        const P: usize = 5;
        let credits = Credits::new(P);
        let pulled = Arc::new(AtomicUsize::new(0));
        let mut stream = never_blocking(pulled.clone());
        let (_pause_tx, mut paused) = watch::channel(BTreeSet::<PauseCause>::new());
        let (_stop_tx, mut stop) = watch::channel(false);

        let mut held = Vec::new();
        for want in 0..P {
            match next_with_credit(&credits, &mut paused, &mut stop, &mut stream).await {
                Pulled::Item(item, credit) => {
                    assert_eq!(item, want);
                    held.push(credit);
                }
                _ => panic!("item {want} not pulled"),
            }
        }
        assert!(
            stays_pending(next_with_credit(
                &credits,
                &mut paused,
                &mut stop,
                &mut stream
            ))
            .await,
            "a {}th item came out while {P} credits are held",
            P + 1
        );
        assert_eq!(pulled.load(Ordering::SeqCst), P, "pulled past the credits");

        // One credit back: exactly one more item.
        held.pop();
        assert!(matches!(
            next_with_credit(&credits, &mut paused, &mut stop, &mut stream).await,
            Pulled::Item(P, _)
        ));
        assert_eq!(pulled.load(Ordering::SeqCst), P + 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_paused_intake_pulls_nothing_and_takes_no_credit() {
        let credits = Credits::new(3);
        let pulled = Arc::new(AtomicUsize::new(0));
        let mut stream = never_blocking(pulled.clone());
        let (pause_tx, mut paused) = watch::channel(BTreeSet::from([PauseCause::Watermark]));
        let (stop_tx, mut stop) = watch::channel(false);

        assert!(
            stays_pending(next_with_credit(
                &credits,
                &mut paused,
                &mut stop,
                &mut stream
            ))
            .await
        );
        assert_eq!(pulled.load(Ordering::SeqCst), 0);
        assert_eq!(credits.in_use(), 0, "a paused intake holds a credit");

        pause_tx.send_modify(BTreeSet::clear);
        let Pulled::Item(0, credit) =
            next_with_credit(&credits, &mut paused, &mut stop, &mut stream).await
        else {
            panic!("resumed intake pulled nothing");
        };
        assert_eq!(credits.in_use(), 1);
        drop(credit);

        stop_tx.send_replace(true);
        assert!(matches!(
            next_with_credit(&credits, &mut paused, &mut stop, &mut stream).await,
            Pulled::Stopped
        ));
        assert_eq!(pulled.load(Ordering::SeqCst), 1);
    }

    /// A pause that comes while the intake waits, credit in hand, for the
    /// broker to send the next delivery: the delivery that then arrives is
    /// not taken, and the credit is given back.
    #[tokio::test(start_paused = true)]
    async fn a_pause_while_waiting_for_a_delivery_takes_nothing() {
        let credits = Credits::new(3);
        let (item_tx, mut item_rx) = tokio::sync::mpsc::channel::<usize>(1);
        let mut stream = futures::stream::poll_fn(move |cx| item_rx.poll_recv(cx));
        let (pause_tx, mut paused) = watch::channel(BTreeSet::<PauseCause>::new());
        let (_stop_tx, mut stop) = watch::channel(false);

        {
            let intake = next_with_credit(&credits, &mut paused, &mut stop, &mut stream);
            tokio::pin!(intake);
            // It waits for an item, holding a credit.
            assert!(futures::poll!(intake.as_mut()).is_pending());
            assert_eq!(credits.in_use(), 1);
            pause_tx.send_modify(|p| {
                p.insert(PauseCause::Operator);
            });
            item_tx.send(7).await.unwrap();
            assert!(stays_pending(intake).await, "a paused intake took an item");
        }
        assert_eq!(credits.in_use(), 0, "the paused intake kept its credit");

        pause_tx.send_modify(BTreeSet::clear);
        assert!(matches!(
            next_with_credit(&credits, &mut paused, &mut stop, &mut stream).await,
            Pulled::Item(7, _)
        ));
    }
}
