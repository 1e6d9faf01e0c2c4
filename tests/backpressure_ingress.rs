//! Watermarks reach the HTTP ingress (issues 3 and 5): `POST /publish/...`
//! answers 503 with `Retry-After` while a queue the message routes to is
//! above its watermark, keeps refusing until the queue falls to `low`, and
//! accepts again after that.

use flowgate_testkit as common;

use common::*;
use flowgate::config::{Binding, QueueConfig, QueueKind, Watermark};
use flowgate::Engine;
use lapin::options::BasicGetOptions;
use serde_json::Value;
use std::time::Duration;

const HIGH: u64 = 20;
const LOW: u64 = 5;

/// POSTs `body` to the ingress; status, `Retry-After`, JSON body.
async fn post(http: &awc::Client, url: &str) -> (u16, Option<String>, Value) {
    let mut resp = http
        .post(url)
        .insert_header(("content-type", "text/plain"))
        .send_body("hello")
        .await
        .expect("ingress answers");
    let retry_after = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let v = resp.json::<Value>().await.unwrap_or(Value::Null);
    (resp.status().as_u16(), retry_after, v)
}

/// Takes `n` messages off `queue` (no consumer runs on it).
async fn take(client: &Client, queue: &str, n: u64) {
    for _ in 0..n {
        let got = client
            .ch
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .expect("basic.get");
        assert!(got.is_some(), "{queue} had a message to take");
    }
}

#[actix_rt::test]
async fn the_ingress_answers_503_above_the_watermark_until_the_queue_falls_to_low() {
    let prefix = unique("ingress-wm");
    // No stages: `prefix.sink` (key `in`) only fills; `prefix.free` (key
    // `other`) has no watermark.
    let mut cfg = chain_config(&prefix, &[], 10);
    let watched = format!("{prefix}.sink");
    cfg.queues[0].watermark = Some(Watermark {
        high: HIGH,
        low: LOW,
    });
    cfg.queues.push(QueueConfig {
        name: format!("{prefix}.free"),
        kind: QueueKind::Quorum,
        bindings: vec![Binding {
            exchange: format!("{prefix}.ex"),
            routing_key: "other".into(),
        }],
        dead_letter: false,
        dead_letter_kind: None,
        delivery_limit: None,
        watermark: None,
        single_active_consumer: false,
        partitions: None,
        partition_key: None,
    });
    cfg.http.bind = "127.0.0.1:0".into();
    cfg.ingress = flowgate::config::IngressConfig::open(
        "127.0.0.1:0",
        vec![flowgate::config::IngressRoute {
            exchange: format!("{prefix}.ex"),
            routing_key: "#".into(),
        }],
    );
    cfg.depth.interval = Duration::from_millis(50);
    let h = Engine::builder()
        .config(cfg.clone())
        .build()
        .unwrap()
        .start()
        .await
        .expect("engine starts");
    let base = format!("http://{}", h.ingress_addr().expect("ingress listener"));
    let to_watched = format!("{base}/publish/{prefix}.ex/in");
    let to_free = format!("{base}/publish/{prefix}.ex/other");
    let http = awc::Client::default();
    let client = Client::connect(AMQP_URL).await;
    let sampled = |depth: u64| {
        let got = h
            .metrics()
            .gauge(flowgate::Metrics::QUEUE_DEPTH, &[&watched]);
        async move { got == depth as i64 }
    };

    // Below the watermark: accepted.
    let (code, _, v) = post(&http, &to_watched).await;
    assert_eq!(code, 202, "{v}");

    // Fill the queue past `high` with a raw client (nothing consumes it).
    let ids: Vec<String> = (0..HIGH + 5).map(|i| format!("m{i}")).collect();
    client
        .publish_many(&format!("{prefix}.ex"), "in", &ids, b"x")
        .await;
    let full = HIGH + 6;
    assert!(
        eventually(Duration::from_secs(10), || sampled(full)).await,
        "the depth monitor saw {full} ready messages"
    );
    let (code, retry_after, v) = post(&http, &to_watched).await;
    assert_eq!(code, 503, "above the watermark: {v}");
    assert_eq!(retry_after.as_deref(), Some("1"), "503 carries Retry-After");
    assert_eq!(v["queue"], watched.as_str(), "{v}");
    assert!(
        v["error"].as_str().unwrap_or("").contains("watermark"),
        "{v}"
    );
    // A message routed elsewhere is not held back.
    let (code, _, v) = post(&http, &to_free).await;
    assert_eq!(code, 202, "another queue is not refused: {v}");

    // Hysteresis: between low and high it still refuses.
    let mid = LOW + 5;
    take(&client, &watched, full - mid).await;
    assert!(
        eventually(Duration::from_secs(10), || sampled(mid)).await,
        "the depth monitor saw {mid} ready messages"
    );
    let (code, retry_after, v) = post(&http, &to_watched).await;
    assert_eq!(code, 503, "above low, still refusing: {v}");
    assert!(retry_after.is_some());

    // At `low`: accepted again.
    take(&client, &watched, mid - LOW).await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            post(&http, &to_watched).await.0 == 202
        })
        .await,
        "accepts again once the queue fell to low"
    );
    assert!(
        h.metrics()
            .counter(flowgate::Metrics::INGRESS_REFUSED, &[&watched])
            >= 2,
        "refusals are counted"
    );
    assert_eq!(
        u64::from(client.depth(&watched).await),
        LOW + 1,
        "exactly the accepted message was added"
    );

    h.shutdown().await;
    client.delete_topology(&cfg).await;
}
