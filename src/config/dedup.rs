//! `[dedup]`: deduplication settings shared by every stage with `dedup` on.

use super::*;

/// What a message without `message_id` is deduplicated by: `hash` (a
/// SHA-256 of routing key and body, the default) or `reject` (dead-letter
/// it with reason `missing-id`). The runtime's own type.
pub use flowgate_actors::MissingId;

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
    /// `hash` or `reject` (see [`MissingId`]). Default `hash`.
    #[serde(default)]
    pub missing_id: MissingId,
    /// Prefix of the Redis keys (`<prefix><stage>:<id>`), so several
    /// pipelines can share a Redis. Default `flowgate:dedup:`.
    #[serde(default = "default_dedup_prefix")]
    pub prefix: String,
}

fn default_lease() -> Duration {
    flowgate_actors::DEDUP_LEASE
}
fn default_ttl() -> Duration {
    flowgate_actors::DEDUP_DONE_TTL
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
            missing_id: MissingId::default(),
            prefix: default_dedup_prefix(),
        }
    }
}
