//! Invalid configurations exit with status 2 and name the offending key.

use std::io::Write;
use std::process::{Command, Output};

const VALID: &str = r#"
[amqp]
url = "amqp://app:hunter2@127.0.0.1:5672/%2f"
[[exchanges]]
name = "shop"
[[queues]]
name = "orders"
bindings = [{ exchange = "shop", routing_key = "order.created" }]
[[stages]]
name = "reserve"
queue = "orders"
handler = "forward"
prefetch = 10
output = { exchange = "shop", routing_key = "order.reserved" }
"#;

fn check(text: &str, env: &[(&str, &str)]) -> Output {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(text.as_bytes()).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_flowgate"));
    cmd.args(["check-config", "--config"]).arg(f.path());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn assert_rejected(text: &str, env: &[(&str, &str)], key: &str, why: &str) {
    assert!(!why.is_empty(), "an empty `why` matches any message");
    let out = check(text, env);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "exit status 2 for {key}; stderr: {err}"
    );
    assert!(err.contains(key), "names key `{key}`: {err}");
    assert!(err.contains(why), "says why (`{why}`): {err}");
    assert!(!err.contains("hunter2"), "never prints the password: {err}");
}

#[test]
fn the_valid_config_passes() {
    let out = check(VALID, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("hunter2"));
}

#[test]
fn the_shipped_demo_config_passes() {
    let out = Command::new(env!("CARGO_BIN_EXE_flowgate"))
        .args([
            "check-config",
            "--config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/config/demo.toml"),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn unknown_handler() {
    assert_rejected(
        &VALID.replace("handler = \"forward\"", "handler = \"teleport\""),
        &[],
        "stages[0].handler",
        "unknown handler",
    );
}

#[test]
fn stage_queue_not_declared() {
    assert_rejected(
        &VALID.replace("queue = \"orders\"", "queue = \"nowhere\""),
        &[],
        "stages[0].queue",
        "not declared",
    );
}

#[test]
fn prefetch_zero() {
    assert_rejected(
        &VALID.replace("prefetch = 10", "prefetch = 0"),
        &[],
        "stages[0].prefetch",
        "between 1 and 65535",
    );
}

#[test]
fn malformed_url() {
    assert_rejected(
        &VALID.replace(
            "amqp://app:hunter2@127.0.0.1:5672/%2f",
            "amqp://app:hunter2@[::1/x",
        ),
        &[],
        "amqp.url",
        "malformed",
    );
    assert_rejected(
        &VALID.replace("amqp://", "http://"),
        &[],
        "amqp.url",
        "scheme",
    );
}

#[test]
fn misspelled_key() {
    assert_rejected(
        &VALID.replace("prefetch = 10", "prefetsh = 10"),
        &[],
        "prefetsh",
        "unknown field",
    );
}

#[test]
fn wrong_type() {
    assert_rejected(
        &VALID.replace("prefetch = 10", "prefetch = \"lots\""),
        &[],
        "prefetch",
        "invalid",
    );
}

#[test]
fn bad_duration() {
    assert_rejected(
        &format!("{VALID}\n[shutdown]\ngrace = \"soon\"\n"),
        &[],
        "shutdown.grace",
        "expected a duration",
    );
}

#[test]
fn forward_without_output() {
    assert_rejected(
        &VALID.replace(
            "output = { exchange = \"shop\", routing_key = \"order.reserved\" }",
            "",
        ),
        &[],
        "stages[0].output",
        "needs an output",
    );
}

#[test]
fn binding_to_undeclared_exchange() {
    assert_rejected(
        &VALID.replace(
            "bindings = [{ exchange = \"shop\"",
            "bindings = [{ exchange = \"shopp\"",
        ),
        &[],
        "queues[0].bindings[0].exchange",
        "not declared",
    );
}

#[test]
fn bad_concurrency_range() {
    assert_rejected(
        &VALID.replace(
            "prefetch = 10",
            "prefetch = 10\nconcurrency = { min = 8, max = 2 }",
        ),
        &[],
        "stages[0].concurrency",
        "min <= max",
    );
}

#[test]
fn environment_overrides_are_validated_too() {
    // FLOWGATE__HTTP__BIND overrides [http] bind; a bad value is caught and named.
    assert_rejected(
        VALID,
        &[("FLOWGATE__HTTP__BIND", "not-an-address")],
        "http.bind",
        "not an address",
    );
    // and a good override is accepted
    let out = check(VALID, &[("FLOWGATE__HTTP__BIND", "127.0.0.1:19999")]);
    assert!(out.status.success());
}

#[test]
fn missing_file() {
    let out = Command::new(env!("CARGO_BIN_EXE_flowgate"))
        .args(["check-config", "--config", "/nonexistent/flowgate.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}
