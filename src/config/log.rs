//! `[log]`: how the daemon writes its log.

use super::*;

/// `[log]`: the daemon's log on stderr. The level filter is `RUST_LOG`
/// (default `info,lapin=warn`).
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `text` (human-readable lines) or `json` (one JSON object a line, with
    /// `trace_id`/`span_id` while a span is active and `stage`/`message_id`
    /// where known). Default `text`.
    #[serde(default)]
    pub format: LogFormat,
}

/// The line format of the log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object a line.
    Json,
}
