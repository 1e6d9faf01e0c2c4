//! The actor that owns the confirm-mode channel's life: opening it,
//! replacing a dead one, restarts, link events, the breaker's clock and the
//! spool replay.

use super::{
    lock, BreakerState, CircuitBreaker, Core, PublisherConfig, PublisherHandle, Spool, TokenBucket,
    WaitSlots,
};
use crate::connection::{ConnectionActor, LinkEvent, OpenChannel, Purpose, Subscribe};
use crate::credit::Credits;
use crate::error::{Error, Result};
use crate::metrics::events::{self, ActorKind, Event};
use crate::metrics::Metrics;
use crate::supervision::{Escalation, EscalationSender, Restarts};
use actix::prelude::*;
use lapin::options::ConfirmSelectOptions;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};

/// How often the actor re-evaluates the breaker (open → half-open), the
/// blocked timeout and whether the spool should replay.
const TICK: Duration = Duration::from_millis(100);

/// Owns the confirm-mode channel. See the module docs.
pub struct PublisherActor {
    core: Arc<Core>,
    conn: Addr<ConnectionActor>,
    restarts: Restarts,
    escalations: Option<EscalationSender>,
    /// Link events are subscribed to once: the supervisor keeps the
    /// address across restarts, so the subscription stays valid.
    subscribed: bool,
}

impl PublisherActor {
    /// Opens the spool (if configured; on the blocking pool — redb may
    /// repair the file after a crash), starts the actor under a supervisor
    /// and returns a handle. Records left in the spool replay once the
    /// broker is reachable.
    pub async fn start_supervised(
        cfg: PublisherConfig,
        conn: Addr<ConnectionActor>,
        metrics: Metrics,
        escalations: Option<EscalationSender>,
    ) -> Result<PublisherHandle> {
        let spool = match &cfg.spool {
            Some(s) => Some(
                Spool::open_async(s.path.clone(), s.max_bytes)
                    .await
                    .map_err(|e| {
                        tracing::error!(path = %s.path.display(), error = %e, "cannot open the spool");
                        Error::Spool(e)
                    })?,
            ),
            None => None,
        };
        if let Some(s) = &spool {
            s.count_quarantined_in(metrics.clone());
            if !s.is_empty() {
                info!(
                    records = s.len(),
                    bytes = s.bytes(),
                    "spool holds records from an earlier run; they will be replayed"
                );
            }
        }
        let window = Credits::new(cfg.max_unconfirmed);
        let core = Arc::new(Core {
            bucket: TokenBucket::new(cfg.rate, cfg.burst, cfg.max_waiters),
            slots: WaitSlots {
                count: AtomicUsize::new(0),
                max: cfg.max_waiters,
            },
            breaker: Mutex::new(CircuitBreaker::new(cfg.breaker)),
            channel: Mutex::new(None),
            // The actor opens the channel once it hears the link is up
            // (see `started`).
            opening: watch::channel(true).0,
            spool,
            gate: watch::channel(false).0,
            blocked_since: Mutex::new(None),
            replaying: AtomicBool::new(false),
            conn: conn.clone(),
            window: window.clone(),
            unroutable_declared: AtomicBool::new(false),
            held: Mutex::new(BTreeSet::new()),
            holding: AtomicUsize::new(0),
            metrics,
            cfg,
        });
        core.update_spool_gauges();
        events::BreakerChecked {
            state: BreakerState::Closed,
        }
        .emit(&core.metrics);
        let c = core.clone();
        let addr = Supervisor::start(move |_| PublisherActor {
            restarts: Restarts::new(c.cfg.policy.clone()),
            core: c,
            conn,
            escalations,
            subscribed: false,
        });
        Ok(PublisherHandle { addr, window, core })
    }

    fn open_channel(&mut self, ctx: &mut Context<Self>) {
        let conn = self.conn.clone();
        let delay = self.restarts.delay();
        self.core.set_opening(true);
        ctx.wait(
            async move {
                tokio::time::sleep(delay).await;
                let ch = conn.send(OpenChannel(Purpose::Publish)).await??;
                ch.confirm_select(ConfirmSelectOptions::default()).await?;
                Ok::<_, Error>(ch)
            }
            .into_actor(self)
            .map(|res, act, ctx| match res {
                Ok(ch) => {
                    debug!("publisher channel open in confirm mode");
                    *lock(&act.core.channel) = Some(ch);
                    act.core.set_opening(false);
                    act.restarts.succeeded();
                }
                Err(Error::NotConnected) => {
                    // The connection actor will send LinkUp when it is back.
                    act.core.set_opening(false);
                }
                Err(e) => {
                    // `restarting` keeps publishes waiting for the next one.
                    warn!(error = %e, "could not open the publisher channel; restarting");
                    ctx.stop();
                }
            }),
        );
    }

    /// Periodic: breaker timing, the blocked timeout, spool replay.
    fn tick(&mut self, ctx: &mut Context<Self>) {
        let core = &self.core;
        if core.blocked_expired() {
            if *core.gate.borrow() {
                warn!(
                    timeout = ?core.cfg.blocked_timeout,
                    "broker blocked longer than blocked_timeout; opening the breaker"
                );
                core.gate.send_replace(false);
            }
            // Open for as long as the block lasts, even with no publish
            // coming by (all of them in flight): no probe can succeed on
            // a blocked connection.
            // Before `poll`: a cooldown over meanwhile is restarted, not
            // reported as a half-open spell.
            if core.breaker_state() != BreakerState::Open {
                core.with_breaker(|b, now| ((), b.force_open(now)));
            }
        }
        core.with_breaker(|b, now| ((), b.poll(now)));
        core.update_waiters();
        core.update_spool_gauges();
        if core.channel_dead() {
            // e.g. the broker closed the channel (a publish to a missing
            // exchange): replace it without a restart.
            *lock(&core.channel) = None;
            self.open_channel(ctx);
        }
        let core = &self.core;
        if core.should_replay() {
            ctx.spawn(core.clone().replay().into_actor(self));
        }
    }
}

impl Actor for PublisherActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        if self.restarts.escalated() {
            self.core.set_opening(false);
            return;
        }
        if !self.subscribed {
            self.subscribed = true;
            // Once, on the first start. The answer says whether the link is
            // up: if so a LinkUp follows and opens the channel (publishes
            // wait for it); if not, publishes fail at once until it is.
            ctx.wait(
                self.conn
                    .send(Subscribe(ctx.address().recipient()))
                    .into_actor(self)
                    .map(|up, act, _| {
                        if !matches!(up, Ok(true)) {
                            act.core.set_opening(false);
                        }
                    }),
            );
        } else {
            // A restart: the link may be up already (no LinkUp will come).
            self.open_channel(ctx);
        }
        ctx.run_interval(TICK, |act, ctx| act.tick(ctx));
    }
}

impl Supervised for PublisherActor {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        *lock(&self.core.channel) = None;
        // `started` opens the next channel (or gives up and clears this).
        self.core.set_opening(true);
        events::Restarted {
            kind: ActorKind::Publisher,
            stage: "",
        }
        .emit(&self.core.metrics);
        if !self.restarts.record(tokio::time::Instant::now()) {
            events::Escalated {
                kind: ActorKind::Publisher,
                stage: "",
            }
            .emit(&self.core.metrics);
            if let Some(tx) = &self.escalations {
                let _ = tx.try_send(Escalation {
                    actor: "publisher".into(),
                    reason: "publisher channel keeps failing".into(),
                });
            }
        }
    }
}

impl Handler<LinkEvent> for PublisherActor {
    type Result = ();

    fn handle(&mut self, ev: LinkEvent, ctx: &mut Context<Self>) {
        match ev {
            // lapin reports `Connected` before it has recovered the
            // channels, then re-opens the channel (and confirm mode) by
            // itself: open one only if we have none lapin still owns.
            LinkEvent::LinkUp(Purpose::Publish) if !self.core.channel_alive() => {
                self.open_channel(ctx);
            }
            // The connection under the channel was replaced: the channel
            // will not come back; the next LinkUp opens a new one.
            LinkEvent::Replaced(Purpose::Publish) => {
                *lock(&self.core.channel) = None;
            }
            LinkEvent::Blocked(reason) => {
                let mut since = lock(&self.core.blocked_since);
                if since.is_none() {
                    *since = Some(Instant::now());
                    info!(%reason, "broker blocked publishing; publishes wait");
                    self.core.gate.send_replace(true);
                }
            }
            LinkEvent::Unblocked => {
                *lock(&self.core.blocked_since) = None;
                self.core.gate.send_replace(false);
                info!("broker unblocked publishing; publishes resume");
            }
            // A block ends with its connection.
            LinkEvent::LinkDown(Purpose::Publish)
                if lock(&self.core.blocked_since).take().is_some() =>
            {
                self.core.gate.send_replace(false);
            }
            _ => {}
        }
    }
}
