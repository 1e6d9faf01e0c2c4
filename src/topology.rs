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

use crate::config::{Config, ExchangeType, QueueConfig, QueueKind};
/// A queue's counts as the queue answers a passive `queue.declare` (or
/// the broker's error if it does not exist): what the depth monitor, the DLQ
/// tools and tests read.
pub use flowgate_actors::inspect_queue;
use flowgate_actors::RetryPolicy;
use lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
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
    if q.single_active_consumer {
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
        for (i, delay) in retry.policy().tiers().into_iter().enumerate() {
            let name = RetryPolicy::tier_queue(&q.name, i + 1);
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
            args.insert(ShortString::from("x-dead-letter-routing-key"), s(&q.name));
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
        ch.queue_declare(
            q.name.as_str().into(),
            QueueDeclareOptions::durable(),
            queue_arguments(q),
        )
        .await?;
        for b in &q.bindings {
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
        ch.queue_delete(q.name.as_str().into(), QueueDeleteOptions::default())
            .await?;
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
