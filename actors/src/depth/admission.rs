//! Ingress admission: [`QueueLevels`], the monitor's latest view of its
//! queues shared without locks with whoever must refuse work early.

use super::watermark::{feeders, share, Watermark};
use super::{WatchedQueue, WatchedStage};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

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
                // The ingress takes one share besides the feeding stages.
                let shares = feeders(stages.iter().map(|s| s.outputs.as_slice()), &q.name) + 1;
                let headroom = q.watermark.map_or(u64::MAX, |w| share(w, 0, shares));
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
    pub(super) fn mark_read(&self, queue: &str) {
        if let Some(l) = self.0.get(queue) {
            let n = l.admitted.load(Ordering::Acquire);
            l.admitted_at_read.store(n, Ordering::Release);
        }
    }

    /// Records one sample of `queue`: `None` when it could not be read
    /// (no ingress headroom until a good sample).
    pub(super) fn record(&self, queue: &str, depth: Option<u64>, above: bool) {
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
                        share(w, d, l.shares).saturating_sub(since_read)
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
