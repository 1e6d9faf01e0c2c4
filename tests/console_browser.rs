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
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(20);

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
    assert!(
        b.current_url().await.ends_with("/ui/login"),
        "sign-in first"
    );
    b.type_into(&b.find("#token").await, "not-a-token-0123456789")
        .await;
    b.click(&b.find("#sign-in").await).await;
    let refused = b.wait_text("#login-error", WAIT, |t| !t.is_empty()).await;
    assert!(refused.contains("not accepted"), "{refused}");
    b.screenshot(&shot("01-wrong-token")).await;
    b.goto(&format!("{base}/ui/pipeline")).await;
    assert!(
        b.current_url().await.ends_with("/ui/login"),
        "still signed out"
    );

    // Sign in with alice's token.
    b.type_into(&b.find("#token").await, TOKEN).await;
    b.click(&b.find("#sign-in").await).await;
    let who = b.wait_text("#who", WAIT, |t| !t.is_empty()).await;
    assert_eq!(who, "alice");

    // The rate moves while orders flow in (the live part refreshes itself).
    let rate_cell = "#stages tr[data-stage=reserve] td.rate";
    let ids: Vec<String> = (0..300).map(|i| format!("o-{i}")).collect();
    let load = {
        let (shop, ids) = (shop.clone(), ids.clone());
        tokio::spawn(async move {
            let c = Client::connect(AMQP_URL).await;
            for chunk in ids.chunks(10) {
                c.publish_many(&shop, "order.created", chunk, b"{}").await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let rate = b
        .wait_text(rate_cell, WAIT, |t| {
            t.trim_end_matches("/s")
                .parse::<f64>()
                .is_ok_and(|r| r > 0.0)
        })
        .await;
    assert!(rate.ends_with("/s"), "{rate}");
    b.screenshot(&shot("02-pipeline")).await;
    load.await.unwrap();

    // Pause it from the page: the broker stops delivering to it.
    b.click(
        &b.find("#controls tr[data-stage=reserve] button.pause")
            .await,
    )
    .await;
    let flash = b.wait_text("#flash", WAIT, |t| !t.is_empty()).await;
    assert!(flash.contains("paused"), "{flash}");
    b.wait_text("#stages tr[data-stage=reserve] td.state", WAIT, |t| {
        t == "paused"
    })
    .await;
    // The paused consumer takes nothing more: of what arrives now, the stage
    // may finish what intake had taken and the broker may have sent it one
    // prefetch window (10), which it holds unacked — at most 20 in all; the
    // rest waits in the queue, and stays there.
    let more: Vec<String> = (0..40).map(|i| format!("late-{i}")).collect();
    client
        .publish_many(&shop, "order.created", &more, b"{}")
        .await;
    assert!(
        eventually(WAIT, || async { client.depth(&orders).await >= 20 }).await,
        "the late orders wait in the queue: {}",
        client.depth(&orders).await
    );
    let (held, consumers) = client.queue_stat(&orders).await;
    assert_eq!(consumers, 1, "the consumer stays registered, paused");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        client.queue_stat(&orders).await.0,
        held,
        "nothing consumed while paused"
    );
    b.wait_text(rate_cell, WAIT, |t| t == "0.0/s").await;
    b.screenshot(&shot("03-paused")).await;

    // A forged POST without the CSRF token (same origin, the session
    // cookie sent along) is refused with 403 and changes nothing.
    let status = b
        .execute(
            "return fetch('/ui/stages/reserve/resume', { method: 'POST', \
             headers: { 'content-type': 'application/x-www-form-urlencoded' }, \
             body: 'workers=1' }).then(r => r.status);",
            vec![],
        )
        .await;
    assert_eq!(status, json!(403), "a forged POST is refused");
    b.goto(&format!("{base}/ui/pipeline")).await;
    assert_eq!(
        b.text_of("#stages tr[data-stage=reserve] td.state").await,
        "paused",
        "the forged resume changed nothing"
    );
    assert_eq!(client.queue_stat(&orders).await.0, held);

    // Dead letters: find the unroutable one by its reason.
    b.goto(&format!("{base}/ui/dlq")).await;
    b.screenshot(&shot("04-dead-letter-queues")).await;
    b.click(&b.find(&format!("a[href='/ui/dlq/{returns_dlq}']")).await)
        .await;
    b.wait_text("#summary", WAIT, |t| t.starts_with("2 in the queue"))
        .await;
    b.click(&b.find("#reason option[value=unroutable]").await)
        .await;
    b.click(&b.find("#apply-filter").await).await;
    b.wait_text("#summary", WAIT, |t| t.contains("showing matches 1–1"))
        .await;
    let row = b.text_of("#dead-letters tbody").await;
    assert!(
        row.contains("refund-17") && row.contains("unroutable") && !row.contains("refund-18"),
        "{row}"
    );
    b.screenshot(&shot("05-dead-letters-by-reason")).await;

    // Open it.
    b.click(&b.find("#dead-letters a.open").await).await;
    assert_eq!(
        b.wait_text("#message-id", WAIT, |t| !t.is_empty()).await,
        "refund-17"
    );
    assert_eq!(b.text_of("#reason").await, "unroutable");
    let origin = b.text_of("#origin").await;
    assert!(origin.contains("return.created"), "{origin}");
    let body = b.text_of("#body").await;
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
    b.click(&b.find("#one button[value=replay]").await).await;
    let count = b.wait_text("#count", WAIT, |t| !t.is_empty()).await;
    assert!(count.starts_with("1 dead letter match"), "{count}");
    b.screenshot(&shot("07-confirm-replay")).await;
    b.click(&b.find("#do-it").await).await;
    assert_eq!(
        b.wait_text("#done-count", WAIT, |t| !t.is_empty()).await,
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
        .wait_text("#dead-letters tbody", WAIT, |t| !t.is_empty())
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

    // Resume (so the stage drains for the cleanup).
    b.goto(&format!("{base}/ui/pipeline")).await;
    b.click(
        &b.find("#controls tr[data-stage=reserve] button.resume")
            .await,
    )
    .await;
    b.wait_text("#stages tr[data-stage=reserve] td.state", WAIT, |t| {
        t == "running"
    })
    .await;
    b.quit().await;
}
