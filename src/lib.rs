//! flowgate: a RabbitMQ pipeline engine that slows down gracefully.
//!
//! A tour of the crate. The public modules are the engine's deliberate API;
//! the rest is how it works inside:
//!
//! * [`config`] — the TOML configuration, environment overrides, validation;
//!   a host's own section read from the same file
//!   ([`Config::load_with_section`]).
//! * `engine` — [`Engine`] builds the supervised actor tree from a config
//!   and the stages' [`Handler`]s (registered, or built by name by a handler
//!   factory); [`EngineHandle`] runs it and stops it
//!   ([`EngineHandle::run_until_signal`]).
//! * [`ingress`] — [`Ingress`]: admission by queue watermarks, publish, one
//!   [`IngressError`](ingress::IngressError) with `retry_after()`, shared by
//!   `POST /publish` and a host's own HTTP handlers.
//! * [`control`] — [`Control`](control::Control): what an operator sees of
//!   a running engine and may change live; the management API, `/readyz`
//!   and an embedding host use it alike.
//! * [`topology`] — declares and deletes exchanges, queues, bindings,
//!   dead-letter plumbing (a host declaring its pipeline, tests and demos).
//! * [`dlq`] — dead-letter queue tools: list, show, stats, replay, purge
//!   (the `flowgate dlq` commands and the console share them).
//! * [`postgres`] — exactly-once effects with the host's PostgreSQL: the
//!   transactional inbox ([`TxHandler`](postgres::TxHandler)), the outbox
//!   ([`Outbox`](postgres::Outbox)) and its relay, flowgate's migrations.
//! * [`telemetry`] — OpenTelemetry trace export over OTLP/HTTP
//!   ([`Telemetry`]); [`log`] — the process's subscriber: text or JSON
//!   lines carrying the trace and span ids ([`log::init`]), for the daemon
//!   and for hosts that want the daemon's log.
//! * [`exit`] — the `flowgate` command's exit statuses, one table (a host
//!   can exit the way the daemon does: [`Stopped::exit_code`]).
//! * `depth` — which queues the depth monitor samples and which queues
//!   each stage's output lands in (for watermarks), from the config.
//! * `handlers` — the built-in handler factories (`forward`, `sink`, `record`,
//!   `http`), and [`OutputDraft`]: an output as a handler outside Rust
//!   describes it (an `http` answer, a Python handler), completed from the
//!   input's properties and the stage's `output`.
//! * `http` — `/metrics`, `/healthz`, `/readyz` on `[http] bind`, and
//!   `POST /publish` on its own listener (`[ingress] bind`: tokens, routes,
//!   bounds); the management API and its console.
//! * [`Error`] — the crate's one error (starting the engine, the DLQ tools),
//!   keeping the underlying error (lapin, I/O, the runtime's) as its source;
//!   [`ConfigError`] names the key at fault.
//! * [`envelope`], [`trace`], [`lapin`] — the message envelope (header
//!   names, dead-letter reasons, header readers), trace context helpers and
//!   the AMQP client, for handlers; [`RuntimeError`] — the runtime's error;
//!   [`Metrics`] — the engine's collectors, read by [`MetricDesc`];
//!   [`Spool`] — reading a spool file a stopped engine left.
//!
//! The `flowgate` binary (`src/bin/flowgate/`) is thin: it parses arguments
//! and calls these; its management API client (`flowgate ctl`) is its own.
//!
//! The actor runtime itself is the `flowgate-actors` crate; the engine
//! assembles it, and hosts need none of its internals.
//!
//! The worked example, an order pipeline with an HTTP gateway, is its own
//! package on this public API (`examples/orders`).
//!
//! Embedding it:
//!
//! ```no_run
//! use flowgate::{handler_fn, Config, Engine, Outcome};
//!
//! # fn main() -> anyhow::Result<()> {
//! flowgate::run_system(async {
//!     let config = Config::load("config/demo.toml".as_ref())?;
//!     let handle = Engine::builder()
//!         .config(config)
//!         .handler("reserve", handler_fn(|d| async move {
//!             Ok(Outcome::ack_with(vec![d.forward("shop", "order.reserved")]))
//!         }))
//!         .build()?
//!         .start()
//!         .await?;
//!     let stopped = handle.run_until_signal().await?;
//!     println!("stopped: {:?}", stopped.reason);
//!     Ok(())
//! })
//! # }
//! ```

#![warn(unreachable_pub, missing_docs)]

pub mod config;
pub mod control;
mod depth;
pub mod dlq;
mod engine;
mod error;
pub mod exit;
mod handlers;
mod http;
pub mod ingress;
pub mod log;
pub mod postgres;
pub mod telemetry;
pub mod topology;

pub use config::{Config, ConfigError, StageConfig};
pub use engine::{
    Engine, EngineBuilder, EngineHandle, PublishOutcome, ShutdownReport, StopReason, Stopped,
};
pub use error::Error;
/// The message envelope: every `x-flowgate-*` header name, the dead-letter
/// [`Reason`](envelope::Reason)s, `x-death` reading, header readers
/// ([`header_string`](envelope::header_string),
/// [`header_int`](envelope::header_int)).
pub use flowgate_actors::envelope;
/// The AMQP client flowgate uses, for properties and field tables.
pub use flowgate_actors::lapin;
/// W3C trace context in AMQP headers and the messaging spans (see
/// [`telemetry`] for export).
pub use flowgate_actors::trace;
/// What went wrong inside the actor runtime (a publish, the broker link).
pub use flowgate_actors::Error as RuntimeError;
/// How long a shutdown waits for the broker to answer the close of the
/// engine's connections (a broker blocking publishers never answers it).
pub use flowgate_actors::CLOSE_WITHIN;
/// The queue a spooled record that comes back unroutable on replay (and a
/// returned message whose publisher was told "confirmed") is moved to, with
/// reason headers: one of the places a message can end.
pub use flowgate_actors::UNROUTABLE_QUEUE;
pub use flowgate_actors::{
    handler_fn, Delivery, Handler, HandlerError, MetricDesc, Metrics, Outcome, Output,
};
/// What a stage reports of itself ([`EngineHandle::stages`]) and what an
/// actor that spent its restart budget says ([`EngineHandle::escalated`]).
pub use flowgate_actors::{Escalation, StageProbe};
/// The durable spool's file, for reading what a stopped engine left in it
/// (operators' tools, tests): records in order, each with its sequence
/// number. A running engine holds the file's lock.
pub use flowgate_actors::{Spool, SpoolError, SpoolRecord};
pub use handlers::OutputDraft;
pub use ingress::Ingress;
pub use telemetry::Telemetry;

/// Runs a future on an actix `System` backed by a multi-threaded tokio
/// runtime: actors live on the system thread, message tasks and the AMQP
/// I/O spread over every core.
pub fn run_system<F, T>(fut: F) -> T
where
    F: std::future::Future<Output = T>,
{
    let system = actix_rt::System::with_tokio_rt(|| {
        // Building a runtime only fails if the OS refuses threads; nothing
        // can run without one.
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("cannot build the tokio runtime")
    });
    system.block_on(fut)
}
