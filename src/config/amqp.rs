//! `[amqp]`: the broker.

use super::*;

/// `[amqp]`
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AmqpConfig {
    /// Broker URL. Default `amqp://guest:guest@127.0.0.1:5672/%2f`. Use
    /// `amqps://` for TLS. Prefer `url_file` or `FLOWGATE__AMQP__URL` over
    /// writing a password into a config file.
    #[serde(default = "default_url")]
    pub url: String,
    /// Several broker URLs (cluster nodes); when set, wins over `url`.
    /// flowgate connects to the first that answers and, when the link is
    /// lost for good, tries the next one. Default: none (`url` alone).
    #[serde(default)]
    pub urls: Vec<String>,
    /// A file whose contents (trimmed) are the broker URL; wins over `url`.
    /// For secrets mounted as files (Kubernetes, Docker). Default: none.
    #[serde(default)]
    pub url_file: Option<PathBuf>,
    /// Prefix of the connection names shown in `rabbitmqctl list_connections`.
    /// Default `flowgate`.
    #[serde(default = "default_conn_name")]
    pub connection_name: String,
    /// Bound on one connection attempt. Default `10s`.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
}

impl std::fmt::Debug for AmqpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpConfig")
            .field("url", &flowgate_actors::redact_url(&self.url))
            .field(
                "urls",
                &self
                    .urls
                    .iter()
                    .map(|u| flowgate_actors::redact_url(u))
                    .collect::<Vec<_>>(),
            )
            .field("url_file", &self.url_file)
            .field("connection_name", &self.connection_name)
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

fn default_url() -> String {
    "amqp://guest:guest@127.0.0.1:5672/%2f".into()
}
fn default_conn_name() -> String {
    "flowgate".into()
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(10)
}

impl Default for AmqpConfig {
    fn default() -> Self {
        Self {
            url: default_url(),
            urls: Vec::new(),
            url_file: None,
            connection_name: default_conn_name(),
            connect_timeout: default_connect_timeout(),
        }
    }
}

impl AmqpConfig {
    /// The first URL to connect to (see [`AmqpConfig::resolved_urls`]).
    pub fn resolved_url(&self) -> Result<String, ConfigError> {
        let mut urls = self.resolved_urls()?;
        Ok(urls.swap_remove(0))
    }

    /// The URLs to connect to, in order, never empty: the one read from
    /// `url_file` when set, else `urls` when not empty, else `url`.
    pub fn resolved_urls(&self) -> Result<Vec<String>, ConfigError> {
        match &self.url_file {
            Some(p) => std::fs::read_to_string(p)
                .map(|s| vec![s.trim().to_owned()])
                .map_err(|e| {
                    ConfigError::new("amqp.url_file", format!("cannot read {}: {e}", p.display()))
                }),
            None if !self.urls.is_empty() => Ok(self.urls.clone()),
            None => Ok(vec![self.url.clone()]),
        }
    }
}
