//! The ledger on PostgreSQL: stock, reservations, charges and shipments
//! written by the work services in the transaction flowgate's inbox opens
//! for each delivery ([`TxHandler`]), so the effect, the inbox row
//! `(stage, message id)` and the next event (an outbox row) commit together
//! or not at all. "Reserved once, charged once" is then a property of the
//! database: a redelivery of a committed order finds its inbox row and is
//! acked without calling the handler (an inbox hit), and a copy racing the
//! first waits on that row's lock and then finds it.
//!
//! Used when the engine's `[postgres] url` is set (the demo creates a
//! database of its own); the memory/Redis [`ledger`](crate::ledger) is used
//! otherwise. The status stage (`orders.track`) has no database: it stays a
//! plain handler.
//!
//! The effect tables are journals (one row per effect applied, no unique
//! key on the order id) on purpose: the inbox alone keeps a repeat out, and
//! [`OrdersDb::report`] counts repeats from the rows themselves.
//!
//! The pay service calls the provider inside its transaction: a second
//! copy of the order blocks on the inbox row until the first commits (it
//! then finds it: an inbox hit) or dies (PostgreSQL rolls the first back
//! when its connection drops; the copy goes ahead). That replaces the
//! Redis ledger's charge claim and its lease. A worker killed between the
//! provider's answer and the commit costs one more provider call for the
//! order (answered by the provider's idempotency key: no second charge).

use crate::ledger::StockPolicy;
use crate::model::{Item, Order};
use crate::stages::{self, PAYMENT_UNAVAILABLE};
use crate::status::OrderStatus;
use crate::OrdersService;
use flowgate::config::{PostgresConfig, Target};
use flowgate::postgres::sqlx::{self, PgConnection, PgPool};
use flowgate::postgres::{PgTransaction, TxHandler};
use flowgate::{ConfigError, Delivery, EngineBuilder, HandlerError, Outcome, StageConfig};
use std::collections::BTreeMap;
use std::sync::Arc;
use tracing::{debug, warn};

/// The example's tables (created at start if missing; flowgate's own inbox
/// and outbox come from `flowgate db migrate` or `migrate_on_start`).
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS orders_stock (
    sku   text   PRIMARY KEY,
    units bigint NOT NULL CHECK (units >= 0)
);
CREATE TABLE IF NOT EXISTS orders_reservations (
    order_id text        NOT NULL,
    units    bigint      NOT NULL,
    at       timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS orders_charges (
    order_id  text        NOT NULL,
    charge_id text        NOT NULL,
    at        timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS orders_shipments (
    order_id    text        NOT NULL,
    shipment_id text        NOT NULL,
    at          timestamptz NOT NULL DEFAULT now()
);
";

/// The effect counts, read from the tables themselves.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DbReport {
    /// Orders with a reservation row.
    pub reserved: u64,
    /// Orders with a charge row.
    pub charged: u64,
    /// Orders with a shipment row.
    pub shipped: u64,
    /// Orders with more than one reservation, charge or shipment row: the
    /// effects applied twice (0 unless the inbox failed).
    pub duplicate_effects: u64,
    /// Units left per SKU that was touched.
    pub stock: BTreeMap<String, u64>,
    /// Outbox rows not relayed yet.
    pub outbox_depth: u64,
    /// Inbox rows (stage, message id) committed.
    pub inbox_rows: u64,
}

/// The ledger's database.
pub struct OrdersDb {
    pool: PgPool,
}

impl OrdersDb {
    /// A pool as the engine's `[postgres]` describes it (connects lazily).
    /// Call inside a tokio runtime.
    pub fn connect(cfg: &PostgresConfig) -> Result<Self, ConfigError> {
        Ok(Self {
            pool: flowgate::postgres::connect(cfg)?,
        })
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Creates the example's tables if missing (under an advisory lock: the
    /// chaos run's workers start together).
    pub async fn create_schema(&self) -> Result<(), sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('flowgate-orders schema'))")
            .execute(&mut *tx)
            .await?;
        sqlx::raw_sql(SCHEMA).execute(&mut *tx).await?;
        tx.commit().await
    }

    /// Units of `sku` in stock now.
    pub async fn stock_of(&self, sku: &str, initial: u64) -> Result<u64, sqlx::Error> {
        let n: Option<i64> = sqlx::query_scalar("SELECT units FROM orders_stock WHERE sku = $1")
            .bind(sku)
            .fetch_optional(&self.pool)
            .await?;
        Ok(n.map_or(initial, |n| n.max(0) as u64))
    }

    /// The effect counts.
    pub async fn report(&self) -> Result<DbReport, sqlx::Error> {
        let count = |sql: &'static str| async move {
            sqlx::query_scalar::<_, i64>(sql)
                .fetch_one(&self.pool)
                .await
                .map(|n| n.max(0) as u64)
        };
        let stock: Vec<(String, i64)> = sqlx::query_as("SELECT sku, units FROM orders_stock")
            .fetch_all(&self.pool)
            .await?;
        Ok(DbReport {
            reserved: count("SELECT count(DISTINCT order_id) FROM orders_reservations").await?,
            charged: count("SELECT count(DISTINCT order_id) FROM orders_charges").await?,
            shipped: count("SELECT count(DISTINCT order_id) FROM orders_shipments").await?,
            duplicate_effects: count(
                "SELECT count(*) FROM (
                   SELECT order_id FROM orders_reservations GROUP BY order_id HAVING count(*) > 1
                   UNION ALL
                   SELECT order_id FROM orders_charges GROUP BY order_id HAVING count(*) > 1
                   UNION ALL
                   SELECT order_id FROM orders_shipments GROUP BY order_id HAVING count(*) > 1
                 ) d",
            )
            .await?,
            stock: stock
                .into_iter()
                .map(|(k, v)| (k, v.max(0) as u64))
                .collect(),
            outbox_depth: count("SELECT count(*) FROM flowgate_outbox WHERE dead_reason IS NULL")
                .await?,
            inbox_rows: count("SELECT count(*) FROM flowgate_inbox").await?,
        })
    }

    /// Empties the example's tables.
    pub async fn clear(&self) -> Result<(), sqlx::Error> {
        sqlx::raw_sql(
            "TRUNCATE orders_stock, orders_reservations, orders_charges, orders_shipments",
        )
        .execute(&self.pool)
        .await
        .map(|_| ())
    }
}

/// Takes the order's units from stock in `tx` (SKUs in a fixed order, so
/// two orders never lock each other's rows crosswise) and records the
/// reservation. `Err(sku)`: not enough of `sku` (the caller rolls back: any
/// units taken for the SKUs before it are given back).
async fn reserve(
    tx: &mut PgConnection,
    svc: &OrdersService,
    order: &Order,
) -> Result<Result<(), String>, sqlx::Error> {
    let lines = merged(&order.items);
    for (sku, qty) in &lines {
        let initial = StockPolicy::from_config(&svc.config).initial(sku);
        sqlx::query("INSERT INTO orders_stock (sku, units) VALUES ($1, $2) ON CONFLICT DO NOTHING")
            .bind(sku)
            .bind(i64::try_from(initial).unwrap_or(i64::MAX))
            .execute(&mut *tx)
            .await?;
        let taken = sqlx::query(
            "UPDATE orders_stock SET units = units - $2 WHERE sku = $1 AND units >= $2",
        )
        .bind(sku)
        .bind(i64::try_from(*qty).unwrap_or(i64::MAX))
        .execute(&mut *tx)
        .await?;
        if taken.rows_affected() == 0 {
            return Ok(Err(sku.clone()));
        }
    }
    let units: u64 = lines.iter().map(|(_, q)| q).sum();
    sqlx::query("INSERT INTO orders_reservations (order_id, units) VALUES ($1, $2)")
        .bind(&order.order_id)
        .bind(i64::try_from(units).unwrap_or(i64::MAX))
        .execute(&mut *tx)
        .await?;
    Ok(Ok(()))
}

/// Lines of the same SKU merged, sorted by SKU.
fn merged(items: &[Item]) -> Vec<(String, u64)> {
    let mut m: BTreeMap<&str, u64> = BTreeMap::new();
    for it in items {
        *m.entry(it.sku.as_str()).or_insert(0) += it.qty;
    }
    m.into_iter().map(|(s, q)| (s.to_owned(), q)).collect()
}

fn db_retry(svc: &OrdersService, stage: &str, e: sqlx::Error) -> Outcome {
    svc.stats.count_error("records-unavailable");
    warn!(stage, error = %e, "records unavailable; asking for a retry");
    Outcome::retry("records-unavailable")
}

/// `orders.reserve` on PostgreSQL: takes the stock and records the
/// reservation in the inbox's transaction; out of stock dead-letters (the
/// transaction is rolled back).
pub struct ReserveTx {
    svc: Arc<OrdersService>,
    target: Target,
}

/// `orders.pay` on PostgreSQL: calls the provider (order id as idempotency
/// key) and records the charge in the inbox's transaction.
pub struct PayTx {
    svc: Arc<OrdersService>,
    target: Target,
}

/// `orders.ship` on PostgreSQL: records the shipment in the inbox's
/// transaction.
pub struct ShipTx {
    svc: Arc<OrdersService>,
    target: Target,
}

/// Registers the transactional handler of every work stage of `stages`
/// (`orders.reserve`, `orders.pay`, `orders.ship`) under the stage's name,
/// which wins over the plain handler factories of the same services.
pub fn register(
    svc: &Arc<OrdersService>,
    mut builder: EngineBuilder,
    stages: &[StageConfig],
) -> EngineBuilder {
    use crate::model::{ORDER_PAID, ORDER_RESERVED, ORDER_SHIPPED};
    for s in stages {
        let svc = svc.clone();
        let target = |key| s.output.clone().unwrap_or_else(|| svc.target(key));
        builder = match s.handler.as_str() {
            "orders.reserve" => {
                let target = target(ORDER_RESERVED);
                builder.tx_handler(&s.name, ReserveTx { svc, target })
            }
            "orders.pay" => {
                let target = target(ORDER_PAID);
                builder.tx_handler(&s.name, PayTx { svc, target })
            }
            "orders.ship" => {
                let target = target(ORDER_SHIPPED);
                builder.tx_handler(&s.name, ShipTx { svc, target })
            }
            _ => builder,
        };
    }
    builder
}

#[async_trait::async_trait]
impl TxHandler for ReserveTx {
    async fn handle(&self, tx: &mut PgTransaction, d: &Delivery) -> Result<Outcome, HandlerError> {
        let order = match stages::parse(&self.svc, d) {
            Ok(o) => o,
            Err(out) => return Ok(out),
        };
        match reserve(tx, &self.svc, &order).await {
            Ok(Ok(())) => {
                self.svc.status.advance(
                    &order.order_id,
                    OrderStatus::Reserved,
                    order.created_at_ms,
                );
                Ok(Outcome::ack_with(vec![stages::event(
                    &self.target,
                    d,
                    &order,
                )]))
            }
            Ok(Err(sku)) => {
                self.svc.stats.count_error(stages::OUT_OF_STOCK);
                debug!(order_id = %order.order_id, %sku, "out of stock; dead-lettering");
                Ok(Outcome::dead_letter(stages::OUT_OF_STOCK))
            }
            Err(e) => Ok(db_retry(&self.svc, &d.stage, e)),
        }
    }
}

#[async_trait::async_trait]
impl TxHandler for PayTx {
    async fn handle(&self, tx: &mut PgTransaction, d: &Delivery) -> Result<Outcome, HandlerError> {
        let mut order = match stages::parse(&self.svc, d) {
            Ok(o) => o,
            Err(out) => return Ok(out),
        };
        let mut charged = None;
        for _ in 0..self.svc.config.payment_attempts {
            let (report, res) = self
                .svc
                .payment
                .charge(&order.order_id, &order.order_id)
                .await;
            if report.throttled {
                self.svc.stats.count_throttled();
            }
            match res {
                Ok(c) => {
                    charged = Some(c);
                    break;
                }
                Err(e) => {
                    self.svc.stats.count_error(PAYMENT_UNAVAILABLE);
                    debug!(order_id = %order.order_id, error = %e, "payment call failed");
                }
            }
        }
        let Some(charge) = charged else {
            warn!(order_id = %order.order_id, "payment provider failed every attempt; asking for a retry");
            return Ok(Outcome::retry(PAYMENT_UNAVAILABLE));
        };
        let recorded =
            sqlx::query("INSERT INTO orders_charges (order_id, charge_id) VALUES ($1, $2)")
                .bind(&order.order_id)
                .bind(&charge)
                .execute(&mut **tx)
                .await;
        if let Err(e) = recorded {
            return Ok(db_retry(&self.svc, &d.stage, e));
        }
        order.charge_id = Some(charge);
        self.svc
            .status
            .advance(&order.order_id, OrderStatus::Paid, order.created_at_ms);
        Ok(Outcome::ack_with(vec![stages::event(
            &self.target,
            d,
            &order,
        )]))
    }
}

#[async_trait::async_trait]
impl TxHandler for ShipTx {
    async fn handle(&self, tx: &mut PgTransaction, d: &Delivery) -> Result<Outcome, HandlerError> {
        let mut order = match stages::parse(&self.svc, d) {
            Ok(o) => o,
            Err(out) => return Ok(out),
        };
        let shipment = uuid::Uuid::new_v4().to_string();
        let recorded =
            sqlx::query("INSERT INTO orders_shipments (order_id, shipment_id) VALUES ($1, $2)")
                .bind(&order.order_id)
                .bind(&shipment)
                .execute(&mut **tx)
                .await;
        if let Err(e) = recorded {
            return Ok(db_retry(&self.svc, &d.stage, e));
        }
        order.shipment_id = Some(shipment);
        Ok(Outcome::ack_with(vec![stages::event(
            &self.target,
            d,
            &order,
        )]))
    }
}

/// A database of the demo's own on a PostgreSQL server: created empty
/// with a unique name, dropped (connections and all) by [`drop_it`](Self::drop_it).
pub struct DemoDatabase {
    admin: String,
    name: String,
    url: String,
}

impl DemoDatabase {
    /// Creates `name` on the server `admin_url` logs in to; its URL is the
    /// admin URL with the database's name as path.
    pub async fn create(admin_url: &str, name: &str) -> Result<Self, String> {
        use sqlx::Connection;
        let mut url = url::Url::parse(admin_url).map_err(|e| format!("malformed URL ({e})"))?;
        let host = url.host_str().unwrap_or("127.0.0.1").to_owned();
        let port = url.port().unwrap_or(5432);
        let mut conn = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            sqlx::PgConnection::connect(admin_url),
        )
        .await
        .map_err(|_| format!("no PostgreSQL answers on {host}:{port} within 5s"))?
        .map_err(|e| format!("cannot log in to PostgreSQL on {host}:{port}: {e}"))?;
        sqlx::query(&format!("CREATE DATABASE \"{name}\""))
            .execute(&mut conn)
            .await
            .map_err(|e| format!("CREATE DATABASE {name}: {e}"))?;
        let _ = conn.close().await;
        url.set_path(name);
        Ok(Self {
            admin: admin_url.to_owned(),
            name: name.to_owned(),
            url: url.to_string(),
        })
    }

    /// The database's URL (never printed: it may hold a password).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Drops it, closing whatever is still connected.
    pub async fn drop_it(self) {
        use sqlx::Connection;
        match sqlx::PgConnection::connect(&self.admin).await {
            Ok(mut conn) => {
                let dropped = sqlx::query(&format!(
                    "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
                    self.name
                ))
                .execute(&mut conn)
                .await;
                if let Err(e) = dropped {
                    warn!(database = %self.name, error = %e, "could not drop the demo's database");
                }
                let _ = conn.close().await;
            }
            Err(e) => {
                warn!(database = %self.name, error = %e, "could not drop the demo's database")
            }
        }
    }
}

/// The engine's outbox relay as the demo reports it.
#[derive(Clone, Debug, Default)]
pub struct RelayFigures {
    /// Rows published and deleted.
    pub relayed: u64,
    /// Batches that failed (their rows were tried again).
    pub errors: u64,
    /// Mean commit → confirmed-publish lag.
    pub mean_lag: Option<std::time::Duration>,
    /// The upper bound of the histogram bucket holding the 99th percentile.
    pub p99_lag_at_most: Option<std::time::Duration>,
}

impl RelayFigures {
    /// From the engine's metrics.
    pub fn of(engine: &flowgate::EngineHandle) -> Self {
        let m = engine.metrics();
        let mut f = Self {
            relayed: m.counter(flowgate::Metrics::OUTBOX_RELAYED, &[]),
            errors: m.counter(flowgate::Metrics::OUTBOX_RELAY_ERRORS, &[]),
            ..Default::default()
        };
        let name = flowgate::Metrics::OUTBOX_RELAY_LAG.name;
        for family in m.registry().gather() {
            if family.name() != name {
                continue;
            }
            for metric in family.get_metric() {
                let h = metric.get_histogram();
                let count = h.get_sample_count();
                if count == 0 {
                    continue;
                }
                f.mean_lag =
                    std::time::Duration::try_from_secs_f64(h.get_sample_sum() / count as f64).ok();
                let want = (count as f64 * 0.99).ceil() as u64;
                f.p99_lag_at_most = h
                    .get_bucket()
                    .iter()
                    .find(|b| b.cumulative_count() >= want)
                    .and_then(|b| std::time::Duration::try_from_secs_f64(b.upper_bound()).ok());
            }
        }
        f
    }
}
