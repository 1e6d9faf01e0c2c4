//! Failure semantics, poison and bad input: issue 4 acceptance 6.

use flowgate_testkit as common;

use common::*;
use flowgate::config::{DedupMode, Payload};
use flowgate::Engine;
use std::time::Duration;

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[actix_rt::test]
async fn malformed_oversized_and_unparseable_messages_reach_the_dlq_and_neighbours_are_processed() {
    let prefix = unique("poison");
    let mut cfg = chain_config(&prefix, &["forward"], 1);
    cfg.stages[0].payload = Payload::Json;
    cfg.stages[0].dedup = DedupMode::Memory;
    cfg.queues[0].delivery_limit = Some(3);
    cfg.limits.max_message_bytes = 1024;
    let ex = format!("{prefix}.ex");
    let handle = Engine::builder()
        .config(cfg.clone())
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    assert!(handle.wait_ready(Duration::from_secs(20)).await);
    let client = Client::connect(AMQP_URL).await;
    let mut raw = common::raw::RawClient::connect("127.0.0.1:5672").await;

    client.publish(&ex, "in", "good-1", br#"{"n":1}"#).await;
    client.publish(&ex, "in", "malformed", b"{not json").await;
    let big = format!(r#"{{"pad":"{}"}}"#, "x".repeat(2000));
    client.publish(&ex, "in", "oversized", big.as_bytes()).await;
    client.publish(&ex, "in", "good-2", br#"{"n":2}"#).await;
    raw.publish(
        &ex,
        "in",
        &common::raw::Props::persistent_with_id(b"bad-\xff\xfe-id").encode(),
        br#"{"n":0}"#,
    )
    .await;
    for i in 3..=6 {
        client
            .publish(
                &ex,
                "in",
                &format!("good-{i}"),
                format!(r#"{{"n":{i}}}"#).as_bytes(),
            )
            .await;
    }

    // The non-UTF-8 id no longer kills the connection (the vendored parser
    // decodes it lossily, see tests/vendor_guard.rs): it is forwarded, or
    // dead-lettered by the stage, exactly once.
    let lossy_id = "bad-\u{fffd}\u{fffd}-id";
    let sink_q = format!("{prefix}.sink");
    let dlq = format!("{prefix}.s1.dlq");
    assert!(
        eventually(Duration::from_secs(60), || async {
            client.depth(&sink_q).await + client.depth(&dlq).await == 9
        })
        .await,
        "nine messages settled (sink {}, dlq {})",
        client.depth(&sink_q).await,
        client.depth(&dlq).await
    );
    let n = client.depth(&sink_q).await as usize;
    let sink = client.collect(&sink_q, n, Duration::from_secs(60)).await;
    let c = counts(sink.into_iter().map(|(id, _)| id));
    for i in 1..=6 {
        assert_eq!(
            c.get(&format!("good-{i}")),
            Some(&1),
            "good-{i} processed once: {c:?}"
        );
    }
    let mut reasons = Vec::new();
    while let Some(props) = raw.get(&dlq).await {
        if contains(&props, lossy_id.as_bytes()) && contains(&props, b"x-flowgate-reason") {
            reasons.push("lossy-id");
        } else if contains(&props, b"malformed") && contains(&props, b"x-flowgate-reason") {
            reasons.push("malformed");
        } else if contains(&props, b"oversized") && contains(&props, b"x-flowgate-reason") {
            reasons.push("oversized");
        } else {
            panic!(
                "unexpected dead letter: {}",
                String::from_utf8_lossy(&props)
            );
        }
    }
    reasons.sort();
    let lossy_dead = reasons.iter().filter(|r| **r == "lossy-id").count();
    assert_eq!(
        c.get(lossy_id).copied().unwrap_or(0) + lossy_dead,
        1,
        "the non-UTF-8 id once: sink {c:?}, dlq {reasons:?}"
    );
    reasons.retain(|r| *r != "lossy-id");
    assert_eq!(reasons, ["malformed", "oversized"]);
    let m = handle.metrics();
    assert_eq!(
        m.counter(flowgate::Metrics::DEAD_LETTERED, &["s1", "malformed"]),
        1
    );
    assert_eq!(
        m.counter(flowgate::Metrics::DEAD_LETTERED, &["s1", "oversized"]),
        1
    );
    // No message costs the connection.
    let reconnects = m.counter(flowgate::Metrics::RECONNECTS, &["consume"])
        + m.counter(flowgate::Metrics::RESTARTS, &["connection", ""]);
    assert_eq!(reconnects, 0, "no reconnect");
    handle.shutdown().await;
    assert_eq!(client.depth(&format!("{prefix}.s1")).await, 0);
    client.delete_topology(&cfg).await;
}
