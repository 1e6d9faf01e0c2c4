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
    /// Run the demo pipeline end to end on the local broker and print a summary.
    Demo(flowgate::demo::DemoArgs),
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,lapin=warn"));
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
            init_tracing();
            flowgate::run_system(flowgate::demo::run(args))
        }
    }
}

async fn run(cfg: Config) -> ExitCode {
    let engine = match Engine::builder().config(cfg).build() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("flowgate: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    let handle = match engine.start().await {
        Ok(h) => h,
        Err(e) => {
            eprintln!("flowgate: cannot start: {e}");
            return ExitCode::from(1);
        }
    };
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
    let report = handle.shutdown().await;
    if !report.clean {
        tracing::warn!(
            ?report,
            "shutdown grace expired with work in flight; the broker requeues it"
        );
    }
    code
}
