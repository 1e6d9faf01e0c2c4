//! A deadline on every ingress answer (issue 10, acceptance 6), on a
//! private broker node: with a memory alarm raised while 20 clients POST
//! concurrently, every POST is answered within `publish_timeout` + 1 s —
//! 202 `spooled` with a spool, 503 with `Retry-After` without —, every
//! 202'd message arrives once the alarm clears, and a client retrying with
//! the same `Idempotency-Key` produces one message downstream of a dedup
//! stage.

mod ingress_support;

use flowgate::config::DedupMode;
use flowgate::Engine;
use flowgate_testkit::node::BrokerNode;
use flowgate_testkit::*;
use ingress_support::*;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

const PUBLISH_TIMEOUT: Duration = Duration::from_secs(2);
const CLIENTS: usize = 20;

/// `ingress → s1 (forward, memory dedup) → sink` on the private node.
fn config(url: &str, prefix: &str, spool: Option<std::path::PathBuf>) -> flowgate::Config {
    let mut cfg = with_open_ingress(chain_config(prefix, &["forward"], 10), prefix);
    cfg.amqp.url = url.to_owned();
    cfg.stages[0].dedup = DedupMode::Memory;
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

#[actix_rt::test]
async fn every_post_is_answered_within_the_deadline_under_a_memory_alarm() {
    let node = BrokerNode::start_async()
        .await
        .expect("private broker node");
    let url = node.amqp_url();
    let dir = tempfile::tempdir().unwrap();

    // With a spool: 202 `spooled` in time, everything arrives later, once.
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
    assert_eq!(
        post(addr, &ex, "in", &[("idempotency-key", "before")])
            .await
            .status,
        202
    );

    node.blocking(|n| n.set_memory_alarm(true))
        .await
        .expect("alarm on");
    let answers = concurrent_posts(addr, &ex, "k").await;
    assert_answered_in_time(&answers);
    let accepted: Vec<String> = answers
        .iter()
        .filter(|(_, a, _)| a.status == 202)
        .map(|(k, _, _)| k.clone())
        .collect();
    for (key, a, _) in &answers {
        assert!(
            a.status == 202 && a.json()["status"] == "spooled",
            "{key}: with a spool a late confirm is spooled: {a:?}"
        );
    }
    // A client retrying the first key (it could not know) gets the same id.
    let again = post(addr, &ex, "in", &[("idempotency-key", "k0")]).await;
    assert_eq!(again.status, 202, "{again:?}");
    assert_eq!(again.json()["message_id"], "k0");
    node.blocking(|n| n.set_memory_alarm(false))
        .await
        .expect("alarm off");

    let client = Client::connect(&url).await;
    let sink = format!("{prefix}.sink");
    let mut got: HashMap<String, usize> = client
        .collect_distinct(&sink, accepted.len() + 1, Duration::from_secs(60))
        .await;
    // Whatever else is still on its way (the spool's replay, the broker's
    // own copy of a publish that was in flight) passes the dedup stage.
    assert!(
        eventually(Duration::from_secs(30), || async { h.spooled() == 0 }).await,
        "the spool drained"
    );
    assert!(
        wait_settled(&h, "s1").await,
        "the dedup stage finished its input"
    );
    for (id, n) in client
        .collect_distinct(&sink, 1, Duration::from_millis(500))
        .await
    {
        *got.entry(id).or_default() += n;
    }
    for key in accepted.iter().chain(["before".to_owned()].iter()) {
        assert_eq!(got.get(key), Some(&1), "{key} arrived once: {got:?}");
    }
    assert_eq!(got.len(), CLIENTS + 1, "nothing else: {got:?}");
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
