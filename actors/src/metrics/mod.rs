//! Prometheus collectors shared by every actor.
//!
//! One [`Metrics`] value per engine, registered on its own [`Registry`] so
//! several engines (tests, embedded hosts) can live in one process.
//!
//! Every metric is declared once, in the `metrics!` table below: its name,
//! type, labels and help. That declaration registers the collector, is
//! listed by [`Metrics::describe`] and becomes the README's metrics table
//! ([`Metrics::readme_table`]). The collectors are private: the runtime
//! bumps them only through the typed [`events`]; hosts and tests read them
//! with [`Metrics::counter`], [`Metrics::gauge`] or the rendered text.

pub(crate) mod events;

use crate::envelope::Reason;
use events::{ActorKind, BreakerState, PauseCause, PublishResult, ScaleDirection, WatermarkLevel};
use prometheus::{
    core::Collector, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry,
};
use std::sync::Arc;

/// All of flowgate's collectors. Cheap to clone.
#[derive(Clone)]
pub struct Metrics(Arc<Inner>);

/// What kind of collector a metric is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up.
    Counter,
    /// Goes up and down.
    Gauge,
    /// Observations in buckets.
    Histogram,
}

impl Kind {
    /// The Prometheus type name (`counter`, `gauge`, `histogram`).
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// One metric's declaration: what `/metrics` serves and the README lists.
#[derive(Clone, Copy, Debug)]
pub struct MetricDesc {
    /// The metric name (`flowgate_…`).
    pub name: &'static str,
    /// Counter, gauge or histogram.
    pub kind: Kind,
    /// Label names, in the order values are given.
    pub labels: &'static [&'static str],
    /// The help text (Prometheus `# HELP`, the README's meaning column).
    pub help: &'static str,
}

/// Buckets of every histogram, in seconds: from a fast handler or a local
/// confirm (0.5 ms) to a message that waited in a backlog (5 min).
const LATENCY_BUCKETS: [f64; 18] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0, 300.0,
];

/// A collector type that can be made from a [`MetricDesc`].
trait Collect: Collector + Clone + Sized + 'static {
    const KIND: Kind;
    fn make(d: &MetricDesc) -> prometheus::Result<Self>;
}

impl Collect for IntCounterVec {
    const KIND: Kind = Kind::Counter;
    fn make(d: &MetricDesc) -> prometheus::Result<Self> {
        IntCounterVec::new(Opts::new(d.name, d.help), d.labels)
    }
}

impl Collect for IntCounter {
    const KIND: Kind = Kind::Counter;
    fn make(d: &MetricDesc) -> prometheus::Result<Self> {
        IntCounter::new(d.name, d.help)
    }
}

impl Collect for IntGaugeVec {
    const KIND: Kind = Kind::Gauge;
    fn make(d: &MetricDesc) -> prometheus::Result<Self> {
        IntGaugeVec::new(Opts::new(d.name, d.help), d.labels)
    }
}

impl Collect for IntGauge {
    const KIND: Kind = Kind::Gauge;
    fn make(d: &MetricDesc) -> prometheus::Result<Self> {
        IntGauge::new(d.name, d.help)
    }
}

impl Collect for Gauge {
    const KIND: Kind = Kind::Gauge;
    fn make(d: &MetricDesc) -> prometheus::Result<Self> {
        Gauge::new(d.name, d.help)
    }
}

impl Collect for HistogramVec {
    const KIND: Kind = Kind::Histogram;
    fn make(d: &MetricDesc) -> prometheus::Result<Self> {
        HistogramVec::new(
            HistogramOpts::new(d.name, d.help).buckets(LATENCY_BUCKETS.to_vec()),
            d.labels,
        )
    }
}

impl Collect for Histogram {
    const KIND: Kind = Kind::Histogram;
    fn make(d: &MetricDesc) -> prometheus::Result<Self> {
        Histogram::with_opts(HistogramOpts::new(d.name, d.help).buckets(LATENCY_BUCKETS.to_vec()))
    }
}

fn register<C: Collect>(r: &Registry, d: &MetricDesc) -> C {
    // Every declaration below is static, its label names valid and its name
    // distinct (the unit tests build one), so creating and registering it on
    // a fresh registry cannot fail.
    let c = C::make(d).expect("static metric definition");
    r.register(Box::new(c.clone())).expect("unique metric name");
    c
}

/// Declares every metric once: the private collector field, the public
/// [`MetricDesc`] constant, [`Metrics::describe`] and the registration.
macro_rules! metrics {
    ($(
        $(#[$doc:meta])*
        $field:ident: $ty:ty = $konst:ident($name:literal, [$($label:literal),*], $help:literal);
    )*) => {
        struct Inner {
            registry: Registry,
            $( $field: $ty, )*
        }

        impl Metrics {
            $(
                $(#[$doc])*
                pub const $konst: MetricDesc = MetricDesc {
                    name: $name,
                    kind: <$ty as Collect>::KIND,
                    labels: &[$($label),*],
                    help: $help,
                };
            )*

            /// Every metric flowgate registers, in the README's order.
            pub fn describe() -> &'static [MetricDesc] {
                &[$(Self::$konst),*]
            }

            fn build() -> Inner {
                let registry = Registry::new();
                Inner {
                    $( $field: register::<$ty>(&registry, &Self::$konst), )*
                    registry,
                }
            }
        }
    };
}

metrics! {
    /// Deliveries taken from a stage's queue.
    consumed: IntCounterVec = CONSUMED("flowgate_messages_consumed_total", ["stage"],
        "deliveries taken from the stage's queue");
    /// Deliveries acked after their outputs were confirmed.
    acked: IntCounterVec = ACKED("flowgate_messages_acked_total", ["stage"],
        "deliveries acked after their outputs were confirmed");
    /// `basic.ack` frames sent (one per delivery, or one per batch).
    ack_frames: IntCounterVec = ACK_FRAMES("flowgate_ack_frames_total", ["stage"],
        "`basic.ack` frames sent: one per batch of acked deliveries (`ack_batch`, on by default), one per delivery with it off");
    /// Deliveries dead-lettered, by reason.
    dead_lettered: IntCounterVec = DEAD_LETTERED("flowgate_messages_dead_lettered_total", ["stage", "reason"],
        "deliveries dead-lettered (`handler` is a handler's own reason, which goes to the `x-flowgate-reason` header; the publisher counts unroutable returns as stage `publisher`)");
    /// Deliveries whose HMAC signature was missing or wrong.
    signature_failures: IntCounterVec = SIGNATURE_FAILURES("flowgate_signature_failures_total", ["stage"],
        "deliveries whose HMAC signature was missing or wrong (dead-lettered with `verify = \"reject\"`, processed with `\"warn\"`)");
    /// Acks or rejects the channel refused (the message will be redelivered).
    ack_failures: IntCounterVec = ACK_FAILURES("flowgate_ack_failures_total", ["stage"],
        "acks the channel refused (the broker redelivers; dedup catches it)");
    /// Deliveries sent to a retry tier, by stage and tier queue.
    retried: IntCounterVec = RETRIED("flowgate_retries_total", ["stage", "tier"],
        "deliveries sent to a retry tier (`in-place`: retried in its key's lane on a stage with `order_by`)");
    /// 1 while a stage's consumer is the active one of its queue.
    consumer_active: IntGaugeVec = CONSUMER_ACTIVE("flowgate_consumer_active", ["stage"],
        "stages on a `single_active_consumer` queue: 1 once deliveries arrive on this instance's consumer (the active one), 0 while it is a standby (subscribed, nothing delivered since)");
    /// Deliveries that queued behind an earlier one of their key.
    lane_waits: IntCounterVec = LANE_WAITS("flowgate_lane_waits_total", ["stage"],
        "deliveries of a stage with `order_by` that waited behind an earlier delivery of their key (holding their credit)");
    /// Publish attempts by result.
    publish: IntCounterVec = PUBLISH("flowgate_publish_total", ["result"],
        "publishes by result");
    /// Publishes retried by a stage after a failure.
    publish_retries: IntCounterVec = PUBLISH_RETRIES("flowgate_publish_retries_total", ["stage"],
        "output publishes a stage retried (holding its credit)");
    /// Unconfirmed publishes in the window right now.
    unconfirmed: IntGauge = UNCONFIRMED("flowgate_publish_unconfirmed", [],
        "publishes awaiting a confirm");
    /// Callers waiting to publish (for a token, an unblock, or window room).
    publish_waiters: IntGauge = PUBLISH_WAITERS("flowgate_publish_waiters", [],
        "callers waiting for a token, an unblock or window room");
    /// Publisher circuit breaker: 1 for its current state, 0 for the others.
    breaker_state: IntGaugeVec = BREAKER_STATE("flowgate_breaker_state", ["state"],
        "publish circuit breaker: 1 for the current state, 0 for the others");
    /// Round trip of a live publish: `basic.publish` to the broker's confirm.
    confirm_latency: Histogram = CONFIRM_LATENCY("flowgate_publish_confirm_seconds", [],
        "live publishes: from `basic.publish` to the broker's confirm (or nack, or return)");
    /// Breaker state changes, by the state entered (`to`).
    breaker_transitions: IntCounterVec = BREAKER_TRANSITIONS("flowgate_breaker_transitions_total", ["to"],
        "breaker state changes, by the state entered");
    /// Records in the durable spool right now.
    spool_messages: IntGauge = SPOOL_MESSAGES("flowgate_spool_messages", [],
        "records in the durable spool");
    /// Encoded bytes in the durable spool right now.
    spool_bytes: IntGauge = SPOOL_BYTES("flowgate_spool_bytes", [],
        "encoded bytes in the spool (what counts against `max_bytes`)");
    /// Spooled records replayed to the broker and confirmed.
    spool_replayed: IntCounter = SPOOL_REPLAYED("flowgate_spool_replayed_total", [],
        "spooled records replayed and confirmed");
    /// Spooled copies deleted unreplayed because their original publish was
    /// confirmed late.
    spool_superseded: IntCounter = SPOOL_SUPERSEDED("flowgate_spool_superseded_total", [],
        "copies spooled at a caller's deadline (the ingress) and deleted unreplayed because the publish they stood in for was confirmed late");
    /// Spooled records removed without delivery, by reason.
    spool_dropped: IntCounterVec = SPOOL_DROPPED("flowgate_spool_dropped_total", ["reason"],
        "spooled or returned records removed undelivered (unroutable, and the unroutable queue refused them)");
    /// Spooled records that did not decode, moved to the quarantine table.
    spool_quarantined: IntCounter = SPOOL_QUARANTINED("flowgate_spool_quarantined_total", [],
        "spooled records that did not decode, moved to the spool file's `quarantine` table (kept, logged once; replay goes on)");
    /// Deliveries holding a credit in a stage right now.
    in_flight: IntGaugeVec = IN_FLIGHT("flowgate_stage_in_flight", ["stage"],
        "deliveries holding a credit");
    /// 1 while a stage's intake is paused, by cause.
    stage_paused: IntGaugeVec = STAGE_PAUSED("flowgate_stage_paused", ["stage", "cause"],
        "1 while intake is paused");
    /// A stage's prefetch: the most deliveries it holds (`in_flight`'s ceiling).
    stage_prefetch: IntGaugeVec = STAGE_PREFETCH("flowgate_stage_prefetch", ["stage"],
        "the stage's prefetch: the ceiling of `flowgate_stage_in_flight`");
    /// Handler workers a stage runs right now.
    stage_workers: IntGaugeVec = STAGE_WORKERS("flowgate_stage_workers", ["stage"],
        "handler workers (autoscaled between `min` and `max`)");
    /// Autoscaling decisions, by stage and direction.
    stage_scaling: IntCounterVec = STAGE_SCALING("flowgate_stage_scaling_total", ["stage", "direction"],
        "autoscaling decisions");
    /// Ingress requests refused by a queue watermark, by queue.
    ingress_refused: IntCounterVec = INGRESS_REFUSED("flowgate_ingress_refused_total", ["queue"],
        "ingress requests answered 503 because the queue they route to is above its watermark (or its room below `high` is spent until the next sample)");
    /// Handler run time.
    handler_duration: HistogramVec = HANDLER_DURATION("flowgate_handler_duration_seconds", ["stage"],
        "handler run time");
    /// First publish to this stage taking the message.
    end_to_end: HistogramVec = END_TO_END("flowgate_end_to_end_seconds", ["stage"],
        "from the message's first publish (its `x-flowgate-first-published` stamp, in ms since the epoch: set by the ingress and the host's `publish`, or by a producer; carried by forwards) to this stage taking it");
    /// Ready messages per watched queue.
    queue_depth: IntGaugeVec = QUEUE_DEPTH("flowgate_queue_depth", ["queue"],
        "ready messages per watched queue (what an HPA/KEDA autoscaler scrapes)");
    /// A watched queue's watermarks.
    queue_watermark: IntGaugeVec = QUEUE_WATERMARK("flowgate_queue_watermark", ["queue", "level"],
        "a watched queue's watermarks: feeding stages pause at `high` and resume at `low`");
    /// Consumers per watched queue.
    queue_consumers: IntGaugeVec = QUEUE_CONSUMERS("flowgate_queue_consumers", ["queue"],
        "consumers per watched queue");
    /// Deliveries acked without handling because their key was already done.
    dedup_hits: IntCounterVec = DEDUP_HITS("flowgate_dedup_hits_total", ["stage"],
        "deliveries acked without handling: already processed");
    /// Redeliveries an inbox stage recognised as committed (no handler call).
    inbox_hits: IntCounterVec = INBOX_HITS("flowgate_inbox_hits_total", ["stage"],
        "deliveries of an inbox stage whose message id was committed in the PostgreSQL inbox already: acked without calling the handler (repeats absorbed)");
    /// Rows in the outbox table.
    outbox_depth: IntGauge = OUTBOX_DEPTH("flowgate_outbox_depth", [],
        "rows waiting in the PostgreSQL outbox (sampled by the relay)");
    /// Age of the oldest outbox row.
    outbox_age: Gauge = OUTBOX_AGE("flowgate_outbox_oldest_age_seconds", [],
        "age of the oldest row waiting in the PostgreSQL outbox (sampled by the relay; 0 when empty)");
    /// Outbox rows published (confirmed or spooled) and deleted.
    outbox_relayed: IntCounter = OUTBOX_RELAYED("flowgate_outbox_relayed_total", [],
        "outbox rows this engine published (confirmed, or durable in the spool) and deleted");
    /// From an outbox row's commit to its confirmed publish.
    outbox_relay_lag: Histogram = OUTBOX_RELAY_LAG("flowgate_outbox_relay_lag_seconds", [],
        "from an outbox row's insert to its publish being confirmed (relay lag)");
    /// Relay batches that failed (database or publish error): retried.
    outbox_relay_errors: IntCounter = OUTBOX_RELAY_ERRORS("flowgate_outbox_relay_errors_total", [],
        "relay batches that failed (database error, or a publish refused): their rows stay and are tried again");
    /// Dedup store calls that failed.
    dedup_errors: IntCounterVec = DEDUP_ERRORS("flowgate_dedup_errors_total", ["stage"],
        "dedup store calls that failed (the stage waits, fail-closed)");
    /// Commits refused because the lease had expired during handling.
    dedup_lease_lost: IntCounterVec = DEDUP_LEASE_LOST("flowgate_dedup_lease_lost_total", ["stage"],
        "commits after the claim's lease expired (raise `dedup.lease`)");
    /// Unexpired keys evicted to respect a dedup store's capacity.
    dedup_evictions: IntCounterVec = DEDUP_EVICTIONS("flowgate_dedup_evictions_total", ["backend"],
        "unexpired keys the memory store evicted to respect its `capacity` (a duplicate of one could be handled again: raise it)");
    /// 1 while a dedup backend answers.
    dedup_up: IntGaugeVec = DEDUP_UP("flowgate_dedup_up", ["backend"],
        "1 while the dedup backend answers");
    /// Actor restarts by actor kind and stage.
    restarts: IntCounterVec = RESTARTS("flowgate_actor_restarts_total", ["kind", "stage"],
        "supervisor restarts (`stage` is empty for the connection and the publisher)");
    /// Escalations: an actor exhausted its restart budget.
    escalations: IntCounter = ESCALATIONS("flowgate_actor_escalations_total", [],
        "actors that spent their restart budget");
    /// 1 while both broker connections are up.
    connection_up: IntGauge = CONNECTION_UP("flowgate_connection_up", [],
        "1 while both broker connections are up");
    /// Connection recoveries, by connection.
    reconnects: IntCounterVec = RECONNECTS("flowgate_reconnects_total", ["connection"],
        "recoveries of the `consume`/`publish` connection");
    /// 1 while the broker blocks the publishing connection.
    broker_blocked: IntGauge = BROKER_BLOCKED("flowgate_broker_blocked", [],
        "1 while the broker blocks publishing (memory/disk alarm)");
    /// Process start time, for uptime.
    start_time: Gauge = START_TIME("flowgate_process_start_time_seconds", [],
        "start time of the engine since the unix epoch");
    /// Always 1; the version in a label.
    build_info: IntGaugeVec = BUILD_INFO("flowgate_build_info", ["version"],
        "always 1: the engine's version as a label");
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every collector on a new registry.
    pub fn new() -> Self {
        let inner = Self::build();
        inner.start_time.set(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0),
        );
        let m = Metrics(Arc::new(inner));
        m.register_process_collector();
        events::preinitialise(&m);
        m
    }

    /// The standard `process_*` metrics of this process (CPU seconds,
    /// resident memory, open file descriptors, threads, ...), where the
    /// platform has them.
    #[cfg(target_os = "linux")]
    fn register_process_collector(&self) {
        let pc = prometheus::process_collector::ProcessCollector::for_self();
        if let Err(e) = self.0.registry.register(Box::new(pc)) {
            tracing::warn!(error = %e, "process metrics unavailable");
        }
    }

    #[cfg(not(target_os = "linux"))]
    fn register_process_collector(&self) {}

    /// The registry every collector is registered on (`/metrics` gathers it).
    pub fn registry(&self) -> &Registry {
        &self.0.registry
    }

    /// Renders every collector in the Prometheus text format.
    pub fn render(&self) -> String {
        use prometheus::Encoder;
        let mut buf = Vec::new();
        let enc = prometheus::TextEncoder::new();
        if let Err(e) = enc.encode(&self.0.registry.gather(), &mut buf) {
            tracing::warn!(error = %e, "metrics encoding failed");
        }
        String::from_utf8(buf).unwrap_or_default()
    }

    /// The current value of one series of a counter or gauge, with label
    /// values in [`MetricDesc::labels`] order; 0 for a series never touched.
    ///
    /// # Panics
    ///
    /// When `labels` does not have one value per label name of `metric`, or
    /// `metric` is a histogram: a caller's mistake, not a runtime state.
    pub fn value(&self, metric: MetricDesc, labels: &[&str]) -> f64 {
        assert_eq!(
            labels.len(),
            metric.labels.len(),
            "{} takes the labels {:?}",
            metric.name,
            metric.labels
        );
        assert!(
            metric.kind != Kind::Histogram,
            "{} is a histogram",
            metric.name
        );
        let families = self.0.registry.gather();
        let Some(family) = families.iter().find(|f| f.name() == metric.name) else {
            return 0.0;
        };
        family
            .get_metric()
            .iter()
            .find(|m| {
                metric.labels.iter().zip(labels).all(|(name, value)| {
                    m.get_label()
                        .iter()
                        .any(|p| p.name() == *name && p.value() == *value)
                })
            })
            .map(|m| match metric.kind {
                Kind::Counter => m.get_counter().get_value(),
                _ => m.get_gauge().get_value(),
            })
            .unwrap_or(0.0)
    }

    /// [`value`](Self::value) of a counter, as an integer.
    pub fn counter(&self, metric: MetricDesc, labels: &[&str]) -> u64 {
        self.value(metric, labels) as u64
    }

    /// [`value`](Self::value) of a gauge, as an integer.
    pub fn gauge(&self, metric: MetricDesc, labels: &[&str]) -> i64 {
        self.value(metric, labels) as i64
    }

    /// True while both broker connections are up (`flowgate_connection_up`).
    pub fn connected(&self) -> bool {
        self.0.connection_up.get() == 1
    }

    /// True while the broker blocks publishing (`flowgate_broker_blocked`).
    pub fn broker_blocked(&self) -> bool {
        self.0.broker_blocked.get() == 1
    }

    /// The README's metrics table (markdown), generated from
    /// [`describe`](Self::describe); label values that come from an enum are
    /// listed from it.
    pub fn readme_table() -> String {
        let mut out = String::from("| metric | type | labels | meaning |\n|---|---|---|---|\n");
        for d in Self::describe() {
            let labels: Vec<String> = d.labels.iter().map(|l| format!("`{l}`")).collect();
            let mut meaning = d.help.to_owned();
            for l in d.labels {
                if let Some(values) = label_values(d, l) {
                    let values: Vec<String> = values.iter().map(|v| format!("`{v}`")).collect();
                    meaning.push_str(&format!("; `{l}`: {}", values.join(", ")));
                }
            }
            out.push_str(&format!(
                "| `{}` | {} | {} | {} |\n",
                d.name,
                d.kind.as_str(),
                labels.join(", "),
                meaning
            ));
        }
        out.push_str(&format!(
            "| `process_*` | counter, gauge | | the standard process metrics on Linux: {} |\n",
            PROCESS_METRICS
                .iter()
                .map(|m| format!("`{m}`"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        out
    }
}

/// What the process collector serves (Linux), for the README.
pub(crate) const PROCESS_METRICS: [&str; 7] = [
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
    "process_virtual_memory_bytes",
    "process_open_fds",
    "process_max_fds",
    "process_threads",
    "process_start_time_seconds",
];

/// The values a label takes when an enum owns them.
fn label_values(metric: &MetricDesc, label: &str) -> Option<Vec<&'static str>> {
    Some(match label {
        // Only an unroutable record is ever dropped.
        "reason" if metric.name == Metrics::SPOOL_DROPPED.name => vec![Reason::Unroutable.as_str()],
        "reason" => Reason::ALL.iter().map(|r| r.as_str()).collect(),
        "result" => PublishResult::LABELS.to_vec(),
        "state" | "to" => BreakerState::ALL.iter().map(|s| s.as_str()).collect(),
        "kind" => ActorKind::ALL.iter().map(|k| k.as_str()).collect(),
        "cause" => PauseCause::ALL.iter().map(|c| c.as_str()).collect(),
        "direction" => ScaleDirection::ALL.iter().map(|d| d.as_str()).collect(),
        "level" => WatermarkLevel::ALL.iter().map(|l| l.as_str()).collect(),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn every_declared_metric_is_registered_once() {
        let m = Metrics::new();
        let names: BTreeSet<_> = Metrics::describe().iter().map(|d| d.name).collect();
        assert_eq!(
            names.len(),
            Metrics::describe().len(),
            "a name declared twice"
        );
        // Registering any declaration again fails: it is already there.
        for d in Metrics::describe() {
            let again = match d.kind {
                Kind::Histogram if d.labels.is_empty() => register_again::<Histogram>(&m, d),
                Kind::Histogram => register_again::<HistogramVec>(&m, d),
                Kind::Counter if d.labels.is_empty() => register_again::<IntCounter>(&m, d),
                Kind::Counter => register_again::<IntCounterVec>(&m, d),
                Kind::Gauge if d.labels.is_empty() => register_again::<IntGauge>(&m, d),
                Kind::Gauge => register_again::<IntGaugeVec>(&m, d),
            };
            assert!(again.is_err(), "{} is not registered", d.name);
        }
    }

    fn register_again<C: Collect>(m: &Metrics, d: &MetricDesc) -> prometheus::Result<()> {
        m.registry().register(Box::new(C::make(d)?))
    }

    #[test]
    fn value_reads_one_series_by_its_label_values() {
        let m = Metrics::new();
        m.0.dead_lettered
            .with_label_values(&["s", "malformed"])
            .inc();
        assert_eq!(m.counter(Metrics::DEAD_LETTERED, &["s", "malformed"]), 1);
        assert_eq!(m.counter(Metrics::DEAD_LETTERED, &["s", "oversized"]), 0);
        assert_eq!(m.counter(Metrics::DEAD_LETTERED, &["t", "malformed"]), 0);
        m.0.broker_blocked.set(1);
        assert_eq!(m.gauge(Metrics::BROKER_BLOCKED, &[]), 1);
        assert!(m.broker_blocked());
    }
}
