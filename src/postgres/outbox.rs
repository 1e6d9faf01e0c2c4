//! The outbox: messages written in the host's transaction, published by a
//! relay after the transaction commits (see [`relay`](super::relay)).

use flowgate_actors::envelope::short_string;
use flowgate_actors::lapin::types::FieldTable;
use flowgate_actors::lapin::BasicProperties;
use flowgate_actors::{Output, SpoolRecord};
use sqlx::PgConnection;

/// Why a message could not be written to the outbox.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OutboxError {
    /// The database refused the insert (the transaction is then aborted).
    #[error("outbox insert: {0}")]
    Database(#[from] sqlx::Error),
    /// The message cannot be published as given (an exchange, routing key
    /// or message id over 255 bytes, no message id).
    #[error("outbox message: {0}")]
    Invalid(String),
}

/// Writes messages into the outbox table inside the caller's transaction:
/// they are published (by a relay, at least once, with their message id)
/// if and only if that transaction commits.
///
/// ```no_run
/// # async fn f(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
/// use flowgate::postgres::Outbox;
/// let mut tx = pool.begin().await?;
/// sqlx::query("UPDATE stock SET reserved = reserved + 1 WHERE sku = 'a'")
///     .execute(&mut *tx)
///     .await?;
/// Outbox::enqueue(&mut tx, "shop", "stock.reserved", b"{}".to_vec(),
///     Default::default(), "reserve-42").await?;
/// tx.commit().await?;
/// # Ok(()) }
/// ```
pub struct Outbox;

impl Outbox {
    /// Enqueues one persistent message with these headers and message id
    /// (which downstream dedup keys on: give the same effect the same id).
    /// Returns the row's id (the relay's order).
    pub async fn enqueue(
        tx: &mut PgConnection,
        exchange: &str,
        routing_key: &str,
        body: Vec<u8>,
        headers: FieldTable,
        message_id: &str,
    ) -> Result<i64, OutboxError> {
        let id = short_string("message id", message_id)
            .map_err(|e| OutboxError::Invalid(e.to_string()))?;
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_message_id(id)
            .with_headers(headers);
        Self::enqueue_output(
            tx,
            &Output {
                exchange: exchange.to_owned(),
                routing_key: routing_key.to_owned(),
                body: body.into(),
                properties,
            },
        )
        .await
    }

    /// Enqueues an [`Output`] as it is; it must carry a message id.
    pub async fn enqueue_output(tx: &mut PgConnection, out: &Output) -> Result<i64, OutboxError> {
        let message_id = out
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.as_str().to_owned())
            .ok_or_else(|| OutboxError::Invalid("no message id".into()))?;
        short_string("exchange", &out.exchange).map_err(|e| OutboxError::Invalid(e.to_string()))?;
        short_string("routing key", &out.routing_key)
            .map_err(|e| OutboxError::Invalid(e.to_string()))?;
        let record = SpoolRecord {
            exchange: out.exchange.clone(),
            routing_key: out.routing_key.clone(),
            body: out.body.to_vec(),
            properties: out.properties.clone(),
        }
        .encode()
        .map_err(|e| OutboxError::Invalid(e.to_string()))?;
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO flowgate_outbox (message_id, exchange, routing_key, record) \
             VALUES ($1, $2, $3, $4) RETURNING id",
        )
        .bind(&message_id)
        .bind(&out.exchange)
        .bind(&out.routing_key)
        .bind(record)
        .fetch_one(&mut *tx)
        .await?;
        Ok(id)
    }
}
