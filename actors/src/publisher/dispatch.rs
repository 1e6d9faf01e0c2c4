//! One publish: the breaker decides — publish and await the confirm, or
//! spool — and copies spooled at a caller's deadline are held until their
//! original publish is answered (see the module docs).

use super::{lock, BreakerState, Core, Published, SpoolRecord};
use crate::envelope;
use crate::error::{Error, Result};
use crate::message::Output;
use crate::metrics::events::{self, Event, PublishResult, SpoolOp};
use std::sync::atomic::{AtomicUsize, Ordering};
use tracing::{debug, warn};

impl Core {
    /// Publishes (or spools) one message; the caller holds its window credit.
    pub(super) async fn dispatch(&self, msg: &Output) -> Result<Published> {
        // A message the broker cannot take is its sender's fault: refuse it
        // before it touches the breaker or the spool.
        envelope::check_short("exchange", &msg.exchange)?;
        envelope::check_short("routing key", &msg.routing_key)?;
        if self.blocked_expired() {
            return self.spool_blocked(msg).await;
        }
        let admission = self.with_breaker(|b, now| b.allow(now));
        if !admission.is_allowed() {
            return self.spool(msg.clone()).await;
        }
        let res = match self.channel_for_publish().await {
            None => Err(Error::NotConnected),
            Some(ch) => self.publish_once(&ch, msg).await,
        };
        self.record(&res);
        match res {
            Ok(()) => Ok(Published::Confirmed),
            Err(e) => {
                debug!(error = %e, "publish failed");
                if matches!(e, Error::Unroutable { .. }) {
                    return Err(e);
                }
                if self.spool.is_some() && self.breaker_state() == BreakerState::Open {
                    warn!(error = %e, "publish failed and the breaker is open; spooling it");
                    return self.spool(msg.clone()).await;
                }
                Err(e)
            }
        }
    }

    /// The broker has blocked us for longer than `blocked_timeout`: keeps
    /// the breaker open for as long as the block lasts (no probe can
    /// succeed on a blocked connection) and spools `msg`. Needs no window
    /// credit: nothing goes on the wire.
    pub(super) async fn spool_blocked(&self, msg: &Output) -> Result<Published> {
        // A message the broker cannot take is its sender's fault.
        envelope::check_short("exchange", &msg.exchange)?;
        envelope::check_short("routing key", &msg.routing_key)?;
        self.with_breaker(|b, now| ((), b.force_open(now)));
        self.spool(msg.clone()).await
    }

    /// Appends to the spool; resolves once the record is durable.
    pub(super) async fn spool(&self, msg: Output) -> Result<Published> {
        self.spool_record(msg).await.map(|_| Published::Spooled)
    }

    /// Spools a copy of `msg`, whose publish still awaits its answer, held
    /// until [`Core::settle_held`] (see the module docs).
    pub(super) async fn spool_held(&self, msg: &Output) -> Result<u64> {
        struct Appending<'a>(&'a AtomicUsize);
        impl Drop for Appending<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        self.holding.fetch_add(1, Ordering::SeqCst);
        let _appending = Appending(&self.holding);
        let seq = self.spool_record(msg.clone()).await?;
        // Before `holding` drops: a replay that read this record sees it held.
        lock(&self.held).insert(seq);
        Ok(seq)
    }

    /// The original publish of held record `seq` was answered: a confirm
    /// (or a copy of its own in the spool) supersedes the record, which is
    /// deleted; any other answer releases it for replay.
    pub(super) async fn settle_held(&self, seq: u64, answer: &Result<Published>) {
        if let (Ok(_), Some(spool)) = (answer, &self.spool) {
            match spool.remove_async(seq).await {
                Ok(()) => events::SpoolSuperseded.emit(&self.metrics),
                // It stays, and is replayed: a copy too many, never one lost.
                Err(e) => events::SpoolFailed {
                    op: SpoolOp::Remove,
                    error: &e,
                }
                .emit(&self.metrics),
            }
        }
        lock(&self.held).remove(&seq);
        self.update_spool_gauges();
    }

    /// Appends to the spool; its sequence number once the record is durable.
    pub(super) async fn spool_record(&self, msg: Output) -> Result<u64> {
        let Some(spool) = &self.spool else {
            let e =
                Error::Backpressure("publish circuit breaker open (no spool configured)".into());
            events::PublishFinished {
                result: PublishResult::Failed(&e),
            }
            .emit(&self.metrics);
            return Err(e);
        };
        let rec = SpoolRecord {
            exchange: msg.exchange,
            routing_key: msg.routing_key,
            body: msg.body.to_vec(),
            properties: msg.properties,
        };
        let res = spool.append_async(rec).await;
        self.update_spool_gauges();
        match res {
            Ok(seq) => {
                events::PublishFinished {
                    result: PublishResult::Spooled,
                }
                .emit(&self.metrics);
                Ok(seq)
            }
            Err(e) if e.is_full() => {
                events::PublishFinished {
                    result: PublishResult::SpoolFull,
                }
                .emit(&self.metrics);
                debug!(error = %e, "spool full; backpressure");
                Err(Error::Backpressure(e.to_string()))
            }
            Err(e) => {
                events::SpoolFailed {
                    op: SpoolOp::Append,
                    error: &e,
                }
                .emit(&self.metrics);
                Err(Error::Spool(e))
            }
        }
    }
}
