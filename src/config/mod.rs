//! Configuration: TOML files loaded with the `config` crate, every key
//! overridable from the environment as `FLOWGATE__SECTION__KEY`.
//!
//! Every option is documented where it is declared, with its default. The
//! README's configuration reference is generated from the same text.

mod env;
mod validate;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;

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
    /// The HTTP server (metrics, health, ingress).
    #[serde(default)]
    pub http: HttpConfig,
    /// Exchanges to declare.
    #[serde(default)]
    pub exchanges: Vec<ExchangeConfig>,
    /// Queues to declare (with their dead-letter exchange and queue).
    #[serde(default)]
    pub queues: Vec<QueueConfig>,
    /// Processing stages, one per consumed queue.
    #[serde(default)]
    pub stages: Vec<StageConfig>,
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
    /// The durable publish spool used while the circuit breaker is open.
    #[serde(default)]
    pub spool: SpoolConfig,
    /// Queue depth sampling, watermarks and autoscaling.
    #[serde(default)]
    pub depth: DepthConfig,
    /// HMAC message signing: the key, and whether publishes are signed.
    #[serde(default)]
    pub security: SecurityConfig,
}

/// `[amqp]`
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AmqpConfig {
    /// Broker URL. Default `amqp://guest:guest@127.0.0.1:5672/%2f`. Use
    /// `amqps://` for TLS. Prefer `url_file` or `FLOWGATE__AMQP__URL` over
    /// writing a password into a config file.
    #[serde(default = "default_url")]
    pub url: String,
    /// A file whose contents (trimmed) are the broker URL; wins over `url`.
    /// For secrets mounted as files (Kubernetes, Docker). Default: none.
    #[serde(default)]
    pub url_file: Option<PathBuf>,
    /// Prefix of the connection names shown in `rabbitmqctl list_connections`.
    /// Default `flowgate`.
    #[serde(default = "default_conn_name")]
    pub connection_name: String,
    /// Bound on one connection attempt. Default `10s`.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
}

impl std::fmt::Debug for AmqpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpConfig")
            .field("url", &flowgate_actors::connection::redact_url(&self.url))
            .field("url_file", &self.url_file)
            .field("connection_name", &self.connection_name)
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

fn default_url() -> String {
    "amqp://guest:guest@127.0.0.1:5672/%2f".into()
}
fn default_conn_name() -> String {
    "flowgate".into()
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(10)
}

impl Default for AmqpConfig {
    fn default() -> Self {
        Self {
            url: default_url(),
            url_file: None,
            connection_name: default_conn_name(),
            connect_timeout: default_connect_timeout(),
        }
    }
}

impl AmqpConfig {
    /// The URL to connect to, read from `url_file` when set.
    pub fn resolved_url(&self) -> Result<String, ConfigError> {
        match &self.url_file {
            Some(p) => std::fs::read_to_string(p)
                .map(|s| s.trim().to_owned())
                .map_err(|e| {
                    ConfigError::new("amqp.url_file", format!("cannot read {}: {e}", p.display()))
                }),
            None => Ok(self.url.clone()),
        }
    }
}

/// `[http]`
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Address of the HTTP server serving `/metrics`, `/healthz`, `/readyz`
    /// (and the ingress). Default `127.0.0.1:9464`. Empty string: no server.
    #[serde(default = "default_bind")]
    pub bind: String,
}

fn default_bind() -> String {
    "127.0.0.1:9464".into()
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            bind: default_bind(),
        }
    }
}

/// AMQP exchange types.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ExchangeType {
    /// Exact routing-key match.
    Direct,
    /// Pattern routing-key match (default).
    #[default]
    Topic,
    /// Every bound queue.
    Fanout,
    /// Header match.
    Headers,
}

/// `[[exchanges]]`
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ExchangeConfig {
    /// Exchange name. Required.
    pub name: String,
    /// `direct | topic | fanout | headers`. Default `topic`.
    #[serde(default, rename = "type")]
    pub kind: ExchangeType,
}

/// Queue types.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum QueueKind {
    /// Classic queue.
    Classic,
    /// Quorum queue (default): replicated, supports delivery limits and
    /// at-least-once dead-lettering.
    #[default]
    Quorum,
}

/// A queue binding.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Binding {
    /// Source exchange; must be declared under `[[exchanges]]`.
    pub exchange: String,
    /// Binding key. Default `#`.
    #[serde(default = "default_binding_key")]
    pub routing_key: String,
}

fn default_binding_key() -> String {
    "#".into()
}

/// `[[queues]]`
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct QueueConfig {
    /// Queue name. Required.
    pub name: String,
    /// `classic | quorum`. Default `quorum`.
    #[serde(default)]
    pub kind: QueueKind,
    /// Bindings. Default none.
    #[serde(default)]
    pub bindings: Vec<Binding>,
    /// Declare exchange `<queue>.dlx` and queue `<queue>.dlq` and dead-letter
    /// into them. Default `true`.
    #[serde(default = "yes")]
    pub dead_letter: bool,
    /// Quorum queues: deliveries after which the broker dead-letters a
    /// message that keeps coming back (`x-delivery-limit`), e.g. one whose
    /// consumer keeps crashing or losing its connection. Kept small: each
    /// redelivery raises the delivery count of the neighbours in flight with
    /// it. Default `5`.
    #[serde(default = "default_delivery_limit")]
    pub delivery_limit: Option<u32>,
    /// Backpressure watermarks, e.g. `{ high = 5000, low = 1000 }`: while
    /// this queue holds more than `high` ready messages, every stage that
    /// publishes into it pauses its intake until the queue is below `low`,
    /// and the HTTP ingress (`POST /publish/...`, and a host's own through
    /// [`Ingress`](crate::Ingress)) answer
    /// 503 with `Retry-After` for messages routed to it.
    /// Default none (the depth is still exported when a stage consumes it).
    #[serde(default)]
    pub watermark: Option<Watermark>,
}

/// A queue's high/low watermarks (ready messages), with hysteresis.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Watermark {
    /// Upstream stages pause at or above this depth. Required.
    pub high: u64,
    /// ...and resume at or below this one. Required, `< high`.
    pub low: u64,
}

fn yes() -> bool {
    true
}
fn default_delivery_limit() -> Option<u32> {
    Some(5)
}

impl QueueConfig {
    /// `<queue>.dlx` when dead-lettering is on.
    pub fn dead_letter_exchange(&self) -> Option<String> {
        self.dead_letter.then(|| format!("{}.dlx", self.name))
    }
    /// `<queue>.dlq` when dead-lettering is on.
    pub fn dead_letter_queue(&self) -> Option<String> {
        self.dead_letter.then(|| format!("{}.dlq", self.name))
    }
}

/// Where a stage publishes.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Target {
    /// Exchange.
    pub exchange: String,
    /// Routing key.
    pub routing_key: String,
}

/// A stage's handler tasks: a fixed number, or a range to autoscale in.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum Concurrency {
    /// Fixed.
    Fixed(u32),
    /// Scaled between `min` and `max`.
    Range {
        /// Lower bound.
        min: u32,
        /// Upper bound.
        max: u32,
    },
}

impl Default for Concurrency {
    fn default() -> Self {
        Concurrency::Fixed(4)
    }
}

impl Concurrency {
    /// Workers to start with.
    pub fn initial(&self) -> u32 {
        match *self {
            Concurrency::Fixed(n) => n,
            Concurrency::Range { min, .. } => min,
        }
    }
    /// Upper bound.
    pub fn max(&self) -> u32 {
        match *self {
            Concurrency::Fixed(n) => n,
            Concurrency::Range { max, .. } => max,
        }
    }
}

/// `[[stages]]`
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StageConfig {
    /// Stage name (metric label, `x-flowgate-stage`). Required, unique.
    pub name: String,
    /// Queue to consume; must be declared under `[[queues]]`. Required.
    pub queue: String,
    /// Handler: a built-in (`forward`, `sink`, `record`, `http`) or a name
    /// registered by the host application. Default `forward`.
    #[serde(default = "default_handler")]
    pub handler: String,
    /// Broker prefetch and in-process credit (1..=65535). Default `50`.
    #[serde(default = "default_prefetch")]
    pub prefetch: u32,
    /// Handler tasks: `4`, or `{ min = 1, max = 16 }`. Default `4`.
    #[serde(default)]
    pub concurrency: Concurrency,
    /// Where `forward` publishes. Required for `forward`.
    #[serde(default)]
    pub output: Option<Target>,
    /// `forward`: simulated work per message, e.g. `"5ms"`. Default none.
    #[serde(default, with = "humantime_serde")]
    pub delay: Option<Duration>,
    /// `forward`: most messages per second it handles (a throttled
    /// downstream). Default unlimited.
    #[serde(default)]
    pub rate: Option<u32>,
    /// The retry ladder: `{ max_attempts = 5, backoff = ["1s", "10s", "1m"] }`
    /// (the last step repeats). Declares a tier queue `<queue>.retry.<n>` per
    /// distinct delay. Handler errors and `Retry` outcomes go through it;
    /// after `max_attempts` the message is dead-lettered (`max-attempts`).
    /// Default none: failures are dead-lettered at once.
    #[serde(default)]
    pub retry: Option<RetryConfig>,
    /// Deduplication by message id: `memory` (this process), `redis` (shared
    /// by every instance) or `off`. Default `off`.
    #[serde(default)]
    pub dedup: DedupMode,
    /// What the handler expects: `bytes` (anything) or `json` (other bodies
    /// are dead-lettered with reason `malformed`). Default `bytes`.
    #[serde(default)]
    pub payload: PayloadKind,
    /// `record`: the file each handled message id is appended to (one line
    /// per handling; for demos and tests of exactly-once effects). Required
    /// for `record`.
    #[serde(default)]
    pub record_file: Option<PathBuf>,
    /// HMAC signature check of every delivery: `off`, `warn` (count
    /// `flowgate_signature_failures_total`, log, process anyway) or `reject`
    /// (count and dead-letter with reason `bad-signature`, before the dedup
    /// claim and the handler). Needs a `[security]` key. Default `reject`
    /// when a key is set, else `off`.
    #[serde(default)]
    pub verify: Option<VerifyMode>,
    /// `http`: the service each delivery is POSTed to, e.g.
    /// `{ url = "http://127.0.0.1:8000/handle", timeout = "5s" }` (keys
    /// below). Required for `http`.
    #[serde(default)]
    pub http: Option<HttpStageConfig>,
}

/// A stage's `http` table: the service the `http` handler POSTs each
/// delivery to, and how hard it may be pushed.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HttpStageConfig {
    /// The service's URL (`http://` or `https://`); every delivery is
    /// POSTed to it. Required.
    pub url: String,
    /// Bound on one request, from connecting to the answer's last byte; a
    /// request that takes longer is retried through the stage's ladder.
    /// Default `10s`.
    #[serde(default = "default_http_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Most requests in flight to the service at once (also the most idle
    /// pooled connections kept), whatever the stage's `concurrency`.
    /// Default `8`.
    #[serde(default = "default_http_max_concurrency")]
    pub max_concurrency: u32,
    /// Extra HTTP headers sent with every request, e.g.
    /// `{ authorization = "Bearer ..." }`; names the engine maps itself
    /// (`content-type`, `content-encoding`, `x-amqp-*`) are refused.
    /// Default none.
    #[serde(default)]
    pub headers: std::collections::BTreeMap<String, String>,
    /// Longest wait honoured from one 429/503 answer's `Retry-After` (and
    /// the cap of the handler's own backoff without one). Default `30s`.
    #[serde(default = "default_http_retry_after_max", with = "humantime_serde")]
    pub retry_after_max: Duration,
    /// How long one delivery may keep being answered 429/503 (the stage
    /// holding its credit meanwhile) before it goes through the retry
    /// ladder instead; keep it below the broker's `consumer_timeout`.
    /// Default `5m`.
    #[serde(default = "default_http_slow_down_limit", with = "humantime_serde")]
    pub slow_down_limit: Duration,
    /// Largest answer body read; a longer 2xx answer dead-letters the
    /// input as `invalid-output`. Default `1048576` (1 MiB).
    #[serde(default = "default_http_max_response_bytes")]
    pub max_response_bytes: u64,
}

/// The prefix of every request header the `http` handler maps from a
/// delivery (`x-amqp-message-id`, `x-amqp-header-<name>`, ...; the README
/// has the whole mapping): a stage's `http.headers` may not use it.
pub(crate) const HTTP_MAPPED_PREFIX: &str = "x-amqp-";

/// The other request headers the `http` handler writes itself.
pub(crate) const HTTP_RESERVED_HEADERS: [&str; 4] =
    ["content-type", "content-encoding", "content-length", "host"];

fn default_http_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_http_max_concurrency() -> u32 {
    8
}
fn default_http_retry_after_max() -> Duration {
    Duration::from_secs(30)
}
fn default_http_slow_down_limit() -> Duration {
    Duration::from_secs(5 * 60)
}
fn default_http_max_response_bytes() -> u64 {
    1 << 20
}

impl HttpStageConfig {
    /// A service at `url`, every other key at its default.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            timeout: default_http_timeout(),
            max_concurrency: default_http_max_concurrency(),
            headers: Default::default(),
            retry_after_max: default_http_retry_after_max(),
            slow_down_limit: default_http_slow_down_limit(),
            max_response_bytes: default_http_max_response_bytes(),
        }
    }
}

/// A stage's signature check.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum VerifyMode {
    /// No check.
    Off,
    /// Count and log a missing or wrong signature; process the message.
    Warn,
    /// Count it and dead-letter the message (`bad-signature`).
    Reject,
}

impl Default for StageConfig {
    /// Every option at its documented default; `name` and `queue` empty.
    fn default() -> Self {
        Self {
            name: String::new(),
            queue: String::new(),
            handler: default_handler(),
            prefetch: default_prefetch(),
            concurrency: Concurrency::default(),
            output: None,
            delay: None,
            rate: None,
            retry: None,
            dedup: DedupMode::default(),
            payload: PayloadKind::default(),
            record_file: None,
            verify: None,
            http: None,
        }
    }
}

impl StageConfig {
    /// A stage consuming `queue` with `handler`, every other option at its
    /// default; set the rest with struct update syntax:
    ///
    /// ```
    /// use flowgate::StageConfig;
    /// let s = StageConfig { prefetch: 10, ..StageConfig::new("audit", "audit.in", "audit") };
    /// assert_eq!((s.prefetch, s.handler.as_str()), (10, "audit"));
    /// ```
    pub fn new(
        name: impl Into<String>,
        queue: impl Into<String>,
        handler: impl Into<String>,
    ) -> Self {
        Self {
            name: name.into(),
            queue: queue.into(),
            handler: handler.into(),
            ..Self::default()
        }
    }

    /// The stage's effective check, given whether a key is configured.
    pub fn verify_mode(&self, key_set: bool) -> VerifyMode {
        match self.verify {
            Some(m) => m,
            None if key_set => VerifyMode::Reject,
            None => VerifyMode::Off,
        }
    }
}

/// A stage's retry ladder.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Handling attempts in total, the first included (1..=1000). Default `5`.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Delays before attempts 2, 3, ...; the last repeats (each 1ms..=24h,
    /// at most 16 steps). Default `["1s", "10s", "1m"]`.
    #[serde(default = "default_backoff")]
    pub backoff: Vec<humantime_serde::Serde<Duration>>,
}

fn default_max_attempts() -> u32 {
    5
}
fn default_backoff() -> Vec<humantime_serde::Serde<Duration>> {
    [1, 10, 60]
        .into_iter()
        .map(|s| Duration::from_secs(s).into())
        .collect()
}

impl RetryConfig {
    /// As the actors' retry policy.
    pub fn policy(&self) -> flowgate_actors::retry::RetryPolicy {
        flowgate_actors::retry::RetryPolicy {
            max_attempts: self.max_attempts,
            backoff: self.backoff.iter().map(|d| **d).collect(),
        }
    }
}

/// A stage's dedup backend.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DedupMode {
    /// No deduplication (default).
    #[default]
    Off,
    /// In-process, bounded by `[dedup] capacity`; not shared between instances.
    Memory,
    /// Redis at `[redis] url`, shared by every instance.
    Redis,
}

/// A stage's payload type.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PayloadKind {
    /// Any bytes (default).
    #[default]
    Bytes,
    /// A JSON document.
    Json,
}

/// What a message without `message_id` is deduplicated by.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum MissingIdPolicy {
    /// A SHA-256 of routing key and body (default).
    #[default]
    Hash,
    /// Dead-letter it with reason `missing-id`.
    Reject,
}

/// `[security]`: HMAC-SHA256 message signing (the canonical form is
/// documented in `flowgate_actors::signing`). The key itself never appears
/// in the configuration, in logs or in `Debug` output: only where to read it.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SecurityConfig {
    /// A file holding the secret HMAC key (its bytes, surrounding whitespace
    /// trimmed; at least 16 bytes, e.g. `openssl rand -hex 32`). Default
    /// none: no key, nothing signed or verified.
    #[serde(default)]
    pub hmac_key_file: Option<PathBuf>,
    /// Alternative to `hmac_key_file`: the name of an environment variable
    /// holding the key (same rules). Default none.
    #[serde(default)]
    pub hmac_key_env: Option<String>,
    /// Key rotation: a file holding the previous key, accepted when
    /// verifying but never used to sign. Needs a current key. Default none.
    #[serde(default)]
    pub hmac_previous_key_file: Option<PathBuf>,
    /// With a key, every publish the engine makes (stage outputs, retry
    /// copies, dead letters, ingress, gateway, spool replays) carries header
    /// `x-flowgate-signature`. Default `true`.
    #[serde(default = "default_true")]
    pub sign_outputs: bool,
}

fn default_true() -> bool {
    true
}

impl Default for SecurityConfig {
    fn default() -> Self {
        Self {
            hmac_key_file: None,
            hmac_key_env: None,
            hmac_previous_key_file: None,
            sign_outputs: true,
        }
    }
}

/// Shortest key accepted, in bytes.
pub const MIN_KEY_BYTES: usize = 16;

fn key_bytes(key: &str, raw: Vec<u8>) -> Result<Vec<u8>, ConfigError> {
    let trimmed = raw.trim_ascii();
    if trimmed.len() < MIN_KEY_BYTES {
        return Err(ConfigError::new(
            key,
            format!(
                "the key must be at least {MIN_KEY_BYTES} bytes (it has {})",
                trimmed.len()
            ),
        ));
    }
    Ok(trimmed.to_vec())
}

fn key_from_file(key: &str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    let raw = std::fs::read(path)
        .map_err(|e| ConfigError::new(key, format!("cannot read {}: {e}", path.display())))?;
    key_bytes(key, raw)
}

impl SecurityConfig {
    /// Reads the keys: `None` when no key is configured. Errors name the
    /// key at fault and never contain key material.
    pub fn keys(&self) -> Result<Option<flowgate_actors::signing::Keys>, ConfigError> {
        use flowgate_actors::signing::{Keys, SigningKey};
        let current = match (&self.hmac_key_file, &self.hmac_key_env) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::new(
                    "security.hmac_key_env",
                    "set either hmac_key_file or hmac_key_env, not both",
                ))
            }
            (Some(path), None) => Some(key_from_file("security.hmac_key_file", path)?),
            (None, Some(var)) => {
                let raw = std::env::var_os(var).ok_or_else(|| {
                    ConfigError::new(
                        "security.hmac_key_env",
                        format!("environment variable `{var}` is not set"),
                    )
                })?;
                Some(key_bytes(
                    "security.hmac_key_env",
                    raw.into_encoded_bytes(),
                )?)
            }
            (None, None) => None,
        };
        let previous = match &self.hmac_previous_key_file {
            Some(path) => Some(key_from_file("security.hmac_previous_key_file", path)?),
            None => None,
        };
        match (current, previous) {
            (None, Some(_)) => Err(ConfigError::new(
                "security.hmac_previous_key_file",
                "needs a current key (hmac_key_file or hmac_key_env)",
            )),
            (None, None) => Ok(None),
            (Some(c), p) => Ok(Some(Keys {
                current: SigningKey::new(c),
                previous: p.map(SigningKey::new),
            })),
        }
    }
}

/// `[dedup]`
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DedupConfig {
    /// How long a claim holds: a crash mid-handling delays the message by at
    /// most this, and a handler running longer risks a duplicate effect.
    /// Default `30s`.
    #[serde(default = "default_lease", with = "humantime_serde")]
    pub lease: Duration,
    /// How long a processed id is remembered. Default `24h`.
    #[serde(default = "default_ttl", with = "humantime_serde")]
    pub ttl: Duration,
    /// `memory` backend: most ids held (oldest evicted first). Default `1000000`.
    #[serde(default = "default_capacity")]
    pub capacity: usize,
    /// `hash` or `reject` (see [`MissingIdPolicy`]). Default `hash`.
    #[serde(default)]
    pub missing_id: MissingIdPolicy,
    /// Prefix of the Redis keys (`<prefix><stage>:<id>`), so several
    /// pipelines can share a Redis. Default `flowgate:dedup:`.
    #[serde(default = "default_dedup_prefix")]
    pub prefix: String,
}

fn default_lease() -> Duration {
    Duration::from_secs(30)
}
fn default_ttl() -> Duration {
    Duration::from_secs(24 * 60 * 60)
}
fn default_capacity() -> usize {
    1_000_000
}
fn default_dedup_prefix() -> String {
    "flowgate:dedup:".into()
}

impl Default for DedupConfig {
    fn default() -> Self {
        Self {
            lease: default_lease(),
            ttl: default_ttl(),
            capacity: default_capacity(),
            missing_id: MissingIdPolicy::default(),
            prefix: default_dedup_prefix(),
        }
    }
}

/// `[redis]`
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// Server URL. Default `redis://127.0.0.1:6379`. Prefer
    /// `FLOWGATE__REDIS__URL` over writing a password into a file.
    #[serde(default = "default_redis_url")]
    pub url: String,
}

fn default_redis_url() -> String {
    "redis://127.0.0.1:6379".into()
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: default_redis_url(),
        }
    }
}

impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print a password.
        let shown = match url::Url::parse(&self.url) {
            Ok(mut u) if u.password().is_some() => {
                let _ = u.set_password(Some("***"));
                u.to_string()
            }
            Ok(u) => u.to_string(),
            Err(_) => "<malformed>".into(),
        };
        f.debug_struct("RedisConfig").field("url", &shown).finish()
    }
}

fn default_handler() -> String {
    "forward".into()
}
fn default_prefetch() -> u32 {
    50
}

/// `[publisher]`
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PublisherConfig {
    /// How long to wait for a broker confirm. Default `10s`.
    #[serde(default = "default_confirm_timeout", with = "humantime_serde")]
    pub confirm_timeout: Duration,
    /// Most publishes awaiting a confirm at once. Default `1024`.
    #[serde(default = "default_max_unconfirmed")]
    pub max_unconfirmed: u32,
    /// Token bucket: publishes per second, for the whole engine (stage
    /// outputs, dead letters, ingress). Default `0`: unlimited.
    #[serde(default)]
    pub rate: u32,
    /// Token bucket: publishes admitted back to back after idling. Default `1000`.
    #[serde(default = "default_burst")]
    pub burst: u32,
    /// Most callers waiting to publish (for a token, for the broker to
    /// unblock, for room in the confirm window); beyond it a publish fails
    /// at once with backpressure (HTTP 503). Default `1024`.
    #[serde(default = "default_max_waiters")]
    pub max_waiters: u32,
    /// The circuit breaker.
    #[serde(default)]
    pub breaker: BreakerConfig,
    /// Publish every message persistent (`delivery_mode = 2`), whatever
    /// delivery mode it carries. Default `false`: a message keeps its own, so
    /// `forward` republishes properties unchanged (a transient input stays
    /// transient, one without a delivery mode gets none); messages the engine
    /// creates (ingress, a handler's `Output::new`) are persistent anyway.
    #[serde(default)]
    pub force_persistent: bool,
}

fn default_burst() -> u32 {
    1000
}
fn default_max_waiters() -> u32 {
    1024
}

/// `[publisher.breaker]`
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerConfig {
    /// Consecutive publish failures (nack, `basic.return`, confirm timeout,
    /// channel error) that open the breaker. Default `5`.
    #[serde(default = "default_failures")]
    pub failures: u32,
    /// How long the breaker stays open before a probe publish. Default `5s`.
    #[serde(default = "default_reset", with = "humantime_serde")]
    pub reset: Duration,
    /// How long publishes wait while the broker blocks publishing (memory
    /// or disk alarm) before the breaker opens and they spool. Default `30s`.
    #[serde(default = "default_blocked_timeout", with = "humantime_serde")]
    pub blocked_timeout: Duration,
}

fn default_failures() -> u32 {
    5
}
fn default_reset() -> Duration {
    Duration::from_secs(5)
}
fn default_blocked_timeout() -> Duration {
    Duration::from_secs(30)
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failures: default_failures(),
            reset: default_reset(),
            blocked_timeout: default_blocked_timeout(),
        }
    }
}

/// `[spool]`
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SpoolConfig {
    /// The spool file (redb). Default none: no spool, and an open breaker
    /// answers publishes with backpressure instead of spooling them. One
    /// engine per file (redb locks it).
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// Most bytes of spooled records; when full, publishes get
    /// backpressure. Default `268435456` (256 MiB).
    #[serde(default = "default_spool_max_bytes")]
    pub max_bytes: u64,
}

fn default_spool_max_bytes() -> u64 {
    256 << 20
}

impl Default for SpoolConfig {
    fn default() -> Self {
        Self {
            path: None,
            max_bytes: default_spool_max_bytes(),
        }
    }
}

/// `[depth]`
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DepthConfig {
    /// How often each watched queue's depth and consumer count is sampled
    /// (passive `queue.declare`). Default `1s`.
    #[serde(default = "default_depth_interval", with = "humantime_serde")]
    pub interval: Duration,
    /// Least time between two autoscaling changes of one stage. Default `10s`.
    #[serde(default = "default_cooldown", with = "humantime_serde")]
    pub cooldown: Duration,
}

fn default_depth_interval() -> Duration {
    Duration::from_secs(1)
}
fn default_cooldown() -> Duration {
    Duration::from_secs(10)
}

impl Default for DepthConfig {
    fn default() -> Self {
        Self {
            interval: default_depth_interval(),
            cooldown: default_cooldown(),
        }
    }
}

fn default_confirm_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_max_unconfirmed() -> u32 {
    1024
}

impl Default for PublisherConfig {
    fn default() -> Self {
        Self {
            confirm_timeout: default_confirm_timeout(),
            max_unconfirmed: default_max_unconfirmed(),
            rate: 0,
            burst: default_burst(),
            max_waiters: default_max_waiters(),
            breaker: BreakerConfig::default(),
            force_persistent: false,
        }
    }
}

/// `[shutdown]`
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownConfig {
    /// How long in-flight work may take to finish after SIGTERM. Default `30s`.
    #[serde(default = "default_grace", with = "humantime_serde")]
    pub grace: Duration,
}

fn default_grace() -> Duration {
    Duration::from_secs(30)
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self {
            grace: default_grace(),
        }
    }
}

/// `[supervisor]`
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SupervisorConfig {
    /// First restart delay. Default `100ms`.
    #[serde(default = "default_backoff_min", with = "humantime_serde")]
    pub backoff_min: Duration,
    /// Restart delay cap. Default `10s`.
    #[serde(default = "default_backoff_max", with = "humantime_serde")]
    pub backoff_max: Duration,
    /// Restarts allowed per `window` before the engine escalates (shuts
    /// down, exit status 1). Default `20`.
    #[serde(default = "default_max_restarts")]
    pub max_restarts: u32,
    /// Default `60s`.
    #[serde(default = "default_window", with = "humantime_serde")]
    pub window: Duration,
}

fn default_backoff_min() -> Duration {
    Duration::from_millis(100)
}
fn default_backoff_max() -> Duration {
    Duration::from_secs(10)
}
fn default_max_restarts() -> u32 {
    20
}
fn default_window() -> Duration {
    Duration::from_secs(60)
}

impl Default for SupervisorConfig {
    fn default() -> Self {
        Self {
            backoff_min: default_backoff_min(),
            backoff_max: default_backoff_max(),
            max_restarts: default_max_restarts(),
            window: default_window(),
        }
    }
}

impl SupervisorConfig {
    /// As the actors' restart policy.
    pub fn policy(&self) -> flowgate_actors::supervision::RestartPolicy {
        flowgate_actors::supervision::RestartPolicy {
            backoff_min: self.backoff_min,
            backoff_max: self.backoff_max,
            max_restarts: self.max_restarts,
            window: self.window,
        }
    }
}

/// `[limits]`
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest message body accepted (ingress) or processed. Default `1048576` (1 MiB).
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: u64,
}

fn default_max_message_bytes() -> u64 {
    1 << 20
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_message_bytes: default_max_message_bytes(),
        }
    }
}

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
