//! `flowgate.Output`, and what a Python handler's return value or exception
//! means for the engine ([`Drafted`] → [`Outcome`]).

use crate::{convert, errors};
use flowgate::config::Target;
use flowgate::envelope;
use flowgate::{Delivery, HandlerError, Outcome, OutputDraft};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyTuple};
use std::time::Duration;

/// A message a handler wants published once its input is done: the
/// input is acked only after every output is confirmed by the broker.
///
/// The destination defaults to the stage's configured ``output``; the
/// properties start from the input's (message id, content type, headers,
/// ...), as the built-in ``forward`` and the ``http`` handler do, and
/// ``message_id``, ``content_type`` and ``headers`` replace or add to them.
/// ``body`` is ``bytes`` (or ``str``, sent as UTF-8).
///
/// >>> out = flowgate.Output(b"reserved", routing_key="order.reserved", headers={"sku": "A1"})
/// >>> out.routing_key, out.exchange, out.headers
/// ('order.reserved', None, {'sku': 'A1'})
#[pyclass(module = "flowgate", frozen)]
pub struct Output {
    pub(crate) draft: OutputDraft,
}

#[pymethods]
impl Output {
    #[new]
    #[pyo3(signature = (body, *, exchange = None, routing_key = None, headers = None, message_id = None, content_type = None))]
    fn new(
        body: &Bound<'_, PyAny>,
        exchange: Option<String>,
        routing_key: Option<String>,
        headers: Option<&Bound<'_, PyAny>>,
        message_id: Option<String>,
        content_type: Option<String>,
    ) -> PyResult<Self> {
        Ok(Self {
            draft: OutputDraft {
                exchange,
                routing_key,
                body: convert::body_from_py(body)?,
                message_id,
                content_type,
                headers: convert::headers_from_py(headers)?,
            },
        })
    }

    /// The payload.
    #[getter]
    fn body<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.draft.body)
    }

    /// The exchange, or ``None`` for the stage's ``output``.
    #[getter]
    fn exchange(&self) -> Option<&str> {
        self.draft.exchange.as_deref()
    }

    /// The routing key, or ``None`` for the stage's ``output``.
    #[getter]
    fn routing_key(&self) -> Option<&str> {
        self.draft.routing_key.as_deref()
    }

    /// The message id replacing the input's, if any.
    #[getter]
    fn message_id(&self) -> Option<&str> {
        self.draft.message_id.as_deref()
    }

    /// The content type replacing the input's, if any.
    #[getter]
    fn content_type(&self) -> Option<&str> {
        self.draft.content_type.as_deref()
    }

    /// The headers added to the input's.
    #[getter]
    fn headers<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (k, v) in &self.draft.headers {
            d.set_item(k, convert::value_to_py(py, v)?)?;
        }
        Ok(d)
    }

    fn __repr__(&self) -> String {
        format!(
            "Output({} bytes, exchange={:?}, routing_key={:?})",
            self.draft.body.len(),
            self.draft.exchange,
            self.draft.routing_key
        )
    }
}

/// What a Python handler decided for one message, in Rust terms (read
/// under the GIL, turned into an [`Outcome`] without it).
#[derive(Debug)]
pub(crate) enum Drafted {
    /// Publish these (none: a plain ack).
    Ack(Vec<OutputDraft>),
    /// `flowgate.Retry`.
    Retry {
        reason: String,
        after: Option<Duration>,
    },
    /// `flowgate.DeadLetter`.
    DeadLetter(String),
    /// A return value that is not a result.
    Invalid(String),
    /// Any other exception: `Type: message`, bounded.
    Failed(String),
}

impl Drafted {
    /// A handler's return value: `None`, an `Output`, or a list (or tuple)
    /// of them.
    pub(crate) fn from_return(value: &Bound<'_, PyAny>) -> Drafted {
        if value.is_none() {
            return Drafted::Ack(Vec::new());
        }
        if let Ok(out) = value.cast::<Output>() {
            return Drafted::Ack(vec![out.get().draft.clone()]);
        }
        if value.cast::<PyList>().is_ok() || value.cast::<PyTuple>().is_ok() {
            let mut drafts = Vec::new();
            if let Ok(items) = value.try_iter() {
                for (i, item) in items.enumerate() {
                    match item.as_ref().map(|o| o.cast::<Output>()) {
                        Ok(Ok(out)) => drafts.push(out.get().draft.clone()),
                        _ => {
                            return Drafted::Invalid(format!(
                                "item {i} of the returned list is {}, not an Output",
                                type_name(item.ok().as_ref())
                            ))
                        }
                    }
                }
            }
            return Drafted::Ack(drafts);
        }
        Drafted::Invalid(format!(
            "the handler returned {}, not None, an Output or a list of Outputs",
            type_name(Some(value))
        ))
    }

    /// A handler's exception.
    pub(crate) fn from_exception(py: Python<'_>, e: &Bound<'_, PyAny>) -> Drafted {
        let is = |t: PyResult<&Bound<'_, pyo3::types::PyType>>| {
            t.map(|t| e.is_instance(t).unwrap_or(false))
                .unwrap_or(false)
        };
        if is(errors::retry(py)) {
            let reason = attr_string(e, "reason");
            let after = e
                .getattr("after")
                .ok()
                .filter(|a| !a.is_none())
                .and_then(|a| convert::duration_from_py(&a).ok());
            return Drafted::Retry { reason, after };
        }
        if is(errors::dead_letter(py)) {
            return Drafted::DeadLetter(attr_string(e, "reason"));
        }
        Drafted::Failed(describe(e))
    }

    /// A `PyErr` raised by a handler.
    pub(crate) fn from_err(py: Python<'_>, e: PyErr) -> Drafted {
        Drafted::from_exception(py, e.value(py).as_any())
    }

    /// A batch handler's return value: one result per message (each
    /// `None`, an `Output`, a list of them, or a `Retry`, `DeadLetter` or
    /// other exception instance).
    pub(crate) fn from_batch(py: Python<'_>, value: &Bound<'_, PyAny>, n: usize) -> Vec<Drafted> {
        let is_list = value.cast::<PyList>().is_ok() || value.cast::<PyTuple>().is_ok();
        let items = match value.try_iter() {
            Ok(items) if is_list => items,
            _ => {
                let why = format!(
                    "the batch handler returned {}, not a list with one result per message",
                    type_name(Some(value))
                );
                return (0..n).map(|_| Drafted::Invalid(why.clone())).collect();
            }
        };
        items
            .map(|item| match item {
                Ok(item) if item.is_instance_of::<pyo3::exceptions::PyBaseException>() => {
                    Drafted::from_exception(py, &item)
                }
                Ok(item) => Drafted::from_return(&item),
                Err(e) => Drafted::from_err(py, e),
            })
            .collect()
    }

    /// The engine's outcome for `d`, outputs completed from `d` and the
    /// stage's `output`.
    pub(crate) fn outcome(
        self,
        d: &Delivery,
        target: Option<&Target>,
    ) -> Result<Outcome, HandlerError> {
        Ok(match self {
            Drafted::Ack(drafts) => {
                let mut outputs = Vec::with_capacity(drafts.len());
                for (i, draft) in drafts.into_iter().enumerate() {
                    match draft.build(d, target) {
                        Ok(o) => outputs.push(o),
                        Err(e) => return Ok(Outcome::invalid_output(format!("output {i}: {e}"))),
                    }
                }
                Outcome::ack_with(outputs)
            }
            Drafted::Retry {
                reason,
                after: Some(after),
            } => Outcome::retry_after(reason, after),
            Drafted::Retry {
                reason,
                after: None,
            } => Outcome::retry(reason),
            Drafted::DeadLetter(reason) => Outcome::dead_letter(reason),
            Drafted::Invalid(reason) => Outcome::invalid_output(reason),
            Drafted::Failed(error) => return Err(error.into()),
        })
    }
}

/// `Type: message` of an exception, bounded as the engine bounds errors.
pub(crate) fn describe(e: &Bound<'_, PyAny>) -> String {
    let kind = e
        .get_type()
        .qualname()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "Exception".into());
    let text = e.str().map(|s| s.to_string()).unwrap_or_default();
    let full = match text.is_empty() {
        true => kind,
        false => format!("{kind}: {text}"),
    };
    envelope::truncate(full, envelope::MAX_ERROR_BYTES)
}

fn attr_string(e: &Bound<'_, PyAny>, name: &str) -> String {
    e.getattr(name)
        .and_then(|v| v.str().map(|s| s.to_string()))
        .unwrap_or_default()
}

fn type_name(v: Option<&Bound<'_, PyAny>>) -> String {
    v.and_then(|v| v.get_type().qualname().ok())
        .map(|n| format!("a {n}"))
        .unwrap_or_else(|| "something".into())
}
