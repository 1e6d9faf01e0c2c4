//! `Runtime`: one engine, built from a config and Python handlers, running
//! on its own thread (an actix system over a multi-threaded tokio runtime,
//! as `flowgate run` runs it), talking to one asyncio event loop through
//! the [`Bridge`].
//!
//! Every call from Python returns at once: what it waits for runs on the
//! engine's runtime and completes an `asyncio.Future` through the bridge.

use crate::bridge::{Bridge, Drain, Resolution};
use crate::config::PyConfig;
use crate::handler::{Kind, PyHandler};
use crate::transaction::PyTxHandler;
use crate::{convert, errors, logging};
use flowgate::{Engine, EngineHandle, Handler, Output};
use pyo3::exceptions::{PyAssertionError, PyRuntimeError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

/// What the Python side asks of the engine's thread.
enum Command {
    /// Drain and stop; the report completes the future.
    Shutdown(Py<PyAny>),
}

/// The running engine, once started.
struct Started {
    handle: EngineHandle,
    rt: tokio::runtime::Handle,
    commands: mpsc::Sender<Command>,
}

/// One engine for one event loop (``flowgate.App`` drives it).
#[pyclass(module = "flowgate._flowgate", frozen)]
pub struct Runtime {
    bridge: Arc<Bridge>,
    /// Built and validated; taken by `start`.
    engine: Mutex<Option<Engine>>,
    started: Arc<Mutex<Option<Started>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A future's value: `None`.
fn none() -> Resolution {
    Box::new(|py| Ok(py.None()))
}

impl Runtime {
    /// The engine's runtime and handle, or an error saying it is not running.
    fn running(&self) -> PyResult<(tokio::runtime::Handle, EngineHandle)> {
        lock(&self.started)
            .as_ref()
            .map(|s| (s.rt.clone(), s.handle.clone()))
            .ok_or_else(|| PyRuntimeError::new_err("the app is not running"))
    }

    /// Runs `work` on the engine's runtime; its result (made Python by
    /// `into_py`) completes `future`. A panic (the test kit's way of
    /// failing) becomes an `AssertionError`.
    pub(crate) fn spawn<T, F>(
        &self,
        future: Py<PyAny>,
        work: F,
        into_py: impl FnOnce(Python<'_>, T) -> PyResult<Py<PyAny>> + Send + 'static,
    ) -> PyResult<()>
    where
        T: Send + 'static,
        F: Future<Output = T> + Send + 'static,
    {
        let (rt, _) = self.running()?;
        let bridge = self.bridge.clone();
        let job = rt.spawn(work);
        rt.spawn(async move {
            let result: Resolution = match job.await {
                Ok(v) => Box::new(move |py| into_py(py, v)),
                Err(e) => {
                    let text = match e.try_into_panic() {
                        Ok(p) => p
                            .downcast_ref::<String>()
                            .cloned()
                            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                            .unwrap_or_else(|| "panic".into()),
                        Err(e) => e.to_string(),
                    };
                    Box::new(move |_| Err(PyAssertionError::new_err(text)))
                }
            };
            bridge.resolve(future, result);
        });
        Ok(())
    }

    /// [`spawn`](Self::spawn) for work whose future is not `Send` (the
    /// test kit's waits): made and run on one of the runtime's blocking
    /// threads.
    pub(crate) fn spawn_blocking<T, F, M>(
        &self,
        future: Py<PyAny>,
        make: M,
        into_py: impl FnOnce(Python<'_>, T) -> PyResult<Py<PyAny>> + Send + 'static,
    ) -> PyResult<()>
    where
        T: Send + 'static,
        M: FnOnce() -> F + Send + 'static,
        F: Future<Output = T> + 'static,
    {
        let (rt, _) = self.running()?;
        let on = rt.clone();
        self.spawn(
            future,
            async move {
                match on.spawn_blocking(move || rt.block_on(make())).await {
                    Ok(v) => v,
                    // Its panic (the test kit failing) is this task's.
                    Err(e) => match e.try_into_panic() {
                        Ok(p) => std::panic::resume_unwind(p),
                        Err(e) => panic!("the test kit's thread did not finish: {e}"),
                    },
                }
            },
            into_py,
        )
    }

    pub(crate) fn engine_handle(&self) -> PyResult<EngineHandle> {
        self.running().map(|(_, h)| h)
    }
}

#[pymethods]
impl Runtime {
    /// Builds the engine: every stage whose ``handler`` is a registered
    /// name runs that Python function. ``handlers`` holds
    /// ``(name, function, is_async, is_batch)``; ``order_keys``
    /// ``(name, function)``, the key functions an ``order_by`` may name;
    /// ``tx_handlers`` ``(name, function)``, the transactional handlers
    /// (``def f(message, tx)``, run through the engine's inbox: every stage
    /// whose ``handler`` or name is ``name``).
    #[new]
    #[pyo3(signature = (config, handlers, order_keys = Vec::new(), tx_handlers = Vec::new()))]
    fn new(
        py: Python<'_>,
        config: &PyConfig,
        handlers: Vec<(String, Py<PyAny>, bool, bool)>,
        order_keys: Vec<(String, Py<PyAny>)>,
        tx_handlers: Vec<(String, Py<PyAny>)>,
    ) -> PyResult<Self> {
        let bridge = Arc::new(
            Bridge::new().map_err(|e| PyRuntimeError::new_err(format!("no wakeup socket: {e}")))?,
        );
        let mut builder = Engine::builder().config(config.inner.clone());
        for (name, func, is_async, batch) in handlers {
            let func = Arc::new(func);
            let bridge = bridge.clone();
            let kind = match is_async {
                true => Kind::Async,
                false => Kind::Blocking,
            };
            builder = builder.handler_factory(&name, move |stage| {
                Ok::<_, std::convert::Infallible>(Arc::new(PyHandler {
                    func: func.clone(),
                    kind,
                    batch,
                    target: stage.output.clone(),
                    bridge: bridge.clone(),
                }) as Arc<dyn Handler>)
            });
        }
        for (name, func) in tx_handlers {
            let func = Arc::new(func);
            // Registered per stage (by the stage's name, which the engine
            // matches too), so each knows its stage's default output.
            for stage in config
                .inner
                .stages
                .iter()
                .filter(|s| s.handler == name || s.name == name)
            {
                builder = builder.tx_handler(
                    &stage.name,
                    PyTxHandler {
                        func: func.clone(),
                        target: stage.output.clone(),
                    },
                );
            }
        }
        for (name, func) in order_keys {
            builder = builder.order_key(&name, move |d: &flowgate::Delivery| {
                crate::order_key::call(&func, d)
            });
        }
        let engine = builder.build().map_err(|e| errors::config(py, &e))?;
        Ok(Self {
            bridge,
            engine: Mutex::new(Some(engine)),
            started: Arc::new(Mutex::new(None)),
            thread: Mutex::new(None),
        })
    }

    /// Binds the bridge to ``event_loop``: returns the callable the loop
    /// runs when ``fd`` is readable (``loop.add_reader(d.fd, d)``).
    fn attach(&self, py: Python<'_>, event_loop: &Bound<'_, PyAny>) -> PyResult<Drain> {
        let drain = Drain::new(py, self.bridge.clone(), event_loop)?;
        self.bridge.set_attached(true);
        Ok(drain)
    }

    /// Stops taking work for the loop (after the engine stopped).
    fn detach(&self) {
        self.bridge.set_attached(false);
    }

    /// Starts the engine on its own thread: ``started`` completes when it
    /// runs (or with the error it failed with); ``escalated`` completes with
    /// the reason if an actor spends its restart budget.
    fn start(&self, started: Py<PyAny>, escalated: Py<PyAny>) -> PyResult<()> {
        let engine = lock(&self.engine)
            .take()
            .ok_or_else(|| PyRuntimeError::new_err("the app was started already"))?;
        logging::init(engine.config());
        let (tx, mut rx) = mpsc::channel::<Command>(1);
        let slot = self.started.clone();
        let bridge = self.bridge.clone();
        let thread = std::thread::Builder::new()
            .name("flowgate-engine".into())
            .spawn(move || {
                flowgate::run_system(async move {
                    let handle = match engine.start().await {
                        Ok(h) => h,
                        Err(e) => {
                            let text = format!("cannot start: {e}");
                            bridge.resolve(
                                started,
                                Box::new(move |py| {
                                    Err(errors::flowgate_error(py, text))
                                }),
                            );
                            return;
                        }
                    };
                    *lock(&slot) = Some(Started {
                        handle: handle.clone(),
                        rt: tokio::runtime::Handle::current(),
                        commands: tx,
                    });
                    bridge.resolve(started, none());
                    let mut escalated = Some(escalated);
                    let done = loop {
                        tokio::select! {
                            cmd = rx.recv() => break cmd,
                            e = handle.escalated(), if escalated.is_some() => {
                                let text = format!("{} spent its restart budget: {}", e.actor, e.reason);
                                if let Some(f) = escalated.take() {
                                    bridge.resolve(f, Box::new(move |py| Ok(text.into_pyobject(py)?.into_any().unbind())));
                                }
                            }
                        }
                    };
                    let report = handle.shutdown().await;
                    if let Some(Command::Shutdown(f)) = done {
                        bridge.resolve(
                            f,
                            Box::new(move |py| {
                                let d = PyDict::new(py);
                                d.set_item("clean", report.clean)?;
                                let stages = PyList::empty(py);
                                for s in &report.stages {
                                    let e = PyDict::new(py);
                                    e.set_item("stage", &s.stage)?;
                                    e.set_item("drained", s.drained)?;
                                    e.set_item("abandoned", s.abandoned)?;
                                    stages.append(e)?;
                                }
                                d.set_item("stages", stages)?;
                                Ok(d.into_any().unbind())
                            }),
                        );
                    }
                    *lock(&slot) = None;
                })
            })
            .map_err(|e| PyRuntimeError::new_err(format!("cannot start the engine's thread: {e}")))?;
        *lock(&self.thread) = Some(thread);
        Ok(())
    }

    /// Drains and stops the engine in the documented order; ``future``
    /// completes with the report ``{"clean", "stages": [...]}``.
    fn shutdown(&self, py: Python<'_>, future: Py<PyAny>) -> PyResult<()> {
        let commands = lock(&self.started).as_ref().map(|s| s.commands.clone());
        match commands {
            Some(c) => {
                if let Err(
                    mpsc::error::TrySendError::Full(Command::Shutdown(f))
                    | mpsc::error::TrySendError::Closed(Command::Shutdown(f)),
                ) = c.try_send(Command::Shutdown(future))
                {
                    // Already stopping: this caller learns nothing more.
                    f.bind(py).call_method1("set_result", (py.None(),))?;
                }
            }
            None => {
                future.bind(py).call_method1("set_result", (py.None(),))?;
            }
        }
        Ok(())
    }

    /// Waits (without the GIL) for the engine's thread to end.
    fn join(&self, py: Python<'_>) {
        if let Some(t) = lock(&self.thread).take() {
            py.detach(move || {
                let _ = t.join();
            });
        }
    }

    /// Completes ``future`` with ``True`` once connected and every stage is
    /// consuming, ``False`` after ``timeout`` seconds.
    fn wait_ready(&self, future: Py<PyAny>, timeout: f64) -> PyResult<()> {
        let handle = self.engine_handle()?;
        let timeout = Duration::from_secs_f64(timeout.max(0.0));
        self.spawn(
            future,
            async move { handle.wait_ready(timeout).await },
            |py, ready| {
                Ok(pyo3::types::PyBool::new(py, ready)
                    .to_owned()
                    .into_any()
                    .unbind())
            },
        )
    }

    /// Publishes through the engine's ingress (watermark admission, the
    /// publisher's bounds, breaker and spool, signing); ``future``
    /// completes with ``"confirmed"`` or ``"spooled"``, or fails with
    /// ``Backpressure`` / ``PublishError``.
    #[pyo3(signature = (future, exchange, routing_key, body, headers = None, message_id = None, content_type = None))]
    #[allow(clippy::too_many_arguments)]
    fn publish(
        &self,
        future: Py<PyAny>,
        exchange: String,
        routing_key: String,
        body: &Bound<'_, PyAny>,
        headers: Option<&Bound<'_, PyAny>>,
        message_id: Option<&str>,
        content_type: Option<&str>,
    ) -> PyResult<()> {
        let mut out = Output::new(exchange, routing_key, convert::body_from_py(body)?);
        if let Some(id) = message_id {
            out.properties = out
                .properties
                .with_message_id(convert::short(id, "message id")?);
        }
        if let Some(ct) = content_type {
            out.properties = out
                .properties
                .with_content_type(convert::short(ct, "content type")?);
        }
        for (k, v) in convert::headers_from_py(headers)? {
            // `headers_from_py` checked every name is a short string.
            flowgate::envelope::set_header(&mut out.properties, &k, v);
        }
        let ingress = self.engine_handle()?.ingress().clone();
        self.spawn(
            future,
            async move { ingress.send(out).await },
            |py, sent| match sent {
                Ok(accepted) => Ok(accepted.as_str().into_pyobject(py)?.into_any().unbind()),
                Err(e) => Err(errors::publish(py, &e)),
            },
        )
    }

    /// ``host:port`` of ``[http] bind`` (metrics, health), if listening.
    #[getter]
    fn http_addr(&self) -> Option<String> {
        self.engine_handle()
            .ok()?
            .http_addr()
            .map(|a| a.to_string())
    }

    /// ``host:port`` of the management API, if listening.
    #[getter]
    fn management_addr(&self) -> Option<String> {
        self.engine_handle()
            .ok()?
            .management_addr()
            .map(|a| a.to_string())
    }

    /// ``host:port`` of ``POST /publish`` (``[ingress] bind``), if listening.
    #[getter]
    fn ingress_addr(&self) -> Option<String> {
        self.engine_handle()
            .ok()?
            .ingress_addr()
            .map(|a| a.to_string())
    }

    /// The engine's metrics in the Prometheus text format (what
    /// ``GET /metrics`` serves).
    fn metrics(&self) -> PyResult<String> {
        Ok(self.engine_handle()?.metrics().render())
    }

    /// Every watched queue's ready messages at the depth monitor's last
    /// sample.
    fn queue_depths(&self) -> PyResult<std::collections::BTreeMap<String, u64>> {
        Ok(self.engine_handle()?.ingress().queue_depths())
    }

    /// Every watched queue's highest sampled depth since the start.
    fn queue_peaks(&self) -> PyResult<std::collections::BTreeMap<String, u64>> {
        Ok(self.engine_handle()?.ingress().queue_peaks())
    }

    /// Messages waiting in the durable spool.
    #[getter]
    fn spooled(&self) -> u64 {
        self.engine_handle().map(|h| h.spooled()).unwrap_or(0)
    }
}
