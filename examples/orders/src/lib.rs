//! The order pipeline: the worked example, from an HTTP order to a shipment.
//!
//! ```text
//!  POST /orders ──▶ gateway ──order.created──▶ [orders.created] ──▶ reserve
//!                     ▲                                               │ order.reserved
//!  GET /orders/{id}   │                         [orders.reserved] ◀───┘
//!                     │                              │
//!                status view ◀── track ◀─┐           ▼
//!                     ▲                  │          pay (throttled provider)
//!                     │     [orders.shipped]         │ order.paid
//!                     │                  ▲    [orders.paid] ──▶ ship ──order.shipped──┘
//!                     └── track ◀── [orders.failed] ◀── copies of every dead letter
//! ```
//!
//! * [`model`] — the order, its validation and the event body.
//! * [`status`] — the bounded status view behind `GET /orders/{id}`.
//! * [`ledger`] — stock and the reservation/charge/shipment records that make
//!   each service idempotent (memory, or Redis for separate processes).
//! * [`db`] — the same records on PostgreSQL, written in flowgate's inbox
//!   transaction (when the engine's `[postgres] url` is set).
//! * [`payment`] — the simulated, rate-limited payment provider.
//! * [`stages`] — the handlers `orders.reserve`, `orders.pay`, `orders.ship`,
//!   `orders.track`.
//! * [`gateway`] — the HTTP gateway.
//! * [`config`] — `[orders]`, read from the engine's file through
//!   `Config::load_with_section`, and [`FlowConfig`], both parts together.
//! * [`load`] — `flowgate-orders load`, the HTTP load generator and its summary.
//! * [`chaos`] — worker processes killed and restarted during a run.
//! * [`demo`] — `flowgate-orders demo`, the whole flow end to end with a summary.
//!
//! [`start`] runs the whole flow in one process (the `run` command, the
//! demo, the embedded example); [`OrdersService`] holds what the stages
//! share. It is a client of flowgate like any host: the order services are
//! handler factories registered by name, the gateway publishes through the
//! engine's [`Ingress`](flowgate::Ingress) and is served and stopped by the
//! engine ([`EngineHandle::serve`]).

pub mod chaos;
pub mod config;
pub mod db;
pub mod demo;
pub mod gateway;
pub mod ledger;
pub mod load;
pub mod model;
pub mod payment;
pub mod stages;
pub mod status;

pub use config::{FlowConfig, OrdersConfig};

use dashmap::DashMap;
use flowgate::config::Target;
use flowgate::{ConfigError, Engine, EngineBuilder, EngineHandle, Handler, StageConfig};
use ledger::{Ledger, MemoryLedger, RedisLedger, StockPolicy};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tracing::info;

/// Handler names of the order services (built-ins).
pub const HANDLERS: [&str; 4] = [
    "orders.reserve",
    "orders.pay",
    "orders.ship",
    "orders.track",
];

/// The services that do the work (everything but `orders.track`).
pub const WORK_HANDLERS: [&str; 3] = ["orders.reserve", "orders.pay", "orders.ship"];

/// Bound on the order-to-shipped latencies kept for percentiles.
const MAX_LATENCY_SAMPLES: usize = 100_000;

/// Counters of one process's order services.
#[derive(Default)]
pub struct Stats {
    shipped: AtomicU64,
    throttled: AtomicU64,
    /// reason → orders (a handful of stable reasons)
    failed: DashMap<String, u64>,
    /// error site → count
    errors: DashMap<&'static str, u64>,
    /// order-to-shipped latencies in ms (reservoir-sampled beyond the bound)
    latencies: Mutex<(Vec<u64>, u64)>,
}

impl Stats {
    pub(crate) fn count_shipped(&self, created_at_ms: u64) {
        self.shipped.fetch_add(1, Ordering::Relaxed);
        if created_at_ms == 0 {
            return;
        }
        let ms = model::now_ms().saturating_sub(created_at_ms);
        let mut l = self.latencies.lock().unwrap_or_else(|p| p.into_inner());
        l.1 += 1;
        if l.0.len() < MAX_LATENCY_SAMPLES {
            l.0.push(ms);
        } else {
            let j = fastrand::u64(0..l.1) as usize;
            if j < MAX_LATENCY_SAMPLES {
                l.0[j] = ms;
            }
        }
    }
    pub(crate) fn count_failed(&self, reason: &str) {
        *self.failed.entry(reason.to_owned()).or_insert(0) += 1;
    }
    pub(crate) fn count_error(&self, site: &'static str) {
        *self.errors.entry(site).or_insert(0) += 1;
    }
    pub(crate) fn count_throttled(&self) {
        self.throttled.fetch_add(1, Ordering::Relaxed);
    }

    /// Orders marked shipped by this process's status stage.
    pub fn shipped(&self) -> u64 {
        self.shipped.load(Ordering::Relaxed)
    }
    /// Payment calls in this process that waited for the rate limit.
    pub fn throttled(&self) -> u64 {
        self.throttled.load(Ordering::Relaxed)
    }
    /// Orders marked failed, by reason.
    pub fn failed(&self) -> BTreeMap<String, u64> {
        self.failed
            .iter()
            .map(|e| (e.key().clone(), *e.value()))
            .collect()
    }
    /// Error and drop sites, by site.
    pub fn errors(&self) -> BTreeMap<String, u64> {
        self.errors
            .iter()
            .map(|e| ((*e.key()).to_owned(), *e.value()))
            .collect()
    }
    /// A latency percentile (0.0..=1.0) in ms, if any order shipped.
    pub fn latency_ms(&self, p: f64) -> Option<u64> {
        let l = self.latencies.lock().unwrap_or_else(|p| p.into_inner());
        percentile(&l.0, p)
    }
}

/// A percentile of unsorted samples.
pub fn percentile(samples: &[u64], p: f64) -> Option<u64> {
    if samples.is_empty() {
        return None;
    }
    let mut v = samples.to_vec();
    v.sort_unstable();
    let idx = ((v.len() - 1) as f64 * p.clamp(0.0, 1.0)).round() as usize;
    v.get(idx).copied()
}

/// What the order stages of one process share: settings, the status view,
/// the effect records and the payment provider.
pub struct OrdersService {
    /// `[orders]`.
    pub config: OrdersConfig,
    /// Behind `GET /orders/{id}`.
    pub status: status::StatusView,
    /// Stock and the reservation/charge/shipment records (memory or Redis),
    /// when the work stages run without a database.
    pub ledger: Arc<dyn Ledger>,
    /// The records on PostgreSQL, when the engine's `[postgres] url` is set:
    /// the work stages then write them in the inbox's transaction.
    pub db: Option<Arc<db::OrdersDb>>,
    /// The simulated payment provider (and its books).
    pub payment: payment::PaymentProvider,
    /// Counters.
    pub stats: Stats,
}

impl OrdersService {
    /// Builds the service for `[orders]`: Redis records when `redis_url` is
    /// set (connected lazily), in-memory records otherwise.
    pub fn new(cfg: &OrdersConfig) -> Result<Arc<Self>, ConfigError> {
        Self::with_db(cfg, None)
    }

    /// [`new`](Self::new) with the records on PostgreSQL.
    pub fn with_db(
        cfg: &OrdersConfig,
        db: Option<Arc<db::OrdersDb>>,
    ) -> Result<Arc<Self>, ConfigError> {
        let stock = StockPolicy::from_config(cfg);
        let ledger: Arc<dyn Ledger> = match &cfg.redis_url {
            Some(url) => Arc::new(
                RedisLedger::new(url, &cfg.key_prefix, stock, cfg.record_ttl)
                    .map_err(|e| ConfigError::with_source("orders.redis_url", e.to_string(), e))?,
            ),
            None => Arc::new(MemoryLedger::new(stock, cfg.record_capacity)),
        };
        Ok(Arc::new(Self {
            config: cfg.clone(),
            status: status::StatusView::new(cfg.record_capacity),
            ledger,
            db,
            payment: payment::PaymentProvider::from_config(cfg)
                .map_err(|e| ConfigError::with_source("orders.redis_url", e.to_string(), e))?,
            stats: Stats::default(),
        }))
    }

    /// Deletes the records and the provider's books (demo and test cleanup).
    pub async fn clear_records(&self) -> Result<(), ledger::LedgerError> {
        let books = self.payment.clear().await;
        self.ledger.clear().await?;
        if let Some(db) = &self.db {
            db.clear()
                .await
                .map_err(|e| ledger::LedgerError(e.to_string()))?;
        }
        books
    }

    /// Units of `sku` in stock, from the records the work stages write.
    pub async fn stock_of(&self, sku: &str) -> Result<u64, ledger::LedgerError> {
        match &self.db {
            Some(db) => db
                .stock_of(sku, StockPolicy::from_config(&self.config).initial(sku))
                .await
                .map_err(|e| ledger::LedgerError(e.to_string())),
            None => self.ledger.stock_of(sku).await,
        }
    }

    /// `<[orders] exchange>` / `routing_key`.
    pub fn target(&self, routing_key: &str) -> Target {
        Target {
            exchange: self.config.exchange.clone(),
            routing_key: routing_key.to_owned(),
        }
    }

    /// The handler of a stage whose `handler` is one of [`HANDLERS`].
    pub fn handler_for(self: &Arc<Self>, stage: &StageConfig) -> Option<Arc<dyn Handler>> {
        let svc = self.clone();
        let out = stage.output.clone();
        Some(match stage.handler.as_str() {
            "orders.reserve" => Arc::new(stages::Reserve::new(svc, out)),
            "orders.pay" => Arc::new(stages::Pay::new(svc, out)),
            "orders.ship" => Arc::new(stages::Ship::new(svc, out)),
            "orders.track" => Arc::new(stages::Track::new(svc)),
            _ => return None,
        })
    }

    /// Registers the order services as handler factories, one per name of
    /// [`HANDLERS`]: each stage naming one gets its own handler (with its
    /// own `output`) over this shared service.
    pub fn register(self: &Arc<Self>, mut builder: EngineBuilder) -> EngineBuilder {
        for name in HANDLERS {
            let svc = self.clone();
            builder = builder.handler_factory(name, move |stage: &StageConfig| {
                svc.handler_for(stage)
                    .ok_or_else(|| format!("`{}` is not an order service", stage.handler))
            });
        }
        builder
    }
}

/// Why the order flow could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OrdersError {
    /// The configuration is invalid (either part).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The engine did not start.
    #[error(transparent)]
    Start(#[from] flowgate::Error),
    /// The gateway could not bind.
    #[error("order gateway: {0}")]
    Gateway(#[source] std::io::Error),
}

/// The order flow running in this process: the engine with its stages, the
/// shared service and the gateway (when `[orders] gateway_bind` is set).
pub struct OrdersApp {
    engine: EngineHandle,
    service: Arc<OrdersService>,
    gateway: Option<std::net::SocketAddr>,
}

/// Starts the flow of `config`: its stages (order handlers from a shared
/// [`OrdersService`]), and with a gateway bind the gateway, which admits
/// orders by the engine's depth monitor (queue watermarks). Must run
/// inside an actix `System` ([`flowgate::run_system`]).
pub async fn start(config: FlowConfig) -> Result<OrdersApp, OrdersError> {
    start_with(config, Engine::builder()).await
}

/// [`start`] with a builder that already holds the host's own handlers.
pub async fn start_with(
    config: FlowConfig,
    builder: EngineBuilder,
) -> Result<OrdersApp, OrdersError> {
    let FlowConfig { engine, orders } = config;
    let db = if engine.postgres.is_set() {
        let db = db::OrdersDb::connect(&engine.postgres)?;
        db.create_schema().await.map_err(|e| {
            ConfigError::with_source("postgres.url", "cannot create the order tables", e)
        })?;
        Some(Arc::new(db))
    } else {
        None
    };
    let service = OrdersService::with_db(&orders, db)?;
    let mut builder = service.register(builder);
    if service.db.is_some() {
        builder = db::register(&service, builder, &engine.stages);
    }
    let handle = builder.config(engine.clone()).build()?.start().await?;
    let gateway = if orders.gateway_bind.is_empty() {
        None
    } else {
        let backlog_queues = engine
            .stages
            .iter()
            .filter(|s| WORK_HANDLERS.contains(&s.handler.as_str()))
            .map(|s| s.queue.clone())
            .collect();
        let state =
            gateway::GatewayState::new(handle.ingress().clone(), service.clone(), backlog_queues);
        let addr = match gateway::serve(&handle, &orders.gateway_bind, state) {
            Ok(a) => a,
            Err(e) => {
                handle.shutdown().await;
                return Err(OrdersError::Gateway(e));
            }
        };
        info!(%addr, "order gateway listening");
        Some(addr)
    };
    Ok(OrdersApp {
        engine: handle,
        service,
        gateway,
    })
}

impl OrdersApp {
    /// The engine.
    pub fn engine(&self) -> &EngineHandle {
        &self.engine
    }
    /// The shared service (status view, records, stats).
    pub fn service(&self) -> &Arc<OrdersService> {
        &self.service
    }
    /// The gateway's address, if it runs here.
    pub fn gateway_addr(&self) -> Option<std::net::SocketAddr> {
        self.gateway
    }
    /// Stops the gateway (no new orders), then drains the engine.
    pub async fn shutdown(&self) -> flowgate::ShutdownReport {
        self.engine.shutdown().await
    }
}

/// Deletes the exchanges and queues of `cfg` (a demo's or a test's
/// uniquely named copy) from the broker at `url`.
pub async fn delete_topology(url: &str, cfg: &flowgate::Config) {
    use flowgate::lapin::{Connection, ConnectionProperties};
    if let Ok(conn) = Connection::connect(url, ConnectionProperties::default()).await {
        if let Ok(ch) = conn.create_channel().await {
            if let Err(e) = flowgate::topology::delete(&ch, cfg).await {
                tracing::warn!(error = %e, "cleanup failed");
            }
            // Close the channel before the connection, or lapin reports a
            // connection error for the channel dropped mid-close.
            let _ = ch.close(200, "cleanup".into()).await;
        }
        let _ = conn.close(200, "cleanup".into()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_config_is_valid_and_renames_cleanly() {
        let c = FlowConfig::default_flow().unwrap();
        assert!(c
            .engine
            .stages
            .iter()
            .any(|s| HANDLERS.contains(&s.handler.as_str())));
        let r = c.uniquely_named("x1");
        let svc = OrdersService::new(&r.orders).unwrap();
        svc.register(Engine::builder())
            .config(r.engine.clone())
            .build()
            .unwrap();
        assert!(r.engine.queues.iter().all(|q| q.name.starts_with("x1.")));
        let failed = r
            .engine
            .queues
            .iter()
            .find(|q| q.name == "x1.orders.failed")
            .unwrap();
        assert!(failed
            .bindings
            .iter()
            .any(|b| b.exchange == "x1.orders.created.dlx"));
        assert_eq!(r.orders.exchange, "x1.shop");
    }

    #[test]
    fn the_section_round_trips_through_the_worker_file() {
        let c = FlowConfig::default_flow().unwrap().uniquely_named("x2");
        let back = FlowConfig::from_toml(&c.to_toml().unwrap()).unwrap();
        assert_eq!(back.orders.exchange, "x2.shop");
        assert_eq!(back.engine.stages.len(), c.engine.stages.len());
    }

    #[test]
    fn percentiles() {
        assert_eq!(percentile(&[], 0.5), None);
        assert_eq!(percentile(&[5, 1, 3], 0.5), Some(3));
        assert_eq!(percentile(&[5, 1, 3], 1.0), Some(5));
    }
}
