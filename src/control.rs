//! Steering a running engine: what an operator sees of it (stages,
//! publisher, readiness) and what they may change live (pause and resume a
//! stage, its concurrency, the publish rate).
//!
//! One [`Control`] serves the management API (`[management] bind`, see
//! `flowgate ctl`), both `/readyz` endpoints and an embedding host
//! ([`EngineHandle::control`](crate::EngineHandle::control)).
//!
//! ```no_run
//! # async fn demo(handle: flowgate::EngineHandle) -> Result<(), flowgate::control::ControlError> {
//! let control = handle.control();
//! control.pause_stage("payment").await?;
//! assert!(control.readiness().reasons.iter().any(|r| r.contains("paused")));
//! control.set_concurrency("payment", Some(1)).await?;
//! control.resume_stage("payment").await?;
//! control.set_publish_rate(500, None);
//! # Ok(()) }
//! ```

use actix::Addr;
use flowgate_actors::{
    BreakerState, Metrics, Pause, PauseCause, PinWorkers, PublisherHandle, Resume, StageActor,
    StageProbe,
};
use serde::Serialize;
use std::sync::Arc;

/// Why a control request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    /// No stage has this name.
    #[error("no stage named `{0}`")]
    UnknownStage(String),
    /// A value out of its range.
    #[error("{0}")]
    Invalid(String),
    /// The stage's actor did not take the request (the engine is stopping).
    #[error("stage `{0}` is not running")]
    Gone(String),
}

/// A stage's state, as the management API spells it.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum StageState {
    /// Consuming.
    Running,
    /// Consumer registered, intake paused (any cause).
    Paused,
    /// No consumer registered: starting, recovering or drained.
    Stopped,
}

/// What the operator sees of one stage.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct StageStatus {
    /// The stage's name.
    pub name: String,
    /// The queue it consumes.
    pub queue: String,
    /// Running, paused or stopped.
    pub state: StageState,
    /// Deliveries holding a credit (at most `prefetch`).
    pub in_flight: usize,
    /// The stage's prefetch (and credit) window.
    pub prefetch: u16,
    /// Handler workers the stage runs.
    pub workers: usize,
    /// Workers running a handler now.
    pub busy_workers: usize,
    /// The worker count an operator pinned; `None`: the configured count, or
    /// autoscaling's.
    pub pinned_workers: Option<usize>,
    /// Why intake is paused (`watermark`, `budget`, `operator`); empty while
    /// running.
    pub paused: Vec<&'static str>,
    /// On a `single_active_consumer` queue: `active` once deliveries arrive
    /// on this instance's consumer, `standby` until then (a standby is
    /// ready); `null` on any other queue.
    pub consumer: Option<ConsumerRole>,
}

/// Where a stage's consumer stands on a single-active-consumer queue.
pub use flowgate_actors::ConsumerRole;

/// What the operator sees of the publisher.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PublisherStatus {
    /// `closed`, `open` or `half_open`.
    pub breaker: &'static str,
    /// Records in the durable spool.
    pub spooled: u64,
    /// Publishes awaiting their confirm.
    pub unconfirmed: usize,
    /// True while the broker blocks publishing (`connection.blocked`).
    pub broker_blocked: bool,
    /// Publishes per second allowed; `0`: unlimited.
    pub rate: u32,
    /// Token bucket burst.
    pub burst: u32,
}

/// `/readyz`'s answer.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Readiness {
    /// True when connected, not blocked, the breaker closed, every stage
    /// consuming and none paused by an operator.
    pub ready: bool,
    /// Every reason it is not, in words (empty when ready).
    pub reasons: Vec<String>,
    /// True while the connection to the broker is up.
    pub connected: bool,
    /// The publisher's side.
    pub publisher: PublisherStatus,
    /// Every stage.
    pub stages: Vec<StageStatus>,
}

/// One stage's handles.
#[derive(Clone)]
struct StageEntry {
    queue: String,
    prefetch: u16,
    addr: Addr<StageActor>,
    probe: StageProbe,
}

/// Status and live controls of a running engine. Cheap to clone.
#[derive(Clone)]
pub struct Control(Arc<Inner>);

struct Inner {
    stages: Vec<StageEntry>,
    publisher: PublisherHandle,
    metrics: Metrics,
}

impl Control {
    /// Assembled by the engine at start: per stage its queue, prefetch,
    /// address and probe.
    pub(crate) fn new(
        stages: Vec<(String, u16, Addr<StageActor>, StageProbe)>,
        publisher: PublisherHandle,
        metrics: Metrics,
    ) -> Self {
        let stages = stages
            .into_iter()
            .map(|(queue, prefetch, addr, probe)| StageEntry {
                queue,
                prefetch,
                addr,
                probe,
            })
            .collect();
        Control(Arc::new(Inner {
            stages,
            publisher,
            metrics,
        }))
    }

    fn entry(&self, name: &str) -> Result<&StageEntry, ControlError> {
        self.0
            .stages
            .iter()
            .find(|s| s.probe.name == name)
            .ok_or_else(|| ControlError::UnknownStage(name.to_owned()))
    }

    fn status_of(e: &StageEntry) -> StageStatus {
        let p = &e.probe;
        let paused: Vec<&'static str> = p.pause_causes().into_iter().map(|c| c.as_str()).collect();
        let state = if !p.consuming() {
            StageState::Stopped
        } else if paused.is_empty() {
            StageState::Running
        } else {
            StageState::Paused
        };
        StageStatus {
            name: p.name.clone(),
            queue: e.queue.clone(),
            state,
            in_flight: p.in_flight(),
            prefetch: e.prefetch,
            workers: p.workers(),
            busy_workers: p.busy_workers(),
            pinned_workers: p.pinned_workers(),
            paused,
            consumer: p.consumer_role(),
        }
    }

    /// Every stage, in configuration order.
    pub fn stages(&self) -> Vec<StageStatus> {
        self.0.stages.iter().map(Self::status_of).collect()
    }

    /// One stage.
    pub fn stage(&self, name: &str) -> Result<StageStatus, ControlError> {
        self.entry(name).map(Self::status_of)
    }

    /// Stops the stage's intake (cause `operator`) until
    /// [`resume_stage`](Self::resume_stage). Deliveries already taken
    /// finish; at most one prefetch window of deliveries stays unacked at the
    /// broker (the ones it had sent), and nothing more is consumed. Other
    /// pause causes (watermarks) stay as they are. Idempotent.
    pub async fn pause_stage(&self, name: &str) -> Result<StageStatus, ControlError> {
        let e = self.entry(name)?;
        e.addr
            .send(Pause {
                cause: PauseCause::Operator,
            })
            .await
            .map_err(|_| ControlError::Gone(name.to_owned()))?;
        tracing::info!(stage = %name, "stage paused by an operator");
        Ok(Self::status_of(e))
    }

    /// Clears an operator pause; intake runs again once no other cause is left.
    pub async fn resume_stage(&self, name: &str) -> Result<StageStatus, ControlError> {
        let e = self.entry(name)?;
        e.addr
            .send(Resume {
                cause: PauseCause::Operator,
            })
            .await
            .map_err(|_| ControlError::Gone(name.to_owned()))?;
        tracing::info!(stage = %name, "stage resumed by an operator");
        Ok(Self::status_of(e))
    }

    /// Sets the stage's handler workers to `Some(n)` (1..=prefetch: more
    /// could never run, the credit window bounds them) and pins it, so
    /// autoscaling leaves it alone; `None` hands the count back to
    /// autoscaling. Shrinking lets running handlers finish.
    pub async fn set_concurrency(
        &self,
        name: &str,
        workers: Option<usize>,
    ) -> Result<StageStatus, ControlError> {
        let e = self.entry(name)?;
        if let Some(n) = workers {
            if n == 0 || n > usize::from(e.prefetch) {
                return Err(ControlError::Invalid(format!(
                    "concurrency of stage `{name}` must be 1..={} (its prefetch), not {n}",
                    e.prefetch
                )));
            }
        }
        e.addr
            .send(PinWorkers(workers))
            .await
            .map_err(|_| ControlError::Gone(name.to_owned()))?;
        tracing::info!(stage = %name, ?workers, "stage concurrency set by an operator");
        Ok(Self::status_of(e))
    }

    /// Sets the publish rate (per second, `0`: unlimited) and, if given, the
    /// burst (else the current one stays), as `[publisher] rate`/`burst` do
    /// at start.
    pub fn set_publish_rate(&self, rate: u32, burst: Option<u32>) -> PublisherStatus {
        let burst = burst.unwrap_or_else(|| self.0.publisher.rate().1);
        self.0.publisher.set_rate(rate, burst);
        self.publisher()
    }

    /// The publisher's state: breaker, spool, rate.
    pub fn publisher(&self) -> PublisherStatus {
        let p = &self.0.publisher;
        let (rate, burst) = p.rate();
        PublisherStatus {
            breaker: p.breaker_state().as_str(),
            spooled: p.spooled(),
            unconfirmed: p.unconfirmed(),
            broker_blocked: self.0.metrics.broker_blocked(),
            rate,
            burst,
        }
    }

    /// Whether the engine should receive work, and every reason it should not.
    pub fn readiness(&self) -> Readiness {
        let connected = self.0.metrics.connected();
        let publisher = self.publisher();
        let stages = self.stages();
        let mut reasons = Vec::new();
        if !connected {
            reasons.push("not connected to the broker".to_owned());
        }
        if publisher.broker_blocked {
            reasons.push("the broker blocks publishing (connection.blocked)".to_owned());
        }
        if self.0.publisher.breaker_state() != BreakerState::Closed {
            reasons.push(format!(
                "the publish circuit breaker is {}",
                publisher.breaker
            ));
        }
        for s in &stages {
            if s.state == StageState::Stopped {
                reasons.push(format!("stage `{}` is not consuming", s.name));
            }
            if s.paused.contains(&PauseCause::Operator.as_str()) {
                reasons.push(format!("stage `{}` is paused by an operator", s.name));
            }
        }
        Readiness {
            ready: reasons.is_empty(),
            reasons,
            connected,
            publisher,
            stages,
        }
    }
}
