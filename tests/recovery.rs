//! A connection closed by the broker: the engine recovers and finishes the run.

use flowgate_testkit as common;

use common::node::BrokerNode;
use common::*;
use flowgate::Engine;
use std::time::Duration;

#[actix_rt::test]
async fn engine_recovers_from_a_broker_closed_connection_and_finishes() {
    let node = BrokerNode::start_async()
        .await
        .expect("private broker node");
    let prefix = unique("recover");
    let mut cfg = chain_config(&prefix, &["forward", "forward", "forward"], 20);
    cfg.amqp.url = node.amqp_url();
    cfg.stages[1].delay = Some(Duration::from_millis(1));
    let handle = Engine::builder()
        .config(cfg.clone())
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    assert!(handle.wait_ready(Duration::from_secs(20)).await);
    let client = Client::connect(&node.amqp_url()).await;
    let n = 3000;
    let ids: Vec<String> = (0..n).map(|i| format!("id-{i}")).collect();
    client
        .publish_many(&format!("{prefix}.ex"), "in", &ids, &[2u8; 256])
        .await;
    let sink = format!("{prefix}.sink");
    assert!(
        eventually(Duration::from_secs(60), || async {
            client.depth(&sink).await > 100
        })
        .await
    );

    // The broker closes both of the engine's connections (they are named after it).
    let name = prefix.clone();
    let closed = node
        .blocking(move |n| n.close_connection_named(&name))
        .await
        .expect("close_connection");
    assert_eq!(
        closed, 2,
        "closed the engine's consume and publish connections"
    );

    // At-least-once: deliveries in flight at the close are redelivered, so
    // an id may arrive twice; none may be missing.
    let c = client
        .collect_distinct(&sink, n, Duration::from_secs(120))
        .await;
    if c.len() != n {
        let mut where_ = Vec::new();
        for q in &cfg.queues {
            where_.push((
                q.name.clone(),
                client.depth(&q.name).await,
                client.depth(&format!("{}.dlq", q.name)).await,
            ));
        }
        panic!(
            "only {} of {n} ids reached the sink; queues (ready, dlq): {where_:?}\n{}",
            c.len(),
            handle.metrics().render()
        );
    }
    // The ids may all have arrived before lapin's recovery (its first
    // reconnect waits 1 to 2 s): wait for it to show.
    let m = handle.metrics();
    let recoveries = || {
        m.counter(flowgate::Metrics::RECONNECTS, &["consume"])
            + m.counter(flowgate::Metrics::RECONNECTS, &["publish"])
            + m.counter(flowgate::Metrics::RESTARTS, &["connection", ""])
    };
    assert!(
        eventually(Duration::from_secs(30), || async { recoveries() >= 1 }).await,
        "the recovery shows in the metrics"
    );
    assert!(
        handle.wait_ready(Duration::from_secs(20)).await,
        "ready again after recovery"
    );
    handle.shutdown().await;
}
