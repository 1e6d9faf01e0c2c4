//! `[[queues]]`: queues, their bindings, dead-lettering and watermarks.

use super::*;

/// Queue types.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum QueueKind {
    /// Classic queue.
    Classic,
    /// Quorum queue (default): replicated, supports delivery limits and
    /// at-least-once dead-lettering.
    #[default]
    Quorum,
}

/// A queue binding.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Binding {
    /// Source exchange; must be declared under `[[exchanges]]`.
    pub exchange: String,
    /// Binding key. Default `#`.
    #[serde(default = "default_binding_key")]
    pub routing_key: String,
}

fn default_binding_key() -> String {
    "#".into()
}

/// `[[queues]]`
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct QueueConfig {
    /// Queue name. Required.
    pub name: String,
    /// `classic | quorum`. Default `quorum`.
    #[serde(default)]
    pub kind: QueueKind,
    /// Bindings. Default none.
    #[serde(default)]
    pub bindings: Vec<Binding>,
    /// Declare exchange `<queue>.dlx` and queue `<queue>.dlq` and dead-letter
    /// into them. Default `true`.
    #[serde(default = "yes")]
    pub dead_letter: bool,
    /// The kind of `<queue>.dlq`: `classic | quorum`. Default: the queue's
    /// own `kind` (what earlier versions declared). Only a classic DLQ can be
    /// browsed (console, `flowgate dlq list/show`) without changing it: a
    /// classic queue puts a message it gets back where it was, a quorum queue
    /// does not (RabbitMQ 3.10 measured: messages given back come back out
    /// of order, and each return raises `x-delivery-count`, which a delivery
    /// limit turns into a loss). An existing DLQ keeps its kind: the broker
    /// refuses to redeclare it as another.
    #[serde(default)]
    pub dead_letter_kind: Option<QueueKind>,
    /// Quorum queues: deliveries after which the broker dead-letters a
    /// message that keeps coming back (`x-delivery-limit`), e.g. one whose
    /// consumer keeps crashing or losing its connection. Kept small: each
    /// redelivery raises the delivery count of the neighbours in flight with
    /// it. Default `5`.
    #[serde(default = "default_delivery_limit")]
    pub delivery_limit: Option<u32>,
    /// Backpressure watermarks, e.g. `{ high = 5000, low = 1000 }`: while
    /// this queue holds more than `high` ready messages, every stage that
    /// publishes into it pauses its intake until the queue is below `low`,
    /// and the HTTP ingress (`POST /publish/...`, and a host's own through
    /// [`Ingress`](crate::Ingress)) answer
    /// 503 with `Retry-After` for messages routed to it.
    /// Default none (the depth is still exported when a stage consumes it).
    #[serde(default)]
    pub watermark: Option<Watermark>,
    /// Declare the queue with single active consumer
    /// (`x-single-active-consumer`): every instance consuming it subscribes,
    /// the broker delivers to one of them and hands over to another when it
    /// goes away, so the queue is handled in order across instances. A
    /// stage on it shows `consumer = "active"` or `"standby"` in `/readyz`
    /// and the management API (a standby is ready; see the README's
    /// "Ordering" for what the engine can observe). The broker refuses to
    /// redeclare an existing queue with another value. Default `false`.
    #[serde(default)]
    pub single_active_consumer: bool,
    /// Split the queue into this many partitions (1..=256): queues
    /// `<name>.0` … `<name>.<N-1>`, each with single active consumer and
    /// this queue's other settings, behind an exchange named `<name>` of
    /// type `x-consistent-hash` that sends every `partition_key` to one
    /// partition (needs the broker's `rabbitmq_consistent_hash_exchange`
    /// plugin; the engine checks at start). The queue's `bindings` bind
    /// that exchange (exchange-to-exchange), and anyone may publish to it
    /// directly. A stage on the queue consumes the partitions
    /// `[partitioning]` gives this instance (all of them without it), one
    /// consumer per partition, as stage `<stage>.<p>`. The number of
    /// partitions of an existing queue must not change: the exchange's
    /// buckets follow the order the partitions were bound in. Default none.
    #[serde(default)]
    pub partitions: Option<u16>,
    /// What the partitions' exchange hashes: `routing_key`, `message_id`,
    /// `correlation_id` or `header:<name>` (a string header; the hash
    /// covers its AMQP type, so every producer must send the same type).
    /// A message without it hashes as an empty key: all such messages land
    /// on one partition. Only with `partitions`. Default `routing_key`.
    #[serde(default)]
    pub partition_key: Option<String>,
}

/// A queue's high/low watermarks (ready messages), with hysteresis.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Watermark {
    /// Upstream stages pause at or above this depth. Required.
    pub high: u64,
    /// ...and resume at or below this one. Required, `< high`.
    pub low: u64,
}

fn yes() -> bool {
    true
}
fn default_delivery_limit() -> Option<u32> {
    Some(5)
}

impl QueueConfig {
    /// `<queue>.dlx` when dead-lettering is on.
    pub fn dead_letter_exchange(&self) -> Option<String> {
        self.dead_letter.then(|| format!("{}.dlx", self.name))
    }
    /// `<queue>.dlq` when dead-lettering is on.
    pub fn dead_letter_queue(&self) -> Option<String> {
        self.dead_letter.then(|| format!("{}.dlq", self.name))
    }
    /// The kind of `<queue>.dlq`: `dead_letter_kind`, else the queue's own.
    pub fn dead_letter_queue_kind(&self) -> QueueKind {
        self.dead_letter_kind.unwrap_or(self.kind)
    }

    /// Partition `p`'s queue: `<queue>.<p>`.
    pub fn partition_queue(&self, p: u16) -> String {
        format!("{}.{p}", self.name)
    }

    /// The queues the broker holds for this entry: every partition's
    /// (`<queue>.0` …) when `partitions` is set, else the queue itself.
    pub fn broker_queues(&self) -> Vec<String> {
        match self.partitions {
            Some(n) => (0..n).map(|p| self.partition_queue(p)).collect(),
            None => vec![self.name.clone()],
        }
    }

    /// The partitions' hash key (validated: a built-in key form).
    pub(crate) fn partition_key(&self) -> Option<BuiltinKey> {
        self.partitions?;
        match OrderBy::parse(self.partition_key.as_deref().unwrap_or(ROUTING_KEY)).ok()? {
            OrderBy::Builtin(key) => Some(key),
            OrderBy::Named(_) => None,
        }
    }

    /// `queues[i].partitions` and `partition_key`.
    pub(crate) fn validate_partitions(&self, i: usize) -> Result<(), ConfigError> {
        let key = |k: &str| format!("queues[{i}].{k}");
        let Some(n) = self.partitions else {
            if self.partition_key.is_some() {
                return Err(ConfigError::new(
                    key("partition_key"),
                    "only applies to a queue with `partitions`",
                ));
            }
            return Ok(());
        };
        if n == 0 || n > MAX_PARTITIONS {
            return Err(ConfigError::new(
                key("partitions"),
                format!("must be between 1 and {MAX_PARTITIONS}"),
            ));
        }
        if let Some(k) = &self.partition_key {
            if !matches!(OrderBy::parse(k), Ok(OrderBy::Builtin(_))) {
                return Err(ConfigError::new(
                    key("partition_key"),
                    "must be `routing_key`, `message_id`, `correlation_id` or `header:<name>`",
                ));
            }
        }
        Ok(())
    }
}

/// The most partitions one queue may have.
pub const MAX_PARTITIONS: u16 = 256;

/// `partition_key`'s default.
const ROUTING_KEY: &str = "routing_key";
