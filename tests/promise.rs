//! The promise itself (issue 23, item 1): an input is acked only after every
//! output it produced is confirmed by the broker.
//!
//! The engine reaches the shared broker through the test kit's proxy, which
//! holds the broker's publisher confirms while every other frame passes: the
//! broker has routed and stored the outputs (they are counted in the sink
//! queue), the engine has not heard so. The broker's own counts
//! (`rabbitmqctl list_queues`) then show the input unacknowledged, and it
//! stays so while any output's confirm is held; releasing the confirms one
//! at a time, the input is acked only after the last one. If the engine's
//! connections die while a confirm is held, the broker gives the input back
//! to its queue: nothing is lost. Each case runs with single and with
//! batched acks, on a stage that fans one input out to three outputs.

use flowgate_testkit as common;

use common::proxy::Proxy;
use common::*;
use flowgate::config::{AckBatchConfig, Config, QueueKind};
use flowgate::{handler_fn, Delivery, Engine, EngineHandle, Outcome};
use std::time::Duration;

/// Outputs per input of the fan-out stage.
const FAN_OUT: usize = 3;

/// How long a held confirm is watched for an early ack: the stage handles
/// the input and publishes its outputs within milliseconds, so an engine
/// that acks before the confirm (after any fixed delay under this one, or
/// after the first of several confirms) shows it here. It watches for
/// something that must not happen, so there is no event to await instead.
const WATCH: Duration = Duration::from_millis(1500);

/// `(ready, unacked)` of `queue` as the broker counts them.
async fn broker_view(queue: &str) -> (u64, u64) {
    let q = queue.to_owned();
    let (ready, unacked, _) = tokio::task::spawn_blocking(move || node::list_queue(None, &q))
        .await
        .expect("list_queues task")
        .expect("rabbitmqctl list_queues");
    (ready, unacked)
}

/// Watches the input for [`WATCH`]: it must stay delivered and unacked the
/// whole time (sampled by the broker at the start and at the end, and by the
/// engine's own ack counter in between).
async fn assert_held_unacked(h: &EngineHandle, input: &str, what: &str) {
    assert_eq!(
        broker_view(input).await,
        (0, 1),
        "{what}: the input is unacked"
    );
    let deadline = tokio::time::Instant::now() + WATCH;
    while tokio::time::Instant::now() < deadline {
        assert_eq!(acked(h), 0, "{what}: the engine acked the input");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        broker_view(input).await,
        (0, 1),
        "{what}: the input stays unacked while a confirm is held"
    );
}

/// Inputs the stage counted as acked.
fn acked(h: &EngineHandle) -> u64 {
    h.metrics().counter(flowgate::Metrics::ACKED, &["s1"])
}

struct Case {
    h: EngineHandle,
    proxy: Proxy,
    client: Client,
    cfg: Config,
    _cleanup: Cleanup,
}

impl Case {
    fn input(&self) -> String {
        self.cfg.stages[0].queue.clone()
    }

    fn sink(&self) -> String {
        format!("{}.sink", self.cfg.amqp.connection_name)
    }
}

/// `s1` fans each input out to [`FAN_OUT`] outputs on the sink queue; the
/// engine talks to the broker through a confirm-holding proxy.
async fn start(tag: &str, acks: AckBatchConfig) -> Case {
    let prefix = unique(tag);
    let mut cfg = chain_config(&prefix, &["fan-out"], 10);
    // Classic queues: the broker counts a quorum queue's unacked messages
    // on its Raft tick, seconds late; a classic queue's counts are live.
    for q in &mut cfg.queues {
        q.kind = QueueKind::Classic;
    }
    cfg.stages[0].ack_batch = acks;
    // Far longer than the test: a held confirm must not turn into a
    // timeout (and a spooled copy) while it is watched.
    cfg.publisher.confirm_timeout = Duration::from_secs(300);
    let cleanup = Cleanup::new(AMQP_URL, &cfg);
    let proxy = Proxy::start("127.0.0.1:5672".parse().expect("address")).await;
    cfg.amqp.url = proxy.amqp_url();
    let fan_out = handler_fn(|d: Delivery| async move {
        let id = d.message_id().unwrap_or_default().to_owned();
        let outputs = (0..FAN_OUT)
            .map(|i| {
                d.forward(&d.exchange, "hop1")
                    .with_message_id(format!("{id}.{i}"))
            })
            .collect();
        Ok(Outcome::ack_with(outputs))
    });
    let h = Engine::builder()
        .config(cfg.clone())
        .handler("fan-out", fan_out)
        .build()
        .expect("config")
        .start()
        .await
        .expect("engine starts");
    assert!(h.wait_ready(Duration::from_secs(20)).await, "ready");
    let client = Client::connect(AMQP_URL).await;
    Case {
        h,
        proxy,
        client,
        cfg,
        _cleanup: cleanup,
    }
}

/// Holds the confirms, publishes one input and waits until the broker has
/// every output and the proxy holds every confirm.
async fn publish_with_confirms_held(c: &Case, id: &str) {
    c.proxy.hold_confirms();
    c.client
        .publish(
            &format!("{}.ex", c.cfg.amqp.connection_name),
            "in",
            id,
            b"{}",
        )
        .await;
    let sink = c.sink();
    assert!(
        eventually(Duration::from_secs(20), || async {
            c.client.depth(&sink).await == FAN_OUT as u32
        })
        .await,
        "the broker has all {FAN_OUT} outputs"
    );
    assert!(
        c.proxy
            .wait_held_confirms(FAN_OUT, Duration::from_secs(20))
            .await,
        "all {FAN_OUT} confirms are held (held: {})",
        c.proxy.held_confirms()
    );
}

/// Releases the confirms one by one: the input stays unacked until the last.
async fn acked_only_after_every_confirm(tag: &str, acks: AckBatchConfig) {
    let c = start(tag, acks).await;
    let input = c.input();
    publish_with_confirms_held(&c, "p-1").await;
    assert_held_unacked(&c.h, &input, "no output confirmed").await;
    for released in 1..FAN_OUT {
        c.proxy.release_confirms(1);
        assert_held_unacked(
            &c.h,
            &input,
            &format!("{released} of {FAN_OUT} outputs confirmed"),
        )
        .await;
    }
    c.proxy.release_confirms(1);
    assert!(
        eventually(Duration::from_secs(20), || async {
            broker_view(&input).await == (0, 0)
        })
        .await,
        "acked once every output is confirmed: {:?}",
        broker_view(&input).await
    );
    assert_eq!(acked(&c.h), 1);
    c.proxy.pass_confirms();
    let got = c
        .client
        .collect_distinct(&c.sink(), FAN_OUT, Duration::from_secs(10))
        .await;
    Accounting::of((0..FAN_OUT).map(|i| format!("p-1.{i}")), &got).assert_exactly_once();
    assert!(c.h.shutdown().await.clean);
}

/// Cuts the engine off while a confirm is held: the input goes back to its
/// queue (the outputs may be there twice later — at least once — but the
/// input is never lost).
async fn an_unconfirmed_input_survives_the_engine(tag: &str, acks: AckBatchConfig) {
    let c = start(tag, acks).await;
    let input = c.input();
    publish_with_confirms_held(&c, "p-2").await;
    assert_held_unacked(&c.h, &input, "before the cut").await;
    // The process "dies": its connections are reset and cannot come back.
    c.proxy.set_refuse(true);
    c.proxy.reset_all();
    assert!(
        eventually(Duration::from_secs(20), || async {
            c.client.depth(&input).await == 1
        })
        .await,
        "the broker gave the input back: {:?}",
        broker_view(&input).await
    );
    assert_eq!(acked(&c.h), 0, "never counted acked");
    // Cut off from the broker, the drain gives up after the grace (10 s).
    let stopped = tokio::time::timeout(Duration::from_secs(60), c.h.shutdown()).await;
    assert!(stopped.is_ok(), "the shutdown ended (grace 10 s)");
}

fn single() -> AckBatchConfig {
    AckBatchConfig {
        enabled: false,
        ..AckBatchConfig::default()
    }
}

fn batched() -> AckBatchConfig {
    AckBatchConfig::default()
}

#[actix_rt::test]
async fn single_acks_wait_for_every_output_confirm() {
    acked_only_after_every_confirm("promise-single", single()).await;
}

#[actix_rt::test]
async fn batched_acks_wait_for_every_output_confirm() {
    acked_only_after_every_confirm("promise-batched", batched()).await;
}

#[actix_rt::test]
async fn single_acks_give_an_unconfirmed_input_back_when_the_engine_dies() {
    an_unconfirmed_input_survives_the_engine("promise-cut-single", single()).await;
}

#[actix_rt::test]
async fn batched_acks_give_an_unconfirmed_input_back_when_the_engine_dies() {
    an_unconfirmed_input_survives_the_engine("promise-cut-batched", batched()).await;
}

/// Across a channel recovery (lapin reconnects and delivery tags start at 1
/// again), a late outcome of a delivery from before it never acks one of
/// after it: the old delivery's tag now names another message.
///
/// `old-1` and `old-2` are held in the handler; the connection is reset and
/// lapin recovers it; the broker redelivers both (tags 1 and 2 of the new
/// channel), held too; `fresh-3` (tag 3) is taken and held. The old
/// deliveries then finish (their outputs confirmed), and `fresh-3` after
/// them: a batched ack covering tags 1–3 would ack the two redeliveries,
/// whose handlers have not even returned. The broker must keep them unacked.
#[actix_rt::test]
async fn an_outcome_from_before_a_channel_recovery_never_acks_a_delivery_after_it() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use tokio::sync::Semaphore;

    let prefix = unique("promise-incarnation");
    let mut cfg = chain_config(&prefix, &["held"], 40);
    for q in &mut cfg.queues {
        q.kind = QueueKind::Classic;
    }
    cfg.stages[0].concurrency = flowgate::config::Concurrency::Fixed(8);
    // A long flush: nothing is acked by the timer while the test looks.
    cfg.stages[0].ack_batch = AckBatchConfig {
        enabled: true,
        flush: Duration::from_secs(1),
    };
    let _cleanup = Cleanup::new(AMQP_URL, &cfg);
    let proxy = Proxy::start("127.0.0.1:5672".parse().expect("address")).await;
    cfg.amqp.url = proxy.amqp_url();
    let (old, redelivered, fresh) = (
        Arc::new(Semaphore::new(0)),
        Arc::new(Semaphore::new(0)),
        Arc::new(Semaphore::new(0)),
    );
    let entered_redelivered = Arc::new(AtomicUsize::new(0));
    let (o, r, f, er) = (
        old.clone(),
        redelivered.clone(),
        fresh.clone(),
        entered_redelivered.clone(),
    );
    let held = handler_fn(move |d: Delivery| {
        let (o, r, f, er) = (o.clone(), r.clone(), f.clone(), er.clone());
        async move {
            let gate = if d.redelivered {
                er.fetch_add(1, Ordering::SeqCst);
                r
            } else if d.message_id().is_some_and(|id| id.starts_with("old")) {
                o
            } else {
                f
            };
            gate.acquire().await.expect("gate").forget();
            Ok(Outcome::ack_with(vec![d.forward(&d.exchange, "hop1")]))
        }
    });
    let h = Engine::builder()
        .config(cfg.clone())
        .handler("held", held)
        .build()
        .expect("config")
        .start()
        .await
        .expect("engine starts");
    assert!(h.wait_ready(Duration::from_secs(20)).await, "ready");
    let in_flight = || h.metrics().gauge(flowgate::Metrics::IN_FLIGHT, &["s1"]);
    let client = Client::connect(AMQP_URL).await;
    let ex = format!("{prefix}.ex");
    let input = cfg.stages[0].queue.clone();
    client.publish(&ex, "in", "old-1", b"{}").await;
    client.publish(&ex, "in", "old-2", b"{}").await;
    assert!(
        eventually(Duration::from_secs(10), || async { in_flight() == 2 }).await,
        "both old deliveries are held"
    );
    // lapin recovers the connection; the broker redelivers both.
    proxy.reset_all();
    assert!(
        eventually(Duration::from_secs(30), || async {
            entered_redelivered.load(Ordering::SeqCst) == 2
        })
        .await,
        "the recovered channel got both again"
    );
    client.publish(&ex, "in", "fresh-3", b"{}").await;
    assert!(
        eventually(Duration::from_secs(10), || async { in_flight() == 5 }).await,
        "fresh-3 is held too: {}",
        in_flight()
    );
    // The old deliveries finish: their outputs are confirmed, their tags
    // (1 and 2) now name the redeliveries.
    old.add_permits(2);
    assert!(
        eventually(Duration::from_secs(20), || async { in_flight() == 3 }).await,
        "the old deliveries finished"
    );
    // fresh-3 (tag 3) finishes: it is acked alone once the flush interval
    // passes (the ones before it are still being handled), never with them.
    fresh.add_permits(1);
    assert!(
        eventually(Duration::from_secs(20), || async { acked(&h) >= 1 }).await,
        "fresh-3 acked"
    );
    assert_eq!(acked(&h), 1, "fresh-3 alone");
    assert_held_unacked_n(&input, 2, "the redeliveries, still in their handler").await;
    redelivered.add_permits(2);
    assert!(
        eventually(Duration::from_secs(20), || async {
            broker_view(&input).await == (0, 0)
        })
        .await,
        "everything acked in the end: {:?}",
        broker_view(&input).await
    );
    assert!(h.shutdown().await.clean);
}

/// The input holds `n` unacked deliveries for [`WATCH`] (see
/// [`assert_held_unacked`]).
async fn assert_held_unacked_n(input: &str, n: u64, what: &str) {
    let deadline = tokio::time::Instant::now() + WATCH;
    while tokio::time::Instant::now() < deadline {
        let (_, unacked) = broker_view(input).await;
        assert_eq!(unacked, n, "{what}: acked before their handler returned");
    }
}
