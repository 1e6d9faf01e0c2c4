//! The handle callers publish through: admission (a rate token, a window
//! credit, the blocked gate), then the publish in the caller's task — or,
//! for a caller with a deadline, on a task of its own.

use super::{BreakerState, Core, Published, PublisherActor, Spool};
use crate::credit::{Credit, Credits};
use crate::error::{Error, Result};
use crate::message::Output;
use crate::metrics::events::{self, Event, PublishResult};
use actix::Addr;
use futures::FutureExt;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use tracing::debug;

/// A panic in the publish path is that publish's (permanent) failure, not
/// its caller's.
fn publish_panicked(p: &(dyn std::any::Any + Send)) -> Error {
    Error::Panicked(format!("publish: {}", crate::error::panic_message(p)))
}

/// A cloneable handle for publishing.
#[derive(Clone)]
pub struct PublisherHandle {
    /// The actor that owns the channel.
    pub(super) addr: Addr<PublisherActor>,
    /// The unconfirmed window (shared with the core, for replays).
    pub(super) window: Credits,
    /// What publishes run against.
    pub(super) core: Arc<Core>,
}

impl PublisherHandle {
    /// Publishes `msg`: resolves once the broker confirmed it
    /// ([`Published::Confirmed`]) or, with the breaker open, once it is
    /// durable in the spool ([`Published::Spooled`]).
    ///
    /// Waits for a rate token, for the broker to unblock and for room in the
    /// unconfirmed window — each wait bounded by `max_waiters` callers;
    /// beyond that, and when the spool is full, it fails at once with
    /// [`Error::Backpressure`].
    pub async fn send(&self, msg: Output) -> Result<Published> {
        self.send_ref(&msg).await
    }

    /// [`send`](Self::send) for a caller that keeps the message (to retry
    /// it): nothing is copied unless it has to be spooled.
    pub async fn send_ref(&self, msg: &Output) -> Result<Published> {
        let Some(credit) = self.admit().await? else {
            return self.core.spool_blocked(msg).await;
        };
        // In place, in the caller's task (see the module docs).
        let res = AssertUnwindSafe(self.core.dispatch(msg))
            .catch_unwind()
            .await
            .unwrap_or_else(|p| Err(publish_panicked(p.as_ref())));
        self.release(credit);
        res
    }

    /// Like [`send`](Self::send), for a caller that must answer by
    /// `deadline` (the HTTP ingress).
    ///
    /// The waits for a token, the gate and the window are the caller's and
    /// end at the deadline (the message then goes to the spool, if there is
    /// one: it was never sent). Once admitted, the publish and its confirm
    /// run on a task of their own, so the deadline does not cancel them —
    /// the breaker still learns the outcome, and a message the broker may
    /// already have is not given up half-way. If the deadline passes first,
    /// a copy is spooled, *held* until the publish is answered: a confirm
    /// deletes the copy, anything else releases it for replay (see the
    /// module docs), so the message goes out once.
    ///
    /// `Ok(None)`: the deadline passed and there is no spool to keep a
    /// copy; the publish goes on, and its answer is only counted.
    pub async fn send_within(
        &self,
        msg: Output,
        deadline: tokio::time::Instant,
    ) -> Result<Option<Published>> {
        let credit = match tokio::time::timeout_at(deadline, self.admit()).await {
            Ok(Ok(Some(credit))) => credit,
            Ok(Ok(None)) => return self.core.spool_blocked(&msg).await.map(Some),
            Ok(Err(e)) => return Err(e),
            Err(_) if self.has_spool() => return self.core.spool(msg).await.map(Some),
            Err(_) => return Ok(None),
        };
        let core = self.core.clone();
        let handle = self.clone();
        let (answer, answered) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let mut publish = std::pin::pin!(AssertUnwindSafe(core.dispatch(&msg)).catch_unwind());
            let early = tokio::select! {
                res = &mut publish => Some(res),
                () = tokio::time::sleep_until(deadline) => None,
            };
            let unwound = |p: Box<dyn std::any::Any + Send>| Err(publish_panicked(p.as_ref()));
            if let Some(res) = early {
                handle.release(credit);
                let _ = answer.send(res.unwrap_or_else(unwound).map(Some));
                return;
            }
            let held = if core.spool.is_some() {
                debug!(message_id = ?msg.properties.message_id(), "no confirm by the caller's deadline; spooling a held copy");
                match core.spool_held(&msg).await {
                    Ok(seq) => {
                        let _ = answer.send(Ok(Some(Published::Spooled)));
                        Some(seq)
                    }
                    Err(e) => {
                        let _ = answer.send(Err(e));
                        None
                    }
                }
            } else {
                let _ = answer.send(Ok(None));
                None
            };
            let res = publish.await.unwrap_or_else(unwound);
            handle.release(credit);
            if let Some(seq) = held {
                core.settle_held(seq, &res).await;
            }
        });
        // Only the runtime shutting down drops the task unanswered.
        answered.await.unwrap_or(Err(Error::ShuttingDown))
    }

    /// A publish's admission: a rate token, a window credit, then the
    /// blocked gate (waited for holding the credit, so that at most
    /// `max_unconfirmed` publishes are past the window at any time).
    ///
    /// `None`: the window is full and the broker has blocked us for longer
    /// than `blocked_timeout` — the publishes holding the window wait for
    /// the block to end, so this one spools (without a credit: nothing
    /// goes on the wire) instead of waiting for them.
    async fn admit(&self) -> Result<Option<Credit>> {
        let core = &self.core;
        if core.bucket.acquire().await.is_err() {
            let e = Error::Backpressure("publish rate limit: too many waiting publishers".into());
            events::PublishFinished {
                result: PublishResult::Failed(&e),
            }
            .emit(&core.metrics);
            return Err(e);
        }
        let credit = match self.window.try_acquire() {
            Some(c) => c,
            None => {
                let _slot = core.slots.enter("publish window full")?;
                core.update_waiters();
                let c = tokio::select! {
                    c = self.window.acquire() => Some(c),
                    () = core.block_expired() => None,
                };
                drop(_slot);
                core.update_waiters();
                match c {
                    Some(c) => c.ok_or(Error::ShuttingDown)?,
                    None => return Ok(None),
                }
            }
        };
        if let Err(e) = core.wait_gate().await {
            events::PublishFinished {
                result: PublishResult::Failed(&e),
            }
            .emit(&core.metrics);
            return Err(e);
        }
        self.report_window();
        Ok(Some(credit))
    }

    fn release(&self, credit: Credit) {
        drop(credit);
        self.report_window();
    }

    fn report_window(&self) {
        events::PublishWindow {
            unconfirmed: self.window.in_use(),
        }
        .emit(&self.core.metrics);
    }

    /// Like [`send`](Self::send), for callers that only need to know the
    /// message is safe (confirmed or spooled).
    pub async fn publish(&self, msg: Output) -> Result<()> {
        self.send(msg).await.map(|_| ())
    }

    /// [`publish`](Self::publish) by reference (see [`send_ref`](Self::send_ref)).
    pub async fn publish_ref(&self, msg: &Output) -> Result<()> {
        self.send_ref(msg).await.map(|_| ())
    }

    /// Whether a spool is configured.
    pub fn has_spool(&self) -> bool {
        self.core.spool.is_some()
    }

    /// Publishes currently awaiting a confirm.
    pub fn unconfirmed(&self) -> usize {
        self.window.in_use()
    }

    /// Waits until every publish in the window is confirmed or failed.
    pub async fn flush(&self) {
        self.window.drained().await;
    }

    /// Changes the publish rate (publishes per second, `0`: unlimited) and
    /// burst live, as `[publisher] rate`/`burst` set them at start.
    pub fn set_rate(&self, rate_per_sec: u32, burst: u32) {
        self.core.bucket.set_rate(rate_per_sec, burst);
        tracing::info!(rate = rate_per_sec, burst, "publish rate changed");
    }

    /// The publish rate (`0`: unlimited) and burst in force.
    pub fn rate(&self) -> (u32, u32) {
        self.core.bucket.rate()
    }

    /// The breaker's state now.
    pub fn breaker_state(&self) -> BreakerState {
        self.core.breaker_state()
    }

    /// Records in the spool (0 without a spool).
    pub fn spooled(&self) -> u64 {
        self.core.spool.as_ref().map_or(0, Spool::len)
    }

    /// True while the broker blocks publishing.
    pub fn broker_blocked(&self) -> bool {
        self.core.is_blocked()
    }

    /// The actor's address.
    pub fn addr(&self) -> &Addr<PublisherActor> {
        &self.addr
    }
}
