//! `flowgate.testing`'s Rust half: synthetic messages and the engine's
//! judgement of a handler's result (no broker), and the Rust test kit's
//! unique names, cleanup guard, raw client and exactly-once accounting
//! (a real broker).

use crate::config::PyConfig;
use crate::convert;
use crate::message::Message;
use crate::output::Drafted;
use crate::runtime::Runtime;
use flowgate::config::Target;
use flowgate::envelope;
use flowgate::lapin::BasicProperties;
use flowgate::{Config, Delivery, Outcome};
use flowgate_testkit::{Accounting as KitAccounting, Client, DeliveryBuilder};
use pyo3::exceptions::{PyAssertionError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A unique topology prefix (``t-<prefix>-<random>``).
#[pyfunction]
pub(crate) fn unique(prefix: &str) -> String {
    flowgate_testkit::unique(prefix)
}

/// A message as a stage would hand it to its handler, without a broker.
#[pyfunction]
#[pyo3(signature = (body, *, message_id = None, headers = None, content_type = None, correlation_id = None, exchange = "", routing_key = "", queue = "", stage = "", redelivered = false, attempt = 1))]
#[allow(clippy::too_many_arguments)]
pub(crate) fn message(
    body: &Bound<'_, PyAny>,
    message_id: Option<&str>,
    headers: Option<&Bound<'_, PyAny>>,
    content_type: Option<&str>,
    correlation_id: Option<&str>,
    exchange: &str,
    routing_key: &str,
    queue: &str,
    stage: &str,
    redelivered: bool,
    attempt: u32,
) -> PyResult<Message> {
    let mut props = BasicProperties::default();
    if let Some(id) = message_id {
        props = props.with_message_id(convert::short(id, "message id")?);
    }
    if let Some(ct) = content_type {
        props = props.with_content_type(convert::short(ct, "content type")?);
    }
    if let Some(c) = correlation_id {
        props = props.with_correlation_id(convert::short(c, "correlation id")?);
    }
    for (k, v) in convert::headers_from_py(headers)? {
        // `headers_from_py` checked every name is a short string.
        envelope::set_header(&mut props, &k, v);
    }
    if attempt == 0 {
        return Err(PyValueError::new_err("attempts count from 1"));
    }
    let mut b = DeliveryBuilder::new(convert::body_from_py(body)?)
        .properties(props)
        .exchange(exchange)
        .routing_key(routing_key)
        .redelivered(redelivered);
    if attempt > 1 {
        b = b.attempt(i64::from(attempt));
    }
    let mut d: Delivery = b.build();
    d.queue = queue.to_owned();
    d.stage = stage.to_owned();
    Ok(Message::new(d))
}

/// One published output, as the engine would publish it.
#[pyclass(module = "flowgate.testing", name = "PublishedOutput", frozen)]
pub struct Published {
    out: flowgate::Output,
}

#[pymethods]
impl Published {
    /// Its exchange.
    #[getter]
    fn exchange(&self) -> &str {
        &self.out.exchange
    }

    /// Its routing key.
    #[getter]
    fn routing_key(&self) -> &str {
        &self.out.routing_key
    }

    /// Its payload.
    #[getter]
    fn body<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.out.body)
    }

    /// Its headers.
    #[getter]
    fn headers<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        match self.out.properties.headers() {
            Some(t) => convert::table_to_py(py, t),
            None => Ok(PyDict::new(py)),
        }
    }

    /// Its properties (headers apart).
    #[getter]
    fn properties<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        convert::properties_to_py(py, &self.out.properties)
    }

    /// Its ``message_id``.
    #[getter]
    fn message_id(&self) -> Option<&str> {
        self.out
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.as_str())
    }

    fn __repr__(&self) -> String {
        format!(
            "PublishedOutput(exchange={:?}, routing_key={:?}, {} bytes)",
            self.out.exchange,
            self.out.routing_key,
            self.out.body.len()
        )
    }
}

/// What the engine would do with a message after its handler ran.
///
/// ``kind`` is ``"ack"`` (publish ``outputs``, then ack), ``"retry"``
/// (through the ladder; ``after`` the minimum wait in seconds),
/// ``"dead_letter"`` (with ``reason`` as its reason header),
/// ``"invalid_output"`` (dead-lettered as ``invalid-output``) or
/// ``"error"`` (another exception: through the ladder, ``reason`` being
/// the last error).
#[pyclass(module = "flowgate.testing", name = "Outcome", frozen)]
pub struct Judged {
    #[pyo3(get)]
    kind: &'static str,
    #[pyo3(get)]
    reason: Option<String>,
    #[pyo3(get)]
    after: Option<f64>,
    outputs: Vec<flowgate::Output>,
}

#[pymethods]
impl Judged {
    /// The outputs an ack publishes (empty otherwise).
    #[getter]
    fn outputs(&self) -> Vec<Published> {
        self.outputs
            .iter()
            .map(|o| Published { out: o.clone() })
            .collect()
    }

    fn __repr__(&self) -> String {
        match self.kind {
            "ack" => format!("Outcome(ack, {} outputs)", self.outputs.len()),
            k => format!(
                "Outcome({k}, reason={:?})",
                self.reason.as_deref().unwrap_or("")
            ),
        }
    }
}

impl Judged {
    fn of(drafted: Drafted, d: &Delivery, target: Option<&Target>) -> Judged {
        let judged = |kind, reason: Option<String>| Judged {
            kind,
            reason,
            after: None,
            outputs: Vec::new(),
        };
        match drafted.outcome(d, target) {
            Ok(Outcome::Ack { outputs }) => Judged {
                outputs,
                ..judged("ack", None)
            },
            Ok(Outcome::Retry { reason }) => judged("retry", Some(reason)),
            Ok(Outcome::RetryAfter { reason, after }) => Judged {
                after: Some(after.as_secs_f64()),
                ..judged("retry", Some(reason))
            },
            Ok(Outcome::DeadLetter { reason }) => judged("dead_letter", Some(reason)),
            Ok(Outcome::InvalidOutput { reason }) => judged("invalid_output", Some(reason)),
            Ok(other) => judged("error", Some(format!("{other:?}"))),
            Err(e) => judged("error", Some(e.to_string())),
        }
    }
}

fn target(output: Option<(String, String)>) -> Option<Target> {
    output.map(|(exchange, routing_key)| Target {
        exchange,
        routing_key,
    })
}

/// The engine's judgement of what a handler returned (``raised``: the
/// exception it raised instead) for ``message``, on a stage whose
/// ``output`` is ``output``.
#[pyfunction]
#[pyo3(signature = (message, value, raised, output = None))]
pub(crate) fn judge(
    py: Python<'_>,
    message: &Bound<'_, Message>,
    value: &Bound<'_, PyAny>,
    raised: bool,
    output: Option<(String, String)>,
) -> Judged {
    let drafted = match raised {
        true => Drafted::from_exception(py, value),
        false => Drafted::from_return(value),
    };
    Judged::of(drafted, &message.get().delivery, target(output).as_ref())
}

/// [`judge`] for a batch handler: one outcome per message (messages left
/// without a result are retried by the engine, reported here as
/// ``"retry"`` with the engine's reason).
#[pyfunction]
#[pyo3(signature = (messages, value, raised, output = None))]
pub(crate) fn judge_batch(
    py: Python<'_>,
    messages: Vec<Bound<'_, Message>>,
    value: &Bound<'_, PyAny>,
    raised: bool,
    output: Option<(String, String)>,
) -> Vec<Judged> {
    let n = messages.len();
    let mut results = match raised {
        true => (0..n)
            .map(|_| Drafted::from_exception(py, value))
            .collect::<Vec<_>>(),
        false => Drafted::from_batch(py, value, n),
    };
    results.truncate(n);
    while results.len() < n {
        results.push(Drafted::Retry {
            reason: envelope::MISSING_BATCH_RESULT.to_owned(),
            after: None,
        });
    }
    let target = target(output);
    results
        .into_iter()
        .zip(&messages)
        .map(|(r, m)| Judged::of(r, &m.get().delivery, target.as_ref()))
        .collect()
}

/// Deletes a configuration's topology when closed (or collected).
#[pyclass(module = "flowgate._flowgate", frozen)]
pub struct Cleanup {
    guard: Mutex<Option<flowgate_testkit::Cleanup>>,
}

#[pymethods]
impl Cleanup {
    #[new]
    fn new(config: &PyConfig) -> PyResult<Self> {
        let url = config
            .inner
            .amqp
            .resolved_url()
            .map_err(|e| PyValueError::new_err(e.to_string()))?;
        Ok(Self {
            guard: Mutex::new(Some(flowgate_testkit::Cleanup::new(&url, &config.inner))),
        })
    }

    /// Deletes the topology now (without the GIL).
    fn close(&self, py: Python<'_>) {
        let guard = self.guard.lock().unwrap_or_else(|p| p.into_inner()).take();
        py.detach(move || drop(guard));
    }
}

/// How the ids that arrived compare with the ids expected.
#[pyclass(module = "flowgate.testing", name = "Accounting", frozen)]
pub struct Accounting {
    acc: KitAccounting,
}

#[pymethods]
impl Accounting {
    /// How many distinct ids were expected.
    #[getter]
    fn expected(&self) -> usize {
        self.acc.expected
    }

    /// Expected ids that never arrived (sorted).
    #[getter]
    fn missing(&self) -> Vec<String> {
        self.acc.missing.clone()
    }

    /// Expected ids that arrived more than once, with how often.
    #[getter]
    fn duplicates(&self) -> std::collections::BTreeMap<String, usize> {
        self.acc.duplicates.clone()
    }

    /// Ids that arrived but were not expected, with how often.
    #[getter]
    fn unexpected(&self) -> std::collections::BTreeMap<String, usize> {
        self.acc.unexpected.clone()
    }

    /// True when every expected id arrived exactly once and nothing else did.
    fn is_exactly_once(&self) -> bool {
        self.acc.is_exactly_once()
    }

    /// Raises ``AssertionError`` saying what went wrong, unless exactly once.
    fn assert_exactly_once(&self) -> PyResult<()> {
        match self.acc.is_exactly_once() {
            true => Ok(()),
            false => Err(PyAssertionError::new_err(format!(
                "not exactly once: {}",
                self.acc
            ))),
        }
    }

    fn __str__(&self) -> String {
        self.acc.to_string()
    }

    fn __repr__(&self) -> String {
        format!("Accounting({})", self.acc)
    }
}

/// A raw AMQP client (not flowgate) on the app's broker, running on the
/// app's engine runtime: publish with confirms, collect, account.
#[pyclass(module = "flowgate._flowgate", frozen)]
pub struct Kit {
    runtime: Py<Runtime>,
    client: Arc<Client>,
    config: Config,
}

#[pymethods]
impl Kit {
    /// Connects to ``config``'s broker; ``future`` completes with the kit.
    #[staticmethod]
    fn connect(
        py: Python<'_>,
        runtime: Py<Runtime>,
        config: &PyConfig,
        future: Py<PyAny>,
    ) -> PyResult<()> {
        let url = config
            .inner
            .amqp
            .resolved_url()
            .map_err(|e| PyValueError::new_err(e.to_string()))?;
        let config = config.inner.clone();
        let rt = runtime.clone_ref(py);
        runtime.get().spawn(
            future,
            async move { Client::connect(&url).await },
            move |py, client| {
                Ok(Py::new(
                    py,
                    Kit {
                        runtime: rt,
                        client: Arc::new(client),
                        config,
                    },
                )?
                .into_any())
            },
        )
    }

    /// Publishes one message (persistent, mandatory, confirmed).
    #[pyo3(signature = (future, exchange, routing_key, message_id, body, headers = None))]
    fn publish(
        &self,
        future: Py<PyAny>,
        exchange: String,
        routing_key: String,
        message_id: &str,
        body: &Bound<'_, PyAny>,
        headers: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let mut props =
            BasicProperties::default().with_message_id(convert::short(message_id, "message id")?);
        for (k, v) in convert::headers_from_py(headers)? {
            // `headers_from_py` checked every name is a short string.
            envelope::set_header(&mut props, &k, v);
        }
        let body = convert::body_from_py(body)?;
        let client = self.client.clone();
        self.runtime.get().spawn(
            future,
            async move {
                client
                    .publish_props(&exchange, &routing_key, &body, props)
                    .await
            },
            |py, ()| Ok(py.None()),
        )
    }

    /// Publishes one message per id, with a window of confirms.
    fn publish_many(
        &self,
        future: Py<PyAny>,
        exchange: String,
        routing_key: String,
        ids: Vec<String>,
        body: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let body = convert::body_from_py(body)?;
        let client = self.client.clone();
        self.runtime.get().spawn(
            future,
            async move {
                client
                    .publish_many(&exchange, &routing_key, &ids, &body)
                    .await
            },
            |py, ()| Ok(py.None()),
        )
    }

    /// Consumes (and acks) up to ``n`` messages of ``queue`` within
    /// ``timeout`` seconds: ``[(message_id, headers), ...]``.
    fn collect(&self, future: Py<PyAny>, queue: String, n: usize, timeout: f64) -> PyResult<()> {
        let client = self.client.clone();
        let timeout = Duration::from_secs_f64(timeout.max(0.0));
        self.runtime.get().spawn(
            future,
            async move { client.collect(&queue, n, timeout).await },
            |py, got| {
                let list = PyList::empty(py);
                for (id, headers) in &got {
                    list.append((id, convert::table_to_py(py, headers)?))?;
                }
                Ok(list.into_any().unbind())
            },
        )
    }

    /// Exactly-once accounting of ``queue`` against ``expected``.
    fn account(
        &self,
        future: Py<PyAny>,
        queue: String,
        expected: Vec<String>,
        timeout: f64,
    ) -> PyResult<()> {
        let client = self.client.clone();
        let metrics = self.runtime.get().engine_handle()?.metrics().clone();
        let config = self.config.clone();
        let timeout = Duration::from_secs_f64(timeout.max(0.0));
        self.runtime.get().spawn_blocking(
            future,
            move || async move {
                flowgate_testkit::pipeline::account(
                    &client, &metrics, &config, &queue, &expected, timeout,
                )
                .await
            },
            |py, acc| Ok(Py::new(py, Accounting { acc })?.into_any()),
        )
    }

    /// Ready messages in ``queue``.
    fn depth(&self, future: Py<PyAny>, queue: String) -> PyResult<()> {
        let client = self.client.clone();
        self.runtime.get().spawn(
            future,
            async move { client.depth(&queue).await },
            |py, n| Ok(n.into_pyobject(py)?.into_any().unbind()),
        )
    }
}

/// The benches' publish/collect driver (the Rust test kit's): publishes
/// `n` persistent messages of `body_bytes` to `exchange`/`routing_key`
/// with confirms (stamped with their send time) while consuming `sink`
/// until every id arrived or `timeout` seconds passed, at `rate` msg/s
/// or as fast as confirms allow. Blocks (without the GIL); returns
/// `{"sent", "received", "duplicates", "elapsed", "throughput",
/// "p50_ms", "p99_ms"}`.
#[pyfunction]
#[pyo3(signature = (url, exchange, routing_key, sink, n, body_bytes = 256, timeout = 300.0, rate = None))]
#[allow(clippy::too_many_arguments)]
pub(crate) fn drive<'py>(
    py: Python<'py>,
    url: String,
    exchange: String,
    routing_key: String,
    sink: String,
    n: usize,
    body_bytes: usize,
    timeout: f64,
    rate: Option<f64>,
) -> PyResult<Bound<'py, PyDict>> {
    let timeout = Duration::from_secs_f64(timeout.max(0.0));
    let stats = py.detach(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        rt.block_on(flowgate_testkit::driver::drive_at(
            &url,
            &exchange,
            &routing_key,
            &sink,
            n,
            body_bytes,
            rate,
            timeout,
            |_| {},
        ))
        .map_err(std::io::Error::other)
    });
    let stats = stats.map_err(|e| pyo3::exceptions::PyConnectionError::new_err(e.to_string()))?;
    let d = PyDict::new(py);
    d.set_item("sent", stats.sent)?;
    d.set_item("received", stats.received)?;
    d.set_item("duplicates", stats.duplicates)?;
    d.set_item("elapsed", stats.elapsed.as_secs_f64())?;
    d.set_item("throughput", stats.throughput())?;
    d.set_item("p50_ms", stats.percentile(0.50).as_secs_f64() * 1e3)?;
    d.set_item("p99_ms", stats.percentile(0.99).as_secs_f64() * 1e3)?;
    Ok(d)
}

/// A private RabbitMQ node for tests that disturb a broker (memory alarms,
/// closed connections), started in a temporary directory on free ports and
/// stopped (its directory removed) by :meth:`stop` or when collected.
/// Needs the Debian RabbitMQ package.
#[pyclass(module = "flowgate.testing", name = "BrokerNode", frozen)]
pub struct Node {
    node: Mutex<Option<flowgate_testkit::node::BrokerNode>>,
    url: String,
}

impl Node {
    fn with<T>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&flowgate_testkit::node::BrokerNode) -> anyhow::Result<T> + Send,
    ) -> PyResult<T>
    where
        T: Send,
    {
        let node = self
            .node
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| pyo3::exceptions::PyRuntimeError::new_err("the node is stopped"))?;
        py.detach(move || f(&node))
            .map_err(|e| pyo3::exceptions::PyRuntimeError::new_err(format!("{e:#}")))
    }
}

#[pymethods]
impl Node {
    /// Starts a node and waits until it accepts connections (5-10 s).
    #[staticmethod]
    fn start(py: Python<'_>) -> PyResult<Node> {
        let node = py
            .detach(flowgate_testkit::node::BrokerNode::start)
            .map_err(|e| pyo3::exceptions::PyRuntimeError::new_err(format!("{e:#}")))?;
        let url = node.amqp_url();
        Ok(Node {
            node: Mutex::new(Some(node)),
            url,
        })
    }

    /// Its AMQP URL.
    #[getter]
    fn amqp_url(&self) -> &str {
        &self.url
    }

    /// Raises (``True``) or clears the broker's memory alarm: it blocks
    /// every publishing connection while raised.
    fn set_memory_alarm(&self, py: Python<'_>, on: bool) -> PyResult<()> {
        self.with(py, move |n| n.set_memory_alarm(on))
    }

    /// ``(ready, unacked, consumers)`` of ``queue`` on this node.
    fn list_queue(&self, py: Python<'_>, queue: String) -> PyResult<(u64, u64, u64)> {
        self.with(py, move |n| n.list_queue(&queue))
    }

    /// Stops the node and removes its directory.
    fn stop(&self, py: Python<'_>) {
        let node = self.node.lock().unwrap_or_else(|p| p.into_inner()).take();
        py.detach(move || drop(node));
    }
}
