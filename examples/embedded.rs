//! flowgate embedded in a host application: a Rust handler per stage.
//!
//! Declares a small two-stage pipeline on the local broker (`enrich` adds a
//! field to a JSON order and forwards it, `audit` is a sink that counts),
//! publishes a few orders through the engine handle, waits for them and shuts
//! down gracefully.
//!
//! Run: `cargo run --example embedded` (needs RabbitMQ on 127.0.0.1:5672).

use flowgate::handler_fn;
use flowgate::{Config, Engine};
use flowgate::{Delivery, HandlerError, Outcome, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

fn config(suffix: &str) -> Result<Config, flowgate::ConfigError> {
    Config::from_toml(&format!(
        r#"
        [http]
        bind = "127.0.0.1:0"

        [[exchanges]]
        name = "example-{suffix}"

        [[queues]]
        name = "example-{suffix}.orders"
        bindings = [{{ exchange = "example-{suffix}", routing_key = "order.created" }}]

        [[queues]]
        name = "example-{suffix}.enriched"
        bindings = [{{ exchange = "example-{suffix}", routing_key = "order.enriched" }}]

        [[stages]]
        name = "enrich"
        queue = "example-{suffix}.orders"
        handler = "enrich"
        prefetch = 20

        [[stages]]
        name = "audit"
        queue = "example-{suffix}.enriched"
        handler = "audit"
        "#
    ))
}

fn main() -> anyhow::Result<()> {
    flowgate::run_system(async {
        let suffix = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
        let cfg = config(&suffix)?;
        let exchange = format!("example-{suffix}");
        let audited = Arc::new(AtomicUsize::new(0));

        let ex = exchange.clone();
        let enrich = handler_fn(move |d: Delivery| {
            let ex = ex.clone();
            async move {
                // A malformed body is a permanent failure: it is dead-lettered
                // with reason `handler-error` and the error text.
                let mut order: serde_json::Value = serde_json::from_slice(&d.body)?;
                order["enriched"] = serde_json::Value::Bool(true);
                let out = Output {
                    body: serde_json::to_vec(&order)?.into(),
                    ..d.forward(&ex, "order.enriched")
                };
                Ok::<_, HandlerError>(Outcome::ack_with(vec![out]))
            }
        });
        let count = audited.clone();
        let audit = handler_fn(move |_d: Delivery| {
            let count = count.clone();
            async move {
                count.fetch_add(1, Ordering::SeqCst);
                Ok(Outcome::ack())
            }
        });

        let handle = Engine::builder()
            .config(cfg.clone())
            .handler("enrich", enrich)
            .handler("audit", audit)
            .build()?
            .start()
            .await?;
        handle.wait_ready(Duration::from_secs(10)).await;
        if let Some(addr) = handle.http_addr() {
            println!("engine ready; metrics at http://{addr}/metrics");
        }

        for i in 0..10 {
            let body = serde_json::json!({ "order_id": i, "total": 10 * i }).to_string();
            handle
                .publish(
                    Output::new(exchange.as_str(), "order.created", body)
                        .with_message_id(format!("order-{i}")),
                )
                .await?;
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while audited.load(Ordering::SeqCst) < 10 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        println!("audited {} orders", audited.load(Ordering::SeqCst));

        let report = handle.shutdown().await;
        println!("shutdown clean: {}", report.clean);
        delete_topology(&cfg).await?;
        Ok(())
    })
}

/// Removes what the example declared.
async fn delete_topology(cfg: &Config) -> anyhow::Result<()> {
    use flowgate::lapin::{Connection, ConnectionProperties};
    let conn = Connection::connect(&cfg.amqp.url, ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    flowgate::topology::delete(&ch, cfg).await?;
    ch.close(200, "done".into()).await?;
    conn.close(200, "done".into()).await?;
    Ok(())
}
