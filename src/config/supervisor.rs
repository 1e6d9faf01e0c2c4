//! `[supervisor]`: the actors' restart policy.

use super::*;

/// `[supervisor]`
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SupervisorConfig {
    /// First restart delay. Default `100ms`.
    #[serde(default = "default_backoff_min", with = "humantime_serde")]
    pub backoff_min: Duration,
    /// Restart delay cap; also the broker recovery deadline: a connection
    /// not back within it is torn down and re-established (next URL).
    /// Default `10s`.
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
    pub fn policy(&self) -> flowgate_actors::RestartPolicy {
        flowgate_actors::RestartPolicy {
            backoff_min: self.backoff_min,
            backoff_max: self.backoff_max,
            max_restarts: self.max_restarts,
            window: self.window,
        }
    }
}
