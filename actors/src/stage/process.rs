//! What happens to one delivery: handler, outputs, ack or dead letter.

use super::Shared;
use crate::credit::Credit;
use crate::error::Error;
use crate::message::{set_header, Delivery, Outcome, Output};
use crate::trace;
use futures::FutureExt;
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicRejectOptions};
use lapin::types::{AMQPValue, LongString};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{debug, warn};

/// Longest `x-flowgate-error` value; longer errors are truncated so a dead
/// letter stays far below the broker's frame and message size limits.
pub const MAX_ERROR_HEADER_BYTES: usize = 1024;

/// The headers every dead letter carries.
pub const DEAD_LETTER_HEADERS: [&str; 3] =
    ["x-flowgate-reason", "x-flowgate-stage", "x-flowgate-error"];

/// What to do with the input once the handler has spoken.
enum Disposition {
    Ack(Vec<Output>),
    DeadLetter { reason: String, error: String },
}

fn truncate(mut s: String, max: usize) -> String {
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

/// Processes one delivery; the credit is released when this returns.
pub(crate) async fn process(shared: Arc<Shared>, raw: lapin::message::Delivery, credit: Credit) {
    let _credit = CreditGuard {
        credit: Some(credit),
        shared: shared.clone(),
    };
    let stage = shared.spec.name.as_str();
    shared.metrics.consumed.with_label_values(&[stage]).inc();
    let acker = raw.acker;
    let delivery = Delivery {
        body: raw.data.into(),
        properties: raw.properties,
        redelivered: raw.redelivered,
        exchange: raw.exchange.to_string(),
        routing_key: raw.routing_key.to_string(),
        queue: shared.spec.queue.clone(),
        stage: shared.spec.name.clone(),
    };

    let disposition = {
        // A closed semaphore only happens at teardown; run anyway then.
        let _worker = shared.workers.clone().acquire_owned().await.ok();
        let started = Instant::now();
        let res = AssertUnwindSafe(shared.spec.handler.handle(&delivery))
            .catch_unwind()
            .await;
        shared
            .metrics
            .handler_duration
            .with_label_values(&[stage])
            .observe(started.elapsed().as_secs_f64());
        match res {
            Ok(Ok(Outcome::Ack { outputs })) => Disposition::Ack(outputs),
            Ok(Ok(Outcome::Retry { reason })) => Disposition::DeadLetter {
                error: reason.clone(),
                reason,
            },
            Ok(Ok(Outcome::DeadLetter { reason })) => Disposition::DeadLetter {
                error: reason.clone(),
                reason,
            },
            Ok(Err(e)) => Disposition::DeadLetter {
                reason: "handler-error".into(),
                error: e.to_string(),
            },
            Err(p) => {
                let msg = panic_message(p.as_ref());
                warn!(stage, error = %msg, "handler panicked; dead-lettering the message");
                Disposition::DeadLetter {
                    reason: "panic".into(),
                    error: msg,
                }
            }
        }
    };

    let parent_trace = trace::traceparent_of(&delivery.properties);
    let settled = match disposition {
        Disposition::Ack(outputs) => {
            let outputs = outputs.into_iter().map(|mut o| {
                if let Some(p) = &parent_trace {
                    if trace::traceparent_of(&o.properties).is_none() {
                        trace::set_traceparent(&mut o.properties, trace::child_of(p));
                    }
                }
                o
            });
            match publish_all(&shared, outputs.collect()).await {
                Ok(()) => Settle::Ack,
                Err(PublishFailure::Unroutable(e)) => Settle::DeadLetter {
                    reason: "unroutable".into(),
                    error: e,
                },
                Err(PublishFailure::Draining) => Settle::Requeue,
            }
        }
        Disposition::DeadLetter { reason, error } => Settle::DeadLetter { reason, error },
    };

    let settled = match settled {
        Settle::DeadLetter { reason, error } => {
            match dead_letter(&shared, &delivery, &reason, &error).await {
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
        Settle::Ack => {
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
    if let Err(e) = res {
        shared
            .metrics
            .ack_failures
            .with_label_values(&[stage])
            .inc();
        debug!(stage, error = %e, "ack failed; the broker will redeliver");
    }
}

enum Settle {
    Ack,
    Reject,
    Requeue,
    DeadLetter { reason: String, error: String },
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
async fn dead_letter(shared: &Shared, d: &Delivery, reason: &str, error: &str) -> Result<bool, ()> {
    let Some(dlx) = &shared.spec.dead_letter_exchange else {
        return Ok(false);
    };
    let mut props = d.properties.clone();
    let s = |v: &str| AMQPValue::LongString(LongString::from(v.to_owned()));
    set_header(&mut props, "x-flowgate-reason", s(reason));
    set_header(&mut props, "x-flowgate-stage", s(&d.stage));
    set_header(
        &mut props,
        "x-flowgate-error",
        s(&truncate(error.to_owned(), MAX_ERROR_HEADER_BYTES)),
    );
    set_header(&mut props, "x-flowgate-original-exchange", s(&d.exchange));
    set_header(
        &mut props,
        "x-flowgate-original-routing-key",
        s(&d.routing_key),
    );
    set_header(&mut props, "x-flowgate-queue", s(&d.queue));
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
