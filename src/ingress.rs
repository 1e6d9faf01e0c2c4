//! The ingress: how messages from outside (HTTP, a host's own gateway)
//! enter the pipeline. [`Ingress`] admits a message by its route (refusing
//! a route no declared queue is bound to, and refusing it while a queue it
//! routes to is above its watermark, from the depth monitor's last sample),
//! publishes it within `[ingress] publish_timeout` (confirmed, or spooled),
//! and says why when it cannot: one [`IngressError`] with
//! [`retry_after`](IngressError::retry_after), turned into an HTTP response
//! in one place ([`IngressError::error_response`]) for `POST /publish` and
//! any host server alike.

use crate::depth::{Denied, IngressGate};
use actix_web::http::{header, StatusCode};
use actix_web::HttpResponse;
use flowgate_actors::envelope::set_header;
use flowgate_actors::Output;
use flowgate_actors::{Published, PublisherHandle};
use flowgate_actors::{QueueLevels, Refusal};
use lapin::types::AMQPValue;
use serde_json::json;
use std::collections::BTreeMap;
use std::time::Duration;
use tracing::warn;

/// Seconds a client is told to wait after a refusal it can retry soon (a
/// watermark, backpressure, a broker hiccup).
const RETRY_SOON: Duration = Duration::from_secs(1);
/// ...and after a failure that is not expected to clear as quickly.
const RETRY_LATER: Duration = Duration::from_secs(5);

/// How a message the ingress took went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accepted {
    /// The broker confirmed it.
    Confirmed,
    /// The broker is not taking publishes (breaker open): the message is
    /// durable in the spool and will be delivered when it is.
    Spooled,
}

impl Accepted {
    /// `confirmed` or `spooled`, as HTTP bodies say it.
    pub fn as_str(&self) -> &'static str {
        match self {
            Accepted::Confirmed => "confirmed",
            Accepted::Spooled => "spooled",
        }
    }
}

/// Why the ingress did not take a message.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IngressError {
    /// The body is larger than `[limits] max_message_bytes` (or a host's own
    /// bound).
    #[error("message too large ({size} bytes, at most {max})")]
    TooLarge {
        /// The body's size.
        size: u64,
        /// The bound.
        max: u64,
    },
    /// A header or path segment is over-long or not valid (named).
    #[error("invalid {what}: {reason}")]
    Invalid {
        /// The header or path segment at fault.
        what: String,
        /// Why.
        reason: String,
    },
    /// No valid bearer token (`[ingress] auth = "token"`).
    #[error("a valid bearer token is required (Authorization: Bearer <token>)")]
    Unauthorized,
    /// The route is not one of `[ingress] routes`.
    #[error("publishing to {exchange}/{routing_key} is not allowed")]
    Forbidden {
        /// The exchange asked for.
        exchange: String,
        /// The routing key asked for.
        routing_key: String,
    },
    /// No declared queue is bound to the route (by the configured
    /// bindings): the message would be unroutable.
    #[error("no queue is bound to {exchange}/{routing_key}")]
    NoRoute {
        /// The exchange asked for.
        exchange: String,
        /// The routing key asked for.
        routing_key: String,
    },
    /// The client did not send its body within `[ingress] body_timeout`.
    #[error("request body not received within {0:?}")]
    BodyTimeout(Duration),
    /// The broker did not confirm within `[ingress] publish_timeout` and
    /// there is no spool to keep the message: the broker may still take it,
    /// so a retry must carry the same `Idempotency-Key`.
    #[error("no broker confirm within {0:?}; retry with the same Idempotency-Key")]
    Timeout(Duration),
    /// A queue the message routes to is above its watermark.
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// The host's own admission refused it (a bound of its own).
    #[error("overloaded, retry later: {reason}")]
    Busy {
        /// Why, for the client.
        reason: String,
    },
    /// The publish failed: backpressure, no connection, a nack, a confirm
    /// timeout, unroutable, shutting down.
    #[error(transparent)]
    Publish(#[from] flowgate_actors::Error),
}

impl IngressError {
    fn no_route(exchange: &str, routing_key: &str) -> Self {
        IngressError::NoRoute {
            exchange: exchange.to_owned(),
            routing_key: routing_key.to_owned(),
        }
    }

    /// A refusal by the host's own admission (answered like backpressure).
    pub fn busy(reason: impl Into<String>) -> Self {
        IngressError::Busy {
            reason: reason.into(),
        }
    }

    /// True when the pipeline is saturated or the broker briefly
    /// unavailable (a watermark, the host's own bound, backpressure, no
    /// connection, a nack, a confirm timeout): the normal way of pushing
    /// back, worth a retry soon rather than an alarm.
    pub fn is_overload(&self) -> bool {
        use flowgate_actors::Error as E;
        matches!(
            self,
            IngressError::Refused(_)
                | IngressError::Busy { .. }
                | IngressError::Timeout(_)
                | IngressError::Publish(
                    E::Backpressure(_) | E::NotConnected | E::ConfirmTimeout(_) | E::Nacked
                )
        )
    }

    /// How long the client should wait before trying again; `None` when
    /// the same request will never be taken (a 4xx).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            _ if self.is_overload() => Some(RETRY_SOON),
            _ if self.status().is_client_error() => None,
            _ => Some(RETRY_LATER),
        }
    }

    /// [`retry_after`](Self::retry_after) in whole seconds, at least 1: the
    /// `Retry-After` header's value, for every front end that answers with it.
    pub fn retry_after_secs(&self) -> Option<u64> {
        self.retry_after().map(|after| after.as_secs().max(1))
    }

    /// The queue that refused, for a watermark refusal.
    pub fn queue(&self) -> Option<&str> {
        match self {
            IngressError::Refused(r) => Some(r.queue()),
            _ => None,
        }
    }

    /// The HTTP status: 400 invalid, 401 no token, 403 route not allowed,
    /// 404 no queue bound (or returned unroutable), 408 body too slow, 413
    /// too large, else 503.
    pub fn status(&self) -> StatusCode {
        match self {
            IngressError::Invalid { .. } => StatusCode::BAD_REQUEST,
            IngressError::Unauthorized => StatusCode::UNAUTHORIZED,
            IngressError::Forbidden { .. } => StatusCode::FORBIDDEN,
            IngressError::NoRoute { .. }
            | IngressError::Publish(flowgate_actors::Error::Unroutable { .. }) => {
                StatusCode::NOT_FOUND
            }
            IngressError::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            IngressError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            _ => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// A 400 naming `what` (a header or path segment).
    pub(crate) fn invalid(what: impl Into<String>, reason: impl Into<String>) -> Self {
        IngressError::Invalid {
            what: what.into(),
            reason: reason.into(),
        }
    }

    /// The HTTP answer: [`status`](Self::status), `Retry-After` when
    /// [`retry_after`](Self::retry_after) says so, and a JSON body
    /// `{"error", "queue"?, "max_bytes"?}`. Every ingress answers through it.
    pub fn error_response(&self) -> HttpResponse {
        let mut body = json!({ "error": self.to_string() });
        if let Some(q) = self.queue() {
            body["queue"] = json!(q);
        }
        if let IngressError::TooLarge { max, .. } = self {
            body["max_bytes"] = json!(max);
        }
        let mut resp = HttpResponse::build(self.status());
        if let IngressError::Unauthorized = self {
            resp.insert_header((header::WWW_AUTHENTICATE, "Bearer"));
        }
        if let Some(secs) = self.retry_after_secs() {
            resp.insert_header((header::RETRY_AFTER, secs.to_string()));
        }
        resp.json(body)
    }
}

impl actix_web::ResponseError for IngressError {
    fn status_code(&self) -> StatusCode {
        self.status()
    }
    fn error_response(&self) -> HttpResponse {
        IngressError::error_response(self)
    }
}

/// The way in for messages from outside, from
/// [`EngineHandle::ingress`](crate::EngineHandle::ingress). Cheap to clone.
#[derive(Clone)]
pub struct Ingress {
    publisher: PublisherHandle,
    gate: IngressGate,
    max_message_bytes: u64,
    /// `[ingress] publish_timeout`: the longest a publish may keep its
    /// caller waiting.
    publish_timeout: Duration,
}

impl Ingress {
    pub(crate) fn new(
        publisher: PublisherHandle,
        gate: IngressGate,
        max_message_bytes: u64,
        publish_timeout: Duration,
    ) -> Self {
        Self {
            publisher,
            gate,
            max_message_bytes,
            publish_timeout,
        }
    }

    /// `[ingress] publish_timeout`.
    pub fn publish_timeout(&self) -> Duration {
        self.publish_timeout
    }

    /// `[limits] max_message_bytes`.
    pub fn max_message_bytes(&self) -> u64 {
        self.max_message_bytes
    }

    /// Refuses a body over `[limits] max_message_bytes`.
    pub fn check_size(&self, size: usize) -> Result<(), IngressError> {
        let size = u64::try_from(size).unwrap_or(u64::MAX);
        if size > self.max_message_bytes {
            return Err(IngressError::TooLarge {
                size,
                max: self.max_message_bytes,
            });
        }
        Ok(())
    }

    /// Admits one message for `exchange`/`routing_key`: refuses a route no
    /// declared queue is bound to ([`IngressError::NoRoute`], so it never
    /// reaches the publisher nor its breaker), or says which queue refuses
    /// it (logged, and counted in `flowgate_ingress_refused_total`).
    /// No request waits for a depth sample. An admission uses up a share of
    /// the queue's room below its watermark until the next sample: admit
    /// only what is about to be published.
    pub fn admit(&self, exchange: &str, routing_key: &str) -> Result<(), IngressError> {
        self.gate.admit(exchange, routing_key).map_err(|d| match d {
            Denied::NoRoute => IngressError::no_route(exchange, routing_key),
            Denied::Watermark(r) => r.into(),
        })
    }

    /// Puts a partition key where the partitioned queues (`queues[].partitions`)
    /// that `msg`'s exchange and routing key reach read it: the header
    /// their `partition_key` names, or the correlation id. A queue
    /// partitioned by routing key or message id reads those, which the
    /// message has already: a `key` for it is refused, as is no `key` for
    /// one partitioned by a header or the correlation id (without it every
    /// such message would land on one partition). Routes to no
    /// partitioned queue ignore `key`.
    pub fn set_partition_key(
        &self,
        msg: &mut Output,
        key: Option<&str>,
    ) -> Result<(), IngressError> {
        use crate::config::BuiltinKey;
        let cfg = self.gate.config();
        for q in crate::depth::routed_entries(cfg, &msg.exchange, &msg.routing_key) {
            let (Some(by), Some(_)) = (q.partition_key(), q.partitions) else {
                continue;
            };
            let wants = match &by {
                BuiltinKey::Header(_) | BuiltinKey::CorrelationId => true,
                BuiltinKey::MessageId | BuiltinKey::RoutingKey => false,
            };
            let key = match (wants, key) {
                (true, Some(key)) => key,
                (false, None) => continue,
                (true, None) => {
                    return Err(IngressError::invalid(
                        "partition key",
                        format!(
                            "required: queue `{}` is partitioned by a header or the correlation id",
                            q.name
                        ),
                    ))
                }
                (false, Some(_)) => {
                    return Err(IngressError::invalid(
                        "partition key",
                        format!(
                        "not taken: queue `{}` is partitioned by the routing key or the message id",
                        q.name
                    ),
                    ))
                }
            };
            match by {
                BuiltinKey::Header(h) => set_header(
                    &mut msg.properties,
                    &h,
                    AMQPValue::LongString(key.to_owned().into()),
                ),
                _ => {
                    msg.properties =
                        std::mem::take(&mut msg.properties).with_correlation_id(key.into());
                }
            }
        }
        Ok(())
    }

    /// Publishes (persistent, `mandatory`) within `publish_timeout`:
    /// confirmed by the broker, or spooled (while the breaker is open, or
    /// when no confirm came in time and a spool exists: that copy is held
    /// until the broker answers the publish, and deleted if it confirms, so
    /// the message goes out once — see [`PublisherHandle::send_within`]);
    /// without a spool a late confirm is [`IngressError::Timeout`] (503,
    /// retry with the same message id).
    ///
    /// [`PublisherHandle::send_within`]: flowgate_actors::PublisherHandle::send_within
    pub async fn publish(&self, mut msg: Output) -> Result<Accepted, IngressError> {
        // Its first publish: the stamp end-to-end latency is measured from.
        flowgate_actors::envelope::stamp_first_published(&mut msg.properties);
        let id = msg.properties.message_id().clone();
        let deadline = tokio::time::Instant::now() + self.publish_timeout;
        let Some(published) = self.publisher.send_within(msg, deadline).await? else {
            warn!(
                message_id = ?id,
                "no confirm within the ingress publish_timeout and no spool; answering 503"
            );
            return Err(IngressError::Timeout(self.publish_timeout));
        };
        Ok(match published {
            Published::Confirmed => Accepted::Confirmed,
            Published::Spooled => Accepted::Spooled,
        })
    }

    /// [`check_size`](Self::check_size), [`admit`](Self::admit) by the
    /// message's route, then [`publish`](Self::publish).
    pub async fn send(&self, msg: Output) -> Result<Accepted, IngressError> {
        self.check_size(msg.body.len())?;
        self.admit(&msg.exchange, &msg.routing_key)?;
        self.publish(msg).await
    }

    /// Ready messages in a watched queue at the depth monitor's last sample.
    pub fn queue_depth(&self, queue: &str) -> Option<u64> {
        self.levels().depth(queue)
    }

    /// Every watched queue's depth at the last sample.
    pub fn queue_depths(&self) -> BTreeMap<String, u64> {
        self.levels().current()
    }

    /// Every watched queue's highest sampled depth since the start.
    pub fn queue_peaks(&self) -> BTreeMap<String, u64> {
        self.levels().peaks()
    }

    fn levels(&self) -> &QueueLevels {
        self.gate.levels()
    }

    /// Refuses a route no declared queue is bound to (as [`admit`](Self::admit)
    /// does), without taking any watermark headroom.
    pub fn check_bound(&self, exchange: &str, routing_key: &str) -> Result<(), IngressError> {
        self.gate
            .bound_queues(exchange, routing_key)
            .map(|_| ())
            .ok_or_else(|| IngressError::no_route(exchange, routing_key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::body::MessageBody;

    fn retry_after(r: &HttpResponse) -> Option<&str> {
        r.headers()
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
    }

    fn body(r: HttpResponse) -> serde_json::Value {
        let bytes = r.into_body().try_into_bytes().expect("a body in memory");
        serde_json::from_slice(&bytes).expect("json")
    }

    #[test]
    fn a_watermark_refusal_is_503_with_retry_after_and_the_queue() {
        let e = IngressError::from(Refusal::HeadroomSpent { queue: "q1".into() });
        let r = e.error_response();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(retry_after(&r), Some("1"));
        assert_eq!(body(r)["queue"], "q1");
        assert!(e.is_overload());
    }

    #[test]
    fn publish_failures_map_by_kind() {
        use flowgate_actors::Error as E;
        let cases = [
            (E::Backpressure("full".into()), 503, Some("1")),
            (E::NotConnected, 503, Some("1")),
            (E::Nacked, 503, Some("1")),
            (E::ShuttingDown, 503, Some("5")),
            (
                E::Unroutable {
                    code: 312,
                    text: "NO_ROUTE".into(),
                },
                404,
                None,
            ),
        ];
        for (err, status, after) in cases {
            let label = err.to_string();
            let r = IngressError::from(err).error_response();
            assert_eq!(r.status().as_u16(), status, "{label}");
            assert_eq!(retry_after(&r), after, "{label}");
        }
    }

    #[test]
    fn refusals_before_publishing_are_final_4xx_and_the_deadline_is_503() {
        let route = || ("ex".to_owned(), "k".to_owned());
        let cases = [
            (
                IngressError::invalid("header x-message-id", "too long"),
                400,
            ),
            (IngressError::Unauthorized, 401),
            (
                IngressError::Forbidden {
                    exchange: route().0,
                    routing_key: route().1,
                },
                403,
            ),
            (
                IngressError::NoRoute {
                    exchange: route().0,
                    routing_key: route().1,
                },
                404,
            ),
            (IngressError::BodyTimeout(Duration::from_secs(1)), 408),
        ];
        for (e, status) in cases {
            let label = e.to_string();
            let r = e.error_response();
            assert_eq!(r.status().as_u16(), status, "{label}");
            assert_eq!(retry_after(&r), None, "{label}: final");
        }
        let r = IngressError::Unauthorized.error_response();
        assert_eq!(r.headers().get(header::WWW_AUTHENTICATE).unwrap(), "Bearer");
        let e = IngressError::Timeout(Duration::from_secs(5));
        assert!(e.is_overload());
        let r = e.error_response();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(retry_after(&r), Some("1"));
        assert!(body(r)["error"]
            .as_str()
            .unwrap()
            .contains("Idempotency-Key"));
    }

    #[test]
    fn too_large_is_413_without_retry_after() {
        let e = IngressError::TooLarge { size: 10, max: 5 };
        let r = e.error_response();
        assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(retry_after(&r), None);
        assert_eq!(body(r)["max_bytes"], 5);
        assert!(IngressError::busy("mine").retry_after().is_some());
    }
}
