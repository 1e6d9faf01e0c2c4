//! The order pipeline embedded in a host application.
//!
//! The host loads `config/orders.toml`, adds a stage of its own (an audit
//! log of shipped orders, a plain closure), starts the flow with the
//! built-in order services and the gateway, places one order over HTTP, and
//! watches it ship.
//!
//! ```sh
//! cargo run -p flowgate-orders --example orders_embedded
//! ```

use flowgate::config::{Binding, Concurrency, QueueConfig, QueueKind};
use flowgate::{handler_fn, Engine, Outcome, StageConfig};
use flowgate_orders::{self as orders, FlowConfig};
use std::time::Duration;

fn main() -> anyhow::Result<()> {
    flowgate::run_system(async {
        // A private copy of the topology, so the example never collides.
        let prefix = format!(
            "embedded-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..6]
        );
        let mut cfg = FlowConfig::default_flow()?.uniquely_named(&prefix);
        cfg.engine.http.bind = String::new();
        cfg.orders.gateway_bind = "127.0.0.1:0".into();

        // The host's own stage: every shipped order also lands in an audit queue.
        let audit_q = format!("{prefix}.audit");
        cfg.engine.queues.push(QueueConfig {
            name: audit_q.clone(),
            kind: QueueKind::Quorum,
            bindings: vec![Binding {
                exchange: cfg.orders.exchange.clone(),
                routing_key: "order.shipped".into(),
            }],
            dead_letter: false,
            dead_letter_kind: None,
            delivery_limit: Some(20),
            watermark: None,
            single_active_consumer: false,
            partitions: None,
            partition_key: None,
        });
        cfg.engine.stages.push(StageConfig {
            prefetch: 10,
            concurrency: Concurrency::Fixed(1),
            ..StageConfig::new("audit", audit_q, "audit")
        });
        let audit = handler_fn(|d| async move {
            let order = orders::model::Order::from_json(&d.body)?;
            println!(
                "audit: order {} shipped as {}",
                order.order_id,
                order.shipment_id.unwrap_or_default()
            );
            Ok(Outcome::ack())
        });

        let app =
            orders::start_with(cfg.clone(), Engine::builder().handler("audit", audit)).await?;
        app.engine().wait_ready(Duration::from_secs(15)).await;
        let gw = app
            .gateway_addr()
            .ok_or_else(|| anyhow::anyhow!("no gateway"))?;
        println!("gateway on http://{gw}/orders");

        let client = awc::Client::default();
        let mut resp = client
            .post(format!("http://{gw}/orders"))
            .insert_header(("content-type", "application/json"))
            .send_body(r#"{"customer_id":"c-42","items":[{"sku":"sku-1","qty":2}],"total":19.9}"#)
            .await
            .map_err(|e| anyhow::anyhow!("POST /orders: {e}"))?;
        let accepted: serde_json::Value = resp.json().await?;
        println!("POST /orders → {} {accepted}", resp.status());
        let id = accepted["order_id"].as_str().unwrap_or_default().to_owned();

        for _ in 0..200 {
            if let Some(e) = app.service().status.get(&id) {
                if e.status.is_final() {
                    println!("GET /orders/{id} → {}", serde_json::to_string(&e)?);
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        app.shutdown().await;
        orders::delete_topology(&cfg.engine.amqp.url, &cfg.engine).await;
        Ok(())
    })
}
