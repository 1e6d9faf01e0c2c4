//! A minimal AMQP 0-9-1 client speaking raw frames, for tests that need
//! what lapin refuses to build or cannot parse: a `message_id` that is not
//! UTF-8, hostile property sets and header tables ([`Props`], [`table`]),
//! and reading such a message back as bytes ([`RawClient::get`]).
//!
//! It logs in as guest/guest to `/`, opens channel 1 in confirm mode and
//! waits for each publish's confirm. Like the rest of the test kit, it
//! panics on anything unexpected.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Appends a short string (length byte, bytes) — any bytes, UTF-8 or not.
pub fn shortstr(out: &mut Vec<u8>, s: &[u8]) {
    out.push(u8::try_from(s.len()).expect("a short string is at most 255 bytes"));
    out.extend_from_slice(s);
}

/// A field table: its length, then `key, type, value` entries (keys may
/// be any bytes).
pub fn table(entries: &[(&[u8], u8, Vec<u8>)]) -> Vec<u8> {
    let mut body = Vec::new();
    for (k, t, v) in entries {
        shortstr(&mut body, k);
        body.push(*t);
        body.extend_from_slice(v);
    }
    let mut out = (body.len() as u32).to_be_bytes().to_vec();
    out.extend(body);
    out
}

/// A long string (`S`) value.
pub fn longstr(s: &[u8]) -> Vec<u8> {
    let mut out = (s.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(s);
    out
}

/// Basic-class properties as raw bytes: the flags word then the present
/// fields, in flag order (content-type 0x8000 … app-id 0x0008).
#[derive(Clone, Debug, Default)]
pub struct Props {
    /// `content_type` (a short string).
    pub content_type: Option<Vec<u8>>,
    /// `headers`, an encoded [`table`].
    pub headers: Option<Vec<u8>>,
    /// `delivery_mode` (2: persistent).
    pub delivery_mode: Option<u8>,
    /// `correlation_id` (a short string).
    pub correlation_id: Option<Vec<u8>>,
    /// `message_id` (a short string).
    pub message_id: Option<Vec<u8>>,
    /// `type` (a short string).
    pub kind: Option<Vec<u8>>,
    /// `app_id` (a short string).
    pub app_id: Option<Vec<u8>>,
}

impl Props {
    /// A persistent message with this `message_id`.
    pub fn persistent_with_id(message_id: &[u8]) -> Props {
        Props {
            delivery_mode: Some(2),
            message_id: Some(message_id.to_vec()),
            ..Props::default()
        }
    }

    /// The properties' wire bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut flags = 0u16;
        let mut f = Vec::new();
        if let Some(v) = &self.content_type {
            flags |= 0x8000;
            shortstr(&mut f, v);
        }
        if let Some(v) = &self.headers {
            flags |= 0x2000;
            f.extend_from_slice(v);
        }
        if let Some(v) = self.delivery_mode {
            flags |= 0x1000;
            f.push(v);
        }
        if let Some(v) = &self.correlation_id {
            flags |= 0x0400;
            shortstr(&mut f, v);
        }
        if let Some(v) = &self.message_id {
            flags |= 0x0080;
            shortstr(&mut f, v);
        }
        if let Some(v) = &self.kind {
            flags |= 0x0020;
            shortstr(&mut f, v);
        }
        if let Some(v) = &self.app_id {
            flags |= 0x0008;
            shortstr(&mut f, v);
        }
        let mut out = flags.to_be_bytes().to_vec();
        out.extend(f);
        out
    }
}

fn method(class: u16, id: u16, args: &[u8]) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&class.to_be_bytes());
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(args);
    p
}

/// A raw AMQP connection with channel 1 in confirm mode.
pub struct RawClient(TcpStream);

impl RawClient {
    /// Connects to `addr` (`127.0.0.1:5672`) as guest/guest, vhost `/`.
    pub async fn connect(addr: &str) -> RawClient {
        let mut r = RawClient(TcpStream::connect(addr).await.expect("connect"));
        r.0.write_all(b"AMQP\x00\x00\x09\x01")
            .await
            .expect("protocol header");
        r.expect_method(10, 10).await;
        let mut a = vec![0, 0, 0, 0]; // client properties: an empty table
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

    async fn send(&mut self, kind: u8, channel: u16, payload: &[u8]) {
        let mut f = vec![kind];
        f.extend_from_slice(&channel.to_be_bytes());
        f.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        f.extend_from_slice(payload);
        f.push(0xCE);
        self.0.write_all(&f).await.expect("frame written");
    }

    /// The next frame that is not a heartbeat: (type, payload).
    async fn recv(&mut self) -> (u8, Vec<u8>) {
        loop {
            let mut h = [0u8; 7];
            self.0.read_exact(&mut h).await.expect("frame header");
            let size = u32::from_be_bytes([h[3], h[4], h[5], h[6]]) as usize;
            let mut p = vec![0u8; size + 1];
            self.0.read_exact(&mut p).await.expect("frame payload");
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
        assert_eq!(
            got,
            (class, id),
            "expected method {class}.{id}: {}",
            String::from_utf8_lossy(&p)
        );
        p[4..].to_vec()
    }

    /// Publishes `body` with raw `props` ([`Props::encode`]), `mandatory`;
    /// waits for the broker's confirm.
    pub async fn publish(&mut self, exchange: &str, key: &str, props: &[u8], body: &[u8]) {
        let mut a = vec![0, 0];
        shortstr(&mut a, exchange.as_bytes());
        shortstr(&mut a, key.as_bytes());
        a.push(1); // mandatory
        self.send(1, 1, &method(60, 40, &a)).await;
        let mut h = Vec::new();
        h.extend_from_slice(&60u16.to_be_bytes());
        h.extend_from_slice(&0u16.to_be_bytes());
        h.extend_from_slice(&(body.len() as u64).to_be_bytes());
        h.extend_from_slice(props);
        self.send(2, 1, &h).await;
        self.send(3, 1, body).await;
        self.expect_method(60, 80).await; // basic.ack
    }

    /// `basic.get` with auto-ack: the raw content-header payload (class,
    /// weight, size, then the properties) of one message, `None` when the
    /// queue is empty.
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
                assert_eq!(kind, 2, "a content header");
                let size = u64::from_be_bytes(header[4..12].try_into().expect("8 bytes"));
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
