//! flowgate: a RabbitMQ pipeline engine that slows down gracefully.
//!
//! A tour of the crate:
//!
//! * [`config`] — the TOML configuration, environment overrides, validation.
//! * [`topology`] — declares exchanges, queues, bindings, dead-letter plumbing.
//! * [`engine`] — [`Engine`] builds the supervised actor tree from a config
//!   and a set of [`Handler`](actors::Handler)s; [`EngineHandle`] runs it.
//! * [`depth`] — which queues the depth monitor samples and which queues
//!   each stage's output lands in (for watermarks), from the config.
//! * [`handlers`] — built-in handlers (`forward`, `sink`).
//! * [`http`] — `/metrics`, `/healthz`, `/readyz` and the publish ingress.
//! * [`orders`] — the order pipeline (gateway → order → payment → shipping),
//!   `flowgate load` and the chaos run.
//! * [`dlq`] — dead-letter queue tools: stats, replay, purge.
//! * [`demo`] — the main job: the order pipeline run end to end with a summary.
//! * [`actors`] — the actor runtime (re-exported `flowgate-actors`).
//!
//! Embedding it:
//!
//! ```no_run
//! use flowgate::{Config, Engine};
//! use flowgate::actors::{handler_fn, Outcome};
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
//!     tokio::signal::ctrl_c().await?;
//!     handle.shutdown().await;
//!     Ok(())
//! })
//! # }
//! ```

pub mod config;
pub mod demo;
pub mod depth;
pub mod dlq;
pub mod engine;
pub mod handlers;
pub mod http;
pub mod orders;
pub mod topology;

pub use config::{Config, ConfigError};
pub use engine::{Engine, EngineBuilder, EngineHandle, PublishOutcome, ShutdownReport, StartError};
pub use flowgate_actors as actors;

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
