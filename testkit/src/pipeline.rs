//! An engine running a test's handlers against a real broker, on topology
//! of the test's own that is deleted afterwards, with a raw client to
//! publish into it and collect from it.
//!
//! ```no_run
//! use flowgate::{handler_fn, Outcome};
//! use flowgate_testkit::pipeline::TestPipeline;
//! use flowgate_testkit::{chain_config, unique};
//! use std::time::Duration;
//!
//! # flowgate::run_system(async {
//! // `<prefix>.s1` (stage `s1`) → `<prefix>.sink`, on the broker at AMQP_URL.
//! let prefix = unique("doc");
//! let cfg = chain_config(&prefix, &["tag"], 10);
//! let out = cfg.stages[0].output.clone().unwrap();
//! let pipeline = TestPipeline::builder(cfg)
//!     .handler("tag", handler_fn(move |d| {
//!         let next = d.forward(&out.exchange, &out.routing_key);
//!         async move { Ok(Outcome::ack_with(vec![next])) }
//!     }))
//!     .start()
//!     .await;
//! let ids: Vec<String> = (0..100).map(|i| format!("m-{i}")).collect();
//! pipeline.publish_many(&ids, b"{}").await;
//! pipeline
//!     .account(&format!("{prefix}.sink"), &ids, Duration::from_secs(30))
//!     .await
//!     .assert_exactly_once();
//! assert!(pipeline.stop().await.clean);
//! # });
//! ```

use crate::{pipeline_idle, Accounting, Cleanup, Client};
use flowgate::config::Config;
use flowgate::ShutdownReport;
use flowgate::{Engine, EngineBuilder, EngineHandle, Handler};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

/// Sets up a [`TestPipeline`].
pub struct TestPipelineBuilder {
    cfg: Config,
    engine: EngineBuilder,
    /// Where [`TestPipeline::publish`] publishes; `None`: the first
    /// stage's queue's first binding.
    input: Option<(String, String)>,
    ready_timeout: Duration,
}

/// A running engine on a test's own topology, with a raw [`Client`] on the
/// same broker.
///
/// The topology is declared by the engine at start and deleted when the
/// pipeline is dropped — also when the test panics. Stop it with
/// [`stop`](Self::stop) for a graceful shutdown first (dropping it deletes
/// the queues under a running engine, which then logs their loss until the
/// test's runtime ends).
pub struct TestPipeline {
    handle: EngineHandle,
    client: Client,
    cfg: Config,
    input: Option<(String, String)>,
    /// Declared last, so it drops last: the topology goes after the client.
    _cleanup: Cleanup,
}

impl TestPipeline {
    /// A pipeline running `cfg` (give it unique names: [`crate::unique`]
    /// with [`crate::chain_config`], or [`crate::uniquely_named`] on a
    /// host's own config). Its listeners (`[http] bind`, `[ingress] bind`),
    /// when set, bind a free port on 127.0.0.1 instead, so tests can run in
    /// parallel ([`EngineHandle::http_addr`], [`EngineHandle::ingress_addr`]
    /// say where).
    pub fn builder(mut cfg: Config) -> TestPipelineBuilder {
        for bind in [&mut cfg.http.bind, &mut cfg.ingress.bind] {
            if !bind.is_empty() {
                *bind = "127.0.0.1:0".to_owned();
            }
        }
        TestPipelineBuilder {
            cfg,
            engine: Engine::builder(),
            input: None,
            ready_timeout: Duration::from_secs(20),
        }
    }

    /// The running engine.
    pub fn handle(&self) -> &EngineHandle {
        &self.handle
    }

    /// The raw client (publish with properties, collect with headers,
    /// queue counts).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The configuration the engine runs (listeners rebound, see
    /// [`TestPipeline::builder`]).
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// `(exchange, routing key)` [`publish`](Self::publish) uses.
    ///
    /// # Panics
    ///
    /// When the config has no stage to derive it from and none was given
    /// ([`TestPipelineBuilder::input`]).
    pub fn input(&self) -> (&str, &str) {
        match &self.input {
            Some((ex, key)) => (ex, key),
            None => panic!("no input: the config has no stage; set TestPipelineBuilder::input"),
        }
    }

    /// Publishes one message to the input, persistent and confirmed
    /// ([`Client::publish`]).
    pub async fn publish(&self, id: &str, body: &[u8]) {
        let (ex, key) = self.input();
        self.client.publish(ex, key, id, body).await
    }

    /// Publishes `ids` (one message each, same body) to the input, with
    /// confirms ([`Client::publish_many`]).
    pub async fn publish_many(&self, ids: &[String], body: &[u8]) {
        let (ex, key) = self.input();
        self.client.publish_many(ex, key, ids, body).await
    }

    /// The dead-letter queue of the configured queue `queue`, if it has one.
    pub fn dead_letter_queue(&self, queue: &str) -> Option<String> {
        self.cfg.queue(queue)?.dead_letter_queue()
    }

    /// Waits until the pipeline is idle ([`crate::pipeline_idle`]): every
    /// stage queue empty with its one consumer, nothing in flight.
    pub async fn idle(&self, timeout: Duration) -> Result<(), String> {
        pipeline_idle(&self.client, self.handle.metrics(), &self.cfg, timeout).await
    }

    /// Exactly-once accounting of `queue` (one no stage consumes, e.g. the
    /// sink or a dead-letter queue) against the ids `expected` there:
    /// collects (and acks, [`Client::collect_while`]) until every expected
    /// id arrived or `timeout` passed, waits for the pipeline to be
    /// [idle](Self::idle) so late copies have landed, then takes what is
    /// left in the queue too.
    ///
    /// # Panics
    ///
    /// When the pipeline is not idle within `timeout` (a stage still
    /// working: the count could not be final), saying what was seen.
    pub async fn account(&self, queue: &str, expected: &[String], timeout: Duration) -> Accounting {
        account(
            &self.client,
            self.handle.metrics(),
            &self.cfg,
            queue,
            expected,
            timeout,
        )
        .await
    }

    /// Shuts the engine down gracefully, then deletes the topology.
    pub async fn stop(self) -> ShutdownReport {
        self.handle.shutdown().await
    }
}

/// [`TestPipeline::account`] for an engine started some other way (a host
/// running its own engine, the Python binding's test pipeline): `metrics`
/// are the engine's, `cfg` the configuration it runs, `client` a raw
/// client on its broker.
///
/// # Panics
///
/// When the pipeline is not idle within `timeout`, saying what was seen.
pub async fn account(
    client: &Client,
    metrics: &flowgate::Metrics,
    cfg: &Config,
    queue: &str,
    expected: &[String],
    timeout: Duration,
) -> Accounting {
    let wanted: HashSet<&str> = expected.iter().map(String::as_str).collect();
    let (mut seen, mut checked) = (HashSet::new(), 0);
    let got = client
        .collect_while(queue, timeout, |got| {
            // Only what arrived since the last call is new.
            for (id, _) in &got[checked..] {
                if wanted.contains(id.as_str()) {
                    seen.insert(id.clone());
                }
            }
            checked = got.len();
            seen.len() < wanted.len()
        })
        .await;
    let mut arrived = crate::counts(got.into_iter().map(|(id, _)| id));
    if let Err(state) = pipeline_idle(client, metrics, cfg, timeout).await {
        let so_far = Accounting::of(expected, &arrived);
        panic!(
            "account({queue}): the pipeline is not idle within {timeout:?} \
             ({state}); so far: {so_far}"
        );
    }
    merge(&mut arrived, client.collect_all(queue, 0, timeout).await);
    Accounting::of(expected, &arrived)
}

/// Adds the counts of `more` to `into`.
fn merge(into: &mut HashMap<String, usize>, more: HashMap<String, usize>) {
    for (id, n) in more {
        *into.entry(id).or_insert(0) += n;
    }
}

impl TestPipelineBuilder {
    /// Runs against the broker at `url` instead of the config's
    /// (`[amqp]`, by default [`crate::AMQP_URL`]), e.g. a private
    /// [`BrokerNode`](crate::node::BrokerNode)'s.
    pub fn url(mut self, url: &str) -> Self {
        self.cfg.amqp.url = url.to_owned();
        self.cfg.amqp.urls.clear();
        self.cfg.amqp.url_file = None;
        self
    }

    /// Registers a handler under a name ([`EngineBuilder::handler`]).
    pub fn handler(mut self, name: &str, handler: impl Handler) -> Self {
        self.engine = self.engine.handler(name, handler);
        self
    }

    /// Registers a shared handler ([`EngineBuilder::handler_arc`]).
    pub fn handler_arc(mut self, name: &str, handler: Arc<dyn Handler>) -> Self {
        self.engine = self.engine.handler_arc(name, handler);
        self
    }

    /// Anything else the engine builder offers (handler factories, ...);
    /// the configuration is the pipeline's, whatever `f` sets.
    pub fn engine(mut self, f: impl FnOnce(EngineBuilder) -> EngineBuilder) -> Self {
        self.engine = f(self.engine);
        self
    }

    /// Publishes to this exchange and routing key (default: the first
    /// binding of the first stage's queue, or the queue itself through the
    /// default exchange; set this when that binding is a pattern).
    pub fn input(mut self, exchange: &str, routing_key: &str) -> Self {
        self.input = Some((exchange.to_owned(), routing_key.to_owned()));
        self
    }

    /// How long [`start`](Self::start) waits for every stage to consume
    /// (default 20 s).
    pub fn ready_timeout(mut self, timeout: Duration) -> Self {
        self.ready_timeout = timeout;
        self
    }

    /// Builds and starts the engine (it declares the topology), waits until
    /// every stage consumes, connects the raw client.
    ///
    /// # Panics
    ///
    /// When the config or a handler is refused, the engine does not start,
    /// or it is not ready in time (a test kit fails loudly; what is
    /// declared by then is deleted).
    pub async fn start(self) -> TestPipeline {
        let TestPipelineBuilder {
            cfg,
            engine,
            input,
            ready_timeout,
        } = self;
        let url = cfg
            .amqp
            .resolved_url()
            .unwrap_or_else(|e| panic!("the test pipeline's broker URL: {e}"));
        // Armed before the engine declares anything: a start failing half
        // way leaves nothing behind either.
        let cleanup = Cleanup::new(&url, &cfg);
        let engine = engine
            .config(cfg.clone())
            .build()
            .unwrap_or_else(|e| panic!("the test pipeline's engine: {e}"));
        let handle = engine
            .start()
            .await
            .unwrap_or_else(|e| panic!("the test pipeline's engine starts: {e}"));
        if !handle.wait_ready(ready_timeout).await {
            handle.shutdown().await;
            panic!("the test pipeline's stages are not all consuming within {ready_timeout:?}");
        }
        let client = Client::connect(&url).await;
        let input = input.or_else(|| default_input(&cfg));
        TestPipeline {
            handle,
            client,
            cfg,
            input,
            _cleanup: cleanup,
        }
    }
}

/// The first binding of the first stage's queue, or that queue through the
/// default exchange.
fn default_input(cfg: &Config) -> Option<(String, String)> {
    let queue = &cfg.stages.first()?.queue;
    let binding = cfg.queue(queue).and_then(|q| q.bindings.first());
    Some(match binding {
        Some(b) => (b.exchange.clone(), b.routing_key.clone()),
        None => (String::new(), queue.clone()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{chain_config, header, unique};
    use flowgate::{handler_fn, Delivery, Outcome};

    #[test]
    fn the_input_is_the_first_stages_binding() {
        let cfg = chain_config("p", &["forward", "forward"], 1);
        assert_eq!(default_input(&cfg), Some(("p.ex".into(), "in".into())));
        let mut unbound = cfg.clone();
        unbound.queues[0].bindings.clear();
        assert_eq!(default_input(&unbound), Some(("".into(), "p.s1".into())));
    }

    #[actix_rt::test]
    async fn a_pipeline_accounts_for_every_id_and_dead_letters_with_the_reason() {
        let prefix = unique("kit-pipe");
        let cfg = chain_config(&prefix, &["odd"], 10);
        let out = cfg.stages[0].output.clone().unwrap();
        let odd = handler_fn(move |d: Delivery| {
            let next = d.forward(&out.exchange, &out.routing_key);
            async move {
                let n: u32 = d.message_id().unwrap_or_default()[2..].parse()?;
                Ok(match n % 2 {
                    0 => Outcome::dead_letter("even"),
                    _ => Outcome::ack_with(vec![next]),
                })
            }
        });
        let p = TestPipeline::builder(cfg).handler("odd", odd).start().await;
        let ids: Vec<String> = (0..40).map(|i| format!("m-{i}")).collect();
        p.publish_many(&ids, b"x").await;
        let (odd, even): (Vec<String>, Vec<String>) = ids
            .iter()
            .cloned()
            .partition(|id| id[2..].parse::<u32>().unwrap() % 2 == 1);
        let t = Duration::from_secs(30);
        p.account(&format!("{prefix}.sink"), &odd, t)
            .await
            .assert_exactly_once();
        let dlq = p.dead_letter_queue(&format!("{prefix}.s1")).unwrap();
        let dead = p.client().collect(&dlq, even.len(), t).await;
        assert_eq!(dead.len(), even.len());
        for (id, h) in &dead {
            let reason = header(h, flowgate::envelope::REASON);
            assert_eq!(reason.as_deref(), Some("even"), "{id}");
        }
        assert!(p.stop().await.clean);
    }

    #[actix_rt::test]
    async fn every_copy_is_counted_also_those_late_or_left_in_the_queue() {
        let prefix = unique("kit-dup");
        let mut cfg = chain_config(&prefix, &["twice"], 10);
        // Taking a copy and handing it back costs one delivery of this
        // budget: accounting must take each copy once.
        cfg.queues[1].delivery_limit = Some(3);
        let out = cfg.stages[0].output.clone().unwrap();
        let twice = handler_fn(move |d: Delivery| {
            let next = d.forward(&out.exchange, &out.routing_key);
            async move { Ok(Outcome::ack_with(vec![next.clone(), next])) }
        });
        let p = TestPipeline::builder(cfg)
            .handler("twice", twice)
            .start()
            .await;
        let ids: Vec<String> = (0..30).map(|i| format!("m-{i}")).collect();
        p.publish_many(&ids, b"x").await;
        let acc = p
            .account(&format!("{prefix}.sink"), &ids, Duration::from_secs(30))
            .await;
        assert!(!acc.is_exactly_once());
        assert!(acc.missing.is_empty(), "{acc}");
        assert_eq!(acc.duplicates.len(), ids.len(), "{acc}");
        assert!(acc.duplicates.values().all(|n| *n == 2), "{acc}");
        p.stop().await;
    }

    #[actix_rt::test]
    async fn the_topology_is_gone_after_the_pipeline() {
        let prefix = unique("kit-gone");
        let cfg = chain_config(&prefix, &["forward"], 10);
        let p = TestPipeline::builder(cfg).start().await;
        let client = Client::connect(crate::AMQP_URL).await;
        let q = format!("{prefix}.s1");
        assert!(client.passive_declare(&q).await.is_ok(), "declared");
        p.stop().await;
        assert!(client.passive_declare(&q).await.is_err(), "deleted");
    }
}
