//! The outbox relay: publishes committed outbox rows through the engine's
//! publisher (token bucket, confirm window, breaker and spool, signing) and
//! deletes each row once its publish is confirmed (or durable in the spool).
//!
//! Several relays (engines) share one outbox without double-publishing and
//! without a leader: a batch is `SELECT … ORDER BY id LIMIT n FOR UPDATE SKIP
//! LOCKED` in a transaction that stays open until the batch's publishes are
//! answered and its rows deleted, so the rows another relay holds are
//! skipped, not waited for. A relay that dies mid-batch releases its locks
//! with its connection: its rows (published or not) are relayed again — only
//! those of the unfinished batch, with their message ids, so downstream
//! dedup catches them. Within one relay rows go out in `id` order (insert
//! order); across relays batches interleave.
//!
//! `LISTEN flowgate_outbox` (a trigger notifies on every committed insert)
//! wakes the relay at once; `relay_poll` is the fallback. While the breaker
//! is open the relay waits instead of spooling, and while it is half-open
//! it sends one row at a time (the probe): the outbox grows in PostgreSQL,
//! not in the spool or the process.
//!
//! The relay's transaction commits with `synchronous_commit = off`: the
//! next batch does not wait behind its WAL flush. Losing such a commit in
//! a database crash only loses the deletion: those rows are published
//! again, with their message ids, as after a relay crash.

use flowgate_actors::envelope::stamp_first_published;
use flowgate_actors::{
    BreakerState, Event, Metrics, OutboxRelayFailed, OutboxRelayed, OutboxSampled, Output,
    PublisherHandle, SpoolRecord,
};
use sqlx::postgres::PgListener;
use sqlx::{PgPool, Row};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// The channel the outbox trigger notifies.
pub(crate) const CHANNEL: &str = "flowgate_outbox";

/// A relay's settings.
pub(crate) struct Relay {
    pub(crate) pool: PgPool,
    pub(crate) publisher: PublisherHandle,
    pub(crate) metrics: Metrics,
    pub(crate) batch: u32,
    pub(crate) poll: Duration,
}

/// Why a batch failed.
#[derive(Debug, thiserror::Error)]
enum BatchError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("{failed} of the batch's publishes failed (first: {first})")]
    Publish { failed: usize, first: String },
    #[error(
        "{dead} rows of the batch can never be published (unroutable or undecodable): marked dead"
    )]
    Dead { dead: usize },
}

impl Relay {
    /// Runs until `stop` turns true (finishing the batch in hand).
    pub(crate) async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut listener: Option<PgListener> = None;
        let mut sampled = Instant::now() - self.poll;
        while !*stop.borrow() {
            if listener.is_none() {
                listener = self.listen().await;
            }
            if sampled.elapsed() >= self.poll {
                self.sample().await;
                sampled = Instant::now();
            }
            // Open: wait (the rows stay in PostgreSQL). Half-open: one row,
            // the probe that may close it (more would only be spooled).
            let limit = match self.publisher.breaker_state() {
                BreakerState::Open => 0,
                BreakerState::HalfOpen => 1,
                BreakerState::Closed => self.batch,
            };
            let full = if limit == 0 {
                false
            } else {
                match self.batch_once(limit).await {
                    Ok(n) => n >= limit as usize,
                    Err(e) => {
                        OutboxRelayFailed { error: &e }.emit(&self.metrics);
                        false
                    }
                }
            };
            if full {
                continue;
            }
            let woken = async {
                match listener.as_mut() {
                    Some(l) => l.try_recv().await.map(|_| ()),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = woken => if r.is_err() { listener = None },
                _ = tokio::time::sleep(self.poll) => {}
                _ = stop.changed() => {}
            }
        }
    }

    async fn listen(&self) -> Option<PgListener> {
        let mut l = PgListener::connect_with(&self.pool).await.ok()?;
        l.listen(CHANNEL).await.ok()?;
        Some(l)
    }

    /// The outbox's depth and oldest row's age, for the gauges.
    async fn sample(&self) {
        let row = sqlx::query(
            "SELECT count(*) AS depth, \
             coalesce(extract(epoch FROM clock_timestamp() - min(created_at)), 0)::float8 AS age \
             FROM flowgate_outbox WHERE dead_reason IS NULL",
        )
        .fetch_one(&self.pool)
        .await;
        if let Ok(row) = row {
            let depth: i64 = row.try_get("depth").unwrap_or(0);
            let age: f64 = row.try_get("age").unwrap_or(0.0);
            OutboxSampled {
                depth,
                oldest: Duration::try_from_secs_f64(age.max(0.0)).unwrap_or_default(),
            }
            .emit(&self.metrics);
        }
    }

    /// Relays one batch of at most `limit` rows; returns how many it took.
    async fn batch_once(&self, limit: u32) -> Result<usize, BatchError> {
        // One round trip for both (see the module docs for the commit mode).
        let mut tx = self
            .pool
            .begin_with("BEGIN; SET LOCAL synchronous_commit = off")
            .await?;
        let rows = sqlx::query(
            "SELECT id, record, \
             extract(epoch FROM clock_timestamp() - created_at)::float8 AS age \
             FROM flowgate_outbox WHERE dead_reason IS NULL \
             ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
        )
        .bind(i64::from(limit))
        .fetch_all(&mut *tx)
        .await?;
        if rows.is_empty() {
            tx.commit().await?;
            return Ok(0);
        }
        let taken = Instant::now();
        let sends = rows.iter().map(|row| async move {
            let id: i64 = row.try_get("id")?;
            let age: f64 = row.try_get("age").unwrap_or(0.0);
            let record: Vec<u8> = row.try_get("record")?;
            let result = match SpoolRecord::decode(&record) {
                Ok(r) => {
                    let mut properties = r.properties;
                    stamp_first_published(&mut properties);
                    let out = Output {
                        exchange: r.exchange,
                        routing_key: r.routing_key,
                        body: r.body.into(),
                        properties,
                    };
                    self.publisher.send(out).await.map_err(|e| {
                        // The message's own fault: it would fail forever.
                        let permanent = matches!(
                            e,
                            flowgate_actors::Error::Unroutable { .. }
                                | flowgate_actors::Error::Invalid(_)
                        );
                        (permanent, e.to_string())
                    })
                }
                Err(e) => Err((true, format!("cannot be decoded: {e}"))),
            };
            Ok::<_, sqlx::Error>((id, age, result))
        });
        // Issued in id order: the publisher keeps that order on its channel.
        let results = futures::future::join_all(sends).await;
        let mut done = Vec::with_capacity(results.len());
        let mut lags = Vec::with_capacity(results.len());
        let mut failed = 0;
        let mut first = None;
        let (mut dead, mut reasons) = (Vec::new(), Vec::new());
        for r in results {
            let (id, age, result) = r?;
            match result {
                Ok(_) => {
                    done.push(id);
                    lags.push(Duration::try_from_secs_f64(age.max(0.0)).unwrap_or_default());
                }
                Err((true, reason)) => {
                    tracing::warn!(row = id, %reason, "outbox row can never be published; marked dead");
                    dead.push(id);
                    reasons.push(reason);
                }
                Err((false, e)) => {
                    failed += 1;
                    first.get_or_insert(e);
                }
            }
        }
        sqlx::query("DELETE FROM flowgate_outbox WHERE id = ANY($1)")
            .bind(&done)
            .execute(&mut *tx)
            .await?;
        if !dead.is_empty() {
            sqlx::query(
                "UPDATE flowgate_outbox o SET dead_reason = d.reason, dead_at = now() \
                 FROM unnest($1::bigint[], $2::text[]) AS d(id, reason) WHERE o.id = d.id",
            )
            .bind(&dead)
            .bind(&reasons)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        let publishing = taken.elapsed();
        for lag in lags {
            OutboxRelayed {
                lag: lag + publishing,
            }
            .emit(&self.metrics);
        }
        match first {
            None if dead.is_empty() => Ok(rows.len()),
            None => Err(BatchError::Dead { dead: dead.len() }),
            Some(first) => Err(BatchError::Publish { failed, first }),
        }
    }
}

/// Deletes inbox rows older than the retention, a bounded chunk at a time,
/// every `every`, until `stop`.
pub(crate) async fn expire_inbox(
    pool: PgPool,
    retention: Duration,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    while !*stop.borrow() {
        loop {
            let deleted = sqlx::query(
                "DELETE FROM flowgate_inbox WHERE ctid IN (SELECT ctid FROM flowgate_inbox \
                 WHERE processed_at < now() - make_interval(secs => $1) LIMIT 10000)",
            )
            .bind(retention.as_secs_f64())
            .execute(&pool)
            .await;
            match deleted {
                Ok(r) if r.rows_affected() == 10000 => continue,
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "inbox retention sweep failed; trying again later");
                    break;
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => {}
        }
    }
}
