//! The main job: the order pipeline run end to end on the local broker.
//!
//! `flowgate demo` declares a uniquely named copy of `config/orders.toml`,
//! starts the services and the gateway, drives a few thousand orders over
//! HTTP (see [`crate::orders::load`]), prints the summary and removes what
//! it declared. `--serve` keeps it running; `--chaos` runs the services as
//! worker processes that get killed ([`crate::orders::chaos`]).
//!
//! [`drive`] and [`pipeline_config`] are the raw AMQP harness the
//! benchmarks use: an `hops`-stage forward pipeline, publish with confirms,
//! wait until every message reached the sink.

use crate::config::{
    Binding, Config, ExchangeConfig, ExchangeType, QueueConfig, QueueKind, StageConfig, Target,
};
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
    /// Orders to drive through the gateway.
    #[arg(long, default_value_t = 3000)]
    pub orders: usize,
    /// Order rate (5x the payment provider's default 100 charges/s, so the
    /// gateway has to push back).
    #[arg(long, default_value = "500/s")]
    pub rate: crate::orders::load::Rate,
    /// HTTP requests in flight at most.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Broker URL.
    #[arg(
        long,
        env = "FLOWGATE__AMQP__URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    pub url: String,
    /// An order-flow config to run instead of the built-in `config/orders.toml`.
    #[arg(long, short)]
    pub config: Option<std::path::PathBuf>,
    /// Keep the flow running for manual `curl` use (until Ctrl-C).
    #[arg(long)]
    pub serve: bool,
    /// Gateway address with `--serve`.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub bind: String,
    /// Run the services as separate worker processes and SIGKILL/restart
    /// them at random during the run (needs Redis).
    #[arg(long)]
    pub chaos: bool,
    /// Redis for `--chaos` (the workers' shared records).
    #[arg(
        long,
        env = "FLOWGATE__ORDERS__REDIS_URL",
        default_value = "redis://127.0.0.1:6379"
    )]
    pub redis_url: String,
    /// Give up on orders when no status moved for this long.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub wait: Duration,
    /// Hide the progress bars.
    #[arg(long)]
    pub quiet: bool,
}

/// The topology and stages of an `hops`-stage forward pipeline named `prefix`.
pub fn pipeline_config(prefix: &str, hops: usize, prefetch: u32, kind: QueueKind) -> Config {
    chain_config(prefix, &vec!["forward"; hops], prefetch, kind)
}

/// A chain `prefix.s1 → … → prefix.sN → prefix.sink` on topic exchange
/// `prefix.ex` (input routing key `in`, stage `i` publishes `hop<i>`), one
/// stage per handler name. The demo, the benches and the tests build on it.
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
            delivery_limit: Some(20),
            watermark: None,
        });
    }
    for (i, h) in handlers.iter().enumerate() {
        cfg.stages.push(StageConfig {
            name: format!("s{}", i + 1),
            queue: format!("{prefix}.s{}", i + 1),
            handler: (*h).to_owned(),
            prefetch,
            concurrency: crate::config::Concurrency::Fixed(8),
            output: Some(Target {
                exchange: ex.clone(),
                routing_key: format!("hop{}", i + 1),
            }),
            delay: None,
            rate: None,
            retry: None,
            dedup: Default::default(),
            payload: Default::default(),
            record_file: None,
            verify: None,
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

const FLOW: &str = concat!(
    "  POST /orders ─▶ gateway ─order.created─▶ reserve ─order.reserved─▶ pay (throttled) ─order.paid─▶ ship ─order.shipped─▶ track\n",
    "                     │                        └─ out of stock ─▶ dead letter (+ copy ─▶ track: failed)\n",
    "  GET /orders/{id} ◀─ status view ◀──────────────────────────────────────────────────────────────────────────────┘"
);

fn redis_addr(url: &str) -> Result<(String, u16), String> {
    let u = url::Url::parse(url).map_err(|e| format!("malformed Redis URL ({e})"))?;
    Ok((
        u.host_str().unwrap_or("127.0.0.1").to_owned(),
        u.port().unwrap_or(6379),
    ))
}

async fn redis_reachable(url: &str) -> Result<(), String> {
    let (host, port) = redis_addr(url)?;
    match tokio::time::timeout(
        Duration::from_secs(3),
        tokio::net::TcpStream::connect((host.as_str(), port)),
    )
    .await
    {
        Ok(Ok(_)) => Ok(()),
        _ => Err(format!(
            "no Redis answers on {host}:{port} (the chaos run keeps the workers' records there).\n\
             Start one with `scripts/services.sh` or `redis-server --daemonize yes`,\n\
             or point --redis-url / FLOWGATE__ORDERS__REDIS_URL at yours."
        )),
    }
}

/// `queue high/low, ...` of the queues with a watermark, without the
/// demo's name prefix.
fn watermarks(cfg: &Config) -> String {
    let list: Vec<String> = cfg
        .queues
        .iter()
        .filter_map(|q| {
            let w = q.watermark?;
            let name = q.name.split_once('.').map_or(q.name.as_str(), |(_, n)| n);
            Some(format!("{name} {}/{}", w.high, w.low))
        })
        .collect();
    if list.is_empty() {
        "none configured".into()
    } else {
        list.join(", ")
    }
}

/// `flowgate demo`: the order pipeline on the local broker, driven over
/// HTTP, summarised, cleaned up. `--serve` keeps it running; `--chaos` runs
/// the services as worker processes that get killed.
pub async fn run(args: DemoArgs) -> ExitCode {
    if let Err(hint) = broker_reachable(&args.url).await {
        eprintln!("flowgate demo: {hint}");
        return ExitCode::from(3);
    }
    let base = match &args.config {
        Some(p) => Config::load(p),
        None => crate::orders::default_config(),
    };
    let base = match base {
        Ok(c) => c,
        Err(e) => {
            eprintln!("flowgate demo: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    let prefix = format!(
        "fg-demo-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let mut cfg = crate::orders::uniquely_named(&base, &prefix);
    cfg.amqp.url = args.url.clone();
    cfg.http.bind = "127.0.0.1:0".into();
    cfg.orders.gateway_bind = if args.serve {
        args.bind.clone()
    } else {
        "127.0.0.1:0".into()
    };
    let plan = crate::orders::load::LoadPlan {
        url: String::new(),
        orders: args.orders,
        rate: Some(args.rate.0),
        concurrency: args.concurrency.max(1),
        scarce_every: 50,
        wait: args.wait,
        quiet: args.quiet,
    };
    println!("flowgate demo: the order pipeline, topology `{prefix}.*`\n\n{FLOW}\n");
    println!(
        "payment provider: {} charges/s, {:?} per call, {:.0}% transient failures; \
         gateway refuses new orders (503) while a queue is above its watermark ({})",
        cfg.orders.payment_rate,
        cfg.orders.payment_latency,
        cfg.orders.payment_failure_rate * 100.0,
        watermarks(&cfg)
    );
    if args.chaos {
        return run_chaos(args, cfg, plan, &prefix).await;
    }

    let app = match crate::orders::start(cfg.clone()).await {
        Ok(a) => a,
        Err(e) => {
            eprintln!("flowgate demo: cannot start the order flow: {e}");
            cleanup(&args.url, &cfg).await;
            return ExitCode::from(1);
        }
    };
    if !app.engine().wait_ready(Duration::from_secs(15)).await {
        eprintln!("flowgate demo: the stages did not start consuming within 15s");
    }
    // The gateway runs whenever gateway_bind is set, which it is here.
    let gw = app
        .gateway_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let metrics = app
        .engine()
        .http_addr()
        .map(|a| format!("http://{a}/metrics"))
        .unwrap_or_default();
    let code = if args.serve {
        println!("\ngateway:  http://{gw}/orders   (GET /orders/{{id}}, GET /orders/stats)");
        println!("metrics:  {metrics}");
        println!(
            "\ntry:\n  curl -si -H 'content-type: application/json' \\\n    -d '{{\"customer_id\":\"c1\",\"items\":[{{\"sku\":\"sku-1\",\"qty\":2}}],\"total\":19.9}}' http://{gw}/orders\n  curl -s http://{gw}/orders/<order_id>\n  flowgate load --url http://{gw} --rate 5000/min --duration 30s\n\nCtrl-C stops and removes the topology."
        );
        let _ = tokio::signal::ctrl_c().await;
        ExitCode::SUCCESS
    } else {
        let mut plan = plan;
        plan.url = format!("http://{gw}");
        println!(
            "driving {} orders at {:.0}/s through http://{gw}/orders  (metrics: {metrics})\n",
            plan.orders,
            plan.rate.unwrap_or(0.0)
        );
        let report = crate::orders::load::run(&plan).await;
        println!("{}", report.summary());
        if report.lost.is_empty() && report.accepted > 0 {
            println!(
                "every accepted order ended shipped or failed with a reason; topology removed."
            );
            ExitCode::SUCCESS
        } else {
            eprintln!(
                "flowgate demo: {} accepted orders have no final status",
                report.lost.len()
            );
            ExitCode::from(1)
        }
    };
    app.shutdown().await;
    cleanup(&args.url, &cfg).await;
    if let Err(e) = app.service().ledger.clear().await {
        tracing::warn!(error = %e, "could not delete the records");
    }
    code
}

async fn run_chaos(
    args: DemoArgs,
    mut cfg: Config,
    plan: crate::orders::load::LoadPlan,
    prefix: &str,
) -> ExitCode {
    if let Err(hint) = redis_reachable(&args.redis_url).await {
        eprintln!("flowgate demo: {hint}");
        return ExitCode::from(3);
    }
    cfg.orders.redis_url = Some(args.redis_url.clone());
    cfg.orders.key_prefix = format!("flowgate:orders:{prefix}:");
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("flowgate demo: cannot find my own binary: {e}");
            return ExitCode::from(1);
        }
    };
    println!(
        "chaos: reserve, pay and ship run as worker processes, SIGKILLed and restarted at random\n"
    );
    let report = crate::orders::chaos::run(crate::orders::chaos::ChaosPlan {
        exe,
        config: cfg,
        workers_per_stage: 1,
        kill_every: (Duration::from_millis(700), Duration::from_millis(2500)),
        load: plan,
    })
    .await;
    match report {
        Ok(r) => {
            println!("{}", r.summary());
            let clean = r.lost() == 0
                && r.double_reservations() == Some(0)
                && r.double_charges() == Some(0)
                && r.load.accepted > 0;
            if clean {
                println!(
                    "{} kills: 0 lost orders, 0 double reservations, 0 double charges; topology removed.",
                    r.kills
                );
                ExitCode::SUCCESS
            } else {
                eprintln!("flowgate demo --chaos: lost orders or duplicate effects (see above)");
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("flowgate demo --chaos: {e}");
            ExitCode::from(1)
        }
    }
}

/// Deletes the demo's topology.
pub async fn cleanup(url: &str, cfg: &Config) {
    if let Ok(conn) = Connection::connect(url, ConnectionProperties::default()).await {
        if let Ok(ch) = conn.create_channel().await {
            if let Err(e) = crate::topology::delete(&ch, cfg).await {
                tracing::warn!(error = %e, "cleanup failed");
            }
            // Close the channel before the connection, or lapin reports a
            // connection error for the channel dropped mid-close.
            let _ = ch.close(200, "cleanup".into()).await;
        }
        let _ = conn.close(200, "cleanup".into()).await;
    }
}
