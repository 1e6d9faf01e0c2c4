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
//! holds at most [`Limits::entries`] dead letters and [`Limits::bytes`] of
//! them (the head of a longer queue; [`INDEX_ENTRIES`], [`INDEX_BYTES`] by
//! default); while a read renews an index the old one is kept beside the
//! new one, so one DLQ takes at most twice that; and the console keeps at
//! most [`INDEXES_KEPT`] indexes (the DLQs browsed last): memory is bounded
//! whatever the queues hold. No page holds bodies beyond that.
//!
//! # How it is built, and when it is trusted
//!
//! One [`Scan`] from the head reads the whole queue (it holds the messages
//! unacked for as long as the read takes, at most [`SCAN_DEADLINE`], and
//! gives every one back by closing its channel: a classic queue keeps its
//! order). The broker sets the pace: 10,000 dead letters take 0.3-0.7 s
//! here, so a page never waits for the whole read. It is answered as soon
//! as the read has covered it (page 1 after its first 51 dead letters), or
//! after [`Limits::page_wait`] with what it has so far ([`Served::Pending`]:
//! the console's page reloads itself).
//!
//! Before a page is served from a built index, a *check* (a passive declare
//! and one `basic.get` of the head, given back at once) compares the queue
//! with it. A classic queue loses messages only at its head (consumed,
//! expired, dropped) or through a consumer, and gains them only at its
//! tail, so:
//!
//! * a consumer on the queue: nothing read now sees all of it (scan);
//! * fewer messages than indexed, or another first message: the index is
//!   dropped and the queue read again (the page waits for that read);
//! * the same first message and as many messages, from an index younger
//!   than [`INDEX_MAX_AGE`]: served as it is;
//! * the same first message and more messages (new dead letters at the
//!   tail), or an older index: served *while a read renews it*. Until the
//!   new read is complete, pages come from the old index — every one of
//!   its dead letters is, by the check, still where it was — and a page
//!   past its end (the new tail) from the new read; the new index then
//!   replaces the old.
//!
//! What the check cannot see is another client's *selective* removal from
//! the middle offset by as many new arrivals: the age bound renews the
//! index at least that often, and the console's own actions compare every
//! message they read with the index and drop it on a mismatch. The
//! console's own actions (replay, delete) run under the same lock and
//! update the index with what they removed.
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
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::PathBuf;
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
/// The longest a page waits for the read building an index to reach it
/// (a read of 10,000 dead letters takes 0.3-0.7 s here): past it the page
/// answers with what it has and says the rest is being read.
pub const PAGE_WAIT: Duration = Duration::from_millis(200);
/// Pages waiting on a read in progress are woken every this many entries.
const NOTIFY_EVERY: usize = 64;

/// One dead letter in an index.
#[derive(Clone, Serialize, Deserialize)]
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
    /// `indexed` dead letters; no message was held for the page. With
    /// `rereading`, a read of the queue is renewing the index meanwhile
    /// (why), and the page came from the part of the old one the check
    /// vouched for (the queue still starts with it).
    Index {
        /// How old the index is.
        age: Duration,
        /// Dead letters in it.
        indexed: usize,
        /// Why it is being read again, while it is.
        rereading: Option<String>,
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
    /// Not answered yet: the page lies past what the read building the
    /// index has reached (`read` of `depth`) after the page waited
    /// [`Limits::page_wait`] for it; the page holds what matched so far.
    /// Asking again later answers it.
    Pending {
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

/// The bounds of the console's indexes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most dead letters one index holds ([`INDEX_ENTRIES`]).
    pub entries: usize,
    /// Most bytes one index holds ([`INDEX_BYTES`]).
    pub bytes: usize,
    /// The longest a page waits for the read building an index
    /// ([`PAGE_WAIT`]) before it answers [`Served::Pending`].
    pub page_wait: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            entries: INDEX_ENTRIES,
            bytes: INDEX_BYTES,
            page_wait: PAGE_WAIT,
        }
    }
}

/// An index read to its end (and updated by actions since).
struct Built {
    /// The queue's depth when it was read: what a check expects.
    expected: u32,
    at: Instant,
    /// Why it does not hold the whole queue (its caps, the deadline).
    partial: Option<String>,
}

/// A read of the queue in progress, renewing the index.
struct Building {
    depth: u32,
    why: String,
    /// What it has read so far (the next index).
    items: Vec<Item>,
    bytes: usize,
}

#[derive(Default)]
struct State {
    /// The index pages are served from (complete: `built`); shared with
    /// the task saving it.
    items: Arc<Vec<Item>>,
    bytes: usize,
    /// Bumped whenever `items` is replaced, changed or dropped.
    generation: u64,
    /// Set while a read renews the index too: the old one is then kept
    /// and served only because the check vouched for it (see the module's
    /// notes); a read after a failed check drops it first.
    built: Option<Built>,
    building: Option<Building>,
    /// Bumped whenever a new read starts.
    build_generation: u64,
    /// Why the last build failed.
    failed: Option<String>,
    used: Option<Instant>,
    /// True once the saved index was looked for.
    looked: bool,
}

impl State {
    fn drop_index(&mut self) {
        self.items = Arc::default();
        self.bytes = 0;
        self.built = None;
        self.generation += 1;
    }

    /// Bytes its indexes hold (the one served and the one being read).
    fn held(&self) -> usize {
        self.bytes + self.building.as_ref().map_or(0, |b| b.bytes)
    }
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
        self.state().drop_index();
        self.bump();
    }
}

/// What the queue looks like now (one passive declare, one `basic.get` of
/// its head, given back at once by closing the channel).
struct Probe {
    count: u32,
    consumers: u32,
    /// The id of its first dead letter.
    head: Option<String>,
}

async fn probe(conn: &Connection, queue: &str) -> Result<Probe, Error> {
    let name = short_string("queue", queue).map_err(|e| Error::Dlq(e.to_string()))?;
    let ch = conn.create_channel().await?;
    let r = async {
        let (count, consumers) = super::queue_stat(&ch, queue).await.map_err(|e| {
            Error::Dlq(format!(
                "no queue `{}`: {e}",
                super::view::visible(queue, 255)
            ))
        })?;
        let head = if count > 0 && consumers == 0 {
            ch.basic_get(name, BasicGetOptions::default())
                .await?
                .map(|m| Scanned::of(&m.delivery).id)
        } else {
            None
        };
        Ok(Probe {
            count,
            consumers,
            head,
        })
    }
    .await;
    // Closing the channel gives the head back (to the head: a classic queue).
    let _ = ch.close(200, "index check done".into()).await;
    r
}

/// What a probe says of the slot's index.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// The queue has consumers: nothing read now sees all of it.
    Busy(u32),
    /// Serve it as it is.
    Valid,
    /// Serve it while a read renews it: the queue still starts with it (the
    /// same head; as many dead letters, or more at the tail), but it is old
    /// or the tail grew (why).
    Renew(String),
    /// Drop it and read the queue (why).
    Stale(String),
}

fn judge(st: &State, p: &Probe) -> Verdict {
    if p.consumers > 0 {
        return Verdict::Busy(p.consumers);
    }
    let Some(b) = &st.built else {
        return Verdict::Stale("no index yet".into());
    };
    if p.count < b.expected {
        return Verdict::Stale(format!(
            "{} dead letters now, {} when indexed",
            p.count, b.expected
        ));
    }
    if p.count > 0 && p.head.as_deref() != st.items.first().map(|i| i.entry.id.as_str()) {
        return Verdict::Stale("the first dead letter is not the index's first".into());
    }
    if p.count > b.expected {
        return Verdict::Renew(format!(
            "{} new dead letters since it was read",
            p.count - b.expected
        ));
    }
    if b.at.elapsed() > INDEX_MAX_AGE {
        return Verdict::Renew(format!(
            "the index was older than {} s",
            INDEX_MAX_AGE.as_secs()
        ));
    }
    Verdict::Valid
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

    /// Restarts it when `generation` is not the one it was collected from.
    fn from(&mut self, generation: u64) {
        if self.generation != generation {
            *self = Cursor::new(self.offset, self.limit, generation);
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

    fn page(&mut self, queue: &str, depth: u32, more: bool, complete: bool) -> Page {
        Page {
            queue: queue.to_owned(),
            depth,
            examined: u32::try_from(self.next).unwrap_or(u32::MAX),
            offset: self.offset,
            entries: std::mem::take(&mut self.entries),
            more,
            complete,
            held_ms: 0,
        }
    }
}

/// The indexes of the DLQs the console browses, and their locks.
#[derive(Default)]
pub struct Indexes {
    slots: Mutex<HashMap<String, Arc<Slot>>>,
    limits: Limits,
    /// Where they are saved (`management.dlq_index_dir`), if anywhere.
    dir: Option<Arc<PathBuf>>,
}

impl Indexes {
    /// No index yet; the default [`Limits`].
    pub fn new() -> Self {
        Self::default()
    }

    /// No index yet; these bounds.
    pub fn with_limits(limits: Limits) -> Self {
        Indexes {
            slots: Mutex::default(),
            limits,
            dir: None,
        }
    }

    /// Saves them in `dir` (see [`saved`](super::saved)): the first page
    /// of a DLQ after a restart is answered from the index saved before it
    /// (once the check vouched for it).
    pub fn saved_in(mut self, dir: Option<PathBuf>) -> Self {
        self.dir = dir.map(Arc::new);
        self
    }

    /// Loads `queue`'s saved index into its slot, the first time the slot
    /// is used (under its lock: no read runs meanwhile).
    async fn load(&self, slot: &Arc<Slot>, queue: &str) {
        let Some(dir) = &self.dir else {
            return;
        };
        if slot.state().looked {
            return;
        }
        let _one = slot.lock.clone().lock_owned().await;
        {
            let mut st = slot.state();
            if std::mem::replace(&mut st.looked, true)
                || st.built.is_some()
                || st.building.is_some()
            {
                return;
            }
        }
        let (dir, q, limits) = (dir.clone(), queue.to_owned(), self.limits);
        let Ok(Some(saved)) = tokio::task::spawn_blocking(move || {
            super::saved::load::<Vec<Item>>(&dir, &q, limits.bytes)
        })
        .await
        else {
            return;
        };
        let bytes: usize = saved.items.iter().map(Item::bytes).sum();
        if saved.items.len() > limits.entries || bytes > limits.bytes {
            return;
        }
        // A time in the future: renewed at once.
        let age = saved
            .age()
            .unwrap_or(INDEX_MAX_AGE + Duration::from_secs(1));
        let at = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
        let mut st = slot.state();
        st.items = Arc::new(saved.items);
        st.bytes = bytes;
        st.built = Some(Built {
            expected: saved.expected,
            at,
            partial: saved.partial,
        });
        st.generation += 1;
    }

    /// Saves the slot's index (on a blocking task), if it has a place.
    fn save(&self, slot: &Slot, queue: &str) {
        save(self.dir.as_ref(), slot, queue);
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
    /// (see the module's notes); `reread` drops it and reads the queue.
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
        self.load(&slot, queue).await;
        let wait = self.limits.page_wait;
        if slot.building() {
            // The read holds the lock: answer from the index it renews, or
            // from the read (only from the read when asked to read again:
            // it is that read).
            return answer(
                conn, &slot, queue, filter, offset, limit, wait, None, reread,
            )
            .await;
        }
        let guard = slot.lock.clone().lock_owned().await;
        let p = probe(conn, queue).await?;
        let verdict = judge(&slot.state(), &p);
        let why = match verdict {
            Verdict::Busy(n) => {
                let why = format!(
                    "the DLQ has {n} consumer{} (what they hold cannot be read)",
                    if n == 1 { "" } else { "s" }
                );
                return scan_page(conn, queue, filter, offset, limit, why, guard).await;
            }
            Verdict::Valid if !reread => {
                return answer(
                    conn,
                    &slot,
                    queue,
                    filter,
                    offset,
                    limit,
                    wait,
                    Some(guard),
                    false,
                )
                .await;
            }
            Verdict::Renew(why) if !reread => {
                self.start_build(conn, &slot, queue, guard, why, true, p.count);
                return answer(conn, &slot, queue, filter, offset, limit, wait, None, false).await;
            }
            Verdict::Valid | Verdict::Renew(_) => "asked to read the queue again".to_owned(),
            Verdict::Stale(why) if reread => format!("asked to read the queue again ({why})"),
            Verdict::Stale(why) => why,
        };
        self.start_build(conn, &slot, queue, guard, why, false, p.count);
        answer(conn, &slot, queue, filter, offset, limit, wait, None, false).await
    }

    /// Starts building `queue`'s index in the background when it has none
    /// that checks valid (the console's DLQ overview warms the indexes of
    /// the DLQs it lists); returns at once when the queue is busy.
    pub async fn warm(&self, conn: &Arc<Connection>, queue: &str) -> Result<(), Error> {
        let slot = self.slot(queue);
        self.load(&slot, queue).await;
        if slot.building() {
            return Ok(());
        }
        let Ok(guard) = slot.lock.clone().try_lock_owned() else {
            return Ok(());
        };
        let p = probe(conn, queue).await?;
        let verdict = judge(&slot.state(), &p);
        match verdict {
            Verdict::Renew(why) => self.start_build(conn, &slot, queue, guard, why, true, p.count),
            Verdict::Stale(why) => self.start_build(conn, &slot, queue, guard, why, false, p.count),
            Verdict::Busy(_) | Verdict::Valid => {}
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
        let valid = match probe(conn, queue).await {
            Ok(p) => {
                let st = slot.state();
                // The index holds the whole queue as it is (not a prefix).
                matches!(judge(&st, &p), Verdict::Valid | Verdict::Renew(_))
                    && st.built.as_ref().is_some_and(|b| b.expected == p.count)
            }
            Err(_) => false,
        };
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
            Arc::make_mut(&mut st.items).retain(|_| {
                k += 1;
                removed.binary_search(&k).is_err()
            });
            for (i, it) in Arc::make_mut(&mut st.items).iter_mut().enumerate() {
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
            self.save(&slot, queue);
        } else {
            if let Some(dir) = self.dir.clone() {
                let q = queue.to_owned();
                tokio::task::spawn_blocking(move || super::saved::remove(&dir, &q));
            }
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

    /// Bytes `queue`'s indexes hold now, as [`Limits::bytes`] counts them
    /// (the one served and the one a read in progress is filling).
    pub fn held_bytes(&self, queue: &str) -> usize {
        let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.get(queue).map_or(0, |s| s.state().held())
    }

    /// Starts a read renewing the slot's index on a task of its own, which
    /// holds `guard` until it ends. With `keep`, the old index is served
    /// meanwhile (the check vouched for it), else dropped. `depth`: the
    /// queue's, as the check saw it.
    #[allow(clippy::too_many_arguments)]
    fn start_build(
        &self,
        conn: &Arc<Connection>,
        slot: &Arc<Slot>,
        queue: &str,
        guard: OwnedMutexGuard<()>,
        why: String,
        keep: bool,
        depth: u32,
    ) {
        {
            let mut st = slot.state();
            if !keep {
                st.drop_index();
            }
            st.failed = None;
            st.build_generation += 1;
            st.building = Some(Building {
                depth,
                why,
                items: Vec::new(),
                bytes: 0,
            });
        }
        slot.bump();
        let (conn, slot2, queue, limits) =
            (conn.clone(), slot.clone(), queue.to_owned(), self.limits);
        let dir = self.dir.clone();
        tokio::spawn(async move {
            let _guard = guard;
            let slot = slot2;
            let ending = Ending(slot.clone());
            let r = build(&conn, &queue, &slot, limits).await;
            let mut st = slot.state();
            let fresh = st.building.take();
            match (r, fresh) {
                (Ok(b), Some(fresh)) => {
                    st.items = Arc::new(fresh.items);
                    st.bytes = fresh.bytes;
                    st.built = Some(b);
                    st.generation += 1;
                    drop(st);
                    save(dir.as_ref(), &slot, &queue);
                    st = slot.state();
                }
                (Err(e), _) => {
                    st.failed = Some(e.to_string());
                    st.drop_index();
                }
                (Ok(_), None) => st.drop_index(),
            }
            drop(st);
            drop(ending);
        });
        self.trim();
    }
}

/// Saves the slot's built index in `dir`, if any, on a blocking task (the
/// entries are shared, not copied).
fn save(dir: Option<&Arc<PathBuf>>, slot: &Slot, queue: &str) {
    let Some(dir) = dir.cloned() else {
        return;
    };
    let st = slot.state();
    let Some(b) = &st.built else {
        return;
    };
    let (items, expected, age, partial) = (
        st.items.clone(),
        b.expected,
        b.at.elapsed(),
        b.partial.clone(),
    );
    drop(st);
    let q = queue.to_owned();
    tokio::task::spawn_blocking(move || {
        super::saved::save(&dir, &q, expected, age, partial, &items[..]);
    });
}

/// Marks a build ended when its task ends, however it ends.
struct Ending(Arc<Slot>);

impl Drop for Ending {
    fn drop(&mut self) {
        let mut st = self.0.state();
        if st.building.take().is_some() {
            st.failed = Some("the read of the queue was abandoned".into());
            st.drop_index();
        }
        drop(st);
        self.0.bump();
    }
}

/// Reads the whole queue into the slot's next index (`building`).
async fn build(
    conn: &Connection,
    queue: &str,
    slot: &Slot,
    limits: Limits,
) -> Result<Built, Error> {
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
            let Some(b) = st.building.as_mut() else {
                break;
            };
            if b.items.len() >= limits.entries || b.bytes + item.bytes() > limits.bytes {
                capped = Some(format!(
                    "the index holds the first {} dead letters (at most {}, {} KiB)",
                    b.items.len(),
                    limits.entries,
                    limits.bytes >> 10
                ));
                break;
            }
            b.bytes += item.bytes();
            b.items.push(item);
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

/// Answers a page: from the index when it holds the page (while a read
/// renews it, from the part the check vouched for), else from the read in
/// progress as soon as it covers the page — waiting at most `wait`, then
/// [`Served::Pending`]; not at all for a page running past the end of an
/// index being renewed (into the new tail, which the read reaches last) —
/// and falls back to a scan when neither can.
#[allow(clippy::too_many_arguments)]
async fn answer(
    conn: &Connection,
    slot: &Slot,
    queue: &str,
    filter: &Filter,
    offset: usize,
    limit: usize,
    wait: Duration,
    guard: Option<OwnedMutexGuard<()>>,
    fresh: bool,
) -> Result<(Page, Served), Error> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut rx = slot.progress.subscribe();
    let mut old = Cursor::new(offset, limit, u64::MAX);
    let mut new = Cursor::new(offset, limit, u64::MAX);
    let why = loop {
        rx.borrow_and_update();
        let mut past_old = false;
        {
            let st = slot.state();
            if let Some(e) = &st.failed {
                return Err(Error::Dlq(e.clone()));
            }
            // The index (complete, or vouched for while renewed).
            if let Some(b) = st
                .built
                .as_ref()
                .filter(|_| !(fresh && st.building.is_some()))
            {
                old.from(st.generation);
                let rereading = st.building.as_ref().map(|n| n.why.clone());
                // The queue's depth: more than indexed when its tail grew.
                let depth = st
                    .building
                    .as_ref()
                    .map_or(b.expected, |n| n.depth.max(b.expected));
                let served = Served::Index {
                    age: b.at.elapsed(),
                    indexed: st.items.len(),
                    rereading: rereading.clone(),
                };
                match old.advance(&st.items, filter) {
                    Step::Done { more } => {
                        return Ok((old.page(queue, depth, more, true), served));
                    }
                    Step::Unknown(why) if rereading.is_none() => break why,
                    // The read renewing it looks at it again.
                    Step::Unknown(_) => {}
                    // A full page at the index's end: the next one (in
                    // the new tail, if any) is the read's to answer.
                    Step::More if rereading.is_some() && old.entries.len() == limit => {
                        let tail = st.building.as_ref().is_some_and(|n| n.depth > b.expected);
                        return Ok((old.page(queue, depth, tail, true), served));
                    }
                    // Past the index's end: more may be in the new tail,
                    // which the read reaches only at its end: no use
                    // waiting for it (below).
                    Step::More if rereading.is_some() => past_old = true,
                    Step::More => match &b.partial {
                        None => return Ok((old.page(queue, b.expected, false, true), served)),
                        Some(why) => break format!("{why}; this page lies past them"),
                    },
                }
            }
            // The read in progress.
            let Some(n) = &st.building else {
                break "the index was dropped".to_owned();
            };
            new.from(st.build_generation);
            let served = Served::Building {
                read: n.items.len(),
                depth: n.depth,
                why: n.why.clone(),
            };
            match new.advance(&n.items, filter) {
                Step::Done { more } => return Ok((new.page(queue, n.depth, more, true), served)),
                Step::Unknown(why) => break why,
                // The read's end is taken from `built` once it is done.
                Step::More => {}
            }
            if past_old || tokio::time::Instant::now() >= deadline {
                let pending = Served::Pending {
                    read: n.items.len(),
                    depth: n.depth,
                    why: n.why.clone(),
                };
                // What the old index found, if it found more (a search
                // whose matches in it the read has not reached yet).
                let best =
                    if old.generation == st.generation && old.entries.len() > new.entries.len() {
                        &mut old
                    } else {
                        &mut new
                    };
                return Ok((best.page(queue, n.depth, true, false), pending));
            }
        }
        // Woken by the read's progress, or at the deadline (looked at above).
        if let Ok(Err(_)) = tokio::time::timeout_at(deadline, rx.changed()).await {
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

    fn item(id: &str) -> Item {
        Item {
            entry: Entry {
                id: id.into(),
                position: 1,
                message_id: None,
                reason: "r".into(),
                stage: "s".into(),
                attempts: None,
                first_death: None,
                last_death: None,
                error: None,
                origin: None,
                size: 0,
                body_kind: super::super::view::BodyKind::Text,
                preview: String::new(),
            },
            message_id: None,
            reason: "r".into(),
            stage: "s".into(),
            head: Box::default(),
            whole: true,
        }
    }

    /// An index of `ids` read `age` ago from a queue of `expected`.
    fn built(ids: &[&str], expected: u32, age: Duration) -> State {
        State {
            items: Arc::new(ids.iter().map(|i| item(i)).collect()),
            built: Some(Built {
                expected,
                at: Instant::now() - age,
                partial: None,
            }),
            ..State::default()
        }
    }

    fn probe(count: u32, consumers: u32, head: Option<&str>) -> Probe {
        Probe {
            count,
            consumers,
            head: head.map(Into::into),
        }
    }

    #[test]
    fn an_index_is_served_renewed_or_dropped_by_what_the_queue_shows() {
        let young = Duration::from_secs(1);
        let st = built(&["a", "b", "c"], 3, young);
        assert_eq!(judge(&st, &probe(3, 0, Some("a"))), Verdict::Valid);
        assert_eq!(judge(&st, &probe(3, 1, Some("a"))), Verdict::Busy(1));
        assert!(matches!(judge(&st, &probe(5, 0, Some("a"))),
            Verdict::Renew(w) if w == "2 new dead letters since it was read"));
        assert!(matches!(
            judge(&built(&["a"], 1, INDEX_MAX_AGE + young), &probe(1, 0, Some("a"))),
            Verdict::Renew(w) if w.contains("older than")
        ));
        // The head went: never served, even with more messages.
        assert!(matches!(
            judge(&st, &probe(3, 0, Some("b"))),
            Verdict::Stale(_)
        ));
        assert!(matches!(
            judge(&st, &probe(4, 0, Some("b"))),
            Verdict::Stale(_)
        ));
        assert!(matches!(
            judge(&st, &probe(2, 0, Some("a"))),
            Verdict::Stale(_)
        ));
        assert!(matches!(judge(&st, &probe(0, 0, None)), Verdict::Stale(_)));
        assert!(matches!(
            judge(&State::default(), &probe(3, 0, Some("a"))),
            Verdict::Stale(w) if w == "no index yet"
        ));
        assert_eq!(
            judge(&built(&[], 0, young), &probe(0, 0, None)),
            Verdict::Valid
        );
    }

    #[test]
    fn a_saved_index_is_read_back_only_if_it_is_the_queues_and_within_bounds() {
        let dir = tempfile::tempdir().unwrap();
        let items = [item("a"), item("b")];
        super::super::saved::save(dir.path(), "q.dlq", 2, young(), None, &items[..]);
        let back = super::super::saved::load::<Vec<Item>>(dir.path(), "q.dlq", INDEX_BYTES)
            .expect("read back");
        assert_eq!(back.expected, 2);
        let ids: Vec<_> = back.items.iter().map(|i| i.entry.id.as_str()).collect();
        assert_eq!(ids, ["a", "b"]);
        assert!(back.age().unwrap() >= young());
        // Another queue's name: no file of its own.
        assert!(super::super::saved::load::<Vec<Item>>(dir.path(), "other", INDEX_BYTES).is_none());
        // Garbage where the file was: ignored.
        let file = std::fs::read_dir(dir.path())
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        std::fs::write(&file, b"\xff\xff\xff\xff not an index").unwrap();
        assert!(super::super::saved::load::<Vec<Item>>(dir.path(), "q.dlq", INDEX_BYTES).is_none());
        // Larger than the bound allows: not even read.
        std::fs::write(&file, vec![0u8; (2 << 20) + 1]).unwrap();
        assert!(super::super::saved::load::<Vec<Item>>(dir.path(), "q.dlq", 1 << 20).is_none());
        super::super::saved::remove(dir.path(), "q.dlq");
        assert!(!file.exists());
    }

    fn young() -> Duration {
        Duration::from_secs(3)
    }
}
