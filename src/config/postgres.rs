//! `[postgres]`: the host's PostgreSQL database, for the transactional
//! inbox (stages whose handler is a [`TxHandler`](crate::postgres::TxHandler))
//! and the outbox relay.

use super::*;

/// `[postgres]`
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// Server URL (`postgres://user:password@host:5432/database`, with
    /// `?sslmode=verify-full` and the files below for TLS). Empty: no
    /// PostgreSQL (no inbox stages, no relay). Prefer `url_file` or
    /// `FLOWGATE__POSTGRES__URL` over writing a password into a file.
    /// Default: empty.
    #[serde(default)]
    pub url: String,
    /// A file whose contents (trimmed) are the URL; wins over `url`. For
    /// secrets mounted as files. Default: none.
    #[serde(default)]
    pub url_file: Option<PathBuf>,
    /// Most connections the engine's pool opens (inbox handlers hold one
    /// for the length of a handler call, the relay one per batch). Default `8`.
    #[serde(default = "default_pool_size")]
    pub pool_size: u32,
    /// Bound on one statement (`statement_timeout` of every connection);
    /// `0s`: none. Default `10s`.
    #[serde(default = "default_statement_timeout", with = "humantime_serde")]
    pub statement_timeout: Duration,
    /// Bound on taking a connection from the pool (connecting included).
    /// Default `10s`.
    #[serde(default = "default_acquire_timeout", with = "humantime_serde")]
    pub acquire_timeout: Duration,
    /// Apply flowgate's migrations (the inbox and outbox tables) at start,
    /// as `flowgate db migrate` does. Default `false`.
    #[serde(default)]
    pub migrate_on_start: bool,
    /// How long an inbox row (a processed message id of a stage) is kept:
    /// a redelivery later than this is handled again. Default `7d`.
    #[serde(default = "default_inbox_retention", with = "humantime_serde")]
    pub inbox_retention: Duration,
    /// Relay the outbox (publish its committed rows through the engine's
    /// publisher) from this engine. Several engines may relay one outbox.
    /// Default `true` when `url` is set.
    #[serde(default = "default_relay")]
    pub relay: bool,
    /// Most outbox rows one relay batch takes (and holds locked until each
    /// is confirmed). Default `100`.
    #[serde(default = "default_relay_batch")]
    pub relay_batch: u32,
    /// How often the relay looks at the outbox without a notification
    /// (`LISTEN`/`NOTIFY` wakes it at once; this is the fallback).
    /// Default `1s`.
    #[serde(default = "default_relay_poll", with = "humantime_serde")]
    pub relay_poll: Duration,
    /// PEM file of the CA certificates that sign the server's certificate
    /// (with `sslmode=verify-ca` or `verify-full`). Default: none.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// PEM file of a client certificate, for a server that authenticates
    /// clients by certificate. Needs `client_key_file`. Default: none.
    #[serde(default)]
    pub client_cert_file: Option<PathBuf>,
    /// PEM file of the client certificate's private key. Default: none.
    #[serde(default)]
    pub client_key_file: Option<PathBuf>,
}

fn default_pool_size() -> u32 {
    8
}
fn default_statement_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_acquire_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_inbox_retention() -> Duration {
    Duration::from_secs(7 * 24 * 3600)
}
fn default_relay() -> bool {
    true
}
fn default_relay_batch() -> u32 {
    100
}
fn default_relay_poll() -> Duration {
    Duration::from_secs(1)
}

impl Default for PostgresConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            url_file: None,
            pool_size: default_pool_size(),
            statement_timeout: default_statement_timeout(),
            acquire_timeout: default_acquire_timeout(),
            migrate_on_start: false,
            inbox_retention: default_inbox_retention(),
            relay: default_relay(),
            relay_batch: default_relay_batch(),
            relay_poll: default_relay_poll(),
            ca_file: None,
            client_cert_file: None,
            client_key_file: None,
        }
    }
}

/// The `[postgres]` TLS files as read: the CA PEM, and the client's
/// certificate and key PEM.
pub type PostgresTlsFiles = (Option<Vec<u8>>, Option<(Vec<u8>, Vec<u8>)>);

impl PostgresConfig {
    /// True when a database is configured (`url` or `url_file`).
    pub fn is_set(&self) -> bool {
        !self.url.is_empty() || self.url_file.is_some()
    }

    /// The URL: read from `url_file` when set, else `url`.
    pub fn resolved_url(&self) -> Result<String, ConfigError> {
        match &self.url_file {
            Some(p) => files::read("postgres.url_file", p)
                .map(|b| String::from_utf8_lossy(&b).trim().to_owned()),
            None => Ok(self.url.clone()),
        }
    }

    /// The TLS files read (`ca_pem`, `client_pem`). Every error names its key.
    pub fn tls(&self) -> Result<PostgresTlsFiles, ConfigError> {
        let ca = self
            .ca_file
            .as_deref()
            .map(|p| files::read_pem("postgres.ca_file", p, "BEGIN CERTIFICATE"))
            .transpose()?;
        let client = files::client_pem_pair(
            "postgres",
            self.client_cert_file.as_deref(),
            self.client_key_file.as_deref(),
        )?;
        Ok((ca, client))
    }

    /// Checks the section (the URL is read and parsed, the TLS files read).
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if !self.is_set() {
            return Ok(());
        }
        let url = self.resolved_url()?;
        let key = if self.url_file.is_some() {
            "postgres.url_file"
        } else {
            "postgres.url"
        };
        match url::Url::parse(&url) {
            Ok(u) if u.scheme() == "postgres" || u.scheme() == "postgresql" => {
                if u.host_str().is_none_or(str::is_empty) {
                    return Err(ConfigError::new(key, "has no host"));
                }
            }
            // Never echo the URL: it may hold a password.
            _ => {
                return Err(ConfigError::new(
                    key,
                    "must be a postgres:// or postgresql:// URL",
                ))
            }
        }
        if self.pool_size == 0 {
            return Err(ConfigError::new("postgres.pool_size", "must be at least 1"));
        }
        if self.relay_batch == 0 {
            return Err(ConfigError::new(
                "postgres.relay_batch",
                "must be at least 1",
            ));
        }
        if self.relay_poll < Duration::from_millis(10) {
            return Err(ConfigError::new(
                "postgres.relay_poll",
                "must be at least 10ms",
            ));
        }
        if self.inbox_retention < Duration::from_secs(1) {
            return Err(ConfigError::new(
                "postgres.inbox_retention",
                "must be at least 1s",
            ));
        }
        self.tls()?;
        Ok(())
    }
}

impl std::fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print a password.
        let shown = match url::Url::parse(&self.url) {
            Ok(mut u) if u.password().is_some() => {
                let _ = u.set_password(Some("***"));
                u.to_string()
            }
            Ok(u) => u.to_string(),
            Err(_) if self.url.is_empty() => String::new(),
            Err(_) => "<malformed>".into(),
        };
        f.debug_struct("PostgresConfig")
            .field("url", &shown)
            .field("url_file", &self.url_file)
            .field("pool_size", &self.pool_size)
            .field("statement_timeout", &self.statement_timeout)
            .field("acquire_timeout", &self.acquire_timeout)
            .field("migrate_on_start", &self.migrate_on_start)
            .field("inbox_retention", &self.inbox_retention)
            .field("relay", &self.relay)
            .field("relay_batch", &self.relay_batch)
            .field("relay_poll", &self.relay_poll)
            .field("ca_file", &self.ca_file)
            .field("client_cert_file", &self.client_cert_file)
            .field("client_key_file", &self.client_key_file)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(section: &str) -> Result<Config, ConfigError> {
        let cfg = Config::from_toml(&format!("[postgres]\n{section}"))?;
        cfg.postgres.validate()?;
        Ok(cfg)
    }

    #[test]
    fn unset_by_default() {
        let cfg = with("").unwrap();
        assert!(!cfg.postgres.is_set());
        assert_eq!(cfg.postgres.pool_size, 8);
        assert!(cfg.postgres.relay);
    }

    #[test]
    fn a_wrong_scheme_names_the_key_without_echoing_the_url() {
        let e = with("url = \"http://u:secret@h/db\"").unwrap_err();
        assert_eq!(e.key, "postgres.url");
        assert!(!e.to_string().contains("secret"), "{e}");
    }

    #[test]
    fn url_file_wins_and_is_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("url");
        std::fs::write(&p, "postgres://u:p@127.0.0.1/db\n").unwrap();
        let cfg = with(&format!(
            "url = \"http://nope\"\nurl_file = \"{}\"",
            p.display()
        ))
        .unwrap();
        assert_eq!(
            cfg.postgres.resolved_url().unwrap(),
            "postgres://u:p@127.0.0.1/db"
        );
        let e = with("url_file = \"/nonexistent/flowgate-pg-url\"").unwrap_err();
        assert_eq!(e.key, "postgres.url_file");
    }

    #[test]
    fn zero_pool_and_half_a_client_pair_are_refused() {
        let e = with("url = \"postgres://h/db\"\npool_size = 0").unwrap_err();
        assert_eq!(e.key, "postgres.pool_size");
        let e = with("url = \"postgres://h/db\"\nclient_cert_file = \"/x.pem\"").unwrap_err();
        assert_eq!(e.key, "postgres.client_key_file");
    }

    #[test]
    fn the_debug_form_hides_the_password() {
        let cfg = with("url = \"postgres://u:secret@h/db\"").unwrap();
        assert!(!format!("{:?}", cfg.postgres).contains("secret"));
    }
}
