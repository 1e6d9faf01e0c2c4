//! Credit bound: a stage never holds more deliveries than its prefetch, even
//! when the broker grants more than that.
//!
//! The broker's `basic_qos(P)` alone caps unacked deliveries per channel at
//! P, so a plain "blocked handlers stay at P" check passes with the credits
//! removed. Here the engine's connections are reset while P handlers are
//! blocked: the broker requeues those P messages and grants the recovered
//! consumer P *new* deliveries, while the P old handlers still run. Only the
//! in-process credits keep the handlers at P.

use flowgate_testkit as common;

use common::proxy::Proxy;
use common::*;
use flowgate::handler_fn;
use flowgate::Engine;
use flowgate::{Delivery, Outcome};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;

#[actix_rt::test]
async fn a_blocked_stage_holds_at_most_prefetch_deliveries_even_when_the_broker_grants_more() {
    const P: usize = 5;
    const N: usize = 60;
    let prefix = unique("credit");
    let mut cfg = chain_config(&prefix, &["blocking"], P as u32);
    let _cleanup = Cleanup::new(AMQP_URL, &cfg);
    // The engine reaches the shared broker through a proxy, so its
    // connections can be cut without disturbing anyone else's.
    let proxy = Proxy::start("127.0.0.1:5672".parse().unwrap()).await;
    cfg.amqp.url = proxy.amqp_url();
    // More handler tasks than credits: only the credit bound can hold the line.
    cfg.stages[0].concurrency = flowgate::config::Concurrency::Fixed(64);
    let gate = Arc::new(Semaphore::new(0));
    let holding = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let entered = Arc::new(AtomicUsize::new(0));
    let (g, hd, pk, en) = (gate.clone(), holding.clone(), peak.clone(), entered.clone());
    let h = handler_fn(move |d: Delivery| {
        let (g, hd, pk, en) = (g.clone(), hd.clone(), pk.clone(), en.clone());
        async move {
            en.fetch_add(1, Ordering::SeqCst);
            let now = hd.fetch_add(1, Ordering::SeqCst) + 1;
            pk.fetch_max(now, Ordering::SeqCst);
            let permit = g.acquire().await.expect("gate open");
            permit.forget();
            hd.fetch_sub(1, Ordering::SeqCst);
            Ok(Outcome::ack_with(vec![d.forward(&d.exchange, "hop1")]))
        }
    });
    let handle = Engine::builder()
        .config(cfg.clone())
        .handler("blocking", h)
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    assert!(handle.wait_ready(Duration::from_secs(20)).await);
    let client = Client::connect(AMQP_URL).await;
    let ids: Vec<String> = (0..N).map(|i| format!("id-{i}")).collect();
    client
        .publish_many(&format!("{prefix}.ex"), "in", &ids, b"x")
        .await;

    let m = handle.metrics().clone();
    let in_flight = || m.gauge(flowgate::Metrics::IN_FLIGHT, &["s1"]);
    assert!(
        eventually(Duration::from_secs(20), || async {
            holding.load(Ordering::SeqCst) == P
        })
        .await,
        "handlers fill up to the prefetch"
    );
    assert_eq!(in_flight(), P as i64, "in-flight gauge equals prefetch");
    // Quorum-queue counters in `list_queues` are published periodically, so
    // wait for them to settle on the broker's view.
    let q = format!("{prefix}.s1");
    let broker_view = || {
        let q = q.clone();
        async move {
            tokio::task::spawn_blocking(move || node::list_queue(None, &q).unwrap())
                .await
                .unwrap()
        }
    };
    let settled_at_p = || async { broker_view().await == ((N - P) as u64, P as u64, 1) };
    assert!(
        eventually(Duration::from_secs(30), settled_at_p).await,
        "the broker reports exactly P unacked and the rest ready: {:?}",
        broker_view().await
    );

    // Cut the engine's connections while the P handlers are blocked. The
    // broker requeues the P deliveries; the recovered consumer is granted P
    // new ones, which arrive while the P old handlers still hold theirs.
    proxy.reset_all();
    let reconnected = || m.counter(flowgate::Metrics::RECONNECTS, &["consume"]) >= 1;
    assert!(
        eventually(Duration::from_secs(60), || async {
            reconnected() && handle.stages()[0].consuming()
        })
        .await,
        "the consumer recovers (reconnects {})",
        m.counter(flowgate::Metrics::RECONNECTS, &["consume"])
    );
    assert!(
        eventually(Duration::from_secs(30), settled_at_p).await,
        "the broker granted the recovered consumer P more: {:?}",
        broker_view().await
    );
    assert_eq!(holding.load(Ordering::SeqCst), P, "the old P still run");

    // One old handler finishes: its credit comes back and the intake pulls
    // exactly one delivery from the recovered consumer, the P granted ones
    // being right there.
    gate.add_permits(1);
    assert!(
        eventually(Duration::from_secs(20), || async {
            entered.load(Ordering::SeqCst) > P
        })
        .await,
        "the intake pulls from the recovered consumer once a credit returns"
    );
    assert_eq!(
        peak.load(Ordering::SeqCst),
        P,
        "never more than P held at once, though the broker granted 2P"
    );
    assert!(in_flight() <= P as i64, "in flight {}", in_flight());

    gate.add_permits(10_000);
    let got = client
        .collect_distinct(&format!("{prefix}.sink"), N, Duration::from_secs(60))
        .await;
    assert_eq!(got.len(), N, "every id reaches the sink");
    assert_eq!(
        peak.load(Ordering::SeqCst),
        P,
        "never more than P held at once"
    );
    handle.shutdown().await;
    assert_eq!(in_flight(), 0);
}

/// A worker slot bounds handler execution only (issue 12, item 2): a
/// delivery whose output waits for the publisher keeps its credit but frees
/// its worker, so with one worker the next handlers run meanwhile.
#[actix_rt::test]
async fn a_delivery_waiting_for_its_publish_frees_its_worker() {
    const N: usize = 6;
    let prefix = unique("credit-worker");
    let mut cfg = chain_config(&prefix, &["count"], 10);
    let _cleanup = Cleanup::new(AMQP_URL, &cfg);
    cfg.stages[0].concurrency = flowgate::config::Concurrency::Fixed(1);
    // Publishes wait for tokens: 2 per second after one of burst.
    cfg.publisher.rate = 2;
    cfg.publisher.burst = 1;
    let handled = Arc::new(AtomicUsize::new(0));
    let n = handled.clone();
    let h = handler_fn(move |d: Delivery| {
        n.fetch_add(1, Ordering::SeqCst);
        async move { Ok(Outcome::ack_with(vec![d.forward(&d.exchange, "hop1")])) }
    });
    let handle = Engine::builder()
        .config(cfg)
        .handler("count", h)
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    assert!(handle.wait_ready(Duration::from_secs(20)).await);
    let client = Client::connect(AMQP_URL).await;
    let ids: Vec<String> = (0..N).map(|i| format!("id-{i}")).collect();
    client
        .publish_many(&format!("{prefix}.ex"), "in", &ids, b"x")
        .await;
    assert!(
        eventually(Duration::from_secs(20), || async {
            handled.load(Ordering::SeqCst) == N
        })
        .await,
        "every handler ran"
    );
    let acked = handle.metrics().counter(flowgate::Metrics::ACKED, &["s1"]) as usize;
    // Holding the worker until the confirm would allow at most one handled
    // delivery beyond the acked ones.
    assert!(
        acked + 2 <= N,
        "with one worker, {N} handlers ran while only {acked} outputs were confirmed"
    );
    let got = client
        .collect_distinct(&format!("{prefix}.sink"), N, Duration::from_secs(20))
        .await;
    assert_eq!(got.len(), N, "and every output arrives");
    handle.shutdown().await;
}
