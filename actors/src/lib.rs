//! The actor runtime of flowgate.
//!
//! A tour of the modules, in the order a message travels:
//!
//! * [`connection`] — the [`ConnectionActor`](connection::ConnectionActor): owns
//!   two lapin connections (one for consuming, one for publishing, because the
//!   broker's `connection.blocked` stops every frame on a connection, acks too),
//!   reconnects with backoff and tells subscribers when the link goes down,
//!   comes back, or is blocked by a broker alarm.
//! * [`stage`] — one [`StageActor`](stage::StageActor) per consumed queue. It
//!   holds `prefetch` [`credits`](credit::Credits): one delivery takes one
//!   credit and gives it back only when it is acked or rejected, so the
//!   in-process bound is the broker's prefetch.
//! * [`message`] — the [`Handler`](message::Handler) contract: a
//!   [`Delivery`](message::Delivery) in, an [`Outcome`](message::Outcome) out.
//! * [`publisher`] — the [`PublisherActor`](publisher::PublisherActor):
//!   publishes with confirms and `mandatory`, a bounded window of unconfirmed
//!   publishes, a token bucket, a circuit breaker and a durable spool; treats
//!   `basic.return` as a failure.
//! * [`depth`] — the [`DepthMonitorActor`](depth::DepthMonitorActor):
//!   samples queue depths, pauses stages whose output queue is above its
//!   watermark, autoscales stage workers.
//! * [`envelope`] — every `x-flowgate-*` header, the dead-letter
//!   [`Reason`](envelope::Reason)s, `x-death` reading, which engine headers
//!   a delivery may carry (the rest are stripped on intake), and the one
//!   fallible conversion to an AMQP short string.
//! * [`retry`] — the broker-side retry ladder (tier queues, attempt header).
//! * [`signing`] — HMAC-SHA256 signatures: the canonical form, signing at
//!   publish, verification at consume, key rotation.
//! * [`dedup`] — claim → handle → commit deduplication (memory or Redis) and
//!   the DedupActor that pauses stages while the store is unavailable.
//! * [`supervision`] — restart policy with capped exponential backoff and a
//!   restart budget; escalation when the budget is spent.
//! * [`events`] — one typed event per thing that happens to a message; its
//!   `emit()` writes the log line and bumps the counter with enum labels.
//! * [`metrics`] — the Prometheus collectors every actor reports to.
//! * [`error`] — the crate's error type.

pub mod connection;
pub mod credit;
pub mod dedup;
pub mod depth;
pub mod envelope;
pub mod error;
pub mod message;
pub mod metrics;
pub mod publisher;
pub mod retry;
pub mod signing;
pub mod stage;
pub mod supervision;
pub mod trace;

pub use error::{Error, Result};
pub use message::{handler_fn, Delivery, Handler, HandlerError, Outcome, Output, Payload};
pub use metrics::Metrics;

/// Re-exported so hosts build properties and field tables with the same lapin version.
pub use lapin;
