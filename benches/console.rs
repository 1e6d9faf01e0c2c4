//! The console on a 10,000-message DLQ (issue 28, acceptance 2): how long
//! its list pages take, cold (the DLQ's index read from scratch: `reread`)
//! and warm (from the index), the daemon's memory while they load, and the
//! queue after (count and order). Needs RabbitMQ on 127.0.0.1:5672.
//!
//! `cargo bench --bench console` (`FLOWGATE_BENCH_DLQ=N` for another size).

#[path = "../tests/console_support/mod.rs"]
mod console_support;

use console_support::*;
use flowgate::envelope;
use flowgate::lapin::options::BasicPublishOptions;
use flowgate::lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use flowgate::lapin::BasicProperties;
use flowgate_testkit::*;
use futures::StreamExt;
use std::time::{Duration, Instant};

fn rss_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn main() {
    let n: usize = std::env::var("FLOWGATE_BENCH_DLQ")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    flowgate::run_system(run(n));
}

async fn run(n: usize) {
    let p = unique("bench-dlq");
    let toml = format!(
        "[amqp]\nurl = \"{AMQP_URL}\"\n[http]\nbind = \"\"\n[[exchanges]]\nname = \"{p}.ex\"\n\
         [[queues]]\nname = \"{p}.in\"\nkind = \"classic\"\n\
         bindings = [{{ exchange = \"{p}.ex\", routing_key = \"in\" }}]\n"
    );
    let cfg = flowgate::Config::from_toml(&toml).unwrap();
    let _cleanup = Cleanup::new(AMQP_URL, &cfg);
    let dir = tempfile::tempdir().unwrap();
    let d = start_daemon(dir.path(), &toml).await;
    let pid = d.child.0.id();
    let dlq = format!("{p}.in.dlq");
    let c = Client::connect(AMQP_URL).await;

    // n dead letters: 1 in 100 `unroutable`, the rest `handler-error`;
    // 256-byte JSON bodies; the last one carries a needle.
    let t = Instant::now();
    let ids: Vec<String> = (0..n).map(|i| format!("dl-{i:06}")).collect();
    let mut pending = futures::stream::FuturesUnordered::new();
    for (i, id) in ids.iter().enumerate() {
        let mut h = FieldTable::default();
        let reason = if i % 100 == 7 {
            "unroutable"
        } else {
            "handler-error"
        };
        h.insert(
            ShortString::from(envelope::REASON),
            AMQPValue::LongString(LongString::from(reason)),
        );
        h.insert(
            ShortString::from(envelope::STAGE),
            AMQPValue::LongString(LongString::from("s1")),
        );
        let mut body = format!("{{\"order\":{i},\"needle\":{}}}", i == n - 1).into_bytes();
        body.resize(256, b' ');
        let confirm =
            c.ch.basic_publish(
                "".into(),
                dlq.as_str().into(),
                BasicPublishOptions::default(),
                &body,
                BasicProperties::default()
                    .with_message_id(id.as_str().into())
                    .with_delivery_mode(2)
                    .with_headers(h),
            )
            .await
            .unwrap();
        pending.push(confirm);
        if pending.len() >= 500 {
            pending.next().await.unwrap().unwrap();
        }
    }
    while let Some(r) = pending.next().await {
        r.unwrap();
    }
    assert!(
        eventually(Duration::from_secs(30), || async {
            c.depth(&dlq).await as usize == n
        })
        .await
    );
    println!(
        "{n} dead letters of 256 bytes in a classic DLQ (filled in {:.1} s)",
        t.elapsed().as_secs_f64()
    );

    let (http, cookie, _) = sign_in(&d.base, TOKEN).await;
    let get = |q: String| {
        let (http, cookie, url) = (
            http.clone(),
            cookie.clone(),
            format!("{}/ui/dlq/{dlq}", d.base),
        );
        async move {
            let t = Instant::now();
            let page = http
                .get(format!("{url}?{q}"))
                .header("cookie", &cookie)
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            let ms = t.elapsed().as_secs_f64() * 1000.0;
            let served = between(&page, "data-served=\"", "\"")
                .unwrap_or_else(|| panic!("no summary: {page}"))
                .to_owned();
            let rows = page.matches("<tr data-id=").count();
            (ms, served, rows)
        }
    };
    let rss_before = rss_kib(pid, "VmRSS:");
    let last = (n - 1) / 50 + 1;
    let cases = [
        ("first page", "page=1".to_owned(), 50),
        ("middle page", format!("page={}", last / 2), 50),
        ("last page", format!("page={last}"), n - (last - 1) * 50),
        (
            "reason = unroutable (1 in 100), page 1",
            "reason=unroutable&page=1".to_owned(),
            (0..n).filter(|i| i % 100 == 7).count().min(50),
        ),
        (
            "search: the last message's body",
            "search=%22needle%22%3Atrue&page=1".to_owned(),
            1,
        ),
    ];
    // Waits for the index's read to end (the last page is answered then).
    let settle = || get(format!("page={last}"));
    println!();
    println!(
        "| list page | cold: median ms (max) | cold: served from | warm: median ms (max) | warm: served from |"
    );
    println!("|---|---|---|---|---|");
    let mut peak_rss = rss_before;
    let median_max = |mut t: Vec<f64>| {
        t.sort_by(f64::total_cmp);
        (t[t.len() / 2], t[t.len() - 1])
    };
    let mut loads = 0;
    for (name, q, rows) in &cases {
        // Cold: the index read again from scratch (`reread`), the page
        // timed until it is answered.
        let mut cold = Vec::new();
        let mut cold_from = String::new();
        for _ in 0..3 {
            let (ms, served, got) = get(format!("{q}&reread=1")).await;
            assert_eq!(got, *rows, "{name}: rows");
            cold.push(ms);
            cold_from = served;
            peak_rss = peak_rss.max(rss_kib(pid, "VmRSS:"));
            settle().await;
            loads += 2;
        }
        let mut warm = Vec::new();
        let mut warm_from = String::new();
        for _ in 0..5 {
            let (ms, served, got) = get(q.clone()).await;
            assert_eq!(got, *rows, "{name}: rows");
            assert_eq!(served, "index", "{name}: warm pages from the index");
            warm.push(ms);
            warm_from = served;
            peak_rss = peak_rss.max(rss_kib(pid, "VmRSS:"));
            loads += 1;
        }
        let (cm, cx) = median_max(cold);
        let (wm, wx) = median_max(warm);
        println!("| {name} | {cm:.0} ({cx:.0}) | {cold_from} | {wm:.1} ({wx:.1}) | {warm_from} |");
    }
    let rss_after = rss_kib(pid, "VmRSS:");
    let hwm = rss_kib(pid, "VmHWM:");
    println!();
    println!(
        "daemon RSS: {:.1} MiB before the page loads, {:.1} MiB after, peak sampled {:.1} MiB, VmHWM {:.1} MiB",
        rss_before as f64 / 1024.0,
        rss_after as f64 / 1024.0,
        peak_rss as f64 / 1024.0,
        hwm as f64 / 1024.0
    );
    assert_eq!(c.depth(&dlq).await as usize, n, "count unchanged");
    let after: Vec<String> = c
        .collect(&dlq, n, Duration::from_secs(120))
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(after.len(), n, "count unchanged");
    assert!(after == ids, "order unchanged");
    println!("after {loads} page loads: {n} messages, in their original order");
}
