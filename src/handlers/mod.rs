//! Built-in handlers, usable from config files without writing Rust.
//!
//! * `forward` — republishes the body and properties to the stage's
//!   `output`, optionally spending `delay` per message and handling at most
//!   `rate` messages per second (to simulate a slow or throttled service).
//! * `sink` — acks and publishes nothing (the end of a pipeline).
//! * `record` — appends each handled message id to `record_file`, waits
//!   `delay`, then acks (forwarding to `output` if set): makes every handler
//!   effect countable from outside, for demos and exactly-once tests.

mod forward;
mod record;

pub use forward::Forward;
pub use record::Record;

use crate::config::StageConfig;
use flowgate_actors::Handler;
use std::sync::Arc;

/// Names of the built-in handlers.
pub fn builtin_names() -> Vec<String> {
    vec!["forward".into(), "sink".into(), "record".into()]
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
