//! The main job: a pipeline run end to end on the local broker.
//!
//! `flowgate demo` declares a uniquely named 3-stage forward pipeline
//! (`ingress → s1 → s2 → s3 → sink`), publishes synthetic orders with
//! confirms, waits until every one reached the sink queue, prints a summary
//! and removes what it declared. The same harness drives the benchmarks.

use crate::config::{
    Binding, Config, ExchangeConfig, ExchangeType, QueueConfig, QueueKind, StageConfig, Target,
};
use crate::Engine;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use std::collections::HashSet;
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// `flowgate demo` options.
#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// Messages to send.
    #[arg(long, default_value_t = 5000)]
    pub messages: usize,
    /// Broker URL.
    #[arg(
        long,
        env = "FLOWGATE__AMQP__URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    pub url: String,
    /// Prefetch per stage.
    #[arg(long, default_value_t = 50)]
    pub prefetch: u32,
    /// Body size in bytes.
    #[arg(long, default_value_t = 256)]
    pub body_bytes: usize,
    /// Hide the progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// The topology and stages of an `hops`-stage forward pipeline named `prefix`.
pub fn pipeline_config(prefix: &str, hops: usize, prefetch: u32, kind: QueueKind) -> Config {
    let ex = format!("{prefix}.ex");
    let mut cfg = Config::default();
    cfg.http.bind = String::new();
    cfg.amqp.connection_name = prefix.to_owned();
    cfg.exchanges.push(ExchangeConfig {
        name: ex.clone(),
        kind: ExchangeType::Topic,
    });
    for i in 0..=hops {
        let name = if i == hops {
            format!("{prefix}.sink")
        } else {
            format!("{prefix}.s{}", i + 1)
        };
        let key = if i == 0 {
            "in".to_owned()
        } else {
            format!("hop{i}")
        };
        cfg.queues.push(QueueConfig {
            name,
            kind,
            bindings: vec![Binding {
                exchange: ex.clone(),
                routing_key: key,
            }],
            dead_letter: true,
            delivery_limit: Some(20),
            watermark: None,
        });
    }
    for i in 0..hops {
        cfg.stages.push(StageConfig {
            name: format!("s{}", i + 1),
            queue: format!("{prefix}.s{}", i + 1),
            handler: "forward".into(),
            prefetch,
            concurrency: crate::config::Concurrency::Fixed(8),
            output: Some(Target {
                exchange: ex.clone(),
                routing_key: format!("hop{}", i + 1),
            }),
            delay: None,
            rate: None,
        });
    }
    cfg
}

/// What one run measured.
#[derive(Debug, Clone, Default)]
pub struct RunStats {
    /// Published and confirmed into the pipeline.
    pub sent: usize,
    /// Distinct ids that reached the sink.
    pub received: usize,
    /// Arrivals of an id already seen.
    pub duplicates: usize,
    /// Wall time from first publish to last arrival.
    pub elapsed: Duration,
    /// End-to-end latencies, sorted.
    pub latencies: Vec<Duration>,
}

impl RunStats {
    /// Messages per second through the whole pipeline.
    pub fn throughput(&self) -> f64 {
        self.received as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// A latency percentile (0.0..=1.0).
    pub fn percentile(&self, p: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let idx = ((self.latencies.len() - 1) as f64 * p).round() as usize;
        self.latencies[idx.min(self.latencies.len() - 1)]
    }
}

fn now_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// Publishes `n` messages to `exchange`/`key` with confirms (window of
/// `window` in flight), while consuming `sink` until every id arrived or
/// `timeout` passes. `progress` is called with the number received so far.
#[allow(clippy::too_many_arguments)]
pub async fn drive(
    url: &str,
    exchange: &str,
    key: &str,
    sink: &str,
    n: usize,
    body_bytes: usize,
    timeout: Duration,
    progress: impl Fn(usize) + Send + 'static,
) -> Result<RunStats, lapin::Error> {
    let conn = Connection::connect(
        url,
        ConnectionProperties::default().with_connection_name("flowgate-demo-driver".into()),
    )
    .await?;
    let cons_conn = Connection::connect(
        url,
        ConnectionProperties::default().with_connection_name("flowgate-demo-sink".into()),
    )
    .await?;
    let pch = conn.create_channel().await?;
    pch.confirm_select(ConfirmSelectOptions::default()).await?;
    let cch = cons_conn.create_channel().await?;
    cch.basic_qos(500, BasicQosOptions::default()).await?;
    let mut consumer = cch
        .basic_consume(
            sink.into(),
            "demo-sink".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let started = Instant::now();
    let collector = tokio::spawn(async move {
        let mut seen = HashSet::with_capacity(n);
        let mut lat = Vec::with_capacity(n);
        let mut dups = 0;
        let deadline = tokio::time::Instant::now() + timeout;
        while seen.len() < n {
            let d = match tokio::time::timeout_at(deadline, consumer.next()).await {
                Ok(Some(Ok(d))) => d,
                _ => break,
            };
            let id = d
                .properties
                .message_id()
                .as_ref()
                .map(|s| s.to_string())
                .unwrap_or_default();
            let sent_at = d
                .properties
                .headers()
                .as_ref()
                .and_then(|h| h.inner().get("x-sent-at"))
                .and_then(flowgate_actors::message::header_int);
            if seen.insert(id) {
                if let Some(t) = sent_at {
                    lat.push(Duration::from_micros((now_micros() - t).max(0) as u64));
                }
                progress(seen.len());
            } else {
                dups += 1;
            }
            let _ = next_ack(&d).await;
        }
        (seen.len(), dups, lat, started.elapsed())
    });
    let body = vec![b'x'; body_bytes];
    let window = 256;
    let mut pending = futures::stream::FuturesUnordered::new();
    let mut sent = 0;
    for i in 0..n {
        let mut headers = FieldTable::default();
        headers.insert(
            ShortString::from("x-sent-at"),
            AMQPValue::LongLongInt(now_micros()),
        );
        let props = BasicProperties::default()
            .with_message_id(format!("m-{i}").into())
            .with_delivery_mode(2)
            .with_headers(headers);
        let confirm = pch
            .basic_publish(
                exchange.into(),
                key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                &body,
                props,
            )
            .await?;
        pending.push(confirm);
        if pending.len() >= window {
            if let Some(r) = pending.next().await {
                r?;
                sent += 1;
            }
        }
    }
    while let Some(r) = pending.next().await {
        r?;
        sent += 1;
    }
    let (received, duplicates, mut latencies, elapsed) = collector.await.unwrap_or_default();
    latencies.sort();
    let _ = conn.close(200, "done".into()).await;
    let _ = cons_conn.close(200, "done".into()).await;
    Ok(RunStats {
        sent,
        received,
        duplicates,
        elapsed,
        latencies,
    })
}

async fn next_ack(d: &lapin::message::Delivery) -> Result<bool, lapin::Error> {
    d.ack(BasicAckOptions::default()).await
}

/// How the broker URL's host answers, as a one-line hint when it does not.
pub async fn broker_reachable(url: &str) -> Result<(), String> {
    let parsed = url::Url::parse(url).map_err(|e| format!("malformed broker URL ({e})"))?;
    let host = parsed.host_str().unwrap_or("127.0.0.1").to_owned();
    let port = parsed.port().unwrap_or(if parsed.scheme() == "amqps" {
        5671
    } else {
        5672
    });
    match tokio::time::timeout(
        Duration::from_secs(3),
        tokio::net::TcpStream::connect((host.as_str(), port)),
    )
    .await
    {
        Ok(Ok(_)) => Ok(()),
        _ => Err(format!(
            "no RabbitMQ broker answers on {host}:{port}.\n\
             Start one with `scripts/services.sh` (installs and starts RabbitMQ and Redis),\n\
             or `sudo rabbitmq-server -detached`, or `docker run -d -p 5672:5672 rabbitmq:3`,\n\
             then run the demo again (or point FLOWGATE__AMQP__URL at your broker)."
        )),
    }
}

/// `flowgate demo`.
pub async fn run(args: DemoArgs) -> ExitCode {
    if let Err(hint) = broker_reachable(&args.url).await {
        eprintln!("flowgate demo: {hint}");
        return ExitCode::from(3);
    }
    let prefix = format!(
        "fg-demo-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let mut cfg = pipeline_config(&prefix, 3, args.prefetch, QueueKind::Quorum);
    cfg.amqp.url = args.url.clone();
    cfg.http.bind = "127.0.0.1:0".into();
    println!(
        "flowgate demo: 3-stage pipeline `{prefix}`, {} messages of {} bytes",
        args.messages, args.body_bytes
    );
    let engine = match Engine::builder().config(cfg.clone()).build() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("flowgate demo: {e}");
            return ExitCode::from(2);
        }
    };
    let handle = match engine.start().await {
        Ok(h) => h,
        Err(e) => {
            eprintln!("flowgate demo: cannot start the engine: {e}");
            return ExitCode::from(1);
        }
    };
    if let Some(a) = handle.http_addr() {
        println!("metrics: http://{a}/metrics   readiness: http://{a}/readyz");
    }
    handle.wait_ready(Duration::from_secs(15)).await;
    let bar = if args.quiet {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(args.messages as u64)
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {pos}/{len} delivered  {per_sec}  eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let b = bar.clone();
    let stats = drive(
        &args.url,
        &format!("{prefix}.ex"),
        "in",
        &format!("{prefix}.sink"),
        args.messages,
        args.body_bytes,
        Duration::from_secs(300),
        move |k| b.set_position(k as u64),
    )
    .await;
    bar.finish_and_clear();
    let metrics = handle.metrics().clone();
    handle.shutdown().await;
    cleanup(&args.url, &cfg).await;
    let stats = match stats {
        Ok(s) => s,
        Err(e) => {
            eprintln!("flowgate demo: broker error: {e}");
            return ExitCode::from(1);
        }
    };
    println!();
    println!("  sent (confirmed)        {:>10}", stats.sent);
    println!("  reached the sink        {:>10}", stats.received);
    for s in &cfg.stages {
        println!(
            "  stage {:<6} processed  {:>10}",
            s.name,
            metrics.acked.with_label_values(&[&s.name]).get()
        );
    }
    let dead: u64 = cfg
        .stages
        .iter()
        .map(|s| {
            ["handler-error", "panic", "unroutable"]
                .iter()
                .map(|r| {
                    metrics
                        .dead_lettered
                        .with_label_values(&[s.name.as_str(), r])
                        .get()
                })
                .sum::<u64>()
        })
        .sum();
    println!("  dead-lettered           {dead:>10}");
    println!("  duplicates at sink      {:>10}", stats.duplicates);
    println!(
        "  throughput              {:>10.0} msg/s",
        stats.throughput()
    );
    println!(
        "  latency p50             {:>10.1} ms",
        stats.percentile(0.5).as_secs_f64() * 1e3
    );
    println!(
        "  latency p99             {:>10.1} ms",
        stats.percentile(0.99).as_secs_f64() * 1e3
    );
    if stats.received == stats.sent && stats.sent == args.messages {
        println!(
            "\nall {} messages delivered exactly once; topology removed.",
            stats.sent
        );
        ExitCode::SUCCESS
    } else {
        eprintln!(
            "\nflowgate demo: {} of {} messages reached the sink",
            stats.received, args.messages
        );
        ExitCode::from(1)
    }
}

/// Deletes the demo's topology.
pub async fn cleanup(url: &str, cfg: &Config) {
    if let Ok(conn) = Connection::connect(url, ConnectionProperties::default()).await {
        if let Ok(ch) = conn.create_channel().await {
            if let Err(e) = crate::topology::delete(&ch, cfg).await {
                tracing::warn!(error = %e, "cleanup failed");
            }
        }
        let _ = conn.close(200, "cleanup".into()).await;
    }
}
