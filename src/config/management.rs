//! `[management]`: the operator API's listener and its tokens.

use super::*;

/// `[management]`: the management API (stage status, pause/resume, live
/// concurrency and publish rate, `/healthz`, `/readyz`), on its own listener
/// so that reaching the scrape or publish port does not let anyone steer the
/// engine. Every route but `/healthz` and `/readyz` needs
/// `Authorization: Bearer <token>`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ManagementConfig {
    /// Address of the management API, e.g. `127.0.0.1:9466`. Default empty:
    /// no listener (the API is still reachable from an embedding host through
    /// `EngineHandle`).
    #[serde(default)]
    pub bind: String,
    /// A file holding the accepted bearer tokens, one per line (blank lines
    /// and `#` comments skipped; each at least 16 bytes). A comment `# name:
    /// alice` right above a token names it (the name logged with what it
    /// did); an unnamed token is named `token-` and 8 hex digits of its
    /// SHA-256. Required with `bind`, unless `token_env` is set. Default none.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// The name of an environment variable holding the accepted tokens,
    /// separated by commas or whitespace; accepted together with
    /// `token_file`'s. Default none.
    #[serde(default)]
    pub token_env: Option<String>,
    /// Serve the operator's console (`/ui`: the pipeline live, dead letters
    /// to read, replay and delete) beside the API on `bind`, signed in with
    /// the same tokens. Default `true` (nothing is served without `bind`).
    #[serde(default = "yes")]
    pub console: bool,
    /// A directory where the console saves its index of each DLQ it
    /// browses (at most 16 MiB per DLQ, one file each), so that the first
    /// list page after a restart is answered from it (once checked against
    /// the queue) instead of waiting for a read of the whole queue. Default
    /// none: indexes live in memory only.
    #[serde(default)]
    pub dlq_index_dir: Option<PathBuf>,
}

fn yes() -> bool {
    true
}

impl Default for ManagementConfig {
    fn default() -> Self {
        Self {
            bind: String::new(),
            token_file: None,
            token_env: None,
            console: true,
            dlq_index_dir: None,
        }
    }
}

impl ManagementConfig {
    /// Reads the accepted tokens from `token_file` and `token_env`. Errors
    /// name the key at fault and never contain a token.
    pub fn tokens(&self) -> Result<Tokens, ConfigError> {
        Tokens::read(
            "management",
            self.token_file.as_deref(),
            self.token_env.as_deref(),
        )
    }
}
