//! The publisher's settings and their defaults.

use super::BreakerConfig;
use crate::signing::Keys;
use crate::supervision::RestartPolicy;
use std::path::PathBuf;
use std::time::Duration;

/// The default queue for spooled records that turn out unroutable on
/// replay (see the module docs).
pub const UNROUTABLE_QUEUE: &str = "flowgate.unroutable";

/// Where and how large the durable spool is.
#[derive(Clone, Debug)]
pub struct SpoolConfig {
    /// The redb file.
    pub path: PathBuf,
    /// Bound on the encoded bytes stored; beyond it publishes get backpressure.
    pub max_bytes: u64,
}

/// Publisher settings.
#[derive(Clone, Debug)]
pub struct PublisherConfig {
    /// How long to wait for a broker confirm before calling the publish failed.
    pub confirm_timeout: Duration,
    /// Bound on publishes awaiting a confirm (the publish window).
    pub max_unconfirmed: usize,
    /// Token bucket rate in publishes per second; `0` is unlimited.
    pub rate: u32,
    /// Token bucket burst.
    pub burst: u32,
    /// Most callers allowed to wait (for a token, an unblock, or window
    /// room) before further publishes get [`Error::Backpressure`](crate::Error::Backpressure) at once.
    pub max_waiters: usize,
    /// The circuit breaker's thresholds.
    pub breaker: BreakerConfig,
    /// How long a broker block (resource alarm) may last before the breaker
    /// is forced open and publishes spool.
    pub blocked_timeout: Duration,
    /// The durable spool; `None`: an open breaker answers backpressure.
    pub spool: Option<SpoolConfig>,
    /// Restart backoff and budget.
    pub policy: RestartPolicy,
    /// Signs every publish (header `x-flowgate-signature`, see
    /// [`Keys`](crate::Keys)) just before it is sent, spool replays included;
    /// `None`: messages go out as they are.
    pub signing: Option<Keys>,
    /// Publish every message persistent (`delivery_mode = 2`) whatever it
    /// carries. Default `false`: the message's own delivery mode is kept, so
    /// `forward` republishes a transient input as transient and one without
    /// a delivery mode without one. Messages made with [`Output::new`](crate::Output::new) are
    /// persistent already.
    pub force_persistent: bool,
    /// Where a spooled record that comes back unroutable on replay is
    /// moved (through the default exchange), with reason headers. Declared
    /// durable by the publisher on first use. At most 255 bytes.
    pub unroutable_queue: String,
}

impl Default for PublisherConfig {
    fn default() -> Self {
        Self {
            confirm_timeout: Duration::from_secs(10),
            max_unconfirmed: 1024,
            rate: 0,
            burst: 1000,
            max_waiters: 1024,
            breaker: BreakerConfig::default(),
            blocked_timeout: Duration::from_secs(30),
            spool: None,
            policy: RestartPolicy::default(),
            signing: None,
            force_persistent: false,
            unroutable_queue: UNROUTABLE_QUEUE.to_owned(),
        }
    }
}
