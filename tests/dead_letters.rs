//! Handler failures and panics dead-letter the message with reason headers;
//! the stage goes on with the next ones.

use flowgate_testkit as common;

use common::*;
use flowgate::envelope::Reason;
use flowgate::handler_fn;
use flowgate::Engine;
use flowgate::{Delivery, HandlerError, Outcome};
use std::collections::HashSet;
use std::time::Duration;

fn index(d: &Delivery) -> usize {
    d.message_id()
        .and_then(|id| id.strip_prefix("id-"))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

async fn run_with_middle_handler(
    tag: &str,
    handler: impl flowgate::Handler,
    bad: impl Fn(usize) -> bool,
    reason: &str,
    error_contains: &str,
) {
    // Metric labels are a closed set: a handler's own reason is `handler`.
    let label = Reason::parse(reason).map_or("handler", Reason::as_str);
    let prefix = unique(tag);
    let cfg = chain_config(&prefix, &["forward", "middle", "forward"], 20);
    let _cleanup = Cleanup::new(AMQP_URL, &cfg);
    let handle = Engine::builder()
        .config(cfg.clone())
        .handler("middle", handler)
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    assert!(handle.wait_ready(Duration::from_secs(20)).await);
    let client = Client::connect(AMQP_URL).await;
    let n = 500;
    let ids: Vec<String> = (0..n).map(|i| format!("id-{i}")).collect();
    let expect_bad: HashSet<String> = (0..n)
        .filter(|i| bad(*i))
        .map(|i| format!("id-{i}"))
        .collect();
    client
        .publish_many(&format!("{prefix}.ex"), "in", &ids, b"{}")
        .await;

    let dlq = format!("{prefix}.s2.dlq");
    let dead = client
        .collect(&dlq, expect_bad.len(), Duration::from_secs(60))
        .await;
    let good = client
        .collect(
            &format!("{prefix}.sink"),
            n - expect_bad.len(),
            Duration::from_secs(60),
        )
        .await;

    let dead_ids: HashSet<String> = dead.iter().map(|(id, _)| id.clone()).collect();
    assert_eq!(
        dead_ids, expect_bad,
        "exactly the chosen ids are dead-lettered"
    );
    for (id, h) in &dead {
        assert_eq!(
            header(h, "x-flowgate-reason").as_deref(),
            Some(reason),
            "{id}"
        );
        assert_eq!(header(h, "x-flowgate-stage").as_deref(), Some("s2"), "{id}");
        let err = header(h, "x-flowgate-error").unwrap_or_default();
        assert!(err.contains(error_contains), "{id}: error header `{err}`");
        assert_eq!(
            header(h, "x-flowgate-original-routing-key").as_deref(),
            Some("hop1")
        );
    }
    let good_ids: HashSet<String> = good.iter().map(|(id, _)| id.clone()).collect();
    assert_eq!(
        good_ids.len(),
        n - expect_bad.len(),
        "all other ids reach the sink"
    );
    assert!(good_ids.is_disjoint(&expect_bad));
    assert_eq!(
        handle
            .metrics()
            .counter(flowgate::Metrics::DEAD_LETTERED, &["s2", label]),
        expect_bad.len() as u64
    );
    handle.shutdown().await;
    for q in &cfg.queues {
        assert_drained(&client, &q.name).await;
    }
}

#[actix_rt::test]
async fn failing_handler_dead_letters_chosen_ids_with_headers() {
    let h = handler_fn(|d: Delivery| async move {
        if index(&d) % 10 == 3 {
            return Err::<Outcome, HandlerError>(format!("cannot handle {}", index(&d)).into());
        }
        Ok(Outcome::ack_with(vec![d.forward(&d.exchange, "hop2")]))
    });
    run_with_middle_handler("fail", h, |i| i % 10 == 3, "handler-error", "cannot handle").await;
}

#[actix_rt::test]
async fn panicking_handler_dead_letters_with_reason_panic_and_stage_goes_on() {
    let h = handler_fn(|d: Delivery| async move {
        if index(&d).is_multiple_of(7) {
            panic!("boom on {}", index(&d));
        }
        Ok(Outcome::ack_with(vec![d.forward(&d.exchange, "hop2")]))
    });
    run_with_middle_handler("panic", h, |i| i.is_multiple_of(7), "panic", "boom on").await;
}

#[actix_rt::test]
async fn declared_dead_letter_outcome_carries_its_reason() {
    let h = handler_fn(|d: Delivery| async move {
        if index(&d) % 4 == 1 {
            return Ok(Outcome::dead_letter("out-of-stock"));
        }
        Ok(Outcome::ack_with(vec![d.forward(&d.exchange, "hop2")]))
    });
    run_with_middle_handler(
        "declared",
        h,
        |i| i % 4 == 1,
        "out-of-stock",
        "out-of-stock",
    )
    .await;
}

/// `handler_timeout`: a handler call that never ends is cancelled after
/// the stage's bound and its delivery dead-lettered (no retry ladder) as a
/// handler error saying so; its worker and credit come back, and the
/// messages around it go through.
#[actix_rt::test]
async fn a_handler_past_its_timeout_is_cancelled_and_dead_lettered() {
    let prefix = unique("dl-timeout");
    let mut cfg = chain_config(&prefix, &["hangs"], 10);
    cfg.stages[0].handler_timeout = Some(Duration::from_millis(300));
    let _cleanup = Cleanup::new(AMQP_URL, &cfg);
    let hangs = handler_fn(|d: Delivery| async move {
        if d.message_id() == Some("stuck") {
            // Never returns: only the timeout ends this call.
            std::future::pending::<()>().await;
        }
        Ok::<_, HandlerError>(Outcome::ack_with(vec![d.forward(&d.exchange, "hop1")]))
    });
    let h = Engine::builder()
        .config(cfg.clone())
        .handler("hangs", hangs)
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    assert!(h.wait_ready(Duration::from_secs(20)).await);
    let client = Client::connect(AMQP_URL).await;
    let ex = format!("{prefix}.ex");
    client.publish(&ex, "in", "before", b"{}").await;
    client.publish(&ex, "in", "stuck", b"{}").await;
    client.publish(&ex, "in", "after", b"{}").await;
    let dead = client
        .collect(&format!("{prefix}.s1.dlq"), 1, Duration::from_secs(30))
        .await;
    assert_eq!(dead.len(), 1, "the stuck one is dead-lettered");
    let (id, headers) = &dead[0];
    assert_eq!(id, "stuck");
    assert_eq!(
        header(headers, flowgate::envelope::REASON).as_deref(),
        Some(Reason::HandlerError.as_str())
    );
    let error = header(headers, flowgate::envelope::ERROR).unwrap_or_default();
    assert!(
        error.contains("timeout") && error.contains("300ms"),
        "{error}"
    );
    let got = client
        .collect_distinct(&format!("{prefix}.sink"), 2, Duration::from_secs(20))
        .await;
    Accounting::of(["before", "after"], &got).assert_exactly_once();
    assert!(
        eventually(Duration::from_secs(10), || async {
            h.metrics().gauge(flowgate::Metrics::IN_FLIGHT, &["s1"]) == 0
        })
        .await,
        "its credit came back"
    );
    h.shutdown().await;
}
