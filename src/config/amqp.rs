//! `[amqp]`: the broker.

use super::*;
use flowgate_actors::{ClientIdentity, TlsSettings};

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
    /// TLS for `amqps://` URLs: a private CA, a client certificate, the
    /// name to verify, SASL EXTERNAL. Default: the system's roots, no
    /// client certificate, PLAIN.
    #[serde(default)]
    pub tls: AmqpTlsConfig,
}

/// `[amqp.tls]`: TLS and authentication of the broker connections. Files
/// are read at start (and by `check-config`); a broker whose certificate
/// they cannot verify fails the start at once (exit code 1), it is not
/// waited for.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AmqpTlsConfig {
    /// PEM file of CA certificates trusted to sign the broker's
    /// certificate, in addition to the system's roots. Default: none.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// PEM file of the client certificate (its chain, the client's own
    /// certificate first), for brokers with `fail_if_no_peer_cert = true`
    /// or `auth = "external"`. Needs `client_key_file`. Default: none.
    #[serde(default)]
    pub client_cert_file: Option<PathBuf>,
    /// PEM file of the client certificate's private key (PKCS#8, PKCS#1
    /// or SEC1). Default: none.
    #[serde(default)]
    pub client_key_file: Option<PathBuf>,
    /// A PKCS#12 bundle holding the client certificate and key, instead of
    /// `client_cert_file` + `client_key_file`. Default: none.
    #[serde(default)]
    pub pkcs12_file: Option<PathBuf>,
    /// A file whose contents (trimmed) are the PKCS#12 bundle's password.
    /// Default: none (an empty password).
    #[serde(default)]
    pub pkcs12_password_file: Option<PathBuf>,
    /// The name the broker's certificate must carry (and the SNI sent),
    /// when it is not the URL's host (connecting by IP address, through a
    /// tunnel). Default: the URL's host.
    #[serde(default)]
    pub server_name: Option<String>,
    /// `plain` (the URL's user and password) or `external` (SASL EXTERNAL:
    /// the broker takes the user name from the client certificate; needs
    /// the `rabbitmq_auth_mechanism_ssl` plugin and a client certificate).
    /// Default `plain`.
    #[serde(default)]
    pub auth: AmqpAuth,
}

/// How flowgate authenticates to the broker.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AmqpAuth {
    /// The URL's user and password (SASL PLAIN).
    #[default]
    Plain,
    /// The client certificate (SASL EXTERNAL).
    External,
}

impl AmqpTlsConfig {
    /// True when any setting differs from the default.
    pub fn is_set(&self) -> bool {
        self != &AmqpTlsConfig::default()
    }

    /// Reads the files into the runtime's settings. Every error names its key.
    pub fn settings(&self) -> Result<TlsSettings, ConfigError> {
        let ca_pem = match &self.ca_file {
            Some(p) => {
                let bytes = files::read_pem("amqp.tls.ca_file", p, "BEGIN CERTIFICATE")?;
                Some(String::from_utf8(bytes).map_err(|_| {
                    ConfigError::new("amqp.tls.ca_file", "is not a text (PEM) file")
                })?)
            }
            None => None,
        };
        let identity = match (
            files::client_pem_pair(
                "amqp.tls",
                self.client_cert_file.as_deref(),
                self.client_key_file.as_deref(),
            )?,
            &self.pkcs12_file,
        ) {
            (None, None) => None,
            (Some((cert_chain, key)), None) => Some(ClientIdentity::Pem { cert_chain, key }),
            (None, Some(b)) => Some(ClientIdentity::Pkcs12 {
                der: files::read("amqp.tls.pkcs12_file", b)?,
                password: match &self.pkcs12_password_file {
                    Some(p) => {
                        String::from_utf8_lossy(&files::read("amqp.tls.pkcs12_password_file", p)?)
                            .trim()
                            .to_owned()
                    }
                    None => String::new(),
                },
            }),
            (Some(_), Some(_)) => {
                return Err(ConfigError::new(
                    "amqp.tls.pkcs12_file",
                    "give either pkcs12_file or client_cert_file + client_key_file, not both",
                ))
            }
        };
        if self.pkcs12_password_file.is_some() && self.pkcs12_file.is_none() {
            return Err(ConfigError::new(
                "amqp.tls.pkcs12_password_file",
                "is set but pkcs12_file is not",
            ));
        }
        if self.auth == AmqpAuth::External && identity.is_none() {
            return Err(ConfigError::new(
                "amqp.tls.auth",
                "`external` needs a client certificate (client_cert_file + client_key_file, or pkcs12_file)",
            ));
        }
        if let Some(name) = &self.server_name {
            let valid = !name.is_empty()
                && name.len() <= 253
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':'));
            if !valid {
                return Err(ConfigError::new(
                    "amqp.tls.server_name",
                    "must be a DNS name or an IP address",
                ));
            }
        }
        Ok(TlsSettings {
            ca_pem,
            identity,
            server_name: self.server_name.clone(),
            external_auth: self.auth == AmqpAuth::External,
        })
    }
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
            .field("tls", &self.tls)
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
            tls: AmqpTlsConfig::default(),
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
