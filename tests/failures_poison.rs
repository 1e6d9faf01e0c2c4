//! Failure semantics, poison and bad input: issue 4 acceptance 6.

use flowgate_testkit as common;

use common::*;
use flowgate::config::{DedupMode, Payload};
use flowgate::Engine;
use std::time::Duration;

/// A minimal AMQP 0-9-1 client speaking raw frames, to publish what lapin
/// refuses to build (a `message_id` that is not UTF-8) and to read dead
/// letters lapin cannot parse.
mod raw {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    pub struct Raw(TcpStream);

    fn shortstr(out: &mut Vec<u8>, s: &[u8]) {
        out.push(s.len() as u8);
        out.extend_from_slice(s);
    }

    fn method(class: u16, id: u16, args: &[u8]) -> Vec<u8> {
        let mut p = Vec::new();
        p.extend_from_slice(&class.to_be_bytes());
        p.extend_from_slice(&id.to_be_bytes());
        p.extend_from_slice(args);
        p
    }

    impl Raw {
        async fn send(&mut self, kind: u8, channel: u16, payload: &[u8]) {
            let mut f = vec![kind];
            f.extend_from_slice(&channel.to_be_bytes());
            f.extend_from_slice(&(payload.len() as u32).to_be_bytes());
            f.extend_from_slice(payload);
            f.push(0xCE);
            self.0.write_all(&f).await.unwrap();
        }

        /// (frame type, payload), skipping heartbeats.
        async fn recv(&mut self) -> (u8, Vec<u8>) {
            loop {
                let mut h = [0u8; 7];
                self.0.read_exact(&mut h).await.unwrap();
                let size = u32::from_be_bytes([h[3], h[4], h[5], h[6]]) as usize;
                let mut p = vec![0u8; size + 1];
                self.0.read_exact(&mut p).await.unwrap();
                p.pop();
                if h[0] != 8 {
                    return (h[0], p);
                }
            }
        }

        async fn expect_method(&mut self, class: u16, id: u16) -> Vec<u8> {
            let (kind, p) = self.recv().await;
            assert_eq!(kind, 1, "method frame");
            let got = (
                u16::from_be_bytes([p[0], p[1]]),
                u16::from_be_bytes([p[2], p[3]]),
            );
            assert_eq!(got, (class, id), "expected method {class}.{id}");
            p[4..].to_vec()
        }

        /// Connects as guest/guest to `/`, opens channel 1 in confirm mode.
        pub async fn connect(addr: &str) -> Raw {
            let mut r = Raw(TcpStream::connect(addr).await.unwrap());
            r.0.write_all(b"AMQP\x00\x00\x09\x01").await.unwrap();
            r.expect_method(10, 10).await;
            let mut a = vec![0, 0, 0, 0]; // client properties: empty table
            shortstr(&mut a, b"PLAIN");
            let resp = b"\0guest\0guest";
            a.extend_from_slice(&(resp.len() as u32).to_be_bytes());
            a.extend_from_slice(resp);
            shortstr(&mut a, b"en_US");
            r.send(1, 0, &method(10, 11, &a)).await;
            let tune = r.expect_method(10, 30).await;
            let mut t = tune[..6].to_vec();
            t.extend_from_slice(&[0, 0]); // no heartbeats
            r.send(1, 0, &method(10, 31, &t)).await;
            let mut o = Vec::new();
            shortstr(&mut o, b"/");
            shortstr(&mut o, b"");
            o.push(0);
            r.send(1, 0, &method(10, 40, &o)).await;
            r.expect_method(10, 41).await;
            r.send(1, 1, &method(20, 10, &[0])).await;
            r.expect_method(20, 11).await;
            r.send(1, 1, &method(85, 10, &[0])).await;
            r.expect_method(85, 11).await;
            r
        }

        /// Publishes a persistent message whose `message_id` is raw bytes; waits for the confirm.
        pub async fn publish(&mut self, exchange: &str, key: &str, message_id: &[u8], body: &[u8]) {
            let mut a = vec![0, 0];
            shortstr(&mut a, exchange.as_bytes());
            shortstr(&mut a, key.as_bytes());
            a.push(1); // mandatory
            self.send(1, 1, &method(60, 40, &a)).await;
            let mut h = Vec::new();
            h.extend_from_slice(&60u16.to_be_bytes());
            h.extend_from_slice(&0u16.to_be_bytes());
            h.extend_from_slice(&(body.len() as u64).to_be_bytes());
            h.extend_from_slice(&0x1080u16.to_be_bytes()); // delivery-mode, message-id
            h.push(2);
            shortstr(&mut h, message_id);
            self.send(2, 1, &h).await;
            self.send(3, 1, body).await;
            self.expect_method(60, 80).await; // basic.ack
        }

        /// `basic.get` with auto-ack: the raw content-header payload (properties) of one message.
        pub async fn get(&mut self, queue: &str) -> Option<Vec<u8>> {
            let mut a = vec![0, 0];
            shortstr(&mut a, queue.as_bytes());
            a.push(1); // no-ack
            self.send(1, 1, &method(60, 70, &a)).await;
            let (_, p) = self.recv().await;
            match u16::from_be_bytes([p[2], p[3]]) {
                72 => None, // get-empty
                71 => {
                    let (kind, header) = self.recv().await;
                    assert_eq!(kind, 2);
                    let size = u64::from_be_bytes(header[4..12].try_into().unwrap());
                    let mut read = 0u64;
                    while read < size {
                        let (_, b) = self.recv().await;
                        read += b.len() as u64;
                    }
                    Some(header)
                }
                m => panic!("unexpected basic method {m}"),
            }
        }
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[actix_rt::test]
async fn malformed_oversized_and_unparseable_messages_reach_the_dlq_and_neighbours_are_processed() {
    let prefix = unique("poison");
    let mut cfg = chain_config(&prefix, &["forward"], 1);
    cfg.stages[0].payload = Payload::Json;
    cfg.stages[0].dedup = DedupMode::Memory;
    cfg.queues[0].delivery_limit = Some(3);
    cfg.limits.max_message_bytes = 1024;
    let ex = format!("{prefix}.ex");
    let handle = Engine::builder()
        .config(cfg.clone())
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    assert!(handle.wait_ready(Duration::from_secs(20)).await);
    let client = Client::connect(AMQP_URL).await;
    let mut raw = raw::Raw::connect("127.0.0.1:5672").await;

    client.publish(&ex, "in", "good-1", br#"{"n":1}"#).await;
    client.publish(&ex, "in", "malformed", b"{not json").await;
    let big = format!(r#"{{"pad":"{}"}}"#, "x".repeat(2000));
    client.publish(&ex, "in", "oversized", big.as_bytes()).await;
    client.publish(&ex, "in", "good-2", br#"{"n":2}"#).await;
    raw.publish(&ex, "in", b"bad-\xff\xfe-id", br#"{"n":0}"#)
        .await;
    for i in 3..=6 {
        client
            .publish(
                &ex,
                "in",
                &format!("good-{i}"),
                format!(r#"{{"n":{i}}}"#).as_bytes(),
            )
            .await;
    }

    // The non-UTF-8 id no longer kills the connection (the vendored parser
    // decodes it lossily, see tests/vendor_guard.rs): it is forwarded, or
    // dead-lettered by the stage, exactly once.
    let lossy_id = "bad-\u{fffd}\u{fffd}-id";
    let sink_q = format!("{prefix}.sink");
    let dlq = format!("{prefix}.s1.dlq");
    assert!(
        eventually(Duration::from_secs(60), || async {
            client.depth(&sink_q).await + client.depth(&dlq).await == 9
        })
        .await,
        "nine messages settled (sink {}, dlq {})",
        client.depth(&sink_q).await,
        client.depth(&dlq).await
    );
    let n = client.depth(&sink_q).await as usize;
    let sink = client.collect(&sink_q, n, Duration::from_secs(60)).await;
    let c = counts(sink.into_iter().map(|(id, _)| id));
    for i in 1..=6 {
        assert_eq!(
            c.get(&format!("good-{i}")),
            Some(&1),
            "good-{i} processed once: {c:?}"
        );
    }
    let mut reasons = Vec::new();
    while let Some(props) = raw.get(&dlq).await {
        if contains(&props, lossy_id.as_bytes()) && contains(&props, b"x-flowgate-reason") {
            reasons.push("lossy-id");
        } else if contains(&props, b"malformed") && contains(&props, b"x-flowgate-reason") {
            reasons.push("malformed");
        } else if contains(&props, b"oversized") && contains(&props, b"x-flowgate-reason") {
            reasons.push("oversized");
        } else {
            panic!(
                "unexpected dead letter: {}",
                String::from_utf8_lossy(&props)
            );
        }
    }
    reasons.sort();
    let lossy_dead = reasons.iter().filter(|r| **r == "lossy-id").count();
    assert_eq!(
        c.get(lossy_id).copied().unwrap_or(0) + lossy_dead,
        1,
        "the non-UTF-8 id once: sink {c:?}, dlq {reasons:?}"
    );
    reasons.retain(|r| *r != "lossy-id");
    assert_eq!(reasons, ["malformed", "oversized"]);
    let m = handle.metrics();
    assert_eq!(
        m.counter(flowgate::Metrics::DEAD_LETTERED, &["s1", "malformed"]),
        1
    );
    assert_eq!(
        m.counter(flowgate::Metrics::DEAD_LETTERED, &["s1", "oversized"]),
        1
    );
    // No message costs the connection.
    let reconnects = m.counter(flowgate::Metrics::RECONNECTS, &["consume"])
        + m.counter(flowgate::Metrics::RESTARTS, &["connection", ""]);
    assert_eq!(reconnects, 0, "no reconnect");
    handle.shutdown().await;
    assert_eq!(client.depth(&format!("{prefix}.s1")).await, 0);
    client.delete_topology(&cfg).await;
}
