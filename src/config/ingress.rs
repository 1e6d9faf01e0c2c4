//! `[ingress]`: the HTTP publish endpoint, its listener, who may use it,
//! where it may publish, and the bounds that keep a careless or hostile
//! client from costing anything but its own requests.

use super::ConfigError;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Duration;

/// `[ingress]`
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IngressConfig {
    /// Address of the publish listener (`POST /publish/{exchange}/{routing_key}`),
    /// separate from `[http] bind` (metrics and health) so that reaching the
    /// scrape port does not let anyone publish. Default `""`: no ingress.
    #[serde(default)]
    pub bind: String,
    /// Who may publish: `token` (a bearer token from `token_file` or
    /// `token_env`, `Authorization: Bearer <token>`) or `none` — **anyone
    /// who can reach `bind` may publish** to the listed routes, and nothing
    /// they send is signed. Default `token`.
    #[serde(default)]
    pub auth: IngressAuth,
    /// A file holding the accepted tokens, one per line (blank lines and
    /// lines starting with `#` ignored; several for rotation: add the new
    /// one, move the clients, remove the old one). Read at start. Default none.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// The name of an environment variable holding the accepted tokens,
    /// separated by commas or whitespace (for a Kubernetes Secret). Taken
    /// together with `token_file`'s. Default none.
    #[serde(default)]
    pub token_env: Option<String>,
    /// Where the ingress may publish: `[{ exchange = "shop", routing_key =
    /// "order.*" }]`, routing keys as topic patterns (`*` one word, `#` zero
    /// or more); any other route is answered 403. Required when `bind` is set.
    #[serde(default)]
    pub routes: Vec<IngressRoute>,
    /// Every publish is answered within this: when the broker has not
    /// confirmed in time the message is spooled (with a `[spool]`) and
    /// answered 202 `spooled`, else 503 with `Retry-After` (the broker may
    /// still take it: retry with the same `Idempotency-Key`). Default `5s`.
    #[serde(default = "default_publish_timeout", with = "humantime_serde")]
    pub publish_timeout: Duration,
    /// Most open connections; beyond it new ones wait in the listen backlog.
    /// Default `4096`.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Most requests handled at once; beyond it a request is answered 503
    /// with `Retry-After` at once. Default `256`.
    #[serde(default = "default_max_concurrent")]
    pub max_concurrent: usize,
    /// How long a client may take to send a request's headers (a connection
    /// that sends nothing is closed after it too; slow-header clients get
    /// 408). Default `5s`.
    #[serde(default = "default_header_timeout", with = "humantime_serde")]
    pub header_timeout: Duration,
    /// How long a client may take to send a request's body (408 after it).
    /// Default `10s`.
    #[serde(default = "default_body_timeout", with = "humantime_serde")]
    pub body_timeout: Duration,
}

/// `[ingress] auth`.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum IngressAuth {
    /// A bearer token is required (default).
    #[default]
    Token,
    /// No authentication: open to anyone who can reach the listener.
    None,
}

/// One route the ingress may publish to.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct IngressRoute {
    /// The exchange (exact); must be declared under `[[exchanges]]`.
    pub exchange: String,
    /// A topic pattern over the routing key. Default `#` (any key).
    #[serde(default = "default_any_key")]
    pub routing_key: String,
}

fn default_any_key() -> String {
    "#".into()
}
fn default_publish_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_max_connections() -> usize {
    4096
}
fn default_max_concurrent() -> usize {
    256
}
fn default_header_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_body_timeout() -> Duration {
    Duration::from_secs(10)
}

impl Default for IngressConfig {
    fn default() -> Self {
        Self {
            bind: String::new(),
            auth: IngressAuth::default(),
            token_file: None,
            token_env: None,
            routes: Vec::new(),
            publish_timeout: default_publish_timeout(),
            max_connections: default_max_connections(),
            max_concurrent: default_max_concurrent(),
            header_timeout: default_header_timeout(),
            body_timeout: default_body_timeout(),
        }
    }
}

/// Accepted bearer tokens, each with a name for the logs (who did what).
/// Never printed: `Debug` shows only how many.
///
/// A token is named by a `# name: <name>` comment on the line before it in
/// a token file; any other token is named `token-` and the first 8 hex
/// digits of its SHA-256 (stable across restarts and rotation of the
/// others, and no help to anyone guessing it). Comments were always
/// skipped, so a file written for an earlier version accepts exactly the
/// same tokens.
#[derive(Clone, Default)]
pub struct Tokens(Vec<(String, Vec<u8>)>);

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tokens({} redacted)", self.0.len())
    }
}

/// Shortest token accepted, in bytes.
pub const MIN_TOKEN_BYTES: usize = 16;

/// Longest token name kept (a longer `# name:` is cut).
const MAX_NAME_CHARS: usize = 64;

/// The comment that names the token on the next line.
const NAME_DIRECTIVE: &str = "name:";

impl Tokens {
    /// Whether `presented` is one of the tokens, compared in constant time
    /// per token (no early exit on the first differing byte).
    pub fn accepts(&self, presented: &[u8]) -> bool {
        self.identify(presented).is_some()
    }

    /// The name of the token `presented` is, if it is one; every token is
    /// compared in constant time (no early exit on a match either).
    pub fn identify(&self, presented: &[u8]) -> Option<&str> {
        let mut found = None;
        for (name, t) in &self.0 {
            let same_len = t.len() == presented.len();
            let diff = t
                .iter()
                .zip(presented)
                .fold(0u8, |acc, (a, b)| acc | (a ^ b));
            if same_len && diff == 0 && found.is_none() {
                found = Some(name.as_str());
            }
        }
        found
    }

    /// How many tokens are accepted.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when none is.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The tokens' names, in the order read.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|(n, _)| n.as_str())
    }

    /// Reads the tokens of section `section` from its `token_file` (one per
    /// line) and `token_env` (separated by commas or whitespace). Errors name
    /// the key at fault and never contain a token.
    pub(crate) fn read(
        section: &str,
        file: Option<&std::path::Path>,
        env: Option<&str>,
    ) -> Result<Tokens, ConfigError> {
        let mut tokens = Tokens::default();
        if let Some(p) = file {
            let key = format!("{section}.token_file");
            let text = std::fs::read_to_string(p)
                .map_err(|e| ConfigError::new(&key, format!("cannot read {}: {e}", p.display())))?;
            tokens.push_all(&key, &text, true)?;
        }
        if let Some(var) = env {
            let key = format!("{section}.token_env");
            let text = std::env::var(var).map_err(|_| {
                ConfigError::new(
                    &key,
                    format!("environment variable `{var}` is not set (or not UTF-8)"),
                )
            })?;
            tokens.push_all(&key, &text, false)?;
        }
        Ok(tokens)
    }

    fn push_all(&mut self, key: &str, text: &str, by_line: bool) -> Result<(), ConfigError> {
        let mut items: Vec<(Option<String>, &str)> = Vec::new();
        if by_line {
            let mut name = None;
            for l in text.lines().map(str::trim) {
                if let Some(comment) = l.strip_prefix('#') {
                    name = comment
                        .trim()
                        .strip_prefix(NAME_DIRECTIVE)
                        .map(|n| n.trim().chars().take(MAX_NAME_CHARS).collect::<String>())
                        .filter(|n| !n.is_empty());
                } else if !l.is_empty() {
                    items.push((name.take(), l));
                }
            }
        } else {
            items = text
                .split(|c: char| c == ',' || c.is_whitespace())
                .filter(|t| !t.is_empty())
                .map(|t| (None, t))
                .collect();
        }
        for (n, (name, t)) in items.into_iter().enumerate() {
            if t.len() < MIN_TOKEN_BYTES {
                // Name the position, never the token.
                return Err(ConfigError::new(
                    key,
                    format!("token {} is shorter than {MIN_TOKEN_BYTES} bytes", n + 1),
                ));
            }
            let name = name.unwrap_or_else(|| fingerprint_name(t.as_bytes()));
            self.0.push((name, t.as_bytes().to_vec()));
        }
        Ok(())
    }
}

/// `token-` and the first 8 hex digits of the token's SHA-256.
fn fingerprint_name(token: &[u8]) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(token);
    let hex: String = digest[..4].iter().map(|b| format!("{b:02x}")).collect();
    format!("token-{hex}")
}

impl IngressConfig {
    /// An ingress on `bind` open to anyone (`auth = "none"`), publishing to
    /// `routes`, every bound at its default. For tests and local demos.
    pub fn open(bind: impl Into<String>, routes: Vec<IngressRoute>) -> Self {
        Self {
            bind: bind.into(),
            auth: IngressAuth::None,
            routes,
            ..Self::default()
        }
    }

    /// Reads the accepted tokens from `token_file` and `token_env`. Errors
    /// name the key at fault and never contain a token.
    pub fn tokens(&self) -> Result<Tokens, ConfigError> {
        Tokens::read(
            "ingress",
            self.token_file.as_deref(),
            self.token_env.as_deref(),
        )
    }

    /// Whether a route listed in `routes` allows `exchange`/`routing_key`.
    pub fn allows(&self, exchange: &str, routing_key: &str) -> bool {
        self.routes.iter().any(|r| {
            r.exchange == exchange && super::ExchangeType::Topic.routes(&r.routing_key, routing_key)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_rotate_and_never_print() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("tokens");
        std::fs::write(
            &f,
            "# current\nnew-token-0123456789\n\nold-token-0123456789\n",
        )
        .unwrap();
        let cfg = IngressConfig {
            token_file: Some(f),
            ..IngressConfig::default()
        };
        let t = cfg.tokens().unwrap();
        assert_eq!(t.len(), 2);
        assert!(t.accepts(b"new-token-0123456789"));
        assert!(t.accepts(b"old-token-0123456789"));
        assert!(!t.accepts(b"new-token-012345678"));
        assert!(!t.accepts(b""));
        assert!(!format!("{t:?}").contains("token-0"), "{t:?}");
    }

    #[test]
    fn a_name_comment_names_the_next_token_and_others_get_a_fingerprint() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("tokens");
        std::fs::write(
            &f,
            "# name: alice\nalice-token-0123456789\n# rotated in March\nanon-token-0123456789\n",
        )
        .unwrap();
        let cfg = IngressConfig {
            token_file: Some(f),
            ..IngressConfig::default()
        };
        let t = cfg.tokens().unwrap();
        assert_eq!(t.identify(b"alice-token-0123456789"), Some("alice"));
        let anon = t.identify(b"anon-token-0123456789").unwrap();
        assert!(anon.starts_with("token-") && anon.len() == 14, "{anon}");
        assert_eq!(anon, fingerprint_name(b"anon-token-0123456789"));
        assert_eq!(t.identify(b"anon-token-012345678"), None);
        assert_eq!(t.names().count(), 2);
    }

    #[test]
    fn a_short_token_is_refused_without_echoing_it() {
        std::env::set_var(
            "FLOWGATE_TEST_INGRESS_TOKENS",
            "a-long-enough-token-1, shorty",
        );
        let cfg = IngressConfig {
            token_env: Some("FLOWGATE_TEST_INGRESS_TOKENS".into()),
            ..IngressConfig::default()
        };
        let e = cfg.tokens().unwrap_err();
        assert_eq!(e.key, "ingress.token_env");
        assert!(!e.to_string().contains("shorty"), "{e}");
    }

    #[test]
    fn routes_are_topic_patterns_on_an_exact_exchange() {
        let cfg = IngressConfig::open(
            "127.0.0.1:0",
            vec![IngressRoute {
                exchange: "shop".into(),
                routing_key: "order.*".into(),
            }],
        );
        assert!(cfg.allows("shop", "order.created"));
        assert!(!cfg.allows("shop", "order.created.eu"));
        assert!(!cfg.allows("shop", "payment.done"));
        assert!(!cfg.allows("shop2", "order.created"));
    }
}
