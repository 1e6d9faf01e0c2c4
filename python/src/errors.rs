//! The exception classes, defined once in Python (`flowgate/errors.py`,
//! where users read them) and looked up here when the binding raises or
//! recognises one.

use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyType;

/// The module defining them.
const MODULE: &str = "flowgate.errors";

macro_rules! exception {
    ($fn:ident, $name:literal) => {
        #[doc = concat!("`flowgate.", $name, "`.")]
        pub(crate) fn $fn(py: Python<'_>) -> PyResult<&Bound<'_, PyType>> {
            static CELL: PyOnceLock<Py<PyType>> = PyOnceLock::new();
            CELL.import(py, MODULE, $name)
        }
    };
}

exception!(base, "FlowgateError");
exception!(retry, "Retry");
exception!(dead_letter, "DeadLetter");
exception!(config_error, "ConfigError");
exception!(publish_error, "PublishError");
exception!(backpressure, "Backpressure");

/// A `flowgate.ConfigError` for the engine's own.
pub(crate) fn config(py: Python<'_>, e: &flowgate::ConfigError) -> PyErr {
    match config_error(py).and_then(|t| t.call1((e.to_string(), e.key.clone(), e.reason.clone()))) {
        Ok(err) => PyErr::from_value(err),
        Err(lookup) => lookup,
    }
}

/// `flowgate.PublishError` (or `Backpressure`) for a refused publish, as
/// the engine's ingress answers it.
pub(crate) fn publish(py: Python<'_>, e: &flowgate::ingress::IngressError) -> PyErr {
    let status = e.status().as_u16();
    let made = match (status, e.retry_after_secs()) {
        (503, Some(after)) => backpressure(py)
            .and_then(|t| t.call1((e.to_string(), after, e.queue().map(str::to_owned)))),
        _ => publish_error(py).and_then(|t| t.call1((e.to_string(), status))),
    };
    match made {
        Ok(err) => PyErr::from_value(err),
        Err(lookup) => lookup,
    }
}

/// A `flowgate.FlowgateError` saying `text` (the engine failed to start, ...).
pub(crate) fn flowgate_error(py: Python<'_>, text: String) -> PyErr {
    match base(py).and_then(|t| t.call1((text,))) {
        Ok(err) => PyErr::from_value(err),
        Err(lookup) => lookup,
    }
}
