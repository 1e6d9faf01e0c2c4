//! Dead-letter queue tools: stats, replay, purge (`flowgate dlq ...`).
//!
//! A dead letter explains itself with `x-flowgate-*` headers when flowgate
//! dead-lettered it. When the *broker* did (a quorum queue's delivery limit,
//! a rejected message on a queue without a flowgate stage, an expired
//! message), only `x-death` says why: [`reason_of`] maps its reason to
//! `delivery-limit`, `rejected`, `expired` or `maxlen`.
//!
//! Every tool works on a snapshot: it takes at most the messages the queue
//! held when it started (`basic.get`, not acked) and gives back the ones it
//! does not remove by closing its channel (the broker requeues them), so it
//! never loops on messages it put back itself. Replay republishes with a
//! publisher confirm and `mandatory`, and acks from the DLQ only after the
//! confirm: a crash in between duplicates a message (dedup catches it),
//! never loses one.

use crate::config::Config;
use crate::Error;
use flowgate_actors::envelope::{self, newest_death};
use flowgate_actors::envelope::{header_int, header_string};
use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions, QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use serde::Serialize;
use std::collections::BTreeMap;

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

fn replay_properties(p: &BasicProperties) -> BasicProperties {
    let mut kept = FieldTable::default();
    if let Some(h) = p.headers() {
        for (k, v) in h.inner() {
            let k_str = k.as_str();
            if !envelope::REPLAY_STRIPPED.contains(&k_str) && !k_str.starts_with("x-last-death-") {
                kept.insert(k.clone(), v.clone());
            }
        }
    }
    p.clone().with_headers(kept).with_delivery_mode(2)
}

async fn depth(ch: &Channel, queue: &str) -> Result<u32, Error> {
    let q = ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok(q.message_count())
}

/// Counts a DLQ's messages by reason and stage, leaving them in place.
pub async fn stats(conn: &Connection, queue: &str) -> Result<DlqStats, Error> {
    let ch = conn.create_channel().await?;
    let n = depth(&ch, queue).await?;
    let mut out = DlqStats::default();
    for _ in 0..n {
        let Some(m) = ch
            .basic_get(queue.into(), BasicGetOptions { no_ack: false })
            .await?
        else {
            break;
        };
        let h = m.properties.headers().clone().unwrap_or_default();
        out.total += 1;
        *out.by_reason.entry(reason_of(&h)).or_default() += 1;
        *out.by_stage.entry(stage_of(&h)).or_default() += 1;
    }
    // Closing the channel returns every message we held, in order.
    let _ = ch.close(200, "dlq stats done".into()).await;
    Ok(out)
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

/// [`replay`], telling `progress` how far it is.
pub async fn replay_with_progress(
    conn: &Connection,
    queue: &str,
    reason: Option<&str>,
    limit: Option<u64>,
    mut progress: impl FnMut(ReplayProgress),
) -> Result<ReplayReport, Error> {
    let get = conn.create_channel().await?;
    let publish = conn.create_channel().await?;
    publish
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let n = depth(&get, queue).await?;
    let mut report = ReplayReport::default();
    let total = u64::from(n);
    progress(ReplayProgress { examined: 0, total });
    for examined in 1..=total {
        let Some(m) = get
            .basic_get(queue.into(), BasicGetOptions { no_ack: false })
            .await?
        else {
            break;
        };
        let h = m.properties.headers().clone().unwrap_or_default();
        let wanted = reason.is_none_or(|r| reason_of(&h) == r)
            && limit.is_none_or(|l| report.replayed + report.failed < l);
        let origin = origin_of(&h);
        let (Some((exchange, key)), true) = (origin, wanted) else {
            report.skipped += 1;
            progress(ReplayProgress { examined, total });
            continue;
        };
        let confirm = publish
            .basic_publish(
                exchange.as_str().into(),
                key.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                &m.data,
                replay_properties(&m.properties),
            )
            .await?
            .await?;
        if matches!(confirm, lapin::Confirmation::Ack(None)) {
            m.ack(BasicAckOptions::default()).await?;
            report.replayed += 1;
        } else {
            tracing::warn!(queue, exchange = %exchange, routing_key = %key, ?confirm,
                "replay not confirmed; the dead letter stays");
            report.failed += 1;
        }
        progress(ReplayProgress { examined, total });
    }
    let _ = get.close(200, "dlq replay done".into()).await;
    let _ = publish.close(200, "dlq replay done".into()).await;
    Ok(report)
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
