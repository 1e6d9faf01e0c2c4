//! Hostile and careless HTTP clients (issue 9, acceptance 4): the ingress
//! answers 4xx at once — 400 naming an over-long or invalid header or path
//! segment, 404 for a route no declared queue is bound to (never reaching
//! the publisher nor its breaker), 413 before reading an over-long body,
//! 408 for a body that does not come — and stays bounded: idle connections
//! do not stop a normal request, concurrent requests beyond the bound get
//! 503 at once.

mod ingress_support;

use flowgate::config::IngressConfig;
use flowgate::{Engine, EngineHandle};
use flowgate_testkit::*;
use ingress_support::*;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A bound on waiting for an answer that must come at once: a hang fails
/// the test instead of stalling the suite.
const ANSWER_GUARD: Duration = Duration::from_secs(10);

async fn start(cfg: &flowgate::Config) -> EngineHandle {
    Engine::builder()
        .config(cfg.clone())
        .build()
        .expect("valid config")
        .start()
        .await
        .expect("engine starts")
}

#[actix_rt::test]
async fn over_long_and_invalid_headers_and_segments_are_400_naming_them() {
    let prefix = unique("ing-400");
    let cfg = with_open_ingress(chain_config(&prefix, &[], 10), &prefix);
    let _cleanup = Cleanup::new(AMQP_URL, &cfg);
    let h = start(&cfg).await;
    let addr = h.ingress_addr().expect("ingress listener");
    let ex = format!("{prefix}.ex");
    let long = "x".repeat(300);

    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);
    let cases: [Case; 5] = [
        ("in", &[("x-message-id", &long)], "x-message-id"),
        ("in", &[("content-type", &long)], "content-type"),
        ("in", &[("idempotency-key", &long)], "idempotency-key"),
        ("in", &[("x-message-id", "")], "x-message-id"),
        (&long, &[], "routing key path segment"),
    ];
    for (key, headers, named) in cases {
        let a = tokio::time::timeout(ANSWER_GUARD, post(addr, &ex, key, headers))
            .await
            .expect("answered at once");
        assert_eq!(a.status, 400, "{named}: {a:?}");
        let error = a.json()["error"].as_str().unwrap_or_default().to_owned();
        assert!(error.contains(named), "names {named}: {error}");
    }
    // A non-ASCII (raw UTF-8) message id is refused too, not replaced.
    let raw = format!(
        "POST /publish/{ex}/in HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
         Content-Length: 1\r\nx-message-id: caf\u{e9}\r\n\r\nx"
    );
    let a = raw_exchange(addr, raw.as_bytes()).await;
    assert_eq!(a.status, 400, "{a:?}");
    // Far more headers than the server takes: refused, not buffered.
    let mut many = format!("POST /publish/{ex}/in HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n");
    for i in 0..200 {
        many.push_str(&format!("x-h{i}: v\r\n"));
    }
    many.push_str("\r\nx");
    let a = raw_exchange(addr, many.as_bytes()).await;
    assert!((400..500).contains(&a.status), "{a:?}");

    // Only the one good request below publishes anything.
    let a = post(addr, &ex, "in", &[("x-message-id", "good")]).await;
    assert_eq!(a.status, 202, "{a:?}");
    let client = Client::connect(AMQP_URL).await;
    let got = client
        .collect(&format!("{prefix}.sink"), 2, Duration::from_secs(2))
        .await;
    let ids: Vec<_> = got.into_iter().map(|(id, _)| id).collect();
    assert_eq!(ids, ["good"]);
    h.shutdown().await;
}

/// Writes `bytes` on a fresh connection and reads the answer (bounded).
async fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> Answer {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(bytes).await.expect("write");
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(ANSWER_GUARD, s.read_to_end(&mut buf))
        .await
        .expect("answered at once");
    parse(&buf)
}

#[actix_rt::test]
async fn an_unbound_route_is_404_and_never_reaches_the_breaker() {
    let prefix = unique("ing-404");
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = with_open_ingress(chain_config(&prefix, &["forward"], 10), &prefix);
    cfg.spool.path = Some(dir.path().join("spool.redb"));
    let _cleanup = Cleanup::new(AMQP_URL, &cfg);
    let h = start(&cfg).await;
    assert!(h.wait_ready(Duration::from_secs(10)).await, "ready");
    let addr = h.ingress_addr().expect("ingress listener");
    let ex = format!("{prefix}.ex");
    let m = h.metrics().clone();

    // A pipeline runs through the stage while unbound POSTs arrive.
    const N: usize = 1000;
    let client = Client::connect(AMQP_URL).await;
    let ids: Vec<String> = (0..N).map(|i| format!("p{i}")).collect();
    let (ex2, ids2) = (ex.clone(), ids.clone());
    let producer = actix_rt::spawn(async move {
        let c = Client::connect(AMQP_URL).await;
        c.publish_many(&ex2, "in", &ids2, b"x").await;
    });
    for i in 0..30 {
        let a = post(addr, &ex, "nowhere", &[("x-message-id", &format!("u{i}"))]).await;
        assert_eq!(a.status, 404, "{a:?}");
        assert!(a.header("retry-after").is_none(), "a 404 is final: {a:?}");
    }
    producer.await.unwrap();
    let got = client
        .collect_distinct(&format!("{prefix}.sink"), N, Duration::from_secs(30))
        .await;
    assert_eq!(got.len(), N, "the pipeline delivered everything");

    assert_eq!(
        m.gauge(flowgate::Metrics::BREAKER_STATE, &["closed"]),
        1,
        "breaker closed"
    );
    assert_eq!(
        m.counter(flowgate::Metrics::BREAKER_TRANSITIONS, &["open"]),
        0,
        "the breaker never opened"
    );
    assert_eq!(
        m.counter(flowgate::Metrics::PUBLISH, &["returned"]),
        0,
        "nothing was published unroutable"
    );
    assert_eq!(
        m.counter(flowgate::Metrics::PUBLISH, &["spooled"]),
        0,
        "the pipeline never spooled"
    );
    h.shutdown().await;
}

#[actix_rt::test]
async fn a_50_mb_body_is_413_without_being_read() {
    let prefix = unique("ing-413");
    let mut cfg = with_open_ingress(chain_config(&prefix, &[], 10), &prefix);
    cfg.ingress.body_timeout = Duration::from_secs(30);
    let _cleanup = Cleanup::new(AMQP_URL, &cfg);
    let h = start(&cfg).await;
    let addr = h.ingress_addr().expect("ingress listener");
    let path = format!("/publish/{prefix}.ex/in");
    const FIFTY_MB: usize = 50 << 20;

    // Declared: answered from the Content-Length, after 64 KiB of the body.
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!("POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {FIFTY_MB}\r\n\r\n");
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(&vec![b'x'; 64 << 10]).await.unwrap();
    let a = read_answer(&mut s).await;
    assert_eq!(a.status, 413, "{a:?}");
    assert_eq!(a.json()["max_bytes"], cfg.limits.max_message_bytes, "{a:?}");

    // Chunked: the stream is cut at the limit; the client cannot push 50 MB.
    let (a, sent) = push_chunked(addr, &path, FIFTY_MB).await;
    assert_eq!(a.status, 413, "{a:?}");
    // What the client got in is the server's read (a bit over the limit)
    // plus the socket buffers: never the whole body.
    assert!(
        sent < FIFTY_MB,
        "the server stopped reading at the limit; the client pushed {sent} bytes"
    );
    println!("chunked: the client got {sent} bytes in before the 413");
    h.shutdown().await;
}

/// POSTs a chunked body of up to `total` bytes to `path` in 64 KiB chunks
/// for as long as the server reads it, on a fresh connection; the answer
/// and how many bytes the client got in.
async fn push_chunked(addr: SocketAddr, path: &str, total: usize) -> (Answer, usize) {
    let s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut rd, mut wr) = s.into_split();
    let reader = actix_rt::spawn(async move {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            match rd.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    if buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
            }
        }
        parse(&buf)
    });
    let head = format!("POST {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n");
    wr.write_all(head.as_bytes()).await.unwrap();
    let chunk = format!("{:x}\r\n{}\r\n", 64 << 10, "y".repeat(64 << 10));
    let mut sent = 0usize;
    while sent < total && !reader.is_finished() {
        // A write the server no longer reads stalls once the socket
        // buffers are full: bounded by the guard, it ends the loop.
        match tokio::time::timeout(Duration::from_secs(2), wr.write_all(chunk.as_bytes())).await {
            Ok(Ok(())) => sent += 64 << 10,
            _ => break,
        }
    }
    let a = tokio::time::timeout(ANSWER_GUARD, reader)
        .await
        .expect("answered")
        .unwrap();
    (a, sent)
}

/// Reads one response head (and whatever body came with it), bounded.
async fn read_answer(s: &mut tokio::net::TcpStream) -> Answer {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let read = async {
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            let text = String::from_utf8_lossy(&buf);
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let len = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                    })
                    .unwrap_or(0);
                if body.len() >= len {
                    break;
                }
            }
        }
    };
    tokio::time::timeout(ANSWER_GUARD, read)
        .await
        .expect("answered at once");
    parse(&buf)
}

#[actix_rt::test]
async fn a_slow_body_is_408_and_requests_beyond_the_bound_are_503() {
    let prefix = unique("ing-slow");
    let mut cfg = with_open_ingress(chain_config(&prefix, &[], 10), &prefix);
    cfg.ingress.body_timeout = Duration::from_millis(500);
    cfg.ingress.max_concurrent = 1;
    let _cleanup = Cleanup::new(AMQP_URL, &cfg);
    let h = start(&cfg).await;
    let addr = h.ingress_addr().expect("ingress listener");
    let ex = format!("{prefix}.ex");

    // A client that announces 100 bytes and sends 10 holds the one slot...
    let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!("POST /publish/{ex}/in HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n");
    slow.write_all(head.as_bytes()).await.unwrap();
    slow.write_all(&[b'z'; 10]).await.unwrap();
    // ...so another request is refused at once while it lasts,
    let mut busy = None;
    for _ in 0..50 {
        let a = post(addr, &ex, "in", &[]).await;
        if a.status == 503 {
            busy = Some(a);
            break;
        }
    }
    let busy = busy.expect("a request beyond max_concurrent is refused");
    assert!(busy.header("retry-after").is_some(), "{busy:?}");
    // ...and the slow one gets 408 when its body_timeout passes.
    let a = read_answer(&mut slow).await;
    assert_eq!(a.status, 408, "{a:?}");
    // The slot is free again.
    let a = post(addr, &ex, "in", &[]).await;
    assert_eq!(a.status, 202, "{a:?}");
    h.shutdown().await;
}

/// Idle connections each may cost the daemon this much memory (measured:
/// about 12 KiB each).
const IDLE_CONNECTION_KIB: u64 = 64;
/// Clients pushing a 50 MB chunked body at once, and how many rounds of them.
const HOSTILE: usize = 8;
const HOSTILE_ROUNDS: usize = 25;

/// The daemon under 2,000 idle connections and then 200 hostile 50 MB
/// bodies: a normal request is still answered at once, and its memory
/// stays bounded against what it used before the load (peak RSS, measured
/// in the same run): idle connections by a per-connection allowance, the
/// hostile bodies by what the requests in progress may hold at once — each
/// is cut at `[limits] max_message_bytes`, so what they cost comes back,
/// however many come.
#[actix_rt::test]
async fn idle_connections_and_hostile_bodies_neither_stop_a_request_nor_grow_memory() {
    let prefix = unique("ing-idle");
    let dir = tempfile::tempdir().unwrap();
    let port = flowgate_testkit::node::free_port().expect("port");
    let mut cfg = chain_config(&prefix, &[], 10);
    cfg.ingress = IngressConfig::open(
        format!("127.0.0.1:{port}"),
        vec![any_key(&format!("{prefix}.ex"))],
    );
    let _cleanup = Cleanup::new(AMQP_URL, &cfg);
    let config = dir.path().join("flowgate.toml");
    std::fs::write(&config, daemon_toml(&cfg, port)).unwrap();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_flowgate"))
        .args(["run", "--config"])
        .arg(&config)
        .env("RUST_LOG", "warn")
        .spawn()
        .expect("daemon starts");
    let pid = child.id();
    let _daemon = ChildGuard(child);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let ex = format!("{prefix}.ex");
    assert!(
        eventually(Duration::from_secs(30), || async {
            post(addr, &ex, "in", &[]).await.status == 202
        })
        .await,
        "daemon answers"
    );
    let started_rss = peak_rss_kib(pid).expect("the daemon's peak RSS");

    let mut idle = Vec::with_capacity(2000);
    for _ in 0..2000 {
        idle.push(tokio::net::TcpStream::connect(addr).await.expect("connect"));
    }
    // The promised bound of the feature: answered within 2 s.
    let a = tokio::time::timeout(
        Duration::from_secs(2),
        post(addr, &ex, "in", &[("x-message-id", "through")]),
    )
    .await
    .expect("a normal request is answered within 2 s beside 2000 idle connections");
    assert_eq!(a.status, 202, "{a:?}");
    let idle_rss = peak_rss_kib(pid).expect("the daemon's peak RSS");
    let idle_bound = started_rss + idle.len() as u64 * IDLE_CONNECTION_KIB;
    assert!(
        idle_rss <= idle_bound,
        "peak RSS {idle_rss} KiB with {} idle connections, past {idle_bound} KiB \
         ({started_rss} KiB before them + {IDLE_CONNECTION_KIB} KiB each)",
        idle.len()
    );

    // Hostile bodies, the idle connections still open. Each request in
    // progress holds at most `max_message_bytes` of body (x2 for the
    // buffer's growth, x2 again for the chunk being read and allocator
    // slack), plus 16 MiB for everything else.
    let max_kib = cfg.limits.max_message_bytes / 1024;
    let hostile_bound = idle_rss + HOSTILE as u64 * 4 * max_kib + (16 << 10);
    let path = format!("/publish/{ex}/in");
    let mut pushed = 0;
    for round in 0..HOSTILE_ROUNDS {
        let answers =
            futures::future::join_all((0..HOSTILE).map(|_| push_chunked(addr, &path, 50 << 20)))
                .await;
        pushed += answers.iter().map(|(_, sent)| sent).sum::<usize>();
        let peak = peak_rss_kib(pid).expect("the daemon's peak RSS");
        assert!(
            peak <= hostile_bound,
            "after {} hostile bodies ({} MiB pushed in) the daemon's peak RSS is {peak} KiB, \
             past {hostile_bound} KiB ({idle_rss} KiB before them + {HOSTILE} in progress x \
             4 x {max_kib} KiB + 16 MiB)",
            (round + 1) * HOSTILE,
            pushed >> 20
        );
        for (a, _) in answers {
            assert_eq!(a.status, 413, "round {round}: {a:?}");
        }
    }
    let a = post(addr, &ex, "in", &[("x-message-id", "after")]).await;
    assert_eq!(a.status, 202, "{a:?}");
    println!(
        "daemon peak RSS: {started_rss} KiB at start, {idle_rss} KiB with {} idle connections, \
         {} KiB after {} hostile bodies ({} MiB pushed in)",
        idle.len(),
        peak_rss_kib(pid).unwrap_or(0),
        HOSTILE * HOSTILE_ROUNDS,
        pushed >> 20
    );
    drop(idle);
}

/// The TOML of `cfg`'s topology for a daemon whose ingress is on `port`.
fn daemon_toml(cfg: &flowgate::Config, port: u16) -> String {
    let prefix = &cfg.amqp.connection_name;
    format!(
        r##"
[http]
bind = ""
[amqp]
connection_name = "{prefix}"
[ingress]
bind = "127.0.0.1:{port}"
auth = "none"
routes = [{{ exchange = "{prefix}.ex", routing_key = "#" }}]
[[exchanges]]
name = "{prefix}.ex"
[[queues]]
name = "{prefix}.sink"
bindings = [{{ exchange = "{prefix}.ex", routing_key = "in" }}]
"##
    )
}
