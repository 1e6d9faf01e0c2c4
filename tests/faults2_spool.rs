//! The spool across versions: one corrupted record of a spool file is
//! quarantined, and every other record still replays, headers intact.

use flowgate_testkit as common;

use common::*;
use flowgate::lapin::types::{AMQPValue, ByteArray, DecimalValue, FieldTable};
use flowgate::lapin::BasicProperties;
use flowgate::Engine;
use flowgate::{Spool, SpoolRecord};
use std::time::Duration;

/// A header of every field-table type the records carry.
fn typed_headers() -> FieldTable {
    let mut nested = FieldTable::default();
    nested.insert("n".into(), AMQPValue::ShortInt(-3));
    let mut h = FieldTable::default();
    h.insert(
        "x-bytes".into(),
        AMQPValue::ByteArray(ByteArray::from(vec![0u8, 0xff])),
    );
    h.insert(
        "x-decimal".into(),
        AMQPValue::DecimalValue(DecimalValue {
            scale: 2,
            value: 314,
        }),
    );
    h.insert("x-ts".into(), AMQPValue::Timestamp(1_700_000_000));
    h.insert("x-u8".into(), AMQPValue::ShortShortUInt(7));
    h.insert("x-table".into(), AMQPValue::FieldTable(nested));
    h
}

#[actix_rt::test]
async fn a_spool_file_with_one_corrupted_record_replays_every_other_and_quarantines_it() {
    const N: usize = 300;
    const BAD: usize = 150;
    let prefix = unique("f2spool");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spool.redb");
    // s1 is never fed; the spool holds records for the sink's key.
    let mut cfg = chain_config(&prefix, &["forward"], 10);
    cfg.spool.path = Some(path.clone());
    let _cleanup = Cleanup::new(AMQP_URL, &cfg);
    let bad_seq = {
        let spool = Spool::open(&path, 64 << 20).expect("spool");
        let mut seqs = Vec::with_capacity(N);
        for i in 0..N {
            let seq = spool
                .append(&SpoolRecord {
                    exchange: format!("{prefix}.ex"),
                    routing_key: "hop1".into(),
                    body: vec![7; 64],
                    properties: BasicProperties::default()
                        .with_message_id(format!("r-{i}").into())
                        .with_delivery_mode(2)
                        .with_headers(typed_headers()),
                })
                .expect("append");
            seqs.push(seq);
        }
        seqs[BAD]
    };
    {
        // Cut one stored value in half, as a torn write or a bad disk would.
        let db = redb::Database::create(&path).expect("redb");
        let records: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("records");
        let txn = db.begin_write().expect("txn");
        {
            use redb::ReadableTable;
            let mut t = txn.open_table(records).expect("table");
            let value = t
                .get(bad_seq)
                .expect("get")
                .expect("stored")
                .value()
                .to_vec();
            t.insert(bad_seq, &value[..value.len() / 2])
                .expect("insert");
        }
        txn.commit().expect("commit");
    }

    let h = Engine::builder()
        .config(cfg.clone())
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let m = h.metrics().clone();
    assert!(
        eventually(Duration::from_secs(120), || async {
            m.gauge(flowgate::Metrics::SPOOL_MESSAGES, &[]) == 0
                && m.counter(flowgate::Metrics::SPOOL_REPLAYED, &[]) as usize == N - 1
        })
        .await,
        "spool replayed: {} of {}, quarantined {}",
        m.counter(flowgate::Metrics::SPOOL_REPLAYED, &[]),
        N - 1,
        m.counter(flowgate::Metrics::SPOOL_QUARANTINED, &[])
    );
    assert_eq!(
        m.counter(flowgate::Metrics::SPOOL_QUARANTINED, &[]),
        1,
        "the one bad record, counted once"
    );

    let client = Client::connect(AMQP_URL).await;
    let sink = format!("{prefix}.sink");
    let got = client.collect(&sink, N - 1, Duration::from_secs(30)).await;
    let want = typed_headers();
    for (id, headers) in &got {
        for (k, v) in want.inner() {
            assert_eq!(headers.inner().get(k), Some(v), "{id}: header {k}");
        }
    }
    let c = counts(got.into_iter().map(|(id, _)| id));
    assert_eq!(c.len(), N - 1, "every other record arrived");
    assert!(c.values().all(|n| *n == 1), "and once");
    assert!(
        !c.contains_key(&format!("r-{BAD}")),
        "not the corrupted one"
    );
    assert_eq!(client.depth(&sink).await, 0, "no copy left behind");
    h.shutdown().await;
}
