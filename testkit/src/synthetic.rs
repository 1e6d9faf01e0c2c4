//! A handler on its own: a synthetic [`Delivery`] in, its [`Outcome`] out,
//! no broker and no engine.
//!
//! ```
//! use flowgate::{handler_fn, Outcome};
//! use flowgate_testkit::synthetic::{run_handler, DeliveryBuilder, OutcomeExt};
//!
//! # futures::executor::block_on(async {
//! let shout = handler_fn(|d| async move {
//!     let text = std::str::from_utf8(&d.body)?.to_uppercase();
//!     let out = flowgate::Output::new("shop", "text.upper", text);
//!     Ok(Outcome::ack_with(vec![out]))
//! });
//! let delivery = DeliveryBuilder::new("hello").message_id("m-1").build();
//! let outcome = run_handler(&shout, &delivery).await.unwrap();
//! assert_eq!(outcome.outputs()[0].body, "HELLO");
//! assert_eq!(outcome.outputs()[0].routing_key, "text.upper");
//! # });
//! ```
//!
//! What the engine does around a handler is not done here: the stage's
//! `payload` check, size limit, signature check and dedup claim run before
//! it, and a panic is caught and dead-letters the message as `panic` (here
//! it fails the test). Test those end to end ([`crate::pipeline`]).

use bytes::Bytes;
use flowgate::envelope;
use flowgate::lapin::types::{AMQPValue, ShortString};
use flowgate::lapin::BasicProperties;
use flowgate::{Delivery, Handler, HandlerError, Outcome, Output};

/// Builds a [`Delivery`] as a stage would hand it to its handler.
///
/// Defaults: no properties, not redelivered, exchange, routing key, queue
/// and stage all empty.
#[derive(Clone, Debug)]
pub struct DeliveryBuilder {
    delivery: Delivery,
}

impl DeliveryBuilder {
    /// A delivery carrying `body`.
    pub fn new(body: impl Into<Bytes>) -> DeliveryBuilder {
        DeliveryBuilder {
            delivery: Delivery {
                body: body.into(),
                properties: BasicProperties::default(),
                redelivered: false,
                exchange: String::new(),
                routing_key: String::new(),
                queue: String::new(),
                stage: String::new(),
            },
        }
    }

    /// The delivery the next stage would see of `output`: its body,
    /// properties, exchange and routing key (to chain handlers).
    pub fn from_output(output: &Output) -> DeliveryBuilder {
        DeliveryBuilder::new(output.body.clone())
            .properties(output.properties.clone())
            .exchange(&output.exchange)
            .routing_key(&output.routing_key)
    }

    /// Sets the `message_id` property.
    ///
    /// # Panics
    ///
    /// When `id` is over 255 bytes (AMQP could not carry it).
    pub fn message_id(mut self, id: &str) -> DeliveryBuilder {
        self.delivery.properties = self.delivery.properties.with_message_id(id.into());
        self
    }

    /// Adds (or replaces) one header.
    ///
    /// # Panics
    ///
    /// When `name` is over 255 bytes.
    pub fn header(mut self, name: &str, value: impl Into<AMQPValue>) -> DeliveryBuilder {
        let props = &mut self.delivery.properties;
        let mut table = props.headers().clone().unwrap_or_default();
        table.insert(ShortString::from(name), value.into());
        *props = props.clone().with_headers(table);
        self
    }

    /// Adds (or replaces) one string header (an AMQP long string).
    ///
    /// # Panics
    ///
    /// When `name` is over 255 bytes.
    pub fn header_str(self, name: &str, value: &str) -> DeliveryBuilder {
        self.header(name, envelope::text(value))
    }

    /// Marks it as the `n`th handling attempt (the retry ladder's
    /// [`envelope::ATTEMPT`] header; the first attempt carries none).
    pub fn attempt(self, n: i64) -> DeliveryBuilder {
        self.header(envelope::ATTEMPT, n)
    }

    /// Replaces the properties (headers included).
    pub fn properties(mut self, properties: BasicProperties) -> DeliveryBuilder {
        self.delivery.properties = properties;
        self
    }

    /// Sets the `content_type` property.
    pub fn content_type(mut self, content_type: &str) -> DeliveryBuilder {
        self.delivery.properties = self
            .delivery
            .properties
            .with_content_type(content_type.into());
        self
    }

    /// Marks it as delivered before (the broker's `redelivered` flag).
    pub fn redelivered(mut self, redelivered: bool) -> DeliveryBuilder {
        self.delivery.redelivered = redelivered;
        self
    }

    /// The exchange it was published to.
    pub fn exchange(mut self, exchange: &str) -> DeliveryBuilder {
        self.delivery.exchange = exchange.to_owned();
        self
    }

    /// The routing key it was published with.
    pub fn routing_key(mut self, routing_key: &str) -> DeliveryBuilder {
        self.delivery.routing_key = routing_key.to_owned();
        self
    }

    /// The queue it was consumed from.
    pub fn queue(mut self, queue: &str) -> DeliveryBuilder {
        self.delivery.queue = queue.to_owned();
        self
    }

    /// The stage that consumed it.
    pub fn stage(mut self, stage: &str) -> DeliveryBuilder {
        self.delivery.stage = stage.to_owned();
        self
    }

    /// The delivery.
    pub fn build(self) -> Delivery {
        self.delivery
    }
}

/// Runs `handler` on one delivery, as a stage without a `batch` setting does.
pub async fn run_handler<H: Handler + ?Sized>(
    handler: &H,
    delivery: &Delivery,
) -> Result<Outcome, HandlerError> {
    handler.handle(delivery).await
}

/// Runs `handler` on a batch, as a stage with a `batch` setting does: one
/// result per delivery, in order ([`Handler::handle_batch`]).
pub async fn run_batch<H: Handler + ?Sized>(
    handler: &H,
    batch: Vec<Delivery>,
) -> Vec<Result<Outcome, HandlerError>> {
    handler.handle_batch(batch).await
}

/// Reading an [`Outcome`] in a test without matching on it (it is
/// `#[non_exhaustive]`).
pub trait OutcomeExt {
    /// True for an ack (with or without outputs).
    fn is_ack(&self) -> bool;
    /// The outputs of an ack; empty for every other outcome.
    fn outputs(&self) -> &[Output];
    /// The reason of a [`Outcome::DeadLetter`] (the dead letter's
    /// [`envelope::REASON`] header).
    fn dead_letter_reason(&self) -> Option<&str>;
    /// The reason of a [`Outcome::Retry`] or [`Outcome::RetryAfter`].
    fn retry_reason(&self) -> Option<&str>;
    /// The reason of a [`Outcome::InvalidOutput`].
    fn invalid_output_reason(&self) -> Option<&str>;
}

impl OutcomeExt for Outcome {
    fn is_ack(&self) -> bool {
        matches!(self, Outcome::Ack { .. })
    }

    fn outputs(&self) -> &[Output] {
        match self {
            Outcome::Ack { outputs } => outputs,
            _ => &[],
        }
    }

    fn dead_letter_reason(&self) -> Option<&str> {
        match self {
            Outcome::DeadLetter { reason } => Some(reason),
            _ => None,
        }
    }

    fn retry_reason(&self) -> Option<&str> {
        match self {
            Outcome::Retry { reason } | Outcome::RetryAfter { reason, .. } => Some(reason),
            _ => None,
        }
    }

    fn invalid_output_reason(&self) -> Option<&str> {
        match self {
            Outcome::InvalidOutput { reason } => Some(reason),
            _ => None,
        }
    }
}

/// Reading an [`Output`]'s properties in a test.
pub trait OutputExt {
    /// The `message_id` property, if set.
    fn message_id(&self) -> Option<&str>;
    /// A string header (long or short string), if present.
    fn header_str(&self, name: &str) -> Option<String>;
}

impl OutputExt for Output {
    fn message_id(&self) -> Option<&str> {
        self.properties.message_id().as_ref().map(|s| s.as_str())
    }

    fn header_str(&self, name: &str) -> Option<String> {
        envelope::header(&self.properties, name).and_then(envelope::header_string)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flowgate::handler_fn;

    #[test]
    fn a_built_delivery_carries_what_was_set() {
        let d = DeliveryBuilder::new("{}")
            .message_id("m-1")
            .header_str("x-tenant", "acme")
            .header("x-n", 7i64)
            .attempt(2)
            .routing_key("order.created")
            .exchange("shop")
            .queue("orders")
            .stage("enrich")
            .redelivered(true)
            .build();
        assert_eq!(d.message_id(), Some("m-1"));
        assert_eq!(d.header_str("x-tenant").as_deref(), Some("acme"));
        assert_eq!(d.header_i64("x-n"), Some(7));
        assert_eq!(d.header_i64(envelope::ATTEMPT), Some(2));
        assert_eq!(
            (d.exchange.as_str(), d.routing_key.as_str()),
            ("shop", "order.created")
        );
        assert_eq!((d.queue.as_str(), d.stage.as_str()), ("orders", "enrich"));
        assert!(d.redelivered);
        assert_eq!(d.body, "{}");
    }

    #[test]
    fn the_next_stage_sees_an_output_as_published() {
        let out = Output::new("shop", "order.enriched", "x")
            .with_message_id("m-2")
            .with_header("x-tenant", envelope::text("acme"));
        let d = DeliveryBuilder::from_output(&out).build();
        assert_eq!(d.message_id(), Some("m-2"));
        assert_eq!(d.header_str("x-tenant").as_deref(), Some("acme"));
        assert_eq!(d.routing_key, "order.enriched");
        assert_eq!(out.message_id(), Some("m-2"));
        assert_eq!(out.header_str("x-tenant").as_deref(), Some("acme"));
    }

    #[test]
    fn outcomes_read_without_matching() {
        let ack = Outcome::ack_with(vec![Output::new("", "q", "b")]);
        assert!(ack.is_ack());
        assert_eq!(ack.outputs().len(), 1);
        assert_eq!(ack.dead_letter_reason(), None);
        let dead = Outcome::dead_letter("no sku");
        assert!(!dead.is_ack());
        assert!(dead.outputs().is_empty());
        assert_eq!(dead.dead_letter_reason(), Some("no sku"));
        assert_eq!(Outcome::retry("later").retry_reason(), Some("later"));
        assert_eq!(
            Outcome::invalid_output("bad").invalid_output_reason(),
            Some("bad")
        );
    }

    #[actix_rt::test]
    async fn handlers_run_alone_and_in_batches() {
        let h = handler_fn(|d| async move {
            match d.body.is_empty() {
                true => Ok(Outcome::dead_letter("empty")),
                false => Ok(Outcome::ack()),
            }
        });
        let full = DeliveryBuilder::new("x").build();
        let empty = DeliveryBuilder::new("").build();
        assert!(run_handler(&h, &full).await.unwrap().is_ack());
        let results = run_batch(&h, vec![empty, full]).await;
        let reasons: Vec<_> = results
            .iter()
            .map(|r| r.as_ref().unwrap().dead_letter_reason())
            .collect();
        assert_eq!(reasons, [Some("empty"), None]);
    }
}
