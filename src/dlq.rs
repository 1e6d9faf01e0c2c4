//! Dead-letter queue tools: list, show, stats, replay, purge (`flowgate
//! dlq ...` and the console's dead-letter pages share them).
//!
//! A dead letter explains itself with `x-flowgate-*` headers when flowgate
//! dead-lettered it. When the *broker* did (a quorum queue's delivery limit,
//! a rejected message on a queue without a flowgate stage, an expired
//! message), only `x-death` says why: [`reason_of`] maps its reason to
//! `delivery-limit`, `rejected`, `expired` or `maxlen`.
//!
//! Every tool works on a snapshot: it reads at most the messages the queue
//! held when it started (a [`Scan`]: windows of unacked deliveries) and
//! gives back the ones it does not remove by closing its channel (the
//! broker requeues them), so it never loops on messages it put back
//! itself. Reading without changing the queue needs a classic DLQ (see
//! [`browse`](self::Scan) and `queues[].dead_letter_kind`). Replay
//! republishes with a publisher confirm and `mandatory`, and acks from the
//! DLQ only after the confirm: a crash in between duplicates a message
//! (dedup catches it), never loses one.

use crate::config::Config;
use crate::Error;
use flowgate_actors::envelope::{self, newest_death};
use flowgate_actors::envelope::{header_int, header_string};
use lapin::options::QueuePurgeOptions;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use serde::Serialize;
use std::collections::BTreeMap;

mod browse;
mod index;
mod saved;
pub mod view;

pub use browse::{
    apply, apply_observed, count, dead_letter_id, ensure_browsable, list, show, Action,
    ActionReport, Entry, Filter, Page, Scan, Scanned, Seen, Shown, ANSWER_WITHIN, PAGE_MAX,
    SCAN_DEADLINE, SHOW_MAX, WINDOW,
};
pub use index::{
    Indexes, Limits, Served, INDEXES_KEPT, INDEX_BODY_BYTES, INDEX_BYTES, INDEX_ENTRIES,
    INDEX_MAX_AGE, PAGE_WAIT,
};

/// Most distinct reasons (and stages) [`stats`] counts apart; the rest are
/// counted under [`OTHER`] (a handler's own reasons are free text: the
/// counts must not grow with the queue).
pub const MAX_DISTINCT: usize = 1000;
/// The key the counts past [`MAX_DISTINCT`] go under.
pub const OTHER: &str = "(other)";

/// Counts of the dead letters in a queue (`dlq stats --json` prints it).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DlqStats {
    /// Messages examined (the queue's depth at the start).
    pub total: u64,
    /// By `x-flowgate-reason` (or the broker's `x-death` reason).
    pub by_reason: BTreeMap<String, u64>,
    /// By `x-flowgate-stage` (or `queue:<name>` from `x-death`).
    pub by_stage: BTreeMap<String, u64>,
}

/// What a replay did (`dlq replay --json` prints it).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ReplayReport {
    /// Republished, confirmed and removed from the DLQ.
    pub replayed: u64,
    /// Left in the DLQ: other reason, over the limit, or no known origin.
    pub skipped: u64,
    /// Republishing failed (nacked, unroutable): left in the DLQ.
    pub failed: u64,
}

/// The DLQ a `--queue` argument means: `<q>.dlq` when `q` is a configured
/// queue with dead-lettering, `q` itself otherwise.
pub fn resolve_queue(cfg: &Config, q: &str) -> String {
    cfg.queue(q)
        .and_then(|qc| qc.dead_letter_queue())
        .unwrap_or_else(|| q.to_owned())
}

/// Opens a connection to the configured broker.
pub async fn connect(cfg: &Config) -> Result<Connection, Error> {
    let url = cfg.amqp.resolved_url()?;
    let props = ConnectionProperties::default()
        .with_connection_name(format!("{}-dlq-tool", cfg.amqp.connection_name).into());
    Ok(Connection::connect(&url, props).await?)
}

fn header<'a>(h: &'a FieldTable, name: &str) -> Option<&'a AMQPValue> {
    h.inner().get(name)
}

/// Why a message is in a DLQ: `x-flowgate-reason`, or the broker's
/// `x-death` reason (`delivery_limit` → `delivery-limit`), or `unknown`.
pub fn reason_of(h: &FieldTable) -> String {
    if let Some(r) = header(h, envelope::REASON).and_then(header_string) {
        return r;
    }
    match newest_death(h).and_then(|d| d.reason) {
        Some(r) => r.replace('_', "-"),
        None => "unknown".into(),
    }
}

/// Which stage dead-lettered it: `x-flowgate-stage`, or `queue:<q>` from `x-death`.
pub fn stage_of(h: &FieldTable) -> String {
    if let Some(s) = header(h, envelope::STAGE).and_then(header_string) {
        return s;
    }
    match newest_death(h).and_then(|d| d.queue) {
        Some(q) => format!("queue:{q}"),
        None => "unknown".into(),
    }
}

/// Where the message was first published: the `x-flowgate-original-*`
/// headers, or the exchange and first routing key in `x-death`.
pub fn origin_of(h: &FieldTable) -> Option<(String, String)> {
    let x = header(h, envelope::ORIGINAL_EXCHANGE).and_then(header_string);
    let k = header(h, envelope::ORIGINAL_ROUTING_KEY).and_then(header_string);
    if let (Some(x), Some(k)) = (x, k) {
        return Some((x, k));
    }
    let d = newest_death(h)?;
    Some((d.exchange?, d.routing_key?))
}

/// The properties of a replayed dead letter: the reason and routing headers
/// and the broker's dead-letter history stripped, persistent.
fn replay_properties(p: &BasicProperties) -> BasicProperties {
    let mut kept = FieldTable::default();
    if let Some(h) = p.headers() {
        for (k, v) in h.inner() {
            let k_str = k.as_str();
            if !envelope::REPLAY_STRIPPED.contains(&k_str)
                && !k_str.starts_with(envelope::LAST_DEATH_PREFIX)
            {
                kept.insert(k.clone(), v.clone());
            }
        }
    }
    p.clone().with_headers(kept).with_delivery_mode(2)
}

/// Messages ready in `queue` (a passive declare).
pub(crate) async fn depth(ch: &Channel, queue: &str) -> Result<u32, Error> {
    Ok(queue_stat(ch, queue).await?.0)
}

/// Messages ready in `queue` and its consumers (a passive declare).
pub(crate) async fn queue_stat(ch: &Channel, queue: &str) -> Result<(u32, u32), Error> {
    let q = crate::topology::inspect_queue(ch, queue)
        .await
        .map_err(Error::Broker)?;
    Ok((q.message_count(), q.consumer_count()))
}

/// Counts a DLQ's messages by reason and stage, leaving them in place (a
/// queue that is not classic may change order, as it always did).
pub async fn stats(conn: &Connection, queue: &str) -> Result<DlqStats, Error> {
    let mut scan = Scan::start(conn, queue).await?;
    let mut out = DlqStats::default();
    let res = async {
        while let Some(m) = scan.next().await? {
            let h = m.properties.headers().clone().unwrap_or_default();
            out.total += 1;
            tally(&mut out.by_reason, reason_of(&h));
            tally(&mut out.by_stage, stage_of(&h));
        }
        Ok::<_, Error>(())
    }
    .await;
    scan.finish().await?;
    res?;
    Ok(out)
}

fn tally(map: &mut BTreeMap<String, u64>, key: String) {
    let key = if map.len() >= MAX_DISTINCT && !map.contains_key(&key) {
        OTHER.to_owned()
    } else {
        key
    };
    *map.entry(key).or_default() += 1;
}

/// Republishes dead letters (those with `reason`, at most `limit`) to
/// where they were first published, confirmed, and removes each from the
/// DLQ only after its confirm.
pub async fn replay(
    conn: &Connection,
    queue: &str,
    reason: Option<&str>,
    limit: Option<u64>,
) -> Result<ReplayReport, Error> {
    replay_with_progress(conn, queue, reason, limit, |_| {}).await
}

/// How far a replay is: called once with the snapshot's size, then after
/// each message examined (a progress bar's position and length).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplayProgress {
    /// Messages examined so far.
    pub examined: u64,
    /// Messages in the snapshot (the DLQ's depth at the start).
    pub total: u64,
}

/// [`replay`], telling `progress` how far it is ([`apply`] with a reason
/// filter; logged as done by `api`).
pub async fn replay_with_progress(
    conn: &Connection,
    queue: &str,
    reason: Option<&str>,
    limit: Option<u64>,
    progress: impl FnMut(ReplayProgress),
) -> Result<ReplayReport, Error> {
    let filter = Filter {
        reason: reason.map(str::to_owned),
        ..Filter::default()
    };
    let r = apply(
        conn,
        queue,
        &filter,
        &Action::Replay,
        limit,
        "api",
        progress,
    )
    .await?;
    Ok(ReplayReport {
        replayed: r.done,
        skipped: r.examined - r.done - r.failed,
        failed: r.failed,
    })
}

/// Deletes every message of a DLQ; returns how many.
pub async fn purge(conn: &Connection, queue: &str) -> Result<u32, Error> {
    let ch = conn.create_channel().await?;
    let n = ch
        .queue_purge(queue.into(), QueuePurgeOptions::default())
        .await?;
    let _ = ch.close(200, "dlq purge done".into()).await;
    Ok(n)
}

/// The attempts a dead letter had (`x-flowgate-attempts`), if flowgate
/// dead-lettered it.
pub fn attempts_of(h: &FieldTable) -> Option<i64> {
    header(h, envelope::ATTEMPTS).and_then(header_int)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{FieldArray, LongString, ShortString};

    fn s(v: &str) -> AMQPValue {
        AMQPValue::LongString(LongString::from(v.to_owned()))
    }

    fn broker_dead_letter(reason: &str) -> FieldTable {
        let mut death = FieldTable::default();
        death.insert(ShortString::from("reason"), s(reason));
        death.insert(ShortString::from("queue"), s("invoices"));
        death.insert(ShortString::from("exchange"), s("shop"));
        death.insert(
            ShortString::from("routing-keys"),
            AMQPValue::FieldArray(FieldArray::from(vec![s("order.created")])),
        );
        let mut h = FieldTable::default();
        h.insert(
            ShortString::from("x-death"),
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(death)])),
        );
        h
    }

    #[test]
    fn broker_dead_letters_explain_themselves_from_x_death() {
        let h = broker_dead_letter("delivery_limit");
        assert_eq!(reason_of(&h), "delivery-limit");
        assert_eq!(stage_of(&h), "queue:invoices");
        assert_eq!(
            origin_of(&h),
            Some(("shop".to_owned(), "order.created".to_owned()))
        );
    }

    #[test]
    fn flowgate_headers_win_and_replay_strips_them() {
        let mut h = broker_dead_letter("rejected");
        h.insert(ShortString::from("x-flowgate-reason"), s("max-attempts"));
        h.insert(ShortString::from("x-flowgate-stage"), s("reserve"));
        h.insert(ShortString::from(envelope::ORIGINAL_EXCHANGE), s("shop"));
        h.insert(ShortString::from(envelope::ORIGINAL_ROUTING_KEY), s("in"));
        h.insert(
            ShortString::from("x-flowgate-attempt"),
            AMQPValue::LongLongInt(5),
        );
        h.insert(ShortString::from("app"), s("kept"));
        assert_eq!(reason_of(&h), "max-attempts");
        assert_eq!(stage_of(&h), "reserve");
        assert_eq!(origin_of(&h), Some(("shop".into(), "in".into())));
        let p = replay_properties(&BasicProperties::default().with_headers(h));
        let kept = p.headers().clone().unwrap_or_default();
        assert_eq!(kept.inner().len(), 1, "only the application's header stays");
        assert!(kept.inner().contains_key("app"));
        assert_eq!(reason_of(&FieldTable::default()), "unknown");
    }
}
