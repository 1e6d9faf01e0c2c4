//! A fault soak: two `flowgate run` daemons share one pipeline
//! (`ingress/broker → s1 → s2 → sink`, Redis dedup on both stages, a spool
//! each) on a private RabbitMQ node and a private Redis, while a seeded
//! nemesis kills -9, SIGTERMs and SIGSTOPs daemons, closes connections,
//! stops the broker app and the whole node, raises memory alarms and
//! restarts Redis — one fault at a time or two at once. Two producers feed
//! it: a plain AMQP client publishing with confirms, and HTTP clients
//! POSTing to the daemons' ingress (a 202 is flowgate's confirm). A
//! collector consumes the sink.
//!
//! Everything goes into a [`History`]; at the end the faults are healed,
//! the pipeline drains, the daemons are stopped with SIGTERM, the dead-letter
//! queues and every queue are read, and each confirmed id is classified
//! ([`Classification`]): arrived, dead-lettered, still queued, or lost.
//! [`SoakReport::failures`] lists what fails a run: a lost, dead-lettered or
//! stuck message, a daemon that exited without being asked to (or
//! uncleanly after SIGTERM), a fault the pipeline did not recover from.
//! Duplicates are reported, not failed (at least once).
//!
//! The seed makes the fault schedule repeatable (which faults, on which
//! daemon, how long); timing on a real machine does the rest.

use crate::daemon::Daemon;
use crate::history::{Classification, Ending, History};
use crate::node::BrokerNode;
use crate::redis::PrivateRedis;
use flowgate::lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use flowgate::lapin::types::FieldTable;
use flowgate::lapin::{BasicProperties, Connection, ConnectionProperties};
use futures::StreamExt;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How a soak runs.
#[derive(Clone, Debug)]
pub struct SoakPlan {
    /// The `flowgate` binary.
    pub exe: PathBuf,
    /// Seeds the fault schedule.
    pub seed: u64,
    /// How long the nemesis runs.
    pub duration: Duration,
    /// Messages per second of each producer (AMQP, HTTP).
    pub rate: u32,
    /// Longest the pipeline may take to flow again after a fault ends.
    pub recovery_bound: Duration,
}

impl SoakPlan {
    /// The plan for `exe`, its seed and length from the environment:
    /// `FLOWGATE_SOAK_SEED` (default: random), `FLOWGATE_SOAK_SECS`
    /// (default `default_secs`).
    pub fn from_env(exe: PathBuf, default_secs: u64) -> SoakPlan {
        let seed = std::env::var("FLOWGATE_SOAK_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| fastrand::u64(..));
        let secs = std::env::var("FLOWGATE_SOAK_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(default_secs);
        SoakPlan {
            exe,
            seed,
            duration: Duration::from_secs(secs),
            rate: 60,
            recovery_bound: Duration::from_secs(90),
        }
    }
}

/// One fault the nemesis applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// `kill -9` of daemon `n`, restarted after the hold.
    Kill9(usize),
    /// SIGTERM of daemon `n` (it must exit 0 within its grace), restarted.
    Term(usize),
    /// SIGSTOP of daemon `n` for the hold, then SIGCONT.
    Stop(usize),
    /// `rabbitmqctl close_all_connections`.
    CloseConnections,
    /// `rabbitmqctl stop_app` for the hold, then `start_app`.
    StopApp,
    /// The whole node stopped for the hold, then started.
    StopNode,
    /// A memory alarm for the hold.
    MemoryAlarm,
    /// Redis stopped for the hold (its data saved), then started.
    RedisRestart,
}

impl Fault {
    fn is_broker(self) -> bool {
        matches!(
            self,
            Fault::CloseConnections | Fault::StopApp | Fault::StopNode | Fault::MemoryAlarm
        )
    }

    fn daemon(self) -> Option<usize> {
        match self {
            Fault::Kill9(n) | Fault::Term(n) | Fault::Stop(n) => Some(n),
            _ => None,
        }
    }
}

/// What one round of the nemesis did and how long the pipeline took to
/// flow again.
#[derive(Clone, Debug)]
pub struct FaultRecord {
    /// Seconds into the run when it started.
    pub at: Duration,
    /// The faults applied together.
    pub faults: Vec<Fault>,
    /// How long they were held.
    pub hold: Duration,
    /// From the end of the faults until both daemons were ready and a new
    /// message arrived at the sink; `None`: not within the bound.
    pub recovery: Option<Duration>,
}

/// What a soak found.
#[derive(Debug)]
pub struct SoakReport {
    /// The seed of the schedule.
    pub seed: u64,
    /// Every round of faults.
    pub faults: Vec<FaultRecord>,
    /// Every confirmed id, classified.
    pub classification: Classification,
    /// Daemon exits nobody asked for (or an unclean exit after SIGTERM).
    pub unexpected_exits: Vec<String>,
    /// What did not drain at the end (spooled records, messages in flight).
    pub stuck: Vec<String>,
    /// The daemons' logs' directory (kept when the run failed).
    pub dir: PathBuf,
}

impl SoakReport {
    /// Why the run fails; empty when it passes.
    pub fn failures(&self) -> Vec<String> {
        let mut f = Vec::new();
        let c = &self.classification;
        if !c.lost.is_empty() {
            f.push(format!("{} confirmed messages lost", c.lost.len()));
        }
        if !c.dead_lettered.is_empty() {
            f.push(format!(
                "{} good messages dead-lettered",
                c.dead_lettered.len()
            ));
        }
        if !c.queued.is_empty() {
            f.push(format!("{} messages stuck in a queue", c.queued.len()));
        }
        if !c.unexpected.is_empty() {
            f.push(format!(
                "{} ids arrived that were never sent",
                c.unexpected.len()
            ));
        }
        f.extend(self.stuck.iter().cloned());
        f.extend(self.unexpected_exits.iter().cloned());
        for r in self.faults.iter().filter(|r| r.recovery.is_none()) {
            f.push(format!(
                "no recovery after {:?} at {:.1}s",
                r.faults,
                r.at.as_secs_f64()
            ));
        }
        if c.confirmed == 0 {
            f.push("nothing was confirmed".into());
        }
        f
    }

    /// The seed, the schedule with recovery times, and the classification.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "soak seed {} (FLOWGATE_SOAK_SEED={} reruns this schedule); {} rounds of faults",
            self.seed,
            self.seed,
            self.faults.len()
        );
        for r in &self.faults {
            let rec = r
                .recovery
                .map(|d| format!("{:.2}s", d.as_secs_f64()))
                .unwrap_or_else(|| "NOT RECOVERED".into());
            let _ = writeln!(
                s,
                "  {:>6.1}s  {:<40} held {:>5.1}s  recovered in {rec}",
                r.at.as_secs_f64(),
                format!("{:?}", r.faults),
                r.hold.as_secs_f64()
            );
        }
        let recs: Vec<f64> = self
            .faults
            .iter()
            .filter_map(|r| r.recovery.map(|d| d.as_secs_f64()))
            .collect();
        if !recs.is_empty() {
            let max = recs.iter().cloned().fold(0.0, f64::max);
            let mean = recs.iter().sum::<f64>() / recs.len() as f64;
            let _ = writeln!(s, "  recovery: mean {mean:.2}s, max {max:.2}s");
        }
        let _ = write!(s, "{}", self.classification);
        for e in self.unexpected_exits.iter().chain(&self.stuck) {
            let _ = writeln!(s, "  {e}");
        }
        s
    }
}

const DAEMONS: usize = 2;

/// The pipeline's names.
struct Names {
    prefix: String,
}

impl Names {
    fn ex(&self) -> String {
        format!("{}.ex", self.prefix)
    }
    fn queue(&self, q: &str) -> String {
        format!("{}.{q}", self.prefix)
    }
}

fn daemon_toml(
    names: &Names,
    url: &str,
    redis: &str,
    dir: &std::path::Path,
    i: usize,
    ingress: u16,
) -> String {
    let p = &names.prefix;
    let ex = names.ex();
    format!(
        r#"
[amqp]
url = "{url}"
connection_name = "{p}-d{i}"
[supervisor]
backoff_max = "5s"
[redis]
url = "{redis}"
[dedup]
lease = "5s"
ttl = "1h"
prefix = "{p}:"
[spool]
path = "{spool}"
[publisher]
confirm_timeout = "5s"
[publisher.breaker]
reset = "1s"
blocked_timeout = "3s"
[ingress]
bind = "127.0.0.1:{ingress}"
auth = "none"
publish_timeout = "2s"
routes = [{{ exchange = "{ex}", routing_key = "in" }}]
[shutdown]
grace = "10s"
[[exchanges]]
name = "{ex}"
[[queues]]
name = "{p}.s1"
bindings = [{{ exchange = "{ex}", routing_key = "in" }}]
[[queues]]
name = "{p}.s2"
bindings = [{{ exchange = "{ex}", routing_key = "hop1" }}]
[[queues]]
name = "{p}.sink"
bindings = [{{ exchange = "{ex}", routing_key = "hop2" }}]
[[stages]]
name = "s1"
queue = "{p}.s1"
dedup = "redis"
prefetch = 20
concurrency = 4
output = {{ exchange = "{ex}", routing_key = "hop1" }}
[[stages]]
name = "s2"
queue = "{p}.s2"
dedup = "redis"
prefetch = 20
concurrency = 4
output = {{ exchange = "{ex}", routing_key = "hop2" }}
"#,
        spool = dir.join(format!("d{i}.spool")).display()
    )
}

/// The run's shared state.
struct Rig {
    node: BrokerNode,
    redis: Mutex<PrivateRedis>,
    daemons: Mutex<Vec<Daemon>>,
    /// Daemons the nemesis is handling right now (their exits are its own).
    handled: Mutex<Vec<bool>>,
    ingress: Vec<u16>,
    names: Names,
    history: History,
    unexpected_exits: Mutex<Vec<String>>,
    started: Instant,
}

impl Rig {
    fn daemons(&self) -> std::sync::MutexGuard<'_, Vec<Daemon>> {
        self.daemons.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_handled(&self, n: usize, on: bool) {
        self.handled.lock().unwrap_or_else(|p| p.into_inner())[n] = on;
    }

    fn unexpected(&self, what: String) {
        eprintln!("soak: {what}");
        self.unexpected_exits
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(what);
    }

    async fn all_ready(&self) -> bool {
        let ports: Vec<u16> = self.daemons().iter().map(|d| d.http).collect();
        for port in ports {
            if !ready(port).await {
                return false;
            }
        }
        true
    }
}

async fn ready(port: u16) -> bool {
    let Ok(Ok(mut s)) = tokio::time::timeout(
        Duration::from_secs(2),
        tokio::net::TcpStream::connect(("127.0.0.1", port)),
    )
    .await
    else {
        return false;
    };
    if s.write_all(b"GET /readyz HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .is_err()
    {
        return false;
    }
    let mut body = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut body)).await;
    body.starts_with("HTTP/1.0 200") || body.starts_with("HTTP/1.1 200")
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f)
        .await
        .expect("a blocking soak step panicked")
}

/// Runs a soak. Call it from a multi-threaded tokio runtime (the daemons,
/// the broker node and Redis are driven from blocking tasks).
pub async fn run(plan: SoakPlan) -> SoakReport {
    let node = blocking(BrokerNode::start)
        .await
        .expect("a private broker node");
    let redis = blocking(PrivateRedis::start).await;
    let dir = std::env::temp_dir().join(crate::unique("flowgate-soak"));
    std::fs::create_dir_all(&dir).expect("the soak's directory");
    let names = Names {
        prefix: crate::unique("soak"),
    };
    let ingress: Vec<u16> = (0..DAEMONS)
        .map(|_| crate::node::free_port().expect("a free port"))
        .collect();
    let daemons: Vec<Daemon> = (0..DAEMONS)
        .map(|i| {
            let toml = daemon_toml(&names, &node.amqp_url(), &redis.url(), &dir, i, ingress[i]);
            Daemon::start(&plan.exe, &dir, &format!("d{i}"), &toml)
        })
        .collect();
    let rig = Arc::new(Rig {
        node,
        redis: Mutex::new(redis),
        daemons: Mutex::new(daemons),
        handled: Mutex::new(vec![false; DAEMONS]),
        ingress,
        names,
        history: History::new(),
        unexpected_exits: Mutex::new(Vec::new()),
        started: Instant::now(),
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    while !rig.all_ready().await {
        assert!(
            Instant::now() < deadline,
            "the soak's daemons did not become ready; logs in {}",
            dir.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let stop = Arc::new(AtomicBool::new(false));
    let collector = tokio::spawn(collect(rig.clone(), stop.clone()));
    let watcher = tokio::spawn(watch_exits(rig.clone(), stop.clone()));
    let producing = Arc::new(AtomicBool::new(true));
    let amqp = tokio::spawn(produce_amqp(rig.clone(), producing.clone(), plan.rate));
    let http = tokio::spawn(produce_http(rig.clone(), producing.clone(), plan.rate));

    let faults = nemesis(&rig, &plan).await;

    producing.store(false, Ordering::Release);
    let _ = amqp.await;
    let _ = http.await;
    let stuck = drain(&rig).await;
    stop.store(true, Ordering::Release);
    let _ = watcher.await;
    let _ = collector.await;

    // SIGTERM: each must exit 0 within its grace.
    let r = rig.clone();
    let exits: Vec<Option<std::process::ExitStatus>> = blocking(move || {
        r.daemons()
            .iter_mut()
            .map(|d| d.terminate(Duration::from_secs(20)))
            .collect()
    })
    .await;
    for (i, e) in exits.iter().enumerate() {
        if !e.is_some_and(|s| s.success()) {
            rig.unexpected(format!("d{i}: the final SIGTERM ended with {e:?}"));
        }
    }
    let ending = ending(&rig).await;
    let classification = rig.history.classify(&ending);
    let unexpected_exits = rig
        .unexpected_exits
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let report = SoakReport {
        seed: plan.seed,
        faults,
        classification,
        unexpected_exits,
        stuck,
        dir: dir.clone(),
    };
    if report.failures().is_empty() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    report
}

/// The seeded schedule: rounds of one or two faults, each held, healed,
/// and followed by a wait for the pipeline to flow again.
async fn nemesis(rig: &Arc<Rig>, plan: &SoakPlan) -> Vec<FaultRecord> {
    let mut rng = fastrand::Rng::with_seed(plan.seed);
    let mut records = Vec::new();
    let end = Instant::now() + plan.duration;
    // Let traffic flow first.
    tokio::time::sleep(Duration::from_secs(2)).await;
    while Instant::now() < end {
        let mut faults = vec![pick(&mut rng)];
        if rng.u8(..4) == 0 {
            let second = pick(&mut rng);
            // Two broker faults only with an alarm, raised first (a lost
            // connection or a broker restart in the middle of an alarm).
            let with_alarm = faults[0] == Fault::MemoryAlarm || second == Fault::MemoryAlarm;
            let clash = second.is_broker() && faults[0].is_broker() && !with_alarm
                || second.daemon().is_some() && second.daemon() == faults[0].daemon()
                || second == faults[0];
            if !clash {
                faults.push(second);
                if faults[1] == Fault::MemoryAlarm {
                    faults.swap(0, 1);
                }
            }
        }
        let hold = Duration::from_millis(rng.u64(1000..6000));
        let at = rig.started.elapsed();
        eprintln!("soak: {:>6.1}s {faults:?} for {hold:?}", at.as_secs_f64());
        for f in &faults {
            apply(rig, *f).await;
        }
        tokio::time::sleep(hold).await;
        for f in faults.iter().rev() {
            heal(rig, *f).await;
        }
        let healed = Instant::now();
        let recovery = recovered(rig, healed, plan.recovery_bound).await;
        eprintln!(
            "soak:        recovered in {:?}",
            recovery.map(|d| d.as_secs_f64())
        );
        records.push(FaultRecord {
            at,
            faults,
            hold,
            recovery,
        });
        // A quiet spell between rounds.
        tokio::time::sleep(Duration::from_millis(rng.u64(500..2500))).await;
    }
    records
}

fn pick(rng: &mut fastrand::Rng) -> Fault {
    let n = rng.usize(..DAEMONS);
    match rng.u8(..8) {
        0 => Fault::Kill9(n),
        1 => Fault::Term(n),
        2 => Fault::Stop(n),
        3 => Fault::CloseConnections,
        4 => Fault::StopApp,
        5 => Fault::StopNode,
        6 => Fault::MemoryAlarm,
        _ => Fault::RedisRestart,
    }
}

async fn apply(rig: &Arc<Rig>, f: Fault) {
    let r = rig.clone();
    blocking(move || {
        let node = &r.node;
        match f {
            Fault::Kill9(n) => {
                r.set_handled(n, true);
                r.daemons()[n].kill9();
            }
            Fault::Term(n) => {
                r.set_handled(n, true);
                // The grace is 10 s; a clean drain takes far less.
                let status = r.daemons()[n].terminate(Duration::from_secs(20));
                if !status.is_some_and(|s| s.success()) {
                    r.unexpected(format!("d{n}: SIGTERM ended with {status:?}"));
                }
            }
            Fault::Stop(n) => {
                r.set_handled(n, true);
                r.daemons()[n].stop();
            }
            Fault::CloseConnections => {
                let _ = node.close_all_connections("soak");
            }
            Fault::StopApp => {
                let _ = node.stop_app();
            }
            Fault::StopNode => {
                let _ = node.stop_node();
            }
            Fault::MemoryAlarm => {
                let _ = node.set_memory_alarm(true);
            }
            Fault::RedisRestart => r.redis.lock().unwrap_or_else(|p| p.into_inner()).stop(),
        }
    })
    .await;
}

async fn heal(rig: &Arc<Rig>, f: Fault) {
    let r = rig.clone();
    blocking(move || {
        let node = &r.node;
        match f {
            Fault::Kill9(n) | Fault::Term(n) => {
                r.daemons()[n].restart();
                r.set_handled(n, false);
            }
            Fault::Stop(n) => {
                r.daemons()[n].cont();
                r.set_handled(n, false);
            }
            Fault::CloseConnections => {}
            Fault::StopApp => heal_broker(&r, "start_app", || node.start_app()),
            Fault::StopNode => {
                let mut retry = false;
                heal_broker(&r, "start the node", || {
                    if std::mem::replace(&mut retry, true) {
                        // A start that timed out may have left a half-booted node.
                        let _ = node.stop_node();
                    }
                    node.start_node()
                })
            }
            Fault::MemoryAlarm => {
                node.set_memory_alarm(false).expect("clear the alarm");
            }
            Fault::RedisRestart => r.redis.lock().unwrap_or_else(|p| p.into_inner()).spawn(),
        }
    })
    .await;
}

/// Brings the broker back: a machine under load can take longer than the
/// node's own start bound, so it tries three times before it gives up, and
/// then the soak fails saying so (not the engine's fault, but nothing after
/// it would mean anything).
fn heal_broker(rig: &Rig, what: &str, mut start: impl FnMut() -> anyhow::Result<()>) {
    for attempt in 1..=3 {
        match start() {
            Ok(()) => return,
            Err(e) => eprintln!("soak: {what}, attempt {attempt}: {e:#}"),
        }
    }
    rig.unexpected(format!("the broker could not be brought back ({what})"));
}

/// Waits until both daemons are ready and a message arrived after `healed`.
async fn recovered(rig: &Rig, healed: Instant, bound: Duration) -> Option<Duration> {
    let deadline = healed + bound;
    loop {
        let flowing = rig.history.last_arrival().is_some_and(|t| t > healed);
        if flowing && rig.all_ready().await {
            return Some(healed.elapsed());
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Notices daemons that exit without the nemesis asking, and restarts them.
async fn watch_exits(rig: Arc<Rig>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Acquire) {
        let r = rig.clone();
        blocking(move || {
            let handled = r.handled.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let mut ds = r.daemons();
            for (i, d) in ds.iter_mut().enumerate() {
                if handled[i] {
                    continue;
                }
                if let Some(status) = d.try_exit() {
                    let tail: String = d
                        .log()
                        .lines()
                        .rev()
                        .take(15)
                        .collect::<Vec<_>>()
                        .join("\n");
                    r.unexpected(format!(
                        "d{i} exited on its own ({status}); last log lines (newest first):\n{tail}"
                    ));
                    d.restart();
                }
            }
        })
        .await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn connect(url: &str) -> Option<Connection> {
    tokio::time::timeout(
        Duration::from_secs(5),
        Connection::connect(url, ConnectionProperties::default()),
    )
    .await
    .ok()?
    .ok()
}

/// Publishes `a<n>` with confirms at `rate`/s, reconnecting across faults.
async fn produce_amqp(rig: Arc<Rig>, on: Arc<AtomicBool>, rate: u32) {
    let url = rig.node.amqp_url();
    let ex = rig.names.ex();
    let gap = Duration::from_secs(1) / rate.max(1);
    let mut n = 0u64;
    while on.load(Ordering::Acquire) {
        let Some(conn) = connect(&url).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let Ok(ch) = conn.create_channel().await else {
            continue;
        };
        if ch
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .is_err()
        {
            continue;
        }
        while on.load(Ordering::Acquire) {
            let id = format!("a{n}");
            n += 1;
            rig.history.published(&id);
            let props = BasicProperties::default()
                .with_message_id(id.as_str().into())
                .with_delivery_mode(2);
            let sent = ch
                .basic_publish(
                    ex.as_str().into(),
                    "in".into(),
                    BasicPublishOptions {
                        mandatory: true,
                        immediate: false,
                    },
                    b"soak",
                    props,
                )
                .await;
            let Ok(confirm) = sent else { break };
            // Blocked by an alarm, a confirm may take as long as it lasts.
            match tokio::time::timeout(Duration::from_secs(30), confirm).await {
                Ok(Ok(flowgate::lapin::Confirmation::Ack(None))) => rig.history.confirmed(&id),
                Ok(Ok(_)) => {}
                _ => break,
            }
            tokio::time::sleep(gap).await;
        }
        let _ = conn.close(200, "soak".into()).await;
    }
}

/// POSTs `h<n>` to the daemons' ingress in turn at `rate`/s (a few at a
/// time); a 202 confirms it.
async fn produce_http(rig: Arc<Rig>, on: Arc<AtomicBool>, rate: u32) {
    const CLIENTS: u64 = 4;
    let per_client = Duration::from_secs(1) * CLIENTS as u32 / rate.max(1);
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let (rig, on) = (rig.clone(), on.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while on.load(Ordering::Acquire) {
                let id = format!("h{c}-{n}");
                let port = rig.ingress[(n as usize + c as usize) % rig.ingress.len()];
                n += 1;
                rig.history.published(&id);
                if post(port, &rig.names.ex(), &id).await == Some(202) {
                    rig.history.confirmed(&id);
                }
                tokio::time::sleep(per_client).await;
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

/// `POST /publish/<ex>/in` with `Idempotency-Key: id`: the status, if any.
async fn post(port: u16, ex: &str, id: &str) -> Option<u16> {
    let mut s = tokio::time::timeout(
        Duration::from_secs(2),
        tokio::net::TcpStream::connect(("127.0.0.1", port)),
    )
    .await
    .ok()?
    .ok()?;
    let body = b"soak";
    let req = format!(
        "POST /publish/{ex}/in HTTP/1.1\r\nHost: x\r\nIdempotency-Key: {id}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(req.as_bytes()).await.ok()?;
    s.write_all(body).await.ok()?;
    let mut answer = Vec::new();
    // The ingress answers within its publish_timeout (2 s).
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut answer))
        .await
        .ok()?
        .ok()?;
    let head = String::from_utf8_lossy(&answer);
    head.split_whitespace().nth(1)?.parse().ok()
}

/// Consumes the sink into the history, reconnecting across faults. A
/// redelivery of an id already counted is this collector's own ack lost
/// with its connection, not the engine's copy: not counted again.
async fn collect(rig: Arc<Rig>, stop: Arc<AtomicBool>) {
    let url = rig.node.amqp_url();
    let sink = rig.names.queue("sink");
    let mut seen = std::collections::HashSet::<String>::new();
    while !stop.load(Ordering::Acquire) {
        let Some(conn) = connect(&url).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let consumer = async {
            let ch = conn.create_channel().await.ok()?;
            ch.basic_qos(200, BasicQosOptions::default()).await.ok()?;
            ch.basic_consume(
                sink.as_str().into(),
                "soak-collector".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .ok()
        };
        let Some(mut consumer) = consumer.await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        loop {
            if stop.load(Ordering::Acquire) {
                break;
            }
            let next = tokio::time::timeout(Duration::from_millis(200), consumer.next()).await;
            let d = match next {
                Err(_) => continue,
                Ok(Some(Ok(d))) => d,
                Ok(_) => break,
            };
            let id = d
                .properties
                .message_id()
                .as_ref()
                .map(|s| s.to_string())
                .unwrap_or_default();
            if !(d.redelivered && seen.contains(&id)) {
                rig.history.arrived(&id);
                seen.insert(id);
            }
            if d.acker.ack(BasicAckOptions::default()).await.is_err() {
                break;
            }
        }
        let _ = conn.close(200, "soak".into()).await;
    }
}

/// After the nemesis: waits (bounded) until every confirmed id arrived and
/// the daemons hold nothing (in flight, in the spool). What is left is
/// returned as stuck.
async fn drain(rig: &Arc<Rig>) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let outstanding = rig.history.outstanding().len();
        let held = held(rig).await;
        if outstanding == 0 && held.is_empty() {
            return Vec::new();
        }
        if Instant::now() >= deadline {
            let mut stuck = held;
            if outstanding > 0 {
                stuck.push(format!(
                    "{outstanding} confirmed messages had not arrived 120 s after the last fault"
                ));
            }
            return stuck;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// What the daemons still hold: deliveries in flight, spooled records.
async fn held(rig: &Arc<Rig>) -> Vec<String> {
    let ports: Vec<u16> = rig.daemons().iter().map(|d| d.http).collect();
    let mut out = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        let page = metrics(*port).await;
        for (name, what) in [
            ("flowgate_stage_in_flight{stage=\"s1\"}", "in flight in s1"),
            ("flowgate_stage_in_flight{stage=\"s2\"}", "in flight in s2"),
            ("flowgate_spool_messages", "spooled"),
        ] {
            let v = page
                .as_deref()
                .and_then(|p| p.lines().find(|l| l.starts_with(name)))
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse::<f64>().ok());
            match v {
                Some(v) if v > 0.0 => out.push(format!("d{i}: {v} {what}")),
                Some(_) => {}
                None => out.push(format!("d{i}: no {name} on /metrics")),
            }
        }
    }
    out
}

async fn metrics(port: u16) -> Option<String> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .ok()?;
    let mut body = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut body))
        .await
        .ok()?
        .ok()?;
    Some(body)
}

/// Reads every queue of the pipeline and its dead-letter queues (and the
/// engine's unroutable queue) to the end: where the messages that did not
/// arrive are.
async fn ending(rig: &Arc<Rig>) -> Ending {
    let client = crate::Client::connect(&rig.node.amqp_url()).await;
    let mut end = Ending::default();
    for q in ["s1", "s2", "sink"] {
        let queue = rig.names.queue(q);
        for (id, _) in drain_queue(&client, &queue).await {
            *end.queued.entry(id).or_default() += 1;
        }
        for (id, reason) in drain_queue(&client, &format!("{queue}.dlq")).await {
            end.dead_lettered.insert(id, reason);
        }
    }
    for (id, reason) in drain_queue(&client, flowgate::UNROUTABLE_QUEUE).await {
        end.dead_lettered.insert(id, reason);
    }
    end
}

/// Every message left in `queue` (none if it does not exist), with its
/// dead-letter reason header if it has one.
async fn drain_queue(client: &crate::Client, queue: &str) -> Vec<(String, String)> {
    let Ok(q) = client.passive_declare(queue).await else {
        return Vec::new();
    };
    let n = q.message_count() as usize;
    if n == 0 {
        return Vec::new();
    }
    client
        .collect(queue, n, Duration::from_secs(10))
        .await
        .into_iter()
        .map(|(id, headers)| {
            let reason = crate::header(&headers, flowgate::envelope::REASON).unwrap_or_default();
            (id, reason)
        })
        .collect()
}
