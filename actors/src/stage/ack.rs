//! Batched acknowledgement: one `basic.ack` with `multiple = true` for a run
//! of consecutive settled deliveries instead of one frame each.
//!
//! # What is acked, and when
//!
//! Every delivery is registered by its delivery tag when intake takes it,
//! in tag order. A delivery whose outputs are confirmed becomes *ready*; a
//! rejected or requeued one is sent on its own at once (a `basic.reject` /
//! `basic.nack` frame) and then leaves the register. The register's ready
//! prefix — every entry from the lowest tag up to the first one still being
//! handled — is acked with one `basic.ack(multiple = true)` on the highest
//! tag of it:
//!
//! * at once when the prefix holds [`AckPolicy::max_batch`] deliveries
//!   (at most a quarter of the prefetch, so the broker keeps delivering while
//!   the batch fills);
//! * at once when it holds every registered delivery: nothing else is being
//!   handled, so nothing could join the batch but a delivery not yet taken —
//!   waiting for one would only add latency (a lone message at a low rate is
//!   acked as soon as its outputs are confirmed, as with single acks);
//! * otherwise after [`AckPolicy::flush_interval`]; a ready delivery behind
//!   one still being handled is then acked on its own, so a slow message
//!   never holds the acks of the others for longer than that;
//! * at once while the stage drains, and for everything ready when the drain
//!   has taken every credit back.
//!
//! A `multiple` ack never covers a tag that is still being handled (whose
//! outputs are not confirmed): the prefix stops at the first such entry, and
//! a reject or requeue is sent before its entry leaves, so a later `multiple`
//! ack cannot cover it either. Sends are serialised, in tag order.
//!
//! # Crash semantics
//!
//! Exactly those of single acks: at least once. A delivery is acked only
//! after its outputs are confirmed; if the process dies (or the channel
//! closes) between the confirm and the ack — now a window of up to
//! `flush_interval` instead of one round trip — the broker redelivers the
//! message and its outputs are published again (dedup, when on, answers the
//! redelivery without handling it again). Order is unchanged: acking never
//! changed the order in which outputs are published.
//!
//! Delivery tags restart at 1 when lapin recovers the channel: a tag not
//! above the last one registered starts a new *incarnation*, and entries of
//! the old one are forgotten (their channel is gone: the broker redelivers
//! them; a late ready of one is sent on its own acker, which lapin refuses).

use crate::metrics::events::{self, Event};
use crate::metrics::Metrics;
use lapin::options::BasicAckOptions;
use lapin::Acker;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::Notify;

/// How a stage acknowledges.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AckPolicy {
    /// A ready prefix this long is acked at once.
    pub max_batch: usize,
    /// The longest a ready delivery waits for its ack.
    pub flush_interval: Duration,
}

impl AckPolicy {
    /// The policy for a stage of `prefetch`: batches of a quarter of it
    /// (at least 1), flushed after `flush_interval`.
    pub fn for_prefetch(prefetch: u16, flush_interval: Duration) -> Self {
        Self {
            max_batch: usize::from(prefetch / 4).max(1),
            flush_interval,
        }
    }
}

/// One registered delivery, as the message task holds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Ticket {
    incarnation: u64,
    tag: u64,
}

enum Slot {
    /// Being handled (or rejected right now).
    Pending,
    /// Outputs confirmed: to be acked.
    Ready(Acker),
}

#[derive(Default)]
struct Register {
    incarnation: u64,
    last_tag: u64,
    slots: BTreeMap<u64, Slot>,
    /// Set while a flush is scheduled (the flusher will look).
    scheduled: bool,
    /// True while the stage drains: every ready delivery is acked at once.
    draining: bool,
}

/// What one flush sends.
struct Batch {
    /// The acker of the highest tag of the ready prefix, and how many
    /// deliveries it covers.
    prefix: Option<(Acker, usize)>,
    /// Ready deliveries behind a pending one, acked one by one.
    singles: Vec<Acker>,
}

/// The register of one stage (all its channel incarnations). The number of
/// entries is bounded by the prefetch: the broker delivers no more than
/// that many unacked messages on the channel.
pub(crate) struct AckBatcher {
    policy: AckPolicy,
    stage: String,
    metrics: Metrics,
    register: Mutex<Register>,
    /// Serialises sends, so `multiple` acks go out in tag order.
    sending: tokio::sync::Mutex<()>,
    /// Wakes the flusher: a flush is due after the interval (or the batcher
    /// is gone).
    wake: Arc<Notify>,
}

impl Drop for AckBatcher {
    fn drop(&mut self) {
        // The flusher finds the batcher gone and ends.
        self.wake.notify_one();
    }
}

impl AckBatcher {
    /// A register for `stage`, and its flusher task (ends with the last
    /// reference to the batcher).
    pub(crate) fn start(policy: AckPolicy, stage: String, metrics: Metrics) -> Arc<Self> {
        let b = Arc::new(Self {
            policy,
            stage,
            metrics,
            register: Mutex::new(Register::default()),
            sending: tokio::sync::Mutex::new(()),
            wake: Arc::new(Notify::new()),
        });
        let weak = Arc::downgrade(&b);
        let wake = b.wake.clone();
        let interval = policy.flush_interval;
        tokio::spawn(async move {
            loop {
                wake.notified().await;
                if weak.strong_count() == 0 {
                    return;
                }
                tokio::time::sleep(interval).await;
                let Some(b) = weak.upgrade() else { return };
                b.lock().scheduled = false;
                b.flush(true).await;
            }
        });
        b
    }

    fn lock(&self) -> MutexGuard<'_, Register> {
        // Nothing panics while the lock is held (map operations only).
        self.register
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Registers a delivery taken from the channel; call in delivery order.
    pub(crate) fn register(&self, tag: u64) -> Ticket {
        let mut r = self.lock();
        if tag <= r.last_tag {
            // The channel was recovered: its tags start again.
            r.incarnation += 1;
            r.slots.clear();
        }
        r.last_tag = tag;
        r.slots.insert(tag, Slot::Pending);
        Ticket {
            incarnation: r.incarnation,
            tag,
        }
    }

    /// The delivery's outputs are confirmed: it is acked with the next batch.
    pub(crate) async fn ready(&self, ticket: Ticket, acker: Acker) {
        let stale = {
            let mut r = self.lock();
            if r.incarnation == ticket.incarnation {
                r.slots.insert(ticket.tag, Slot::Ready(acker));
                None
            } else {
                Some(acker)
            }
        };
        if let Some(stale) = stale {
            // Its channel is gone: lapin refuses the ack, the broker
            // redelivers (what a single ack would have met too).
            self.send_one(stale).await;
            return;
        }
        self.kick().await;
    }

    /// Whether the ready prefix is to be sent now, and whether a flush is
    /// to be scheduled (none is yet).
    fn due(&self) -> (bool, bool) {
        let mut r = self.lock();
        let prefix = r
            .slots
            .values()
            .take_while(|s| matches!(s, Slot::Ready(_)))
            .count();
        let idle = prefix > 0 && prefix == r.slots.len();
        let now = r.draining || idle || prefix >= self.policy.max_batch;
        let schedule = !now && !r.scheduled;
        if schedule {
            r.scheduled = true;
        }
        (now, schedule)
    }

    /// The delivery was rejected or requeued (its frame already sent): it
    /// no longer holds the ready deliveries behind it.
    pub(crate) async fn settled(&self, ticket: Ticket) {
        {
            let mut r = self.lock();
            if r.incarnation == ticket.incarnation {
                r.slots.remove(&ticket.tag);
            }
        }
        self.kick().await;
    }

    /// Sends the ready prefix if it is due, else makes sure a flush is
    /// scheduled.
    async fn kick(&self) {
        let (now, schedule) = self.due();
        if now {
            self.flush(false).await;
        } else if schedule {
            self.wake.notify_one();
        }
    }

    /// Acks everything ready (the drain has every credit back); from now
    /// on every ready delivery is acked at once.
    pub(crate) async fn drain(&self) {
        self.lock().draining = true;
        self.flush(true).await;
    }

    /// Sends the ready prefix (and, with `singles`, the ready deliveries
    /// behind a pending one).
    async fn flush(&self, singles: bool) {
        let _sending = self.sending.lock().await;
        let batch = self.take(singles);
        if let Some((acker, covered)) = batch.prefix {
            let multiple = covered > 1;
            self.send(acker, multiple, covered).await;
        }
        for acker in batch.singles {
            self.send_one(acker).await;
        }
    }

    fn take(&self, singles: bool) -> Batch {
        let mut r = self.lock();
        let mut prefix: Option<(Acker, usize)> = None;
        while let Some(entry) = r.slots.first_entry() {
            if !matches!(entry.get(), Slot::Ready(_)) {
                break;
            }
            if let Slot::Ready(a) = entry.remove() {
                let covered = prefix.as_ref().map_or(0, |(_, n)| *n) + 1;
                prefix = Some((a, covered));
            }
        }
        let mut rest = Vec::new();
        if singles {
            let tags: Vec<u64> = r
                .slots
                .iter()
                .filter(|(_, s)| matches!(s, Slot::Ready(_)))
                .map(|(t, _)| *t)
                .collect();
            for t in tags {
                if let Some(Slot::Ready(a)) = r.slots.remove(&t) {
                    rest.push(a);
                }
            }
        }
        Batch {
            prefix,
            singles: rest,
        }
    }

    async fn send_one(&self, acker: Acker) {
        self.send(acker, false, 1).await;
    }

    /// One `basic.ack` covering `covered` deliveries; counted as acked only
    /// when the channel took it.
    async fn send(&self, acker: Acker, multiple: bool, covered: usize) {
        let stage = self.stage.as_str();
        let sent = tokio::time::timeout(
            super::SETTLE_TIMEOUT,
            acker.ack(BasicAckOptions { multiple }),
        )
        .await;
        let failed: Option<String> = match sent {
            Ok(Ok(true)) => None,
            Ok(Ok(false)) => Some("channel closed since delivery".into()),
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some(format!(
                "no answer from the channel within {:?}",
                super::SETTLE_TIMEOUT
            )),
        };
        events::AcksSent {
            stage,
            covered,
            error: failed.as_deref(),
        }
        .emit(&self.metrics);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::message::Delivery;

    const STAGE: &str = "s";

    /// A delivery's acker (no channel behind it: lapin lets it ack once)
    /// and a clone of it that tells whether it was used.
    fn acker(tag: u64) -> (Acker, Acker) {
        let a = Delivery::mock(tag, "".into(), "".into(), false, Vec::new()).acker;
        (a.clone(), a)
    }

    fn batcher(max_batch: usize) -> (Arc<AckBatcher>, Metrics) {
        let m = Metrics::new();
        let policy = AckPolicy {
            max_batch,
            flush_interval: Duration::from_secs(1),
        };
        (AckBatcher::start(policy, STAGE.into(), m.clone()), m)
    }

    /// (deliveries acked, `basic.ack` frames sent)
    fn acked(m: &Metrics) -> (u64, u64) {
        (
            m.counter(Metrics::ACKED, &[STAGE]),
            m.counter(Metrics::ACK_FRAMES, &[STAGE]),
        )
    }

    #[test]
    fn batches_are_a_quarter_of_the_prefetch() {
        let d = Duration::from_millis(5);
        assert_eq!(AckPolicy::for_prefetch(40, d).max_batch, 10);
        assert_eq!(AckPolicy::for_prefetch(7, d).max_batch, 1);
        assert_eq!(AckPolicy::for_prefetch(3, d).max_batch, 1, "at least 1");
        assert_eq!(AckPolicy::for_prefetch(40, d).flush_interval, d);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_prefix_goes_at_once_as_one_frame_on_its_highest_tag() {
        let (b, m) = batcher(3);
        let t: Vec<Ticket> = (1..=4).map(|tag| b.register(tag)).collect();
        let (a, used): (Vec<Acker>, Vec<Acker>) = (1..=4).map(acker).unzip();
        b.ready(t[0], a[0].clone()).await;
        b.ready(t[1], a[1].clone()).await;
        assert_eq!(acked(&m), (0, 0), "2 ready of 4: neither full nor all");
        b.ready(t[2], a[2].clone()).await;
        assert_eq!(acked(&m), (3, 1), "the prefix of 3 in one frame");
        assert!(!used[2].usable(), "sent on the highest tag");
        assert!(used[0].usable() && used[1].usable(), "covered, not sent");
        // Everything registered is ready (nothing else is handled): at once.
        b.ready(t[3], a[3].clone()).await;
        assert_eq!(acked(&m), (4, 2));
        assert!(!used[3].usable());
    }

    #[tokio::test(start_paused = true)]
    async fn a_ready_delivery_behind_a_pending_one_goes_alone_after_the_interval() {
        let (b, m) = batcher(10);
        // A lone delivery goes at once (and schedules nothing).
        let (a0, used0) = acker(1);
        b.ready(b.register(1), a0).await;
        assert!(!used0.usable());
        assert_eq!(acked(&m), (1, 1));
        let pending = b.register(2);
        let t3 = b.register(3);
        let (a3, used3) = acker(3);
        b.ready(t3, a3).await;
        tokio::time::sleep(Duration::from_millis(999)).await;
        assert!(used3.usable(), "held for the interval");
        assert_eq!(acked(&m), (1, 1));
        tokio::time::sleep(Duration::from_millis(2)).await;
        assert!(!used3.usable(), "then sent on its own");
        assert_eq!(acked(&m), (2, 2));
        // The pending one is rejected (its frame sent elsewhere) and leaves.
        b.settled(pending).await;
        let (a4, used4) = acker(4);
        b.ready(b.register(4), a4).await;
        assert!(!used4.usable(), "nothing holds it any more");
        assert_eq!(acked(&m), (3, 3));
    }

    #[tokio::test(start_paused = true)]
    async fn a_recovered_channel_starts_a_new_register() {
        let (b, m) = batcher(10);
        let old1 = b.register(1);
        let old2 = b.register(2);
        // lapin recovered the channel: its tags start at 1 again.
        let new1 = b.register(1);
        let new2 = b.register(2);
        // A late ready of the old incarnation goes out alone at once
        // (lapin refuses it on a real channel); it joins nothing.
        let (a, used) = acker(2);
        b.ready(old2, a).await;
        assert!(!used.usable());
        assert_eq!(acked(&m), (1, 1));
        // Settling an old ticket leaves the new entry of that tag alone.
        b.settled(old1).await;
        let (a2, used2) = acker(2);
        b.ready(new2, a2).await;
        assert!(used2.usable(), "new tag 1 is still handled: held");
        let (a1, used1) = acker(1);
        b.ready(new1, a1).await;
        assert_eq!(acked(&m), (3, 2), "both new ones in one frame");
        assert!(!used2.usable() && used1.usable());
    }

    #[tokio::test(start_paused = true)]
    async fn while_draining_a_ready_prefix_goes_at_once() {
        let (b, m) = batcher(10);
        let t1 = b.register(1);
        let _pending = b.register(2);
        let t3 = b.register(3);
        let (a3, used3) = acker(3);
        b.ready(t3, a3).await;
        assert!(used3.usable());
        // The drain took every credit back: whatever is ready goes now.
        b.drain().await;
        assert!(!used3.usable());
        assert_eq!(acked(&m), (1, 1));
        let (a1, used1) = acker(1);
        b.ready(t1, a1).await;
        assert!(!used1.usable(), "a prefix of 1 of 2 goes at once");
        assert_eq!(acked(&m), (2, 2));
    }

    #[tokio::test(start_paused = true)]
    async fn an_ack_the_channel_refuses_is_counted_as_failed_not_acked() {
        let (b, m) = batcher(10);
        let (a, used) = acker(1);
        // Its channel closed since the delivery: lapin answers `false`.
        assert!(used.ack(BasicAckOptions::default()).await.unwrap());
        b.ready(b.register(1), a).await;
        assert_eq!(acked(&m), (0, 0));
        assert_eq!(m.counter(Metrics::ACK_FAILURES, &[STAGE]), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_flusher_ends_with_the_batcher() {
        let (b, _m) = batcher(10);
        let wake = b.wake.clone();
        tokio::task::yield_now().await;
        assert_eq!(Arc::strong_count(&wake), 3, "the batcher, its flusher, us");
        drop(b);
        for _ in 0..100 {
            if Arc::strong_count(&wake) == 1 {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(Arc::strong_count(&wake), 1, "the flusher task ended");
    }
}
