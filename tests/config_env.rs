//! `check-config` and the environment (issue 9 item 7): one array element
//! can be overridden (`FLOWGATE__STAGES__0__PREFETCH`), and names and
//! routing keys over 255 bytes are rejected with exit status 2, naming the
//! key.

use std::io::Write;
use std::process::{Command, Output};

const VALID: &str = r#"
[[exchanges]]
name = "shop"
[[queues]]
name = "orders"
bindings = [{ exchange = "shop", routing_key = "order.created" }]
[[queues]]
name = "payments"
bindings = [{ exchange = "shop", routing_key = "order.reserved" }]
[[stages]]
name = "reserve"
queue = "orders"
handler = "forward"
prefetch = 10
output = { exchange = "shop", routing_key = "order.reserved" }
[[stages]]
name = "pay"
queue = "payments"
handler = "sink"
"#;

fn check(text: &str, env: &[(&str, &str)]) -> Output {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(text.as_bytes()).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_flowgate"));
    cmd.args(["check-config", "--config"]).arg(f.path());
    // Only the variables of this test reach the check.
    for (k, _) in std::env::vars() {
        if k.to_ascii_uppercase().starts_with("FLOWGATE__") {
            cmd.env_remove(k);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn assert_ok(text: &str, env: &[(&str, &str)]) {
    let out = check(text, env);
    assert!(
        out.status.success(),
        "{env:?} accepted; stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn assert_rejected(text: &str, env: &[(&str, &str)], key: &str, why: &str) {
    let out = check(text, env);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "exit status 2 for {key}; stderr: {err}"
    );
    assert!(
        err.contains(&format!("`{key}`")),
        "names key `{key}`: {err}"
    );
    assert!(err.contains(why), "says why (`{why}`): {err}");
}

#[test]
fn one_stage_is_tuned_from_the_environment() {
    assert_ok(VALID, &[("FLOWGATE__STAGES__0__PREFETCH", "7")]);
    assert_ok(
        VALID,
        &[
            ("FLOWGATE__STAGES__1__PREFETCH", "200"),
            ("FLOWGATE__STAGES__0__CONCURRENCY", "4"),
            ("FLOWGATE__QUEUES__1__BINDINGS__0__ROUTING_KEY", "order.#"),
            // A plain key still works beside them.
            ("FLOWGATE__PUBLISHER__MAX_UNCONFIRMED", "64"),
        ],
    );
}

#[test]
fn the_element_override_reaches_validation() {
    // The value lands on stage 1 only, and is checked like the file's.
    assert_rejected(
        VALID,
        &[("FLOWGATE__STAGES__1__PREFETCH", "0")],
        "stages[1].prefetch",
        "must be between 1 and 65535",
    );
    assert_rejected(
        VALID,
        &[("FLOWGATE__STAGES__0__PREFETCH", "many")],
        "stages[0].prefetch",
        "invalid type",
    );
}

#[test]
fn an_element_the_file_does_not_declare_is_an_error() {
    assert_rejected(
        VALID,
        &[("FLOWGATE__STAGES__2__PREFETCH", "7")],
        "stages[2]",
        "FLOWGATE__STAGES__2__PREFETCH overrides element 2, but the file declares 2",
    );
}

#[test]
fn names_and_routing_keys_over_255_bytes_are_rejected() {
    let long = "n".repeat(256);
    let cases = [
        (
            VALID.replace("name = \"shop\"", &format!("name = \"{long}\"")),
            "exchanges[0].name",
        ),
        (
            VALID.replace("name = \"orders\"", &format!("name = \"{long}\"")),
            "queues[0].name",
        ),
        (
            VALID.replace(
                "routing_key = \"order.created\"",
                &format!("routing_key = \"{long}\""),
            ),
            "queues[0].bindings[0].routing_key",
        ),
        (
            VALID.replace(
                "output = { exchange = \"shop\", routing_key = \"order.reserved\" }",
                &format!("output = {{ exchange = \"shop\", routing_key = \"{long}\" }}"),
            ),
            "stages[0].output.routing_key",
        ),
        (
            VALID.replace(
                "output = { exchange = \"shop\",",
                &format!("output = {{ exchange = \"amq.{long}\","),
            ),
            "stages[0].output.exchange",
        ),
        (
            VALID.replace("name = \"reserve\"", &format!("name = \"{long}\"")),
            "stages[0].name",
        ),
    ];
    for (text, key) in cases {
        assert_rejected(&text, &[], key, "at most");
    }
    // From the environment too.
    assert_rejected(
        VALID,
        &[("FLOWGATE__STAGES__0__OUTPUT__ROUTING_KEY", &long)],
        "stages[0].output.routing_key",
        "is 256 bytes; at most 255",
    );
    // 255 bytes is fine.
    let key255 = "k".repeat(255);
    assert_ok(
        &VALID.replace(
            "routing_key = \"order.created\"",
            &format!("routing_key = \"{key255}\""),
        ),
        &[],
    );
}
