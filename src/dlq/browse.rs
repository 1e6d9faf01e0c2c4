//! Reading a dead-letter queue without changing it, and acting on the
//! dead letters a [`Filter`] picks: what the console's pages and `flowgate
//! dlq list/show/replay/purge` share.
//!
//! # How a DLQ is read
//!
//! AMQP 0-9-1 has no peek: reading a message means taking it. A read is a
//! *scan* of the queue from its head: a channel takes windows of
//! [`WINDOW`] deliveries (a consumer with that prefetch, cancelled once its
//! window is in), holds them unacked while it looks at them, and ends by
//! closing the channel, which gives every held message back. A **classic**
//! queue puts a message it gets back where it was, so the queue's order and
//! count are what they were before (`tests/dlq_browse.rs` checks both on
//! every page of a browse). A **quorum** queue does not: on RabbitMQ 3.10 a
//! message given back re-enters out of order, and each return raises its
//! `x-delivery-count` — past a delivery limit the broker drops it. So
//! [`list`] and [`show`] read classic DLQs only and refuse any other
//! ([`ensure_browsable`]); `queues[].dead_letter_kind = "classic"` gives a
//! queue a browsable DLQ.
//!
//! Bounds: a scan reads at most the messages the queue held when it began
//! (the snapshot: dead letters arriving meanwhile are not read), holds
//! them for at most [`SCAN_DEADLINE`] (a scan that runs out of time says
//! so and stops), and keeps in memory one window of deliveries plus what
//! its caller keeps (a page of summaries): memory does not grow with the
//! queue. A scan dropped half-way (a page request cancelled) closes its
//! channel on a task of its own, so nothing stays held.
//!
//! # Acting on dead letters
//!
//! [`apply`] scans the same way and acts on each dead letter the filter
//! picks: a replay publishes it (persistent, `mandatory`, confirmed) to
//! where it was first published or to a destination given, a delete drops
//! it; the dead letter is acked (removed) only after its replay was
//! confirmed, and only once its window's consumer is cancelled (an ack
//! frees a prefetch slot, and a delivery the broker sent into that slot
//! would be skipped by the scan). The ones not picked are given back when
//! the scan ends. Each run is logged with who asked for it.

use super::{origin_of, reason_of, replay_properties, stage_of, view};
use crate::Error;
use flowgate_actors::envelope::{self, header_int, header_string, short_string};
use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, Connection, Consumer};
use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};

/// Deliveries one window of a scan holds in flight (the scan's consumer
/// prefetch): what bounds its memory.
pub const WINDOW: u16 = 256;
/// The longest a scan holds messages: one that has not reached the end of
/// its snapshot by then stops and says how far it got.
pub const SCAN_DEADLINE: Duration = Duration::from_secs(5);
/// How long an action waits for the broker's answer to one step (a
/// replay's confirm; giving the scan's messages back): a broker that
/// blocks publishers (a memory or disk alarm) stops reading the
/// connection, and the action ends with an error instead of hanging.
/// The dead letter it was replaying stays in the DLQ; its copy may still
/// be published once the alarm clears (at least once).
pub const ANSWER_WITHIN: Duration = Duration::from_secs(10);
/// How long a window waits for a delivery the queue's depth promised: the
/// queue shrank meanwhile (another reader, a purge) when none comes.
const IDLE: Duration = Duration::from_millis(500);
/// Most dead letters on one list page.
pub const PAGE_MAX: usize = 200;
/// Most copies [`show`] returns for one id.
pub const SHOW_MAX: usize = 10;

/// Which dead letters a read or an action is about. Every condition given
/// must hold; an empty filter picks every one.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Filter {
    /// The reason, exactly (`x-flowgate-reason`, or the broker's, see
    /// [`reason_of`]).
    #[serde(default)]
    pub reason: Option<String>,
    /// The stage, exactly (see [`stage_of`]).
    #[serde(default)]
    pub stage: Option<String>,
    /// Text the message id or the body contains (ASCII case ignored).
    #[serde(default)]
    pub search: Option<String>,
    /// Dead letters by id ([`Entry::id`]) or message id; empty: any.
    #[serde(default)]
    pub ids: Vec<String>,
}

impl Filter {
    /// True when it picks every dead letter.
    pub fn is_empty(&self) -> bool {
        self.reason.is_none()
            && self.stage.is_none()
            && self.search.is_none()
            && self.ids.is_empty()
    }

    /// Whether `m` is picked.
    pub fn matches(&self, m: &Scanned<'_>) -> bool {
        self.picks(
            &m.id,
            m.message_id.as_deref(),
            &m.reason,
            &m.stage,
            m.body,
            true,
        ) == Some(true)
    }

    /// Whether a dead letter with these fields is picked. `body` is the
    /// whole body when `whole`, else only its start: then a search that
    /// does not find its text there cannot tell (`None`).
    pub(crate) fn picks(
        &self,
        id: &str,
        message_id: Option<&str>,
        reason: &str,
        stage: &str,
        body: &[u8],
        whole: bool,
    ) -> Option<bool> {
        let fixed = self.reason.as_deref().is_none_or(|r| reason == r)
            && self.stage.as_deref().is_none_or(|s| stage == s)
            && (self.ids.is_empty()
                || self
                    .ids
                    .iter()
                    .any(|i| *i == id || Some(i.as_str()) == message_id));
        if !fixed {
            return Some(false);
        }
        let Some(t) = self.search.as_deref() else {
            return Some(true);
        };
        let t = t.to_ascii_lowercase();
        let found = message_id.is_some_and(|id| id.to_ascii_lowercase().contains(&t))
            || String::from_utf8_lossy(body)
                .to_ascii_lowercase()
                .contains(&t);
        (found || whole).then_some(found)
    }

    /// The filter in words, for logs and confirmations.
    pub fn describe(&self) -> String {
        if self.is_empty() {
            return "every dead letter".into();
        }
        let mut parts = Vec::new();
        if let Some(r) = &self.reason {
            parts.push(format!("reason {}", view::visible(r, 64)));
        }
        if let Some(s) = &self.stage {
            parts.push(format!("stage {}", view::visible(s, 64)));
        }
        if let Some(t) = &self.search {
            parts.push(format!("containing \"{}\"", view::visible(t, 64)));
        }
        if !self.ids.is_empty() {
            parts.push(format!("{} selected", self.ids.len()));
        }
        parts.join(", ")
    }
}

/// A delivery as a filter sees it (borrowed: nothing is copied for the
/// dead letters a scan passes over).
#[derive(Debug)]
pub struct Scanned<'a> {
    /// [`Entry::id`].
    pub id: String,
    /// The message id (lossy UTF-8), if any.
    pub message_id: Option<String>,
    /// [`reason_of`].
    pub reason: String,
    /// [`stage_of`].
    pub stage: String,
    /// The body.
    pub body: &'a [u8],
    /// The headers.
    pub headers: FieldTable,
}

impl<'a> Scanned<'a> {
    pub(super) fn of(d: &'a Delivery) -> Self {
        let headers = d.properties.headers().clone().unwrap_or_default();
        let message_id = d.properties.message_id().as_ref().map(|m| m.to_string());
        Scanned {
            id: dead_letter_id(message_id.as_deref(), &headers, &d.data),
            reason: reason_of(&headers),
            stage: stage_of(&headers),
            message_id,
            body: &d.data,
            headers,
        }
    }
}

/// A dead letter's id: 16 hex digits of the SHA-256 of its message id,
/// headers and body. Stable while it sits in the queue (unlike its
/// position), the same for byte-identical copies (an action on one acts on
/// every copy, and says how many).
pub fn dead_letter_id(message_id: Option<&str>, headers: &FieldTable, body: &[u8]) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(message_id.unwrap_or_default().as_bytes());
    h.update([0]);
    // The table is ordered (a BTreeMap): its Debug text is deterministic.
    h.update(format!("{headers:?}").as_bytes());
    h.update([0]);
    h.update(body);
    h.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// One dead letter in a list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Its id ([`dead_letter_id`]), for [`show`] and actions.
    pub id: String,
    /// Its place in the queue when read, from 1 at the head.
    pub position: u64,
    /// The message id (control characters made visible), if any.
    pub message_id: Option<String>,
    /// Why it is here.
    pub reason: String,
    /// The stage that dead-lettered it.
    pub stage: String,
    /// Handling attempts it had (`x-flowgate-attempts`), if known.
    pub attempts: Option<i64>,
    /// When it was first dead-lettered (RFC 3339), if known.
    pub first_death: Option<String>,
    /// When it was last dead-lettered (RFC 3339), if known.
    pub last_death: Option<String>,
    /// The error text (`x-flowgate-error`), bounded.
    pub error: Option<String>,
    /// Where it was first published: `[exchange, routing key]`.
    pub origin: Option<(String, String)>,
    /// The body's size in bytes.
    pub size: usize,
    /// JSON, text or binary.
    pub body_kind: view::BodyKind,
    /// The start of the body on one line (hex for binary).
    pub preview: String,
}

fn header_text(h: &FieldTable, name: &str) -> Option<String> {
    h.inner().get(name).and_then(header_string)
}

/// The times of the broker's `x-death` entries (seconds since the epoch),
/// newest first.
fn death_times(h: &FieldTable) -> Vec<i64> {
    let Some(AMQPValue::FieldArray(a)) = h.inner().get(envelope::X_DEATH) else {
        return Vec::new();
    };
    a.as_slice()
        .iter()
        .filter_map(|v| match v {
            AMQPValue::FieldTable(t) => match t.inner().get("time") {
                Some(AMQPValue::Timestamp(s)) => i64::try_from(*s).ok(),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

impl Entry {
    pub(super) fn of(s: &Scanned<'_>, position: u64) -> Entry {
        let h = &s.headers;
        let ms = |name| h.inner().get(name).and_then(header_int);
        let deaths = death_times(h);
        let last_death = ms(envelope::DEAD_LETTERED_AT)
            .map(|t| view::time_text(t, 1000))
            .or_else(|| deaths.first().map(|t| view::time_text(*t, 1)));
        let first_death = ms(envelope::FIRST_DEAD_LETTERED_AT)
            .map(|t| view::time_text(t, 1000))
            .or_else(|| deaths.last().map(|t| view::time_text(*t, 1)))
            .or_else(|| last_death.clone());
        Entry {
            id: s.id.clone(),
            position,
            message_id: s.message_id.as_deref().map(|m| view::visible(m, 255)),
            reason: view::visible(&s.reason, 255),
            stage: view::visible(&s.stage, 255),
            attempts: super::attempts_of(h),
            first_death,
            last_death,
            error: header_text(h, envelope::ERROR)
                .map(|e| view::visible(&e, envelope::MAX_ERROR_BYTES)),
            origin: origin_of(h).map(|(x, k)| (view::visible(&x, 255), view::visible(&k, 255))),
            size: s.body.len(),
            body_kind: view::body_kind(s.body),
            preview: view::preview(s.body),
        }
    }
}

/// A page of a DLQ's dead letters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Page {
    /// The DLQ.
    pub queue: String,
    /// Messages the queue held when the read began.
    pub depth: u32,
    /// Messages read to fill the page.
    pub examined: u32,
    /// Matches skipped before the page (the page's start).
    pub offset: usize,
    /// The page: at most the limit asked for.
    pub entries: Vec<Entry>,
    /// True when more matches follow the page.
    pub more: bool,
    /// False when the read stopped at [`SCAN_DEADLINE`] before the end.
    pub complete: bool,
    /// How long messages were held unacked, in milliseconds.
    pub held_ms: u64,
}

/// One dead letter in full, as its page and `flowgate dlq show` show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Shown {
    /// Its summary.
    #[serde(flatten)]
    pub entry: Entry,
    /// Its AMQP properties but the headers (name, value as text).
    pub properties: Vec<(String, String)>,
    /// Its headers (name made visible, value as text), in name order.
    pub headers: Vec<(String, String)>,
    /// Its body.
    pub body: view::BodyView,
}

fn properties_of(d: &Delivery) -> Vec<(String, String)> {
    let p = &d.properties;
    let mut out = Vec::new();
    let mut put = |k: &str, v: Option<String>| {
        if let Some(v) = v {
            out.push((k.to_owned(), view::visible(&v, view::SHOWN_VALUE_CHARS)));
        }
    };
    put(
        "content_type",
        p.content_type().as_ref().map(|v| v.to_string()),
    );
    put(
        "content_encoding",
        p.content_encoding().as_ref().map(|v| v.to_string()),
    );
    put("delivery_mode", p.delivery_mode().map(|v| v.to_string()));
    put("priority", p.priority().map(|v| v.to_string()));
    put(
        "correlation_id",
        p.correlation_id().as_ref().map(|v| v.to_string()),
    );
    put("reply_to", p.reply_to().as_ref().map(|v| v.to_string()));
    put("expiration", p.expiration().as_ref().map(|v| v.to_string()));
    put("message_id", p.message_id().as_ref().map(|v| v.to_string()));
    put(
        "timestamp",
        p.timestamp()
            .map(|t| view::time_text(i64::try_from(t).unwrap_or(i64::MAX), 1)),
    );
    put("type", p.kind().as_ref().map(|v| v.to_string()));
    put("user_id", p.user_id().as_ref().map(|v| v.to_string()));
    put("app_id", p.app_id().as_ref().map(|v| v.to_string()));
    out
}

impl Shown {
    fn of(d: &Delivery, s: &Scanned<'_>, position: u64) -> Shown {
        Shown {
            entry: Entry::of(s, position),
            properties: properties_of(d),
            headers: s
                .headers
                .inner()
                .iter()
                .map(|(k, v)| (view::visible(k.as_str(), 255), view::value_text(v)))
                .collect(),
            body: view::body_view(&d.data),
        }
    }
}

/// Refuses a DLQ that a read would change: one that does not exist, or is
/// not a classic queue (see the module's notes). The kind is learnt by
/// redeclaring the queue as a durable classic queue on a throwaway channel
/// after a passive declare: the broker answers 406 naming `x-queue-type`
/// when it is a quorum queue or a stream.
pub async fn ensure_browsable(conn: &Connection, queue: &str) -> Result<(), Error> {
    let name = short_string("queue", queue).map_err(|e| Error::Dlq(e.to_string()))?;
    let ch = conn.create_channel().await?;
    if let Err(e) = crate::topology::inspect_queue(&ch, queue).await {
        return Err(Error::Dlq(format!(
            "no queue `{}`: {e}",
            view::visible(queue, 255)
        )));
    }
    let mut classic = FieldTable::default();
    classic.insert(
        ShortString::from("x-queue-type"),
        AMQPValue::LongString(LongString::from("classic")),
    );
    let probe = ch
        .queue_declare(name, QueueDeclareOptions::durable(), classic)
        .await;
    let _ = ch.close(200, "probe done".into()).await;
    match probe {
        Err(e) if e.to_string().contains("x-queue-type") => Err(Error::Dlq(format!(
            "`{}` is not a classic queue: reading it would reorder it (a quorum queue \
             puts a message given back out of place and counts it against its delivery \
             limit). Give the queue `dead_letter_kind = \"classic\"` for a DLQ that can \
             be browsed (README: \"Dead letters in the console\").",
            view::visible(queue, 255)
        ))),
        _ => Ok(()),
    }
}

/// A scan of a DLQ from its head (see the module's notes).
pub struct Scan {
    ch: Channel,
    queue: ShortString,
    /// Messages in the queue when the scan began.
    depth: u32,
    /// Its consumers then.
    consumers: u32,
    /// Deliveries taken so far.
    taken: u32,
    consumer: Option<(String, Consumer)>,
    windows: u32,
    /// Deliveries left in the current window.
    left: u32,
    /// Acks to send once the current window's consumer is cancelled.
    deferred: Vec<u64>,
    started: Instant,
    /// True when the scan stopped at its deadline or on a shrunk queue.
    cut: bool,
    finished: bool,
}

impl Scan {
    /// Starts a scan of `queue` (its depth now is the snapshot).
    pub async fn start(conn: &Connection, queue: &str) -> Result<Scan, Error> {
        let queue = short_string("queue", queue).map_err(|e| Error::Dlq(e.to_string()))?;
        let (ch, depth, consumers) = answered("opening a read of the queue", async {
            let ch = conn.create_channel().await?;
            let (depth, consumers) = super::queue_stat(&ch, queue.as_str()).await?;
            ch.basic_qos(WINDOW, BasicQosOptions::default()).await?;
            Ok((ch, depth, consumers))
        })
        .await?;
        Ok(Scan {
            ch,
            queue,
            depth,
            consumers,
            taken: 0,
            consumer: None,
            windows: 0,
            left: 0,
            deferred: Vec::new(),
            started: Instant::now(),
            cut: false,
            finished: false,
        })
    }

    /// Messages the queue held when the scan began.
    pub fn depth(&self) -> u32 {
        self.depth
    }

    /// The queue's consumers when the scan began (other readers: what
    /// they hold is not in the scan).
    pub fn consumers(&self) -> u32 {
        self.consumers
    }

    /// Deliveries taken so far.
    pub fn taken(&self) -> u32 {
        self.taken
    }

    /// False when the scan stopped before the end of its snapshot.
    pub fn complete(&self) -> bool {
        !self.cut
    }

    /// How long the scan has held messages.
    pub fn held(&self) -> Duration {
        self.started.elapsed()
    }

    async fn end_window(&mut self) -> Result<(), Error> {
        if let Some((tag, _)) = self.consumer.take() {
            self.ch
                .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
                .await?;
        }
        for tag in self.deferred.drain(..) {
            self.ch.basic_ack(tag, BasicAckOptions::default()).await?;
        }
        Ok(())
    }

    /// The next dead letter, or `None` at the end of the snapshot (or at
    /// the deadline, or when the queue shrank: [`complete`](Self::complete)
    /// is then false).
    pub async fn next(&mut self) -> Result<Option<Delivery>, Error> {
        if self.taken >= self.depth || self.cut {
            return Ok(None);
        }
        if self.started.elapsed() >= SCAN_DEADLINE {
            self.cut = true;
            return Ok(None);
        }
        if self.left == 0 {
            answered("the next window of the read", self.end_window()).await?;
            let tag = format!("flowgate-browse-{}", self.windows);
            self.windows += 1;
            let consume = self.ch.basic_consume(
                self.queue.clone(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            );
            let consumer =
                answered("the next window of the read", async { Ok(consume.await?) }).await?;
            self.consumer = Some((tag, consumer));
            self.left = u32::from(WINDOW).min(self.depth - self.taken);
        }
        let Some((_, consumer)) = self.consumer.as_mut() else {
            return Ok(None);
        };
        let wait = IDLE.min(SCAN_DEADLINE.saturating_sub(self.started.elapsed()));
        match tokio::time::timeout(wait, consumer.next()).await {
            Ok(Some(d)) => {
                self.taken += 1;
                self.left -= 1;
                Ok(Some(d?))
            }
            Ok(None) => Err(Error::Dlq(format!(
                "the broker ended the read of `{}`",
                self.queue
            ))),
            Err(_) => {
                self.cut = true;
                Ok(None)
            }
        }
    }

    /// Removes `d` from the queue: acked once its window's consumer is
    /// cancelled (an earlier ack would let the broker send a delivery the
    /// scan then skips).
    pub fn remove(&mut self, d: &Delivery) {
        self.deferred.push(d.delivery_tag);
    }

    /// Ends the scan: sends the acks of what was removed, makes sure the
    /// broker has them (a round trip: a channel close can overtake acks),
    /// then closes the channel, which gives back every message still held
    /// (a classic queue puts each where it was).
    /// Bounded by [`ANSWER_WITHIN`]; a scan that cannot finish (the broker
    /// stopped reading) is dropped, which closes its channel on a task of
    /// its own.
    pub async fn finish(mut self) -> Result<(), Error> {
        answered("giving the scanned dead letters back", async {
            self.end_window().await?;
            super::depth(&self.ch, self.queue.as_str()).await?;
            self.ch.close(200, "dlq read done".into()).await?;
            Ok(())
        })
        .await?;
        self.finished = true;
        Ok(())
    }
}

impl Drop for Scan {
    /// A scan dropped before [`finish`](Self::finish) (its request was
    /// cancelled) still gives its messages back: the channel is closed on a
    /// task of its own (acks it deferred are not sent: those dead letters
    /// stay, and a replay of one may be published again — at least once).
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let ch = self.ch.clone();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = ch.close(200, "dlq read abandoned".into()).await;
            });
        }
    }
}

/// Dead letters `filter` picks, from the `offset`-th match on, at most
/// `limit` (up to [`PAGE_MAX`]); the DLQ is left as it was.
pub async fn list(
    conn: &Connection,
    queue: &str,
    filter: &Filter,
    offset: usize,
    limit: usize,
) -> Result<Page, Error> {
    ensure_browsable(conn, queue).await?;
    let limit = limit.clamp(1, PAGE_MAX);
    let mut scan = Scan::start(conn, queue).await?;
    let mut entries = Vec::new();
    let mut matched = 0usize;
    let mut more = false;
    let res = async {
        while let Some(d) = scan.next().await? {
            let s = Scanned::of(&d);
            if !filter.matches(&s) {
                continue;
            }
            matched += 1;
            if matched <= offset {
                continue;
            }
            if entries.len() == limit {
                more = true;
                break;
            }
            entries.push(Entry::of(&s, u64::from(scan.taken())));
        }
        Ok::<_, Error>(())
    }
    .await;
    let (depth, examined, complete) = (scan.depth(), scan.taken(), scan.complete());
    let held_ms = u64::try_from(scan.held().as_millis()).unwrap_or(u64::MAX);
    scan.finish().await?;
    res?;
    Ok(Page {
        queue: queue.to_owned(),
        depth,
        examined,
        offset,
        entries,
        more,
        complete: complete || more,
        held_ms,
    })
}

/// The dead letters whose id or message id is `id` (byte-identical copies
/// share an id; several messages may share a message id), at most
/// [`SHOW_MAX`]; the DLQ is left as it was.
pub async fn show(conn: &Connection, queue: &str, id: &str) -> Result<Vec<Shown>, Error> {
    ensure_browsable(conn, queue).await?;
    let filter = Filter {
        ids: vec![id.to_owned()],
        ..Filter::default()
    };
    let mut scan = Scan::start(conn, queue).await?;
    let mut out = Vec::new();
    let res = async {
        while let Some(d) = scan.next().await? {
            let s = Scanned::of(&d);
            if filter.matches(&s) {
                out.push(Shown::of(&d, &s, u64::from(scan.taken())));
                if out.len() == SHOW_MAX {
                    break;
                }
            }
        }
        Ok::<_, Error>(())
    }
    .await;
    scan.finish().await?;
    res?;
    Ok(out)
}

/// How many dead letters `filter` picks now, and whether the read reached
/// the end of the snapshot; the DLQ is left as it was.
pub async fn count(conn: &Connection, queue: &str, filter: &Filter) -> Result<(u64, bool), Error> {
    ensure_browsable(conn, queue).await?;
    let mut scan = Scan::start(conn, queue).await?;
    let mut n = 0u64;
    let res = async {
        while let Some(d) = scan.next().await? {
            if filter.matches(&Scanned::of(&d)) {
                n += 1;
            }
        }
        Ok::<_, Error>(())
    }
    .await;
    let complete = scan.complete();
    scan.finish().await?;
    res?;
    Ok((n, complete))
}

/// What to do with the dead letters a filter picks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Action {
    /// Republish to where each was first published (the reason headers).
    Replay,
    /// Republish to this exchange and routing key.
    ReplayTo {
        /// The exchange (`""`: the default exchange).
        exchange: String,
        /// The routing key.
        routing_key: String,
    },
    /// Remove them.
    Delete,
}

impl Action {
    /// The action in words.
    pub fn describe(&self) -> String {
        match self {
            Action::Replay => "replay to their original exchange and routing key".into(),
            Action::ReplayTo {
                exchange,
                routing_key,
            } => format!(
                "replay to exchange `{}` with routing key `{}`",
                view::visible(exchange, 255),
                view::visible(routing_key, 255)
            ),
            Action::Delete => "delete".into(),
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Action::Replay => "replay",
            Action::ReplayTo { .. } => "replay-to",
            Action::Delete => "delete",
        }
    }
}

/// What [`apply`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ActionReport {
    /// Messages read (the snapshot, or less when cut short).
    pub examined: u64,
    /// Picked by the filter (within the limit).
    pub matched: u64,
    /// Replayed (confirmed) or deleted, and removed from the DLQ.
    pub done: u64,
    /// Picked but left in the DLQ: no known origin to replay to.
    pub no_origin: u64,
    /// Picked but the republish failed (nacked, unroutable): left in the DLQ.
    pub failed: u64,
    /// False when the scan stopped at [`SCAN_DEADLINE`] before the end
    /// (run it again for the rest).
    pub complete: bool,
}

/// Replays or deletes the dead letters `filter` picks (at most `limit`),
/// each removed only after its replay was confirmed; the others stay where
/// they were. `who` (a token's name, `cli:<user>`) is logged with what was
/// done. Works on any DLQ; on one that is not classic the dead letters
/// left behind may change order (as `dlq replay --reason` always did).
pub async fn apply(
    conn: &Connection,
    queue: &str,
    filter: &Filter,
    action: &Action,
    limit: Option<u64>,
    who: &str,
    progress: impl FnMut(super::ReplayProgress),
) -> Result<ActionReport, Error> {
    apply_observed(conn, queue, filter, action, limit, who, progress, |_| {}).await
}

/// A dead letter an action's scan read: where it was and whether the
/// action removed it (what the console's index learns from an action).
#[derive(Debug, Clone, Copy)]
pub struct Seen<'a> {
    /// Its place in the queue when the action began, from 1 at the head.
    pub position: u64,
    /// Its id ([`dead_letter_id`]).
    pub id: &'a str,
    /// True when it was replayed (confirmed) or deleted, so removed.
    pub removed: bool,
}

/// [`apply`], telling `seen` about every dead letter read, in queue order.
#[allow(clippy::too_many_arguments)]
pub async fn apply_observed(
    conn: &Connection,
    queue: &str,
    filter: &Filter,
    action: &Action,
    limit: Option<u64>,
    who: &str,
    mut progress: impl FnMut(super::ReplayProgress),
    mut seen: impl FnMut(Seen<'_>),
) -> Result<ActionReport, Error> {
    let destination = match action {
        Action::ReplayTo {
            exchange,
            routing_key,
        } => Some((
            short_string("exchange", exchange).map_err(|e| Error::Dlq(e.to_string()))?,
            short_string("routing key", routing_key).map_err(|e| Error::Dlq(e.to_string()))?,
        )),
        _ => None,
    };
    let publish = match action {
        Action::Delete => None,
        _ => Some(
            answered("opening a confirmed channel", async {
                let ch = conn.create_channel().await?;
                ch.confirm_select(ConfirmSelectOptions::default()).await?;
                Ok(ch)
            })
            .await?,
        ),
    };
    let mut scan = Scan::start(conn, queue).await?;
    let total = u64::from(scan.depth());
    progress(super::ReplayProgress { examined: 0, total });
    let mut report = ActionReport::default();
    let res = async {
        while let Some(d) = scan.next().await? {
            let examined = u64::from(scan.taken());
            let s = Scanned::of(&d);
            let wanted = filter.matches(&s) && limit.is_none_or(|l| report.matched < l);
            let done_before = report.done;
            if wanted {
                report.matched += 1;
                match (&publish, action) {
                    (None, _) => {
                        scan.remove(&d);
                        report.done += 1;
                    }
                    (Some(ch), _) => {
                        let to = match &destination {
                            Some((x, k)) => Some((x.clone(), k.clone())),
                            None => origin_of(&s.headers).and_then(|(x, k)| {
                                Some((
                                    short_string("exchange", &x).ok()?,
                                    short_string("routing key", &k).ok()?,
                                ))
                            }),
                        };
                        match to {
                            None => report.no_origin += 1,
                            Some((x, k)) if republish(ch, &d, x.clone(), k.clone()).await? => {
                                scan.remove(&d);
                                report.done += 1;
                            }
                            Some((x, k)) => {
                                tracing::warn!(queue, exchange = %x, routing_key = %k, id = %s.id,
                                    "replay not confirmed; the dead letter stays");
                                report.failed += 1;
                            }
                        }
                    }
                }
            }
            seen(Seen {
                position: examined,
                id: &s.id,
                removed: report.done > done_before,
            });
            progress(super::ReplayProgress { examined, total });
        }
        Ok::<_, Error>(())
    }
    .await;
    report.examined = u64::from(scan.taken());
    report.complete = scan.complete();
    let finished = scan.finish().await;
    if let Some(ch) = publish {
        let close = async move {
            let _ = ch.close(200, "dlq action done".into()).await;
        };
        if res.is_ok() && finished.is_ok() {
            let _ = answered("closing the replay channel", async {
                close.await;
                Ok(())
            })
            .await;
        } else {
            // The broker may not be answering: close on a task of its own.
            tokio::spawn(close);
        }
    }
    res?;
    finished?;
    tracing::info!(
        by = %view::visible(who, 128),
        queue = %queue,
        action = action.name(),
        filter = %filter.describe(),
        matched = report.matched,
        done = report.done,
        failed = report.failed,
        no_origin = report.no_origin,
        "dead letters {}",
        match action {
            Action::Delete => "deleted",
            _ => "replayed",
        }
    );
    Ok(report)
}

/// Publishes `d` (reason headers stripped, persistent, `mandatory`) and
/// waits for its confirm; true when the broker took and routed it.
/// `step` bounded by [`ANSWER_WITHIN`]: past it, an error naming `what`.
async fn answered<T>(
    what: &str,
    step: impl std::future::Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    tokio::time::timeout(ANSWER_WITHIN, step)
        .await
        .unwrap_or_else(|_| {
            Err(Error::Dlq(format!(
                "the broker did not answer {what} within {ANSWER_WITHIN:?} \
                 (is it blocking publishers: a memory or disk alarm?); the dead letters stay"
            )))
        })
}

async fn republish(
    ch: &Channel,
    d: &Delivery,
    exchange: ShortString,
    routing_key: ShortString,
) -> Result<bool, Error> {
    let answer = async {
        ch.basic_publish(
            exchange,
            routing_key,
            BasicPublishOptions {
                mandatory: true,
                immediate: false,
            },
            &d.data,
            replay_properties(&d.properties),
        )
        .await?
        .await
    };
    let confirm = answered("a replayed dead letter's confirm", async {
        Ok(answer.await?)
    })
    .await?;
    Ok(matches!(confirm, lapin::Confirmation::Ack(None)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scanned<'a>(id: Option<&str>, reason: &str, body: &'a [u8]) -> Scanned<'a> {
        let mut h = FieldTable::default();
        h.insert(
            ShortString::from(envelope::REASON),
            AMQPValue::LongString(reason.into()),
        );
        Scanned {
            id: dead_letter_id(id, &h, body),
            message_id: id.map(str::to_owned),
            reason: reason_of(&h),
            stage: stage_of(&h),
            body,
            headers: h,
        }
    }

    #[test]
    fn every_condition_of_a_filter_must_hold() {
        let m = scanned(Some("Order-17"), "unroutable", b"{\"sku\":\"ABC\"}");
        assert!(Filter::default().matches(&m));
        let by = |reason: Option<&str>, search: Option<&str>| Filter {
            reason: reason.map(Into::into),
            search: search.map(Into::into),
            ..Filter::default()
        };
        assert!(by(Some("unroutable"), None).matches(&m));
        assert!(!by(Some("malformed"), None).matches(&m));
        assert!(by(None, Some("order-1")).matches(&m), "id, case ignored");
        assert!(by(None, Some("abc")).matches(&m), "body text");
        assert!(!by(Some("unroutable"), Some("xyz")).matches(&m));
        let ids = |i: &str| Filter {
            ids: vec![i.into()],
            ..Filter::default()
        };
        assert!(ids("Order-17").matches(&m));
        assert!(ids(&m.id).matches(&m));
        assert!(!ids("order-17").matches(&m), "ids are exact");
    }

    #[test]
    fn a_search_in_the_start_of_a_body_cannot_rule_it_out() {
        let search = |t: &str| Filter {
            search: Some(t.into()),
            ..Filter::default()
        };
        let picks = |f: &Filter, whole| f.picks("x", Some("m-1"), "panic", "s", b"{\"Sku\"", whole);
        assert_eq!(
            picks(&search("sku"), false),
            Some(true),
            "found in the start"
        );
        assert_eq!(picks(&search("M-1"), false), Some(true), "the message id");
        assert_eq!(picks(&search("later"), false), None, "perhaps further on");
        assert_eq!(picks(&search("later"), true), Some(false));
        let other = Filter {
            reason: Some("unroutable".into()),
            ..search("later")
        };
        assert_eq!(picks(&other, false), Some(false), "the reason rules it out");
    }

    #[test]
    fn ids_are_stable_and_tell_copies_apart_only_by_content() {
        let a = scanned(Some("m-1"), "panic", b"x");
        let b = scanned(Some("m-1"), "panic", b"x");
        let c = scanned(Some("m-1"), "panic", b"y");
        assert_eq!(a.id, b.id);
        assert_ne!(a.id, c.id);
        assert_eq!(a.id.len(), 16);
    }
}
