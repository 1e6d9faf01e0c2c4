//! The actor runtime of flowgate.
//!
//! A tour of the modules, in the order a message travels:
//!
//! * `connection` — the [`ConnectionActor`]: owns
//!   two lapin connections (one for consuming, one for publishing, because the
//!   broker's `connection.blocked` stops every frame on a connection, acks too),
//!   reconnects with backoff and tells subscribers when the link goes down,
//!   comes back, or is blocked by a broker alarm.
//! * `stage` — one [`StageActor`] per consumed queue. It
//!   holds `prefetch` credits: one delivery takes one
//!   credit and gives it back only when it is acked or rejected, so the
//!   in-process bound is the broker's prefetch. With a [`BatchPolicy`] it
//!   hands deliveries to [`Handler::handle_batch`] in groups (credits, acks
//!   and outcomes stay per delivery).
//! * `message` — the [`Handler`] contract: a [`Delivery`] in, an
//!   [`Outcome`] out.
//! * `publisher` — the [`PublisherActor`] (and its [`PublisherHandle`]):
//!   publishes with confirms and `mandatory`, a bounded window of unconfirmed
//!   publishes, a token bucket, a circuit breaker and a durable spool; treats
//!   `basic.return` as a failure.
//! * `depth` — the [`DepthMonitorActor`]:
//!   samples queue depths, pauses stages whose output queue is above its
//!   watermark, autoscales stage workers.
//! * [`envelope`] — every `x-flowgate-*` header, the dead-letter
//!   [`Reason`](envelope::Reason)s, `x-death` reading, which engine headers
//!   a delivery may carry (the rest are stripped on intake), and the one
//!   fallible conversion to an AMQP short string.
//! * `retry` — the broker-side retry ladder (tier queues, attempt header).
//! * `signing` — HMAC-SHA256 signatures: the canonical form, signing at
//!   publish, verification at consume, key rotation.
//! * `dedup` — claim → handle → commit deduplication (memory or Redis) and
//!   the DedupActor that pauses stages while the store is unavailable.
//! * `supervision` — restart policy with capped exponential backoff and a
//!   restart budget; escalation when the budget is spent.
//! * `metrics` — the Prometheus collectors every actor reports to, each
//!   declared once ([`Metrics::describe`]), and the typed events (one per
//!   thing that happens; [`Event::emit`] writes the log line and bumps the
//!   metric with enum labels), the only code that touches the collectors.
//! * [`trace`] — W3C trace context in AMQP headers (OpenTelemetry
//!   propagation) and the messaging spans, built only while export is on.
//! * `error` — the crate's one [`Error`] type.
//!
//! The modules are private; what a host or the engine needs is re-exported
//! below.

#![warn(unreachable_pub, missing_docs)]

mod connection;
mod credit;
mod dedup;
mod depth;
pub mod envelope;
mod error;
mod message;
mod metrics;
mod publisher;
mod retry;
mod signing;
mod stage;
mod supervision;
mod tls;
pub mod trace;

// The handler contract: what a host writes.
pub use message::{handler_fn, Delivery, Handler, HandlerError, Outcome, Output, Payload};
// Errors and metrics.
pub use error::{Error, Result};
pub use metrics::events::{
    Event, InboxHit, IngressRefused, OutboxRelayFailed, OutboxRelayed, OutboxSampled,
};
pub use metrics::{Kind, MetricDesc, Metrics};
// What the engine assembles: the actors, their settings and their handles.
pub use connection::{
    redact_url, Close, Closer, ConnectionActor, ConnectionConfig, GetStatus, OpenChannel, Purpose,
    CLOSE_WITHIN,
};
pub use dedup::{Claim, ClaimToken, Claimed, CommitOutcome, DedupError};
pub use dedup::{
    DedupActor, DedupHandle, DedupSettings, DedupStore, MemoryStore, MissingId, RedisStore,
    RedisStoreConfig, DEFAULT_DONE_TTL as DEDUP_DONE_TTL, DEFAULT_LEASE as DEDUP_LEASE,
};
pub use depth::sampler::inspect_queue;
pub use depth::{
    DepthMonitorActor, DepthMonitorConfig, QueueLevels, Refusal, ScaleRange, Stop as StopSampling,
    WatchedQueue, WatchedStage, Watermark,
};
pub use message::{set_header, try_set_header};
pub use metrics::events::PauseCause;
pub use publisher::{
    BreakerConfig, BreakerState, Published, PublisherActor, PublisherConfig, PublisherHandle,
    Spool, SpoolConfig, SpoolError, SpoolRecord, UNROUTABLE_QUEUE,
};
pub use retry::RetryPolicy;
pub use signing::{Keys, SigningKey, Verifier, VerifyMode};

pub use stage::{
    AckPolicy, BatchPolicy, ConsumerRole, Drain, DrainReport, KeyFn, MissingKey, OrderKey,
    OrderPolicy, Pause, PinWorkers, Resume, StageActor, StageProbe, StageSpec,
};
pub use supervision::{Escalation, RestartPolicy};
pub use tls::{ClientIdentity, TlsSettings};

/// Re-exported so hosts build properties and field tables with the same lapin version.
pub use lapin;
