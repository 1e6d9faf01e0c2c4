//! The vendored `amq-protocol-types` (vendor/, wired by `[patch.crates-io]`)
//! decodes short strings that are not UTF-8 instead of failing the frame:
//! these tests fail if the patch ever drops out of the build, and prove that
//! such messages no longer cost the consume connection (issue 9 item 1).

use flowgate_testkit as common;

use common::*;
use lapin::protocol::basic::parse_properties;
use lapin::types::parsing::{parse_field_table, parse_short_string};
use lapin::types::{AMQPValue, ShortString};
use std::collections::HashMap;
use std::time::Duration;

use common::raw as wire;

/// Messages lapin could not parse before the patch: (name, properties).
fn hostile() -> Vec<(&'static str, wire::Props)> {
    use wire::{longstr, table, Props};
    vec![
        (
            "message-id",
            Props {
                delivery_mode: Some(2),
                message_id: Some(b"bad-\xff\xfe-id".to_vec()),
                ..Props::default()
            },
        ),
        (
            "header-key",
            Props {
                delivery_mode: Some(2),
                message_id: Some(b"bad-header-key".to_vec()),
                headers: Some(table(&[(b"k-\xff", b'S', longstr(b"v"))])),
                ..Props::default()
            },
        ),
        (
            "properties",
            Props {
                content_type: Some(b"text/\xff".to_vec()),
                delivery_mode: Some(2),
                correlation_id: Some(b"corr-\xc3".to_vec()),
                message_id: Some(b"bad-properties".to_vec()),
                kind: Some(b"type-\xfe".to_vec()),
                app_id: Some(b"\x80app".to_vec()),
                ..Props::default()
            },
        ),
        (
            "nested",
            Props {
                delivery_mode: Some(2),
                message_id: Some(b"bad-nested".to_vec()),
                headers: Some(table(&[
                    // A table inside the headers with a non-UTF-8 key and
                    // a long string that is not UTF-8 either.
                    (
                        b"outer",
                        b'F',
                        table(&[(b"in-\xff", b'S', longstr(b"\xff\xfe"))]),
                    ),
                    // `s` is a signed 16-bit integer in RabbitMQ's dialect
                    // (and lapin's): not a string at all.
                    (b"short", b's', (-2i16).to_be_bytes().to_vec()),
                ])),
                ..Props::default()
            },
        ),
    ]
}

#[test]
fn the_patched_parser_decodes_short_strings_that_are_not_utf8() {
    // Through lapin's re-exports: the same code lapin parses frames with.
    let (rest, s) = parse_short_string(&b"\x06a\xff\xfeb\xc3\xa9"[..]).expect(
        "the vendored amq-protocol-types is not in the build ([patch.crates-io] in Cargo.toml)",
    );
    assert!(rest.is_empty());
    assert_eq!(s.as_str(), "a\u{fffd}\u{fffd}b\u{e9}");

    // 255 invalid bytes decode to 85 whole replacement characters.
    let mut long = vec![255u8];
    long.extend([0xffu8; 255]);
    let (_, s) = parse_short_string(&long[..]).expect("lossy, not an error");
    assert_eq!(s.as_str().len(), 255);
    assert!(s.as_str().chars().all(|c| c == '\u{fffd}'));

    let t = wire::table(&[(b"k-\xff", b'S', wire::longstr(b"v"))]);
    let (_, table) = parse_field_table(&t[..]).expect("table with a non-UTF-8 key");
    assert!(table.inner().contains_key("k-\u{fffd}"));
}

#[test]
fn the_patched_parser_reads_every_hostile_property_set() {
    for (name, props) in hostile() {
        let bytes = props.encode();
        let (rest, p) = parse_properties(&bytes[..])
            .unwrap_or_else(|e| panic!("{name}: properties fail to parse (patch missing?): {e}"));
        assert!(rest.is_empty(), "{name}: all consumed");
        let id = p.message_id().as_ref().map(ShortString::as_str);
        assert!(
            id.is_some_and(|id| id.starts_with("bad-")),
            "{name}: {id:?}"
        );
    }
    let (_, p) = parse_properties(&hostile()[0].1.encode()[..]).unwrap();
    assert_eq!(
        p.message_id().as_ref().map(ShortString::as_str),
        Some("bad-\u{fffd}\u{fffd}-id")
    );
    let (_, p) = parse_properties(&hostile()[3].1.encode()[..]).unwrap();
    let headers = p.headers().clone().unwrap_or_default();
    match headers.inner().get("outer") {
        Some(AMQPValue::FieldTable(t)) => assert_eq!(
            t.inner().get("in-\u{fffd}"),
            Some(&AMQPValue::LongString(b"\xff\xfe".to_vec().into()))
        ),
        other => panic!("nested table: {other:?}"),
    }
    assert_eq!(headers.inner().get("short"), Some(&AMQPValue::ShortInt(-2)));
}

/// Sum of a counter family over every label set, from the engine's registry.
fn total(handle: &flowgate::EngineHandle, family: &str) -> f64 {
    handle
        .metrics()
        .registry()
        .gather()
        .iter()
        .filter(|f| f.name() == family)
        .flat_map(|f| f.get_metric().iter().map(|m| m.get_counter().get_value()))
        .sum()
}

#[actix_rt::test]
async fn non_utf8_short_strings_do_not_cost_the_consume_connection() {
    // Issue 9's shape: two stages on one engine (s1 → s2 → sink), prefetch
    // 10, quorum inputs with delivery limit 3; 2000 good messages with ten
    // hostile ones among them, sent as raw frames.
    let prefix = unique("vendor-guard");
    let mut cfg = chain_config(&prefix, &["forward", "forward"], 10);
    for q in &mut cfg.queues {
        q.delivery_limit = Some(3);
    }
    let _cleanup = Cleanup::new(AMQP_URL, &cfg);
    let ex = format!("{prefix}.ex");
    let handle = flowgate::Engine::builder()
        .config(cfg.clone())
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    assert!(handle.wait_ready(Duration::from_secs(20)).await);
    let client = Client::connect(AMQP_URL).await;
    let mut raw = common::raw::RawClient::connect("127.0.0.1:5672").await;

    let kinds = hostile();
    let mut goods = Vec::new();
    let mut bad_ids = Vec::new();
    for i in 0..10 {
        let ids: Vec<String> = (0..200).map(|j| format!("good-{i}-{j}")).collect();
        client.publish_many(&ex, "in", &ids, b"{}").await;
        goods.extend(ids);
        // Ten non-UTF-8 message ids, and beside each one message of
        // another hostile kind (a bad header key, bad properties, a bad
        // nested table) whose id is fine.
        for kind in [0, 1 + i % (kinds.len() - 1)] {
            let (_, mut props) = kinds[kind].clone();
            // Unique ids, still not UTF-8 where the kind says so.
            let mut id = props
                .message_id
                .take()
                .expect("hostile messages carry an id");
            id.extend_from_slice(format!("-{i}").as_bytes());
            bad_ids.push(String::from_utf8_lossy(&id).into_owned());
            props.message_id = Some(id);
            raw.publish(&ex, "in", &props.encode(), b"{}").await;
        }
    }
    assert_eq!(
        bad_ids.iter().filter(|id| id.contains('\u{fffd}')).count(),
        10
    );

    // Every message ends in the sink (forwarded) or in a stage's DLQ.
    let sink = format!("{prefix}.sink");
    let dlqs = [format!("{prefix}.s1.dlq"), format!("{prefix}.s2.dlq")];
    let expected = goods.len() + bad_ids.len();
    let settled = eventually(Duration::from_secs(120), || async {
        let mut n = client.depth(&sink).await as usize;
        for q in &dlqs {
            n += client.depth(q).await as usize;
        }
        n >= expected
    })
    .await;
    handle.shutdown().await;
    assert!(
        settled,
        "sink holds {} of {expected}",
        client.depth(&sink).await
    );
    for s in ["s1", "s2"] {
        assert_drained(&client, &format!("{prefix}.{s}")).await;
    }

    let n = client.depth(&sink).await as usize;
    let mut sunk = counts(
        client
            .collect(&sink, n, Duration::from_secs(60))
            .await
            .into_iter()
            .map(|(id, _)| id),
    );
    let mut dead = HashMap::new();
    let mut dead_reasons = HashMap::new();
    for q in &dlqs {
        let n = client.depth(q).await as usize;
        for (id, h) in client.collect(q, n, Duration::from_secs(30)).await {
            dead_reasons.insert(id.clone(), (q.clone(), header(&h, "x-flowgate-reason")));
            *dead.entry(id).or_insert(0usize) += 1;
        }
    }
    // A message id that is not UTF-8 is dead-lettered by the first stage
    // (lossy ids could collide in dedup), with its reason; every other
    // hostile message (bad header keys, properties) is forwarded.
    for id in &bad_ids {
        if id.contains('\u{fffd}') {
            assert_eq!(
                dead_reasons.get(id),
                Some(&(dlqs[0].clone(), Some("malformed-id".to_owned()))),
                "{id}: in s1's DLQ as malformed-id"
            );
        } else {
            assert_eq!(sunk.get(id), Some(&1), "{id}: forwarded to the sink");
        }
    }
    for id in &goods {
        assert_eq!(sunk.remove(id), Some(1), "{id} once in the sink");
        assert!(!dead.contains_key(id), "{id} dead-lettered: {dead:?}");
    }
    // What is left are the hostile ones: forwarded, or dead-lettered by a
    // stage (e.g. `malformed-id`), each exactly once.
    let mut bad: HashMap<String, usize> = sunk;
    for (id, n) in dead {
        *bad.entry(id).or_insert(0) += n;
    }
    for id in &bad_ids {
        assert_eq!(bad.remove(id), Some(1), "{id} exactly once");
    }
    assert!(bad.is_empty(), "nothing else arrived: {bad:?}");

    // The link never went down: no reconnect, no restart of anything, and
    // no delivery was made twice (a dropped connection redelivers its
    // whole window).
    assert_eq!(total(&handle, "flowgate_reconnects_total"), 0.0);
    assert_eq!(total(&handle, "flowgate_actor_restarts_total"), 0.0);
    let consumed = |s: &str| handle.metrics().counter(flowgate::Metrics::CONSUMED, &[s]);
    assert_eq!(
        consumed("s1") as usize,
        expected,
        "s1 saw each message once"
    );
    let malformed = bad_ids.iter().filter(|id| id.contains('\u{fffd}')).count();
    assert_eq!(
        consumed("s2") as usize,
        expected - malformed,
        "s2 saw each forwarded message once (no delivery count rose)"
    );
    client.delete_topology(&cfg).await;
}
