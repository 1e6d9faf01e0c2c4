//! Failure semantics, deduplication: issue 4 acceptance 3 (both backends).

use flowgate_testkit as common;

use common::*;
use flowgate::config::DedupMode;
use flowgate::handler_fn;
use flowgate::Engine;
use flowgate::Outcome;
use lapin::options::{BasicGetOptions, BasicNackOptions};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

type Effects = Arc<Mutex<HashMap<String, usize>>>;

async fn same_id_three_times_and_a_redelivery_give_one_effect(mode: DedupMode) {
    let prefix = unique("dedup");
    let mut cfg = chain_config(&prefix, &["effect"], 20);
    cfg.stages[0].dedup = mode;
    cfg.dedup.prefix = format!("{prefix}:");
    // Keys in the shared Redis expire soon after the test.
    cfg.dedup.ttl = Duration::from_secs(120);
    let ex = format!("{prefix}.ex");
    let queue = format!("{prefix}.s1");

    // Declare the topology and queue 4 copies of "dup" before the engine
    // runs; one of them is taken and nack-requeued (a redelivery).
    let client = Client::connect(AMQP_URL).await;
    flowgate::topology::declare(&client.ch, &cfg).await.unwrap();
    for _ in 0..4 {
        client.publish(&ex, "in", "dup", b"body").await;
    }
    client.publish(&ex, "in", "other", b"body").await;
    let got = client
        .ch
        .basic_get(queue.as_str().into(), BasicGetOptions::default())
        .await
        .unwrap()
        .expect("a message");
    got.nack(BasicNackOptions {
        multiple: false,
        requeue: true,
    })
    .await
    .unwrap();

    let effects: Effects = Arc::default();
    let e2 = effects.clone();
    let ex2 = ex.clone();
    let handle = Engine::builder()
        .config(cfg.clone())
        .handler(
            "effect",
            handler_fn(move |d| {
                let effects = e2.clone();
                let ex = ex2.clone();
                async move {
                    *effects
                        .lock()
                        .unwrap()
                        .entry(d.message_id().unwrap_or_default().to_owned())
                        .or_default() += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    Ok(Outcome::ack_with(vec![d.forward(&ex, "hop1")]))
                }
            }),
        )
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    assert!(handle.wait_ready(Duration::from_secs(20)).await);
    let stage_acked = || handle.metrics().counter(flowgate::Metrics::ACKED, &["s1"]);
    assert!(
        eventually(Duration::from_secs(20), || async { stage_acked() == 5 }).await,
        "all five deliveries acked"
    );
    // Two more copies after "dup" was committed.
    client.publish(&ex, "in", "dup", b"body").await;
    client.publish(&ex, "in", "dup", b"body").await;
    assert!(
        eventually(Duration::from_secs(20), || async { stage_acked() == 7 }).await,
        "late copies acked"
    );
    let sink = client
        .collect(&format!("{prefix}.sink"), 3, Duration::from_secs(3))
        .await;
    let c = counts(sink.into_iter().map(|(id, _)| id));
    assert_eq!(c.get("dup"), Some(&1), "one output for dup");
    assert_eq!(c.get("other"), Some(&1));
    let effects = effects.lock().unwrap().clone();
    assert_eq!(effects.get("dup"), Some(&1), "exactly one handler effect");
    assert_eq!(effects.get("other"), Some(&1));
    assert_eq!(
        handle
            .metrics()
            .counter(flowgate::Metrics::DEDUP_HITS, &["s1"]),
        5,
        "five of the six dup deliveries recognised as done"
    );
    handle.shutdown().await;
    assert_eq!(client.depth(&queue).await, 0);
    assert_eq!(client.depth(&format!("{queue}.dlq")).await, 0);
    client.delete_topology(&cfg).await;
}

#[actix_rt::test]
async fn memory_backend_one_effect_per_id() {
    same_id_three_times_and_a_redelivery_give_one_effect(DedupMode::Memory).await;
}

#[actix_rt::test]
async fn redis_backend_one_effect_per_id() {
    same_id_three_times_and_a_redelivery_give_one_effect(DedupMode::Redis).await;
}
