//! The `http` handler against the real broker and the Python service of
//! `examples/python-worker` (started by each test on a port of its own):
//! `forward → http(python) → sink`.

use flowgate::config::{HttpStageConfig, RetryConfig};
use flowgate::envelope;
use flowgate::envelope::header_int;
use flowgate::{Config, Engine, EngineHandle};
use flowgate_testkit::*;
use serde_json::{json, Value};
use std::io::BufRead;
use std::process::{Command, Stdio};
use std::time::Duration;

/// An order as the worker expects it.
const ORDER: &[u8] = br#"{"order_id":"o","items":[{"sku":"a","qty":2,"price":1.25}]}"#;

/// The Python worker, killed when dropped.
struct Worker {
    _child: ChildGuard,
    base: String,
    http: reqwest::Client,
}

impl Worker {
    /// Starts `worker.py --port 0` with `env` and waits for its "listening
    /// on" line (the port it bound).
    async fn start(env: &[(&str, &str)]) -> Worker {
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/examples/python-worker/worker.py"
        );
        let mut cmd = Command::new("python3");
        cmd.arg(script)
            .args(["--port", "0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .spawn()
            .expect("python3 runs examples/python-worker/worker.py (is python3 installed?)");
        let stdout = child.stdout.take().expect("piped stdout");
        let guard = ChildGuard(child);
        let line = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            std::io::BufReader::new(stdout)
                .read_line(&mut line)
                .map(|_| line)
        })
        .await
        .expect("reader")
        .expect("worker's first line");
        let base = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line from the worker: {line:?}"))
            .to_owned();
        Worker {
            _child: guard,
            base,
            http: reqwest::Client::new(),
        }
    }

    fn url(&self) -> String {
        format!("{}/handle", self.base)
    }

    async fn admin(&self, cfg: Value) {
        let r = self
            .http
            .post(format!("{}/admin", self.base))
            .body(cfg.to_string())
            .send()
            .await
            .expect("admin request");
        assert!(r.status().is_success(), "admin: {}", r.status());
    }

    async fn stats(&self) -> Value {
        let r = self
            .http
            .get(format!("{}/admin/stats", self.base))
            .send()
            .await
            .expect("stats request");
        serde_json::from_str(&r.text().await.expect("stats body")).expect("stats JSON")
    }

    async fn status_count(&self, status: &str) -> u64 {
        self.stats().await["statuses"][status].as_u64().unwrap_or(0)
    }
}

/// `prefix.s1` (forward) → `prefix.s2` (http to `worker`) → `prefix.sink`.
fn pipeline(prefix: &str, worker: &Worker, prefetch: u32) -> Config {
    let mut cfg = chain_config(prefix, &["forward", "http"], prefetch);
    cfg.stages[1].http = Some(HttpStageConfig {
        timeout: Duration::from_secs(10),
        ..HttpStageConfig::new(worker.url())
    });
    cfg
}

async fn start(cfg: &Config) -> EngineHandle {
    let handle = Engine::builder()
        .config(cfg.clone())
        .build()
        .expect("engine builds")
        .start()
        .await
        .expect("engine starts");
    assert!(
        handle.wait_ready(Duration::from_secs(20)).await,
        "engine ready"
    );
    handle
}

fn ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

/// `(ready, unacked, consumers)` of a queue, from `rabbitmqctl`.
async fn list_queue(queue: &str) -> (u64, u64, u64) {
    let q = queue.to_owned();
    tokio::task::spawn_blocking(move || node::list_queue(None, &q))
        .await
        .expect("list_queues task")
        .expect("list_queues")
}

#[actix_rt::test]
async fn five_thousand_orders_pass_through_the_python_service_exactly_once() {
    let worker = Worker::start(&[]).await;
    let prefix = unique("http-5k");
    let mut cfg = pipeline(&prefix, &worker, 50);
    // Fewer requests in flight than the stage has handler tasks (8).
    let max_concurrency = 4;
    cfg.stages[1].http.as_mut().unwrap().max_concurrency = max_concurrency;
    let _cleanup = Cleanup::new(AMQP_URL, &cfg);
    let handle = start(&cfg).await;
    let client = Client::connect(AMQP_URL).await;
    let sent = ids("o", 5_000);
    let started = std::time::Instant::now();
    client
        .publish_many(&format!("{prefix}.ex"), "in", &sent, ORDER)
        .await;
    let got = client
        .collect(
            &format!("{prefix}.sink"),
            sent.len(),
            Duration::from_secs(240),
        )
        .await;
    // Reported, not asserted (performance belongs in benches).
    eprintln!(
        "5,000 orders through the Python service in {:?}",
        started.elapsed()
    );
    // Every message at the sink is the service's output, not the input.
    let not_priced: Vec<_> = got
        .iter()
        .filter(|(_, h)| header(h, "x-priced-by").as_deref() != Some("python-worker"))
        .map(|(id, _)| id.clone())
        .take(5)
        .collect();
    assert!(
        not_priced.is_empty(),
        "outputs not from the service: {not_priced:?}"
    );
    let c = counts(got.into_iter().map(|(id, _)| id));
    assert_eq!(c.len(), sent.len(), "every id reached the sink");
    assert!(c.values().all(|n| *n == 1), "no id arrived twice");
    handle.shutdown().await;
    for q in &cfg.queues {
        assert_eq!(client.depth(&q.name).await, 0, "queue {} empty", q.name);
        assert_eq!(
            client.depth(&format!("{}.dlq", q.name)).await,
            0,
            "dlq of {} empty",
            q.name
        );
    }
    assert_eq!(
        handle.metrics().counter(flowgate::Metrics::ACKED, &["s2"]),
        5_000
    );
    let stats = worker.stats().await;
    assert!(stats["handled"].as_u64().unwrap() >= 5_000);
    let most = stats["max_in_flight"].as_u64().unwrap();
    assert!(
        (1..=u64::from(max_concurrency)).contains(&most),
        "at most {max_concurrency} requests in flight, the service saw {most}"
    );
}

/// `http.max_concurrency` bounds the requests in flight below the stage's
/// handler tasks. The service holds each request until one more than the
/// bound is in flight at once, or for a second: the stage, with twice as
/// many handler tasks and a full prefetch window, fills the bound (so the
/// overlap is forced, not left to chance) and a fifth request, if one were
/// sent, would be seen at once.
#[actix_rt::test]
async fn the_service_sees_exactly_max_concurrency_requests_at_once() {
    let max_concurrency = 4u32;
    let over = (max_concurrency + 1).to_string();
    // Each held request waits out its second (the observation window for a
    // request beyond the bound, which must not come): 24 messages take
    // about 24 / 4 seconds.
    let worker = Worker::start(&[
        ("WORKER_HOLD_IN_FLIGHT", over.as_str()),
        ("WORKER_HOLD_SECONDS", "1"),
    ])
    .await;
    let prefix = unique("http-bound");
    let mut cfg = pipeline(&prefix, &worker, 50);
    cfg.stages[1].concurrency = flowgate::config::Concurrency::Fixed(2 * max_concurrency);
    cfg.stages[1].http.as_mut().unwrap().max_concurrency = max_concurrency;
    let _cleanup = Cleanup::new(AMQP_URL, &cfg);
    let handle = start(&cfg).await;
    let client = Client::connect(AMQP_URL).await;
    let sent = ids("held", 24);
    client
        .publish_many(&format!("{prefix}.ex"), "in", &sent, ORDER)
        .await;
    let got = client
        .collect_all(
            &format!("{prefix}.sink"),
            sent.len(),
            Duration::from_secs(60),
        )
        .await;
    assert_eq!(got.len(), sent.len(), "every id reached the sink");
    assert!(got.values().all(|n| *n == 1), "each once: {got:?}");
    let stats = worker.stats().await;
    assert_eq!(stats["handled"].as_u64(), Some(sent.len() as u64));
    assert_eq!(
        stats["max_in_flight"].as_u64(),
        Some(u64::from(max_concurrency)),
        "the most requests the service saw at once: the stage keeps exactly \
         max_concurrency = {max_concurrency} in flight against a service that holds them"
    );
    handle.shutdown().await;
}

#[actix_rt::test]
async fn a_service_answering_503_makes_the_stage_hold_its_credit_then_recover() {
    let worker = Worker::start(&[("WORKER_UNAVAILABLE", "1"), ("WORKER_RETRY_AFTER", "0.2")]).await;
    let prefix = unique("http-503");
    let prefetch = 10u64;
    let cfg = pipeline(&prefix, &worker, prefetch as u32);
    let _cleanup = Cleanup::new(AMQP_URL, &cfg);
    let handle = start(&cfg).await;
    let client = Client::connect(AMQP_URL).await;
    let sent = ids("busy", 200);
    client
        .publish_many(&format!("{prefix}.ex"), "in", &sent, ORDER)
        .await;
    let s2 = format!("{prefix}.s2");
    let total = sent.len() as u64;
    // The http stage holds exactly its prefetch while the rest waits in the broker.
    let held = eventually(Duration::from_secs(60), || async {
        list_queue(&s2).await == (total - prefetch, prefetch, 1)
    })
    .await;
    assert!(
        held,
        "s2 should hold {prefetch} unacked with {} ready: {:?}",
        total - prefetch,
        list_queue(&s2).await
    );
    // ...and keeps holding through more slow-down answers.
    let answered = worker.status_count("503").await;
    assert!(answered > 0, "the service was asked and answered 503");
    assert!(
        eventually(Duration::from_secs(30), || async {
            worker.status_count("503").await >= answered + 2 * prefetch
        })
        .await,
        "the stage keeps trying"
    );
    assert_eq!(list_queue(&s2).await, (total - prefetch, prefetch, 1));
    assert_eq!(worker.stats().await["handled"], 0);
    assert_eq!(
        client.depth(&format!("{s2}.dlq")).await,
        0,
        "nothing dead-lettered"
    );

    worker.admin(json!({ "unavailable": false })).await;
    let got = client
        .collect(
            &format!("{prefix}.sink"),
            sent.len(),
            Duration::from_secs(60),
        )
        .await;
    let c = counts(got.into_iter().map(|(id, _)| id));
    assert_eq!(
        c.len(),
        sent.len(),
        "every id reached the sink after recovery"
    );
    assert!(c.values().all(|n| *n == 1), "no id arrived twice");
    handle.shutdown().await;
    assert_eq!(client.depth(&s2).await, 0);
    assert_eq!(client.depth(&format!("{s2}.dlq")).await, 0);
}

#[actix_rt::test]
async fn rejections_dead_letter_with_the_status_and_timeouts_retry_through_the_ladder() {
    let worker = Worker::start(&[
        ("WORKER_REJECT_IDS", "r-0,r-1,r-2,r-3,r-4"),
        ("WORKER_SLOW_IDS", "t-0,t-1"),
        ("WORKER_SLOW_SECONDS", "2"),
        ("WORKER_BAD_OUTPUT_IDS", "b-0"),
        ("WORKER_MALFORMED_IDS", "m-0"),
    ])
    .await;
    let prefix = unique("http-fail");
    let mut cfg = pipeline(&prefix, &worker, 20);
    cfg.stages[1].http.as_mut().unwrap().timeout = Duration::from_millis(300);
    cfg.stages[1].retry = Some(RetryConfig {
        max_attempts: 3,
        backoff: vec![Duration::from_millis(100).into()],
    });
    // Taken after the ladder is set, so its tier queue is deleted too.
    let _cleanup = Cleanup::new(AMQP_URL, &cfg);
    let handle = start(&cfg).await;
    let client = Client::connect(AMQP_URL).await;
    let good = ids("ok", 50);
    let bad: Vec<String> = [
        "r-0", "r-1", "r-2", "r-3", "r-4", "t-0", "t-1", "b-0", "m-0",
    ]
    .map(String::from)
    .to_vec();
    let all: Vec<String> = good.iter().chain(&bad).cloned().collect();
    client
        .publish_many(&format!("{prefix}.ex"), "in", &all, ORDER)
        .await;

    let got = client
        .collect(
            &format!("{prefix}.sink"),
            good.len(),
            Duration::from_secs(60),
        )
        .await;
    let c = counts(got.into_iter().map(|(id, _)| id));
    assert_eq!(c.len(), good.len(), "every good id reached the sink");
    assert!(good.iter().all(|id| c.get(id) == Some(&1)), "{c:?}");

    let dlq = format!("{prefix}.s2.dlq");
    let dead = client
        .collect(&dlq, bad.len(), Duration::from_secs(60))
        .await;
    assert_eq!(dead.len(), bad.len(), "every failing id dead-lettered once");
    for (id, h) in &dead {
        let reason = header(h, envelope::REASON).unwrap_or_default();
        assert_eq!(header(h, envelope::STAGE).as_deref(), Some("s2"), "{id}");
        match &id[..1] {
            "r" => assert!(reason.starts_with("http 422"), "{id}: reason {reason:?}"),
            "t" => {
                assert_eq!(reason, "max-attempts", "{id}");
                let attempts = h.inner().get(envelope::ATTEMPTS).and_then(header_int);
                assert_eq!(attempts, Some(3), "{id}: three attempts through the ladder");
                let error = header(h, envelope::ERROR).unwrap_or_default();
                assert!(error.contains("timeout"), "{id}: error {error:?}");
            }
            // An output the broker cannot take (300-byte routing key), and
            // an answer that is not an outputs document.
            "b" | "m" => assert_eq!(reason, "invalid-output", "{id}"),
            _ => panic!("unexpected dead letter {id}"),
        }
    }
    let calls = &worker.stats().await["calls"];
    for t in ["t-0", "t-1"] {
        assert_eq!(calls[t], 3, "{t}: one request per attempt");
    }
    handle.shutdown().await;
    for q in &cfg.queues {
        assert_eq!(client.depth(&q.name).await, 0, "queue {} empty", q.name);
    }
    assert_eq!(client.depth(&dlq).await, 0);
    assert_eq!(client.depth(&format!("{prefix}.s1.dlq")).await, 0);
}

/// An `http` stage with `batch`: one request per batch (a JSON document of
/// entries), each entry's fate from the answer's statuses — the accepted
/// ones published and acked, the rejected one alone dead-lettered with the
/// service's reason.
#[actix_rt::test]
async fn a_batching_http_stage_sends_batches_and_each_entry_meets_its_own_fate() {
    let worker = Worker::start(&[]).await;
    let prefix = unique("http-batch");
    let mut cfg = pipeline(&prefix, &worker, 50);
    cfg.stages[1].batch = Some(flowgate::config::BatchConfig {
        size: 25,
        timeout: Duration::from_millis(20),
    });
    let _cleanup = Cleanup::new(AMQP_URL, &cfg);
    let rejected = format!("{prefix}-7");
    worker.admin(json!({ "reject_ids": [rejected] })).await;
    let handle = start(&cfg).await;
    let client = Client::connect(AMQP_URL).await;
    let sent = ids(&prefix, 300);
    client
        .publish_many(&format!("{prefix}.ex"), "in", &sent, ORDER)
        .await;
    let got = client
        .collect_all(
            &format!("{prefix}.sink"),
            sent.len() - 1,
            Duration::from_secs(60),
        )
        .await;
    assert_eq!(
        got.len(),
        sent.len() - 1,
        "every accepted id reached the sink"
    );
    assert!(got.values().all(|n| *n == 1), "each once");
    assert!(
        !got.contains_key(&rejected),
        "the rejected one did not pass"
    );
    let dead = client
        .collect(&format!("{prefix}.s2.dlq"), 1, Duration::from_secs(20))
        .await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].0, rejected);
    let reason = header(&dead[0].1, envelope::REASON).unwrap_or_default();
    assert!(
        reason.contains("unknown customer"),
        "the service's reason: {reason}"
    );
    let stats = worker.stats().await;
    let batches: Vec<u64> = stats["batches"]
        .as_array()
        .expect("batch sizes")
        .iter()
        .filter_map(Value::as_u64)
        .collect();
    assert_eq!(
        batches.iter().sum::<u64>(),
        300,
        "every delivery in one batch: {batches:?}"
    );
    assert!(batches.iter().all(|b| (1..=25).contains(b)), "{batches:?}");
    assert!(
        batches.iter().any(|b| *b > 1),
        "requests carried batches: {batches:?}"
    );
    handle.shutdown().await;
}
