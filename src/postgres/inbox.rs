//! The inbox: a stage whose handler writes to PostgreSQL in the
//! transaction flowgate opens, records the message id in that same
//! transaction, and puts the handler's outputs in the outbox — so the
//! handler's effect, the "done" mark and the outputs commit together or not
//! at all.

use super::outbox::Outbox;
use super::PgTransaction;
use flowgate_actors::{Delivery, Event, HandlerError, InboxHit, Metrics, Outcome, Output};
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use std::sync::Arc;

/// The dead-letter reason of a delivery without a `message_id` on an inbox
/// stage (the inbox keys on it).
pub const NO_MESSAGE_ID: &str = "inbox: the delivery has no message_id";

/// A stage's handler that writes to PostgreSQL: it gets the open
/// transaction its delivery is handled in (register it with
/// [`EngineBuilder::tx_handler`](crate::EngineBuilder::tx_handler)).
///
/// For each delivery flowgate
/// 1. begins a transaction and inserts the inbox row `(stage, message_id)`;
///    if that id is committed already (a redelivery after a crash), it rolls
///    back and acks the delivery without calling the handler
///    (`flowgate_inbox_hits_total`);
/// 2. calls the handler with the transaction;
/// 3. on [`Outcome::Ack`], writes the outputs to the outbox in the same
///    transaction (an output without a message id gets one derived from the
///    stage, the input's id and its position, so a repeat has the same id),
///    commits, and acks; the relay publishes the outputs after the commit;
/// 4. on any other outcome or an error, rolls back and lets the outcome
///    run (retry, dead letter) — the handler's writes are undone.
///
/// A crash before the commit leaves nothing (the delivery comes back and is
/// handled again); a crash after it leaves the effect, the inbox row and
/// the outputs (the delivery comes back and is recognised). The effect
/// happens once; outputs are published at least once, each with one
/// message id.
///
/// ```
/// use flowgate::postgres::{PgTransaction, TxHandler};
/// use flowgate::{Delivery, HandlerError, Outcome};
///
/// struct Reserve;
///
/// #[async_trait::async_trait]
/// impl TxHandler for Reserve {
///     async fn handle(&self, tx: &mut PgTransaction, d: &Delivery)
///         -> Result<Outcome, HandlerError> {
///         sqlx::query("UPDATE stock SET reserved = reserved + 1 WHERE sku = $1")
///             .bind(std::str::from_utf8(&d.body)?)
///             .execute(&mut **tx)
///             .await?;
///         Ok(Outcome::ack_with(vec![d.forward("shop", "stock.reserved")]))
///     }
/// }
/// ```
#[async_trait::async_trait]
pub trait TxHandler: Send + Sync + 'static {
    /// Processes one delivery inside `tx` (do not commit it: flowgate does).
    async fn handle(
        &self,
        tx: &mut PgTransaction,
        delivery: &Delivery,
    ) -> Result<Outcome, HandlerError>;
}

/// The [`Handler`](flowgate_actors::Handler) a stage runs for a
/// [`TxHandler`].
pub(crate) struct Inbox {
    pub(crate) pool: PgPool,
    pub(crate) stage: String,
    pub(crate) handler: Arc<dyn TxHandler>,
    pub(crate) metrics: Metrics,
}

/// The message id of a stage's `index`th output for input `input_id`:
/// the same on every attempt, so a repeat publish is recognisable.
pub(crate) fn derived_id(stage: &str, input_id: &str, index: usize) -> String {
    let mut h = Sha256::new();
    h.update(stage.as_bytes());
    h.update([0]);
    h.update(input_id.as_bytes());
    h.update([0]);
    h.update(index.to_le_bytes());
    let digest = h.finalize();
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("fg-{hex}")
}

impl Inbox {
    /// Outputs as they go to the outbox: each with a message id.
    fn identified(&self, input_id: &str, outputs: Vec<Output>) -> Vec<Output> {
        outputs
            .into_iter()
            .enumerate()
            .map(|(i, o)| {
                if o.properties.message_id().is_some() {
                    o
                } else {
                    let id = derived_id(&self.stage, input_id, i);
                    o.with_message_id(id)
                }
            })
            .collect()
    }
}

#[async_trait::async_trait]
impl flowgate_actors::Handler for Inbox {
    async fn handle(&self, d: &Delivery) -> Result<Outcome, HandlerError> {
        let Some(id) = d.message_id() else {
            return Ok(Outcome::dead_letter(NO_MESSAGE_ID));
        };
        let mut tx = match self.pool.begin().await {
            Ok(tx) => tx,
            Err(e) => return Ok(Outcome::retry(format!("inbox: begin: {e}"))),
        };
        // Waits for a concurrent transaction holding the same id (a
        // redelivery racing the original) and sees its outcome.
        let inserted = sqlx::query(
            "INSERT INTO flowgate_inbox (stage, message_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        )
        .bind(&self.stage)
        .bind(id)
        .execute(&mut *tx)
        .await;
        match inserted {
            Ok(r) if r.rows_affected() == 0 => {
                let _ = tx.rollback().await;
                InboxHit {
                    stage: &self.stage,
                    message_id: id,
                }
                .emit(&self.metrics);
                return Ok(Outcome::ack());
            }
            Ok(_) => {}
            Err(e) => return Ok(Outcome::retry(format!("inbox: insert: {e}"))),
        }
        // A panic in the handler unwinds through here: `tx` is dropped,
        // which rolls it back; the stage turns the panic into a dead letter.
        let outcome = self.handler.handle(&mut tx, d).await;
        match outcome {
            Ok(Outcome::Ack { outputs }) => {
                for out in self.identified(id, outputs) {
                    if let Err(e) = Outbox::enqueue_output(&mut tx, &out).await {
                        let _ = tx.rollback().await;
                        return Ok(match e {
                            super::OutboxError::Invalid(reason) => Outcome::invalid_output(reason),
                            other => Outcome::retry(other.to_string()),
                        });
                    }
                }
                match tx.commit().await {
                    Ok(()) => Ok(Outcome::ack()),
                    // Whether it committed is unknown: the redelivery finds
                    // out from the inbox.
                    Err(e) => Ok(Outcome::retry(format!("inbox: commit: {e}"))),
                }
            }
            other => {
                let _ = tx.rollback().await;
                other
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_ids_are_stable_and_distinct() {
        let a = derived_id("s", "m1", 0);
        assert_eq!(a, derived_id("s", "m1", 0));
        assert_ne!(a, derived_id("s", "m1", 1));
        assert_ne!(a, derived_id("t", "m1", 0));
        assert_ne!(a, derived_id("s", "m2", 0));
        assert!(a.len() < 64);
    }
}
