//! The console over plain HTTP (issue 28): the session cookie's flags, a
//! wrong token, CSRF and origin checks (403), the security headers, the
//! vendored htmx served as pinned, nothing on `/ui` without a management
//! listener or with `console = false`, hostile dead letters escaped, and
//! `flowgate dlq list --reason unroutable --json` / `show --json` saying
//! what the page shows.

mod console_support;

use console_support::*;
use flowgate::config::QueueKind;
use flowgate::{Config, Engine};
use flowgate_testkit::*;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(20);

/// `in` (classic, classic DLQ) → stage `fwd` (forward to key `gone`, which
/// nothing is bound to: every message is dead-lettered `unroutable`).
fn config(p: &str) -> String {
    format!(
        r#"
[amqp]
url = "{AMQP_URL}"
[http]
bind = ""
[[exchanges]]
name = "{p}.ex"
[[queues]]
name = "{p}.in"
kind = "classic"
bindings = [{{ exchange = "{p}.ex", routing_key = "in" }}]
[[stages]]
name = "fwd"
queue = "{p}.in"
output = {{ exchange = "{p}.ex", routing_key = "gone" }}
"#
    )
}

#[actix_rt::test]
async fn sign_in_csrf_origin_headers_and_hostile_dead_letters() {
    let p = unique("console");
    let dir = tempfile::tempdir().unwrap();
    let cfg = Config::from_toml(&config(&p)).unwrap();
    let _cleanup = Cleanup::new(AMQP_URL, &cfg);
    let d = start_daemon(dir.path(), &config(&p)).await;
    let base = &d.base;
    let plain = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();

    // Signed out: pages lead to the login; the live part tells htmx to leave.
    let r = plain
        .get(format!("{base}/ui/pipeline"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], "/ui/login");
    let r = plain
        .get(format!("{base}/ui/pipeline/live"))
        .header("hx-request", "true")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["hx-redirect"], "/ui/login");

    // A wrong token: 401, no session.
    let (lc, lcsrf) = login_form(&plain, base).await;
    let r = plain
        .post(format!("{base}/ui/login"))
        .header("cookie", &lc)
        .form(&[
            ("csrf", lcsrf.as_str()),
            ("token", "wrong-token-0123456789abc"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(!r
        .headers()
        .get_all("set-cookie")
        .iter()
        .any(|c| c.to_str().unwrap().starts_with("flowgate_session=")));
    // The login form itself needs its CSRF cookie.
    let r = plain
        .post(format!("{base}/ui/login"))
        .form(&[("csrf", lcsrf.as_str()), ("token", TOKEN)])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "a login without the form's cookie");

    // The session cookie is HttpOnly and SameSite=Strict.
    let (lc, lcsrf) = login_form(&plain, base).await;
    let r = plain
        .post(format!("{base}/ui/login"))
        .header("cookie", &lc)
        .form(&[("csrf", lcsrf.as_str()), ("token", TOKEN)])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    let set = r
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|c| c.to_str().unwrap().to_owned())
        .find(|c| c.starts_with("flowgate_session=") && !c.contains("Max-Age=0"))
        .unwrap();
    assert!(set.contains("HttpOnly"), "{set}");
    assert!(set.contains("SameSite=Strict"), "{set}");
    assert!(set.contains("Path=/ui"), "{set}");

    let (http, cookie, csrf) = sign_in(base, TOKEN).await;
    let page = http
        .get(format!("{base}/ui/pipeline"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    let csp = page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"),
        "{csp}"
    );
    assert_eq!(page.headers()["x-frame-options"], "DENY");
    assert_eq!(page.headers()["cache-control"], "no-store");
    let body = page.text().await.unwrap();
    assert!(
        body.contains("<strong id=\"who\">alice</strong>"),
        "the token's name"
    );

    // Changes: without the CSRF token, with a wrong one, from another
    // origin: 403 and nothing changed; with it: done.
    let pause = format!("{base}/ui/stages/fwd/pause");
    for (form, origin) in [
        (vec![], None),
        (vec![("csrf", "0".repeat(64))], None),
        (vec![("csrf", csrf.clone())], Some("http://evil.example")),
    ] {
        let mut req = http.post(&pause).header("cookie", &cookie).form(&form);
        if let Some(o) = origin {
            req = req.header("origin", o);
        }
        assert_eq!(
            req.send().await.unwrap().status(),
            403,
            "{form:?} {origin:?}"
        );
    }
    let ctl = |state: &'static str| {
        let base = base.clone();
        async move {
            let v: serde_json::Value = reqwest::Client::new()
                .get(format!("{base}/stages/fwd"))
                .bearer_auth(TOKEN)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            v["state"] == state
        }
    };
    assert!(ctl("running").await, "the forged pauses did nothing");
    let r = http
        .post(&pause)
        .header("cookie", &cookie)
        .header("x-csrf-token", &csrf)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303, "the header carries the token too");
    assert!(ctl("paused").await);
    let r = http
        .post(format!("{base}/ui/stages/fwd/resume"))
        .header("cookie", &cookie)
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    assert!(ctl("running").await);

    // The vendored htmx is served as pinned (VENDORED.md's checksum).
    let js = http
        .get(format!("{base}/ui/assets/htmx-2.0.4.min.js"))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    use sha2::Digest;
    let sum: String = sha2::Sha256::digest(&js)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(
        sum,
        "e209dda5c8235479f3166defc7750e1dbcd5a5c1808b7792fc2e6733768fb447"
    );

    // Hostile dead letters: a script in the message id, markup in a header,
    // a bidi override and control characters in the body, binary bytes.
    let client = Client::connect(AMQP_URL).await;
    let ex = format!("{p}.ex");
    let dlq = format!("{p}.in.dlq");
    let mut h = flowgate::lapin::types::FieldTable::default();
    h.insert(
        "x-app".into(),
        flowgate::lapin::types::AMQPValue::LongString("<img src=x onerror=alert(2)>".into()),
    );
    client
        .publish_props(
            &ex,
            "in",
            "invoice\u{202e}gnp.exe\u{1b}[31m </pre><script>alert(3)</script>".as_bytes(),
            flowgate::lapin::BasicProperties::default()
                .with_message_id("<script>alert(1)</script>".into())
                .with_headers(h),
        )
        .await;
    client
        .publish(&ex, "in", "bin-1", &[0xff, 0xfe, 0x00, 0x3c])
        .await;
    assert!(eventually(WAIT, || async { client.depth(&dlq).await == 2 }).await);
    let list = http
        .get(format!("{base}/ui/dlq/{dlq}?reason=unroutable"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let ids: Vec<&str> = list
        .split("<tr data-id=\"")
        .skip(1)
        .filter_map(|s| s.split('"').next())
        .collect();
    assert_eq!(ids.len(), 2, "{list}");
    for page in [
        list.clone(),
        http.get(format!("{base}/ui/dlq/{dlq}/m/{}", ids[0]))
            .header("cookie", &cookie)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    ] {
        assert!(!page.contains("<script>alert"), "{page}");
        assert!(!page.contains("<img src=x"), "{page}");
        assert!(
            !page.contains('\u{202e}') && !page.contains('\u{1b}'),
            "{page}"
        );
    }
    let msg = http
        .get(format!("{base}/ui/dlq/{dlq}/m/{}", ids[0]))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        msg.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
        "{msg}"
    );
    assert!(msg.contains("&lt;img src=x onerror=alert(2)&gt;"), "{msg}");
    assert!(msg.contains("invoice\\u{202e}gnp.exe\\u{1b}[31m"), "{msg}");
    let bin = http
        .get(format!("{base}/ui/dlq/{dlq}/m/{}", ids[1]))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        bin.contains("00000000  ff fe 00 3c"),
        "hex for binary: {bin}"
    );

    // The CLI says what the page shows (acceptance 3).
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_flowgate"))
            .arg("dlq")
            .args(args)
            .args(["--config"])
            .arg(&d.config)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let listed = cli(&[
        "list",
        "--queue",
        &format!("{p}.in"),
        "--reason",
        "unroutable",
        "--json",
    ]);
    let cli_ids: Vec<&str> = listed["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    assert_eq!(cli_ids, ids, "the same dead letters, in the same order");
    assert_eq!(
        listed["entries"][0]["message_id"],
        "<script>alert(1)</script>"
    );
    assert_eq!(listed["entries"][0]["reason"], "unroutable");
    assert_eq!(listed["entries"][0]["stage"], "fwd");
    let shown = cli(&["show", "--queue", &dlq, ids[1], "--json"]);
    let m = &shown["messages"][0];
    assert_eq!(m["id"], ids[1]);
    assert_eq!(m["message_id"], "bin-1");
    assert_eq!(m["body"]["kind"], "binary");
    let dump = m["body"]["shown"].as_str().unwrap();
    assert!(dump.starts_with("00000000  ff fe 00 3c"), "{dump}");
    assert!(
        bin.contains(&dump.replace('<', "&lt;")),
        "the page shows the CLI's dump (escaped)"
    );
    let by_id = cli(&["show", "--queue", &dlq, "bin-1", "--json"]);
    assert_eq!(by_id["messages"][0]["id"], ids[1], "by message id too");
    assert_eq!(client.depth(&dlq).await, 2, "reading removed nothing");

    // Sign out: the session is gone.
    let r = http
        .post(format!("{base}/ui/logout"))
        .header("cookie", &cookie)
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    let r = http
        .get(format!("{base}/ui/pipeline"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303, "signed out");
}

#[actix_rt::test]
async fn nothing_is_served_without_a_management_bind_or_with_the_console_off() {
    let p = unique("console-off");
    let mut cfg = chain_config(&p, &["forward"], 10);
    cfg.queues[0].kind = QueueKind::Classic;
    let _cleanup = Cleanup::new(AMQP_URL, &cfg);
    // No `[management] bind`: no listener at all, and the scrape port has no /ui.
    let port = free_port();
    cfg.http.bind = format!("127.0.0.1:{port}");
    let h = Engine::builder()
        .config(cfg.clone())
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    assert!(h.management_addr().is_none());
    let r = reqwest::get(format!("http://127.0.0.1:{port}/ui/login"))
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    h.shutdown().await;

    // A bind with `console = false`: the API answers, /ui does not.
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, format!("{TOKEN}\n")).unwrap();
    cfg.http.bind = String::new();
    cfg.management.bind = "127.0.0.1:0".into();
    cfg.management.token_file = Some(tokens);
    cfg.management.console = false;
    let h = Engine::builder()
        .config(cfg)
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let base = format!("http://{}", h.management_addr().unwrap());
    let api = reqwest::Client::new()
        .get(format!("{base}/status"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(api.status(), 200);
    for path in ["/ui/login", "/ui/pipeline", "/ui/assets/console.css"] {
        let r = reqwest::get(format!("{base}{path}")).await.unwrap();
        assert_eq!(r.status(), 404, "{path}");
    }
    h.shutdown().await;
}
