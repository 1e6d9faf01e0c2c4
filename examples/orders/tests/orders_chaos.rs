//! Chaos (issue 5, acceptance 3): the reserve, pay and ship services run as
//! separate `flowgate-orders worker` processes that are SIGKILLed and restarted
//! repeatedly while orders flow. No accepted order may be lost, and no
//! order may be reserved or charged twice.
//!
//! Charges are counted by the provider, whose idempotency key caps them at
//! one per order whatever the pay stage does; what the pay stage's charge
//! claim (with flowgate's at-least-once delivery) decides is how often the
//! provider is *called* for an order once it has charged it. A kill of the
//! pay worker between the provider's answer and the recorded charge can
//! cost one such call; without the claim, every redelivered or retried copy
//! of a paid order calls again. So every duplicate call is matched by a
//! claim taken over from a pay worker that died (or stalled) mid-call.
//!
//! On PostgreSQL (issue 27, acceptance 5) the same run keeps the ledger in
//! a private database, written in flowgate's inbox transaction: the
//! effects are counted from the database's own rows (no order reserved,
//! charged or shipped twice), and the redeliveries the kills cause are
//! absorbed by the inbox (inbox hits > 0).

use flowgate_orders::load::{AcceptedOrder, End, LoadPlan};
use flowgate_orders::{chaos, FlowConfig};
use flowgate_testkit::postgres::PrivateDb;
use flowgate_testkit::*;
use std::path::PathBuf;
use std::time::Duration;

async fn chaos_run(db: Option<&PrivateDb>) -> chaos::ChaosReport {
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
    if let Some(db) = db {
        cfg.engine.postgres.url = db.url().to_owned();
        cfg.engine.postgres.migrate_on_start = true;
    }
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
    report
}

/// What every chaos run must show, whatever keeps the records: no order
/// lost, the scarce SKU's units to exactly ten orders, stock as reserved,
/// one charge per shipped order in the provider's books.
fn check_orders(report: &chaos::ChaosReport) {
    assert!(report.kills >= 3, "workers were killed: {}", report.kills);
    assert!(report.load.accepted > 0);
    assert_eq!(report.lost(), 0, "lost orders: {:?}", report.load.lost);
    assert_eq!(
        report.load.shipped + report.load.failed.values().sum::<usize>(),
        report.load.accepted
    );
    // Exactly which orders got the scarce SKU: sku-limited starts at 10 and
    // every order asking for it (every 25th) wants one unit. The first ten
    // of them to reach reserve shipped, the rest failed out of stock, and
    // no other order failed at all.
    let scarce: Vec<&AcceptedOrder> = report
        .load
        .accepted_orders
        .values()
        .filter(|o| o.wants("sku-limited"))
        .collect();
    assert_eq!(
        report.load.accepted_orders.len(),
        report.load.accepted,
        "every accepted order is known"
    );
    for o in report.load.accepted_orders.values() {
        assert_eq!(
            o.wants("sku-limited"),
            o.index % 25 == 24,
            "order #{} asks for the scarce SKU iff it is a 25th",
            o.index
        );
        if !o.wants("sku-limited") {
            assert_eq!(o.end, Some(End::Shipped), "order #{} shipped", o.index);
        }
    }
    let got_it = scarce
        .iter()
        .filter(|o| o.end == Some(End::Shipped))
        .count();
    let oos = scarce
        .iter()
        .filter(|o| o.end == Some(End::Failed("out-of-stock".into())))
        .count();
    assert_eq!(
        got_it,
        scarce.len().min(10),
        "the scarce SKU's ten units went to ten orders"
    );
    assert_eq!(
        got_it + oos,
        scarce.len(),
        "every other order asking for it failed out of stock"
    );
    assert_eq!(
        report.load.failed.values().sum::<usize>(),
        oos,
        "no failure but out of stock: {:?}",
        report.load.failed
    );

    // Reservations once each: the stock left is initial − what the orders
    // that passed reserve asked for, for every SKU they touched.
    let stock = report.stock.as_ref().expect("stock readable");
    assert!(stock.contains_key("sku-limited"));
    for (sku, (have, want)) in stock {
        assert_eq!(have, want, "stock of {sku} (ledger vs reserved orders)");
    }
    assert_eq!(stock["sku-limited"].0, 10 - got_it as u64);

    // Charges once each, from the provider's own books.
    let books = report.provider.as_ref().expect("provider books readable");
    for (id, o) in &report.load.accepted_orders {
        let want = u64::from(o.end == Some(End::Shipped));
        assert_eq!(
            books.charges_of(id),
            want,
            "order #{} ({:?}) charged {want} time(s) by the provider",
            o.index,
            o.end
        );
    }
    assert_eq!(
        books.charges.len(),
        report.load.shipped,
        "nothing else charged"
    );
}

#[actix_rt::test]
async fn killed_workers_lose_no_order_and_never_reserve_or_charge_twice() {
    let report = chaos_run(None).await;
    check_orders(&report);
    let effects = report.effects.as_ref().expect("records readable");
    assert_eq!(
        effects.charged as usize, report.load.shipped,
        "a charge recorded for every shipped order, for nothing else"
    );
    let books = report.provider.as_ref().expect("provider books readable");
    // Provider calls answered after a charge was made: each needs a copy
    // of the order that claimed the charge again, which the claim allows
    // only once the holder's lease ran out (it died or stalled mid-call),
    // and only pay workers die here.
    let pay_kills = report.kills_of("pay");
    let duplicates = books.duplicate_calls();
    println!(
        "pay worker killed {pay_kills} times; claims taken over {}; duplicate provider calls {duplicates} (calls {}, failed {})",
        effects.claim_takeovers,
        books.calls.values().sum::<u64>(),
        books.failures.values().sum::<u64>()
    );
    assert!(
        duplicates <= effects.claim_takeovers,
        "{duplicates} duplicate provider calls, {} claims taken over: copies of paid orders called the provider without the claim",
        effects.claim_takeovers
    );
    assert!(pay_kills > 0, "the pay worker was among the killed");
}

/// The ledger on PostgreSQL: every effect counted from the database's own
/// rows (the effect tables are journals with no unique key on the order:
/// only the inbox keeps a repeat out), and the kills' redeliveries absorbed
/// by the inbox. Mutation tried: the inbox's repeat branch disabled (a
/// committed id handled again) — 98 duplicate effects counted, 0 inbox
/// hits, stock off, and the test fails.
#[actix_rt::test]
async fn killed_workers_on_postgres_apply_each_effect_once_counted_by_the_database() {
    let db = PrivateDb::create().await;
    let report = chaos_run(Some(&db)).await;
    check_orders(&report);
    let counted = report.db.as_ref().expect("the database is readable");
    println!("database: {counted:?}; workers: {:?}", report.workers);
    assert_eq!(counted.duplicate_effects, 0, "no effect applied twice");
    assert_eq!(
        counted.reserved as usize, report.load.shipped,
        "reserved: the orders that shipped (out-of-stock ones rolled back)"
    );
    assert_eq!(
        counted.charged as usize, report.load.shipped,
        "charged once each"
    );
    assert_eq!(
        counted.shipped as usize, report.load.shipped,
        "shipped once each"
    );
    assert_eq!(counted.outbox_depth, 0, "every event relayed");
    assert!(
        report.workers.inbox_hits > 0,
        "the kills' redeliveries were absorbed by the inbox: {:?}",
        report.workers
    );
}
