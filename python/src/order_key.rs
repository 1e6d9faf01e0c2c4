//! A Python function as an ordered stage's key function
//! (`@app.order_key(name)` over `EngineBuilder::order_key`).
//!
//! The engine calls it on the stage's intake, once per delivery, before
//! the delivery takes a lane: it runs there under the GIL (waiting for it
//! when the event loop holds it), so it must be short and must not block.
//! Its `str` is the key; `None` is no key (the stage's `missing_key`
//! decides); an exception or any other result is no key too, logged.

use crate::message::Message;
use flowgate::Delivery;
use pyo3::prelude::*;

/// The key `func` gives `delivery`, called with a [`Message`] of it.
pub(crate) fn call(func: &Py<PyAny>, delivery: &Delivery) -> Option<String> {
    Python::attach(|py| {
        let msg = Py::new(py, Message::new(delivery.clone()))
            .inspect_err(|e| tracing::warn!(stage = %delivery.stage, "order key: no message: {e}"))
            .ok()?;
        match func.call1(py, (msg,)) {
            Ok(key) if key.is_none(py) => None,
            Ok(key) => key
                .extract::<String>(py)
                .inspect_err(|_| {
                    tracing::warn!(stage = %delivery.stage, "order key function returned neither a str nor None: no key")
                })
                .ok(),
            Err(e) => {
                tracing::warn!(stage = %delivery.stage, "order key function raised {e}: no key");
                None
            }
        }
    })
}
