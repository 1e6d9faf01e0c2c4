//! Hostile input: forged engine headers and handler outputs the broker
//! cannot take (issue 9, acceptance 2 and 3).

use flowgate_testkit as common;

use common::*;
use flowgate::config::Payload;
use flowgate::handler_fn;
use flowgate::Engine;
use flowgate::{Delivery, Outcome, Output};
use lapin::types::AMQPValue;
use lapin::BasicProperties;
use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Once;
use std::time::Duration;

/// Panics anywhere in this test binary (a publish task, a handler).
static PANICS: AtomicUsize = AtomicUsize::new(0);

fn count_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, Ordering::SeqCst);
            previous(info);
        }));
    });
}

fn forged(original: (&str, AMQPValue)) -> BasicProperties {
    BasicProperties::default().with_headers(headers(&[
        ("x-flowgate-attempt", AMQPValue::LongLongInt(2)),
        original,
    ]))
}

#[actix_rt::test]
async fn forged_routing_headers_are_stripped_and_good_messages_behind_them_flow() {
    count_panics();
    let prefix = unique("forged");
    let mut cfg = chain_config(&prefix, &["forward"], 10);
    cfg.stages[0].payload = Payload::Json;
    cfg.queues[0].delivery_limit = Some(3);
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

    let long_key = "k".repeat(300);
    for i in 0..100 {
        let props = forged(("x-flowgate-original-routing-key", s(&long_key)))
            .with_message_id(format!("long-{i}").into());
        client.publish_props(&ex, "in", b"not json", props).await;
        let props = forged((
            "x-flowgate-original-exchange",
            s(&format!("{prefix}.no-such-exchange")),
        ))
        .with_message_id(format!("nowhere-{i}").into());
        client.publish_props(&ex, "in", b"not json", props).await;
    }
    let good: Vec<String> = (0..1000).map(|i| format!("good-{i}")).collect();
    client.publish_many(&ex, "in", &good, b"{}").await;

    let sink = client
        .collect_distinct(&format!("{prefix}.sink"), 1000, Duration::from_secs(60))
        .await;
    assert_eq!(sink.len(), 1000, "every good message reaches the sink");
    assert!(sink.keys().all(|id| id.starts_with("good-")));
    let dead = client
        .collect(&format!("{prefix}.s1.dlq"), 200, Duration::from_secs(30))
        .await;
    let ids: HashSet<&str> = dead.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(ids.len(), 200, "every forged message is in the DLQ once");
    for (id, h) in &dead {
        assert_eq!(
            header(h, "x-flowgate-reason").as_deref(),
            Some("malformed"),
            "{id}"
        );
        assert_eq!(
            header(h, "x-flowgate-original-exchange").as_deref(),
            Some(ex.as_str()),
            "{id}: the engine's own routing"
        );
        assert_eq!(
            header(h, "x-flowgate-original-routing-key").as_deref(),
            Some("in"),
            "{id}: the engine's own routing"
        );
        assert!(
            matches!(
                h.inner().get("x-flowgate-attempts"),
                Some(AMQPValue::LongLongInt(1))
            ),
            "{id}: a forged attempt does not count"
        );
    }
    let stage = &handle.stages()[0];
    assert!(
        eventually(Duration::from_secs(10), || async { stage.in_flight() == 0 }).await,
        "in-flight returns to 0 (now {})",
        stage.in_flight()
    );
    let m = handle.metrics();
    assert_eq!(m.gauge(flowgate::Metrics::IN_FLIGHT, &["s1"]), 0);
    assert_eq!(
        m.counter(flowgate::Metrics::DEAD_LETTERED, &["s1", "malformed"]),
        200
    );
    assert_eq!(m.counter(flowgate::Metrics::PUBLISH, &["panicked"]), 0);
    assert_eq!(m.counter(flowgate::Metrics::PUBLISH_RETRIES, &["s1"]), 0);
    handle.shutdown().await;
    assert_eq!(PANICS.load(Ordering::SeqCst), 0, "no panic anywhere");
    assert_drained(&client, &format!("{prefix}.s1")).await;
}

#[actix_rt::test]
async fn an_output_with_an_over_long_routing_key_dead_letters_its_input() {
    count_panics();
    let prefix = unique("bad-output");
    let cfg = chain_config(&prefix, &["shaky"], 10);
    let _cleanup = Cleanup::new(AMQP_URL, &cfg);
    let ex = format!("{prefix}.ex");
    let ex2 = ex.clone();
    let handle = Engine::builder()
        .config(cfg.clone())
        .handler(
            "shaky",
            handler_fn(move |d: Delivery| {
                let ex = ex2.clone();
                async move {
                    let bad = d.message_id().is_some_and(|id| id.starts_with("bad-"));
                    let key = if bad { "k".repeat(300) } else { "hop1".into() };
                    Ok(Outcome::ack_with(vec![Output::new(
                        ex,
                        key,
                        d.body.clone(),
                    )
                    .with_properties(d.properties.clone())]))
                }
            }),
        )
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    assert!(handle.wait_ready(Duration::from_secs(20)).await);
    let client = Client::connect(AMQP_URL).await;
    let ids: Vec<String> = (0..200)
        .map(|i| {
            if i % 10 == 0 {
                format!("bad-{i}")
            } else {
                format!("ok-{i}")
            }
        })
        .collect();
    client.publish_many(&ex, "in", &ids, b"{}").await;

    let sink = client
        .collect_distinct(&format!("{prefix}.sink"), 180, Duration::from_secs(60))
        .await;
    assert_eq!(sink.len(), 180, "the stage goes on");
    assert!(sink.keys().all(|id| id.starts_with("ok-")));
    let dead = client
        .collect(&format!("{prefix}.s1.dlq"), 20, Duration::from_secs(30))
        .await;
    assert_eq!(dead.len(), 20);
    for (id, h) in &dead {
        assert!(id.starts_with("bad-"), "{id}");
        assert_eq!(
            header(h, "x-flowgate-reason").as_deref(),
            Some("invalid-output"),
            "{id}"
        );
        let err = header(h, "x-flowgate-error").unwrap_or_default();
        assert!(
            err.contains("routing key") && err.contains("300"),
            "{id}: {err}"
        );
    }
    let m = handle.metrics();
    assert_eq!(
        m.counter(flowgate::Metrics::DEAD_LETTERED, &["s1", "invalid-output"]),
        20
    );
    assert_eq!(m.counter(flowgate::Metrics::PUBLISH_RETRIES, &["s1"]), 0);
    let stage = &handle.stages()[0];
    assert!(eventually(Duration::from_secs(10), || async { stage.in_flight() == 0 }).await);
    handle.shutdown().await;
    assert_eq!(PANICS.load(Ordering::SeqCst), 0, "no panic anywhere");
}
