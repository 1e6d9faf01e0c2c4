//! Failure semantics, retry ladder: issue 4 acceptance 1 and 2.

use flowgate_testkit as common;

use common::*;
use flowgate::config::{Config, RetryConfig};
use flowgate::handler_fn;
use flowgate::Engine;
use flowgate::Outcome;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Tier delays of these tests: short, distinct, so the ladder is visible.
const STEP1: Duration = Duration::from_millis(200);
const STEP2: Duration = Duration::from_millis(400);
/// How early the broker may expire a tier's message (its timer's slack).
const EARLY: Duration = Duration::from_millis(20);

fn retry_config(prefix: &str, max_attempts: u32) -> Config {
    let mut cfg = chain_config(prefix, &["flaky"], 10);
    cfg.stages[0].retry = Some(RetryConfig {
        max_attempts,
        backoff: vec![STEP1.into(), STEP2.into()],
    });
    cfg
}

/// (attempt header seen, when) per handling.
type Seen = Arc<Mutex<Vec<(i64, Instant)>>>;

#[actix_rt::test]
async fn fails_twice_then_succeeds_on_attempt_3_with_ladder_gaps() {
    let prefix = unique("retry-ok");
    let cfg = retry_config(&prefix, 5);
    let seen: Seen = Arc::default();
    let s2 = seen.clone();
    let handle = Engine::builder()
        .config(cfg.clone())
        .handler(
            "flaky",
            handler_fn(move |d| {
                let seen = s2.clone();
                async move {
                    let attempt = d.header_i64("x-flowgate-attempt").unwrap_or(1);
                    let n = {
                        let mut v = seen.lock().unwrap();
                        v.push((attempt, Instant::now()));
                        v.len()
                    };
                    match n {
                        1 => Err("first failure".into()),
                        2 => Ok(Outcome::retry("second failure")),
                        _ => Ok(Outcome::ack_with(vec![d.forward(
                            &format!("{}.ex", d.queue.trim_end_matches(".s1")),
                            "hop1",
                        )])),
                    }
                }
            }),
        )
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    assert!(handle.wait_ready(Duration::from_secs(20)).await);
    let client = Client::connect(AMQP_URL).await;
    client
        .publish(&format!("{prefix}.ex"), "in", "m-1", b"payload")
        .await;
    let got = client
        .collect(&format!("{prefix}.sink"), 1, Duration::from_secs(20))
        .await;
    assert_eq!(got.len(), 1, "processed");
    // Nothing else arrives: processed exactly once.
    let extra = client
        .collect(&format!("{prefix}.sink"), 1, Duration::from_millis(1500))
        .await;
    assert!(extra.is_empty(), "no second copy: {extra:?}");
    assert_eq!(
        header(&got[0].1, "x-flowgate-attempt"),
        None,
        "the engine's attempt header does not leak into outputs"
    );
    let seen = seen.lock().unwrap().clone();
    let attempts: Vec<i64> = seen.iter().map(|(a, _)| *a).collect();
    assert_eq!(
        attempts,
        vec![1, 2, 3],
        "three handlings, numbered by the engine"
    );
    let gap1 = seen[1].1 - seen[0].1;
    let gap2 = seen[2].1 - seen[1].1;
    // The broker's TTL timer may fire a millisecond or two early; the
    // tolerance is far below the 200 ms between the tiers.
    assert!(gap1 + EARLY >= STEP1, "first wait follows tier 1: {gap1:?}");
    assert!(
        gap2 + EARLY >= STEP2,
        "second wait follows tier 2: {gap2:?}"
    );
    assert_eq!(
        handle.metrics().counter(
            flowgate::Metrics::RETRIED,
            &["s1", &format!("{prefix}.s1.retry.1")]
        ),
        1
    );
    assert_eq!(
        handle.metrics().counter(
            flowgate::Metrics::RETRIED,
            &["s1", &format!("{prefix}.s1.retry.2")]
        ),
        1
    );
    handle.shutdown().await;
    assert_eq!(client.depth(&format!("{prefix}.s1.dlq")).await, 0);
    for n in 1..=2 {
        assert_eq!(client.depth(&format!("{prefix}.s1.retry.{n}")).await, 0);
    }
    client.delete_topology(&cfg).await;
}

#[actix_rt::test]
async fn always_failing_message_reaches_the_dlq_after_max_attempts_with_every_header() {
    let prefix = unique("retry-dlq");
    let cfg = retry_config(&prefix, 3);
    let calls: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let c2 = calls.clone();
    let long_error = "x".repeat(10_000);
    let handle = Engine::builder()
        .config(cfg.clone())
        .handler(
            "flaky",
            handler_fn(move |d| {
                let calls = c2.clone();
                let err = long_error.clone();
                async move {
                    *calls
                        .lock()
                        .unwrap()
                        .entry(d.message_id().unwrap_or_default().to_owned())
                        .or_default() += 1;
                    Err(err.into())
                }
            }),
        )
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    assert!(handle.wait_ready(Duration::from_secs(20)).await);
    let client = Client::connect(AMQP_URL).await;
    client
        .publish(&format!("{prefix}.ex"), "in", "doomed", b"payload")
        .await;
    let dead = client
        .collect(&format!("{prefix}.s1.dlq"), 1, Duration::from_secs(20))
        .await;
    assert_eq!(dead.len(), 1, "dead-lettered");
    let (id, h) = &dead[0];
    assert_eq!(id, "doomed");
    assert_eq!(
        header(h, "x-flowgate-reason").as_deref(),
        Some("max-attempts")
    );
    assert_eq!(header(h, "x-flowgate-stage").as_deref(), Some("s1"));
    assert_eq!(
        h.inner()
            .get("x-flowgate-attempts")
            .and_then(flowgate::envelope::header_int),
        Some(3)
    );
    let err = header(h, "x-flowgate-error").expect("error header");
    assert!(err.starts_with("handler-error: xxx"), "{}", &err[..40]);
    assert!(
        err.len() <= flowgate::envelope::MAX_ERROR_BYTES + 4,
        "error truncated: {} bytes",
        err.len()
    );
    assert_eq!(
        header(h, "x-flowgate-original-exchange"),
        Some(format!("{prefix}.ex"))
    );
    assert_eq!(
        header(h, "x-flowgate-original-routing-key").as_deref(),
        Some("in")
    );
    for name in flowgate::envelope::DEAD_LETTER_HEADERS {
        assert!(h.inner().contains_key(name), "{name} present");
    }
    assert_eq!(
        calls.lock().unwrap().get("doomed"),
        Some(&3),
        "handled max_attempts times"
    );
    handle.shutdown().await;
    assert_eq!(client.depth(&format!("{prefix}.s1")).await, 0);
    client.delete_topology(&cfg).await;
}
