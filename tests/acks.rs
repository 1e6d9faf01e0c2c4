//! Batched acknowledgement (issue 12, item 3): consecutive settled
//! deliveries share one `basic.ack(multiple = true)`; a delivery still being
//! handled is never covered by one (the broker keeps it unacked while the
//! ones behind it are acked); a run holding every delivery the stage has is
//! acked at once, without waiting for the flush interval; a drain leaves
//! nothing unacked; `enabled = false` sends one frame per delivery.

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

/// One stage (`s1` → sink) acking as `acks` says; the message with id
/// `slow` waits for `gate`.
async fn start(
    prefix: &str,
    acks: AckBatchConfig,
    gate: Arc<Semaphore>,
) -> (EngineHandle, flowgate::config::Config, Cleanup) {
    let mut cfg = chain_config(prefix, &["gated"], PREFETCH);
    cfg.stages[0].concurrency = Concurrency::Fixed(8);
    cfg.stages[0].ack_batch = acks;
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

/// Batched acks flushed after `flush`.
fn batched(flush: Duration) -> AckBatchConfig {
    AckBatchConfig {
        flush,
        ..AckBatchConfig::default()
    }
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
    let (h, _cfg, _cleanup) =
        start(&prefix, batched(Duration::from_millis(20)), gate.clone()).await;
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
async fn a_lone_delivery_is_acked_without_waiting_for_the_flush_interval() {
    let prefix = unique("acks-idle");
    const FLUSH: Duration = Duration::from_secs(1);
    let (h, _cfg, _cleanup) = start(&prefix, batched(FLUSH), Arc::new(Semaphore::new(0))).await;
    let m = h.metrics().clone();
    let client = Client::connect(AMQP_URL).await;
    let (ex, sink) = (format!("{prefix}.ex"), format!("{prefix}.sink"));
    // One at a time: each is the only delivery the stage has, so its ack
    // goes out as soon as its output is confirmed. Left to the flush timer,
    // it would go out a whole interval after that confirm, which comes
    // after the publish: more than an interval after the publish.
    for i in 0..5u64 {
        let sent = std::time::Instant::now();
        client.publish(&ex, "in", &format!("lone{i}"), b"x").await;
        assert!(
            eventually(Duration::from_secs(10), || async { acked(&m) == i + 1 }).await,
            "lone{i} acked: {}",
            acked(&m)
        );
        assert!(
            sent.elapsed() < FLUSH,
            "lone{i} acked {:?} after its publish: it waited for the {FLUSH:?} flush",
            sent.elapsed()
        );
        let got = client
            .collect_distinct(&sink, 1, Duration::from_secs(30))
            .await;
        assert_eq!(
            got.get(format!("lone{i}").as_str()),
            Some(&1),
            "lone{i} forwarded once"
        );
    }
    assert_eq!(frames(&m), 5, "one frame each: nothing to batch them with");
    let input = format!("{prefix}.s1");
    assert!(
        eventually(Duration::from_secs(10), || async {
            broker_view(&input).await.1 == 0
        })
        .await,
        "nothing unacked: {:?}",
        broker_view(&input).await
    );
    h.shutdown().await;
}

#[actix_rt::test]
async fn a_drain_leaves_nothing_unacked() {
    let prefix = unique("acks-drain");
    // Acks behind the held delivery would wait up to a second.
    let gate = Arc::new(Semaphore::new(0));
    let (h, _cfg, _cleanup) = start(&prefix, batched(Duration::from_secs(1)), gate.clone()).await;
    let client = Client::connect(AMQP_URL).await;
    let ex = format!("{prefix}.ex");
    client.publish(&ex, "in", "slow", b"x").await;
    let ids: Vec<String> = (0..5).map(|i| format!("d{i}")).collect();
    client.publish_many(&ex, "in", &ids, b"x").await;
    let sink = format!("{prefix}.sink");
    assert_eq!(
        client
            .collect_distinct(&sink, 5, Duration::from_secs(30))
            .await
            .len(),
        5
    );
    // The drain waits for the held one; let it finish meanwhile.
    let shutdown = tokio::spawn({
        let h = h.clone();
        async move { h.shutdown().await }
    });
    gate.add_permits(1);
    let report = shutdown.await.unwrap();
    assert!(report.clean, "{report:?}");
    assert_eq!(h.metrics().counter(Metrics::ACKED, &["s1"]), 6);
    // Nothing went back to the queue for redelivery.
    assert_eq!(broker_view(&format!("{prefix}.s1")).await, (0, 0, 0));
}

#[actix_rt::test]
async fn with_batching_off_every_delivery_has_its_own_frame() {
    let prefix = unique("acks-off");
    let (h, _cfg, _cleanup) =
        start(&prefix, AckBatchConfig::off(), Arc::new(Semaphore::new(0))).await;
    let m = h.metrics().clone();
    let client = Client::connect(AMQP_URL).await;
    let ids: Vec<String> = (0..100).map(|i| format!("o{i}")).collect();
    client
        .publish_many(&format!("{prefix}.ex"), "in", &ids, b"x")
        .await;
    assert_eq!(
        client
            .collect_distinct(&format!("{prefix}.sink"), 100, Duration::from_secs(30))
            .await
            .len(),
        100
    );
    assert!(
        eventually(Duration::from_secs(10), || async { acked(&m) == 100 }).await,
        "all 100 acked: {}",
        acked(&m)
    );
    assert_eq!(frames(&m), 100);
    h.shutdown().await;
}

/// An ack the channel never takes does not wedge the stage: the client is
/// told its consume connection is blocked (the test proxy sends
/// `connection.blocked`; lapin then writes nothing on it, acks included),
/// so every ack waits. Each gives up after the settle bound (counted as an
/// ack failure: the broker will redeliver) instead of holding the ack
/// batcher — and, behind it, every later ack and every credit of the
/// stage — for as long as the channel stays silent. Once the connection
/// writes again, new deliveries are handled and acked, and the input
/// drains.
#[actix_rt::test]
async fn an_ack_the_channel_never_takes_gives_up_and_frees_its_credit() {
    use flowgate_testkit::proxy::Proxy;
    let prefix = unique("acks-stuck");
    let mut cfg = chain_config(&prefix, &["forward"], 5);
    let _cleanup = Cleanup::new(AMQP_URL, &cfg);
    let proxy = Proxy::start("127.0.0.1:5672".parse().unwrap()).await;
    cfg.amqp.url = proxy.amqp_url();
    let h = Engine::builder()
        .config(cfg.clone())
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    assert!(h.wait_ready(Duration::from_secs(20)).await);
    let m = h.metrics().clone();
    let failures = || m.counter(Metrics::ACK_FAILURES, &["s1"]);
    let in_flight = || m.gauge(Metrics::IN_FLIGHT, &["s1"]);
    assert_eq!(proxy.send_blocked("-consume"), 1, "one consume connection");
    let client = Client::connect(AMQP_URL).await;
    let ex = format!("{prefix}.ex");
    let sink = format!("{prefix}.sink");
    let ids: Vec<String> = (0..3).map(|i| format!("s{i}")).collect();
    client.publish_many(&ex, "in", &ids, b"x").await;
    // The outputs go out (the publish connection is not blocked); the acks
    // cannot. The settle bound is 5 s.
    assert_eq!(
        client
            .collect_distinct(&sink, ids.len(), Duration::from_secs(20))
            .await
            .len(),
        ids.len(),
        "the outputs were published"
    );
    assert!(
        eventually(Duration::from_secs(30), || async {
            failures() >= 1 && in_flight() == 0
        })
        .await,
        "the acks that cannot be written are given up within the settle bound and \
         their credits come back: {} ack failures, {} in flight",
        failures(),
        in_flight()
    );
    assert_eq!(acked(&m), 0, "nothing was counted acked");
    // The connection writes again: later deliveries are handled and acked.
    assert_eq!(proxy.send_unblocked("-consume"), 1);
    let more: Vec<String> = (0..2).map(|i| format!("t{i}")).collect();
    client.publish_many(&ex, "in", &more, b"x").await;
    let input = format!("{prefix}.s1");
    assert!(
        eventually(Duration::from_secs(30), || async {
            acked(&m) >= 2 && broker_view(&input).await == (0, 0, 1)
        })
        .await,
        "acked {} after the unblock; the input: {:?}",
        acked(&m),
        broker_view(&input).await
    );
    h.shutdown().await;
}
