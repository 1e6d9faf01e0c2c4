//! Declares (and, for demos and tests, deletes) the configured topology.
//!
//! Every queue with `dead_letter = true` gets a fanout exchange `<queue>.dlx`
//! and a queue `<queue>.dlq` of the same kind (or `dead_letter_kind`; only
//! a classic DLQ can be browsed, see [`crate::dlq`]), with no delivery limit. Quorum queues dead-letter
//! with `x-dead-letter-strategy = at-least-once` (which needs
//! `x-overflow = reject-publish`): classic dead-lettering is not confirmed
//! and can lose messages.
//!
//! A stage with a `retry` ladder gets one tier queue per distinct delay,
//! `<queue>.retry.<n>`, of the same kind as its queue: `x-message-ttl` =
//! the delay, dead-lettering through the default exchange (`""`, routing
//! key = the stage's queue) back into the stage's queue, so no binding is
//! needed. Quorum tiers (RabbitMQ 3.10+ has message TTL on quorum queues)
//! dead-letter `at-least-once`, so a waiting retry survives a broker restart
//! and is never dropped between the tier and the queue. Every message in a
//! tier has the same TTL, so expiry order is arrival order and the broker's
//! head-of-queue expiry never holds a message back behind a longer one.
//!
//! A partitioned queue (`partitions = N`) is an exchange `<queue>` of type
//! `x-consistent-hash` (hashing the `partition_key`: the exchange's own
//! `hash-property` or `hash-header` argument, or the routing key) with
//! queues `<queue>.0` … `<queue>.<N-1>` bound to it in that order, each
//! with weight 1 (the binding key) and single active consumer, and the
//! queue's other arguments (one `<queue>.dlx`/`<queue>.dlq` for all). The
//! queue's bindings bind the exchange to their source exchanges. Each
//! partition has its own retry tiers (`<queue>.<p>.retry.<n>`), so a retry
//! comes back to the partition it left. The hash exchanges are declared
//! first: a broker without the plugin refuses the type, and
//! [`missing_plugin`] says so before anything else is declared.

use crate::config::{BuiltinKey, Config, ExchangeType, QueueConfig, QueueKind};
/// A queue's counts as the queue answers a passive `queue.declare` (or
/// the broker's error if it does not exist): what the depth monitor, the DLQ
/// tools and tests read.
pub use flowgate_actors::inspect_queue;
use flowgate_actors::RetryPolicy;
use lapin::options::{
    ExchangeBindOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, ExchangeKind};

fn kind(t: ExchangeType) -> ExchangeKind {
    match t {
        ExchangeType::Direct => ExchangeKind::Direct,
        ExchangeType::Topic => ExchangeKind::Topic,
        ExchangeType::Fanout => ExchangeKind::Fanout,
        ExchangeType::Headers => ExchangeKind::Headers,
    }
}

fn s(v: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(v.to_owned()))
}

/// The queue argument of `queues[].single_active_consumer`.
pub const SINGLE_ACTIVE_CONSUMER: &str = "x-single-active-consumer";

/// The exchange type of a partitioned queue's exchange.
pub const CONSISTENT_HASH: &str = "x-consistent-hash";

/// The broker plugin that provides [`CONSISTENT_HASH`] (shipped with
/// RabbitMQ, disabled by default).
pub const CONSISTENT_HASH_PLUGIN: &str = "rabbitmq_consistent_hash_exchange";

/// The plugin a failed [`declare`] lacks, if the broker refused a
/// partitioned queue's exchange type: RabbitMQ closes the connection
/// with `command_invalid` ("unknown exchange type 'x-consistent-hash'")
/// when the plugin is not enabled.
pub fn missing_plugin(cfg: &Config, e: &lapin::Error) -> Option<&'static str> {
    let partitioned = cfg.queues.iter().any(|q| q.partitions.is_some());
    let text = e.to_string();
    (partitioned && text.contains("exchange type") && text.contains(CONSISTENT_HASH))
        .then_some(CONSISTENT_HASH_PLUGIN)
}

/// A partitioned queue's exchange arguments: what it hashes.
fn hash_arguments(q: &QueueConfig) -> FieldTable {
    let mut args = FieldTable::default();
    match q.partition_key() {
        Some(BuiltinKey::MessageId) => {
            args.insert(ShortString::from("hash-property"), s("message_id"));
        }
        Some(BuiltinKey::CorrelationId) => {
            args.insert(ShortString::from("hash-property"), s("correlation_id"));
        }
        Some(BuiltinKey::Header(h)) => {
            args.insert(ShortString::from("hash-header"), s(&h));
        }
        Some(BuiltinKey::RoutingKey) | None => {}
    }
    args
}

/// The `x-*` arguments of a queue.
pub fn queue_arguments(q: &QueueConfig) -> FieldTable {
    let mut args = FieldTable::default();
    let quorum = q.kind == QueueKind::Quorum;
    args.insert(
        ShortString::from("x-queue-type"),
        s(if quorum { "quorum" } else { "classic" }),
    );
    if let Some(dlx) = q.dead_letter_exchange() {
        args.insert(ShortString::from("x-dead-letter-exchange"), s(&dlx));
        if quorum {
            args.insert(
                ShortString::from("x-dead-letter-strategy"),
                s("at-least-once"),
            );
            args.insert(ShortString::from("x-overflow"), s("reject-publish"));
        }
    }
    if q.single_active_consumer || q.partitions.is_some() {
        args.insert(
            ShortString::from(SINGLE_ACTIVE_CONSUMER),
            AMQPValue::Boolean(true),
        );
    }
    if quorum {
        if let Some(limit) = q.delivery_limit {
            args.insert(
                ShortString::from("x-delivery-limit"),
                AMQPValue::LongLongInt(limit.into()),
            );
        }
    }
    args
}

fn dlq_arguments(q: &QueueConfig) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        ShortString::from("x-queue-type"),
        s(if q.dead_letter_queue_kind() == QueueKind::Quorum {
            "quorum"
        } else {
            "classic"
        }),
    );
    args
}

/// The tier queues of every stage with a retry ladder: (name, arguments).
pub fn retry_tiers(cfg: &Config) -> Vec<(String, FieldTable)> {
    let mut out = Vec::new();
    for st in &cfg.stages {
        let (Some(retry), Some(q)) = (&st.retry, cfg.queue(&st.queue)) else {
            continue;
        };
        let quorum = q.kind == QueueKind::Quorum;
        let tiers = retry.policy().tiers();
        for (queue, (i, delay)) in q
            .broker_queues()
            .into_iter()
            .flat_map(|queue| tiers.iter().enumerate().map(move |t| (queue.clone(), t)))
        {
            let name = RetryPolicy::tier_queue(&queue, i + 1);
            if out.iter().any(|(n, _)| n == &name) {
                continue; // two stages on one queue share its tiers
            }
            let mut args = FieldTable::default();
            args.insert(
                ShortString::from("x-queue-type"),
                s(if quorum { "quorum" } else { "classic" }),
            );
            args.insert(
                ShortString::from("x-message-ttl"),
                AMQPValue::LongLongInt(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX)),
            );
            args.insert(ShortString::from("x-dead-letter-exchange"), s(""));
            args.insert(ShortString::from("x-dead-letter-routing-key"), s(&queue));
            if quorum {
                args.insert(
                    ShortString::from("x-dead-letter-strategy"),
                    s("at-least-once"),
                );
                args.insert(ShortString::from("x-overflow"), s("reject-publish"));
            }
            out.push((name, args));
        }
    }
    out
}

/// Declares exchanges, queues, bindings and dead-letter plumbing. Idempotent.
pub async fn declare(ch: &Channel, cfg: &Config) -> Result<(), lapin::Error> {
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    for q in cfg.queues.iter().filter(|q| q.partitions.is_some()) {
        ch.exchange_declare(
            q.name.as_str().into(),
            ExchangeKind::Custom(CONSISTENT_HASH.into()),
            durable,
            hash_arguments(q),
        )
        .await?;
    }
    for e in &cfg.exchanges {
        ch.exchange_declare(
            e.name.as_str().into(),
            kind(e.kind),
            durable,
            FieldTable::default(),
        )
        .await?;
    }
    for q in &cfg.queues {
        if let (Some(dlx), Some(dlq)) = (q.dead_letter_exchange(), q.dead_letter_queue()) {
            ch.exchange_declare(
                dlx.as_str().into(),
                ExchangeKind::Fanout,
                durable,
                FieldTable::default(),
            )
            .await?;
            ch.queue_declare(
                dlq.as_str().into(),
                QueueDeclareOptions::durable(),
                dlq_arguments(q),
            )
            .await?;
            ch.queue_bind(
                dlq.as_str().into(),
                dlx.as_str().into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        }
        for name in q.broker_queues() {
            ch.queue_declare(
                name.as_str().into(),
                QueueDeclareOptions::durable(),
                queue_arguments(q),
            )
            .await?;
            if q.partitions.is_some() {
                // Weight 1 each; bound in partition order (the exchange's
                // buckets follow it). Binding again is a no-op.
                ch.queue_bind(
                    name.as_str().into(),
                    q.name.as_str().into(),
                    "1".into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            }
        }
        for b in &q.bindings {
            if q.partitions.is_some() {
                ch.exchange_bind(
                    q.name.as_str().into(),
                    b.exchange.as_str().into(),
                    b.routing_key.as_str().into(),
                    ExchangeBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            } else {
                ch.queue_bind(
                    q.name.as_str().into(),
                    b.exchange.as_str().into(),
                    b.routing_key.as_str().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            }
        }
    }
    for (name, args) in retry_tiers(cfg) {
        ch.queue_declare(name.as_str().into(), QueueDeclareOptions::durable(), args)
            .await?;
    }
    Ok(())
}

/// Deletes everything [`declare`] made (demos and tests clean up with this).
pub async fn delete(ch: &Channel, cfg: &Config) -> Result<(), lapin::Error> {
    for (name, _) in retry_tiers(cfg) {
        ch.queue_delete(name.as_str().into(), QueueDeleteOptions::default())
            .await?;
    }
    for q in &cfg.queues {
        for name in q.broker_queues() {
            ch.queue_delete(name.as_str().into(), QueueDeleteOptions::default())
                .await?;
        }
        if q.partitions.is_some() {
            ch.exchange_delete(q.name.as_str().into(), ExchangeDeleteOptions::default())
                .await?;
        }
        if let (Some(dlx), Some(dlq)) = (q.dead_letter_exchange(), q.dead_letter_queue()) {
            ch.queue_delete(dlq.as_str().into(), QueueDeleteOptions::default())
                .await?;
            ch.exchange_delete(dlx.as_str().into(), ExchangeDeleteOptions::default())
                .await?;
        }
    }
    for e in &cfg.exchanges {
        ch.exchange_delete(e.name.as_str().into(), ExchangeDeleteOptions::default())
            .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn partitioned(key: &str) -> Config {
        Config::from_toml(&format!(
            r#"
            [http]
            bind = ""
            [[queues]]
            name = "orders"
            partitions = 2
            {key}
            [[stages]]
            name = "s"
            queue = "orders"
            handler = "sink"
            retry = {{ max_attempts = 3, backoff = ["1s"] }}
            "#
        ))
        .unwrap()
    }

    #[test]
    fn each_partition_retries_through_its_own_tier() {
        let cfg = partitioned("");
        let tiers = retry_tiers(&cfg);
        let names: Vec<&str> = tiers.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["orders.0.retry.1", "orders.1.retry.1"]);
        for (p, (_, args)) in tiers.iter().enumerate() {
            let back = args.inner().get("x-dead-letter-routing-key");
            assert_eq!(back, Some(&s(&format!("orders.{p}"))));
        }
    }

    #[test]
    fn the_exchange_hashes_the_partition_key_and_partitions_are_single_active() {
        let args = |key: &str| {
            let cfg = partitioned(key);
            let q = &cfg.queues[0];
            let a = queue_arguments(q);
            assert_eq!(
                a.inner().get(SINGLE_ACTIVE_CONSUMER),
                Some(&AMQPValue::Boolean(true))
            );
            hash_arguments(q)
        };
        assert!(args("").inner().is_empty(), "the routing key by default");
        assert_eq!(
            args("partition_key = \"message_id\"")
                .inner()
                .get("hash-property"),
            Some(&s("message_id"))
        );
        assert_eq!(
            args("partition_key = \"correlation_id\"")
                .inner()
                .get("hash-property"),
            Some(&s("correlation_id"))
        );
        assert_eq!(
            args("partition_key = \"header:tenant\"")
                .inner()
                .get("hash-header"),
            Some(&s("tenant"))
        );
    }
}
