//! `flowgate._flowgate`: the binding under the `flowgate` Python package.
//! A thin layer over flowgate's public API; the package's Python half
//! (`flowgate/`) is the API users read.
//!
//! * `runtime` — [`Runtime`](runtime::Runtime): an engine built from a
//!   config and Python handlers, on its own thread, its calls completing
//!   `asyncio` futures.
//! * `bridge` — the one way from the engine's threads into the event loop:
//!   a queue and a wakeup socket, drained in one loop callback.
//! * `handler` — a Python function as a stage's `Handler` (`async def` on
//!   the loop, `def` on a blocking thread).
//! * `transaction` — a Python function as a transactional handler
//!   (`def f(message, tx)`, the engine's PostgreSQL inbox), and `Transaction`.
//! * `order_key` — a Python function as an ordered stage's key function.
//! * `message`, `output` — `Message` (read lazily) and `Output`; what a
//!   handler's return value or exception means for the engine.
//! * `config` — the engine's `Config`, loaded from a file, TOML or a dict.
//! * `convert` — AMQP values and properties to Python and back.
//! * `errors` — the exception classes (defined in `flowgate/errors.py`).
//! * `logging` — the engine's log, and Python records written into it.
//! * `testing` — synthetic messages, the engine's judgement of a result,
//!   and the Rust test kit (unique names, cleanup, raw client, accounting).

#![warn(unreachable_pub)]

mod bridge;
mod config;
mod convert;
mod errors;
mod handler;
mod logging;
mod message;
mod order_key;
mod output;
mod runtime;
mod testing;
mod transaction;

use flowgate::envelope::{self, Reason};
use pyo3::prelude::*;
use pyo3::types::PyDict;

#[pymodule]
fn _flowgate(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add_class::<config::PyConfig>()?;
    m.add_class::<runtime::Runtime>()?;
    m.add_class::<bridge::Drain>()?;
    m.add_class::<message::Message>()?;
    m.add_class::<output::Output>()?;
    m.add_class::<transaction::Transaction>()?;
    m.add_class::<testing::Judged>()?;
    m.add_class::<testing::Published>()?;
    m.add_class::<testing::Accounting>()?;
    m.add_class::<testing::Cleanup>()?;
    m.add_class::<testing::Kit>()?;
    m.add_class::<testing::Node>()?;
    m.add_function(wrap_pyfunction!(logging::log, m)?)?;
    m.add_function(wrap_pyfunction!(logging::flush_telemetry, m)?)?;
    m.add_function(wrap_pyfunction!(testing::unique, m)?)?;
    m.add_function(wrap_pyfunction!(testing::message, m)?)?;
    m.add_function(wrap_pyfunction!(testing::judge, m)?)?;
    m.add_function(wrap_pyfunction!(testing::judge_batch, m)?)?;
    m.add_function(wrap_pyfunction!(testing::drive, m)?)?;

    // The engine's names, written once in the engine: header names,
    // dead-letter reasons, exit statuses.
    let headers = PyDict::new(py);
    for (name, value) in [
        ("ATTEMPT", envelope::ATTEMPT),
        ("ATTEMPTS", envelope::ATTEMPTS),
        ("REASON", envelope::REASON),
        ("STAGE", envelope::STAGE),
        ("ERROR", envelope::ERROR),
        ("QUEUE", envelope::QUEUE),
        ("LAST_ERROR", envelope::LAST_ERROR),
        ("ORIGINAL_EXCHANGE", envelope::ORIGINAL_EXCHANGE),
        ("ORIGINAL_ROUTING_KEY", envelope::ORIGINAL_ROUTING_KEY),
        ("FIRST_PUBLISHED", envelope::FIRST_PUBLISHED),
        ("SIGNATURE", envelope::SIGNATURE),
    ] {
        headers.set_item(name, value)?;
    }
    m.add("HEADERS", headers)?;
    let reasons = PyDict::new(py);
    for r in Reason::ALL {
        reasons.set_item(r.as_str().replace('-', "_").to_uppercase(), r.as_str())?;
    }
    m.add("REASONS", reasons)?;
    let exits = PyDict::new(py);
    for (name, e) in [
        ("OK", flowgate::exit::Exit::Ok),
        ("FAILURE", flowgate::exit::Exit::Failure),
        ("USAGE", flowgate::exit::Exit::Usage),
    ] {
        exits.set_item(name, e.code())?;
    }
    m.add("EXIT", exits)?;
    m.add("MAX_ERROR_BYTES", envelope::MAX_ERROR_BYTES)?;
    m.add("MISSING_BATCH_RESULT", envelope::MISSING_BATCH_RESULT)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
