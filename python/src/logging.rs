//! The process's log: the engine's (`[log]`: text or JSON lines on stderr,
//! with the `[telemetry]` export), and Python `logging` records written
//! into it by `flowgate.LogHandler`, carrying the stage and message id of
//! the handler that logged them.

use flowgate::{Config, Telemetry};
use pyo3::prelude::*;
use std::sync::Mutex;

/// The export of the first app that set the log up (one per process, as
/// the global subscriber is).
static TELEMETRY: Mutex<Option<Telemetry>> = Mutex::new(None);
static INIT: std::sync::Once = std::sync::Once::new();

/// Installs the log from the first app's config; later apps share it.
pub(crate) fn init(cfg: &Config) {
    INIT.call_once(|| match flowgate::log::init(cfg) {
        Ok(t) => *TELEMETRY.lock().unwrap_or_else(|p| p.into_inner()) = Some(t),
        // Another subscriber is installed (the host's own): keep it.
        Err(e) => eprintln!("flowgate: the engine's log is not installed: {e}"),
    });
}

/// Exports the spans still buffered (at the end of ``App.run``).
#[pyfunction]
pub(crate) fn flush_telemetry(py: Python<'_>) {
    let t = TELEMETRY.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some(t) = t {
        py.detach(move || t.shutdown());
    }
}

/// Writes one Python log record into the engine's log (level as in
/// ``logging``: 10 debug, 20 info, 30 warning, 40 error).
#[pyfunction]
#[pyo3(signature = (level, logger, message, stage = None, message_id = None))]
pub(crate) fn log(
    level: u32,
    logger: &str,
    message: &str,
    stage: Option<&str>,
    message_id: Option<&str>,
) {
    let message_id = message_id.map(flowgate::trace::loggable_id);
    macro_rules! emit {
        ($lvl:expr) => {
            tracing::event!(target: "python", $lvl, logger, stage, message_id = message_id.as_deref(), "{message}")
        };
    }
    match level {
        40.. => emit!(tracing::Level::ERROR),
        30..=39 => emit!(tracing::Level::WARN),
        20..=29 => emit!(tracing::Level::INFO),
        10..=19 => emit!(tracing::Level::DEBUG),
        _ => emit!(tracing::Level::TRACE),
    }
}
