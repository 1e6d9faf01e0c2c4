//! The spool under load: a replay is held to the publisher's rate.

use flowgate_testkit as common;

use common::*;
use flowgate::lapin::BasicProperties;
use flowgate::Engine;
use flowgate::{Spool, SpoolRecord};
use std::time::{Duration, Instant};

#[actix_rt::test]
async fn a_replay_of_5000_records_keeps_to_the_rate_and_delivers_each_once() {
    const N: usize = 5000;
    const RATE: u32 = 500;
    let prefix = unique("fspool");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spool.redb");
    // s1 is never fed; the spool holds records for the sink's key.
    let mut cfg = chain_config(&prefix, &["forward"], 10);
    cfg.spool.path = Some(path.clone());
    cfg.publisher.rate = RATE;
    cfg.publisher.burst = 50;
    let _cleanup = Cleanup::new(AMQP_URL, &cfg);
    {
        let spool = Spool::open(&path, 64 << 20).expect("spool");
        for i in 0..N {
            spool
                .append(&SpoolRecord {
                    exchange: format!("{prefix}.ex"),
                    routing_key: "hop1".into(),
                    body: vec![7; 64],
                    properties: BasicProperties::default()
                        .with_message_id(format!("r-{i}").into())
                        .with_delivery_mode(2),
                })
                .expect("append");
        }
    }
    let started = Instant::now();
    let h = Engine::builder()
        .config(cfg.clone())
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let m = h.metrics().clone();
    assert!(
        eventually(Duration::from_secs(120), || async {
            m.gauge(flowgate::Metrics::SPOOL_MESSAGES, &[]) == 0
                && m.counter(flowgate::Metrics::SPOOL_REPLAYED, &[]) as usize == N
        })
        .await,
        "spool replayed: {} of {N}",
        m.counter(flowgate::Metrics::SPOOL_REPLAYED, &[])
    );
    let took = started.elapsed();
    eprintln!("replay of {N} records at rate {RATE}: {took:?}");
    // The bucket admits the burst of 50, then RATE per second: 9.9 s.
    let floor = Duration::from_secs(9);
    assert!(
        took >= floor,
        "replay took {took:?}, below the rate floor {floor:?}"
    );
    let client = Client::connect(AMQP_URL).await;
    let sink = format!("{prefix}.sink");
    let got = client.collect(&sink, N, Duration::from_secs(30)).await;
    let c = counts(got.into_iter().map(|(id, _)| id));
    assert_eq!(c.len(), N, "every record arrived");
    assert!(c.values().all(|n| *n == 1), "and once");
    assert_eq!(client.depth(&sink).await, 0, "no copy left behind");
    h.shutdown().await;
}
