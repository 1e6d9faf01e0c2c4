//! The management API (issue 13, item 3): pausing a stage stops its
//! consumption within one prefetch window and `/readyz` says why; resuming
//! drains it; a concurrency of 1 means one handler at a time; the publish
//! rate changes live; a missing or wrong token is a 401.

use flowgate_testkit as common;

use common::*;
use flowgate::config::Concurrency;
use flowgate::{handler_fn, Engine, EngineHandle, Handler, Outcome};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

const TOKEN: &str = "management-token-for-tests-0123456789";
const PREFETCH: u32 = 10;

/// A one-stage chain (`s1` → sink, 8 workers, prefetch [`PREFETCH`]) whose
/// handler is `handler`, with the management API on a free port guarded by
/// [`TOKEN`]. Returns the engine and the API's base URL.
async fn start(prefix: &str, handler: impl Handler) -> (EngineHandle, String, Cleanup) {
    let mut cfg = chain_config(prefix, &["probe"], PREFETCH);
    cfg.stages[0].concurrency = Concurrency::Fixed(8);
    let token_file = std::env::temp_dir().join(format!("{prefix}.token"));
    std::fs::write(&token_file, format!("# operators\n{TOKEN}\n")).unwrap();
    cfg.management.bind = "127.0.0.1:0".into();
    cfg.management.token_file = Some(token_file);
    let cleanup = Cleanup::new(AMQP_URL, &cfg);
    let h = Engine::builder()
        .config(cfg)
        .handler("probe", handler)
        .build()
        .expect("valid config")
        .start()
        .await
        .expect("engine starts");
    assert!(h.wait_ready(Duration::from_secs(10)).await);
    let base = format!(
        "http://{}",
        h.management_addr().expect("management listener")
    );
    (h, base, cleanup)
}

/// Sends a request with `token` (none: no `Authorization`) and an optional
/// JSON body; returns the status and the JSON answer.
async fn call(
    method: &str,
    url: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, Value, awc::http::header::HeaderMap) {
    let http = awc::Client::default();
    let mut req = http.request(method.parse().unwrap(), url);
    if let Some(t) = token {
        req = req.insert_header(("authorization", format!("Bearer {t}")));
    }
    let mut resp = match body {
        Some(b) => req.send_json(&b).await,
        None => req.send().await,
    }
    .expect("management API answers");
    let v = resp.json::<Value>().await.unwrap_or(Value::Null);
    (resp.status().as_u16(), v, resp.headers().clone())
}

async fn op(method: &str, url: &str, body: Option<Value>) -> Value {
    let (code, v, _) = call(method, url, Some(TOKEN), body).await;
    assert_eq!(code, 200, "{method} {url}: {v}");
    v
}

#[actix_rt::test]
async fn pausing_a_stage_stops_consumption_within_a_prefetch_window_and_resume_drains_it() {
    let prefix = unique("mgmt-pause");
    let started = Arc::new(AtomicUsize::new(0));
    let handled = Arc::new(AtomicUsize::new(0));
    let (s, n) = (started.clone(), handled.clone());
    let (h, base, _cleanup) = start(
        &prefix,
        handler_fn(move |_d| {
            let (s, n) = (s.clone(), n.clone());
            async move {
                s.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(2)).await;
                n.fetch_add(1, Ordering::SeqCst);
                Ok(Outcome::ack())
            }
        }),
    )
    .await;
    let client = Client::connect(AMQP_URL).await;
    let input = format!("{prefix}.s1");
    const TOTAL: usize = 400;
    let ids: Vec<String> = (0..TOTAL).map(|i| format!("m{i}")).collect();
    client
        .publish_many(&format!("{prefix}.ex"), "in", &ids, b"x")
        .await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            handled.load(Ordering::SeqCst) >= 20
        })
        .await,
        "the stage consumes"
    );
    let (_, ready, _) = call("GET", &format!("{base}/readyz"), None, None).await;
    assert_eq!(ready["ready"], true, "{ready}");

    let v = op("POST", &format!("{base}/stages/s1/pause"), None).await;
    // The stage applied the pause before the API answered, so from here on only
    // what it had already taken may finish: what it holds in flight now, and
    // at most the one delivery its intake was taking as the pause came
    // (pulled, not yet counted in flight). Read in this order: whatever finishes
    // after `before` was in flight when `at_pause` was read. Counting from
    // before the request would also count what finished during the HTTP round
    // trip, which is not the pause's business.
    let at_pause = h.control().stage("s1").unwrap().in_flight;
    let before = handled.load(Ordering::SeqCst);
    assert_eq!(v["state"], "paused", "{v}");
    assert_eq!(v["paused"], json!(["operator"]), "{v}");
    // What intake had taken finishes; then nothing is in flight.
    assert!(
        eventually(Duration::from_secs(10), || async {
            h.control().stage("s1").unwrap().in_flight == 0
        })
        .await,
        "in-flight deliveries finish"
    );
    let settled = handled.load(Ordering::SeqCst);
    assert!(
        at_pause <= PREFETCH as usize,
        "in flight at the pause: {at_pause}"
    );
    assert!(
        settled - before <= at_pause + 1,
        "after the pause only what the stage held ({at_pause}, and one it was taking) \
         finishes: {} handled",
        settled - before
    );
    assert!(
        settled + (PREFETCH as usize) < TOTAL,
        "the pause came before the end, more than a window before ({settled})"
    );
    // Observe a while (nothing may happen, so there is no event to await): a
    // paused stage starts and acks nothing more, and the broker keeps the rest.
    let started_then = started.load(Ordering::SeqCst);
    assert_eq!(started_then, settled, "every handler started has finished");
    let ready_then = client.depth(&input).await as usize;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        started.load(Ordering::SeqCst),
        started_then,
        "no handler started while paused"
    );
    assert_eq!(
        handled.load(Ordering::SeqCst),
        settled,
        "nothing handled while paused"
    );
    assert_eq!(
        client.depth(&input).await as usize,
        ready_then,
        "nothing consumed while paused"
    );
    // At the end of the window: the broker's qos caps what it has sent
    // unacked at one prefetch window, and it has refilled that window as the
    // stage acked what it held, so the window is full (the broker would hand
    // over more the moment one is acked) — and the stage takes none of it.
    // Only the pause leaves a full window untouched with nothing in flight.
    let unacked = TOTAL - handled.load(Ordering::SeqCst) - client.depth(&input).await as usize;
    assert_eq!(
        unacked, PREFETCH as usize,
        "the broker holds a full prefetch window unacked"
    );
    assert_eq!(
        h.control().stage("s1").unwrap().in_flight,
        0,
        "the paused stage took none of the window"
    );

    // /readyz (no token needed) says why.
    let (code, ready, headers) = call("GET", &format!("{base}/readyz"), None, None).await;
    assert_eq!(code, 503, "{ready}");
    assert!(headers.contains_key("retry-after"));
    assert!(
        ready["reasons"].as_array().unwrap().iter().any(|r| r
            .as_str()
            .unwrap()
            .contains("stage `s1` is paused by an operator")),
        "{ready}"
    );
    // Both listings agree.
    let stages = op("GET", &format!("{base}/stages"), None).await;
    assert_eq!(stages["stages"][0]["name"], "s1", "{stages}");
    assert_eq!(stages["stages"][0]["state"], "paused", "{stages}");

    let v = op("POST", &format!("{base}/stages/s1/resume"), None).await;
    assert_eq!(v["paused"], json!([]), "{v}");
    assert!(
        eventually(Duration::from_secs(20), || async {
            handled.load(Ordering::SeqCst) == TOTAL
        })
        .await,
        "resumed, it drains: {} of {TOTAL}",
        handled.load(Ordering::SeqCst)
    );
    client
        .settled(std::slice::from_ref(&input), 1, Duration::from_secs(10))
        .await
        .expect("input queue empty, one consumer");
    let (code, ready, _) = call("GET", &format!("{base}/readyz"), None, None).await;
    assert_eq!(code, 200, "{ready}");
    h.shutdown().await;
}

#[actix_rt::test]
async fn concurrency_set_to_one_runs_one_handler_at_a_time_and_the_rate_changes_live() {
    let prefix = unique("mgmt-conc");
    let running = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let handled = Arc::new(AtomicUsize::new(0));
    let (r, p, n) = (running.clone(), peak.clone(), handled.clone());
    let (h, base, _cleanup) = start(
        &prefix,
        handler_fn(move |_d| {
            let (r, p, n) = (r.clone(), p.clone(), n.clone());
            async move {
                let now = r.fetch_add(1, Ordering::SeqCst) + 1;
                p.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(10)).await;
                r.fetch_sub(1, Ordering::SeqCst);
                n.fetch_add(1, Ordering::SeqCst);
                Ok(Outcome::ack())
            }
        }),
    )
    .await;
    let client = Client::connect(AMQP_URL).await;
    let ex = format!("{prefix}.ex");
    let batch = |from: usize| {
        (from..from + 40)
            .map(|i| format!("m{i}"))
            .collect::<Vec<_>>()
    };
    let all_handled = |want: usize| {
        let handled = handled.clone();
        async move {
            eventually(Duration::from_secs(20), || async {
                handled.load(Ordering::SeqCst) == want
            })
            .await
        }
    };

    // With its 8 workers the handler overlaps: the probe can see it.
    client.publish_many(&ex, "in", &batch(0), b"x").await;
    assert!(all_handled(40).await);
    assert!(peak.load(Ordering::SeqCst) > 1, "8 workers overlap");

    // Refused values: out of range, unknown stage, bad body.
    let url = format!("{base}/stages/s1/concurrency");
    for bad in [json!({ "workers": 0 }), json!({ "workers": PREFETCH + 1 })] {
        let (code, v, _) = call("PUT", &url, Some(TOKEN), Some(bad.clone())).await;
        assert_eq!(code, 400, "{bad}: {v}");
        assert!(v["error"].as_str().unwrap().contains("1..=10"), "{v}");
    }
    let (code, v, _) = call("PUT", &url, Some(TOKEN), Some(json!({ "workers": "many" }))).await;
    assert_eq!(code, 400, "{v}");
    let (code, v, _) = call(
        "PUT",
        &format!("{base}/stages/nope/concurrency"),
        Some(TOKEN),
        Some(json!({ "workers": 1 })),
    )
    .await;
    assert_eq!(code, 404, "{v}");
    assert_eq!(h.control().stage("s1").unwrap().workers, 8, "unchanged");

    let v = op("PUT", &url, Some(json!({ "workers": 1 }))).await;
    assert_eq!(v["workers"], 1, "{v}");
    assert_eq!(v["pinned_workers"], 1, "{v}");
    peak.store(0, Ordering::SeqCst);
    client.publish_many(&ex, "in", &batch(40), b"x").await;
    assert!(all_handled(80).await);
    assert_eq!(peak.load(Ordering::SeqCst), 1, "one handler at a time");

    // Back to the configured count's owner: the pin is gone.
    let v = op("PUT", &url, Some(json!({ "workers": null }))).await;
    assert_eq!(v["pinned_workers"], Value::Null, "{v}");

    // The publish rate, from the API and from the embedding host.
    let v = op(
        "PUT",
        &format!("{base}/publisher/rate"),
        Some(json!({ "rate": 250, "burst": 7 })),
    )
    .await;
    assert_eq!(
        (v["rate"].clone(), v["burst"].clone()),
        (json!(250), json!(7)),
        "{v}"
    );
    h.control().set_publish_rate(0, None);
    let v = op("GET", &format!("{base}/publisher"), None).await;
    assert_eq!(
        (v["rate"].clone(), v["burst"].clone()),
        (json!(0), json!(7)),
        "{v}"
    );
    assert_eq!(v["breaker"], "closed", "{v}");
    h.shutdown().await;
}

#[actix_rt::test]
async fn a_missing_or_wrong_token_is_a_401_and_changes_nothing() {
    let prefix = unique("mgmt-auth");
    let (h, base, _cleanup) = start(&prefix, handler_fn(|_d| async { Ok(Outcome::ack()) })).await;
    for token in [None, Some("not-the-token-but-long-enough"), Some("")] {
        for (method, path) in [
            ("GET", "/stages"),
            ("GET", "/status"),
            ("GET", "/publisher"),
            ("POST", "/stages/s1/pause"),
        ] {
            let (code, v, headers) = call(method, &format!("{base}{path}"), token, None).await;
            assert_eq!(code, 401, "{method} {path} with {token:?}: {v}");
            assert_eq!(
                headers
                    .get("www-authenticate")
                    .and_then(|v| v.to_str().ok()),
                Some("Bearer")
            );
        }
    }
    assert!(
        h.control().stage("s1").unwrap().paused.is_empty(),
        "an unauthorised pause changed nothing"
    );
    // Liveness and readiness need no token (probes send none).
    let (code, _, _) = call("GET", &format!("{base}/healthz"), None, None).await;
    assert_eq!(code, 200);
    let (code, v, _) = call("GET", &format!("{base}/readyz"), None, None).await;
    assert_eq!(code, 200, "{v}");
    let v = op("GET", &format!("{base}/status"), None).await;
    assert_eq!(v["ready"], true, "{v}");
    h.shutdown().await;
}

/// Runs `flowgate ctl --url <base> <args>` with `token` in the environment;
/// exit code, stdout, stderr.
async fn ctl(base: &str, token: Option<&str>, args: &[&str]) -> (i32, String, String) {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_flowgate"));
    cmd.arg("ctl").arg("--url").arg(base).args(args);
    cmd.env_remove("FLOWGATE_CONFIG");
    match token {
        Some(t) => cmd.env("FLOWGATE_MANAGEMENT_TOKEN", t),
        None => cmd.env_remove("FLOWGATE_MANAGEMENT_TOKEN"),
    };
    let out = cmd.output().await.expect("flowgate runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[actix_rt::test]
async fn flowgate_ctl_pauses_resumes_and_reports_through_the_api() {
    let prefix = unique("mgmt-ctl");
    let (h, base, _cleanup) = start(&prefix, handler_fn(|_d| async { Ok(Outcome::ack()) })).await;

    let (code, out, err) = ctl(&base, Some(TOKEN), &["pause", "s1"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("paused") && out.contains("operator"), "{out}");
    assert_eq!(h.control().stage("s1").unwrap().paused, ["operator"]);

    // Not ready while paused: `status` says why and exits 1.
    let (code, out, err) = ctl(&base, Some(TOKEN), &["status"]).await;
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("stage `s1` is paused by an operator"), "{out}");

    let (code, out, err) = ctl(&base, Some(TOKEN), &["concurrency", "s1", "2"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(h.control().stage("s1").unwrap().pinned_workers, Some(2));
    let (code, out, err) = ctl(&base, Some(TOKEN), &["concurrency", "s1", "auto"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(h.control().stage("s1").unwrap().pinned_workers, None);

    let (code, out, err) = ctl(&base, Some(TOKEN), &["resume", "s1"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(h.control().stage("s1").unwrap().paused.is_empty());
    let (code, out, err) = ctl(&base, Some(TOKEN), &["--json", "status"]).await;
    assert_eq!(code, 0, "{out}{err}");
    let v: Value = serde_json::from_str(&out).expect("--json prints JSON");
    assert_eq!(v["ready"], true, "{v}");

    let (code, out, err) = ctl(&base, Some(TOKEN), &["rate", "300", "--burst", "9"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("300/s (burst 9)"), "{out}");

    // Refusals: the API's reason, exit 1; a usage error, exit 2.
    let (code, _, err) = ctl(
        &base,
        Some("wrong-token-long-enough-to-count"),
        &["pause", "s1"],
    )
    .await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("401"), "{err}");
    assert!(h.control().stage("s1").unwrap().paused.is_empty());
    let (code, _, err) = ctl(&base, None, &["stages"]).await;
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("FLOWGATE_MANAGEMENT_TOKEN"),
        "says where a token comes from: {err}"
    );
    let (code, _, err) = ctl(&base, Some(TOKEN), &["pause", "nope"]).await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("no stage named `nope`"), "{err}");
    let (code, _, err) = ctl(&base, Some(TOKEN), &["concurrency", "s1", "lots"]).await;
    assert_eq!(code, 2, "{err}");
    h.shutdown().await;
}
