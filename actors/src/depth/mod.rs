//! The DepthMonitorActor, cut by concept:
//!
//! * [`sampler`] — the periodic passive `queue.declare` per watched queue;
//! * [`watermark`] — high/low hysteresis and the one share formula;
//! * [`admission`] — [`QueueLevels`], what the ingresses admit by;
//! * [`autoscale`] — [`scale_decision`].
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

pub(crate) mod admission;
pub(crate) mod autoscale;
pub(crate) mod sampler;
pub(crate) mod watermark;

pub use admission::{QueueLevels, Refusal};
pub use autoscale::ScaleRange;
pub(crate) use autoscale::{scale_decision, StageSample};
pub use watermark::Watermark;
pub(crate) use watermark::{above_watermark, share};

use crate::connection::ConnectionActor;
use crate::metrics::events::{self, Event, PauseCause};
use crate::metrics::Metrics;
use crate::stage::{Pause, Resume, SetBudget, SetWorkers, StageActor, StageProbe};
use actix::prelude::*;
use lapin::Channel;
use std::collections::HashMap;
use std::time::Duration;
use tokio::time::Instant;
use tracing::{debug, info};
use watermark::feeders;

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

/// Stops the monitor (engine shutdown) and closes its channel.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Stop;

/// One sample: depth and consumers per queue (`None`: could not be read).
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct DepthSampled(Vec<(String, Option<(u64, u64)>)>);

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
        for q in &cfg.queues {
            events::QueueWatched {
                queue: &q.name,
                watermark: q.watermark.map(|w| (w.high, w.low)),
            }
            .emit(&metrics);
        }
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
            events::QueueSampled {
                queue: name,
                depth: *depth,
                consumers: *consumers,
            }
            .emit(&self.metrics);
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
                        // Unread depth: no budget until the next good sample.
                        let depth = depths.get(q.as_str()).copied().unwrap_or(w.high);
                        Some(share(
                            w,
                            depth,
                            feeders(self.cfg.stages.iter().map(|s| s.outputs.as_slice()), q),
                        ))
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
                let cause = PauseCause::Watermark;
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
            if st.probe.pinned_workers().is_some() {
                // An operator pinned the workers: autoscaling waits.
                continue;
            }
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
                events::Scaled {
                    stage: &name,
                    from: s.workers,
                    to: d.workers,
                    reason: &d.reason,
                }
                .emit(&self.metrics);
                // bounded: at most one per stage per cooldown.
                st.addr.do_send(SetWorkers(d.workers));
                self.last_scaled.insert(name, now);
            }
        }
    }
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
        // When the runtime itself is going away (a host or test dropping
        // it), there is nothing to close on: the connection goes with it.
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if let Some(ch) = self.channel.take() {
            rt.spawn(async move {
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
