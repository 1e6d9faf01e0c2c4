//! One typed event per thing that happens to a message in a stage or in
//! dedup. Each event's [`emit`](Event::emit) writes its `tracing` line and
//! bumps its counter with the same labels, so a call site is one line and a
//! label value is written in one place (an enum, never free text).
//!
//! The publisher's and the connection's counters are still bumped where
//! they happen (their own modules); the collectors all live in
//! [`crate::metrics`].

use crate::envelope::Reason;
use crate::metrics::Metrics;
use tracing::{debug, info, warn};

/// Something that happened, with what it needs for its log line and metric.
pub trait Event {
    /// Writes the log line and bumps the metric.
    fn emit(self, metrics: &Metrics);
}

/// A stage took a delivery from its queue.
pub struct Consumed<'a> {
    /// The stage.
    pub stage: &'a str,
}

impl Event for Consumed<'_> {
    fn emit(self, m: &Metrics) {
        m.consumed.with_label_values(&[self.stage]).inc();
    }
}

/// A delivery was acked (after its outputs were confirmed).
pub struct Acked<'a> {
    /// The stage.
    pub stage: &'a str,
}

impl Event for Acked<'_> {
    fn emit(self, m: &Metrics) {
        m.acked.with_label_values(&[self.stage]).inc();
    }
}

/// An ack, reject or nack could not be sent: the broker will redeliver.
pub struct AckFailed<'a> {
    /// The stage.
    pub stage: &'a str,
    /// Why (the channel closed, an I/O error).
    pub error: &'a dyn std::fmt::Display,
}

impl Event for AckFailed<'_> {
    fn emit(self, m: &Metrics) {
        m.ack_failures.with_label_values(&[self.stage]).inc();
        debug!(stage = self.stage, error = %self.error, "ack not sent; the broker will redeliver");
    }
}

/// A delivery was dead-lettered (published to the stage's DLX, or rejected
/// when there is none).
pub struct DeadLettered<'a> {
    /// The stage.
    pub stage: &'a str,
    /// Why: the metric label.
    pub reason: Reason,
    /// The detail that goes to the log (and the `x-flowgate-error` header).
    pub error: &'a str,
}

impl Event for DeadLettered<'_> {
    fn emit(self, m: &Metrics) {
        m.dead_lettered
            .with_label_values(&[self.stage, self.reason.as_str()])
            .inc();
        match self.reason {
            // The handler asked for it: the message's fate, not the engine's news.
            Reason::Handler | Reason::HandlerError | Reason::MaxAttempts => {
                debug!(stage = self.stage, reason = %self.reason, error = self.error, "dead-lettered")
            }
            _ => {
                warn!(stage = self.stage, reason = %self.reason, error = self.error, "dead-lettered")
            }
        }
    }
}

/// A delivery's signature was missing or wrong.
pub struct SignatureFailed<'a> {
    /// The stage.
    pub stage: &'a str,
    /// Why.
    pub error: &'a dyn std::fmt::Display,
    /// True when the stage processes it anyway (`verify = "warn"`).
    pub processed_anyway: bool,
}

impl Event for SignatureFailed<'_> {
    fn emit(self, m: &Metrics) {
        m.signature_failures.with_label_values(&[self.stage]).inc();
        if self.processed_anyway {
            warn!(stage = self.stage, error = %self.error, "bad signature; processing anyway (verify = \"warn\")");
        }
    }
}

/// A copy of a failed delivery went to a retry tier.
pub struct Retried<'a> {
    /// The stage.
    pub stage: &'a str,
    /// The tier queue.
    pub tier: &'a str,
    /// The attempt that failed.
    pub attempt: u32,
}

impl Event for Retried<'_> {
    fn emit(self, m: &Metrics) {
        m.retried.with_label_values(&[self.stage, self.tier]).inc();
        debug!(
            stage = self.stage,
            attempt = self.attempt,
            tier = self.tier,
            "retry scheduled"
        );
    }
}

/// A stage's publish failed transiently and will be retried.
pub struct PublishRetried<'a> {
    /// The stage.
    pub stage: &'a str,
    /// Why it failed.
    pub error: &'a dyn std::fmt::Display,
}

impl Event for PublishRetried<'_> {
    fn emit(self, m: &Metrics) {
        m.publish_retries.with_label_values(&[self.stage]).inc();
        debug!(stage = self.stage, error = %self.error, "publish failed; retrying");
    }
}

/// A handler ran; its duration is observed.
pub struct Handled<'a> {
    /// The stage.
    pub stage: &'a str,
    /// How long it ran.
    pub elapsed: std::time::Duration,
}

impl Event for Handled<'_> {
    fn emit(self, m: &Metrics) {
        m.handler_duration
            .with_label_values(&[self.stage])
            .observe(self.elapsed.as_secs_f64());
    }
}

/// A delivery's dedup key was already done: acked without handling.
pub struct DedupHit<'a> {
    /// The stage.
    pub stage: &'a str,
    /// The key.
    pub key: &'a str,
}

impl Event for DedupHit<'_> {
    fn emit(self, m: &Metrics) {
        m.dedup_hits.with_label_values(&[self.stage]).inc();
        debug!(
            stage = self.stage,
            key = self.key,
            "already processed; acking without handling"
        );
    }
}

/// A commit came after the claim's lease had expired.
pub struct DedupLeaseLost<'a> {
    /// The stage.
    pub stage: &'a str,
    /// The key.
    pub key: &'a str,
}

impl Event for DedupLeaseLost<'_> {
    fn emit(self, m: &Metrics) {
        m.dedup_lease_lost.with_label_values(&[self.stage]).inc();
        warn!(
            stage = self.stage,
            key = self.key,
            "handling outlasted the dedup lease; a duplicate effect is possible (raise dedup.lease)"
        );
    }
}

/// A dedup store call failed: the stage waits for the store.
pub struct DedupStoreFailed<'a> {
    /// The stage.
    pub stage: &'a str,
    /// Which call (`claim`, `commit`, `release`).
    pub call: &'static str,
    /// Why.
    pub error: &'a dyn std::fmt::Display,
}

impl Event for DedupStoreFailed<'_> {
    fn emit(self, m: &Metrics) {
        m.dedup_errors.with_label_values(&[self.stage]).inc();
        debug!(stage = self.stage, error = %self.error, what = self.call, "dedup store call failed; waiting for the store");
    }
}

/// A dedup backend's availability changed (or is first reported, up).
pub struct DedupAvailability<'a> {
    /// The backend (`memory`, `redis`).
    pub backend: &'a str,
    /// True: it answers again; false: stages wait for it.
    pub up: bool,
    /// Why it is down.
    pub error: Option<&'a dyn std::fmt::Display>,
}

impl Event for DedupAvailability<'_> {
    fn emit(self, m: &Metrics) {
        m.dedup_up
            .with_label_values(&[self.backend])
            .set(i64::from(self.up));
        match (self.up, self.error) {
            (true, _) => info!(
                backend = self.backend,
                "dedup store answers again: resuming"
            ),
            (false, Some(e)) => {
                warn!(backend = self.backend, error = %e, "dedup store unavailable: stages wait (fail closed)")
            }
            (false, None) => warn!(
                backend = self.backend,
                "dedup store unavailable: stages wait (fail closed)"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_lettered_counts_with_the_reason_label() {
        let m = Metrics::new();
        for r in Reason::ALL {
            DeadLettered {
                stage: "s",
                reason: r,
                error: "e",
            }
            .emit(&m);
        }
        for r in Reason::ALL {
            assert_eq!(
                m.dead_lettered.with_label_values(&["s", r.as_str()]).get(),
                1
            );
        }
    }
}
