//! `flowgate-orders demo` (what `scripts/demo.sh`, the README's first command, runs), as a user runs it.

use std::process::Command;

#[test]
fn demo_runs_the_order_pipeline_and_exits_zero() {
    let out = Command::new(env!("CARGO_BIN_EXE_flowgate-orders"))
        .args(["demo", "--quiet", "--orders", "600", "--rate", "300/s"])
        .env_remove("FLOWGATE__AMQP__URL")
        .output()
        .expect("demo runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "exit 0\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    for line in [
        "orders sent",
        "accepted (202)",
        "shipped",
        "order→shipped p99",
        "peak queue depth",
    ] {
        assert!(stdout.contains(line), "summary shows `{line}`:\n{stdout}");
    }
    let lost = stdout
        .lines()
        .find(|l| l.contains("lost (no final status)"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|n| n.parse::<u64>().ok());
    assert_eq!(lost, Some(0), "no order lost:\n{stdout}");
    // The summary's counts: orders went through (a run where the gateway
    // refused every order is no demo), and each accepted one ended shipped
    // or dead-lettered.
    let count = |label: &str| {
        stdout
            .lines()
            .find(|l| l.trim_start().starts_with(label))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("summary line `{label}`:\n{stdout}"))
    };
    let (accepted, shipped, failed) = (
        count("accepted (202)"),
        count("shipped"),
        count("dead-lettered"),
    );
    assert!(accepted > 0, "orders were accepted:\n{stdout}");
    assert_eq!(
        shipped + failed,
        accepted,
        "every accepted order shipped or failed:\n{stdout}"
    );
    // The ledger on PostgreSQL (the demo's own database): the inbox's and
    // the relay's figures, and the effects counted in the database.
    assert!(
        stdout.contains("ledger: PostgreSQL database"),
        "the demo runs on PostgreSQL:\n{stdout}"
    );
    assert!(
        stdout.contains("inbox hits (redeliveries absorbed)"),
        "{stdout}"
    );
    assert!(
        count("outbox relayed") >= 3 * shipped,
        "every service's event went through the outbox:\n{stdout}"
    );
    assert!(
        stdout.contains(&format!(
            "orders reserved {shipped}, charged {shipped}, shipped {shipped}; duplicate effects 0; outbox left 0"
        )),
        "each effect once, in the database:\n{stdout}"
    );
    assert!(stdout.contains("topology removed"), "cleans up:\n{stdout}");
}

#[test]
fn demo_without_a_broker_exits_non_zero_at_once_saying_how_to_start_one() {
    let out = Command::new(env!("CARGO_BIN_EXE_flowgate-orders"))
        .args([
            "demo",
            "--quiet",
            "--url",
            "amqp://guest:guest@127.0.0.1:1/%2f",
        ])
        .output()
        .expect("demo runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "exit 3; stderr:\n{stderr}");
    assert!(stderr.contains("no RabbitMQ broker answers"), "{stderr}");
    assert!(
        stderr.contains("rabbitmq-server"),
        "says how to start one: {stderr}"
    );
    assert!(
        !stderr.contains("guest:guest"),
        "no credentials printed: {stderr}"
    );
}

#[test]
fn demo_without_postgresql_exits_non_zero_at_once_saying_how_to_start_it() {
    let out = Command::new(env!("CARGO_BIN_EXE_flowgate-orders"))
        .args([
            "demo",
            "--quiet",
            "--postgres-url",
            "postgres://postgres:postgres@127.0.0.1:1/postgres",
        ])
        .env_remove("FLOWGATE__AMQP__URL")
        .output()
        .expect("demo runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "exit 3; stderr:\n{stderr}");
    assert!(stderr.contains("127.0.0.1:1"), "{stderr}");
    assert!(stderr.contains("scripts/services.sh"), "{stderr}");
    assert!(stderr.contains("--no-postgres"), "{stderr}");
    assert!(
        !stderr.contains("postgres:postgres@"),
        "no credentials echoed: {stderr}"
    );
}
