//! HMAC message signing (`[security]`): signed messages pass a 2-stage chain
//! and arrive signed; unsigned and tampered ones are dead-lettered with
//! reason `bad-signature` (or counted and processed with `verify = "warn"`);
//! a message signed with the previous key is accepted; spool replays and
//! retry-tier copies verify.
//!
//! Signatures are computed here from the canonical form as documented in
//! `flowgate_actors::signing`, with the `hmac` crate directly, not with the
//! engine's code.

use flowgate_testkit as common;

use common::*;
use flowgate::config::{Config, VerifyMode};
use flowgate::handler_fn;
use flowgate::lapin::options::{BasicAckOptions, BasicGetOptions};
use flowgate::lapin::BasicProperties;
use flowgate::PublishOutcome;
use flowgate::{Engine, EngineHandle};
use flowgate::{Outcome, Output};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::time::Duration;

const KEY: &[u8] = b"test-key-0123456789abcdef-current";
const PREVIOUS: &[u8] = b"test-key-0123456789abcdef-previous";
const SIG: &str = "x-flowgate-signature";

/// The documented canonical form: four fields, each an 8-byte big-endian
/// length followed by the bytes.
fn canonical(rk: &str, message_id: &str, content_type: &str, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for f in [
        rk.as_bytes(),
        message_id.as_bytes(),
        content_type.as_bytes(),
        body,
    ] {
        out.extend_from_slice(&(f.len() as u64).to_be_bytes());
        out.extend_from_slice(f);
    }
    out
}

fn sign(key: &[u8], rk: &str, message_id: &str, content_type: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).unwrap();
    mac.update(&canonical(rk, message_id, content_type, body));
    hex::encode(mac.finalize().into_bytes())
}

fn props(id: &str, signature: Option<String>) -> BasicProperties {
    let p = BasicProperties::default()
        .with_message_id(id.into())
        .with_content_type("text/plain".into());
    match signature {
        Some(sig) => p.with_headers(headers(&[(SIG, s(&sig))])),
        None => p,
    }
}

struct Keys {
    _dir: tempfile::TempDir,
}

/// Writes the key files (with a trailing newline, as `echo` would) and
/// points `[security]` at them.
fn with_keys(cfg: &mut Config) -> Keys {
    let dir = tempfile::tempdir().unwrap();
    let cur = dir.path().join("hmac.key");
    let prev = dir.path().join("hmac.previous.key");
    std::fs::write(&cur, [KEY, b"\n"].concat()).unwrap();
    std::fs::write(&prev, [PREVIOUS, b"\n"].concat()).unwrap();
    cfg.security.hmac_key_file = Some(cur);
    cfg.security.hmac_previous_key_file = Some(prev);
    Keys { _dir: dir }
}

async fn start(cfg: &Config) -> EngineHandle {
    let h = Engine::builder()
        .config(cfg.clone())
        .build()
        .expect("valid config")
        .start()
        .await
        .expect("engine starts");
    assert!(h.wait_ready(Duration::from_secs(20)).await, "engine ready");
    h
}

/// A message as it sits in a queue.
struct Got {
    routing_key: String,
    props: BasicProperties,
    body: Vec<u8>,
}

impl Got {
    fn id(&self) -> String {
        self.props
            .message_id()
            .as_ref()
            .map(|s| s.to_string())
            .unwrap_or_default()
    }
    fn header(&self, name: &str) -> Option<String> {
        header(&self.props.headers().clone().unwrap_or_default(), name)
    }
    fn content_type(&self) -> String {
        self.props
            .content_type()
            .as_ref()
            .map(|s| s.to_string())
            .unwrap_or_default()
    }
    /// Whether its signature header is the HMAC of the canonical form under `key`.
    fn signed_by(&self, key: &[u8]) -> bool {
        let want = sign(
            key,
            &self.routing_key,
            &self.id(),
            &self.content_type(),
            &self.body,
        );
        self.header(SIG).as_deref() == Some(want.as_str())
    }
}

/// Takes `n` messages from `queue` (acking them), waiting up to 30 s.
async fn take(client: &Client, queue: &str, n: usize) -> Vec<Got> {
    let ch = client.conn.create_channel().await.unwrap();
    let mut out = Vec::new();
    // Polls with a deadline, like `eventually`, keeping what it took.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while out.len() < n && tokio::time::Instant::now() < deadline {
        match ch
            .basic_get(queue.into(), BasicGetOptions { no_ack: false })
            .await
            .unwrap()
        {
            Some(m) => {
                m.ack(BasicAckOptions::default()).await.unwrap();
                out.push(Got {
                    routing_key: m.routing_key.to_string(),
                    props: m.properties.clone(),
                    body: m.data.clone(),
                });
            }
            None => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    let _ = ch.close(200, "taken".into()).await;
    out
}

fn ids(got: &[Got]) -> Vec<String> {
    let mut v: Vec<String> = got.iter().map(Got::id).collect();
    v.sort();
    v
}

#[actix_rt::test]
async fn signed_messages_pass_and_bad_ones_are_dead_lettered() {
    let prefix = unique("sign");
    let mut cfg = chain_config(&prefix, &["forward", "forward"], 10);
    let _cleanup = Cleanup::new(AMQP_URL, &cfg);
    let _keys = with_keys(&mut cfg);
    let h = start(&cfg).await;
    let client = Client::connect(AMQP_URL).await;
    let ex = format!("{prefix}.ex");

    let good = |id: &str, body: &[u8]| props(id, Some(sign(KEY, "in", id, "text/plain", body)));
    // In publish order: good, unsigned, good, tampered body, signed with the
    // previous key (rotation), signed for another routing key, good.
    let sent: Vec<(&str, BasicProperties, &[u8])> = vec![
        ("ok-1", good("ok-1", b"one"), b"one"),
        ("unsigned", props("unsigned", None), b"two"),
        ("ok-2", good("ok-2", b"three"), b"three"),
        (
            "tampered",
            props(
                "tampered",
                Some(sign(KEY, "in", "tampered", "text/plain", b"original")),
            ),
            b"forged",
        ),
        (
            "rotated",
            props(
                "rotated",
                Some(sign(PREVIOUS, "in", "rotated", "text/plain", b"old")),
            ),
            b"old",
        ),
        (
            "wrong-key",
            props(
                "wrong-key",
                Some(sign(KEY, "elsewhere", "wrong-key", "text/plain", b"rk")),
            ),
            b"rk",
        ),
        ("ok-3", good("ok-3", b"four"), b"four"),
    ];
    for (_, p, body) in &sent {
        client.publish_props(&ex, "in", body, p.clone()).await;
    }

    // The good ones and the one signed with the previous key arrive at the
    // sink, signed by the engine (current key) for the routing key of s2's
    // output, with body and content type intact.
    let sink = take(&client, &format!("{prefix}.sink"), 4).await;
    assert_eq!(ids(&sink), ["ok-1", "ok-2", "ok-3", "rotated"]);
    for g in &sink {
        assert_eq!(g.routing_key, "hop2");
        assert_eq!(g.content_type(), "text/plain");
        assert!(g.signed_by(KEY), "{} carries a valid signature", g.id());
        assert!(!g.signed_by(PREVIOUS));
    }
    let body_of = |id: &str| sent.iter().find(|(i, ..)| *i == id).unwrap().2;
    for g in &sink {
        assert_eq!(g.body, body_of(&g.id()));
    }

    // The bad ones are in s1's DLQ with reason bad-signature, as they came
    // (no signature / the wrong one: the engine does not sign them).
    let dlq = take(&client, &format!("{prefix}.s1.dlq"), 3).await;
    assert_eq!(ids(&dlq), ["tampered", "unsigned", "wrong-key"]);
    for g in &dlq {
        assert_eq!(
            g.header("x-flowgate-reason").as_deref(),
            Some("bad-signature")
        );
        assert_eq!(g.header("x-flowgate-stage").as_deref(), Some("s1"));
        assert!(g.header("x-flowgate-unsigned").is_none());
        assert!(!g.signed_by(KEY), "{} must not be laundered", g.id());
    }
    let unsigned = dlq.iter().find(|g| g.id() == "unsigned").unwrap();
    assert!(unsigned.header(SIG).is_none());

    let m = h.metrics();
    assert_eq!(m.counter(flowgate::Metrics::SIGNATURE_FAILURES, &["s1"]), 3);
    assert_eq!(m.counter(flowgate::Metrics::SIGNATURE_FAILURES, &["s2"]), 0);
    assert_eq!(
        m.counter(flowgate::Metrics::DEAD_LETTERED, &["s1", "bad-signature"]),
        3
    );
    let text = prometheus_text(&h);
    assert!(text.contains("flowgate_signature_failures_total{stage=\"s1\"} 3"));

    // A message injected between the stages without a signature is stopped
    // at s2 as well.
    client
        .publish_props(&ex, "hop1", b"x", props("injected", None))
        .await;
    let dlq2 = take(&client, &format!("{prefix}.s2.dlq"), 1).await;
    assert_eq!(ids(&dlq2), ["injected"]);

    h.shutdown().await;
}

fn prometheus_text(h: &EngineHandle) -> String {
    use prometheus::Encoder;
    let mut buf = Vec::new();
    prometheus::TextEncoder::new()
        .encode(&h.metrics().registry().gather(), &mut buf)
        .unwrap();
    String::from_utf8(buf).unwrap()
}

#[actix_rt::test]
async fn warn_mode_counts_and_processes() {
    let prefix = unique("signwarn");
    let mut cfg = chain_config(&prefix, &["forward", "forward"], 10);
    let _cleanup = Cleanup::new(AMQP_URL, &cfg);
    let _keys = with_keys(&mut cfg);
    cfg.stages[0].verify = Some(VerifyMode::Warn);
    let h = start(&cfg).await;
    let client = Client::connect(AMQP_URL).await;
    let ex = format!("{prefix}.ex");

    let sig = sign(KEY, "in", "ok", "text/plain", b"a");
    client
        .publish_props(&ex, "in", b"a", props("ok", Some(sig)))
        .await;
    client
        .publish_props(&ex, "in", b"b", props("unsigned", None))
        .await;
    let forged = sign(KEY, "in", "tampered", "text/plain", b"original");
    client
        .publish_props(&ex, "in", b"c", props("tampered", Some(forged)))
        .await;

    // All three are processed; s1's outputs are signed by the engine, so s2
    // (verify = reject, the default with a key) passes them on.
    let sink = take(&client, &format!("{prefix}.sink"), 3).await;
    assert_eq!(ids(&sink), ["ok", "tampered", "unsigned"]);
    assert!(sink.iter().all(|g| g.signed_by(KEY)));
    let m = h.metrics();
    assert_eq!(m.counter(flowgate::Metrics::SIGNATURE_FAILURES, &["s1"]), 2);
    assert_eq!(m.counter(flowgate::Metrics::SIGNATURE_FAILURES, &["s2"]), 0);
    assert_eq!(
        m.counter(flowgate::Metrics::DEAD_LETTERED, &["s1", "bad-signature"]),
        0
    );
    assert_eq!(client.depth(&format!("{prefix}.s1.dlq")).await, 0);

    h.shutdown().await;
}

/// A publish that goes to the spool while the breaker is open is signed
/// when it is replayed, and the verifying stage accepts it.
#[actix_rt::test]
async fn spooled_then_replayed_messages_verify() {
    let prefix = unique("signspool");
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = chain_config(&prefix, &["forward"], 10);
    let _cleanup = Cleanup::new(AMQP_URL, &cfg);
    let _keys = with_keys(&mut cfg);
    cfg.publisher.breaker.failures = 1;
    // Long enough that the publishes below find the breaker still open on
    // a loaded machine (500 ms did not: the direct record was confirmed).
    cfg.publisher.breaker.reset = Duration::from_secs(3);
    cfg.spool.path = Some(dir.path().join("spool.redb"));
    let h = start(&cfg).await;
    let client = Client::connect(AMQP_URL).await;
    let ex = format!("{prefix}.ex");

    // A publish the broker fails (its exchange does not exist: the broker
    // closes the channel) opens the breaker (failures = 1); a return would
    // not (it is the message's own fault). The exchange and a queue for it
    // exist by the time the spool replays.
    let missing = format!("{prefix}.missing");
    let r = h.publish(Output::new(&missing, "k", "x")).await;
    assert!(
        matches!(r, Ok(PublishOutcome::Spooled)),
        "the failure that opens the breaker spools its message: {r:?}"
    );
    // Two records spooled: one routed straight to the sink (nobody consumes
    // it, so what arrives there is the replayed record exactly as the
    // publisher sent it), one through the verifying stage s1.
    let direct = Output::new(&ex, "hop1", "direct body").with_properties(props("direct", None));
    assert_eq!(h.publish(direct).await.unwrap(), PublishOutcome::Spooled);
    let msg = Output::new(&ex, "in", "spooled body").with_properties(props("spooled", None));
    assert_eq!(h.publish(msg).await.unwrap(), PublishOutcome::Spooled);
    client
        .ch
        .exchange_declare(
            missing.as_str().into(),
            lapin::ExchangeKind::Fanout,
            Default::default(),
            Default::default(),
        )
        .await
        .expect("declare");
    client
        .ch
        .queue_declare(
            missing.as_str().into(),
            Default::default(),
            Default::default(),
        )
        .await
        .expect("declare");
    client
        .ch
        .queue_bind(
            missing.as_str().into(),
            missing.as_str().into(),
            "".into(),
            Default::default(),
            Default::default(),
        )
        .await
        .expect("bind");

    // At least once: a replay round may publish a record again (see the
    // publisher's module docs), so look at the first copy of each.
    let mut sink = Vec::new();
    for _ in 0..4 {
        sink.extend(take(&client, &format!("{prefix}.sink"), 1).await);
        let mut got = ids(&sink);
        got.dedup();
        if got.len() == 2 {
            break;
        }
    }
    let mut got = ids(&sink);
    got.dedup();
    assert_eq!(got, ["direct", "spooled"]);
    let replayed = sink.iter().find(|g| g.id() == "direct").unwrap();
    assert_eq!(replayed.routing_key, "hop1");
    assert_eq!(replayed.body, b"direct body");
    assert!(
        replayed.signed_by(KEY),
        "the replayed record carries the signature of its own routing key, id, \
         content type and body: {:?}",
        replayed.header(SIG)
    );
    assert!(sink.iter().all(|g| g.signed_by(KEY)));
    assert!(h.metrics().counter(flowgate::Metrics::SPOOL_REPLAYED, &[]) >= 2);
    // and the verifying stage accepted its replayed record.
    assert_eq!(
        h.metrics()
            .counter(flowgate::Metrics::SIGNATURE_FAILURES, &["s1"]),
        0
    );
    assert_eq!(client.depth(&format!("{prefix}.s1.dlq")).await, 0);

    h.shutdown().await;
    let _ = client
        .ch
        .queue_delete(missing.as_str().into(), Default::default())
        .await;
    let _ = client
        .ch
        .exchange_delete(missing.as_str().into(), Default::default())
        .await;
}

/// A retry copy comes back from its tier with the stage's queue as routing
/// key; its signature (made for the tier) is accepted.
#[actix_rt::test]
async fn retried_copies_verify_when_they_come_back() {
    let prefix = unique("signretry");
    let mut cfg = chain_config(&prefix, &["flaky"], 10);
    let _keys = with_keys(&mut cfg);
    cfg.stages[0].retry = Some(flowgate::config::RetryConfig {
        max_attempts: 3,
        backoff: vec![Duration::from_millis(50).into()],
    });
    // After the retry ladder is set: the guard deletes its tier queue too.
    let _cleanup = Cleanup::new(AMQP_URL, &cfg);
    let ex = format!("{prefix}.ex");
    let ex2 = ex.clone();
    let h = Engine::builder()
        .config(cfg.clone())
        .handler(
            "flaky",
            handler_fn(move |d| {
                let ex = ex2.clone();
                async move {
                    if d.header(flowgate::envelope::ATTEMPT).is_none() {
                        return Ok(Outcome::retry("first attempt fails"));
                    }
                    Ok(Outcome::ack_with(vec![d.forward(&ex, "hop1")]))
                }
            }),
        )
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    assert!(h.wait_ready(Duration::from_secs(20)).await);
    let client = Client::connect(AMQP_URL).await;
    let sig = sign(KEY, "in", "r-1", "text/plain", b"retry me");
    client
        .publish_props(&ex, "in", b"retry me", props("r-1", Some(sig)))
        .await;

    let sink = take(&client, &format!("{prefix}.sink"), 1).await;
    assert_eq!(ids(&sink), ["r-1"]);
    assert!(sink[0].signed_by(KEY));
    let m = h.metrics();
    assert_eq!(
        m.counter(
            flowgate::Metrics::RETRIED,
            &["s1", &format!("{prefix}.s1.retry.1")]
        ),
        1
    );
    assert_eq!(m.counter(flowgate::Metrics::SIGNATURE_FAILURES, &["s1"]), 0);

    h.shutdown().await;
}
