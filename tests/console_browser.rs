//! The operator's console in a real browser (issue 28): headless Chromium
//! (Debian's `chromium` + `chromium-driver`) against a real `flowgate run`
//! daemon and the real broker. Signs in, watches a stage's rate move,
//! pauses it from the page and sees the broker's queue stop being
//! consumed, finds a dead letter by reason, opens it, replays it and sees
//! it arrive downstream; a wrong token is refused and a forged POST
//! without the CSRF token gets 403. A screenshot of each step goes to the
//! test's output directory (`target/tmp/console-browser/`, or
//! `$FLOWGATE_TEST_OUTPUT/console-browser/`); the README shows them.

mod console_support;

use console_support::webdriver::Browser;
use console_support::*;
use flowgate::lapin::options::QueueBindOptions;
use flowgate::lapin::types::FieldTable;
use flowgate::lapin::BasicProperties;
use flowgate_testkit::*;
use serde_json::json;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How long the broker side may take (generous: two shared cores).
const WAIT: Duration = Duration::from_secs(60);

/// A shop with two flows on one topic exchange, classic queues with
/// browsable (classic) DLQs:
/// * `orders` (key `order.created`) → stage `reserve` (a sink): the load
///   whose rate the page shows, and the stage paused from the page;
/// * `returns` (key `return.created`) → stage `refund` (JSON only,
///   forwards to `refund.done`): `refunds` is bound to `refund.issued`
///   only, so a refund's output is unroutable and the return is
///   dead-lettered as `unroutable` (a non-JSON return as `malformed`).
fn config(p: &str) -> String {
    format!(
        r#"
[amqp]
url = "{AMQP_URL}"
connection_name = "{p}"
[http]
bind = ""
[depth]
interval = "250ms"

[[exchanges]]
name = "{p}.shop"

[[queues]]
name = "{p}.orders"
kind = "classic"
bindings = [{{ exchange = "{p}.shop", routing_key = "order.created" }}]
watermark = {{ high = 5000, low = 1000 }}

[[queues]]
name = "{p}.returns"
kind = "classic"
bindings = [{{ exchange = "{p}.shop", routing_key = "return.created" }}]

[[queues]]
name = "{p}.refunds"
kind = "classic"
dead_letter = false
bindings = [{{ exchange = "{p}.shop", routing_key = "refund.issued" }}]

[[stages]]
name = "reserve"
queue = "{p}.orders"
handler = "sink"
prefetch = 10

[[stages]]
name = "refund"
queue = "{p}.returns"
handler = "forward"
payload = "json"
output = {{ exchange = "{p}.shop", routing_key = "refund.done" }}
"#
    )
}

#[actix_rt::test]
async fn an_operator_pauses_a_stage_and_replays_a_dead_letter_in_the_browser() {
    let p = unique("ui");
    let out = output_dir("console-browser");
    let cfg = flowgate::Config::from_toml(&config(&p)).unwrap();
    let _cleanup = Cleanup::new(AMQP_URL, &cfg);
    let daemon = start_daemon(&out, &config(&p)).await;
    let base = daemon.base.clone();
    let client = Client::connect(AMQP_URL).await;
    let shop = format!("{p}.shop");
    let orders = format!("{p}.orders");
    let returns_dlq = format!("{p}.returns.dlq");
    let refunds = format!("{p}.refunds");

    // Two failed returns: one unroutable (its refund has nowhere to go), one malformed.
    client
        .publish_props(
            &shop,
            "return.created",
            br#"{"order":"o-17","amount":"12.50"}"#,
            BasicProperties::default()
                .with_message_id("refund-17".into())
                .with_content_type("application/json".into()),
        )
        .await;
    // One at a time: lapin hands a `basic.return` to whichever confirm
    // completes next, so an unroutable output racing another publish of
    // the stage (the malformed one's dead letter) can be told apart from it
    // only as a foreign return, which the publisher moves to the unroutable
    // queue instead of the stage's DLQ (see the publisher's `settle`).
    assert!(
        eventually(WAIT, || async { client.depth(&returns_dlq).await == 1 }).await,
        "the unroutable refund dead-lettered"
    );
    client
        .publish(&shop, "return.created", "refund-18", b"not json <b>")
        .await;
    assert!(
        eventually(WAIT, || async { client.depth(&returns_dlq).await == 2 }).await,
        "two dead letters"
    );

    let b = Browser::start().await;
    let shot = |name: &str| out.join(format!("{name}.png"));

    // A wrong token is refused.
    b.goto(&format!("{base}/ui/pipeline")).await;
    b.wait_url("signed out: the pipeline leads to the login", |u| {
        u.ends_with("/ui/login")
    })
    .await;
    b.type_in("type a wrong token", "#token", "not-a-token-0123456789")
        .await;
    b.click_on("sign in with the wrong token", "#sign-in").await;
    let refused = b
        .wait_text("the wrong token is refused", "#login-error", |t| {
            !t.is_empty()
        })
        .await;
    assert!(refused.contains("not accepted"), "{refused}");
    b.screenshot(&shot("01-wrong-token")).await;
    b.goto(&format!("{base}/ui/pipeline")).await;
    b.wait_url("still signed out", |u| u.ends_with("/ui/login"))
        .await;

    // Sign in with alice's token.
    b.type_in("type alice's token", "#token", TOKEN).await;
    b.click_on("sign in", "#sign-in").await;
    let who = b
        .wait_text("signed in: the name shown", "#who", |t| !t.is_empty())
        .await;
    assert_eq!(who, "alice");

    // The rate moves while orders flow in (the live part refreshes itself):
    // orders keep coming until the page has shown a rate (bounded).
    let rate_cell = "#stages tr[data-stage=reserve] td.rate";
    let flowing = Arc::new(AtomicBool::new(true));
    let load = {
        let (shop, flowing) = (shop.clone(), flowing.clone());
        tokio::spawn(async move {
            let c = Client::connect(AMQP_URL).await;
            for round in 0..1200 {
                if !flowing.load(Ordering::Relaxed) {
                    break;
                }
                let ids: Vec<String> = (0..10).map(|i| format!("o-{round}-{i}")).collect();
                c.publish_many(&shop, "order.created", &ids, b"{}").await;
                // Paced: a steady flow, not one burst the stage drains at once.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let rate = b
        .wait_text("the stage's rate moves", rate_cell, |t| {
            t.trim_end_matches("/s")
                .parse::<f64>()
                .is_ok_and(|r| r > 0.0)
        })
        .await;
    assert!(rate.ends_with("/s"), "{rate}");
    b.screenshot(&shot("02-pipeline")).await;
    flowing.store(false, Ordering::Relaxed);
    load.await.unwrap();
    assert!(
        eventually(WAIT, || async { client.depth(&orders).await == 0 }).await,
        "the stage took every order"
    );

    // Pause it from the page: the broker stops delivering to it.
    b.click_on(
        "pause the stage",
        "#controls tr[data-stage=reserve] button.pause",
    )
    .await;
    let flash = b
        .wait_text("the page says the stage is paused", "#flash", |t| {
            !t.is_empty()
        })
        .await;
    assert!(flash.contains("paused"), "{flash}");
    b.wait_text(
        "the stage shows paused",
        "#stages tr[data-stage=reserve] td.state",
        |t| t == "paused",
    )
    .await;
    // The paused consumer takes nothing more: of what arrives now, the stage
    // may finish what intake had taken and the broker may then fill its
    // prefetch window (10), which it holds unacked — at most 20 leave the
    // queue; the rest waits there as long as the stage is paused (checked
    // now, after the forged POST, and again seconds later before the resume).
    let more: Vec<String> = (0..40).map(|i| format!("late-{i}")).collect();
    client
        .publish_many(&shop, "order.created", &more, b"{}")
        .await;
    let waiting = |when: &'static str| {
        let (client, orders) = (&client, &orders);
        async move {
            let (ready, consumers) = client.queue_stat(orders).await;
            assert_eq!(
                consumers, 1,
                "{when}: the consumer stays registered, paused"
            );
            assert!(
                ready >= 20,
                "{when}: the late orders wait in the queue while paused: {ready} of 40"
            );
        }
    };
    assert!(
        eventually(WAIT, || async { client.depth(&orders).await >= 20 }).await,
        "the late orders arrive: {}",
        client.depth(&orders).await
    );
    // The rate falls to zero (it is measured over seconds).
    b.wait_text("the rate falls to zero", rate_cell, |t| t == "0.0/s")
        .await;
    waiting("paused").await;
    b.screenshot(&shot("03-paused")).await;

    // A forged POST without the CSRF token (same origin, the session
    // cookie sent along) is refused with 403 and changes nothing.
    let status = b
        .execute(
            "a forged POST without the CSRF token",
            "return fetch('/ui/stages/reserve/resume', { method: 'POST', \
             headers: { 'content-type': 'application/x-www-form-urlencoded' }, \
             body: 'workers=1' }).then(r => r.status);",
            vec![],
        )
        .await;
    assert_eq!(status, json!(403), "a forged POST is refused");
    b.goto(&format!("{base}/ui/pipeline")).await;
    let state = b
        .wait_text(
            "the pipeline page after the forged POST",
            "#stages tr[data-stage=reserve] td.state",
            |t| !t.is_empty(),
        )
        .await;
    assert_eq!(state, "paused", "the forged resume changed nothing");
    waiting("after the forged POST").await;

    // Dead letters: find the unroutable one by its reason.
    b.goto(&format!("{base}/ui/dlq")).await;
    b.wait_text("the DLQ overview", "h1", |t| !t.is_empty())
        .await;
    b.screenshot(&shot("04-dead-letter-queues")).await;
    b.click_on(
        "open the returns' DLQ",
        &format!("a[href='/ui/dlq/{returns_dlq}']"),
    )
    .await;
    b.wait_text("the DLQ's list", "#summary", |t| {
        t.starts_with("2 in the queue")
    })
    .await;
    b.click_on(
        "choose the reason `unroutable`",
        "#reason option[value=unroutable]",
    )
    .await;
    b.click_on("filter", "#apply-filter").await;
    b.wait_text("the list filtered by reason", "#summary", |t| {
        t.contains("showing matches 1–1")
    })
    .await;
    let row = b
        .wait_text("the filtered row", "#dead-letters tbody", |t| !t.is_empty())
        .await;
    assert!(
        row.contains("refund-17") && row.contains("unroutable") && !row.contains("refund-18"),
        "{row}"
    );
    b.screenshot(&shot("05-dead-letters-by-reason")).await;

    // Open it.
    b.click_on("open the dead letter", "#dead-letters a.open")
        .await;
    assert_eq!(
        b.wait_text("the dead letter's page", "#message-id", |t| {
            !t.is_empty()
        })
        .await,
        "refund-17"
    );
    let text = |css: &'static str| b.wait_text("the dead letter's page", css, |t| !t.is_empty());
    assert_eq!(text("#reason").await, "unroutable");
    let origin = text("#origin").await;
    assert!(origin.contains("return.created"), "{origin}");
    let body = text("#body").await;
    assert!(
        body.contains("\"amount\": \"12.50\""),
        "pretty JSON: {body}"
    );
    b.screenshot(&shot("06-dead-letter")).await;

    // The operator fixes the topology (refunds now receive `refund.done`)...
    client
        .ch
        .queue_bind(
            refunds.as_str().into(),
            shop.as_str().into(),
            "refund.done".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    // ...and replays the dead letter: confirm, then done.
    b.click_on("replay it", "#one button[value=replay]").await;
    let count = b
        .wait_text("the confirmation counts it", "#count", |t| !t.is_empty())
        .await;
    assert!(count.starts_with("1 dead letter match"), "{count}");
    b.screenshot(&shot("07-confirm-replay")).await;
    b.click_on("confirm the replay", "#do-it").await;
    assert_eq!(
        b.wait_text("the replay is done", "#done-count", |t| !t.is_empty())
            .await,
        "1"
    );
    b.screenshot(&shot("08-replayed")).await;

    // It arrives downstream: the refund stage handled it again and its
    // output reached `refunds`; the malformed one stays in the DLQ.
    let got = client.collect(&refunds, 1, WAIT).await;
    assert_eq!(got.len(), 1, "the replayed refund arrived downstream");
    assert_eq!(got[0].0, "refund-17");
    assert_eq!(client.depth(&returns_dlq).await, 1, "the other stays");
    b.goto(&format!("{base}/ui/dlq/{returns_dlq}")).await;
    let left = b
        .wait_text(
            "the DLQ's list after the replay",
            "#dead-letters tbody",
            |t| !t.is_empty(),
        )
        .await;
    assert!(
        left.contains("refund-18") && !left.contains("refund-17"),
        "{left}"
    );

    // Every change is in the daemon's log with who made it.
    let log = daemon.log_text();
    for line in ["console: stage paused", "dead letters replayed"] {
        assert!(
            log.lines().any(|l| l.contains(line) && l.contains("alice")),
            "`{line}` logged with the token's name:\n{log}"
        );
    }
    assert!(
        log.contains("without the session's CSRF token refused"),
        "{log}"
    );

    waiting("after the dead-letter steps").await;

    // Resume (so the stage drains for the cleanup).
    b.goto(&format!("{base}/ui/pipeline")).await;
    b.click_on(
        "resume the stage",
        "#controls tr[data-stage=reserve] button.resume",
    )
    .await;
    b.wait_text(
        "the stage shows running",
        "#stages tr[data-stage=reserve] td.state",
        |t| t == "running",
    )
    .await;
    b.quit().await;
}
