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
    /// Handler: a built-in (`forward`, `sink`) or a name registered by the
    /// host application. Default `forward`.
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

fn default_handler() -> String {
    "forward".into()
}
fn default_prefetch() -> u32 {
    50
}
