//! [`RedisStore`]: the dedup store shared between processes.

use std::future::Future;
use std::time::Duration;

use crate::error::TimedOut;

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::contract::{
    at_least_min, new_owner, Claim, ClaimToken, CommitOutcome, DedupError, DedupStore,
    DEFAULT_REDIS_TIMEOUT,
};

const LEASE_PREFIX: &str = "lease:";
const DONE_VALUE: &str = "done";

/// KEYS[1] = key, ARGV[1] = expected lease value, ARGV[2] = ttl in ms.
const COMMIT_LUA: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], 'done', 'PX', ARGV[2])
  return 1
end
return 0
"#;

/// KEYS[1] = key, ARGV[1] = expected lease value.
const RELEASE_LUA: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;

/// Settings of a [`RedisStore`].
#[derive(Clone, PartialEq, Eq)]
pub struct RedisStoreConfig {
    /// Timeout of each Redis call, and of connecting. Default 2 s.
    pub op_timeout: Duration,
    /// Whether [`RedisStore::connect_with`] returns without connecting; the
    /// connection is then made by the first call. Default false.
    pub lazy: bool,
    /// PEM CA certificates trusted for a `rediss://` server, instead of
    /// the system's roots. Default none (the system's roots).
    pub ca_pem: Option<Vec<u8>>,
    /// A PEM client certificate and key for a `rediss://` server that
    /// authenticates its clients (`tls-auth-clients yes`). Default none.
    pub client_pem: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for RedisStoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print a key.
        f.debug_struct("RedisStoreConfig")
            .field("op_timeout", &self.op_timeout)
            .field("lazy", &self.lazy)
            .field("ca_pem", &self.ca_pem.as_ref().map(|_| "<pem>"))
            .field(
                "client_pem",
                &self.client_pem.as_ref().map(|_| "<pem cert + key>"),
            )
            .finish()
    }
}

impl Default for RedisStoreConfig {
    fn default() -> Self {
        Self {
            op_timeout: DEFAULT_REDIS_TIMEOUT,
            lazy: false,
            ca_pem: None,
            client_pem: None,
        }
    }
}

/// A [`DedupStore`] in Redis, shared between processes.
///
/// A lease is the value `lease:<owner>` set with `NX PX`; a done key is `done`
/// with `PX ttl`. All keys are `<prefix><key>`. Each call is bounded by the
/// configured timeout and yields [`DedupError::Unavailable`] when Redis cannot
/// be reached. A call that times out may still have been applied: a claim then
/// looks [`Claim::InProgress`] until its lease expires, which delays but never
/// loses the message.
#[derive(Clone)]
pub struct RedisStore {
    con: ConnectionManager,
    prefix: String,
    op_timeout: Duration,
    commit_script: redis::Script,
    release_script: redis::Script,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .field("op_timeout", &self.op_timeout)
            .finish_non_exhaustive()
    }
}

fn map_redis_error(err: redis::RedisError) -> DedupError {
    use redis::{ErrorKind, ServerErrorKind};
    let transient = err.is_io_error()
        || err.is_timeout()
        || err.is_connection_refusal()
        || err.is_connection_dropped()
        || matches!(
            err.kind(),
            ErrorKind::ClusterConnectionNotFound
                | ErrorKind::Server(
                    ServerErrorKind::BusyLoading
                        | ServerErrorKind::TryAgain
                        | ServerErrorKind::MasterDown
                        | ServerErrorKind::ClusterDown
                        | ServerErrorKind::ReadOnly
                )
        );
    let err = std::sync::Arc::new(err);
    if transient {
        DedupError::Unavailable(err)
    } else {
        DedupError::Backend(err)
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(at_least_min(d).as_millis()).unwrap_or(u64::MAX)
}

impl RedisStore {
    /// Connects to `url` (e.g. `redis://127.0.0.1:6379/`) with default settings;
    /// keys are stored as `<prefix><key>`.
    pub async fn connect(url: &str, prefix: &str) -> Result<Self, DedupError> {
        Self::connect_with(url, prefix, RedisStoreConfig::default()).await
    }

    /// Connects to `url` with the given settings.
    pub async fn connect_with(
        url: &str,
        prefix: &str,
        config: RedisStoreConfig,
    ) -> Result<Self, DedupError> {
        let client = if config.ca_pem.is_some() || config.client_pem.is_some() {
            redis::Client::build_with_tls(
                url,
                redis::TlsCertificates {
                    client_tls: config.client_pem.clone().map(|(client_cert, client_key)| {
                        redis::ClientTlsConfig {
                            client_cert,
                            client_key,
                        }
                    }),
                    root_cert: config.ca_pem.clone(),
                },
            )
        } else {
            redis::Client::open(url)
        }
        .map_err(|e| DedupError::Backend(std::sync::Arc::new(e)))?;
        let op_timeout = config.op_timeout;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(op_timeout))
            .set_response_timeout(Some(op_timeout))
            // The caller pauses and retries on Unavailable, so retry connecting
            // only once here: a refused connection then fails in ~150 ms.
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1));
        let con = if config.lazy {
            ConnectionManager::new_lazy_with_config(client, manager_config)
                .map_err(map_redis_error)?
        } else {
            match tokio::time::timeout(
                op_timeout,
                ConnectionManager::new_with_config(client, manager_config),
            )
            .await
            {
                Ok(Ok(con)) => con,
                Ok(Err(e)) => return Err(map_redis_error(e)),
                Err(_) => {
                    return Err(DedupError::Unavailable(std::sync::Arc::new(TimedOut {
                        what: "connecting to redis".into(),
                        after: op_timeout,
                    })))
                }
            }
        };
        Ok(Self {
            con,
            prefix: prefix.to_owned(),
            op_timeout,
            commit_script: redis::Script::new(COMMIT_LUA),
            release_script: redis::Script::new(RELEASE_LUA),
        })
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn full_key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    async fn timed<T>(
        &self,
        what: &str,
        fut: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, DedupError> {
        match tokio::time::timeout(self.op_timeout, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(map_redis_error(e)),
            Err(_) => Err(DedupError::Unavailable(std::sync::Arc::new(TimedOut {
                what: format!("redis {what}"),
                after: self.op_timeout,
            }))),
        }
    }
}

#[async_trait]
impl DedupStore for RedisStore {
    async fn claim(&self, key: &str, lease: Duration) -> Result<Claim, DedupError> {
        let full = self.full_key(key);
        let owner = new_owner();
        let value = format!("{LEASE_PREFIX}{owner}");
        let lease_ms = millis(lease);
        let mut con = self.con.clone();
        // If the key vanishes between a failed SET NX and the GET (it just
        // expired or was released), try again a few times.
        for _ in 0..3 {
            let mut set = redis::cmd("SET");
            set.arg(&full).arg(&value).arg("NX").arg("PX").arg(lease_ms);
            let set: Option<String> = self.timed("SET NX", set.query_async(&mut con)).await?;
            if set.is_some() {
                return Ok(Claim::Acquired(ClaimToken {
                    key: key.to_owned(),
                    owner,
                }));
            }
            let mut get = redis::cmd("GET");
            get.arg(&full);
            let current: Option<String> = self.timed("GET", get.query_async(&mut con)).await?;
            match current {
                Some(v) if v.starts_with(DONE_VALUE) => return Ok(Claim::AlreadyDone),
                Some(_) => return Ok(Claim::InProgress),
                None => continue,
            }
        }
        Ok(Claim::InProgress)
    }

    async fn commit(&self, token: &ClaimToken, ttl: Duration) -> Result<CommitOutcome, DedupError> {
        let mut con = self.con.clone();
        let mut invocation = self.commit_script.key(self.full_key(&token.key));
        invocation
            .arg(format!("{LEASE_PREFIX}{}", token.owner))
            .arg(millis(ttl));
        let done: i64 = self
            .timed("commit", invocation.invoke_async(&mut con))
            .await?;
        if done == 1 {
            Ok(CommitOutcome::Committed)
        } else {
            tracing::warn!(key = %token.key, "dedup commit after the lease was lost");
            Ok(CommitOutcome::LeaseLost)
        }
    }

    async fn release(&self, token: &ClaimToken) -> Result<(), DedupError> {
        let mut con = self.con.clone();
        let mut invocation = self.release_script.key(self.full_key(&token.key));
        invocation.arg(format!("{LEASE_PREFIX}{}", token.owner));
        let deleted: i64 = self
            .timed("release", invocation.invoke_async(&mut con))
            .await?;
        if deleted == 0 {
            tracing::debug!(key = %token.key, "dedup release of a lease no longer held");
        }
        Ok(())
    }

    async fn ping(&self) -> Result<(), DedupError> {
        let mut con = self.con.clone();
        let ping = redis::cmd("PING");
        let _pong: String = self.timed("PING", ping.query_async(&mut con)).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Duration = Duration::from_secs(30);

    #[tokio::test]
    async fn an_invalid_url_is_a_backend_error_keeping_redis_error() {
        let Err(err) = RedisStore::connect("no-scheme", "p:").await else {
            panic!("an invalid url connects");
        };
        assert!(matches!(err, DedupError::Backend(_)), "{err:?}");
        let source = std::error::Error::source(&err).expect("keeps the source");
        assert!(source.is::<redis::RedisError>(), "{source:?}");
    }

    fn acquired(c: Claim) -> ClaimToken {
        match c {
            Claim::Acquired(t) => t,
            other => panic!("expected Acquired, got {other:?}"),
        }
    }

    // These need a Redis at FLOWGATE_TEST_REDIS_URL (default
    // redis://127.0.0.1:6379/); set FLOWGATE_SKIP_REDIS_TESTS=1 to skip them
    // (refused under CI=true). Every test uses its own key prefix, short
    // TTLs, and deletes its keys.

    fn redis_url() -> Option<String> {
        let skip = std::env::var("FLOWGATE_SKIP_REDIS_TESTS").is_ok_and(|v| v == "1");
        if skip {
            // CI must prove the Redis store, not skip it.
            assert!(
                !std::env::var("CI").is_ok_and(|v| v == "true"),
                "FLOWGATE_SKIP_REDIS_TESTS=1 is refused under CI=true"
            );
            return None;
        }
        Some(
            std::env::var("FLOWGATE_TEST_REDIS_URL")
                .unwrap_or_else(|_| "redis://127.0.0.1:6379/".to_owned()),
        )
    }

    fn test_prefix() -> String {
        format!("flowgate-test:dedup:{}:", uuid::Uuid::new_v4())
    }

    /// A store on the test Redis, or `None` when Redis tests are skipped
    /// (never under CI=true). An unreachable Redis fails the test.
    async fn redis_store(prefix: &str) -> Option<RedisStore> {
        let url = redis_url()?;
        let s = RedisStore::connect(&url, prefix)
            .await
            .expect("redis must be reachable (or set FLOWGATE_SKIP_REDIS_TESTS=1 outside CI)");
        s.ping()
            .await
            .expect("redis must answer (or set FLOWGATE_SKIP_REDIS_TESTS=1 outside CI)");
        Some(s)
    }

    /// Deletes every key under `prefix`.
    async fn cleanup(store: &RedisStore) {
        let mut con = store.con.clone();
        let pattern = format!("{}*", store.prefix);
        let mut cursor: u64 = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut con)
                .await
                .unwrap();
            if !keys.is_empty() {
                let _: i64 = redis::cmd("DEL")
                    .arg(&keys)
                    .query_async(&mut con)
                    .await
                    .unwrap();
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }

    const SHORT: Duration = Duration::from_millis(200);
    const RTTL: Duration = Duration::from_secs(60);

    struct Redis(RedisStore);

    #[async_trait]
    impl crate::dedup::conformance::Fixture for Redis {
        fn store(&self) -> std::sync::Arc<dyn DedupStore> {
            std::sync::Arc::new(self.0.clone())
        }
        fn short(&self) -> Duration {
            SHORT
        }
        /// Waits until Redis has expired the key (polling, bounded).
        async fn expire(&self, key: &str) {
            let mut con = self.0.con.clone();
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            loop {
                let exists: i64 = redis::cmd("EXISTS")
                    .arg(self.0.full_key(key))
                    .query_async(&mut con)
                    .await
                    .unwrap();
                if exists == 0 {
                    return;
                }
                assert!(std::time::Instant::now() < deadline, "{key} never expired");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        fn exact_clock(&self) -> bool {
            false
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_store_conforms() {
        let Some(s) = redis_store(&test_prefix()).await else {
            return;
        };
        crate::dedup::conformance::run(&Redis(s.clone())).await;
        cleanup(&s).await;
    }

    #[test]
    fn redis_store_has_one_winner_among_parallel_claims() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let Some(s) = rt.block_on(redis_store(&test_prefix())) else {
            return;
        };
        crate::dedup::conformance::parallel_claims_have_one_winner(&s, rt.handle(), "p", 300);
        rt.block_on(cleanup(&s));
    }

    /// Redis specifics: keys are prefixed, a done key has the TTL asked for.
    #[tokio::test]
    async fn redis_keys_are_prefixed_and_carry_their_ttl() {
        let prefix = test_prefix();
        let Some(s) = redis_store(&prefix).await else {
            return;
        };
        s.ping().await.unwrap();
        assert_eq!(s.prefix(), prefix);
        let t = acquired(s.claim("m1", LEASE).await.unwrap());
        assert_eq!(s.claim("m1", LEASE).await.unwrap(), Claim::InProgress);
        assert_eq!(s.commit(&t, RTTL).await.unwrap(), CommitOutcome::Committed);
        assert_eq!(s.claim("m1", LEASE).await.unwrap(), Claim::AlreadyDone);
        assert_eq!(s.commit(&t, RTTL).await.unwrap(), CommitOutcome::LeaseLost);
        // Keys are prefixed.
        let mut con = s.con.clone();
        let v: Option<String> = redis::cmd("GET")
            .arg(format!("{prefix}m1"))
            .query_async(&mut con)
            .await
            .unwrap();
        assert_eq!(v.as_deref(), Some("done"));
        let pttl: i64 = redis::cmd("PTTL")
            .arg(format!("{prefix}m1"))
            .query_async(&mut con)
            .await
            .unwrap();
        assert!(pttl > 50_000 && pttl <= 60_000, "pttl {pttl}");
        cleanup(&s).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_two_stores_race_exactly_one_winner_per_key() {
        let prefix = test_prefix();
        let (Some(a), Some(b)) = (redis_store(&prefix).await, redis_store(&prefix).await) else {
            return;
        };
        const N: usize = 1000;
        let mut set = tokio::task::JoinSet::new();
        for store in [a.clone(), b.clone()] {
            for chunk in 0..4 {
                let store = store.clone();
                set.spawn(async move {
                    let mut won = Vec::new();
                    // Interleave directions so the two stores collide on keys.
                    let keys: Vec<usize> = if chunk % 2 == 0 {
                        (0..N).collect()
                    } else {
                        (0..N).rev().collect()
                    };
                    for i in keys {
                        match store.claim(&format!("k{i}"), LEASE).await.unwrap() {
                            Claim::Acquired(_) => won.push(i),
                            Claim::InProgress => {}
                            Claim::AlreadyDone => panic!("nothing was committed"),
                        }
                    }
                    won
                });
            }
        }
        let mut wins = vec![0usize; N];
        while let Some(r) = set.join_next().await {
            for i in r.unwrap() {
                wins[i] += 1;
            }
        }
        assert!(wins.iter().all(|&w| w == 1), "some key had != 1 winner");
        cleanup(&a).await;
    }

    #[tokio::test]
    async fn redis_unreachable_is_unavailable_not_a_hang() {
        let timeout = Duration::from_millis(500);
        let config = RedisStoreConfig {
            op_timeout: timeout,
            lazy: false,
            ..Default::default()
        };
        let started = std::time::Instant::now();
        let err = RedisStore::connect_with("redis://127.0.0.1:1/", "x:", config.clone())
            .await
            .unwrap_err();
        assert!(err.is_transient(), "{err:?}");
        assert!(started.elapsed() < timeout + Duration::from_millis(500));

        // A lazily connected store fails each call quickly too.
        let lazy = RedisStore::connect_with(
            "redis://127.0.0.1:1/",
            "x:",
            RedisStoreConfig {
                lazy: true,
                ..config
            },
        )
        .await
        .unwrap();
        for _ in 0..2 {
            let started = std::time::Instant::now();
            let err = lazy.claim("k", LEASE).await.unwrap_err();
            assert!(err.is_transient(), "{err:?}");
            assert!(started.elapsed() < timeout + Duration::from_millis(500));
            let err = lazy.ping().await.unwrap_err();
            assert!(matches!(err, DedupError::Unavailable(_)), "{err:?}");
        }
    }

    /// Starts a private `redis-server` on a free port, or `None` if the binary is missing.
    fn spawn_private_redis(port: u16) -> Option<std::process::Child> {
        std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .ok()
    }

    fn free_port() -> u16 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    }

    /// Kills the child on drop so a failing test does not leak a server.
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    async fn wait_until_ok(s: &RedisStore) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while s.ping().await.is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "redis did not come back"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    #[tokio::test]
    async fn redis_reconnects_after_server_restart() {
        if redis_url().is_none() {
            return;
        }
        let port = free_port();
        let Some(child) = spawn_private_redis(port) else {
            eprintln!("redis-server binary not found; skipping");
            return;
        };
        let mut server = KillOnDrop(child);
        let url = format!("redis://127.0.0.1:{port}/");
        let config = RedisStoreConfig {
            op_timeout: Duration::from_millis(500),
            lazy: true,
            ..Default::default()
        };
        let s = RedisStore::connect_with(&url, "p:", config).await.unwrap();
        wait_until_ok(&s).await;
        let t = acquired(s.claim("m", LEASE).await.unwrap());

        let _ = server.0.kill();
        let _ = server.0.wait();
        let started = std::time::Instant::now();
        let err = s.commit(&t, RTTL).await.unwrap_err();
        assert!(err.is_transient(), "{err:?}");
        assert!(started.elapsed() < Duration::from_secs(1));
        let err = s.claim("m", LEASE).await.unwrap_err();
        assert!(err.is_transient(), "{err:?}");

        // The restarted server is empty (no persistence): the same store
        // reconnects by itself and can claim again.
        let Some(child) = spawn_private_redis(port) else {
            return;
        };
        let _server = KillOnDrop(child);
        wait_until_ok(&s).await;
        acquired(s.claim("m", LEASE).await.unwrap());
    }

    #[tokio::test]
    async fn redis_silent_server_times_out_as_unavailable() {
        // Accepts connections but never answers.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accept = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((sock, _)) = listener.accept().await {
                held.push(sock);
            }
        });
        let timeout = Duration::from_millis(300);
        let url = format!("redis://127.0.0.1:{port}/");
        let config = RedisStoreConfig {
            op_timeout: timeout,
            lazy: false,
            ..Default::default()
        };
        let started = std::time::Instant::now();
        let err = RedisStore::connect_with(&url, "x:", config.clone())
            .await
            .unwrap_err();
        assert!(err.is_transient(), "{err:?}");
        assert!(started.elapsed() < timeout + Duration::from_millis(500));

        let lazy = RedisStore::connect_with(
            &url,
            "x:",
            RedisStoreConfig {
                lazy: true,
                ..config
            },
        )
        .await
        .unwrap();
        let started = std::time::Instant::now();
        let err = lazy.claim("k", LEASE).await.unwrap_err();
        assert!(err.is_transient(), "{err:?}");
        assert!(started.elapsed() < timeout + Duration::from_millis(500));
        accept.abort();
    }

    #[tokio::test]
    async fn debug_shows_the_settings_but_never_a_key() {
        let config = RedisStoreConfig {
            op_timeout: Duration::from_millis(1234),
            lazy: true,
            ca_pem: Some(b"CA-BYTES".to_vec()),
            client_pem: Some((b"CERT-BYTES".to_vec(), b"SECRET-KEY".to_vec())),
        };
        let text = format!("{config:?}");
        assert!(
            text.contains("1.234s") && text.contains("lazy: true"),
            "{text}"
        );
        for secret in ["CA-BYTES", "CERT-BYTES", "SECRET-KEY"] {
            assert!(!text.contains(secret), "{text}");
        }
        let plain = RedisStoreConfig {
            lazy: true,
            ..Default::default()
        };
        let store = RedisStore::connect_with("redis://127.0.0.1:1/", "p:", plain)
            .await
            .unwrap();
        let text = format!("{store:?}");
        assert!(
            text.contains("\"p:\"") && text.contains("op_timeout"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_client_certificate_alone_selects_the_tls_client() {
        // A key that is not PEM fails where the TLS client is built, before
        // any connection (a CA alone is parsed later, when connecting).
        let lazy = |client_pem| RedisStoreConfig {
            lazy: true,
            client_pem,
            ..Default::default()
        };
        let garbage = || b"not a pem".to_vec();
        let url = "rediss://127.0.0.1:1/";
        let res = RedisStore::connect_with(url, "p:", lazy(Some((garbage(), garbage())))).await;
        assert!(
            matches!(res, Err(DedupError::Backend(_))),
            "garbage PEM accepted: {res:?}"
        );
        assert!(RedisStore::connect_with(url, "p:", lazy(None))
            .await
            .is_ok());
    }

    #[test]
    fn every_io_error_is_transient_and_a_refused_command_is_not() {
        use redis::{ErrorKind, RedisError, ServerErrorKind};
        let io = |kind| map_redis_error(RedisError::from(std::io::Error::new(kind, "x")));
        // Any I/O failure, whatever its kind: Redis may be back soon.
        for kind in [
            std::io::ErrorKind::PermissionDenied,
            std::io::ErrorKind::InvalidData,
            std::io::ErrorKind::ConnectionRefused,
            std::io::ErrorKind::TimedOut,
        ] {
            assert!(io(kind).is_transient(), "{kind:?}");
        }
        let server = |kind| map_redis_error(RedisError::from((kind, "x")));
        assert!(server(ErrorKind::Server(ServerErrorKind::ReadOnly)).is_transient());
        assert!(!server(ErrorKind::Server(ServerErrorKind::ResponseError)).is_transient());
        assert!(!server(ErrorKind::UnexpectedReturnType).is_transient());
    }

    #[tokio::test]
    async fn redis_bad_url_is_backend_error() {
        let err = RedisStore::connect("not a url", "x:").await.unwrap_err();
        assert!(!err.is_transient(), "{err:?}");
    }
}
