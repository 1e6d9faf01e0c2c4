//! The PublisherActor: confirmed, `mandatory` publishing through one
//! confirm-mode channel, with a bounded window of unconfirmed publishes.
//!
//! Callers hold a [`PublisherHandle`]. A publish first takes a credit from the
//! window (so at most `max_unconfirmed` publishes are ever inside the actor or
//! awaiting a confirm), then travels to the actor with that credit. The future
//! resolves when the broker confirmed the message — or with the reason it
//! could not: nack, `basic.return` (unroutable), confirm timeout, a blocked or
//! lost connection.

use crate::connection::{ConnectionActor, LinkEvent, OpenChannel, Purpose, Subscribe};
use crate::credit::{Credit, Credits};
use crate::error::{Error, Result};
use crate::message::Output;
use crate::metrics::Metrics;
use crate::supervision::{Escalation, EscalationSender, RestartPolicy, Restarts};
use actix::prelude::*;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{Channel, Confirmation};
use std::time::Duration;
use tracing::{debug, warn};

/// Publisher settings.
#[derive(Clone, Debug)]
pub struct PublisherConfig {
    /// How long to wait for a broker confirm before calling the publish failed.
    pub confirm_timeout: Duration,
    /// Bound on publishes awaiting a confirm (the publish window).
    pub max_unconfirmed: usize,
    /// Restart backoff and budget.
    pub policy: RestartPolicy,
}

impl Default for PublisherConfig {
    fn default() -> Self {
        Self {
            confirm_timeout: Duration::from_secs(10),
            max_unconfirmed: 1024,
            policy: RestartPolicy::default(),
        }
    }
}

/// Publish one message; resolves once the broker confirmed it.
#[derive(Message)]
#[rtype(result = "Result<()>")]
pub struct Publish {
    /// The message.
    pub msg: Output,
    /// The window credit this publish holds until it is confirmed or failed.
    pub credit: Credit,
}

/// A cloneable handle for publishing.
#[derive(Clone)]
pub struct PublisherHandle {
    addr: Addr<PublisherActor>,
    window: Credits,
    metrics: Metrics,
}

impl PublisherHandle {
    /// Publishes `msg` and waits for the broker's confirm.
    ///
    /// Waits for room in the unconfirmed window first; the window is the only
    /// queue, and it is bounded.
    pub async fn publish(&self, msg: Output) -> Result<()> {
        let credit = self.window.acquire().await.ok_or(Error::ShuttingDown)?;
        self.metrics.unconfirmed.set(self.window.in_use() as i64);
        let res = self.addr.send(Publish { msg, credit }).await;
        self.metrics.unconfirmed.set(self.window.in_use() as i64);
        res?
    }

    /// Publishes currently awaiting a confirm.
    pub fn unconfirmed(&self) -> usize {
        self.window.in_use()
    }

    /// Waits until every publish in the window is confirmed or failed.
    pub async fn flush(&self) {
        self.window.drained().await;
    }

    /// The actor's address.
    pub fn addr(&self) -> &Addr<PublisherActor> {
        &self.addr
    }
}

/// Owns the confirm-mode channel. See the module docs.
pub struct PublisherActor {
    cfg: PublisherConfig,
    conn: Addr<ConnectionActor>,
    metrics: Metrics,
    restarts: Restarts,
    escalations: Option<EscalationSender>,
    channel: Option<Channel>,
    blocked: bool,
}

impl PublisherActor {
    /// Starts the actor under a supervisor and returns a handle.
    pub fn start_supervised(
        cfg: PublisherConfig,
        conn: Addr<ConnectionActor>,
        metrics: Metrics,
        escalations: Option<EscalationSender>,
    ) -> PublisherHandle {
        let window = Credits::new(cfg.max_unconfirmed);
        let m = metrics.clone();
        let addr = Supervisor::start(move |_| PublisherActor {
            restarts: Restarts::new(cfg.policy.clone()),
            cfg,
            conn,
            metrics: m,
            escalations,
            channel: None,
            blocked: false,
        });
        PublisherHandle {
            addr,
            window,
            metrics,
        }
    }

    fn open_channel(&mut self, ctx: &mut Context<Self>) {
        let conn = self.conn.clone();
        let delay = self.restarts.delay();
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
                    act.channel = Some(ch);
                    act.restarts.succeeded();
                }
                Err(Error::NotConnected) => {
                    // The connection actor will send LinkUp when it is back.
                }
                Err(e) => {
                    warn!(error = %e, "could not open the publisher channel; restarting");
                    ctx.stop();
                }
            }),
        );
    }
}

impl Actor for PublisherActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        if self.restarts.escalated() {
            return;
        }
        self.conn.do_send(Subscribe(ctx.address().recipient()));
    }
}

impl Supervised for PublisherActor {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        self.channel = None;
        self.metrics
            .restarts
            .with_label_values(&["publisher"])
            .inc();
        if !self.restarts.record(tokio::time::Instant::now()) {
            self.metrics.escalations.inc();
            tracing::error!(actor = "publisher", "restart budget spent; escalating");
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
            // lapin's recovery re-opens the channel (and confirm mode) by
            // itself; open one only if we have none that is usable.
            LinkEvent::LinkUp(Purpose::Publish)
                if !self
                    .channel
                    .as_ref()
                    .is_some_and(|c| c.status().connected()) =>
            {
                self.open_channel(ctx);
            }
            LinkEvent::Blocked(_) => self.blocked = true,
            LinkEvent::Unblocked => self.blocked = false,
            _ => {}
        }
    }
}

fn result_label(r: &Result<()>) -> &'static str {
    match r {
        Ok(()) => "confirmed",
        Err(e) => e.label(),
    }
}

impl Handler<Publish> for PublisherActor {
    type Result = ResponseActFuture<Self, Result<()>>;

    fn handle(&mut self, msg: Publish, _ctx: &mut Context<Self>) -> Self::Result {
        let Publish { msg, credit } = msg;
        let ch = self.channel.clone();
        let blocked = self.blocked;
        let timeout = self.cfg.confirm_timeout;
        let fut = async move {
            let _credit = credit;
            if blocked {
                return Err(Error::Backpressure(
                    "broker blocked publishing (resource alarm)".into(),
                ));
            }
            let ch = ch.ok_or(Error::NotConnected)?;
            if !ch.status().connected() {
                return Err(Error::NotConnected);
            }
            let props = msg.properties.with_delivery_mode(2);
            let confirm = ch
                .basic_publish(
                    msg.exchange.as_str().into(),
                    msg.routing_key.as_str().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        immediate: false,
                    },
                    &msg.body,
                    props,
                )
                .await?;
            match tokio::time::timeout(timeout, confirm).await {
                Err(_) => Err(Error::ConfirmTimeout(timeout)),
                Ok(Err(e)) => Err(Error::Amqp(e)),
                Ok(Ok(Confirmation::Ack(None))) | Ok(Ok(Confirmation::NotRequested)) => Ok(()),
                Ok(Ok(Confirmation::Ack(Some(ret)))) | Ok(Ok(Confirmation::Nack(Some(ret)))) => {
                    Err(Error::Unroutable {
                        code: ret.reply_code,
                        text: ret.reply_text.to_string(),
                    })
                }
                Ok(Ok(Confirmation::Nack(None))) => Err(Error::Nacked),
            }
        };
        Box::pin(fut.into_actor(self).map(|res, act, _ctx| {
            act.metrics
                .publish
                .with_label_values(&[result_label(&res)])
                .inc();
            if let Err(e) = &res {
                debug!(error = %e, "publish failed");
            }
            res
        }))
    }
}
