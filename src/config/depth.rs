//! `[depth]`: queue depth sampling and autoscaling.

use super::*;

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
