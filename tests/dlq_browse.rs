//! Reading a DLQ changes nothing (issue 28): on a classic DLQ every list
//! page, filter, search, `show`, count and stats leaves the queue with the
//! same messages in the same order; a quorum DLQ is refused (a return
//! would reorder it); actions remove exactly what they pick, each message
//! ending in one place. The console's index answers pages exactly as a
//! scan would, leaves the queue as it was, notices a queue changed behind
//! its back, and never decides what an action touches.

use flowgate::dlq::{self, Action, Filter, Indexes, Limits, Served};
use flowgate::envelope;
use flowgate::lapin::options::{
    BasicAckOptions, BasicGetOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use flowgate::lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use flowgate::lapin::{BasicProperties, Connection, ConnectionProperties};
use flowgate_testkit::*;
use std::sync::Arc;
use std::time::Duration;

const REASONS: [&str; 3] = ["unroutable", "malformed", "handler-error"];

fn queue_args(kind: &str) -> FieldTable {
    let mut a = FieldTable::default();
    a.insert(
        ShortString::from("x-queue-type"),
        AMQPValue::LongString(LongString::from(kind)),
    );
    a
}

/// Declares `q` of `kind` and fills it with `n` dead letters `dl-00000`…
/// (reasons and stages in turn, JSON, text and binary bodies).
async fn fill(c: &Client, q: &str, kind: &str, n: usize) -> Vec<String> {
    c.ch.queue_declare(q.into(), QueueDeclareOptions::durable(), queue_args(kind))
        .await
        .unwrap();
    let mut ids = Vec::new();
    for i in 0..n {
        let id = format!("dl-{i:05}");
        let mut h = FieldTable::default();
        let t = |v: &str| AMQPValue::LongString(LongString::from(v));
        h.insert(ShortString::from(envelope::REASON), t(REASONS[i % 3]));
        h.insert(
            ShortString::from(envelope::STAGE),
            t(if i % 2 == 0 { "reserve" } else { "ship" }),
        );
        h.insert(ShortString::from(envelope::ORIGINAL_EXCHANGE), t(""));
        h.insert(
            ShortString::from(envelope::ORIGINAL_ROUTING_KEY),
            t("nowhere"),
        );
        let body: Vec<u8> = match i % 3 {
            0 => format!("{{\"order\":{i},\"needle\":{}}}", i == 1233).into_bytes(),
            1 => format!("plain text {i}").into_bytes(),
            _ => vec![0xff, 0x00, (i % 256) as u8],
        };
        c.publish_props(
            "",
            q,
            &body,
            BasicProperties::default()
                .with_message_id(id.as_str().into())
                .with_headers(h),
        )
        .await;
        ids.push(id);
    }
    ids
}

/// Browsing changed nothing: `q` holds `ids`, in order, and no more
/// (taken off to check, then the queue is deleted). A read the last page
/// started (an index renewed behind the pages) holds what it read for at
/// most 5 s before it hands it back: wait for that first.
async fn intact_then_delete(c: &Client, q: &str, ids: &[String]) {
    assert!(
        eventually(Duration::from_secs(15), || async {
            c.depth(q).await as usize == ids.len()
        })
        .await,
        "{} of {} back in the queue",
        c.depth(q).await,
        ids.len()
    );
    assert_eq!(
        drain_ids(c, q, ids.len()).await,
        ids,
        "order and count unchanged"
    );
    c.ch.queue_delete(q.into(), QueueDeleteOptions::default())
        .await
        .unwrap();
}

/// Takes every message of `q` (acked: the end of the test) and returns
/// their ids in queue order.
async fn drain_ids(c: &Client, q: &str, n: usize) -> Vec<String> {
    c.collect(q, n, Duration::from_secs(30))
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect()
}

#[actix_rt::test]
async fn browsing_a_classic_dlq_keeps_its_order_and_count() {
    let c = Client::connect(AMQP_URL).await;
    let q = unique("browse-classic");
    let ids = fill(&c, &q, "classic", 2000).await;
    let conn = &c.conn;

    // Every page, unfiltered, in order.
    let mut seen = Vec::new();
    let mut offset = 0;
    loop {
        let page = dlq::list(conn, &q, &Filter::default(), offset, 200)
            .await
            .unwrap();
        assert_eq!(page.depth, 2000);
        assert!(page.complete);
        seen.extend(page.entries.iter().map(|e| e.message_id.clone().unwrap()));
        assert_eq!(c.depth(&q).await, 2000, "a page read leaves every message");
        offset += page.entries.len();
        if !page.more {
            break;
        }
    }
    assert_eq!(seen, ids, "the pages show the queue in order");

    // Filters, search, show, count, stats.
    let by_reason = Filter {
        reason: Some("malformed".into()),
        ..Filter::default()
    };
    let page = dlq::list(conn, &q, &by_reason, 0, 50).await.unwrap();
    assert_eq!(page.entries.len(), 50);
    assert!(page.more);
    assert!(page.entries.iter().all(|e| e.reason == "malformed"));
    assert_eq!(page.entries[0].message_id.as_deref(), Some("dl-00001"));
    assert_eq!(page.entries[0].body_kind, dlq::view::BodyKind::Text);
    let needle = Filter {
        search: Some("\"needle\":TRUE".into()),
        ..Filter::default()
    };
    let found = dlq::list(conn, &q, &needle, 0, 50).await.unwrap();
    assert_eq!(found.entries.len(), 1, "body text, case ignored");
    assert_eq!(found.entries[0].message_id.as_deref(), Some("dl-01233"));
    assert_eq!(found.entries[0].position, 1234);
    assert!(!found.more);
    let shown = dlq::show(conn, &q, &found.entries[0].id).await.unwrap();
    assert_eq!(shown.len(), 1);
    assert!(
        shown[0].body.shown.contains("\"needle\": true"),
        "pretty JSON"
    );
    let binary = dlq::show(conn, &q, "dl-00002").await.unwrap();
    assert_eq!(binary[0].body.kind, dlq::view::BodyKind::Binary);
    assert!(binary[0].body.shown.starts_with("00000000  ff 00 02"));
    assert_eq!(dlq::count(conn, &q, &by_reason).await.unwrap(), (667, true));
    let stats = dlq::stats(conn, &q).await.unwrap();
    assert_eq!(stats.total, 2000);
    assert_eq!(stats.by_stage["reserve"], 1000);

    // After all that: the same 2000 messages in the same order.
    intact_then_delete(&c, &q, &ids).await;
}

#[actix_rt::test]
async fn a_quorum_dlq_is_not_browsed_and_stays_untouched() {
    let c = Client::connect(AMQP_URL).await;
    let q = unique("browse-quorum");
    let ids = fill(&c, &q, "quorum", 30).await;
    let e = dlq::list(&c.conn, &q, &Filter::default(), 0, 10)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("not a classic queue"), "{e}");
    assert!(dlq::show(&c.conn, &q, "dl-00001").await.is_err());
    assert!(dlq::count(&c.conn, &q, &Filter::default()).await.is_err());
    let got = c.collect(&q, 30, Duration::from_secs(20)).await;
    assert_eq!(
        got.iter().map(|(id, _)| id.clone()).collect::<Vec<_>>(),
        ids,
        "nothing read, nothing moved"
    );
    assert!(
        got.iter()
            .all(|(_, h)| !h.inner().contains_key("x-delivery-count")),
        "never handed out and given back"
    );
    c.ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
}

#[actix_rt::test]
async fn actions_remove_exactly_what_they_pick_and_the_rest_keeps_its_order() {
    let c = Client::connect(AMQP_URL).await;
    let q = unique("act");
    let target = unique("act-target");
    c.ch.queue_declare(
        target.as_str().into(),
        QueueDeclareOptions::durable(),
        queue_args("classic"),
    )
    .await
    .unwrap();
    let ids = fill(&c, &q, "classic", 600).await;
    let conn = &c.conn;

    // A selection replayed elsewhere (confirmed, then removed).
    let picked = vec![ids[3].clone(), ids[300].clone(), ids[599].clone()];
    let to = Action::ReplayTo {
        exchange: String::new(),
        routing_key: target.clone(),
    };
    let sel = Filter {
        ids: picked.clone(),
        ..Filter::default()
    };
    let r = dlq::apply(conn, &q, &sel, &to, None, "test", |_| {})
        .await
        .unwrap();
    assert_eq!((r.matched, r.done, r.failed), (3, 3, 0), "{r:?}");
    // Their original destination is unroutable: a replay there fails and
    // the dead letters stay.
    let back = Filter {
        ids: vec![ids[4].clone()],
        ..Filter::default()
    };
    let r = dlq::apply(conn, &q, &back, &Action::Replay, None, "test", |_| {})
        .await
        .unwrap();
    assert_eq!((r.done, r.failed), (0, 1), "unroutable: kept");
    // A filter's matches deleted.
    let malformed = Filter {
        reason: Some("malformed".into()),
        ..Filter::default()
    };
    let r = dlq::apply(conn, &q, &malformed, &Action::Delete, None, "test", |_| {})
        .await
        .unwrap();
    assert_eq!(r.done, 200, "{r:?}");
    let expected: Vec<String> = ids
        .iter()
        .enumerate()
        .filter(|(i, id)| !picked.contains(id) && i % 3 != 1)
        .map(|(_, id)| id.clone())
        .collect();
    let replayed = drain_ids(&c, &target, 3).await;
    assert_eq!(replayed, picked, "replayed in queue order");
    assert_eq!(c.depth(&q).await as usize, expected.len());
    assert_eq!(
        drain_ids(&c, &q, expected.len()).await,
        expected,
        "the rest in order: each message in exactly one place"
    );
    for name in [&q, &target] {
        c.ch.queue_delete(name.as_str().into(), QueueDeleteOptions::default())
            .await
            .unwrap();
    }
}

/// Indexes whose pages wait for the read however long it takes (the
/// console's pages wait [`dlq::PAGE_WAIT`]; a debug build reads slower).
fn patient() -> Indexes {
    Indexes::with_limits(Limits {
        page_wait: Duration::from_secs(60),
        ..Limits::default()
    })
}

/// A connection of the console's kind (shared with the index's reads).
async fn shared_conn() -> Arc<Connection> {
    Arc::new(
        Connection::connect(AMQP_URL, ConnectionProperties::default())
            .await
            .unwrap(),
    )
}

fn message_ids(p: &dlq::Page) -> Vec<String> {
    p.entries
        .iter()
        .map(|e| e.message_id.clone().unwrap())
        .collect()
}

#[actix_rt::test]
async fn the_index_answers_pages_as_a_scan_would_and_reading_changes_nothing() {
    let c = Client::connect(AMQP_URL).await;
    let q = unique("index-pages");
    let ids = fill(&c, &q, "classic", 2000).await;
    let conn = shared_conn().await;
    let idx = patient();

    // Every page in turn, the first one cold: in order, nothing taken.
    let mut seen = Vec::new();
    let mut served = Vec::new();
    let mut offset = 0;
    loop {
        let (page, how) = idx
            .page(&conn, &q, &Filter::default(), offset, 200, false)
            .await
            .unwrap();
        assert_eq!(page.depth, 2000);
        seen.extend(message_ids(&page));
        if matches!(how, Served::Index { .. }) {
            // (While the index's read goes on, it holds what it read.)
            assert_eq!(c.depth(&q).await, 2000, "a page leaves every message");
        }
        served.push(how);
        offset += page.entries.len();
        if !page.more {
            break;
        }
    }
    assert_eq!(seen, ids, "the pages show the queue in order");
    assert!(
        matches!(&served[0], Served::Building { why, .. } if why == "no index yet"),
        "cold: from the read that builds the index: {:?}",
        served[0]
    );
    assert!(
        matches!(served.last(), Some(Served::Index { indexed: 2000, .. })),
        "the last page waited for the whole read: {:?}",
        served.last()
    );
    assert_eq!(idx.indexed(&q), Some(2000));

    // Warm: filters, searches and deep pages from the index say what a
    // scan of the queue says.
    let f = |reason: Option<&str>, stage: Option<&str>, search: Option<&str>| Filter {
        reason: reason.map(Into::into),
        stage: stage.map(Into::into),
        search: search.map(Into::into),
        ids: Vec::new(),
    };
    let cases = [
        (Filter::default(), 0, 50),
        (Filter::default(), 1950, 50),
        (Filter::default(), 1990, 50),
        (f(Some("malformed"), None, None), 0, 50),
        (f(Some("malformed"), None, None), 600, 50),
        (f(Some("unroutable"), Some("ship"), None), 100, 50),
        (f(None, None, Some("\"needle\":TRUE")), 0, 50),
        (f(None, None, Some("DL-0199")), 0, 5),
        (f(None, None, Some("plain text 19")), 3, 4),
        (f(None, None, Some("no such text")), 0, 50),
        (f(Some("handler-error"), None, Some("order")), 0, 200),
    ];
    for (filter, offset, limit) in &cases {
        let (from_index, how) = idx
            .page(&conn, &q, filter, *offset, *limit, false)
            .await
            .unwrap();
        assert!(
            matches!(how, Served::Index { indexed: 2000, .. }),
            "{filter:?}: {how:?}"
        );
        let scanned = dlq::list(&c.conn, &q, filter, *offset, *limit)
            .await
            .unwrap();
        assert_eq!(
            message_ids(&from_index),
            message_ids(&scanned),
            "{filter:?} from {offset}: the index and a scan list the same"
        );
        assert!(
            from_index.entries == scanned.entries,
            "{filter:?} from {offset}: every field as a scan reads it"
        );
        assert_eq!(from_index.more, scanned.more, "{filter:?} from {offset}");
        assert_eq!(from_index.held_ms, 0, "no message held for a page");
    }
    let found = idx
        .page(&conn, &q, &cases[6].0, 0, 50, false)
        .await
        .unwrap()
        .0;
    assert_eq!(message_ids(&found), ["dl-01233"]);
    assert_eq!(found.entries[0].position, 1234);

    // Asked to read again: rebuilt, the same pages.
    let (again, how) = idx
        .page(&conn, &q, &Filter::default(), 0, 50, true)
        .await
        .unwrap();
    assert!(matches!(how, Served::Building { .. }), "{how:?}");
    assert_eq!(message_ids(&again), ids[..50]);

    // After all that: the same 2000 messages in the same order.
    let last = idx
        .page(&conn, &q, &Filter::default(), 1999, 1, false)
        .await
        .unwrap();
    assert_eq!(message_ids(&last.0), [ids[1999].clone()]);
    intact_then_delete(&c, &q, &ids).await;
}

/// Every page of `q` through the index, and how the first was served.
async fn every(idx: &Indexes, conn: &Arc<Connection>, q: &str) -> (Vec<String>, Served) {
    let (p, how) = idx
        .page(conn, q, &Filter::default(), 0, 200, false)
        .await
        .unwrap();
    let mut got = message_ids(&p);
    let (mut more, mut offset) = (p.more, p.entries.len());
    while more {
        let (p, _) = idx
            .page(conn, q, &Filter::default(), offset, 200, false)
            .await
            .unwrap();
        got.extend(message_ids(&p));
        more = p.more;
        offset += p.entries.len();
    }
    (got, how)
}

/// Publishes one more dead letter (reason `malformed`) with message id `id`.
async fn append(c: &Client, q: &str, id: &str) {
    let mut h = FieldTable::default();
    h.insert(
        ShortString::from(envelope::REASON),
        AMQPValue::LongString(LongString::from("malformed")),
    );
    c.publish_props(
        "",
        q,
        id.as_bytes(),
        BasicProperties::default()
            .with_message_id(id.into())
            .with_headers(h),
    )
    .await;
}

#[actix_rt::test]
async fn a_queue_changed_behind_the_index_is_noticed_and_never_steers_an_action() {
    let c = Client::connect(AMQP_URL).await;
    let q = unique("index-stale");
    let mut ids = fill(&c, &q, "classic", 300).await;
    let conn = shared_conn().await;
    let idx = patient();
    // Built, then warm.
    let (got, _) = every(&idx, &conn, &q).await;
    assert_eq!(got, ids);
    let (_, how) = every(&idx, &conn, &q).await;
    assert!(matches!(how, Served::Index { indexed: 300, .. }), "{how:?}");

    // (a) Behind its back, the head is consumed and a new dead letter
    // arrives: the count is the same, the head is not. The index notices.
    let head =
        c.ch.basic_get(q.as_str().into(), BasicGetOptions::default())
            .await
            .unwrap()
            .unwrap();
    assert_eq!(
        head.delivery
            .properties
            .message_id()
            .as_ref()
            .unwrap()
            .as_str(),
        "dl-00000"
    );
    c.ch.basic_ack(head.delivery.delivery_tag, BasicAckOptions::default())
        .await
        .unwrap();
    append(&c, &q, "late-1").await;
    ids.remove(0);
    ids.push("late-1".into());
    assert_eq!(c.depth(&q).await, 300);
    let (got, how) = every(&idx, &conn, &q).await;
    assert!(
        matches!(&how, Served::Building { why, .. } if why.contains("first dead letter")),
        "a changed head makes the index stale: {how:?}"
    );
    assert_eq!(got, ids, "rebuilt: the queue as it is now");

    // An action through the console on a valid index: applied to the
    // index too (no rebuild), which then says what the queue says.
    let sel = |message_ids: &[&str]| Filter {
        ids: message_ids.iter().map(|s| s.to_string()).collect(),
        ..Filter::default()
    };
    let r = idx
        .apply(&conn, &q, &sel(&["dl-00010"]), &Action::Delete, "test")
        .await
        .unwrap();
    assert_eq!((r.matched, r.done), (1, 1));
    ids.retain(|i| i != "dl-00010");
    let (got, how) = every(&idx, &conn, &q).await;
    assert!(matches!(how, Served::Index { indexed: 299, .. }), "{how:?}");
    assert_eq!(got, ids, "the index dropped what the action removed");
    let p = idx
        .page(&conn, &q, &Filter::default(), 9, 1, false)
        .await
        .unwrap()
        .0;
    assert_eq!(p.entries[0].position, 10, "positions renumbered");
    assert_eq!(p.entries[0].message_id.as_deref(), Some("dl-00011"));

    // (b) Behind its back, another tool removes one from the middle and a
    // new one arrives: count and head are what the index expects, so the
    // index cannot tell yet and still shows the removed one...
    let r = dlq::apply(
        &c.conn,
        &q,
        &sel(&["dl-00150"]),
        &Action::Delete,
        None,
        "other",
        |_| {},
    )
    .await
    .unwrap();
    assert_eq!(r.done, 1);
    append(&c, &q, "late-2").await;
    let (stale, how) = every(&idx, &conn, &q).await;
    assert!(matches!(how, Served::Index { .. }), "{how:?}");
    assert!(stale.contains(&"dl-00150".to_owned()));
    // ...but an operator acting on what it shows touches only what is in
    // the queue: the action reads the queue and picks by content. The
    // gone one is not matched, the one beside it is deleted, nothing else.
    let r = idx
        .apply(
            &conn,
            &q,
            &sel(&["dl-00150", "dl-00151"]),
            &Action::Delete,
            "test",
        )
        .await
        .unwrap();
    assert_eq!((r.matched, r.done), (1, 1), "{r:?}");
    ids.retain(|i| i != "dl-00150" && i != "dl-00151");
    ids.push("late-2".into());
    // The action read a queue that disagreed with the index: dropped,
    // and the next page reads the queue again.
    let (got, how) = every(&idx, &conn, &q).await;
    assert!(
        matches!(&how, Served::Building { why, .. } if why == "no index yet"),
        "{how:?}"
    );
    assert_eq!(got, ids);

    // In the end: exactly those, in order.
    assert_eq!(c.depth(&q).await as usize, ids.len());
    assert_eq!(drain_ids(&c, &q, ids.len()).await, ids);
    c.ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
}

/// Waits until `q`'s index is built with `n` dead letters (its read done).
async fn indexed(idx: &Indexes, q: &str, n: usize) {
    assert!(
        eventually(Duration::from_secs(60), || async {
            idx.indexed(q) == Some(n)
        })
        .await,
        "the index holds {:?}, not {n}",
        idx.indexed(q)
    );
}

/// New dead letters at the tail of an indexed DLQ: its deep pages come at
/// once from the old index (the check vouches for every dead letter in it)
/// while a read renews it; a page in the new tail comes from that read (or
/// answers pending rather than wait); then from the new index. Browsing
/// every page of it, before, during and after, leaves every message in the
/// queue, in its order.
#[actix_rt::test]
async fn a_renewed_index_serves_deep_pages_at_once_and_browsing_keeps_order_and_count() {
    let c = Client::connect(AMQP_URL).await;
    let q = unique("index-renew");
    let mut ids = fill(&c, &q, "classic", 2000).await;
    let conn = shared_conn().await;
    // Pages wait for nothing: what the index cannot answer now is pending.
    let idx = Indexes::with_limits(Limits {
        page_wait: Duration::ZERO,
        ..Limits::default()
    });
    let page = |offset: usize| {
        let (idx, conn, q) = (&idx, &conn, &q);
        async move {
            idx.page(conn, q, &Filter::default(), offset, 50, false)
                .await
                .unwrap()
        }
    };

    // Cold, with no index: the deep page is not there yet, and says so.
    let (p, how) = page(1950).await;
    assert!(
        matches!(&how, Served::Pending { why, .. } if why == "no index yet"),
        "{how:?}"
    );
    assert!(
        !p.complete && p.entries.len() < 50,
        "a pending page says so"
    );
    indexed(&idx, &q, 2000).await;
    let (p, how) = page(1950).await;
    assert!(
        matches!(
            how,
            Served::Index {
                rereading: None,
                indexed: 2000,
                ..
            }
        ),
        "{how:?}"
    );
    assert_eq!(message_ids(&p), ids[1950..]);

    // Three new dead letters: the same head, more messages.
    for id in ["late-1", "late-2", "late-3"] {
        append(&c, &q, id).await;
        ids.push(id.into());
    }
    let (p, how) = page(1950).await;
    assert!(
        matches!(&how, Served::Index { rereading: Some(why), indexed: 2000, .. }
            if why.contains("3 new dead letters")),
        "the old index serves a deep page at once while it is renewed: {how:?}"
    );
    assert_eq!(message_ids(&p), ids[1950..2000]);
    assert!(p.more, "the tail follows");
    let (p, how) = page(2000).await;
    match &how {
        // The read has not reached the tail yet: what it has, and it says so.
        Served::Pending { .. } => assert!(ids[2000..].starts_with(&message_ids(&p))),
        // Or it has (a fast broker).
        Served::Building { .. } | Served::Index { .. } => {
            assert_eq!(message_ids(&p), ids[2000..])
        }
        Served::Scan { .. } => panic!("{how:?}"),
    }
    indexed(&idx, &q, 2003).await;
    let (p, how) = page(2000).await;
    assert!(
        matches!(
            how,
            Served::Index {
                rereading: None,
                indexed: 2003,
                ..
            }
        ),
        "{how:?}"
    );
    assert_eq!(message_ids(&p), ids[2000..]);
    let (got, _) = every(&idx, &conn, &q).await;
    assert_eq!(got, ids, "every page, in order");

    // After all that: the same 2003 messages in the same order.
    intact_then_delete(&c, &q, &ids).await;
}

/// An index never holds more than its bounds, sampled all along its read
/// (the memory a DLQ's browsing takes does not grow with the queue): the
/// dead letters past them are read from the queue when a page needs them,
/// and reading changes nothing.
#[actix_rt::test]
async fn an_index_stays_within_its_bounds_and_pages_past_them_are_read_from_the_queue() {
    let c = Client::connect(AMQP_URL).await;
    let q = unique("index-bounds");
    let ids = fill(&c, &q, "classic", 2000).await;
    let conn = shared_conn().await;

    for limits in [
        Limits {
            bytes: 96 * 1024,
            ..Limits::default()
        },
        Limits {
            entries: 500,
            ..Limits::default()
        },
    ] {
        let idx = Indexes::with_limits(Limits {
            page_wait: Duration::from_secs(60),
            ..limits
        });
        let sampler = async {
            let mut peak = 0;
            while idx.indexed(&q).is_none() {
                peak = peak.max(idx.held_bytes(&q));
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            peak
        };
        let all = Filter::default();
        let (first, peak) = futures::join!(idx.page(&conn, &q, &all, 0, 50, false), sampler);
        assert_eq!(message_ids(&first.unwrap().0), ids[..50]);
        let held = idx.indexed(&q).unwrap();
        assert!(
            held <= limits.entries && held < 2000,
            "{limits:?}: holds {held}"
        );
        assert!(
            peak <= limits.bytes && idx.held_bytes(&q) <= limits.bytes,
            "{limits:?}: {peak} bytes at most while read, {} after",
            idx.held_bytes(&q)
        );
        // A page past what it holds: read from the queue, the same rows.
        let (deep, how) = idx
            .page(&conn, &q, &Filter::default(), 1950, 50, false)
            .await
            .unwrap();
        assert!(
            matches!(&how, Served::Scan { why } if why.contains("the index holds the first")),
            "{how:?}"
        );
        assert_eq!(message_ids(&deep), ids[1950..]);
    }
    // With the default bounds the whole queue fits, in what the README says
    // (these dead letters have small bodies: well under 1 KiB each).
    let idx = patient();
    idx.page(&conn, &q, &Filter::default(), 1950, 50, false)
        .await
        .unwrap();
    assert_eq!(idx.indexed(&q), Some(2000));
    assert!(idx.held_bytes(&q) < 2000 * 1024, "{}", idx.held_bytes(&q));

    intact_then_delete(&c, &q, &ids).await;
}

/// With a directory to save them in, the first deep page after a restart
/// (new `Indexes`, the same directory) comes at once from the index saved
/// before it, once the check vouched for it; a saved index the queue
/// disagrees with (its head gone) is not used. Nothing is taken.
#[actix_rt::test]
async fn a_saved_index_answers_the_first_deep_page_after_a_restart() {
    let c = Client::connect(AMQP_URL).await;
    let q = unique("index-saved");
    let mut ids = fill(&c, &q, "classic", 2000).await;
    let conn = shared_conn().await;
    let dir = tempfile::tempdir().unwrap();
    let start = || {
        Indexes::with_limits(Limits {
            page_wait: Duration::ZERO,
            ..Limits::default()
        })
        .saved_in(Some(dir.path().into()))
    };
    let saved = || {
        std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().ends_with(".bin"))
            .count()
    };
    let idx = start();
    idx.page(&conn, &q, &Filter::default(), 0, 50, false)
        .await
        .unwrap();
    indexed(&idx, &q, 2000).await;
    assert!(eventually(Duration::from_secs(10), || async { saved() == 1 }).await);
    drop(idx);

    // Restarted: the deep page at once, from the saved index.
    let idx = start();
    let (p, how) = idx
        .page(&conn, &q, &Filter::default(), 1950, 50, false)
        .await
        .unwrap();
    assert!(
        matches!(how, Served::Index { indexed: 2000, .. }),
        "the first page after a restart from the saved index: {how:?}"
    );
    assert_eq!(message_ids(&p), ids[1950..]);
    drop(idx);

    // The head consumed behind its back: the saved index is not used.
    let head =
        c.ch.basic_get(q.as_str().into(), BasicGetOptions::default())
            .await
            .unwrap()
            .unwrap();
    c.ch.basic_ack(head.delivery.delivery_tag, BasicAckOptions::default())
        .await
        .unwrap();
    ids.remove(0);
    let idx = start();
    let (_, how) = idx
        .page(&conn, &q, &Filter::default(), 1950, 50, false)
        .await
        .unwrap();
    assert!(
        matches!(&how, Served::Pending { why, .. } | Served::Building { why, .. }
            if why.contains("1999 dead letters now, 2000 when indexed")),
        "{how:?}"
    );
    indexed(&idx, &q, 1999).await;
    let (got, _) = every(&idx, &conn, &q).await;
    assert_eq!(got, ids);

    intact_then_delete(&c, &q, &ids).await;
}

/// A replay the broker will not confirm (a memory alarm: it stops reading a
/// connection that publishes) ends with an error naming the cause within
/// the action's bound instead of hanging the CLI or the console, and every
/// dead letter stays: once the alarm clears the DLQ holds them all again
/// (the one copy that was on the wire may reach its destination: at least
/// once).
#[actix_rt::test]
async fn a_replay_the_broker_will_not_confirm_ends_with_an_error_and_keeps_the_dead_letters() {
    let node = node::BrokerNode::start_async().await.expect("private node");
    let c = Client::connect(&node.amqp_url()).await;
    let q = unique("dlq-blocked");
    let target = format!("{q}.target");
    fill(&c, &q, "classic", 3).await;
    c.ch.queue_declare(
        target.as_str().into(),
        QueueDeclareOptions::durable(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let conn = Connection::connect(&node.amqp_url(), ConnectionProperties::default())
        .await
        .unwrap();
    node.blocking(|n| n.set_memory_alarm(true))
        .await
        .expect("alarm on");
    let action = Action::ReplayTo {
        exchange: String::new(),
        routing_key: target.clone(),
    };
    let bound = dlq::ANSWER_WITHIN * 3;
    let ended = tokio::time::timeout(
        bound,
        dlq::apply(&conn, &q, &Filter::default(), &action, None, "test", |_| {}),
    )
    .await;
    let err = match ended {
        Err(_) => panic!("the replay still waits after {bound:?}"),
        Ok(Ok(r)) => panic!("a replay under a memory alarm reported success: {r:?}"),
        Ok(Err(e)) => e.to_string(),
    };
    assert!(
        err.contains("did not answer"),
        "the error names the cause: {err}"
    );
    node.blocking(|n| n.set_memory_alarm(false))
        .await
        .expect("alarm off");
    let back = eventually(Duration::from_secs(30), || async { c.depth(&q).await == 3 }).await;
    assert!(
        back,
        "every dead letter is back in the DLQ: {}",
        c.depth(&q).await
    );
    let copies = c.depth(&target).await;
    assert!(
        copies <= 1,
        "at most the copy on the wire was published: {copies}"
    );
}
