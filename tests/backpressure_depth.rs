//! Backpressure through queue depth (issue 3): watermarks hold an overloaded
//! pipeline's slow-stage input queue bounded, and autoscaling follows the
//! backlog.

use flowgate_testkit as common;

use common::*;
use flowgate::config::{Concurrency, Watermark};
use flowgate::Engine;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Peak resident set of this process (kB), from /proc.
fn peak_rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Overload, CI-sized: the scenario is 200,000 messages; the same
/// pipeline and assertions run here with 8,000 (the 200k run is
/// `cargo bench --bench overload`).
#[actix_rt::test]
async fn overload_keeps_the_slow_stage_input_within_its_watermark_and_loses_nothing() {
    const N: usize = 6_000;
    const SLOW_RATE: u32 = 500;
    const HIGH: u64 = 400;
    const PREFETCH: u32 = 20;
    let prefix = unique("overload");
    let mut cfg = chain_config(&prefix, &["forward", "forward", "forward"], PREFETCH);
    cfg.stages[1].rate = Some(SLOW_RATE);
    let slow_q = format!("{prefix}.s2");
    for q in &mut cfg.queues {
        if q.name == slow_q {
            q.watermark = Some(Watermark {
                high: HIGH,
                low: 100,
            });
        }
    }
    cfg.depth.interval = Duration::from_millis(50);
    let h = Engine::builder()
        .config(cfg.clone())
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    assert!(h.wait_ready(Duration::from_secs(20)).await, "engine ready");
    let client = Client::connect(AMQP_URL).await;

    // Sample the slow stage's input depth independently of the engine.
    let peak = Arc::new(AtomicU32::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let ch = client.conn.create_channel().await.unwrap();
        let (peak, done, q) = (peak.clone(), done.clone(), slow_q.clone());
        actix_rt::spawn(async move {
            while !done.load(Ordering::Acquire) {
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
                peak.fetch_max(d, Ordering::AcqRel);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };

    let ids: Vec<String> = (0..N).map(|i| format!("o{i}")).collect();
    let t0 = std::time::Instant::now();
    client
        .publish_many(&format!("{prefix}.ex"), "in", &ids, &[7u8; 256])
        .await;
    let produce_rate = N as f64 / t0.elapsed().as_secs_f64();
    let got = client
        .collect(&format!("{prefix}.sink"), N, Duration::from_secs(120))
        .await;
    done.store(true, Ordering::Release);
    sampler.await.unwrap();
    let peak = u64::from(peak.load(Ordering::Acquire));
    eprintln!(
        "overload: {N} msgs, producer {produce_rate:.0} msg/s vs slow stage {SLOW_RATE}/s; \
         peak depth of the slow stage's input {peak} (high {HIGH}); peak RSS {} kB",
        peak_rss_kb()
    );

    let c = counts(got.into_iter().map(|(id, _)| id));
    assert_eq!(c.len(), N, "every message processed");
    assert!(c.values().all(|n| *n == 1), "none twice");
    assert!(
        peak <= HIGH + u64::from(PREFETCH),
        "slow stage's input peaked at {peak}, above high {HIGH} + one prefetch window {PREFETCH}"
    );
    assert!(
        h.metrics()
            .stage_paused
            .with_label_values(&["s1", "watermark"])
            .get()
            == 0,
        "upstream resumed once drained"
    );
    h.shutdown().await;
    for s in ["s1", "s2", "s3"] {
        assert_eq!(h.metrics().acked.with_label_values(&[s]).get(), N as u64);
    }
    client.delete_topology(&cfg).await;
}

#[actix_rt::test]
async fn a_backlog_scales_workers_to_max_and_draining_returns_them_to_min() {
    const N: usize = 1_500;
    let prefix = unique("scale");
    let mut cfg = chain_config(&prefix, &["forward"], 20);
    cfg.stages[0].concurrency = Concurrency::Range { min: 1, max: 4 };
    cfg.stages[0].delay = Some(Duration::from_millis(10));
    cfg.depth.interval = Duration::from_millis(100);
    cfg.depth.cooldown = Duration::from_millis(300);
    let h = Engine::builder()
        .config(cfg.clone())
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    assert!(h.wait_ready(Duration::from_secs(20)).await, "engine ready");
    let probe = h.stages()[0].clone();
    assert_eq!(probe.workers(), 1, "starts at min");

    let client = Client::connect(AMQP_URL).await;
    let ids: Vec<String> = (0..N).map(|i| format!("w{i}")).collect();
    client
        .publish_many(&format!("{prefix}.ex"), "in", &ids, b"x")
        .await;
    let m = h.metrics().clone();
    assert!(
        eventually(Duration::from_secs(20), || async {
            probe.workers() == 4 && m.stage_workers.with_label_values(&["s1"]).get() == 4
        })
        .await,
        "backlog scales up to max (workers {})",
        probe.workers()
    );
    let got = client
        .collect(&format!("{prefix}.sink"), N, Duration::from_secs(60))
        .await;
    assert_eq!(counts(got.into_iter().map(|(id, _)| id)).len(), N);
    assert!(
        eventually(Duration::from_secs(20), || async { probe.workers() == 1 }).await,
        "drained stage returns to min (workers {})",
        probe.workers()
    );
    assert!(m.stage_scaling.with_label_values(&["s1", "up"]).get() >= 2);
    assert!(m.stage_scaling.with_label_values(&["s1", "down"]).get() >= 2);
    h.shutdown().await;
    client.delete_topology(&cfg).await;
}
