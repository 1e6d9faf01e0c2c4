//! Chaos (issue 5, acceptance 3): the reserve, pay and ship services run as
//! separate `flowgate-orders worker` processes that are SIGKILLed and restarted
//! repeatedly while orders flow. No accepted order may be lost, and no
//! order may be reserved or charged twice.

use flowgate_orders::{chaos, load::LoadPlan, FlowConfig};
use flowgate_testkit::*;
use std::path::PathBuf;
use std::time::Duration;

#[actix_rt::test]
async fn killed_workers_lose_no_order_and_never_reserve_or_charge_twice() {
    let prefix = unique("chaos");
    let mut cfg = FlowConfig::default_flow().unwrap().uniquely_named(&prefix);
    cfg.engine.amqp.url = AMQP_URL.into();
    cfg.engine.http.bind = String::new();
    cfg.orders.gateway_bind = "127.0.0.1:0".into();
    cfg.orders.redis_url = Some("redis://127.0.0.1:6379".into());
    cfg.orders.key_prefix = format!("flowgate:test:{prefix}:");
    // Transient provider failures stay on: they exercise the in-handler retries.
    cfg.orders.payment_failure_rate = 0.05;
    cfg.engine.shutdown.grace = Duration::from_secs(10);
    let report = chaos::run(chaos::ChaosPlan {
        exe: PathBuf::from(env!("CARGO_BIN_EXE_flowgate-orders")),
        config: cfg,
        workers_per_stage: 1,
        kill_every: (Duration::from_millis(300), Duration::from_millis(900)),
        load: LoadPlan {
            url: String::new(),
            orders: 600,
            rate: Some(100.0),
            concurrency: 16,
            scarce_every: 25,
            wait: Duration::from_secs(60),
            quiet: true,
        },
    })
    .await
    .expect("chaos run completes");
    println!("{}", report.summary());
    assert!(report.kills >= 3, "workers were killed: {}", report.kills);
    assert!(report.load.accepted > 0);
    assert_eq!(report.lost(), 0, "lost orders: {:?}", report.load.lost);
    assert_eq!(
        report.load.shipped + report.load.failed.values().sum::<usize>(),
        report.load.accepted
    );
    let effects = report.effects.as_ref().expect("records readable");
    assert_eq!(effects.double_reservations, 0, "double reservations");
    assert_eq!(effects.double_charges, 0, "double charges");
    assert_eq!(
        effects.charged as usize, report.load.shipped,
        "every shipped order charged once, nothing else charged"
    );
    // Stock bookkeeping: sku-limited starts at 10 and every order wanting it
    // took exactly one unit, so out-of-stock failures are the rest.
    let scarce_orders = report.load.accepted_ids.len().min(report.load.sent / 25);
    let oos = report.load.failed.get("out-of-stock").copied().unwrap_or(0);
    assert!(
        oos <= scarce_orders,
        "no more out-of-stock orders ({oos}) than orders asking for the scarce SKU"
    );
    assert_eq!(effects.stock.get("sku-limited").copied().unwrap_or(10), 0);
}
