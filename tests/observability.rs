//! The shipped dashboard and alert rules (issue 13, items 4 and 5): every
//! metric they query is served by a live `/metrics`; `promtool` accepts the
//! rules and the live scrape; labelled series exist before their first event;
//! the end-to-end histogram measures from a message's first publish across
//! hops.
//!
//! `promtool` comes from Debian's `prometheus` package (`scripts/services.sh`
//! installs it); without it these tests fail rather than pass unchecked.

use flowgate_testkit as common;

use common::*;
use flowgate::config::{DedupMode, Watermark};
use flowgate::{handler_fn, Engine, EngineHandle, Outcome, Output};
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

const ALERTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/prometheus/alerts.yml");
const DASHBOARD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/grafana/flowgate.json");
/// Stage `s1`'s simulated work: what `s2`'s end-to-end latency must include.
const S1_DELAY: Duration = Duration::from_millis(60);
const MESSAGES: usize = 20;
/// Of which published through the host's `publish` (the rest by a plain
/// AMQP producer).
const STAMPED: usize = 10;

fn promtool() -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("promtool"))
            .find(|f| f.is_file())
    });
    found.expect("promtool on PATH (Debian package `prometheus`; scripts/services.sh installs it)")
}

/// Runs promtool with `args` and `stdin`; panics with its output on failure.
fn run_promtool(args: &[&str], stdin: Option<&str>) -> String {
    use std::io::Write;
    let mut child = Command::new(promtool())
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool runs");
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
    drop(input);
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

/// The metric names a PromQL expression uses: identifiers of flowgate's or
/// the process collector's families.
fn metric_names(expr: &str) -> BTreeSet<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|t| t.starts_with("flowgate_") || t.starts_with("process_"))
        .map(str::to_owned)
        .collect()
}

/// Every PromQL expression of the alert rules (`expr:` values, folded
/// blocks included).
fn alert_exprs(yaml: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut lines = yaml.lines().peekable();
    while let Some(line) = lines.next() {
        let t = line.trim_start();
        let Some(rest) = t.strip_prefix("expr:") else {
            continue;
        };
        let rest = rest.trim();
        if rest == "|" || rest == ">" {
            let indent = line.len() - t.len();
            let mut block = String::new();
            while let Some(next) = lines.peek() {
                let nt = next.trim_start();
                if !nt.is_empty() && next.len() - nt.len() <= indent {
                    break;
                }
                block.push_str(nt);
                block.push(' ');
                lines.next();
            }
            out.push(block);
        } else {
            out.push(rest.to_owned());
        }
    }
    out
}

/// Every PromQL expression of the dashboard: panel targets and template
/// variable queries.
fn dashboard_exprs(json: &serde_json::Value) -> Vec<String> {
    let mut out = Vec::new();
    for p in json["panels"].as_array().expect("panels") {
        for t in p["targets"].as_array().expect("targets") {
            out.push(t["expr"].as_str().expect("expr").to_owned());
        }
    }
    for v in json["templating"]["list"].as_array().expect("templating") {
        if let Some(q) = v["query"]["query"].as_str() {
            out.push(q.to_owned());
        }
    }
    out
}

/// The sample names of a Prometheus text exposition (`_bucket`, `_sum`,
/// `_count` included, as served).
fn served_names(scrape: &str) -> BTreeSet<String> {
    scrape
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

/// Names a query uses that the scrape does not serve.
fn missing(exprs: &[String], served: &BTreeSet<String>) -> BTreeSet<String> {
    exprs
        .iter()
        .flat_map(|e| metric_names(e))
        .filter(|n| !served.contains(n))
        .collect()
}

/// A two-stage chain (`s1` makes a fresh output after [`S1_DELAY`], `s2`
/// forwards to the sink) with memory dedup, a watermark on the sink and
/// `/metrics` on a free port.
async fn start(prefix: &str) -> (EngineHandle, Cleanup) {
    let mut cfg = chain_config(prefix, &["fresh", "forward"], 10);
    cfg.http.bind = "127.0.0.1:0".into();
    cfg.stages[0].dedup = DedupMode::Memory;
    let ex = format!("{prefix}.ex");
    // A new message, not a forward: only the engine can carry the stamp.
    let fresh = handler_fn(move |d| {
        let ex = ex.clone();
        let id = d.message_id().unwrap_or_default().to_owned();
        async move {
            tokio::time::sleep(S1_DELAY).await;
            Ok(Outcome::ack_with(vec![Output::new(
                ex,
                "hop1",
                b"y".to_vec(),
            )
            .with_message_id(id)]))
        }
    });
    if let Some(sink) = cfg.queues.last_mut() {
        sink.watermark = Some(Watermark {
            high: 10_000,
            low: 1_000,
        });
    }
    let cleanup = Cleanup::new(AMQP_URL, &cfg);
    let h = Engine::builder()
        .config(cfg)
        .handler("fresh", fresh)
        .build()
        .expect("valid config")
        .start()
        .await
        .expect("engine starts");
    assert!(h.wait_ready(Duration::from_secs(10)).await);
    (h, cleanup)
}

async fn scrape(h: &EngineHandle) -> String {
    let addr = h.http_addr().expect("metrics listener");
    let mut resp = awc::Client::default()
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
        .expect("/metrics answers");
    assert_eq!(resp.status().as_u16(), 200);
    let body = resp.body().limit(16 << 20).await.expect("/metrics body");
    String::from_utf8(body.to_vec()).expect("UTF-8 exposition")
}

#[test]
fn promtool_accepts_the_alert_rules() {
    let out = run_promtool(&["check", "rules", ALERTS], None);
    assert!(out.contains("SUCCESS"), "{out}");
}

#[test]
fn the_query_checks_see_a_metric_that_is_not_served() {
    // The check below would pass vacuously if it found no names.
    let served: BTreeSet<String> = ["flowgate_stage_in_flight".to_owned()].into();
    let exprs = vec![
        "sum by (stage) (flowgate_stage_in_flight) / flowgate_stage_infligth".to_owned(),
        "histogram_quantile(0.99, rate(flowgate_x_bucket[5m]))".to_owned(),
    ];
    assert_eq!(
        missing(&exprs, &served),
        ["flowgate_stage_infligth", "flowgate_x_bucket"]
            .map(str::to_owned)
            .into()
    );
    let yaml = "      - alert: A\n        expr: |\n          sum(flowgate_a)\n            > flowgate_b\n        for: 1m\n      - alert: B\n        expr: flowgate_c == 1\n";
    assert_eq!(
        alert_exprs(yaml),
        vec!["sum(flowgate_a) > flowgate_b ", "flowgate_c == 1"]
    );
}

#[actix_rt::test]
async fn every_metric_the_dashboard_and_alerts_query_is_served_and_promtool_accepts_the_scrape() {
    let prefix = unique("observability");
    let (h, _cleanup) = start(&prefix).await;

    // Before any message: the series alerts and panels need exist at 0.
    let idle = scrape(&h).await;
    for series in [
        "flowgate_messages_dead_lettered_total{reason=\"panic\",stage=\"s1\"} 0",
        "flowgate_breaker_state{state=\"open\"} 0",
        "flowgate_breaker_state{state=\"closed\"} 1",
        "flowgate_actor_restarts_total{kind=\"stage\",stage=\"s2\"} 0",
        "flowgate_stage_prefetch{stage=\"s1\"} 10",
    ] {
        assert!(
            idle.contains(series),
            "{series} before any event in\n{idle}"
        );
    }
    let sink = format!("{prefix}.sink");
    assert!(
        idle.contains(&format!(
            "flowgate_queue_watermark{{level=\"high\",queue=\"{sink}\"}} 10000"
        )),
        "the sink's watermark in\n{idle}"
    );

    // Half through the host's publish (stamped with their first publish),
    // half by a plain AMQP producer (no stamp: passed on unchanged, not
    // measured).
    let client = Client::connect(AMQP_URL).await;
    let ex = format!("{prefix}.ex");
    for i in 0..STAMPED {
        let out = Output::new(ex.as_str(), "in", b"x".to_vec()).with_message_id(format!("h{i}"));
        h.publish(out).await.expect("host publish");
    }
    let ids: Vec<String> = (STAMPED..MESSAGES).map(|i| format!("m{i}")).collect();
    client.publish_many(&ex, "in", &ids, b"x").await;
    let got = client
        .collect_distinct(&sink, MESSAGES, Duration::from_secs(30))
        .await;
    assert_eq!(got.len(), MESSAGES, "every message reached the sink");
    // The queue depth is sampled on the monitor's interval: wait for it.
    assert!(
        eventually(Duration::from_secs(15), || async {
            scrape(&h).await.contains("flowgate_queue_depth{")
        })
        .await,
        "queue depths sampled"
    );

    let live = scrape(&h).await;
    run_promtool(&["check", "metrics"], Some(&live));
    let served = served_names(&live);

    let alerts = alert_exprs(&std::fs::read_to_string(ALERTS).unwrap());
    assert!(alerts.len() >= 6, "the alert rules were read: {alerts:?}");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(DASHBOARD).unwrap()).unwrap();
    let panels = dashboard_exprs(&dashboard);
    assert!(panels.len() >= 10, "the dashboard was read: {panels:?}");
    assert_eq!(
        missing(&alerts, &served),
        BTreeSet::new(),
        "alerts query metrics /metrics does not serve"
    );
    assert_eq!(
        missing(&panels, &served),
        BTreeSet::new(),
        "dashboard panels query metrics /metrics does not serve"
    );
    for required in [
        "flowgate_breaker_state",
        "flowgate_spool_messages",
        "flowgate_messages_dead_lettered_total",
        "flowgate_stage_paused",
        "flowgate_actor_restarts_total",
        "flowgate_queue_depth",
        "flowgate_publish_confirm_seconds_bucket",
    ] {
        let used = |exprs: &[String]| exprs.iter().any(|e| metric_names(e).contains(required));
        assert!(
            used(&alerts) || used(&panels),
            "{required} is watched by an alert or a panel"
        );
    }

    // The end-to-end latency at s2 includes s1's work: the stamp of the
    // first publish travelled with the forward.
    let m = h.metrics();
    let (count, sum) = histogram(&live, "flowgate_end_to_end_seconds", "s2");
    assert_eq!(
        count as usize, STAMPED,
        "the stamped messages, measured at s2"
    );
    assert!(
        sum >= S1_DELAY.as_secs_f64() * STAMPED as f64,
        "s2 measures from the first publish, s1's {S1_DELAY:?} included: sum {sum}"
    );
    let (at_s1, _) = histogram(&live, "flowgate_end_to_end_seconds", "s1");
    assert_eq!(at_s1 as usize, STAMPED, "the same at s1");
    let (confirms, _) = histogram(&live, "flowgate_publish_confirm_seconds", "");
    assert!(
        confirms as usize >= 2 * MESSAGES,
        "both forwards' confirms timed"
    );
    assert_eq!(
        m.counter(flowgate::Metrics::ACKED, &["s2"]) as usize,
        MESSAGES
    );
    h.shutdown().await;
}

/// `_count` and `_sum` of one histogram series (`stage` label, or none).
fn histogram(scrape: &str, name: &str, stage: &str) -> (f64, f64) {
    let labels = if stage.is_empty() {
        String::new()
    } else {
        format!("{{stage=\"{stage}\"}}")
    };
    let value = |suffix: &str| {
        let key = format!("{name}_{suffix}{labels} ");
        scrape
            .lines()
            .find_map(|l| l.strip_prefix(&key))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or_else(|| panic!("{key} in\n{scrape}"))
    };
    (value("count"), value("sum"))
}
