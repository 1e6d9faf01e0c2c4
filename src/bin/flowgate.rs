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
    /// Inspect, replay or purge a dead-letter queue.
    Dlq {
        #[command(subcommand)]
        cmd: DlqCmd,
    },
    /// Steer a running engine through its management API ([management] bind).
    Ctl(flowgate::ctl::CtlArgs),
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

/// Installs the log and the trace export from the config; `None` (after
/// saying why) when that fails.
fn init_tracing(cfg: &Config) -> Option<flowgate::Telemetry> {
    match flowgate::log::init(cfg) {
        Ok(t) => Some(t),
        Err(e) => {
            eprintln!("flowgate: cannot set up logging: {e}");
            None
        }
    }
}

/// Loads a daemon config: the daemon runs built-in handlers only.
fn load(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load(path)
        .and_then(|c| {
            Engine::builder().config(c.clone()).build()?;
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
            let cfg = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let Some(telemetry) = init_tracing(&cfg) else {
                return ExitCode::from(1);
            };
            let code = flowgate::run_system(run(cfg));
            // After the drain: the last spans are exported before exit.
            telemetry.shutdown();
            code
        }
        Cmd::Dlq { cmd } => dlq(cmd),
        Cmd::Ctl(args) => flowgate::ctl::main(args),
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
    // The DLQ tools log in the configured format, without trace export.
    let mut log_cfg = cfg.clone();
    log_cfg.telemetry.enabled = false;
    if init_tracing(&log_cfg).is_none() {
        return ExitCode::from(1);
    }
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
        Ok::<_, flowgate::Error>(out)
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
    match handle.run_until_signal().await {
        Ok(stopped) => stopped.exit_code(),
        Err(e) => {
            eprintln!("flowgate: cannot install the signal handlers: {e}");
            handle.shutdown().await;
            ExitCode::from(1)
        }
    }
}
