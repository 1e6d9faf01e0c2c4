//! `[redis]`: the Redis server of the `redis` dedup backend.

use super::*;

/// `[redis]`
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// Server URL. Default `redis://127.0.0.1:6379`. Prefer
    /// `FLOWGATE__REDIS__URL` over writing a password into a file.
    #[serde(default = "default_redis_url")]
    pub url: String,
    /// PEM file of the CA certificates that sign a `rediss://` server's
    /// certificate, trusted instead of the system's roots. Default: none
    /// (the system's roots).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// PEM file of a client certificate, for a `rediss://` server that
    /// authenticates its clients (`tls-auth-clients yes`, Redis's
    /// default). Needs `client_key_file`. Default: none.
    #[serde(default)]
    pub client_cert_file: Option<PathBuf>,
    /// PEM file of the client certificate's private key. Default: none.
    #[serde(default)]
    pub client_key_file: Option<PathBuf>,
}

/// The `[redis]` TLS files as read: the CA PEM, and the client's
/// certificate and key PEM.
pub type RedisTlsFiles = (Option<Vec<u8>>, Option<(Vec<u8>, Vec<u8>)>);

impl RedisConfig {
    /// The TLS files read into the store's settings (`ca_pem`,
    /// `client_pem`). Every error names its key.
    pub fn tls(&self) -> Result<RedisTlsFiles, ConfigError> {
        let tls_files = self.ca_file.is_some()
            || self.client_cert_file.is_some()
            || self.client_key_file.is_some();
        if tls_files && !self.url.starts_with("rediss://") {
            return Err(ConfigError::new(
                "redis.ca_file",
                "TLS files are set, but redis.url is not rediss://",
            ));
        }
        let ca = self
            .ca_file
            .as_deref()
            .map(|p| files::read_pem("redis.ca_file", p, "BEGIN CERTIFICATE"))
            .transpose()?;
        let client = files::client_pem_pair(
            "redis",
            self.client_cert_file.as_deref(),
            self.client_key_file.as_deref(),
        )?;
        Ok((ca, client))
    }
}

fn default_redis_url() -> String {
    "redis://127.0.0.1:6379".into()
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: default_redis_url(),
            ca_file: None,
            client_cert_file: None,
            client_key_file: None,
        }
    }
}

impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print a password.
        let shown = match url::Url::parse(&self.url) {
            Ok(mut u) if u.password().is_some() => {
                let _ = u.set_password(Some("***"));
                u.to_string()
            }
            Ok(u) => u.to_string(),
            Err(_) => "<malformed>".into(),
        };
        f.debug_struct("RedisConfig")
            .field("url", &shown)
            .field("ca_file", &self.ca_file)
            .field("client_cert_file", &self.client_cert_file)
            .field("client_key_file", &self.client_key_file)
            .finish()
    }
}
