//! The `forward` handler.

use crate::config::{StageConfig, Target};
use flowgate_actors::{Delivery, Handler, HandlerError, Outcome};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use std::num::NonZeroU32;
use std::time::Duration;

/// Republishes each delivery to a fixed target.
pub(crate) struct Forward {
    target: Target,
    /// Simulated work per message.
    delay: Option<Duration>,
    /// A throttled downstream: at most this many messages per second.
    limiter: Option<DefaultDirectRateLimiter>,
}

impl Forward {
    /// A forwarder to `target`.
    pub(crate) fn new(target: Target, delay: Option<Duration>, rate: Option<u32>) -> Self {
        let limiter = rate
            .and_then(NonZeroU32::new)
            .map(|r| RateLimiter::direct(Quota::per_second(r).allow_burst(NonZeroU32::MIN)));
        Self {
            target,
            delay,
            limiter,
        }
    }

    /// From a stage's config (`output`, `delay`, `rate`); `None` without an output.
    pub(crate) fn from_stage(s: &StageConfig) -> Option<Self> {
        Some(Self::new(s.output.clone()?, s.delay, s.rate))
    }
}

#[async_trait::async_trait]
impl Handler for Forward {
    async fn handle(&self, d: &Delivery) -> Result<Outcome, HandlerError> {
        if let Some(l) = &self.limiter {
            l.until_ready().await;
        }
        if let Some(delay) = self.delay {
            tokio::time::sleep(delay).await;
        }
        Ok(Outcome::ack_with(vec![
            d.forward(&self.target.exchange, &self.target.routing_key)
        ]))
    }
}
