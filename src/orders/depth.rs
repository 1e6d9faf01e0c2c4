//! Queue depth sampling for the gateway: a passive `queue.declare` per
//! queue every `[orders] depth_interval`, on a connection of its own.
//!
//! It feeds two things: gateway admission (the ready messages waiting in the
//! work queues, compared with `[orders] max_backlog`) and the peak depth per
//! queue that the summaries print. The watched queues are a fixed list, so
//! the sampler's memory is fixed too.

use crate::config::Config;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tracing::debug;

/// Current and peak depth of one queue.
#[derive(Default)]
struct Gauge {
    current: AtomicU64,
    peak: AtomicU64,
}

/// The sampler. Cheap to share.
pub struct DepthSampler {
    /// queue name → gauge; the keys never change after construction.
    gauges: BTreeMap<String, Gauge>,
    /// Queues whose depth counts as backlog for admission.
    backlog_queues: Vec<String>,
    /// Successful sampling rounds (0 until the first one).
    rounds: AtomicU64,
    stopped: AtomicBool,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl DepthSampler {
    /// Starts sampling every queue of `config`; the queues consumed by the
    /// work stages (`orders.reserve|pay|ship`) count as backlog.
    pub fn start(config: &Config) -> Arc<Self> {
        let gauges = config
            .queues
            .iter()
            .map(|q| (q.name.clone(), Gauge::default()))
            .collect();
        let backlog_queues = config
            .stages
            .iter()
            .filter(|s| super::WORK_HANDLERS.contains(&s.handler.as_str()))
            .map(|s| s.queue.clone())
            .collect();
        let me = Arc::new(Self {
            gauges,
            backlog_queues,
            rounds: AtomicU64::new(0),
            stopped: AtomicBool::new(false),
            task: Mutex::new(None),
        });
        let url = config.amqp.resolved_url().unwrap_or_default();
        let name = format!("{}-depth", config.amqp.connection_name);
        let interval = config.orders.depth_interval.max(Duration::from_millis(10));
        let weak = Arc::downgrade(&me);
        let task = tokio::spawn(async move {
            let mut conn: Option<Connection> = None;
            let mut ch = None;
            loop {
                tokio::time::sleep(interval).await;
                let me = match weak.upgrade() {
                    Some(me) if !me.stopped.load(Ordering::Relaxed) => me,
                    _ => {
                        if let Some(c) = conn.take() {
                            let _ = c.close(200, "depth sampler stopped".into()).await;
                        }
                        return;
                    }
                };
                if conn.as_ref().is_none_or(|c| !c.status().connected()) {
                    ch = None;
                    conn = Connection::connect(
                        &url,
                        ConnectionProperties::default().with_connection_name(name.clone().into()),
                    )
                    .await
                    .map_err(|e| debug!(error = %e, "depth sampler cannot connect"))
                    .ok();
                }
                let Some(c) = &conn else { continue };
                if ch
                    .as_ref()
                    .is_none_or(|c: &lapin::Channel| !c.status().connected())
                {
                    ch = c.create_channel().await.ok();
                }
                let Some(channel) = &ch else { continue };
                let mut ok = true;
                for (q, g) in &me.gauges {
                    match channel
                        .queue_declare(
                            q.as_str().into(),
                            QueueDeclareOptions {
                                passive: true,
                                ..Default::default()
                            },
                            FieldTable::default(),
                        )
                        .await
                    {
                        Ok(r) => {
                            let n = u64::from(r.message_count());
                            g.current.store(n, Ordering::Relaxed);
                            g.peak.fetch_max(n, Ordering::Relaxed);
                        }
                        Err(e) => {
                            // A missing queue closes the channel: reopen next round.
                            debug!(queue = %q, error = %e, "depth sample failed");
                            ok = false;
                            break;
                        }
                    }
                }
                if ok {
                    me.rounds.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        *me.task.lock().unwrap_or_else(|p| p.into_inner()) = Some(task);
        me
    }

    /// Ready messages waiting in the work queues (last sample).
    pub fn backlog(&self) -> u64 {
        self.backlog_queues
            .iter()
            .filter_map(|q| self.gauges.get(q))
            .map(|g| g.current.load(Ordering::Relaxed))
            .sum()
    }

    /// Peak depth per queue since start.
    pub fn peaks(&self) -> BTreeMap<String, u64> {
        self.gauges
            .iter()
            .map(|(q, g)| (q.clone(), g.peak.load(Ordering::Relaxed)))
            .collect()
    }

    /// Current depth per queue (last sample).
    pub fn current(&self) -> BTreeMap<String, u64> {
        self.gauges
            .iter()
            .map(|(q, g)| (q.clone(), g.current.load(Ordering::Relaxed)))
            .collect()
    }

    /// Completed sampling rounds.
    pub fn rounds(&self) -> u64 {
        self.rounds.load(Ordering::Relaxed)
    }

    /// Stops sampling (the task closes its connection and ends within
    /// one interval).
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Relaxed);
    }

    /// Stops sampling and waits until the connection is closed.
    pub async fn stopped(&self) {
        self.stop();
        let task = self.task.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = task {
            let _ = t.await;
        }
    }
}
