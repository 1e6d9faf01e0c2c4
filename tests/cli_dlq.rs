//! `flowgate dlq stats|replay|purge --json` against the real broker: the
//! JSON parses and says what the broker then shows.

use flowgate_testkit as common;

use common::*;
use flowgate::handler_fn;
use flowgate::Engine;
use flowgate::Outcome;
use serde_json::Value;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Runs `flowgate dlq ARGS --json` with the config from `FLOWGATE_CONFIG`;
/// returns stdout parsed as one JSON object, and stderr.
fn dlq_json(config: &std::path::Path, args: &[&str]) -> (Value, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_flowgate"))
        .arg("dlq")
        .args(args)
        .arg("--json")
        .env("FLOWGATE_CONFIG", config)
        .output()
        .expect("run flowgate");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{args:?}: {stdout}{stderr}");
    assert_eq!(
        stdout.lines().count(),
        1,
        "one JSON line on stdout: {stdout}"
    );
    let v: Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("{args:?} printed no JSON ({e}): {stdout}"));
    (v, stderr)
}

#[actix_rt::test]
async fn dlq_json_output_parses_and_matches_the_broker() {
    let prefix = unique("clidlq");
    let mut cfg = chain_config(&prefix, &["fragile"], 10);
    cfg.stages[0].dedup = flowgate::config::DedupMode::Memory;
    let _cleanup = Cleanup::new(AMQP_URL, &cfg);
    let ex = format!("{prefix}.ex");
    let broken = Arc::new(AtomicBool::new(true));
    let (b2, ex2) = (broken.clone(), ex.clone());
    let handle = Engine::builder()
        .config(cfg.clone())
        .handler(
            "fragile",
            handler_fn(move |d| {
                let (broken, ex) = (b2.clone(), ex2.clone());
                async move {
                    if broken.load(Ordering::SeqCst) {
                        return Err("downstream schema mismatch".into());
                    }
                    Ok(Outcome::ack_with(vec![d.forward(&ex, "hop1")]))
                }
            }),
        )
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    assert!(handle.wait_ready(Duration::from_secs(20)).await);
    let client = Client::connect(AMQP_URL).await;
    let ids: Vec<String> = (0..4).map(|i| format!("j-{i}")).collect();
    client.publish_many(&ex, "in", &ids, b"{}").await;
    let dlq = format!("{prefix}.s1.dlq");
    assert!(
        eventually(Duration::from_secs(20), || async {
            client.depth(&dlq).await == 4
        })
        .await,
        "four dead letters"
    );

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("flowgate.toml");
    std::fs::write(
        &file,
        format!("[amqp]\nurl = \"{AMQP_URL}\"\n[[queues]]\nname = \"{prefix}.s1\"\n"),
    )
    .unwrap();

    // stats: the configured queue resolves to its DLQ.
    let (stats, _) = dlq_json(&file, &["stats", "--queue", &format!("{prefix}.s1")]);
    assert_eq!(stats["queue"], dlq.as_str(), "{stats}");
    assert_eq!(stats["total"], 4, "{stats}");
    assert_eq!(stats["by_reason"]["handler-error"], 4, "{stats}");
    assert_eq!(stats["by_stage"]["s1"], 4, "{stats}");
    assert_eq!(client.depth(&dlq).await, 4, "stats leaves them");

    // replay (stderr is not a terminal: no progress bar drawn).
    broken.store(false, Ordering::SeqCst);
    let (replay, stderr) = dlq_json(&file, &["replay", "--queue", &dlq, "--limit", "3"]);
    assert_eq!(replay["queue"], dlq.as_str(), "{replay}");
    assert_eq!(replay["replayed"], 3, "{replay}");
    assert_eq!(replay["skipped"], 1, "over the limit: {replay}");
    assert_eq!(replay["failed"], 0, "{replay}");
    assert!(
        !stderr.contains("replaying ["),
        "no progress bar off a terminal: {stderr}"
    );
    let sink = client
        .collect(&format!("{prefix}.sink"), 3, Duration::from_secs(20))
        .await;
    assert_eq!(sink.len(), 3, "the replayed three were processed");
    assert_eq!(client.depth(&dlq).await, 1, "one left in the DLQ");

    // On a terminal (a pty from util-linux `script`) the replay draws its
    // progress bar on stderr. A reason nothing has: the dead letter stays.
    let cmd = format!(
        "{} dlq replay --queue {dlq} --reason no-such-reason",
        env!("CARGO_BIN_EXE_flowgate")
    );
    let tty = std::process::Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .env("FLOWGATE_CONFIG", &file)
        .env("COLUMNS", "120")
        .env("LINES", "40")
        .output()
        .expect("run script(1)");
    let screen = String::from_utf8_lossy(&tty.stdout);
    assert!(tty.status.success(), "{screen}");
    assert!(
        screen.contains("replaying ["),
        "a progress bar on a terminal: {screen:?}"
    );
    assert!(screen.contains("replayed 0, skipped 1"), "{screen:?}");
    assert_eq!(client.depth(&dlq).await, 1, "still one in the DLQ");

    // purge
    let (purge, _) = dlq_json(&file, &["purge", "--queue", &dlq, "--yes"]);
    assert_eq!(purge["queue"], dlq.as_str(), "{purge}");
    assert_eq!(purge["purged"], 1, "{purge}");
    assert_eq!(client.depth(&dlq).await, 0, "the purge emptied the DLQ");

    handle.shutdown().await;
}
