//! The order pipeline over HTTP against the real broker (issue 5,
//! acceptance 1, 2 and 4).

use flowgate::config::Watermark;
use flowgate::lapin::options::{QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions};
use flowgate::lapin::types::FieldTable;
use flowgate_orders::{self as orders, FlowConfig, OrdersApp};
use flowgate_testkit::*;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

struct Flow {
    app: OrdersApp,
    cfg: FlowConfig,
    base: String,
    http: awc::Client,
}

async fn start(tweak: impl FnOnce(&mut FlowConfig)) -> Flow {
    let mut cfg = FlowConfig::default_flow()
        .unwrap()
        .uniquely_named(&unique("orders"));
    cfg.engine.http.bind = String::new();
    cfg.orders.gateway_bind = "127.0.0.1:0".into();
    cfg.orders.payment_failure_rate = 0.0;
    cfg.engine.shutdown.grace = Duration::from_secs(10);
    tweak(&mut cfg);
    let app = orders::start(cfg.clone()).await.expect("order flow starts");
    assert!(
        app.engine().wait_ready(Duration::from_secs(20)).await,
        "stages consuming"
    );
    let base = format!("http://{}", app.gateway_addr().expect("gateway runs"));
    Flow {
        app,
        cfg,
        base,
        http: awc::Client::default(),
    }
}

impl Flow {
    async fn post(&self, content_type: Option<&str>, body: impl Into<Vec<u8>>) -> (u16, Value) {
        let mut req = self.http.post(format!("{}/orders", self.base));
        if let Some(ct) = content_type {
            req = req.insert_header(("content-type", ct));
        }
        let mut resp = req.send_body(body.into()).await.expect("gateway answers");
        let code = resp.status().as_u16();
        let v = resp.json::<Value>().await.unwrap_or(Value::Null);
        (code, v)
    }

    async fn post_json(&self, v: Value) -> (u16, Value) {
        self.post(Some("application/json"), v.to_string()).await
    }

    async fn status(&self, id: &str) -> (u16, Value) {
        let mut resp = self
            .http
            .get(format!("{}/orders/{id}", self.base))
            .send()
            .await
            .expect("gateway answers");
        let code = resp.status().as_u16();
        (code, resp.json::<Value>().await.unwrap_or(Value::Null))
    }

    async fn wait_final(&self, id: &str) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let (_, v) = self.status(id).await;
            if matches!(v["status"].as_str(), Some("shipped" | "failed")) {
                return v;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "order {id} reached no final status, last {v}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop(self) {
        self.app.shutdown().await;
        let client = Client::connect(AMQP_URL).await;
        client.delete_topology(&self.cfg.engine).await;
        let _ = self.app.service().clear_records().await;
    }
}

fn valid() -> Value {
    json!({"customer_id": "c-1", "items": [{"sku": "sku-1", "qty": 2}], "total": 19.9})
}

#[actix_rt::test]
async fn a_valid_order_is_queued_confirmed_and_reaches_shipped() {
    let flow = start(|_| {}).await;
    // A spy queue sees the order.created event as published.
    let client = Client::connect(AMQP_URL).await;
    let spy = format!("{}.spy", flow.cfg.orders.exchange);
    client
        .ch
        .queue_declare(
            spy.as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    client
        .ch
        .queue_bind(
            spy.as_str().into(),
            flow.cfg.orders.exchange.as_str().into(),
            "order.created".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();

    let (code, v) = flow.post_json(valid()).await;
    assert_eq!(code, 202, "{v}");
    assert_eq!(v["status"], "queued");
    let id = v["order_id"].as_str().expect("an order id").to_owned();

    let end = flow.wait_final(&id).await;
    assert_eq!(end["status"], "shipped", "{end}");
    assert_eq!(end["order_id"], id.as_str());

    let seen = client.collect(&spy, 1, Duration::from_secs(10)).await;
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].0, id, "message_id is the order id");
    let tp = header(&seen[0].1, "traceparent").expect("a traceparent header");
    assert!(tp.starts_with("00-"), "{tp}");

    let (code, _) = flow.status("no-such-order").await;
    assert_eq!(code, 404);
    let r = flow.app.service().ledger.report().await.unwrap();
    assert_eq!((r.reserved, r.charged, r.shipped), (1, 1, 1));
    let books = flow.app.service().payment.report().await.unwrap();
    assert_eq!(
        (books.calls_of(&id), books.charges_of(&id)),
        (1, 1),
        "the provider charged it once: {books:?}"
    );

    client
        .ch
        .queue_delete(spy.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    flow.stop().await;
}

#[actix_rt::test]
async fn bad_input_answers_422_naming_the_field_415_413_and_400() {
    let flow = start(|c| c.orders.max_body_bytes = 1024).await;
    let cases = [
        (
            json!({"items": [{"sku": "a", "qty": 1}], "total": 1}),
            "customer_id",
        ),
        (
            json!({"customer_id": "", "items": [{"sku": "a", "qty": 1}], "total": 1}),
            "customer_id",
        ),
        (
            json!({"customer_id": "c", "items": [], "total": 1}),
            "items",
        ),
        (json!({"customer_id": "c", "total": 1}), "items"),
        (
            json!({"customer_id": "c", "items": [{"sku": "a", "qty": 0}], "total": 1}),
            "items[0].qty",
        ),
        (
            json!({"customer_id": "c", "items": [{"sku": "a", "qty": 1}, {"sku": "b", "qty": -1}], "total": 1}),
            "items[1].qty",
        ),
        (
            json!({"customer_id": "c", "items": [{"qty": 1}], "total": 1}),
            "items[0].sku",
        ),
        (
            json!({"customer_id": "c", "items": [{"sku": "a", "qty": 1}], "total": 0}),
            "total",
        ),
        (
            json!({"customer_id": "c", "items": [{"sku": "a", "qty": 1}], "total": -5.5}),
            "total",
        ),
        (
            json!({"customer_id": "c", "items": [{"sku": "a", "qty": 1}]}),
            "total",
        ),
    ];
    for (body, field) in cases {
        let (code, v) = flow.post_json(body.clone()).await;
        assert_eq!(code, 422, "{body} → {v}");
        let fields: Vec<&str> = v["fields"]
            .as_array()
            .expect("field errors")
            .iter()
            .filter_map(|f| f["field"].as_str())
            .collect();
        assert_eq!(fields, [field], "{body} → {v}");
    }

    let body = valid().to_string();
    let (code, _) = flow.post(Some("text/plain"), body.clone()).await;
    assert_eq!(code, 415);
    let (code, _) = flow.post(None, body.clone()).await;
    assert_eq!(code, 415);
    let (code, _) = flow
        .post(Some("application/x-www-form-urlencoded"), "customer_id=c")
        .await;
    assert_eq!(code, 415);
    let (code, v) = flow
        .post(Some("application/json; charset=utf-8"), "{not json")
        .await;
    assert_eq!(code, 400, "{v}");
    let big =
        json!({"customer_id": "x".repeat(2000), "items": [{"sku": "a", "qty": 1}], "total": 1});
    let (code, _) = flow.post_json(big).await;
    assert_eq!(code, 413);

    // Nothing of that reached the pipeline.
    let r = flow.app.service().ledger.report().await.unwrap();
    assert_eq!(r.reserved, 0);
    flow.stop().await;
}

#[actix_rt::test]
async fn an_out_of_stock_order_ends_failed_and_sits_in_the_dlq_with_headers() {
    let flow = start(|c| {
        c.orders.stock.insert("sku-rare".into(), 1);
    })
    .await;
    let (code, v) = flow
        .post_json(json!({"customer_id": "c-2", "items": [{"sku": "sku-1", "qty": 1}, {"sku": "sku-rare", "qty": 2}], "total": 5}))
        .await;
    assert_eq!(code, 202, "{v}");
    let id = v["order_id"].as_str().unwrap().to_owned();

    let end = flow.wait_final(&id).await;
    assert_eq!(end["status"], "failed", "{end}");
    assert_eq!(end["reason"], "out-of-stock", "{end}");

    let client = Client::connect(AMQP_URL).await;
    let dlq = format!(
        "{}.dlq",
        flow.cfg
            .engine
            .stages
            .iter()
            .find(|s| s.name == "reserve")
            .unwrap()
            .queue
    );
    let dead = client.collect(&dlq, 1, Duration::from_secs(10)).await;
    assert_eq!(dead.len(), 1, "the dead letter stays in {dlq}");
    assert_eq!(dead[0].0, id);
    assert_eq!(
        header(&dead[0].1, "x-flowgate-reason").as_deref(),
        Some("out-of-stock")
    );
    assert_eq!(
        header(&dead[0].1, "x-flowgate-stage").as_deref(),
        Some("reserve")
    );
    // Nothing was taken from stock, not even the line that fitted.
    let svc = flow.app.service().clone();
    assert_eq!(svc.ledger.stock_of("sku-rare").await.unwrap(), 1);
    assert_eq!(
        svc.ledger.stock_of("sku-1").await.unwrap(),
        flow.cfg.orders.stock_default,
        "sku-1 untouched"
    );
    assert_eq!(svc.payment.report().await.unwrap().calls_of(&id), 0);
    // So the last unit of sku-rare is still there for the next order.
    let (code, v) = flow
        .post_json(
            json!({"customer_id": "c-2", "items": [{"sku": "sku-rare", "qty": 1}], "total": 5}),
        )
        .await;
    assert_eq!(code, 202, "{v}");
    let next = v["order_id"].as_str().unwrap().to_owned();
    let end = flow.wait_final(&next).await;
    assert_eq!(end["status"], "shipped", "{end}");
    assert_eq!(svc.ledger.stock_of("sku-rare").await.unwrap(), 0);
    flow.stop().await;
}

#[actix_rt::test]
async fn a_redelivered_event_reserves_and_charges_once() {
    let flow = start(|c| {
        c.orders.stock.insert("sku-count".into(), 100);
    })
    .await;
    // The same order.created event, published three times (what a
    // redelivery or a producer retry looks like), with no engine dedup.
    let order = orders::model::NewOrder {
        customer_id: "c-3".into(),
        items: vec![orders::model::Item {
            sku: "sku-count".into(),
            qty: 7,
        }],
        total: 70.0,
    }
    .into_order();
    let client = Client::connect(AMQP_URL).await;
    for _ in 0..3 {
        client
            .publish(
                &flow.cfg.orders.exchange,
                "order.created",
                &order.order_id,
                &order.to_json(),
            )
            .await;
    }
    let svc = flow.app.service().clone();
    assert!(
        eventually(Duration::from_secs(30), || {
            let svc = svc.clone();
            let id = order.order_id.clone();
            async move {
                svc.ledger
                    .report()
                    .await
                    .map(|r| r.shipped == 1)
                    .unwrap_or(false)
                    && flow_shipped(&svc, &id)
            }
        })
        .await,
        "the order shipped"
    );
    // Let every copy finish: all three pass the ship stage.
    let metrics = flow.app.engine().metrics().clone();
    assert!(
        eventually(Duration::from_secs(30), || {
            let n = metrics.counter(flowgate::Metrics::ACKED, &["track"]);
            async move { n == 3 }
        })
        .await,
        "all three copies went through"
    );
    let r = svc.ledger.report().await.unwrap();
    assert_eq!(r.reserved, 1, "one reservation");
    assert_eq!(r.charged, 1, "one charge recorded");
    assert_eq!(
        svc.ledger.stock_of("sku-count").await.unwrap(),
        93,
        "7 units taken once"
    );
    // The provider's own books: the three copies called it once.
    let books = svc.payment.report().await.unwrap();
    assert_eq!(
        (
            books.calls_of(&order.order_id),
            books.charges_of(&order.order_id)
        ),
        (1, 1),
        "one provider call, one charge: {books:?}"
    );
    flow.stop().await;
}

fn flow_shipped(svc: &orders::OrdersService, id: &str) -> bool {
    svc.status
        .get(id)
        .is_some_and(|e| e.status == orders::status::OrderStatus::Shipped)
}

/// Samples the ready messages of `queues` with a passive declare every few
/// milliseconds until told to stop; returns the peak per queue.
async fn sample_peaks(
    client: &Client,
    queues: Vec<String>,
) -> (
    Arc<AtomicBool>,
    actix_rt::task::JoinHandle<HashMap<String, u32>>,
) {
    let done = Arc::new(AtomicBool::new(false));
    let ch = client.conn.create_channel().await.expect("channel");
    let stop = done.clone();
    let task = actix_rt::spawn(async move {
        let mut peaks: HashMap<String, u32> = queues.iter().map(|q| (q.clone(), 0)).collect();
        while !stop.load(Ordering::Acquire) {
            for q in &queues {
                let d = ch
                    .queue_declare(
                        q.as_str().into(),
                        QueueDeclareOptions {
                            passive: true,
                            ..Default::default()
                        },
                        FieldTable::default(),
                    )
                    .await
                    .expect("queue exists")
                    .message_count();
                let p = peaks.get_mut(q).expect("a watched queue");
                *p = (*p).max(d);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        peaks
    });
    (done, task)
}

/// Issue 5, acceptance 2: payment throttled to 50/s, orders at 5× that
/// over HTTP. The watermarks push back stage by stage to the gateway,
/// which answers 503 with `Retry-After` within the 2.4 s of sending; every
/// queue stays within its watermark plus one window of its upstream's
/// in-flight messages; every accepted order ships, charged once.
#[actix_rt::test]
async fn a_throttled_payment_provider_makes_the_gateway_answer_503_and_accepted_orders_ship_once() {
    const RATE: u32 = 50;
    // (queue suffix, watermark, upstream window: the in-flight messages
    // of whatever publishes into it)
    const GATEWAY_PENDING: u32 = 32;
    let marks = [
        ("orders.created", Watermark { high: 60, low: 20 }),
        ("orders.reserved", Watermark { high: 100, low: 30 }),
        ("orders.paid", Watermark { high: 100, low: 30 }),
    ];
    let flow = start(|c| {
        c.orders.payment_rate = RATE;
        c.orders.max_backlog = 0;
        c.orders.max_pending = GATEWAY_PENDING;
        c.engine.depth.interval = Duration::from_millis(50);
        for q in &mut c.engine.queues {
            if let Some((_, w)) = marks
                .iter()
                .find(|(n, _)| q.name.ends_with(&format!(".{n}")))
            {
                q.watermark = Some(*w);
            }
        }
    })
    .await;
    let queue_of = |stage: &str| {
        flow.cfg
            .engine
            .stages
            .iter()
            .find(|s| s.name == stage)
            .unwrap()
            .queue
            .clone()
    };
    let prefetch_of = |stage: &str| {
        flow.cfg
            .engine
            .stages
            .iter()
            .find(|s| s.name == stage)
            .unwrap()
            .prefetch
    };
    // queue → its bound: high + one window of each upstream worker.
    let bounds: HashMap<String, u64> = [
        (queue_of("reserve"), 60 + u64::from(GATEWAY_PENDING)),
        (queue_of("pay"), 100 + u64::from(prefetch_of("reserve"))),
        (queue_of("ship"), 100 + u64::from(prefetch_of("pay"))),
    ]
    .into_iter()
    .collect();
    let client = Client::connect(AMQP_URL).await;
    let (done, sampler) = sample_peaks(&client, bounds.keys().cloned().collect()).await;
    // Whether reserve (which feeds the throttled stage) is paused, by either
    // cause, sampled through the run: its gauges went to 1, then back to 0.
    let metrics = flow.app.engine().metrics().clone();
    let reserve_paused = move |m: &flowgate::Metrics| {
        ["watermark", "budget"]
            .iter()
            .any(|c| m.gauge(flowgate::Metrics::STAGE_PAUSED, &["reserve", c]) == 1)
    };
    let paused_seen = Arc::new(AtomicBool::new(false));
    let resumed_seen = Arc::new(AtomicBool::new(false));
    let pause_sampler = {
        let (stop, paused, resumed) = (done.clone(), paused_seen.clone(), resumed_seen.clone());
        let m = metrics.clone();
        actix_rt::spawn(async move {
            while !stop.load(Ordering::Acquire) {
                if reserve_paused(&m) {
                    paused.store(true, Ordering::Release);
                } else if paused.load(Ordering::Acquire) {
                    resumed.store(true, Ordering::Release);
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };

    let plan = orders::load::LoadPlan {
        url: flow.base.clone(),
        orders: 600,
        rate: Some(5.0 * f64::from(RATE)),
        concurrency: GATEWAY_PENDING as usize,
        scarce_every: 0,
        wait: Duration::from_secs(30),
        quiet: true,
    };
    let report = orders::load::run(&plan).await;
    done.store(true, Ordering::Release);
    let peaks = sampler.await.unwrap();
    pause_sampler.await.unwrap();
    let offered = report.sent as f64 / report.send_time.as_secs_f64();
    eprintln!(
        "throttled: offered {offered:.0}/s, accepted {}, 503 {} (first after {:?}), shipped {}, peaks {peaks:?} (bounds {bounds:?})",
        report.accepted, report.rejected_503, report.first_503_after, report.shipped
    );

    assert!(
        offered > 2.0 * f64::from(RATE),
        "orders were offered ({offered:.0}/s) at over twice the provider's rate ({RATE}/s), \
         or the watermarks are never exercised"
    );
    assert_eq!(report.transport_errors, 0, "every request was answered");
    assert!(
        report.rejected_other.is_empty(),
        "no refusal but 503: {:?}",
        report.rejected_other
    );
    // Offered at 5x the provider's rate, orders.reserved (high 100) fills
    // in about half a second and orders.created (high 60) a quarter second
    // after: the push-back comes early in the run, well within its first
    // half (a bound relative to the run, so a slow machine moves both).
    let first_503 = report.first_503_after.expect("a 503 was answered");
    assert!(
        first_503 < report.send_time / 2,
        "the gateway pushed back within the first half of sending: first 503 after {first_503:?}, \
         sending took {:?}",
        report.send_time
    );
    assert!(
        paused_seen.load(Ordering::Acquire),
        "reserve was paused during the run"
    );
    assert!(
        resumed_seen.load(Ordering::Acquire),
        "reserve resumed during the run"
    );

    assert!(
        report.rejected_503 > 0,
        "the gateway pushed back: {report:?}"
    );
    assert_eq!(
        report.retry_after_seen, report.rejected_503,
        "every 503 carries Retry-After"
    );
    let errors = flow.app.service().stats.errors();
    assert!(
        errors.get("gateway-503-watermark").copied().unwrap_or(0) > 0,
        "the 503s come from the watermark of orders.created: {errors:?}"
    );
    assert!(
        !reserve_paused(&metrics),
        "reserve is not paused once orders.reserved drained"
    );
    for (q, bound) in &bounds {
        assert!(
            u64::from(peaks[q]) <= *bound,
            "{q} peaked at {}, above its watermark plus one upstream window ({bound})",
            peaks[q]
        );
    }
    assert!(
        u64::from(peaks[&queue_of("pay")]) >= 50,
        "the throttled stage's input actually backed up: {peaks:?}"
    );

    assert!(report.accepted > 0);
    assert!(report.lost.is_empty(), "lost: {:?}", report.lost);
    assert_eq!(
        report.shipped, report.accepted,
        "every accepted order shipped"
    );
    let svc = flow.app.service();
    let r = svc.ledger.report().await.unwrap();
    assert_eq!(
        r.charged as usize, report.accepted,
        "a charge recorded for each"
    );
    let books = svc.payment.report().await.unwrap();
    for id in &report.accepted_ids {
        assert_eq!(
            (books.calls_of(id), books.charges_of(id)),
            (1, 1),
            "order {id}: one provider call, one charge"
        );
    }
    assert_eq!(books.charges.len(), report.accepted, "nothing else charged");
    // Stock: what every accepted (hence reserved) order asked for, taken once.
    let taken = report.stock_taken();
    assert!(!taken.is_empty());
    for (sku, units) in &taken {
        assert_eq!(
            svc.ledger.stock_of(sku).await.unwrap(),
            flow.cfg.orders.stock_default - units,
            "stock of {sku}"
        );
    }
    assert!(r.throttle_hits > 0, "the provider's rate limit was hit");
    // The monitor's own peaks (what the demo prints) saw the backlog too.
    let monitored = flow.app.engine().ingress().queue_peaks();
    assert!(
        monitored[&queue_of("pay")] > 0,
        "depth monitor peaks: {monitored:?}"
    );
    flow.stop().await;
}
