//! Prometheus collectors shared by every actor.
//!
//! One [`Metrics`] value per engine, registered on its own [`Registry`] so
//! several engines (tests, embedded hosts) can live in one process.

use prometheus::{
    Gauge, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};
use std::sync::Arc;

/// All of flowgate's collectors. Cheap to clone.
#[derive(Clone)]
pub struct Metrics(Arc<Inner>);

/// The collectors themselves; see the README's metrics table.
pub struct Inner {
    /// The registry everything below is registered on; `/metrics` gathers it.
    pub registry: Registry,
    /// Deliveries taken from a stage's queue.
    pub consumed: IntCounterVec,
    /// Deliveries acked after their outputs were confirmed.
    pub acked: IntCounterVec,
    /// Deliveries dead-lettered, by reason.
    pub dead_lettered: IntCounterVec,
    /// Deliveries whose HMAC signature was missing or wrong (dead-lettered
    /// with `verify = "reject"`, processed anyway with `"warn"`).
    pub signature_failures: IntCounterVec,
    /// Acks or rejects the broker connection refused (the message will be redelivered).
    pub ack_failures: IntCounterVec,
    /// Publish attempts by result (confirmed, nacked, returned, ...).
    pub publish: IntCounterVec,
    /// Publishes retried by a stage after a failure.
    pub publish_retries: IntCounterVec,
    /// Deliveries holding a credit in a stage right now.
    pub in_flight: IntGaugeVec,
    /// Handler run time.
    pub handler_duration: HistogramVec,
    /// Actor restarts by actor.
    pub restarts: IntCounterVec,
    /// 1 while both broker connections are up.
    pub connection_up: IntGauge,
    /// Connection (re)establishments after the first, by connection.
    pub reconnects: IntCounterVec,
    /// 1 while the broker blocks the publishing connection (memory/disk alarm).
    pub broker_blocked: IntGauge,
    /// Unconfirmed publishes in the window right now.
    pub unconfirmed: IntGauge,
    /// Process start time, for uptime.
    pub start_time: Gauge,
    /// Escalations: an actor exhausted its restart budget.
    pub escalations: IntCounter,
    /// Deliveries sent to a retry tier, by stage and tier queue.
    pub retried: IntCounterVec,
    /// Deliveries acked without handling because their key was already done.
    pub dedup_hits: IntCounterVec,
    /// Dedup store calls that failed (the stage waits for the store).
    pub dedup_errors: IntCounterVec,
    /// Commits refused because the lease had expired during handling (the
    /// effect may happen twice: raise `dedup.lease`).
    pub dedup_lease_lost: IntCounterVec,
    /// 1 while a dedup backend answers, 0 while stages wait for it.
    pub dedup_up: IntGaugeVec,
    /// Publisher circuit breaker: 0 closed, 1 open, 2 half-open.
    pub breaker_state: IntGauge,
    /// Breaker state changes, by the state entered (`to`).
    pub breaker_transitions: IntCounterVec,
    /// Records in the durable spool right now.
    pub spool_messages: IntGauge,
    /// Encoded bytes in the durable spool right now (what counts against `max_bytes`).
    pub spool_bytes: IntGauge,
    /// Spooled records replayed to the broker and confirmed.
    pub spool_replayed: IntCounter,
    /// Spooled records removed without delivery, by reason (unroutable on replay).
    pub spool_dropped: IntCounterVec,
    /// Spooled records that did not decode, moved to the spool's quarantine table.
    pub spool_quarantined: IntCounter,
    /// Callers waiting to publish (for a token, an unblock, or window room).
    pub publish_waiters: IntGauge,
    /// Ready messages per watched queue (passive `queue.declare`).
    pub queue_depth: IntGaugeVec,
    /// Consumers per watched queue.
    pub queue_consumers: IntGaugeVec,
    /// 1 while a stage's intake is paused, by cause (`watermark`, ...).
    pub stage_paused: IntGaugeVec,
    /// Handler workers a stage runs right now (autoscaling target).
    pub stage_workers: IntGaugeVec,
    /// Autoscaling decisions, by stage and direction (`up`, `down`).
    pub stage_scaling: IntCounterVec,
    /// Ingress requests refused (503) because a queue they route to is
    /// above its watermark or its headroom is spent, by queue.
    pub ingress_refused: IntCounterVec,
}

impl std::ops::Deref for Metrics {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    // Names and label sets below are static and distinct, so creation and
    // registration on a fresh registry cannot fail.
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("static metric definition");
    r.register(Box::new(c.clone())).expect("unique metric name");
    c
}

fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("static metric definition");
    r.register(Box::new(g.clone())).expect("unique metric name");
    g
}

fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("static metric definition");
    r.register(Box::new(g.clone())).expect("unique metric name");
    g
}

impl Metrics {
    /// Creates and registers every collector on a new registry.
    pub fn new() -> Self {
        let r = Registry::new();
        let handler_duration = HistogramVec::new(
            HistogramOpts::new(
                "flowgate_handler_duration_seconds",
                "Time spent in a stage's handler per delivery",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0,
            ]),
            &["stage"],
        )
        .expect("static metric definition");
        r.register(Box::new(handler_duration.clone()))
            .expect("unique metric name");
        let start_time = Gauge::new(
            "flowgate_process_start_time_seconds",
            "Start time of the engine since the unix epoch",
        )
        .expect("static metric definition");
        r.register(Box::new(start_time.clone()))
            .expect("unique metric name");
        start_time.set(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0),
        );
        let escalations = IntCounter::new(
            "flowgate_actor_escalations_total",
            "Actors that exhausted their restart budget",
        )
        .expect("static metric definition");
        r.register(Box::new(escalations.clone()))
            .expect("unique metric name");
        Metrics(Arc::new(Inner {
            consumed: counter_vec(
                &r,
                "flowgate_messages_consumed_total",
                "Deliveries taken from a stage's queue",
                &["stage"],
            ),
            acked: counter_vec(
                &r,
                "flowgate_messages_acked_total",
                "Deliveries acked after their outputs were confirmed",
                &["stage"],
            ),
            dead_lettered: counter_vec(
                &r,
                "flowgate_messages_dead_lettered_total",
                "Deliveries dead-lettered, by reason",
                &["stage", "reason"],
            ),
            signature_failures: counter_vec(
                &r,
                "flowgate_signature_failures_total",
                "Deliveries whose HMAC signature was missing or wrong",
                &["stage"],
            ),
            ack_failures: counter_vec(
                &r,
                "flowgate_ack_failures_total",
                "Acks/rejects that failed on the channel (the broker redelivers)",
                &["stage"],
            ),
            publish: counter_vec(
                &r,
                "flowgate_publish_total",
                "Publish attempts by result",
                &["result"],
            ),
            publish_retries: counter_vec(
                &r,
                "flowgate_publish_retries_total",
                "Output publishes a stage retried after a failure",
                &["stage"],
            ),
            in_flight: gauge_vec(
                &r,
                "flowgate_stage_in_flight",
                "Deliveries holding a credit in a stage",
                &["stage"],
            ),
            handler_duration,
            restarts: counter_vec(
                &r,
                "flowgate_actor_restarts_total",
                "Actor restarts by actor",
                &["actor"],
            ),
            connection_up: gauge(
                &r,
                "flowgate_connection_up",
                "1 while both broker connections are up",
            ),
            reconnects: counter_vec(
                &r,
                "flowgate_reconnects_total",
                "Broker connection re-establishments, by connection",
                &["connection"],
            ),
            broker_blocked: gauge(
                &r,
                "flowgate_broker_blocked",
                "1 while the broker blocks publishing (resource alarm)",
            ),
            unconfirmed: gauge(
                &r,
                "flowgate_publish_unconfirmed",
                "Publishes awaiting a broker confirm",
            ),
            breaker_state: gauge(
                &r,
                "flowgate_breaker_state",
                "Publisher circuit breaker state: 0 closed, 1 open, 2 half-open",
            ),
            breaker_transitions: counter_vec(
                &r,
                "flowgate_breaker_transitions_total",
                "Publisher circuit breaker state changes, by state entered",
                &["to"],
            ),
            spool_messages: gauge(
                &r,
                "flowgate_spool_messages",
                "Records in the durable publish spool",
            ),
            spool_bytes: gauge(
                &r,
                "flowgate_spool_bytes",
                "Encoded bytes in the durable publish spool",
            ),
            spool_replayed: {
                let c = IntCounter::new(
                    "flowgate_spool_replayed_total",
                    "Spooled records replayed to the broker and confirmed",
                )
                .expect("static metric definition");
                r.register(Box::new(c.clone())).expect("unique metric name");
                c
            },
            spool_quarantined: {
                let c = IntCounter::new(
                    "flowgate_spool_quarantined_total",
                    "Spooled records that did not decode, moved to the spool's quarantine table",
                )
                .expect("static metric definition");
                r.register(Box::new(c.clone())).expect("unique metric name");
                c
            },
            spool_dropped: counter_vec(
                &r,
                "flowgate_spool_dropped_total",
                "Spooled records removed without delivery, by reason",
                &["reason"],
            ),
            publish_waiters: gauge(
                &r,
                "flowgate_publish_waiters",
                "Callers waiting to publish (token, unblock, window room)",
            ),
            queue_depth: gauge_vec(
                &r,
                "flowgate_queue_depth",
                "Ready messages per watched queue",
                &["queue"],
            ),
            queue_consumers: gauge_vec(
                &r,
                "flowgate_queue_consumers",
                "Consumers per watched queue",
                &["queue"],
            ),
            stage_paused: gauge_vec(
                &r,
                "flowgate_stage_paused",
                "1 while a stage's intake is paused, by cause",
                &["stage", "cause"],
            ),
            stage_workers: gauge_vec(
                &r,
                "flowgate_stage_workers",
                "Handler workers a stage runs",
                &["stage"],
            ),
            stage_scaling: counter_vec(
                &r,
                "flowgate_stage_scaling_total",
                "Autoscaling decisions by stage and direction",
                &["stage", "direction"],
            ),
            ingress_refused: counter_vec(
                &r,
                "flowgate_ingress_refused_total",
                "Ingress requests refused by a queue watermark, by queue",
                &["queue"],
            ),
            start_time,
            escalations,
            retried: counter_vec(
                &r,
                "flowgate_retries_total",
                "Deliveries republished to a retry tier",
                &["stage", "tier"],
            ),
            dedup_hits: counter_vec(
                &r,
                "flowgate_dedup_hits_total",
                "Deliveries acked without handling: already processed",
                &["stage"],
            ),
            dedup_errors: counter_vec(
                &r,
                "flowgate_dedup_errors_total",
                "Dedup store calls that failed (the stage pauses)",
                &["stage"],
            ),
            dedup_lease_lost: counter_vec(
                &r,
                "flowgate_dedup_lease_lost_total",
                "Commits after the claim's lease had expired",
                &["stage"],
            ),
            dedup_up: gauge_vec(
                &r,
                "flowgate_dedup_up",
                "1 while the dedup backend answers",
                &["backend"],
            ),
            registry: r,
        }))
    }

    /// Renders every collector in the Prometheus text format.
    pub fn render(&self) -> String {
        use prometheus::Encoder;
        let mut buf = Vec::new();
        let enc = prometheus::TextEncoder::new();
        if let Err(e) = enc.encode(&self.registry.gather(), &mut buf) {
            tracing::warn!(error = %e, "metrics encoding failed");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}
