//! The main job: the order pipeline run end to end on the local broker.
//!
//! `flowgate-orders demo` declares a uniquely named copy of
//! `config/orders.toml`, starts the services and the gateway, drives a few
//! thousand orders over HTTP (see [`crate::load`]), prints the summary and
//! removes what it declared. `--serve` keeps it running; `--chaos` runs the
//! services as worker processes that get killed ([`crate::chaos`]).

use crate::config::FlowConfig;
use crate::delete_topology;
use std::process::ExitCode;
use std::time::Duration;

/// `flowgate-orders demo` options.
#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// Orders to drive through the gateway.
    #[arg(long, default_value_t = 3000)]
    pub orders: usize,
    /// Order rate (5x the payment provider's default 100 charges/s, so the
    /// gateway has to push back).
    #[arg(long, default_value = "500/s")]
    pub rate: crate::load::Rate,
    /// HTTP requests in flight at most.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Broker URL.
    #[arg(
        long,
        env = "FLOWGATE__AMQP__URL",
        hide_env_values = true,
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
        hide_env_values = true,
        default_value = "redis://127.0.0.1:6379"
    )]
    pub redis_url: String,
    /// PostgreSQL server on which the demo creates a database of its own
    /// (the ledger, flowgate's inbox and outbox), dropped at the end.
    #[arg(
        long,
        env = "FLOWGATE_ORDERS_POSTGRES_URL",
        hide_env_values = true,
        default_value = "postgres://postgres:postgres@127.0.0.1:5432/postgres"
    )]
    pub postgres_url: String,
    /// Keep the ledger in memory (in Redis with `--chaos`) instead of
    /// PostgreSQL.
    #[arg(long)]
    pub no_postgres: bool,
    /// Give up on orders when no status moved for this long.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub wait: Duration,
    /// Hide the progress bars.
    #[arg(long)]
    pub quiet: bool,
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
fn watermarks(cfg: &FlowConfig) -> String {
    let list: Vec<String> = cfg
        .engine
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

/// `flowgate-orders demo`: the order pipeline on the local broker, driven over
/// HTTP, summarised, cleaned up. `--serve` keeps it running; `--chaos` runs
/// the services as worker processes that get killed.
pub async fn run(args: DemoArgs) -> ExitCode {
    if let Err(hint) = broker_reachable(&args.url).await {
        eprintln!("flowgate-orders demo: {hint}");
        return ExitCode::from(3);
    }
    let base = match &args.config {
        Some(p) => FlowConfig::load(p),
        None => FlowConfig::default_flow(),
    };
    let base = match base {
        Ok(c) => c,
        Err(e) => {
            eprintln!("flowgate-orders demo: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    let prefix = format!(
        "fg-demo-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let mut cfg = base.uniquely_named(&prefix);
    cfg.engine.amqp.url = args.url.clone();
    cfg.engine.http.bind = "127.0.0.1:0".into();
    cfg.orders.gateway_bind = if args.serve {
        args.bind.clone()
    } else {
        "127.0.0.1:0".into()
    };
    let plan = crate::load::LoadPlan {
        url: String::new(),
        orders: args.orders,
        rate: Some(args.rate.0),
        concurrency: args.concurrency.max(1),
        scarce_every: 50,
        wait: args.wait,
        quiet: args.quiet,
    };
    println!("flowgate-orders demo: the order pipeline, topology `{prefix}.*`\n\n{FLOW}\n");
    println!(
        "payment provider: {} charges/s, {:?} per call, {:.0}% transient failures; \
         gateway refuses new orders (503) while a queue is above its watermark ({})",
        cfg.orders.payment_rate,
        cfg.orders.payment_latency,
        cfg.orders.payment_failure_rate * 100.0,
        watermarks(&cfg)
    );
    let database = if args.no_postgres {
        None
    } else {
        match crate::db::DemoDatabase::create(&args.postgres_url, &prefix.replace('-', "_")).await {
            Ok(d) => {
                cfg.engine.postgres.url = d.url().to_owned();
                cfg.engine.postgres.migrate_on_start = true;
                println!(
                    "ledger: PostgreSQL database `{}` (stock, reservations, charges, shipments written in flowgate's inbox transaction; events through its outbox)",
                    d.name()
                );
                Some(d)
            }
            Err(e) => {
                eprintln!(
                    "flowgate-orders demo: {e}.\n\
                     Start PostgreSQL with `scripts/services.sh` (installs and starts it),\n\
                     or point --postgres-url / FLOWGATE_ORDERS_POSTGRES_URL at yours,\n\
                     or run the demo with --no-postgres (the ledger in memory)."
                );
                return ExitCode::from(3);
            }
        }
    };
    let code = run_flow(args, cfg, plan, &prefix).await;
    if let Some(d) = database {
        d.drop_it().await;
    }
    code
}

/// Prints the inbox's and the relay's figures and the effects counted in
/// the database.
async fn print_db_summary(app: &crate::OrdersApp, cfg: &FlowConfig) {
    let Some(db) = &app.service().db else {
        return;
    };
    let stages: Vec<String> = cfg
        .engine
        .stages
        .iter()
        .filter(|s| crate::WORK_HANDLERS.contains(&s.handler.as_str()))
        .map(|s| s.name.clone())
        .collect();
    let hits = crate::chaos::WorkerStats::of(app.engine(), &stages).inbox_hits;
    let relay = crate::db::RelayFigures::of(app.engine());
    let ms = |d: Option<Duration>| {
        d.map(|d| format!("{:.1} ms", d.as_secs_f64() * 1000.0))
            .unwrap_or_else(|| "-".into())
    };
    println!(
        "  inbox hits (redeliveries absorbed) {hits:>7}\n  outbox relayed               {:>13}\n  relay lag mean / p99 ≤      {:>6} / {}\n  relay batch errors           {:>13}",
        relay.relayed,
        ms(relay.mean_lag),
        ms(relay.p99_lag_at_most),
        relay.errors
    );
    match db.report().await {
        Ok(r) => println!(
            "  in PostgreSQL: orders reserved {}, charged {}, shipped {}; duplicate effects {}; outbox left {}\n",
            r.reserved, r.charged, r.shipped, r.duplicate_effects, r.outbox_depth
        ),
        Err(e) => println!("  in PostgreSQL: unreadable ({e})\n"),
    }
}

async fn run_flow(
    args: DemoArgs,
    cfg: FlowConfig,
    plan: crate::load::LoadPlan,
    prefix: &str,
) -> ExitCode {
    if args.chaos {
        return run_chaos(args, cfg, plan, prefix).await;
    }

    let app = match crate::start(cfg.clone()).await {
        Ok(a) => a,
        Err(e) => {
            eprintln!("flowgate-orders demo: cannot start the order flow: {e}");
            delete_topology(&args.url, &cfg.engine).await;
            return ExitCode::from(1);
        }
    };
    if !app.engine().wait_ready(Duration::from_secs(15)).await {
        eprintln!("flowgate-orders demo: the stages did not start consuming within 15s");
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
            "\ntry:\n  curl -si -H 'content-type: application/json' \\\n    -d '{{\"customer_id\":\"c1\",\"items\":[{{\"sku\":\"sku-1\",\"qty\":2}}],\"total\":19.9}}' http://{gw}/orders\n  curl -s http://{gw}/orders/<order_id>\n  flowgate-orders load --url http://{gw} --rate 5000/min --duration 30s\n\nCtrl-C stops and removes the topology."
        );
        // Stops the gateway, then drains the stages.
        let code = match app.engine().run_until_signal().await {
            Ok(stopped) => stopped.exit_code(),
            Err(e) => {
                eprintln!("flowgate-orders demo: cannot install the signal handlers: {e}");
                app.shutdown().await;
                ExitCode::from(1)
            }
        };
        delete_topology(&args.url, &cfg.engine).await;
        if let Err(e) = app.service().clear_records().await {
            tracing::warn!(error = %e, "could not delete the records");
        }
        return code;
    } else {
        let mut plan = plan;
        plan.url = format!("http://{gw}");
        println!(
            "driving {} orders at {:.0}/s through http://{gw}/orders  (metrics: {metrics})\n",
            plan.orders,
            plan.rate.unwrap_or(0.0)
        );
        let report = crate::load::run(&plan).await;
        println!("{}", report.summary());
        print_db_summary(&app, &cfg).await;
        if report.lost.is_empty() && report.accepted > 0 {
            println!(
                "every accepted order ended shipped or failed with a reason; topology removed."
            );
            ExitCode::SUCCESS
        } else {
            eprintln!(
                "flowgate-orders demo: {} accepted orders have no final status",
                report.lost.len()
            );
            ExitCode::from(1)
        }
    };
    app.shutdown().await;
    delete_topology(&args.url, &cfg.engine).await;
    if let Err(e) = app.service().clear_records().await {
        tracing::warn!(error = %e, "could not delete the records");
    }
    code
}

async fn run_chaos(
    args: DemoArgs,
    mut cfg: FlowConfig,
    plan: crate::load::LoadPlan,
    prefix: &str,
) -> ExitCode {
    if let Err(hint) = redis_reachable(&args.redis_url).await {
        eprintln!("flowgate-orders demo: {hint}");
        return ExitCode::from(3);
    }
    cfg.orders.redis_url = Some(args.redis_url.clone());
    cfg.orders.key_prefix = format!("flowgate:orders:{prefix}:");
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("flowgate-orders demo: cannot find my own binary: {e}");
            return ExitCode::from(1);
        }
    };
    println!(
        "chaos: reserve, pay and ship run as worker processes, SIGKILLed and restarted at random\n"
    );
    let report = crate::chaos::run(crate::chaos::ChaosPlan {
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
                && r.stock_mismatches() == Some(0)
                && r.double_charges() == Some(0)
                && r.duplicate_effects().unwrap_or(0) == 0
                && r.load.accepted > 0;
            if clean {
                println!(
                    "{} kills: 0 lost orders, stock as reserved, {} duplicate provider calls (answered by the provider's idempotency key, no money moved); topology removed.",
                    r.kills,
                    r.duplicate_provider_calls().unwrap_or(0)
                );
                ExitCode::SUCCESS
            } else {
                eprintln!(
                    "flowgate-orders demo --chaos: lost orders or duplicate effects (see above)"
                );
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("flowgate-orders demo --chaos: {e}");
            ExitCode::from(1)
        }
    }
}
