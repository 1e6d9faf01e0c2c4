//! The HTTP server: `/metrics`, `/healthz`, `/readyz`, and the publish ingress.
//!
//! `POST /publish/{exchange}/{routing_key}` answers 413 over `[limits]
//! max_message_bytes`; 503 with `Retry-After` while a queue the message
//! routes to (by the configured bindings) is above its `watermark` (from
//! `high` until it falls to `low`, as sampled by the depth monitor) or on
//! publish backpressure; 404 when unroutable; 202 when confirmed or spooled.

use crate::ingress::{Ingress, IngressError};
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use flowgate_actors::publisher::PublisherHandle;
use flowgate_actors::stage::StageProbe;
use flowgate_actors::{Metrics, Output};
use serde_json::json;
use std::net::SocketAddr;

/// The longest AMQP short string (message id, content type).
const SHORT_STRING_MAX: usize = 255;

/// What the HTTP handlers can see.
#[derive(Clone)]
pub(crate) struct HttpState {
    /// Rendered by `/metrics`.
    pub(crate) metrics: Metrics,
    /// Consulted by `/readyz`.
    pub(crate) probes: Vec<StageProbe>,
    /// `/readyz` shows its breaker state and spool.
    pub(crate) publisher: PublisherHandle,
    /// `POST /publish/...`: size limit, watermark admission, publish.
    pub(crate) ingress: Ingress,
}

async fn metrics(s: web::Data<HttpState>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(s.metrics.render())
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({ "status": "alive" }))
}

async fn readyz(s: web::Data<HttpState>) -> HttpResponse {
    let connected = s.metrics.connection_up.get() == 1;
    let blocked = s.metrics.broker_blocked.get() == 1;
    let stages: Vec<_> = s
        .probes
        .iter()
        .map(|p| json!({ "stage": p.name, "consuming": p.consuming(), "in_flight": p.in_flight() }))
        .collect();
    let ready = connected && !blocked && s.probes.iter().all(|p| p.consuming());
    let body = json!({
        "ready": ready,
        "connected": connected,
        "broker_blocked": blocked,
        "breaker": s.publisher.breaker_state().as_str(),
        "spooled": s.publisher.spooled(),
        "stages": stages,
    });
    if ready {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable()
            .insert_header(("Retry-After", "1"))
            .json(body)
    }
}

async fn publish(
    s: web::Data<HttpState>,
    path: web::Path<(String, String)>,
    req: HttpRequest,
    body: web::Bytes,
) -> Result<HttpResponse, IngressError> {
    s.ingress.check_size(body.len())?;
    let (exchange, routing_key) = path.into_inner();
    s.ingress.admit(&exchange, &routing_key)?;
    let id = req
        .headers()
        .get("x-message-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let content_type = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok());
    // AMQP short strings end at 255 bytes (lapin panics beyond).
    for (name, v) in [
        ("x-message-id", Some(id.as_str())),
        ("content-type", content_type),
    ] {
        if v.is_some_and(|v| v.len() > SHORT_STRING_MAX) {
            return Ok(HttpResponse::BadRequest()
                .json(json!({ "error": format!("{name} longer than {SHORT_STRING_MAX} bytes") })));
        }
    }
    let mut out = Output::new(exchange, routing_key, body).with_message_id(id.clone());
    if let Some(ct) = content_type {
        out.properties = out.properties.with_content_type(ct.into());
    }
    let tp = req
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .map(flowgate_actors::trace::child_of)
        .unwrap_or_else(flowgate_actors::trace::new_traceparent);
    flowgate_actors::trace::set_traceparent(&mut out.properties, tp);
    let accepted = s.ingress.publish(out).await?;
    Ok(HttpResponse::Accepted().json(json!({ "message_id": id, "status": accepted.as_str() })))
}

/// Registers the routes on an app.
fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/metrics", web::get().to(metrics))
        .route("/healthz", web::get().to(healthz))
        .route("/readyz", web::get().to(readyz))
        .route("/publish/{exchange}/{routing_key}", web::post().to(publish));
}

/// Binds and spawns the server on the current actix system.
pub(crate) fn start(
    bind: &str,
    state: HttpState,
) -> std::io::Result<(actix_web::dev::ServerHandle, SocketAddr)> {
    let limit = usize::try_from(state.ingress.max_message_bytes())
        .unwrap_or(usize::MAX)
        .saturating_add(1);
    let data = web::Data::new(state);
    spawn_server(bind, move |cfg| {
        cfg.app_data(data.clone())
            .app_data(web::PayloadConfig::new(limit))
            .configure(routes);
    })
}

/// Binds an HTTP server (one worker, no signal handling of its own: the
/// engine owns shutdown) with the routes `configure` registers, spawns it on
/// the current actix system, and returns its handle and bound address.
pub(crate) fn spawn_server<F>(
    bind: &str,
    configure: F,
) -> std::io::Result<(actix_web::dev::ServerHandle, SocketAddr)>
where
    F: Fn(&mut web::ServiceConfig) + Clone + Send + 'static,
{
    let server = HttpServer::new(move || App::new().configure(configure.clone()))
        .workers(1)
        .disable_signals()
        .shutdown_timeout(5)
        .bind(bind)?;
    let addr = server
        .addrs()
        .first()
        .copied()
        .ok_or_else(|| std::io::Error::other("no address bound"))?;
    let server = server.run();
    let handle = server.handle();
    actix_rt::spawn(server);
    Ok((handle, addr))
}
