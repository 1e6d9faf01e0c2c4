//! The example's configuration: the engine's [`Config`] plus its own
//! `[orders]` section, read from the same file and the same environment
//! (`FLOWGATE__ORDERS__*`) through [`Config::load_with_section`]. The engine
//! knows nothing of `[orders]`; every option is documented here, with its
//! default, and listed in this package's README.

use flowgate::{Config, ConfigError};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::Duration;

/// The name of the example's section.
pub const SECTION: &str = "orders";

/// The TOML of `config/orders.toml`, built into the binary for the demo.
pub const ORDERS_TOML: &str = include_str!("../config/orders.toml");

/// One order flow's whole configuration.
#[derive(Clone, Debug)]
pub struct FlowConfig {
    /// The engine's part: broker, topology, stages, publisher, ...
    pub engine: Config,
    /// `[orders]`.
    pub orders: OrdersConfig,
}

impl FlowConfig {
    /// Loads a file plus environment overrides and validates both parts.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let (engine, orders) = Config::load_with_section::<OrdersConfig>(path, SECTION)?;
        Self::checked(engine, orders)
    }

    /// Parses TOML text plus environment overrides and validates both parts.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let (engine, orders) = Config::from_toml_with_section::<OrdersConfig>(text, SECTION)?;
        Self::checked(engine, orders)
    }

    /// The flow of `config/orders.toml` (built in).
    pub fn default_flow() -> Result<Self, ConfigError> {
        Self::from_toml(ORDERS_TOML)
    }

    fn checked(engine: Config, orders: OrdersConfig) -> Result<Self, ConfigError> {
        orders.validate()?;
        Ok(Self { engine, orders })
    }

    /// The file's text again (for worker processes started from it).
    pub fn to_toml(&self) -> Result<String, String> {
        let mut table = toml::Table::try_from(&self.engine).map_err(|e| e.to_string())?;
        table.insert(
            SECTION.to_owned(),
            toml::Value::try_from(&self.orders).map_err(|e| e.to_string())?,
        );
        toml::to_string(&table).map_err(|e| e.to_string())
    }

    /// A copy with every exchange and queue name prefixed by `prefix.` (so
    /// demos and tests never collide with each other): the engine's
    /// [`Config::uniquely_named`](flowgate::Config::uniquely_named), and the
    /// `[orders]` exchange the same way.
    pub fn uniquely_named(&self, prefix: &str) -> Self {
        let mut c = self.clone();
        c.engine = self.engine.uniquely_named(prefix);
        c.orders.exchange = format!("{prefix}.{}", c.orders.exchange);
        c
    }
}

/// `[orders]`: the order pipeline (`orders.reserve`, `orders.pay`,
/// `orders.ship`, `orders.track` handlers and the HTTP gateway).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OrdersConfig {
    /// Exchange the services publish their events to (`order.created`,
    /// `order.reserved`, `order.paid`, `order.shipped`) when a stage has no
    /// `output`. Default `shop`.
    #[serde(default = "default_orders_exchange")]
    pub exchange: String,
    /// Address of the order gateway (`POST /orders`, `GET /orders/{id}`).
    /// Default `127.0.0.1:8080`. Empty string: no gateway in this process.
    #[serde(default = "default_gateway_bind")]
    pub gateway_bind: String,
    /// Largest `POST /orders` body; larger answers 413. Default `16384`.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: u64,
    /// Gateway admission, a coarse second bound: when the ready messages of
    /// the work stages' input queues added up (as the depth monitor sampled
    /// them every `[depth] interval`) exceed this, `POST /orders` answers
    /// 503 with `Retry-After`. The primary bound is the queues' `watermark`s:
    /// the gateway refuses while the `order.created` queue is above its
    /// watermark, which the stages push back to when their outputs are.
    /// `0` turns the check off. Default `0`.
    #[serde(default = "default_max_backlog")]
    pub max_backlog: u64,
    /// Gateway: most `order.created` publishes awaiting a confirm at once;
    /// beyond it `POST /orders` answers 503. Default `256`.
    #[serde(default = "default_max_pending")]
    pub max_pending: u32,
    /// Units in stock of every SKU not listed in `stock`. Default `100000`.
    #[serde(default = "default_stock_default")]
    pub stock_default: u64,
    /// Units in stock per SKU, overriding `stock_default`
    /// (e.g. `stock = { "sku-limited" = 10 }`). Default none.
    #[serde(default)]
    pub stock: std::collections::BTreeMap<String, u64>,
    /// Simulated payment provider: most charges per second (the throttled
    /// downstream). `0` = unlimited. Default `100`.
    #[serde(default = "default_payment_rate")]
    pub payment_rate: u32,
    /// Simulated payment provider: latency of one charge call. Default `5ms`.
    #[serde(default = "default_payment_latency", with = "humantime_serde")]
    pub payment_latency: Duration,
    /// Simulated payment provider: probability (0.0..=1.0) that a call fails
    /// transiently. Default `0.02`.
    #[serde(default = "default_payment_failure_rate")]
    pub payment_failure_rate: f64,
    /// Calls to the provider per delivery before the handler gives up with
    /// `Outcome::Retry` (the stage's retry ladder takes over). Default `3`.
    #[serde(default = "default_payment_attempts")]
    pub payment_attempts: u32,
    /// Redis URL for the reservation/charge/shipment records and the stock,
    /// so that separate worker processes share them (required when the
    /// services run as separate processes). Default none: in-process memory.
    #[serde(default)]
    pub redis_url: Option<String>,
    /// Prefix of every Redis key. Default `flowgate:orders:`.
    #[serde(default = "default_orders_key_prefix")]
    pub key_prefix: String,
    /// Bound on the in-memory records (reservations, charges, shipments) and
    /// on the status view: beyond it the oldest entries are forgotten (a
    /// redelivery older than that is no longer recognised; its status
    /// answers 404). Default `100000`.
    #[serde(default = "default_record_capacity")]
    pub record_capacity: usize,
    /// Redis records expire this long after the last write. Default `24h`.
    #[serde(default = "default_record_ttl", with = "humantime_serde")]
    pub record_ttl: Duration,
}

fn default_orders_exchange() -> String {
    "shop".into()
}
fn default_gateway_bind() -> String {
    "127.0.0.1:8080".into()
}
fn default_max_body_bytes() -> u64 {
    16 * 1024
}
fn default_max_backlog() -> u64 {
    0
}
fn default_max_pending() -> u32 {
    256
}
fn default_stock_default() -> u64 {
    100_000
}
fn default_payment_rate() -> u32 {
    100
}
fn default_payment_latency() -> Duration {
    Duration::from_millis(5)
}
fn default_payment_failure_rate() -> f64 {
    0.02
}
fn default_payment_attempts() -> u32 {
    3
}
fn default_orders_key_prefix() -> String {
    "flowgate:orders:".into()
}
fn default_record_capacity() -> usize {
    100_000
}
fn default_record_ttl() -> Duration {
    Duration::from_secs(24 * 3600)
}

impl Default for OrdersConfig {
    fn default() -> Self {
        Self {
            exchange: default_orders_exchange(),
            gateway_bind: default_gateway_bind(),
            max_body_bytes: default_max_body_bytes(),
            max_backlog: default_max_backlog(),
            max_pending: default_max_pending(),
            stock_default: default_stock_default(),
            stock: Default::default(),
            payment_rate: default_payment_rate(),
            payment_latency: default_payment_latency(),
            payment_failure_rate: default_payment_failure_rate(),
            payment_attempts: default_payment_attempts(),
            redis_url: None,
            key_prefix: default_orders_key_prefix(),
            record_capacity: default_record_capacity(),
            record_ttl: default_record_ttl(),
        }
    }
}

impl OrdersConfig {
    /// Checks the section; each error names its key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(0.0..=1.0).contains(&self.payment_failure_rate) {
            return Err(ConfigError::new(
                "orders.payment_failure_rate",
                "must be between 0.0 and 1.0",
            ));
        }
        if self.payment_attempts == 0 {
            return Err(ConfigError::new(
                "orders.payment_attempts",
                "must be at least 1",
            ));
        }
        if self.max_pending == 0 {
            return Err(ConfigError::new("orders.max_pending", "must be at least 1"));
        }
        if self.max_body_bytes == 0 {
            return Err(ConfigError::new(
                "orders.max_body_bytes",
                "must be at least 1",
            ));
        }
        if self.record_capacity == 0 {
            return Err(ConfigError::new(
                "orders.record_capacity",
                "must be at least 1",
            ));
        }
        if !self.gateway_bind.is_empty()
            && self.gateway_bind.parse::<std::net::SocketAddr>().is_err()
        {
            return Err(ConfigError::new(
                "orders.gateway_bind",
                format!(
                    "`{}` is not an address like 127.0.0.1:8080",
                    self.gateway_bind
                ),
            ));
        }
        if self.exchange.is_empty() {
            return Err(ConfigError::new("orders.exchange", "must be non-empty"));
        }
        Ok(())
    }
}
