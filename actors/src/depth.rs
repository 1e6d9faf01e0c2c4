//! The DepthMonitorActor: samples queue depths, applies watermarks, and
//! autoscales stage workers.
//!
//! Every `interval` it issues a passive `queue.declare` per watched queue on
//! its own channel (on the consume connection, which a broker alarm never
//! blocks; no management plugin needed) and exports
//! `flowgate_queue_depth{queue}` and `flowgate_queue_consumers{queue}`.
//!
//! **Watermarks.** A queue with a [`Watermark`] is *above* from the sample
//! where its depth reaches `high` until the sample where it falls to `low`
//! or below ([`above_watermark`]). While any of a stage's output queues is
//! above, the stage is sent [`Pause`] with cause `watermark`, and
//! [`Resume`] once none is: the backlog then builds in the stage's own input
//! queue, which in turn may pause the stage before it. Between samples a
//! stage below the watermark gets an intake budget ([`SetBudget`]) of
//! `high - depth` (split between the stages feeding the queue), so it
//! cannot overshoot `high` by more than its in-flight window however long
//! the sampling interval is.
//!
//! **Ingress admission.** The monitor publishes what it samples in
//! [`QueueLevels`], a fixed map of atomics shared with the HTTP ingresses:
//! depth, peak, the above-watermark flag and an ingress headroom per queue.
//! [`QueueLevels::admit`] refuses a message bound for a queue that is above
//! its watermark (until it falls to `low`), and otherwise takes one unit of
//! the queue's ingress headroom, `(high - depth) / (feeding stages + 1)` as
//! of the last sample less what was admitted since that depth was read, so
//! an ingress cannot overshoot `high` between two samples by more than its
//! publishes in flight. No request ever waits for a sample.
//!
//! **Autoscaling.** A stage with a worker range gets [`SetWorkers`] from
//! [`scale_decision`]: double (up to `max`) while its input queue has a
//! backlog and most workers are busy, halve (down to `min`) once the input
//! is drained and most workers idle, at most once per `cooldown`. Every
//! decision is logged with its reason.

use crate::connection::{ConnectionActor, OpenChannel, Purpose};
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::stage::{Pause, Resume, SetBudget, SetWorkers, StageActor, StageProbe};
use actix::prelude::*;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use lapin::Channel;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tracing::{debug, info};

/// The pause cause used for watermarks (a `flowgate_stage_paused` label).
pub const WATERMARK_CAUSE: &str = "watermark";

/// High/low watermarks of a queue (ready messages).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Watermark {
    /// Upstream stages pause at or above this depth.
    pub high: u64,
    /// ...and resume at or below this one.
    pub low: u64,
}

/// Whether a queue counts as above its watermark after a sample of `depth`,
/// given whether it was above before (hysteresis between `low` and `high`).
pub fn above_watermark(was_above: bool, depth: u64, w: Watermark) -> bool {
    if was_above {
        depth > w.low
    } else {
        depth >= w.high
    }
}

/// Autoscaling bounds of one stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScaleRange {
    /// Fewest workers.
    pub min: usize,
    /// Most workers.
    pub max: usize,
}

/// What a stage looked like at one sample.
#[derive(Clone, Copy, Debug)]
pub struct StageSample {
    /// Workers it runs now.
    pub workers: usize,
    /// Workers running a handler at the sample.
    pub busy: usize,
    /// Ready messages in its input queue.
    pub input_depth: u64,
    /// Intake paused (e.g. its output is above a watermark): more workers
    /// would not help.
    pub paused: bool,
}

/// An autoscaling decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScaleDecision {
    /// The new number of workers.
    pub workers: usize,
    /// Why, for the log.
    pub reason: String,
}

/// Busy share at or above which a backlog scales a stage up.
const SCALE_UP_UTILIZATION: f64 = 0.75;
/// Busy share below which a drained stage scales down.
const SCALE_DOWN_UTILIZATION: f64 = 0.5;

/// Decides whether to change a stage's workers. `last_change` is when the
/// previous change was made; none is made within `cooldown` of it.
pub fn scale_decision(
    range: ScaleRange,
    s: StageSample,
    last_change: Option<Instant>,
    now: Instant,
    cooldown: Duration,
) -> Option<ScaleDecision> {
    let current = s.workers.max(1);
    if current < range.min {
        return Some(ScaleDecision {
            workers: range.min,
            reason: format!("below the minimum of {}", range.min),
        });
    }
    if current > range.max {
        return Some(ScaleDecision {
            workers: range.max,
            reason: format!("above the maximum of {}", range.max),
        });
    }
    if last_change.is_some_and(|t| now.saturating_duration_since(t) < cooldown) {
        return None;
    }
    let utilization = s.busy as f64 / current as f64;
    if s.input_depth > 0 && !s.paused && utilization >= SCALE_UP_UTILIZATION && current < range.max
    {
        let workers = (current * 2).min(range.max);
        return Some(ScaleDecision {
            workers,
            reason: format!(
                "input backlog of {} with {}/{} workers busy",
                s.input_depth, s.busy, current
            ),
        });
    }
    if s.input_depth == 0 && utilization < SCALE_DOWN_UTILIZATION && current > range.min {
        let workers = (current / 2).max(range.min);
        return Some(ScaleDecision {
            workers,
            reason: format!("input drained with {}/{} workers busy", s.busy, current),
        });
    }
    None
}

/// A queue the monitor samples.
#[derive(Clone, Debug)]
pub struct WatchedQueue {
    /// Queue name.
    pub name: String,
    /// Its watermarks, if any.
    pub watermark: Option<Watermark>,
}

/// A stage the monitor may pause or scale.
#[derive(Clone)]
pub struct WatchedStage {
    /// The stage's address.
    pub addr: Addr<StageActor>,
    /// Its probe (name, workers, busy workers, paused).
    pub probe: StageProbe,
    /// The queue it consumes.
    pub input: String,
    /// Queues its outputs land in; their watermarks pause it.
    pub outputs: Vec<String>,
    /// Worker range for autoscaling; `None`: fixed.
    pub scale: Option<ScaleRange>,
}

/// Settings of the monitor.
#[derive(Clone)]
pub struct DepthMonitorConfig {
    /// Sampling period.
    pub interval: Duration,
    /// Least time between two scaling changes of a stage.
    pub cooldown: Duration,
    /// Queues to sample.
    pub queues: Vec<WatchedQueue>,
    /// Stages to pause and scale.
    pub stages: Vec<WatchedStage>,
}

/// What the monitor last saw of one queue.
#[derive(Debug)]
struct Level {
    watermark: Option<Watermark>,
    /// Stages feeding the queue, plus one for the ingresses: the ingress
    /// gets one share of the headroom.
    shares: u64,
    depth: AtomicU64,
    peak: AtomicU64,
    above: AtomicBool,
    /// Ingress admissions left until the next sample.
    headroom: AtomicU64,
    /// Ingress admissions since the start.
    admitted: AtomicU64,
    /// `admitted` when the current sample's depth was read: admissions
    /// after it are not in that depth and come off the new headroom.
    admitted_at_read: AtomicU64,
}

/// Why [`QueueLevels::admit`] refused a message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The queue is above its watermark (it reached `high` and has not yet
    /// fallen to `low`).
    #[error("queue {queue} is above its watermark ({depth} ready, high {high}, low {low})")]
    AboveWatermark {
        /// The queue.
        queue: String,
        /// Its depth at the last sample.
        depth: u64,
        /// Its `high`.
        high: u64,
        /// Its `low`.
        low: u64,
    },
    /// The ingress's share of the queue's room below `high` is spent until
    /// the next sample.
    #[error("queue {queue} has no room below its watermark until the next depth sample")]
    HeadroomSpent {
        /// The queue.
        queue: String,
    },
}

impl Refusal {
    /// The queue that refused.
    pub fn queue(&self) -> &str {
        match self {
            Refusal::AboveWatermark { queue, .. } | Refusal::HeadroomSpent { queue } => queue,
        }
    }
}

/// The depth monitor's latest view of its watched queues, shared without
/// locks with whoever must refuse work early (the HTTP ingresses): one
/// fixed entry of atomics per watched queue, written once per sample. Cheap
/// to clone.
#[derive(Clone, Debug, Default)]
pub struct QueueLevels(Arc<BTreeMap<String, Level>>);

impl QueueLevels {
    /// Levels for `queues`, fed by `stages` (for the headroom shares).
    /// Before the first sample a queue counts as empty.
    pub fn new(queues: &[WatchedQueue], stages: &[WatchedStage]) -> Self {
        let map = queues
            .iter()
            .map(|q| {
                let feeders = stages
                    .iter()
                    .filter(|s| s.outputs.contains(&q.name))
                    .count();
                let shares = feeders as u64 + 1;
                let headroom = q.watermark.map_or(u64::MAX, |w| w.high / shares);
                (
                    q.name.clone(),
                    Level {
                        watermark: q.watermark,
                        shares,
                        depth: AtomicU64::new(0),
                        peak: AtomicU64::new(0),
                        above: AtomicBool::new(false),
                        headroom: AtomicU64::new(headroom),
                        admitted: AtomicU64::new(0),
                        admitted_at_read: AtomicU64::new(0),
                    },
                )
            })
            .collect();
        Self(Arc::new(map))
    }

    /// Whether `queue` is above its watermark (false when unwatched or
    /// without one).
    pub fn is_above(&self, queue: &str) -> bool {
        self.0
            .get(queue)
            .is_some_and(|l| l.above.load(Ordering::Acquire))
    }

    /// `queue`'s depth at the last good sample, if it is watched.
    pub fn depth(&self, queue: &str) -> Option<u64> {
        self.0.get(queue).map(|l| l.depth.load(Ordering::Acquire))
    }

    /// Depth per watched queue at the last good sample.
    pub fn current(&self) -> BTreeMap<String, u64> {
        self.0
            .iter()
            .map(|(q, l)| (q.clone(), l.depth.load(Ordering::Acquire)))
            .collect()
    }

    /// Highest sampled depth per watched queue since the start.
    pub fn peaks(&self) -> BTreeMap<String, u64> {
        self.0
            .iter()
            .map(|(q, l)| (q.clone(), l.peak.load(Ordering::Acquire)))
            .collect()
    }

    /// Admits one message bound for `queues` (those that are unwatched or
    /// have no watermark do not count): refused while any is above its
    /// watermark or has no ingress headroom left; otherwise one unit of
    /// each one's headroom is taken.
    pub fn admit<'a>(&self, queues: impl IntoIterator<Item = &'a str>) -> Result<(), Refusal> {
        let mut taken: Vec<&Level> = Vec::new();
        let mut result = Ok(());
        for q in queues {
            let Some(l) = self.0.get(q) else { continue };
            let Some(w) = l.watermark else { continue };
            if l.above.load(Ordering::Acquire) {
                result = Err(Refusal::AboveWatermark {
                    queue: q.to_owned(),
                    depth: l.depth.load(Ordering::Acquire),
                    high: w.high,
                    low: w.low,
                });
                break;
            }
            let took = l
                .headroom
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |h| h.checked_sub(1));
            if took.is_err() {
                result = Err(Refusal::HeadroomSpent {
                    queue: q.to_owned(),
                });
                break;
            }
            taken.push(l);
        }
        if result.is_err() {
            for l in taken {
                l.headroom.fetch_add(1, Ordering::AcqRel);
            }
        } else {
            for l in taken {
                l.admitted.fetch_add(1, Ordering::AcqRel);
            }
        }
        result
    }

    /// Marks the moment `queue`'s depth is read for a sample.
    fn mark_read(&self, queue: &str) {
        if let Some(l) = self.0.get(queue) {
            let n = l.admitted.load(Ordering::Acquire);
            l.admitted_at_read.store(n, Ordering::Release);
        }
    }

    /// Records one sample of `queue`: `None` when it could not be read
    /// (no ingress headroom until a good sample).
    fn record(&self, queue: &str, depth: Option<u64>, above: bool) {
        let Some(l) = self.0.get(queue) else { return };
        l.above.store(above, Ordering::Release);
        match depth {
            Some(d) => {
                l.depth.store(d, Ordering::Release);
                l.peak.fetch_max(d, Ordering::AcqRel);
                if let Some(w) = l.watermark {
                    let since_read = l
                        .admitted
                        .load(Ordering::Acquire)
                        .saturating_sub(l.admitted_at_read.load(Ordering::Acquire));
                    let room = if above {
                        0
                    } else {
                        (w.high.saturating_sub(d) / l.shares).saturating_sub(since_read)
                    };
                    l.headroom.store(room, Ordering::Release);
                }
            }
            None => {
                if l.watermark.is_some() {
                    l.headroom.store(0, Ordering::Release);
                }
            }
        }
    }
}

/// Stops the monitor (engine shutdown) and closes its channel.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Stop;

/// One sample: depth and consumers per queue (`None`: could not be read).
#[derive(Message)]
#[rtype(result = "()")]
struct DepthSampled(Vec<(String, Option<(u64, u64)>)>);

/// See the module docs.
pub struct DepthMonitorActor {
    cfg: DepthMonitorConfig,
    conn: Addr<ConnectionActor>,
    metrics: Metrics,
    channel: Option<Channel>,
    sampling: bool,
    /// Queues currently above their watermark.
    above: HashMap<String, bool>,
    /// Per stage: when its workers last changed.
    last_scaled: HashMap<String, Instant>,
    /// Per stage: whether we paused it.
    paused: HashMap<String, bool>,
    /// What the ingresses see.
    levels: QueueLevels,
}

impl DepthMonitorActor {
    /// A monitor; start it with `Actor::start`.
    pub fn new(cfg: DepthMonitorConfig, conn: Addr<ConnectionActor>, metrics: Metrics) -> Self {
        let levels = QueueLevels::new(&cfg.queues, &cfg.stages);
        Self {
            levels,
            cfg,
            conn,
            metrics,
            channel: None,
            sampling: false,
            above: HashMap::new(),
            last_scaled: HashMap::new(),
            paused: HashMap::new(),
        }
    }

    /// The levels this monitor publishes (take them before starting it).
    pub fn levels(&self) -> QueueLevels {
        self.levels.clone()
    }

    fn sample(&mut self, ctx: &mut Context<Self>) {
        if self.sampling {
            return;
        }
        self.sampling = true;
        let conn = self.conn.clone();
        let mut ch = self.channel.take().filter(|c| c.status().connected());
        let names: Vec<String> = self.cfg.queues.iter().map(|q| q.name.clone()).collect();
        let levels = self.levels.clone();
        ctx.spawn(
            async move {
                let mut out = Vec::with_capacity(names.len());
                for name in names {
                    let c = match &ch {
                        Some(c) => c.clone(),
                        None => match open(&conn).await {
                            Ok(c) => {
                                ch = Some(c.clone());
                                c
                            }
                            Err(e) => {
                                debug!(error = %e, "depth monitor has no channel");
                                out.push((name, None));
                                continue;
                            }
                        },
                    };
                    levels.mark_read(&name);
                    match passive_declare(&c, &name).await {
                        Ok(v) => out.push((name, Some(v))),
                        Err(e) => {
                            // A failed passive declare closes the channel.
                            debug!(queue = %name, error = %e, "depth sample failed");
                            ch = None;
                            out.push((name, None));
                        }
                    }
                }
                (ch, out)
            }
            .into_actor(self)
            .map(|(ch, out), act, ctx| {
                act.channel = ch;
                act.sampling = false;
                ctx.notify(DepthSampled(out));
            }),
        );
    }

    fn apply(&mut self, sample: &[(String, Option<(u64, u64)>)]) {
        let now = Instant::now();
        let mut depths = HashMap::new();
        for (name, v) in sample {
            let Some((depth, consumers)) = v else {
                let was = self.above.get(name).copied().unwrap_or(false);
                self.levels.record(name, None, was);
                continue;
            };
            depths.insert(name.as_str(), *depth);
            self.metrics
                .queue_depth
                .with_label_values(&[name])
                .set(*depth as i64);
            self.metrics
                .queue_consumers
                .with_label_values(&[name])
                .set(*consumers as i64);
            if let Some(w) = self
                .cfg
                .queues
                .iter()
                .find(|q| &q.name == name)
                .and_then(|q| q.watermark)
            {
                let was = self.above.get(name).copied().unwrap_or(false);
                let is = above_watermark(was, *depth, w);
                if was != is {
                    info!(queue = %name, depth, high = w.high, low = w.low, above = is, "watermark crossed");
                }
                self.above.insert(name.clone(), is);
            }
            let is = self.above.get(name).copied().unwrap_or(false);
            self.levels.record(name, Some(*depth), is);
        }
        for st in &self.cfg.stages {
            let name = st.probe.name.clone();
            let should_pause = st
                .outputs
                .iter()
                .any(|q| self.above.get(q).copied().unwrap_or(false));
            let was = self.paused.get(&name).copied().unwrap_or(false);
            if !should_pause {
                // Below the watermark: hand out what is left up to `high`,
                // shared between the stages feeding the queue, so the
                // stage cannot overshoot before the next sample.
                let budget = st
                    .outputs
                    .iter()
                    .filter_map(|q| {
                        let w = self.cfg.queues.iter().find(|w| &w.name == q)?.watermark?;
                        let feeders = self
                            .cfg
                            .stages
                            .iter()
                            .filter(|s| s.outputs.contains(q))
                            .count()
                            .max(1) as u64;
                        // Unread depth: no budget until the next good sample.
                        let depth = depths.get(q.as_str()).copied().unwrap_or(w.high);
                        Some(w.high.saturating_sub(depth) / feeders)
                    })
                    .min();
                if budget.is_some() {
                    // bounded: one per stage per sample, and the stage never
                    // blocks its mailbox (no `ctx.wait`), so each is handled
                    // before the next sample.
                    st.addr.do_send(SetBudget(budget));
                }
            }
            if should_pause != was {
                let cause = WATERMARK_CAUSE.to_owned();
                // bounded: only on a watermark crossing, at most one per
                // stage per sample.
                if should_pause {
                    st.addr.do_send(Pause { cause });
                } else {
                    st.addr.do_send(Resume { cause });
                }
                self.paused.insert(name.clone(), should_pause);
            }
            let (Some(range), Some(&input_depth)) = (st.scale, depths.get(st.input.as_str()))
            else {
                continue;
            };
            let s = StageSample {
                workers: st.probe.workers(),
                busy: st.probe.busy_workers(),
                input_depth,
                paused: st.probe.paused() || should_pause,
            };
            if let Some(d) = scale_decision(
                range,
                s,
                self.last_scaled.get(&name).copied(),
                now,
                self.cfg.cooldown,
            ) {
                let dir = if d.workers > s.workers { "up" } else { "down" };
                info!(stage = %name, from = s.workers, to = d.workers, reason = %d.reason, "autoscaling");
                self.metrics
                    .stage_scaling
                    .with_label_values(&[&name, dir])
                    .inc();
                // bounded: at most one per stage per cooldown.
                st.addr.do_send(SetWorkers(d.workers));
                self.last_scaled.insert(name, now);
            }
        }
    }
}

async fn open(conn: &Addr<ConnectionActor>) -> Result<Channel> {
    conn.send(OpenChannel(Purpose::Consume)).await?
}

async fn passive_declare(ch: &Channel, queue: &str) -> Result<(u64, u64)> {
    let q = ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(Error::from)?;
    Ok((u64::from(q.message_count()), u64::from(q.consumer_count())))
}

impl Actor for DepthMonitorActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        if self.cfg.queues.is_empty() {
            return;
        }
        ctx.run_interval(self.cfg.interval, |act, ctx| act.sample(ctx));
    }

    fn stopped(&mut self, _ctx: &mut Context<Self>) {
        if let Some(ch) = self.channel.take() {
            tokio::spawn(async move {
                // At engine shutdown the connection is closing as well: a
                // failed close of this read-only channel loses nothing.
                if let Err(e) = ch.close(200, "depth monitor stopped".into()).await {
                    debug!(error = %e, "closing the depth monitor channel");
                }
            });
        }
    }
}

impl Handler<Stop> for DepthMonitorActor {
    type Result = ();

    fn handle(&mut self, _: Stop, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}

impl Handler<DepthSampled> for DepthMonitorActor {
    type Result = ();

    fn handle(&mut self, msg: DepthSampled, _ctx: &mut Context<Self>) {
        self.apply(&msg.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: Watermark = Watermark { high: 100, low: 20 };

    fn levels() -> QueueLevels {
        let q = |name: &str, watermark| WatchedQueue {
            name: name.into(),
            watermark,
        };
        QueueLevels::new(
            &[
                q("a", Some(Watermark { high: 10, low: 2 })),
                q("b", Some(Watermark { high: 3, low: 1 })),
                q("plain", None),
            ],
            &[],
        )
    }

    /// A sample as the monitor takes it: the read, then the record.
    fn sample_level(l: &QueueLevels, q: &str, depth: Option<u64>, above: bool) {
        l.mark_read(q);
        l.record(q, depth, above);
    }

    #[test]
    fn ingress_admission_follows_the_watermark_with_hysteresis() {
        let l = levels();
        // Before any sample: empty, the whole room below high.
        for _ in 0..10 {
            l.admit(["a"]).unwrap();
        }
        assert!(matches!(l.admit(["a"]), Err(Refusal::HeadroomSpent { .. })));
        // A sample refills the room to high - depth.
        sample_level(&l, "a", Some(6), false);
        for _ in 0..4 {
            l.admit(["a"]).unwrap();
        }
        assert!(l.admit(["a"]).is_err());
        // Above high: refused, and still refused on the way down to low.
        sample_level(&l, "a", Some(12), true);
        let e = l.admit(["a"]).unwrap_err();
        assert_eq!(e.queue(), "a");
        assert!(
            matches!(e, Refusal::AboveWatermark { depth: 12, .. }),
            "{e}"
        );
        sample_level(&l, "a", Some(5), true);
        assert!(l.admit(["a"]).is_err());
        sample_level(&l, "a", Some(2), false);
        assert!(l.admit(["a"]).is_ok());
        assert!(!l.is_above("a") && l.depth("a") == Some(2));
        assert_eq!(l.peaks()["a"], 12);
        assert_eq!(l.current()["a"], 2);
        // Admissions between reading the depth and recording it are not in
        // that depth: they come off the new room.
        l.mark_read("a");
        l.admit(["a"]).unwrap();
        l.admit(["a"]).unwrap();
        l.record("a", Some(4), false);
        for _ in 0..4 {
            l.admit(["a"]).unwrap();
        }
        assert!(l.admit(["a"]).is_err(), "10 - 4 - 2 admitted meanwhile");
        // An unreadable sample leaves no room until a good one.
        sample_level(&l, "a", None, false);
        assert!(l.admit(["a"]).is_err());
    }

    #[test]
    fn a_refusal_by_one_queue_returns_the_room_taken_from_the_others() {
        let l = levels();
        for _ in 0..3 {
            l.admit(["a", "b"]).unwrap();
        }
        // b is full; a keeps its 7 units.
        assert!(l.admit(["a", "b"]).is_err());
        for _ in 0..7 {
            l.admit(["a"]).unwrap();
        }
        assert!(l.admit(["a"]).is_err());
        // Unwatched queues and queues without a watermark never refuse.
        for _ in 0..100 {
            l.admit(["plain", "unknown"]).unwrap();
        }
    }

    #[test]
    fn watermark_has_hysteresis() {
        let seq = [0, 50, 99, 100, 150, 60, 21, 20, 50, 99, 100];
        let mut above = false;
        let got: Vec<bool> = seq
            .iter()
            .map(|d| {
                above = above_watermark(above, *d, W);
                above
            })
            .collect();
        assert_eq!(
            got,
            [false, false, false, true, true, true, true, false, false, false, true]
        );
    }

    fn sample(workers: usize, busy: usize, depth: u64) -> StageSample {
        StageSample {
            workers,
            busy,
            input_depth: depth,
            paused: false,
        }
    }

    const R: ScaleRange = ScaleRange { min: 1, max: 8 };
    const COOL: Duration = Duration::from_secs(10);

    #[tokio::test(start_paused = true)]
    async fn backlog_scales_to_max_then_drain_returns_to_min() {
        let mut workers = 1;
        let mut last = None;
        let mut steps = Vec::new();
        // Busy backlog: doubles once per cooldown up to max.
        for _ in 0..100 {
            let now = Instant::now();
            if let Some(d) = scale_decision(R, sample(workers, workers, 5000), last, now, COOL) {
                assert!(d.reason.contains("backlog"), "{}", d.reason);
                workers = d.workers;
                last = Some(now);
                steps.push(workers);
            }
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        assert_eq!(steps, [2, 4, 8]);
        // Drained and idle: halves back to min.
        steps.clear();
        for _ in 0..100 {
            let now = Instant::now();
            if let Some(d) = scale_decision(R, sample(workers, 0, 0), last, now, COOL) {
                assert!(d.reason.contains("drained"), "{}", d.reason);
                workers = d.workers;
                last = Some(now);
                steps.push(workers);
            }
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        assert_eq!(steps, [4, 2, 1]);
    }

    #[tokio::test(start_paused = true)]
    async fn cooldown_holds_changes_back() {
        let t0 = Instant::now();
        let d = scale_decision(R, sample(1, 1, 10), None, t0, COOL).unwrap();
        assert_eq!(d.workers, 2);
        tokio::time::advance(COOL - Duration::from_millis(1)).await;
        assert_eq!(
            scale_decision(R, sample(2, 2, 10), Some(t0), Instant::now(), COOL),
            None
        );
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(
            scale_decision(R, sample(2, 2, 10), Some(t0), Instant::now(), COOL).map(|d| d.workers),
            Some(4)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn no_scaling_without_need() {
        let now = Instant::now();
        // Backlog but idle workers: the handler is not the bottleneck.
        assert_eq!(scale_decision(R, sample(4, 1, 5000), None, now, COOL), None);
        // Backlog, busy, but paused by a downstream watermark.
        let mut s = sample(4, 4, 5000);
        s.paused = true;
        assert_eq!(scale_decision(R, s, None, now, COOL), None);
        // Drained but busy (finishing the last window).
        assert_eq!(scale_decision(R, sample(4, 4, 0), None, now, COOL), None);
        // At the bounds.
        assert_eq!(scale_decision(R, sample(8, 8, 9), None, now, COOL), None);
        assert_eq!(scale_decision(R, sample(1, 0, 0), None, now, COOL), None);
        // Out of range is corrected at once, cooldown or not.
        assert_eq!(
            scale_decision(R, sample(12, 0, 0), Some(now), now, COOL).map(|d| d.workers),
            Some(8)
        );
    }
}
