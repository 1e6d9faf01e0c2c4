//! A deadline on every ingress answer (issue 10, acceptance 6), on a
//! private broker node: with a memory alarm raised while 20 clients POST
//! concurrently, every POST is answered within `publish_timeout` + 1 s —
//! 202 `spooled` with a spool, 503 with `Retry-After` without —, every
//! 202'd message arrives once the alarm clears, and a client retrying with
//! the same `Idempotency-Key` produces one message downstream of a dedup
//! stage.
//!
//! And no duplicate from the deadline (issue 23, item 6): a publish the
//! broker has read (or lapin has buffered) when the deadline passes gets a
//! spooled copy so the client can be answered, but the copy is held until
//! the broker answers the publish, and deleted when it confirms: with the
//! alarm raised in the middle of continuous POSTs, and with the broker's
//! confirms held past the deadline by a proxy, each accepted message
//! arrives exactly once at a stage without dedup.

mod ingress_support;

use flowgate::config::DedupMode;
use flowgate::Engine;
use flowgate_testkit::node::BrokerNode;
use flowgate_testkit::*;
use ingress_support::*;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

const PUBLISH_TIMEOUT: Duration = Duration::from_secs(2);
const CLIENTS: usize = 20;

/// `ingress → s1 (forward) → sink` on the broker at `url`; `s1`
/// deduplicates only without a spool (where clients retry with their key).
fn config(url: &str, prefix: &str, spool: Option<std::path::PathBuf>) -> flowgate::Config {
    let mut cfg = with_open_ingress(chain_config(prefix, &["forward"], 10), prefix);
    cfg.amqp.url = url.to_owned();
    if spool.is_none() {
        cfg.stages[0].dedup = DedupMode::Memory;
    }
    cfg.ingress.publish_timeout = PUBLISH_TIMEOUT;
    // Longer than the run under the alarm: the deadline, not the breaker,
    // answers the clients.
    cfg.publisher.breaker.blocked_timeout = Duration::from_secs(60);
    cfg.publisher.breaker.reset = Duration::from_millis(500);
    cfg.spool.path = spool;
    cfg
}

/// `CLIENTS` concurrent POSTs with keys `<tag><i>`: (key, answer, time taken).
async fn concurrent_posts(
    addr: SocketAddr,
    ex: &str,
    tag: &str,
) -> Vec<(String, Answer, Duration)> {
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let (ex, key) = (ex.to_owned(), format!("{tag}{i}"));
            actix_rt::spawn(async move {
                let t = Instant::now();
                // Far past the bound: a client that gets no answer fails
                // the test instead of hanging it.
                let a = tokio::time::timeout(
                    PUBLISH_TIMEOUT + Duration::from_secs(10),
                    post(addr, &ex, "in", &[("idempotency-key", &key)]),
                )
                .await
                .unwrap_or_else(|_| parse(b""));
                (key, a, t.elapsed())
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("client task"));
    }
    out
}

fn assert_answered_in_time(answers: &[(String, Answer, Duration)]) {
    let bound = PUBLISH_TIMEOUT + Duration::from_secs(1);
    let slowest = answers.iter().map(|(_, _, d)| *d).max().unwrap_or_default();
    println!("slowest answer under the alarm: {slowest:?} (bound {bound:?})");
    for (key, a, took) in answers {
        assert!(a.status != 0, "{key}: no answer");
        assert!(*took <= bound, "{key} answered after {took:?}: {a:?}");
    }
}

/// Every POST answered by a client looping until `stop`: (key, answer, time taken).
async fn posting_until(
    addr: SocketAddr,
    ex: String,
    client: usize,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Vec<(String, Answer, Duration)> {
    let mut out = Vec::new();
    for n in 0.. {
        if *stop.borrow() {
            break;
        }
        let key = format!("c{client}-{n}");
        let t = Instant::now();
        let a = tokio::time::timeout(
            PUBLISH_TIMEOUT + Duration::from_secs(10),
            post(addr, &ex, "in", &[("idempotency-key", &key)]),
        )
        .await
        .unwrap_or_else(|_| parse(b""));
        out.push((key, a, t.elapsed()));
    }
    out
}

#[actix_rt::test]
async fn every_post_is_answered_within_the_deadline_under_a_memory_alarm() {
    let node = BrokerNode::start_async()
        .await
        .expect("private broker node");
    let url = node.amqp_url();
    let dir = tempfile::tempdir().unwrap();

    // With a spool: 20 clients POST without pause; the alarm is raised in
    // the middle of it (publishes on the wire), held, and cleared. Every
    // answer in time, 202 `spooled` while the alarm holds; every accepted
    // message arrives exactly once at a stage without dedup.
    let prefix = unique("ing-deadline");
    let cfg = config(&url, &prefix, Some(dir.path().join("spool.redb")));
    let h = Engine::builder()
        .config(cfg.clone())
        .build()
        .unwrap()
        .start()
        .await
        .expect("engine starts");
    assert!(h.wait_ready(Duration::from_secs(20)).await, "ready");
    let addr = h.ingress_addr().expect("ingress listener");
    let ex = format!("{prefix}.ex");
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| actix_rt::spawn(posting_until(addr, ex.clone(), i, stopped.clone())))
        .collect();
    // Traffic first, so that publishes are in flight when the alarm hits.
    assert!(
        eventually(Duration::from_secs(20), || async {
            h.metrics().counter(flowgate::Metrics::ACKED, &["s1"]) >= 200
        })
        .await,
        "traffic flows before the alarm"
    );
    node.blocking(|n| n.set_memory_alarm(true))
        .await
        .expect("alarm on");
    // Long enough for every client to meet the deadline at least once.
    assert!(
        eventually(PUBLISH_TIMEOUT * 4, || async {
            h.metrics()
                .counter(flowgate::Metrics::PUBLISH, &["spooled"])
                >= CLIENTS as u64
        })
        .await,
        "clients are answered from the spool under the alarm"
    );
    node.blocking(|n| n.set_memory_alarm(false))
        .await
        .expect("alarm off");
    stop.send_replace(true);
    let mut answers = Vec::new();
    for c in clients {
        answers.extend(c.await.expect("client task"));
    }
    assert_answered_in_time(&answers);
    let accepted: Vec<String> = answers
        .iter()
        .filter(|(_, a, _)| a.status == 202)
        .map(|(k, _, _)| k.clone())
        .collect();
    let spooled = answers
        .iter()
        .filter(|(_, a, _)| a.status == 202 && a.json()["status"] == "spooled")
        .count();
    assert!(spooled >= CLIENTS, "answered from the spool: {spooled}");

    let client = Client::connect(&url).await;
    let sink = format!("{prefix}.sink");
    assert!(
        eventually(Duration::from_secs(60), || async { h.spooled() == 0 }).await,
        "the spool drained"
    );
    assert!(wait_settled(&h, "s1").await, "s1 finished its input");
    // Everything in the sink, duplicates included (s1 is settled and the
    // spool is empty: nothing else is on its way).
    let got = client
        .collect_all(&sink, accepted.len(), Duration::from_secs(60))
        .await;
    let superseded = h
        .metrics()
        .counter(flowgate::Metrics::SPOOL_SUPERSEDED, &[]);
    let acc = Accounting::of(&accepted, &got);
    println!(
        "{} POSTs, {} accepted ({spooled} from the spool), {superseded} spooled copies superseded by a late confirm: {acc}",
        answers.len(),
        accepted.len()
    );
    acc.assert_exactly_once();
    h.shutdown().await;
    client.delete_topology(&cfg).await;

    // Without a spool: 503 + Retry-After in time; a retry with the same key
    // after the alarm gives one message downstream.
    let prefix = unique("ing-deadline-nospool");
    let cfg = config(&url, &prefix, None);
    let h = Engine::builder()
        .config(cfg.clone())
        .build()
        .unwrap()
        .start()
        .await
        .expect("engine starts");
    assert!(h.wait_ready(Duration::from_secs(20)).await, "ready");
    let addr = h.ingress_addr().expect("ingress listener");
    let ex = format!("{prefix}.ex");
    node.blocking(|n| n.set_memory_alarm(true))
        .await
        .expect("alarm on");
    let answers = concurrent_posts(addr, &ex, "n").await;
    assert_answered_in_time(&answers);
    for (key, a, _) in &answers {
        assert_eq!(a.status, 503, "{key}: no spool: {a:?}");
        assert!(a.header("retry-after").is_some(), "{key}: {a:?}");
    }
    node.blocking(|n| n.set_memory_alarm(false))
        .await
        .expect("alarm off");
    // Every client retries with its key, as the contract says.
    let retries = concurrent_posts(addr, &ex, "n").await;
    for (key, a, _) in &retries {
        assert_eq!(a.status, 202, "{key} retried: {a:?}");
    }
    let mut got = client
        .collect_distinct(&format!("{prefix}.sink"), CLIENTS, Duration::from_secs(30))
        .await;
    assert!(
        wait_settled(&h, "s1").await,
        "the dedup stage finished its input"
    );
    for (id, n) in client
        .collect_distinct(&format!("{prefix}.sink"), 1, Duration::from_millis(500))
        .await
    {
        *got.entry(id).or_default() += n;
    }
    assert_eq!(got.len(), CLIENTS, "{got:?}");
    assert!(
        got.values().all(|n| *n == 1),
        "one message per key: {got:?}"
    );
    h.shutdown().await;
    client.delete_topology(&cfg).await;
}

/// Waits until the stage holds nothing in flight and its input is empty.
async fn wait_settled(h: &flowgate::EngineHandle, stage: &str) -> bool {
    let probe = h.stages().iter().find(|p| p.name == stage).cloned();
    let Some(probe) = probe else { return false };
    let input = format!("{}.{stage}", h.config().amqp.connection_name);
    let client = Client::connect(&h.config().amqp.url).await;
    eventually(Duration::from_secs(30), || {
        let (probe, client, input) = (probe.clone(), &client, input.clone());
        async move { probe.in_flight() == 0 && client.depth(&input).await == 0 }
    })
    .await
}

/// The broker's confirms held past the deadline by a proxy (shared broker):
/// each POST is answered `spooled`, the copies stay in the spool unreplayed
/// while the publishes they stand in for await their answer, and the late
/// confirms delete them: each message arrives once, none is replayed.
#[actix_rt::test]
async fn a_late_confirm_supersedes_the_copy_spooled_at_the_deadline() {
    const POSTS: usize = 5;
    let dir = tempfile::tempdir().unwrap();
    let proxy = proxy::Proxy::start("127.0.0.1:5672".parse().unwrap()).await;
    let prefix = unique("ing-superseded");
    let mut cfg = config(
        &proxy.amqp_url(),
        &prefix,
        Some(dir.path().join("spool.redb")),
    );
    cfg.ingress.publish_timeout = Duration::from_millis(500);
    // Far longer than the test: the held confirms are not a failure.
    cfg.publisher.confirm_timeout = Duration::from_secs(300);
    let _cleanup = Cleanup::new(AMQP_URL, &cfg);
    let h = Engine::builder()
        .config(cfg.clone())
        .build()
        .unwrap()
        .start()
        .await
        .expect("engine starts");
    assert!(h.wait_ready(Duration::from_secs(20)).await, "ready");
    let addr = h.ingress_addr().expect("ingress listener");
    let ex = format!("{prefix}.ex");
    proxy.hold_confirms();
    let posts: Vec<_> = (0..POSTS)
        .map(|i| {
            let ex = ex.clone();
            actix_rt::spawn(async move {
                let key = format!("late{i}");
                (
                    key.clone(),
                    post(addr, &ex, "in", &[("idempotency-key", &key)]).await,
                )
            })
        })
        .collect();
    let mut keys = Vec::new();
    for p in posts {
        let (key, a) = p.await.expect("client task");
        assert!(
            a.status == 202 && a.json()["status"] == "spooled",
            "{key}: answered from the spool at the deadline: {a:?}"
        );
        keys.push(key);
    }
    assert_eq!(h.spooled(), POSTS as u64, "a held copy each");
    // The broker routed every original publish: s1 forwards them (their
    // confirms are held too) to the sink.
    let client = Client::connect(AMQP_URL).await;
    let sink = format!("{prefix}.sink");
    assert!(
        eventually(Duration::from_secs(20), || async {
            client.depth(&sink).await == POSTS as u32
        })
        .await,
        "the originals went through"
    );
    // Held copies are not replayed, though the breaker is closed and the
    // spool's replay runs every 100 ms: watched for a while.
    let watch_until = tokio::time::Instant::now() + Duration::from_secs(2);
    while tokio::time::Instant::now() < watch_until {
        assert_eq!(
            h.metrics().counter(flowgate::Metrics::SPOOL_REPLAYED, &[]),
            0,
            "a held copy was replayed while its original awaited its confirm"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    proxy.pass_confirms();
    assert!(
        eventually(Duration::from_secs(20), || async { h.spooled() == 0 }).await,
        "the late confirms emptied the spool"
    );
    assert_eq!(
        h.metrics()
            .counter(flowgate::Metrics::SPOOL_SUPERSEDED, &[]),
        POSTS as u64,
        "every copy superseded"
    );
    assert_eq!(
        h.metrics().counter(flowgate::Metrics::SPOOL_REPLAYED, &[]),
        0
    );
    assert!(wait_settled(&h, "s1").await, "s1 finished its input");
    let got = client
        .collect_all(&sink, POSTS, Duration::from_secs(20))
        .await;
    Accounting::of(&keys, &got).assert_exactly_once();
    h.shutdown().await;
}
