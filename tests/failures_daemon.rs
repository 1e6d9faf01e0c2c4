//! Failure semantics with real daemon processes (`flowgate run`) and the
//! built-in `record` handler: issue 4 acceptance 4 (`kill -9`) and 8 (three
//! daemons, Redis backend, duplicates injected).

use flowgate_testkit as common;

use common::daemon::Daemon;
use common::proxy::Proxy;
use common::*;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// `flowgate run` on `toml`, written into `dir`.
fn daemon(dir: &Path, name: &str, toml: &str) -> Daemon {
    Daemon::start(env!("CARGO_BIN_EXE_flowgate").as_ref(), dir, name, toml)
}

fn pipeline_toml(
    prefix: &str,
    amqp: &str,
    record: &Path,
    delay: Option<&str>,
    lease: &str,
    prefetch: u32,
) -> String {
    let delay = delay
        .map(|d| format!("delay = \"{d}\"\n"))
        .unwrap_or_default();
    format!(
        r#"
[amqp]
url = "{amqp}"
connection_name = "{prefix}"
[shutdown]
grace = "5s"
[dedup]
lease = "{lease}"
ttl = "10m"
prefix = "{prefix}:"
[[exchanges]]
name = "{prefix}.ex"
[[queues]]
name = "{prefix}.s1"
bindings = [{{ exchange = "{prefix}.ex", routing_key = "in" }}]
[[stages]]
name = "s1"
queue = "{prefix}.s1"
handler = "record"
record_file = "{record}"
dedup = "redis"
prefetch = {prefetch}
concurrency = 8
{delay}"#,
        record = record.display()
    )
}

fn effects(record: &Path) -> HashMap<String, usize> {
    let text = std::fs::read_to_string(record).unwrap_or_default();
    counts(text.lines().map(str::to_owned))
}

fn redis_get(key: &str) -> String {
    let out = Command::new("redis-cli")
        .args(["GET", key])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn redis_del_prefix(prefix: &str) {
    let _ = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "redis-cli --scan --pattern '{prefix}:*' | xargs -r redis-cli DEL > /dev/null"
        ))
        .status();
}

/// Deletes a test's Redis keys when dropped, also when the test failed.
struct RedisKeys(String);

impl Drop for RedisKeys {
    fn drop(&mut self) {
        redis_del_prefix(&self.0);
    }
}

/// Cleanup guards for a test's broker topology and Redis keys.
fn cleanup(prefix: &str) -> (Cleanup, RedisKeys) {
    (
        Cleanup::new(AMQP_URL, &topology(prefix)),
        RedisKeys(prefix.to_owned()),
    )
}

/// Milliseconds left on a Redis key's expiry (`PTTL`; negative: no key or
/// no expiry).
fn redis_pttl(key: &str) -> i64 {
    let out = Command::new("redis-cli")
        .args(["PTTL", key])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(-2)
}

fn topology(prefix: &str) -> flowgate::Config {
    let mut cfg = chain_config(prefix, &[], 1);
    cfg.queues.truncate(0);
    cfg.queues.push(flowgate::config::QueueConfig {
        name: format!("{prefix}.s1"),
        kind: flowgate::config::QueueKind::Quorum,
        bindings: vec![flowgate::config::Binding {
            exchange: format!("{prefix}.ex"),
            routing_key: "in".into(),
        }],
        dead_letter: true,
        dead_letter_kind: None,
        delivery_limit: Some(20),
        watermark: None,
        single_active_consumer: false,
        partitions: None,
        partition_key: None,
    });
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_after_the_effect_before_the_ack_gives_no_second_effect() {
    let prefix = unique("kill-acked");
    let _cleanup = cleanup(&prefix);
    let dir = tempfile::tempdir().unwrap();
    let record: PathBuf = dir.path().join("effects.txt");
    let client = Client::connect(AMQP_URL).await;
    let proxy = Proxy::start("127.0.0.1:5672".parse().unwrap()).await;

    // Daemon 1 reaches the broker through a proxy, so its ack can be held back.
    let mut d1 = daemon(
        dir.path(),
        "d1",
        &pipeline_toml(&prefix, &proxy.amqp_url(), &record, Some("1s"), "30s", 10),
    );
    assert!(
        eventually(Duration::from_secs(30), || d1.ready()).await,
        "d1 ready"
    );
    client
        .publish(&format!("{prefix}.ex"), "in", "k1", b"x")
        .await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            effects(&record).contains_key("k1")
        })
        .await,
        "the effect happened"
    );
    // The handler still works for 1s: cut the broker link so the ack is lost.
    proxy.set_blackhole(true);
    let key = format!("{prefix}:s1:k1");
    assert!(
        eventually(Duration::from_secs(10), || async {
            redis_get(&key) == "done"
        })
        .await,
        "the effect was committed"
    );
    d1.kill9();
    proxy.reset_all();
    drop(proxy);

    let d2 = daemon(
        dir.path(),
        "d2",
        &pipeline_toml(&prefix, AMQP_URL, &record, Some("1s"), "30s", 10),
    );
    assert!(
        eventually(Duration::from_secs(30), || async {
            d2.metric("flowgate_dedup_hits_total{stage=\"s1\"}").await == 1.0
        })
        .await,
        "the redelivery is recognised"
    );
    assert!(
        eventually(Duration::from_secs(10), || async {
            d2.metric("flowgate_messages_acked_total{stage=\"s1\"}")
                .await
                == 1.0
        })
        .await,
        "and acked"
    );
    assert_eq!(effects(&record).get("k1"), Some(&1), "no second effect");
    drop(d2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_during_handling_is_processed_again_after_the_lease() {
    let prefix = unique("kill-mid");
    let _cleanup = cleanup(&prefix);
    let dir = tempfile::tempdir().unwrap();
    let record: PathBuf = dir.path().join("effects.txt");
    let client = Client::connect(AMQP_URL).await;
    // Long enough that the second daemon is up and holding the redelivery
    // well before the lease runs out: the bound below is then the lease's,
    // not the second daemon's start-up time.
    let toml = pipeline_toml(&prefix, AMQP_URL, &record, Some("1500ms"), "8s", 10);
    let mut d1 = daemon(dir.path(), "d1", &toml);
    assert!(
        eventually(Duration::from_secs(30), || d1.ready()).await,
        "d1 ready"
    );
    client
        .publish(&format!("{prefix}.ex"), "in", "k2", b"x")
        .await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            effects(&record).contains_key("k2")
        })
        .await
    );
    d1.kill9(); // mid-handling: claimed, not committed, not acked
    let key = format!("{prefix}:s1:k2");
    assert_ne!(redis_get(&key), "done");
    // When the lease d1 took ends, by Redis's own clock: read just after
    // the kill, so the expiry is no earlier than now + PTTL.
    let asked = Instant::now();
    let pttl = redis_pttl(&key);
    assert!(pttl > 0, "d1's claim is a lease with an expiry ({pttl})");
    let lease_ends = asked + Duration::from_millis(pttl as u64);

    let d2 = daemon(dir.path(), "d2", &toml);
    // The redelivery reaches d2, which holds it (claim refused, retried with
    // backoff) while d1's lease lasts.
    assert!(
        eventually(Duration::from_secs(30), || async {
            d2.metric("flowgate_stage_in_flight{stage=\"s1\"}").await == 1.0
        })
        .await,
        "d2 holds the redelivery"
    );
    let holding = Instant::now();
    assert!(
        holding + Duration::from_secs(1) < lease_ends,
        "inconclusive: d2 got the redelivery only {:?} before the lease ended",
        lease_ends.saturating_duration_since(holding)
    );
    assert!(
        eventually(Duration::from_secs(30), || async {
            effects(&record).get("k2") == Some(&2)
        })
        .await,
        "processed again, not lost"
    );
    let second = Instant::now();
    // The effect is polled every 20 ms: seen no earlier than it happened.
    assert!(
        second + Duration::from_millis(100) >= lease_ends,
        "processed again {:?} before d1's lease ended",
        lease_ends - second
    );
    assert!(
        eventually(Duration::from_secs(10), || async {
            d2.metric("flowgate_messages_acked_total{stage=\"s1\"}")
                .await
                == 1.0
        })
        .await,
        "acked"
    );
    assert_eq!(effects(&record).get("k2"), Some(&2), "exactly one retry");
    assert_eq!(client.depth(&format!("{prefix}.s1")).await, 0);
    assert_eq!(client.depth(&format!("{prefix}.s1.dlq")).await, 0);
    drop(d2);
}

/// Three daemons share a queue and Redis; `unique` ids, each published once,
/// plus 10% published a second time: exactly one effect per id.
async fn three_daemons_exactly_one_effect(unique_ids: usize) -> Duration {
    let prefix = unique("three");
    let _cleanup = cleanup(&prefix);
    let dir = tempfile::tempdir().unwrap();
    let record: PathBuf = dir.path().join("effects.txt");
    let client = Client::connect(AMQP_URL).await;
    let toml = pipeline_toml(&prefix, AMQP_URL, &record, None, "30s", 50);
    let daemons: Vec<Daemon> = (0..3)
        .map(|i| daemon(dir.path(), &format!("d{i}"), &toml))
        .collect();
    for d in &daemons {
        assert!(
            eventually(Duration::from_secs(30), || d.ready()).await,
            "daemon ready"
        );
    }
    let ids: Vec<String> = (0..unique_ids).map(|i| format!("u-{i}")).collect();
    let mut stream = ids.clone();
    // Every tenth id again, 1000 messages later (or at the end).
    for (i, id) in ids.iter().enumerate().filter(|(i, _)| i % 10 == 0) {
        let at = (i + 1000).min(stream.len());
        stream.insert(at, id.clone());
    }
    let started = Instant::now();
    client
        .publish_many(&format!("{prefix}.ex"), "in", &stream, &[7u8; 64])
        .await;
    let total = stream.len() as f64;
    let acked = || async {
        let mut sum = 0.0;
        for d in &daemons {
            sum += d
                .metric("flowgate_messages_acked_total{stage=\"s1\"}")
                .await;
        }
        sum
    };
    assert!(
        eventually(Duration::from_secs(600), || async {
            acked().await >= total
        })
        .await,
        "all {total} deliveries acked"
    );
    let elapsed = started.elapsed();
    let e = effects(&record);
    assert_eq!(e.len(), unique_ids, "every id had an effect");
    let dup: Vec<_> = e.iter().filter(|(_, n)| **n != 1).take(5).collect();
    assert!(dup.is_empty(), "exactly one effect per id: {dup:?}");
    let mut hits = 0.0;
    for d in &daemons {
        hits += d.metric("flowgate_dedup_hits_total{stage=\"s1\"}").await;
    }
    assert_eq!(
        hits,
        (stream.len() - unique_ids) as f64,
        "duplicates recognised"
    );
    assert_eq!(client.depth(&format!("{prefix}.s1")).await, 0);
    assert_eq!(client.depth(&format!("{prefix}.s1.dlq")).await, 0);
    drop(daemons);
    eprintln!(
        "three daemons: {} messages ({unique_ids} ids) in {elapsed:?} = {:.0} msg/s",
        stream.len(),
        total / elapsed.as_secs_f64()
    );
    elapsed
}

/// The full acceptance size (measured: 50,000 messages in about 26 s on 2 cores).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_daemons_redis_50k_messages_exactly_one_effect() {
    three_daemons_exactly_one_effect(50_000 * 10 / 11).await;
}
