//! A history of what a fault test did and saw — publishes, their confirms
//! (by the broker, or a 202 from flowgate's ingress), arrivals at the end of
//! the pipeline — and the checker that classifies every confirmed id once
//! the run is over: arrived, dead-lettered (with its reason), still queued
//! (stuck), or lost.
//!
//! Only confirmed ids are promised: a publish whose confirm never came (its
//! connection died) may arrive or not, and is only counted.
//!
//! ```
//! use flowgate_testkit::history::{Ending, History};
//!
//! let h = History::new();
//! for id in ["a", "b", "c", "d"] {
//!     h.published(id);
//!     h.confirmed(id);
//! }
//! h.published("e"); // its confirm never came
//! h.arrived("a");
//! h.arrived("a");
//! h.arrived("e");
//! let mut end = Ending::default();
//! end.dead_lettered.insert("b".into(), "max-attempts".into());
//! end.queued.insert("c".into(), 1);
//! let c = h.classify(&end);
//! assert_eq!((c.arrived, c.unconfirmed_arrived), (1, 1));
//! assert_eq!(c.duplicates["a"], 2);
//! assert_eq!(c.dead_lettered["b"], "max-attempts");
//! assert!(c.queued.contains("c") && c.lost.contains("d"));
//! assert!(!c.is_clean());
//! ```

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

/// What happened to messages during a run. Cheap to clone (shared).
#[derive(Clone, Default)]
pub struct History(Arc<Mutex<Inner>>);

#[derive(Default)]
struct Inner {
    published: BTreeSet<String>,
    confirmed: BTreeSet<String>,
    arrivals: HashMap<String, usize>,
    last_arrival: Option<Instant>,
}

impl History {
    /// An empty history.
    pub fn new() -> History {
        History::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `id` was sent (its confirm may never come).
    pub fn published(&self, id: &str) {
        self.lock().published.insert(id.to_owned());
    }

    /// `id` was confirmed: it is promised to end somewhere countable.
    pub fn confirmed(&self, id: &str) {
        self.lock().confirmed.insert(id.to_owned());
    }

    /// `id` arrived at the end of the pipeline (once more).
    pub fn arrived(&self, id: &str) {
        let mut h = self.lock();
        *h.arrivals.entry(id.to_owned()).or_default() += 1;
        h.last_arrival = Some(Instant::now());
    }

    /// Ids sent so far.
    pub fn published_count(&self) -> usize {
        self.lock().published.len()
    }

    /// Ids confirmed so far.
    pub fn confirmed_count(&self) -> usize {
        self.lock().confirmed.len()
    }

    /// Arrivals so far, repeats included.
    pub fn arrival_count(&self) -> usize {
        self.lock().arrivals.values().sum()
    }

    /// Confirmed ids that have not arrived (yet).
    pub fn outstanding(&self) -> BTreeSet<String> {
        let h = self.lock();
        h.confirmed
            .iter()
            .filter(|id| !h.arrivals.contains_key(*id))
            .cloned()
            .collect()
    }

    /// When the last arrival was seen.
    pub fn last_arrival(&self) -> Option<Instant> {
        self.lock().last_arrival
    }

    /// Classifies every confirmed id against where the run left the rest.
    pub fn classify(&self, end: &Ending) -> Classification {
        let h = self.lock();
        let mut c = Classification {
            published: h.published.len(),
            confirmed: h.confirmed.len(),
            ..Classification::default()
        };
        for id in &h.confirmed {
            let arrived = h.arrivals.get(id).copied().unwrap_or(0);
            if arrived > 0 {
                c.arrived += 1;
                if arrived > 1 {
                    c.duplicates.insert(id.clone(), arrived);
                }
            } else if let Some(reason) = end.dead_lettered.get(id) {
                c.dead_lettered.insert(id.clone(), reason.clone());
            } else if end.queued.contains_key(id) {
                c.queued.insert(id.clone());
            } else {
                c.lost.insert(id.clone());
            }
        }
        for (id, n) in &h.arrivals {
            if !h.confirmed.contains(id) {
                if h.published.contains(id) {
                    c.unconfirmed_arrived += 1;
                } else {
                    c.unexpected.insert(id.clone(), *n);
                }
            }
        }
        c
    }
}

/// Where the messages that did not arrive are at the end of a run.
#[derive(Clone, Debug, Default)]
pub struct Ending {
    /// Ids found in a dead-letter queue, with their reason header.
    pub dead_lettered: HashMap<String, String>,
    /// Ids still in a stage's queue (or a spool), with how many copies.
    pub queued: HashMap<String, usize>,
}

/// Every confirmed id of a run, classified.
#[derive(Clone, Debug, Default)]
pub struct Classification {
    /// Ids sent.
    pub published: usize,
    /// Ids confirmed (promised).
    pub confirmed: usize,
    /// Confirmed ids that arrived (once or more).
    pub arrived: usize,
    /// Confirmed ids that arrived more than once, with how often.
    pub duplicates: BTreeMap<String, usize>,
    /// Confirmed ids in a dead-letter queue, with the reason.
    pub dead_lettered: BTreeMap<String, String>,
    /// Confirmed ids still in a stage's queue when the run ended.
    pub queued: BTreeSet<String>,
    /// Confirmed ids found nowhere.
    pub lost: BTreeSet<String>,
    /// Ids sent without a confirm that arrived anyway.
    pub unconfirmed_arrived: usize,
    /// Ids that arrived but were never sent.
    pub unexpected: BTreeMap<String, usize>,
}

impl Classification {
    /// Nothing lost, dead-lettered, stuck or unexpected (duplicates are
    /// at-least-once's right, and only reported).
    pub fn is_clean(&self) -> bool {
        self.lost.is_empty()
            && self.dead_lettered.is_empty()
            && self.queued.is_empty()
            && self.unexpected.is_empty()
    }
}

impl fmt::Display for Classification {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const SHOWN: usize = 10;
        writeln!(
            f,
            "published {}, confirmed {}: arrived {}, dead-lettered {}, still queued {}, lost {}; \
             duplicates {} ({} extra copies); unconfirmed that arrived {}; unexpected {}",
            self.published,
            self.confirmed,
            self.arrived,
            self.dead_lettered.len(),
            self.queued.len(),
            self.lost.len(),
            self.duplicates.len(),
            self.duplicates.values().map(|n| n - 1).sum::<usize>(),
            self.unconfirmed_arrived,
            self.unexpected.len(),
        )?;
        let some =
            |ids: &mut dyn Iterator<Item = String>| -> Vec<String> { ids.take(SHOWN).collect() };
        if !self.lost.is_empty() {
            writeln!(f, "  lost: {:?}", some(&mut self.lost.iter().cloned()))?;
        }
        if !self.dead_lettered.is_empty() {
            let shown: Vec<_> = self.dead_lettered.iter().take(SHOWN).collect();
            writeln!(f, "  dead-lettered (id, reason): {shown:?}")?;
        }
        if !self.queued.is_empty() {
            writeln!(
                f,
                "  still queued: {:?}",
                some(&mut self.queued.iter().cloned())
            )?;
        }
        if !self.unexpected.is_empty() {
            let shown: Vec<_> = self.unexpected.iter().take(SHOWN).collect();
            writeln!(f, "  unexpected: {shown:?}")?;
        }
        Ok(())
    }
}
