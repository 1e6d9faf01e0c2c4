//! Batching: a stage with a [`BatchPolicy`] hands its deliveries to the
//! handler's [`Handler::handle_batch`] in groups instead of one by one.
//!
//! Each delivery still runs its own [`process`](super::process) task and
//! keeps its own credit: only the handler step is shared. A task that has
//! passed the checks before the handler (screening, the dedup claim) puts
//! its delivery into the stage's [`Batcher`], a bounded channel of
//! `size` places, and waits for its own result. The batcher's collector
//! takes up to `size` of them, or what came within `timeout` of the first,
//! waits for one worker slot, and calls `handle_batch` once; each result
//! goes back to its own task, which judges, publishes, acks, retries or
//! dead-letters that delivery alone.
//!
//! A batch never exceeds the stage's credits: `size` is clamped to the
//! prefetch (the daemon's config refuses a larger one).

use super::process::{panic_message, Handled};
use crate::envelope::MISSING_BATCH_RESULT as MISSING_RESULT;
use crate::message::{Delivery, Handler, Outcome};
use crate::metrics::events::{self, Event};
use crate::metrics::Metrics;
use futures::FutureExt;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, Semaphore};

/// How a stage batches its deliveries for [`Handler::handle_batch`].
///
/// ```
/// use flowgate_actors::BatchPolicy;
/// use std::time::Duration;
///
/// // Up to 100 deliveries per call, or what arrived within 50 ms of the first.
/// let p = BatchPolicy { size: 100, timeout: Duration::from_millis(50) };
/// assert_eq!(p, BatchPolicy::default());
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchPolicy {
    /// Most deliveries in one `handle_batch` call; clamped to `1..=prefetch`
    /// (a batch can never hold more deliveries than the stage has credits).
    pub size: usize,
    /// Longest a delivery waits for its batch to fill, counted from the
    /// batch's first delivery; then the batch is handled as it is.
    pub timeout: Duration,
}

impl Default for BatchPolicy {
    /// `size = 100`, `timeout = 50ms`.
    fn default() -> Self {
        Self {
            size: 100,
            timeout: Duration::from_millis(50),
        }
    }
}

/// A delivery waiting for its batch, and where its result goes.
struct Waiting {
    delivery: Delivery,
    reply: oneshot::Sender<Handled>,
}

/// A stage's way into its batch collector (a cheap handle; the collector
/// ends when the last handle is dropped).
pub(crate) struct Batcher {
    tx: mpsc::Sender<Waiting>,
}

impl Batcher {
    /// Starts the collector of a stage with `prefetch` credits.
    pub(crate) fn start(
        policy: BatchPolicy,
        prefetch: usize,
        handler: Arc<dyn Handler>,
        handler_timeout: Option<Duration>,
        workers: Arc<Semaphore>,
        metrics: Metrics,
        stage: String,
    ) -> Self {
        let size = policy.size.clamp(1, prefetch.max(1));
        // Bounded: at most `size` deliveries wait here (each holds a credit).
        let (tx, rx) = mpsc::channel(size);
        let ctx = Arc::new(BatchContext {
            handler,
            handler_timeout,
            metrics,
            stage,
        });
        tokio::spawn(run(rx, size, policy.timeout, workers, ctx));
        Self { tx }
    }

    /// Runs `d` through the stage's batched handler and returns its own
    /// result; `None` if the collector is gone (the stage is being torn down).
    pub(crate) async fn handle(&self, d: &Delivery) -> Option<Handled> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Waiting {
                delivery: d.clone(),
                reply,
            })
            .await
            .ok()?;
        rx.await.ok()
    }
}

/// What a batch task needs from its stage.
struct BatchContext {
    handler: Arc<dyn Handler>,
    /// Bound on one `handle_batch` call.
    handler_timeout: Option<Duration>,
    metrics: Metrics,
    stage: String,
}

/// Takes the next batch from `rx`: waits for a first item, then takes more
/// until there are `size` or `timeout` has passed since the first. `None`
/// once `rx` is closed and empty.
pub(crate) async fn collect<T>(
    rx: &mut mpsc::Receiver<T>,
    size: usize,
    timeout: Duration,
) -> Option<Vec<T>> {
    let first = rx.recv().await?;
    let mut batch = Vec::with_capacity(size);
    batch.push(first);
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    while batch.len() < size {
        tokio::select! {
            biased;
            item = rx.recv() => match item {
                Some(item) => batch.push(item),
                None => break,
            },
            _ = &mut deadline => break,
        }
    }
    Some(batch)
}

/// The collector: one batch at a time, each handled on its own worker slot.
async fn run(
    mut rx: mpsc::Receiver<Waiting>,
    size: usize,
    timeout: Duration,
    workers: Arc<Semaphore>,
    ctx: Arc<BatchContext>,
) {
    while let Some(batch) = collect(&mut rx, size, timeout).await {
        // A closed semaphore only happens at teardown; run anyway then.
        let worker = workers.clone().acquire_owned().await.ok();
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let _worker = worker;
            handle_batch(&ctx, batch).await;
        });
    }
}

/// Calls the handler once and sends each delivery its own result.
async fn handle_batch(ctx: &BatchContext, batch: Vec<Waiting>) {
    let (deliveries, replies): (Vec<_>, Vec<_>) =
        batch.into_iter().map(|w| (w.delivery, w.reply)).unzip();
    let sent = deliveries.len();
    let started = Instant::now();
    let call = AssertUnwindSafe(ctx.handler.handle_batch(deliveries)).catch_unwind();
    let res = match super::process::bounded(ctx.handler_timeout, call).await {
        Ok(res) => res,
        Err(timed_out) => {
            for reply in replies {
                let _ = reply.send(Ok(Err(timed_out.to_string().into())));
            }
            return;
        }
    };
    events::Handled {
        stage: &ctx.stage,
        elapsed: started.elapsed(),
    }
    .emit(&ctx.metrics);
    // A task that is gone (its stage torn down) needs no answer.
    match res {
        Err(p) => {
            let panic = panic_message(p.as_ref());
            for reply in replies {
                let _ = reply.send(Err(panic.clone()));
            }
        }
        Ok(results) => {
            for (reply, handled) in
                replies
                    .into_iter()
                    .zip(matched(&ctx.metrics, &ctx.stage, sent, results))
            {
                let _ = reply.send(handled);
            }
        }
    }
}

/// Exactly `sent` results from what the handler returned: in order; a
/// delivery without a result is retried; extra results are dropped.
fn matched(
    metrics: &Metrics,
    stage: &str,
    sent: usize,
    results: Vec<Result<Outcome, crate::message::HandlerError>>,
) -> Vec<Handled> {
    let returned = results.len();
    if returned != sent {
        events::BatchMismatched {
            stage,
            sent,
            returned,
        }
        .emit(metrics);
    }
    let mut results = results.into_iter();
    (0..sent)
        .map(|i| match results.next() {
            Some(r) => Ok(r),
            None => Ok(Ok(Outcome::retry(format!(
                "{MISSING_RESULT}: batch of {sent} got {returned} results, none for delivery {i}"
            )))),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_full_batch_is_taken_at_once_and_never_more_than_size() {
        let (tx, mut rx) = mpsc::channel(10);
        for i in 0..7 {
            tx.send(i).await.unwrap();
        }
        let t0 = tokio::time::Instant::now();
        let b = collect(&mut rx, 3, Duration::from_secs(60)).await.unwrap();
        assert_eq!(b, [0, 1, 2]);
        assert_eq!(t0.elapsed(), Duration::ZERO, "a full batch waited");
        assert_eq!(
            collect(&mut rx, 3, Duration::from_secs(60)).await.unwrap(),
            [3, 4, 5]
        );
    }

    /// `collect`, failing (not hanging) if it never returns a batch.
    async fn flushed(rx: &mut mpsc::Receiver<i32>, size: usize, ms: u64) -> Option<Vec<i32>> {
        tokio::time::timeout(
            Duration::from_secs(3600),
            collect(rx, size, Duration::from_millis(ms)),
        )
        .await
        .expect("the partial batch was never flushed")
    }

    #[tokio::test(start_paused = true)]
    async fn a_partial_batch_is_flushed_after_the_timeout_from_its_first_item() {
        let (tx, mut rx) = mpsc::channel(10);
        tx.send(1).await.unwrap();
        tx.send(2).await.unwrap();
        let t0 = tokio::time::Instant::now();
        let b = flushed(&mut rx, 5, 20).await.unwrap();
        assert_eq!(b, [1, 2]);
        assert_eq!(t0.elapsed(), Duration::from_millis(20));
        // The clock starts at the first item, not at the call.
        let late = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            tx.send(3).await.unwrap();
            tokio::time::sleep(Duration::from_millis(15)).await;
            tx.send(4).await.unwrap();
            tx
        });
        let t0 = tokio::time::Instant::now();
        let b = flushed(&mut rx, 5, 20).await.unwrap();
        assert_eq!(b, [3, 4]);
        assert_eq!(t0.elapsed(), Duration::from_millis(120));
        drop(late.await.unwrap());
        assert_eq!(flushed(&mut rx, 5, 20).await, None);
    }

    #[test]
    fn a_short_result_vector_retries_the_unmatched_and_a_long_one_is_cut() {
        let short = matched(&Metrics::new(), "s", 3, vec![Ok(Outcome::ack())]);
        assert_eq!(short.len(), 3);
        assert!(matches!(short[0], Ok(Ok(Outcome::Ack { .. }))));
        for h in &short[1..] {
            assert!(
                matches!(h, Ok(Ok(Outcome::Retry { reason })) if reason.starts_with(MISSING_RESULT)),
                "{h:?}"
            );
        }
        let long = matched(
            &Metrics::new(),
            "s",
            1,
            vec![Ok(Outcome::dead_letter("x")), Ok(Outcome::ack())],
        );
        assert_eq!(long.len(), 1);
        assert!(matches!(long[0], Ok(Ok(Outcome::DeadLetter { .. }))));
    }
}
