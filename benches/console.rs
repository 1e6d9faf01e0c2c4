//! The console on a 10,000-message DLQ (issue 28, acceptance 2): how long
//! its list pages take, the daemon's memory while they load, and the queue
//! after (count and order). Needs RabbitMQ on 127.0.0.1:5672.
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
    let rss_before = rss_kib(pid, "VmRSS:");
    let last = (n - 1) / 50 + 1;
    let cases = [
        ("page 1", "".to_owned()),
        ("page 2", "page=2".to_owned()),
        ("middle page", format!("page={}", last / 2)),
        ("last page", format!("page={last}")),
        (
            "reason = unroutable (1 in 100), page 1",
            "reason=unroutable".to_owned(),
        ),
        (
            "search: the last message's body",
            "search=%22needle%22%3Atrue".to_owned(),
        ),
    ];
    println!();
    println!("| list page | messages read | median ms | max ms |");
    println!("|---|---|---|---|");
    let mut peak_rss = rss_before;
    for (name, q) in &cases {
        let mut times = Vec::new();
        let mut read = String::new();
        for _ in 0..5 {
            let t = Instant::now();
            let page = http
                .get(format!("{}/ui/dlq/{dlq}?{q}", d.base))
                .header("cookie", &cookie)
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            times.push(t.elapsed().as_secs_f64() * 1000.0);
            peak_rss = peak_rss.max(rss_kib(pid, "VmRSS:"));
            read = between(&page, "(read ", " in")
                .unwrap_or_else(|| panic!("no summary: {page}"))
                .to_owned();
        }
        times.sort_by(f64::total_cmp);
        println!("| {name} | {read} | {:.0} | {:.0} |", times[2], times[4]);
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
    println!(
        "after {} page loads: {n} messages, in their original order",
        cases.len() * 5
    );
}
