//! `[security]`: HMAC message signing keys.

use super::*;

/// `[security]`: HMAC-SHA256 message signing (the canonical form is
/// documented in `flowgate_actors::signing`). The key itself never appears
/// in the configuration, in logs or in `Debug` output: only where to read it.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SecurityConfig {
    /// A file holding the secret HMAC key (its bytes, surrounding whitespace
    /// trimmed; at least 16 bytes, e.g. `openssl rand -hex 32`). Default
    /// none: no key, nothing signed or verified.
    #[serde(default)]
    pub hmac_key_file: Option<PathBuf>,
    /// Alternative to `hmac_key_file`: the name of an environment variable
    /// holding the key (same rules). Default none.
    #[serde(default)]
    pub hmac_key_env: Option<String>,
    /// Key rotation: a file holding the previous key, accepted when
    /// verifying but never used to sign. Needs a current key. Default none.
    #[serde(default)]
    pub hmac_previous_key_file: Option<PathBuf>,
    /// With a key, every publish the engine makes (stage outputs, retry
    /// copies, dead letters, ingress, gateway, spool replays) carries header
    /// `x-flowgate-signature`. Default `true`.
    #[serde(default = "default_true")]
    pub sign_outputs: bool,
}

fn default_true() -> bool {
    true
}

impl Default for SecurityConfig {
    fn default() -> Self {
        Self {
            hmac_key_file: None,
            hmac_key_env: None,
            hmac_previous_key_file: None,
            sign_outputs: true,
        }
    }
}

fn key_bytes(key: &str, raw: Vec<u8>) -> Result<Vec<u8>, ConfigError> {
    let trimmed = raw.trim_ascii();
    if trimmed.len() < MIN_KEY_BYTES {
        return Err(ConfigError::new(
            key,
            format!(
                "the key must be at least {MIN_KEY_BYTES} bytes (it has {})",
                trimmed.len()
            ),
        ));
    }
    Ok(trimmed.to_vec())
}

fn key_from_file(key: &str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    let raw = std::fs::read(path)
        .map_err(|e| ConfigError::new(key, format!("cannot read {}: {e}", path.display())))?;
    key_bytes(key, raw)
}

impl SecurityConfig {
    /// Reads the keys: `None` when no key is configured. Errors name the
    /// key at fault and never contain key material.
    pub fn keys(&self) -> Result<Option<flowgate_actors::Keys>, ConfigError> {
        use flowgate_actors::{Keys, SigningKey};
        let current = match (&self.hmac_key_file, &self.hmac_key_env) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::new(
                    "security.hmac_key_env",
                    "set either hmac_key_file or hmac_key_env, not both",
                ))
            }
            (Some(path), None) => Some(key_from_file("security.hmac_key_file", path)?),
            (None, Some(var)) => {
                let raw = std::env::var_os(var).ok_or_else(|| {
                    ConfigError::new(
                        "security.hmac_key_env",
                        format!("environment variable `{var}` is not set"),
                    )
                })?;
                Some(key_bytes(
                    "security.hmac_key_env",
                    raw.into_encoded_bytes(),
                )?)
            }
            (None, None) => None,
        };
        let previous = match &self.hmac_previous_key_file {
            Some(path) => Some(key_from_file("security.hmac_previous_key_file", path)?),
            None => None,
        };
        match (current, previous) {
            (None, Some(_)) => Err(ConfigError::new(
                "security.hmac_previous_key_file",
                "needs a current key (hmac_key_file or hmac_key_env)",
            )),
            (None, None) => Ok(None),
            (Some(c), p) => Ok(Some(Keys {
                current: SigningKey::new(c),
                previous: p.map(SigningKey::new),
            })),
        }
    }
}
