//! The console's index of a DLQ: a compact summary of each dead letter in
//! queue order, so that a list page (any page, filtered or searched) is
//! answered from memory instead of a read of every message before it.
//!
//! # What it holds
//!
//! Per dead letter: its list [`Entry`] (id, position, message id, reason,
//! stage, attempts, deaths, error, origin, size, kind, preview), its raw
//! reason, stage and message id (what a [`Filter`] compares), and the first
//! [`INDEX_BODY_BYTES`] of its body (what a search looks in). An index
//! holds at most [`INDEX_ENTRIES`] dead letters and [`INDEX_BYTES`] of
//! them (the head of a longer queue), and the console keeps at most
//! [`INDEXES_KEPT`] indexes (the DLQs browsed last): memory is bounded
//! whatever the queues hold.
//!
//! # How it is built, and when it is trusted
//!
//! One [`Scan`] from the head reads the whole queue (it holds the messages
//! unacked for as long as the read takes, at most [`SCAN_DEADLINE`], and
//! gives every one back by closing its channel: a classic queue keeps its
//! order). Pages do not wait for the end: a page is answered as soon as
//! the read has covered it (page 1 after its first 51 dead letters), from
//! the read in progress.
//!
//! Before a page is served from a built index, a *check* (a passive declare
//! and one `basic.get` of the head, given back at once) confirms that the
//! queue has no consumer, holds exactly the number of messages the index
//! expects, and that its first message is the index's first, and that the
//! index is younger than [`INDEX_MAX_AGE`]. A classic queue loses messages
//! only at its head (consumed, expired, dropped) or through a consumer, and
//! gains them only at its tail, so any change since the index was built
//! moves one of those — except another client's *selective* removal from
//! the middle offset by as many new arrivals between two checks; the age
//! bound limits how long that can go unseen, and the console's own actions
//! compare every message they read with the index and drop it on a
//! mismatch. An index found stale is rebuilt (the page is answered from
//! the new read as it covers it). The console's own actions (replay,
//! delete) run under the same lock and update the index with what they
//! removed.
//!
//! A page the index cannot answer falls back to a [`list`] scan and says
//! why ([`Served::Scan`]): the queue has consumers, the page lies past what
//! the index holds (its caps, or a read cut at its deadline), or a search
//! must look at a body longer than the index keeps of it.
//!
//! Actions never resolve messages from the index: they read the queue
//! ([`apply_observed`]) and pick dead letters by their content (id, filter).

use super::browse::{
    apply_observed, ensure_browsable, list, Action, ActionReport, Entry, Filter, Page, Scan,
    Scanned, Seen, PAGE_MAX, SCAN_DEADLINE,
};
use crate::Error;
use flowgate_actors::envelope::short_string;
use lapin::message::Delivery;
use lapin::options::BasicGetOptions;
use lapin::Connection;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::{watch, OwnedMutexGuard};

/// Most dead letters one index holds (the head of a longer queue).
pub const INDEX_ENTRIES: usize = 20_000;
/// Most bytes one index holds (its entries' strings and kept body starts).
pub const INDEX_BYTES: usize = 16 * 1024 * 1024;
/// Bytes of each body the index keeps for searches: a search that does not
/// find its text there, in a longer body, is answered by a scan.
pub const INDEX_BODY_BYTES: usize = 1024;
/// Indexes kept at once (the DLQs browsed last; the others are dropped).
pub const INDEXES_KEPT: usize = 4;
/// An older index is rebuilt before a page is served from it.
pub const INDEX_MAX_AGE: Duration = Duration::from_secs(120);
/// Pages waiting on a read in progress are woken every this many entries.
const NOTIFY_EVERY: usize = 64;

/// One dead letter in an index.
struct Item {
    entry: Entry,
    message_id: Option<Box<str>>,
    reason: Box<str>,
    stage: Box<str>,
    /// The body's start ([`INDEX_BODY_BYTES`]).
    head: Box<[u8]>,
    /// True when `head` is the whole body.
    whole: bool,
}

/// The first [`INDEX_BODY_BYTES`] of `body`, not cutting a UTF-8
/// character of a text body in two.
fn head_of(body: &[u8]) -> &[u8] {
    if body.len() <= INDEX_BODY_BYTES {
        return body;
    }
    let cut = &body[..INDEX_BODY_BYTES];
    match std::str::from_utf8(cut) {
        Err(e) if e.error_len().is_none() => &cut[..e.valid_up_to()],
        _ => cut,
    }
}

impl Item {
    fn of(d: &Delivery, position: u64) -> Item {
        let s = Scanned::of(d);
        Item {
            entry: Entry::of(&s, position),
            head: head_of(&d.data).into(),
            whole: d.data.len() <= INDEX_BODY_BYTES,
            message_id: s.message_id.map(Into::into),
            reason: s.reason.into(),
            stage: s.stage.into(),
        }
    }

    /// What it takes in memory (its strings' bytes and its own size).
    fn bytes(&self) -> usize {
        let e = &self.entry;
        let opt = |s: &Option<String>| s.as_ref().map_or(0, String::len);
        std::mem::size_of::<Item>()
            + e.id.len()
            + opt(&e.message_id)
            + e.reason.len()
            + e.stage.len()
            + opt(&e.first_death)
            + opt(&e.last_death)
            + opt(&e.error)
            + e.origin.as_ref().map_or(0, |(x, k)| x.len() + k.len())
            + e.preview.len()
            + self.message_id.as_ref().map_or(0, |m| m.len())
            + self.reason.len()
            + self.stage.len()
            + self.head.len()
    }

    fn picks(&self, f: &Filter) -> Option<bool> {
        f.picks(
            &self.entry.id,
            self.message_id.as_deref(),
            &self.reason,
            &self.stage,
            &self.head,
            self.whole,
        )
    }
}

/// How a page was answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Served {
    /// From an index checked against the queue: built `age` ago, holding
    /// `indexed` dead letters; no message was held for the page.
    Index {
        /// How old the index is.
        age: Duration,
        /// Dead letters in it.
        indexed: usize,
    },
    /// From the read that builds the index, still going: `read` of `depth`
    /// so far; it was started because `why`.
    Building {
        /// Dead letters read so far.
        read: usize,
        /// The queue's depth when the read began.
        depth: u32,
        /// Why the index is being (re)built.
        why: String,
    },
    /// From a scan of the queue (as `flowgate dlq list` reads it), because
    /// the index could not answer: `why`.
    Scan {
        /// Why not from the index.
        why: String,
    },
}

/// The end of a build.
struct Built {
    /// The queue's depth when it was read: what a check expects.
    expected: u32,
    at: Instant,
    /// Why it does not hold the whole queue (its caps, the deadline).
    partial: Option<String>,
}

struct Building {
    depth: u32,
    why: String,
}

#[derive(Default)]
struct State {
    items: Vec<Item>,
    bytes: usize,
    /// Bumped whenever `items` is replaced or invalidated.
    generation: u64,
    building: Option<Building>,
    built: Option<Built>,
    /// Why the last build failed.
    failed: Option<String>,
    used: Option<Instant>,
}

/// One DLQ's index and lock.
struct Slot {
    /// Held by every read of and action on the queue (two at once would
    /// each see the queue without what the other holds).
    lock: Arc<tokio::sync::Mutex<()>>,
    state: Mutex<State>,
    /// Bumped when a read in progress adds entries or ends.
    progress: watch::Sender<u64>,
}

impl Slot {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn bump(&self) {
        self.progress.send_modify(|v| *v = v.wrapping_add(1));
    }

    fn building(&self) -> bool {
        self.state().building.is_some()
    }

    fn invalidate(&self) {
        let mut st = self.state();
        st.items = Vec::new();
        st.bytes = 0;
        st.built = None;
        st.generation += 1;
        drop(st);
        self.bump();
    }
}

/// What a check found.
enum Check {
    Valid,
    /// The queue has consumers: nothing read now sees all of it.
    Busy(u32),
    Stale(String),
}

/// Checks the slot's index against the queue (see the module's notes).
async fn check(conn: &Connection, queue: &str, slot: &Slot) -> Result<Check, Error> {
    let (expected, head, at) = {
        let st = slot.state();
        (
            st.built.as_ref().map(|b| b.expected),
            st.items.first().map(|i| i.entry.id.clone()),
            st.built.as_ref().map(|b| b.at),
        )
    };
    let name = short_string("queue", queue).map_err(|e| Error::Dlq(e.to_string()))?;
    let ch = conn.create_channel().await?;
    let r = async {
        let (count, consumers) = super::queue_stat(&ch, queue).await.map_err(|e| {
            Error::Dlq(format!(
                "no queue `{}`: {e}",
                super::view::visible(queue, 255)
            ))
        })?;
        if consumers > 0 {
            return Ok(Check::Busy(consumers));
        }
        let (Some(expected), Some(at)) = (expected, at) else {
            return Ok(Check::Stale("no index yet".into()));
        };
        if at.elapsed() > INDEX_MAX_AGE {
            return Ok(Check::Stale(format!(
                "the index was older than {} s",
                INDEX_MAX_AGE.as_secs()
            )));
        }
        if count != expected {
            return Ok(Check::Stale(format!(
                "{count} dead letters now, {expected} when indexed"
            )));
        }
        if count == 0 {
            return Ok(Check::Valid);
        }
        let Some(head) = head else {
            return Ok(Check::Stale("the index is empty".into()));
        };
        Ok(
            match ch.basic_get(name, BasicGetOptions::default()).await? {
                None => Check::Stale("the queue emptied".into()),
                Some(m) if m.message_count + 1 != expected => Check::Stale(format!(
                    "{} dead letters now, {expected} when indexed",
                    m.message_count + 1
                )),
                Some(m) if Scanned::of(&m.delivery).id != head => {
                    Check::Stale("the first dead letter is not the index's first".into())
                }
                Some(_) => Check::Valid,
            },
        )
    }
    .await;
    // Closing the channel gives the head back (to the head: a classic queue).
    let _ = ch.close(200, "index check done".into()).await;
    r
}

/// A page being collected from an index's entries, in order.
struct Cursor {
    offset: usize,
    limit: usize,
    generation: u64,
    next: usize,
    matched: usize,
    entries: Vec<Entry>,
}

enum Step {
    /// The page is complete; `more`: further matches follow.
    Done { more: bool },
    /// An entry the index cannot judge (why).
    Unknown(String),
    /// Every entry so far seen; the page needs more.
    More,
}

impl Cursor {
    fn new(offset: usize, limit: usize, generation: u64) -> Cursor {
        Cursor {
            offset,
            limit,
            generation,
            next: 0,
            matched: 0,
            entries: Vec::new(),
        }
    }

    fn advance(&mut self, items: &[Item], filter: &Filter) -> Step {
        while let Some(it) = items.get(self.next) {
            self.next += 1;
            match it.picks(filter) {
                None => {
                    return Step::Unknown(format!(
                        "a search looks at whole bodies, and dead letter #{} is longer than \
                         the {INDEX_BODY_BYTES} bytes the index keeps of each",
                        it.entry.position
                    ))
                }
                Some(false) => {}
                Some(true) => {
                    self.matched += 1;
                    if self.matched <= self.offset {
                        continue;
                    }
                    if self.entries.len() == self.limit {
                        return Step::Done { more: true };
                    }
                    self.entries.push(it.entry.clone());
                }
            }
        }
        Step::More
    }
}

/// The indexes of the DLQs the console browses, and their locks.
#[derive(Default)]
pub struct Indexes {
    slots: Mutex<HashMap<String, Arc<Slot>>>,
}

impl Indexes {
    /// No index yet.
    pub fn new() -> Self {
        Self::default()
    }

    fn slot(&self, queue: &str) -> Arc<Slot> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let slot = slots
            .entry(queue.to_owned())
            .or_insert_with(|| {
                Arc::new(Slot {
                    lock: Arc::new(tokio::sync::Mutex::new(())),
                    state: Mutex::new(State::default()),
                    progress: watch::channel(0).0,
                })
            })
            .clone();
        slot.state().used = Some(Instant::now());
        slot
    }

    /// Drops the indexes browsed least recently past [`INDEXES_KEPT`].
    fn trim(&self) {
        let slots: Vec<Arc<Slot>> = {
            let s = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            s.values().cloned().collect()
        };
        let mut held: Vec<(Instant, Arc<Slot>)> = slots
            .into_iter()
            .filter_map(|s| {
                let st = s.state();
                let holds = !st.items.is_empty() || st.building.is_some();
                let used = st.used;
                drop(st);
                holds.then_some((used?, s))
            })
            .collect();
        held.sort_by_key(|(t, _)| std::cmp::Reverse(*t));
        for (_, s) in held.into_iter().skip(INDEXES_KEPT) {
            // Only one not being read or acted on (its lock is free).
            if let Ok(_free) = s.lock.clone().try_lock_owned() {
                s.invalidate();
            }
        }
    }

    /// The lock every read of and action on `queue` holds: taken by the
    /// console's `show` and counts, so that they never run beside an
    /// index's read.
    pub async fn lock(&self, queue: &str) -> OwnedMutexGuard<()> {
        self.slot(queue).lock.clone().lock_owned().await
    }

    /// Dead letters `filter` picks, from the `offset`-th match, at most
    /// `limit` (up to [`PAGE_MAX`]), from the index when it can answer
    /// (see the module's notes); `reread` rebuilds it first.
    pub async fn page(
        &self,
        conn: &Arc<Connection>,
        queue: &str,
        filter: &Filter,
        offset: usize,
        limit: usize,
        reread: bool,
    ) -> Result<(Page, Served), Error> {
        let limit = limit.clamp(1, PAGE_MAX);
        let slot = self.slot(queue);
        if !reread && slot.building() {
            return follow(conn, &slot, queue, filter, offset, limit, None).await;
        }
        let guard = slot.lock.clone().lock_owned().await;
        let why = match check(conn, queue, &slot).await? {
            Check::Busy(n) => {
                let why = format!(
                    "the DLQ has {n} consumer{} (what they hold cannot be read)",
                    if n == 1 { "" } else { "s" }
                );
                return scan_page(conn, queue, filter, offset, limit, why, guard).await;
            }
            Check::Valid if !reread => {
                return follow(conn, &slot, queue, filter, offset, limit, Some(guard)).await;
            }
            Check::Valid => "asked to read the queue again".to_owned(),
            Check::Stale(why) if reread => format!("asked to read the queue again ({why})"),
            Check::Stale(why) => why,
        };
        start_build(conn, &slot, queue, guard, why);
        self.trim();
        follow(conn, &slot, queue, filter, offset, limit, None).await
    }

    /// Starts building `queue`'s index in the background when it has none
    /// that checks valid (the console's DLQ overview warms the indexes of
    /// the DLQs it lists); returns at once when the queue is busy.
    pub async fn warm(&self, conn: &Arc<Connection>, queue: &str) -> Result<(), Error> {
        let slot = self.slot(queue);
        if slot.building() {
            return Ok(());
        }
        let Ok(guard) = slot.lock.clone().try_lock_owned() else {
            return Ok(());
        };
        if let Check::Stale(why) = check(conn, queue, &slot).await? {
            start_build(conn, &slot, queue, guard, why);
            self.trim();
        }
        Ok(())
    }

    /// [`apply_observed`] under the queue's lock; the index then drops the
    /// dead letters the action removed (when it was valid before and every
    /// message the action read agreed with it), else it is dropped (the
    /// next page rebuilds it). The action reads the queue itself: the
    /// index never decides what it touches.
    pub async fn apply(
        &self,
        conn: &Arc<Connection>,
        queue: &str,
        filter: &Filter,
        action: &Action,
        who: &str,
    ) -> Result<ActionReport, Error> {
        let slot = self.slot(queue);
        let _guard = slot.lock.clone().lock_owned().await;
        ensure_browsable(conn, queue).await?;
        let valid = matches!(check(conn, queue, &slot).await, Ok(Check::Valid));
        let mut removed = Vec::new();
        let mut agrees = valid;
        let report = apply_observed(
            conn,
            queue,
            filter,
            action,
            None,
            who,
            |_| {},
            |s: Seen<'_>| {
                if s.removed {
                    removed.push(s.position);
                }
                if agrees {
                    let st = slot.state();
                    let at = usize::try_from(s.position).unwrap_or(usize::MAX);
                    if let Some(it) = at.checked_sub(1).and_then(|i| st.items.get(i)) {
                        agrees = it.entry.id == s.id;
                    }
                }
            },
        )
        .await;
        let keep = agrees && report.as_ref().is_ok_and(|r| r.complete);
        if keep {
            let mut st = slot.state();
            let mut k = 0u64;
            st.items.retain(|_| {
                k += 1;
                removed.binary_search(&k).is_err()
            });
            for (i, it) in st.items.iter_mut().enumerate() {
                it.entry.position = i as u64 + 1;
            }
            st.bytes = st.items.iter().map(Item::bytes).sum();
            let gone = u32::try_from(removed.len()).unwrap_or(u32::MAX);
            if let Some(b) = st.built.as_mut() {
                b.expected = b.expected.saturating_sub(gone);
            }
            st.generation += 1;
            drop(st);
            slot.bump();
        } else {
            if valid && !agrees {
                tracing::warn!(
                    queue,
                    "the DLQ's index did not match the queue an action read; dropped"
                );
            }
            slot.invalidate();
        }
        report
    }

    /// How many dead letters `queue`'s index holds, if it has a built one
    /// (not checked against the queue).
    pub fn indexed(&self, queue: &str) -> Option<usize> {
        let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let st = slots.get(queue)?.state();
        st.built.as_ref().map(|_| st.items.len())
    }
}

/// Marks a build ended when its task ends, however it ends.
struct Ending(Arc<Slot>);

impl Drop for Ending {
    fn drop(&mut self) {
        let mut st = self.0.state();
        if st.building.take().is_some() && st.built.is_none() && st.failed.is_none() {
            st.failed = Some("the read of the queue was abandoned".into());
        }
        drop(st);
        self.0.bump();
    }
}

/// Starts a build on a task of its own, which holds `guard` until it ends.
fn start_build(
    conn: &Arc<Connection>,
    slot: &Arc<Slot>,
    queue: &str,
    guard: OwnedMutexGuard<()>,
    why: String,
) {
    {
        let mut st = slot.state();
        st.items = Vec::new();
        st.bytes = 0;
        st.generation += 1;
        st.built = None;
        st.failed = None;
        st.building = Some(Building { depth: 0, why });
    }
    slot.bump();
    let (conn, slot, queue) = (conn.clone(), slot.clone(), queue.to_owned());
    tokio::spawn(async move {
        let _guard = guard;
        let ending = Ending(slot.clone());
        let r = build(&conn, &queue, &slot).await;
        let mut st = slot.state();
        match r {
            Ok(b) => st.built = Some(b),
            Err(e) => {
                st.failed = Some(e.to_string());
                st.items = Vec::new();
                st.bytes = 0;
            }
        }
        drop(st);
        drop(ending);
    });
}

/// Reads the whole queue into the slot's index.
async fn build(conn: &Connection, queue: &str, slot: &Slot) -> Result<Built, Error> {
    let started = Instant::now();
    ensure_browsable(conn, queue).await?;
    let mut scan = Scan::start(conn, queue).await?;
    let depth = scan.depth();
    if let Some(b) = slot.state().building.as_mut() {
        b.depth = depth;
    }
    if scan.consumers() > 0 {
        let n = scan.consumers();
        scan.finish().await?;
        return Ok(Built {
            expected: depth,
            at: started,
            partial: Some(format!("the DLQ had {n} consumer(s) when it was read")),
        });
    }
    let mut capped = None;
    let mut since = 0;
    let res = async {
        while let Some(d) = scan.next().await? {
            let item = Item::of(&d, u64::from(scan.taken()));
            let mut st = slot.state();
            if st.items.len() >= INDEX_ENTRIES || st.bytes + item.bytes() > INDEX_BYTES {
                capped = Some(format!(
                    "the index holds the first {} dead letters (at most {INDEX_ENTRIES}, {} MiB)",
                    st.items.len(),
                    INDEX_BYTES >> 20
                ));
                break;
            }
            st.bytes += item.bytes();
            st.items.push(item);
            drop(st);
            since += 1;
            if since == NOTIFY_EVERY {
                since = 0;
                slot.bump();
            }
        }
        Ok::<_, Error>(())
    }
    .await;
    let (complete, read) = (scan.complete(), scan.taken());
    scan.finish().await?;
    res?;
    let partial = capped.or_else(|| {
        (!complete).then(|| {
            format!(
                "the read stopped at its {} s limit after {read} of {depth} dead letters",
                SCAN_DEADLINE.as_secs()
            )
        })
    });
    Ok(Built {
        expected: depth,
        at: started,
        partial,
    })
}

/// A page from a scan (the index could not answer).
async fn scan_page(
    conn: &Connection,
    queue: &str,
    filter: &Filter,
    offset: usize,
    limit: usize,
    why: String,
    guard: OwnedMutexGuard<()>,
) -> Result<(Page, Served), Error> {
    let page = list(conn, queue, filter, offset, limit).await;
    drop(guard);
    Ok((page?, Served::Scan { why }))
}

/// Answers a page from the slot's entries: at once from a built index,
/// or as soon as the read in progress covers it; falls back to a scan
/// when the index cannot answer it.
async fn follow(
    conn: &Connection,
    slot: &Slot,
    queue: &str,
    filter: &Filter,
    offset: usize,
    limit: usize,
    guard: Option<OwnedMutexGuard<()>>,
) -> Result<(Page, Served), Error> {
    let mut rx = slot.progress.subscribe();
    let mut cursor = Cursor::new(offset, limit, u64::MAX);
    let why = loop {
        rx.borrow_and_update();
        {
            let st = slot.state();
            if cursor.generation != st.generation {
                cursor = Cursor::new(offset, limit, st.generation);
            }
            if let Some(e) = &st.failed {
                return Err(Error::Dlq(e.clone()));
            }
            let (depth, served) = match (&st.building, &st.built) {
                (Some(b), _) => (
                    b.depth,
                    Served::Building {
                        read: st.items.len(),
                        depth: b.depth,
                        why: b.why.clone(),
                    },
                ),
                (None, Some(b)) => (
                    b.expected,
                    Served::Index {
                        age: b.at.elapsed(),
                        indexed: st.items.len(),
                    },
                ),
                (None, None) => break "the index was dropped".to_owned(),
            };
            let more = match cursor.advance(&st.items, filter) {
                Step::Done { more } => Some(more),
                Step::Unknown(why) => break why,
                Step::More if st.building.is_some() => None,
                Step::More => match st.built.as_ref().and_then(|b| b.partial.clone()) {
                    None => Some(false),
                    Some(why) => break format!("{why}; this page lies past them"),
                },
            };
            if let Some(more) = more {
                let page = Page {
                    queue: queue.to_owned(),
                    depth,
                    examined: u32::try_from(cursor.next).unwrap_or(u32::MAX),
                    offset,
                    entries: std::mem::take(&mut cursor.entries),
                    more,
                    complete: true,
                    held_ms: 0,
                };
                return Ok((page, served));
            }
        }
        if rx.changed().await.is_err() {
            break "the index's read ended".to_owned();
        }
    };
    let guard = match guard {
        Some(g) => g,
        None => slot.lock.clone().lock_owned().await,
    };
    scan_page(conn, queue, filter, offset, limit, why, guard).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kept_body_start_does_not_cut_a_character() {
        let mut body = vec![b'a'; INDEX_BODY_BYTES - 1];
        body.extend("é and more".as_bytes());
        let h = head_of(&body);
        assert_eq!(h.len(), INDEX_BODY_BYTES - 1);
        assert!(std::str::from_utf8(h).is_ok());
        let bin = vec![0xffu8; INDEX_BODY_BYTES * 2];
        assert_eq!(head_of(&bin).len(), INDEX_BODY_BYTES);
        assert_eq!(head_of(b"short"), b"short");
    }
}
