//! A lapin auto-recovery costs no restart: the broker closes both of the
//! engine's connections mid-run, lapin recovers them (and the channels and
//! consumers on them), and the stages and the publisher go on as they were.

use flowgate_testkit as common;

use common::node::BrokerNode;
use common::*;
use flowgate::Engine;
use std::time::Duration;

const N: usize = 20_000;
const PREFETCH: u32 = 20;

#[actix_rt::test]
async fn a_forced_close_of_both_connections_costs_no_restart_and_no_message() {
    let node = BrokerNode::start_async()
        .await
        .expect("private broker node");
    let prefix = unique("frecover");
    let mut cfg = chain_config(&prefix, &["forward", "forward"], PREFETCH);
    cfg.amqp.url = node.amqp_url();
    let _cleanup = Cleanup::new(&node.amqp_url(), &cfg);
    let handle = Engine::builder()
        .config(cfg.clone())
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    assert!(handle.wait_ready(Duration::from_secs(20)).await);
    let client = Client::connect(&node.amqp_url()).await;
    let ids: Vec<String> = (0..N).map(|i| format!("id-{i}")).collect();
    client
        .publish_many(&format!("{prefix}.ex"), "in", &ids, &[2u8; 256])
        .await;
    let sink = format!("{prefix}.sink");
    assert!(
        eventually(Duration::from_secs(120), || async {
            client.depth(&sink).await as usize > N * 3 / 10
        })
        .await,
        "the pipeline moves"
    );
    let name = prefix.clone();
    let closed = node
        .blocking(move |n| n.close_connection_named(&name))
        .await
        .expect("close_connection");
    assert_eq!(
        closed, 2,
        "closed the engine's consume and publish connections"
    );
    // The run finishes while the engine keeps running.
    // Exactly one consumer per stage queue: no zombie left by a second channel.
    let m = handle.metrics();
    let duplicates = finish_run(&client, m, &cfg, &sink, &ids, Duration::from_secs(180)).await;
    // Each delivery in flight at the close may be redelivered, and its
    // output's confirm may be lost and the output published again.
    let windows = cfg.stages.len() * PREFETCH as usize;
    eprintln!("recovery: {duplicates} duplicates (bound {})", 2 * windows);
    assert!(
        duplicates <= 2 * windows,
        "{duplicates} duplicates exceed twice the in-flight windows ({windows})"
    );
    // Both connections, each once: the broker closed each once, and lapin
    // brought each back (two recoveries of one connection are not both).
    for connection in ["consume", "publish"] {
        assert_eq!(
            m.counter(flowgate::Metrics::RECONNECTS, &[connection]),
            1,
            "lapin recovered the {connection} connection once\n{}",
            m.render()
        );
    }
    for actor in [
        ["stage", "s1"],
        ["stage", "s2"],
        ["publisher", ""],
        ["connection", ""],
    ] {
        assert_eq!(
            m.counter(flowgate::Metrics::RESTARTS, &actor),
            0,
            "restarts of {actor:?}\n{}",
            m.render()
        );
    }
    assert!(handle.wait_ready(Duration::from_secs(20)).await);
    handle.shutdown().await;
}
