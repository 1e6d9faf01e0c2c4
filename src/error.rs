//! The crate's one error type.

use crate::config::ConfigError;
use std::time::Duration;

/// What went wrong in the engine: starting it ([`Engine::start`](crate::Engine::start))
/// or a [`dlq`](crate::dlq) tool. The underlying error is kept as the
/// source. A publish through the ingress has its own [`IngressError`](crate::ingress::IngressError)
/// (each maps to one HTTP answer, with `retry_after()`).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The broker could not be reached at start.
    #[error("broker: {0}")]
    Broker(#[source] flowgate_actors::Error),
    /// No connection to the broker within `[amqp] connect_timeout` (plus a
    /// second).
    #[error("no connection to the broker within {wait:?} ({url})")]
    ConnectTimeout {
        /// How long it waited.
        wait: Duration,
        /// The broker, password redacted.
        url: String,
    },
    /// The broker refused the topology.
    #[error("declaring the topology: {0}")]
    Topology(#[source] lapin::Error),
    /// The broker lacks a plugin the configuration needs (a partitioned
    /// queue's `x-consistent-hash` exchange); the engine cannot enable it.
    #[error(
        "the broker needs the `{plugin}` plugin for partitioned queues \
         (queues[].partitions): enable it with `rabbitmq-plugins enable {plugin}` ({source})"
    )]
    MissingPlugin {
        /// The plugin's name.
        plugin: &'static str,
        /// The broker's refusal.
        #[source]
        source: lapin::Error,
    },
    /// A DLQ tool could not reach the broker, or the broker refused an
    /// operation.
    #[error("broker: {0}")]
    Amqp(#[from] lapin::Error),
    /// A DLQ tool refused the request: no such queue, a DLQ that cannot be
    /// browsed without reordering it (not a classic queue), an invalid
    /// destination.
    #[error("{0}")]
    Dlq(String),
    /// The HTTP server (or the ingress listener) could not bind.
    #[error("http server: {0}")]
    Http(#[source] std::io::Error),
    /// The spool file could not be opened.
    #[error("spool: {0}")]
    Spool(#[source] flowgate_actors::Error),
    /// PostgreSQL (`[postgres]`) refused a migration at start.
    #[error("postgres: {0}")]
    Postgres(#[source] sqlx::Error),
    /// The trace exporter could not be set up (`[telemetry]`).
    #[error("telemetry: {0}")]
    Telemetry(#[source] Box<dyn std::error::Error + Send + Sync>),
}
