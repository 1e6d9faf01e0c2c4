//! The HTTP servers: `/metrics`, `/healthz`, `/readyz` on `[http] bind`,
//! the publish ingress on its own listener (`[ingress] bind`, see
//! [`ingress`]) and the management API on a third (`[management] bind`, see
//! [`management`]), so that reaching the scrape port lets nobody publish or
//! steer the engine.

pub(crate) mod console;
pub(crate) mod ingress;
pub(crate) mod management;

use crate::control::Control;
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use flowgate_actors::Metrics;
use serde_json::json;
use std::net::SocketAddr;
use std::time::Duration;

/// What the HTTP handlers can see.
#[derive(Clone)]
pub(crate) struct HttpState {
    /// Rendered by `/metrics`.
    pub(crate) metrics: Metrics,
    /// Consulted by `/readyz`.
    pub(crate) control: Control,
}

/// The token of an `Authorization: Bearer <token>` header, if any.
pub(crate) fn bearer_token(req: &HttpRequest) -> Option<&[u8]> {
    req.headers()
        .get(actix_web::http::header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
}

async fn metrics(s: web::Data<HttpState>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(s.metrics.render())
}

/// Liveness: answers while the process serves requests.
pub(crate) async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({ "status": "alive" }))
}

async fn readyz(s: web::Data<HttpState>) -> HttpResponse {
    management::readiness_response(&s.control.readiness())
}

/// Registers the routes on an app.
fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/metrics", web::get().to(metrics))
        .route("/healthz", web::get().to(healthz))
        .route("/readyz", web::get().to(readyz));
}

/// Binds and spawns the server on the current actix system.
pub(crate) fn start(
    bind: &str,
    state: HttpState,
) -> std::io::Result<(actix_web::dev::ServerHandle, SocketAddr)> {
    let data = web::Data::new(state);
    spawn_server(bind, move |cfg| {
        cfg.app_data(data.clone()).configure(routes);
    })
}

/// The bounds of one listener.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    /// Most open connections (per worker; there is one worker).
    pub(crate) max_connections: usize,
    /// How long a client may take to send a request's headers.
    pub(crate) header_timeout: Duration,
    /// How long in-flight requests may take to finish at a graceful stop.
    pub(crate) shutdown_timeout: Duration,
}

impl Default for Limits {
    /// actix-web's own defaults, and a 5 s graceful stop.
    fn default() -> Self {
        Self {
            max_connections: 25_000,
            header_timeout: Duration::from_secs(5),
            shutdown_timeout: Duration::from_secs(5),
        }
    }
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
    spawn_server_with(bind, Limits::default(), configure)
}

/// [`spawn_server`] with explicit bounds. Fixed by actix-http whatever the
/// bounds: at most 96 request headers and 128 KiB of request head (more is
/// answered 400/431 and the connection closed); HTTP/1.1 only.
pub(crate) fn spawn_server_with<F>(
    bind: &str,
    limits: Limits,
    configure: F,
) -> std::io::Result<(actix_web::dev::ServerHandle, SocketAddr)>
where
    F: Fn(&mut web::ServiceConfig) + Clone + Send + 'static,
{
    let server = HttpServer::new(move || App::new().configure(configure.clone()))
        .workers(1)
        .disable_signals()
        .max_connections(limits.max_connections)
        .client_request_timeout(limits.header_timeout)
        .keep_alive(limits.header_timeout)
        .shutdown_timeout(limits.shutdown_timeout.as_secs().max(1))
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
