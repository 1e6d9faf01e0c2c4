//! The daemon: SIGTERM mid-flow drains and exits 0; nothing is lost across a restart.

use flowgate_testkit as common;

use common::*;
use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn write_config(prefix: &str, grace: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    let ex = format!("{prefix}.ex");
    let mut text = format!(
        "[amqp]\nconnection_name = \"{prefix}\"\n[http]\nbind = \"127.0.0.1:0\"\n[shutdown]\ngrace = \"{grace}\"\n\
         [[exchanges]]\nname = \"{ex}\"\n"
    );
    let keys = ["in", "hop1", "hop2", "hop3"];
    let queues = ["s1", "s2", "s3", "sink"];
    for (q, k) in queues.iter().zip(keys) {
        text += &format!("[[queues]]\nname = \"{prefix}.{q}\"\nbindings = [{{ exchange = \"{ex}\", routing_key = \"{k}\" }}]\n");
    }
    for i in 1..=3 {
        text += &format!(
            "[[stages]]\nname = \"s{i}\"\nqueue = \"{prefix}.s{i}\"\nhandler = \"forward\"\nprefetch = 20\nconcurrency = 4\n\
             delay = \"2ms\"\noutput = {{ exchange = \"{ex}\", routing_key = \"hop{i}\" }}\n"
        );
    }
    f.write_all(text.as_bytes()).unwrap();
    f
}

fn spawn_daemon(config: &std::path::Path, log: &std::path::Path) -> Child {
    let log = std::fs::File::create(log).unwrap();
    Command::new(env!("CARGO_BIN_EXE_flowgate"))
        .args(["run", "--config"])
        .arg(config)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("daemon starts")
}

#[actix_rt::test]
async fn sigterm_mid_flow_exits_zero_within_grace_and_loses_nothing() {
    let prefix = unique("sigterm");
    let cfg_file = write_config(&prefix, "20s");
    let cfg = flowgate::Config::load(cfg_file.path()).unwrap();
    let _cleanup = Cleanup::new(AMQP_URL, &cfg);
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut daemon = ChildGuard(spawn_daemon(cfg_file.path(), log.path()));
    let client = Client::connect(AMQP_URL).await;
    // The daemon declares the topology; wait for it.
    let sink = format!("{prefix}.sink");
    assert!(
        wait_for_queue(&client, &sink, Duration::from_secs(30)).await,
        "daemon declared its topology"
    );
    let n = 3000;
    let ids: Vec<String> = (0..n).map(|i| format!("id-{i}")).collect();
    client
        .publish_many(&format!("{prefix}.ex"), "in", &ids, &[1u8; 256])
        .await;
    assert!(
        eventually(Duration::from_secs(60), || async {
            client.depth(&sink).await > 50
        })
        .await,
        "work is flowing"
    );

    let sent = Instant::now();
    // SAFETY: plain kill(2) on our own child's pid.
    unsafe { libc::kill(daemon.0.id() as i32, libc::SIGTERM) };
    let status = loop {
        if let Some(s) = daemon.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            sent.elapsed() < Duration::from_secs(25),
            "daemon exits within the grace period"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let logs =
        String::from_utf8_lossy(&std::fs::read(log.path()).expect("daemon log")).into_owned();
    assert_eq!(status.code(), Some(0), "exit status 0; log:\n{logs}");
    assert!(logs.contains("shutdown complete"), "log:\n{logs}");

    // Every id is in the sink or still queued upstream.
    let mut accounted = 0u32;
    for q in ["s1", "s2", "s3", "sink"] {
        accounted += client.depth(&format!("{prefix}.{q}")).await;
    }
    assert!(
        accounted >= n as u32,
        "all {n} accounted for after stop, found {accounted}"
    );

    // A fresh start finishes the job; every id reaches the sink.
    let mut daemon = ChildGuard(spawn_daemon(cfg_file.path(), log.path()));
    let got = client.collect(&sink, n, Duration::from_secs(120)).await;
    let c = counts(got.into_iter().map(|(id, _)| id));
    assert_eq!(c.len(), n, "every id reached the sink after the restart");
    unsafe { libc::kill(daemon.0.id() as i32, libc::SIGTERM) };
    assert_eq!(daemon.0.wait().unwrap().code(), Some(0));
    for q in &cfg.queues {
        assert_drained(&client, &q.name).await;
        assert_drained(&client, &format!("{}.dlq", q.name)).await;
    }
}
