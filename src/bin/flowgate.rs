//! The `flowgate` command: parses arguments and calls the library.

use clap::{CommandFactory, Parser, Subcommand};
use flowgate::ctl::CONFIG_ENV;
use flowgate::exit::Exit;
use flowgate::{Config, Engine};
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "flowgate",
    version,
    about = "A resilient RabbitMQ pipeline engine",
    after_help = Exit::help_text(),
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
        #[arg(long, short, env = CONFIG_ENV)]
        config: PathBuf,
    },
    /// Validate a configuration file and exit (status 2 when invalid).
    CheckConfig {
        /// Configuration file (TOML).
        #[arg(long, short, env = CONFIG_ENV)]
        config: PathBuf,
    },
    /// Inspect, replay or purge a dead-letter queue.
    Dlq {
        #[command(subcommand)]
        cmd: DlqCmd,
    },
    /// Steer a running engine through its management API ([management] bind).
    Ctl(flowgate::ctl::CtlArgs),
    /// Print a shell completion script to stdout
    /// (e.g. `flowgate completions bash > /etc/bash_completion.d/flowgate`).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) to stdout (`flowgate man | man -l -`).
    Man,
}

#[derive(Subcommand)]
enum DlqCmd {
    /// Count dead letters by reason and stage (they stay in the queue).
    Stats {
        /// Configuration file (TOML): the broker to use.
        #[arg(long, short, env = CONFIG_ENV)]
        config: PathBuf,
        /// Print the result as one JSON object.
        #[arg(long)]
        json: bool,
        /// A configured queue (its `<queue>.dlq` is used) or a DLQ's name.
        #[arg(long, short)]
        queue: String,
    },
    /// Republish dead letters to their original exchange and routing key
    /// (confirmed; removed from the DLQ only after; attempt counter reset).
    Replay {
        /// Configuration file (TOML): the broker to use.
        #[arg(long, short, env = CONFIG_ENV)]
        config: PathBuf,
        /// Print the result as one JSON object.
        #[arg(long)]
        json: bool,
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
        #[arg(long, short, env = CONFIG_ENV)]
        config: PathBuf,
        /// Print the result as one JSON object.
        #[arg(long)]
        json: bool,
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
            Exit::Usage.into()
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
                Exit::Ok.into()
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
        Cmd::Completions { shell } => {
            // Into a buffer: `generate` panics when its writer fails (a
            // closed pipe); writing it ourselves turns that into a status.
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "flowgate", &mut script);
            print_out(&script, "the completion script")
        }
        Cmd::Man => {
            let mut page = Vec::new();
            match clap_mangen::Man::new(Cli::command()).render(&mut page) {
                Ok(()) => print_out(&page, "the man page"),
                Err(e) => {
                    eprintln!("flowgate: cannot render the man page: {e}");
                    Exit::Failure.into()
                }
            }
        }
    }
}

/// Writes generated text to stdout; a closed or full stdout is a failure.
fn print_out(bytes: &[u8], what: &str) -> ExitCode {
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Ok(()) => Exit::Ok.into(),
        Err(e) => {
            eprintln!("flowgate: cannot write {what}: {e}");
            Exit::Failure.into()
        }
    }
}

/// A replay's progress bar: on stderr, and only when stderr is a terminal
/// (a script's or a test's output stays clean).
fn replay_bar() -> indicatif::ProgressBar {
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(0);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{spinner} replaying [{bar:40}] {pos}/{len} ({per_sec}, eta {eta})",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

fn dlq(cmd: DlqCmd) -> ExitCode {
    let (config, queue, json) = match &cmd {
        DlqCmd::Stats {
            config,
            queue,
            json,
        }
        | DlqCmd::Replay {
            config,
            queue,
            json,
            ..
        }
        | DlqCmd::Purge {
            config,
            queue,
            json,
            ..
        } => (config.clone(), queue.clone(), *json),
    };
    if let DlqCmd::Purge { yes: false, .. } = cmd {
        eprintln!("flowgate: purge deletes every dead letter of {queue}; add --yes to confirm");
        return Exit::Usage.into();
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
            return Exit::Failure.into();
        }
    };
    let res = rt.block_on(async {
        let conn = flowgate::dlq::connect(&cfg).await?;
        let out = match cmd {
            DlqCmd::Stats { .. } => {
                let s = flowgate::dlq::stats(&conn, &queue).await?;
                if json {
                    serde_json::json!({
                        "queue": queue,
                        "total": s.total,
                        "by_reason": s.by_reason,
                        "by_stage": s.by_stage,
                    })
                    .to_string()
                        + "\n"
                } else {
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
            }
            DlqCmd::Replay { reason, limit, .. } => {
                let bar = replay_bar();
                let r = flowgate::dlq::replay_with_progress(
                    &conn,
                    &queue,
                    reason.as_deref(),
                    limit,
                    |p| {
                        bar.set_length(p.total);
                        bar.set_position(p.examined);
                    },
                )
                .await;
                bar.finish_and_clear();
                let r = r?;
                if json {
                    serde_json::json!({
                        "queue": queue,
                        "replayed": r.replayed,
                        "skipped": r.skipped,
                        "failed": r.failed,
                    })
                    .to_string()
                        + "\n"
                } else {
                    format!(
                        "{queue}: replayed {}, skipped {}, failed {}\n",
                        r.replayed, r.skipped, r.failed
                    )
                }
            }
            DlqCmd::Purge { .. } => {
                let n = flowgate::dlq::purge(&conn, &queue).await?;
                if json {
                    serde_json::json!({ "queue": queue, "purged": n }).to_string() + "\n"
                } else {
                    format!("{queue}: purged {n}\n")
                }
            }
        };
        let _ = conn.close(200, "done".into()).await;
        Ok::<_, flowgate::Error>(out)
    });
    match res {
        Ok(text) => {
            print!("{text}");
            Exit::Ok.into()
        }
        Err(e) => {
            eprintln!("flowgate: {e}");
            Exit::Failure.into()
        }
    }
}

async fn run(cfg: Config) -> ExitCode {
    let engine = match Engine::builder().config(cfg).build() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("flowgate: invalid configuration: {e}");
            return Exit::Usage.into();
        }
    };
    let handle = match engine.start().await {
        Ok(h) => h,
        Err(e) => {
            eprintln!("flowgate: cannot start: {e}");
            return Exit::Failure.into();
        }
    };
    tracing::info!("flowgate running; SIGTERM or Ctrl-C to stop");
    match handle.run_until_signal().await {
        Ok(stopped) => stopped.exit_code(),
        Err(e) => {
            eprintln!("flowgate: cannot install the signal handlers: {e}");
            handle.shutdown().await;
            Exit::Failure.into()
        }
    }
}
