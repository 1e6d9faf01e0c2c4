//! Outbox relay latency (issue 27, acceptance 4): writers commit one
//! outbox row per transaction at a steady rate (default 500 rows/s in all,
//! `FLOWGATE_OUTBOX_WRITERS` = 4 connections, each every 4th row: one
//! connection's commit round trips fall behind 500/s on a loaded machine)
//! into a private PostgreSQL database; the engine's relay (woken by
//! `NOTIFY`) publishes each through its publisher; a consumer on the target
//! queue takes them. Prints p50/p99/max of commit (sent) → consumed (the
//! broker has confirmed the publish by then, or very nearly: an upper bound
//! of commit → confirm), the writers' own commit time (sent → returned)
//! and commit (returned) → consumed, and the engine's own relay count. The
//! run time shows whether the writers kept the rate (5,000 rows at 500/s:
//! 10 s).
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
        // When each `commit` returned (the writer's own commit time is
        // part of commit (sent) -> consumed; this separates it).
        let returned: Arc<Mutex<Vec<Option<Instant>>>> = Arc::new(Mutex::new(vec![None; n]));
        let mut lat = Vec::with_capacity(n);
        let mut after_commit = Vec::with_capacity(n);
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

        // Several writers, each committing every `writers`-th row at
        // `rate / writers`: one connection's commit round trips cannot
        // keep 500 commits/s on a loaded machine.
        let writers: usize = env("FLOWGATE_OUTBOX_WRITERS", 4);
        let writer = futures::future::join_all((0..writers).map(|w| {
            let committed = committed.clone();
            let returned = returned.clone();
            let pool = pool.clone();
            let out = out.clone();
            tokio::spawn(async move {
                let period = Duration::from_micros(1_000_000 * writers as u64 / rate);
                let start = tokio::time::Instant::now() + period * w as u32 / writers as u32;
                let mut tick = tokio::time::interval_at(start, period);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                for i in (w..n).step_by(writers) {
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
                    returned.lock().expect("lock")[i] = Some(Instant::now());
                }
            })
        }));
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
            // Read when the row is consumed: a commit that has not
            // returned yet counts as returning now (0).
            if let Some(i) = id {
                let r = returned.lock().expect("lock")[i];
                after_commit.push(r.map_or(Duration::ZERO, |r| at.saturating_duration_since(r)));
            }
            d.ack(BasicAckOptions::default()).await.expect("ack");
        }
        let elapsed = started.elapsed();
        for w in writer.await {
            w.expect("writer");
        }
        lat.sort();
        after_commit.sort();
        let commits: Vec<Duration> = {
            let c = committed.lock().expect("lock");
            let r = returned.lock().expect("lock");
            let mut v: Vec<Duration> = c
                .iter()
                .zip(r.iter())
                .filter_map(|(c, r)| Some(r.as_ref()?.saturating_duration_since(*c.as_ref()?)))
                .collect();
            v.sort();
            v
        };
        println!(
            "  of which the writer's commit (sent -> returned) p50 {:.1} ms, p99 {:.1} ms; commit returned -> consumed p50 {:.1} ms, p99 {:.1} ms",
            percentile(&commits, 0.50).as_secs_f64() * 1000.0,
            percentile(&commits, 0.99).as_secs_f64() * 1000.0,
            percentile(&after_commit, 0.50).as_secs_f64() * 1000.0,
            percentile(&after_commit, 0.99).as_secs_f64() * 1000.0,
        );
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
