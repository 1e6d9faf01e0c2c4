//! The order gateway: `POST /orders`, `GET /orders/{id}`, `GET /orders/stats`.
//!
//! `POST /orders` answers, in this order of checks:
//!
//! | status | when |
//! |---|---|
//! | 415 | the content type is not JSON (`application/json` or `*/*+json`) |
//! | 413 | the body exceeds `[orders] max_body_bytes` |
//! | 400 | the body is not JSON |
//! | 422 | a field is invalid: `{"error", "fields": [{"field", "message"}]}` |
//! | 503 + `Retry-After` | the pipeline is saturated: `orders.created`'s queue is above its `watermark` (from `high` until it falls to `low`, as sampled by the engine's depth monitor, or the room below `high` is spent until the next sample), the optional `[orders] max_backlog` is passed, `max_pending` publishes are in flight, or the publish failed with backpressure (blocked broker, open breaker with a full spool), no connection, a nack or a confirm timeout |
//! | 202 | `order.created` is confirmed by the broker: `{"order_id", "status": "queued"}` |
//!
//! The event is persistent, `mandatory`, with `message_id` = the order id, a
//! `traceparent` header (continuing the request's, or a new trace) and
//! content type `application/json`.
//!
//! Watermarks are the primary bound: a slow payment provider fills
//! `orders.reserved` past its watermark, which pauses the reserve stage,
//! which fills `orders.created` past its own, which makes this gateway
//! answer 503. `max_backlog` (the ready messages of the work queues summed,
//! same samples) is a coarser, optional second bound, off by default.

use super::model::{self, Order, ORDER_CREATED};
use super::status::OrderStatus;
use super::OrdersService;
use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use flowgate::ingress::IngressError;
use flowgate::trace;
use flowgate::{EngineHandle, Ingress, Output};
use futures::StreamExt;
use serde_json::json;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::sync::Semaphore;
use tracing::{debug, warn, Instrument};

/// What the gateway's handlers see.
#[derive(Clone)]
pub struct GatewayState {
    ingress: Ingress,
    service: Arc<OrdersService>,
    /// Queues whose depths add up to the backlog of `max_backlog`.
    backlog_queues: Vec<String>,
    /// Bounds the publishes in flight (`[orders] max_pending`).
    pending: Arc<Semaphore>,
}

impl GatewayState {
    /// Publishing through the engine's `ingress` (admitting by its queue
    /// watermarks, and by `max_backlog` over the depths of
    /// `backlog_queues`), recording statuses in `service`.
    pub fn new(ingress: Ingress, service: Arc<OrdersService>, backlog_queues: Vec<String>) -> Self {
        let pending = Arc::new(Semaphore::new(service.config.max_pending as usize));
        Self {
            ingress,
            service,
            backlog_queues,
            pending,
        }
    }

    /// Ready messages in the work queues at the last depth sample.
    fn backlog(&self) -> u64 {
        self.backlog_queues
            .iter()
            .filter_map(|q| self.ingress.queue_depth(q))
            .sum()
    }
}

fn is_json(req: &HttpRequest) -> bool {
    let Some(ct) = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

async fn create(
    s: web::Data<GatewayState>,
    req: HttpRequest,
    mut payload: web::Payload,
) -> HttpResponse {
    let svc = &s.service;
    let max = svc.config.max_body_bytes;
    if !is_json(&req) {
        svc.stats.count_error("gateway-415");
        return HttpResponse::UnsupportedMediaType()
            .json(json!({ "error": "content type must be application/json" }));
    }
    let too_large = || {
        svc.stats.count_error("gateway-413");
        HttpResponse::PayloadTooLarge().json(json!({ "error": "body too large", "max_bytes": max }))
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max) {
        return too_large();
    }
    let mut body = web::BytesMut::new();
    while let Some(chunk) = payload.next().await {
        match chunk {
            Ok(c) => {
                if (body.len() + c.len()) as u64 > max {
                    return too_large();
                }
                body.extend_from_slice(&c);
            }
            Err(e) => {
                svc.stats.count_error("gateway-400");
                return HttpResponse::BadRequest()
                    .json(json!({ "error": format!("reading the body: {e}") }));
            }
        }
    }
    let value: serde_json::Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            svc.stats.count_error("gateway-400");
            return HttpResponse::BadRequest()
                .json(json!({ "error": format!("malformed JSON: {e}") }));
        }
    };
    let new = match model::validate(&value) {
        Ok(n) => n,
        Err(fields) => {
            svc.stats.count_error("gateway-422");
            return HttpResponse::UnprocessableEntity()
                .json(json!({ "error": "invalid order", "fields": fields }));
        }
    };
    if svc.config.max_backlog > 0 {
        let backlog = s.backlog();
        if backlog > svc.config.max_backlog {
            svc.stats.count_error("gateway-503-backlog");
            debug!(backlog, "order refused: pipeline backlog above max_backlog");
            return IngressError::busy("pipeline backlog above max_backlog").error_response();
        }
    }
    let Ok(_permit) = s.pending.clone().try_acquire_owned() else {
        svc.stats.count_error("gateway-503-pending");
        return IngressError::busy("too many orders awaiting a broker confirm").error_response();
    };
    // After the permit: a refusal by max_pending must not spend the
    // watermark headroom.
    if let Err(e) = s.ingress.admit(&svc.config.exchange, ORDER_CREATED) {
        // Logged and counted by the engine as well.
        svc.stats.count_error("gateway-503-watermark");
        return e.error_response();
    }
    let order = new.into_order();
    publish(&s, &req, order).await
}

async fn publish(s: &GatewayState, req: &HttpRequest, order: Order) -> HttpResponse {
    let svc = &s.service;
    let mut out = Output::new(svc.config.exchange.clone(), ORDER_CREATED, order.to_json())
        .with_message_id(order.order_id.clone());
    out.properties = out
        .properties
        .with_content_type("application/json".into())
        .with_timestamp(order.created_at_ms / 1000);
    let header = |name| req.headers().get(name).and_then(|v| v.to_str().ok());
    let mut parent =
        trace::TraceHeaders::new(header(trace::TRACEPARENT), header(trace::TRACESTATE));
    if parent.traceparent().is_none() && !trace::enabled() {
        // Every order gets a trace id, exported or not.
        parent = trace::TraceHeaders::new_root();
    }
    let span = trace::publish_span_from(&parent, &mut out);
    match s.ingress.publish(out).instrument(span).await {
        Ok(_) => {
            svc.status
                .advance(&order.order_id, OrderStatus::Created, order.created_at_ms);
            HttpResponse::Accepted()
                .insert_header((header::LOCATION, format!("/orders/{}", order.order_id)))
                .json(json!({ "order_id": order.order_id, "status": "queued" }))
        }
        Err(e) => {
            if e.is_overload() {
                svc.stats.count_error("gateway-503-publish");
                debug!(error = %e, "order refused: publish failed");
            } else {
                svc.stats.count_error("gateway-publish-error");
                warn!(error = %e, "order.created could not be published");
            }
            e.error_response()
        }
    }
}

async fn get(s: web::Data<GatewayState>, id: web::Path<String>) -> HttpResponse {
    match s.service.status.get(&id) {
        Some(e) => HttpResponse::Ok().json(e),
        None => HttpResponse::NotFound().json(json!({ "error": "unknown order", "order_id": *id })),
    }
}

async fn stats(s: web::Data<GatewayState>) -> HttpResponse {
    let svc = &s.service;
    let effects = svc.ledger.report().await.ok();
    let books = svc.payment.report().await.ok();
    HttpResponse::Ok().json(json!({
        "shipped": svc.stats.shipped(),
        "failed": svc.stats.failed(),
        "errors": svc.stats.errors(),
        "throttle_hits": effects.as_ref().map(|e| e.throttle_hits).unwrap_or(svc.stats.throttled()),
        "duplicate_provider_calls": books.as_ref().map(|b| b.duplicate_calls()),
        "latency_ms": { "p50": svc.stats.latency_ms(0.5), "p99": svc.stats.latency_ms(0.99) },
        "peak_depth": s.ingress.queue_peaks(),
        "depth": s.ingress.queue_depths(),
    }))
}

/// Registers the gateway's routes (to mount them on another actix-web app,
/// with `web::Data<GatewayState>` in its app data).
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/orders", web::post().to(create))
        .route("/orders/stats", web::get().to(stats))
        .route("/orders/{id}", web::get().to(get));
}

/// Serves the gateway on `bind` beside the engine, which stops it first
/// when it shuts down (no order arrives at a draining pipeline). Returns
/// the bound address.
pub fn serve(
    engine: &EngineHandle,
    bind: &str,
    state: GatewayState,
) -> std::io::Result<SocketAddr> {
    let data = web::Data::new(state);
    engine.serve(bind, move |cfg| {
        cfg.app_data(data.clone()).configure(routes);
    })
}
