//! `[spool]`: the durable publish spool.

use super::*;

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
