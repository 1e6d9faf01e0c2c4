//! A `message_id` decoded lossily from invalid UTF-8 (it holds U+FFFD) is
//! dead-lettered `malformed-id` before the dedup claim: two such ids can
//! collide, and a claim would ack the second without handling it (issue 9,
//! item 1, flowgate's half).

use flowgate_testkit as common;

use common::*;
use flowgate::config::DedupMode;
use flowgate::Engine;
use std::time::Duration;

#[actix_rt::test]
async fn lossy_message_ids_are_dead_lettered_before_dedup_can_merge_them() {
    let prefix = unique("lossy-id");
    let mut cfg = chain_config(&prefix, &["forward"], 10);
    cfg.stages[0].dedup = DedupMode::Memory;
    let _cleanup = Cleanup::new(AMQP_URL, &cfg);
    let handle = Engine::builder()
        .config(cfg.clone())
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    assert!(handle.wait_ready(Duration::from_secs(20)).await);
    let client = Client::connect(AMQP_URL).await;
    let ex = format!("{prefix}.ex");
    // What the patched parser makes of two different invalid ids.
    let lossy = "order-\u{FFFD}\u{FFFD}";
    client.publish(&ex, "in", lossy, b"first").await;
    client.publish(&ex, "in", lossy, b"second").await;
    client.publish(&ex, "in", "good", b"{}").await;

    let sink = client
        .collect(&format!("{prefix}.sink"), 1, Duration::from_secs(30))
        .await;
    assert_eq!(sink.len(), 1);
    assert_eq!(sink[0].0, "good");
    let dead = client
        .collect(&format!("{prefix}.s1.dlq"), 2, Duration::from_secs(30))
        .await;
    assert_eq!(dead.len(), 2, "both lossy ids are dead letters: {dead:?}");
    for (id, h) in &dead {
        assert_eq!(id, lossy);
        assert_eq!(
            header(h, "x-flowgate-reason").as_deref(),
            Some("malformed-id")
        );
    }
    let m = handle.metrics();
    assert_eq!(
        m.counter(flowgate::Metrics::DEAD_LETTERED, &["s1", "malformed-id"]),
        2
    );
    assert_eq!(m.counter(flowgate::Metrics::DEDUP_HITS, &["s1"]), 0);
    handle.shutdown().await;
    assert_drained(&client, &format!("{prefix}.s1")).await;
}
