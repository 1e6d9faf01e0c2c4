//! The ConnectionActor: two broker connections, recovery, link notices.
//!
//! Consuming and publishing use separate connections: when the broker blocks
//! a connection (memory or disk alarm) lapin stops writing every frame on it,
//! acks included, so acks must not share a connection with publishes.
//!
//! lapin recovers a lost connection by itself (reconnects, re-opens the
//! channels, re-registers their consumers), but left to its defaults its
//! backoff doubles up to a minute and nothing bounds it. The engine owns
//! the deadline: lapin may try for half of `supervisor.backoff_max`
//! (from 1 s, doubling, jittered) and then gives up; a connection
//! not back at `backoff_max` (lapin 4.12 leaves one it gave up on
//! `reconnecting`, so the deadline is what notices) is torn down and both
//! are re-established through the actor's own connect path (a restart,
//! backoff with full jitter, the next URL).
//!
//! A lapin recovery must not succeed after the engine has replaced its
//! connection: its recovered channels would re-register consumers nobody
//! reads, each holding a prefetch of messages while the new consumer
//! handles the ones behind them — out of order, until the old connection
//! closes and the broker requeues what it held. Bounding lapin's recovery
//! below the deadline is what prevents that; the replaced connections are
//! also retired, not forgotten, so one that comes back anyway (an attempt
//! that outlasted the deadline) is closed at once.
//!
//! Waiting for an unreachable broker is this actor's job, not a failure:
//! those restarts back off (up to `backoff_max`) without spending the
//! restart budget, however long the outage lasts. Only errors that waiting
//! cannot cure (refused credentials, a missing vhost, a certificate either
//! side rejects) spend it and escalate — at once when the actor has never
//! connected: a start with such an error fails with the broker's reason
//! ([`Error::Refused`]) instead of a connect timeout.

use crate::error::{Error, Result};
use crate::metrics::events::{self, ActorKind, Event as _};
use crate::metrics::Metrics;
use crate::supervision::{Escalation, EscalationSender, RestartPolicy, Restarts};
use crate::tls::TlsSettings;
use actix::prelude::*;
use futures::StreamExt;
use lapin::{Channel, Connection, ConnectionProperties, Event};
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};

/// Which of the two connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Purpose {
    /// Carries consumers and their acks.
    Consume,
    /// Carries publishes and their confirms.
    Publish,
}

impl Purpose {
    /// Label used in metrics and connection names.
    pub fn as_str(self) -> &'static str {
        match self {
            Purpose::Consume => "consume",
            Purpose::Publish => "publish",
        }
    }
}

/// How to reach the broker.
#[derive(Clone)]
pub struct ConnectionConfig {
    /// AMQP URLs, tried in order (may hold passwords: never logged). The
    /// actor connects to the first that answers; after a loss it cannot
    /// recover from, it starts over at the next one. Never empty.
    pub urls: Vec<String>,
    /// Prefix of the connection names shown by `rabbitmqctl list_connections`
    /// (`<name>-consume`, `<name>-publish`), so operators can find the engine.
    pub name: String,
    /// Bound on one connection attempt.
    pub connect_timeout: Duration,
    /// Restart backoff and budget.
    pub policy: RestartPolicy,
    /// TLS (CA, client certificate, server name) and the SASL mechanism.
    pub tls: TlsSettings,
}

impl std::fmt::Debug for ConnectionConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionConfig")
            .field(
                "urls",
                &self.urls.iter().map(|u| redact_url(u)).collect::<Vec<_>>(),
            )
            .field("name", &self.name)
            .field("tls", &self.tls)
            .finish()
    }
}

/// The URL without its password, for logs and errors.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            let user = creds.split(':').next().unwrap_or("");
            format!("{}{}:***@{}", &url[..s + 3], user, &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

/// A change in the link to the broker, sent to subscribers.
#[derive(Message, Clone, Debug)]
#[rtype(result = "()")]
pub enum LinkEvent {
    /// A connection is (again) established; channels may be (re)opened.
    LinkUp(Purpose),
    /// A connection failed; lapin is recovering or the actor will restart.
    LinkDown(Purpose),
    /// The connection was replaced by a new one (the engine's recovery
    /// deadline passed, or lapin gave up): channels opened on it are not
    /// coming back, even if lapin still reports them reconnecting. Drop
    /// them and open new ones on the next `LinkUp`.
    Replaced(Purpose),
    /// The broker blocked publishing (resource alarm).
    Blocked(String),
    /// The broker lifted the block.
    Unblocked,
}

/// Opens a channel on one of the connections.
#[derive(Message)]
#[rtype(result = "Result<Channel>")]
pub struct OpenChannel(pub Purpose);

/// Registers for [`LinkEvent`]s; answers whether both connections are up
/// (if so, the subscriber's `LinkUp`s are already on their way).
#[derive(Message)]
#[rtype(result = "bool")]
pub struct Subscribe(pub Recipient<LinkEvent>);

/// Asks whether both connections are up and whether publishing is blocked.
#[derive(Message)]
#[rtype(result = "LinkStatus")]
pub struct GetStatus;

/// Answer to [`GetStatus`].
#[derive(Clone, Copy, Debug, Default, MessageResponse)]
pub struct LinkStatus {
    /// Both connections connected.
    pub up: bool,
    /// The broker blocks the publishing connection.
    pub blocked: bool,
}

/// Closes both connections (graceful shutdown). Call [`Closer::close`]
/// first: while the actor (re)connects it serves no message.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Close;

/// Stops a [`ConnectionActor`]'s (re)connecting from outside its mailbox.
/// A connect attempt and the backoff before it hold the mailbox (so
/// `OpenChannel` requests queue until connected); during a broker outage
/// that is for as long as the outage lasts, and a [`Close`] sent then
/// would wait for the broker. After [`close`](Self::close) the actor makes
/// no further attempt and serves its mailbox, `Close` included.
#[derive(Clone, Debug)]
pub struct Closer(Arc<tokio::sync::watch::Sender<bool>>);

impl Closer {
    /// Requests the close: the attempt in progress is abandoned.
    pub fn close(&self) {
        self.0.send_replace(true);
    }

    fn requested(&self) -> bool {
        *self.0.borrow()
    }
}

/// Owns the broker connections. See the module docs.
pub struct ConnectionActor {
    cfg: ConnectionConfig,
    metrics: Metrics,
    restarts: Restarts,
    escalations: Option<EscalationSender>,
    consume: Option<Arc<Connection>>,
    publish: Option<Arc<Connection>>,
    subscribers: Vec<Recipient<LinkEvent>>,
    blocked: bool,
    closing: bool,
    /// Bumped on every (re)connect so events from a replaced connection are ignored.
    generation: u64,
    /// Connections that reported an error and have not reconnected since.
    failed: std::collections::HashSet<Purpose>,
    /// When the current generation connected.
    connected_at: std::time::Instant,
    /// Index into `cfg.urls` of the URL tried first on the next connect.
    url_index: usize,
    /// Since when each connection of the current generation is not connected.
    lost_since: std::collections::HashMap<Purpose, std::time::Instant>,
    /// Connections replaced while lapin was still recovering them; closed
    /// if lapin brings them back, forgotten once lapin gives up on them
    /// (at most [`RETIRED_MAX`]).
    retired: Vec<Arc<Connection>>,
    /// The next restart is a wait for an unreachable broker (see
    /// [`unreachable`]), not a failure: it backs off without spending the
    /// restart budget.
    waiting_for_broker: bool,
    /// Why the very first connect failed, when waiting cannot cure it
    /// (credentials, vhost, TLS): the actor gives up at once and every
    /// `OpenChannel` is answered with this, so the engine's start fails
    /// with the broker's own words instead of a timeout.
    refused: Option<String>,
    /// Set by the engine's shutdown outside the mailbox (see [`Closer`]).
    closer: Closer,
}

/// True when `e` says the broker cannot be reached right now (refused, reset,
/// timed out, shutting down): the engine waits for it however long it takes
/// (a broker outage must not turn into a crash loop). Anything else — refused
/// credentials, a missing vhost, a protocol mismatch — will not go away by
/// waiting and spends the restart budget, so it escalates.
fn unreachable(e: &Error) -> bool {
    use lapin::protocol::{AMQPErrorKind, AMQPHardError};
    match e {
        Error::ConnectTimeout(..) | Error::NotConnected => true,
        Error::Amqp(e) => match e.kind() {
            lapin::ErrorKind::IOError(io) => !crate::tls::is_tls_failure(io),
            lapin::ErrorKind::MissingHeartbeatError
            | lapin::ErrorKind::InvalidConnectionState(_) => true,
            lapin::ErrorKind::ProtocolError(p) => matches!(
                p.kind(),
                AMQPErrorKind::Hard(AMQPHardError::CONNECTIONFORCED)
            ),
            _ => false,
        },
        _ => false,
    }
}

/// How soon after a connect lapin's `Connected` event may still be the
/// connect itself (lapin may or may not report it).
const INITIAL_CONNECTED: Duration = Duration::from_millis(500);

/// The first delay of lapin's own recovery (see `connect_one`).
const LAPIN_FIRST_RETRY: Duration = Duration::from_secs(1);

/// The most retired connections kept to be closed if lapin brings them
/// back (see [`ConnectionActor::retire`]).
const RETIRED_MAX: usize = 8;

/// How often the recovery deadline is checked: a small part of any
/// sensible `backoff_max`, so the deadline is kept to within this.
const WATCHDOG_TICK: Duration = Duration::from_millis(250);

/// How long a shutdown waits for the broker to answer the close of the
/// engine's connections. A broker that blocks publishers (a memory or disk
/// alarm) stops reading a blocked connection and never answers its close;
/// past this bound the engine lets go of it (the socket closes with the
/// process or when the last handle drops).
pub const CLOSE_WITHIN: Duration = Duration::from_secs(3);

impl ConnectionActor {
    /// A new actor; start it under `actix::Supervisor`.
    pub fn new(
        cfg: ConnectionConfig,
        metrics: Metrics,
        escalations: Option<EscalationSender>,
    ) -> Self {
        let restarts = Restarts::new(cfg.policy.clone());
        for p in [Purpose::Consume, Purpose::Publish] {
            events::ConnectionKnown {
                connection: p.as_str(),
            }
            .emit(&metrics);
        }
        Self {
            cfg,
            metrics,
            restarts,
            escalations,
            consume: None,
            publish: None,
            subscribers: Vec::new(),
            blocked: false,
            closing: false,
            generation: 0,
            failed: Default::default(),
            connected_at: std::time::Instant::now(),
            url_index: 0,
            lost_since: Default::default(),
            retired: Vec::new(),
            waiting_for_broker: false,
            refused: None,
            closer: Closer(Arc::new(tokio::sync::watch::channel(false).0)),
        }
    }

    /// Its [`Closer`]: take it before starting the actor.
    pub fn closer(&self) -> Closer {
        self.closer.clone()
    }

    fn notify(&self, ev: LinkEvent) {
        for s in &self.subscribers {
            // bounded: link events are rare (connects, alarms); each
            // subscriber gets one per change.
            s.do_send(ev.clone());
        }
    }

    fn conn(&self, p: Purpose) -> Option<&Arc<Connection>> {
        match p {
            Purpose::Consume => self.consume.as_ref(),
            Purpose::Publish => self.publish.as_ref(),
        }
    }

    fn both_up(&self) -> bool {
        [Purpose::Consume, Purpose::Publish]
            .iter()
            .all(|p| self.conn(*p).is_some_and(|c| c.status().connected()))
    }

    fn update_gauge(&self) {
        events::LinkState { up: self.both_up() }.emit(&self.metrics);
    }

    /// The engine's recovery deadline: true when a connection has not been
    /// connected for `backoff_max` (lapin may still be trying; its own
    /// backoff is not bounded by ours).
    fn past_deadline(&mut self) -> bool {
        let now = std::time::Instant::now();
        for p in [Purpose::Consume, Purpose::Publish] {
            match self.conn(p) {
                Some(c) if c.status().connected() => {
                    self.lost_since.remove(&p);
                }
                Some(_) => {
                    self.lost_since.entry(p).or_insert(now);
                }
                None => {}
            }
        }
        let bound = self.cfg.policy.backoff_max;
        self.lost_since
            .values()
            .any(|t| now.duration_since(*t) >= bound)
    }

    /// Moves both connections to `retired`; one still connected is closed
    /// (its channels end, their users open new ones on the next LinkUp).
    fn retire(&mut self) {
        for c in [self.consume.take(), self.publish.take()]
            .into_iter()
            .flatten()
        {
            if c.status().connected() {
                close_replaced(c.clone());
            }
            self.retired.push(c);
        }
        // lapin 4.12 leaves a connection whose recovery it gave up on
        // `reconnecting` for good: the oldest retired ones are those, long
        // past their recovery budget (half the deadline).
        let excess = self.retired.len().saturating_sub(RETIRED_MAX);
        self.retired.drain(..excess);
    }

    /// Closes a retired connection lapin brought back; forgets one lapin
    /// gave up on (or that is closing).
    fn sweep_retired(&mut self) {
        self.retired.retain(|c| {
            let s = c.status();
            if s.connected() {
                info!("a replaced broker connection came back; closing it");
                close_replaced(c.clone());
                return false;
            }
            s.reconnecting() || s.connecting()
        });
    }
}

/// Closes a connection the engine replaced, off the actor (the actor may be
/// restarting, which drops its own futures).
fn close_replaced(c: Arc<Connection>) {
    actix::spawn(async move {
        let _ = c.close(200, "flowgate: connection replaced".into()).await;
    });
}

async fn connect_one(cfg: &ConnectionConfig, url: &str, p: Purpose) -> Result<Connection> {
    // lapin's recovery gets half the engine's deadline, then gives up: the
    // engine connects anew (see the module docs). A recovery that ended
    // cannot bring the old connection back later with consumers nobody
    // reads, which would hold a prefetch of messages while the new
    // consumer handles the ones behind them.
    let recovery = cfg.policy.backoff_max / 2;
    // lapin's first reconnect no sooner than 1 s (its own default), and
    // never within `INITIAL_CONNECTED`: a `Connected` that soon after the
    // connect is lapin reporting the connect itself, not a recovery.
    let min = LAPIN_FIRST_RETRY.min(recovery).max(INITIAL_CONNECTED);
    let props = ConnectionProperties::default()
        .with_connection_name(format!("{}-{}", cfg.name, p.as_str()).into())
        .configure_backoff(move |b| {
            b.with_min_delay(min)
                .with_factor(2.0)
                .with_jitter()
                .without_max_delay()
                .without_max_times()
                .with_total_delay(Some(recovery))
        })
        .enable_auto_recover();
    let open = crate::tls::open(url, props, &cfg.tls);
    match tokio::time::timeout(cfg.connect_timeout, open).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(Error::ConnectTimeout(cfg.connect_timeout, redact_url(url))),
    }
}

/// Both connections to the first of `cfg.urls`, starting at `first`, that
/// answers; with the index of that URL. The error is the last URL's.
async fn connect_first(
    cfg: &ConnectionConfig,
    first: usize,
) -> Result<(usize, Connection, Connection)> {
    let n = cfg.urls.len();
    let mut last = Error::NotConnected;
    for i in (0..n).map(|k| (first + k) % n) {
        let url = &cfg.urls[i];
        let pair = async {
            let c = connect_one(cfg, url, Purpose::Consume).await?;
            match connect_one(cfg, url, Purpose::Publish).await {
                Ok(p) => Ok((c, p)),
                Err(e) => {
                    let _ = c
                        .close(200, "flowgate: publish connection failed".into())
                        .await;
                    Err(e)
                }
            }
        };
        match pair.await {
            Ok((c, p)) => return Ok((i, c, p)),
            Err(e) => {
                if n > 1 {
                    warn!(url = %redact_url(url), error = %e, "broker does not answer; trying the next URL");
                }
                last = e;
            }
        }
    }
    Err(last)
}

impl Actor for ConnectionActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        if self.restarts.escalated() || self.closing || self.closer.requested() {
            return; // stays idle: the engine was told, or is shutting down
        }
        let delay = self.restarts.delay();
        let cfg = self.cfg.clone();
        let first = self.url_index;
        let mut close = self.closer.0.subscribe();
        // `wait` holds the mailbox until connected, so OpenChannel requests
        // queue (one per actor, bounded) instead of failing — unless the
        // engine shuts down meanwhile (see `Closer`).
        ctx.wait(
            async move {
                tokio::select! {
                    biased;
                    Ok(_) = close.wait_for(|c| *c) => None,
                    r = async {
                        tokio::time::sleep(delay).await;
                        connect_first(&cfg, first).await
                    } => Some(r),
                }
            }
            .into_actor(self)
            .map(|res, act, ctx| match res {
                // Shutting down: make no further attempt; serve `Close`.
                None => act.closing = true,
                Some(Ok((index, c, p))) => {
                    act.url_index = index;
                    act.generation += 1;
                    act.failed.clear();
                    act.lost_since.clear();
                    act.connected_at = std::time::Instant::now();
                    let generation = act.generation;
                    for (purpose, conn) in [(Purpose::Consume, &c), (Purpose::Publish, &p)] {
                        ctx.add_stream(conn.events_listener().map(move |e| ConnEvent {
                            generation,
                            purpose,
                            event: e,
                        }));
                    }
                    act.consume = Some(Arc::new(c));
                    act.publish = Some(Arc::new(p));
                    act.restarts.succeeded();
                    act.update_gauge();
                    info!(url = %redact_url(&act.cfg.urls[index]), "connected to the broker");
                    act.notify(LinkEvent::LinkUp(Purpose::Consume));
                    act.notify(LinkEvent::LinkUp(Purpose::Publish));
                }
                Some(Err(e)) => {
                    act.waiting_for_broker = unreachable(&e);
                    if !act.waiting_for_broker && act.generation == 0 {
                        // Never connected, and waiting will not help: a
                        // configuration error. Give up now (see `refused`).
                        warn!(error = %e, "the broker refuses the connection; giving up");
                        act.refused = Some(e.to_string());
                        act.restarts.give_up();
                    } else {
                        warn!(error = %e, "broker connection failed; restarting with backoff");
                    }
                    ctx.stop();
                }
            }),
        );
        // lapin recovers by itself; if it gives up, restart from scratch.
        ctx.run_interval(Duration::from_secs(1), |act, ctx| {
            if act.closing {
                return;
            }
            let dead = [Purpose::Consume, Purpose::Publish].iter().any(|p| {
                act.conn(*p).is_some_and(|c| {
                    let s = c.status();
                    (s.closed() || s.errored()) && !s.reconnecting() && !s.connecting()
                })
            });
            for p in [Purpose::Consume, Purpose::Publish] {
                if act.conn(p).is_some_and(|c| !c.status().connected()) {
                    act.failed.insert(p);
                }
            }
            act.update_gauge();
            if dead {
                warn!("broker connection lost and not recovering; restarting the connection actor");
                act.waiting_for_broker = true;
                ctx.stop();
            }
        });
        // The engine's recovery deadline (see the module docs).
        ctx.run_interval(WATCHDOG_TICK, |act, ctx| {
            if act.closing {
                return;
            }
            act.sweep_retired();
            if act.past_deadline() {
                warn!(
                    bound = ?act.cfg.policy.backoff_max,
                    "broker connection not back within supervisor.backoff_max; re-establishing it"
                );
                act.retire();
                act.waiting_for_broker = true;
                ctx.stop();
            }
        });
    }

    fn stopped(&mut self, _ctx: &mut Context<Self>) {
        events::LinkState { up: false }.emit(&self.metrics);
    }
}

impl ConnectionActor {
    /// The publishing connection is no longer blocked (it was lost or
    /// replaced): tells the subscribers, if it was.
    fn clear_block(&mut self) {
        if std::mem::take(&mut self.blocked) {
            events::Unblocked { reset: true }.emit(&self.metrics);
            self.notify(LinkEvent::Unblocked);
        }
    }
}

impl Supervised for ConnectionActor {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        if self.closing {
            return;
        }
        // One of them may still be up (or come back): closed, not leaked
        // with the deliveries its channels hold.
        self.retire();
        // A loss lapin could not recover from: the next connect starts at
        // the next URL (another cluster node), the others after it.
        if !self.cfg.urls.is_empty() {
            self.url_index = (self.url_index + 1) % self.cfg.urls.len();
        }
        self.blocked = false;
        events::Unblocked { reset: true }.emit(&self.metrics);
        events::Restarted {
            kind: ActorKind::Connection,
            stage: "",
        }
        .emit(&self.metrics);
        self.lost_since.clear();
        self.notify(LinkEvent::LinkDown(Purpose::Consume));
        self.notify(LinkEvent::LinkDown(Purpose::Publish));
        self.notify(LinkEvent::Replaced(Purpose::Consume));
        self.notify(LinkEvent::Replaced(Purpose::Publish));
        if std::mem::take(&mut self.waiting_for_broker) {
            self.restarts.retry();
        } else if self.restarts.escalated() || !self.restarts.record(tokio::time::Instant::now()) {
            events::Escalated {
                kind: ActorKind::Connection,
                stage: "",
            }
            .emit(&self.metrics);
            if let Some(tx) = &self.escalations {
                let _ = tx.try_send(Escalation {
                    actor: "connection".into(),
                    reason: match &self.refused {
                        Some(why) => format!("the broker refuses the connection: {why}"),
                        None => "the broker refuses the connection".into(),
                    },
                });
            }
        }
    }
}

struct ConnEvent {
    generation: u64,
    purpose: Purpose,
    event: Event,
}

impl StreamHandler<ConnEvent> for ConnectionActor {
    fn handle(&mut self, ev: ConnEvent, _ctx: &mut Context<Self>) {
        if ev.generation != self.generation {
            return;
        }
        match ev.event {
            // lapin may or may not report the initial connect (it races with
            // our listener); a `Connected` right after it is that one. lapin's
            // first reconnect waits at least `INITIAL_CONNECTED` (see
            // `connect_one`), so a recovery cannot be that quick.
            Event::Connected
                if !self.failed.remove(&ev.purpose)
                    && self.connected_at.elapsed() < INITIAL_CONNECTED => {}
            Event::Connected => {
                self.lost_since.remove(&ev.purpose);
                events::Reconnected {
                    connection: ev.purpose.as_str(),
                }
                .emit(&self.metrics);
                self.update_gauge();
                // A block ends with its connection, and lapin recovers one
                // without always reporting the loss: the new connection is
                // not blocked (the broker says so again if it blocks it).
                if ev.purpose == Purpose::Publish {
                    self.clear_block();
                }
                self.notify(LinkEvent::LinkUp(ev.purpose));
            }
            Event::Error(e) => {
                if ev.purpose == Purpose::Publish {
                    self.clear_block();
                }
                self.failed.insert(ev.purpose);
                self.update_gauge();
                self.lost_since
                    .entry(ev.purpose)
                    .or_insert_with(std::time::Instant::now);
                events::LinkDown {
                    connection: ev.purpose.as_str(),
                    error: &e,
                    closing: self.closing,
                }
                .emit(&self.metrics);
                self.notify(LinkEvent::LinkDown(ev.purpose));
            }
            Event::ConnectionBlocked(reason) if ev.purpose == Purpose::Publish => {
                events::Blocked { reason: &reason }.emit(&self.metrics);
                self.blocked = true;
                self.notify(LinkEvent::Blocked(reason));
            }
            Event::ConnectionUnblocked if ev.purpose == Purpose::Publish => {
                events::Unblocked { reset: false }.emit(&self.metrics);
                self.blocked = false;
                self.notify(LinkEvent::Unblocked);
            }
            _ => {}
        }
    }

    fn finished(&mut self, _ctx: &mut Context<Self>) {
        // A replaced connection's event stream ended; nothing to do (the
        // default would stop the actor).
    }
}

impl Handler<OpenChannel> for ConnectionActor {
    type Result = ResponseFuture<Result<Channel>>;

    fn handle(&mut self, msg: OpenChannel, _ctx: &mut Context<Self>) -> Self::Result {
        // A connection lapin is recovering (or gave up on) has no room for
        // a new channel: the caller waits for the next LinkUp.
        let conn = self.conn(msg.0).filter(|c| c.status().connected()).cloned();
        let refused = self.refused.clone();
        Box::pin(async move {
            let conn = conn.ok_or(match refused {
                Some(why) => Error::Refused(why),
                None => Error::NotConnected,
            })?;
            Ok(conn.create_channel().await?)
        })
    }
}

impl Handler<Subscribe> for ConnectionActor {
    type Result = bool;

    fn handle(&mut self, msg: Subscribe, _ctx: &mut Context<Self>) -> bool {
        let up = self.both_up();
        // bounded: at most three notices to a new subscriber.
        if up {
            msg.0.do_send(LinkEvent::LinkUp(Purpose::Consume));
            msg.0.do_send(LinkEvent::LinkUp(Purpose::Publish));
        }
        if self.blocked {
            msg.0.do_send(LinkEvent::Blocked("alarm in force".into()));
        }
        self.subscribers.push(msg.0);
        up
    }
}

impl Handler<GetStatus> for ConnectionActor {
    type Result = LinkStatus;

    fn handle(&mut self, _: GetStatus, _ctx: &mut Context<Self>) -> LinkStatus {
        LinkStatus {
            up: self.both_up(),
            blocked: self.blocked,
        }
    }
}

impl Handler<Close> for ConnectionActor {
    type Result = ResponseActFuture<Self, ()>;

    fn handle(&mut self, _: Close, _ctx: &mut Context<Self>) -> Self::Result {
        self.closing = true;
        let conns: Vec<_> = [self.consume.take(), self.publish.take()]
            .into_iter()
            .flatten()
            .chain(self.retired.drain(..).filter(|c| c.status().connected()))
            .collect();
        Box::pin(
            async move {
                let closes = conns
                    .iter()
                    .map(|c| c.close(200, "flowgate shutdown".into()));
                // Unanswered past the bound (a blocked connection): let go.
                if tokio::time::timeout(CLOSE_WITHIN, futures::future::join_all(closes))
                    .await
                    .is_err()
                {
                    warn!(
                        within = ?CLOSE_WITHIN,
                        "the broker did not answer the close of the connections (is it blocking publishers?); letting go"
                    );
                }
            }
            .into_actor(self)
            .map(|_, act, ctx| {
                act.update_gauge();
                // Stop for good: the engine drops its address next.
                ctx.stop();
            }),
        )
    }
}

/// A channel lapin still owns: connected, or reconnecting (lapin re-opens
/// it and re-registers its consumer itself after a connection recovery;
/// opening a second one meanwhile would leave a zombie consumer holding a
/// prefetch window nobody reads).
pub(crate) fn channel_alive(ch: &lapin::Channel) -> bool {
    let s = ch.status();
    s.connected() || s.reconnecting()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(url: &str) -> ConnectionConfig {
        ConnectionConfig {
            urls: vec![url.to_owned()],
            name: "flowgate-unit".into(),
            connect_timeout: Duration::from_secs(5),
            policy: RestartPolicy::default(),
            tls: TlsSettings::default(),
        }
    }

    #[tokio::test]
    async fn an_outage_is_waited_for_refused_credentials_are_not() {
        // Nothing listens on a port just freed: connection refused.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let url = format!("amqp://guest:guest@127.0.0.1:{port}/%2f");
        let refused = connect_one(&cfg(&url), &url, Purpose::Consume).await;
        let e = refused.expect_err("nothing listens there");
        assert!(unreachable(&e), "connection refused counted as fatal: {e}");

        let url = "amqp://guest:not-the-password@127.0.0.1:5672/%2f";
        let denied = connect_one(&cfg(url), url, Purpose::Consume).await;
        let e = denied.expect_err("the broker refuses a wrong password");
        assert!(!unreachable(&e), "refused credentials waited for: {e}");

        let url = "amqp://guest:guest@127.0.0.1:5672/no-such-vhost";
        let denied = connect_one(&cfg(url), url, Purpose::Consume).await;
        let e = denied.expect_err("the broker refuses a missing vhost");
        assert!(!unreachable(&e), "a missing vhost waited for: {e}");
    }

    #[test]
    fn passwords_never_leave_the_url_redactor() {
        assert_eq!(
            redact_url("amqp://guest:s3cret@host:5672/%2f"),
            "amqp://guest:***@host:5672/%2f"
        );
        assert_eq!(redact_url("amqp://host"), "amqp://host");
    }
}
