//! `flowgate.Message`: one delivery as a Python handler sees it. Nothing is
//! converted until it is read; the body becomes `bytes` once.

use crate::convert;
use flowgate::Delivery;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBytes, PyDict};

/// One message taken from a stage's queue.
///
/// ``body`` is the payload as ``bytes``; ``text()`` and ``json()`` decode
/// it; ``headers`` and ``properties`` are the AMQP headers and properties as
/// dicts; ``message_id``, ``content_type``, ``correlation_id`` are the
/// properties of those names (``None`` when not set); ``redelivered`` is the
/// broker's flag; ``attempt`` counts handling attempts through the stage's
/// retry ladder (1 first); ``stage``, ``queue``, ``exchange`` and
/// ``routing_key`` say where it came from.
///
/// >>> msg = flowgate.testing.message(b'{"sku": "A1"}', message_id="o-1")
/// >>> msg.json()["sku"], msg.message_id, msg.attempt
/// ('A1', 'o-1', 1)
#[pyclass(module = "flowgate", frozen)]
pub struct Message {
    pub(crate) delivery: Delivery,
    /// `bytes` of the body, made on first read.
    body: PyOnceLock<Py<PyBytes>>,
}

impl Message {
    pub(crate) fn new(delivery: Delivery) -> Self {
        Self {
            delivery,
            body: PyOnceLock::new(),
        }
    }

    fn body_bytes<'py>(&self, py: Python<'py>) -> &Bound<'py, PyBytes> {
        self.body
            .get_or_init(py, || PyBytes::new(py, &self.delivery.body).unbind())
            .bind(py)
    }
}

#[pymethods]
impl Message {
    /// The payload.
    #[getter]
    fn body<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        self.body_bytes(py).clone()
    }

    /// The payload decoded as text (UTF-8 unless told otherwise).
    ///
    /// >>> flowgate.testing.message("héllo").text()
    /// 'héllo'
    #[pyo3(signature = (encoding = "utf-8", errors = "strict"))]
    fn text<'py>(
        &self,
        py: Python<'py>,
        encoding: &str,
        errors: &str,
    ) -> PyResult<Bound<'py, PyAny>> {
        if encoding.eq_ignore_ascii_case("utf-8") && errors == "strict" {
            if let Ok(s) = std::str::from_utf8(&self.delivery.body) {
                return Ok(pyo3::types::PyString::new(py, s).into_any());
            }
            // Not UTF-8: Python's decoder raises the error a user expects.
        }
        self.body_bytes(py)
            .call_method1("decode", (encoding, errors))
    }

    /// The payload parsed as JSON (``json.loads``).
    ///
    /// >>> flowgate.testing.message(b'[1, 2]').json()
    /// [1, 2]
    fn json<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        static LOADS: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
        LOADS
            .import(py, "json", "loads")?
            .call1((self.body_bytes(py),))
    }

    /// The AMQP headers (a new dict on each read).
    #[getter]
    fn headers<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        match self.delivery.properties.headers() {
            Some(t) => convert::table_to_py(py, t),
            None => Ok(PyDict::new(py)),
        }
    }

    /// One header, or ``default``.
    ///
    /// >>> flowgate.testing.message(b"", headers={"tenant": "acme"}).header("tenant")
    /// 'acme'
    #[pyo3(signature = (name, default = None))]
    fn header<'py>(
        &self,
        py: Python<'py>,
        name: &str,
        default: Option<Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        match self.delivery.header(name) {
            Some(v) => convert::value_to_py(py, v),
            None => Ok(default.unwrap_or_else(|| py.None().into_bound(py))),
        }
    }

    /// The AMQP properties that are set (``content_type``, ``message_id``,
    /// ``correlation_id``, ``reply_to``, ``expiration``, ``type``,
    /// ``user_id``, ``app_id``, ``delivery_mode``, ``priority``,
    /// ``timestamp``, ...), headers apart.
    #[getter]
    fn properties<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        convert::properties_to_py(py, &self.delivery.properties)
    }

    /// The ``message_id`` property.
    #[getter]
    fn message_id(&self) -> Option<&str> {
        self.delivery.message_id()
    }

    /// The ``content_type`` property.
    #[getter]
    fn content_type(&self) -> Option<&str> {
        self.delivery
            .properties
            .content_type()
            .as_ref()
            .map(|s| s.as_str())
    }

    /// The ``correlation_id`` property.
    #[getter]
    fn correlation_id(&self) -> Option<&str> {
        self.delivery
            .properties
            .correlation_id()
            .as_ref()
            .map(|s| s.as_str())
    }

    /// True when the broker delivered it before (see dedup).
    #[getter]
    fn redelivered(&self) -> bool {
        self.delivery.redelivered
    }

    /// Which handling attempt this is: 1, then 2, 3, ... through the
    /// stage's retry ladder.
    #[getter]
    fn attempt(&self) -> u32 {
        self.delivery.attempt()
    }

    /// The stage handling it.
    #[getter]
    fn stage(&self) -> &str {
        &self.delivery.stage
    }

    /// The queue it was consumed from.
    #[getter]
    fn queue(&self) -> &str {
        &self.delivery.queue
    }

    /// The exchange it was published to.
    #[getter]
    fn exchange(&self) -> &str {
        &self.delivery.exchange
    }

    /// The routing key it was published with.
    #[getter]
    fn routing_key(&self) -> &str {
        &self.delivery.routing_key
    }

    fn __repr__(&self) -> String {
        format!(
            "Message(stage={:?}, message_id={:?}, attempt={}, {} bytes)",
            self.delivery.stage,
            self.delivery.message_id(),
            self.delivery.attempt(),
            self.delivery.body.len()
        )
    }
}
