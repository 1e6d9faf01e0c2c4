//! What the `ingress_*` tests share: a raw HTTP/1.1 client (so a test can
//! send what no well-behaved client would), and an engine config with an
//! ingress listener.
#![allow(dead_code)]

use flowgate::config::{Config, IngressConfig, IngressRoute};
use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The answer to one raw request.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    /// The head (status line and headers), as text.
    pub head: String,
    pub body: String,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or(serde_json::Value::Null)
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    }
}

/// Splits a raw response into status, head and body.
pub fn parse(buf: &[u8]) -> Answer {
    let text = String::from_utf8_lossy(buf).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Answer {
        status,
        head: head.to_owned(),
        body: body.to_owned(),
    }
}

/// One request on a fresh connection (`Connection: close`), read to the
/// end; status 0 when nothing listens.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Answer {
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        return parse(b"");
    };
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    if s.write_all(req.as_bytes()).await.is_err() || s.write_all(body).await.is_err() {
        return parse(b"");
    }
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf).await;
    parse(&buf)
}

/// `POST /publish/{exchange}/{key}` with `headers` and a small body.
pub async fn post(addr: SocketAddr, exchange: &str, key: &str, headers: &[(&str, &str)]) -> Answer {
    request(
        addr,
        "POST",
        &format!("/publish/{exchange}/{key}"),
        headers,
        b"hello",
    )
    .await
}

/// Reads a sample from a Prometheus text page (`name` with its labels).
pub fn metric(page: &str, name: &str) -> Option<f64> {
    page.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (k, v) = l.rsplit_once(' ')?;
        (k == name).then(|| v.parse().ok())?
    })
}

/// A route allowing every key of `exchange`.
pub fn any_key(exchange: &str) -> IngressRoute {
    IngressRoute {
        exchange: exchange.to_owned(),
        routing_key: "#".into(),
    }
}

/// `cfg` with an open ingress on a free port publishing anywhere on
/// `prefix.ex`.
pub fn with_open_ingress(mut cfg: Config, prefix: &str) -> Config {
    cfg.ingress = IngressConfig::open("127.0.0.1:0", vec![any_key(&format!("{prefix}.ex"))]);
    cfg
}

/// Peak resident set size of process `pid` in KiB (`VmHWM`).
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| {
        l.strip_prefix("VmHWM:")?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()
    })
}
