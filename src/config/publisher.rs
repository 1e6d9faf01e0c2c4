//! `[publisher]` and `[publisher.breaker]`: publishing, rate limit, circuit breaker.

use super::*;

/// `[publisher]`. A key left out takes the runtime's default
/// ([`flowgate_actors::PublisherConfig::default`]), the one place defaults are
/// written.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PublisherConfig {
    /// How long to wait for a broker confirm. Default `10s`.
    #[serde(with = "humantime_serde")]
    pub confirm_timeout: Duration,
    /// Most publishes awaiting a confirm at once. Default `1024`.
    pub max_unconfirmed: u32,
    /// Token bucket: publishes per second, for the whole engine (stage
    /// outputs, dead letters, ingress). Default `0`: unlimited.
    pub rate: u32,
    /// Token bucket: publishes admitted back to back after idling. Default `1000`.
    pub burst: u32,
    /// Most callers waiting to publish (for a token, for the broker to
    /// unblock, for room in the confirm window); beyond it a publish fails
    /// at once with backpressure (HTTP 503). Default `1024`.
    pub max_waiters: u32,
    /// The circuit breaker.
    pub breaker: BreakerConfig,
    /// Publish every message persistent (`delivery_mode = 2`), whatever
    /// delivery mode it carries. Default `false`: a message keeps its own, so
    /// `forward` republishes properties unchanged (a transient input stays
    /// transient, one without a delivery mode gets none); messages the engine
    /// creates (ingress, a handler's `Output::new`) are persistent anyway.
    pub force_persistent: bool,
}

/// `[publisher.breaker]`. A key left out takes the runtime's default
/// ([`flowgate_actors::BreakerConfig::default`] and, for `blocked_timeout`,
/// [`flowgate_actors::PublisherConfig::default`]).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerConfig {
    /// Consecutive publish failures (nack, `basic.return`, confirm timeout,
    /// channel error) that open the breaker. Default `5`.
    pub failures: u32,
    /// How long the breaker stays open before a probe publish. Default `5s`.
    #[serde(with = "humantime_serde")]
    pub reset: Duration,
    /// How long publishes wait while the broker blocks publishing (memory
    /// or disk alarm) before the breaker opens and they spool. Default `30s`.
    #[serde(with = "humantime_serde")]
    pub blocked_timeout: Duration,
}

impl Default for BreakerConfig {
    /// The runtime's defaults.
    fn default() -> Self {
        let runtime = flowgate_actors::PublisherConfig::default();
        Self {
            failures: runtime.breaker.failures,
            reset: runtime.breaker.reset,
            blocked_timeout: runtime.blocked_timeout,
        }
    }
}

impl Default for PublisherConfig {
    /// The runtime's defaults.
    fn default() -> Self {
        let runtime = flowgate_actors::PublisherConfig::default();
        Self {
            confirm_timeout: runtime.confirm_timeout,
            // The runtime's window and waiter bounds are small constants.
            max_unconfirmed: u32::try_from(runtime.max_unconfirmed).unwrap_or(u32::MAX),
            rate: runtime.rate,
            burst: runtime.burst,
            max_waiters: u32::try_from(runtime.max_waiters).unwrap_or(u32::MAX),
            breaker: BreakerConfig::default(),
            force_persistent: runtime.force_persistent,
        }
    }
}

impl PublisherConfig {
    /// As the runtime's publisher settings, every setting the file does not
    /// carry (spool, restart policy, signing keys) at the runtime's default.
    pub fn runtime(&self) -> flowgate_actors::PublisherConfig {
        let defaults = flowgate_actors::PublisherConfig::default();
        flowgate_actors::PublisherConfig {
            confirm_timeout: self.confirm_timeout,
            max_unconfirmed: self.max_unconfirmed as usize,
            rate: self.rate,
            burst: self.burst,
            max_waiters: self.max_waiters as usize,
            breaker: flowgate_actors::BreakerConfig {
                failures: self.breaker.failures,
                reset: self.breaker.reset,
                ..defaults.breaker
            },
            blocked_timeout: self.breaker.blocked_timeout,
            force_persistent: self.force_persistent,
            ..defaults
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    #[test]
    fn keys_left_out_take_the_runtimes_defaults_and_set_ones_reach_it() {
        let cfg = Config::from_toml(
            "[publisher]\nrate = 7\n[publisher.breaker]\nfailures = 9\n\
             [supervisor]\nmax_restarts = 3\n",
        )
        .unwrap();
        let rt = flowgate_actors::PublisherConfig::default();
        let p = cfg.publisher.runtime();
        assert_eq!(
            (p.rate, p.breaker.failures),
            (7, 9),
            "set keys reach the runtime"
        );
        assert_eq!(p.confirm_timeout, rt.confirm_timeout);
        assert_eq!(p.max_unconfirmed, rt.max_unconfirmed);
        assert_eq!((p.burst, p.max_waiters), (rt.burst, rt.max_waiters));
        assert_eq!(p.breaker.reset, rt.breaker.reset);
        assert_eq!(p.breaker.half_open_probes, rt.breaker.half_open_probes);
        assert_eq!(p.blocked_timeout, rt.blocked_timeout);
        let policy = cfg.supervisor.policy();
        let rp = flowgate_actors::RestartPolicy::default();
        assert_eq!(policy.max_restarts, 3);
        assert_eq!(
            (policy.backoff_min, policy.backoff_max, policy.window),
            (rp.backoff_min, rp.backoff_max, rp.window)
        );
    }
}
