//! Overload bench (issue 3): a 3-stage pipeline whose middle stage is slow,
//! fed by a producer publishing as fast as it can, run twice — with
//! backpressure (a watermark on the slow stage's input pauses the stage
//! before it) and without (plain prefetch only). Prints, for each: peak
//! depth of the slow stage's input queue, peak RSS of this process (the
//! engine runs in it), p99 end-to-end latency, and messages lost.
//!
//! `FLOWGATE_OVERLOAD_N` (default 200000) sets the message count and
//! `FLOWGATE_OVERLOAD_RATE` (default 2000) the slow stage's msgs/s. Needs the
//! local broker on 127.0.0.1:5672.

use flowgate_testkit as common;

use common::*;
use flowgate::config::Watermark;
use flowgate::Engine;
use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

fn env<T: std::str::FromStr>(k: &str, d: T) -> T {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

fn rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

struct Report {
    peak_depth: u64,
    peak_rss_kb: u64,
    p99_ms: f64,
    lost: usize,
    secs: f64,
}

async fn run(n: usize, slow_rate: u32, backpressure: bool) -> Report {
    let prefix = unique(if backpressure {
        "bench-bp"
    } else {
        "bench-plain"
    });
    let mut cfg = chain_config(&prefix, &["forward", "forward", "forward"], 50);
    cfg.stages[1].rate = Some(slow_rate);
    let slow_q = format!("{prefix}.s2");
    let sink = format!("{prefix}.sink");
    if backpressure {
        for q in &mut cfg.queues {
            if q.name == slow_q {
                q.watermark = Some(Watermark {
                    high: 5000,
                    low: 1000,
                });
            }
        }
        cfg.depth.interval = Duration::from_millis(100);
    }
    let h = Engine::builder()
        .config(cfg.clone())
        .build()
        .expect("config")
        .start()
        .await
        .expect("engine starts");
    assert!(h.wait_ready(Duration::from_secs(30)).await, "engine ready");
    let client = Client::connect(AMQP_URL).await;

    // Samplers: slow-stage input depth and process RSS.
    let done = Arc::new(AtomicBool::new(false));
    let peak_depth = Arc::new(AtomicU64::new(0));
    let peak_rss = Arc::new(AtomicU64::new(0));
    let sampler = {
        let ch = client.conn.create_channel().await.expect("channel");
        let (done, pd, pr, q) = (
            done.clone(),
            peak_depth.clone(),
            peak_rss.clone(),
            slow_q.clone(),
        );
        actix_rt::spawn(async move {
            while !done.load(Ordering::Acquire) {
                if let Ok(d) = ch
                    .queue_declare(
                        q.as_str().into(),
                        QueueDeclareOptions {
                            passive: true,
                            ..Default::default()
                        },
                        FieldTable::default(),
                    )
                    .await
                {
                    pd.fetch_max(u64::from(d.message_count()), Ordering::AcqRel);
                }
                pr.fetch_max(rss_kb(), Ordering::AcqRel);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };

    // Sink consumer: end-to-end latency from the timestamp in the body.
    let consumer = {
        let ch = client.conn.create_channel().await.expect("channel");
        ch.basic_qos(1000, BasicQosOptions::default())
            .await
            .expect("qos");
        let mut c = ch
            .basic_consume(
                sink.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("consume");
        actix_rt::spawn(async move {
            let mut seen = HashSet::with_capacity(n);
            let mut lat = Vec::with_capacity(n);
            let idle = Duration::from_secs(30);
            while seen.len() < n {
                match tokio::time::timeout(idle, c.next()).await {
                    Ok(Some(Ok(d))) => {
                        let mut ts = [0u8; 8];
                        ts.copy_from_slice(&d.data[..8]);
                        lat.push(now_us().saturating_sub(u64::from_le_bytes(ts)));
                        seen.insert(u64::from_le_bytes(
                            d.data[8..16].try_into().expect("8 bytes"),
                        ));
                        let _ = d.ack(BasicAckOptions::default()).await;
                    }
                    _ => break,
                }
            }
            (seen.len(), lat)
        })
    };

    let t0 = std::time::Instant::now();
    let ex = format!("{prefix}.ex");
    let mut pending = futures::stream::FuturesUnordered::new();
    for i in 0..n as u64 {
        let mut body = vec![0u8; 256];
        body[..8].copy_from_slice(&now_us().to_le_bytes());
        body[8..16].copy_from_slice(&i.to_le_bytes());
        let c = client
            .ch
            .basic_publish(
                ex.as_str().into(),
                "in".into(),
                lapin::options::BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                &body,
                lapin::BasicProperties::default()
                    .with_message_id(i.to_string().into())
                    .with_delivery_mode(2),
            )
            .await
            .expect("publish");
        pending.push(c);
        if pending.len() >= 500 {
            let _ = pending.next().await;
        }
    }
    while pending.next().await.is_some() {}
    let produce = t0.elapsed().as_secs_f64();
    let (received, mut lat) = consumer.await.expect("consumer");
    let secs = t0.elapsed().as_secs_f64();
    done.store(true, Ordering::Release);
    let _ = sampler.await;
    lat.sort_unstable();
    let p99 = lat
        .get((lat.len() * 99 / 100).min(lat.len().saturating_sub(1)))
        .copied()
        .unwrap_or(0) as f64
        / 1000.0;
    eprintln!(
        "  producer: {n} msgs in {produce:.1}s ({:.0} msg/s)",
        n as f64 / produce
    );
    h.shutdown().await;
    client.delete_topology(&cfg).await;
    Report {
        peak_depth: peak_depth.load(Ordering::Acquire),
        peak_rss_kb: peak_rss.load(Ordering::Acquire),
        p99_ms: p99,
        lost: n - received,
        secs,
    }
}

fn main() {
    let n: usize = env("FLOWGATE_OVERLOAD_N", 200_000);
    let rate: u32 = env("FLOWGATE_OVERLOAD_RATE", 2000);
    flowgate::run_system(async move {
        println!(
            "overload bench: {n} messages, slow stage {rate} msg/s, prefetch 50, 8 workers/stage"
        );
        for bp in [true, false] {
            let r = run(n, rate, bp).await;
            println!(
                "{:<28} peak depth {:>7}  peak RSS {:>7} kB  p99 latency {:>9.1} ms  lost {:>3}  ({:.1}s)",
                if bp {
                    "backpressure (watermark 5000/1000):"
                } else {
                    "plain prefetch only:"
                },
                r.peak_depth,
                r.peak_rss_kb,
                r.p99_ms,
                r.lost,
                r.secs
            );
        }
    });
}
