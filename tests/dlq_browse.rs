//! Reading a DLQ changes nothing (issue 28): on a classic DLQ every list
//! page, filter, search, `show`, count and stats leaves the queue with the
//! same messages in the same order; a quorum DLQ is refused (a return
//! would reorder it); actions remove exactly what they pick, each message
//! ending in one place.

use flowgate::dlq::{self, Action, Filter};
use flowgate::envelope;
use flowgate::lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use flowgate::lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use flowgate::lapin::BasicProperties;
use flowgate_testkit::*;
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
    assert_eq!(c.depth(&q).await, 2000);
    assert_eq!(
        drain_ids(&c, &q, 2000).await,
        ids,
        "order and count unchanged"
    );
    c.ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
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
