//! The `flowgate-orders` command: the order pipeline's demo, load
//! generator, worker processes and daemon. Parses arguments and calls the
//! library.

use clap::{Parser, Subcommand};
use flowgate_orders::{chaos, demo, load, FlowConfig};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "flowgate-orders",
    version,
    about = "flowgate's worked example: an order pipeline behind an HTTP gateway"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the order pipeline end to end on the local broker and print a summary.
    Demo(demo::DemoArgs),
    /// Drive a running order gateway over HTTP and print a summary.
    Load(load::LoadArgs),
    /// Run an order flow (its stages and gateway) until SIGTERM/SIGINT.
    Run {
        /// Configuration file (TOML): the engine's sections plus `[orders]`.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run one stage of a config as a worker process (used by `demo --chaos`).
    #[command(hide = true)]
    Worker {
        /// Configuration file (TOML).
        #[arg(long, short)]
        config: PathBuf,
        /// The stage to run.
        #[arg(long)]
        stage: String,
        /// Where to keep this worker's inbox hits and relayed rows (written
        /// every 100 ms: a SIGKILL loses at most the last 100 ms of counts).
        #[arg(long)]
        stats: Option<PathBuf>,
    },
}

fn init_tracing(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
}

/// Interactive commands (demo, load) print their own summary: warnings only.
const QUIET: &str = "warn,lapin=error";
/// Long-running processes log what they do.
const DAEMON: &str = "info,lapin=warn";

fn main() -> ExitCode {
    match Cli::parse().cmd {
        Cmd::Demo(args) => {
            init_tracing(QUIET);
            flowgate::run_system(demo::run(args))
        }
        Cmd::Load(args) => {
            init_tracing(QUIET);
            let plan = match args.plan() {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("flowgate-orders load: {e}");
                    return ExitCode::from(2);
                }
            };
            flowgate::run_system(async move {
                let report = load::run(&plan).await;
                println!("{}", report.summary());
                if report.accepted == 0 && report.sent > 0 {
                    eprintln!(
                        "flowgate-orders load: no order was accepted by {}",
                        plan.url
                    );
                    ExitCode::from(1)
                } else {
                    ExitCode::SUCCESS
                }
            })
        }
        Cmd::Run { config } => {
            init_tracing(DAEMON);
            let cfg = match FlowConfig::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!(
                        "flowgate-orders: invalid configuration {}: {e}",
                        config.display()
                    );
                    return ExitCode::from(2);
                }
            };
            flowgate::run_system(run(cfg))
        }
        Cmd::Worker {
            config,
            stage,
            stats,
        } => {
            init_tracing(DAEMON);
            flowgate::run_system(chaos::run_worker(&config, &stage, stats))
        }
    }
}

async fn run(cfg: FlowConfig) -> ExitCode {
    let app = match flowgate_orders::start(cfg).await {
        Ok(a) => a,
        Err(e) => {
            eprintln!("flowgate-orders: cannot start: {e}");
            return ExitCode::from(1);
        }
    };
    if let Some(a) = app.gateway_addr() {
        tracing::info!("order gateway: http://{a}/orders");
    }
    tracing::info!("order flow running; SIGTERM or Ctrl-C to stop");
    match app.engine().run_until_signal().await {
        Ok(stopped) => stopped.exit_code(),
        Err(e) => {
            eprintln!("flowgate-orders: cannot install the signal handlers: {e}");
            app.shutdown().await;
            ExitCode::from(1)
        }
    }
}
