//! `flowgate-orders load`: drives an order gateway over HTTP and prints a summary.
//!
//! Orders go out open-loop at `--rate` (or as fast as `--concurrency`
//! allows), with at most `--concurrency` requests in flight. A 503 is
//! counted as rejected (not retried). Then it polls `GET /orders/{id}` for
//! every accepted order until each is shipped or failed, or nothing moved
//! for `--wait`; the order-to-shipped latency comes from the status's
//! server-side timestamps, so polling does not skew it. The server's own
//! numbers (peak queue depths, payment throttle hits) come from
//! `GET /orders/stats`.

use super::percentile;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// An order rate such as `5000/min`, `100/s` or `100` (per second).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rate(pub f64);

impl std::str::FromStr for Rate {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (n, per) = s.split_once('/').unwrap_or((s, "s"));
        let n: f64 = n
            .trim()
            .parse()
            .map_err(|_| format!("`{s}`: expected a rate like 5000/min or 100/s"))?;
        let secs = match per.trim() {
            "s" | "sec" | "second" => 1.0,
            "m" | "min" | "minute" => 60.0,
            "h" | "hour" => 3600.0,
            other => return Err(format!("`{other}`: the unit must be s, min or h")),
        };
        if n.is_nan() || n <= 0.0 || n.is_infinite() {
            return Err(format!("`{s}`: the rate must be greater than 0"));
        }
        Ok(Rate(n / secs))
    }
}

/// `flowgate-orders load` options.
#[derive(clap::Args, Debug, Clone)]
pub struct LoadArgs {
    /// Gateway base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Orders per unit of time: `5000/min`, `100/s`. Default: as fast as
    /// `--concurrency` allows.
    #[arg(long)]
    pub rate: Option<Rate>,
    /// How long to send (with `--rate`), e.g. `60s`.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    /// Orders to send (instead of rate × duration).
    #[arg(long)]
    pub orders: Option<usize>,
    /// Requests in flight at most.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Every Nth order asks for the scarce SKU `sku-limited` (0: never).
    #[arg(long, default_value_t = 50)]
    pub scarce_every: usize,
    /// Give up on orders when no status moved for this long.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub wait: Duration,
    /// Hide the progress bar.
    #[arg(long)]
    pub quiet: bool,
}

impl LoadArgs {
    /// The plan these options describe.
    pub fn plan(&self) -> Result<LoadPlan, String> {
        let orders = match (self.orders, self.rate, self.duration) {
            (Some(n), _, _) => n,
            (None, Some(r), Some(d)) => (r.0 * d.as_secs_f64()).round() as usize,
            (None, _, _) => {
                return Err("give --orders N, or --rate R with --duration D".into());
            }
        };
        Ok(LoadPlan {
            url: self.url.trim_end_matches('/').to_owned(),
            orders,
            rate: self.rate.map(|r| r.0),
            concurrency: self.concurrency.max(1),
            scarce_every: self.scarce_every,
            wait: self.wait,
            quiet: self.quiet,
        })
    }
}

/// What to send.
#[derive(Clone, Debug)]
pub struct LoadPlan {
    /// Gateway base URL, no trailing slash.
    pub url: String,
    /// Orders to send.
    pub orders: usize,
    /// Orders per second; `None`: closed loop at `concurrency`.
    pub rate: Option<f64>,
    /// Requests in flight at most.
    pub concurrency: usize,
    /// Every Nth order asks for `sku-limited` (0: never).
    pub scarce_every: usize,
    /// Stall timeout while waiting for final statuses.
    pub wait: Duration,
    /// No progress bar.
    pub quiet: bool,
}

/// What a run measured.
#[derive(Clone, Debug, Default)]
pub struct LoadReport {
    /// Requests sent.
    pub sent: usize,
    /// Answered 202.
    pub accepted: usize,
    /// Answered 503 (with `Retry-After`).
    pub rejected_503: usize,
    /// 503s that carried a `Retry-After` header.
    pub retry_after_seen: usize,
    /// Other non-202 answers, by status code.
    pub rejected_other: BTreeMap<u16, usize>,
    /// Requests that got no answer.
    pub transport_errors: usize,
    /// Accepted orders that reached `shipped`.
    pub shipped: usize,
    /// Accepted orders that ended `failed`, by reason.
    pub failed: BTreeMap<String, usize>,
    /// Accepted orders with no final status when the run ended.
    pub lost: Vec<String>,
    /// Order-to-shipped latencies, ms.
    pub latencies_ms: Vec<u64>,
    /// Time spent sending.
    pub send_time: Duration,
    /// Whole run.
    pub elapsed: Duration,
    /// `GET /orders/stats` at the end, if it answered.
    pub server: Option<Value>,
    /// The ids of accepted orders.
    pub accepted_ids: Vec<String>,
    /// Each accepted order by id: what it asked for and how it ended.
    pub accepted_orders: BTreeMap<String, AcceptedOrder>,
    /// Time from the start of sending to the first 503 answer.
    pub first_503_after: Option<Duration>,
}

/// An accepted order of a run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcceptedOrder {
    /// Its place in the run ([`order_body`]'s `i`).
    pub index: usize,
    /// Its lines, (SKU, quantity).
    pub items: Vec<(String, u64)>,
    /// Its final status, if it reached one.
    pub end: Option<End>,
}

/// The final status of an order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum End {
    /// `shipped`.
    Shipped,
    /// `failed`, with its reason.
    Failed(String),
}

impl AcceptedOrder {
    /// True when it passed the reserve stage (its stock was taken): it
    /// shipped, or failed after reserve (any reason but out of stock).
    pub fn reserved(&self) -> bool {
        match &self.end {
            Some(End::Shipped) => true,
            Some(End::Failed(r)) => {
                r != crate::stages::OUT_OF_STOCK && r != crate::stages::MALFORMED
            }
            None => false,
        }
    }
    /// True when it asked for `sku`.
    pub fn wants(&self, sku: &str) -> bool {
        self.items.iter().any(|(s, _)| s == sku)
    }
}

fn items_of(body: &Value) -> Vec<(String, u64)> {
    body["items"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|it| Some((it["sku"].as_str()?.to_owned(), it["qty"].as_u64()?)))
                .collect()
        })
        .unwrap_or_default()
}

/// The body of the `i`-th order.
pub fn order_body(i: usize, scarce_every: usize) -> Value {
    let mut items = vec![json!({ "sku": format!("sku-{}", i % 50), "qty": 1 + (i % 3) })];
    if i.is_multiple_of(4) {
        items.push(json!({ "sku": format!("sku-{}", (i / 7) % 50), "qty": 1 }));
    }
    if scarce_every > 0 && i % scarce_every == scarce_every - 1 {
        items.push(json!({ "sku": "sku-limited", "qty": 1 }));
    }
    json!({
        "customer_id": format!("customer-{}", i % 997),
        "items": items,
        "total": 10.0 + (i % 90) as f64,
    })
}

fn bar(len: usize, quiet: bool, template: &str) -> indicatif::ProgressBar {
    let b = if quiet {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(len as u64)
    };
    b.set_style(
        indicatif::ProgressStyle::with_template(template)
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    b
}

enum Sent {
    Accepted(String, usize, Vec<(String, u64)>),
    Rejected503 { retry_after: bool },
    Other(u16),
    Transport,
}

/// Runs the plan against the gateway. Runs on the actix system (the HTTP
/// client is single-threaded). `tick` is called once a second while
/// waiting, e.g. to drive chaos.
pub async fn run(plan: &LoadPlan) -> LoadReport {
    let client = awc::Client::builder()
        .timeout(Duration::from_secs(30))
        .connector(awc::Connector::new().limit(plan.concurrency.max(1)))
        .finish();
    let started = Instant::now();
    let mut report = LoadReport::default();

    // --- send
    let pb = bar(
        plan.orders,
        plan.quiet,
        "sending   {bar:40} {pos}/{len} orders  {per_sec}  {msg}",
    );
    let interval = plan.rate.map(|r| Duration::from_secs_f64(1.0 / r));
    let t0 = tokio::time::Instant::now();
    let mut inflight = FuturesUnordered::new();
    let mut next = 0usize;
    while next < plan.orders || !inflight.is_empty() {
        let can_send = next < plan.orders && inflight.len() < plan.concurrency;
        let due = interval
            .map(|iv| t0 + iv.mul_f64(next as f64))
            .unwrap_or(t0);
        tokio::select! {
            biased;
            Some(res) = inflight.next(), if !inflight.is_empty() => {
                match res {
                    Sent::Accepted(id, index, items) => {
                        report.accepted += 1;
                        report.accepted_ids.push(id.clone());
                        report.accepted_orders.insert(id, AcceptedOrder { index, items, end: None });
                    }
                    Sent::Rejected503 { retry_after } => {
                        report.first_503_after.get_or_insert_with(|| started.elapsed());
                        report.rejected_503 += 1;
                        report.retry_after_seen += usize::from(retry_after);
                    }
                    Sent::Other(code) => *report.rejected_other.entry(code).or_insert(0) += 1,
                    Sent::Transport => report.transport_errors += 1,
                }
                pb.inc(1);
                pb.set_message(format!("accepted {}  503 {}", report.accepted, report.rejected_503));
            }
            _ = tokio::time::sleep_until(due), if can_send => {
                let req = client
                    .post(format!("{}/orders", plan.url))
                    .insert_header(("content-type", "application/json"));
                let body = order_body(next, plan.scarce_every);
                let (index, items) = (next, items_of(&body));
                let body = body.to_string();
                inflight.push(async move {
                    match req.send_body(body).await {
                        Ok(mut resp) => {
                            let code = resp.status().as_u16();
                            match code {
                                202 => match resp.json::<Value>().await {
                                    Ok(v) => v["order_id"].as_str().map(|s| Sent::Accepted(s.to_owned(), index, items)).unwrap_or(Sent::Other(202)),
                                    Err(_) => Sent::Other(202),
                                },
                                503 => Sent::Rejected503 { retry_after: resp.headers().contains_key("retry-after") },
                                c => Sent::Other(c),
                            }
                        }
                        Err(_) => Sent::Transport,
                    }
                });
                next += 1;
                report.sent += 1;
            }
        }
    }
    pb.finish_and_clear();
    report.send_time = started.elapsed();

    // --- wait for final statuses
    let pb = bar(
        report.accepted,
        plan.quiet,
        "finishing {bar:40} {pos}/{len} orders shipped or failed  {msg}",
    );
    let mut pending: Vec<String> = report.accepted_ids.clone();
    let mut last_progress = Instant::now();
    while !pending.is_empty() && last_progress.elapsed() < plan.wait {
        let mut still = Vec::with_capacity(pending.len());
        let mut misses = 0usize;
        let mut polls = FuturesUnordered::new();
        let mut it = pending.into_iter();
        let mut moved = false;
        loop {
            while polls.len() < plan.concurrency.min(32) {
                let Some(id) = it.next() else { break };
                if misses > 64 {
                    still.push(id);
                    continue;
                }
                let req = client.get(format!("{}/orders/{}", plan.url, id));
                polls.push(async move {
                    let v = match req.send().await {
                        Ok(mut r) if r.status().is_success() => r.json::<Value>().await.ok(),
                        _ => None,
                    };
                    (id, v)
                });
            }
            let Some((id, v)) = polls.next().await else {
                break;
            };
            match v.as_ref().and_then(|v| v["status"].as_str()) {
                Some("shipped") => {
                    let v = v
                        .as_ref()
                        .map(|v| (v["created_at_ms"].as_u64(), v["updated_at_ms"].as_u64()));
                    if let Some((Some(c), Some(u))) = v {
                        report.latencies_ms.push(u.saturating_sub(c));
                    }
                    report.shipped += 1;
                    if let Some(o) = report.accepted_orders.get_mut(&id) {
                        o.end = Some(End::Shipped);
                    }
                    moved = true;
                }
                Some("failed") => {
                    let reason = v
                        .as_ref()
                        .and_then(|v| v["reason"].as_str())
                        .unwrap_or("unknown")
                        .to_owned();
                    *report.failed.entry(reason.clone()).or_insert(0) += 1;
                    if let Some(o) = report.accepted_orders.get_mut(&id) {
                        o.end = Some(End::Failed(reason));
                    }
                    moved = true;
                }
                _ => {
                    misses += 1;
                    still.push(id);
                }
            }
        }
        still.extend(it);
        pending = still;
        if moved {
            last_progress = Instant::now();
        }
        pb.set_position((report.accepted - pending.len()) as u64);
        pb.set_message(format!("{} shipped", report.shipped));
        if !pending.is_empty() {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
    pb.finish_and_clear();
    report.lost = pending;
    report.elapsed = started.elapsed();
    report.server = match client
        .get(format!("{}/orders/stats", plan.url))
        .send()
        .await
    {
        Ok(mut r) if r.status().is_success() => r.json::<Value>().limit(1 << 20).await.ok(),
        _ => None,
    };
    report
}

impl LoadReport {
    /// Units taken from stock per SKU by the orders that passed reserve.
    pub fn stock_taken(&self) -> BTreeMap<String, u64> {
        let mut m = BTreeMap::new();
        for o in self.accepted_orders.values().filter(|o| o.reserved()) {
            for (sku, qty) in &o.items {
                *m.entry(sku.clone()).or_insert(0) += qty;
            }
        }
        m
    }

    /// A latency percentile in ms.
    pub fn latency(&self, p: f64) -> Option<u64> {
        percentile(&self.latencies_ms, p)
    }

    /// The summary table.
    pub fn summary(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let ms = |v: Option<u64>| v.map(|v| format!("{v} ms")).unwrap_or_else(|| "-".into());
        let _ = writeln!(s, "  orders sent               {:>10}", self.sent);
        let _ = writeln!(s, "  accepted (202)            {:>10}", self.accepted);
        let _ = writeln!(s, "  rejected 503 (Retry-After){:>10}", self.rejected_503);
        for (code, n) in &self.rejected_other {
            let _ = writeln!(s, "  answered {code}              {n:>10}");
        }
        if self.transport_errors > 0 {
            let _ = writeln!(
                s,
                "  no answer                 {:>10}",
                self.transport_errors
            );
        }
        let _ = writeln!(s, "  shipped                   {:>10}", self.shipped);
        let failed: usize = self.failed.values().sum();
        let _ = writeln!(s, "  dead-lettered             {failed:>10}");
        for (reason, n) in &self.failed {
            let _ = writeln!(s, "    {reason:<24}{n:>10}");
        }
        let _ = writeln!(s, "  lost (no final status)    {:>10}", self.lost.len());
        let _ = writeln!(
            s,
            "  order→shipped p50         {:>10}",
            ms(self.latency(0.5))
        );
        let _ = writeln!(
            s,
            "  order→shipped p99         {:>10}",
            ms(self.latency(0.99))
        );
        let _ = writeln!(
            s,
            "  send rate                 {:>10.0} orders/s",
            self.sent as f64 / self.send_time.as_secs_f64().max(1e-9)
        );
        let _ = writeln!(
            s,
            "  run time                  {:>10.1} s",
            self.elapsed.as_secs_f64()
        );
        if let Some(v) = &self.server {
            if let Some(t) = v["throttle_hits"].as_u64() {
                let _ = writeln!(s, "  payment throttle hits     {t:>10}");
            }
            if let Some(peaks) = v["peak_depth"].as_object() {
                let _ = writeln!(s, "  peak queue depth");
                for (q, n) in peaks {
                    let _ = writeln!(s, "    {q:<40}{:>8}", n.as_u64().unwrap_or(0));
                }
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse() {
        assert_eq!("5000/min".parse::<Rate>().unwrap(), Rate(5000.0 / 60.0));
        assert_eq!("100/s".parse::<Rate>().unwrap(), Rate(100.0));
        assert_eq!("7".parse::<Rate>().unwrap(), Rate(7.0));
        assert!("0/s".parse::<Rate>().is_err());
        assert!("x/s".parse::<Rate>().is_err());
        assert!("5/fortnight".parse::<Rate>().is_err());
    }

    #[test]
    fn generated_orders_are_valid() {
        for i in 0..200 {
            super::super::model::validate(&order_body(i, 50)).unwrap();
        }
        assert!(order_body(49, 50).to_string().contains("sku-limited"));
        assert!(!order_body(48, 50).to_string().contains("sku-limited"));
    }
}
