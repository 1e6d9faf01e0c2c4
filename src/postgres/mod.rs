//! PostgreSQL: exactly-once effects with the host's database.
//!
//! * [`TxHandler`] — a stage handler that gets an open transaction; flowgate
//!   records the message id in the inbox table and the handler's outputs in
//!   the outbox table in that same transaction, commits, then acks
//!   (register with [`EngineBuilder::tx_handler`](crate::EngineBuilder::tx_handler)).
//! * [`Outbox`] — the host writes messages in its own transaction; they are
//!   published if and only if it commits.
//! * The relay (in the engine, `[postgres] relay`) publishes committed outbox
//!   rows through the engine's publisher and deletes each after its confirm;
//!   several engines relay one outbox (`FOR UPDATE SKIP LOCKED`).
//! * [`migrate`] — flowgate's tables (`flowgate db migrate`, or
//!   `[postgres] migrate_on_start`).
//!
//! Config: [`PostgresConfig`](crate::config::PostgresConfig); the pool:
//! [`connect`].

mod inbox;
mod migrate;
mod outbox;
pub(crate) mod relay;

pub(crate) use inbox::Inbox;
pub use inbox::{TxHandler, NO_MESSAGE_ID};
pub use migrate::{latest as latest_migration, migrate};
pub use outbox::{Outbox, OutboxError};

use crate::config::{ConfigError, PostgresConfig};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgSslMode};
use sqlx::PgPool;
use std::str::FromStr;

/// The transaction a [`TxHandler`] works in.
pub type PgTransaction = sqlx::Transaction<'static, sqlx::Postgres>;

/// Re-exported so hosts use the same sqlx as flowgate.
pub use sqlx;

/// A connection pool as `[postgres]` describes it (URL or `url_file`, pool
/// size, statement timeout, TLS files). Connects lazily: an unreachable
/// database fails the first use, not this call. Call it inside a tokio
/// runtime (the pool keeps a maintenance task on it).
pub fn connect(cfg: &PostgresConfig) -> Result<PgPool, ConfigError> {
    let key = if cfg.url_file.is_some() {
        "postgres.url_file"
    } else {
        "postgres.url"
    };
    let url = cfg.resolved_url()?;
    // Never echo the URL: it may hold a password.
    let mut opts = PgConnectOptions::from_str(&url)
        .map_err(|e| ConfigError::with_source(key, "not a usable PostgreSQL URL", e))?
        .application_name("flowgate");
    let (ca, client) = cfg.tls()?;
    if let Some(ca) = ca {
        opts = opts.ssl_root_cert_from_pem(ca);
        if matches!(opts.get_ssl_mode(), PgSslMode::Prefer | PgSslMode::Disable) {
            opts = opts.ssl_mode(PgSslMode::VerifyFull);
        }
    }
    if let Some((cert, key)) = client {
        opts = opts
            .ssl_client_cert_from_pem(cert)
            .ssl_client_key_from_pem(key);
    }
    if !cfg.statement_timeout.is_zero() {
        opts = opts.options([(
            "statement_timeout",
            cfg.statement_timeout.as_millis().to_string(),
        )]);
    }
    Ok(PgPoolOptions::new()
        .max_connections(cfg.pool_size)
        .acquire_timeout(cfg.acquire_timeout)
        .connect_lazy_with(opts))
}
