//! The transactional inbox and outbox on a real PostgreSQL (issue 27), each
//! test in a private database (`testkit::postgres::PrivateDb`) and on its
//! own topology on the shared broker.
//!
//! * The inbox: a handler's writes, the inbox row and the outputs commit
//!   together; a redelivery of a committed id is acked without calling the
//!   handler; a failed outcome leaves nothing.
//! * The outbox: rows committed by the host are published once and deleted;
//!   rows of a rolled-back transaction never are; `NOTIFY` wakes the relay;
//!   two relays on one outbox publish every row once.
//! * Backpressure: with the breaker open (a memory alarm on a private node)
//!   the outbox grows in PostgreSQL while the daemon's RSS stays flat, and
//!   drains in order after the alarm.
//! * `flowgate db migrate` is idempotent.

use flowgate_testkit as common;

use common::postgres::PrivateDb;
use common::*;
use flowgate::config::Config;
use flowgate::postgres::{sqlx, Outbox, PgTransaction, TxHandler};
use flowgate::{Delivery, EngineHandle, HandlerError, Metrics, Outcome};
use std::collections::HashMap;
use std::time::Duration;

/// The effect table the test handlers write: one row per handled message.
async fn effects_table(pool: &sqlx::PgPool) {
    sqlx::query("CREATE TABLE effects (message_id text NOT NULL, at timestamptz DEFAULT now())")
        .execute(pool)
        .await
        .unwrap();
}

/// How many effect rows each message id has.
async fn effects(pool: &sqlx::PgPool) -> HashMap<String, i64> {
    sqlx::query_as::<_, (String, i64)>(
        "SELECT message_id, count(*) FROM effects GROUP BY message_id",
    )
    .fetch_all(pool)
    .await
    .unwrap()
    .into_iter()
    .collect()
}

async fn scalar(pool: &sqlx::PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

/// Writes one effect row and forwards to the stage's output; ids starting
/// with `bad` write the row and then dead-letter.
struct WriteAndForward {
    exchange: String,
    routing_key: String,
}

#[async_trait::async_trait]
impl TxHandler for WriteAndForward {
    async fn handle(&self, tx: &mut PgTransaction, d: &Delivery) -> Result<Outcome, HandlerError> {
        let id = d.message_id().unwrap_or_default().to_owned();
        sqlx::query("INSERT INTO effects (message_id) VALUES ($1)")
            .bind(&id)
            .execute(&mut **tx)
            .await?;
        if id.starts_with("bad") {
            return Ok(Outcome::dead_letter("bad input"));
        }
        Ok(Outcome::ack_with(vec![flowgate::Output::new(
            &self.exchange,
            &self.routing_key,
            d.body.clone(),
        )]))
    }
}

fn pg_config(prefix: &str, db: &PrivateDb) -> Config {
    let mut cfg = chain_config(prefix, &["write"], 20);
    cfg.postgres.url = db.url().to_owned();
    cfg.postgres.migrate_on_start = true;
    cfg
}

async fn inbox_pipeline(prefix: &str, db: &PrivateDb) -> TestPipeline {
    let cfg = pg_config(prefix, db);
    let out = cfg.stages[0].output.clone().unwrap();
    TestPipeline::builder(cfg)
        .engine(move |b| {
            b.tx_handler(
                "write",
                WriteAndForward {
                    exchange: out.exchange,
                    routing_key: out.routing_key,
                },
            )
        })
        .start()
        .await
}

fn inbox_hits(h: &EngineHandle) -> u64 {
    h.metrics().counter(Metrics::INBOX_HITS, &["s1"])
}

/// Every id published twice (the second copy is what a redelivery after a
/// crash past the commit looks like to the stage): one effect row each, one
/// inbox row each, one output each (ids derived from the input's), and the
/// second copies counted as inbox hits. Mutation tried: the inbox insert's
/// `rows_affected() == 0` branch disabled (the handler runs on a repeat):
/// 2 effect rows per id, and the test fails.
#[actix_rt::test]
async fn the_inbox_absorbs_repeats_one_effect_and_one_output_per_id() {
    let db = PrivateDb::create().await;
    let prefix = unique("pg-inbox");
    let p = inbox_pipeline(&prefix, &db).await;
    let pool = db.pool().await;
    effects_table(&pool).await;
    let ids: Vec<String> = (0..200).map(|i| format!("m-{i}")).collect();
    p.publish_many(&ids, b"{}").await;
    // Wait for the first copies' effects before sending the repeats, so
    // that each repeat meets a committed id (a concurrent one waits on the
    // row lock and then meets it too, but this keeps the count exact).
    assert!(
        eventually(Duration::from_secs(30), || async {
            scalar(&pool, "SELECT count(*) FROM flowgate_inbox").await == 200
        })
        .await,
        "the first copies are committed"
    );
    p.publish_many(&ids, b"{}").await;
    assert!(
        eventually(Duration::from_secs(30), || async {
            p.handle().metrics().counter(Metrics::ACKED, &["s1"]) == 400
        })
        .await,
        "every copy is acked"
    );
    let got = p
        .client()
        .collect_all(&format!("{prefix}.sink"), 200, Duration::from_secs(30))
        .await;
    let fx = effects(&pool).await;
    assert_eq!(fx.len(), 200, "one effect row per id");
    assert!(fx.values().all(|n| *n == 1), "no effect twice: {fx:?}");
    assert_eq!(got.len(), 200, "one output id per input: {got:?}");
    assert!(got.values().all(|n| *n == 1), "each output once: {got:?}");
    assert!(got.keys().all(|id| id.starts_with("fg-")), "derived ids");
    assert_eq!(inbox_hits(p.handle()), 200, "every repeat is an inbox hit");
    assert_eq!(
        scalar(&pool, "SELECT count(*) FROM flowgate_outbox").await,
        0
    );
    assert!(p.stop().await.clean);
}

/// A handler that writes and then dead-letters: its write and the inbox row
/// are rolled back, nothing goes to the outbox, the delivery goes to the
/// DLQ. Mutation tried: committing on every outcome — the `bad` effect rows
/// stay, and the test fails.
#[actix_rt::test]
async fn a_failed_outcome_rolls_back_the_effect_and_the_inbox_row() {
    let db = PrivateDb::create().await;
    let prefix = unique("pg-fail");
    let p = inbox_pipeline(&prefix, &db).await;
    let pool = db.pool().await;
    effects_table(&pool).await;
    let ids: Vec<String> = (0..20)
        .map(|i| format!("{}-{i}", if i % 2 == 0 { "bad" } else { "ok" }))
        .collect();
    p.publish_many(&ids, b"{}").await;
    let dlq = p.dead_letter_queue(&format!("{prefix}.s1")).unwrap();
    let dead = p
        .client()
        .collect_distinct(&dlq, 10, Duration::from_secs(30))
        .await;
    assert_eq!(dead.len(), 10, "the bad ones are dead-lettered");
    let got = p
        .client()
        .collect_distinct(&format!("{prefix}.sink"), 10, Duration::from_secs(30))
        .await;
    assert_eq!(got.len(), 10);
    let fx = effects(&pool).await;
    assert!(
        fx.keys().all(|id| id.starts_with("ok")),
        "no effect of a failed handling: {fx:?}"
    );
    assert_eq!(
        scalar(
            &pool,
            "SELECT count(*) FROM flowgate_inbox WHERE message_id LIKE 'bad%'"
        )
        .await,
        0,
        "no inbox row of a failed handling"
    );
    assert!(p.stop().await.clean);
}

/// An engine with no stages that relays the outbox in `db`.
async fn relay_engine(prefix: &str, db: &PrivateDb, poll: Duration) -> (TestPipeline, Config) {
    let mut cfg = chain_config(prefix, &["sink"], 10);
    cfg.postgres.url = db.url().to_owned();
    cfg.postgres.migrate_on_start = true;
    cfg.postgres.relay_poll = poll;
    cfg.postgres.relay_batch = 50;
    let p = TestPipeline::builder(cfg.clone()).start().await;
    (p, cfg)
}

/// Rows committed by the host are published once each and deleted; rows of
/// a rolled-back transaction never are. The relay polls only every minute:
/// the rows arrive because `NOTIFY` wakes it. Mutations tried: the
/// `DELETE` of relayed rows removed (every row published again and again:
/// duplicates); the trigger's `pg_notify` removed (nothing arrives within
/// the collect's 20 s).
#[actix_rt::test]
async fn committed_outbox_rows_are_published_once_rolled_back_ones_never() {
    let db = PrivateDb::create().await;
    let prefix = unique("pg-outbox");
    let (p, cfg) = relay_engine(&prefix, &db, Duration::from_secs(60)).await;
    let pool = db.pool().await;
    let ex = cfg.stages[0].output.clone().unwrap();
    let mut committed = Vec::new();
    for t in 0..20 {
        let mut tx = pool.begin().await.unwrap();
        for i in 0..10 {
            let id = format!("e-{t}-{i}");
            Outbox::enqueue(
                &mut tx,
                &ex.exchange,
                &ex.routing_key,
                b"{}".to_vec(),
                headers(&[("x-test", s("yes"))]),
                &id,
            )
            .await
            .unwrap();
            if t % 4 != 3 {
                committed.push(id);
            }
        }
        if t % 4 == 3 {
            tx.rollback().await.unwrap();
        } else {
            tx.commit().await.unwrap();
        }
    }
    let sink = format!("{prefix}.sink");
    let got = p
        .client()
        .collect(&sink, committed.len(), Duration::from_secs(20))
        .await;
    assert!(
        got.iter()
            .all(|(_, h)| header(h, "x-test").as_deref() == Some("yes")),
        "headers travel"
    );
    let mut seen = counts(got.into_iter().map(|(id, _)| id));
    assert!(
        eventually(Duration::from_secs(10), || async {
            scalar(&pool, "SELECT count(*) FROM flowgate_outbox").await == 0
        })
        .await,
        "relayed rows are deleted"
    );
    for (id, n) in p
        .client()
        .collect_all(&sink, 0, Duration::from_secs(5))
        .await
    {
        *seen.entry(id).or_insert(0) += n;
    }
    Accounting::of(&committed, &seen).assert_exactly_once();
    assert_eq!(
        p.handle().metrics().counter(Metrics::OUTBOX_RELAYED, &[]),
        committed.len() as u64
    );
    assert!(p.stop().await.clean);
}

/// Two engines relay one outbox while a writer fills it: every row is
/// published exactly once, and both relays took part. Mutation tried:
/// `FOR UPDATE SKIP LOCKED` removed from the batch query — both relays
/// publish the same rows, and the test fails on duplicates.
#[actix_rt::test]
async fn two_relays_publish_every_row_of_one_outbox_once() {
    let db = PrivateDb::create().await;
    let prefix = unique("pg-relays");
    let (a, cfg) = relay_engine(&prefix, &db, Duration::from_millis(200)).await;
    let b = flowgate::Engine::builder()
        .config(cfg.clone())
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let pool = db.pool().await;
    let ex = cfg.stages[0].output.clone().unwrap();
    let mut ids = Vec::new();
    for t in 0..40 {
        let mut tx = pool.begin().await.unwrap();
        for i in 0..50 {
            let id = format!("r-{t}-{i}");
            Outbox::enqueue(
                &mut tx,
                &ex.exchange,
                &ex.routing_key,
                b"{}".to_vec(),
                Default::default(),
                &id,
            )
            .await
            .unwrap();
            ids.push(id);
        }
        tx.commit().await.unwrap();
    }
    let sink = format!("{prefix}.sink");
    let mut seen = a
        .client()
        .collect_distinct(&sink, ids.len(), Duration::from_secs(60))
        .await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            scalar(&pool, "SELECT count(*) FROM flowgate_outbox").await == 0
        })
        .await,
        "the outbox is empty"
    );
    for (id, n) in a
        .client()
        .collect_all(&sink, 0, Duration::from_secs(5))
        .await
    {
        *seen.entry(id).or_insert(0) += n;
    }
    let by_a = a.handle().metrics().counter(Metrics::OUTBOX_RELAYED, &[]);
    let by_b = b.metrics().counter(Metrics::OUTBOX_RELAYED, &[]);
    println!("relayed: {by_a} by one engine, {by_b} by the other");
    Accounting::of(&ids, &seen).assert_exactly_once();
    assert_eq!(by_a + by_b, ids.len() as u64, "each row relayed once");
    assert!(
        by_a > 0 && by_b > 0,
        "both relays took part: {by_a}, {by_b}"
    );
    b.shutdown().await;
    assert!(a.stop().await.clean);
}

/// `flowgate db migrate` creates the tables once; run again it changes
/// nothing and says so.
#[actix_rt::test]
async fn db_migrate_is_idempotent() {
    let db = PrivateDb::create().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("flowgate.toml");
    std::fs::write(&path, format!("[postgres]\nurl = \"{}\"\n", db.url())).unwrap();
    let run = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_flowgate"))
            .args(["db", "migrate", "--config"])
            .arg(&path)
            .output()
            .unwrap()
    };
    let first = run();
    assert!(first.status.success(), "{first:?}");
    assert!(String::from_utf8_lossy(&first.stdout).contains("applied migrations [1]"));
    let second = run();
    assert!(second.status.success(), "{second:?}");
    assert!(
        String::from_utf8_lossy(&second.stdout).contains("up to date"),
        "{second:?}"
    );
    let pool = db.pool().await;
    assert_eq!(
        scalar(&pool, "SELECT count(*) FROM flowgate_migrations").await,
        1
    );
    assert_eq!(
        scalar(&pool, "SELECT count(*) FROM flowgate_outbox").await,
        0
    );
    assert_eq!(
        scalar(&pool, "SELECT count(*) FROM flowgate_inbox").await,
        0
    );
}

/// Breaker open (a memory alarm on a private broker node, the engine with a
/// spool): the relay stops taking rows, so the outbox grows in PostgreSQL
/// (at most the batch in flight when the broker blocked, and one probe row
/// per half-open spell, go to the spool); while it grows by 20,000 rows of
/// 4 KiB the daemon's RSS stays within a bound far below their size; after
/// the alarm everything drains, each row at least once and at most a
/// batch's worth twice, and the rows that waited in PostgreSQL arrive in
/// commit (row id) order. Mutations tried: the relay's breaker check
/// removed (full batches whatever the state) — the relay moves the outbox
/// into the spool while the breaker is open and half-open, and the test
/// fails; a relay that, while the breaker is open, reads every waiting row
/// into memory (an unbounded read-ahead, rows left in PostgreSQL) — the
/// RSS bound fails (+196 MiB against +0.5 MiB unmutated); each batch
/// published in reverse row order — 19,599 inversions, the order check
/// fails.
#[actix_rt::test]
async fn breaker_open_the_outbox_grows_in_postgres_and_drains_after() {
    let node = common::node::BrokerNode::start_async()
        .await
        .expect("private broker node");
    let db = PrivateDb::create().await;
    let prefix = unique("pg-alarm");
    let mut cfg = chain_config(&prefix, &["sink"], 10);
    cfg.amqp.url = node.amqp_url();
    cfg.postgres.url = db.url().to_owned();
    cfg.postgres.migrate_on_start = true;
    cfg.postgres.relay_poll = Duration::from_millis(100);
    cfg.postgres.relay_batch = 50;
    cfg.publisher.confirm_timeout = Duration::from_secs(3);
    cfg.publisher.breaker.blocked_timeout = Duration::from_millis(500);
    cfg.publisher.breaker.reset = Duration::from_millis(500);
    let spool_dir = tempfile::tempdir().unwrap();
    cfg.spool.path = Some(spool_dir.path().join("spool.redb"));
    let p = TestPipeline::builder(cfg.clone())
        .url(&node.amqp_url())
        .start()
        .await;
    let m = p.handle().metrics().clone();
    let pool = db.pool().await;
    let ex = cfg.stages[0].output.clone().unwrap();
    node.blocking(|n| n.set_memory_alarm(true))
        .await
        .expect("alarm on");
    // The broker blocks a connection when it next publishes: a primer
    // publish makes it so before the relay has rows (theirs then wait at
    // the publisher's blocked gate, and the breaker opens after
    // `blocked_timeout`, as in tests/backpressure.rs).
    let primer = {
        let h = p.handle().clone();
        let out = flowgate::Output::new(&ex.exchange, &ex.routing_key, b"{}".to_vec())
            .with_message_id("primer");
        actix_rt::spawn(async move { h.publish(out).await })
    };
    assert!(
        eventually(Duration::from_secs(15), || async {
            m.gauge(Metrics::BROKER_BLOCKED, &[]) == 1
        })
        .await,
        "the broker blocks publishing"
    );
    const N: usize = 1000;
    let mut ids = Vec::new();
    for t in 0..20 {
        let mut tx = pool.begin().await.unwrap();
        for i in 0..N / 20 {
            let id = format!("a-{:04}", t * (N / 20) + i);
            Outbox::enqueue(
                &mut tx,
                &ex.exchange,
                &ex.routing_key,
                b"{}".to_vec(),
                Default::default(),
                &id,
            )
            .await
            .unwrap();
            ids.push(id);
        }
        tx.commit().await.unwrap();
    }
    assert!(
        eventually(Duration::from_secs(60), || async {
            m.gauge(Metrics::BREAKER_STATE, &["open"]) == 1
        })
        .await,
        "the breaker opens (broker blocked: {}, relayed: {}, relay errors: {}, outbox: {})",
        m.gauge(Metrics::BROKER_BLOCKED, &[]),
        m.counter(Metrics::OUTBOX_RELAYED, &[]),
        m.counter(Metrics::OUTBOX_RELAY_ERRORS, &[]),
        scalar(&pool, "SELECT count(*) FROM flowgate_outbox").await
    );
    let errors_at_open = m.counter(Metrics::OUTBOX_RELAY_ERRORS, &[]);
    // Watched for a while: there is no event for "nothing happens".
    let mut outbox_while_open = Vec::new();
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        outbox_while_open.push(scalar(&pool, "SELECT count(*) FROM flowgate_outbox").await);
        let spooled = m.gauge(Metrics::SPOOL_MESSAGES, &[]);
        // The batch in flight when the breaker opened, and one probe row
        // per half-open spell (`reset` is 500 ms).
        assert!(
            spooled <= 60,
            "at most the batch in flight and the probes are spooled: {spooled}"
        );
    }
    let errors_while_open = m.counter(Metrics::OUTBOX_RELAY_ERRORS, &[]) - errors_at_open;
    println!("outbox while the breaker is open: {outbox_while_open:?}; relay errors meanwhile: {errors_while_open}");
    assert!(
        outbox_while_open.iter().all(|n| *n as usize >= N - 60),
        "the rows stay in PostgreSQL: {outbox_while_open:?}"
    );
    assert!(
        errors_while_open <= 1,
        "the relay waits instead of failing batch after batch: {errors_while_open}"
    );
    // The daemon's memory while the outbox grows by tens of thousands of
    // rows (4 KiB each, ~80 MiB in all) behind the open breaker: the
    // baseline is taken now, after the engine, its pools and the first
    // batch are warm. The bound is generous (allocator noise, the test's
    // own inserts) and far below what the rows would take in the process.
    let baseline = rss_kib();
    let body = vec![b'x'; 4096];
    let mut grown = Vec::new();
    let mut peak = baseline;
    for t in 0..GROWN / 500 {
        let mut tx = pool.begin().await.unwrap();
        for i in 0..500 {
            let id = format!("g-{:05}", t * 500 + i);
            let row = Outbox::enqueue(
                &mut tx,
                &ex.exchange,
                &ex.routing_key,
                body.clone(),
                Default::default(),
                &id,
            )
            .await
            .unwrap();
            grown.push((row, id));
        }
        tx.commit().await.unwrap();
        peak = peak.max(rss_kib());
    }
    // The relay has been woken by every commit (NOTIFY) and has polled:
    // give it a few polls more to take rows it should not.
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        peak = peak.max(rss_kib());
    }
    let in_pg = scalar(
        &pool,
        "SELECT count(*) FROM flowgate_outbox WHERE message_id LIKE 'g-%'",
    )
    .await as usize;
    eprintln!(
        "RSS while the outbox grew by {GROWN} rows of 4 KiB: baseline {baseline} KiB, peak {peak} KiB (+{} KiB); {in_pg} of them in the outbox",
        peak.saturating_sub(baseline)
    );
    assert_eq!(in_pg, GROWN, "the outbox grew in PostgreSQL");
    assert!(
        peak.saturating_sub(baseline) < RSS_BOUND_KIB,
        "the daemon's RSS stays flat while the outbox grows: baseline {baseline} KiB, peak {peak} KiB"
    );
    node.blocking(|n| n.set_memory_alarm(false))
        .await
        .expect("alarm off");
    let _ = primer.await;
    let sink = format!("{prefix}.sink");
    let client = Client::connect(&node.amqp_url()).await;
    let total = N + GROWN;
    // Arrival order, first copies only (a spooled row may come again).
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut first_order: Vec<String> = Vec::new();
    let mut scanned = 0;
    client
        .collect_while(&sink, Duration::from_secs(120), |got| {
            for (id, _) in &got[scanned..] {
                let n = seen.entry(id.clone()).or_insert(0);
                if *n == 0 && id != "primer" {
                    first_order.push(id.clone());
                }
                *n += 1;
            }
            scanned = got.len();
            first_order.len() < total
        })
        .await;
    assert!(
        eventually(Duration::from_secs(20), || async {
            scalar(&pool, "SELECT count(*) FROM flowgate_outbox").await == 0
        })
        .await,
        "the outbox drains"
    );
    for (id, n) in client.collect_all(&sink, 0, Duration::from_secs(5)).await {
        *seen.entry(id).or_insert(0) += n;
    }
    let missing: Vec<_> = ids
        .iter()
        .chain(grown.iter().map(|(_, id)| id))
        .filter(|i| !seen.contains_key(*i))
        .collect();
    seen.remove("primer");
    let twice: usize = seen.values().map(|n| n - 1).sum();
    println!(
        "after the alarm: {} ids, {twice} published twice",
        seen.len()
    );
    assert!(
        missing.is_empty(),
        "lost {}: {:?}",
        missing.len(),
        &missing[..missing.len().min(20)]
    );
    assert!(twice <= 50, "only a batch's rows may go twice: {twice}");
    // In order: the rows that waited in PostgreSQL through the alarm (none
    // of them was ever spooled: the half-open probes take the oldest rows,
    // which are the first phase's) arrive in the order of their row ids.
    let row_of: HashMap<&str, i64> = grown.iter().map(|(r, id)| (id.as_str(), *r)).collect();
    let arrival: Vec<i64> = first_order
        .iter()
        .filter_map(|id| row_of.get(id.as_str()).copied())
        .collect();
    assert_eq!(arrival.len(), GROWN);
    let inversions = arrival.windows(2).filter(|w| w[0] > w[1]).count();
    assert_eq!(inversions, 0, "the outbox drains in commit order");
    assert!(p.stop().await.clean);
}

/// Rows added behind the open breaker in the alarm test.
const GROWN: usize = 20_000;
/// The alarm test's bound on the daemon's RSS growth while the outbox grows
/// by [`GROWN`] rows of 4 KiB (about 80 MiB): a relay that buffered them in
/// the process would pass it several times over.
const RSS_BOUND_KIB: u64 = 24 * 1024;

/// This process's resident set (the test runs the daemon in-process).
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// `[postgres] statement_timeout` is every pooled connection's
/// `statement_timeout`. Mutation tried: the option not passed — `SHOW`
/// answers the server's default (`0`), and the test fails.
#[actix_rt::test]
async fn the_pool_sets_the_statement_timeout() {
    let db = PrivateDb::create().await;
    let mut cfg = flowgate::config::PostgresConfig {
        url: db.url().to_owned(),
        ..Default::default()
    };
    cfg.statement_timeout = Duration::from_millis(1500);
    let pool = flowgate::postgres::connect(&cfg).unwrap();
    let shown: String = sqlx::query_scalar("SHOW statement_timeout")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(shown, "1500ms");
    let slow = sqlx::query("SELECT pg_sleep(5)").execute(&pool).await;
    assert!(slow.is_err(), "a statement past the timeout is cancelled");
}

/// Inbox rows older than `inbox_retention` are swept; younger ones stay.
/// Mutation tried: the sweep's comparison reversed (`>`): the young rows go
/// and the old stay, and the test fails.
#[actix_rt::test]
async fn inbox_rows_expire_after_the_retention() {
    let db = PrivateDb::create().await;
    let pool = db.pool().await;
    flowgate::postgres::migrate(&pool).await.unwrap();
    effects_table(&pool).await;
    sqlx::query(
        "INSERT INTO flowgate_inbox (stage, message_id, processed_at) \
         SELECT 's1', 'old-' || i, now() - interval '2 hours' FROM generate_series(1, 500) i",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO flowgate_inbox (stage, message_id) \
         SELECT 's1', 'new-' || i FROM generate_series(1, 5) i",
    )
    .execute(&pool)
    .await
    .unwrap();
    let prefix = unique("pg-expire");
    let mut cfg = pg_config(&prefix, &db);
    cfg.postgres.inbox_retention = Duration::from_secs(3600);
    let out = cfg.stages[0].output.clone().unwrap();
    let p = TestPipeline::builder(cfg)
        .engine(move |b| {
            b.tx_handler(
                "write",
                WriteAndForward {
                    exchange: out.exchange,
                    routing_key: out.routing_key,
                },
            )
        })
        .start()
        .await;
    assert!(
        eventually(Duration::from_secs(20), || async {
            scalar(
                &pool,
                "SELECT count(*) FROM flowgate_inbox WHERE message_id LIKE 'old-%'",
            )
            .await
                == 0
        })
        .await,
        "the old rows are swept"
    );
    assert_eq!(
        scalar(
            &pool,
            "SELECT count(*) FROM flowgate_inbox WHERE message_id LIKE 'new-%'"
        )
        .await,
        5,
        "the young rows stay"
    );
    assert!(p.stop().await.clean);
}

/// A row the broker returns as unroutable is marked dead in the outbox,
/// with its reason, and not tried again; the rows after it go out.
/// Mutation tried: every publish error treated as transient — the row is
/// republished on every batch and never marked, and the test fails.
#[actix_rt::test]
async fn an_unroutable_outbox_row_is_marked_dead_not_retried_forever() {
    let db = PrivateDb::create().await;
    let prefix = unique("pg-dead");
    let (p, cfg) = relay_engine(&prefix, &db, Duration::from_millis(100)).await;
    let pool = db.pool().await;
    let ex = cfg.stages[0].output.clone().unwrap();
    let mut tx = pool.begin().await.unwrap();
    Outbox::enqueue(
        &mut tx,
        &ex.exchange,
        "nowhere",
        b"{}".to_vec(),
        Default::default(),
        "lost",
    )
    .await
    .unwrap();
    Outbox::enqueue(
        &mut tx,
        &ex.exchange,
        &ex.routing_key,
        b"{}".to_vec(),
        Default::default(),
        "fine",
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    let got = p
        .client()
        .collect(&format!("{prefix}.sink"), 1, Duration::from_secs(20))
        .await;
    assert_eq!(got[0].0, "fine");
    assert!(
        eventually(Duration::from_secs(10), || async {
            scalar(
                &pool,
                "SELECT count(*) FROM flowgate_outbox WHERE message_id = 'lost' \
                 AND dead_reason LIKE '%unroutable%'",
            )
            .await
                == 1
        })
        .await,
        "the unroutable row is marked dead with its reason"
    );
    let published = p
        .handle()
        .metrics()
        .counter(Metrics::PUBLISH, &["returned"]);
    assert_eq!(published, 1, "the row was published once and returned");
    tokio::time::sleep(Duration::from_millis(500)).await; // five polls
    assert_eq!(
        p.handle()
            .metrics()
            .counter(Metrics::PUBLISH, &["returned"]),
        published,
        "not tried again"
    );
    assert_eq!(
        scalar(
            &pool,
            "SELECT count(*) FROM flowgate_outbox WHERE dead_reason IS NULL"
        )
        .await,
        0
    );
    assert!(p.stop().await.clean);
}
