//! The way from the engine's threads into the Python event loop.
//!
//! The engine's tasks never take the GIL: a task that needs Python (an
//! `async def` handler to start, an awaited future to resolve) puts a
//! [`Job`] on the bridge's queue and, unless a drain is already pending,
//! writes one byte to a socket the event loop watches (`loop.add_reader`).
//! The loop then calls [`Bridge::drain`] once on its own thread, which
//! takes every job queued by then — many ready messages cost one wakeup,
//! not one `call_soon_threadsafe` each.
//!
//! The queue is bounded by what feeds it: a stage runs at most
//! `concurrency` handlers (so at most that many handler jobs wait), and
//! every future-resolving job belongs to one awaited call.

use crate::message::Message;
use crate::output::Drafted;
use flowgate::Delivery;
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyList;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::oneshot;

/// Turns a Rust result into a Python value, under the GIL, on the loop.
pub(crate) type Resolution = Box<dyn FnOnce(Python<'_>) -> PyResult<Py<PyAny>> + Send>;

/// What a handler gets: one message, or a batch.
pub(crate) enum Input {
    One(Box<Delivery>),
    Batch(Vec<Delivery>),
}

/// What a handler answered: one result, or one per message of a batch.
pub(crate) enum Replied {
    One(Drafted),
    Batch(Vec<Drafted>),
}

/// Work for the event loop.
pub(crate) enum Job {
    /// Start an `async def` handler on `input`; its result goes to `reply`.
    Call {
        func: Arc<Py<PyAny>>,
        input: Input,
        reply: oneshot::Sender<Replied>,
    },
    /// Complete an awaited `asyncio.Future`.
    Resolve {
        future: Py<PyAny>,
        result: Resolution,
    },
}

/// One event loop's end of the bridge (see the module docs).
pub(crate) struct Bridge {
    queue: Mutex<Vec<Job>>,
    /// A drain is pending (a byte is on its way): no need to write another.
    scheduled: AtomicBool,
    /// A loop is reading: jobs are refused before and after.
    attached: AtomicBool,
    wake_tx: UnixStream,
    wake_rx: UnixStream,
}

/// The loop's `create_task`, and the context variable the handler's log
/// records read (set around each start).
struct Attached {
    create_task: Py<PyAny>,
}

impl Bridge {
    pub(crate) fn new() -> std::io::Result<Self> {
        let (wake_tx, wake_rx) = UnixStream::pair()?;
        wake_tx.set_nonblocking(true)?;
        wake_rx.set_nonblocking(true)?;
        Ok(Self {
            queue: Mutex::new(Vec::new()),
            scheduled: AtomicBool::new(false),
            attached: AtomicBool::new(false),
            wake_tx,
            wake_rx,
        })
    }

    /// The descriptor the loop watches.
    pub(crate) fn fd(&self) -> i32 {
        self.wake_rx.as_raw_fd()
    }

    pub(crate) fn set_attached(&self, on: bool) {
        self.attached.store(on, Ordering::Release);
    }

    /// Queues `job` for the loop; false (the job dropped) when no loop reads.
    pub(crate) fn submit(&self, job: Job) -> bool {
        if !self.attached.load(Ordering::Acquire) {
            return false;
        }
        self.queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(job);
        if !self.scheduled.swap(true, Ordering::SeqCst) {
            // A full socket buffer means wakeups are already pending.
            let _ = (&self.wake_tx).write(&[1]);
        }
        true
    }

    /// Resolves `future` on the loop with what `result` makes of it (the
    /// future is dropped unresolved when no loop reads any more).
    pub(crate) fn resolve(&self, future: Py<PyAny>, result: Resolution) {
        self.submit(Job::Resolve { future, result });
    }

    /// Takes every queued job (the loop's reader callback).
    fn take(&self) -> Vec<Job> {
        // Empty the socket first, then clear the flag, then take: a job
        // queued after the flag is cleared writes a byte that stays for
        // the next drain; one queued before is taken now. (Clearing first
        // could swallow the byte of a job that set the flag meanwhile, and
        // leave the flag set with no byte on its way: a stalled loop.)
        let mut sink = [0u8; 256];
        loop {
            match (&self.wake_rx).read(&mut sink) {
                Ok(0) => break,
                Ok(_) => continue,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
        self.scheduled.store(false, Ordering::SeqCst);
        std::mem::take(&mut *self.queue.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// The context variable `flowgate.logs.current_message`, which log records
/// made by handler code read their message id and stage from.
pub(crate) fn current_message(py: Python<'_>) -> PyResult<&Bound<'_, PyAny>> {
    static VAR: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
    VAR.import(py, "flowgate.logs", "current_message")
}

/// The loop side of a [`Bridge`]: `loop.add_reader(drain.fd, drain)`.
#[pyclass(module = "flowgate._flowgate", frozen)]
pub struct Drain {
    bridge: Arc<Bridge>,
    attached: Attached,
}

impl Drain {
    pub(crate) fn new(
        py: Python<'_>,
        bridge: Arc<Bridge>,
        event_loop: &Bound<'_, PyAny>,
    ) -> PyResult<Self> {
        let create_task = event_loop.getattr("create_task")?.unbind();
        let _ = py;
        Ok(Self {
            bridge,
            attached: Attached { create_task },
        })
    }

    fn start(
        &self,
        py: Python<'_>,
        func: &Py<PyAny>,
        input: Input,
        reply: oneshot::Sender<Replied>,
    ) {
        let (arg, first, batch_len) = match make_arg(py, input) {
            Ok(made) => made,
            Err((e, batch_len)) => {
                let _ = reply.send(replied(py, Err(e), batch_len));
                return;
            }
        };
        let var = match current_message(py) {
            Ok(v) => v,
            Err(e) => {
                let _ = reply.send(replied(py, Err(e), batch_len));
                return;
            }
        };
        // Set for the task to copy at creation; reset for the next one.
        let token = var.call_method1("set", (first,)).ok();
        let started = func
            .bind(py)
            .call1((arg,))
            .and_then(|aw| schedule(py, &self.attached, aw));
        if let Some(t) = token {
            let _ = var.call_method1("reset", (t,));
        }
        match started {
            Ok(Started::Task(task)) => {
                let done = Done {
                    reply: Mutex::new(Some(reply)),
                    batch_len,
                };
                let attached = Py::new(py, done)
                    .and_then(|d| task.call_method1("add_done_callback", (d,)).map(|_| ()));
                if let Err(e) = attached {
                    // `reply` went into `done`, dropped with it: the
                    // handler's task fails with the error as its reason.
                    e.print(py);
                }
            }
            Ok(Started::Value(v)) => {
                let _ = reply.send(replied(py, Ok(&v), batch_len));
            }
            Err(e) => {
                let _ = reply.send(replied(py, Err(e), batch_len));
            }
        }
    }
}

#[pymethods]
impl Drain {
    /// The descriptor to watch.
    #[getter]
    fn fd(&self) -> i32 {
        self.bridge.fd()
    }

    /// Runs every queued job (called by the loop when `fd` is readable).
    fn __call__(&self, py: Python<'_>) {
        for job in self.bridge.take() {
            match job {
                Job::Call { func, input, reply } => self.start(py, &func, input, reply),
                Job::Resolve { future, result } => complete(py, future.bind(py), result),
            }
        }
    }
}

enum Started<'py> {
    Task(Bound<'py, PyAny>),
    Value(Bound<'py, PyAny>),
}

/// A coroutine runs its first step at once: one that finishes there (most
/// do) is done without a task; one that suspends goes on as a task from
/// where it stopped (`flowgate._drive.resume`). Another awaitable is
/// wrapped by `asyncio.ensure_future`; anything else is the result already.
fn schedule<'py>(
    py: Python<'py>,
    attached: &Attached,
    aw: Bound<'py, PyAny>,
) -> PyResult<Started<'py>> {
    static IS_CORO: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
    static ENSURE: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
    static RESUME: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
    if IS_CORO
        .import(py, "asyncio", "iscoroutine")?
        .call1((&aw,))?
        .is_truthy()?
    {
        let yielded = match aw.call_method1("send", (py.None(),)) {
            Ok(y) => y,
            Err(e) if e.is_instance_of::<pyo3::exceptions::PyStopIteration>(py) => {
                return Ok(Started::Value(e.value(py).getattr("value")?));
            }
            Err(e) => return Err(e),
        };
        let resumed = RESUME
            .import(py, "flowgate._drive", "resume")?
            .call1((aw, yielded))?;
        return Ok(Started::Task(
            attached.create_task.bind(py).call1((resumed,))?,
        ));
    }
    if aw.hasattr("__await__")? {
        return Ok(Started::Task(
            ENSURE
                .import(py, "asyncio", "ensure_future")?
                .call1((aw,))?,
        ));
    }
    Ok(Started::Value(aw))
}

/// The handler's argument (a `Message`, or a list of them), the message
/// the log context names (a batch's first), and the batch size. `Err`
/// carries the batch size too.
#[allow(clippy::type_complexity)]
pub(crate) fn make_arg(
    py: Python<'_>,
    input: Input,
) -> Result<(Bound<'_, PyAny>, Bound<'_, PyAny>, Option<usize>), (PyErr, Option<usize>)> {
    match input {
        Input::One(d) => {
            let m = Bound::new(py, Message::new(*d)).map_err(|e| (e, None))?;
            Ok((m.clone().into_any(), m.into_any(), None))
        }
        Input::Batch(ds) => {
            let n = ds.len();
            let made = ds
                .into_iter()
                .map(|d| Bound::new(py, Message::new(d)))
                .collect::<PyResult<Vec<Bound<'_, Message>>>>()
                .map_err(|e| (e, Some(n)))?;
            let first = made
                .first()
                .map(|m| m.clone().into_any())
                .unwrap_or_else(|| py.None().into_bound(py));
            let list = PyList::new(py, made).map_err(|e| (e, Some(n)))?;
            Ok((list.into_any(), first, Some(n)))
        }
    }
}

/// The reply for a handler's value or exception.
pub(crate) fn replied(
    py: Python<'_>,
    r: PyResult<&Bound<'_, PyAny>>,
    batch: Option<usize>,
) -> Replied {
    match (r, batch) {
        (Ok(v), None) => Replied::One(Drafted::from_return(v)),
        (Ok(v), Some(n)) => Replied::Batch(Drafted::from_batch(py, v, n)),
        (Err(e), None) => Replied::One(Drafted::from_err(py, e)),
        (Err(e), Some(n)) => {
            let value = e.value(py).clone().into_any();
            Replied::Batch(
                (0..n)
                    .map(|_| Drafted::from_exception(py, &value))
                    .collect(),
            )
        }
    }
}

/// Completes an `asyncio.Future` unless it was cancelled meanwhile.
fn complete(py: Python<'_>, future: &Bound<'_, PyAny>, result: Resolution) {
    if future
        .call_method0("done")
        .and_then(|d| d.is_truthy())
        .unwrap_or(true)
    {
        return;
    }
    let set = match result(py) {
        Ok(v) => future.call_method1("set_result", (v,)),
        Err(e) => future.call_method1("set_exception", (e.value(py),)),
    };
    if let Err(e) = set {
        e.print(py);
    }
}

/// The done callback of a handler's task: reads its result and hands it
/// to the waiting engine task.
#[pyclass(module = "flowgate._flowgate", frozen)]
struct Done {
    reply: Mutex<Option<oneshot::Sender<Replied>>>,
    batch_len: Option<usize>,
}

#[pymethods]
impl Done {
    fn __call__(&self, py: Python<'_>, task: &Bound<'_, PyAny>) {
        let Some(reply) = self.reply.lock().unwrap_or_else(|p| p.into_inner()).take() else {
            return;
        };
        let cancelled = task
            .call_method0("cancelled")
            .and_then(|c| c.is_truthy())
            .unwrap_or(false);
        let r = if cancelled {
            Err(PyRuntimeError::new_err("the handler's task was cancelled"))
        } else {
            task.call_method0("result")
        };
        let _ = reply.send(replied(
            py,
            r.as_ref().map_err(|e| e.clone_ref(py)),
            self.batch_len,
        ));
    }
}
