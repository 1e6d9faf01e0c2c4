//! Engine core: a chained pipeline carries every message exactly once.

use flowgate_testkit as common;

use common::*;
use flowgate::Engine;
use std::time::Duration;

#[actix_rt::test]
async fn three_forward_stages_carry_10k_messages_exactly_once() {
    let prefix = unique("chain");
    let cfg = chain_config(&prefix, &["forward", "forward", "forward"], 50);
    let _cleanup = Cleanup::new(AMQP_URL, &cfg);
    let handle = Engine::builder()
        .config(cfg.clone())
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    assert!(
        handle.wait_ready(Duration::from_secs(20)).await,
        "engine ready"
    );
    let client = Client::connect(AMQP_URL).await;
    let ids: Vec<String> = (0..10_000).map(|i| format!("id-{i}")).collect();
    client
        .publish_many(&format!("{prefix}.ex"), "in", &ids, &[7u8; 256])
        .await;
    let got = client
        .collect(
            &format!("{prefix}.sink"),
            ids.len(),
            Duration::from_secs(120),
        )
        .await;
    let c = counts(got.into_iter().map(|(id, _)| id));
    assert_eq!(c.len(), ids.len(), "every id reached the sink");
    assert!(c.values().all(|n| *n == 1), "no id arrived twice");
    handle.shutdown().await;
    for q in &cfg.queues {
        assert_eq!(client.depth(&q.name).await, 0, "queue {} empty", q.name);
        assert_eq!(
            client.depth(&format!("{}.dlq", q.name)).await,
            0,
            "dlq of {} empty",
            q.name
        );
    }
    for s in ["s1", "s2", "s3"] {
        assert_eq!(
            handle.metrics().counter(flowgate::Metrics::ACKED, &[s]),
            10_000
        );
    }
}
