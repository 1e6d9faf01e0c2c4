//! Failure semantics, DLQ tools: issue 4 acceptance 7 (`flowgate dlq ...`).

use flowgate_testkit as common;

use common::*;
use flowgate::handler_fn;
use flowgate::Engine;
use flowgate::Outcome;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

fn cli(config: &std::path::Path, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_flowgate"))
        .arg("dlq")
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .expect("run flowgate");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[actix_rt::test]
async fn replay_moves_dead_letters_back_and_the_fixed_handler_processes_them() {
    let prefix = unique("dlq");
    let mut cfg = chain_config(&prefix, &["fragile"], 10);
    cfg.stages[0].dedup = flowgate::config::DedupMode::Memory;
    let _cleanup = Cleanup::new(AMQP_URL, &cfg);
    let ex = format!("{prefix}.ex");
    let broken = Arc::new(AtomicBool::new(true));
    let handled = Arc::new(AtomicUsize::new(0));
    let (b2, h2, ex2) = (broken.clone(), handled.clone(), ex.clone());
    let handle = Engine::builder()
        .config(cfg.clone())
        .handler(
            "fragile",
            handler_fn(move |d| {
                let (broken, handled, ex) = (b2.clone(), h2.clone(), ex2.clone());
                async move {
                    if broken.load(Ordering::SeqCst) {
                        return Err("downstream schema mismatch".into());
                    }
                    handled.fetch_add(1, Ordering::SeqCst);
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
    let ids: Vec<String> = (0..5).map(|i| format!("r-{i}")).collect();
    client.publish_many(&ex, "in", &ids, b"{}").await;
    let dlq = format!("{prefix}.s1.dlq");
    assert!(
        eventually(Duration::from_secs(20), || async {
            client.depth(&dlq).await == 5
        })
        .await,
        "five dead letters"
    );

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("flowgate.toml");
    std::fs::write(
        &file,
        format!("[amqp]\nurl = \"{AMQP_URL}\"\n[[queues]]\nname = \"{prefix}.s1\"\n"),
    )
    .unwrap();

    let (ok, out) = cli(&file, &["stats", "--queue", &format!("{prefix}.s1")]);
    assert!(ok, "{out}");
    assert!(out.contains("5 dead letters"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.trim_start().starts_with("handler-error") && l.trim_end().ends_with(" 5")),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.trim_start().starts_with("s1 ") && l.trim_end().ends_with(" 5")),
        "{out}"
    );
    assert_eq!(client.depth(&dlq).await, 5, "stats leaves the dead letters");

    // A replay restricted to another reason moves nothing.
    let (ok, out) = cli(&file, &["replay", "--queue", &dlq, "--reason", "panic"]);
    assert!(ok, "{out}");
    assert!(out.contains("replayed 0, skipped 5"), "{out}");

    broken.store(false, Ordering::SeqCst);
    let (ok, out) = cli(
        &file,
        &["replay", "--queue", &dlq, "--reason", "handler-error"],
    );
    assert!(ok, "{out}");
    assert!(out.contains("replayed 5"), "{out}");
    let sink = client
        .collect(&format!("{prefix}.sink"), 5, Duration::from_secs(20))
        .await;
    let c = counts(sink.into_iter().map(|(id, _)| id));
    assert_eq!(c.len(), 5, "every replayed message processed");
    assert!(c.values().all(|n| *n == 1));
    assert_eq!(handled.load(Ordering::SeqCst), 5);
    assert_eq!(client.depth(&dlq).await, 0, "the DLQ is empty");

    // Purge on a DLQ that holds dead letters: refused without --yes (and
    // nothing removed), then every one of them removed and counted.
    broken.store(true, Ordering::SeqCst);
    let more: Vec<String> = (0..3).map(|i| format!("p-{i}")).collect();
    client.publish_many(&ex, "in", &more, b"{}").await;
    assert!(
        eventually(Duration::from_secs(20), || async {
            client.depth(&dlq).await == 3
        })
        .await,
        "three new dead letters"
    );
    let (ok, out) = cli(&file, &["purge", "--queue", &dlq]);
    assert!(!ok, "purge without --yes refuses: {out}");
    assert_eq!(
        client.depth(&dlq).await,
        3,
        "a refused purge removes nothing"
    );
    let (ok, out) = cli(&file, &["purge", "--queue", &dlq, "--yes"]);
    assert!(ok && out.contains("purged 3"), "{out}");
    assert_eq!(client.depth(&dlq).await, 0, "the purge emptied the DLQ");
    let (ok, out) = cli(&file, &["purge", "--queue", &dlq, "--yes"]);
    assert!(ok && out.contains("purged 0"), "{out}");
    assert_eq!(handled.load(Ordering::SeqCst), 5, "purged, not processed");

    handle.shutdown().await;
}
