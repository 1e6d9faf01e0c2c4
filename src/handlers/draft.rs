//! [`OutputDraft`]: an output as a handler outside Rust describes it — a
//! body, and where and with what only when it differs — completed from the
//! input and the stage, as the `http` handler and the Python binding do.

use crate::config::Target;
use bytes::Bytes;
use flowgate_actors::envelope;
use flowgate_actors::lapin::types::AMQPValue;
use flowgate_actors::{Delivery, Output};

/// An output described by a handler written outside Rust (an `http`
/// service's answer, a Python handler): [`build`](Self::build) completes
/// it from the input delivery and the stage's `output` target.
///
/// ```
/// use flowgate::config::Target;
/// use flowgate::{Delivery, OutputDraft};
/// use flowgate::lapin::BasicProperties;
///
/// let input = Delivery {
///     body: "{}".into(),
///     properties: BasicProperties::default().with_message_id("o-1".into()),
///     redelivered: false,
///     exchange: "shop".into(),
///     routing_key: "order.created".into(),
///     queue: "orders".into(),
///     stage: "reserve".into(),
/// };
/// let target = Target { exchange: "shop".into(), routing_key: "order.reserved".into() };
/// let out = OutputDraft::new("reserved").build(&input, Some(&target))?;
/// assert_eq!((out.exchange.as_str(), out.routing_key.as_str()), ("shop", "order.reserved"));
/// assert_eq!(out.properties.message_id().as_ref().unwrap().as_str(), "o-1");
/// # Ok::<(), String>(())
/// ```
#[derive(Clone, Debug, Default, PartialEq)]
pub struct OutputDraft {
    /// The exchange; `None`: the stage's `output` exchange.
    pub exchange: Option<String>,
    /// The routing key; `None`: the stage's `output` routing key.
    pub routing_key: Option<String>,
    /// The payload.
    pub body: Bytes,
    /// Replaces the input's `message_id`.
    pub message_id: Option<String>,
    /// Replaces the input's `content_type`.
    pub content_type: Option<String>,
    /// Added to (or replacing) the input's headers, in order.
    pub headers: Vec<(String, AMQPValue)>,
}

impl OutputDraft {
    /// A draft of `body`, everything else from the input and the stage.
    pub fn new(body: impl Into<Bytes>) -> Self {
        Self {
            body: body.into(),
            ..Self::default()
        }
    }

    /// The output: the input's properties (message id, content type,
    /// headers, delivery mode, ...) with the draft's replacements, sent to
    /// the draft's exchange and routing key or else `target`'s. `Err` says
    /// what is missing or cannot be carried (no destination, a message id,
    /// content type or header name over 255 bytes); such an output
    /// dead-letters its input as `invalid-output`.
    pub fn build(self, input: &Delivery, target: Option<&Target>) -> Result<Output, String> {
        let exchange = self
            .exchange
            .or_else(|| target.map(|t| t.exchange.clone()))
            .ok_or("no exchange, and the stage has no output")?;
        let routing_key = self
            .routing_key
            .or_else(|| target.map(|t| t.routing_key.clone()))
            .ok_or("no routing_key, and the stage has no output")?;
        let mut props = input.properties.clone();
        if let Some(ct) = self.content_type {
            props = props.with_content_type(
                envelope::short_string("content type", &ct).map_err(|e| e.to_string())?,
            );
        }
        if let Some(id) = self.message_id {
            props = props.with_message_id(
                envelope::short_string("message id", &id).map_err(|e| e.to_string())?,
            );
        }
        for (k, v) in self.headers {
            flowgate_actors::try_set_header(&mut props, &k, v).map_err(|e| e.to_string())?;
        }
        Ok(Output {
            exchange,
            routing_key,
            body: self.body,
            properties: props,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flowgate_actors::lapin::types::FieldTable;
    use flowgate_actors::lapin::BasicProperties;

    fn input() -> Delivery {
        let mut h = FieldTable::default();
        h.insert("kept".into(), envelope::text("yes"));
        Delivery {
            body: Bytes::from_static(b"in"),
            properties: BasicProperties::default()
                .with_message_id("m-1".into())
                .with_content_type("text/plain".into())
                .with_delivery_mode(2)
                .with_headers(h),
            redelivered: false,
            exchange: "ex".into(),
            routing_key: "in".into(),
            queue: "q".into(),
            stage: "s".into(),
        }
    }

    fn target() -> Target {
        Target {
            exchange: "out-ex".into(),
            routing_key: "out".into(),
        }
    }

    #[test]
    fn properties_start_from_the_input_and_the_stage_gives_the_destination() {
        let out = OutputDraft::new("b")
            .build(&input(), Some(&target()))
            .unwrap();
        assert_eq!(
            (out.exchange.as_str(), out.routing_key.as_str()),
            ("out-ex", "out")
        );
        assert_eq!(out.body, "b");
        assert_eq!(out.properties, input().properties, "unchanged properties");
    }

    #[test]
    fn replacements_win() {
        let d = OutputDraft {
            exchange: Some("e2".into()),
            routing_key: Some("k2".into()),
            message_id: Some("m-2".into()),
            content_type: Some("application/json".into()),
            headers: vec![("added".into(), AMQPValue::LongLongInt(3))],
            ..OutputDraft::new("b")
        };
        let out = d.build(&input(), None).unwrap();
        let p = &out.properties;
        assert_eq!(
            (out.exchange.as_str(), out.routing_key.as_str()),
            ("e2", "k2")
        );
        assert_eq!(p.message_id().as_ref().unwrap().as_str(), "m-2");
        assert_eq!(
            p.content_type().as_ref().unwrap().as_str(),
            "application/json"
        );
        assert!(envelope::header(p, "kept").is_some());
        assert_eq!(
            envelope::header(p, "added"),
            Some(&AMQPValue::LongLongInt(3))
        );
    }

    #[test]
    fn what_cannot_be_carried_is_an_error() {
        let long = "x".repeat(256);
        assert!(
            OutputDraft::new("b").build(&input(), None).is_err(),
            "no destination"
        );
        let bad = [
            OutputDraft {
                message_id: Some(long.clone()),
                ..OutputDraft::new("b")
            },
            OutputDraft {
                content_type: Some(long.clone()),
                ..OutputDraft::new("b")
            },
            OutputDraft {
                headers: vec![(long, AMQPValue::Boolean(true))],
                ..OutputDraft::new("b")
            },
        ];
        for d in bad {
            assert!(d.build(&input(), Some(&target())).is_err());
        }
    }
}
