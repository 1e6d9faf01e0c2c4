//! Autoscaling: when a stage's workers double or halve.

use std::time::Duration;
use tokio::time::Instant;

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
pub(crate) struct StageSample {
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
pub(crate) struct ScaleDecision {
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
pub(crate) fn scale_decision(
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

#[cfg(test)]
mod tests {
    use super::*;

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
