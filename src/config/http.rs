//! `[http]`: the engine's HTTP server.

use super::*;

/// `[http]`
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Address of the HTTP server serving `/metrics`, `/healthz`, `/readyz`
    /// (publishing has its own listener, `[ingress] bind`). Default
    /// `127.0.0.1:9464`. Empty string: no server.
    #[serde(default = "default_bind")]
    pub bind: String,
}

fn default_bind() -> String {
    "127.0.0.1:9464".into()
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            bind: default_bind(),
        }
    }
}
