//! `[[stages]]`: processing stages, their handler, retry ladder, dedup and payload.

use super::*;

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
    pub payload: Payload,
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
    /// Hand the handler batches instead of single deliveries:
    /// `{ size = 100, timeout = "50ms" }` (keys below). Credits, acks and
    /// outcomes stay per delivery. `size` may not exceed `prefetch` (a
    /// batch cannot hold more deliveries than the stage has credits).
    /// Default none: one delivery per handler call.
    #[serde(default)]
    pub batch: Option<BatchConfig>,
    /// Batched acknowledgement, on by default: consecutive deliveries whose
    /// outputs are confirmed are acked with one `basic.ack(multiple = true)`
    /// — at once when a quarter of the prefetch is ready or when nothing
    /// else is being handled, else after `flush` — never covering a delivery
    /// still being handled; at least once as with single acks (a crash
    /// between confirm and ack redelivers; see the README's "Batched acks").
    /// `ack_batch = { enabled = false }`: one `basic.ack` per delivery.
    #[serde(default)]
    pub ack_batch: AckBatchConfig,
    /// The longest one handler call may take, e.g. `"30s"`: past it the
    /// call is cancelled and the delivery fails like a handler error (the
    /// retry ladder, else a dead letter `handler-error`), its credit back —
    /// instead of holding a worker and a credit for good, and well before
    /// the broker's `consumer_timeout` (30 min on RabbitMQ 3.10) closes the
    /// channel under every delivery on it. Default none: no bound.
    #[serde(default, with = "humantime_serde")]
    pub handler_timeout: Option<Duration>,
    /// Keep order by a key: deliveries with the same key are handled one
    /// at a time, in delivery order (the next starts once the previous one's
    /// outputs are confirmed); different keys run in parallel up to
    /// `concurrency`.
    /// The key: `message_id`, `routing_key`, `correlation_id`,
    /// `header:<name>`, or the name of a key function the host registered
    /// (`EngineBuilder::order_key`). A delivery waiting behind its key
    /// holds its credit; a failed attempt retries in place, holding its
    /// key, with the `retry` ladder's delays (see the README's
    /// "Ordering"). Default none: any order.
    #[serde(default)]
    pub order_by: Option<String>,
    /// With `order_by`, what a delivery without a key gets: `reject` (a
    /// dead letter with reason `missing-key`) or `shared` (one lane shared
    /// by every keyless delivery). Default `reject`.
    #[serde(default)]
    pub missing_key: Option<MissingKey>,
}

/// RabbitMQ's default `consumer_timeout` (3.10): a delivery unacked for
/// longer gets its channel closed. An ordered stage whose in-place retries
/// can take longer is warned about at build.
pub(crate) const BROKER_CONSUMER_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// What a delivery without an ordering key gets. The runtime's own type.
pub use flowgate_actors::MissingKey;

/// The prefix of an `order_by` that names a header.
const ORDER_BY_HEADER: &str = "header:";

/// What a stage's `order_by` names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum OrderBy {
    /// A key the engine reads itself.
    Builtin(BuiltinKey),
    /// A key function the host registers under this name.
    Named(String),
}

/// The keys the engine reads itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum BuiltinKey {
    MessageId,
    RoutingKey,
    CorrelationId,
    Header(String),
}

impl OrderBy {
    /// Reads an `order_by` value; the error says what is accepted.
    pub(crate) fn parse(s: &str) -> Result<OrderBy, String> {
        let named = |n: &str| {
            !n.is_empty()
                && n.len() <= 64
                && n.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        };
        Ok(match s {
            "message_id" => OrderBy::Builtin(BuiltinKey::MessageId),
            "routing_key" => OrderBy::Builtin(BuiltinKey::RoutingKey),
            "correlation_id" => OrderBy::Builtin(BuiltinKey::CorrelationId),
            h if h.starts_with(ORDER_BY_HEADER) => {
                let name = &h[ORDER_BY_HEADER.len()..];
                if name.is_empty() || name.len() > 255 {
                    return Err("`header:` needs a header name of 1 to 255 bytes".into());
                }
                OrderBy::Builtin(BuiltinKey::Header(name.to_owned()))
            }
            n if named(n) => OrderBy::Named(n.to_owned()),
            _ => {
                return Err(
                    "must be `message_id`, `routing_key`, `correlation_id`, `header:<name>` or the name of a registered key function (letters, digits, `_`, `-`, `.`)"
                        .into(),
                )
            }
        })
    }

    /// The registered key function's name, if it names one.
    pub(crate) fn function(&self) -> Option<&str> {
        match self {
            OrderBy::Named(n) => Some(n),
            OrderBy::Builtin(_) => None,
        }
    }
}

/// A stage's `ack_batch` table.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AckBatchConfig {
    /// Batch acks at all. Default `true`.
    #[serde(default = "default_ack_batching")]
    pub enabled: bool,
    /// The longest a delivery whose outputs are confirmed waits for its ack
    /// (1ms..=1s). Default `5ms`.
    #[serde(default = "default_ack_flush", with = "humantime_serde")]
    pub flush: Duration,
}

fn default_ack_batching() -> bool {
    true
}

fn default_ack_flush() -> Duration {
    Duration::from_millis(5)
}

impl Default for AckBatchConfig {
    /// `enabled = true, flush = "5ms"`.
    fn default() -> Self {
        Self {
            enabled: default_ack_batching(),
            flush: default_ack_flush(),
        }
    }
}

impl AckBatchConfig {
    /// Single acks: `{ enabled = false }`.
    pub fn off() -> Self {
        Self {
            enabled: false,
            ..Self::default()
        }
    }
}

/// A stage's `batch` table: how many deliveries one handler call gets.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BatchConfig {
    /// Most deliveries in one batch (1..=`prefetch`). Default `100`.
    #[serde(default = "default_batch_size")]
    pub size: u32,
    /// Longest the first delivery of a batch waits for it to fill before
    /// the batch is handled as it is (1ms..=1m). Default `50ms`.
    #[serde(default = "default_batch_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

fn default_batch_size() -> u32 {
    flowgate_actors::BatchPolicy::default().size as u32
}
fn default_batch_timeout() -> Duration {
    flowgate_actors::BatchPolicy::default().timeout
}

impl Default for BatchConfig {
    /// `size = 100`, `timeout = "50ms"`.
    fn default() -> Self {
        Self {
            size: default_batch_size(),
            timeout: default_batch_timeout(),
        }
    }
}

impl BatchConfig {
    /// As the actors' batch policy.
    pub(crate) fn policy(&self) -> flowgate_actors::BatchPolicy {
        flowgate_actors::BatchPolicy {
            size: self.size as usize,
            timeout: self.timeout,
        }
    }
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

/// A stage's signature check: `off`, `warn`, `reject`. The runtime's own type.
pub use flowgate_actors::VerifyMode;

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
            payload: Payload::default(),
            record_file: None,
            verify: None,
            http: None,
            batch: None,
            ack_batch: AckBatchConfig::default(),
            handler_timeout: None,
            order_by: None,
            missing_key: None,
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

/// What a stage's own checks need from the rest of the config.
pub(crate) struct StageContext<'a> {
    /// The declared exchanges.
    pub exchanges: &'a std::collections::HashSet<&'a str>,
    /// The declared queues.
    pub queues: &'a std::collections::HashSet<&'a str>,
    /// The handler names available; `None`: not known yet (a host may
    /// register them later).
    pub handlers: Option<&'a [String]>,
    /// `[redis] url` is set.
    pub redis_url_set: bool,
}

impl StageConfig {
    /// Checks this stage's keys (`stages[i].…`; every mistake names its
    /// key) against the rest of the config.
    pub(crate) fn validate(&self, i: usize, ctx: &StageContext<'_>) -> Result<(), ConfigError> {
        let s = self;
        let key = |k: &str| format!("stages[{i}].{k}");
        if s.name.is_empty() {
            return Err(ConfigError::new(key("name"), "must be non-empty"));
        }
        if !ctx.queues.contains(s.queue.as_str()) {
            return Err(ConfigError::new(
                key("queue"),
                format!("queue `{}` is not declared under [[queues]]", s.queue),
            ));
        }
        if let Some(handlers) = ctx.handlers {
            if !handlers.iter().any(|h| h == &s.handler) {
                return Err(ConfigError::new(
                    key("handler"),
                    format!(
                        "unknown handler `{}` (known: {})",
                        s.handler,
                        handlers.join(", ")
                    ),
                ));
            }
        }
        if s.prefetch == 0 || s.prefetch > u32::from(u16::MAX) {
            return Err(ConfigError::new(
                key("prefetch"),
                "must be between 1 and 65535",
            ));
        }
        match s.concurrency {
            Concurrency::Fixed(0) => {
                return Err(ConfigError::new(key("concurrency"), "must be at least 1"))
            }
            Concurrency::Range { min, max } if min == 0 || max < min => {
                return Err(ConfigError::new(
                    key("concurrency"),
                    "needs 1 <= min <= max",
                ))
            }
            _ => {}
        }
        if s.handler == "forward" && s.output.is_none() {
            return Err(ConfigError::new(
                key("output"),
                "the `forward` handler needs an output",
            ));
        }
        if let Some(o) = &s.output {
            if !o.exchange.is_empty()
                && !ctx.exchanges.contains(o.exchange.as_str())
                && !o.exchange.starts_with("amq.")
            {
                return Err(ConfigError::new(
                    key("output.exchange"),
                    format!(
                        "exchange `{}` is not declared under [[exchanges]]",
                        o.exchange
                    ),
                ));
            }
        }
        if s.rate == Some(0) {
            return Err(ConfigError::new(
                key("rate"),
                "must be at least 1 (omit it for unlimited)",
            ));
        }
        if let Some(t) = s.handler_timeout {
            if t < Duration::from_millis(1) {
                return Err(ConfigError::new(
                    key("handler_timeout"),
                    "must be at least 1ms (omit it for no bound)",
                ));
            }
        }
        validate_failures(s, ctx, &key)?;
        validate_order(s, &key)?;
        validate_http(s, &key)?;
        validate_batch(s, &key)?;
        let flush = s.ack_batch.flush;
        if flush < Duration::from_millis(1) || flush > Duration::from_secs(1) {
            return Err(ConfigError::new(
                key("ack_batch.flush"),
                "must be between 1ms and 1s",
            ));
        }
        Ok(())
    }

    /// The runtime's spec of this stage, with the parts the engine built for
    /// it: the one place a stage option becomes runtime behaviour.
    pub(crate) fn spec(&self, parts: StageParts<'_>) -> flowgate_actors::StageSpec {
        // validated to 1..=65535
        let prefetch = u16::try_from(self.prefetch).unwrap_or(u16::MAX);
        flowgate_actors::StageSpec {
            name: self.name.clone(),
            queue: self.queue.clone(),
            prefetch,
            concurrency: self.concurrency.initial() as usize,
            handler: parts.handler,
            dead_letter_exchange: parts.dead_letter_exchange,
            policy: parts.policy,
            retry: self.retry.as_ref().map(RetryConfig::policy),
            dedup: match self.dedup {
                DedupMode::Off => None,
                DedupMode::Memory => parts.memory_dedup.cloned(),
                DedupMode::Redis => parts.redis_dedup.cloned(),
            },
            payload: self.payload,
            max_message_bytes: Some(usize::try_from(parts.max_message_bytes).unwrap_or(usize::MAX)),
            signature: match (self.verify_mode(parts.keys.is_some()), parts.keys) {
                (VerifyMode::Off, _) | (_, None) => None,
                (mode, Some(keys)) => Some(flowgate_actors::Verifier {
                    keys: keys.clone(),
                    mode,
                }),
            },
            // validated to 1..=prefetch
            batch: self.batch.as_ref().map(BatchConfig::policy),
            ack: self
                .ack_batch
                .enabled
                .then(|| flowgate_actors::AckPolicy::for_prefetch(prefetch, self.ack_batch.flush)),
            handler_timeout: self.handler_timeout,
            order: self.order_policy(parts.order_key),
            single_active: parts.single_active_consumer,
        }
    }

    /// On an ordered stage with a retry ladder, the longest a delivery can
    /// stay unacked while it retries in place: every delay of the ladder,
    /// plus `max_attempts` handler calls of `handler_timeout` (when set).
    pub(crate) fn in_place_retry_span(&self) -> Option<Duration> {
        let (Some(_), Some(retry)) = (&self.order_by, &self.retry) else {
            return None;
        };
        let policy = retry.policy();
        let waits: Duration = (1..policy.max_attempts)
            .map(|a| policy.delay_after(a))
            .sum();
        let calls = self
            .handler_timeout
            .map_or(Duration::ZERO, |t| t * policy.max_attempts);
        Some(waits + calls)
    }

    /// Logs a warning when [`in_place_retry_span`](Self::in_place_retry_span)
    /// reaches the broker's default `consumer_timeout`.
    pub(crate) fn warn_of_long_retries(&self) {
        if let Some(span) = self
            .in_place_retry_span()
            .filter(|span| *span >= BROKER_CONSUMER_TIMEOUT)
        {
            tracing::warn!(
                stage = %self.name,
                ?span,
                "an ordered stage retries in place, holding the delivery unacked for up to this long: past the broker's consumer_timeout (30 min by default) the broker closes the channel and redelivers (see the README's Ordering)"
            );
        }
    }

    /// The runtime's ordering of this stage; `key_fn` is the host's key
    /// function when `order_by` names one (the builder resolved it).
    fn order_policy(
        &self,
        key_fn: Option<flowgate_actors::KeyFn>,
    ) -> Option<flowgate_actors::OrderPolicy> {
        use flowgate_actors::OrderKey;
        // validated: a known form, and a named function resolved by the builder
        let key = match OrderBy::parse(self.order_by.as_deref()?).ok()? {
            OrderBy::Builtin(BuiltinKey::MessageId) => OrderKey::MessageId,
            OrderBy::Builtin(BuiltinKey::RoutingKey) => OrderKey::RoutingKey,
            OrderBy::Builtin(BuiltinKey::CorrelationId) => OrderKey::CorrelationId,
            OrderBy::Builtin(BuiltinKey::Header(h)) => OrderKey::Header(h),
            OrderBy::Named(_) => OrderKey::Custom(key_fn?),
        };
        Some(flowgate_actors::OrderPolicy {
            key,
            missing: self.missing_key.unwrap_or_default(),
        })
    }
}

/// A stage's `order_by` and `missing_key`.
fn validate_order(s: &StageConfig, key: &dyn Fn(&str) -> String) -> Result<(), ConfigError> {
    let Some(by) = &s.order_by else {
        if s.missing_key.is_some() {
            return Err(ConfigError::new(
                key("missing_key"),
                "only applies to a stage with `order_by`",
            ));
        }
        return Ok(());
    };
    OrderBy::parse(by).map_err(|e| ConfigError::new(key("order_by"), e))?;
    Ok(())
}

/// What the engine built that a stage's runtime spec refers to.
pub(crate) struct StageParts<'a> {
    /// The stage's handler (registered, built by a factory, or built in).
    pub handler: std::sync::Arc<dyn flowgate_actors::Handler>,
    /// `<queue>.dlx` when the queue dead-letters.
    pub dead_letter_exchange: Option<String>,
    /// The supervisor's restart policy.
    pub policy: flowgate_actors::RestartPolicy,
    /// The memory dedup backend, if a stage uses it.
    pub memory_dedup: Option<&'a flowgate_actors::DedupHandle>,
    /// The Redis dedup backend, if a stage uses it.
    pub redis_dedup: Option<&'a flowgate_actors::DedupHandle>,
    /// The signing keys, if configured.
    pub keys: Option<&'a flowgate_actors::Keys>,
    /// `[limits] max_message_bytes`.
    pub max_message_bytes: u64,
    /// The host's key function, when `order_by` names one.
    pub order_key: Option<flowgate_actors::KeyFn>,
    /// The stage's queue has `single_active_consumer`.
    pub single_active_consumer: bool,
}

/// The failure-semantics keys of one stage: `retry`, `dedup`, `record_file`.
fn validate_failures(
    s: &StageConfig,
    ctx: &StageContext<'_>,
    key: &dyn Fn(&str) -> String,
) -> Result<(), ConfigError> {
    if let Some(r) = &s.retry {
        if r.max_attempts == 0 || r.max_attempts > 1000 {
            return Err(ConfigError::new(
                key("retry.max_attempts"),
                "must be between 1 and 1000",
            ));
        }
        if r.backoff.is_empty() || r.backoff.len() > 16 {
            return Err(ConfigError::new(
                key("retry.backoff"),
                "needs 1 to 16 delays, e.g. [\"1s\", \"10s\", \"1m\"]",
            ));
        }
        for (j, d) in r.backoff.iter().enumerate() {
            let d: Duration = **d;
            if d < Duration::from_millis(1) || d > Duration::from_secs(24 * 60 * 60) {
                return Err(ConfigError::new(
                    key(&format!("retry.backoff[{j}]")),
                    "must be between 1ms and 24h",
                ));
            }
        }
        // <queue>.retry.<n> must stay within the 255-byte queue name limit.
        if s.queue.len() > 240 {
            return Err(ConfigError::new(
                key("queue"),
                "is too long to name its retry tiers (max 240 bytes with a retry ladder)",
            ));
        }
    }
    if s.handler == "record" && s.record_file.is_none() {
        return Err(ConfigError::new(
            key("record_file"),
            "the `record` handler needs a record_file",
        ));
    }
    if s.dedup == DedupMode::Redis && !ctx.redis_url_set {
        return Err(ConfigError::new(
            "redis.url",
            "must be set for dedup = \"redis\"",
        ));
    }
    Ok(())
}

/// A stage's `batch` table: a batch fits in the stage's credits.
fn validate_batch(s: &StageConfig, key: &dyn Fn(&str) -> String) -> Result<(), ConfigError> {
    let Some(b) = &s.batch else {
        return Ok(());
    };
    if b.size == 0 || b.size > s.prefetch {
        return Err(ConfigError::new(
            key("batch.size"),
            format!(
                "must be between 1 and the stage's prefetch ({}): a batch cannot hold more deliveries than the stage has credits",
                s.prefetch
            ),
        ));
    }
    if b.timeout < Duration::from_millis(1) || b.timeout > Duration::from_secs(60) {
        return Err(ConfigError::new(
            key("batch.timeout"),
            "must be between 1ms and 1m",
        ));
    }
    Ok(())
}

/// A stage's `http` table (and that the `http` handler has one).
fn validate_http(s: &StageConfig, key: &dyn Fn(&str) -> String) -> Result<(), ConfigError> {
    let Some(h) = &s.http else {
        if s.handler == "http" {
            return Err(ConfigError::new(
                key("http"),
                "the `http` handler needs an http table, e.g. { url = \"http://127.0.0.1:8000/\" }",
            ));
        }
        return Ok(());
    };
    match url::Url::parse(&h.url) {
        Ok(u) if (u.scheme() == "http" || u.scheme() == "https") && u.has_host() => {}
        Ok(_) => {
            return Err(ConfigError::new(
                key("http.url"),
                "must be an http:// or https:// URL with a host",
            ))
        }
        // Never echo the URL: it may hold credentials.
        Err(e) => {
            return Err(ConfigError::new(
                key("http.url"),
                format!("malformed URL ({e})"),
            ))
        }
    }
    if h.timeout < Duration::from_millis(1) {
        return Err(ConfigError::new(
            key("http.timeout"),
            "must be at least 1ms",
        ));
    }
    if h.max_concurrency == 0 || h.max_concurrency > 4096 {
        return Err(ConfigError::new(
            key("http.max_concurrency"),
            "must be between 1 and 4096",
        ));
    }
    if h.retry_after_max < Duration::from_millis(1) {
        return Err(ConfigError::new(
            key("http.retry_after_max"),
            "must be at least 1ms",
        ));
    }
    if h.slow_down_limit < h.retry_after_max {
        return Err(ConfigError::new(
            key("http.slow_down_limit"),
            "must be at least http.retry_after_max",
        ));
    }
    if h.max_response_bytes == 0 {
        return Err(ConfigError::new(
            key("http.max_response_bytes"),
            "must be at least 1",
        ));
    }
    for (name, value) in &h.headers {
        let k = || key(&format!("http.headers.{name}"));
        let lower = name.to_ascii_lowercase();
        if reqwest::header::HeaderName::from_bytes(name.as_bytes()).is_err() {
            return Err(ConfigError::new(k(), "is not a valid HTTP header name"));
        }
        if HTTP_RESERVED_HEADERS.contains(&lower.as_str()) || lower.starts_with(HTTP_MAPPED_PREFIX)
        {
            return Err(ConfigError::new(
                k(),
                "is written by the engine (content-*, host, x-amqp-*); pick another name",
            ));
        }
        // Never echo the value: it may be a credential.
        if reqwest::header::HeaderValue::from_str(value).is_err() {
            return Err(ConfigError::new(
                k(),
                "is not a valid HTTP header value (visible ASCII only)",
            ));
        }
    }
    Ok(())
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
    pub fn policy(&self) -> flowgate_actors::RetryPolicy {
        flowgate_actors::RetryPolicy {
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

/// A stage's payload type: `bytes` (default) or `json`. The runtime's own type.
pub use flowgate_actors::Payload;

fn default_handler() -> String {
    "forward".into()
}
fn default_prefetch() -> u32 {
    50
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stage(extra: &str) -> Result<Config, ConfigError> {
        Config::from_toml(&format!(
            r#"
            [[queues]]
            name = "q"
            [[stages]]
            name = "s"
            queue = "q"
            handler = "sink"
            {extra}
            "#
        ))
    }

    #[test]
    fn order_by_names_a_key_the_engine_reads_or_a_key_function() {
        let ok = |v: &str| OrderBy::parse(v).unwrap();
        assert_eq!(ok("message_id"), OrderBy::Builtin(BuiltinKey::MessageId));
        assert_eq!(ok("routing_key"), OrderBy::Builtin(BuiltinKey::RoutingKey));
        assert_eq!(
            ok("correlation_id"),
            OrderBy::Builtin(BuiltinKey::CorrelationId)
        );
        assert_eq!(
            ok("header:account"),
            OrderBy::Builtin(BuiltinKey::Header("account".into()))
        );
        assert_eq!(ok("tenant").function(), Some("tenant"));
        for bad in ["", "header:", "a b", "x:y", &"k".repeat(65)] {
            assert!(OrderBy::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_in_place_retry_span_adds_the_ladder_and_the_handler_bounds() {
        let cfg = stage(
            "order_by = \"message_id\"\nhandler_timeout = \"10s\"\nretry = { max_attempts = 4, backoff = [\"1m\", \"10m\"] }",
        )
        .unwrap();
        // 1m + 10m + 10m of waits, 4 calls of at most 10s.
        assert_eq!(
            cfg.stages[0].in_place_retry_span(),
            Some(Duration::from_secs(21 * 60 + 40))
        );
        assert!(cfg.stages[0].in_place_retry_span() < Some(BROKER_CONSUMER_TIMEOUT));
        let unordered = stage("retry = { max_attempts = 4, backoff = [\"1m\"] }").unwrap();
        assert_eq!(unordered.stages[0].in_place_retry_span(), None);
    }

    #[test]
    fn order_keys_are_checked_where_they_are_declared() {
        let cfg = stage(r#"order_by = "header:account""#).unwrap();
        let s = &cfg.stages[0];
        let policy = s.order_policy(None).unwrap();
        assert!(matches!(policy.key, flowgate_actors::OrderKey::Header(ref h) if h == "account"));
        assert_eq!(policy.missing, MissingKey::Reject, "the default");
        let cfg = stage("order_by = \"routing_key\"\nmissing_key = \"shared\"").unwrap();
        assert_eq!(
            cfg.stages[0].order_policy(None).unwrap().missing,
            MissingKey::Shared
        );
        let e = stage(r#"order_by = "no such thing""#).unwrap_err();
        assert!(e.to_string().contains("stages[0].order_by"), "{e}");
        let e = stage(r#"missing_key = "shared""#).unwrap_err();
        assert!(e.to_string().contains("stages[0].missing_key"), "{e}");
        assert!(stage(r#"missing_key = "drop""#).is_err());
        assert!(stage("").unwrap().stages[0].order_policy(None).is_none());
    }
}
