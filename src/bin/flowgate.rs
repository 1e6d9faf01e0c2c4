//! The `flowgate` command: parses arguments and calls the library.

use clap::{Parser, Subcommand};
use flowgate::{Config, Engine};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "flowgate",
    version,
    about = "A resilient RabbitMQ pipeline engine"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the engine as a daemon until SIGTERM/SIGINT.
    Run {
        /// Configuration file (TOML).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a configuration file and exit (status 2 when invalid).
    CheckConfig {
        /// Configuration file (TOML).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run the order pipeline end to end on the local broker and print a summary.
    Demo(flowgate::demo::DemoArgs),
    /// Drive a running order gateway over HTTP and print a summary.
    Load(flowgate::orders::load::LoadArgs),
    /// Run one stage of a config as a worker process (used by `demo --chaos`).
    #[command(hide = true)]
    Worker {
        /// Configuration file (TOML).
        #[arg(long, short)]
        config: PathBuf,
        /// The stage to run.
        #[arg(long)]
        stage: String,
    },
    /// Inspect, replay or purge a dead-letter queue.
    Dlq {
        #[command(subcommand)]
        cmd: DlqCmd,
    },
}

#[derive(Subcommand)]
enum DlqCmd {
    /// Count dead letters by reason and stage (they stay in the queue).
    Stats {
        /// Configuration file (TOML): the broker to use.
        #[arg(long, short)]
        config: PathBuf,
        /// A configured queue (its `<queue>.dlq` is used) or a DLQ's name.
        #[arg(long, short)]
        queue: String,
    },
    /// Republish dead letters to their original exchange and routing key
    /// (confirmed; removed from the DLQ only after; attempt counter reset).
    Replay {
        /// Configuration file (TOML): the broker to use.
        #[arg(long, short)]
        config: PathBuf,
        /// A configured queue (its `<queue>.dlq` is used) or a DLQ's name.
        #[arg(long, short)]
        queue: String,
        /// Only dead letters with this reason (e.g. `handler-error`).
        #[arg(long)]
        reason: Option<String>,
        /// At most this many.
        #[arg(long)]
        limit: Option<u64>,
    },
    /// Delete every dead letter of a queue.
    Purge {
        /// Configuration file (TOML): the broker to use.
        #[arg(long, short)]
        config: PathBuf,
        /// A configured queue (its `<queue>.dlq` is used) or a DLQ's name.
        #[arg(long, short)]
        queue: String,
        /// Required: confirms that the messages are to be deleted.
        #[arg(long)]
        yes: bool,
    },
}

fn init_tracing() {
    init_tracing_with("info,lapin=warn")
}

/// Interactive commands (demo, load) print their own summary: warnings only.
fn init_tracing_quiet() {
    init_tracing_with("warn,lapin=error")
}

fn init_tracing_with(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
}

/// Loads a daemon config: the daemon runs built-in handlers only.
fn load(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load(path)
        .and_then(|c| {
            flowgate::config::validate(&c, Some(&flowgate::handlers::builtin_names()))?;
            Ok(c)
        })
        .map_err(|e| {
            eprintln!("flowgate: invalid configuration {}: {e}", path.display());
            ExitCode::from(2)
        })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::CheckConfig { config } => match load(&config) {
            Ok(c) => {
                println!(
                    "{}: ok ({} exchanges, {} queues, {} stages)",
                    config.display(),
                    c.exchanges.len(),
                    c.queues.len(),
                    c.stages.len()
                );
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Cmd::Run { config } => {
            init_tracing();
            let cfg = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            flowgate::run_system(run(cfg))
        }
        Cmd::Demo(args) => {
            init_tracing_quiet();
            flowgate::run_system(flowgate::demo::run(args))
        }
        Cmd::Load(args) => {
            init_tracing_quiet();
            let plan = match args.plan() {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("flowgate load: {e}");
                    return ExitCode::from(2);
                }
            };
            flowgate::run_system(async move {
                let report = flowgate::orders::load::run(&plan).await;
                println!("{}", report.summary());
                if report.accepted == 0 && report.sent > 0 {
                    eprintln!("flowgate load: no order was accepted by {}", plan.url);
                    ExitCode::from(1)
                } else {
                    ExitCode::SUCCESS
                }
            })
        }
        Cmd::Worker { config, stage } => {
            init_tracing();
            flowgate::run_system(flowgate::orders::chaos::run_worker(&config, &stage))
        }
        Cmd::Dlq { cmd } => {
            init_tracing();
            dlq(cmd)
        }
    }
}

fn dlq(cmd: DlqCmd) -> ExitCode {
    let (config, queue) = match &cmd {
        DlqCmd::Stats { config, queue }
        | DlqCmd::Replay { config, queue, .. }
        | DlqCmd::Purge { config, queue, .. } => (config.clone(), queue.clone()),
    };
    if let DlqCmd::Purge { yes: false, .. } = cmd {
        eprintln!("flowgate: purge deletes every dead letter of {queue}; add --yes to confirm");
        return ExitCode::from(2);
    }
    let cfg = match load(&config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let queue = flowgate::dlq::resolve_queue(&cfg, &queue);
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("flowgate: cannot start a runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let res = rt.block_on(async {
        let conn = flowgate::dlq::connect(&cfg).await?;
        let out = match cmd {
            DlqCmd::Stats { .. } => {
                let s = flowgate::dlq::stats(&conn, &queue).await?;
                let mut text = format!("{queue}: {} dead letters\nby reason:\n", s.total);
                for (r, n) in &s.by_reason {
                    text.push_str(&format!("  {r:<24} {n}\n"));
                }
                text.push_str("by stage:\n");
                for (st, n) in &s.by_stage {
                    text.push_str(&format!("  {st:<24} {n}\n"));
                }
                text
            }
            DlqCmd::Replay { reason, limit, .. } => {
                let r = flowgate::dlq::replay(&conn, &queue, reason.as_deref(), limit).await?;
                format!(
                    "{queue}: replayed {}, skipped {}, failed {}\n",
                    r.replayed, r.skipped, r.failed
                )
            }
            DlqCmd::Purge { .. } => {
                let n = flowgate::dlq::purge(&conn, &queue).await?;
                format!("{queue}: purged {n}\n")
            }
        };
        let _ = conn.close(200, "done".into()).await;
        Ok::<_, flowgate::dlq::DlqError>(out)
    });
    match res {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("flowgate: {e}");
            ExitCode::from(1)
        }
    }
}

async fn run(cfg: Config) -> ExitCode {
    // An order flow also runs its gateway and shares one service among its stages.
    let orders = if flowgate::orders::uses_orders(&cfg) {
        match flowgate::orders::start(cfg.clone()).await {
            Ok(app) => Some(app),
            Err(e) => {
                eprintln!("flowgate: cannot start: {e}");
                return ExitCode::from(1);
            }
        }
    } else {
        None
    };
    let handle = match &orders {
        Some(app) => app.engine().clone(),
        None => {
            let engine = match Engine::builder().config(cfg).build() {
                Ok(e) => e,
                Err(e) => {
                    eprintln!("flowgate: invalid configuration: {e}");
                    return ExitCode::from(2);
                }
            };
            match engine.start().await {
                Ok(h) => h,
                Err(e) => {
                    eprintln!("flowgate: cannot start: {e}");
                    return ExitCode::from(1);
                }
            }
        }
    };
    if let Some(a) = orders.as_ref().and_then(|o| o.gateway_addr()) {
        tracing::info!("order gateway: http://{a}/orders");
    }
    tracing::info!("flowgate running; SIGTERM or Ctrl-C to stop");
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("flowgate: cannot install the SIGTERM handler: {e}");
            return ExitCode::from(1);
        }
    };
    let code = tokio::select! {
        _ = term.recv() => { tracing::info!("SIGTERM received"); ExitCode::SUCCESS }
        _ = tokio::signal::ctrl_c() => { tracing::info!("SIGINT received"); ExitCode::SUCCESS }
        e = handle.escalated() => {
            tracing::error!(actor = %e.actor, reason = %e.reason, "an actor spent its restart budget; shutting down");
            ExitCode::from(1)
        }
    };
    let report = match &orders {
        Some(app) => app.shutdown().await,
        None => handle.shutdown().await,
    };
    if !report.clean {
        tracing::warn!(
            ?report,
            "shutdown grace expired with work in flight; the broker requeues it"
        );
    }
    code
}
