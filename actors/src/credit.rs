//! Credits: the bounded in-process window that mirrors AMQP prefetch.
//!
//! actix's `Addr::send` queues even when a mailbox is full, so bounds are not
//! taken from mailbox capacity. Instead a [`Credits`] pool holds a fixed
//! number of permits; a unit of work takes one before it enters the process
//! and the permit travels with it, returning to the pool when dropped.

use std::sync::Arc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// A fixed-size pool of credits.
#[derive(Clone, Debug)]
pub(crate) struct Credits {
    sem: Arc<Semaphore>,
    total: usize,
}

/// One credit, returned to its pool on drop.
pub(crate) type Credit = OwnedSemaphorePermit;

impl Credits {
    /// A pool of `total` credits.
    pub(crate) fn new(total: usize) -> Self {
        Self {
            sem: Arc::new(Semaphore::new(total)),
            total,
        }
    }

    /// Waits for a credit. Returns `None` only if the pool was closed.
    pub(crate) async fn acquire(&self) -> Option<Credit> {
        self.sem.clone().acquire_owned().await.ok()
    }

    /// Takes a credit if one is free now.
    pub(crate) fn try_acquire(&self) -> Option<Credit> {
        self.sem.clone().try_acquire_owned().ok()
    }

    /// Credits currently taken (work in flight).
    pub(crate) fn in_use(&self) -> usize {
        self.total.saturating_sub(self.sem.available_permits())
    }

    /// Size of the pool.
    pub(crate) fn total(&self) -> usize {
        self.total
    }

    /// Waits until every credit is back (all in-flight work finished).
    pub(crate) async fn drained(&self) {
        // `total` fits in u32: pools are sized from prefetch (u16) or config
        // values validated to u32 range.
        let n = u32::try_from(self.total).unwrap_or(u32::MAX);
        if let Ok(all) = self.sem.acquire_many(n).await {
            drop(all);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;

    #[tokio::test]
    async fn credits_bound_in_flight_work() {
        let c = Credits::new(2);
        let a = c.acquire().await.unwrap();
        let _b = c.acquire().await.unwrap();
        assert!(c.try_acquire().is_none());
        assert_eq!(c.in_use(), 2);
        drop(a);
        assert_eq!(c.in_use(), 1);
        assert!(c.try_acquire().is_some());
        assert_eq!(c.total(), 2);
    }

    #[tokio::test]
    async fn drained_waits_for_every_credit_to_come_back() {
        let c = Credits::new(3);
        let a = c.acquire().await.unwrap();
        let b = c.try_acquire().unwrap();
        let drained = c.drained();
        tokio::pin!(drained);
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        assert!(drained.as_mut().poll(&mut cx).is_pending(), "2 still out");
        drop(a);
        assert!(drained.as_mut().poll(&mut cx).is_pending(), "1 still out");
        drop(b);
        assert!(drained.as_mut().poll(&mut cx).is_ready());
        assert_eq!(c.in_use(), 0, "and gives them back");
    }
}
