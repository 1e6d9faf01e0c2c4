//! TLS and authentication (issue 14, item 3), against a private node with a
//! TLS listener that verifies its peers (`verify_peer`,
//! `fail_if_no_peer_cert = true`) and offers EXTERNAL
//! (`rabbitmq_auth_mechanism_ssl`). The CA, the broker's certificate and
//! the client's are made here with `openssl`; the broker's certificate
//! names only `broker.flowgate.test`, so every connection to 127.0.0.1 also
//! proves `server_name`.

use flowgate_testkit as common;

use common::node::{free_port, BrokerNode, NodeOptions};
use common::pki::Pki;
use common::*;
use flowgate::config::{AmqpAuth, AmqpTlsConfig};
use flowgate::{Config, Engine, EngineHandle, Error};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

const SERVER_NAME: &str = "broker.flowgate.test";
/// The client certificate's CN: the user EXTERNAL logs in as.
const CLIENT_CN: &str = "fg-tls-client";
const P12_PASSWORD: &str = "p12-secret";

/// The test's PKI: `ca` signs the broker's and the client's certificates;
/// `other-ca` signs nothing here.
fn pki(dir: &Path) -> Pki {
    let pki = Pki::new(dir);
    pki.ca("ca");
    pki.ca("other-ca");
    pki.server("ca", "server", SERVER_NAME);
    pki.client("ca", "client", CLIENT_CN);
    pki.pkcs12("client", P12_PASSWORD);
    std::fs::write(pki.path("p12.pass"), format!("{P12_PASSWORD}\n")).unwrap();
    pki
}

fn tls_node(dir: &Path, tls_port: u16) -> BrokerNode {
    let p = |f: &str| dir.join(f).display().to_string();
    let conf = format!(
        "listeners.ssl.default = 127.0.0.1:{tls_port}\n\
         ssl_options.cacertfile = {}\n\
         ssl_options.certfile = {}\n\
         ssl_options.keyfile = {}\n\
         ssl_options.verify = verify_peer\n\
         ssl_options.fail_if_no_peer_cert = true\n\
         auth_mechanisms.1 = PLAIN\n\
         auth_mechanisms.2 = EXTERNAL\n\
         ssl_cert_login_from = common_name\n",
        p("ca.pem"),
        p("server.pem"),
        p("server.key"),
    );
    BrokerNode::start_with(&NodeOptions {
        conf,
        plugins: vec!["rabbitmq_auth_mechanism_ssl".into()],
    })
    .expect("a private node with a TLS listener")
}

/// A one-stage chain over the TLS listener, verifying the broker with `ca`
/// under `SERVER_NAME`, presenting the PEM client certificate.
fn config(prefix: &str, dir: &Path, tls_port: u16) -> Config {
    let mut cfg = chain_config(prefix, &["forward"], 10);
    cfg.amqp.url = format!("amqps://guest:guest@127.0.0.1:{tls_port}/%2f");
    cfg.amqp.tls = AmqpTlsConfig {
        ca_file: Some(dir.join("ca.pem")),
        client_cert_file: Some(dir.join("client.pem")),
        client_key_file: Some(dir.join("client.key")),
        server_name: Some(SERVER_NAME.into()),
        ..AmqpTlsConfig::default()
    };
    cfg
}

/// How many TLS sessions the node has refused for want of a client
/// certificate, from its log ("generated SERVER ALERT: Fatal - Certificate
/// required", one per refused handshake).
fn certificate_required_alerts(node: &BrokerNode) -> usize {
    let log = node
        .dir()
        .join("log")
        .join(format!("{}.log", node.node_name()));
    std::fs::read_to_string(&log)
        .unwrap_or_else(|e| panic!("the node's log {}: {e}", log.display()))
        .lines()
        .filter(|l| l.contains("SERVER ALERT: Fatal - Certificate required"))
        .count()
}

async fn start(cfg: Config) -> Result<EngineHandle, Error> {
    Engine::builder().config(cfg).build().unwrap().start().await
}

/// The `user` and `ssl` columns of the node's connections named after
/// `prefix` (the engine's consume and publish connections).
async fn engine_connections(node: &BrokerNode, prefix: &str) -> Vec<(String, String)> {
    let prefix = prefix.to_owned();
    node.blocking(move |n| {
        let out = n
            .ctl_ok(&[
                "-q",
                "list_connections",
                "--no-table-headers",
                "user",
                "ssl",
                "client_properties",
            ])
            .expect("list_connections");
        out.lines()
            .filter(|l| l.contains(&prefix))
            .map(|l| {
                let mut cols = l.split('\t');
                let user = cols.next().unwrap_or_default().trim().to_owned();
                let ssl = cols.next().unwrap_or_default().trim().to_owned();
                (user, ssl)
            })
            .collect()
    })
    .await
}

/// Moves `n` messages through the engine's stage over TLS: published on the
/// plain listener, collected from the sink, each exactly once.
async fn moves_messages(node: &BrokerNode, prefix: &str, n: usize) {
    let client = Client::connect(&node.amqp_url()).await;
    let ids: Vec<String> = (0..n).map(|i| format!("{prefix}-{i}")).collect();
    client
        .publish_many(&format!("{prefix}.ex"), "in", &ids, b"over tls")
        .await;
    let got = client
        .collect_all(&format!("{prefix}.sink"), n, Duration::from_secs(30))
        .await;
    assert_eq!(got.len(), n, "every message went through the TLS engine");
    assert!(got.values().all(|c| *c == 1), "each once: {got:?}");
}

#[actix_rt::test]
async fn tls_with_a_private_ca_a_client_certificate_and_external_auth() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    pki(dir);
    let tls_port = free_port().unwrap();
    let node = tls_node(dir, tls_port);

    // 1. A private CA, a PEM client certificate, PLAIN, server_name.
    let prefix = unique("tls-pem");
    let cfg = config(&prefix, dir, tls_port);
    let handle = start(cfg).await.expect("the engine starts over TLS");
    assert!(handle.wait_ready(Duration::from_secs(20)).await);
    let conns = engine_connections(&node, &prefix).await;
    assert_eq!(conns.len(), 2, "consume + publish connections: {conns:?}");
    assert!(
        conns
            .iter()
            .all(|(user, ssl)| user == "guest" && ssl == "true"),
        "both over TLS as guest: {conns:?}"
    );
    moves_messages(&node, &prefix, 50).await;
    handle.shutdown().await;

    // 2. EXTERNAL: no password in the URL; the broker takes the
    //    certificate's CN as the user.
    node.blocking(|n| {
        n.ctl_ok(&["add_user", CLIENT_CN, "an-unused-password"])?;
        n.ctl_ok(&["set_permissions", "-p", "/", CLIENT_CN, ".*", ".*", ".*"])
    })
    .await
    .expect("the certificate's user exists");
    let prefix = unique("tls-ext");
    let mut cfg = config(&prefix, dir, tls_port);
    cfg.amqp.url = format!("amqps://127.0.0.1:{tls_port}/%2f");
    cfg.amqp.tls.auth = AmqpAuth::External;
    let handle = start(cfg).await.expect("EXTERNAL authenticates");
    assert!(handle.wait_ready(Duration::from_secs(20)).await);
    let conns = engine_connections(&node, &prefix).await;
    assert_eq!(conns.len(), 2, "{conns:?}");
    assert!(
        conns.iter().all(|(user, _)| user == CLIENT_CN),
        "logged in as the certificate's CN: {conns:?}"
    );
    moves_messages(&node, &prefix, 20).await;
    handle.shutdown().await;

    // 3. The same identity as a PKCS#12 bundle with a password file.
    let prefix = unique("tls-p12");
    let mut cfg = config(&prefix, dir, tls_port);
    cfg.amqp.tls.client_cert_file = None;
    cfg.amqp.tls.client_key_file = None;
    cfg.amqp.tls.pkcs12_file = Some(dir.join("client.p12"));
    cfg.amqp.tls.pkcs12_password_file = Some(dir.join("p12.pass"));
    let handle = start(cfg).await.expect("a PKCS#12 identity works");
    assert!(handle.wait_ready(Duration::from_secs(20)).await);
    moves_messages(&node, &prefix, 20).await;
    handle.shutdown().await;

    // 4. What must fail at start, at once and saying why — not be waited
    //    for as if the broker were down (that would end in a timeout).
    let fails = |why: &'static str, cfg: Config| async move {
        let err = start(cfg)
            .await
            .err()
            .unwrap_or_else(|| panic!("{why}: started"));
        let text = err.to_string();
        assert!(
            matches!(err, Error::Broker(flowgate::RuntimeError::Refused(_))),
            "{why}: refused at once, not waited for: {text}"
        );
        text
    };
    let prefix = unique("tls-bad");
    let mut cfg = config(&prefix, dir, tls_port);
    cfg.amqp.tls.ca_file = Some(dir.join("other-ca.pem"));
    let text = fails("a CA that did not sign the broker", cfg.clone()).await;
    assert!(text.contains("UnknownIssuer"), "{text}");

    let mut no_name = config(&prefix, dir, tls_port);
    no_name.amqp.tls.server_name = None;
    let text = fails("127.0.0.1 is not in the broker's certificate", no_name).await;
    assert!(text.contains("not valid for name"), "{text}");

    let mut anonymous = config(&prefix, dir, tls_port);
    anonymous.amqp.tls.client_cert_file = None;
    anonymous.amqp.tls.client_key_file = None;
    // Under TLS 1.3 the broker's "certificate required" alert comes after
    // the client's handshake is done, on the first read: lapin sees an I/O
    // error while connecting and retries it, so this one ends in the
    // connect timeout rather than at once (left as it is; see the note).
    // What refused it is in the broker's own log: its alert for the
    // missing certificate, counted before and after this start.
    anonymous.amqp.connect_timeout = Duration::from_secs(3);
    let before = certificate_required_alerts(&node);
    let err = start(anonymous)
        .await
        .err()
        .expect("no client certificate for fail_if_no_peer_cert: started");
    assert!(
        matches!(err, Error::ConnectTimeout { .. }),
        "no client certificate: the refused session ends in the connect timeout, not {err:?}"
    );
    assert!(
        eventually(Duration::from_secs(10), || async {
            certificate_required_alerts(&node) > before
        })
        .await,
        "the broker did not refuse a session for want of a client certificate \
         ({before} such alerts in its log before this start, as many after)"
    );

    // The daemon: exit code 1 ("cannot start") with the reason on stderr.
    let file = dir.join("bad-ca.toml");
    std::fs::write(&file, toml::to_string(&cfg).unwrap()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_flowgate"))
        .args(["run", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("cannot start") && stderr.contains("UnknownIssuer"),
        "{stderr}"
    );
}

/// `rediss://` dedup: a Redis with a TLS port only (no plain port), client
/// certificates required, a private CA (`[redis] ca_file`,
/// `client_cert_file`, `client_key_file`).
#[actix_rt::test]
async fn rediss_dedup_works_with_a_private_ca_and_a_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    pki.ca("ca");
    pki.server("ca", "redis", "localhost");
    pki.client("ca", "client", CLIENT_CN);
    let port = free_port().unwrap();
    let p = |f: &str| pki.path(f).display().to_string();
    let port_s = port.to_string();
    let redis_cli = |args: &[&str]| {
        let out = Command::new("redis-cli")
            .args(["--tls", "-h", "localhost", "-p", &port_s])
            .args([
                "--cacert",
                &p("ca.pem"),
                "--cert",
                &p("client.pem"),
                "--key",
                &p("client.key"),
            ])
            .args(args)
            .output()
            .expect("redis-cli runs");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let _redis = ChildGuard(
        Command::new("redis-server")
            .args(["--port", "0", "--bind", "127.0.0.1", "--tls-port", &port_s])
            .args([
                "--tls-cert-file",
                &p("redis.pem"),
                "--tls-key-file",
                &p("redis.key"),
            ])
            .args([
                "--tls-ca-cert-file",
                &p("ca.pem"),
                "--tls-auth-clients",
                "yes",
            ])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server runs"),
    );
    assert!(
        eventually(Duration::from_secs(10), || async {
            redis_cli(&["ping"]) == "PONG"
        })
        .await,
        "redis answers over TLS (is redis-server built with TLS?)"
    );

    let prefix = unique("rediss");
    let mut cfg = chain_config(&prefix, &["forward"], 10);
    cfg.stages[0].dedup = flowgate::config::DedupMode::Redis;
    cfg.dedup.prefix = format!("{prefix}:");
    cfg.redis.url = format!("rediss://localhost:{port}");
    cfg.redis.ca_file = Some(pki.path("ca.pem"));
    cfg.redis.client_cert_file = Some(pki.path("client.pem"));
    cfg.redis.client_key_file = Some(pki.path("client.key"));
    let _cleanup = Cleanup::new(AMQP_URL, &cfg);
    let handle = start(cfg.clone()).await.expect("the engine starts");
    assert!(handle.wait_ready(Duration::from_secs(20)).await);
    let client = Client::connect(AMQP_URL).await;
    let ids: Vec<String> = ["a", "a", "b", "b", "c"]
        .iter()
        .map(|i| format!("{prefix}-{i}"))
        .collect();
    client
        .publish_many(&format!("{prefix}.ex"), "in", &ids, b"{}")
        .await;
    pipeline_idle(&client, handle.metrics(), &cfg, Duration::from_secs(30))
        .await
        .expect("the stage settles");
    let counts = client
        .collect_all(&format!("{prefix}.sink"), 3, Duration::from_secs(10))
        .await;
    assert_eq!(counts.len(), 3, "{counts:?}");
    assert!(
        counts.values().all(|n| *n == 1),
        "duplicates dropped: {counts:?}"
    );
    let keys = redis_cli(&["--scan", "--pattern", &format!("{prefix}:*")]);
    assert_eq!(
        keys.lines().count(),
        3,
        "one done key per id in the TLS Redis: {keys}"
    );
    handle.shutdown().await;
}
