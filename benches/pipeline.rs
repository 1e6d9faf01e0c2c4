//! What a message costs: the same 3-hop forward pipeline through flowgate
//! and through a plain lapin pipeline written here, in the same run, on
//! classic durable and on quorum queues.
//!
//! The stages run in their own process — the `flowgate` daemon
//! (`flowgate run --config`), or this bench binary re-executed as the lapin
//! baseline — so their CPU time, context switches and peak RSS are read from
//! `/proc/<pid>` alone; the source and the sink run here. Persistent 256-byte
//! messages, publisher confirms, prefetch 50, each hop acks its input only
//! after its output is confirmed (in both pipelines).
//!
//! Cases, per queue kind: the lean lapin pipeline (the reference: per hop
//! one connection with a consume and a confirm channel, a task per delivery
//! that publishes to the next queue through the default exchange, awaits
//! the confirm and acks), plain lapin (a consume and a publish connection
//! per hop, `mandatory`, properties cloned — as flowgate does it), flowgate
//! at its default config (batched acks), flowgate with single acks
//! (`ack_batch = { enabled = false }`). Ratios are against the lean one.
//! Then: a fixed 500 msg/s through 3 hops (classic, default config) for its
//! latency, and the HTTP ingress (`POST /publish`) at saturation (64
//! concurrent requests) and at a fixed 2,000 req/s. Last, a backlog: the
//! first stage's input holds `FLOWGATE_BENCH_BACKLOG` messages (default
//! 1,000,000) and the daemon consumes from it for a minute while its RSS is
//! sampled.
//!
//! Environment: `FLOWGATE_BENCH_MESSAGES` (default 30000),
//! `FLOWGATE_BENCH_REPS` (default 3; the median run by throughput is shown),
//! `FLOWGATE_BENCH_COMPARE_BIN` (another `flowgate` binary, e.g. an earlier
//! build: run as one more case with the default config),
//! `FLOWGATE_BENCH_BACKLOG` (0 skips the backlog case),
//! `FLOWGATE_BENCH_ONLY=pipeline` (only the per-kind pipeline tables).
//!
//! Run: `cargo bench --bench pipeline` (needs RabbitMQ on 127.0.0.1:5672).

use flowgate::config::{AckBatchConfig, Config, IngressConfig, IngressRoute, QueueKind};
use flowgate_testkit::delete_topology as cleanup;
use flowgate_testkit::driver::{drive_at, pipeline_config, RunStats};
use futures::StreamExt;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const HOPS: usize = 3;
const PREFETCH: u16 = 50;
const BODY: usize = 256;
const ROLE: &str = "FLOWGATE_BENCH_ROLE";
const FIXED_RATE: f64 = 500.0;
const INGRESS_RATE: f64 = 2000.0;
const INGRESS_CONCURRENCY: usize = 64;

fn env<T: std::str::FromStr>(k: &str, d: T) -> T {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

fn kind_name(k: QueueKind) -> &'static str {
    match k {
        QueueKind::Classic => "classic",
        QueueKind::Quorum => "quorum",
    }
}

// ---- the lapin baseline (run in a child process) -------------------------

/// Per hop, one consumer (prefetch 50) and one confirm-mode publishing
/// channel on separate connections; each delivery is republished to the
/// next hop and acked once the broker confirmed it.
async fn raw_lapin_stages(prefix: &str) -> Vec<Connection> {
    let mut conns = Vec::new();
    for i in 0..HOPS {
        let cc = Connection::connect(URL, ConnectionProperties::default())
            .await
            .expect("connect");
        let pc = Connection::connect(URL, ConnectionProperties::default())
            .await
            .expect("connect");
        let cch = cc.create_channel().await.expect("channel");
        cch.basic_qos(PREFETCH, BasicQosOptions::default())
            .await
            .expect("qos");
        let pch = pc.create_channel().await.expect("channel");
        pch.confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirms");
        let mut consumer = cch
            .basic_consume(
                format!("{prefix}.s{}", i + 1).as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("consume");
        let ex = format!("{prefix}.ex");
        let key = format!("hop{}", i + 1);
        tokio::spawn(async move {
            while let Some(Ok(d)) = consumer.next().await {
                let pch = pch.clone();
                let (ex, key) = (ex.clone(), key.clone());
                tokio::spawn(async move {
                    let confirm = pch
                        .basic_publish(
                            ex.as_str().into(),
                            key.as_str().into(),
                            BasicPublishOptions {
                                mandatory: true,
                                immediate: false,
                            },
                            &d.data,
                            d.properties.clone().with_delivery_mode(2),
                        )
                        .await
                        .expect("publish");
                    if confirm.await.is_ok() {
                        let _ = d.ack(BasicAckOptions::default()).await;
                    }
                });
            }
        });
        conns.push(cc);
        conns.push(pc);
    }
    conns
}

/// The leanest hand-written pipeline: per hop one connection with a
/// consume channel (prefetch 50) and a confirm-mode channel; a task per
/// delivery publishes it to the next queue through the default exchange
/// (its properties moved, not cloned; no `mandatory`), awaits the confirm
/// and acks.
async fn lean_lapin_stages(prefix: &str) -> Vec<Connection> {
    let mut conns = Vec::new();
    for i in 0..HOPS {
        let conn = Connection::connect(URL, ConnectionProperties::default())
            .await
            .expect("connect");
        let cch = conn.create_channel().await.expect("channel");
        cch.basic_qos(PREFETCH, BasicQosOptions::default())
            .await
            .expect("qos");
        let pch = conn.create_channel().await.expect("channel");
        pch.confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirms");
        let mut consumer = cch
            .basic_consume(
                format!("{prefix}.s{}", i + 1).as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("consume");
        let next = if i + 1 == HOPS {
            format!("{prefix}.sink")
        } else {
            format!("{prefix}.s{}", i + 2)
        };
        tokio::spawn(async move {
            while let Some(Ok(d)) = consumer.next().await {
                let (pch, next) = (pch.clone(), next.clone());
                tokio::spawn(async move {
                    let lapin::message::Delivery {
                        data,
                        properties,
                        acker,
                        ..
                    } = d;
                    let confirm = pch
                        .basic_publish(
                            "".into(),
                            next.as_str().into(),
                            BasicPublishOptions::default(),
                            &data,
                            properties,
                        )
                        .await
                        .expect("publish");
                    if confirm.await.is_ok() {
                        let _ = acker.ack(BasicAckOptions::default()).await;
                    }
                });
            }
        });
        conns.push(conn);
    }
    conns
}

/// The child: runs a baseline's stages on `prefix` until killed.
fn lapin_child(prefix: String, lean: bool) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async move {
        let _conns = if lean {
            lean_lapin_stages(&prefix).await
        } else {
            raw_lapin_stages(&prefix).await
        };
        println!("ready");
        std::future::pending::<()>().await;
    });
}

// ---- process accounting ---------------------------------------------------

/// CPU time, context switches and peak RSS of a process so far.
#[derive(Clone, Copy, Debug, Default)]
struct Usage {
    cpu: Duration,
    switches: u64,
    peak_rss_kib: u64,
}

/// User + system CPU time of a process so far.
fn cpu_of(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which is in parentheses).
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // utime, stime: fields 14 and 15 of stat, 11 and 12 after the name.
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_micros((ticks(11) + ticks(12)) * 1_000_000 / hz)
}

/// CPU time of the broker (every `beam.smp` process) so far.
fn broker_cpu() -> Duration {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Duration::ZERO;
    };
    procs
        .flatten()
        .filter_map(|p| p.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "beam.smp")
        })
        .map(cpu_of)
        .sum()
}

fn usage(pid: u32) -> Usage {
    let cpu = cpu_of(pid);
    let mut switches = 0;
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
            switches += status_field(&status, "voluntary_ctxt_switches")
                + status_field(&status, "nonvoluntary_ctxt_switches");
        }
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    Usage {
        cpu,
        switches,
        peak_rss_kib: status_field(&status, "VmHWM"),
    }
}

fn status_field(status: &str, name: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

// ---- the stages under test ------------------------------------------------

enum Stages {
    Lapin,
    LeanLapin,
    Flowgate { bin: PathBuf, single_acks: bool },
}

struct Running {
    child: Child,
    _config: Option<tempfile::NamedTempFile>,
}

impl Drop for Running {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

async fn wait_ready(http: &str) {
    let client = reqwest::Client::new();
    for _ in 0..400 {
        if let Ok(r) = client.get(format!("http://{http}/readyz")).send().await {
            if r.status().is_success() {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("flowgate at {http} never became ready");
}

async fn start(stages: &Stages, prefix: &str, cfg: &Config) -> Running {
    match stages {
        Stages::Lapin | Stages::LeanLapin => {
            let role = match stages {
                Stages::LeanLapin => "lean",
                _ => "lapin",
            };
            let mut child = Command::new(std::env::current_exe().expect("own path"))
                .env(ROLE, role)
                .env("FLOWGATE_BENCH_PREFIX", prefix)
                .stdout(Stdio::piped())
                .spawn()
                .expect("lapin stages start");
            let out = child.stdout.take().expect("stdout");
            tokio::task::spawn_blocking(move || {
                use std::io::BufRead;
                let mut line = String::new();
                let _ = std::io::BufReader::new(out).read_line(&mut line);
            })
            .await
            .expect("ready line");
            Running {
                child,
                _config: None,
            }
        }
        Stages::Flowgate { bin, single_acks } => {
            let mut cfg = cfg.clone();
            let http = format!("127.0.0.1:{}", free_port());
            cfg.http.bind = http.clone();
            if *single_acks {
                for s in &mut cfg.stages {
                    s.ack_batch = AckBatchConfig::off();
                }
            }
            let file = tempfile::Builder::new()
                .suffix(".toml")
                .tempfile()
                .expect("temp file");
            std::fs::write(file.path(), minimal_toml(&cfg)).expect("config written");
            let child = Command::new(bin)
                .args(["run", "--config"])
                .arg(file.path())
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .spawn()
                .expect("flowgate starts");
            wait_ready(&http).await;
            Running {
                child,
                _config: Some(file),
            }
        }
    }
}

/// The config as TOML without the sections left at their defaults, so an
/// earlier build (`FLOWGATE_BENCH_COMPARE_BIN`) that lacks a newer section
/// reads it too.
fn minimal_toml(cfg: &Config) -> String {
    let full = toml::Table::try_from(cfg).expect("config as TOML");
    let defaults = toml::Table::try_from(Config::default()).expect("defaults as TOML");
    let mut kept: toml::Table = full
        .into_iter()
        .filter(|(k, v)| defaults.get(k) != Some(v))
        .collect();
    // Likewise a stage's `ack_batch` at its default (builds before it had
    // `enabled` refuse the key; their default is single acks).
    let default_acks = toml::Value::try_from(AckBatchConfig::default()).expect("as TOML");
    if let Some(toml::Value::Array(stages)) = kept.get_mut("stages") {
        for s in stages.iter_mut().filter_map(toml::Value::as_table_mut) {
            if s.get("ack_batch") == Some(&default_acks) {
                s.remove("ack_batch");
            }
        }
    }
    toml::to_string(&kept).expect("config as TOML")
}

async fn declare(cfg: &Config) {
    let conn = Connection::connect(URL, ConnectionProperties::default())
        .await
        .expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    flowgate::topology::declare(&ch, cfg)
        .await
        .expect("declare");
    let _ = conn.close(200, "".into()).await;
}

/// One run's figures (a median's, with the spread of its runs).
#[derive(Clone, Debug, Default)]
struct Row {
    stats: RunStats,
    /// Lowest and highest throughput of the runs the median came from.
    spread: (f64, f64),
    cpu_us_per_msg: f64,
    switches_per_msg: f64,
    peak_rss_mib: f64,
    /// The broker's CPU over the run, in % of one core (the machine has 2).
    broker_cpu_pct: f64,
}

async fn run_once(stages: &Stages, kind: QueueKind, n: usize, rate: Option<f64>) -> Row {
    let prefix = format!("bench-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let cfg = pipeline_config(&prefix, HOPS, u32::from(PREFETCH), kind);
    declare(&cfg).await;
    let running = start(stages, &prefix, &cfg).await;
    let pid = running.child.id();
    let before = usage(pid);
    let (broker_before, wall) = (broker_cpu(), Instant::now());
    let stats = drive_at(
        URL,
        &format!("{prefix}.ex"),
        "in",
        &format!("{prefix}.sink"),
        n,
        BODY,
        rate,
        Duration::from_secs(900),
        |_| {},
    )
    .await
    .expect("drive");
    let after = usage(pid);
    let broker = (broker_cpu() - broker_before).as_secs_f64() / wall.elapsed().as_secs_f64();
    drop(running);
    cleanup(URL, &cfg).await;
    let per = |v: f64| v / stats.received.max(1) as f64;
    Row {
        broker_cpu_pct: broker * 100.0,
        spread: (stats.throughput(), stats.throughput()),
        cpu_us_per_msg: per((after.cpu - before.cpu).as_secs_f64() * 1e6),
        switches_per_msg: per(after.switches.saturating_sub(before.switches) as f64),
        peak_rss_mib: after.peak_rss_kib as f64 / 1024.0,
        stats,
    }
}

/// The median of `reps` runs by throughput.
async fn median(stages: &Stages, kind: QueueKind, n: usize, reps: usize) -> Row {
    let mut rows = Vec::new();
    for _ in 0..reps.max(1) {
        rows.push(run_once(stages, kind, n, None).await);
    }
    rows.sort_by(|a, b| a.stats.throughput().total_cmp(&b.stats.throughput()));
    let spread = (
        rows.first().map_or(0.0, |r| r.stats.throughput()),
        rows.last().map_or(0.0, |r| r.stats.throughput()),
    );
    let mut median = rows.swap_remove(rows.len() / 2);
    median.spread = spread;
    median
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn print_row(name: &str, r: &Row, base: &Row) {
    println!(
        "| {name} | {:.0} ({:.0}–{:.0}) | {:.2} | {:.1} | {:.1} | {:.0} | {:.2} | {:.1} | {:.0} | {:.0} | {} |",
        r.stats.throughput(),
        r.spread.0,
        r.spread.1,
        r.stats.throughput() / base.stats.throughput().max(1e-9),
        ms(r.stats.percentile(0.5)),
        ms(r.stats.percentile(0.99)),
        r.cpu_us_per_msg,
        r.cpu_us_per_msg / base.cpu_us_per_msg.max(1e-9),
        r.switches_per_msg,
        r.peak_rss_mib,
        r.broker_cpu_pct,
        r.stats.sent - r.stats.received,
    );
}

// ---- the HTTP ingress -----------------------------------------------------

/// Latencies and throughput of `POST /publish` requests.
struct HttpRun {
    ok: usize,
    refused: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
    /// The broker's CPU over the run, in % of one core.
    broker_cpu_pct: f64,
}

impl HttpRun {
    fn pct(&self, p: f64) -> f64 {
        if self.latencies.is_empty() {
            return 0.0;
        }
        let i = ((self.latencies.len() - 1) as f64 * p).round() as usize;
        ms(self.latencies[i.min(self.latencies.len() - 1)])
    }
}

/// `n` requests: from `concurrency` closed-loop workers, or open-loop at
/// `rate` (request `i` sent `i / rate` s after the first).
async fn post_many(url: &str, n: usize, concurrency: usize, rate: Option<f64>) -> HttpRun {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(1024)
        .build()
        .expect("client");
    let started = tokio::time::Instant::now();
    let broker_before = broker_cpu();
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let workers = if rate.is_some() {
        n.min(1024)
    } else {
        concurrency
    };
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (client, url, next) = (client.clone(), url.to_owned(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let (mut ok, mut refused) = (0, 0);
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let at = match rate {
                    Some(r) => started + Duration::from_secs_f64(i as f64 / r),
                    None => tokio::time::Instant::now(),
                };
                tokio::time::sleep_until(at).await;
                let r = client
                    .post(&url)
                    .header("x-message-id", format!("http-{i}"))
                    .body(vec![b'x'; BODY])
                    .send()
                    .await;
                // Open loop: latency from when the request was due.
                lat.push(at.elapsed());
                match r {
                    Ok(r) if r.status().is_success() => ok += 1,
                    _ => refused += 1,
                }
            }
            (ok, refused, lat)
        }));
    }
    let mut run = HttpRun {
        ok: 0,
        refused: 0,
        elapsed: Duration::ZERO,
        latencies: Vec::new(),
        broker_cpu_pct: 0.0,
    };
    for t in tasks {
        let (ok, refused, lat) = t.await.expect("worker");
        run.ok += ok;
        run.refused += refused;
        run.latencies.extend(lat);
    }
    run.elapsed = started.elapsed();
    run.broker_cpu_pct =
        (broker_cpu() - broker_before).as_secs_f64() / run.elapsed.as_secs_f64() * 100.0;
    run.latencies.sort();
    run
}

async fn ingress_case(bin: &Path, n: usize) {
    let prefix = format!(
        "bench-http-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let mut cfg = pipeline_config(&prefix, HOPS, u32::from(PREFETCH), QueueKind::Classic);
    let bind = format!("127.0.0.1:{}", free_port());
    cfg.ingress = IngressConfig::open(
        bind.clone(),
        vec![IngressRoute {
            exchange: format!("{prefix}.ex"),
            routing_key: "in".into(),
        }],
    );
    declare(&cfg).await;
    let stages = Stages::Flowgate {
        bin: bin.to_owned(),
        single_acks: false,
    };
    let running = start(&stages, &prefix, &cfg).await;
    let url = format!("http://{bind}/publish/{prefix}.ex/in");
    let saturated = post_many(&url, n, INGRESS_CONCURRENCY, None).await;
    let fixed = post_many(&url, n.min(20_000), 0, Some(INGRESS_RATE)).await;
    drop(running);
    cleanup(URL, &cfg).await;
    println!("\nHTTP ingress (POST /publish, {BODY}-byte bodies, 3 forward stages behind it)\n");
    println!("| load | requests | accepted | refused | req/s | p50 ms | p99 ms | p99.9 ms | broker CPU % of a core |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for (name, r) in [
        (
            format!("saturation, {INGRESS_CONCURRENCY} concurrent"),
            &saturated,
        ),
        (format!("fixed {INGRESS_RATE:.0} req/s"), &fixed),
    ] {
        println!(
            "| {name} | {} | {} | {} | {:.0} | {:.1} | {:.1} | {:.1} | {:.0} |",
            r.ok + r.refused,
            r.ok,
            r.refused,
            r.ok as f64 / r.elapsed.as_secs_f64().max(1e-9),
            r.pct(0.5),
            r.pct(0.99),
            r.pct(0.999),
            r.broker_cpu_pct,
        );
    }
}

// ---- a backlog in the broker ----------------------------------------------

/// How long the daemon consumes from the backlog while its RSS is sampled.
const BACKLOG_RUN: Duration = Duration::from_secs(60);

/// Puts `n` persistent messages in `queue` (through the default exchange),
/// confirmed, a chunk of ids at a time.
async fn fill(queue: &str, n: usize) {
    let client = flowgate_testkit::Client::connect(URL).await;
    let body = vec![b'x'; BODY];
    for start in (0..n).step_by(10_000) {
        let ids: Vec<String> = (start..n.min(start + 10_000))
            .map(|i| format!("backlog-{i}"))
            .collect();
        client.publish_many("", queue, &ids, &body).await;
    }
}

/// The daemon consuming one forward stage from a backlog of `n`: its RSS
/// every second for [`BACKLOG_RUN`].
async fn backlog_case(bin: &Path, n: usize) {
    let prefix = format!(
        "bench-backlog-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let cfg = pipeline_config(&prefix, 1, u32::from(PREFETCH), QueueKind::Classic);
    declare(&cfg).await;
    let input = format!("{prefix}.s1");
    let filling = Instant::now();
    fill(&input, n).await;
    let filled_in = filling.elapsed();
    let stages = Stages::Flowgate {
        bin: bin.to_owned(),
        single_acks: false,
    };
    let running = start(&stages, &prefix, &cfg).await;
    let pid = running.child.id();
    let rss = || {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        status_field(&status, "VmRSS") as f64 / 1024.0
    };
    let mut samples = Vec::new();
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    while started.elapsed() < BACKLOG_RUN {
        tick.tick().await;
        samples.push(rss());
    }
    let peak = usage(pid).peak_rss_kib as f64 / 1024.0;
    let depth = flowgate_testkit::Client::connect(URL)
        .await
        .depth(&input)
        .await;
    drop(running);
    cleanup(URL, &cfg).await;
    let half = samples.len() / 2;
    let max = |s: &[f64]| s.iter().copied().fold(0.0, f64::max);
    println!(
        "\nbacklog: {n} persistent {BODY}-byte messages in the input (filled in {:.0} s), \
         one forward stage consuming for {} s: {} consumed, {depth} still queued; \
         daemon RSS max {:.1} MiB in the first half, {:.1} MiB in the second, peak {:.1} MiB",
        filled_in.as_secs_f64(),
        BACKLOG_RUN.as_secs(),
        n.saturating_sub(depth as usize),
        max(&samples[..half]),
        max(&samples[half..]),
        peak,
    );
}

fn main() {
    if let Ok(role @ ("lapin" | "lean")) = std::env::var(ROLE).as_deref() {
        lapin_child(
            std::env::var("FLOWGATE_BENCH_PREFIX").expect("prefix"),
            role == "lean",
        );
        return;
    }
    // `cargo bench` passes `--bench`; nothing else to parse.
    let n: usize = env("FLOWGATE_BENCH_MESSAGES", 30_000);
    let reps: usize = env("FLOWGATE_BENCH_REPS", 3);
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_flowgate"));
    let compare = std::env::var_os("FLOWGATE_BENCH_COMPARE_BIN").map(PathBuf::from);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async move {
        println!(
            "3 hops, {n} persistent {BODY}-byte messages, confirms, prefetch {PREFETCH}; \
             stage process: CPU, context switches and peak RSS; median of {reps} runs"
        );
        let only_pipeline = std::env::var("FLOWGATE_BENCH_ONLY").as_deref() == Ok("pipeline");
        for kind in [QueueKind::Classic, QueueKind::Quorum] {
            let lean = median(&Stages::LeanLapin, kind, n, reps).await;
            let base = median(&Stages::Lapin, kind, n, reps).await;
            let default = median(
                &Stages::Flowgate {
                    bin: bin.clone(),
                    single_acks: false,
                },
                kind,
                n,
                reps,
            )
            .await;
            let single = median(
                &Stages::Flowgate {
                    bin: bin.clone(),
                    single_acks: true,
                },
                kind,
                n,
                reps,
            )
            .await;
            let other = match &compare {
                Some(b) => Some(
                    median(
                        &Stages::Flowgate {
                            bin: b.clone(),
                            single_acks: false,
                        },
                        kind,
                        n,
                        reps,
                    )
                    .await,
                ),
                None => None,
            };
            println!("\n{} durable queues\n", kind_name(kind));
            println!("| stages | msg/s (runs' range) | ratio | p50 ms | p99 ms | CPU µs/msg | CPU ratio | ctx switches/msg | peak RSS MiB | broker CPU % of a core | lost |");
            println!("|---|---|---|---|---|---|---|---|---|---|---|");
            print_row("lean lapin (the reference)", &lean, &lean);
            print_row("plain lapin", &base, &lean);
            print_row("flowgate, default", &default, &lean);
            print_row("flowgate, single acks", &single, &lean);
            if let Some(o) = &other {
                print_row("flowgate, comparison build (its defaults)", o, &lean);
            }
        }
        if only_pipeline {
            return;
        }
        let fixed_n = (FIXED_RATE as usize) * 20;
        let fixed = run_once(
            &Stages::Flowgate {
                bin: bin.clone(),
                single_acks: false,
            },
            QueueKind::Classic,
            fixed_n,
            Some(FIXED_RATE),
        )
        .await;
        println!(
            "\nfixed {FIXED_RATE:.0} msg/s through 3 hops (classic, default config, {fixed_n} messages): \
             p50 {:.1} ms, p99 {:.1} ms, stage CPU {:.0} µs/msg, broker CPU {:.0}% of a core, lost {}",
            ms(fixed.stats.percentile(0.5)),
            ms(fixed.stats.percentile(0.99)),
            fixed.cpu_us_per_msg,
            fixed.broker_cpu_pct,
            fixed.stats.sent - fixed.stats.received
        );
        ingress_case(&bin, n).await;
        let backlog: usize = env("FLOWGATE_BENCH_BACKLOG", 1_000_000);
        if backlog > 0 {
            backlog_case(&bin, backlog).await;
        }
    });
}
