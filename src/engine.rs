//! The engine: builds the actor tree from a [`Config`] and runs it.

use crate::config::StageConfig;
use crate::config::{Config, ConfigError, DedupMode, OrderBy, StageParts};
use crate::control::Control;
use crate::depth::IngressGate;
use crate::error::Error;
use crate::handlers::{self, FactoryError, HandlerFactory};
use crate::http::{self, HttpState};
use crate::ingress::Ingress;
use crate::postgres::TxHandler;
use actix::prelude::*;
use flowgate_actors::Escalation;
use flowgate_actors::RedisStoreConfig;
use flowgate_actors::{Close, Closer, ConnectionActor, ConnectionConfig, OpenChannel, Purpose};
use flowgate_actors::{
    DedupActor, DedupHandle, DedupSettings, DedupStore, MemoryStore, RedisStore,
};
use flowgate_actors::{Delivery, Handler, KeyFn, Metrics, Output};
use flowgate_actors::{DepthMonitorActor, DepthMonitorConfig, WatchedStage};
use flowgate_actors::{Drain, DrainReport, StageActor, StageProbe};
use flowgate_actors::{Published, PublisherActor, PublisherConfig, PublisherHandle, SpoolConfig};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, Mutex};
use tracing::info;

/// How [`EngineHandle::publish`] went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PublishOutcome {
    /// The broker confirmed the message.
    Confirmed,
    /// The broker is not taking publishes (breaker open); the message is
    /// durable in the spool and will be delivered when it is.
    Spooled,
    /// The publish path is saturated (rate limit waiters, spool full, no
    /// spool while the breaker is open): nothing was stored; retry later.
    Backpressure {
        /// Why.
        reason: String,
    },
}

/// Builds an [`Engine`].
///
/// ```no_run
/// use flowgate::{Config, Engine};
/// use flowgate::{handler_fn, Outcome};
///
/// # fn main() -> anyhow::Result<()> {
/// flowgate::run_system(async {
///     let config = Config::from_toml(r#"
///         [[exchanges]]
///         name = "shop"
///         [[queues]]
///         name = "audit"
///         bindings = [{ exchange = "shop", routing_key = "order.created" }]
///         [[stages]]
///         name = "audit"
///         queue = "audit"
///         handler = "audit"
///     "#)?;
///     let engine = Engine::builder()
///         .config(config)
///         .handler("audit", handler_fn(|d| async move {
///             println!("order {:?}", d.message_id());
///             Ok(Outcome::ack())
///         }))
///         .build()?;
///     let handle = engine.start().await?;
///     tokio::signal::ctrl_c().await?;
///     handle.shutdown().await;
///     Ok(())
/// })
/// # }
/// ```
pub struct EngineBuilder {
    config: Option<Config>,
    handlers: HashMap<String, Arc<dyn Handler>>,
    /// Handlers run in a PostgreSQL transaction (the inbox), by name.
    tx_handlers: HashMap<String, Arc<dyn TxHandler>>,
    /// By handler name; the built-ins are registered here like a host's.
    factories: HashMap<String, HandlerFactory>,
    /// Ordering key functions, by the name a stage's `order_by` gives.
    order_keys: HashMap<String, KeyFn>,
}

impl Default for EngineBuilder {
    fn default() -> Self {
        Self {
            config: None,
            handlers: HashMap::new(),
            tx_handlers: HashMap::new(),
            factories: handlers::builtins(),
            order_keys: HashMap::new(),
        }
    }
}

impl EngineBuilder {
    /// Uses this configuration.
    pub fn config(mut self, config: Config) -> Self {
        self.config = Some(config);
        self
    }

    /// Registers a handler under a name: stages whose `handler` (or whose
    /// `name`) equals it run this handler. Registered names win over
    /// factories (built-ins included).
    pub fn handler(mut self, name: &str, handler: impl Handler) -> Self {
        self.handlers.insert(name.to_owned(), Arc::new(handler));
        self
    }

    /// Registers a shared handler.
    pub fn handler_arc(mut self, name: &str, handler: Arc<dyn Handler>) -> Self {
        self.handlers.insert(name.to_owned(), handler);
        self
    }

    /// Registers a handler that works in a PostgreSQL transaction (the
    /// transactional inbox, see [`TxHandler`]): stages whose `handler` (or
    /// `name`) equals `name` run it through the inbox of `[postgres]`, which
    /// must be set. Wins over plain handlers and factories of that name.
    pub fn tx_handler(mut self, name: &str, handler: impl TxHandler) -> Self {
        self.tx_handlers.insert(name.to_owned(), Arc::new(handler));
        self
    }

    /// Registers a handler factory: every stage whose `handler` is `name`
    /// gets the handler `factory` builds from that stage's configuration
    /// (its `output`, `delay`, ...), once, at [`build`](Self::build). The
    /// built-ins `forward`, `sink` and `record` are factories registered the
    /// same way; registering one of their names replaces it. A factory's
    /// error fails the build, naming the stage.
    ///
    /// ```
    /// use flowgate::{Engine, Handler, Outcome, StageConfig, handler_fn};
    /// use std::sync::Arc;
    ///
    /// let builder = Engine::builder().handler_factory("tag", |stage: &StageConfig| {
    ///     let target = stage.output.clone().ok_or("`tag` needs an output")?;
    ///     Ok::<_, &str>(Arc::new(handler_fn(move |d| {
    ///         let out = d.forward(&target.exchange, &target.routing_key);
    ///         async move { Ok(Outcome::ack_with(vec![out])) }
    ///     })) as Arc<dyn Handler>)
    /// });
    /// # drop(builder);
    /// ```
    pub fn handler_factory<F, E>(mut self, name: &str, factory: F) -> Self
    where
        F: Fn(&StageConfig) -> Result<Arc<dyn Handler>, E> + Send + Sync + 'static,
        E: Into<FactoryError>,
    {
        self.factories.insert(
            name.to_owned(),
            Arc::new(move |s: &StageConfig| factory(s).map_err(Into::into)),
        );
        self
    }

    /// Registers an ordering key function: a stage whose `order_by` is
    /// `name` handles the deliveries for which `key` gives the same key one
    /// at a time, in delivery order (different keys in parallel); `None`
    /// means the delivery has no key (the stage's `missing_key` decides).
    /// It runs on the stage's intake, once per delivery, before the
    /// handler: keep it cheap. A panic in it counts as no key.
    ///
    /// ```
    /// use flowgate::{Delivery, Engine};
    ///
    /// // order_by = "tenant": the `tenant` header, lower-cased.
    /// let builder = Engine::builder().order_key("tenant", |d: &Delivery| {
    ///     d.header("tenant")
    ///         .and_then(flowgate::envelope::header_string)
    ///         .map(|t| t.to_lowercase())
    /// });
    /// # drop(builder);
    /// ```
    pub fn order_key<F>(mut self, name: &str, key: F) -> Self
    where
        F: Fn(&Delivery) -> Option<String> + Send + Sync + 'static,
    {
        self.order_keys.insert(name.to_owned(), Arc::new(key));
        self
    }

    /// Validates the configuration and resolves every stage's handler.
    pub fn build(self) -> Result<Engine, ConfigError> {
        let config = self
            .config
            .ok_or_else(|| ConfigError::new("<config>", "no configuration given"))?;
        let mut names: Vec<String> = self.factories.keys().cloned().collect();
        names.extend(self.handlers.keys().cloned());
        names.extend(self.tx_handlers.keys().cloned());
        // a stage may also be matched by its own name
        for s in &config.stages {
            if self.handlers.contains_key(&s.name) || self.tx_handlers.contains_key(&s.name) {
                names.push(s.handler.clone());
            }
        }
        names.sort();
        names.dedup();
        crate::config::validate(&config, Some(&names))?;
        config
            .stages
            .iter()
            .for_each(StageConfig::warn_of_long_retries);
        let mut resolved = Vec::new();
        let mut order_keys = Vec::new();
        for (i, s) in config.stages.iter().enumerate() {
            let by = s.order_by.as_deref().map(OrderBy::parse);
            let key_fn = match by.as_ref().and_then(|b| b.as_ref().ok()?.function()) {
                None => None,
                Some(name) => Some(self.order_keys.get(name).cloned().ok_or_else(|| {
                    ConfigError::new(
                        format!("stages[{i}].order_by"),
                        format!("no key function `{name}` registered (EngineBuilder::order_key)"),
                    )
                })?),
            };
            order_keys.push(key_fn);
            let tx = self
                .tx_handlers
                .get(&s.handler)
                .or_else(|| self.tx_handlers.get(&s.name));
            if let Some(tx) = tx {
                if !config.postgres.is_set() {
                    return Err(ConfigError::new(
                        format!("stages[{i}].handler"),
                        format!(
                            "`{}` works in a PostgreSQL transaction: set postgres.url",
                            s.handler
                        ),
                    ));
                }
                resolved.push(Resolved::Tx(tx.clone()));
                continue;
            }
            let registered = self
                .handlers
                .get(&s.handler)
                .or_else(|| self.handlers.get(&s.name))
                .cloned();
            let h = match (registered, self.factories.get(&s.handler)) {
                (Some(h), _) => h,
                (None, Some(factory)) => factory(s).map_err(|e| {
                    ConfigError::with_source(
                        format!("stages[{i}].handler"),
                        format!("cannot build handler `{}`: {e}", s.handler),
                        e,
                    )
                })?,
                (None, None) => {
                    return Err(ConfigError::new(
                        format!("stages[{i}].handler"),
                        format!("no handler `{}`", s.handler),
                    ))
                }
            };
            resolved.push(Resolved::Plain(h));
        }
        Ok(Engine {
            config,
            handlers: resolved,
            order_keys,
        })
    }
}

/// A validated engine, ready to start.
pub struct Engine {
    config: Config,
    handlers: Vec<Resolved>,
    /// Each stage's ordering key function, when its `order_by` names one.
    order_keys: Vec<Option<KeyFn>>,
}

/// A stage's handler as the builder resolved it.
enum Resolved {
    Plain(Arc<dyn Handler>),
    /// Wrapped in the inbox once the pool exists (at start).
    Tx(Arc<dyn TxHandler>),
}

struct Running {
    config: Config,
    metrics: Metrics,
    conn: Addr<ConnectionActor>,
    /// Reaches the connection actor while it reconnects (see [`Closer`]).
    closer: Closer,
    publisher: PublisherHandle,
    depth: Addr<DepthMonitorActor>,
    ingress: Ingress,
    stages: Vec<(String, Addr<StageActor>)>,
    probes: Vec<StageProbe>,
    http: Option<actix_web::dev::ServerHandle>,
    http_addr: Option<std::net::SocketAddr>,
    control: Control,
    /// The management API (`[management] bind`), stopped with `http`.
    management_http: Option<actix_web::dev::ServerHandle>,
    management_addr: Option<std::net::SocketAddr>,
    /// The publish listener (`[ingress] bind`), stopped first at shutdown.
    ingress_http: std::sync::Mutex<Option<actix_web::dev::ServerHandle>>,
    ingress_addr: Option<std::net::SocketAddr>,
    /// The host's servers ([`EngineHandle::serve`]), stopped first at shutdown.
    served: std::sync::Mutex<Vec<actix_web::dev::ServerHandle>>,
    escalations: Mutex<mpsc::Receiver<Escalation>>,
    /// Stops the PostgreSQL tasks (the outbox relay, the inbox sweep).
    pg_stop: tokio::sync::watch::Sender<bool>,
    pg_tasks: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

/// A running engine. Cheap to clone.
#[derive(Clone)]
pub struct EngineHandle(Arc<Running>);

/// Why [`EngineHandle::run_until_signal`] stopped.
#[derive(Debug)]
#[non_exhaustive]
pub enum StopReason {
    /// SIGTERM.
    Terminated,
    /// SIGINT (Ctrl-C).
    Interrupted,
    /// An actor spent its restart budget: the engine could not heal itself.
    Escalated(Escalation),
}

/// How [`EngineHandle::run_until_signal`] ended.
#[derive(Debug)]
pub struct Stopped {
    /// Why it stopped.
    pub reason: StopReason,
    /// What the shutdown achieved.
    pub report: ShutdownReport,
}

impl Stopped {
    /// The process exit status: 1 after an escalation, else 0.
    pub fn exit_code(&self) -> std::process::ExitCode {
        match self.reason {
            StopReason::Escalated(_) => crate::exit::Exit::Failure.into(),
            _ => crate::exit::Exit::Ok.into(),
        }
    }
}

/// What shutdown achieved.
#[derive(Debug, Clone)]
pub struct ShutdownReport {
    /// One entry per stage.
    pub stages: Vec<DrainReport>,
    /// True if every stage drained and every publish was confirmed in time.
    pub clean: bool,
}

impl Engine {
    /// A builder.
    pub fn builder() -> EngineBuilder {
        EngineBuilder::default()
    }

    /// The configuration it runs.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Connects, declares the topology, starts the actors and the HTTP
    /// server. Must be called inside an actix `System` (see [`crate::run_system`]).
    pub async fn start(self) -> Result<EngineHandle, Error> {
        let Engine {
            config,
            handlers,
            order_keys,
        } = self;
        let metrics = Metrics::new();
        let (esc_tx, esc_rx) = mpsc::channel(16);
        let policy = config.supervisor.policy();
        let urls = config.amqp.resolved_urls()?;
        let conn_cfg = ConnectionConfig {
            urls,
            name: config.amqp.connection_name.clone(),
            connect_timeout: config.amqp.connect_timeout,
            policy: policy.clone(),
            // Read again at start (validated at load): certificates are
            // rotated.
            tls: config.amqp.tls.settings()?,
        };
        let m = metrics.clone();
        let tx = esc_tx.clone();
        let conn_actor = ConnectionActor::new(conn_cfg, m, Some(tx));
        let closer = conn_actor.closer();
        let conn = Supervisor::start(move |_| conn_actor);
        let close_on_failure = CloseOnFailure(Some((conn.clone(), closer.clone())));

        // The first channel doubles as the proof that the broker answers.
        let wait = config.amqp.connect_timeout + Duration::from_secs(1);
        let ch = match tokio::time::timeout(wait, conn.send(OpenChannel(Purpose::Publish))).await {
            Ok(Ok(Ok(ch))) => ch,
            Ok(Ok(Err(e))) => return Err(Error::Broker(e)),
            Ok(Err(_)) => {
                return Err(Error::Broker(flowgate_actors::Error::ActorGone(
                    "connection",
                )))
            }
            Err(_) => {
                return Err(Error::ConnectTimeout {
                    wait,
                    url: flowgate_actors::redact_url(&config.amqp.url),
                });
            }
        };
        crate::topology::declare(&ch, &config).await.map_err(|e| {
            match crate::topology::missing_plugin(&config, &e) {
                Some(plugin) => Error::MissingPlugin { plugin, source: e },
                None => Error::Topology(e),
            }
        })?;
        let _ = ch.close(200, "topology declared".into()).await;

        // Read again at start (validated at load): a key file may be
        // rotated between the two.
        let keys = config.security.keys()?;
        let publisher = PublisherActor::start_supervised(
            PublisherConfig {
                spool: config.spool.path.as_ref().map(|path| SpoolConfig {
                    path: path.clone(),
                    max_bytes: config.spool.max_bytes,
                }),
                policy: policy.clone(),
                signing: keys.clone().filter(|_| config.security.sign_outputs),
                ..config.publisher.runtime()
            },
            conn.clone(),
            metrics.clone(),
            Some(esc_tx.clone()),
        )
        .await
        .map_err(Error::Spool)?;

        let dedup = build_dedup(&config, &metrics).await?;
        let pool = if config.postgres.is_set() {
            let pool = crate::postgres::connect(&config.postgres)?;
            if config.postgres.migrate_on_start {
                crate::postgres::migrate(&pool)
                    .await
                    .map_err(Error::Postgres)?;
            }
            Some(pool)
        } else {
            None
        };
        let has_inbox = handlers.iter().any(|h| matches!(h, Resolved::Tx(_)));
        let mut plain: Vec<Arc<dyn Handler>> = Vec::with_capacity(handlers.len());
        for (i, (s, h)) in config.stages.iter().zip(handlers).enumerate() {
            plain.push(match (h, &pool) {
                (Resolved::Plain(h), _) => h,
                (Resolved::Tx(h), Some(pool)) => Arc::new(crate::postgres::Inbox {
                    pool: pool.clone(),
                    stage: s.name.clone(),
                    handler: h,
                    metrics: metrics.clone(),
                }),
                // build() refuses this already.
                (Resolved::Tx(_), None) => {
                    return Err(Error::Config(ConfigError::new(
                        format!("stages[{i}].handler"),
                        "a transactional handler needs postgres.url",
                    )))
                }
            });
        }
        let handlers = plain;
        let mut stages = Vec::new();
        let mut probes = Vec::new();
        let mut controlled = Vec::new();
        let mut watched = Vec::new();
        for ((s, handler), order_key) in config.stages.iter().zip(handlers).zip(order_keys) {
            let queue = config.queue(&s.queue);
            let dlx = queue.and_then(|q| q.dead_letter_exchange());
            let single_active_consumer =
                queue.is_some_and(|q| q.single_active_consumer || q.partitions.is_some());
            let consumers = config.consumers(s);
            if consumers.is_empty() {
                tracing::warn!(
                    stage = %s.name,
                    queue = %s.queue,
                    "[partitioning] gives this instance none of the queue's partitions: the stage consumes nothing here"
                );
            }
            // One consumer per partition this instance owns (or the stage
            // itself): the same handler, each with its own queue and name.
            for (name, input) in consumers {
                let consumer = StageConfig {
                    name: name.clone(),
                    queue: input.clone(),
                    ..s.clone()
                };
                let spec = consumer.spec(StageParts {
                    handler: handler.clone(),
                    dead_letter_exchange: dlx.clone(),
                    policy: policy.clone(),
                    memory_dedup: dedup.memory.as_ref(),
                    redis_dedup: dedup.redis.as_ref(),
                    keys: keys.as_ref(),
                    max_message_bytes: config.limits.max_message_bytes,
                    order_key: order_key.clone(),
                    single_active_consumer,
                });
                let prefetch = spec.prefetch;
                let (addr, probe) = StageActor::start_supervised(
                    spec,
                    conn.clone(),
                    publisher.clone(),
                    metrics.clone(),
                    Some(esc_tx.clone()),
                );
                watched.push(WatchedStage {
                    addr: addr.clone(),
                    probe: probe.clone(),
                    input: input.clone(),
                    outputs: crate::depth::output_queues(&config, s),
                    scale: crate::depth::scale_range(s),
                });
                controlled.push((input, prefetch, addr.clone(), probe.clone()));
                stages.push((name, addr));
                probes.push(probe);
            }
        }
        let monitor = DepthMonitorActor::new(
            DepthMonitorConfig {
                interval: config.depth.interval,
                cooldown: config.depth.cooldown,
                queues: crate::depth::watched_queues(&config),
                stages: watched,
            },
            conn.clone(),
            metrics.clone(),
        );
        let gate = IngressGate::new(&config, monitor.levels(), metrics.clone());
        let ingress = Ingress::new(
            publisher.clone(),
            gate,
            config.limits.max_message_bytes,
            config.ingress.publish_timeout,
        );
        let depth = monitor.start();

        let control = Control::new(controlled, publisher.clone(), metrics.clone());
        let (http, http_addr) = if config.http.bind.is_empty() {
            (None, None)
        } else {
            let state = HttpState {
                metrics: metrics.clone(),
                control: control.clone(),
            };
            let (h, a) = http::start(&config.http.bind, state).map_err(Error::Http)?;
            info!(addr = %a, "http server listening");
            (Some(h), Some(a))
        };
        let (ingress_http, ingress_addr) = if config.ingress.bind.is_empty() {
            (None, None)
        } else {
            let (h, a) = http::ingress::start(&config.ingress, ingress.clone())?;
            info!(addr = %a, auth = ?config.ingress.auth, "ingress listening");
            (Some(h), Some(a))
        };

        let (management_http, management_addr) = if config.management.bind.is_empty() {
            (None, None)
        } else {
            let tokens = config.management.tokens()?;
            let console = config.management.console.then(|| {
                http::console::Console::new(
                    control.clone(),
                    tokens.clone(),
                    config.clone(),
                    ingress.clone(),
                    metrics.clone(),
                )
            });
            let (h, a) =
                http::management::start(&config.management.bind, control.clone(), tokens, console)
                    .map_err(Error::Http)?;
            info!(addr = %a, "management API listening");
            (Some(h), Some(a))
        };

        // Last: nothing after this can fail the start and leave them running.
        let (pg_stop, pg_stopped) = tokio::sync::watch::channel(false);
        let mut pg_tasks = Vec::new();
        if let Some(pool) = &pool {
            if config.postgres.relay {
                let relay = crate::postgres::relay::Relay {
                    pool: pool.clone(),
                    publisher: publisher.clone(),
                    metrics: metrics.clone(),
                    batch: config.postgres.relay_batch,
                    poll: config.postgres.relay_poll,
                };
                pg_tasks.push(tokio::spawn(relay.run(pg_stopped.clone())));
            }
            if has_inbox {
                pg_tasks.push(tokio::spawn(crate::postgres::relay::expire_inbox(
                    pool.clone(),
                    config.postgres.inbox_retention,
                    (config.postgres.inbox_retention / 100)
                        .clamp(Duration::from_secs(1), Duration::from_secs(600)),
                    pg_stopped,
                )));
            }
        }
        close_on_failure.disarm();
        Ok(EngineHandle(Arc::new(Running {
            config,
            metrics,
            conn,
            closer,
            publisher,
            depth,
            ingress,
            stages,
            probes,
            http,
            http_addr,
            control,
            management_http,
            management_addr,
            ingress_http: std::sync::Mutex::new(ingress_http),
            ingress_addr,
            served: std::sync::Mutex::new(Vec::new()),
            escalations: Mutex::new(esc_rx),
            pg_stop,
            pg_tasks: std::sync::Mutex::new(pg_tasks),
        })))
    }
}

/// Closes the broker connections when dropped armed: a start that fails
/// after connecting leaves no connection behind.
struct CloseOnFailure(Option<(Addr<ConnectionActor>, Closer)>);

impl CloseOnFailure {
    /// The start succeeded: the engine owns the connections now.
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for CloseOnFailure {
    fn drop(&mut self) {
        if let Some((conn, closer)) = self.0.take() {
            closer.close();
            // bounded: one message, once, on a failed start.
            conn.do_send(Close);
        }
    }
}

/// The dedup backends the stages use, one DedupActor each.
#[derive(Default)]
struct DedupBackends {
    memory: Option<DedupHandle>,
    redis: Option<DedupHandle>,
}

/// Starts a DedupActor per backend some stage uses. Redis connects lazily:
/// an unreachable Redis at start pauses the stages (fail closed) instead of
/// failing the start, and they resume when it answers.
async fn build_dedup(config: &Config, metrics: &Metrics) -> Result<DedupBackends, Error> {
    let settings = DedupSettings {
        lease: config.dedup.lease,
        ttl: config.dedup.ttl,
        missing_id: config.dedup.missing_id,
    };
    let mut out = DedupBackends::default();
    if config.stages.iter().any(|s| s.dedup == DedupMode::Memory) {
        let store = Arc::new(MemoryStore::new(config.dedup.capacity));
        out.memory = Some(DedupActor::start(
            store,
            "memory",
            settings.clone(),
            metrics.clone(),
        ));
    }
    if config.stages.iter().any(|s| s.dedup == DedupMode::Redis) {
        // Read again at start (validated at load): certificates are rotated.
        let (ca_pem, client_pem) = config.redis.tls()?;
        let store = RedisStore::connect_with(
            &config.redis.url,
            &config.dedup.prefix,
            RedisStoreConfig {
                lazy: true,
                ca_pem,
                client_pem,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| Error::Config(ConfigError::with_source("redis.url", e.to_string(), e)))?;
        if let Err(e) = store.ping().await {
            tracing::warn!(error = %e, "redis does not answer yet; stages with dedup = \"redis\" wait for it");
        }
        out.redis = Some(DedupActor::start(
            Arc::new(store),
            "redis",
            settings,
            metrics.clone(),
        ));
    }
    Ok(out)
}

impl EngineHandle {
    /// The engine's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.0.metrics
    }

    /// The address the HTTP server (metrics, health) listens on, if any.
    pub fn http_addr(&self) -> Option<std::net::SocketAddr> {
        self.0.http_addr
    }

    /// The address the management API (`[management] bind`) listens on, if any.
    pub fn management_addr(&self) -> Option<std::net::SocketAddr> {
        self.0.management_addr
    }

    /// The engine's status and live controls (what the management API
    /// serves): pause and resume stages, set their concurrency and the
    /// publish rate, read readiness with its reasons.
    pub fn control(&self) -> &Control {
        &self.0.control
    }

    /// The address the publish ingress (`[ingress] bind`) listens on, if any.
    pub fn ingress_addr(&self) -> Option<std::net::SocketAddr> {
        self.0.ingress_addr
    }

    /// The configuration it runs.
    pub fn config(&self) -> &Config {
        &self.0.config
    }

    /// True when connected and every stage is consuming. Answers at once:
    /// the link state is read as `/readyz` reads it, not asked of the
    /// connection actor, which serves no message while it (re)connects —
    /// for as long as the broker is down.
    pub async fn ready(&self) -> bool {
        self.0.metrics.connected() && self.0.probes.iter().all(|p| p.consuming())
    }

    /// Waits until [`ready`](Self::ready) or the timeout passes; returns readiness.
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.ready().await {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Per-stage probes (consuming, in flight).
    pub fn stages(&self) -> &[StageProbe] {
        &self.0.probes
    }

    /// Publishes a message (persistent, `mandatory`): confirmed by the
    /// broker, spooled while the breaker is open, or refused with
    /// backpressure. Other errors: unroutable, shutting down, a spool or
    /// broker failure that did not open the breaker. The message is stamped
    /// [`FIRST_PUBLISHED`](flowgate_actors::envelope::FIRST_PUBLISHED)
    /// unless it carries a stamp already.
    pub async fn publish(&self, mut msg: Output) -> flowgate_actors::Result<PublishOutcome> {
        flowgate_actors::envelope::stamp_first_published(&mut msg.properties);
        match self.0.publisher.send(msg).await {
            Ok(Published::Confirmed) => Ok(PublishOutcome::Confirmed),
            Ok(Published::Spooled) => Ok(PublishOutcome::Spooled),
            Err(flowgate_actors::Error::Backpressure(reason)) => {
                Ok(PublishOutcome::Backpressure { reason })
            }
            Err(e) => Err(e),
        }
    }

    /// The way in for messages from outside: admission by queue
    /// watermarks, publish, one error type. `POST /publish` uses it; so can
    /// a host's own HTTP handlers.
    pub fn ingress(&self) -> &Ingress {
        &self.0.ingress
    }

    /// Messages waiting in the durable spool (0 without one).
    pub fn spooled(&self) -> u64 {
        self.0.publisher.spooled()
    }

    /// Runs a host HTTP server beside the engine's own (one worker, no
    /// signal handling: the engine owns shutdown) with the routes
    /// `configure` registers; [`shutdown`](Self::shutdown) stops it first,
    /// before the stages drain, so no request arrives at a draining engine.
    /// Returns the bound address.
    pub fn serve<F>(&self, bind: &str, configure: F) -> std::io::Result<std::net::SocketAddr>
    where
        F: Fn(&mut actix_web::web::ServiceConfig) + Clone + Send + 'static,
    {
        let (handle, addr) = http::spawn_server(bind, configure)?;
        self.0
            .served
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(handle);
        Ok(addr)
    }

    /// Runs until SIGTERM or SIGINT, or until an actor spent its restart
    /// budget, then shuts down gracefully. What every binary's main loop is.
    pub async fn run_until_signal(&self) -> std::io::Result<Stopped> {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let reason = tokio::select! {
            _ = term.recv() => { info!("SIGTERM received"); StopReason::Terminated }
            _ = tokio::signal::ctrl_c() => { info!("SIGINT received"); StopReason::Interrupted }
            e = self.escalated() => {
                tracing::error!(actor = %e.actor, reason = %e.reason, "an actor spent its restart budget; shutting down");
                StopReason::Escalated(e)
            }
        };
        let report = self.shutdown().await;
        if !report.clean {
            tracing::warn!(
                ?report,
                "shutdown grace expired with work in flight; the broker requeues it"
            );
        }
        Ok(Stopped { reason, report })
    }

    /// Resolves when an actor spent its restart budget (the engine can no
    /// longer heal itself); the daemon then shuts down with status 1.
    pub async fn escalated(&self) -> Escalation {
        let mut rx = self.0.escalations.lock().await;
        match rx.recv().await {
            Some(e) => e,
            None => std::future::pending().await,
        }
    }

    /// Graceful shutdown within `[shutdown] grace`, in this order: the
    /// ingress listener and the host's servers stop accepting (answering
    /// the requests they hold, each bounded by its deadline), the stages
    /// stop intake and let in-flight deliveries finish, outstanding confirms
    /// are awaited, then the metrics server stops and the connections close.
    pub async fn shutdown(&self) -> ShutdownReport {
        let grace = self.0.config.shutdown.grace;
        let deadline = tokio::time::Instant::now() + grace;
        let mut front: Vec<_> =
            std::mem::take(&mut *self.0.served.lock().unwrap_or_else(|p| p.into_inner()));
        front.extend(
            self.0
                .ingress_http
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take(),
        );
        info!("shutting down: ingress stops accepting");
        futures::future::join_all(front.iter().map(|h| h.stop(true))).await;
        info!(?grace, "shutting down: draining stages");
        let drains = self.0.stages.iter().map(|(_, a)| a.send(Drain { grace }));
        let mut reports = Vec::new();
        for (r, (name, _)) in futures::future::join_all(drains)
            .await
            .into_iter()
            .zip(&self.0.stages)
        {
            reports.push(r.unwrap_or(DrainReport {
                stage: name.clone(),
                drained: false,
                abandoned: 0,
            }));
        }
        // The relay finishes the batch in hand (its publishes are answered
        // and its rows deleted); what it has not taken stays in the outbox.
        let _ = self.0.pg_stop.send(true);
        let tasks: Vec<_> =
            std::mem::take(&mut *self.0.pg_tasks.lock().unwrap_or_else(|p| p.into_inner()));
        for t in tasks {
            let abort = t.abort_handle();
            if tokio::time::timeout_at(deadline, t).await.is_err() {
                abort.abort();
            }
        }
        let flushed = tokio::time::timeout_at(deadline, self.0.publisher.flush())
            .await
            .is_ok();
        for h in [&self.0.http, &self.0.management_http]
            .into_iter()
            .flatten()
        {
            h.stop(true).await;
        }
        let _ = self.0.depth.send(flowgate_actors::StopSampling).await;
        // During a broker outage the actor is reconnecting: stop that first,
        // or `Close` waits for the broker.
        self.0.closer.close();
        let _ = self.0.conn.send(Close).await;
        let clean = flushed && reports.iter().all(|r| r.drained);
        info!(clean, "shutdown complete");
        ShutdownReport {
            stages: reports,
            clean,
        }
    }
}

#[cfg(test)]
mod builder_tests {
    use super::*;
    use flowgate_actors::{handler_fn, Outcome};
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn config(handlers: &[&str]) -> Config {
        let mut text = String::from(
            "[http]\nbind = \"\"\n[[exchanges]]\nname = \"ex\"\n[[queues]]\nname = \"q\"\n",
        );
        for (i, h) in handlers.iter().enumerate() {
            text.push_str(&format!(
                "[[stages]]\nname = \"s{i}\"\nqueue = \"q\"\nhandler = \"{h}\"\n\
                 output = {{ exchange = \"ex\", routing_key = \"k{i}\" }}\n"
            ));
        }
        Config::from_toml(&text).unwrap()
    }

    fn sink() -> Arc<dyn Handler> {
        Arc::new(handler_fn(|_d| async { Ok(Outcome::ack()) }))
    }

    #[test]
    fn a_factory_builds_one_handler_per_stage_from_its_config() {
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let s = seen.clone();
        let engine = Engine::builder()
            .config(config(&["tag", "tag", "sink"]))
            .handler_factory("tag", move |stage: &StageConfig| {
                s.lock()
                    .unwrap()
                    .push(stage.output.clone().unwrap().routing_key);
                Ok::<_, FactoryError>(sink())
            })
            .build()
            .unwrap();
        assert_eq!(engine.handlers.len(), 3);
        assert_eq!(
            *seen.lock().unwrap(),
            ["k0", "k1"],
            "called per stage, with it"
        );
    }

    #[test]
    fn a_factory_error_fails_the_build_naming_the_stage() {
        let e = Engine::builder()
            .config(config(&["sink", "broken"]))
            .handler_factory("broken", |_: &StageConfig| {
                Err::<Arc<dyn Handler>, _>("no credentials")
            })
            .build()
            .err()
            .expect("the build fails");
        assert_eq!(e.key, "stages[1].handler", "{e}");
        assert!(e.reason.contains("no credentials"), "{e}");
        assert!(std::error::Error::source(&e).is_some(), "keeps the cause");
    }

    #[test]
    fn an_unknown_handler_name_is_refused() {
        let e = Engine::builder()
            .config(config(&["nope"]))
            .build()
            .err()
            .expect("the build fails");
        assert_eq!(e.key, "stages[0].handler", "{e}");
    }

    #[test]
    fn built_ins_are_factories_a_host_can_replace() {
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        Engine::builder()
            .config(config(&["forward", "sink"]))
            .handler_factory("forward", move |_: &StageConfig| {
                c.fetch_add(1, Ordering::SeqCst);
                Ok::<_, FactoryError>(sink())
            })
            .build()
            .unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 1, "the host's `forward` ran");
        // ...and without the host's, the built-in one builds.
        let engine = Engine::builder()
            .config(config(&["forward", "sink"]))
            .build()
            .unwrap();
        assert_eq!(engine.handlers.len(), 2);
    }

    struct NoTx;

    #[async_trait::async_trait]
    impl TxHandler for NoTx {
        async fn handle(
            &self,
            _tx: &mut crate::postgres::PgTransaction,
            _d: &flowgate_actors::Delivery,
        ) -> Result<Outcome, flowgate_actors::HandlerError> {
            Ok(Outcome::ack())
        }
    }

    #[test]
    fn a_transactional_handler_needs_postgres_and_wins_over_a_plain_one() {
        let e = Engine::builder()
            .config(config(&["tx"]))
            .tx_handler("tx", NoTx)
            .build()
            .err()
            .expect("the build fails");
        assert_eq!(e.key, "stages[0].handler", "{e}");
        assert!(e.reason.contains("postgres.url"), "{e}");
        let mut cfg = config(&["tx"]);
        cfg.postgres.url = "postgres://127.0.0.1/db".into();
        let engine = Engine::builder()
            .config(cfg)
            .handler("tx", handler_fn(|_d| async { Ok(Outcome::ack()) }))
            .tx_handler("tx", NoTx)
            .build()
            .unwrap();
        assert!(matches!(engine.handlers[0], Resolved::Tx(_)));
    }

    #[test]
    fn a_registered_handler_wins_over_a_factory() {
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        Engine::builder()
            .config(config(&["tag"]))
            .handler_factory("tag", move |_: &StageConfig| {
                c.fetch_add(1, Ordering::SeqCst);
                Ok::<_, FactoryError>(sink())
            })
            .handler_arc("tag", sink())
            .build()
            .unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 0);
    }
}
