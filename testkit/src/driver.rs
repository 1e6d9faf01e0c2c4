//! The publish/collect driver of the benches and the end-to-end tests: an
//! `hops`-stage chain config, publishing with confirms while a raw consumer
//! collects the sink, and what one run measured.

use flowgate::config::{
    Binding, Concurrency, Config, ExchangeConfig, ExchangeType, QueueConfig, QueueKind,
    StageConfig, Target,
};
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use std::collections::HashSet;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The topology and stages of an `hops`-stage forward pipeline named `prefix`.
pub fn pipeline_config(prefix: &str, hops: usize, prefetch: u32, kind: QueueKind) -> Config {
    chain_config(prefix, &vec!["forward"; hops], prefetch, kind)
}

/// A chain `prefix.s1 → … → prefix.sN → prefix.sink` on topic exchange
/// `prefix.ex` (input routing key `in`, stage `i` publishes `hop<i>`), one
/// stage per handler name. The benches and the tests build on it.
pub fn chain_config(prefix: &str, handlers: &[&str], prefetch: u32, kind: QueueKind) -> Config {
    let hops = handlers.len();
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
            dead_letter_kind: None,
            delivery_limit: Some(20),
            watermark: None,
            single_active_consumer: false,
            partitions: None,
            partition_key: None,
        });
    }
    for (i, h) in handlers.iter().enumerate() {
        cfg.stages.push(StageConfig {
            prefetch,
            concurrency: Concurrency::Fixed(8),
            output: Some(Target {
                exchange: ex.clone(),
                routing_key: format!("hop{}", i + 1),
            }),
            ..StageConfig::new(format!("s{}", i + 1), format!("{prefix}.s{}", i + 1), *h)
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
    drive_at(
        url, exchange, key, sink, n, body_bytes, None, timeout, progress,
    )
    .await
}

/// [`drive`] at a fixed rate: message `i` is published `i / rate` seconds
/// after the first (`None`: as fast as confirms allow).
#[allow(clippy::too_many_arguments)]
pub async fn drive_at(
    url: &str,
    exchange: &str,
    key: &str,
    sink: &str,
    n: usize,
    body_bytes: usize,
    rate: Option<f64>,
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
                .and_then(flowgate::envelope::header_int);
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
    let paced_from = tokio::time::Instant::now();
    for i in 0..n {
        if let Some(r) = rate.filter(|r| *r > 0.0) {
            tokio::time::sleep_until(paced_from + Duration::from_secs_f64(i as f64 / r)).await;
        }
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
