//! The `flowgate` command: parses arguments and calls the library.

mod ctl;

use clap::{CommandFactory, Parser, Subcommand};
use ctl::CONFIG_ENV;
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
    /// Manage flowgate's tables in the [postgres] database (inbox, outbox).
    Db {
        #[command(subcommand)]
        cmd: DbCmd,
    },
    /// Steer a running engine through its management API ([management] bind).
    Ctl(ctl::CtlArgs),
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
enum DbCmd {
    /// Apply flowgate's migrations not applied yet (idempotent; safe to run
    /// from several places at once).
    Migrate {
        /// Configuration file (TOML) with a [postgres] section.
        #[arg(long, short, env = CONFIG_ENV)]
        config: PathBuf,
    },
}

/// Which dead letters (every condition given must hold).
#[derive(clap::Args, Clone, Debug, Default)]
struct FilterArgs {
    /// Only dead letters with this reason (e.g. `unroutable`, `handler-error`).
    #[arg(long)]
    reason: Option<String>,
    /// Only dead letters from this stage.
    #[arg(long)]
    stage: Option<String>,
    /// Only dead letters whose message id or body contains this text (ASCII case ignored).
    #[arg(long)]
    search: Option<String>,
    /// Only these dead letters: an id from `dlq list`, or a message id (repeat for several).
    #[arg(long = "id")]
    ids: Vec<String>,
}

impl FilterArgs {
    fn filter(&self) -> flowgate::dlq::Filter {
        flowgate::dlq::Filter {
            reason: self.reason.clone(),
            stage: self.stage.clone(),
            search: self.search.clone(),
            ids: self.ids.clone(),
        }
    }
}

#[derive(Subcommand)]
enum DlqCmd {
    /// List dead letters (id, message id, reason, stage, attempts, death
    /// times, a body preview); they stay in the queue, in order (a classic
    /// DLQ is required).
    List {
        /// Configuration file (TOML): the broker to use.
        #[arg(long, short, env = CONFIG_ENV)]
        config: PathBuf,
        /// Print the page as one JSON object.
        #[arg(long)]
        json: bool,
        /// A configured queue (its `<queue>.dlq` is used) or a DLQ's name.
        #[arg(long, short)]
        queue: String,
        #[command(flatten)]
        filter: FilterArgs,
        /// Skip this many matches first (the page's start).
        #[arg(long, default_value_t = 0)]
        skip: usize,
        /// At most this many (up to 200).
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Show dead letters in full (properties, headers, body) by id or
    /// message id; they stay in the queue.
    Show {
        /// Configuration file (TOML): the broker to use.
        #[arg(long, short, env = CONFIG_ENV)]
        config: PathBuf,
        /// Print them as one JSON object.
        #[arg(long)]
        json: bool,
        /// A configured queue (its `<queue>.dlq` is used) or a DLQ's name.
        #[arg(long, short)]
        queue: String,
        /// An id from `dlq list`, or a message id.
        id: String,
    },
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
    /// Republish dead letters to their original exchange and routing key, or
    /// to `--to-exchange`/`--to-routing-key` (confirmed; removed from the DLQ
    /// only after; attempt counter reset).
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
        #[command(flatten)]
        filter: FilterArgs,
        /// At most this many.
        #[arg(long)]
        limit: Option<u64>,
        /// Replay to this exchange instead of the original one (with `--to-routing-key`).
        #[arg(long, requires = "to_routing_key")]
        to_exchange: Option<String>,
        /// Replay with this routing key instead of the original one (with `--to-exchange`).
        #[arg(long, requires = "to_exchange")]
        to_routing_key: Option<String>,
    },
    /// Delete dead letters: every one, or those the filters pick.
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
        #[command(flatten)]
        filter: FilterArgs,
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
        Cmd::Db { cmd } => db(cmd),
        Cmd::Ctl(args) => ctl::main(args),
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

fn db(cmd: DbCmd) -> ExitCode {
    let DbCmd::Migrate { config } = cmd;
    let cfg = match load(&config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if !cfg.postgres.is_set() {
        eprintln!("flowgate: {}: no [postgres] url", config.display());
        return Exit::Usage.into();
    }
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
    // The pool's maintenance task needs the runtime.
    let _entered = rt.enter();
    let pool = match flowgate::postgres::connect(&cfg.postgres) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("flowgate: {e}");
            return Exit::Usage.into();
        }
    };
    match rt.block_on(flowgate::postgres::migrate(&pool)) {
        Ok(applied) if applied.is_empty() => {
            println!(
                "up to date (version {})",
                flowgate::postgres::latest_migration()
            );
            Exit::Ok.into()
        }
        Ok(applied) => {
            println!("applied migrations {applied:?}");
            Exit::Ok.into()
        }
        Err(e) => {
            eprintln!("flowgate: migrating: {e}");
            Exit::Failure.into()
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

/// Who a DLQ action from the command line is logged as: `cli:<user>`.
fn cli_user() -> String {
    format!(
        "cli:{}",
        std::env::var("USER")
            .or_else(|_| std::env::var("LOGNAME"))
            .unwrap_or_else(|_| "unknown".into())
    )
}

fn dlq(cmd: DlqCmd) -> ExitCode {
    let (config, queue, json) = match &cmd {
        DlqCmd::List {
            config,
            queue,
            json,
            ..
        }
        | DlqCmd::Show {
            config,
            queue,
            json,
            ..
        }
        | DlqCmd::Stats {
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
        eprintln!("flowgate: purge deletes dead letters of {queue}; add --yes to confirm");
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
            DlqCmd::List {
                filter,
                skip,
                limit,
                ..
            } => {
                let page =
                    flowgate::dlq::list(&conn, &queue, &filter.filter(), skip, limit).await?;
                if json {
                    serde_json::to_string(&page).unwrap_or_default() + "\n"
                } else {
                    flowgate::dlq::view::page_text(&page)
                }
            }
            DlqCmd::Show { id, .. } => {
                let shown = flowgate::dlq::show(&conn, &queue, &id).await?;
                if shown.is_empty() {
                    return Err(flowgate::Error::Dlq(format!(
                        "{queue}: no dead letter with id or message id `{}`",
                        flowgate::dlq::view::visible(&id, 255)
                    )));
                }
                if json {
                    serde_json::json!({ "queue": queue, "messages": shown }).to_string() + "\n"
                } else {
                    shown.iter().map(flowgate::dlq::view::shown_text).collect()
                }
            }
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
            DlqCmd::Replay {
                filter,
                limit,
                to_exchange,
                to_routing_key,
                ..
            } => {
                let action = match (to_exchange, to_routing_key) {
                    (Some(exchange), Some(routing_key)) => flowgate::dlq::Action::ReplayTo {
                        exchange,
                        routing_key,
                    },
                    _ => flowgate::dlq::Action::Replay,
                };
                let bar = replay_bar();
                let r = flowgate::dlq::apply(
                    &conn,
                    &queue,
                    &filter.filter(),
                    &action,
                    limit,
                    &cli_user(),
                    |p| {
                        bar.set_length(p.total);
                        bar.set_position(p.examined);
                    },
                )
                .await;
                bar.finish_and_clear();
                let r = r?;
                let skipped = r.examined - r.done - r.failed;
                if json {
                    serde_json::json!({
                        "queue": queue,
                        "replayed": r.done,
                        "skipped": skipped,
                        "failed": r.failed,
                        "no_origin": r.no_origin,
                        "complete": r.complete,
                    })
                    .to_string()
                        + "\n"
                } else {
                    format!(
                        "{queue}: replayed {}, skipped {skipped}, failed {}{}\n",
                        r.done,
                        r.failed,
                        if r.complete { "" } else { " (stopped early: run it again for the rest)" }
                    )
                }
            }
            DlqCmd::Purge { filter, .. } => {
                let filter = filter.filter();
                let n = if filter.is_empty() {
                    let n = u64::from(flowgate::dlq::purge(&conn, &queue).await?);
                    tracing::info!(by = %cli_user(), queue = %queue, purged = n, "dead letters purged");
                    n
                } else {
                    flowgate::dlq::apply(
                        &conn,
                        &queue,
                        &filter,
                        &flowgate::dlq::Action::Delete,
                        None,
                        &cli_user(),
                        |_| {},
                    )
                    .await?
                    .done
                };
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
