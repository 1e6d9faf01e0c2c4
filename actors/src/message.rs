//! The handler contract: a [`Delivery`] in, an [`Outcome`] out.

use bytes::Bytes;
use futures::future::BoxFuture;
use lapin::types::{AMQPValue, ShortString};
use lapin::BasicProperties;
use std::future::Future;

/// The error a handler returns; it dead-letters the message with reason
/// `handler-error` (or retries, once retries are configured).
pub type HandlerError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// One message taken from a stage's queue, as the handler sees it.
#[derive(Clone, Debug)]
pub struct Delivery {
    /// The payload, shared without copying.
    pub body: Bytes,
    /// The AMQP properties (message id, content type, headers, ...).
    pub properties: BasicProperties,
    /// True when the broker has delivered this message before (it may have
    /// been processed already: see dedup).
    pub redelivered: bool,
    /// The exchange the message was published to.
    pub exchange: String,
    /// The routing key it was published with.
    pub routing_key: String,
    /// The queue it was consumed from.
    pub queue: String,
    /// The stage that consumed it.
    pub stage: String,
}

impl Delivery {
    /// The `message_id` property, if set.
    pub fn message_id(&self) -> Option<&str> {
        self.properties.message_id().as_ref().map(|s| s.as_str())
    }

    /// A header value, if present.
    pub fn header(&self, name: &str) -> Option<&AMQPValue> {
        self.properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get(name))
    }

    /// A string header (long or short string), if present.
    pub fn header_str(&self, name: &str) -> Option<String> {
        header_string(self.header(name)?)
    }

    /// An integer header, if present.
    pub fn header_i64(&self, name: &str) -> Option<i64> {
        header_int(self.header(name)?)
    }

    /// Which handling attempt this is: 1, or the retry ladder's count
    /// ([`ATTEMPT`](crate::envelope::ATTEMPT)) on a copy back from the
    /// stage's own retry tier (the engine strips the header from every
    /// other delivery before the handler sees it).
    pub fn attempt(&self) -> u32 {
        self.header_i64(crate::envelope::ATTEMPT)
            .and_then(|i| u32::try_from(i).ok())
            .filter(|i| *i >= 1)
            .unwrap_or(1)
    }

    /// Republishes this delivery's body and properties unchanged.
    pub fn forward(&self, exchange: &str, routing_key: &str) -> Output {
        Output {
            exchange: exchange.to_owned(),
            routing_key: routing_key.to_owned(),
            body: self.body.clone(),
            properties: self.properties.clone(),
        }
    }
}

pub(crate) use crate::envelope::{header_int, header_string};

/// A message a handler wants published once its input is done.
#[derive(Clone, Debug)]
pub struct Output {
    /// Target exchange ("" is the default exchange).
    pub exchange: String,
    /// Routing key.
    pub routing_key: String,
    /// Payload.
    pub body: Bytes,
    /// AMQP properties, published as they are (delivery mode included,
    /// unless the publisher forces persistence).
    pub properties: BasicProperties,
}

impl Output {
    /// A new output with default properties, persistent (`delivery_mode = 2`).
    pub fn new(
        exchange: impl Into<String>,
        routing_key: impl Into<String>,
        body: impl Into<Bytes>,
    ) -> Self {
        Self {
            exchange: exchange.into(),
            routing_key: routing_key.into(),
            body: body.into(),
            properties: BasicProperties::default().with_delivery_mode(2),
        }
    }

    /// Replaces the properties.
    pub fn with_properties(mut self, properties: BasicProperties) -> Self {
        self.properties = properties;
        self
    }

    /// Sets the `message_id` property.
    ///
    /// # Panics
    ///
    /// When `id` is over 255 bytes (inside a handler the panic is caught
    /// and dead-letters the input as `panic`). For an id from outside, use
    /// [`Output::try_with_message_id`].
    pub fn with_message_id(mut self, id: impl Into<String>) -> Self {
        self.properties = self
            .properties
            .with_message_id(ShortString::from(id.into()));
        self
    }

    /// Sets the `message_id` property, or says why it cannot be one.
    pub fn try_with_message_id(
        mut self,
        id: &str,
    ) -> Result<Self, crate::envelope::InvalidShortString> {
        let id = crate::envelope::short_string("message id", id)?;
        self.properties = self.properties.with_message_id(id);
        Ok(self)
    }

    /// Adds (or replaces) one header.
    ///
    /// # Panics
    ///
    /// When `name` is over 255 bytes; see [`try_set_header`] for names from outside.
    pub fn with_header(mut self, name: &str, value: AMQPValue) -> Self {
        set_header(&mut self.properties, name, value);
        self
    }
}

pub use crate::envelope::set_header;

/// Sets one header on a property set, or says why `name` cannot be a header key.
pub fn try_set_header(
    props: &mut BasicProperties,
    name: &str,
    value: AMQPValue,
) -> Result<(), crate::envelope::InvalidShortString> {
    let name = crate::envelope::short_string("header name", name)?;
    let mut table = props.headers().clone().unwrap_or_default();
    table.insert(name, value);
    *props = std::mem::take(props).with_headers(table);
    Ok(())
}

/// What a handler decided for one delivery.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum Outcome {
    /// Done. Publish `outputs` (all confirmed) and then ack the input.
    Ack {
        /// Messages to publish before the input is acked.
        outputs: Vec<Output>,
    },
    /// A transient failure: try again later (through the stage's retry
    /// ladder; without one, the message is dead-lettered with this reason).
    Retry {
        /// Why; becomes `x-flowgate-error` on the dead letter if retries run out.
        reason: String,
    },
    /// A transient failure that must not be retried before `after`: like
    /// [`Outcome::Retry`], through the first tier of the stage's ladder
    /// whose delay is at least `after` (the longest tier when none is),
    /// counting as an attempt all the same. A caller told "come back in
    /// 30 s" (a `Retry-After`, a lock's lease) says so here.
    RetryAfter {
        /// Why; becomes `x-flowgate-error` on the dead letter if retries run out.
        reason: String,
        /// The shortest wait acceptable before the next attempt.
        after: std::time::Duration,
    },
    /// A permanent failure: dead-letter with this reason.
    DeadLetter {
        /// Becomes the `x-flowgate-reason` header; the metric label is
        /// `handler` (labels are a closed set, see [`crate::envelope::Reason`]).
        reason: String,
    },
    /// The handler's outputs cannot be published (e.g. a service answered
    /// with a malformed output document): dead-letter the input with
    /// reason `invalid-output` (publishing would fail the same way forever).
    InvalidOutput {
        /// What is wrong; becomes `x-flowgate-error` on the dead letter.
        reason: String,
    },
}

impl Outcome {
    /// Ack with no outputs (a sink).
    pub fn ack() -> Self {
        Outcome::Ack {
            outputs: Vec::new(),
        }
    }

    /// Ack after publishing these outputs.
    pub fn ack_with(outputs: Vec<Output>) -> Self {
        Outcome::Ack { outputs }
    }

    /// Retry later.
    pub fn retry(reason: impl Into<String>) -> Self {
        Outcome::Retry {
            reason: reason.into(),
        }
    }

    /// Retry later, not before `after` (see [`Outcome::RetryAfter`]).
    pub fn retry_after(reason: impl Into<String>, after: std::time::Duration) -> Self {
        Outcome::RetryAfter {
            reason: reason.into(),
            after,
        }
    }

    /// Dead-letter now.
    pub fn dead_letter(reason: impl Into<String>) -> Self {
        Outcome::DeadLetter {
            reason: reason.into(),
        }
    }

    /// Dead-letter now as `invalid-output`.
    pub fn invalid_output(reason: impl Into<String>) -> Self {
        Outcome::InvalidOutput {
            reason: reason.into(),
        }
    }
}

/// A stage's processing logic.
///
/// Called concurrently (up to the stage's `concurrency`) on one shared value,
/// so keep state in `Arc`s or concurrent maps. A panic is caught at this
/// boundary and dead-letters the message with reason `panic`; the stage goes on.
///
/// ```
/// use flowgate_actors::{Delivery, Handler, HandlerError, Outcome};
///
/// struct Uppercase;
///
/// #[async_trait::async_trait]
/// impl Handler for Uppercase {
///     async fn handle(&self, d: &Delivery) -> Result<Outcome, HandlerError> {
///         let text = std::str::from_utf8(&d.body)?.to_uppercase();
///         let out = d.forward("shop", "text.upper");
///         Ok(Outcome::ack_with(vec![flowgate_actors::Output { body: text.into(), ..out }]))
///     }
/// }
/// ```
#[async_trait::async_trait]
pub trait Handler: Send + Sync + 'static {
    /// Processes one delivery.
    async fn handle(&self, delivery: &Delivery) -> Result<Outcome, HandlerError>;

    /// Processes a batch of deliveries in one call; used instead of
    /// [`Handler::handle`] on a stage with a `batch` setting (see
    /// [`BatchPolicy`](crate::BatchPolicy)), e.g. to write them to a
    /// database in one statement.
    ///
    /// Returns one result per delivery, **in the same order**: each is
    /// judged on its own (its own ack, retry, dead letter and outputs), so
    /// one failing message fails only itself. A result vector of the wrong
    /// length loses nothing: deliveries without a result are retried
    /// (through the ladder; without one, dead-lettered as `handler`) and
    /// extra results are ignored, with a warning. A panic fails the whole
    /// batch (each delivery is dead-lettered as `panic`).
    ///
    /// The default calls [`Handler::handle`] on each delivery in turn, so
    /// a handler written for one message also runs on a batching stage.
    ///
    /// ```
    /// use flowgate_actors::{Delivery, Handler, HandlerError, Outcome};
    ///
    /// /// Acks every delivery of a batch but those with an empty body.
    /// struct BulkInsert;
    ///
    /// #[async_trait::async_trait]
    /// impl Handler for BulkInsert {
    ///     async fn handle(&self, d: &Delivery) -> Result<Outcome, HandlerError> {
    ///         Ok(self.handle_batch(vec![d.clone()]).await.remove(0)?)
    ///     }
    ///
    ///     async fn handle_batch(
    ///         &self,
    ///         batch: Vec<Delivery>,
    ///     ) -> Vec<Result<Outcome, HandlerError>> {
    ///         // One round trip to the database for the whole batch here.
    ///         batch
    ///             .iter()
    ///             .map(|d| match d.body.is_empty() {
    ///                 true => Ok(Outcome::dead_letter("empty")),
    ///                 false => Ok(Outcome::ack()),
    ///             })
    ///             .collect()
    ///     }
    /// }
    /// ```
    async fn handle_batch(&self, batch: Vec<Delivery>) -> Vec<Result<Outcome, HandlerError>> {
        let mut results = Vec::with_capacity(batch.len());
        for d in &batch {
            results.push(self.handle(d).await);
        }
        results
    }
}

/// A handler made from an async closure taking an owned [`Delivery`].
pub struct FnHandler<F>(F);

/// Wraps an async closure as a [`Handler`].
pub fn handler_fn<F, Fut>(f: F) -> FnHandler<F>
where
    F: Fn(Delivery) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Outcome, HandlerError>> + Send + 'static,
{
    FnHandler(f)
}

impl<F, Fut> Handler for FnHandler<F>
where
    F: Fn(Delivery) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Outcome, HandlerError>> + Send + 'static,
{
    fn handle<'a, 'b, 'c>(
        &'a self,
        delivery: &'b Delivery,
    ) -> BoxFuture<'c, Result<Outcome, HandlerError>>
    where
        'a: 'c,
        'b: 'c,
        Self: 'c,
    {
        Box::pin((self.0)(delivery.clone()))
    }
}

/// What a stage's handler expects in the body; checked before the handler
/// runs, so a body that cannot be what the handler expects is dead-lettered
/// with reason `malformed` instead of failing (or retrying) in the handler.
/// A stage's `payload` key: `bytes` or `json`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Payload {
    /// Any bytes (no check).
    #[default]
    Bytes,
    /// A JSON document.
    Json,
}

impl Payload {
    /// Checks a body; `Err` says why it is malformed.
    pub fn check(&self, body: &[u8]) -> Result<(), String> {
        match self {
            Payload::Bytes => Ok(()),
            Payload::Json => serde_json::from_slice::<serde::de::IgnoredAny>(body)
                .map(|_| ())
                .map_err(|e| format!("body is not JSON: {e}")),
        }
    }
}
