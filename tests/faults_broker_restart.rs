//! Broker restarts mid-run (issue 10, acceptance 3): `stop_app` for 5 s
//! ten times, then three full node restarts (the node process stops and
//! starts again on the same data dir and ports), all in one run with the
//! pipeline busy. The engine reconnects by itself every time within
//! `supervisor.backoff_max` (plus one connect attempt, bounded by
//! `amqp.connect_timeout`) of the broker accepting connections again
//! (lapin's own backoff, 1 s doubling, would often take longer: the
//! engine's recovery deadline tears such a connection down and connects
//! anew), no stage or publisher restarts, exactly one consumer per stage
//! queue afterwards, every id arrives, and the default restart budget is
//! not spent (waiting for a broker that is down is not a failure).

use flowgate_testkit as common;

use common::node::BrokerNode;
use common::*;
use flowgate::{Engine, Metrics};
use std::time::{Duration, Instant};

/// Ids published at the start; more follow whenever the first stage's
/// queue runs low (see `BACKLOG`).
const N: usize = 3_000;
/// Before each fault, and again once the engine is back, the first stage's
/// queue holds at least this many (a top-up of fresh ids if not): every
/// fault lands mid-run and there is work to show the pipeline moving
/// again, however the time between faults comes out (the stage's rate
/// bucket refills during an outage; breaker resets and the broker's own
/// start-up vary the timing several-fold on a loaded machine).
const BACKLOG: u32 = 1_500;
const PREFETCH: u32 = 20;
/// The first stage's rate (messages per second): keeps the run going
/// through all thirteen faults.
const RATE: u32 = 150;
/// `supervisor.backoff_max`: shorter than lapin's backoff after a
/// 5 s outage (its attempts come 1, 2, 4, 8, 16 s after the loss).
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// `amqp.connect_timeout`. The attempt after the broker is back starts
/// within `backoff_max` and is over within this (the stages' channels and
/// consumers and this test's 20 ms polling fit in it too).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const STOP_APPS: usize = 10;
const NODE_RESTARTS: usize = 3;

/// The first moment the node accepts TCP connections on its AMQP port.
async fn accepting(node: &BrokerNode) -> Instant {
    loop {
        if tokio::net::TcpStream::connect(node.addr()).await.is_ok() {
            return Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Publishes fresh ids (recorded in `ids`) while the first stage's queue
/// holds fewer than `BACKLOG`.
async fn top_up(client: &Client, prefix: &str, ids: &mut Vec<String>) {
    if client.depth(&format!("{prefix}.s1")).await >= BACKLOG {
        return;
    }
    let more: Vec<String> = (ids.len()..ids.len() + BACKLOG as usize)
        .map(|i| format!("id-{i}"))
        .collect();
    client
        .publish_many(&format!("{prefix}.ex"), "in", &more, &[2u8; 256])
        .await;
    ids.extend(more);
}

/// The queue holds `by` more messages than now (within a minute). Queue
/// depths between faults are read over AMQP, a fresh client after each
/// fault: rabbitmqctl costs a second or two a call on this machine.
async fn grown(client: &Client, queue: &str, by: u32) -> bool {
    let from = client.depth(queue).await;
    eventually(Duration::from_secs(60), || async {
        client.depth(queue).await >= from + by
    })
    .await
}

// What it found (issue 10): lapin drops an ack whose channel it has just
// killed without ever resolving it; the stage waited for good, each fault
// leaked a credit or two, and after a few full restarts the first stage
// stopped with its consumer still registered. Settles are bounded now.
#[actix_rt::test]
async fn stop_app_and_node_restarts_are_recovered_within_backoff_max_without_loss() {
    let t0 = Instant::now();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init(); // RUST_LOG=flowgate_actors=debug shows the engine's log
    let node = BrokerNode::start_async()
        .await
        .expect("private broker node");
    let prefix = unique("fbrestart");
    let mut cfg = chain_config(&prefix, &["forward", "forward"], PREFETCH);
    cfg.amqp.url = node.amqp_url();
    cfg.amqp.connect_timeout = CONNECT_TIMEOUT;
    cfg.supervisor.backoff_max = BACKOFF_MAX;
    // The default restart budget: waiting for a broker that is down (many
    // connect attempts a minute with a 2 s cap) must not spend it.
    cfg.stages[0].rate = Some(RATE);
    let handle = Engine::builder()
        .config(cfg.clone())
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    assert!(handle.wait_ready(Duration::from_secs(20)).await);
    eprintln!("engine ready (t={:?})", t0.elapsed());
    let mut ids: Vec<String> = (0..N).map(|i| format!("id-{i}")).collect();
    {
        let client = Client::connect(&node.amqp_url()).await;
        client
            .publish_many(&format!("{prefix}.ex"), "in", &ids, &[2u8; 256])
            .await;
        let _ = client.conn.close(200, "published".into()).await;
    }
    let s1 = format!("{prefix}.s1");
    let sink = format!("{prefix}.sink");
    let mut client = Client::connect(&node.amqp_url()).await;
    assert!(grown(&client, &sink, 300).await, "the pipeline moves");

    let mut recoveries = Vec::new();
    for k in 0..STOP_APPS + NODE_RESTARTS {
        let full = k >= STOP_APPS;
        top_up(&client, &prefix, &mut ids).await;
        assert!(
            client.depth(&s1).await > 0,
            "fault {k} is not mid-run: the first stage's queue is empty"
        );
        let _ = client.conn.close(200, "fault".into()).await;
        if full {
            node.blocking(|n| n.stop_node())
                .await
                .expect("stop the node");
        } else {
            node.blocking(|n| n.stop_app()).await.expect("stop_app");
            // The outage (the fault itself, not a wait for an event).
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
        let h = handle.clone();
        let ready = actix_rt::spawn(async move {
            // The engine saw the loss; then wait for it to be back.
            while h.ready().await {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            while !h.ready().await {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Instant::now()
        });
        let n2 = node.clone();
        let back = actix_rt::spawn(async move { accepting(&n2).await });
        if full {
            node.blocking(|n| n.start_node())
                .await
                .expect("start the node");
        } else {
            node.blocking(|n| n.start_app()).await.expect("start_app");
        }
        let back = back.await.expect("accepting");
        let ready = tokio::time::timeout(Duration::from_secs(90), ready)
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "fault {k}: the engine did not reconnect within 90 s\n{}",
                    handle.metrics().render()
                )
            })
            .expect("ready");
        let took = ready.saturating_duration_since(back);
        eprintln!(
            "fault {k} ({}): ready {took:?} after the broker accepted connections (t={:?})",
            if full { "node restart" } else { "stop_app 5 s" },
            t0.elapsed()
        );
        recoveries.push((k, took));
        client = Client::connect(&node.amqp_url()).await;
        // Work for "moves again" to show on, however much the recovery took.
        top_up(&client, &prefix, &mut ids).await;
        if !grown(&client, &sink, 100).await {
            let diag = node
                .blocking(|n| {
                    let mut out = String::new();
                    for args in [
                        &["-q", "list_connections", "name", "state", "channels"][..],
                        &[
                            "-q",
                            "list_channels",
                            "connection",
                            "name",
                            "consumer_count",
                            "messages_unacknowledged",
                            "messages_unconfirmed",
                            "prefetch_count",
                            "state",
                        ][..],
                        &[
                            "-q",
                            "list_consumers",
                            "queue_name",
                            "channel_pid",
                            "consumer_tag",
                            "active",
                        ][..],
                        &[
                            "-q",
                            "list_queues",
                            "name",
                            "messages_ready",
                            "messages_unacknowledged",
                            "consumers",
                        ][..],
                    ] {
                        out.push_str(&n.ctl_ok(args).unwrap_or_else(|e| format!("{e:#}")));
                        out.push('\n');
                    }
                    out
                })
                .await;
            panic!(
                "fault {k}: the pipeline did not move again\n{diag}\n{}",
                handle.metrics().render()
            );
        }
    }
    let _ = client.conn.close(200, "faults done".into()).await;

    // The run finishes while the engine keeps running.
    // Exactly one consumer per stage queue: none left on a replaced connection.
    let client = Client::connect(&node.amqp_url()).await;
    let m = handle.metrics();
    let n = ids.len();
    let duplicates = finish_run(&client, m, &cfg, &sink, &ids, Duration::from_secs(180)).await;
    let faults = STOP_APPS + NODE_RESTARTS;
    // Per fault, each delivery in flight may be redelivered and its
    // output's confirm may be lost and the output published again.
    let windows = cfg.stages.len() * PREFETCH as usize;
    let bound = 2 * windows * faults;
    eprintln!(
        "broker restarts: {faults} faults, {n} ids, {duplicates} duplicates (bound {bound}), \
         connection restarts {}, recoveries {:?}, wall {:?}",
        m.counter(Metrics::RESTARTS, &["connection", ""]),
        recoveries
            .iter()
            .map(|(_, d)| format!("{:.2}s", d.as_secs_f64()))
            .collect::<Vec<_>>(),
        t0.elapsed()
    );
    assert!(
        duplicates <= bound,
        "{duplicates} duplicates exceed twice the in-flight windows ({windows}) per fault"
    );
    for actor in [["stage", "s1"], ["stage", "s2"], ["publisher", ""]] {
        assert_eq!(
            m.counter(Metrics::RESTARTS, &actor),
            0,
            "restarts of {actor:?}\n{}",
            m.render()
        );
    }
    assert_eq!(m.counter(Metrics::ESCALATIONS, &[]), 0, "no escalation");
    let slow: Vec<_> = recoveries
        .iter()
        .filter(|(_, d)| *d > BACKOFF_MAX + CONNECT_TIMEOUT)
        .collect();
    assert!(
        slow.is_empty(),
        "reconnected later than backoff_max ({BACKOFF_MAX:?}) + {CONNECT_TIMEOUT:?} \
         after the broker was back: {slow:?}"
    );
    assert!(handle.wait_ready(Duration::from_secs(20)).await);
    handle.shutdown().await;
}

/// While the broker is down the connection actor is busy reconnecting:
/// `wait_ready` still answers within its timeout (not ready), and the
/// engine still shuts down.
#[actix_rt::test]
async fn wait_ready_and_shutdown_keep_their_deadlines_while_the_broker_is_down() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init(); // RUST_LOG=flowgate_actors=debug shows the engine's log
    let node = BrokerNode::start_async()
        .await
        .expect("private broker node");
    let prefix = unique("fbdown");
    let mut cfg = chain_config(&prefix, &["forward"], PREFETCH);
    cfg.amqp.url = node.amqp_url();
    cfg.amqp.connect_timeout = CONNECT_TIMEOUT;
    cfg.supervisor.backoff_max = BACKOFF_MAX;
    let grace = cfg.shutdown.grace;
    let handle = Engine::builder()
        .config(cfg.clone())
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    assert!(handle.wait_ready(Duration::from_secs(20)).await);
    node.blocking(|n| n.stop_app()).await.expect("stop_app");
    // The engine notices (read without asking the connection actor).
    assert!(
        eventually(Duration::from_secs(30), || async {
            !handle.control().readiness().connected
        })
        .await,
        "the engine never noticed the broker going down"
    );
    // Past the recovery deadline, the actor is in its reconnect loop (it
    // restarts for each attempt, holding its mailbox meanwhile).
    assert!(
        eventually(Duration::from_secs(30), || async {
            handle
                .metrics()
                .counter(Metrics::RESTARTS, &["connection", ""])
                >= 2
        })
        .await,
        "the connection actor never retried"
    );
    let timeout = Duration::from_secs(2);
    let asked = Instant::now();
    let ready = tokio::time::timeout(4 * timeout, handle.wait_ready(timeout)).await;
    assert_eq!(
        ready,
        Ok(false),
        "wait_ready({timeout:?}) with the broker down: answered after {:?}",
        asked.elapsed()
    );
    // The shutdown's own bound: the grace, then closing the connections.
    let bound = grace + 2 * CONNECT_TIMEOUT + Duration::from_secs(10);
    let stopping = Instant::now();
    assert!(
        tokio::time::timeout(bound, handle.shutdown()).await.is_ok(),
        "shutdown with the broker down took more than {bound:?}"
    );
    eprintln!(
        "broker down: wait_ready answered in {:?}, shutdown took {:?}",
        asked.elapsed() - stopping.elapsed(),
        stopping.elapsed()
    );
}
