//! Outbox relay latency (issue 27, acceptance 4): a writer commits one
//! outbox row at a time at a steady rate (default 500 rows/s) into a
//! private PostgreSQL database; the engine's relay (woken by `NOTIFY`)
//! publishes each through its publisher; a consumer on the target queue
//! takes them. Prints p50/p99/max of commit (sent) → consumed (the broker has
//! confirmed the publish by then, or very nearly: an upper bound of commit
//! → confirm), and the engine's own relay count.
//!
//! `FLOWGATE_OUTBOX_RATE` (default 500) and `FLOWGATE_OUTBOX_N` (default
//! 5000). Needs the local broker and PostgreSQL (`scripts/services.sh`):
//! `cargo bench --bench outbox`.

use flowgate_testkit as common;

use common::postgres::PrivateDb;
use common::*;
use flowgate::postgres::Outbox;
use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn env<T: std::str::FromStr>(k: &str, d: T) -> T {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn main() {
    let rate: u64 = env("FLOWGATE_OUTBOX_RATE", 500);
    let n: usize = env("FLOWGATE_OUTBOX_N", 5000);
    flowgate::run_system(async move {
        let db = PrivateDb::create().await;
        let prefix = unique("bench-outbox");
        let mut cfg = chain_config(&prefix, &["sink"], 10);
        cfg.postgres.url = db.url().to_owned();
        cfg.postgres.migrate_on_start = true;
        let out = cfg.stages[0].output.clone().expect("an output");
        let p = TestPipeline::builder(cfg).start().await;
        let pool = db.pool().await;

        let committed: Arc<Mutex<Vec<Option<Instant>>>> = Arc::new(Mutex::new(vec![None; n]));
        let mut lat = Vec::with_capacity(n);
        let ch = p.client().conn.create_channel().await.expect("channel");
        ch.basic_qos(500, BasicQosOptions::default())
            .await
            .expect("qos");
        let mut consumer = ch
            .basic_consume(
                format!("{prefix}.sink").as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("consume");

        let writer = {
            let committed = committed.clone();
            let pool = pool.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
                for i in 0..n {
                    tick.tick().await;
                    let mut tx = pool.begin().await.expect("begin");
                    Outbox::enqueue(
                        &mut tx,
                        &out.exchange,
                        &out.routing_key,
                        vec![0u8; 256],
                        FieldTable::default(),
                        &i.to_string(),
                    )
                    .await
                    .expect("enqueue");
                    // Stamped as the commit is sent: the relay may publish
                    // (and the consumer take) the row before `commit` returns.
                    committed.lock().expect("lock")[i] = Some(Instant::now());
                    tx.commit().await.expect("commit");
                }
            })
        };
        let started = Instant::now();
        while lat.len() < n {
            let Ok(Some(Ok(d))) =
                tokio::time::timeout(Duration::from_secs(30), consumer.next()).await
            else {
                break;
            };
            let at = Instant::now();
            let id: Option<usize> = d
                .properties
                .message_id()
                .as_ref()
                .and_then(|s| s.as_str().parse().ok());
            if let Some(c) = id.and_then(|i| committed.lock().expect("lock")[i]) {
                lat.push(at.saturating_duration_since(c));
            }
            d.ack(BasicAckOptions::default()).await.expect("ack");
        }
        let elapsed = started.elapsed();
        writer.await.expect("writer");
        lat.sort();
        println!(
            "outbox relay: {} of {n} rows at {rate} rows/s in {:.1}s; commit -> consumed p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; relayed {}",
            lat.len(),
            elapsed.as_secs_f64(),
            percentile(&lat, 0.50).as_secs_f64() * 1000.0,
            percentile(&lat, 0.99).as_secs_f64() * 1000.0,
            lat.last().copied().unwrap_or_default().as_secs_f64() * 1000.0,
            p.handle()
                .metrics()
                .counter(flowgate::Metrics::OUTBOX_RELAYED, &[]),
        );
        p.stop().await;
    });
}
