//! End-to-end throughput: the same 3-hop forward pipeline through flowgate
//! and through a plain lapin pipeline written here, in the same run.
//!
//! Persistent messages, durable quorum queues, publisher confirms, prefetch
//! 50, 256-byte bodies, 50,000 messages (override with
//! `FLOWGATE_BENCH_MESSAGES`). Each hop acks its input only after its output
//! is confirmed, in both pipelines. Prints msgs/s and p50/p99 end-to-end
//! latency for both, and the ratio. The engine runs twice: without any
//! `tracing` subscriber (spans and events disabled entirely), then with the
//! daemon's subscriber and `[telemetry]` off, whose ratio shows what export
//! off costs (it should be 1 within noise).
//!
//! Run: `cargo bench --bench pipeline` (needs RabbitMQ on 127.0.0.1:5672).

use flowgate::config::QueueKind;
use flowgate::Engine;
use flowgate_testkit::delete_topology as cleanup;
use flowgate_testkit::driver::{drive, pipeline_config, RunStats};
use futures::StreamExt;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use std::time::Duration;

const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const HOPS: usize = 3;
const PREFETCH: u16 = 50;
const BODY: usize = 256;

fn messages() -> usize {
    std::env::var("FLOWGATE_BENCH_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50_000)
}

/// The baseline: per hop, one consumer (prefetch 50) and one confirm-mode
/// publishing channel on separate connections; each delivery is republished
/// to the next hop and acked once the broker confirmed it.
async fn raw_lapin_pipeline(prefix: &str) -> Vec<Connection> {
    let mut conns = Vec::new();
    for i in 0..HOPS {
        let cc = Connection::connect(URL, ConnectionProperties::default())
            .await
            .expect("connect");
        let pc = Connection::connect(URL, ConnectionProperties::default())
            .await
            .expect("connect");
        let cch = cc.create_channel().await.expect("channel");
        cch.basic_qos(PREFETCH, BasicQosOptions::default())
            .await
            .expect("qos");
        let pch = pc.create_channel().await.expect("channel");
        pch.confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirms");
        let mut consumer = cch
            .basic_consume(
                format!("{prefix}.s{}", i + 1).as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("consume");
        let ex = format!("{prefix}.ex");
        let key = format!("hop{}", i + 1);
        tokio::spawn(async move {
            while let Some(Ok(d)) = consumer.next().await {
                let pch = pch.clone();
                let (ex, key) = (ex.clone(), key.clone());
                tokio::spawn(async move {
                    let confirm = pch
                        .basic_publish(
                            ex.as_str().into(),
                            key.as_str().into(),
                            BasicPublishOptions {
                                mandatory: true,
                                immediate: false,
                            },
                            &d.data,
                            d.properties.clone().with_delivery_mode(2),
                        )
                        .await
                        .expect("publish");
                    if confirm.await.is_ok() {
                        let _ = d.ack(BasicAckOptions::default()).await;
                    }
                });
            }
        });
        conns.push(cc);
        conns.push(pc);
    }
    conns
}

async fn declare(cfg: &flowgate::Config) {
    let conn = Connection::connect(URL, ConnectionProperties::default())
        .await
        .expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    flowgate::topology::declare(&ch, cfg)
        .await
        .expect("declare");
    let _ = conn.close(200, "".into()).await;
}

async fn measure(prefix: &str, n: usize) -> RunStats {
    drive(
        URL,
        &format!("{prefix}.ex"),
        "in",
        &format!("{prefix}.sink"),
        n,
        BODY,
        Duration::from_secs(600),
        |_| {},
    )
    .await
    .expect("drive")
}

/// The 3-hop pipeline through the engine, measured once.
async fn flowgate_run(n: usize) -> RunStats {
    let fg_prefix = format!(
        "bench-fg-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let cfg = pipeline_config(&fg_prefix, HOPS, u32::from(PREFETCH), QueueKind::Quorum);
    let handle = Engine::builder()
        .config(cfg.clone())
        .build()
        .expect("config")
        .start()
        .await
        .expect("start");
    handle.wait_ready(Duration::from_secs(20)).await;
    let fg = measure(&fg_prefix, n).await;
    handle.shutdown().await;
    cleanup(URL, &cfg).await;
    fg
}

fn report(name: &str, s: &RunStats) {
    println!(
        "{name:<14} {:>8} msgs  {:>9.0} msg/s  p50 {:>8.1} ms  p99 {:>8.1} ms  lost {}",
        s.received,
        s.throughput(),
        s.percentile(0.5).as_secs_f64() * 1e3,
        s.percentile(0.99).as_secs_f64() * 1e3,
        s.sent - s.received
    );
}

fn main() {
    let n = messages();
    flowgate::run_system(async move {
        // Baseline first.
        let base_prefix = format!(
            "bench-raw-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let base_cfg = pipeline_config(&base_prefix, HOPS, u32::from(PREFETCH), QueueKind::Quorum);
        declare(&base_cfg).await;
        let conns = raw_lapin_pipeline(&base_prefix).await;
        let base = measure(&base_prefix, n).await;
        for c in conns {
            let _ = c.close(200, "".into()).await;
        }
        cleanup(URL, &base_cfg).await;

        // No subscriber at all: every span and event disabled entirely.
        let fg = flowgate_run(n).await;
        // The daemon's subscriber with `[telemetry]` off (the default): the
        // span gate must make this cost nothing beyond noise.
        let telemetry = flowgate::log::init(&flowgate::Config::default()).expect("subscriber");
        assert!(!telemetry.is_enabled());
        let fg_off = flowgate_run(n).await;

        println!(
            "\n3-hop pipeline, {n} persistent {BODY}-byte messages, confirms, prefetch {PREFETCH}"
        );
        report("plain lapin", &base);
        report("flowgate", &fg);
        report("telemetry off", &fg_off);
        println!(
            "ratio (flowgate / lapin throughput): {:.2}",
            fg.throughput() / base.throughput().max(1e-9)
        );
        println!(
            "ratio (telemetry off, log subscriber / no subscriber): {:.2}",
            fg_off.throughput() / fg.throughput().max(1e-9)
        );
    });
}
