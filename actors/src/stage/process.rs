//! What happens to one delivery: one [`Verdict`], decided in one pass. The
//! helpers below run in this order:
//!
//! 1. [`open`]: the delivery as the engine trusts it. Engine routing headers
//!    (`x-flowgate-attempt`, `x-flowgate-original-*`) count only on a copy
//!    back from this stage's own retry tier; on any other delivery they are
//!    stripped (see [`crate::envelope`]).
//! 2. [`screen`]: bad input is dead-lettered before dedup and the handler
//!    (`oversized`; `malformed-id`, a `message_id` decoded lossily from
//!    invalid UTF-8, whose dedup key could collide with another's; a missing
//!    or wrong signature when the stage verifies, `bad-signature`, or only
//!    counted with `verify = "warn"`; `malformed` for the wrong payload type;
//!    `missing-id` when the dedup policy requires an id). Otherwise it yields
//!    the dedup key, if the stage deduplicates.
//! 3. [`claim`]: with dedup, the key is claimed (an already-done key is
//!    acked without handling; see [`crate::dedup::actor`] for waiting).
//! 4. [`run_handler`]: the handler runs (panics caught).
//! 5. [`judge`]: its outcome becomes a verdict: outputs to publish (each
//!    checked: an exchange or routing key the broker cannot take dead-letters
//!    the input as `invalid-output`), a retry copy for a tier, or a dead
//!    letter (`handler-error`, `panic`, `max-attempts`, or the handler's own).
//!    On an ordered stage ([`super::lanes`]) a retry happens in place
//!    instead ([`handle`]): steps 4 and 5 again after the ladder's delay,
//!    holding the key's lane; a keyless delivery the stage rejects is
//!    dead-lettered as `missing-key` after step 2.
//! 6. [`carry_out`]: outputs or the retry copy are published and confirmed
//!    (a returned output dead-letters as `unroutable`, a publish that panics
//!    or is refused as invalid as `invalid-output`); then the claim is
//!    committed (outputs confirmed) or released; a dead letter goes to
//!    `<queue>.dlx` with reason headers, confirmed.
//! 7. [`settle`]: only then is the input acked (rejected when there is no
//!    DLX, requeued while draining).

use super::ack::Ticket;
use super::SETTLE_TIMEOUT;
use super::{Shared, StageSpec};
use crate::credit::Credit;
use crate::dedup::{key_for, ClaimToken, Claimed, CommitOutcome, DedupHandle};
use crate::envelope::{self, Reason};
use crate::error::Error;
use crate::message::{set_header, Delivery, HandlerError, Outcome, Output};
use crate::metrics::events::{self, Event};
use crate::signing::VerifyMode;
use crate::trace;
use futures::FutureExt;
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicRejectOptions};
use lapin::types::AMQPValue;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::Instrument;

/// Longest `x-flowgate-error` value (see [`envelope::MAX_ERROR_BYTES`]).
pub(crate) const MAX_ERROR_HEADER_BYTES: usize = envelope::MAX_ERROR_BYTES;

/// A dead letter to publish: why, and what to say about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct DeadLetter {
    /// The closed-set reason: the metric label.
    pub reason: Reason,
    /// A handler's own reason text (for [`Reason::Handler`]): written to the
    /// reason header instead of the wire value.
    pub detail: Option<String>,
    /// The error text (`x-flowgate-error`).
    pub error: String,
}

impl DeadLetter {
    fn new(reason: Reason, error: impl Into<String>) -> Self {
        Self {
            reason,
            detail: None,
            error: error.into(),
        }
    }

    /// A handler's own reason: the reason header carries it (bounded), the
    /// metric label is `handler`.
    fn by_handler(reason: String) -> Self {
        Self {
            reason: Reason::Handler,
            detail: Some(envelope::truncate(reason.clone(), MAX_ERROR_HEADER_BYTES)),
            error: reason,
        }
    }

    /// The value of the reason header.
    fn header_value(&self) -> &str {
        self.detail.as_deref().unwrap_or(self.reason.as_str())
    }
}

/// What to do with one delivery.
#[derive(Debug)]
pub(crate) enum Verdict {
    /// Publish these outputs (checked), then commit the claim and ack.
    Publish(Vec<Output>),
    /// Ack without handling (its dedup key is done).
    Ack,
    /// Publish a copy to this retry tier, then release the claim and ack.
    Retry {
        /// The tier queue.
        tier: String,
        /// The failure, for `x-flowgate-last-error`.
        error: String,
        /// The wait the handler asked for (`Outcome::RetryAfter`).
        after: Option<Duration>,
    },
    /// Publish a dead letter, then ack (reject without a DLX).
    DeadLetter(DeadLetter),
    /// Give the delivery back to the queue (draining).
    Requeue,
}

/// How the input is finally settled.
enum Settle {
    Ack,
    Reject,
    Requeue,
}

/// The handler's result: its outcome or error, or the panic's message.
pub(crate) type Handled = Result<Result<Outcome, HandlerError>, String>;

/// Processes one delivery; the credit is released when this returns.
pub(crate) async fn process(
    shared: Arc<Shared>,
    raw: lapin::message::Delivery,
    credit: Credit,
    ticket: Option<Ticket>,
) {
    let taken = take(&shared, raw, credit, ticket);
    run(shared, taken, Order::Off).await;
}

/// A delivery the intake took, opened, with what it holds until it is
/// settled: its credit, its acker and its place in the ack register.
pub(crate) struct Taken {
    pub opened: Opened,
    /// [`Shared::epoch`] when it was taken.
    pub epoch: u64,
    acker: lapin::Acker,
    ticket: Option<Ticket>,
    span: tracing::Span,
    credit: CreditGuard,
}

/// Opens a delivery the intake took (step 1) inside its span.
pub(crate) fn take(
    shared: &Arc<Shared>,
    raw: lapin::message::Delivery,
    credit: Credit,
    ticket: Option<Ticket>,
) -> Taken {
    let credit = CreditGuard {
        credit: Some(credit),
        shared: shared.clone(),
    };
    let stage = shared.spec.name.as_str();
    events::Consumed {
        stage,
        since_first_publish: envelope::since_first_published(&raw.properties),
    }
    .emit(&shared.metrics);
    let span = trace::process_span(
        stage,
        &shared.spec.queue,
        raw.routing_key.as_str(),
        &raw.properties,
        raw.data.len(),
    );
    let opened = span.in_scope(|| {
        open(
            &shared.spec,
            raw.exchange.as_str(),
            raw.routing_key.as_str(),
            raw.properties,
            raw.data.into(),
            raw.redelivered,
        )
    });
    Taken {
        opened,
        epoch: shared.epoch.load(Ordering::Acquire),
        acker: raw.acker,
        ticket,
        span,
        credit,
    }
}

/// The `tier` label of `flowgate_retries_total` for a retry in place.
pub(crate) const IN_PLACE: &str = "in-place";

/// A lane's name: a key, or the lane of keyless deliveries.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) enum LaneKey {
    Key(String),
    Shared,
}

impl LaneKey {
    /// As the dead letter's [`ORDER_KEY`](crate::envelope::ORDER_KEY) says it.
    pub(crate) fn as_str(&self) -> &str {
        match self {
            LaneKey::Key(k) => k,
            LaneKey::Shared => "",
        }
    }
}

/// Where a delivery stands in its stage's ordering (see [`super::lanes`]).
pub(crate) enum Order<'a> {
    /// The stage does not keep order.
    Off,
    /// It holds this key's lane: a failed attempt retries in place.
    Lane(&'a LaneKey),
    /// It has no key and the stage rejects such: dead letter `missing-key`.
    Missing,
}

/// How a delivery left the stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Settled {
    /// Acked or rejected.
    Done,
    /// Given back to the queue.
    Requeued,
}

/// Processes a taken delivery (steps 2 to 7); its credit is released when
/// this returns.
pub(crate) async fn run(shared: Arc<Shared>, taken: Taken, order: Order<'_>) -> Settled {
    let Taken {
        opened,
        epoch: _,
        acker,
        ticket,
        span,
        credit,
    } = taken;
    let settled = process_delivery(&shared, opened, acker, ticket, order)
        .instrument(span)
        .await;
    drop(credit);
    settled
}

/// True when `taken` came on a channel that is gone: it cannot be acked,
/// and the broker redelivers it. lapin poisons a channel's ackers the
/// moment it learns the channel is gone (before it starts recovering it);
/// [`Shared::epoch`] covers the channels the engine itself gave up
/// (replaced, or closed at the end of a drain).
pub(crate) fn stale(shared: &Shared, taken: &Taken) -> bool {
    taken.acker.poisoned() || taken.epoch != shared.epoch.load(Ordering::Acquire)
}

/// Gives a taken delivery back to the queue unhandled (an ordered lane
/// whose earlier delivery was given back).
pub(crate) async fn give_back(shared: &Shared, taken: Taken) {
    settle(shared, taken.acker, Settle::Requeue, taken.ticket).await;
}

/// [`run`] inside the delivery's span.
async fn process_delivery(
    shared: &Arc<Shared>,
    mut opened: Opened,
    acker: lapin::Acker,
    ticket: Option<Ticket>,
    order: Order<'_>,
) -> Settled {
    let mut claim_token = None;
    let screened = screen(
        &shared.spec,
        &opened.delivery,
        &opened.signed_keys(),
        &shared.metrics,
    );
    let verdict = match screened {
        Err(dead) => Verdict::DeadLetter(dead),
        Ok(_) if matches!(order, Order::Missing) => Verdict::DeadLetter(DeadLetter::new(
            Reason::MissingKey,
            "the delivery has no ordering key (order_by) and the stage rejects such (missing_key = \"reject\")",
        )),
        Ok(key) => match claim(shared, key).await {
            Ok(token) => {
                claim_token = token;
                handle(shared, &mut opened, &order).await
            }
            Err(v) => v,
        },
    };
    let lane = match order {
        Order::Lane(k) => Some(k.as_str()),
        _ => None,
    };
    let verdict = carry_out(shared, &opened, verdict, claim_token, lane).await;
    let settled = match verdict {
        Settle::Requeue => Settled::Requeued,
        _ => Settled::Done,
    };
    settle(shared, acker, verdict, ticket).await;
    settled
}

/// Steps 4 and 5: runs the handler and judges its result; on an ordered
/// stage a retry happens here, in place, holding the lane and the credit
/// (see [`super::lanes`]), until it succeeds, the attempts are used up, or
/// the stage drains (the delivery is then given back).
async fn handle(shared: &Shared, o: &mut Opened, order: &Order<'_>) -> Verdict {
    loop {
        let handled = run_handler(shared, &o.delivery).await;
        let verdict = judge(&shared.spec, &o.delivery, o.attempt, handled);
        let (Order::Lane(_), Verdict::Retry { error, after, .. }, Some(policy)) =
            (order, &verdict, &shared.spec.retry)
        else {
            return verdict;
        };
        let delay = policy.delay_in_place(o.attempt, *after);
        events::Retried {
            stage: &shared.spec.name,
            tier: IN_PLACE,
            attempt: o.attempt,
        }
        .emit(&shared.metrics);
        let mut drains = shared.drains.subscribe();
        let epoch = shared.epoch.load(Ordering::Acquire);
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = drains.wait_for(|d| *d) => return Verdict::Requeue,
        }
        if shared.epoch.load(Ordering::Acquire) != epoch {
            // Its channel is gone: the broker redelivers it, in order.
            return Verdict::Requeue;
        }
        o.attempt += 1;
        let error = envelope::truncate(error.clone(), MAX_ERROR_HEADER_BYTES);
        // The names are the engine's constants, all far below 255 bytes.
        set_header(
            &mut o.delivery.properties,
            envelope::ATTEMPT,
            AMQPValue::LongLongInt(i64::from(o.attempt)),
        );
        set_header(
            &mut o.delivery.properties,
            envelope::LAST_ERROR,
            envelope::text(&error),
        );
    }
}

/// A delivery with what [`envelope::intake`] decided about it.
pub(crate) struct Opened {
    pub delivery: Delivery,
    /// The attempt this is (1 unless an own retry copy).
    pub attempt: u32,
    /// The routing key it was delivered with (what a signature covers).
    pub delivered_key: String,
    /// The own retry tier it came back from.
    pub tier: Option<String>,
}

impl Opened {
    /// The routing keys a signature may cover: the delivery's own and, for
    /// a copy back from an own retry tier, the tier's name.
    fn signed_keys(&self) -> Vec<&str> {
        std::iter::once(self.delivered_key.as_str())
            .chain(self.tier.as_deref())
            .collect()
    }
}

/// Step 1: the delivery as the engine trusts it.
pub(crate) fn open(
    spec: &StageSpec,
    exchange: &str,
    routing_key: &str,
    properties: lapin::BasicProperties,
    body: bytes::Bytes,
    redelivered: bool,
) -> Opened {
    let i = envelope::intake(&spec.queue, exchange, routing_key, properties);
    Opened {
        delivery: Delivery {
            body,
            properties: i.properties,
            redelivered,
            exchange: i.exchange,
            routing_key: i.routing_key,
            queue: spec.queue.clone(),
            stage: spec.name.clone(),
        },
        attempt: i.attempt,
        delivered_key: routing_key.to_owned(),
        tier: i.tier,
    }
}

/// Step 2: checks that need neither the store nor the handler. `Ok` carries
/// the dedup key when the stage deduplicates.
pub(crate) fn screen(
    spec: &StageSpec,
    d: &Delivery,
    signed_keys: &[&str],
    metrics: &crate::metrics::Metrics,
) -> Result<Option<String>, DeadLetter> {
    if let Some(max) = spec.max_message_bytes {
        if d.body.len() > max {
            return Err(DeadLetter::new(
                Reason::Oversized,
                format!("body of {} bytes exceeds the limit of {max}", d.body.len()),
            ));
        }
    }
    if let Some(id) = d.message_id().filter(|id| envelope::is_lossy(id)) {
        return Err(DeadLetter::new(
            Reason::MalformedId,
            format!("message_id is not valid UTF-8 (read as {id:?})"),
        ));
    }
    if let Some(v) = spec
        .signature
        .as_ref()
        .filter(|v| v.mode != VerifyMode::Off)
    {
        if let Err(e) = v.keys.verify(signed_keys, &d.properties, &d.body) {
            let processed_anyway = v.mode == VerifyMode::Warn;
            events::SignatureFailed {
                stage: &spec.name,
                error: &e,
                processed_anyway,
            }
            .emit(metrics);
            if !processed_anyway {
                return Err(DeadLetter::new(Reason::BadSignature, e.to_string()));
            }
        }
    }
    if let Err(e) = spec.payload.check(&d.body) {
        return Err(DeadLetter::new(Reason::Malformed, e));
    }
    let Some(dedup) = &spec.dedup else {
        return Ok(None);
    };
    match key_for(
        d.message_id(),
        &d.body,
        &d.routing_key,
        dedup.settings().missing_id,
    ) {
        Ok(key) => Ok(Some(format!("{}:{key}", spec.name))),
        Err(e) => Err(DeadLetter::new(Reason::MissingId, e.to_string())),
    }
}

/// Step 3: claims the dedup key. `Ok(None)`: no dedup; `Err`: the verdict
/// without handling (already done, or draining).
async fn claim(shared: &Shared, key: Option<String>) -> Result<Option<ClaimToken>, Verdict> {
    let (Some(dedup), Some(key)) = (&shared.spec.dedup, key) else {
        return Ok(None);
    };
    let stage = shared.spec.name.as_str();
    match dedup.claim(stage, &key, &shared.draining).await {
        Claimed::Acquired(t) => Ok(Some(t)),
        Claimed::AlreadyDone => {
            events::DedupHit { stage, key: &key }.emit(&shared.metrics);
            Err(Verdict::Ack)
        }
        Claimed::Stopped => Err(Verdict::Requeue),
        Claimed::Failed(e) => Err(Verdict::DeadLetter(DeadLetter::new(Reason::DedupError, e))),
    }
}

/// Step 4: runs the handler on a worker slot, catching panics; on a
/// batching stage, as part of the next batch (see [`super::batch`]).
async fn run_handler(shared: &Shared, d: &Delivery) -> Handled {
    if let Some(batcher) = &shared.batcher {
        if let Some(handled) = batcher.handle(d).await {
            return handled;
        }
        // The collector is gone (teardown): handle it alone.
    }
    // A closed semaphore only happens at teardown; run anyway then.
    let _worker = shared.workers.clone().acquire_owned().await.ok();
    let started = Instant::now();
    let call = AssertUnwindSafe(shared.spec.handler.handle(d)).catch_unwind();
    let res = bounded(shared.spec.handler_timeout, call).await;
    events::Handled {
        stage: &shared.spec.name,
        elapsed: started.elapsed(),
    }
    .emit(&shared.metrics);
    match res {
        Ok(res) => res.map_err(|p| panic_message(p.as_ref())),
        Err(timed_out) => Ok(Err(timed_out.to_string().into())),
    }
}

/// A handler call that took longer than the stage's `handler_timeout`.
#[derive(Debug)]
pub(crate) struct TimedOut(Duration);

impl std::fmt::Display for TimedOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the handler took longer than its timeout ({:?}); cancelled",
            self.0
        )
    }
}

/// Runs a handler call within `timeout` (none: unbounded); past it the
/// call is dropped (cancelled).
pub(crate) async fn bounded<F: std::future::Future>(
    timeout: Option<Duration>,
    call: F,
) -> Result<F::Output, TimedOut> {
    match timeout {
        None => Ok(call.await),
        Some(t) => tokio::time::timeout(t, call).await.map_err(|_| TimedOut(t)),
    }
}

pub(super) use crate::error::panic_message;

/// Step 5: the verdict for a handler's result.
pub(crate) fn judge(spec: &StageSpec, d: &Delivery, attempt: u32, handled: Handled) -> Verdict {
    match handled {
        Ok(Ok(Outcome::Ack { outputs })) => match prepare_outputs(d, outputs) {
            Ok(outputs) => Verdict::Publish(outputs),
            Err(dead) => Verdict::DeadLetter(dead),
        },
        Ok(Ok(Outcome::DeadLetter { reason })) => {
            Verdict::DeadLetter(DeadLetter::by_handler(reason))
        }
        Ok(Ok(Outcome::InvalidOutput { reason })) => {
            Verdict::DeadLetter(DeadLetter::new(Reason::InvalidOutput, reason))
        }
        Ok(Ok(Outcome::Retry { reason })) => {
            retry_or_dead(spec, attempt, None, DeadLetter::by_handler(reason))
        }
        Ok(Ok(Outcome::RetryAfter { reason, after })) => {
            retry_or_dead(spec, attempt, Some(after), DeadLetter::by_handler(reason))
        }
        Ok(Err(e)) => {
            let dead = DeadLetter::new(Reason::HandlerError, e.to_string());
            if spec.retry.is_some() {
                retry_or_dead(spec, attempt, None, dead)
            } else {
                Verdict::DeadLetter(dead)
            }
        }
        Err(panic) => Verdict::DeadLetter(DeadLetter::new(Reason::Panic, panic)),
    }
}

/// A transient failure: the next tier of the ladder (the first one of at
/// least `after`, when given), `max-attempts` when it is used up, or `dead`
/// at once without a ladder.
fn retry_or_dead(
    spec: &StageSpec,
    attempt: u32,
    after: Option<Duration>,
    dead: DeadLetter,
) -> Verdict {
    let Some(policy) = &spec.retry else {
        return Verdict::DeadLetter(dead);
    };
    let error = match &dead.detail {
        Some(detail) if *detail != dead.error => format!("{detail}: {}", dead.error),
        Some(_) => dead.error.clone(),
        None => format!("{}: {}", dead.reason, dead.error),
    };
    let tier = match after {
        Some(after) => policy.next_tier_after(&spec.queue, attempt, after),
        None => policy.next_tier(&spec.queue, attempt),
    };
    match tier {
        Some(tier) => Verdict::Retry { tier, error, after },
        None => Verdict::DeadLetter(DeadLetter::new(Reason::MaxAttempts, error)),
    }
}

/// Trace context and header hygiene for outputs, and the check that each
/// can be published: an output the broker cannot take dead-letters the
/// input as `invalid-output` (publishing it would fail the same way forever).
fn prepare_outputs(d: &Delivery, outputs: Vec<Output>) -> Result<Vec<Output>, DeadLetter> {
    // Export off: the input's trace headers pass through (export on, each
    // output's publish span writes its own, see `publish_all`).
    let parent_trace = (!trace::enabled()).then(|| trace::TraceHeaders::of(&d.properties));
    outputs
        .into_iter()
        .enumerate()
        .map(|(i, mut o)| {
            envelope::check_short("output exchange", &o.exchange)
                .and_then(|()| envelope::check_short("output routing key", &o.routing_key))
                .map_err(|e| DeadLetter::new(Reason::InvalidOutput, format!("output {i}: {e}")))?;
            if let Some(p) = &parent_trace {
                p.copy_to(&mut o.properties);
            }
            envelope::carry_first_published(&d.properties, &mut o.properties);
            // The next stage starts its own ladder at attempt 1.
            o.properties = envelope::without(o.properties, &envelope::ROUTING_HEADERS);
            Ok(o)
        })
        .collect()
}

/// Step 6: publishes what the verdict calls for and finishes the claim.
/// The result is `Ack`, `DeadLetter` (to publish next), or `Requeue`.
async fn carry_out(
    shared: &Shared,
    o: &Opened,
    verdict: Verdict,
    token: Option<ClaimToken>,
    lane: Option<&str>,
) -> Settle {
    let d = &o.delivery;
    let stage = shared.spec.name.as_str();
    let after = match verdict {
        Verdict::Publish(outputs) => match publish_all(shared, outputs).await {
            Ok(()) => Verdict::Ack,
            Err(f) => f.verdict("output"),
        },
        Verdict::Retry { tier, error, after } => {
            match retry_copy(shared, d, o.attempt, &tier, &error).await {
                Ok(()) => {
                    events::Retried {
                        stage,
                        tier: &tier,
                        attempt: o.attempt,
                    }
                    .emit(&shared.metrics);
                    // Acked, but not done: the claim is released below.
                    Verdict::Retry { tier, error, after }
                }
                Err(f) => f.verdict(&format!("retry tier {tier}")),
            }
        }
        v => v,
    };
    // Commit only once the outputs are confirmed, and before the ack.
    let after = match (&shared.spec.dedup, token) {
        (Some(dedup), Some(token)) => finish_claim(shared, dedup, token, after).await,
        _ => after,
    };
    match after {
        Verdict::Ack | Verdict::Retry { .. } | Verdict::Publish(_) => Settle::Ack,
        Verdict::Requeue => Settle::Requeue,
        Verdict::DeadLetter(dead) => {
            let res = dead_letter(shared, d, o.attempt, &dead, lane).await;
            if res.is_ok() {
                events::DeadLettered {
                    stage,
                    reason: dead.reason,
                    error: &dead.error,
                }
                .emit(&shared.metrics);
            }
            match res {
                Ok(true) => Settle::Ack,
                Ok(false) => Settle::Reject,
                Err(()) => Settle::Requeue,
            }
        }
    }
}

/// Commits the claim of a delivery whose outputs are confirmed; releases it
/// otherwise (a retry, a replayed dead letter or a redelivery may claim again).
async fn finish_claim(
    shared: &Shared,
    dedup: &DedupHandle,
    token: ClaimToken,
    v: Verdict,
) -> Verdict {
    let stage = shared.spec.name.as_str();
    if matches!(v, Verdict::Ack) {
        match dedup.commit(stage, &token, &shared.draining).await {
            Some(CommitOutcome::Committed) => Verdict::Ack,
            Some(CommitOutcome::LeaseLost) => {
                events::DedupLeaseLost {
                    stage,
                    key: &token.key,
                }
                .emit(&shared.metrics);
                Verdict::Ack
            }
            // Draining with the store down: give it back; the redelivery
            // waits for our lease, then runs again (at-least-once).
            None => Verdict::Requeue,
        }
    } else {
        dedup.release(stage, &token).await;
        v
    }
}

/// Step 7: acks, rejects or requeues the input. With batched acks, an ack
/// joins the register (see [`super::ack`]; its sends are bounded there, and
/// must not be cancelled half-way); a reject or requeue is sent here first,
/// then leaves the register.
async fn settle(shared: &Shared, acker: lapin::Acker, s: Settle, ticket: Option<Ticket>) {
    if let (Some(acks), Some(ticket)) = (&shared.acks, ticket) {
        if matches!(s, Settle::Ack) {
            acks.ready(ticket, acker).await;
            return;
        }
        settle_now(shared, &acker, s).await;
        acks.settled(ticket).await;
        return;
    }
    settle_now(shared, &acker, s).await;
}

async fn settle_now(shared: &Shared, acker: &lapin::Acker, s: Settle) {
    let stage = shared.spec.name.as_str();
    let Ok(res) = tokio::time::timeout(SETTLE_TIMEOUT, send_settle(shared, acker, s)).await else {
        events::AckFailed {
            stage,
            error: &format_args!("no answer from the channel within {SETTLE_TIMEOUT:?}"),
        }
        .emit(&shared.metrics);
        return;
    };
    match res {
        Ok(true) => {}
        // The channel closed under this delivery (reconnect): its tag is
        // dead and the broker redelivers the message (dedup catches it).
        Ok(false) => events::AckFailed {
            stage,
            error: &"channel closed since delivery",
        }
        .emit(&shared.metrics),
        Err(e) => events::AckFailed { stage, error: &e }.emit(&shared.metrics),
    }
}

async fn send_settle(shared: &Shared, acker: &lapin::Acker, s: Settle) -> lapin::Result<bool> {
    let stage = shared.spec.name.as_str();
    match s {
        Settle::Ack => {
            let r = acker.ack(BasicAckOptions::default()).await;
            if matches!(r, Ok(true)) {
                events::Acked { stage, covered: 1 }.emit(&shared.metrics);
            }
            r
        }
        Settle::Reject => acker.reject(BasicRejectOptions { requeue: false }).await,
        Settle::Requeue => {
            acker
                .nack(BasicNackOptions {
                    multiple: false,
                    requeue: true,
                })
                .await
        }
    }
}

/// Publishes the next attempt of `d` to a retry tier (confirmed).
async fn retry_copy(
    shared: &Shared,
    d: &Delivery,
    attempt: u32,
    tier: &str,
    error: &str,
) -> Result<(), PublishFailure> {
    let mut props = d.properties.clone();
    let error = envelope::truncate(error.to_owned(), MAX_ERROR_HEADER_BYTES);
    // The names are the engine's constants, all far below 255 bytes.
    set_header(
        &mut props,
        envelope::ATTEMPT,
        AMQPValue::LongLongInt(i64::from(attempt) + 1),
    );
    set_header(
        &mut props,
        envelope::ORIGINAL_EXCHANGE,
        envelope::text(&d.exchange),
    );
    set_header(
        &mut props,
        envelope::ORIGINAL_ROUTING_KEY,
        envelope::text(&d.routing_key),
    );
    set_header(&mut props, envelope::LAST_ERROR, envelope::text(&error));
    let out = Output {
        exchange: String::new(),
        routing_key: tier.to_owned(),
        body: d.body.clone(),
        properties: props,
    };
    publish_retrying(shared, out).await
}

/// Returns the credit (and updates the in-flight gauge) however `process` ends.
struct CreditGuard {
    credit: Option<Credit>,
    shared: Arc<Shared>,
}

impl Drop for CreditGuard {
    fn drop(&mut self) {
        self.shared.track_in_flight(false);
        drop(self.credit.take());
    }
}

/// Why a publish gave up.
#[derive(Debug)]
enum PublishFailure {
    /// No queue is bound for it: retrying cannot help.
    Unroutable(String),
    /// The broker cannot take it, or publishing it panicked: permanent.
    Invalid(String),
    /// The stage is draining and publishing still fails: give the input back.
    Draining,
}

impl PublishFailure {
    /// What a failed publish means: `None` to try it again after a backoff
    /// (a transient error, for as long as it lasts, draining or not), or why
    /// to give up on it. Only the publisher going away while the stage drains
    /// gives the input back; outside a drain the stage waits for it.
    fn of(error: &Error, draining: bool) -> Option<PublishFailure> {
        match error {
            Error::Unroutable { .. } => Some(PublishFailure::Unroutable(error.to_string())),
            Error::Invalid(_) | Error::Panicked(_) => {
                Some(PublishFailure::Invalid(error.to_string()))
            }
            Error::ShuttingDown | Error::ActorGone(_) if draining => Some(PublishFailure::Draining),
            _ => None,
        }
    }

    /// The verdict for the input of a message that could not be published.
    fn verdict(self, what: &str) -> Verdict {
        match self {
            PublishFailure::Unroutable(e) => {
                Verdict::DeadLetter(DeadLetter::new(Reason::Unroutable, format!("{what}: {e}")))
            }
            PublishFailure::Invalid(e) => Verdict::DeadLetter(DeadLetter::new(
                Reason::InvalidOutput,
                format!("{what}: {e}"),
            )),
            PublishFailure::Draining => Verdict::Requeue,
        }
    }
}

/// Publishes one message, retrying transient failures with capped backoff
/// while holding the caller's credit (this is where backpressure bites).
/// Permanent failures (unroutable, invalid, a panic) return at once.
async fn publish_retrying(shared: &Shared, out: Output) -> Result<(), PublishFailure> {
    let mut backoff =
        crate::supervision::Backoff::new(Duration::from_millis(20), Duration::from_secs(2));
    loop {
        match shared.publisher.publish_ref(&out).await {
            Ok(()) => return Ok(()),
            Err(e) => {
                if let Some(failure) =
                    PublishFailure::of(&e, shared.draining.load(Ordering::Acquire))
                {
                    return Err(failure);
                }
                events::PublishRetried {
                    stage: &shared.spec.name,
                    error: &e,
                }
                .emit(&shared.metrics);
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    }
}

async fn publish_all(shared: &Shared, outputs: Vec<Output>) -> Result<(), PublishFailure> {
    match outputs.len() {
        0 => Ok(()),
        1 => {
            let mut outputs = outputs;
            // len checked above
            let out = outputs.pop().ok_or(PublishFailure::Draining)?;
            publish_traced(shared, out).await
        }
        _ => {
            let results =
                futures::future::join_all(outputs.into_iter().map(|o| publish_traced(shared, o)))
                    .await;
            results.into_iter().collect()
        }
    }
}

/// Publishes one output inside its `publish` span, whose context the output
/// carries: the next stage's span is its child.
async fn publish_traced(shared: &Shared, mut out: Output) -> Result<(), PublishFailure> {
    let span = trace::publish_span(&mut out);
    publish_retrying(shared, out).instrument(span).await
}

/// Publishes a copy of `d` to the stage's dead-letter exchange with reason
/// headers, confirmed. `Ok(true)`: published; `Ok(false)`: no DLX configured
/// or it cannot take the copy (the caller rejects); `Err`: could not (the
/// caller requeues).
async fn dead_letter(
    shared: &Shared,
    d: &Delivery,
    attempt: u32,
    dead: &DeadLetter,
    lane: Option<&str>,
) -> Result<bool, ()> {
    let Some(dlx) = &shared.spec.dead_letter_exchange else {
        return Ok(false);
    };
    let mut properties = dead_letter_properties(d, attempt, dead);
    if let Some(key) = lane {
        let key = envelope::truncate(key.to_owned(), MAX_ERROR_HEADER_BYTES);
        // The name is the engine's constant, far below 255 bytes.
        set_header(&mut properties, envelope::ORDER_KEY, envelope::text(&key));
    }
    let out = Output {
        exchange: dlx.clone(),
        routing_key: d.routing_key.clone(),
        body: d.body.clone(),
        properties,
    };
    match publish_retrying(shared, out).await {
        Ok(()) => Ok(true),
        Err(PublishFailure::Unroutable(e) | PublishFailure::Invalid(e)) => {
            tracing::warn!(stage = %d.stage, error = %e, "dead-letter exchange cannot take it; rejecting instead");
            Ok(false)
        }
        Err(PublishFailure::Draining) => Err(()),
    }
}

/// The properties of `d`'s dead letter: the reason headers, where it was
/// first published (as the engine trusts it), no retry bookkeeping.
pub(crate) fn dead_letter_properties(
    d: &Delivery,
    attempt: u32,
    dead: &DeadLetter,
) -> lapin::BasicProperties {
    use envelope::text;
    // Persistent whatever the input was: a dead letter waits for an operator,
    // and a classic DLQ keeps transient messages in memory only.
    let mut props = envelope::without(
        d.properties.clone(),
        &[envelope::ATTEMPT, envelope::LAST_ERROR],
    )
    .with_delivery_mode(2);
    let error = envelope::truncate(dead.error.clone(), MAX_ERROR_HEADER_BYTES);
    // The names are the engine's constants, all far below 255 bytes.
    set_header(&mut props, envelope::REASON, text(dead.header_value()));
    set_header(
        &mut props,
        envelope::ATTEMPTS,
        AMQPValue::LongLongInt(i64::from(attempt)),
    );
    set_header(&mut props, envelope::STAGE, text(&d.stage));
    set_header(&mut props, envelope::ERROR, text(&error));
    set_header(&mut props, envelope::ORIGINAL_EXCHANGE, text(&d.exchange));
    set_header(
        &mut props,
        envelope::ORIGINAL_ROUTING_KEY,
        text(&d.routing_key),
    );
    set_header(&mut props, envelope::QUEUE, text(&d.queue));
    envelope::stamp_dead_lettered(&mut props);
    if dead.reason == Reason::BadSignature {
        // Keep the signature it arrived with (none or a wrong one): signing
        // the copy would let a replay from the DLQ launder it.
        set_header(&mut props, envelope::UNSIGNED, AMQPValue::Boolean(true));
    }
    props
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{handler_fn, Payload};
    use crate::retry::RetryPolicy;
    use crate::signing::{Keys, SigningKey, Verifier};
    use crate::supervision::RestartPolicy;
    use lapin::types::{FieldArray, FieldTable};
    use lapin::BasicProperties;

    fn spec() -> StageSpec {
        StageSpec {
            name: "s".into(),
            queue: "q".into(),
            prefetch: 10,
            concurrency: 1,
            handler: Arc::new(handler_fn(|_d| async { Ok(Outcome::ack()) })),
            dead_letter_exchange: Some("q.dlx".into()),
            policy: RestartPolicy::default(),
            retry: None,
            dedup: None,
            payload: Payload::Bytes,
            max_message_bytes: None,
            signature: None,
            batch: None,
            ack: None,
            handler_timeout: None,
            order: None,
            single_active: false,
        }
    }

    fn props(id: &str) -> BasicProperties {
        BasicProperties::default().with_message_id(id.into())
    }

    fn opened(spec: &StageSpec, ex: &str, rk: &str, p: BasicProperties, body: &[u8]) -> Opened {
        open(spec, ex, rk, p, bytes::Bytes::copy_from_slice(body), false)
    }

    fn screened(spec: &StageSpec, o: &Opened) -> Result<Option<String>, DeadLetter> {
        screen(
            spec,
            &o.delivery,
            &o.signed_keys(),
            &crate::metrics::Metrics::new(),
        )
    }

    fn reason(v: &Verdict) -> Option<Reason> {
        match v {
            Verdict::DeadLetter(d) => Some(d.reason),
            _ => None,
        }
    }

    fn tier_death(queue: &str) -> AMQPValue {
        let mut t = FieldTable::default();
        t.insert("queue".into(), envelope::text(queue));
        AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(t)]))
    }

    #[test]
    fn a_lossy_message_id_is_dead_lettered_before_anything_else_needs_it() {
        let s = spec();
        let o = opened(&s, "ex", "in", props("bad-\u{FFFD}\u{FFFD}-id"), b"{}");
        let err = screened(&s, &o).unwrap_err();
        assert_eq!(err.reason, Reason::MalformedId);
        assert_eq!(err.header_value(), "malformed-id");
        // It wins over a bad payload, and dedup never sees its key.
        let mut strict = spec();
        strict.payload = Payload::Json;
        let o = opened(&strict, "ex", "in", props("\u{FFFD}"), b"not json");
        assert_eq!(
            screened(&strict, &o).unwrap_err().reason,
            Reason::MalformedId
        );
        let good = opened(&s, "ex", "in", props("fine-id"), b"{}");
        assert_eq!(screened(&s, &good), Ok(None));
    }

    #[test]
    fn input_checks_in_order() {
        let mut s = spec();
        s.max_message_bytes = Some(4);
        s.payload = Payload::Json;
        let big = opened(&s, "ex", "in", props("m"), b"{\"a\":1}");
        assert_eq!(screened(&s, &big).unwrap_err().reason, Reason::Oversized);
        let bad = opened(&s, "ex", "in", props("m"), b"{x");
        assert_eq!(screened(&s, &bad).unwrap_err().reason, Reason::Malformed);
        s.signature = Some(Verifier {
            keys: Keys::new(SigningKey::new(b"k".to_vec())),
            mode: VerifyMode::Reject,
        });
        let unsigned = opened(&s, "ex", "in", props("m"), b"{}");
        let e = screened(&s, &unsigned).unwrap_err();
        assert_eq!(e.reason, Reason::BadSignature);
        let p = dead_letter_properties(&unsigned.delivery, 1, &e);
        assert!(envelope::header(&p, envelope::UNSIGNED).is_some());
        // `off` (the config's word, the runtime's type) checks nothing.
        if let Some(v) = s.signature.as_mut() {
            v.mode = VerifyMode::Off;
        }
        assert_eq!(screened(&s, &unsigned), Ok(None));
    }

    #[test]
    fn the_size_limit_is_inclusive_and_warn_counts_but_processes() {
        let mut s = spec();
        s.max_message_bytes = Some(2);
        let at_limit = opened(&s, "ex", "in", props("m"), b"ab");
        assert_eq!(screened(&s, &at_limit), Ok(None), "2 bytes of 2 pass");
        s.signature = Some(Verifier {
            keys: Keys::new(SigningKey::new(b"k".to_vec())),
            mode: VerifyMode::Warn,
        });
        let m = crate::metrics::Metrics::new();
        let unsigned = opened(&s, "ex", "in", props("m"), b"ab");
        let got = screen(&s, &unsigned.delivery, &unsigned.signed_keys(), &m);
        assert_eq!(got, Ok(None), "warn: processed anyway");
        assert_eq!(
            m.counter(crate::metrics::Metrics::SIGNATURE_FAILURES, &["s"]),
            1
        );
    }

    #[test]
    fn a_timed_out_handler_says_how_long_it_had() {
        let e = TimedOut(Duration::from_millis(1500)).to_string();
        assert!(e.contains("1.5s") && e.contains("timeout"), "{e}");
    }

    #[test]
    fn forged_routing_headers_never_reach_the_dead_letter() {
        let s = spec();
        let mut t = FieldTable::default();
        t.insert(envelope::ATTEMPT.into(), AMQPValue::LongLongInt(7));
        t.insert(
            envelope::ORIGINAL_ROUTING_KEY.into(),
            envelope::text(&"k".repeat(300)),
        );
        t.insert(
            envelope::ORIGINAL_EXCHANGE.into(),
            envelope::text("nowhere"),
        );
        let o = opened(&s, "shop", "in", props("m").with_headers(t.clone()), b"x");
        assert_eq!(o.attempt, 1);
        let dead = DeadLetter::new(Reason::Malformed, "e");
        let p = dead_letter_properties(&o.delivery, o.attempt, &dead);
        let h = |n| envelope::header(&p, n).and_then(crate::message::header_string);
        assert_eq!(h(envelope::ORIGINAL_EXCHANGE).as_deref(), Some("shop"));
        assert_eq!(h(envelope::ORIGINAL_ROUTING_KEY).as_deref(), Some("in"));
        assert!(envelope::header(&p, envelope::ATTEMPT).is_none());
        // The same headers on a copy back from the stage's own tier count.
        t.insert(envelope::X_DEATH.into(), tier_death("q.retry.1"));
        let own = opened(&s, "", "q", props("m").with_headers(t), b"x");
        assert_eq!(
            (own.attempt, own.delivery.exchange.as_str()),
            (7, "nowhere")
        );
        assert_eq!(
            own.delivery.attempt(),
            7,
            "the handler reads the same count"
        );
        assert_eq!(o.delivery.attempt(), 1, "a forged count is not read");
        assert_eq!(own.delivery.routing_key, "q", "never a 300-byte key");
        assert_eq!(own.signed_keys(), ["q", "q.retry.1"]);
    }

    #[test]
    fn an_output_the_broker_cannot_take_dead_letters_the_input() {
        let s = spec();
        let o = opened(&s, "ex", "in", props("m"), b"x");
        let d = &o.delivery;
        let long = Output::new("ex", "k".repeat(300), "b");
        let v = judge(
            &s,
            d,
            1,
            Ok(Ok(Outcome::ack_with(vec![d.forward("ex", "ok"), long]))),
        );
        assert_eq!(reason(&v), Some(Reason::InvalidOutput));
        let Verdict::DeadLetter(dead) = v else {
            unreachable!()
        };
        assert!(
            dead.error.contains("output 1") && dead.error.contains("300"),
            "{}",
            dead.error
        );
        let long_ex = Output::new("x".repeat(256), "k", "b");
        let v = judge(&s, d, 1, Ok(Ok(Outcome::ack_with(vec![long_ex]))));
        assert_eq!(reason(&v), Some(Reason::InvalidOutput));
    }

    #[test]
    fn a_handler_reporting_an_invalid_output_dead_letters_as_invalid_output() {
        let s = spec();
        let o = opened(&s, "ex", "in", props("m"), b"x");
        let v = judge(
            &s,
            &o.delivery,
            1,
            Ok(Ok(Outcome::invalid_output("answer is not JSON"))),
        );
        assert_eq!(reason(&v), Some(Reason::InvalidOutput));
        let Verdict::DeadLetter(dead) = v else {
            unreachable!()
        };
        assert_eq!(dead.error, "answer is not JSON");
    }

    #[test]
    fn outputs_lose_routing_headers_and_pass_the_trace_through() {
        let s = spec();
        let mut p = props("m");
        let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        set_header(&mut p, trace::TRACEPARENT, envelope::text(tp));
        let o = opened(&s, "ex", "in", p, b"x");
        let out = Output::new("ex", "next", "b")
            .with_header(envelope::ATTEMPT, AMQPValue::LongLongInt(3));
        let Verdict::Publish(outs) =
            judge(&s, &o.delivery, 1, Ok(Ok(Outcome::ack_with(vec![out]))))
        else {
            panic!("publish")
        };
        assert!(envelope::header(&outs[0].properties, envelope::ATTEMPT).is_none());
        // Export is off in unit tests: the parent's trace passes through
        // (with export on, the publish span writes a child instead).
        assert_eq!(
            trace::TraceHeaders::of(&outs[0].properties).traceparent(),
            Some(tp)
        );
    }

    #[test]
    fn fresh_outputs_keep_the_first_publish_stamp() {
        let s = spec();
        let mut p = props("m");
        crate::message::set_header(
            &mut p,
            envelope::FIRST_PUBLISHED,
            AMQPValue::LongLongInt(1_000),
        );
        let o = opened(&s, "ex", "in", p, b"x");
        let own = Output::new("ex", "own", "b")
            .with_header(envelope::FIRST_PUBLISHED, AMQPValue::LongLongInt(2_000));
        let outs = vec![Output::new("ex", "next", "b"), own];
        let Verdict::Publish(outs) = judge(&s, &o.delivery, 1, Ok(Ok(Outcome::ack_with(outs))))
        else {
            panic!("publish")
        };
        assert_eq!(envelope::first_published(&outs[0].properties), Some(1_000));
        assert_eq!(envelope::first_published(&outs[1].properties), Some(2_000));
    }

    #[test]
    fn a_failed_publish_is_retried_unless_it_cannot_succeed_or_the_drain_lost_its_publisher() {
        use crate::envelope::InvalidShortString;
        let gone = [Error::ShuttingDown, Error::ActorGone("publisher")];
        let transient = [
            Error::NotConnected,
            Error::Nacked,
            Error::ConfirmTimeout(Duration::from_secs(1)),
            Error::Backpressure("spool full".into()),
        ];
        for draining in [false, true] {
            // Transient: tried again for as long as it lasts, draining or not.
            for e in &transient {
                assert!(
                    PublishFailure::of(e, draining).is_none(),
                    "{e} (draining: {draining})"
                );
            }
            // Cannot succeed: given up at once, draining or not.
            let returned = Error::Unroutable {
                code: 312,
                text: "NO_ROUTE".into(),
            };
            assert!(matches!(
                PublishFailure::of(&returned, draining),
                Some(PublishFailure::Unroutable(e)) if e.contains("NO_ROUTE")
            ));
            let too_long = Error::Invalid(InvalidShortString {
                field: "routing key",
                len: 300,
            });
            assert!(matches!(
                PublishFailure::of(&too_long, draining),
                Some(PublishFailure::Invalid(e)) if e.contains("300 bytes")
            ));
            assert!(matches!(
                PublishFailure::of(&Error::Panicked("boom".into()), draining),
                Some(PublishFailure::Invalid(e)) if e.contains("boom")
            ));
        }
        // The publisher gone: outside a drain the stage waits for it to come
        // back; during a drain it gives the input back to the queue.
        for e in &gone {
            assert!(PublishFailure::of(e, false).is_none(), "{e}");
            assert!(
                matches!(PublishFailure::of(e, true), Some(PublishFailure::Draining)),
                "{e}"
            );
        }
    }

    #[test]
    fn handler_results_map_to_reasons() {
        let mut s = spec();
        let o = opened(&s, "ex", "in", props("m"), b"x");
        let d = &o.delivery;
        let err = || Ok(Err::<Outcome, HandlerError>("boom".into()));
        assert_eq!(reason(&judge(&s, d, 1, err())), Some(Reason::HandlerError));
        assert_eq!(
            reason(&judge(&s, d, 1, Err("p".into()))),
            Some(Reason::Panic)
        );
        let v = judge(&s, d, 1, Ok(Ok(Outcome::dead_letter("out-of-stock"))));
        let Verdict::DeadLetter(dead) = v else {
            panic!()
        };
        assert_eq!(
            (dead.reason, dead.header_value()),
            (Reason::Handler, "out-of-stock")
        );
        let v = judge(&s, d, 1, Ok(Ok(Outcome::retry("later"))));
        assert_eq!(reason(&v), Some(Reason::Handler), "no ladder: dead at once");
        s.retry = Some(RetryPolicy {
            max_attempts: 3,
            backoff: vec![Duration::from_millis(100), Duration::from_millis(200)],
        });
        assert!(
            matches!(judge(&s, d, 1, err()), Verdict::Retry { ref tier, .. } if tier == "q.retry.1")
        );
        assert!(
            matches!(judge(&s, d, 2, Ok(Ok(Outcome::retry("later")))), Verdict::Retry { ref tier, .. } if tier == "q.retry.2")
        );
        let later = |ms| Ok(Ok(Outcome::retry_after("busy", Duration::from_millis(ms))));
        assert!(
            matches!(judge(&s, d, 1, later(150)), Verdict::Retry { ref tier, .. } if tier == "q.retry.2"),
            "the first tier of at least 150 ms"
        );
        let v = judge(&s, d, 3, later(150));
        assert_eq!(reason(&v), Some(Reason::MaxAttempts), "still an attempt");
        let v = judge(&s, d, 3, err());
        let Verdict::DeadLetter(dead) = v else {
            panic!()
        };
        assert_eq!(dead.reason, Reason::MaxAttempts);
        assert_eq!(dead.error, "handler-error: boom");
        // A handler's own retry reason is the error as it is.
        let v = judge(&s, d, 3, Ok(Ok(Outcome::retry("busy"))));
        let Verdict::DeadLetter(dead) = v else {
            panic!()
        };
        assert_eq!(
            (dead.reason, dead.error.as_str()),
            (Reason::MaxAttempts, "busy")
        );
        assert!(
            matches!(judge(&s, d, 1, Ok(Ok(Outcome::ack()))), Verdict::Publish(ref o) if o.is_empty())
        );
    }

    #[test]
    fn panic_messages_are_read_from_str_and_string() {
        assert_eq!(panic_message(&"a"), "a");
        assert_eq!(panic_message(&String::from("b")), "b");
        assert_eq!(panic_message(&1u8), "panic");
    }
}
