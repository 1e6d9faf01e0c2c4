//! Chaos: the work services as separate worker processes (`flowgate-orders
//! worker --config F --stage NAME`), killed with SIGKILL and restarted at random
//! while orders flow; then the count of lost orders and duplicate effects:
//! charges and calls from the payment provider's own books, reservations
//! from the stock left against what the orders that passed reserve asked
//! for.
//!
//! The workers share their records through Redis (`[orders] redis_url`,
//! a key prefix per run), so a redelivery after a kill finds the
//! reservation or charge made by the killed process.

use super::ledger::{EffectReport, StockPolicy};
use super::load::{self, LoadPlan, LoadReport};
use super::payment::ProviderReport;
use crate::config::FlowConfig;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::Duration;
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tracing::{info, warn};

/// How a chaos run goes.
#[derive(Clone, Debug)]
pub struct ChaosPlan {
    /// The `flowgate-orders` binary the workers run.
    pub exe: PathBuf,
    /// The full flow (uniquely named, with `redis_url` and a per-run
    /// `key_prefix` set). Its work stages run as workers; the gateway and
    /// the status stages run in this process.
    pub config: FlowConfig,
    /// Worker processes per work stage.
    pub workers_per_stage: usize,
    /// Pause between kills is drawn from this range.
    pub kill_every: (Duration, Duration),
    /// The orders to drive.
    pub load: LoadPlan,
}

/// What a chaos run measured.
#[derive(Debug)]
pub struct ChaosReport {
    /// The load's summary.
    pub load: LoadReport,
    /// SIGKILLs sent.
    pub kills: usize,
    /// SIGKILLs sent, per stage.
    pub kills_by_stage: std::collections::BTreeMap<String, usize>,
    /// The shared records' counts.
    pub effects: Option<EffectReport>,
    /// The payment provider's books (calls and charges per order).
    pub provider: Option<ProviderReport>,
    /// Per SKU touched by an accepted order: (units the ledger holds,
    /// units it should hold: initial − what the reserved orders asked for).
    pub stock: Option<std::collections::BTreeMap<String, (u64, u64)>>,
    /// The records counted in PostgreSQL, when the flow has `[postgres]`.
    pub db: Option<crate::db::DbReport>,
    /// The workers' counts (inbox hits, relayed rows), added up.
    pub workers: WorkerStats,
}

/// What a worker counted, as it writes it to its `--stats` file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WorkerStats {
    /// Deliveries recognised from the inbox and acked without a handler
    /// call: redeliveries of committed orders, absorbed.
    pub inbox_hits: u64,
    /// Outbox rows this worker's relay published and deleted.
    pub relayed: u64,
}

impl WorkerStats {
    fn to_text(self) -> String {
        format!("inbox_hits {}\nrelayed {}\n", self.inbox_hits, self.relayed)
    }

    fn parse(text: &str) -> Self {
        let mut s = Self::default();
        for line in text.lines() {
            match line.split_once(' ') {
                Some(("inbox_hits", n)) => s.inbox_hits = n.trim().parse().unwrap_or(0),
                Some(("relayed", n)) => s.relayed = n.trim().parse().unwrap_or(0),
                _ => {}
            }
        }
        s
    }

    fn add(self, o: Self) -> Self {
        Self {
            inbox_hits: self.inbox_hits + o.inbox_hits,
            relayed: self.relayed + o.relayed,
        }
    }

    /// This engine's counts.
    pub fn of(engine: &flowgate::EngineHandle, stages: &[String]) -> Self {
        let m = engine.metrics();
        Self {
            inbox_hits: stages
                .iter()
                .map(|s| m.counter(flowgate::Metrics::INBOX_HITS, &[s]))
                .sum(),
            relayed: m.counter(flowgate::Metrics::OUTBOX_RELAYED, &[]),
        }
    }
}

/// The workers' `--stats` files in `dir`, added up: a lower bound (a
/// SIGKILL loses the counts since the worker's last write).
fn worker_stats(dir: &Path) -> WorkerStats {
    let mut total = WorkerStats::default();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("stats-") && !name.ends_with(".tmp") {
                if let Ok(text) = std::fs::read_to_string(e.path()) {
                    total = total.add(WorkerStats::parse(&text));
                }
            }
        }
    }
    total
}

impl ChaosReport {
    /// Accepted orders with no final status.
    pub fn lost(&self) -> usize {
        self.load.lost.len()
    }
    /// Orders with an effect applied more than once, counted from the
    /// database (None: no `[postgres]`, or the database unreadable).
    pub fn duplicate_effects(&self) -> Option<u64> {
        self.db.as_ref().map(|d| d.duplicate_effects)
    }
    /// SKUs whose stock is not what the reserved orders left (a
    /// reservation applied twice or lost; None: records unreadable).
    pub fn stock_mismatches(&self) -> Option<u64> {
        self.stock
            .as_ref()
            .map(|m| m.values().filter(|(have, want)| have != want).count() as u64)
    }
    /// Provider calls answered beyond the first per order: copies the pay
    /// stage's charge claim could not stop (None: books unreadable).
    pub fn duplicate_provider_calls(&self) -> Option<u64> {
        self.provider.as_ref().map(|p| p.duplicate_calls())
    }
    /// Orders the provider charged more than once (None: books unreadable).
    pub fn double_charges(&self) -> Option<u64> {
        self.provider.as_ref().map(|p| p.double_charges())
    }
    /// SIGKILLs sent to the workers of `stage`.
    pub fn kills_of(&self, stage: &str) -> usize {
        self.kills_by_stage.get(stage).copied().unwrap_or(0)
    }
    /// The summary table with the chaos lines.
    pub fn summary(&self) -> String {
        let n = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_else(|| "?".into());
        let mut s = format!(
            "{}  workers killed (SIGKILL)  {:>10}\n  lost orders               {:>10}\n  SKUs with wrong stock     {:>10}\n  duplicate provider calls  {:>10}\n",
            self.load.summary(),
            self.kills,
            self.lost(),
            n(self.stock_mismatches()),
            n(self.duplicate_provider_calls()),
        );
        if let Some(db) = &self.db {
            s.push_str(&format!(
                "  PostgreSQL: orders reserved {}, charged {}, shipped {}; duplicate effects {}\n  inbox hits (redeliveries absorbed, at least) {:>6}\n  outbox rows relayed by the workers (at least) {:>5}; left in the outbox {}\n",
                db.reserved,
                db.charged,
                db.shipped,
                db.duplicate_effects,
                self.workers.inbox_hits,
                self.workers.relayed,
                db.outbox_depth,
            ));
        }
        s
    }
}

struct Worker {
    stage: String,
    child: Option<Child>,
}

fn spawn(exe: &Path, config: &Path, stage: &str) -> std::io::Result<Child> {
    let stats = config.with_file_name(format!("stats-{stage}-{}", uuid::Uuid::new_v4().simple()));
    Command::new(exe)
        .arg("worker")
        .arg("--config")
        .arg(config)
        .arg("--stage")
        .arg(stage)
        .arg("--stats")
        .arg(stats)
        .env(
            "RUST_LOG",
            std::env::var("FLOWGATE_WORKER_LOG").unwrap_or_else(|_| "error".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
}

fn terminate(child: &Child) {
    if let Some(pid) = child.id() {
        // SAFETY: kill(2) with a pid we spawned and still own; no memory involved.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGTERM);
        }
    }
}

/// Runs the flow with killed and restarted workers. Must run on the actix
/// system (the gateway and the load client live there).
pub async fn run(plan: ChaosPlan) -> Result<ChaosReport, String> {
    let dir = tempfile_dir()?;
    let worker_cfg_path = dir.join("worker.toml");
    let mut worker_cfg = plan.config.clone();
    worker_cfg.orders.gateway_bind = String::new();
    worker_cfg.engine.http.bind = String::new();
    let text = worker_cfg
        .to_toml()
        .map_err(|e| format!("serialising the config: {e}"))?;
    write_private(&worker_cfg_path, &text).map_err(|e| format!("writing the config: {e}"))?;

    // This process: the gateway and the status stages.
    let mut local = plan.config.clone();
    local
        .engine
        .stages
        .retain(|s| !super::WORK_HANDLERS.contains(&s.handler.as_str()));
    let app = super::start(local)
        .await
        .map_err(|e| format!("starting the gateway: {e}"))?;
    let addr = app
        .gateway_addr()
        .ok_or("the config has no [orders] gateway_bind")?;

    let mut workers = Vec::new();
    for s in plan
        .config
        .engine
        .stages
        .iter()
        .filter(|s| super::WORK_HANDLERS.contains(&s.handler.as_str()))
    {
        for _ in 0..plan.workers_per_stage.max(1) {
            let child = spawn(&plan.exe, &worker_cfg_path, &s.name)
                .map_err(|e| format!("starting a worker: {e}"))?;
            workers.push(Worker {
                stage: s.name.clone(),
                child: Some(child),
            });
        }
    }
    info!(workers = workers.len(), "workers started");

    let (stop_tx, mut stop_rx) = watch::channel(false);
    let exe = plan.exe.clone();
    let cfg_path = worker_cfg_path.clone();
    let (lo, hi) = plan.kill_every;
    let chaos = tokio::spawn(async move {
        let mut kills = std::collections::BTreeMap::<String, usize>::new();
        let mut victims: Vec<usize> = Vec::new();
        loop {
            let pause = lo + (hi.saturating_sub(lo)).mul_f64(fastrand::f64());
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = stop_rx.changed() => break,
            }
            // Every worker once per round, in a new random order each
            // round: each stage is hit, at random moments.
            if victims.is_empty() {
                victims = (0..workers.len()).collect();
                fastrand::shuffle(&mut victims);
            }
            let Some(i) = victims.pop() else { break };
            let w = &mut workers[i];
            if let Some(mut c) = w.child.take() {
                let _ = c.start_kill();
                let _ = c.wait().await;
                *kills.entry(w.stage.clone()).or_default() += 1;
                info!(stage = %w.stage, "worker killed");
            }
            tokio::time::sleep(Duration::from_millis(fastrand::u64(50..400))).await;
            match spawn(&exe, &cfg_path, &w.stage) {
                Ok(c) => w.child = Some(c),
                Err(e) => warn!(stage = %w.stage, error = %e, "could not restart a worker"),
            }
        }
        (kills, workers)
    });

    let mut load_plan = plan.load.clone();
    load_plan.url = format!("http://{addr}");
    let report = load::run(&load_plan).await;

    let _ = stop_tx.send(true);
    let (kills_by_stage, mut workers) = chaos.await.map_err(|e| format!("chaos task: {e}"))?;
    for w in &workers {
        if let Some(c) = &w.child {
            terminate(c);
        }
    }
    for w in &mut workers {
        if let Some(c) = &mut w.child {
            if tokio::time::timeout(Duration::from_secs(15), c.wait())
                .await
                .is_err()
            {
                let _ = c.start_kill();
                let _ = c.wait().await;
            }
        }
    }
    let svc = app.service();
    let effects = svc.ledger.report().await.ok();
    let db = match &svc.db {
        Some(db) => db.report().await.ok(),
        None => None,
    };
    let workers_counted = worker_stats(&dir);
    let provider = svc.payment.report().await.ok();
    let initial = StockPolicy::from_config(&plan.config.orders);
    let taken = report.stock_taken();
    let mut skus: Vec<&String> = report
        .accepted_orders
        .values()
        .flat_map(|o| o.items.iter().map(|(s, _)| s))
        .collect();
    skus.sort();
    skus.dedup();
    let mut stock = Some(std::collections::BTreeMap::new());
    for sku in skus {
        let want = initial
            .initial(sku)
            .saturating_sub(taken.get(sku).copied().unwrap_or(0));
        match (svc.stock_of(sku).await, stock.as_mut()) {
            (Ok(have), Some(m)) => {
                m.insert(sku.clone(), (have, want));
            }
            _ => stock = None,
        }
    }
    app.shutdown().await;
    crate::delete_topology(&plan.config.engine.amqp.url, &plan.config.engine).await;
    if let Err(e) = app.service().clear_records().await {
        warn!(error = %e, "could not delete the run's records");
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(ChaosReport {
        load: report,
        kills: kills_by_stage.values().sum(),
        kills_by_stage,
        effects,
        provider,
        stock,
        db,
        workers: workers_counted,
    })
}

/// Writes a file only its owner can read: the worker config carries the
/// broker and Redis URLs, passwords included.
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?
        .write_all(text.as_bytes())
}

fn tempfile_dir() -> Result<PathBuf, String> {
    let dir = std::env::temp_dir().join(format!(
        "flowgate-chaos-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    ));
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    Ok(dir)
}

/// `flowgate-orders worker --config F --stage NAME`: runs one stage of an
/// order flow until SIGTERM (or forever, until SIGKILL).
pub async fn run_worker(config: &Path, stage: &str, stats: Option<PathBuf>) -> ExitCode {
    let mut cfg = match FlowConfig::load(config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!(
                "flowgate-orders worker: invalid configuration {}: {e}",
                config.display()
            );
            return ExitCode::from(2);
        }
    };
    cfg.engine.stages.retain(|s| s.name == stage);
    if cfg.engine.stages.is_empty() {
        eprintln!(
            "flowgate-orders worker: no stage named `{stage}` in {}",
            config.display()
        );
        return ExitCode::from(2);
    }
    cfg.orders.gateway_bind = String::new();
    cfg.engine.http.bind = String::new();
    cfg.engine.amqp.connection_name = format!("{}-worker-{stage}", cfg.engine.amqp.connection_name);
    let app = match super::start(cfg).await {
        Ok(a) => a,
        Err(e) => {
            eprintln!("flowgate-orders worker: cannot start: {e}");
            return ExitCode::from(1);
        }
    };
    let writer = stats.clone().map(|path| {
        let engine = app.engine().clone();
        let stages = vec![stage.to_owned()];
        tokio::spawn(async move {
            let mut last = None;
            loop {
                let now = WorkerStats::of(&engine, &stages);
                if last != Some(now) {
                    write_stats(&path, now);
                    last = Some(now);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    });
    let code = match app.engine().run_until_signal().await {
        Ok(stopped) => stopped.exit_code(),
        Err(e) => {
            eprintln!("flowgate-orders worker: cannot install the signal handlers: {e}");
            app.shutdown().await;
            ExitCode::from(1)
        }
    };
    if let Some(w) = writer {
        w.abort();
    }
    if let Some(path) = stats {
        write_stats(&path, WorkerStats::of(app.engine(), &[stage.to_owned()]));
    }
    code
}

/// Replaces the stats file at once (write, then rename), so a reader never
/// sees half of it, even after a SIGKILL.
fn write_stats(path: &Path, stats: WorkerStats) {
    let tmp = path.with_extension("tmp");
    if std::fs::write(&tmp, stats.to_text()).is_ok() {
        let _ = std::fs::rename(&tmp, path);
    }
}

#[cfg(test)]
mod private_file_tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn the_worker_config_is_readable_by_its_owner_only() {
        let dir = tempfile_dir().unwrap();
        let path = dir.join("worker.toml");
        write_private(&path, "url = \"amqp://u:secret@h\"").unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(mode, 0o600);
    }
}
