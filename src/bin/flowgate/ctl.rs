//! `flowgate ctl`: the management API (`[management] bind`) from a shell.
//!
//! Where it connects: `--url` (or `FLOWGATE_MANAGEMENT_URL`), else the
//! `[management] bind` of `--config` (or `FLOWGATE_CONFIG`), else
//! `http://127.0.0.1:9466`. The bearer token: `FLOWGATE_MANAGEMENT_TOKEN`,
//! else the first token of `--token-file`, else the first of the config's
//! `[management]` tokens. It is never taken as an argument (arguments show in
//! `ps`).
//!
//! Exit status ([`Exit`]): 0 done (for `status`: ready); 1 the engine
//! refused the request, could not be reached, or (for `status`) is not
//! ready; 2 a usage or configuration error.

use clap::{Args, Subcommand};
use flowgate::config::{Config, ManagementConfig};
use flowgate::exit::Exit;
use serde_json::{json, Value};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// The default management address (`[management] bind` has none: off).
pub const DEFAULT_URL: &str = "http://127.0.0.1:9466";
/// The environment variable holding the bearer token.
pub const TOKEN_ENV: &str = "FLOWGATE_MANAGEMENT_TOKEN";
/// The environment variable naming the configuration file, for every
/// command that takes `--config`.
pub const CONFIG_ENV: &str = "FLOWGATE_CONFIG";

/// `flowgate ctl [OPTIONS] <COMMAND>`.
#[derive(Args, Debug)]
pub struct CtlArgs {
    /// The management API's base URL [default: from --config, else
    /// http://127.0.0.1:9466].
    #[arg(long, env = "FLOWGATE_MANAGEMENT_URL")]
    pub url: Option<String>,
    /// A configuration file: its `[management]` bind and tokens are used.
    #[arg(long, short, env = CONFIG_ENV)]
    pub config: Option<PathBuf>,
    /// A file holding the bearer token (its first line that is not blank or
    /// a `#` comment). The token may instead come from FLOWGATE_MANAGEMENT_TOKEN.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Print the API's JSON answer as it is.
    #[arg(long)]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub cmd: CtlCmd,
}

/// The `flowgate ctl` commands.
#[derive(Subcommand, Debug, Clone)]
pub enum CtlCmd {
    /// Readiness with its reasons, the publisher and every stage (exit 1 when not ready).
    Status,
    /// Every stage: state, in flight / prefetch, workers, pause causes.
    Stages,
    /// Stop a stage's intake (in-flight deliveries finish) until `resume`.
    Pause {
        /// The stage's name.
        stage: String,
    },
    /// Clear an operator's pause.
    Resume {
        /// The stage's name.
        stage: String,
    },
    /// Set a stage's handler workers (1..=prefetch) and pin them, or `auto`
    /// to hand them back to autoscaling.
    Concurrency {
        /// The stage's name.
        stage: String,
        /// A number, or `auto`.
        workers: String,
    },
    /// The publisher: breaker, spool, unconfirmed publishes, rate.
    Publisher,
    /// Set the publish rate live (per second; 0: unlimited).
    Rate {
        /// Publishes per second; 0: unlimited.
        rate: u32,
        /// The token bucket's burst (default: unchanged).
        #[arg(long)]
        burst: Option<u32>,
    },
}

/// Why a `ctl` command failed.
#[derive(Debug, thiserror::Error)]
enum CtlError {
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Refused(String),
}

/// Runs `flowgate ctl`: prints the answer and returns the exit status.
pub fn main(args: CtlArgs) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("flowgate ctl: cannot start a runtime: {e}");
            return Exit::Failure.into();
        }
    };
    match rt.block_on(run(&args)) {
        Ok((out, ok)) => {
            print!("{out}");
            if ok {
                Exit::Ok.into()
            } else {
                Exit::Failure.into()
            }
        }
        Err(CtlError::Usage(e)) => {
            eprintln!("flowgate ctl: {e}");
            Exit::Usage.into()
        }
        Err(CtlError::Refused(e)) => {
            eprintln!("flowgate ctl: {e}");
            Exit::Failure.into()
        }
    }
}

/// The base URL and token the arguments and environment name.
fn target(args: &CtlArgs) -> Result<(String, Option<String>), CtlError> {
    let management = match &args.config {
        Some(path) => Some(
            Config::load(path)
                .map_err(|e| CtlError::Usage(format!("{}: {e}", path.display())))?
                .management,
        ),
        None => None,
    };
    let url = match (&args.url, &management) {
        (Some(u), _) => u.clone(),
        (None, Some(m)) if !m.bind.is_empty() => url_of_bind(&m.bind),
        (None, _) => DEFAULT_URL.to_owned(),
    };
    let token = if let Ok(t) = std::env::var(TOKEN_ENV) {
        Some(t.trim().to_owned())
    } else if let Some(path) = &args.token_file {
        let text = std::fs::read_to_string(path)
            .map_err(|e| CtlError::Usage(format!("cannot read {}: {e}", path.display())))?;
        first_token(&text)
    } else {
        management.as_ref().and_then(token_of_config)
    };
    Ok((url.trim_end_matches('/').to_owned(), token))
}

/// A bind address as a URL to connect to (an unspecified address means this
/// host).
fn url_of_bind(bind: &str) -> String {
    match bind.parse::<std::net::SocketAddr>() {
        Ok(a) if a.ip().is_unspecified() => format!("http://127.0.0.1:{}", a.port()),
        Ok(a) => format!("http://{a}"),
        Err(_) => format!("http://{bind}"),
    }
}

fn first_token(text: &str) -> Option<String> {
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
}

/// The first token of the config's `token_file`, else of its `token_env`.
fn token_of_config(m: &ManagementConfig) -> Option<String> {
    if let Some(p) = &m.token_file {
        if let Some(t) = std::fs::read_to_string(p)
            .ok()
            .as_deref()
            .and_then(first_token)
        {
            return Some(t);
        }
    }
    let var = std::env::var(m.token_env.as_deref()?).ok()?;
    var.split(|c: char| c == ',' || c.is_whitespace())
        .find(|t| !t.is_empty())
        .map(str::to_owned)
}

/// Performs the command; the text to print and whether it succeeded.
async fn run(args: &CtlArgs) -> Result<(String, bool), CtlError> {
    let (base, token) = target(args)?;
    let (method, path, body) = match &args.cmd {
        CtlCmd::Status => ("GET", "/status".to_owned(), None),
        CtlCmd::Stages => ("GET", "/stages".to_owned(), None),
        CtlCmd::Pause { stage } => ("POST", format!("/stages/{}/pause", segment(stage)), None),
        CtlCmd::Resume { stage } => ("POST", format!("/stages/{}/resume", segment(stage)), None),
        CtlCmd::Concurrency { stage, workers } => {
            let workers = match workers.as_str() {
                "auto" => Value::Null,
                n => json!(n.parse::<usize>().map_err(|_| CtlError::Usage(format!(
                    "workers must be a number or `auto`, not `{n}`"
                )))?),
            };
            (
                "PUT",
                format!("/stages/{}/concurrency", segment(stage)),
                Some(json!({ "workers": workers })),
            )
        }
        CtlCmd::Publisher => ("GET", "/publisher".to_owned(), None),
        CtlCmd::Rate { rate, burst } => (
            "PUT",
            "/publisher/rate".to_owned(),
            Some(json!({ "rate": rate, "burst": burst })),
        ),
    };
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| CtlError::Usage(e.to_string()))?;
    let url = format!("{base}{path}");
    let mut req = match method {
        "GET" => client.get(&url),
        "POST" => client.post(&url),
        _ => client.put(&url),
    };
    if let Some(t) = &token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = &body {
        req = req
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(b.to_string());
    }
    let resp = req
        .send()
        .await
        .map_err(|e| CtlError::Refused(format!("cannot reach {url}: {e}")))?;
    let status = resp.status();
    let answer: Value = resp
        .bytes()
        .await
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
        .map_err(|e| CtlError::Refused(format!("{url} answered {status} without JSON: {e}")))?;
    if !status.is_success() {
        let why = answer["error"].as_str().unwrap_or("no reason given");
        let hint = if status == reqwest::StatusCode::UNAUTHORIZED && token.is_none() {
            format!(" (no token: set {TOKEN_ENV}, --token-file or --config)")
        } else {
            String::new()
        };
        return Err(CtlError::Refused(format!("{status}: {why}{hint}")));
    }
    let ready = !matches!(args.cmd, CtlCmd::Status) || answer["ready"] == true;
    let text = if args.json {
        format!("{answer}\n")
    } else {
        match &args.cmd {
            CtlCmd::Status => status_text(&answer),
            CtlCmd::Stages => stage_table(answer["stages"].as_array().map_or(&[], Vec::as_slice)),
            CtlCmd::Pause { .. } | CtlCmd::Resume { .. } | CtlCmd::Concurrency { .. } => {
                stage_table(std::slice::from_ref(&answer))
            }
            CtlCmd::Publisher | CtlCmd::Rate { .. } => publisher_text(&answer),
        }
    };
    Ok((text, ready))
}

/// A stage name as one URL path segment.
fn segment(name: &str) -> String {
    url::form_urlencoded::byte_serialize(name.as_bytes())
        .collect::<String>()
        .replace('+', "%20")
}

fn status_text(v: &Value) -> String {
    let mut out = String::new();
    if v["ready"] == true {
        out.push_str("ready\n");
    } else {
        out.push_str("not ready:\n");
        for r in v["reasons"].as_array().into_iter().flatten() {
            let _ = writeln!(out, "  - {}", r.as_str().unwrap_or_default());
        }
    }
    out.push_str(&publisher_text(&v["publisher"]));
    out.push_str(&stage_table(
        v["stages"].as_array().map_or(&[], Vec::as_slice),
    ));
    out
}

fn publisher_text(p: &Value) -> String {
    let rate = match p["rate"].as_u64() {
        Some(0) => "unlimited".to_owned(),
        Some(r) => format!("{r}/s (burst {})", p["burst"]),
        None => "?".to_owned(),
    };
    format!(
        "publisher: breaker {}, spooled {}, unconfirmed {}, rate {rate}{}\n",
        p["breaker"].as_str().unwrap_or("?"),
        p["spooled"],
        p["unconfirmed"],
        if p["broker_blocked"] == true {
            ", broker blocked"
        } else {
            ""
        },
    )
}

fn stage_table(stages: &[Value]) -> String {
    let rows: Vec<[String; 5]> = stages
        .iter()
        .map(|s| {
            let causes: Vec<&str> = s["paused"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            let pinned = if s["pinned_workers"].is_null() {
                ""
            } else {
                " pinned"
            };
            [
                s["name"].as_str().unwrap_or("?").to_owned(),
                match s["consumer"].as_str() {
                    // a single-active-consumer queue: active or standby
                    Some(role) => format!("{} ({role})", s["state"].as_str().unwrap_or("?")),
                    None => s["state"].as_str().unwrap_or("?").to_owned(),
                },
                format!("{}/{}", s["in_flight"], s["prefetch"]),
                format!("{} ({} busy){pinned}", s["workers"], s["busy_workers"]),
                causes.join(","),
            ]
        })
        .collect();
    let head = ["STAGE", "STATE", "IN FLIGHT", "WORKERS", "PAUSED BY"];
    let mut width = head.map(str::len);
    for r in &rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    for r in std::iter::once(head.map(str::to_owned)).chain(rows) {
        let line: Vec<String> = r
            .iter()
            .zip(width)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    out
}
