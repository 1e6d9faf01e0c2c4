//! A Python function as a stage's [`Handler`].
//!
//! `async def` handlers run on the app's event loop (started through the
//! [`Bridge`]); plain `def` handlers run on the runtime's blocking thread
//! pool, never on the event loop, so a slow one holds only its own stage's
//! worker slots. Either way the stage's `concurrency` bounds how many run
//! at once: the engine calls [`Handler::handle`] from that many workers.
//! The engine's tasks wait for the answer without the GIL.

use crate::bridge::{self, Bridge, Input, Job, Replied};
use crate::output::Drafted;
use flowgate::config::Target;
use flowgate::{Delivery, Handler, HandlerError, Outcome};
use pyo3::prelude::*;
use std::sync::Arc;
use tokio::sync::oneshot;

/// How a registered function is called.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// `async def`: on the event loop.
    Async,
    /// `def`: on a blocking thread.
    Blocking,
}

/// One stage's Python handler.
pub(crate) struct PyHandler {
    pub(crate) func: Arc<Py<PyAny>>,
    pub(crate) kind: Kind,
    /// Takes lists of messages (`@app.batch_handler`).
    pub(crate) batch: bool,
    /// The stage's `output`: where outputs go by default.
    pub(crate) target: Option<Target>,
    pub(crate) bridge: Arc<Bridge>,
}

impl PyHandler {
    async fn call(&self, input: Input) -> Result<Replied, HandlerError> {
        match self.kind {
            Kind::Async => {
                let (tx, rx) = oneshot::channel();
                let job = Job::Call {
                    func: self.func.clone(),
                    input,
                    reply: tx,
                };
                if !self.bridge.submit(job) {
                    return Err("the app's event loop is not running".into());
                }
                rx.await
                    .map_err(|_| "the event loop dropped the handler's task".into())
            }
            Kind::Blocking => {
                let func = self.func.clone();
                tokio::task::spawn_blocking(move || {
                    Python::attach(|py| call_blocking(py, &func, input))
                })
                .await
                .map_err(|e| format!("the handler's thread failed: {e}").into())
            }
        }
    }
}

/// Calls a plain `def` handler on this (blocking-pool) thread.
fn call_blocking(py: Python<'_>, func: &Py<PyAny>, input: Input) -> Replied {
    let (arg, first, batch_len) = match bridge::make_arg(py, input) {
        Ok(made) => made,
        Err((e, batch_len)) => return bridge::replied(py, Err(e), batch_len),
    };
    let var = bridge::current_message(py).ok();
    let token = var.and_then(|v| v.call_method1("set", (first,)).ok());
    let r = func.bind(py).call1((arg,));
    if let (Some(var), Some(token)) = (var, token) {
        let _ = var.call_method1("reset", (token,));
    }
    bridge::replied(py, r.as_ref().map_err(|e| e.clone_ref(py)), batch_len)
}

#[async_trait::async_trait]
impl Handler for PyHandler {
    async fn handle(&self, d: &Delivery) -> Result<Outcome, HandlerError> {
        let input = match self.batch {
            true => Input::Batch(vec![d.clone()]),
            false => Input::One(Box::new(d.clone())),
        };
        match self.call(input).await? {
            Replied::One(r) => r.outcome(d, self.target.as_ref()),
            Replied::Batch(mut rs) => match rs.is_empty() {
                true => Err("the batch handler returned no result".into()),
                false => rs.swap_remove(0).outcome(d, self.target.as_ref()),
            },
        }
    }

    async fn handle_batch(&self, batch: Vec<Delivery>) -> Vec<Result<Outcome, HandlerError>> {
        if !self.batch {
            let mut out = Vec::with_capacity(batch.len());
            for d in &batch {
                out.push(self.handle(d).await);
            }
            return out;
        }
        let replied = match self.call(Input::Batch(batch.clone())).await {
            Ok(r) => r,
            Err(e) => {
                let text = e.to_string();
                return batch.iter().map(|_| Err(text.clone().into())).collect();
            }
        };
        let results: Vec<Drafted> = match replied {
            Replied::Batch(rs) => rs,
            Replied::One(r) => vec![r],
        };
        // One result per delivery, by position; the engine retries the
        // deliveries left without one and ignores extra results.
        results
            .into_iter()
            .zip(&batch)
            .map(|(r, d)| r.outcome(d, self.target.as_ref()))
            .collect()
    }
}
