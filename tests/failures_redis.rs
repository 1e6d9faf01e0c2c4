//! Failure semantics, Redis unavailable: issue 4 acceptance 5 (fail closed).

use flowgate_testkit as common;

use common::redis::PrivateRedis;
use common::*;
use flowgate::config::DedupMode;
use flowgate::handler_fn;
use flowgate::Engine;
use flowgate::Outcome;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[actix_rt::test]
async fn redis_stopped_mid_run_pauses_without_acking_and_completes_without_duplicates() {
    let mut redis = PrivateRedis::start();
    let prefix = unique("redis-down");
    let mut cfg = chain_config(&prefix, &["effect"], 20);
    cfg.stages[0].dedup = DedupMode::Redis;
    cfg.stages[0].concurrency = flowgate::config::Concurrency::Fixed(4);
    cfg.redis.url = redis.url();
    cfg.dedup.prefix = format!("{prefix}:");
    let _cleanup = Cleanup::new(AMQP_URL, &cfg);
    let ex = format!("{prefix}.ex");
    let effects: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    // Handlers running right now.
    let running = Arc::new(AtomicUsize::new(0));
    let (e2, ex2, r2) = (effects.clone(), ex.clone(), running.clone());
    let handle = Engine::builder()
        .config(cfg.clone())
        .handler(
            "effect",
            handler_fn(move |d| {
                let (effects, ex, running) = (e2.clone(), ex2.clone(), r2.clone());
                async move {
                    running.fetch_add(1, Ordering::SeqCst);
                    *effects
                        .lock()
                        .unwrap()
                        .entry(d.message_id().unwrap_or_default().to_owned())
                        .or_default() += 1;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    running.fetch_sub(1, Ordering::SeqCst);
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
    let client = Client::connect(AMQP_URL).await;
    // 400 ids, each published twice, the copies 200 messages apart, so
    // duplicates straddle the outage.
    let ids: Vec<String> = (0..400).map(|i| format!("m-{i}")).collect();
    let mut stream = Vec::new();
    for chunk in ids.chunks(200) {
        stream.extend_from_slice(chunk);
        stream.extend_from_slice(chunk);
    }
    client.publish_many(&ex, "in", &stream, b"{}").await;

    let m = handle.metrics().clone();
    let acked = || m.counter(flowgate::Metrics::ACKED, &["s1"]);
    let effects_n = || effects.lock().unwrap().values().sum::<usize>();
    assert!(eventually(Duration::from_secs(30), || async { effects_n() >= 100 }).await);
    redis.stop();
    assert!(
        eventually(Duration::from_secs(10), || async {
            m.gauge(flowgate::Metrics::DEDUP_UP, &["redis"]) == 0
        })
        .await,
        "the outage is noticed"
    );
    assert!(acked() < stream.len() as u64, "the outage began mid-run");
    // Deliveries that committed before the outage may still ack, and those
    // already claimed may still run their handler. Then the stage is stuck
    // by design: every credit is held by a task waiting for the store, no
    // handler runs.
    const PREFETCH: i64 = 20;
    let in_flight = || m.gauge(flowgate::Metrics::IN_FLIGHT, &["s1"]);
    assert!(
        eventually(Duration::from_secs(20), || async {
            in_flight() == PREFETCH && running.load(Ordering::SeqCst) == 0
        })
        .await,
        "every credit held by a task waiting for the store (in flight {}, running {})",
        in_flight(),
        running.load(Ordering::SeqCst)
    );
    let (acked_before, effects_before) = (acked(), effects_n());
    // The broker agrees, once its (periodically published) quorum-queue
    // counters catch up: the stage holds exactly its prefetch unacked, and
    // everything not acked is still there. Waiting for that view is also the
    // observation window: nothing may move meanwhile.
    let q = format!("{prefix}.s1");
    let total = stream.len() as u64;
    let broker_view = || {
        let q = q.clone();
        async move {
            tokio::task::spawn_blocking(move || common::node::list_queue(None, &q).unwrap())
                .await
                .unwrap()
        }
    };
    assert!(
        eventually(Duration::from_secs(30), || async {
            let (ready, unacked, consumers) = broker_view().await;
            unacked == PREFETCH as u64 && consumers == 1 && ready + unacked + acked_before == total
        })
        .await,
        "the broker holds every unacked message: {:?}, acked {acked_before} of {total}",
        broker_view().await
    );
    assert_eq!(acked(), acked_before, "no ack without a dedup decision");
    assert_eq!(effects_n(), effects_before, "no handling without a claim");
    assert_eq!(in_flight(), PREFETCH, "intake stopped at the prefetch");
    assert!(m.counter(flowgate::Metrics::DEDUP_ERRORS, &["s1"]) >= 1);
    assert!(
        client.depth(&format!("{prefix}.s1")).await > 0,
        "the backlog waits in the broker"
    );

    redis.spawn();
    assert!(
        eventually(Duration::from_secs(60), || async {
            acked() == stream.len() as u64
        })
        .await,
        "the run completes after Redis returns ({} of {})",
        acked(),
        stream.len()
    );
    let effects = effects.lock().unwrap().clone();
    assert_eq!(effects.len(), ids.len(), "every id handled");
    let twice: Vec<_> = effects.iter().filter(|(_, n)| **n != 1).collect();
    assert!(twice.is_empty(), "no duplicate effects: {twice:?}");
    let sink = client
        .collect(
            &format!("{prefix}.sink"),
            ids.len(),
            Duration::from_secs(10),
        )
        .await;
    assert_eq!(sink.len(), ids.len(), "one output per id");
    assert_eq!(
        m.counter(flowgate::Metrics::DEDUP_HITS, &["s1"]),
        ids.len() as u64,
        "every second copy recognised"
    );
    handle.shutdown().await;
    assert_eq!(client.depth(&format!("{prefix}.s1.dlq")).await, 0);
}
