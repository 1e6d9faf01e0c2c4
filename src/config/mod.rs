//! Configuration: TOML files loaded with the `config` crate, every key
//! overridable from the environment as `FLOWGATE__SECTION__KEY`.
//!
//! One file per section (`amqp.rs` is `[amqp]`, ...); this file holds the
//! whole [`Config`], its loading (with a host's own section) and the one
//! [`ConfigError`]. Every option is documented where it is declared, with its
//! default. The README's configuration reference is generated from the same
//! text.

mod amqp;
mod dedup;
mod depth;
mod env;
mod exchanges;
mod files;
mod http;
mod ingress;
mod limits;
mod log;
mod management;
mod partitioning;
mod postgres;
mod publisher;
mod queues;
mod redis;
mod security;
mod shutdown;
mod spool;
mod stages;
mod supervisor;
mod telemetry;
mod unique;
mod validate;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use amqp::*;
pub use dedup::*;
pub use depth::*;
pub use exchanges::*;
pub use http::*;
pub use ingress::{IngressAuth, IngressConfig, IngressRoute, Tokens, MIN_TOKEN_BYTES};
pub use limits::*;
pub use log::*;
pub use management::*;
pub use partitioning::*;
pub use postgres::*;
pub use publisher::*;
pub use queues::*;
pub use redis::*;
pub use security::*;
pub use shutdown::*;
pub use spool::*;
pub use stages::*;
pub use supervisor::*;
pub use telemetry::*;
pub use validate::validate;

/// A configuration problem, naming the key at fault.
#[derive(Debug, thiserror::Error)]
#[error("config key `{key}`: {reason}")]
pub struct ConfigError {
    /// The offending key, as a path (`stages[0].prefetch`).
    pub key: String,
    /// Why it is wrong.
    pub reason: String,
    /// The underlying error, when another component reported it (a handler
    /// factory, the Redis client).
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl ConfigError {
    /// A problem with `key`: a host checking its own section (see
    /// [`Config::load_with_section`]) reports it the same way.
    pub fn new(key: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            reason: reason.into(),
            source: None,
        }
    }

    /// The same, keeping the error that caused it as its source.
    pub fn with_source(
        key: impl Into<String>,
        reason: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Self {
            source: Some(source.into()),
            ..Self::new(key, reason)
        }
    }
}

/// The whole configuration.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The broker.
    #[serde(default)]
    pub amqp: AmqpConfig,
    /// The HTTP server of metrics and health.
    #[serde(default)]
    pub http: HttpConfig,
    /// The HTTP publish ingress: its own listener, tokens, routes, bounds.
    #[serde(default)]
    pub ingress: IngressConfig,
    /// The management API: its own listener and tokens.
    #[serde(default)]
    pub management: ManagementConfig,
    /// Exchanges to declare.
    #[serde(default)]
    pub exchanges: Vec<ExchangeConfig>,
    /// Queues to declare (with their dead-letter exchange and queue).
    #[serde(default)]
    pub queues: Vec<QueueConfig>,
    /// Processing stages, one per consumed queue.
    #[serde(default)]
    pub stages: Vec<StageConfig>,
    /// Which partitions of the partitioned queues this instance consumes.
    #[serde(default)]
    pub partitioning: PartitioningConfig,
    /// Publishing.
    #[serde(default)]
    pub publisher: PublisherConfig,
    /// Graceful shutdown.
    #[serde(default)]
    pub shutdown: ShutdownConfig,
    /// Actor restart policy.
    #[serde(default)]
    pub supervisor: SupervisorConfig,
    /// Size limits.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Deduplication settings shared by every stage with `dedup` on.
    #[serde(default)]
    pub dedup: DedupConfig,
    /// The Redis server of the `redis` dedup backend.
    #[serde(default)]
    pub redis: RedisConfig,
    /// The host's PostgreSQL: the transactional inbox and the outbox relay.
    #[serde(default)]
    pub postgres: PostgresConfig,
    /// The durable publish spool used while the circuit breaker is open.
    #[serde(default)]
    pub spool: SpoolConfig,
    /// Queue depth sampling, watermarks and autoscaling.
    #[serde(default)]
    pub depth: DepthConfig,
    /// HMAC message signing: the key, and whether publishes are signed.
    #[serde(default)]
    pub security: SecurityConfig,
    /// OpenTelemetry trace export.
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    /// The daemon's log format.
    #[serde(default)]
    pub log: LogConfig,
}

/// Shortest key accepted, in bytes.
pub const MIN_KEY_BYTES: usize = 16;

fn file_source(path: &Path) -> config::File<config::FileSourceFile, config::FileFormat> {
    config::File::from(path).format(config::FileFormat::Toml)
}

fn toml_source(text: &str) -> config::File<config::FileSourceString, config::FileFormat> {
    config::File::from_str(text, config::FileFormat::Toml)
}

/// The `config` crate writes a key below an array element without its dot
/// (`stages[0]prefetch`); put it back (`stages[0].prefetch`).
fn dotted(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len() + 4);
    let mut chars = msg.chars().peekable();
    while let Some(c) = chars.next() {
        out.push(c);
        if c == ']'
            && chars
                .peek()
                .is_some_and(|n| n.is_alphanumeric() || *n == '_')
        {
            out.push('.');
        }
    }
    out
}

fn source_error(e: config::ConfigError) -> ConfigError {
    let msg = dotted(&e.to_string());
    // The `config` crate names the key as "for key `a.b`" in most messages.
    let key = msg
        .split("key `")
        .nth(1)
        .and_then(|r| r.split('`').next())
        .map(str::to_owned)
        .or_else(|| {
            msg.split("unknown field `")
                .nth(1)
                .and_then(|r| r.split('`').next())
                .map(str::to_owned)
        })
        .or_else(|| {
            msg.split("missing field `")
                .nth(1)
                .and_then(|r| r.split('`').next())
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "<file>".into());
    ConfigError::with_source(key, msg, e)
}

impl Config {
    /// Loads a file (TOML) plus `FLOWGATE__*` environment overrides, then
    /// validates everything but handler names (see [`Engine`](crate::Engine)).
    /// A key the engine does not know is an error.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Self::load_from::<_, ()>(file_source(path), None).map(|(c, _)| c)
    }

    /// Parses TOML text plus environment overrides, then validates.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        Self::load_from::<_, ()>(toml_source(text), None).map(|(c, _)| c)
    }

    /// [`load`](Self::load) for a host with a section of its own in the same
    /// file: `[name]` (with its `FLOWGATE__NAME__*` overrides) is taken out
    /// and deserialized into `T` (its `Default` when the file has none);
    /// everything else is the engine's, which still refuses unknown keys.
    /// The engine does not validate `T`: that is the host's.
    ///
    /// ```
    /// #[derive(serde::Deserialize, Default)]
    /// struct Shop {
    ///     #[serde(default)]
    ///     greeting: String,
    /// }
    /// let (config, shop) = flowgate::Config::from_toml_with_section::<Shop>(
    ///     "[shop]\ngreeting = \"hello\"\n[http]\nbind = \"\"\n",
    ///     "shop",
    /// )?;
    /// assert_eq!(shop.greeting, "hello");
    /// assert!(config.http.bind.is_empty());
    /// # Ok::<(), flowgate::ConfigError>(())
    /// ```
    pub fn load_with_section<T>(path: &Path, name: &str) -> Result<(Config, T), ConfigError>
    where
        T: DeserializeOwned + Default,
    {
        Self::load_from(file_source(path), Some(name)).map(|(c, t)| (c, t.unwrap_or_default()))
    }

    /// [`from_toml`](Self::from_toml) with a host section, as
    /// [`load_with_section`](Self::load_with_section).
    pub fn from_toml_with_section<T>(text: &str, name: &str) -> Result<(Config, T), ConfigError>
    where
        T: DeserializeOwned + Default,
    {
        Self::load_from(toml_source(text), Some(name)).map(|(c, t)| (c, t.unwrap_or_default()))
    }

    fn load_from<S, T>(source: S, section: Option<&str>) -> Result<(Config, Option<T>), ConfigError>
    where
        S: config::Source + Send + Sync + 'static,
        T: DeserializeOwned,
    {
        let built = env::layered(source)?;
        let (cfg, host): (Config, Option<T>) = match section {
            None => (built.try_deserialize().map_err(source_error)?, None),
            Some(name) => {
                let mut root: config::Map<String, config::Value> =
                    built.try_deserialize().map_err(source_error)?;
                let host = root
                    .remove(name)
                    .map(|v| v.try_deserialize::<T>())
                    .transpose()
                    .map_err(|e| {
                        let mut e = source_error(e);
                        e.key = if e.key == "<file>" {
                            name.to_owned()
                        } else {
                            format!("{name}.{}", e.key)
                        };
                        e
                    })?;
                let cfg = config::Value::new(None, root)
                    .try_deserialize()
                    .map_err(source_error)?;
                (cfg, host)
            }
        };
        // Handler names are checked when the engine is built, against the
        // built-ins plus what the host registered.
        validate(&cfg, None)?;
        Ok((cfg, host))
    }

    /// Looks up a queue by name.
    pub fn queue(&self, name: &str) -> Option<&QueueConfig> {
        self.queues.iter().find(|q| q.name == name)
    }

    /// The `[[queues]]` entry a broker queue belongs to: the queue itself,
    /// or the partitioned queue whose partition it is.
    pub fn queue_of(&self, broker_queue: &str) -> Option<&QueueConfig> {
        self.queue(broker_queue).or_else(|| {
            self.queues.iter().find(|q| {
                q.partitions.is_some() && q.broker_queues().iter().any(|b| b == broker_queue)
            })
        })
    }

    /// What a stage consumes on this instance, as (the consumer's stage
    /// name, its queue): the stage and its queue, or on a partitioned
    /// queue (`queues[].partitions`) `<stage>.<p>` and `<queue>.<p>` for
    /// each partition `p` that `[partitioning]` gives this instance.
    pub fn consumers(&self, stage: &StageConfig) -> Vec<(String, String)> {
        match self
            .queue(&stage.queue)
            .and_then(|q| Some((q, q.partitions?)))
        {
            Some((q, n)) => (0..n)
                .filter(|&p| self.partitioning.owns(p))
                .map(|p| (format!("{}.{p}", stage.name), q.partition_queue(p)))
                .collect(),
            None => vec![(stage.name.clone(), stage.queue.clone())],
        }
    }
}

#[cfg(test)]
mod section_tests {
    use super::*;

    #[derive(Debug, Default, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Shop {
        #[serde(default)]
        greeting: String,
        #[serde(default)]
        seats: u32,
    }

    const BASE: &str = "[http]\nbind = \"\"\n";

    #[test]
    fn a_host_section_is_taken_out_and_typed() {
        let text = format!("{BASE}[shop]\ngreeting = \"hi\"\nseats = 3\n");
        let (cfg, shop) = Config::from_toml_with_section::<Shop>(&text, "shop").unwrap();
        assert_eq!(
            shop,
            Shop {
                greeting: "hi".into(),
                seats: 3
            }
        );
        assert!(cfg.http.bind.is_empty(), "the engine's keys are still read");
    }

    #[test]
    fn a_missing_section_is_the_default() {
        let (_, shop) = Config::from_toml_with_section::<Shop>(BASE, "shop").unwrap();
        assert_eq!(shop, Shop::default());
    }

    #[test]
    fn the_engine_still_refuses_unknown_keys() {
        let text = format!("{BASE}[shop]\ngreeting = \"hi\"\n");
        let e = Config::from_toml(&text).unwrap_err();
        assert_eq!(e.key, "shop", "{e}");
        let e = Config::from_toml_with_section::<Shop>(&format!("{text}[shopp]\n"), "shop")
            .unwrap_err();
        assert_eq!(e.key, "shopp", "{e}");
    }

    #[test]
    fn a_bad_section_key_is_named_with_the_section() {
        let text = format!("{BASE}[shop]\nseats = \"many\"\n");
        let e = Config::from_toml_with_section::<Shop>(&text, "shop").unwrap_err();
        assert!(e.key.starts_with("shop"), "{e}");
        assert!(std::error::Error::source(&e).is_some(), "keeps the cause");
    }
}
