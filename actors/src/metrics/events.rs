//! One typed event per thing that happens: to a message in a stage or in
//! dedup, to a publish, to the broker link, to a supervised actor, to a
//! queue's depth or a stage's intake, to an ingress request. Each event's
//! [`emit`](Event::emit) writes its `tracing` line (if it has one) and bumps
//! or sets its metric, so a call site is one line and a label value is
//! written in one place (an enum such as [`Reason`], [`PublishResult`],
//! [`PauseCause`], [`ScaleDirection`], or another enum's `as_str`, never
//! free text).
//!
//! The collectors are private to [`crate::metrics`]; this module is the
//! only code that touches them.

use crate::envelope::Reason;
use crate::error::Error;
use crate::metrics::Metrics;
use std::fmt::Display;
use tracing::{debug, error, info, warn};

/// Something that happened, with what it needs for its log line and metric.
pub trait Event {
    /// Writes the log line and bumps the metric.
    fn emit(self, metrics: &Metrics);
}

/// A stage took a delivery from its queue.
pub(crate) struct Consumed<'a> {
    /// The stage.
    pub stage: &'a str,
    /// How long ago the message was first published, from its
    /// [`FIRST_PUBLISHED`](crate::envelope::FIRST_PUBLISHED) stamp (`None`:
    /// no stamp, or one in the future).
    pub since_first_publish: Option<std::time::Duration>,
}

impl Event for Consumed<'_> {
    fn emit(self, m: &Metrics) {
        m.0.consumed.with_label_values(&[self.stage]).inc();
        if let Some(d) = self.since_first_publish {
            m.0.end_to_end
                .with_label_values(&[self.stage])
                .observe(d.as_secs_f64());
        }
    }
}

/// On an ordered stage, a delivery queued behind an earlier one of its key
/// (holding its credit) instead of starting at once.
pub(crate) struct LaneWaited<'a> {
    /// The stage.
    pub stage: &'a str,
}

impl Event for LaneWaited<'_> {
    fn emit(self, m: &Metrics) {
        m.0.lane_waits.with_label_values(&[self.stage]).inc();
    }
}

/// On a single-active-consumer queue, a stage's consumer became the active
/// one (a delivery arrived) or a standby (it subscribed again).
pub(crate) struct ConsumerRoleChanged<'a> {
    /// The stage.
    pub stage: &'a str,
    /// Active (`true`) or standby.
    pub active: bool,
}

impl Event for ConsumerRoleChanged<'_> {
    fn emit(self, m: &Metrics) {
        m.0.consumer_active
            .with_label_values(&[self.stage])
            .set(i64::from(self.active));
        let role = if self.active { "active" } else { "standby" };
        info!(stage = self.stage, role, "single active consumer");
    }
}

/// One `basic.ack` frame went out (after the outputs of every delivery it
/// covers were confirmed): one delivery, or a batch (`multiple`).
pub(crate) struct Acked<'a> {
    /// The stage.
    pub stage: &'a str,
    /// Deliveries it acked.
    pub covered: usize,
}

impl Event for Acked<'_> {
    fn emit(self, m: &Metrics) {
        m.0.acked
            .with_label_values(&[self.stage])
            .inc_by(self.covered as u64);
        m.0.ack_frames.with_label_values(&[self.stage]).inc();
    }
}

/// A batched `basic.ack` was sent, or could not be: the broker will
/// redeliver what it covered.
pub(crate) struct AcksSent<'a> {
    /// The stage.
    pub stage: &'a str,
    /// Deliveries it covered.
    pub covered: usize,
    /// Why it was not sent.
    pub error: Option<&'a str>,
}

impl Event for AcksSent<'_> {
    fn emit(self, m: &Metrics) {
        match self.error {
            None => Acked {
                stage: self.stage,
                covered: self.covered,
            }
            .emit(m),
            Some(error) => {
                m.0.ack_failures
                    .with_label_values(&[self.stage])
                    .inc_by(self.covered as u64);
                debug!(
                    stage = self.stage,
                    covered = self.covered,
                    error,
                    "ack not sent; the broker will redeliver"
                );
            }
        }
    }
}

/// An ack, reject or nack could not be sent: the broker will redeliver.
pub(crate) struct AckFailed<'a> {
    /// The stage.
    pub stage: &'a str,
    /// Why (the channel closed, an I/O error).
    pub error: &'a dyn std::fmt::Display,
}

impl Event for AckFailed<'_> {
    fn emit(self, m: &Metrics) {
        m.0.ack_failures.with_label_values(&[self.stage]).inc();
        debug!(stage = self.stage, error = %self.error, "ack not sent; the broker will redeliver");
    }
}

/// A delivery was dead-lettered (published to the stage's DLX, or rejected
/// when there is none).
pub(crate) struct DeadLettered<'a> {
    /// The stage.
    pub stage: &'a str,
    /// Why: the metric label.
    pub reason: Reason,
    /// The detail that goes to the log (and the `x-flowgate-error` header).
    pub error: &'a str,
}

impl Event for DeadLettered<'_> {
    fn emit(self, m: &Metrics) {
        m.0.dead_lettered
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
pub(crate) struct SignatureFailed<'a> {
    /// The stage.
    pub stage: &'a str,
    /// Why.
    pub error: &'a dyn std::fmt::Display,
    /// True when the stage processes it anyway (`verify = "warn"`).
    pub processed_anyway: bool,
}

impl Event for SignatureFailed<'_> {
    fn emit(self, m: &Metrics) {
        m.0.signature_failures
            .with_label_values(&[self.stage])
            .inc();
        if self.processed_anyway {
            warn!(stage = self.stage, error = %self.error, "bad signature; processing anyway (verify = \"warn\")");
        }
    }
}

/// A copy of a failed delivery went to a retry tier.
pub(crate) struct Retried<'a> {
    /// The stage.
    pub stage: &'a str,
    /// The tier queue.
    pub tier: &'a str,
    /// The attempt that failed.
    pub attempt: u32,
}

impl Event for Retried<'_> {
    fn emit(self, m: &Metrics) {
        m.0.retried
            .with_label_values(&[self.stage, self.tier])
            .inc();
        debug!(
            stage = self.stage,
            attempt = self.attempt,
            tier = self.tier,
            "retry scheduled"
        );
    }
}

/// A stage's publish failed transiently and will be retried.
pub(crate) struct PublishRetried<'a> {
    /// The stage.
    pub stage: &'a str,
    /// Why it failed.
    pub error: &'a dyn std::fmt::Display,
}

impl Event for PublishRetried<'_> {
    fn emit(self, m: &Metrics) {
        m.0.publish_retries.with_label_values(&[self.stage]).inc();
        debug!(stage = self.stage, error = %self.error, "publish failed; retrying");
    }
}

/// A handler ran; its duration is observed.
pub(crate) struct Handled<'a> {
    /// The stage.
    pub stage: &'a str,
    /// How long it ran.
    pub elapsed: std::time::Duration,
}

impl Event for Handled<'_> {
    fn emit(self, m: &Metrics) {
        m.0.handler_duration
            .with_label_values(&[self.stage])
            .observe(self.elapsed.as_secs_f64());
    }
}

/// A batch handler returned the wrong number of results: the deliveries
/// without one are retried, extra results are ignored.
pub(crate) struct BatchMismatched<'a> {
    /// The stage.
    pub stage: &'a str,
    /// Deliveries in the batch.
    pub sent: usize,
    /// Results the handler returned.
    pub returned: usize,
}

impl Event for BatchMismatched<'_> {
    fn emit(self, _m: &Metrics) {
        warn!(
            stage = self.stage,
            sent = self.sent,
            returned = self.returned,
            "batch handler returned the wrong number of results; retrying the deliveries without one"
        );
    }
}

/// A delivery's dedup key was already done: acked without handling.
pub(crate) struct DedupHit<'a> {
    /// The stage.
    pub stage: &'a str,
    /// The key.
    pub key: &'a str,
}

impl Event for DedupHit<'_> {
    fn emit(self, m: &Metrics) {
        m.0.dedup_hits.with_label_values(&[self.stage]).inc();
        debug!(
            stage = self.stage,
            key = self.key,
            "already processed; acking without handling"
        );
    }
}

/// A commit came after the claim's lease had expired.
pub(crate) struct DedupLeaseLost<'a> {
    /// The stage.
    pub stage: &'a str,
    /// The key.
    pub key: &'a str,
}

impl Event for DedupLeaseLost<'_> {
    fn emit(self, m: &Metrics) {
        m.0.dedup_lease_lost.with_label_values(&[self.stage]).inc();
        warn!(
            stage = self.stage,
            key = self.key,
            "handling outlasted the dedup lease; a duplicate effect is possible (raise dedup.lease)"
        );
    }
}

/// A dedup store call failed: the stage waits for the store.
pub(crate) struct DedupStoreFailed<'a> {
    /// The stage.
    pub stage: &'a str,
    /// Which call (`claim`, `commit`, `release`).
    pub call: &'static str,
    /// Why.
    pub error: &'a dyn std::fmt::Display,
}

impl Event for DedupStoreFailed<'_> {
    fn emit(self, m: &Metrics) {
        m.0.dedup_errors.with_label_values(&[self.stage]).inc();
        debug!(stage = self.stage, error = %self.error, what = self.call, "dedup store call failed; waiting for the store");
    }
}

/// A dedup backend's availability changed (or is first reported, up).
pub(crate) struct DedupAvailability<'a> {
    /// The backend (`memory`, `redis`).
    pub backend: &'a str,
    /// True: it answers again; false: stages wait for it.
    pub up: bool,
    /// Why it is down.
    pub error: Option<&'a dyn std::fmt::Display>,
}

impl Event for DedupAvailability<'_> {
    fn emit(self, m: &Metrics) {
        m.0.dedup_up
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

// ---- label enums ---------------------------------------------------------

/// How a publish attempt ended: the `result` label of
/// `flowgate_publish_total`.
#[derive(Clone, Copy, Debug)]
pub(crate) enum PublishResult<'a> {
    /// The broker confirmed it.
    Confirmed,
    /// The breaker was open: it is durable in the spool.
    Spooled,
    /// The breaker was open and the spool is full: backpressure.
    SpoolFull,
    /// The spool's store failed (no publish error to carry).
    StoreFailed,
    /// The publish failed.
    Failed(&'a Error),
}

impl PublishResult<'_> {
    /// Every label value, in the README's order.
    pub(crate) const LABELS: [&'static str; 16] = [
        "confirmed",
        "spooled",
        "spool_full",
        "nacked",
        "returned",
        "not_confirmed",
        "confirm_timeout",
        "backpressure",
        "not_connected",
        "connect_timeout",
        "amqp_error",
        "store_error",
        "shutting_down",
        "actor_gone",
        "invalid",
        "panicked",
    ];

    /// The label value.
    pub(crate) fn as_str(&self) -> &'static str {
        let i = match self {
            PublishResult::Confirmed => 0,
            PublishResult::Spooled => 1,
            PublishResult::SpoolFull => 2,
            PublishResult::StoreFailed => 11,
            PublishResult::Failed(e) => match e {
                Error::Nacked => 3,
                Error::Unroutable { .. } => 4,
                Error::NotConfirmed => 5,
                Error::ConfirmTimeout(_) => 6,
                Error::Backpressure(_) => 7,
                // No connection to publish on (the last two only arise
                // when connecting).
                Error::NotConnected | Error::InvalidUrl(_) | Error::Refused(_) => 8,
                Error::ConnectTimeout(..) => 9,
                Error::Amqp(_) => 10,
                Error::Spool(_) => 11,
                Error::ShuttingDown => 12,
                Error::ActorGone(_) => 13,
                Error::Invalid(_) => 14,
                Error::Panicked(_) => 15,
            },
        };
        Self::LABELS[i]
    }
}

/// Why a stage's intake is paused: the `cause` label of
/// `flowgate_stage_paused`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PauseCause {
    /// The stage's output queue is above its high watermark.
    Watermark,
    /// The intake budget the depth monitor handed out is spent.
    Budget,
    /// An operator paused the stage (management API, `flowgate ctl pause`).
    Operator,
}

impl PauseCause {
    /// Every cause.
    pub const ALL: [PauseCause; 3] = [
        PauseCause::Watermark,
        PauseCause::Budget,
        PauseCause::Operator,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            PauseCause::Watermark => "watermark",
            PauseCause::Budget => "budget",
            PauseCause::Operator => "operator",
        }
    }
}

impl Display for PauseCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which way autoscaling moved: the `direction` label of
/// `flowgate_stage_scaling_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ScaleDirection {
    /// More workers.
    Up,
    /// Fewer workers.
    Down,
}

impl ScaleDirection {
    /// Both directions.
    pub(crate) const ALL: [ScaleDirection; 2] = [ScaleDirection::Up, ScaleDirection::Down];

    /// The label value.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            ScaleDirection::Up => "up",
            ScaleDirection::Down => "down",
        }
    }
}

/// The three states of the publisher's circuit breaker: the `state` label
/// of `flowgate_breaker_state` and the `to` label of
/// `flowgate_breaker_transitions_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BreakerState {
    /// Normal operation: publishes are admitted and failures are counted.
    Closed,
    /// Tripped: publishes are rejected (spooled) until the cooldown elapses.
    Open,
    /// Cooldown elapsed: one probe publish at a time is admitted to test the
    /// broker before closing again.
    HalfOpen,
}

impl BreakerState {
    /// Every state, in the README's order.
    pub const ALL: [BreakerState; 3] = [
        BreakerState::Closed,
        BreakerState::Open,
        BreakerState::HalfOpen,
    ];

    /// Stable lowercase name: the metric label and the log value.
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
}

impl Display for BreakerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What kind of supervised actor restarted: the `kind` label of
/// `flowgate_actor_restarts_total` (a stage's name is its own `stage` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ActorKind {
    /// The connection actor (both broker connections).
    Connection,
    /// The publisher actor.
    Publisher,
    /// A stage actor.
    Stage,
}

impl ActorKind {
    /// Every kind.
    pub(crate) const ALL: [ActorKind; 3] = [
        ActorKind::Connection,
        ActorKind::Publisher,
        ActorKind::Stage,
    ];

    /// The label value.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            ActorKind::Connection => "connection",
            ActorKind::Publisher => "publisher",
            ActorKind::Stage => "stage",
        }
    }
}

// ---- publisher -----------------------------------------------------------

/// The `stage` label of dead letters the publisher writes itself.
pub(crate) const PUBLISHER_STAGE: &str = "publisher";

/// A publish attempt ended (live or replayed; once per attempt).
pub(crate) struct PublishFinished<'a> {
    /// How.
    pub result: PublishResult<'a>,
}

impl Event for PublishFinished<'_> {
    fn emit(self, m: &Metrics) {
        m.0.publish.with_label_values(&[self.result.as_str()]).inc();
        if let PublishResult::Failed(e) = self.result {
            debug!(result = self.result.as_str(), error = %e, "publish failed");
        }
    }
}

/// What the publisher was doing with its spool when the store failed.
#[derive(Clone, Copy, Debug)]
pub(crate) enum SpoolOp {
    /// Appending a record.
    Append,
    /// Reading the next records to replay.
    Read,
    /// Removing replayed records.
    Remove,
}

/// The spool's store failed (counted as `flowgate_publish_total{result="store_error"}`).
pub(crate) struct SpoolFailed<'a> {
    /// What the publisher was doing.
    pub op: SpoolOp,
    /// Why.
    pub error: &'a dyn Display,
}

impl Event for SpoolFailed<'_> {
    fn emit(self, m: &Metrics) {
        m.0.publish
            .with_label_values(&[PublishResult::StoreFailed.as_str()])
            .inc();
        let e = self.error;
        match self.op {
            SpoolOp::Append => error!(error = %e, "could not append to the spool"),
            SpoolOp::Read => error!(error = %e, "cannot read the spool; replay stopped"),
            SpoolOp::Remove => {
                error!(error = %e, "cannot delete replayed records; they will be replayed again")
            }
        }
    }
}

/// The number of callers waiting to publish changed.
pub(crate) struct PublishWaiters {
    /// Waiting for a token, an unblock or window room.
    pub waiting: usize,
}

impl Event for PublishWaiters {
    fn emit(self, m: &Metrics) {
        m.0.publish_waiters.set(self.waiting as i64);
    }
}

/// The unconfirmed window's occupancy changed.
pub(crate) struct PublishWindow {
    /// Publishes awaiting a confirm.
    pub unconfirmed: usize,
}

impl Event for PublishWindow {
    fn emit(self, m: &Metrics) {
        m.0.unconfirmed.set(self.unconfirmed as i64);
    }
}

/// The breaker was consulted; its state now.
pub(crate) struct BreakerChecked {
    /// The state: its series is 1, the others' 0.
    pub state: BreakerState,
}

impl Event for BreakerChecked {
    fn emit(self, m: &Metrics) {
        for s in BreakerState::ALL {
            m.0.breaker_state
                .with_label_values(&[s.as_str()])
                .set(i64::from(s == self.state));
        }
    }
}

/// The breaker changed state.
pub(crate) struct BreakerTransitioned {
    /// The state left (the breaker's `as_str`).
    pub from: &'static str,
    /// The state entered: the `to` label.
    pub to: &'static str,
    /// True when it opened (logged as a warning).
    pub opened: bool,
}

impl Event for BreakerTransitioned {
    fn emit(self, m: &Metrics) {
        m.0.breaker_transitions.with_label_values(&[self.to]).inc();
        if self.opened {
            warn!(from = self.from, "publish circuit breaker opened");
        } else {
            info!(
                from = self.from,
                to = self.to,
                "publish circuit breaker changed state"
            );
        }
    }
}

/// The spool's size changed.
pub(crate) struct SpoolLevel {
    /// Records in it.
    pub records: u64,
    /// Their encoded bytes.
    pub bytes: u64,
}

impl Event for SpoolLevel {
    fn emit(self, m: &Metrics) {
        m.0.spool_messages.set(self.records as i64);
        m.0.spool_bytes.set(self.bytes as i64);
    }
}

/// A spooled record was replayed and confirmed.
pub(crate) struct SpoolReplayed;

impl Event for SpoolReplayed {
    fn emit(self, m: &Metrics) {
        m.0.spool_replayed.inc();
    }
}

/// A spooled copy was deleted unreplayed: the publish it stood in for was
/// confirmed after all (see the publisher's module docs).
pub(crate) struct SpoolSuperseded;

impl Event for SpoolSuperseded {
    fn emit(self, m: &Metrics) {
        m.0.spool_superseded.inc();
        debug!("a spooled copy was superseded by its original publish's late confirm");
    }
}

/// A spooled record did not decode and was moved to the quarantine table.
pub(crate) struct SpoolQuarantined<'a> {
    /// Its sequence number.
    pub seq: u64,
    /// Its encoded size.
    pub bytes: u64,
    /// Why it did not decode.
    pub error: &'a dyn Display,
    /// The spool file.
    pub path: &'a std::path::Path,
}

impl Event for SpoolQuarantined<'_> {
    fn emit(self, m: &Metrics) {
        m.0.spool_quarantined.inc();
        error!(
            seq = self.seq, bytes = self.bytes, error = %self.error, path = %self.path.display(),
            "undecodable spool record moved to the quarantine table; replay goes on"
        );
    }
}

/// Where an unroutable message was.
pub(crate) struct Unroutable<'a> {
    /// Its exchange.
    pub exchange: &'a str,
    /// Its routing key.
    pub routing_key: &'a str,
    /// Its message id, if any.
    pub message_id: Option<&'a str>,
    /// The unroutable queue.
    pub queue: &'a str,
}

/// An unroutable message (returned live, or on replay) was moved to the
/// unroutable queue: dead-lettered by stage `publisher`, reason `unroutable`.
pub(crate) struct UnroutableDeadLettered<'a> {
    /// The stage label (the publisher's).
    pub stage: &'a str,
    /// The message.
    pub message: Unroutable<'a>,
    /// What happened, for the log line.
    pub what: &'static str,
}

impl Event for UnroutableDeadLettered<'_> {
    fn emit(self, m: &Metrics) {
        m.0.dead_lettered
            .with_label_values(&[self.stage, Reason::Unroutable.as_str()])
            .inc();
        let u = self.message;
        warn!(
            exchange = u.exchange, routing_key = u.routing_key, message_id = ?u.message_id,
            queue = u.queue, "{}", self.what
        );
    }
}

/// A returned message could not be moved to the unroutable queue: it is lost.
pub(crate) struct UnroutableDropped<'a> {
    /// The message.
    pub message: Unroutable<'a>,
    /// Why the move failed.
    pub error: &'a dyn Display,
}

impl Event for UnroutableDropped<'_> {
    fn emit(self, m: &Metrics) {
        m.0.spool_dropped
            .with_label_values(&[Reason::Unroutable.as_str()])
            .inc();
        let u = self.message;
        error!(
            exchange = u.exchange, routing_key = u.routing_key, message_id = ?u.message_id,
            queue = u.queue, error = %self.error,
            "a returned message could not be moved to the unroutable queue; it is lost"
        );
    }
}

// ---- connection ----------------------------------------------------------

/// Whether both broker connections are up, re-checked.
pub(crate) struct LinkState {
    /// True when both are connected.
    pub up: bool,
}

impl Event for LinkState {
    fn emit(self, m: &Metrics) {
        m.0.connection_up.set(i64::from(self.up));
    }
}

/// A broker connection failed.
pub(crate) struct LinkDown<'a> {
    /// Which (`consume`, `publish`: the connection's `as_str`).
    pub connection: &'static str,
    /// Why.
    pub error: &'a dyn Display,
    /// True while the engine closes it on purpose (not logged).
    pub closing: bool,
}

impl Event for LinkDown<'_> {
    fn emit(self, m: &Metrics) {
        m.0.connection_up.set(0);
        if !self.closing {
            warn!(connection = self.connection, error = %self.error, "broker connection error");
        }
    }
}

/// A broker connection is configured: its series start at 0.
pub(crate) struct ConnectionKnown {
    /// Which (`consume`, `publish`): the `connection` label.
    pub connection: &'static str,
}

impl Event for ConnectionKnown {
    fn emit(self, m: &Metrics) {
        m.0.reconnects.with_label_values(&[self.connection]);
    }
}

/// A broker connection recovered after a loss.
pub(crate) struct Reconnected {
    /// Which (`consume`, `publish`): the `connection` label.
    pub connection: &'static str,
}

impl Event for Reconnected {
    fn emit(self, m: &Metrics) {
        m.0.reconnects.with_label_values(&[self.connection]).inc();
        info!(connection = self.connection, "broker connection recovered");
    }
}

/// The broker blocked the publishing connection (a resource alarm).
pub(crate) struct Blocked<'a> {
    /// The broker's reason.
    pub reason: &'a str,
}

impl Event for Blocked<'_> {
    fn emit(self, m: &Metrics) {
        m.0.broker_blocked.set(1);
        warn!(reason = self.reason, "broker blocked publishing");
    }
}

/// The broker unblocked the publishing connection, or the connection that
/// was blocked is gone (`restarting`).
pub(crate) struct Unblocked {
    /// True when the connection was dropped rather than unblocked (not logged).
    pub reset: bool,
}

impl Event for Unblocked {
    fn emit(self, m: &Metrics) {
        m.0.broker_blocked.set(0);
        if !self.reset {
            info!("broker unblocked publishing");
        }
    }
}

// ---- supervision ---------------------------------------------------------

/// A supervisor restarted an actor.
pub(crate) struct Restarted<'a> {
    /// What kind of actor.
    pub kind: ActorKind,
    /// The stage's name for a stage actor; empty for the others.
    pub stage: &'a str,
}

impl Event for Restarted<'_> {
    fn emit(self, m: &Metrics) {
        m.0.restarts
            .with_label_values(&[self.kind.as_str(), self.stage])
            .inc();
    }
}

/// An actor spent its restart budget: escalating.
pub(crate) struct Escalated<'a> {
    /// What kind of actor.
    pub kind: ActorKind,
    /// The stage's name for a stage actor; empty for the others.
    pub stage: &'a str,
}

impl Event for Escalated<'_> {
    fn emit(self, m: &Metrics) {
        m.0.escalations.inc();
        error!(
            actor = self.kind.as_str(),
            stage = self.stage,
            "restart budget spent; escalating"
        );
    }
}

// ---- stages and depth ----------------------------------------------------

/// A stage's deliveries in flight changed.
pub(crate) struct InFlight<'a> {
    /// The stage.
    pub stage: &'a str,
    /// Deliveries holding a credit now.
    pub count: usize,
}

impl Event for InFlight<'_> {
    fn emit(self, m: &Metrics) {
        m.0.in_flight
            .with_label_values(&[self.stage])
            .set(self.count as i64);
    }
}

/// A stage's intake was paused or resumed for a cause.
pub(crate) struct Paused<'a> {
    /// The stage.
    pub stage: &'a str,
    /// Why.
    pub cause: PauseCause,
    /// True: paused; false: this cause is cleared.
    pub on: bool,
}

impl Event for Paused<'_> {
    fn emit(self, m: &Metrics) {
        if self.on {
            debug!(stage = self.stage, cause = %self.cause, "intake paused");
        } else {
            debug!(stage = self.stage, cause = %self.cause, "intake resumed");
        }
        m.0.stage_paused
            .with_label_values(&[self.stage, self.cause.as_str()])
            .set(i64::from(self.on));
    }
}

/// A stage runs this many handler workers now.
pub(crate) struct WorkersSet<'a> {
    /// The stage.
    pub stage: &'a str,
    /// Workers.
    pub workers: usize,
}

impl Event for WorkersSet<'_> {
    fn emit(self, m: &Metrics) {
        m.0.stage_workers
            .with_label_values(&[self.stage])
            .set(self.workers as i64);
    }
}

/// Autoscaling changed a stage's worker count.
pub(crate) struct Scaled<'a> {
    /// The stage.
    pub stage: &'a str,
    /// Workers before.
    pub from: usize,
    /// Workers after.
    pub to: usize,
    /// Why (the decision's reason).
    pub reason: &'a dyn Display,
}

impl Event for Scaled<'_> {
    fn emit(self, m: &Metrics) {
        let dir = if self.to > self.from {
            ScaleDirection::Up
        } else {
            ScaleDirection::Down
        };
        info!(stage = self.stage, from = self.from, to = self.to, reason = %self.reason, "autoscaling");
        m.0.stage_scaling
            .with_label_values(&[self.stage, dir.as_str()])
            .inc();
    }
}

/// The depth monitor sampled a queue.
pub(crate) struct QueueSampled<'a> {
    /// The queue.
    pub queue: &'a str,
    /// Ready messages.
    pub depth: u64,
    /// Consumers.
    pub consumers: u64,
}

impl Event for QueueSampled<'_> {
    fn emit(self, m: &Metrics) {
        m.0.queue_depth
            .with_label_values(&[self.queue])
            .set(self.depth as i64);
        m.0.queue_consumers
            .with_label_values(&[self.queue])
            .set(self.consumers as i64);
    }
}

/// An ingress request was refused by a queue's watermark.
pub struct IngressRefused<'a> {
    /// The queue that refused it: the `queue` label.
    pub queue: &'a str,
    /// The request's exchange.
    pub exchange: &'a str,
    /// The request's routing key.
    pub routing_key: &'a str,
    /// Why (the refusal).
    pub reason: &'a dyn Display,
}

impl Event for IngressRefused<'_> {
    fn emit(self, m: &Metrics) {
        debug!(exchange = self.exchange, routing_key = self.routing_key, reason = %self.reason, "ingress refused by a watermark");
        m.0.ingress_refused.with_label_values(&[self.queue]).inc();
    }
}

/// An inbox stage took a delivery whose message id is committed in its
/// inbox already: acked without calling the handler.
pub struct InboxHit<'a> {
    /// The stage.
    pub stage: &'a str,
    /// The message id.
    pub message_id: &'a str,
}

impl Event for InboxHit<'_> {
    fn emit(self, m: &Metrics) {
        m.0.inbox_hits.with_label_values(&[self.stage]).inc();
        debug!(
            stage = self.stage,
            message_id = self.message_id,
            "committed in the inbox already; acking without handling"
        );
    }
}

/// The outbox relay sampled the outbox table.
pub struct OutboxSampled {
    /// Rows waiting.
    pub depth: i64,
    /// Age of the oldest row (zero when empty).
    pub oldest: std::time::Duration,
}

impl Event for OutboxSampled {
    fn emit(self, m: &Metrics) {
        m.0.outbox_depth.set(self.depth);
        m.0.outbox_age.set(self.oldest.as_secs_f64());
    }
}

/// The relay published an outbox row and deleted it.
pub struct OutboxRelayed {
    /// From the row's insert to its confirm.
    pub lag: std::time::Duration,
}

impl Event for OutboxRelayed {
    fn emit(self, m: &Metrics) {
        m.0.outbox_relayed.inc();
        m.0.outbox_relay_lag.observe(self.lag.as_secs_f64());
    }
}

/// A relay batch failed; its rows stay in the outbox and are tried again.
pub struct OutboxRelayFailed<'a> {
    /// What failed.
    pub error: &'a dyn Display,
}

impl Event for OutboxRelayFailed<'_> {
    fn emit(self, m: &Metrics) {
        m.0.outbox_relay_errors.inc();
        warn!(error = %self.error, "outbox relay batch failed; its rows are tried again");
    }
}

/// The broker confirmed (or refused) a live publish: its round trip.
pub(crate) struct ConfirmAwaited {
    /// From `basic.publish` to the broker's answer.
    pub elapsed: std::time::Duration,
}

impl Event for ConfirmAwaited {
    fn emit(self, m: &Metrics) {
        m.0.confirm_latency.observe(self.elapsed.as_secs_f64());
    }
}

/// A dedup store evicted unexpired keys to respect its capacity.
pub(crate) struct DedupEvicted<'a> {
    /// The backend (`memory`).
    pub backend: &'a str,
    /// Keys evicted since the last report.
    pub count: u64,
}

impl Event for DedupEvicted<'_> {
    fn emit(self, m: &Metrics) {
        m.0.dedup_evictions
            .with_label_values(&[self.backend])
            .inc_by(self.count);
    }
}

/// Which of a queue's watermarks: the `level` label of
/// `flowgate_queue_watermark`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum WatermarkLevel {
    /// Feeding stages pause at this depth.
    High,
    /// ...and resume at this one.
    Low,
}

impl WatermarkLevel {
    /// Both levels.
    pub(crate) const ALL: [WatermarkLevel; 2] = [WatermarkLevel::High, WatermarkLevel::Low];

    /// The label value.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            WatermarkLevel::High => "high",
            WatermarkLevel::Low => "low",
        }
    }
}

/// The depth monitor watches a queue (with watermarks or without).
pub(crate) struct QueueWatched<'a> {
    /// The queue.
    pub queue: &'a str,
    /// Its `(high, low)` watermarks, if any.
    pub watermark: Option<(u64, u64)>,
}

impl Event for QueueWatched<'_> {
    fn emit(self, m: &Metrics) {
        let Some((high, low)) = self.watermark else {
            return;
        };
        for (level, v) in [(WatermarkLevel::High, high), (WatermarkLevel::Low, low)] {
            m.0.queue_watermark
                .with_label_values(&[self.queue, level.as_str()])
                .set(i64::try_from(v).unwrap_or(i64::MAX));
        }
        m.0.ingress_refused.with_label_values(&[self.queue]);
    }
}

/// A stage was configured: every series labelled with it is created at 0,
/// so `increase()` sees its first event and an alert can tell 0 from absent.
pub(crate) struct StageKnown<'a> {
    /// The stage.
    pub stage: &'a str,
    /// Its retry tier queues (the `tier` label).
    pub tiers: &'a [String],
    /// Its prefetch.
    pub prefetch: u16,
}

impl Event for StageKnown<'_> {
    fn emit(self, m: &Metrics) {
        let s = self.stage;
        let i = &m.0;
        for c in [
            &i.consumed,
            &i.acked,
            &i.ack_frames,
            &i.signature_failures,
            &i.ack_failures,
            &i.publish_retries,
            &i.dedup_hits,
            &i.inbox_hits,
            &i.dedup_errors,
            &i.dedup_lease_lost,
            &i.lane_waits,
        ] {
            c.with_label_values(&[s]);
        }
        for r in Reason::ALL {
            i.dead_lettered.with_label_values(&[s, r.as_str()]);
        }
        for t in self.tiers {
            i.retried.with_label_values(&[s, t]);
        }
        for c in PauseCause::ALL {
            i.stage_paused.with_label_values(&[s, c.as_str()]);
        }
        for d in ScaleDirection::ALL {
            i.stage_scaling.with_label_values(&[s, d.as_str()]);
        }
        i.in_flight.with_label_values(&[s]);
        i.stage_prefetch
            .with_label_values(&[s])
            .set(i64::from(self.prefetch));
        i.handler_duration.with_label_values(&[s]);
        i.end_to_end.with_label_values(&[s]);
        i.restarts
            .with_label_values(&[ActorKind::Stage.as_str(), s]);
    }
}

/// Creates the series whose label values are all known up front (publish
/// results, breaker states, the engine's own actors, the connections, the
/// publisher's dead letters), each at 0.
pub(crate) fn preinitialise(m: &Metrics) {
    let i = &m.0;
    for r in PublishResult::LABELS {
        i.publish.with_label_values(&[r]);
    }
    for s in BreakerState::ALL {
        i.breaker_transitions.with_label_values(&[s.as_str()]);
    }
    BreakerChecked {
        state: BreakerState::Closed,
    }
    .emit(m);
    for k in [ActorKind::Connection, ActorKind::Publisher] {
        i.restarts.with_label_values(&[k.as_str(), ""]);
    }
    i.dead_lettered
        .with_label_values(&[PUBLISHER_STAGE, Reason::Unroutable.as_str()]);
    i.spool_dropped
        .with_label_values(&[Reason::Unroutable.as_str()]);
    i.build_info
        .with_label_values(&[env!("CARGO_PKG_VERSION")])
        .set(1);
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
                m.0.dead_lettered
                    .with_label_values(&["s", r.as_str()])
                    .get(),
                1
            );
        }
    }

    #[test]
    fn publish_results_label_every_error() {
        let m = Metrics::new();
        for e in [
            Error::Nacked,
            Error::Backpressure("x".into()),
            Error::Spool(crate::SpoolError::Full {
                bytes: 0,
                max_bytes: 0,
            }),
        ] {
            PublishFinished {
                result: PublishResult::Failed(&e),
            }
            .emit(&m);
        }
        assert_eq!(m.counter(Metrics::PUBLISH, &["nacked"]), 1);
        assert_eq!(m.counter(Metrics::PUBLISH, &["backpressure"]), 1);
        assert_eq!(m.counter(Metrics::PUBLISH, &["store_error"]), 1);
    }

    #[test]
    fn a_known_stage_has_every_series_before_its_first_event() {
        let m = Metrics::new();
        let text = m.render();
        assert!(!text.contains("stage=\"s\""), "nothing of s yet");
        StageKnown {
            stage: "s",
            tiers: &["q.retry.1".to_owned()],
            prefetch: 7,
        }
        .emit(&m);
        let text = m.render();
        for r in Reason::ALL {
            let series = format!(
                "flowgate_messages_dead_lettered_total{{reason=\"{}\",stage=\"s\"}} 0",
                r.as_str()
            );
            assert!(text.contains(&series), "{series} in\n{text}");
        }
        for series in [
            "flowgate_messages_consumed_total{stage=\"s\"} 0",
            "flowgate_messages_acked_total{stage=\"s\"} 0",
            "flowgate_retries_total{stage=\"s\",tier=\"q.retry.1\"} 0",
            "flowgate_stage_paused{cause=\"operator\",stage=\"s\"} 0",
            "flowgate_stage_scaling_total{direction=\"up\",stage=\"s\"} 0",
            "flowgate_actor_restarts_total{kind=\"stage\",stage=\"s\"} 0",
            "flowgate_end_to_end_seconds_count{stage=\"s\"} 0",
            "flowgate_handler_duration_seconds_count{stage=\"s\"} 0",
            "flowgate_stage_prefetch{stage=\"s\"} 7",
        ] {
            assert!(text.contains(series), "{series} in\n{text}");
        }
    }

    #[test]
    fn engine_wide_series_exist_from_the_start() {
        let text = Metrics::new().render();
        for r in PublishResult::LABELS {
            let series = format!("flowgate_publish_total{{result=\"{r}\"}} 0");
            assert!(text.contains(&series), "{series}");
        }
        for series in [
            "flowgate_breaker_transitions_total{to=\"open\"} 0",
            "flowgate_actor_restarts_total{kind=\"publisher\",stage=\"\"} 0",
            "flowgate_messages_dead_lettered_total{reason=\"unroutable\",stage=\"publisher\"} 0",
            "flowgate_spool_dropped_total{reason=\"unroutable\"} 0",
            "flowgate_publish_confirm_seconds_count 0",
        ] {
            assert!(text.contains(series), "{series} in\n{text}");
        }
        let build = format!(
            "flowgate_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        assert!(text.contains(&build), "{build}");
        #[cfg(target_os = "linux")]
        for name in crate::metrics::PROCESS_METRICS {
            assert!(text.contains(&format!("\n{name} ")), "{name} in\n{text}");
        }
    }

    #[test]
    fn the_breaker_is_one_series_per_state() {
        let m = Metrics::new();
        let states =
            |m: &Metrics| BreakerState::ALL.map(|s| m.gauge(Metrics::BREAKER_STATE, &[s.as_str()]));
        assert_eq!(states(&m), [1, 0, 0]);
        BreakerChecked {
            state: BreakerState::HalfOpen,
        }
        .emit(&m);
        assert_eq!(states(&m), [0, 0, 1]);
        BreakerChecked {
            state: BreakerState::Open,
        }
        .emit(&m);
        assert_eq!(states(&m), [0, 1, 0]);
    }

    #[test]
    fn restarts_carry_kind_and_stage_apart() {
        let m = Metrics::new();
        Restarted {
            kind: ActorKind::Stage,
            stage: "orders",
        }
        .emit(&m);
        assert_eq!(m.counter(Metrics::RESTARTS, &["stage", "orders"]), 1);
        assert_eq!(m.counter(Metrics::RESTARTS, &["publisher", ""]), 0);
    }

    #[test]
    fn consumed_observes_the_time_since_the_first_publish() {
        let m = Metrics::new();
        Consumed {
            stage: "s",
            since_first_publish: Some(std::time::Duration::from_millis(1500)),
        }
        .emit(&m);
        Consumed {
            stage: "s",
            since_first_publish: None,
        }
        .emit(&m);
        let text = m.render();
        assert!(
            text.contains("flowgate_end_to_end_seconds_count{stage=\"s\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("flowgate_end_to_end_seconds_sum{stage=\"s\"} 1.5"),
            "{text}"
        );
        assert_eq!(m.counter(Metrics::CONSUMED, &["s"]), 2);
    }

    #[test]
    fn a_watched_queue_shows_its_watermarks() {
        let m = Metrics::new();
        QueueWatched {
            queue: "q",
            watermark: Some((100, 40)),
        }
        .emit(&m);
        QueueWatched {
            queue: "plain",
            watermark: None,
        }
        .emit(&m);
        assert_eq!(m.gauge(Metrics::QUEUE_WATERMARK, &["q", "high"]), 100);
        assert_eq!(m.gauge(Metrics::QUEUE_WATERMARK, &["q", "low"]), 40);
        assert!(!m.render().contains("queue=\"plain\""));
        assert!(m
            .render()
            .contains("flowgate_ingress_refused_total{queue=\"q\"} 0"));
    }
}
