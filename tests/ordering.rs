//! Ordered lanes (`stages[].order_by`): the events of one key are handled in
//! the order they were published, different keys in parallel; a failed
//! attempt retries in place, holding its key.

use flowgate_testkit as common;

use common::daemon::{in_order_with_repeats, recorded};
use common::*;
use flowgate::config::Concurrency;
use flowgate::config::RetryConfig;
use flowgate::envelope::Reason;
use flowgate::lapin::options::BasicPublishOptions;
use flowgate::lapin::BasicProperties;
use flowgate::{handler_fn, Config, Delivery, Engine, HandlerError, Outcome};
use futures::StreamExt;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The header the events carry their key in.
const KEY: &str = "entity";

/// A random number below `n` (a fresh hasher key each call).
fn random(n: u64) -> u64 {
    std::collections::hash_map::RandomState::new().hash_one(0u8) % n
}

/// What the handler saw, per key: the sequence numbers in handling order.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<HashMap<String, Vec<u32>>>>);

impl Seen {
    fn record(&self, key: &str, seq: u32) {
        self.0
            .lock()
            .unwrap()
            .entry(key.to_owned())
            .or_default()
            .push(seq);
    }

    fn total(&self) -> usize {
        self.0.lock().unwrap().values().map(Vec::len).sum()
    }

    /// Keys whose handled sequence is not exactly `0..events`, with it.
    fn out_of_order(&self, events: u32) -> Vec<(String, Vec<u32>)> {
        let want: Vec<u32> = (0..events).collect();
        let mut bad: Vec<_> = self
            .0
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, got)| **got != want)
            .map(|(k, got)| (k.clone(), got.clone()))
            .collect();
        bad.sort();
        bad
    }
}

/// `key:seq` from the body.
fn parse(d: &Delivery) -> (String, u32) {
    let body = String::from_utf8_lossy(&d.body);
    let (k, n) = body.split_once(':').unwrap_or(("", "0"));
    (k.to_owned(), n.parse().unwrap_or(0))
}

/// Publishes `events` events for each of `keys` keys, interleaved (event 0
/// of every key, then event 1, ...), with the key in the `entity` header and
/// `key:seq` as the body, confirmed.
async fn publish_keyed(client: &Client, exchange: &str, keys: u32, events: u32) {
    let mut pending = futures::stream::FuturesUnordered::new();
    for seq in 0..events {
        for k in 0..keys {
            let key = format!("k{k}");
            let props = BasicProperties::default()
                .with_message_id(format!("{key}-{seq}").into())
                .with_headers(headers(&[(KEY, s(&key))]))
                .with_delivery_mode(2);
            let c = client
                .ch
                .basic_publish(
                    exchange.into(),
                    "in".into(),
                    BasicPublishOptions {
                        mandatory: true,
                        immediate: false,
                    },
                    format!("{key}:{seq}").as_bytes(),
                    props,
                )
                .await
                .expect("publish");
            pending.push(c);
            if pending.len() >= 500 {
                let c = pending.next().await.expect("pending").expect("confirm");
                assert!(c.is_ack(), "{c:?}");
            }
        }
    }
    while let Some(c) = pending.next().await {
        assert!(c.expect("confirm").is_ack());
    }
}

/// One stage `s1` on its queue with the test's handler: random 0–5 ms of
/// work and 5% transient failures (retried through the ladder); the
/// handler records each success.
fn ordered_config(prefix: &str, concurrency: u32, order: bool) -> Config {
    let mut cfg = chain_config(prefix, &["ordered"], 256);
    let s = &mut cfg.stages[0];
    s.concurrency = Concurrency::Fixed(concurrency);
    s.retry = Some(RetryConfig {
        max_attempts: 20,
        backoff: vec![
            Duration::from_millis(1).into(),
            Duration::from_millis(5).into(),
        ],
    });
    if order {
        s.order_by = Some(format!("header:{KEY}"));
    }
    cfg
}

fn flaky_recorder(seen: Seen) -> impl flowgate::Handler {
    handler_fn(move |d: Delivery| {
        let seen = seen.clone();
        async move {
            tokio::time::sleep(Duration::from_micros(random(5000))).await;
            if random(100) < 5 {
                return Err(HandlerError::from("transient"));
            }
            let (key, seq) = parse(&d);
            seen.record(&key, seq);
            Ok(Outcome::ack())
        }
    })
}

/// Publishes `keys × events`, then starts the stage and waits until every
/// event was handled once (or 180 s). Returns what was seen and the
/// handling rate.
async fn run(tag: &str, keys: u32, events: u32, concurrency: u32, order: bool) -> (Seen, f64) {
    let prefix = unique(tag);
    let cfg = ordered_config(&prefix, concurrency, order);
    let _cleanup = Cleanup::new(AMQP_URL, &cfg);
    let client = Client::connect(AMQP_URL).await;
    // Declare the topology first, so the events wait in the queue.
    let seen = Seen::default();
    let build = || {
        Engine::builder()
            .config(cfg.clone())
            .handler("ordered", flaky_recorder(seen.clone()))
            .build()
            .unwrap()
    };
    build().start().await.unwrap().shutdown().await;
    publish_keyed(&client, &format!("{prefix}.ex"), keys, events).await;
    let total = (keys * events) as usize;
    let started = Instant::now();
    let h = build().start().await.unwrap();
    let done = eventually(Duration::from_secs(180), || async { seen.total() >= total }).await;
    let rate = seen.total() as f64 / started.elapsed().as_secs_f64();
    // Nothing more comes (a duplicate would show as a repeat).
    assert!(
        h.wait_ready(Duration::from_secs(5)).await,
        "the stage is still up"
    );
    if let Err(e) = pipeline_idle(&client, h.metrics(), &cfg, Duration::from_secs(30)).await {
        panic!("not idle: {e}");
    }
    h.shutdown().await;
    assert!(done, "handled {} of {total}", seen.total());
    (seen, rate)
}

/// Acceptance 1 of #26: 100 keys × 200 events, concurrency 16, random 0–5 ms
/// of work and 5% transient failures: every key's events are handled in
/// publish order, each once; the throughput against the same stage at
/// concurrency 1 is printed (a figure, not an assertion).
#[actix_rt::test]
async fn every_key_is_handled_in_publish_order_at_concurrency_16() {
    let (seen, rate) = run("order-at-scale", 100, 200, 16, true).await;
    let bad = seen.out_of_order(200);
    assert!(
        bad.is_empty(),
        "{} keys out of order, e.g. {:?}",
        bad.len(),
        bad.first()
    );
    let (seen1, rate1) = run("order-at-one", 20, 50, 1, true).await;
    assert!(seen1.out_of_order(50).is_empty());
    println!(
        "ordered stage: {rate:.0} msg/s at concurrency 16 vs {rate1:.0} msg/s at concurrency 1: {:.1}x",
        rate / rate1
    );
}

/// The test above can fail: the same run without `order_by` (retries go
/// through the broker's tiers, handlers run in any order) inverts keys.
#[actix_rt::test]
async fn without_lanes_the_same_run_inverts_keys() {
    let (seen, _) = run("order-off", 50, 40, 16, false).await;
    assert!(
        !seen.out_of_order(40).is_empty(),
        "no inversion without order_by: the ordering test could not fail"
    );
}

/// Starts one ordered stage `s1` with `handler` (and the key function
/// `tenant`, which reads the `entity` header).
async fn start_ordered(cfg: &Config, handler: impl flowgate::Handler) -> flowgate::EngineHandle {
    let h = Engine::builder()
        .config(cfg.clone())
        .handler("ordered", handler)
        .order_key("tenant", |d: &Delivery| {
            d.header(KEY).and_then(flowgate::envelope::header_string)
        })
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    assert!(h.wait_ready(Duration::from_secs(20)).await);
    h
}

/// Publishes `key:seq` with the key in the `entity` header (none: no header).
async fn publish_one(client: &Client, exchange: &str, key: Option<&str>, seq: u32) {
    let name = key.unwrap_or("none");
    let mut props = BasicProperties::default().with_message_id(format!("{name}-{seq}").into());
    if let Some(k) = key {
        props = props.with_headers(headers(&[(KEY, s(k))]));
    }
    client
        .publish_props(exchange, "in", format!("{name}:{seq}").as_bytes(), props)
        .await;
}

/// Item 2 of #26: on an ordered stage a failing event is retried in place
/// (attempts 1, 2, 3 back to back, the handler seeing each number) before
/// any later event of its key, then dead-lettered with `max-attempts` and
/// its key; the key's later events go on; no copy goes to a retry tier.
#[actix_rt::test]
async fn a_failing_event_retries_in_place_then_dead_letters_and_its_key_goes_on() {
    let prefix = unique("order-retry");
    let mut cfg = ordered_config(&prefix, 4, true);
    cfg.stages[0].retry = Some(RetryConfig {
        max_attempts: 3,
        backoff: vec![Duration::from_millis(50).into()],
    });
    let _cleanup = Cleanup::new(AMQP_URL, &cfg);
    let log: Arc<Mutex<Vec<(String, u32, u32)>>> = Arc::default();
    let seen = log.clone();
    let h = start_ordered(
        &cfg,
        handler_fn(move |d: Delivery| {
            let seen = seen.clone();
            async move {
                let (key, seq) = parse(&d);
                seen.lock().unwrap().push((key.clone(), seq, d.attempt()));
                if key == "k0" && seq == 2 {
                    return Err(HandlerError::from("always fails"));
                }
                Ok(Outcome::ack())
            }
        }),
    )
    .await;
    let client = Client::connect(AMQP_URL).await;
    let ex = format!("{prefix}.ex");
    for seq in 0..5 {
        publish_one(&client, &ex, Some("k0"), seq).await;
        publish_one(&client, &ex, Some("k1"), seq).await;
    }
    let dead = client
        .collect(&format!("{prefix}.s1.dlq"), 1, Duration::from_secs(30))
        .await;
    assert!(
        eventually(Duration::from_secs(20), || async {
            log.lock().unwrap().len() >= 12
        })
        .await
    );
    if let Err(e) = pipeline_idle(&client, h.metrics(), &cfg, Duration::from_secs(20)).await {
        panic!("not idle: {e}");
    }
    let per_key = |k: &str| -> Vec<(u32, u32)> {
        log.lock()
            .unwrap()
            .iter()
            .filter(|(key, ..)| key == k)
            .map(|(_, seq, attempt)| (*seq, *attempt))
            .collect()
    };
    assert_eq!(
        per_key("k0"),
        [(0, 1), (1, 1), (2, 1), (2, 2), (2, 3), (3, 1), (4, 1)],
        "retried in place before the key's later events"
    );
    assert_eq!(per_key("k1"), [(0, 1), (1, 1), (2, 1), (3, 1), (4, 1)]);
    assert_eq!(dead.len(), 1);
    let (id, hd) = &dead[0];
    assert_eq!(id, "k0-2");
    assert_eq!(
        header(hd, flowgate::envelope::REASON).as_deref(),
        Some(Reason::MaxAttempts.as_str())
    );
    assert_eq!(
        header(hd, flowgate::envelope::ORDER_KEY).as_deref(),
        Some("k0")
    );
    let m = h.metrics();
    assert_eq!(
        m.counter(flowgate::Metrics::RETRIED, &["s1", "in-place"]),
        2
    );
    let tier = format!("{prefix}.s1.retry.1");
    assert_eq!(client.depth(&tier).await, 0, "nothing went to a tier");
    h.shutdown().await;
}

/// `missing_key`: `reject` dead-letters a keyless delivery (`missing-key`)
/// and handles the others; `shared` handles every keyless delivery in one
/// lane, in order (here with a host key function, `order_by = "tenant"`).
#[actix_rt::test]
async fn keyless_deliveries_are_dead_lettered_or_share_one_lane() {
    for missing in ["reject", "shared"] {
        let prefix = unique(&format!("order-missing-{missing}"));
        let mut cfg = ordered_config(&prefix, 8, true);
        cfg.stages[0].order_by = Some("tenant".into());
        cfg.stages[0].missing_key = Some(if missing == "reject" {
            flowgate::config::MissingKey::Reject
        } else {
            flowgate::config::MissingKey::Shared
        });
        let _cleanup = Cleanup::new(AMQP_URL, &cfg);
        let seen = Seen::default();
        let make = || {
            let recorder = seen.clone();
            handler_fn(move |d: Delivery| {
                let seen = recorder.clone();
                async move {
                    tokio::time::sleep(Duration::from_micros(random(5000))).await;
                    let (key, seq) = parse(&d);
                    seen.record(&key, seq);
                    Ok::<_, HandlerError>(Outcome::ack())
                }
            })
        };
        // The topology first; the events wait in the queue for the stage.
        start_ordered(&cfg, make()).await.shutdown().await;
        let client = Client::connect(AMQP_URL).await;
        let ex = format!("{prefix}.ex");
        for seq in 0..30 {
            publish_one(&client, &ex, None, seq).await;
            publish_one(&client, &ex, Some("k0"), seq).await;
        }
        let h = start_ordered(&cfg, make()).await;
        let dlq = format!("{prefix}.s1.dlq");
        if missing == "reject" {
            let dead = client.collect(&dlq, 30, Duration::from_secs(30)).await;
            assert_eq!(dead.len(), 30);
            for (id, hd) in &dead {
                assert!(id.starts_with("none-"), "{id}");
                assert_eq!(
                    header(hd, flowgate::envelope::REASON).as_deref(),
                    Some(Reason::MissingKey.as_str())
                );
            }
            assert!(eventually(Duration::from_secs(20), || async { seen.total() >= 30 }).await);
        } else {
            assert!(eventually(Duration::from_secs(20), || async { seen.total() >= 60 }).await);
        }
        if let Err(e) = pipeline_idle(&client, h.metrics(), &cfg, Duration::from_secs(20)).await {
            panic!("not idle: {e}");
        }
        assert!(seen.out_of_order(30).is_empty(), "{missing}");
        let keys: Vec<String> = seen.0.lock().unwrap().keys().cloned().collect();
        let want: &[&str] = if missing == "reject" {
            &["k0"]
        } else {
            &["k0", "none"]
        };
        let mut keys = keys;
        keys.sort();
        assert_eq!(keys, want, "{missing}");
        assert_eq!(client.depth(&dlq).await, 0);
        h.shutdown().await;
    }
}

/// Credit stays the prefetch: with one key and a handler that waits, the
/// stage holds exactly `prefetch` deliveries (one handled, the others queued
/// behind it, each holding its credit) and the rest stay in the broker;
/// released, all are handled in order.
#[actix_rt::test]
async fn deliveries_waiting_behind_their_key_hold_their_credit_and_no_more() {
    let prefix = unique("order-credit");
    let mut cfg = ordered_config(&prefix, 8, true);
    cfg.stages[0].prefetch = 10;
    let _cleanup = Cleanup::new(AMQP_URL, &cfg);
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let seen = Seen::default();
    let (g, recorder) = (gate.clone(), seen.clone());
    let h = start_ordered(
        &cfg,
        handler_fn(move |d: Delivery| {
            let (gate, seen) = (g.clone(), recorder.clone());
            async move {
                let _pass = gate.acquire().await;
                let (key, seq) = parse(&d);
                seen.record(&key, seq);
                Ok::<_, HandlerError>(Outcome::ack())
            }
        }),
    )
    .await;
    let client = Client::connect(AMQP_URL).await;
    publish_keyed(&client, &format!("{prefix}.ex"), 1, 50).await;
    let m = h.metrics();
    assert!(
        eventually(Duration::from_secs(20), || async {
            m.gauge(flowgate::Metrics::IN_FLIGHT, &["s1"]) == 10
                && m.counter(flowgate::Metrics::LANE_WAITS, &["s1"]) == 9
        })
        .await,
        "in flight {}, lane waits {}",
        m.gauge(flowgate::Metrics::IN_FLIGHT, &["s1"]),
        m.counter(flowgate::Metrics::LANE_WAITS, &["s1"])
    );
    let (ready, _) = client.queue_stat(&format!("{prefix}.s1")).await;
    assert_eq!(ready, 40, "the rest waits in the broker");
    assert_eq!(
        m.gauge(flowgate::Metrics::IN_FLIGHT, &["s1"]),
        10,
        "never more than the prefetch"
    );
    gate.add_permits(1000);
    assert!(eventually(Duration::from_secs(30), || async { seen.total() >= 50 }).await);
    assert!(seen.out_of_order(50).is_empty());
    h.shutdown().await;
}

/// The broker's view of `queue`'s consumers: (consumer tag, active) each.
async fn broker_consumers(queue: &str) -> Vec<(String, bool)> {
    let rows = tokio::task::spawn_blocking(|| {
        common::node::list_consumers(&["queue_name", "consumer_tag", "active"])
    })
    .await
    .expect("list_consumers task")
    .expect("rabbitmqctl list_consumers");
    rows.into_iter()
        .filter(|r| r.first().map(String::as_str) == Some(queue))
        .map(|r| {
            (
                r.get(1).cloned().unwrap_or_default(),
                r.get(2).map(String::as_str) == Some("true"),
            )
        })
        .collect()
}

/// What `/readyz` says of stage `s1`'s consumer (`active`, `standby`).
async fn consumer_role(d: &common::daemon::Daemon) -> Option<String> {
    let answer = d.http_get("/readyz").await?;
    if !answer.starts_with("HTTP/1.1 200") && !answer.starts_with("HTTP/1.0 200") {
        return Some("not ready".into());
    }
    let body = answer.split("\r\n\r\n").nth(1)?;
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    v["stages"][0]["consumer"].as_str().map(str::to_owned)
}

/// Acceptance 3 of #26: two daemons on one `single_active_consumer` queue;
/// the broker shows one active consumer and `/readyz` shows which (both
/// ready); `kill -9` of the active one mid-run → the other takes over, and
/// every key's events are handled in publish order across the takeover (the
/// survivor may repeat a suffix the dead one had not acked; nothing lost).
#[actix_rt::test]
async fn a_standby_daemon_takes_over_a_single_active_consumer_queue_in_order() {
    const KEYS: u32 = 20;
    const EVENTS: u32 = 100;
    let prefix = unique("order-sac");
    let dir = tempfile::tempdir().unwrap();
    let toml = |record: &std::path::Path| {
        format!(
            r#"
[amqp]
url = "{AMQP_URL}"
connection_name = "{prefix}"
[shutdown]
grace = "5s"
[[exchanges]]
name = "{prefix}.ex"
[[queues]]
name = "{prefix}.s1"
bindings = [{{ exchange = "{prefix}.ex", routing_key = "in" }}]
single_active_consumer = true
[[stages]]
name = "s1"
queue = "{prefix}.s1"
handler = "record"
record_file = "{}"
delay = "20ms"
prefetch = 40
concurrency = 8
order_by = "header:{KEY}"
"#,
            record.display()
        )
    };
    let cfg = Config::from_toml(&toml(&dir.path().join("x"))).unwrap();
    let _cleanup = Cleanup::new(AMQP_URL, &cfg);
    let exe: &std::path::Path = env!("CARGO_BIN_EXE_flowgate").as_ref();
    let records = [dir.path().join("a.rec"), dir.path().join("b.rec")];
    let mut daemons = vec![
        common::daemon::Daemon::start(exe, dir.path(), "a", &toml(&records[0])),
        common::daemon::Daemon::start(exe, dir.path(), "b", &toml(&records[1])),
    ];
    for d in &daemons {
        assert!(
            eventually(Duration::from_secs(30), || d.ready()).await,
            "{}",
            d.log()
        );
    }
    let queue = format!("{prefix}.s1");
    assert!(
        eventually(Duration::from_secs(10), || async {
            broker_consumers(&queue).await.len() == 2
        })
        .await
    );
    let client = Client::connect(AMQP_URL).await;
    publish_keyed(&client, &format!("{prefix}.ex"), KEYS, EVENTS).await;
    let count = |i: usize| recorded(&records[i]).values().map(Vec::len).sum::<usize>();
    assert!(
        eventually(Duration::from_secs(30), || async {
            count(0) + count(1) >= 200
        })
        .await,
        "nothing handled"
    );
    // One consumer is active at the broker; the daemons agree on which.
    let consumers = broker_consumers(&queue).await;
    assert_eq!(
        consumers.iter().filter(|(_, active)| *active).count(),
        1,
        "{consumers:?}"
    );
    let active = if count(0) > 0 { 0 } else { 1 };
    assert_eq!(count(1 - active), 0, "the standby handled nothing");
    assert_eq!(
        consumer_role(&daemons[active]).await.as_deref(),
        Some("active")
    );
    assert_eq!(
        consumer_role(&daemons[1 - active]).await.as_deref(),
        Some("standby"),
        "a standby is ready and says so"
    );
    // Mid-run: kill -9 the active one.
    assert!(count(active) < (KEYS * EVENTS) as usize, "killed mid-run");
    daemons[active].kill9();
    let survivor = &daemons[1 - active];
    assert!(
        eventually(Duration::from_secs(120), || async {
            let (a, b) = (recorded(&records[0]), recorded(&records[1]));
            (0..KEYS).all(|k| {
                let k = format!("k{k}");
                let last =
                    |m: &HashMap<String, Vec<u32>>| m.get(&k).and_then(|v| v.last().copied());
                last(&a) == Some(EVENTS - 1) || last(&b) == Some(EVENTS - 1)
            })
        })
        .await,
        "the survivor did not finish: {}",
        survivor.log()
    );
    assert_eq!(consumer_role(survivor).await.as_deref(), Some("active"));
    let consumers = broker_consumers(&queue).await;
    assert_eq!(consumers.len(), 1, "{consumers:?}");
    assert!(consumers[0].1, "the survivor's consumer is active");
    // Per key: the dead one's events 0..n, then the survivor's from some
    // s <= n (a repeated suffix) to the end, each run consecutive.
    let (first, second) = (recorded(&records[active]), recorded(&records[1 - active]));
    for k in 0..KEYS {
        let k = format!("k{k}");
        let a = first.get(&k).cloned().unwrap_or_default();
        let b = second.get(&k).cloned().unwrap_or_default();
        let consecutive = |v: &[u32]| v.windows(2).all(|w| w[1] == w[0] + 1);
        assert!(a.is_empty() || a[0] == 0, "{k}: {a:?}");
        assert!(consecutive(&a), "{k} before the kill: {a:?}");
        assert!(consecutive(&b), "{k} after the kill: {b:?}");
        let resumed = b.first().copied().unwrap_or(a.len() as u32);
        assert!(
            resumed <= a.len() as u32,
            "{k}: the survivor skipped from {} to {resumed}",
            a.len()
        );
        let last = b.last().or(a.last()).copied();
        assert_eq!(last, Some(EVENTS - 1), "{k}: not all handled");
    }
}

/// [`in_order_with_repeats`] for every key `k0..k<keys-1>`.
fn assert_in_order_with_repeats(seen: &HashMap<String, Vec<u32>>, keys: u32, events: u32) {
    for k in 0..keys {
        let k = format!("k{k}");
        in_order_with_repeats(&k, seen.get(&k).map_or(&[], Vec::as_slice), events);
    }
}

/// What befalls the engine's broker mid-run in [`order_holds_across`].
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// The broker closes the engine's connections.
    ConnectionClose,
    /// The whole node stops (its process exits) and starts again.
    NodeRestart,
}

/// Acceptance 2 of #26 (a connection close): the broker closes the engine's
/// connections mid-run (a private node); lapin recovers; per key the handled
/// sequence is the published one with at most a repeated suffix, nothing
/// lost.
#[actix_rt::test]
async fn order_holds_across_a_forced_connection_close() {
    order_holds_across(Fault::ConnectionClose).await;
}

/// Item 5 of #26 (a broker restart): the private node stops and starts
/// again mid-run, for longer than the engine's recovery deadline; the
/// engine connects anew (lapin's recovery of the old connection gave up:
/// had it come back later, its consumer would have held deliveries while
/// the new one handled later ones — inversions) and the durable queue's
/// persistent events are redelivered; per key the handled sequence is the
/// published one with at most a repeated suffix, nothing lost.
#[actix_rt::test]
async fn order_holds_across_a_broker_restart() {
    order_holds_across(Fault::NodeRestart).await;
}

async fn order_holds_across(fault: Fault) {
    // Fewer keys than workers: without lanes a key's events would overlap.
    const KEYS: u32 = 4;
    const EVENTS: u32 = 1000;
    let node = common::node::BrokerNode::start_async()
        .await
        .expect("private broker node");
    let prefix = unique("order-fault");
    let mut cfg = ordered_config(&prefix, 8, true);
    cfg.amqp.url = node.amqp_url();
    // A node restart outlasts the engine's recovery deadline: the engine
    // replaces its connections, and lapin's recovery of the old ones must
    // not bring them back (consumers nobody reads would hold deliveries
    // while the new consumer handles later ones).
    cfg.supervisor.backoff_max = Duration::from_secs(2);
    let _cleanup = Cleanup::new(&node.amqp_url(), &cfg);
    let seen = Seen::default();
    let recorder = seen.clone();
    // While the fault is being brought about (rabbitmqctl can take seconds
    // on a loaded machine) every handler waits at a gate: the fault lands
    // mid-run whatever the machine's speed, with handlers in flight.
    let (gate, gated) = tokio::sync::watch::channel(true);
    let h = start_ordered(
        &cfg,
        handler_fn(move |d: Delivery| {
            let seen = recorder.clone();
            let mut gated = gated.clone();
            async move {
                tokio::time::sleep(Duration::from_micros(10_000 + random(5000))).await;
                let _ = gated.wait_for(|open| *open).await;
                let (key, seq) = parse(&d);
                seen.record(&key, seq);
                Ok::<_, HandlerError>(Outcome::ack())
            }
        }),
    )
    .await;
    let client = Client::connect(&node.amqp_url()).await;
    publish_keyed(&client, &format!("{prefix}.ex"), KEYS, EVENTS).await;
    let total = (KEYS * EVENTS) as usize;
    assert!(
        eventually(Duration::from_secs(60), || async {
            seen.total() > total / 5
        })
        .await
    );
    gate.send_replace(false);
    match fault {
        Fault::ConnectionClose => {
            let name = prefix.clone();
            let closed = node
                .blocking(move |n| n.close_connection_named(&name))
                .await
                .expect("close_connection");
            assert!(closed >= 1, "closed the engine's connections");
        }
        Fault::NodeRestart => node
            .blocking(|n| n.stop_node().and_then(|()| n.start_node()))
            .await
            .expect("node restart"),
    }
    assert!(seen.total() < total, "{fault:?} mid-run");
    // The publishing client's connection went with the node.
    let client = match fault {
        Fault::ConnectionClose => client,
        Fault::NodeRestart => Client::connect(&node.amqp_url()).await,
    };
    // The engine consumes again: the lost channel's deliveries, held in
    // their lanes at the gate, can no longer be acked (lapin poisoned their
    // ackers before it recovered).
    let queue = format!("{prefix}.s1");
    assert!(
        eventually(Duration::from_secs(60), || async {
            client.queue_stat(&queue).await.1 >= 1
        })
        .await,
        "{fault:?}: the engine consumes again"
    );
    gate.send_replace(true);
    let done = || async {
        let all = seen.0.lock().unwrap().clone();
        (0..KEYS).all(|k| {
            all.get(&format!("k{k}"))
                .and_then(|v| v.iter().max().copied())
                == Some(EVENTS - 1)
        })
    };
    assert!(
        eventually(Duration::from_secs(120), done).await,
        "{fault:?}: not every key finished"
    );
    if let Err(e) = pipeline_idle(&client, h.metrics(), &cfg, Duration::from_secs(60)).await {
        panic!("not idle: {e}");
    }
    let all = seen.0.lock().unwrap().clone();
    assert_in_order_with_repeats(&all, KEYS, EVENTS);
    // Repeated: only the delivery each lane had in its handler at the fault
    // (one per key). What was handled before the gate closed was acked
    // long before the fault (a batch waits `ack_batch.flush`, 5 ms); the
    // rest of the lost channel's deliveries, waiting in their lanes, are
    // dropped unhandled the moment lapin poisons their ackers and are
    // redelivered in order, not handled ahead of their copies.
    let repeats = seen.total() - total;
    eprintln!("{fault:?}: {repeats} repeats of {total} events");
    let bound = KEYS as usize;
    assert!(
        repeats <= bound,
        "{fault:?}: {repeats} repeats (bound {bound})"
    );
    h.shutdown().await;
}

/// Acceptance 2 of #26 (kill -9): the daemon is killed mid-run and started
/// again; per key the recorded sequence is the published one with at most a
/// repeated suffix, nothing lost.
#[actix_rt::test]
async fn order_holds_across_a_kill_9_of_the_daemon() {
    const KEYS: u32 = 20;
    const EVENTS: u32 = 100;
    let prefix = unique("order-kill");
    let dir = tempfile::tempdir().unwrap();
    let record = dir.path().join("rec");
    let toml = format!(
        r#"
[amqp]
url = "{AMQP_URL}"
connection_name = "{prefix}"
[shutdown]
grace = "5s"
[[exchanges]]
name = "{prefix}.ex"
[[queues]]
name = "{prefix}.s1"
bindings = [{{ exchange = "{prefix}.ex", routing_key = "in" }}]
[[stages]]
name = "s1"
queue = "{prefix}.s1"
handler = "record"
record_file = "{}"
delay = "10ms"
prefetch = 40
concurrency = 8
order_by = "header:{KEY}"
"#,
        record.display()
    );
    let cfg = Config::from_toml(&toml).unwrap();
    let _cleanup = Cleanup::new(AMQP_URL, &cfg);
    let exe: &std::path::Path = env!("CARGO_BIN_EXE_flowgate").as_ref();
    let mut d = common::daemon::Daemon::start(exe, dir.path(), "d", &toml);
    assert!(
        eventually(Duration::from_secs(30), || d.ready()).await,
        "{}",
        d.log()
    );
    let client = Client::connect(AMQP_URL).await;
    publish_keyed(&client, &format!("{prefix}.ex"), KEYS, EVENTS).await;
    let total = (KEYS * EVENTS) as usize;
    let count = || recorded(&record).values().map(Vec::len).sum::<usize>();
    assert!(eventually(Duration::from_secs(60), || async { count() > total / 3 }).await);
    d.kill9();
    assert!(count() < total, "killed mid-run");
    d.restart();
    let done = || async {
        let all = recorded(&record);
        (0..KEYS).all(|k| {
            all.get(&format!("k{k}"))
                .and_then(|v| v.iter().max().copied())
                == Some(EVENTS - 1)
        })
    };
    assert!(
        eventually(Duration::from_secs(120), done).await,
        "{}",
        d.log()
    );
    assert_in_order_with_repeats(&recorded(&record), KEYS, EVENTS);
    eprintln!("kill -9: {} handlings for {total} events", count());
}

/// A drain gives a delivery waiting to retry in place back to the queue at
/// once, with the deliveries queued behind it in its lane, unhandled and in
/// order: the next run handles the key from that delivery on, in order.
/// They are back in the queue while the drain still waits for another
/// key's handler — given back by the engine, not left for the channel's
/// close at the end of the drain to return.
#[actix_rt::test]
async fn a_drain_gives_back_a_waiting_retry_and_the_rest_of_its_lane_in_order() {
    let prefix = unique("order-drain");
    let mut cfg = ordered_config(&prefix, 4, true);
    cfg.stages[0].retry = Some(RetryConfig {
        max_attempts: 3,
        backoff: vec![Duration::from_secs(600).into()],
    });
    cfg.shutdown.grace = Duration::from_secs(60);
    let _cleanup = Cleanup::new(AMQP_URL, &cfg);
    let first_run: Arc<Mutex<Vec<(u32, u32)>>> = Arc::default();
    let seen = first_run.clone();
    // Key k1's handler holds the drain open until the test lets it go.
    let (release, held) = tokio::sync::watch::channel(false);
    let h = start_ordered(
        &cfg,
        handler_fn(move |d: Delivery| {
            let seen = seen.clone();
            let mut held = held.clone();
            async move {
                let (key, seq) = parse(&d);
                if key == "k1" {
                    let _ = held.wait_for(|go| *go).await;
                    return Ok(Outcome::ack());
                }
                seen.lock().unwrap().push((seq, d.attempt()));
                if seq == 0 {
                    return Err(HandlerError::from("fails until the restart"));
                }
                Ok(Outcome::ack())
            }
        }),
    )
    .await;
    let client = Client::connect(AMQP_URL).await;
    let ex = format!("{prefix}.ex");
    for seq in 0..5 {
        publish_one(&client, &ex, Some("k0"), seq).await;
    }
    publish_one(&client, &ex, Some("k1"), 0).await;
    let m = h.metrics();
    assert!(
        eventually(Duration::from_secs(20), || async {
            m.gauge(flowgate::Metrics::IN_FLIGHT, &["s1"]) == 6
                && m.counter(flowgate::Metrics::RETRIED, &["s1", "in-place"]) == 1
        })
        .await,
        "event 0 waits to retry, 1..4 wait behind it, k1 is being handled"
    );
    // The drain does not wait out the ten-minute retry: k0's five are given
    // back at once, while the drain still waits for k1.
    let shutdown = actix_rt::spawn(async move { h.shutdown().await });
    let queue = format!("{prefix}.s1");
    assert!(
        eventually(Duration::from_secs(10), || async {
            client.queue_stat(&queue).await.0 == 5
        })
        .await,
        "k0's five are back in the queue during the drain: {:?}",
        client.queue_stat(&queue).await
    );
    release.send_replace(true);
    let report = shutdown.await.expect("shutdown task");
    assert!(report.clean, "{report:?}");
    assert_eq!(
        *first_run.lock().unwrap(),
        [(0, 1)],
        "only event 0's first attempt ran"
    );
    assert_eq!(
        client.queue_stat(&queue).await.0,
        5,
        "k0's five are in the queue after the drain (k1 acked)"
    );
    let seen = Seen::default();
    let recorder = seen.clone();
    let h = start_ordered(
        &cfg,
        handler_fn(move |d: Delivery| {
            let seen = recorder.clone();
            async move {
                let (key, seq) = parse(&d);
                seen.record(&key, seq);
                Ok::<_, HandlerError>(Outcome::ack())
            }
        }),
    )
    .await;
    assert!(eventually(Duration::from_secs(20), || async { seen.total() >= 5 }).await);
    assert!(
        seen.out_of_order(5).is_empty(),
        "{:?}",
        seen.0.lock().unwrap()
    );
    h.shutdown().await;
}
