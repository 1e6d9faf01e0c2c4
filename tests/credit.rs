//! Credit bound: a stage never holds more deliveries than its prefetch.

use flowgate_testkit as common;

use common::*;
use flowgate::actors::message::handler_fn;
use flowgate::actors::{Delivery, Outcome};
use flowgate::Engine;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;

#[actix_rt::test]
async fn a_blocked_stage_holds_at_most_prefetch_deliveries() {
    const P: usize = 5;
    let prefix = unique("credit");
    let mut cfg = chain_config(&prefix, &["blocking"], P as u32);
    let _cleanup = Cleanup::new(AMQP_URL, &cfg);
    // More handler tasks than credits: only the credit bound can hold the line.
    cfg.stages[0].concurrency = flowgate::config::Concurrency::Fixed(64);
    let gate = Arc::new(Semaphore::new(0));
    let holding = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let (g, hd, pk) = (gate.clone(), holding.clone(), peak.clone());
    let h = handler_fn(move |d: Delivery| {
        let (g, hd, pk) = (g.clone(), hd.clone(), pk.clone());
        async move {
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
    let ids: Vec<String> = (0..60).map(|i| format!("id-{i}")).collect();
    client
        .publish_many(&format!("{prefix}.ex"), "in", &ids, b"x")
        .await;

    let in_flight = || handle.metrics().in_flight.with_label_values(&["s1"]).get();
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
    assert!(
        eventually(Duration::from_secs(30), || async {
            broker_view().await == (60 - P as u64, P as u64, 1)
        })
        .await,
        "the broker reports exactly P unacked and the rest ready: {:?}",
        broker_view().await
    );
    // Nothing more arrives while blocked: the peak stays at P.
    assert_eq!(peak.load(Ordering::SeqCst), P);

    gate.add_permits(10_000);
    let got = client
        .collect(&format!("{prefix}.sink"), 60, Duration::from_secs(30))
        .await;
    assert_eq!(counts(got.into_iter().map(|(id, _)| id)).len(), 60);
    assert_eq!(
        peak.load(Ordering::SeqCst),
        P,
        "never more than P held at once"
    );
    handle.shutdown().await;
    assert_eq!(in_flight(), 0);
}
