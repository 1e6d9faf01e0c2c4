//! The publish listener (`[ingress] bind`): `POST /publish/{exchange}/{routing_key}`.
//!
//! Every request is answered at once by the first check it fails, in this
//! order, and none of them reaches the publisher (nor its breaker):
//!
//! | check | answer |
//! |---|---|
//! | more than `max_concurrent` requests in progress | 503 + `Retry-After` |
//! | no valid `Authorization: Bearer` token (`auth = "token"`) | 401 |
//! | a path segment or header (`Idempotency-Key`, `x-message-id`, `Partition-Key`, `content-type`) over 255 bytes, empty or not visible ASCII | 400, naming it |
//! | `Content-Length` over `[limits] max_message_bytes` (before reading the body) | 413 |
//! | the route is not one of `[ingress] routes` | 403 |
//! | no declared queue is bound to the route | 404 |
//! | the body grows past the limit while streamed (chunked) | 413 |
//! | the body does not arrive within `body_timeout` | 408 |
//! | a queue it routes to is above its watermark | 503 + `Retry-After` |
//! | a partitioned queue it routes to reads its key from a header or the correlation id and no `Partition-Key` came, or from the routing key or message id and one came | 400 |
//!
//! Then it is published within `publish_timeout`: 202 `{"message_id",
//! "status": "confirmed" | "spooled"}`, or 503 with `Retry-After`. The
//! message id is `Idempotency-Key`, else `x-message-id`, else a new UUID:
//! a client retrying a 503 or a timeout with the same key produces the same
//! message id, which a dedup stage downstream recognises.
//!
//! With `auth = "none"` (open) nothing published is signed, whatever
//! `[security]` says: a signature then proves only that the sender could
//! reach the port.

use crate::config::{IngressAuth, IngressConfig, Tokens};
use crate::http::{spawn_server_with, Limits};
use crate::ingress::{Ingress, IngressError};
use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use bytes::{Bytes, BytesMut};
use flowgate_actors::envelope::UNSIGNED;
use flowgate_actors::set_header;
use flowgate_actors::trace;
use flowgate_actors::Output;
use futures::StreamExt;
use lapin::types::AMQPValue;
use serde_json::json;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use tracing::Instrument;

/// The longest AMQP short string (exchange, routing key, message id,
/// content type): lapin panics beyond it.
const SHORT_STRING_MAX: usize = 255;

/// The header whose value becomes the message id (a client's retry key).
pub(crate) const IDEMPOTENCY_KEY: &str = "idempotency-key";
/// The older header with the same role; `Idempotency-Key` wins.
pub(crate) const MESSAGE_ID: &str = "x-message-id";
/// The header whose value is the message's partition key, for a route to a
/// queue partitioned by a header or the correlation id
/// ([`Ingress::set_partition_key`]).
pub(crate) const PARTITION_KEY: &str = "partition-key";

/// What the publish handler needs.
struct State {
    ingress: Ingress,
    /// `None`: open (`auth = "none"`).
    tokens: Option<Tokens>,
    /// The routes it may publish to.
    config: IngressConfig,
    /// One permit per request in progress (`max_concurrent`).
    in_progress: Arc<Semaphore>,
}

/// Binds the publish listener and spawns it on the current actix system.
/// A graceful stop lets every accepted request get its answer (each is
/// bounded by `body_timeout` + `publish_timeout`).
pub(crate) fn start(
    config: &IngressConfig,
    ingress: Ingress,
) -> Result<(actix_web::dev::ServerHandle, SocketAddr), crate::Error> {
    let tokens = match config.auth {
        IngressAuth::Token => Some(config.tokens()?),
        IngressAuth::None => None,
    };
    let state = web::Data::new(State {
        ingress,
        tokens,
        config: config.clone(),
        in_progress: Arc::new(Semaphore::new(config.max_concurrent)),
    });
    let limits = Limits {
        max_connections: config.max_connections,
        header_timeout: config.header_timeout,
        shutdown_timeout: config.body_timeout + config.publish_timeout + Duration::from_secs(1),
    };
    spawn_server_with(&config.bind, limits, move |cfg| {
        cfg.app_data(state.clone())
            .route("/publish/{exchange}/{routing_key}", web::post().to(publish))
            .default_service(web::to(|| async {
                HttpResponse::NotFound().json(json!({ "error": "no such endpoint" }))
            }));
    })
    .map_err(crate::Error::Http)
}

async fn publish(
    s: web::Data<State>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, IngressError> {
    let Ok(_permit) = s.in_progress.clone().try_acquire_owned() else {
        return Err(IngressError::busy(
            "too many requests in progress at the ingress",
        ));
    };
    let authenticated = authenticate(&s, &req)?;
    let (exchange, routing_key) = route(&req)?;
    let id = match header_value(&req, IDEMPOTENCY_KEY)? {
        Some(k) => k.to_owned(),
        None => header_value(&req, MESSAGE_ID)?
            .map(str::to_owned)
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
    };
    let content_type = header_value(&req, header::CONTENT_TYPE.as_str())?;
    let max = s.ingress.max_message_bytes();
    if let Some(len) = content_length(&req)? {
        if len > max {
            return Err(IngressError::TooLarge { size: len, max });
        }
    }
    if !s.config.allows(&exchange, &routing_key) {
        return Err(IngressError::Forbidden {
            exchange,
            routing_key,
        });
    }
    // A route no queue is bound to is refused before the body is read;
    // `admit` checks it again with the watermarks once the body is in.
    s.ingress.check_bound(&exchange, &routing_key)?;
    let body = read_body(payload, max, s.config.body_timeout).await?;
    s.ingress.admit(&exchange, &routing_key)?;

    let partition_key = header_value(&req, PARTITION_KEY)?;
    let mut out = Output::new(exchange, routing_key, body).with_message_id(id.clone());
    s.ingress.set_partition_key(&mut out, partition_key)?;
    if let Some(ct) = content_type {
        out.properties = out.properties.with_content_type(ct.into());
    }
    if !authenticated {
        set_header(&mut out.properties, UNSIGNED, AMQPValue::Boolean(true));
    }
    let header = |name| req.headers().get(name).and_then(|v| v.to_str().ok());
    let parent = trace::TraceHeaders::new(header(trace::TRACEPARENT), header(trace::TRACESTATE));
    let span = trace::publish_span_from(&parent, &mut out);
    let accepted = s.ingress.publish(out).instrument(span).await?;
    Ok(HttpResponse::Accepted().json(json!({ "message_id": id, "status": accepted.as_str() })))
}

/// `Ok(true)` for a valid bearer token, `Ok(false)` on an open ingress.
fn authenticate(s: &State, req: &HttpRequest) -> Result<bool, IngressError> {
    let Some(tokens) = &s.tokens else {
        return Ok(false);
    };
    let presented = crate::http::bearer_token(req).ok_or(IngressError::Unauthorized)?;
    if tokens.accepts(presented) {
        Ok(true)
    } else {
        Err(IngressError::Unauthorized)
    }
}

/// The decoded `{exchange}` and `{routing_key}` path segments, each a valid
/// short string.
fn route(req: &HttpRequest) -> Result<(String, String), IngressError> {
    let (exchange, routing_key): (String, String) = req
        .match_info()
        .load()
        .map_err(|e| IngressError::invalid("path", e.to_string()))?;
    for (what, v) in [
        ("exchange path segment", &exchange),
        ("routing key path segment", &routing_key),
    ] {
        if v.len() > SHORT_STRING_MAX {
            return Err(IngressError::invalid(
                what,
                format!("longer than {SHORT_STRING_MAX} bytes"),
            ));
        }
    }
    if exchange.is_empty() {
        return Err(IngressError::invalid(
            "exchange path segment",
            "must not be empty",
        ));
    }
    Ok((exchange, routing_key))
}

/// A header that becomes an AMQP short string: absent, or 1..=255 bytes of
/// visible ASCII.
fn header_value<'r>(req: &'r HttpRequest, name: &str) -> Result<Option<&'r str>, IngressError> {
    let Some(v) = req.headers().get(name) else {
        return Ok(None);
    };
    let v = v
        .to_str()
        .map_err(|_| IngressError::invalid(format!("header {name}"), "not visible ASCII"))?;
    if v.is_empty() {
        return Err(IngressError::invalid(format!("header {name}"), "empty"));
    }
    if v.len() > SHORT_STRING_MAX {
        return Err(IngressError::invalid(
            format!("header {name}"),
            format!("longer than {SHORT_STRING_MAX} bytes"),
        ));
    }
    Ok(Some(v))
}

fn content_length(req: &HttpRequest) -> Result<Option<u64>, IngressError> {
    req.headers()
        .get(header::CONTENT_LENGTH)
        .map(|v| {
            v.to_str()
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or_else(|| IngressError::invalid("header content-length", "not a number"))
        })
        .transpose()
}

/// Reads the body, refusing it as soon as it grows past `max` and when it
/// does not arrive within `timeout` (the rest is never read).
async fn read_body(
    mut payload: web::Payload,
    max: u64,
    timeout: Duration,
) -> Result<Bytes, IngressError> {
    let read = async {
        let mut buf = BytesMut::new();
        while let Some(chunk) = payload.next().await {
            let chunk = chunk.map_err(|e| IngressError::invalid("body", e.to_string()))?;
            let size = u64::try_from(buf.len() + chunk.len()).unwrap_or(u64::MAX);
            if size > max {
                return Err(IngressError::TooLarge { size, max });
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(buf.freeze())
    };
    tokio::time::timeout(timeout, read)
        .await
        .map_err(|_| IngressError::BodyTimeout(timeout))?
}
