//! Reading the files a config names (TLS certificates and keys): one way
//! for every section, each error naming the key at fault and never the
//! file's contents.

use super::ConfigError;
use std::path::Path;

/// The bytes of the file named by config key `key` (e.g. `redis.ca_file`).
pub(crate) fn read(key: &str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path)
        .map_err(|e| ConfigError::new(key, format!("cannot read {}: {e}", path.display())))
}

/// A PEM file that must hold a `what` block (`BEGIN CERTIFICATE`,
/// `PRIVATE KEY`).
pub(crate) fn read_pem(key: &str, path: &Path, what: &str) -> Result<Vec<u8>, ConfigError> {
    let bytes = read(key, path)?;
    if !String::from_utf8_lossy(&bytes).contains(what) {
        return Err(ConfigError::new(
            key,
            format!("{} holds no PEM `{what}`", path.display()),
        ));
    }
    Ok(bytes)
}

/// A client certificate (chain) and its private key, PEM bytes.
pub(crate) type PemPair = (Vec<u8>, Vec<u8>);

/// A client certificate (chain) and its private key, PEM: both or
/// neither. `section` is the keys' prefix (`amqp.tls`, `redis`).
pub(crate) fn client_pem_pair(
    section: &str,
    cert: Option<&Path>,
    key: Option<&Path>,
) -> Result<Option<PemPair>, ConfigError> {
    let name = |k: &str| format!("{section}.{k}");
    match (cert, key) {
        (None, None) => Ok(None),
        (Some(c), Some(k)) => Ok(Some((
            read_pem(&name("client_cert_file"), c, "BEGIN CERTIFICATE")?,
            read_pem(&name("client_key_file"), k, "PRIVATE KEY")?,
        ))),
        (Some(_), None) => Err(ConfigError::new(
            name("client_key_file"),
            "is needed with client_cert_file",
        )),
        (None, Some(_)) => Err(ConfigError::new(
            name("client_cert_file"),
            "is needed with client_key_file",
        )),
    }
}
