//! A test kit for flowgate and for the applications that embed it, in
//! four parts:
//!
//! * **A handler on its own** ([`synthetic`]): build a [`flowgate::Delivery`]
//!   with [`DeliveryBuilder`], run a handler on it with [`run_handler`] (or
//!   [`run_batch`]) and read the [`flowgate::Outcome`] with [`OutcomeExt`].
//!   No broker.
//! * **An engine on a real broker** ([`pipeline`]): [`TestPipeline`] runs
//!   the handlers a test registers on topology with unique names
//!   ([`unique`], [`chain_config`], [`uniquely_named`]), declared by the
//!   engine and deleted afterwards, even when the test panics ([`Cleanup`]).
//! * **Publish, collect, account**: a raw AMQP client that is not flowgate
//!   ([`Client`]: publish with confirms, collect and ack, queue counts) and
//!   exactly-once accounting of what arrived ([`counts`], [`Accounting`]).
//! * **Faults**: a private RabbitMQ node for tests that disturb a broker
//!   ([`node::BrokerNode`]: memory alarms, closed connections, `stop_app`,
//!   clusters, extra config and plugins such as a TLS listener) and a
//!   fault-injecting TCP proxy ([`proxy`]); a throwaway PKI for TLS tests
//!   ([`pki`]).
//!
//! Also: chain configs and the publish/collect driver of flowgate's benches
//! ([`driver`]), secret-leak checks for command-line tests ([`secrets`]).
//!
//! What it expects of the machine: a RabbitMQ broker on 127.0.0.1:5672
//! (guest/guest, [`AMQP_URL`]) with `rabbitmqctl` on the `PATH` (collecting
//! waits until the broker settled its acks), and for [`node`] the Debian
//! RabbitMQ package (`/usr/lib/rabbitmq/bin`). Its helpers panic instead of
//! returning errors: a test must fail loudly, not read "fewer arrived" into
//! a broken probe.
//!
//! # A handler on a synthetic delivery
//!
//! ```
//! use flowgate::{handler_fn, Outcome};
//! use flowgate_testkit::{run_handler, DeliveryBuilder, OutcomeExt};
//!
//! # futures::executor::block_on(async {
//! let reject_empty = handler_fn(|d| async move {
//!     Ok(match d.body.is_empty() {
//!         true => Outcome::dead_letter("empty order"),
//!         false => Outcome::ack_with(vec![d.forward("shop", "order.accepted")]),
//!     })
//! });
//! let empty = DeliveryBuilder::new("").message_id("o-1").build();
//! let outcome = run_handler(&reject_empty, &empty).await.unwrap();
//! assert_eq!(outcome.dead_letter_reason(), Some("empty order"));
//!
//! let order = DeliveryBuilder::new("{}").routing_key("order.created").build();
//! let outcome = run_handler(&reject_empty, &order).await.unwrap();
//! assert_eq!(outcome.outputs()[0].routing_key, "order.accepted");
//! # });
//! ```
//!
//! # An engine against the local broker
//!
//! A host's own config with its names made unique, its handler registered,
//! every id accounted for, then the engine stopped and the topology
//! deleted:
//!
//! ```no_run
//! use flowgate::{handler_fn, Config, Outcome};
//! use flowgate_testkit::{unique, uniquely_named, TestPipeline};
//! use std::time::Duration;
//!
//! # flowgate::run_system(async {
//! let host = Config::from_toml(r#"
//!     [[exchanges]]
//!     name = "shop"
//!     [[queues]]
//!     name = "orders"
//!     bindings = [{ exchange = "shop", routing_key = "order.created" }]
//!     dead_letter = true
//!     [[queues]]
//!     name = "audit"
//!     bindings = [{ exchange = "shop", routing_key = "order.accepted" }]
//!     [[stages]]
//!     name = "accept"
//!     queue = "orders"
//!     handler = "accept"
//! "#).unwrap();
//! let prefix = unique("shop");
//! let cfg = uniquely_named(&host, &prefix); // `shop` is now `<prefix>.shop`, ...
//! let shop = format!("{prefix}.shop");
//! let pipeline = TestPipeline::builder(cfg)
//!     .handler("accept", handler_fn(move |d| {
//!         let out = d.forward(&shop, "order.accepted");
//!         async move { Ok(Outcome::ack_with(vec![out])) }
//!     }))
//!     .start()
//!     .await;
//! let ids: Vec<String> = (0..50).map(|i| format!("o-{i}")).collect();
//! pipeline.publish_many(&ids, b"{}").await;
//! let audit = format!("{prefix}.audit");
//! let acc = pipeline.account(&audit, &ids, Duration::from_secs(30)).await;
//! acc.assert_exactly_once();
//! assert!(pipeline.stop().await.clean);
//! # });
//! ```
//!
//! # Publish and collect with the raw client
//!
//! ```no_run
//! use flowgate_testkit::{chain_config, counts, unique, Accounting, Cleanup, Client, AMQP_URL};
//! use std::time::Duration;
//!
//! # #[actix_rt::main]
//! # async fn main() {
//! let prefix = unique("doc");
//! let cfg = chain_config(&prefix, &["forward"], 10);
//! let _cleanup = Cleanup::new(AMQP_URL, &cfg); // deletes the topology on drop
//! let client = Client::connect(AMQP_URL).await;
//! flowgate::topology::declare(&client.ch, &cfg).await.unwrap();
//! client.publish(&format!("{prefix}.ex"), "in", "m-1", b"hello").await;
//! let got = client.collect(&format!("{prefix}.s1"), 1, Duration::from_secs(5)).await;
//! let acc = Accounting::of(["m-1"], &counts(got.into_iter().map(|(id, _)| id)));
//! acc.assert_exactly_once();
//! # }
//! ```
//!
//! # A private broker node for fault tests
//!
//! ```no_run
//! use flowgate_testkit::node::BrokerNode;
//! use flowgate_testkit::{chain_config, unique, TestPipeline};
//!
//! # flowgate::run_system(async {
//! let node = BrokerNode::start_async().await.unwrap(); // stopped on drop
//! let cfg = chain_config(&unique("fault"), &["forward"], 10);
//! let pipeline = TestPipeline::builder(cfg).url(&node.amqp_url()).start().await;
//! node.blocking(|n| n.set_memory_alarm(true)).await.unwrap();
//! // ... publishers are blocked now; assert the engine holds back ...
//! node.blocking(|n| n.set_memory_alarm(false)).await.unwrap();
//! pipeline.stop().await;
//! # });
//! ```
#![warn(missing_docs)]

mod accounting;
pub mod daemon;
pub mod driver;
pub mod history;
pub mod node;
pub mod pipeline;
pub mod pki;
pub mod postgres;
pub mod proxy;
pub mod raw;
pub mod redis;
pub mod secrets;
pub mod soak;
pub mod synthetic;

pub use accounting::Accounting;
pub use pipeline::{TestPipeline, TestPipelineBuilder};
pub use synthetic::{run_batch, run_handler, DeliveryBuilder, OutcomeExt, OutputExt};

use flowgate::config::{Config, QueueKind};
use futures::StreamExt;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use std::collections::HashMap;
use std::time::Duration;

/// The shared broker every machine runs.
pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// A unique name prefix for one test's topology.
pub fn unique(prefix: &str) -> String {
    format!(
        "t-{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    )
}

/// `cfg` with every exchange and queue it names renamed `<prefix>.<name>`
/// (bindings, stage queues, outputs and ingress routes follow; the default
/// exchange and `amq.*` keep their names), its connection named `prefix`
/// and its Redis dedup keys under their own prefix: a host's own config,
/// made safe to run beside other tests on the shared broker
/// ([`Config::uniquely_named`]).
pub fn uniquely_named(cfg: &Config, prefix: &str) -> Config {
    cfg.uniquely_named(prefix)
}

/// A raw client (not flowgate) used by tests to publish and observe.
pub struct Client {
    /// Its connection (open more channels on it).
    pub conn: Connection,
    /// A channel in confirm mode.
    pub ch: Channel,
    /// The private node this client talks to (`None`: the shared broker),
    /// for the `rabbitmqctl` queries of [`Client::collect`].
    node: Option<String>,
}

impl Client {
    /// Connects and opens a confirm-mode channel; panics if the broker does
    /// not answer.
    pub async fn connect(url: &str) -> Client {
        let conn = Connection::connect(
            url,
            ConnectionProperties::default().with_connection_name("flowgate-test-client".into()),
        )
        .await
        .expect("test client connects");
        let ch = conn.create_channel().await.expect("channel");
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirm mode");
        Client {
            conn,
            ch,
            node: node::node_for_url(url),
        }
    }

    /// Publishes with a confirm (persistent, mandatory); panics if not confirmed.
    pub async fn publish(&self, exchange: &str, key: &str, id: &str, body: &[u8]) {
        self.publish_props(
            exchange,
            key,
            body,
            BasicProperties::default().with_message_id(id.into()),
        )
        .await
    }

    /// Publishes with these properties (made persistent) and a confirm;
    /// panics if not confirmed.
    pub async fn publish_props(
        &self,
        exchange: &str,
        key: &str,
        body: &[u8],
        props: BasicProperties,
    ) {
        let c = self
            .ch
            .basic_publish(
                exchange.into(),
                key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                body,
                props.with_delivery_mode(2),
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
        assert!(
            matches!(c, lapin::Confirmation::Ack(None)),
            "publish not confirmed: {c:?}"
        );
    }

    /// Publishes `ids` with a window of outstanding confirms.
    pub async fn publish_many(&self, exchange: &str, key: &str, ids: &[String], body: &[u8]) {
        let mut pending = futures::stream::FuturesUnordered::new();
        for id in ids {
            let c = self
                .ch
                .basic_publish(
                    exchange.into(),
                    key.into(),
                    BasicPublishOptions {
                        mandatory: true,
                        immediate: false,
                    },
                    body,
                    BasicProperties::default()
                        .with_message_id(id.as_str().into())
                        .with_delivery_mode(2),
                )
                .await
                .expect("publish");
            pending.push(c);
            if pending.len() >= 500 {
                let c = pending.next().await.expect("pending").expect("confirm");
                assert!(matches!(c, lapin::Confirmation::Ack(None)));
            }
        }
        while let Some(c) = pending.next().await {
            assert!(matches!(
                c.expect("confirm"),
                lapin::Confirmation::Ack(None)
            ));
        }
    }

    /// Consumes from `queue` until `n` messages arrived or `timeout` passed;
    /// acks them. Returns (message id, headers) per delivery in arrival order.
    ///
    /// Panics rather than return partial data on a consumer error, an ended
    /// consumer, a failing `rabbitmqctl`, or acks the queue has not settled
    /// within 10 s: a test must not read "fewer arrived" into a broken probe.
    pub async fn collect(
        &self,
        queue: &str,
        n: usize,
        timeout: Duration,
    ) -> Vec<(String, FieldTable)> {
        self.collect_while(queue, timeout, |got| got.len() < n)
            .await
    }

    /// [`Client::collect`] until `more`, asked with everything taken so far
    /// before each delivery is awaited, says enough (or `timeout` passed).
    /// One consumer throughout: what it takes is acked once, never handed
    /// back and taken again (a requeue counts against a quorum queue's
    /// `delivery_limit`).
    pub async fn collect_while(
        &self,
        queue: &str,
        timeout: Duration,
        mut more: impl FnMut(&[(String, FieldTable)]) -> bool,
    ) -> Vec<(String, FieldTable)> {
        let ch = self.conn.create_channel().await.expect("channel");
        ch.basic_qos(1000, BasicQosOptions::default())
            .await
            .expect("qos");
        let mut consumer = ch
            .basic_consume(
                queue.into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("consume");
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + timeout;
        while more(&out) {
            match tokio::time::timeout_at(deadline, consumer.next()).await {
                Ok(Some(Ok(d))) => {
                    let id = d
                        .properties
                        .message_id()
                        .as_ref()
                        .map(|s| s.to_string())
                        .unwrap_or_default();
                    let headers = d.properties.headers().clone().unwrap_or_default();
                    assert!(
                        d.ack(BasicAckOptions::default()).await.expect("ack"),
                        "ack not sent (channel poisoned?)"
                    );
                    out.push((id, headers));
                }
                Ok(Some(Err(e))) => {
                    panic!(
                        "collect({queue}): consumer error after {} messages: {e}",
                        out.len()
                    );
                }
                Ok(None) => {
                    panic!(
                        "collect({queue}): consumer ended after {} messages",
                        out.len()
                    );
                }
                Err(_) => break,
            }
        }
        // Stop deliveries, then wait until the queue has settled every ack
        // before closing: a quorum queue applies acks through Raft, and a
        // channel closed while they are in flight returns those messages
        // to the queue as if they had never been acked. Only tests consume
        // the queues collected here, so "no unacked" means "all ours settled".
        let _ = ch
            .basic_cancel(
                consumer.tag().as_str().into(),
                BasicCancelOptions::default(),
            )
            .await;
        // Deliveries past the ones asked for may already be ours (prefetch):
        // give them back, or they stay unacked until the channel closes.
        while let Ok(Some(Ok(d))) =
            tokio::time::timeout(Duration::from_secs(1), consumer.next()).await
        {
            d.nack(BasicNackOptions {
                requeue: true,
                ..Default::default()
            })
            .await
            .expect("nack");
        }
        let q = queue.to_owned();
        let node = self.node.clone();
        let settled = eventually(Duration::from_secs(10), || {
            let (q, node) = (q.clone(), node.clone());
            async move {
                let name = q.clone();
                let listed = tokio::task::spawn_blocking(move || {
                    node::try_list_queue(node.as_deref(), &name)
                })
                .await
                .expect("rabbitmqctl task panicked");
                match listed {
                    // A queue that is gone has nothing left unacked.
                    Ok(counts) => counts.is_none_or(|(_, unacked, _)| unacked == 0),
                    Err(e) => panic!("collect({q}): rabbitmqctl list_queues failed: {e:#}"),
                }
            }
        })
        .await;
        assert!(
            settled,
            "collect({queue}): the broker has not settled our acks within 10 s"
        );
        let _ = ch.close(200, "collected".into()).await;
        out
    }

    /// Consumes from `queue` until `n` distinct message ids arrived (redeliveries
    /// after a connection loss are counted, not returned twice).
    pub async fn collect_distinct(
        &self,
        queue: &str,
        n: usize,
        timeout: Duration,
    ) -> HashMap<String, usize> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut seen: HashMap<String, usize> = HashMap::new();
        while seen.len() < n && tokio::time::Instant::now() < deadline {
            let left = deadline - tokio::time::Instant::now();
            let batch = self.collect(queue, n - seen.len(), left).await;
            if batch.is_empty() {
                break;
            }
            for (id, _) in batch {
                *seen.entry(id).or_insert(0) += 1;
            }
        }
        seen
    }

    /// Collects from `queue` until `n` distinct ids arrived (or `timeout`
    /// passed), then everything still in it (duplicates); returns how often
    /// each id was delivered. What is left is read from the queue itself
    /// (`queue.declare-ok`), not from `rabbitmqctl`, whose quorum-queue
    /// figures are published periodically and lag behind.
    pub async fn collect_all(
        &self,
        queue: &str,
        n: usize,
        timeout: Duration,
    ) -> HashMap<String, usize> {
        let mut seen = self.collect_distinct(queue, n, timeout).await;
        loop {
            let left = self
                .passive_declare(queue)
                .await
                .expect("the collected queue exists")
                .message_count() as usize;
            if left == 0 {
                return seen;
            }
            for (id, _) in self.collect(queue, left, timeout).await {
                *seen.entry(id).or_insert(0) += 1;
            }
        }
    }

    /// A passive `queue.declare` on a fresh channel: the queue's counts, or
    /// the broker's error if it does not exist.
    pub async fn passive_declare(&self, queue: &str) -> Result<lapin::Queue, lapin::Error> {
        let ch = self.conn.create_channel().await?;
        let q = flowgate::topology::inspect_queue(&ch, queue).await;
        let _ = ch.close(200, "".into()).await;
        match q {
            Ok(q) => Ok(q),
            Err(flowgate::RuntimeError::Amqp(e)) => Err(e),
            Err(e) => panic!("passive declare of {queue:?}: {e}"),
        }
    }

    /// `(ready messages, consumers)` of a queue as the queue itself answers
    /// a passive `queue.declare` (live, unlike `rabbitmqctl`'s quorum-queue
    /// figures, which are published periodically and read zero for a while
    /// after a leader moves).
    pub async fn queue_stat(&self, queue: &str) -> (u32, u32) {
        let q = self.passive_declare(queue).await.expect("queue exists");
        (q.message_count(), q.consumer_count())
    }

    /// Waits up to `timeout` until every one of `queues` holds no ready
    /// message and has exactly `consumers` consumers ([`Client::queue_stat`]).
    /// `Err` names the last state seen of each queue. Unacked deliveries are
    /// not visible this way: pair it with the engine's in-flight gauges.
    pub async fn settled(
        &self,
        queues: &[String],
        consumers: u32,
        timeout: Duration,
    ) -> Result<(), String> {
        let last = std::cell::RefCell::new(Vec::new());
        let ok = eventually(timeout, || {
            let last = &last;
            async move {
                let mut now = Vec::new();
                for q in queues {
                    now.push((q.clone(), self.queue_stat(q).await));
                }
                let ok = now
                    .iter()
                    .all(|(_, (ready, c))| *ready == 0 && *c == consumers);
                *last.borrow_mut() = now;
                ok
            }
        })
        .await;
        let last = last.into_inner();
        if ok {
            Ok(())
        } else {
            Err(format!("(queue, (ready, consumers)): {last:?}"))
        }
    }

    /// Ready messages in a queue (passive declare).
    pub async fn depth(&self, queue: &str) -> u32 {
        self.passive_declare(queue)
            .await
            .expect("queue exists")
            .message_count()
    }

    /// Deletes a topology made from a flowgate config.
    pub async fn delete_topology(&self, cfg: &Config) {
        let ch = self.conn.create_channel().await.expect("channel");
        flowgate::topology::delete(&ch, cfg)
            .await
            .expect("delete topology");
    }
}

/// Deletes the exchanges and queues of `cfg` on the broker at `url`;
/// failures are logged to stderr (for cleanups that must not fail a run).
pub async fn delete_topology(url: &str, cfg: &Config) {
    if let Ok(conn) = Connection::connect(url, ConnectionProperties::default()).await {
        if let Ok(ch) = conn.create_channel().await {
            if let Err(e) = flowgate::topology::delete(&ch, cfg).await {
                eprintln!("deleting the topology: {e}");
            }
            // Close the channel before the connection, or lapin reports a
            // connection error for the channel dropped mid-close.
            let _ = ch.close(200, "cleanup".into()).await;
        }
        let _ = conn.close(200, "cleanup".into()).await;
    }
}

/// Deletes a test's topology when dropped — also when the test panicked, so
/// failed runs leave nothing behind on the shared broker.
pub struct Cleanup {
    url: String,
    cfg: Config,
}

impl Cleanup {
    /// Deletes `cfg`'s queues and exchanges on drop.
    pub fn new(url: &str, cfg: &Config) -> Cleanup {
        Cleanup {
            url: url.to_owned(),
            cfg: cfg.clone(),
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let (url, cfg) = (self.url.clone(), self.cfg.clone());
        // A thread with its own runtime: drop may run while the test's
        // runtime is unwinding.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                delete_topology(&url, &cfg).await;
            });
        })
        .join();
    }
}

/// A child process (a daemon under test) killed when the guard drops, so a
/// failing test never leaves a daemon behind.
pub struct ChildGuard(
    /// The child.
    pub std::process::Child,
);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// A header as a string.
pub fn header(h: &FieldTable, name: &str) -> Option<String> {
    h.inner()
        .get(name)
        .and_then(flowgate::envelope::header_string)
}

/// A config for a chain `prefix.s1 → … → prefix.sN → prefix.sink` on exchange
/// `prefix.ex` (input key `in`), with the given handler names per stage.
pub fn chain_config(prefix: &str, handlers: &[&str], prefetch: u32) -> Config {
    let mut cfg = driver::chain_config(prefix, handlers, prefetch, QueueKind::Quorum);
    cfg.shutdown.grace = Duration::from_secs(10);
    cfg
}

/// Waits until `queue` exists (a daemon under test declares its topology).
pub async fn wait_for_queue(client: &Client, queue: &str, timeout: Duration) -> bool {
    eventually(timeout, || async {
        client.passive_declare(queue).await.is_ok()
    })
    .await
}

/// Asserts a queue becomes empty. Quorum queues apply acks through Raft, so
/// a count read right after the last ack may still include it: the check
/// waits (bounded) for the broker's view to settle instead of sleeping.
pub async fn assert_drained(client: &Client, queue: &str) {
    let ok = eventually(Duration::from_secs(15), || async {
        client.depth(queue).await == 0
    })
    .await;
    if !ok {
        let q = queue.to_owned();
        let view = tokio::task::spawn_blocking(move || node::list_queue(None, &q)).await;
        panic!(
            "queue {queue} still holds {} messages; rabbitmqctl: {view:?}",
            client.depth(queue).await
        );
    }
}

/// Waits up to `timeout` until the pipeline `cfg` describes is idle at one
/// moment: every stage queue holds no ready message and has exactly one
/// consumer ([`Client::settled`]), and every stage of the engine whose
/// `metrics` these are has nothing in flight. `Err` says what was seen last.
pub async fn pipeline_idle(
    client: &Client,
    metrics: &flowgate::Metrics,
    cfg: &Config,
    timeout: Duration,
) -> Result<(), String> {
    // A stage on a partitioned queue runs one consumer per partition.
    let consumers: Vec<(String, String)> =
        cfg.stages.iter().flat_map(|s| cfg.consumers(s)).collect();
    let queues: Vec<String> = consumers.iter().map(|(_, q)| q.clone()).collect();
    let in_flight = || -> Vec<(String, i64)> {
        consumers
            .iter()
            .map(|(name, _)| {
                let n = metrics.gauge(flowgate::Metrics::IN_FLIGHT, &[name.as_str()]);
                (name.clone(), n)
            })
            .collect()
    };
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let queues_seen = client.settled(&queues, 1, left).await;
        let stages = in_flight();
        if queues_seen.is_ok() && stages.iter().all(|(_, n)| *n == 0) {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!(
                "stage queues: {queues_seen:?}; in flight per stage: {stages:?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Counts of each id.
pub fn counts(ids: impl IntoIterator<Item = String>) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for id in ids {
        *m.entry(id).or_insert(0) += 1;
    }
    m
}

/// A string header value.
pub fn s(v: &str) -> AMQPValue {
    AMQPValue::LongString(v.to_owned().into())
}

/// Builds a header table.
pub fn headers(pairs: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in pairs {
        t.insert(ShortString::from(*k), v.clone());
    }
    t
}

/// The end of a fault run, as every fault test reads it: the pipeline
/// goes idle with one consumer per stage queue ([`pipeline_idle`]) and
/// every one of `ids` is in `sink` (panics naming what is missing, for
/// the test). Returns how many duplicates the sink holds.
pub async fn finish_run(
    client: &Client,
    metrics: &flowgate::Metrics,
    cfg: &Config,
    sink: &str,
    ids: &[String],
    idle_within: Duration,
) -> usize {
    let idle = pipeline_idle(client, metrics, cfg, idle_within).await;
    assert!(
        idle.is_ok(),
        "the run did not finish with one consumer per stage queue: {idle:?}\n{}",
        metrics.render()
    );
    // Everything the sink holds, duplicates included.
    let n = ids.len();
    let seen = client.collect_all(sink, n, Duration::from_secs(120)).await;
    let in_sink: usize = seen.values().sum();
    let missing: Vec<&String> = ids.iter().filter(|i| !seen.contains_key(*i)).collect();
    assert!(
        missing.is_empty(),
        "{} of {n} ids never arrived (first: {:?})",
        missing.len(),
        missing.iter().take(5).collect::<Vec<_>>()
    );
    in_sink - seen.len()
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if cond().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh server-named, exclusive queue on `client` holding `n` messages.
    async fn queue_with(client: &Client, n: usize) -> String {
        let q = client
            .ch
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("declare");
        let name = q.name().to_string();
        for i in 0..n {
            client.publish("", &name, &format!("m-{i}"), b"x").await;
        }
        name
    }

    #[actix_rt::test]
    async fn collect_returns_what_arrived_once_acks_settle() {
        let client = Client::connect(AMQP_URL).await;
        let q = queue_with(&client, 3).await;
        let got = client.collect(&q, 3, Duration::from_secs(10)).await;
        let ids: Vec<_> = got.into_iter().map(|(id, _)| id).collect();
        assert_eq!(ids, ["m-0", "m-1", "m-2"]);
    }

    #[actix_rt::test]
    async fn collect_gives_back_what_it_did_not_ask_for() {
        let client = Client::connect(AMQP_URL).await;
        let q = queue_with(&client, 50).await;
        let got = client.collect(&q, 2, Duration::from_secs(10)).await;
        assert_eq!(got.len(), 2);
        let left = client.passive_declare(&q).await.expect("queue");
        assert_eq!(left.message_count(), 48, "the rest are ready again");
    }

    #[actix_rt::test]
    #[should_panic(expected = "rabbitmqctl list_queues failed")]
    async fn collect_fails_when_rabbitmqctl_fails() {
        let mut client = Client::connect(AMQP_URL).await;
        let q = queue_with(&client, 1).await;
        // A node nobody runs: every `rabbitmqctl` query about it fails.
        client.node = Some("fg-nobody@localhost".into());
        client.collect(&q, 1, Duration::from_secs(10)).await;
    }

    #[actix_rt::test]
    #[should_panic(expected = "consumer ended")]
    async fn collect_fails_when_its_consumer_is_cancelled() {
        let client = Client::connect(AMQP_URL).await;
        let q = queue_with(&client, 1).await;
        let deleter = client.conn.create_channel().await.expect("channel");
        let name = q.clone();
        tokio::spawn(async move {
            // Once collect's consumer is on the queue, delete the queue
            // under it: the broker cancels the consumer.
            let listening = eventually(Duration::from_secs(10), || async {
                deleter
                    .queue_declare(
                        name.as_str().into(),
                        QueueDeclareOptions {
                            passive: true,
                            ..Default::default()
                        },
                        FieldTable::default(),
                    )
                    .await
                    .is_ok_and(|q| q.consumer_count() == 1)
            })
            .await;
            assert!(listening, "collect's consumer never appeared");
            deleter
                .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
                .await
                .expect("delete");
        });
        client.collect(&q, 2, Duration::from_secs(10)).await;
    }
}
