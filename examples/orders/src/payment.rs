//! The simulated payment provider: a rate limit (the throttled downstream),
//! a latency per call and a transient failure rate.

use crate::config::OrdersConfig;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use std::num::NonZeroU32;
use std::time::Duration;

/// Why a call failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PaymentError {
    /// The provider answered "try again" (a simulated 503).
    #[error("payment provider temporarily unavailable")]
    Unavailable,
}

/// What a call to the provider found.
#[derive(Debug, PartialEq, Eq)]
pub struct CallReport {
    /// True when the call had to wait for the rate limit.
    pub throttled: bool,
}

/// The simulated provider. One per process (the rate limit is per process).
pub struct PaymentProvider {
    limiter: Option<DefaultDirectRateLimiter>,
    latency: Duration,
    failure_rate: f64,
}

impl PaymentProvider {
    /// From `[orders] payment_rate`, `payment_latency`, `payment_failure_rate`.
    pub fn from_config(cfg: &OrdersConfig) -> Self {
        Self::new(
            cfg.payment_rate,
            cfg.payment_latency,
            cfg.payment_failure_rate,
        )
    }

    /// At most `rate` calls per second (0: unlimited), each taking `latency`
    /// and failing transiently with probability `failure_rate`.
    pub fn new(rate: u32, latency: Duration, failure_rate: f64) -> Self {
        let limiter = NonZeroU32::new(rate).map(|r| {
            // A burst of a tenth of a second keeps the rate smooth.
            let burst = NonZeroU32::new((rate / 10).max(1)).unwrap_or(NonZeroU32::MIN);
            RateLimiter::direct(Quota::per_second(r).allow_burst(burst))
        });
        Self {
            limiter,
            latency,
            failure_rate,
        }
    }

    /// One authorisation call: waits for the rate limit, spends the latency,
    /// and fails transiently at the configured rate. The charge itself is
    /// recorded by the caller in the ledger.
    pub async fn call(&self) -> (CallReport, Result<(), PaymentError>) {
        let mut throttled = false;
        if let Some(l) = &self.limiter {
            if l.check().is_err() {
                throttled = true;
                l.until_ready().await;
            }
        }
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
        let res = if self.failure_rate > 0.0 && fastrand::f64() < self.failure_rate {
            Err(PaymentError::Unavailable)
        } else {
            Ok(())
        };
        (CallReport { throttled }, res)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn failure_rate_bounds() {
        let never = PaymentProvider::new(0, Duration::ZERO, 0.0);
        let always = PaymentProvider::new(0, Duration::ZERO, 1.0);
        for _ in 0..50 {
            assert_eq!(never.call().await.1, Ok(()));
            assert_eq!(always.call().await.1, Err(PaymentError::Unavailable));
        }
    }

    #[tokio::test]
    async fn calls_beyond_the_burst_are_throttled() {
        // rate 10/s: burst of 1, so the second immediate call must wait.
        let p = PaymentProvider::new(10, Duration::ZERO, 0.0);
        assert!(!p.call().await.0.throttled);
        assert!(p.call().await.0.throttled);
    }
}
