//! Messages from non-Rust clients pass a `forward` stage unchanged (issue 9
//! item 6): Python's pika and Node's amqplib publish every basic property
//! and every AMQP field-table type (scripts in tests/foreign/), each message
//! both through the stage and straight into a control queue; the stage's
//! output must equal the broker's untouched copy — body, headers (typed, at
//! every depth) and every property, the delivery mode included.
//!
//! The clients are installed by tests/foreign/setup.sh into the build's
//! target dir. If that fails the test fails under `CI=true`, and says loudly
//! that it skipped otherwise.

use flowgate_testkit as common;

use common::*;
use flowgate::config::{QueueConfig, QueueKind};
use lapin::options::{BasicGetOptions, BasicPublishOptions};
use lapin::types::FieldTable;
use lapin::BasicProperties;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

#[path = "foreign/clients.rs"]
mod clients;

use clients::{clients_or_skip, FOREIGN};

/// Runs one client's publish script; panics with its output if it fails.
async fn publish_with(client: &str, dir: &Path, exchange: &str, control: &str) -> usize {
    let mut cmd = match client {
        "pika" => {
            let mut c = tokio::process::Command::new(dir.join("venv/bin/python"));
            c.arg(format!("{FOREIGN}/publish_pika.py"));
            c
        }
        "amqplib" => {
            let mut c = tokio::process::Command::new("node");
            c.arg(format!("{FOREIGN}/publish_amqplib.js"))
                .env("NODE_PATH", dir.join("node/node_modules"));
            c
        }
        other => panic!("unknown client {other}"),
    };
    let out = cmd
        .args([
            "amqp://guest:guest@127.0.0.1:5672/%2f",
            exchange,
            "in",
            control,
        ])
        .kill_on_drop(true)
        .output()
        .await
        .expect("client runs");
    assert!(
        out.status.success(),
        "{client} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("the script prints how many messages it sent")
}

/// Every message in `queue` (basic.get, acked), by message id, or by body
/// when it has none.
async fn drain(client: &Client, queue: &str) -> BTreeMap<String, (Vec<u8>, BasicProperties)> {
    let mut out = BTreeMap::new();
    while let Some(m) = client
        .ch
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .expect("basic.get")
    {
        let d = m.delivery;
        let key = d
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.to_string())
            .unwrap_or_else(|| String::from_utf8_lossy(&d.data).into_owned());
        assert!(
            out.insert(key.clone(), (d.data, d.properties)).is_none(),
            "{key} twice in {queue}"
        );
    }
    out
}

/// One `forward` stage (quorum input `s1`) into a classic sink: a quorum
/// queue adds `x-delivery-count` to what `basic.get` returns, which would
/// hide a header the stage added or failed to remove.
fn forward_config(prefix: &str) -> flowgate::Config {
    let mut cfg = chain_config(prefix, &["forward"], 10);
    let sink = &mut cfg.queues[1];
    assert!(sink.name.ends_with(".sink"));
    sink.kind = QueueKind::Classic;
    sink.delivery_limit = None;
    cfg
}

async fn foreign_messages_pass_forward_unchanged(client_name: &str) {
    let Some(dir) = clients_or_skip(client_name) else {
        return;
    };
    let prefix = unique(&format!("foreign-{client_name}"));
    let mut cfg = forward_config(&prefix);
    // The broker's own copy, for comparison, in a queue like the sink.
    let control = format!("{prefix}.control");
    let control_cfg = QueueConfig {
        name: control.clone(),
        bindings: vec![],
        dead_letter: false,
        ..cfg.queues[1].clone()
    };
    cfg.queues.push(control_cfg);
    let _cleanup = Cleanup::new(AMQP_URL, &cfg);
    let handle = flowgate::Engine::builder()
        .config(cfg.clone())
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    assert!(handle.wait_ready(Duration::from_secs(20)).await);

    let sent = publish_with(client_name, &dir, &format!("{prefix}.ex"), &control).await;
    let client = Client::connect(AMQP_URL).await;
    let sink = format!("{prefix}.sink");
    assert!(
        eventually(Duration::from_secs(30), || async {
            client.depth(&sink).await as usize == sent
        })
        .await,
        "{sent} forwarded (sink holds {})",
        client.depth(&sink).await
    );
    handle.shutdown().await;

    let forwarded = drain(&client, &sink).await;
    let direct = drain(&client, &control).await;
    assert_eq!(direct.len(), sent, "control copies");
    assert_eq!(
        forwarded.keys().collect::<Vec<_>>(),
        direct.keys().collect::<Vec<_>>()
    );
    for (key, (body, props)) in &direct {
        let (fbody, fprops) = &forwarded[key];
        assert_eq!(fbody, body, "{key}: body");
        // Field by field first, for a readable failure.
        assert_eq!(fprops.headers(), props.headers(), "{key}: headers");
        assert_eq!(
            fprops.delivery_mode(),
            props.delivery_mode(),
            "{key}: delivery mode"
        );
        assert_eq!(fprops, props, "{key}: properties");
    }

    // What the clients sent, spelled out: the stage kept each delivery
    // mode (transient, absent, persistent) and the properties arrived.
    let all = &forwarded[&format!("{client_name}-all-properties")].1;
    assert_eq!(*all.delivery_mode(), Some(1), "transient stays transient");
    assert_eq!(all.priority(), &Some(7));
    assert_eq!(all.user_id().as_ref().map(|s| s.as_str()), Some("guest"));
    let headers = all.headers().clone().unwrap_or_default();
    assert!(headers.inner().contains_key("nested"), "{headers:?}");
    assert!(headers.inner().contains_key("ключ ✓"), "{headers:?}");
    let bare = &forwarded[&format!("{client_name}-1 no properties")].1;
    assert_eq!(*bare.delivery_mode(), None, "no delivery mode gains none");
    let persistent = &forwarded[&format!("{client_name}-persistent-binary")].1;
    assert_eq!(*persistent.delivery_mode(), Some(2));
    assert!(forwarded[&format!("{client_name}-empty-body")].0.is_empty());
    client.delete_topology(&cfg).await;
}

#[actix_rt::test]
async fn pika_messages_pass_forward_unchanged() {
    foreign_messages_pass_forward_unchanged("pika").await;
}

#[actix_rt::test]
async fn amqplib_messages_pass_forward_unchanged() {
    foreign_messages_pass_forward_unchanged("amqplib").await;
}

/// `[publisher] force_persistent = true` makes every publish persistent.
#[actix_rt::test]
async fn force_persistent_makes_forwarded_messages_persistent() {
    let prefix = unique("foreign-force");
    let mut cfg = forward_config(&prefix);
    cfg.publisher.force_persistent = true;
    let _cleanup = Cleanup::new(AMQP_URL, &cfg);
    let handle = flowgate::Engine::builder()
        .config(cfg.clone())
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    assert!(handle.wait_ready(Duration::from_secs(20)).await);
    let client = Client::connect(AMQP_URL).await;
    for (id, mode) in [("transient", Some(1)), ("none", None)] {
        let mut props = BasicProperties::default().with_message_id(id.into());
        if let Some(m) = mode {
            props = props.with_delivery_mode(m);
        }
        let confirm = client
            .ch
            .basic_publish(
                format!("{prefix}.ex").as_str().into(),
                "in".into(),
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                b"{}",
                props,
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
        assert!(matches!(confirm, lapin::Confirmation::Ack(None)));
    }
    let sink = format!("{prefix}.sink");
    assert!(
        eventually(Duration::from_secs(30), || async {
            client.depth(&sink).await == 2
        })
        .await
    );
    handle.shutdown().await;
    let got = drain(&client, &sink).await;
    for id in ["transient", "none"] {
        assert_eq!(
            *got[id].1.delivery_mode(),
            Some(2),
            "{id} forced persistent"
        );
        assert_eq!(
            got[id].1.headers(),
            &None::<FieldTable>,
            "{id}: nothing else added"
        );
    }
    client.delete_topology(&cfg).await;
}
