//! Replaying the spool: in order, in rounds, each record taking a rate
//! token and a window credit, deleted only after its confirm; a record
//! that comes back unroutable is moved to the unroutable queue.

use super::confirm::Sent;
use super::{lock, Admission, BreakerState, Core, SpoolRecord};
use crate::error::{Error, Result};
use crate::metrics::events::{self, Event, SpoolOp};
use lapin::Channel;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tracing::{debug, error, info, warn};

/// Most spooled records published per replay round before their confirms
/// are awaited and they are deleted (one spool transaction per round).
const REPLAY_BATCH: usize = 256;

impl Core {
    /// The part of a replay batch before the first held record; `None`
    /// while a held copy is being appended (it may be in the batch).
    pub(super) fn unheld_prefix(
        &self,
        mut batch: Vec<(u64, SpoolRecord)>,
    ) -> Option<Vec<(u64, SpoolRecord)>> {
        if self.holding.load(Ordering::SeqCst) > 0 {
            return None;
        }
        let held = lock(&self.held);
        if let Some(first) = batch.iter().position(|(seq, _)| held.contains(seq)) {
            batch.truncate(first);
        }
        Some(batch)
    }

    /// Whether a replay round should start now.
    pub(super) fn should_replay(&self) -> bool {
        self.spool.as_ref().is_some_and(|s| !s.is_empty())
            && !self.replaying.load(Ordering::Acquire)
            && !self.is_blocked()
            && self.breaker_state() != BreakerState::Open
            && self.usable_channel().is_some()
    }

    /// Replays the spool in order until it is empty or publishing fails.
    pub(super) async fn replay(self: Arc<Self>) {
        struct Done<'a>(&'a AtomicBool);
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                self.0.store(false, Ordering::Release);
            }
        }
        if self.replaying.swap(true, Ordering::AcqRel) {
            return;
        }
        let _done = Done(&self.replaying);
        let Some(spool) = self.spool.clone() else {
            return;
        };
        info!(records = spool.len(), "replaying the spool");
        loop {
            if self.is_blocked() {
                return;
            }
            let Some(ch) = self.usable_channel() else {
                return;
            };
            let batch = match spool.peek_batch_async(REPLAY_BATCH).await {
                Ok(b) => b,
                Err(e) => {
                    events::SpoolFailed {
                        op: SpoolOp::Read,
                        error: &e,
                    }
                    .emit(&self.metrics);
                    return;
                }
            };
            if batch.is_empty() {
                info!("spool drained");
                return;
            }
            let Some(batch) = self.unheld_prefix(batch) else {
                return;
            };
            if batch.is_empty() {
                debug!("the next spooled record awaits its original publish's answer");
                return;
            }
            let admission = self.with_breaker(|b, now| b.allow(now));
            let take = match admission {
                Admission::Reject => return,
                Admission::Probe => 1,
                // A round holds a window credit per record until the
                // confirms are awaited: never more than the window.
                Admission::Admit => batch.len().min(self.window.total().max(1)),
            };
            let results = self.publish_batch(&ch, &batch[..take]).await;
            let mut remove = Vec::with_capacity(take);
            let mut failed = false;
            for ((seq, rec), res) in batch.iter().zip(results) {
                self.record(&res);
                match res {
                    Ok(()) => {
                        events::SpoolReplayed.emit(&self.metrics);
                        remove.push(*seq);
                    }
                    Err(e @ Error::Unroutable { .. }) => {
                        match self.dead_letter_unroutable(&ch, rec, &e).await {
                            Ok(()) => {
                                self.count_unroutable_dead_letter(
                                    rec,
                                    "spooled message is unroutable; moved to the unroutable queue",
                                );
                                remove.push(*seq);
                            }
                            Err(e) => {
                                error!(
                                    seq, error = %e, queue = %self.cfg.unroutable_queue,
                                    "cannot move an unroutable spooled message; it stays in the spool"
                                );
                                failed = true;
                            }
                        }
                    }
                    Err(e) => {
                        warn!(seq, error = %e, "replay publish failed; will retry");
                        failed = true;
                    }
                }
            }
            let removed = spool.remove_many_async(remove).await;
            self.update_spool_gauges();
            if let Err(e) = removed {
                events::SpoolFailed {
                    op: SpoolOp::Remove,
                    error: &e,
                }
                .emit(&self.metrics);
                return;
            }
            if failed {
                return;
            }
        }
    }

    /// Sends spooled records in order on one channel, then awaits their
    /// confirms; one result per record, in order.
    pub(super) async fn publish_batch(
        &self,
        ch: &Channel,
        batch: &[(u64, SpoolRecord)],
    ) -> Vec<Result<()>> {
        let mut confirms = Vec::with_capacity(batch.len());
        for (_, rec) in batch {
            // A replay is held to the rate and the window of live
            // publishes; a record that gets neither stays for the next round.
            if self.bucket.acquire().await.is_err() {
                break;
            }
            let Some(credit) = self.window.acquire().await else {
                break;
            };
            let props = rec.properties.clone();
            let sent = self
                .patiently(self.send(ch, &rec.exchange, &rec.routing_key, &rec.body, props))
                .await;
            confirms.push((credit, sent));
        }
        let mut out = Vec::with_capacity(confirms.len());
        for ((_credit, c), (_, rec)) in confirms.into_iter().zip(batch) {
            out.push(match c {
                Err(e) => Err(e),
                Ok(c) => match self.patiently(async { Ok(c.await) }).await {
                    Err(e) => Err(e),
                    Ok(confirmation) => self.settle(ch, confirmation, &Sent::record(rec)).await,
                },
            });
        }
        out
    }
}
