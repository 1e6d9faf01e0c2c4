//! `[publisher]` and `[publisher.breaker]`: publishing, rate limit, circuit breaker.

use super::*;

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
