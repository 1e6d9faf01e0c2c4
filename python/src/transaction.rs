//! A Python function as a stage's [`TxHandler`]: `def handler(message, tx)`
//! gets a [`Transaction`] whose `execute` and `fetch` run SQL in the very
//! transaction flowgate's inbox opened for the delivery (and commits with
//! the inbox row and the outputs). The engine's `Inbox` does everything
//! else; this file only carries SQL from the handler's thread to the task
//! that holds the transaction.
//!
//! The handler runs on the runtime's blocking pool (a plain `def`): each
//! `execute`/`fetch` sends its statement to the delivery's task over a
//! channel of one and waits for the answer without the GIL. The
//! transaction never leaves that task, so it cannot outlive the delivery:
//! a `Transaction` kept after its handler returned raises.

use crate::bridge::{self, Input, Replied};
use flowgate::config::Target;
use flowgate::postgres::sqlx::{self, postgres::PgRow, Column, Row, TypeInfo};
use flowgate::postgres::{PgTransaction, TxHandler};
use flowgate::{Delivery, HandlerError, Outcome};
use pyo3::exceptions::{PyRuntimeError, PyTypeError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyFloat, PyInt, PyString, PyTuple};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

/// One SQL parameter, as Python gave it.
enum Param {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Text(String),
    Bytes(Vec<u8>),
}

/// One value of a fetched row, for Python.
enum Value {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Text(String),
    Bytes(Vec<u8>),
}

/// A statement for the delivery's task.
struct Request {
    sql: String,
    params: Vec<Param>,
    /// Rows wanted (`fetch`), or only the count (`execute`).
    fetch: bool,
    reply: oneshot::Sender<Result<Answer, String>>,
}

enum Answer {
    Affected(u64),
    Rows(Vec<Vec<Value>>),
}

/// `flowgate.Transaction`: the PostgreSQL transaction a transactional
/// handler runs in. flowgate commits it (with the inbox row and the
/// handler's outputs) when the handler returns normally, and rolls it back
/// when it raises or answers anything but an ack.
#[pyclass(module = "flowgate._flowgate", name = "Transaction", frozen)]
pub(crate) struct Transaction {
    requests: mpsc::Sender<Request>,
}

fn param(v: &Bound<'_, PyAny>) -> PyResult<Param> {
    if v.is_none() {
        Ok(Param::Null)
    } else if v.is_instance_of::<PyBool>() {
        Ok(Param::Bool(v.extract()?))
    } else if v.is_instance_of::<PyInt>() {
        Ok(Param::Int(v.extract()?))
    } else if v.is_instance_of::<PyFloat>() {
        Ok(Param::Float(v.extract()?))
    } else if v.is_instance_of::<PyString>() {
        Ok(Param::Text(v.extract()?))
    } else if let Ok(b) = v.cast::<PyBytes>() {
        Ok(Param::Bytes(b.as_bytes().to_vec()))
    } else {
        Err(PyTypeError::new_err(format!(
            "a SQL parameter is None, bool, int, float, str or bytes, not {}",
            v.get_type().name()?
        )))
    }
}

impl Transaction {
    fn run(
        &self,
        py: Python<'_>,
        sql: String,
        params: &Bound<'_, PyTuple>,
        fetch: bool,
    ) -> PyResult<Answer> {
        let params = params
            .iter()
            .map(|p| param(&p))
            .collect::<PyResult<Vec<_>>>()?;
        let (reply, answer) = oneshot::channel();
        let request = Request {
            sql,
            params,
            fetch,
            reply,
        };
        let over = || PyRuntimeError::new_err("the transaction is over (its handler returned)");
        // The waits are the delivery task's: without the GIL.
        py.detach(|| {
            self.requests.blocking_send(request).map_err(|_| ())?;
            answer.blocking_recv().map_err(|_| ())
        })
        .map_err(|()| over())?
        .map_err(PyRuntimeError::new_err)
    }
}

#[pymethods]
impl Transaction {
    /// Runs one SQL statement (``$1``, ``$2``… for the parameters: None,
    /// bool, int, float, str or bytes); returns the rows it affected.
    #[pyo3(signature = (sql, *params))]
    fn execute(&self, py: Python<'_>, sql: String, params: &Bound<'_, PyTuple>) -> PyResult<u64> {
        match self.run(py, sql, params, false)? {
            Answer::Affected(n) => Ok(n),
            Answer::Rows(rows) => Ok(rows.len() as u64),
        }
    }

    /// Runs one query; returns its rows as tuples (integers, floats, text,
    /// bytes, booleans and NULL; cast other types in the SQL, e.g.
    /// ``amount::text``).
    #[pyo3(signature = (sql, *params))]
    fn fetch<'py>(
        &self,
        py: Python<'py>,
        sql: String,
        params: &Bound<'py, PyTuple>,
    ) -> PyResult<Vec<Bound<'py, PyTuple>>> {
        let rows = match self.run(py, sql, params, true)? {
            Answer::Rows(rows) => rows,
            Answer::Affected(_) => Vec::new(),
        };
        rows.into_iter()
            .map(|row| {
                let values = row
                    .into_iter()
                    .map(|v| match v {
                        Value::Null => Ok(py.None().into_bound(py)),
                        Value::Bool(b) => Ok(PyBool::new(py, b).to_owned().into_any()),
                        Value::Int(i) => Ok(PyInt::new(py, i).into_any()),
                        Value::Float(f) => Ok(PyFloat::new(py, f).into_any()),
                        Value::Text(s) => Ok(PyString::new(py, &s).into_any()),
                        Value::Bytes(b) => Ok(PyBytes::new(py, &b).into_any()),
                    })
                    .collect::<PyResult<Vec<_>>>()?;
                PyTuple::new(py, values)
            })
            .collect()
    }
}

/// Runs `request` in `tx`.
async fn serve(tx: &mut PgTransaction, request: Request) {
    let mut q = sqlx::query(&request.sql);
    for p in request.params {
        q = match p {
            Param::Null => q.bind(Option::<String>::None),
            Param::Bool(b) => q.bind(b),
            Param::Int(i) => q.bind(i),
            Param::Float(f) => q.bind(f),
            Param::Text(s) => q.bind(s),
            Param::Bytes(b) => q.bind(b),
        };
    }
    let answer = if request.fetch {
        match q.fetch_all(&mut **tx).await {
            Ok(rows) => rows
                .iter()
                .map(values)
                .collect::<Result<Vec<_>, _>>()
                .map(Answer::Rows),
            Err(e) => Err(e.to_string()),
        }
    } else {
        q.execute(&mut **tx)
            .await
            .map(|r| Answer::Affected(r.rows_affected()))
            .map_err(|e| e.to_string())
    };
    // The handler may be gone (it raised meanwhile): nobody to tell.
    let _ = request.reply.send(answer);
}

/// One row's values, by their PostgreSQL types.
fn values(row: &PgRow) -> Result<Vec<Value>, String> {
    (0..row.len())
        .map(|i| {
            let name = row.column(i).type_info().name().to_owned();
            let get = |e: sqlx::Error| format!("column {i} ({name}): {e}");
            Ok(match name.as_str() {
                "BOOL" => row
                    .try_get::<Option<bool>, _>(i)
                    .map_err(get)?
                    .map_or(Value::Null, Value::Bool),
                "INT2" => row
                    .try_get::<Option<i16>, _>(i)
                    .map_err(get)?
                    .map_or(Value::Null, |v| Value::Int(v.into())),
                "INT4" => row
                    .try_get::<Option<i32>, _>(i)
                    .map_err(get)?
                    .map_or(Value::Null, |v| Value::Int(v.into())),
                "INT8" => row
                    .try_get::<Option<i64>, _>(i)
                    .map_err(get)?
                    .map_or(Value::Null, Value::Int),
                "FLOAT4" => row
                    .try_get::<Option<f32>, _>(i)
                    .map_err(get)?
                    .map_or(Value::Null, |v| Value::Float(v.into())),
                "FLOAT8" => row
                    .try_get::<Option<f64>, _>(i)
                    .map_err(get)?
                    .map_or(Value::Null, Value::Float),
                "TEXT" | "VARCHAR" | "BPCHAR" | "NAME" => row
                    .try_get::<Option<String>, _>(i)
                    .map_err(get)?
                    .map_or(Value::Null, Value::Text),
                "BYTEA" => row
                    .try_get::<Option<Vec<u8>>, _>(i)
                    .map_err(get)?
                    .map_or(Value::Null, Value::Bytes),
                other => {
                    return Err(format!(
                        "column {i} is of type {other}, which fetch does not convert: cast it in the SQL (e.g. ::text)"
                    ))
                }
            })
        })
        .collect()
}

/// One stage's transactional Python handler.
pub(crate) struct PyTxHandler {
    pub(crate) func: Arc<Py<PyAny>>,
    /// The stage's `output`: where outputs go by default.
    pub(crate) target: Option<Target>,
}

#[async_trait::async_trait]
impl TxHandler for PyTxHandler {
    async fn handle(&self, tx: &mut PgTransaction, d: &Delivery) -> Result<Outcome, HandlerError> {
        let (requests, mut incoming) = mpsc::channel(1);
        let func = self.func.clone();
        let input = Input::One(Box::new(d.clone()));
        let mut call = tokio::task::spawn_blocking(move || {
            Python::attach(|py| call(py, &func, input, Transaction { requests }))
        });
        // Serve the handler's statements until it returns; the channel
        // closes when Python drops its `Transaction`.
        let mut open = true;
        let replied = loop {
            tokio::select! {
                request = incoming.recv(), if open => match request {
                    Some(r) => serve(tx, r).await,
                    None => open = false,
                },
                done = &mut call => break done,
            }
        };
        // Statements sent after the handler returned are refused (the
        // receiver drops here).
        drop(incoming);
        match replied.map_err(|e| format!("the handler's thread failed: {e}"))? {
            Replied::One(r) => r.outcome(d, self.target.as_ref()),
            Replied::Batch(mut rs) => match rs.is_empty() {
                true => Err("the handler returned no result".into()),
                false => rs.swap_remove(0).outcome(d, self.target.as_ref()),
            },
        }
    }
}

/// Calls `func(message, tx)` on this (blocking-pool) thread.
fn call(py: Python<'_>, func: &Py<PyAny>, input: Input, tx: Transaction) -> Replied {
    let (arg, first, batch_len) = match bridge::make_arg(py, input) {
        Ok(made) => made,
        Err((e, batch_len)) => return bridge::replied(py, Err(e), batch_len),
    };
    let tx = match Bound::new(py, tx) {
        Ok(tx) => tx,
        Err(e) => return bridge::replied(py, Err(e), batch_len),
    };
    let var = bridge::current_message(py).ok();
    let token = var.and_then(|v| v.call_method1("set", (first,)).ok());
    let r = func.bind(py).call1((arg, tx));
    if let (Some(var), Some(token)) = (var, token) {
        let _ = var.call_method1("reset", (token,));
    }
    bridge::replied(py, r.as_ref().map_err(|e| e.clone_ref(py)), batch_len)
}
