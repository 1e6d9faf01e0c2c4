//! `[supervisor]`: the actors' restart policy.

use super::*;

/// `[supervisor]`. A key left out takes the runtime's default
/// ([`flowgate_actors::RestartPolicy::default`]).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SupervisorConfig {
    /// First restart delay. Default `100ms`.
    #[serde(with = "humantime_serde")]
    pub backoff_min: Duration,
    /// Restart delay cap; also the broker recovery deadline: lapin's own
    /// recovery of a lost connection gets half of it (from 1 s,
    /// doubling), and a connection not back within it is torn down and
    /// re-established (next URL). Default `10s`.
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
    /// Restarts allowed per `window` before the engine escalates (shuts
    /// down, exit status 1). Waiting for an unreachable broker is not a
    /// restart that counts: an outage of any length is waited out. Default `20`.
    pub max_restarts: u32,
    /// Default `60s`.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
}

impl Default for SupervisorConfig {
    /// The runtime's defaults.
    fn default() -> Self {
        let flowgate_actors::RestartPolicy {
            backoff_min,
            backoff_max,
            max_restarts,
            window,
        } = flowgate_actors::RestartPolicy::default();
        Self {
            backoff_min,
            backoff_max,
            max_restarts,
            window,
        }
    }
}

impl SupervisorConfig {
    /// As the actors' restart policy.
    pub fn policy(&self) -> flowgate_actors::RestartPolicy {
        flowgate_actors::RestartPolicy {
            backoff_min: self.backoff_min,
            backoff_max: self.backoff_max,
            max_restarts: self.max_restarts,
            window: self.window,
        }
    }
}
