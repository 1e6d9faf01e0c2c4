//! Ordered lanes: a stage with an [`OrderPolicy`] handles the deliveries of
//! one key one at a time, in delivery order, and different keys in parallel.
//!
//! # How
//!
//! The intake takes a credit, pulls a delivery and reads its key
//! ([`OrderKey`]). A key nobody is handling gets a *lane*: a task that
//! processes that delivery (screening, dedup, the handler, publishing,
//! settling: the whole of [`process`](super::process)) and then the next
//! delivery that queued behind it, until none is left and the lane ends.
//! A delivery whose key has a lane queues behind it, *holding its credit*:
//! every queued delivery holds one, so all the lanes together hold at most
//! `prefetch` deliveries (nothing grows with the backlog), and lanes at most
//! `prefetch` entries. Handlers still run on the stage's `concurrency`
//! worker slots: at most that many keys are handled at once.
//!
//! A lane's next delivery starts only when the previous one is settled —
//! its outputs confirmed and its ack handed to the [`ack`](super::ack)
//! register — so the outputs of one key leave in order too. Batched acks
//! are unchanged: the register acks in delivery-tag order, never a
//! delivery still being handled.
//!
//! # Retries keep their lane
//!
//! On an ordered stage a failed attempt is not sent to a retry tier (later
//! deliveries of its key would overtake it): it is retried *in place*,
//! holding its lane and its credit, after the stage's backoff delay for that
//! attempt, up to `max_attempts`; then it is dead-lettered and the lane goes
//! on with the key's next delivery. A dead letter from an ordered stage says
//! which key it held ([`envelope::ORDER_KEY`](crate::envelope::ORDER_KEY)).
//! While a delivery waits in place its credit is held, so the broker's
//! `consumer_timeout` (30 minutes by default on RabbitMQ 3.10) bounds the
//! whole ladder: past it the broker closes the channel and redelivers every
//! unacked delivery — in order, so the key's order still holds (the failed
//! delivery is handled again from attempt 1).
//!
//! # Giving back
//!
//! A delivery given back to the queue (requeued: the stage is draining)
//! takes the rest of its lane with it: each later delivery of the key is
//! requeued unhandled, in order, so none of them overtakes it.
//!
//! When the channel goes (a connection loss, a replaced channel, the end of
//! a drain), deliveries a lane has not started are dropped unhandled: they
//! cannot be acked any more, and the broker redelivers them in order, so
//! handling them would only repeat work ahead of their copies. A retry
//! waiting in place stops the same way.

use super::process::{self, Order, Taken};
pub(crate) use super::process::{LaneKey, IN_PLACE};
use super::Shared;
use crate::message::Delivery;
use crate::metrics::events::{self, Event};
use std::collections::{HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, MutexGuard};

/// A key function an embedding host registers: the delivery's ordering key,
/// or `None` when it has none (see [`MissingKey`]).
pub type KeyFn = Arc<dyn Fn(&Delivery) -> Option<String> + Send + Sync>;

/// What a stage's deliveries are ordered by.
#[derive(Clone)]
pub enum OrderKey {
    /// The `message_id` property.
    MessageId,
    /// The routing key it was published with.
    RoutingKey,
    /// The `correlation_id` property.
    CorrelationId,
    /// A header's value (a string, or an integer in decimal).
    Header(String),
    /// A key function registered by the host.
    Custom(KeyFn),
}

impl std::fmt::Debug for OrderKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OrderKey::MessageId => f.write_str("MessageId"),
            OrderKey::RoutingKey => f.write_str("RoutingKey"),
            OrderKey::CorrelationId => f.write_str("CorrelationId"),
            OrderKey::Header(h) => f.debug_tuple("Header").field(h).finish(),
            OrderKey::Custom(_) => f.write_str("Custom(..)"),
        }
    }
}

impl OrderKey {
    /// The key of `d`, if it has one (an empty key counts as none). A key
    /// function that panics gives none.
    pub fn of(&self, d: &Delivery) -> Option<String> {
        let key = match self {
            OrderKey::MessageId => d.message_id().map(str::to_owned),
            OrderKey::RoutingKey => Some(d.routing_key.clone()),
            OrderKey::CorrelationId => d
                .properties
                .correlation_id()
                .as_ref()
                .map(|s| s.as_str().to_owned()),
            OrderKey::Header(name) => d.header(name).and_then(|v| {
                crate::envelope::header_string(v)
                    .or_else(|| crate::envelope::header_int(v).map(|i| i.to_string()))
            }),
            OrderKey::Custom(f) => {
                std::panic::catch_unwind(AssertUnwindSafe(|| f(d))).unwrap_or(None)
            }
        };
        key.filter(|k| !k.is_empty())
    }
}

/// What happens to a delivery without a key (a stage's `missing_key`:
/// `reject`, `shared`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MissingKey {
    /// Dead-letter it with reason `missing-key` (the default).
    #[default]
    Reject,
    /// Handle it in one lane shared by every keyless delivery.
    Shared,
}

/// A stage's ordering: deliveries with the same key are handled one at a
/// time in delivery order (see the module docs).
#[derive(Clone, Debug)]
pub struct OrderPolicy {
    /// What the key is.
    pub key: OrderKey,
    /// What a delivery without one gets.
    pub missing: MissingKey,
}

/// The lanes of one stage. Bounded: every queued delivery holds a credit.
pub(crate) struct Lanes {
    policy: OrderPolicy,
    /// The deliveries waiting behind each lane's running one.
    waiting: Mutex<HashMap<LaneKey, VecDeque<Taken>>>,
}

impl Lanes {
    pub(crate) fn new(policy: OrderPolicy) -> Self {
        Self {
            policy,
            waiting: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<LaneKey, VecDeque<Taken>>> {
        // Nothing panics while the lock is held (map operations only).
        self.waiting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Hands a delivery taken by the intake to its key's lane (starting
    /// one if the key has none), or dead-letters it at once when it has no
    /// key and the policy rejects such.
    pub(crate) fn dispatch(shared: &Arc<Shared>, taken: Taken) {
        let Some(lanes) = &shared.lanes else {
            tokio::spawn(process::run(shared.clone(), taken, Order::Off));
            return;
        };
        let key = match lanes.policy.key.of(&taken.opened.delivery) {
            Some(k) => LaneKey::Key(k),
            None if lanes.policy.missing == MissingKey::Shared => LaneKey::Shared,
            None => {
                tokio::spawn(process::run(shared.clone(), taken, Order::Missing));
                return;
            }
        };
        let first = {
            let mut waiting = lanes.lock();
            match waiting.get_mut(&key) {
                Some(queue) => {
                    queue.push_back(taken);
                    None
                }
                None => {
                    waiting.insert(key.clone(), VecDeque::new());
                    Some(taken)
                }
            }
        };
        match first {
            Some(taken) => {
                tokio::spawn(run_lane(shared.clone(), key, taken));
            }
            None => events::LaneWaited {
                stage: &shared.spec.name,
            }
            .emit(&shared.metrics),
        }
    }

    /// The next delivery of `key`'s lane, or `None` (the lane is removed).
    fn next(&self, key: &LaneKey) -> Option<Taken> {
        let mut waiting = self.lock();
        let next = waiting.get_mut(key).and_then(VecDeque::pop_front);
        if next.is_none() {
            waiting.remove(key);
        }
        next
    }
}

/// Removes a lane whose task ends early (a panic outside the handler): its
/// key must not stay blocked. Queued deliveries are dropped with it (their
/// credits come back; the broker redelivers them when the channel goes).
struct LaneGuard<'a> {
    lanes: &'a Lanes,
    key: &'a LaneKey,
    done: bool,
}

impl Drop for LaneGuard<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.lanes.lock().remove(self.key);
        }
    }
}

/// One key's lane: its deliveries one after the other, until none waits.
async fn run_lane(shared: Arc<Shared>, key: LaneKey, first: Taken) {
    let Some(lanes) = &shared.lanes else { return };
    let mut guard = LaneGuard {
        lanes,
        key: &key,
        done: false,
    };
    let mut giving_back = false;
    let mut next = Some(first);
    while let Some(taken) = next {
        if process::stale(&shared, &taken) {
            // Its channel is gone: not handled here, the broker redelivers
            // it (behind nothing of its key: the lane keeps its place).
            // Dropping it gives its credit back; its ack register entry
            // goes with its channel's incarnation (see `ack`).
            tracing::debug!(stage = %shared.spec.name, "a delivery of a lost channel dropped unhandled (the broker redelivers it)");
            drop(taken);
        } else if giving_back {
            process::give_back(&shared, taken).await;
        } else {
            let settled = process::run(shared.clone(), taken, Order::Lane(&key)).await;
            giving_back = settled == process::Settled::Requeued;
        }
        next = lanes.next(&key);
    }
    guard.done = true;
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{AMQPValue, FieldTable};
    use lapin::BasicProperties;

    fn delivery(props: BasicProperties, rk: &str) -> Delivery {
        Delivery {
            body: bytes::Bytes::new(),
            properties: props,
            redelivered: false,
            exchange: "ex".into(),
            routing_key: rk.into(),
            queue: "q".into(),
            stage: "s".into(),
        }
    }

    #[test]
    fn keys_are_read_from_where_the_policy_says() {
        let mut h = FieldTable::default();
        h.insert("account".into(), crate::envelope::text("acc-7"));
        h.insert("n".into(), AMQPValue::LongLongInt(42));
        let p = BasicProperties::default()
            .with_message_id("m1".into())
            .with_correlation_id("c1".into())
            .with_headers(h);
        let d = delivery(p, "order.created");
        assert_eq!(OrderKey::MessageId.of(&d).as_deref(), Some("m1"));
        assert_eq!(OrderKey::CorrelationId.of(&d).as_deref(), Some("c1"));
        assert_eq!(
            OrderKey::RoutingKey.of(&d).as_deref(),
            Some("order.created")
        );
        assert_eq!(
            OrderKey::Header("account".into()).of(&d).as_deref(),
            Some("acc-7")
        );
        assert_eq!(OrderKey::Header("n".into()).of(&d).as_deref(), Some("42"));
        assert_eq!(OrderKey::Header("other".into()).of(&d), None);
        let f: KeyFn = Arc::new(|d: &Delivery| d.message_id().map(|m| format!("k-{m}")));
        assert_eq!(OrderKey::Custom(f).of(&d).as_deref(), Some("k-m1"));
        let bare = delivery(BasicProperties::default(), "");
        assert_eq!(OrderKey::MessageId.of(&bare), None);
        assert_eq!(OrderKey::RoutingKey.of(&bare), None, "empty is none");
        let panics: KeyFn = Arc::new(|_| panic!("key fn"));
        assert_eq!(OrderKey::Custom(panics).of(&d), None);
    }
}
