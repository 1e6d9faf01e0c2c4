//! What the depth monitor watches, computed from the configuration: which
//! queues to sample, and which queues each stage's output lands in (the
//! queues bound to the stage's output exchange with a binding that matches
//! its routing key), so a full output queue can pause the stage; and the
//! [`IngressGate`] that turns the monitor's watermarks into 503s at the
//! HTTP ingresses.

use crate::config::{Config, QueueConfig, StageConfig};
use flowgate_actors::Metrics;
use flowgate_actors::{Event, IngressRefused};
use flowgate_actors::{QueueLevels, Refusal, ScaleRange, WatchedQueue, Watermark};
use std::sync::Arc;
use tracing::debug;

/// Why [`IngressGate::admit`] refused a message.
#[derive(Debug)]
pub(crate) enum Denied {
    /// No declared queue is bound to the route.
    NoRoute,
    /// A queue the route lands in is above its watermark.
    Watermark(Refusal),
}

/// The queues `exchange`/`routing_key` is routed to by the configured
/// bindings (other exchange-to-exchange bindings are not followed). A
/// partitioned queue, reached through its bindings or its own exchange,
/// counts as every partition: which one a message lands in is the broker's
/// hash, so each is watched (a full partition refuses).
pub(crate) fn routed_queues(cfg: &Config, exchange: &str, routing_key: &str) -> Vec<String> {
    routed_entries(cfg, exchange, routing_key)
        .flat_map(QueueConfig::broker_queues)
        .collect()
}

/// The `[[queues]]` entries `exchange`/`routing_key` reaches: by their
/// bindings, or a partitioned queue by its own exchange.
pub(crate) fn routed_entries<'a>(
    cfg: &'a Config,
    exchange: &'a str,
    routing_key: &'a str,
) -> impl Iterator<Item = &'a QueueConfig> + 'a {
    let kind = cfg
        .exchanges
        .iter()
        .find(|e| e.name == exchange)
        .map(|e| e.kind)
        .unwrap_or_default();
    cfg.queues.iter().filter(move |q| {
        (q.partitions.is_some() && q.name == exchange)
            || q.bindings
                .iter()
                .any(|b| b.exchange == exchange && kind.routes(&b.routing_key, routing_key))
    })
}

/// The queues a stage's configured `output` lands in (none without one:
/// a host handler's outputs are not known in advance).
pub(crate) fn output_queues(cfg: &Config, stage: &StageConfig) -> Vec<String> {
    stage
        .output
        .as_ref()
        .map(|o| routed_queues(cfg, &o.exchange, &o.routing_key))
        .unwrap_or_default()
}

/// Every stage's input queue and every queue with a watermark; a
/// partitioned queue as each of its partitions (all of them, whichever this
/// instance consumes), each with the queue's watermark.
pub(crate) fn watched_queues(cfg: &Config) -> Vec<WatchedQueue> {
    cfg.queues
        .iter()
        .filter(|q| q.watermark.is_some() || cfg.stages.iter().any(|s| s.queue == q.name))
        .flat_map(|q| {
            q.broker_queues().into_iter().map(|name| WatchedQueue {
                name,
                watermark: q.watermark.map(|w| Watermark {
                    high: w.high,
                    low: w.low,
                }),
            })
        })
        .collect()
}

/// A stage's autoscaling range, if its concurrency is a range.
pub(crate) fn scale_range(stage: &StageConfig) -> Option<ScaleRange> {
    match stage.concurrency {
        crate::config::Concurrency::Fixed(_) => None,
        crate::config::Concurrency::Range { min, max } => Some(ScaleRange {
            min: min as usize,
            max: max as usize,
        }),
    }
}

/// Admission of ingress messages by queue watermarks: a message whose
/// exchange and routing key route (by the configured bindings) to a queue
/// above its watermark is refused, from the depth monitor's last sample
/// ([`QueueLevels::admit`]); no request waits for a sample. Cheap to clone.
#[derive(Clone)]
pub(crate) struct IngressGate {
    config: Arc<Config>,
    levels: QueueLevels,
    metrics: Metrics,
}

impl IngressGate {
    /// A gate for `config`'s bindings over the monitor's `levels`.
    pub(crate) fn new(config: &Config, levels: QueueLevels, metrics: Metrics) -> Self {
        Self {
            config: Arc::new(config.clone()),
            levels,
            metrics,
        }
    }

    /// Admits one message for `exchange`/`routing_key`: refuses a route
    /// no declared queue is bound to, or says which queue refuses it
    /// (logged, and counted in `flowgate_ingress_refused_total{queue}`).
    pub(crate) fn admit(&self, exchange: &str, routing_key: &str) -> Result<(), Denied> {
        let queues = self
            .bound_queues(exchange, routing_key)
            .ok_or(Denied::NoRoute)?;
        self.levels
            .admit(queues.iter().map(String::as_str))
            .inspect_err(|r: &Refusal| {
                IngressRefused {
                    queue: r.queue(),
                    exchange,
                    routing_key,
                    reason: r,
                }
                .emit(&self.metrics)
            })
            .map_err(Denied::Watermark)
    }

    /// The queues the route lands in; `None` when no declared queue is bound.
    pub(crate) fn bound_queues(&self, exchange: &str, routing_key: &str) -> Option<Vec<String>> {
        let queues = routed_queues(&self.config, exchange, routing_key);
        if queues.is_empty() {
            debug!(exchange, routing_key, "ingress refused: no queue bound");
            return None;
        }
        Some(queues)
    }

    /// The configuration whose bindings it follows.
    pub(crate) fn config(&self) -> &Config {
        &self.config
    }

    /// The monitor's levels (depths, peaks).
    pub(crate) fn levels(&self) -> &QueueLevels {
        &self.levels
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ExchangeType;

    #[test]
    fn topic_bindings_match_like_the_broker() {
        let t = |b, k| ExchangeType::Topic.routes(b, k);
        assert!(t("#", "a.b.c"));
        assert!(t("#", ""));
        assert!(t("a.*", "a.b"));
        assert!(!t("a.*", "a.b.c"));
        assert!(t("a.#", "a"));
        assert!(t("a.#.c", "a.x.y.c"));
        assert!(t("*.b.#", "a.b"));
        assert!(!t("hop1", "hop2"));
        assert!(t("hop1", "hop1"));
        assert!(ExchangeType::Direct.routes("k", "k"));
        assert!(!ExchangeType::Direct.routes("#", "k"));
        assert!(ExchangeType::Fanout.routes("x", "k"));
    }

    #[test]
    fn a_stage_output_resolves_to_the_next_queue() {
        let cfg = crate::Config::from_toml(
            r##"
            [[exchanges]]
            name = "ex"
            [[queues]]
            name = "q1"
            bindings = [{ exchange = "ex", routing_key = "in" }]
            [[queues]]
            name = "q2"
            bindings = [{ exchange = "ex", routing_key = "hop.*" }]
            watermark = { high = 10, low = 2 }
            [[queues]]
            name = "audit"
            bindings = [{ exchange = "ex", routing_key = "#" }]
            [[stages]]
            name = "s1"
            queue = "q1"
            output = { exchange = "ex", routing_key = "hop.1" }
            concurrency = { min = 1, max = 4 }
            "##,
        )
        .unwrap();
        assert_eq!(output_queues(&cfg, &cfg.stages[0]), ["q2", "audit"]);
        let watched: Vec<_> = watched_queues(&cfg).into_iter().map(|q| q.name).collect();
        assert_eq!(watched, ["q1", "q2"]);
        assert_eq!(
            scale_range(&cfg.stages[0]),
            Some(ScaleRange { min: 1, max: 4 })
        );
    }

    #[test]
    fn a_partitioned_queue_is_watched_and_fed_as_its_partitions() {
        let cfg = crate::Config::from_toml(
            r##"
            [[exchanges]]
            name = "ex"
            [[queues]]
            name = "q1"
            bindings = [{ exchange = "ex", routing_key = "in" }]
            [[queues]]
            name = "orders"
            bindings = [{ exchange = "ex", routing_key = "order.*" }]
            partitions = 3
            partition_key = "header:entity"
            watermark = { high = 10, low = 2 }
            [[stages]]
            name = "s1"
            queue = "q1"
            output = { exchange = "ex", routing_key = "order.created" }
            [[stages]]
            name = "s2"
            queue = "orders"
            handler = "sink"
            [partitioning]
            instance_index = 1
            instance_count = 2
            "##,
        )
        .unwrap();
        let parts = ["orders.0", "orders.1", "orders.2"];
        assert_eq!(output_queues(&cfg, &cfg.stages[0]), parts);
        assert_eq!(routed_queues(&cfg, "orders", "anything"), parts);
        let watched = watched_queues(&cfg);
        let names: Vec<_> = watched.iter().map(|q| q.name.as_str()).collect();
        assert_eq!(names, ["q1", "orders.0", "orders.1", "orders.2"]);
        assert!(watched[1..].iter().all(|q| q.watermark.is_some()));
        assert_eq!(
            cfg.consumers(&cfg.stages[1]),
            [("s2.1".to_owned(), "orders.1".to_owned())]
        );
    }
}
