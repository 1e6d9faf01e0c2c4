//! How a broker connection is opened: TCP, TLS with a private CA and a
//! client certificate, the SASL mechanism.
//!
//! lapin's own `Connection::connect` verifies the server against the
//! system's roots only and sends no client certificate; this opens the
//! socket through `Connection::connector` instead, with the CA chain, the
//! client identity and the name to verify taken from [`TlsSettings`].

use crate::error::{Error, Result};
use lapin::tcp::{AsyncTcpStream, OwnedIdentity, OwnedTLSConfig};
use lapin::uri::{AMQPScheme, AMQPUri, SASLMechanism};
use lapin::{Connection, ConnectionProperties};

/// The client's certificate and private key, for brokers that require one
/// (`ssl_options.fail_if_no_peer_cert = true`) or authenticate with it
/// (SASL EXTERNAL).
#[derive(Clone)]
pub enum ClientIdentity {
    /// A PEM certificate chain (the client's certificate first) and its PEM
    /// private key (PKCS#8, PKCS#1 or SEC1).
    Pem {
        /// PEM certificate chain.
        cert_chain: Vec<u8>,
        /// PEM private key.
        key: Vec<u8>,
    },
    /// A PKCS#12 bundle (DER) and its password.
    Pkcs12 {
        /// The bundle's bytes.
        der: Vec<u8>,
        /// Its password (may be empty).
        password: String,
    },
}

/// TLS and authentication settings of the broker connections. The default
/// is lapin's: the system's roots, no client certificate, the URL's host as
/// the name to verify, PLAIN with the URL's user and password.
#[derive(Clone, Default)]
pub struct TlsSettings {
    /// PEM CA certificates trusted in addition to the system's roots.
    pub ca_pem: Option<String>,
    /// The certificate to present to the broker.
    pub identity: Option<ClientIdentity>,
    /// The name the server's certificate must carry (and the SNI sent),
    /// when it is not the URL's host (e.g. connecting by IP address).
    pub server_name: Option<String>,
    /// Authenticate as the client certificate's subject (SASL EXTERNAL)
    /// instead of with the URL's user and password.
    pub external_auth: bool,
}

impl std::fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print a key or a password.
        f.debug_struct("TlsSettings")
            .field("ca_pem", &self.ca_pem.as_ref().map(|_| "<pem>"))
            .field(
                "identity",
                &self.identity.as_ref().map(|i| match i {
                    ClientIdentity::Pem { .. } => "<pem cert + key>",
                    ClientIdentity::Pkcs12 { .. } => "<pkcs12>",
                }),
            )
            .field("server_name", &self.server_name)
            .field("external_auth", &self.external_auth)
            .finish()
    }
}

impl TlsSettings {
    fn owned(&self) -> OwnedTLSConfig {
        OwnedTLSConfig {
            identity: self.identity.as_ref().map(|i| match i {
                ClientIdentity::Pem { cert_chain, key } => OwnedIdentity::PKCS8 {
                    pem: cert_chain.clone(),
                    key: key.clone(),
                },
                ClientIdentity::Pkcs12 { der, password } => OwnedIdentity::PKCS12 {
                    der: der.clone(),
                    password: password.clone(),
                },
            }),
            cert_chain: self.ca_pem.clone(),
        }
    }
}

/// Opens one connection to `url` (`amqp://` or `amqps://`) with `tls`.
pub(crate) async fn open(
    url: &str,
    props: ConnectionProperties,
    tls: &TlsSettings,
) -> Result<Connection> {
    let mut uri: AMQPUri = url.parse().map_err(|e: String| Error::InvalidUrl(e))?;
    if tls.external_auth {
        uri.query.auth_mechanism = Some(SASLMechanism::External);
    }
    let config = tls.owned();
    let server_name = tls.server_name.clone();
    let runtime = lapin::runtime::default_runtime()?;
    // lapin retries a failed connect with its recovery backoff (16 times
    // with auto-recover), a TLS failure too, which no retry cures: the
    // first one is reported here at once, and the retries stop connecting.
    let (failed_tx, mut failed) = tokio::sync::watch::channel(None::<String>);
    let connecting = Connection::connector(
        uri,
        runtime,
        async move |uri: AMQPUri, runtime| {
            if let Some(why) = failed_tx.borrow().clone() {
                return Err(TlsFailure(why).into_io().into());
            }
            let addrs = runtime.to_socket_addrs((uri.authority.host.clone(), uri.authority.port));
            let stream = AsyncTcpStream::connect(&runtime, addrs).await?;
            Ok(match uri.scheme {
                AMQPScheme::AMQP => stream,
                AMQPScheme::AMQPS => {
                    let name = server_name.as_deref().unwrap_or(&uri.authority.host);
                    match stream.into_tls(name, config.as_ref()).await {
                        Ok(s) => s,
                        Err(e) if went_away(&e) => return Err(e.into()),
                        Err(e) => {
                            failed_tx.send_replace(Some(e.to_string()));
                            return Err(TlsFailure(e.to_string()).into_io().into());
                        }
                    }
                }
            })
        },
        props,
    );
    tokio::select! {
        conn = connecting => Ok(conn?),
        Ok(why) = async { failed.wait_for(Option::is_some).await.map(|w| w.clone()) } => {
            let why = why.unwrap_or_default();
            Err(lapin::Error::from(TlsFailure(why).into_io()).into())
        }
    }
}

/// Marks a TLS handshake error that is not the link going away: the
/// server's certificate is not trusted or names another host, the client's
/// key or certificate cannot be used, the server refused the certificate.
#[derive(Debug)]
struct TlsFailure(String);

impl TlsFailure {
    fn into_io(self) -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::InvalidData, self)
    }
}

impl std::fmt::Display for TlsFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TLS handshake failed: {}", self.0)
    }
}

impl std::error::Error for TlsFailure {}

/// True when a handshake error is the link going away mid-handshake (a
/// broker starting or stopping): an outage like any other.
fn went_away(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionReset | ConnectionAborted | UnexpectedEof | BrokenPipe | TimedOut
    )
}

/// True when `e` is a TLS failure that waiting for the broker does not cure
/// (see [`TlsFailure`]): a configuration error.
pub(crate) fn is_tls_failure(e: &std::io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<TlsFailure>())
}
