//! What happens to one delivery:
//!
//! 1. bad input (over `max_message_bytes`, a missing or wrong HMAC
//!    signature when the stage verifies, not the declared payload type) is
//!    dead-lettered before anything else (`oversized`, `bad-signature`,
//!    `malformed`); with `verify = "warn"` a bad signature is only counted;
//! 2. with dedup, the message's key is claimed (an already-done key is acked
//!    without handling; see [`crate::dedup::actor`] for waiting);
//! 3. the handler runs (panics caught);
//! 4. `Ack`: outputs published and confirmed, then the claim committed;
//!    `Retry` (and handler errors when the stage has a ladder): a copy goes
//!    to the retry tier, confirmed, and the claim is released; dead letters
//!    go to `<queue>.dlx` with reason headers, confirmed, claim released;
//! 5. only then is the input acked.

use super::Shared;
use crate::credit::Credit;
use crate::dedup::{key_for, Claimed, CommitOutcome};
use crate::error::Error;
use crate::message::{set_header, Delivery, Outcome, Output};
use crate::retry::{
    attempt_of, ATTEMPT_HEADER, ENGINE_HEADERS, ORIGINAL_EXCHANGE_HEADER,
    ORIGINAL_ROUTING_KEY_HEADER,
};
use crate::signing::{self, VerifyMode, BAD_SIGNATURE, UNSIGNED_HEADER};
use crate::trace;
use futures::FutureExt;
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicRejectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::BasicProperties;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{debug, warn};

/// Longest `x-flowgate-error` value; longer errors are truncated so a dead
/// letter stays far below the broker's frame and message size limits.
pub const MAX_ERROR_HEADER_BYTES: usize = 1024;

/// Why a message was dead-lettered (`handler-error`, `panic`,
/// `max-attempts`, `malformed`, `oversized`, `unroutable`, `missing-id`, or
/// a handler's own reason).
pub const REASON_HEADER: &str = "x-flowgate-reason";

/// The dead-letter reason of a message no queue is bound for (a stage's
/// output, or a spooled record on replay).
pub const UNROUTABLE_REASON: &str = "unroutable";

/// The error text of a dead letter (truncated to [`MAX_ERROR_HEADER_BYTES`]).
pub const ERROR_HEADER: &str = "x-flowgate-error";

/// How many handling attempts a dead letter had.
pub const ATTEMPTS_HEADER: &str = "x-flowgate-attempts";

/// The headers every dead letter carries.
pub const DEAD_LETTER_HEADERS: [&str; 6] = [
    REASON_HEADER,
    "x-flowgate-stage",
    ATTEMPTS_HEADER,
    ERROR_HEADER,
    ORIGINAL_EXCHANGE_HEADER,
    ORIGINAL_ROUTING_KEY_HEADER,
];

/// What to do with the input once the handler has spoken.
enum Disposition {
    Ack(Vec<Output>),
    /// Transient failure: through the retry ladder when there is one.
    Retry {
        reason: String,
        error: String,
    },
    DeadLetter {
        reason: String,
        error: String,
    },
}

pub(crate) fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
    s
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic".to_owned()
    }
}

fn lstr(v: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(v.to_owned()))
}

fn remove_headers(props: &mut BasicProperties, names: &[&str]) {
    let Some(table) = props.headers() else {
        return;
    };
    if !names.iter().any(|n| table.inner().contains_key(*n)) {
        return;
    }
    let mut kept = FieldTable::default();
    for (k, v) in table.inner() {
        if !names.contains(&k.as_str()) {
            kept.insert(k.clone(), v.clone());
        }
    }
    *props = props.clone().with_headers(kept);
}

/// Checks that do not need the handler: size, signature, payload type.
/// `signed_keys` are the routing keys the signature may cover.
fn check_input(shared: &Shared, d: &Delivery, signed_keys: &[&str]) -> Option<(String, String)> {
    if let Some(max) = shared.spec.max_message_bytes {
        if d.body.len() > max {
            return Some((
                "oversized".into(),
                format!("body of {} bytes exceeds the limit of {max}", d.body.len()),
            ));
        }
    }
    if let Some(v) = &shared.spec.signature {
        if let Err(e) = v.keys.verify(signed_keys, &d.properties, &d.body) {
            let stage = shared.spec.name.as_str();
            shared
                .metrics
                .signature_failures
                .with_label_values(&[stage])
                .inc();
            match v.mode {
                VerifyMode::Reject => return Some((BAD_SIGNATURE.into(), e.to_string())),
                VerifyMode::Warn => warn!(
                    stage,
                    message_id = ?d.message_id(),
                    error = %e,
                    "bad signature; processing anyway (verify = \"warn\")"
                ),
            }
        }
    }
    if let Err(e) = shared.spec.payload.check(&d.body) {
        return Some(("malformed".into(), e));
    }
    None
}

/// Processes one delivery; the credit is released when this returns.
pub(crate) async fn process(shared: Arc<Shared>, raw: lapin::message::Delivery, credit: Credit) {
    let _credit = CreditGuard {
        credit: Some(credit),
        shared: shared.clone(),
    };
    let stage = shared.spec.name.as_str();
    shared.metrics.consumed.with_label_values(&[stage]).inc();
    let acker = raw.acker;
    // Only the engine sets this marker (on the dead letters of badly signed
    // messages); input cannot carry it into what this stage publishes.
    let properties = signing::without_header(raw.properties, UNSIGNED_HEADER);
    // The routing keys a signature may cover: the delivery's own, and for a
    // copy back from one of this stage's retry tiers, the tier's name.
    let delivery_key = raw.routing_key.to_string();
    let tier_key = shared
        .spec
        .signature
        .as_ref()
        .and_then(|_| signing::retry_tier_key(&shared.spec.queue, &delivery_key, &properties));
    let mut delivery = Delivery {
        body: raw.data.into(),
        properties,
        redelivered: raw.redelivered,
        exchange: raw.exchange.to_string(),
        routing_key: delivery_key.clone(),
        queue: shared.spec.queue.clone(),
        stage: shared.spec.name.clone(),
    };
    // A retried copy came back through a tier (default exchange, routing
    // key = this queue): show the handler where it was first published.
    if delivery.header(ATTEMPT_HEADER).is_some() {
        if let Some(x) = delivery.header_str(ORIGINAL_EXCHANGE_HEADER) {
            delivery.exchange = x;
        }
        if let Some(k) = delivery.header_str(ORIGINAL_ROUTING_KEY_HEADER) {
            delivery.routing_key = k;
        }
    }
    let attempt = attempt_of(&delivery);

    let mut settled = None;
    let mut claim = None;
    let signed_keys: Vec<&str> = std::iter::once(delivery_key.as_str())
        .chain(tier_key.as_deref())
        .collect();
    if let Some((reason, error)) = check_input(&shared, &delivery, &signed_keys) {
        warn!(stage, reason = %reason, error = %error, "bad input; dead-lettering");
        settled = Some(Settle::DeadLetter { reason, error });
    } else if let Some(dedup) = &shared.spec.dedup {
        let settings = dedup.settings();
        match key_for(
            delivery.message_id(),
            &delivery.body,
            &delivery.routing_key,
            settings.missing_id,
        ) {
            Err(e) => {
                warn!(stage, "message without message_id; dead-lettering");
                settled = Some(Settle::DeadLetter {
                    reason: "missing-id".into(),
                    error: e.to_string(),
                });
            }
            Ok(key) => {
                let key = format!("{stage}:{key}");
                match dedup.claim(stage, &key, &shared.draining).await {
                    Claimed::Acquired(t) => claim = Some(t),
                    Claimed::AlreadyDone => {
                        shared.metrics.dedup_hits.with_label_values(&[stage]).inc();
                        debug!(stage, key = %key, "already processed; acking without handling");
                        settled = Some(Settle::Ack);
                    }
                    Claimed::Stopped => settled = Some(Settle::Requeue),
                }
            }
        }
    }

    let settled = match settled {
        Some(s) => s,
        None => {
            let disposition = run_handler(&shared, &delivery, attempt).await;
            let s = settle(&shared, &delivery, attempt, disposition).await;
            // Commit only once the outputs are confirmed, and before the ack.
            if let (Some(dedup), Some(token)) = (&shared.spec.dedup, claim.take()) {
                finish_claim(&shared, dedup, token, s).await
            } else {
                s
            }
        }
    };

    let settled = match settled {
        Settle::DeadLetter { reason, error } => {
            match dead_letter(&shared, &delivery, attempt, &reason, &error).await {
                Ok(true) => {
                    shared
                        .metrics
                        .dead_lettered
                        .with_label_values(&[stage, &reason])
                        .inc();
                    Settle::Ack
                }
                Ok(false) => {
                    shared
                        .metrics
                        .dead_lettered
                        .with_label_values(&[stage, &reason])
                        .inc();
                    Settle::Reject
                }
                Err(()) => Settle::Requeue,
            }
        }
        other => other,
    };

    let res = match settled {
        Settle::Ack | Settle::Retried => {
            let r = acker.ack(BasicAckOptions::default()).await;
            if matches!(r, Ok(true)) {
                shared.metrics.acked.with_label_values(&[stage]).inc();
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
        Settle::DeadLetter { .. } => Ok(true),
    };
    match res {
        Ok(true) => {}
        // The channel closed under this delivery (reconnect): its tag is
        // dead and the broker redelivers the message (dedup catches it).
        Ok(false) => {
            shared
                .metrics
                .ack_failures
                .with_label_values(&[stage])
                .inc();
            debug!(
                stage,
                "ack not sent: channel closed since delivery; the broker will redeliver"
            );
        }
        Err(e) => {
            shared
                .metrics
                .ack_failures
                .with_label_values(&[stage])
                .inc();
            debug!(stage, error = %e, "ack failed; the broker will redeliver");
        }
    }
}

/// Commits the claim of a delivery whose outputs are confirmed; releases it
/// otherwise (a retry, a replayed dead letter or a redelivery may claim again).
async fn finish_claim(
    shared: &Shared,
    dedup: &crate::dedup::DedupHandle,
    token: crate::dedup::ClaimToken,
    s: Settle,
) -> Settle {
    let stage = shared.spec.name.as_str();
    if matches!(s, Settle::Ack) {
        match dedup.commit(stage, &token, &shared.draining).await {
            Some(CommitOutcome::Committed) => Settle::Ack,
            Some(CommitOutcome::LeaseLost) => {
                shared
                    .metrics
                    .dedup_lease_lost
                    .with_label_values(&[stage])
                    .inc();
                warn!(stage, key = %token.key, "handling outlasted the dedup lease; a duplicate effect is possible (raise dedup.lease)");
                Settle::Ack
            }
            // Draining with the store down: give it back; the redelivery
            // waits for our lease, then runs again (at-least-once).
            None => Settle::Requeue,
        }
    } else {
        dedup.release(stage, &token).await;
        s
    }
}

async fn run_handler(shared: &Shared, delivery: &Delivery, attempt: u32) -> Disposition {
    let stage = shared.spec.name.as_str();
    // A closed semaphore only happens at teardown; run anyway then.
    let _worker = shared.workers.clone().acquire_owned().await.ok();
    let started = Instant::now();
    let res = AssertUnwindSafe(shared.spec.handler.handle(delivery))
        .catch_unwind()
        .await;
    shared
        .metrics
        .handler_duration
        .with_label_values(&[stage])
        .observe(started.elapsed().as_secs_f64());
    match res {
        Ok(Ok(Outcome::Ack { outputs })) => Disposition::Ack(outputs),
        Ok(Ok(Outcome::Retry { reason })) => Disposition::Retry {
            error: reason.clone(),
            reason,
        },
        Ok(Ok(Outcome::DeadLetter { reason })) => Disposition::DeadLetter {
            error: reason.clone(),
            reason,
        },
        Ok(Err(e)) => {
            debug!(stage, attempt, error = %e, "handler failed");
            if shared.spec.retry.is_some() {
                Disposition::Retry {
                    reason: "handler-error".into(),
                    error: e.to_string(),
                }
            } else {
                Disposition::DeadLetter {
                    reason: "handler-error".into(),
                    error: e.to_string(),
                }
            }
        }
        Err(p) => {
            let msg = panic_message(p.as_ref());
            warn!(stage, error = %msg, "handler panicked; dead-lettering the message");
            Disposition::DeadLetter {
                reason: "panic".into(),
                error: msg,
            }
        }
    }
}

/// Publishes what the disposition calls for (outputs, a retry copy) and
/// says how to settle the input.
async fn settle(
    shared: &Shared,
    delivery: &Delivery,
    attempt: u32,
    disposition: Disposition,
) -> Settle {
    match disposition {
        Disposition::Ack(outputs) => {
            let parent_trace = trace::traceparent_of(&delivery.properties);
            let outputs = outputs.into_iter().map(|mut o| {
                if let Some(p) = &parent_trace {
                    if trace::traceparent_of(&o.properties).is_none() {
                        trace::set_traceparent(&mut o.properties, trace::child_of(p));
                    }
                }
                // The next stage starts its own ladder at attempt 1.
                remove_headers(&mut o.properties, &ENGINE_HEADERS);
                o
            });
            match publish_all(shared, outputs.collect()).await {
                Ok(()) => Settle::Ack,
                Err(PublishFailure::Unroutable(e)) => Settle::DeadLetter {
                    reason: UNROUTABLE_REASON.into(),
                    error: e,
                },
                Err(PublishFailure::Draining) => Settle::Requeue,
            }
        }
        Disposition::DeadLetter { reason, error } => Settle::DeadLetter { reason, error },
        Disposition::Retry { reason, error } => match &shared.spec.retry {
            None => Settle::DeadLetter { reason, error },
            Some(policy) => match policy.next_tier(&shared.spec.queue, attempt) {
                None => Settle::DeadLetter {
                    reason: "max-attempts".into(),
                    error: format!("{reason}: {error}"),
                },
                Some(tier) => match retry_copy(shared, delivery, attempt, &tier, &error).await {
                    Ok(()) => {
                        shared
                            .metrics
                            .retried
                            .with_label_values(&[&shared.spec.name, &tier])
                            .inc();
                        debug!(stage = %shared.spec.name, attempt, tier = %tier, "retry scheduled");
                        Settle::Retried
                    }
                    Err(PublishFailure::Unroutable(e)) => Settle::DeadLetter {
                        reason: UNROUTABLE_REASON.into(),
                        error: format!("retry tier {tier}: {e}"),
                    },
                    Err(PublishFailure::Draining) => Settle::Requeue,
                },
            },
        },
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
    set_header(
        &mut props,
        ATTEMPT_HEADER,
        AMQPValue::LongLongInt(i64::from(attempt) + 1),
    );
    set_header(&mut props, ORIGINAL_EXCHANGE_HEADER, lstr(&d.exchange));
    set_header(
        &mut props,
        ORIGINAL_ROUTING_KEY_HEADER,
        lstr(&d.routing_key),
    );
    set_header(
        &mut props,
        "x-flowgate-last-error",
        lstr(&truncate(error.to_owned(), MAX_ERROR_HEADER_BYTES)),
    );
    let out = Output {
        exchange: String::new(),
        routing_key: tier.to_owned(),
        body: d.body.clone(),
        properties: props,
    };
    publish_retrying(shared, out).await
}

enum Settle {
    Ack,
    /// A retry copy is confirmed in its tier: ack the input.
    Retried,
    Reject,
    Requeue,
    DeadLetter {
        reason: String,
        error: String,
    },
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

enum PublishFailure {
    /// No queue is bound for an output: retrying cannot help.
    Unroutable(String),
    /// The stage is draining and publishing still fails: give the input back.
    Draining,
}

/// Publishes one message, retrying transient failures with capped backoff
/// while holding the caller's credit (this is where backpressure bites).
async fn publish_retrying(shared: &Shared, out: Output) -> Result<(), PublishFailure> {
    let mut backoff = Duration::from_millis(20);
    loop {
        match shared.publisher.publish(out.clone()).await {
            Ok(()) => return Ok(()),
            Err(e @ Error::Unroutable { .. }) => {
                return Err(PublishFailure::Unroutable(e.to_string()))
            }
            Err(e) => {
                shared
                    .metrics
                    .publish_retries
                    .with_label_values(&[&shared.spec.name])
                    .inc();
                if shared.draining.load(Ordering::Acquire)
                    && matches!(e, Error::ShuttingDown | Error::ActorGone(_))
                {
                    return Err(PublishFailure::Draining);
                }
                debug!(stage = %shared.spec.name, error = %e, ?backoff, "publish failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
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
            publish_retrying(shared, out).await
        }
        _ => {
            let results =
                futures::future::join_all(outputs.into_iter().map(|o| publish_retrying(shared, o)))
                    .await;
            results.into_iter().collect()
        }
    }
}

/// Publishes a copy of `d` to the stage's dead-letter exchange with reason
/// headers, confirmed. `Ok(true)`: published; `Ok(false)`: no DLX configured
/// (the caller rejects); `Err`: could not (the caller requeues).
async fn dead_letter(
    shared: &Shared,
    d: &Delivery,
    attempt: u32,
    reason: &str,
    error: &str,
) -> Result<bool, ()> {
    let Some(dlx) = &shared.spec.dead_letter_exchange else {
        return Ok(false);
    };
    let mut props = d.properties.clone();
    remove_headers(&mut props, &[ATTEMPT_HEADER, "x-flowgate-last-error"]);
    let s = lstr;
    set_header(&mut props, REASON_HEADER, s(reason));
    set_header(
        &mut props,
        ATTEMPTS_HEADER,
        AMQPValue::LongLongInt(i64::from(attempt)),
    );
    set_header(&mut props, "x-flowgate-stage", s(&d.stage));
    set_header(
        &mut props,
        ERROR_HEADER,
        s(&truncate(error.to_owned(), MAX_ERROR_HEADER_BYTES)),
    );
    set_header(&mut props, ORIGINAL_EXCHANGE_HEADER, s(&d.exchange));
    set_header(&mut props, ORIGINAL_ROUTING_KEY_HEADER, s(&d.routing_key));
    set_header(&mut props, "x-flowgate-queue", s(&d.queue));
    if reason == BAD_SIGNATURE {
        // Keep the signature it arrived with (none or a wrong one): signing
        // the copy would let a replay from the DLQ launder it.
        set_header(&mut props, UNSIGNED_HEADER, AMQPValue::Boolean(true));
    }
    let out = Output {
        exchange: dlx.clone(),
        routing_key: d.routing_key.clone(),
        body: d.body.clone(),
        properties: props,
    };
    match publish_retrying(shared, out).await {
        Ok(()) => Ok(true),
        Err(PublishFailure::Unroutable(e)) => {
            warn!(stage = %d.stage, error = %e, "dead-letter exchange has no queue; rejecting instead");
            Ok(false)
        }
        Err(PublishFailure::Draining) => Err(()),
    }
}

#[cfg(test)]
mod tests {
    use super::truncate;

    #[test]
    fn truncation_respects_char_boundaries() {
        let s = "é".repeat(10);
        let t = truncate(s, 5);
        assert!(t.len() <= 5 + '…'.len_utf8());
        assert!(t.starts_with("éé"));
        assert_eq!(truncate("short".into(), 10), "short");
    }
}
