//! Unroutable is a per-message outcome: a `basic.return` never feeds the
//! circuit breaker, and a spooled record that turns out unroutable on replay
//! is moved to the unroutable queue with reason headers — never dropped.

use flowgate_testkit as common;

use common::node::BrokerNode;
use common::*;
use flowgate::config::{Binding, QueueConfig, Target};
use flowgate::envelope::REASON;
use flowgate::Engine;
use flowgate::UNROUTABLE_QUEUE;
use flowgate::{handler_fn, Outcome, Output};
use std::collections::HashSet;
use std::time::Duration;
use tokio::sync::watch;

const N: usize = 200;

/// Ready messages in `queue`, 0 while it does not exist.
async fn depth_or_zero(client: &Client, queue: &str) -> usize {
    client
        .passive_declare(queue)
        .await
        .map_or(0, |q| q.message_count() as usize)
}

#[actix_rt::test]
async fn returns_never_open_the_breaker_and_unroutable_spooled_records_are_dead_lettered() {
    let node = BrokerNode::start_async()
        .await
        .expect("private broker node");
    let url = node.amqp_url();
    let prefix = unique("funroute");
    let ex = format!("{prefix}.ex");
    let dir = tempfile::tempdir().unwrap();
    // s1: "in" → "hop1" → sink (a good route); bad: "bad" → "nowhere" (no queue).
    let mut cfg = chain_config(&prefix, &["forward"], 20);
    cfg.amqp.url = url.clone();
    cfg.spool.path = Some(dir.path().join("spool.redb"));
    cfg.publisher.breaker.blocked_timeout = Duration::from_secs(1);
    cfg.publisher.breaker.reset = Duration::from_millis(500);
    let bad_queue = format!("{prefix}.bad");
    cfg.queues.push(QueueConfig {
        name: bad_queue.clone(),
        bindings: vec![Binding {
            exchange: ex.clone(),
            routing_key: "bad".into(),
        }],
        ..cfg.queues[0].clone()
    });
    let mut bad = cfg.stages[0].clone();
    bad.name = "bad".into();
    bad.queue = bad_queue.clone();
    bad.handler = "gated".into();
    bad.output = Some(Target {
        exchange: ex.clone(),
        routing_key: "nowhere".into(),
    });
    cfg.stages.push(bad);
    let _cleanup = Cleanup::new(&url, &cfg);

    // The bad stage's handler waits while the gate is shut.
    let (gate, gate_rx) = watch::channel(true);
    let out_ex = ex.clone();
    let gated = handler_fn(move |d: flowgate::Delivery| {
        let mut rx = gate_rx.clone();
        let ex = out_ex.clone();
        async move {
            let _ = rx.wait_for(|open| *open).await;
            let id = d.message_id().unwrap_or_default().to_owned();
            Ok(Outcome::ack_with(vec![Output::new(
                ex,
                "nowhere",
                d.body.clone(),
            )
            .with_message_id(id)]))
        }
    });
    let h = Engine::builder()
        .config(cfg.clone())
        .handler("gated", gated)
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    assert!(h.wait_ready(Duration::from_secs(20)).await);
    let m = h.metrics().clone();
    let client = Client::connect(&url).await;

    // Phase 1, breaker closed: 200 outputs come back returned while a good
    // stage runs beside them on the same publisher.
    let bad1: Vec<String> = (0..N).map(|i| format!("bad1-{i}")).collect();
    let good: Vec<String> = (0..N).map(|i| format!("good-{i}")).collect();
    client.publish_many(&ex, "bad", &bad1, b"{}").await;
    client.publish_many(&ex, "in", &good, b"{}").await;
    let dlq = format!("{bad_queue}.dlq");
    let sink = format!("{prefix}.sink");
    // A return lapin hands to another publish's confirm is moved to the
    // unroutable queue by the publisher; the rest come back to the stage.
    let dead = || async {
        depth_or_zero(&client, &dlq).await + depth_or_zero(&client, UNROUTABLE_QUEUE).await
    };
    assert!(
        eventually(Duration::from_secs(60), || async {
            dead().await == N && client.depth(&sink).await as usize == N
        })
        .await,
        "dead letters {} sink {}\n{}",
        dead().await,
        client.depth(&sink).await,
        m.render()
    );
    assert_eq!(
        m.counter(flowgate::Metrics::DEAD_LETTERED, &["s1", "unroutable"]),
        0,
        "a good output was taken for unroutable"
    );
    assert_eq!(
        m.counter(flowgate::Metrics::BREAKER_TRANSITIONS, &["open"]),
        0,
        "returns opened the breaker\n{}",
        m.render()
    );
    assert_eq!(m.counter(flowgate::Metrics::PUBLISH, &["spooled"]), 0);
    assert_eq!(m.gauge(flowgate::Metrics::SPOOL_MESSAGES, &[]), 0);
    let sunk = client.collect(&sink, N, Duration::from_secs(10)).await;
    assert_eq!(counts(sunk.into_iter().map(|(id, _)| id)).len(), N);

    // Phase 2, breaker open (memory alarm): the bad stage's outputs spool.
    gate.send_replace(false);
    let bad2: Vec<String> = (0..N).map(|i| format!("bad2-{i}")).collect();
    client.publish_many(&ex, "bad", &bad2, b"{}").await;
    node.blocking(|n| n.set_memory_alarm(true))
        .await
        .expect("alarm on");
    // The broker blocks a connection when it next publishes: this one is
    // held by the broker until the alarm clears; after it the publisher
    // knows it is blocked and the bad stage's outputs wait, then spool.
    let primer = {
        let h = h.clone();
        let out = Output::new(ex.clone(), "hop1", &b"{}"[..]).with_message_id("primer");
        actix_rt::spawn(async move { h.publish(out).await })
    };
    assert!(
        eventually(Duration::from_secs(15), || async {
            m.gauge(flowgate::Metrics::BROKER_BLOCKED, &[]) == 1
        })
        .await,
        "broker blocks publishing"
    );
    gate.send_replace(true);
    assert!(
        eventually(Duration::from_secs(60), || async {
            m.gauge(flowgate::Metrics::BREAKER_STATE, &["open"]) == 1
                && client.depth(&bad_queue).await == 0
                && h.stages().iter().all(|s| s.in_flight() == 0)
        })
        .await,
        "the bad stage handled its inputs with the breaker open\n{}",
        m.render()
    );
    let spooled = m.counter(flowgate::Metrics::PUBLISH, &["spooled"]);
    assert!(spooled > 0, "outputs were spooled\n{}", m.render());
    node.blocking(|n| n.set_memory_alarm(false))
        .await
        .expect("alarm off");
    assert!(primer.await.expect("primer task").is_ok());

    // Every phase-2 input ends dead-lettered `unroutable`: either by the
    // stage (returned live) or, spooled, by the replay.
    assert!(
        eventually(Duration::from_secs(60), || async {
            dead().await == 2 * N && m.gauge(flowgate::Metrics::SPOOL_MESSAGES, &[]) == 0
        })
        .await,
        "dead letters {} != {}; spool {}\n{}",
        dead().await,
        2 * N,
        m.gauge(flowgate::Metrics::SPOOL_MESSAGES, &[]),
        m.render()
    );
    let mut letters = client
        .collect(
            &dlq,
            depth_or_zero(&client, &dlq).await,
            Duration::from_secs(10),
        )
        .await;
    let from_spool = client
        .collect(
            UNROUTABLE_QUEUE,
            depth_or_zero(&client, UNROUTABLE_QUEUE).await,
            Duration::from_secs(10),
        )
        .await;
    assert!(
        from_spool.len() as u64 >= spooled,
        "every spooled record is in {UNROUTABLE_QUEUE}"
    );
    for (id, headers) in &from_spool {
        assert_eq!(
            header(headers, "x-flowgate-original-routing-key").as_deref(),
            Some("nowhere"),
            "{id}"
        );
    }
    letters.extend(from_spool);
    let mut ids = HashSet::new();
    for (id, headers) in &letters {
        assert_eq!(
            header(headers, REASON).as_deref(),
            Some("unroutable"),
            "{id}"
        );
        ids.insert(id.clone());
    }
    for id in bad1.iter().chain(&bad2) {
        assert!(ids.contains(id), "{id} is in no dead-letter queue");
    }
    assert_eq!(letters.len(), 2 * N, "each dead-lettered once");
    assert_eq!(
        m.counter(flowgate::Metrics::SPOOL_DROPPED, &["unroutable"]),
        0,
        "nothing dropped"
    );
    h.shutdown().await;
}

/// lapin hands a `basic.return` to whichever confirm it completes next;
/// with quorum queues confirming out of order that is often another
/// publish's. Interleaved good and unroutable publishes must each end
/// right: a good one confirmed (and delivered once), an unroutable one
/// either answered unroutable or moved to the unroutable queue.
#[actix_rt::test]
async fn returns_are_matched_to_their_own_publish() {
    let node = BrokerNode::start_async()
        .await
        .expect("private broker node");
    let url = node.amqp_url();
    let prefix = unique("freturn");
    let ex = format!("{prefix}.ex");
    let mut cfg = chain_config(&prefix, &["forward"], 20);
    cfg.amqp.url = url.clone();
    let _cleanup = Cleanup::new(&url, &cfg);
    let h = Engine::builder()
        .config(cfg.clone())
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    assert!(h.wait_ready(Duration::from_secs(20)).await);
    const M: usize = 2000;
    let limit = std::sync::Arc::new(tokio::sync::Semaphore::new(400));
    let mut tasks = Vec::new();
    for i in 0..M {
        for (key, id) in [
            ("hop1", format!("good-{i}")),
            ("nowhere", format!("bad-{i}")),
        ] {
            let h = h.clone();
            let permit = limit.clone().acquire_owned().await.unwrap();
            let out = Output::new(ex.clone(), key, &b"{}"[..]).with_message_id(id.clone());
            tasks.push(actix_rt::spawn(async move {
                let r = h.publish(out).await;
                drop(permit);
                (id, r)
            }));
        }
    }
    let mut good_ok = HashSet::new();
    let mut bad_returned = HashSet::new();
    for t in tasks {
        let (id, r) = t.await.expect("task");
        match (id.starts_with("good"), r) {
            (true, Ok(_)) => {
                good_ok.insert(id);
            }
            (true, Err(e)) => panic!("{id}: a routable publish failed: {e}"),
            (false, Err(flowgate::RuntimeError::Unroutable { .. })) => {
                bad_returned.insert(id);
            }
            (false, Ok(_)) => {} // its return went to another confirm
            (false, Err(e)) => panic!("{id}: {e}"),
        }
    }
    assert_eq!(good_ok.len(), M);
    let client = Client::connect(&url).await;
    let rescued_n = M - bad_returned.len();
    eprintln!("returns on a foreign confirm: {rescued_n} of {M}");
    assert!(
        eventually(Duration::from_secs(30), || async {
            depth_or_zero(&client, UNROUTABLE_QUEUE).await == rescued_n
        })
        .await,
        "{} in {UNROUTABLE_QUEUE}, {rescued_n} expected",
        depth_or_zero(&client, UNROUTABLE_QUEUE).await
    );
    // The publisher declares the unroutable queue on first use: a run in
    // which every return met its own confirm never made it.
    let rescued = if rescued_n == 0 {
        Vec::new()
    } else {
        client
            .collect(UNROUTABLE_QUEUE, rescued_n, Duration::from_secs(10))
            .await
    };
    for (id, _) in &rescued {
        assert!(
            id.starts_with("bad") && !bad_returned.contains(id),
            "{id} rescued but also answered unroutable, or routable"
        );
    }
    assert_eq!(
        counts(rescued.into_iter().map(|(id, _)| id)).len(),
        rescued_n
    );
    h.shutdown().await;
}
