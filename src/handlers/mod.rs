//! Built-in handlers, usable from config files without writing Rust. Each is
//! a handler factory registered by name exactly as a host registers its own
//! with [`EngineBuilder::handler_factory`](crate::EngineBuilder::handler_factory).
//!
//! * `forward` — republishes the body and properties to the stage's
//!   `output`, optionally spending `delay` per message and handling at most
//!   `rate` messages per second (to simulate a slow or throttled service).
//! * `sink` — acks and publishes nothing (the end of a pipeline).
//! * `record` — appends each handled message id to `record_file`, waits
//!   `delay`, then acks (forwarding to `output` if set): makes every handler
//!   effect countable from outside, for demos and exactly-once tests.
//! * `http` — POSTs each delivery to the service at the stage's `http.url`
//!   (any language); the answer's status decides ack (with outputs from a
//!   JSON answer), slow down, dead-letter or retry (see [`http`]).

mod draft;
mod forward;
pub(crate) mod http;
mod record;

pub use draft::OutputDraft;
pub(crate) use forward::Forward;
pub(crate) use http::Http;
pub(crate) use record::Record;

use crate::config::StageConfig;
use flowgate_actors::Handler;
use std::collections::HashMap;
use std::sync::Arc;

/// What a handler factory may fail with.
pub(crate) type FactoryError = Box<dyn std::error::Error + Send + Sync>;

/// Builds the handler of one stage from the stage's configuration.
pub(crate) type HandlerFactory =
    Arc<dyn Fn(&StageConfig) -> Result<Arc<dyn Handler>, FactoryError> + Send + Sync>;

/// The built-in factories, by handler name.
pub(crate) fn builtins() -> HashMap<String, HandlerFactory> {
    let mut m: HashMap<String, HandlerFactory> = HashMap::new();
    m.insert(
        "forward".into(),
        Arc::new(|s: &StageConfig| {
            let f = Forward::from_stage(s).ok_or("the `forward` handler needs an output")?;
            Ok(Arc::new(f) as Arc<dyn Handler>)
        }),
    );
    m.insert(
        "record".into(),
        Arc::new(|s: &StageConfig| {
            let r = Record::from_stage(s).ok_or("the `record` handler needs a record_file")?;
            Ok(Arc::new(r) as Arc<dyn Handler>)
        }),
    );
    m.insert(
        "http".into(),
        Arc::new(|s: &StageConfig| Ok(Arc::new(Http::from_stage(s)?) as Arc<dyn Handler>)),
    );
    m.insert(
        "sink".into(),
        Arc::new(|_: &StageConfig| {
            Ok(Arc::new(flowgate_actors::handler_fn(|_d| async {
                Ok(flowgate_actors::Outcome::ack())
            })) as Arc<dyn Handler>)
        }),
    );
    m
}
