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
//! * [`payment`] — the simulated, rate-limited payment provider.
//! * [`stages`] — the handlers `orders.reserve`, `orders.pay`, `orders.ship`,
//!   `orders.track`.
//! * [`gateway`] — the HTTP gateway.
//! * [`load`] — `flowgate load`, the HTTP load generator and its summary.
//! * [`chaos`] — worker processes killed and restarted during a run.
//!
//! [`start`] runs the whole flow in one process (the daemon, the demo, the
//! embedded example); [`OrdersService`] holds what the stages share.

pub mod chaos;
pub mod gateway;
pub mod ledger;
pub mod load;
pub mod model;
pub mod payment;
pub mod stages;
pub mod status;

use crate::config::{Config, ConfigError, OrdersConfig, StageConfig, Target};
use crate::engine::{EngineBuilder, EngineHandle, StartError};
use crate::Engine;
use dashmap::DashMap;
use flowgate_actors::Handler;
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

/// The TOML of `config/orders.toml`, built into the binary for the demo.
pub const ORDERS_TOML: &str = include_str!("../../config/orders.toml");

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
    /// Stock and the reservation/charge/shipment records.
    pub ledger: Arc<dyn Ledger>,
    /// The simulated payment provider.
    pub payment: payment::PaymentProvider,
    /// Counters.
    pub stats: Stats,
}

impl OrdersService {
    /// Builds the service for `[orders]`: Redis records when `redis_url` is
    /// set (connected lazily), in-memory records otherwise.
    pub fn new(cfg: &OrdersConfig) -> Result<Arc<Self>, ConfigError> {
        let stock = StockPolicy::from_config(cfg);
        let ledger: Arc<dyn Ledger> = match &cfg.redis_url {
            Some(url) => Arc::new(
                RedisLedger::new(url, &cfg.key_prefix, stock, cfg.record_ttl)
                    .map_err(|e| ConfigError::new("orders.redis_url", e.to_string()))?,
            ),
            None => Arc::new(MemoryLedger::new(stock, cfg.record_capacity)),
        };
        Ok(Arc::new(Self {
            config: cfg.clone(),
            status: status::StatusView::new(cfg.record_capacity),
            ledger,
            payment: payment::PaymentProvider::from_config(cfg),
            stats: Stats::default(),
        }))
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

    /// Registers this service's handler for every order stage of `config`
    /// (by stage name, so each stage keeps its own `output`).
    pub fn register(
        self: &Arc<Self>,
        mut builder: EngineBuilder,
        config: &Config,
    ) -> EngineBuilder {
        for s in &config.stages {
            if let Some(h) = self.handler_for(s) {
                builder = builder.handler_arc(&s.name, h);
            }
        }
        builder
    }
}

/// True when a config runs any order stage.
pub fn uses_orders(config: &Config) -> bool {
    config
        .stages
        .iter()
        .any(|s| HANDLERS.contains(&s.handler.as_str()))
}

/// The order flow running in this process: the engine with its stages, the
/// shared service and the gateway (when `[orders] gateway_bind` is set).
pub struct OrdersApp {
    engine: EngineHandle,
    service: Arc<OrdersService>,
    gateway: Option<gateway::Gateway>,
}

/// Starts the flow of `config`: its stages (order handlers from a shared
/// [`OrdersService`]), and with a gateway bind the gateway, which admits
/// orders by the engine's depth monitor (queue watermarks). Must run
/// inside an actix `System` ([`crate::run_system`]).
pub async fn start(config: Config) -> Result<OrdersApp, StartError> {
    start_with(config, Engine::builder()).await
}

/// [`start`] with a builder that already holds the host's own handlers.
pub async fn start_with(config: Config, builder: EngineBuilder) -> Result<OrdersApp, StartError> {
    let service = OrdersService::new(&config.orders)?;
    let engine = service
        .register(builder, &config)
        .config(config.clone())
        .build()?
        .start()
        .await?;
    let gateway = if config.orders.gateway_bind.is_empty() {
        None
    } else {
        let backlog_queues = config
            .stages
            .iter()
            .filter(|s| WORK_HANDLERS.contains(&s.handler.as_str()))
            .map(|s| s.queue.clone())
            .collect();
        let gw = gateway::Gateway::start(
            &config.orders.gateway_bind,
            gateway::GatewayState::new(
                engine.publisher().clone(),
                service.clone(),
                Some(engine.ingress_gate().clone()),
                backlog_queues,
            ),
        )
        .map_err(|e| StartError::Http(format!("order gateway: {e}")))?;
        info!(addr = %gw.addr(), "order gateway listening");
        Some(gw)
    };
    Ok(OrdersApp {
        engine,
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
        self.gateway.as_ref().map(|g| g.addr())
    }
    /// Queue depths, peaks and watermark states as the engine's depth
    /// monitor last sampled them (every queue with a watermark or a stage).
    pub fn queue_levels(&self) -> &flowgate_actors::depth::QueueLevels {
        self.engine.queue_levels()
    }
    /// Stops the gateway (no new orders), then drains the engine.
    pub async fn shutdown(&self) -> crate::ShutdownReport {
        if let Some(g) = &self.gateway {
            g.stop().await;
        }
        self.engine.shutdown().await
    }
}

/// A copy of `config` with every exchange and queue name prefixed by
/// `prefix.` (so demos and tests never collide with each other).
pub fn uniquely_named(config: &Config, prefix: &str) -> Config {
    let p = |n: &str| format!("{prefix}.{n}");
    let mut c = config.clone();
    for e in &mut c.exchanges {
        e.name = p(&e.name);
    }
    for q in &mut c.queues {
        q.name = p(&q.name);
        for b in &mut q.bindings {
            b.exchange = p(&b.exchange);
        }
    }
    for s in &mut c.stages {
        s.queue = p(&s.queue);
        if let Some(o) = &mut s.output {
            o.exchange = p(&o.exchange);
        }
    }
    c.orders.exchange = p(&c.orders.exchange);
    c.amqp.connection_name = prefix.to_owned();
    c
}

/// The flow of `config/orders.toml` (built in).
pub fn default_config() -> Result<Config, ConfigError> {
    Config::from_toml(ORDERS_TOML)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_config_is_valid_and_renames_cleanly() {
        let c = default_config().unwrap();
        assert!(uses_orders(&c));
        let r = uniquely_named(&c, "x1");
        crate::config::validate(&r, Some(&crate::handlers::builtin_names())).unwrap();
        assert!(r.queues.iter().all(|q| q.name.starts_with("x1.")));
        let failed = r
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
    fn percentiles() {
        assert_eq!(percentile(&[], 0.5), None);
        assert_eq!(percentile(&[5, 1, 3], 0.5), Some(3));
        assert_eq!(percentile(&[5, 1, 3], 1.0), Some(5));
    }
}
