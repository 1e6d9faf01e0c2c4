//! A dedup backend error retrying will not fix dead-letters the message
//! (`dedup-error`) instead of looping while it holds a credit.

use flowgate_testkit as common;

use common::*;
use flowgate::config::DedupMode;
use flowgate::Engine;
use std::process::Command;
use std::time::Duration;

/// Runs `redis-cli` against the shared Redis.
fn redis_cli(args: &[&str]) {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", "6379"])
        .args(args)
        .output()
        .expect("redis-cli");
    assert!(out.status.success(), "redis-cli {args:?}: {out:?}");
}

/// Deletes the poisoned key even when the test fails.
struct DelKey(String);
impl Drop for DelKey {
    fn drop(&mut self) {
        let _ = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", "6379", "DEL", &self.0])
            .output();
    }
}

#[actix_rt::test]
async fn a_wrong_type_dedup_key_dead_letters_its_message_and_the_rest_flow() {
    let prefix = unique("f2dedup");
    let mut cfg = chain_config(&prefix, &["forward"], 1);
    cfg.stages[0].dedup = DedupMode::Redis;
    cfg.dedup.prefix = format!("{prefix}:");
    cfg.dedup.ttl = Duration::from_secs(120);
    let _cleanup = Cleanup::new(AMQP_URL, &cfg);
    // The key of id "poison" holds a list: SET NX finds it taken and GET
    // answers WRONGTYPE, an error no retry fixes.
    let key = format!("{prefix}:s1:poison");
    let _del = DelKey(key.clone());
    redis_cli(&["RPUSH", &key, "not-a-dedup-value"]);
    redis_cli(&["EXPIRE", &key, "300"]);

    let h = Engine::builder()
        .config(cfg.clone())
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    assert!(h.wait_ready(Duration::from_secs(20)).await, "engine ready");
    let client = Client::connect(AMQP_URL).await;
    let ex = format!("{prefix}.ex");
    // With prefetch 1 the poisoned message holds the stage's only credit:
    // the ids behind it flow only if it is let go.
    client.publish(&ex, "in", "poison", b"p").await;
    let ids: Vec<String> = (0..20).map(|i| format!("ok-{i}")).collect();
    client.publish_many(&ex, "in", &ids, b"b").await;

    let got = client
        .collect(
            &format!("{prefix}.sink"),
            ids.len(),
            Duration::from_secs(60),
        )
        .await;
    let c = counts(got.into_iter().map(|(id, _)| id));
    assert_eq!(c.len(), ids.len(), "every other id arrived");
    assert!(!c.contains_key("poison"));
    let dead = client
        .collect(&format!("{prefix}.s1.dlq"), 1, Duration::from_secs(30))
        .await;
    assert_eq!(dead.len(), 1, "the poisoned message is dead-lettered");
    assert_eq!(dead[0].0, "poison");
    assert_eq!(
        header(&dead[0].1, flowgate::envelope::REASON).as_deref(),
        Some("dedup-error")
    );
    assert_eq!(
        h.metrics()
            .counter(flowgate::Metrics::DEAD_LETTERED, &["s1", "dedup-error"]),
        1
    );
    h.shutdown().await;
}
