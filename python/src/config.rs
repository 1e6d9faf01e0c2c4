//! `Config`: the engine's configuration, loaded as the daemon loads it.

use crate::errors;
use flowgate::Config;
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};
use std::path::PathBuf;

/// A validated engine configuration (``flowgate.App`` holds one).
#[pyclass(module = "flowgate._flowgate", name = "Config", frozen)]
pub struct PyConfig {
    pub(crate) inner: Config,
}

impl PyConfig {
    fn loaded(py: Python<'_>, r: Result<Config, flowgate::ConfigError>) -> PyResult<Self> {
        r.map(|inner| Self { inner })
            .map_err(|e| errors::config(py, &e))
    }
}

#[pymethods]
impl PyConfig {
    /// A TOML file plus ``FLOWGATE__…`` environment overrides.
    #[staticmethod]
    fn load(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let r = py.detach(|| Config::load(&path));
        Self::loaded(py, r)
    }

    /// :meth:`load` for a host with a section of its own in the same file:
    /// ``(config, section)``, ``section`` being ``[name]`` (with its
    /// ``FLOWGATE__NAME__…`` overrides) as a dict (empty without one).
    #[staticmethod]
    fn load_with_section<'py>(
        py: Python<'py>,
        path: PathBuf,
        name: &str,
    ) -> PyResult<(Self, Bound<'py, PyAny>)> {
        let r = py.detach(|| Config::load_with_section::<serde_json::Value>(&path, name));
        with_section(py, r)
    }

    /// :meth:`from_toml` with a host section, as :meth:`load_with_section`.
    #[staticmethod]
    fn from_toml_with_section<'py>(
        py: Python<'py>,
        text: &str,
        name: &str,
    ) -> PyResult<(Self, Bound<'py, PyAny>)> {
        with_section(
            py,
            Config::from_toml_with_section::<serde_json::Value>(text, name),
        )
    }

    /// TOML text plus environment overrides.
    #[staticmethod]
    fn from_toml(py: Python<'_>, text: &str) -> PyResult<Self> {
        Self::loaded(py, Config::from_toml(text))
    }

    /// A dict shaped like the TOML file, plus environment overrides.
    #[staticmethod]
    fn from_dict(py: Python<'_>, d: &Bound<'_, PyDict>) -> PyResult<Self> {
        let table = match toml_value(d.as_any(), "")? {
            toml::Value::Table(t) => t,
            _ => return Err(PyTypeError::new_err("a config is a dict")),
        };
        let text = toml::to_string(&table)
            .map_err(|e| PyTypeError::new_err(format!("not expressible as TOML: {e}")))?;
        Self::loaded(py, Config::from_toml(&text))
    }

    /// This configuration with every exchange and queue renamed
    /// ``<prefix>.<name>`` (the engine's ``Config::uniquely_named``).
    fn uniquely_named(&self, prefix: &str) -> Self {
        Self {
            inner: self.inner.uniquely_named(prefix),
        }
    }

    /// The same configuration on another broker.
    fn with_url(&self, url: &str) -> Self {
        let mut inner = self.inner.clone();
        inner.amqp.url = url.to_owned();
        inner.amqp.urls.clear();
        inner.amqp.url_file = None;
        Self { inner }
    }

    /// The declared queues' names, in order.
    #[getter]
    fn queues(&self) -> Vec<String> {
        self.inner.queues.iter().map(|q| q.name.clone()).collect()
    }

    /// The declared exchanges' names, in order.
    #[getter]
    fn exchanges(&self) -> Vec<String> {
        self.inner
            .exchanges
            .iter()
            .map(|e| e.name.clone())
            .collect()
    }

    /// ``(name, queue, handler)`` of every stage, in order.
    #[getter]
    fn stages(&self) -> Vec<(String, String, String)> {
        self.inner
            .stages
            .iter()
            .map(|s| (s.name.clone(), s.queue.clone(), s.handler.clone()))
            .collect()
    }

    /// The dead-letter queue of the declared queue ``queue``, if it has one.
    fn dead_letter_queue(&self, queue: &str) -> Option<String> {
        self.inner.queue(queue)?.dead_letter_queue()
    }

    /// ``(exchange, routing_key)`` of the first binding of ``queue``, or the
    /// queue through the default exchange.
    fn input_of(&self, queue: &str) -> (String, String) {
        match self.inner.queue(queue).and_then(|q| q.bindings.first()) {
            Some(b) => (b.exchange.clone(), b.routing_key.clone()),
            None => (String::new(), queue.to_owned()),
        }
    }
}

/// The config and the host's section (JSON made Python; `{}` for none).
fn with_section<'py>(
    py: Python<'py>,
    r: Result<(Config, serde_json::Value), flowgate::ConfigError>,
) -> PyResult<(PyConfig, Bound<'py, PyAny>)> {
    let (inner, section) = r.map_err(|e| errors::config(py, &e))?;
    let section = match section {
        serde_json::Value::Null => serde_json::Value::Object(Default::default()),
        v => v,
    };
    let loads = py.import("json")?.getattr("loads")?;
    Ok((PyConfig { inner }, loads.call1((section.to_string(),))?))
}

/// A Python value as a TOML value (`key` names it in errors).
fn toml_value(v: &Bound<'_, PyAny>, key: &str) -> PyResult<toml::Value> {
    if let Ok(s) = v.cast::<PyString>() {
        return Ok(toml::Value::String(s.to_cow()?.into_owned()));
    }
    if let Ok(b) = v.cast::<PyBool>() {
        return Ok(toml::Value::Boolean(b.is_true()));
    }
    if v.cast::<PyInt>().is_ok() {
        return Ok(toml::Value::Integer(v.extract()?));
    }
    if let Ok(f) = v.cast::<PyFloat>() {
        return Ok(toml::Value::Float(f.value()));
    }
    if let Ok(d) = v.cast::<PyDict>() {
        let mut t = toml::Table::new();
        for (k, item) in d.iter() {
            let k: String = k
                .extract()
                .map_err(|_| PyTypeError::new_err(format!("config keys are str (in `{key}`)")))?;
            let path = match key.is_empty() {
                true => k.clone(),
                false => format!("{key}.{k}"),
            };
            if item.is_none() {
                // TOML has no null: a key set to None is left out (its default).
                continue;
            }
            t.insert(k, toml_value(&item, &path)?);
        }
        return Ok(toml::Value::Table(t));
    }
    if v.cast::<PyList>().is_ok() || v.cast::<PyTuple>().is_ok() {
        let items = v
            .try_iter()?
            .enumerate()
            .map(|(i, item)| toml_value(&item?, &format!("{key}[{i}]")))
            .collect::<PyResult<Vec<_>>>()?;
        return Ok(toml::Value::Array(items));
    }
    Err(PyTypeError::new_err(format!(
        "config key `{key}`: a value is str, int, float, bool, dict or list, not {}",
        v.get_type().name()?
    )))
}
