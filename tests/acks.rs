//! Batched acknowledgement (issue 12, item 3): consecutive settled
//! deliveries share one `basic.ack(multiple = true)`; a delivery still being
//! handled is never covered by one (the broker keeps it unacked while the
//! ones behind it are acked); a drain acks everything that is ready.

use flowgate_testkit as common;

use common::*;
use flowgate::config::{AckBatchConfig, Concurrency};
use flowgate::{handler_fn, Delivery, Engine, EngineHandle, Metrics, Outcome};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;

const PREFETCH: u32 = 40;

/// `(ready, unacked, consumers)` of `queue` as the broker reports it.
async fn broker_view(queue: &str) -> (u64, u64, u64) {
    let q = queue.to_owned();
    tokio::task::spawn_blocking(move || node::list_queue(None, &q).unwrap())
        .await
        .unwrap()
}

/// One stage (`s1` → sink) with batched acks flushed after `flush`; the
/// message with id `slow` waits for `gate`.
async fn start(
    prefix: &str,
    flush: Duration,
    gate: Arc<Semaphore>,
) -> (EngineHandle, flowgate::config::Config, Cleanup) {
    let mut cfg = chain_config(prefix, &["gated"], PREFETCH);
    cfg.stages[0].concurrency = Concurrency::Fixed(8);
    cfg.stages[0].ack_batch = Some(AckBatchConfig { flush });
    let cleanup = Cleanup::new(AMQP_URL, &cfg);
    let h = handler_fn(move |d: Delivery| {
        let gate = gate.clone();
        async move {
            if d.message_id() == Some("slow") {
                gate.acquire().await.expect("gate open").forget();
            }
            Ok(Outcome::ack_with(vec![d.forward(&d.exchange, "hop1")]))
        }
    });
    let handle = Engine::builder()
        .config(cfg.clone())
        .handler("gated", h)
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    assert!(handle.wait_ready(Duration::from_secs(20)).await);
    (handle, cfg, cleanup)
}

fn frames(m: &Metrics) -> u64 {
    m.counter(Metrics::ACK_FRAMES, &["s1"])
}

fn acked(m: &Metrics) -> u64 {
    m.counter(Metrics::ACKED, &["s1"])
}

#[actix_rt::test]
async fn runs_share_one_ack_and_a_delivery_still_handled_is_never_covered() {
    let prefix = unique("acks-batch");
    let gate = Arc::new(Semaphore::new(0));
    let (h, _cfg, _cleanup) = start(&prefix, Duration::from_millis(20), gate.clone()).await;
    let m = h.metrics().clone();
    let client = Client::connect(AMQP_URL).await;
    let ex = format!("{prefix}.ex");
    let input = format!("{prefix}.s1");
    let sink = format!("{prefix}.sink");

    // Phase 1: a run of 200 with nothing held up: far fewer frames than acks.
    let ids: Vec<String> = (0..200).map(|i| format!("a{i}")).collect();
    client.publish_many(&ex, "in", &ids, b"x").await;
    assert_eq!(
        client
            .collect_distinct(&sink, 200, Duration::from_secs(30))
            .await
            .len(),
        200
    );
    assert!(
        eventually(Duration::from_secs(10), || async { acked(&m) == 200 }).await,
        "all 200 acked: {}",
        acked(&m)
    );
    assert!(
        frames(&m) * 3 <= acked(&m),
        "{} ack frames for {} deliveries: batches of at least 3 on average",
        frames(&m),
        acked(&m)
    );
    assert_eq!(broker_view(&input).await.1, 0, "nothing left unacked");

    // Phase 2: `slow` is held first; the 30 behind it are handled and
    // confirmed. They are acked (after the flush interval, one by one behind
    // the held one), and `slow` stays unacked: no multiple ack covered it.
    client.publish(&ex, "in", "slow", b"x").await;
    let ids: Vec<String> = (0..30).map(|i| format!("b{i}")).collect();
    client.publish_many(&ex, "in", &ids, b"x").await;
    assert_eq!(
        client
            .collect_distinct(&sink, 30, Duration::from_secs(30))
            .await
            .len(),
        30
    );
    assert!(
        eventually(Duration::from_secs(10), || async {
            broker_view(&input).await == (0, 1, 1)
        })
        .await,
        "only the held delivery is unacked: (ready, unacked, consumers) = {:?}",
        broker_view(&input).await
    );
    assert_eq!(acked(&m), 230);

    // Released, it is acked too, and forwarded once.
    gate.add_permits(1);
    let got = client
        .collect_distinct(&sink, 1, Duration::from_secs(10))
        .await;
    assert_eq!(got.get("slow"), Some(&1));
    assert!(
        eventually(Duration::from_secs(10), || async {
            broker_view(&input).await == (0, 0, 1)
        })
        .await,
        "nothing unacked: {:?}",
        broker_view(&input).await
    );
    assert_eq!(acked(&m), 231);
    assert_eq!(m.counter(Metrics::ACK_FAILURES, &["s1"]), 0);
    h.shutdown().await;
}

#[actix_rt::test]
async fn a_drain_acks_what_is_ready_before_the_channel_closes() {
    let prefix = unique("acks-drain");
    // Acks would wait up to a second: only the drain can send them in time.
    let (h, _cfg, _cleanup) =
        start(&prefix, Duration::from_secs(1), Arc::new(Semaphore::new(0))).await;
    let client = Client::connect(AMQP_URL).await;
    let ids: Vec<String> = (0..5).map(|i| format!("d{i}")).collect();
    client
        .publish_many(&format!("{prefix}.ex"), "in", &ids, b"x")
        .await;
    let sink = format!("{prefix}.sink");
    assert_eq!(
        client
            .collect_distinct(&sink, 5, Duration::from_secs(30))
            .await
            .len(),
        5
    );
    let report = h.shutdown().await;
    assert!(report.clean, "{report:?}");
    assert_eq!(h.metrics().counter(Metrics::ACKED, &["s1"]), 5);
    // Nothing went back to the queue for redelivery.
    assert_eq!(broker_view(&format!("{prefix}.s1")).await, (0, 0, 0));
}
