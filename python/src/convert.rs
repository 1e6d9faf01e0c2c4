//! AMQP values and properties to Python and back, bodies, durations.

use bytes::Bytes;
use flowgate::envelope;
use flowgate::lapin::types::{
    AMQPValue, ByteArray, FieldArray, FieldTable, LongString, ShortString,
};
use flowgate::lapin::BasicProperties;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{
    PyBool, PyByteArray, PyBytes, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple,
};
use std::time::Duration;

/// A header value as Python sees it: text as `str` (bytes that are not
/// UTF-8 as `bytes`), numbers, booleans, tables as `dict`, arrays as
/// `list`, void as `None`.
pub(crate) fn value_to_py<'py>(py: Python<'py>, v: &AMQPValue) -> PyResult<Bound<'py, PyAny>> {
    Ok(match v {
        AMQPValue::Boolean(b) => PyBool::new(py, *b).to_owned().into_any(),
        AMQPValue::ShortShortInt(i) => i.into_pyobject(py)?.into_any(),
        AMQPValue::ShortShortUInt(i) => i.into_pyobject(py)?.into_any(),
        AMQPValue::ShortInt(i) => i.into_pyobject(py)?.into_any(),
        AMQPValue::ShortUInt(i) => i.into_pyobject(py)?.into_any(),
        AMQPValue::LongInt(i) => i.into_pyobject(py)?.into_any(),
        AMQPValue::LongUInt(i) => i.into_pyobject(py)?.into_any(),
        AMQPValue::LongLongInt(i) => i.into_pyobject(py)?.into_any(),
        AMQPValue::Timestamp(t) => t.into_pyobject(py)?.into_any(),
        AMQPValue::Float(f) => PyFloat::new(py, f64::from(*f)).into_any(),
        AMQPValue::Double(f) => PyFloat::new(py, *f).into_any(),
        AMQPValue::DecimalValue(d) => {
            let value = f64::from(d.value) / 10f64.powi(i32::from(d.scale));
            PyFloat::new(py, value).into_any()
        }
        AMQPValue::ShortString(s) => PyString::new(py, s.as_str()).into_any(),
        AMQPValue::LongString(s) => match std::str::from_utf8(s.as_bytes()) {
            Ok(text) => PyString::new(py, text).into_any(),
            Err(_) => PyBytes::new(py, s.as_bytes()).into_any(),
        },
        AMQPValue::ByteArray(b) => PyBytes::new(py, b.as_slice()).into_any(),
        AMQPValue::FieldArray(a) => {
            let items = a
                .as_slice()
                .iter()
                .map(|v| value_to_py(py, v))
                .collect::<PyResult<Vec<_>>>()?;
            PyList::new(py, items)?.into_any()
        }
        AMQPValue::FieldTable(t) => table_to_py(py, t)?.into_any(),
        AMQPValue::Void => py.None().into_bound(py),
    })
}

/// A field table as a `dict`.
pub(crate) fn table_to_py<'py>(py: Python<'py>, t: &FieldTable) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    for (k, v) in t.inner() {
        d.set_item(k.as_str(), value_to_py(py, v)?)?;
    }
    Ok(d)
}

/// A Python value as a header value: `str`, `bool`, `int` (64-bit),
/// `float`, `bytes`, `None`, `dict` (str keys) and `list`/`tuple` of these.
pub(crate) fn value_from_py(v: &Bound<'_, PyAny>) -> PyResult<AMQPValue> {
    if v.is_none() {
        return Ok(AMQPValue::Void);
    }
    if let Ok(s) = v.cast::<PyString>() {
        return Ok(AMQPValue::LongString(LongString::from(
            s.to_cow()?.into_owned(),
        )));
    }
    // Before int: a bool is an int in Python.
    if let Ok(b) = v.cast::<PyBool>() {
        return Ok(AMQPValue::Boolean(b.is_true()));
    }
    if v.cast::<PyInt>().is_ok() {
        let i: i64 = v
            .extract()
            .map_err(|_| PyValueError::new_err("an integer header must fit in 64 bits"))?;
        return Ok(AMQPValue::LongLongInt(i));
    }
    if let Ok(f) = v.cast::<PyFloat>() {
        return Ok(AMQPValue::Double(f.value()));
    }
    if let Ok(b) = v.cast::<PyBytes>() {
        return Ok(AMQPValue::ByteArray(ByteArray::from(b.as_bytes().to_vec())));
    }
    if let Ok(d) = v.cast::<PyDict>() {
        return Ok(AMQPValue::FieldTable(table_from_py(d)?));
    }
    if v.cast::<PyList>().is_ok() || v.cast::<PyTuple>().is_ok() {
        let items = v
            .try_iter()?
            .map(|item| value_from_py(&item?))
            .collect::<PyResult<Vec<_>>>()?;
        return Ok(AMQPValue::FieldArray(FieldArray::from(items)));
    }
    Err(PyTypeError::new_err(format!(
        "a header value is str, bytes, int, float, bool, None, dict or list, not {}",
        v.get_type().name()?
    )))
}

/// A `dict` of headers as a field table; keys must be short strings.
pub(crate) fn table_from_py(d: &Bound<'_, PyDict>) -> PyResult<FieldTable> {
    let mut t = FieldTable::default();
    for (k, v) in d.iter() {
        let key: String = k
            .extract()
            .map_err(|_| PyTypeError::new_err("header names are str"))?;
        let key = short(&key, "header name")?;
        t.insert(key, value_from_py(&v)?);
    }
    Ok(t)
}

/// A mapping of headers as `(name, value)` pairs, in order.
pub(crate) fn headers_from_py(
    headers: Option<&Bound<'_, PyAny>>,
) -> PyResult<Vec<(String, AMQPValue)>> {
    let Some(h) = headers.filter(|h| !h.is_none()) else {
        return Ok(Vec::new());
    };
    let items = h.call_method0("items")?;
    let mut out = Vec::new();
    for pair in items.try_iter()? {
        let (k, v): (Bound<'_, PyAny>, Bound<'_, PyAny>) = pair?.extract()?;
        let key: String = k
            .extract()
            .map_err(|_| PyTypeError::new_err("header names are str"))?;
        envelope::check_short("header name", &key)
            .map_err(|e| PyValueError::new_err(e.to_string()))?;
        out.push((key, value_from_py(&v)?));
    }
    Ok(out)
}

/// A short string (at most 255 bytes), or a `ValueError` naming `what`.
pub(crate) fn short(value: &str, what: &'static str) -> PyResult<ShortString> {
    envelope::short_string(what, value).map_err(|e| PyValueError::new_err(e.to_string()))
}

/// A body: `bytes` (copied once), `str` (UTF-8), `bytearray`, or anything
/// `bytes()` accepts (a `memoryview`, ...).
pub(crate) fn body_from_py(body: &Bound<'_, PyAny>) -> PyResult<Bytes> {
    if let Ok(b) = body.cast::<PyBytes>() {
        return Ok(Bytes::copy_from_slice(b.as_bytes()));
    }
    if let Ok(s) = body.cast::<PyString>() {
        return Ok(Bytes::copy_from_slice(s.to_cow()?.as_bytes()));
    }
    if let Ok(b) = body.cast::<PyByteArray>() {
        return Ok(Bytes::from(b.to_vec()));
    }
    // Anything with the buffer protocol (a memoryview, an array): not an
    // int or an iterable, which `bytes()` would also take.
    let py = body.py();
    let view = py.get_type::<pyo3::types::PyMemoryView>().call1((body,));
    let bytes = view
        .and_then(|v| py.get_type::<PyBytes>().call1((v,)))
        .map_err(|_| {
            PyTypeError::new_err(format!(
                "a body is bytes, str, bytearray or a buffer, not {}",
                body.get_type()
                    .name()
                    .map(|n| n.to_string())
                    .unwrap_or_default()
            ))
        })?;
    let bytes = bytes.cast::<PyBytes>()?;
    Ok(Bytes::copy_from_slice(bytes.as_bytes()))
}

/// Seconds (`int`/`float`) or a `datetime.timedelta` as a duration;
/// negative is refused.
pub(crate) fn duration_from_py(v: &Bound<'_, PyAny>) -> PyResult<Duration> {
    let secs: f64 = if v.hasattr("total_seconds")? {
        v.call_method0("total_seconds")?.extract()?
    } else {
        v.extract()?
    };
    Duration::try_from_secs_f64(secs)
        .map_err(|_| PyValueError::new_err(format!("not a duration in seconds: {secs}")))
}

/// The properties a handler may read, as a `dict` of those set (headers
/// apart: see `Message.headers`).
pub(crate) fn properties_to_py<'py>(
    py: Python<'py>,
    p: &BasicProperties,
) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    let strings = [
        ("content_type", p.content_type()),
        ("content_encoding", p.content_encoding()),
        ("correlation_id", p.correlation_id()),
        ("reply_to", p.reply_to()),
        ("expiration", p.expiration()),
        ("message_id", p.message_id()),
        ("type", p.kind()),
        ("user_id", p.user_id()),
        ("app_id", p.app_id()),
        ("cluster_id", p.cluster_id()),
    ];
    for (name, value) in strings {
        if let Some(v) = value {
            d.set_item(name, v.as_str())?;
        }
    }
    if let Some(m) = p.delivery_mode() {
        d.set_item("delivery_mode", m)?;
    }
    if let Some(m) = p.priority() {
        d.set_item("priority", m)?;
    }
    if let Some(t) = p.timestamp() {
        d.set_item("timestamp", t)?;
    }
    Ok(d)
}
