//! Built-in handlers, usable from config files without writing Rust.
//!
//! * `forward` — republishes the body and properties to the stage's
//!   `output`, optionally spending `delay` per message and handling at most
//!   `rate` messages per second (to simulate a slow or throttled service).
//! * `sink` — acks and publishes nothing (the end of a pipeline).
//! * `orders.reserve`, `orders.pay`, `orders.ship`, `orders.track` — the
//!   order pipeline's services (see [`crate::orders`]); configured by the
//!   `[orders]` section, sharing one [`OrdersService`](crate::orders::OrdersService)
//!   per engine.
//! * `record` — appends each handled message id to `record_file`, waits
//!   `delay`, then acks (forwarding to `output` if set): makes every handler
//!   effect countable from outside, for demos and exactly-once tests.

mod forward;
mod record;

pub use forward::Forward;
pub use record::Record;

use crate::config::{Config, StageConfig};
use flowgate_actors::Handler;
use std::sync::Arc;

/// Names of the built-in handlers.
pub fn builtin_names() -> Vec<String> {
    let mut names: Vec<String> = vec!["forward".into(), "sink".into(), "record".into()];
    names.extend(crate::orders::HANDLERS.iter().map(|s| (*s).to_owned()));
    names
}

/// Builds the built-in handlers of one engine: the stateless ones per stage,
/// the order services from one shared service made from `[orders]`.
pub struct Builtins<'a> {
    config: &'a Config,
    orders: Option<Arc<crate::orders::OrdersService>>,
}

impl<'a> Builtins<'a> {
    /// For the stages of `config`.
    pub fn new(config: &'a Config) -> Self {
        Self {
            config,
            orders: None,
        }
    }

    /// The built-in handler of a stage; `None` if its name is not built in
    /// (or the `[orders]` section cannot make one).
    pub fn build(&mut self, stage: &StageConfig) -> Option<Arc<dyn Handler>> {
        if crate::orders::HANDLERS.contains(&stage.handler.as_str()) {
            if self.orders.is_none() {
                match crate::orders::OrdersService::new(&self.config.orders) {
                    Ok(s) => self.orders = Some(s),
                    Err(e) => {
                        tracing::error!(error = %e, "cannot build the order services");
                        return None;
                    }
                }
            }
            return self.orders.as_ref()?.handler_for(stage);
        }
        builtin(stage)
    }
}

/// Builds a built-in handler for a stage; `None` if the name is not built in.
pub fn builtin(stage: &StageConfig) -> Option<Arc<dyn Handler>> {
    match stage.handler.as_str() {
        "forward" => Some(Arc::new(Forward::from_stage(stage)?)),
        "record" => Some(Arc::new(Record::from_stage(stage)?)),
        "sink" => Some(Arc::new(flowgate_actors::message::handler_fn(|_d| async {
            Ok(flowgate_actors::Outcome::ack())
        }))),
        _ => None,
    }
}
