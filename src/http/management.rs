//! The management API (`[management] bind`): the engine's state and its
//! live controls, for operators and `flowgate ctl`.
//!
//! | route | answer |
//! |---|---|
//! | `GET /healthz` | 200 while the process serves requests (liveness; no token) |
//! | `GET /readyz` | 200 when ready, else 503 + `Retry-After` with every reason (no token) |
//! | `GET /status` | readiness, publisher and every stage |
//! | `GET /stages` | every stage: state, in flight, prefetch, workers, pause causes |
//! | `GET /stages/{name}` | one stage (404 if unknown) |
//! | `POST /stages/{name}/pause` | stops its intake (cause `operator`) |
//! | `POST /stages/{name}/resume` | clears the operator's pause |
//! | `PUT /stages/{name}/concurrency` | `{"workers": n}` (1..=prefetch) pins the workers; `{"workers": null}` hands them back to autoscaling |
//! | `GET /publisher` | breaker, spool, unconfirmed, rate |
//! | `PUT /publisher/rate` | `{"rate": n, "burst": m}` (`burst` optional; `rate` 0: unlimited) |
//!
//! Every route but `/healthz` and `/readyz` needs `Authorization: Bearer
//! <token>` (401 otherwise). Bodies are JSON of at most 4 KiB; anything else
//! is a 400 naming the problem.

use crate::config::Tokens;
use crate::control::{Control, ControlError, Readiness};
use crate::http::{bearer_token, spawn_server};
use actix_web::dev::Payload;
use actix_web::http::{header, StatusCode};
use actix_web::{web, FromRequest, HttpRequest, HttpResponse, ResponseError};
use serde::Deserialize;
use serde_json::json;
use std::future::{ready, Ready};
use std::net::SocketAddr;

/// The largest request body accepted.
const MAX_BODY: usize = 4 * 1024;

/// What the handlers need.
struct State {
    control: Control,
    tokens: Tokens,
}

/// A refused management request.
#[derive(Debug, thiserror::Error)]
enum ApiError {
    #[error("a valid `Authorization: Bearer <token>` is required")]
    Unauthorized,
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error("invalid request body: {0}")]
    Body(String),
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Control(ControlError::UnknownStage(_)) => StatusCode::NOT_FOUND,
            ApiError::Control(ControlError::Invalid(_)) | ApiError::Body(_) => {
                StatusCode::BAD_REQUEST
            }
            ApiError::Control(ControlError::Gone(_)) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let mut resp = HttpResponse::build(self.status_code());
        if let ApiError::Unauthorized = self {
            resp.insert_header((header::WWW_AUTHENTICATE, "Bearer"));
        }
        resp.json(json!({ "error": self.to_string() }))
    }
}

/// Proof that the request carried an accepted token: an extractor, so a
/// route cannot forget the check.
struct Operator;

impl FromRequest for Operator {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let ok = req
            .app_data::<web::Data<State>>()
            .zip(bearer_token(req))
            .is_some_and(|(s, presented)| s.tokens.accepts(presented));
        ready(if ok {
            Ok(Operator)
        } else {
            Err(ApiError::Unauthorized)
        })
    }
}

/// Binds and spawns the management server on the current actix system,
/// with the operator's console under `/ui` when `console` is given.
pub(crate) fn start(
    bind: &str,
    control: Control,
    tokens: Tokens,
    console: Option<super::console::Console>,
) -> std::io::Result<(actix_web::dev::ServerHandle, SocketAddr)> {
    let state = web::Data::new(State { control, tokens });
    let console = console.map(web::Data::new);
    spawn_server(bind, move |cfg| {
        if let Some(c) = &console {
            super::console::routes(cfg, c.clone());
        }
        cfg.app_data(state.clone())
            .app_data(
                web::JsonConfig::default()
                    .limit(MAX_BODY)
                    .error_handler(|e, _| ApiError::Body(e.to_string()).into()),
            )
            .route("/healthz", web::get().to(super::healthz))
            .route("/readyz", web::get().to(readyz))
            .route("/status", web::get().to(status))
            .route("/stages", web::get().to(stages))
            .route("/stages/{name}", web::get().to(stage))
            .route("/stages/{name}/pause", web::post().to(pause))
            .route("/stages/{name}/resume", web::post().to(resume))
            .route("/stages/{name}/concurrency", web::put().to(concurrency))
            .route("/publisher", web::get().to(publisher))
            .route("/publisher/rate", web::put().to(rate))
            .default_service(web::to(|| async {
                HttpResponse::NotFound().json(json!({ "error": "no such endpoint" }))
            }));
    })
}

/// `/readyz`: 200 or 503 with the reasons; the same on `[http] bind`.
pub(crate) fn readiness_response(r: &Readiness) -> HttpResponse {
    if r.ready {
        HttpResponse::Ok().json(r)
    } else {
        HttpResponse::ServiceUnavailable()
            .insert_header((header::RETRY_AFTER, "1"))
            .json(r)
    }
}

async fn readyz(s: web::Data<State>) -> HttpResponse {
    readiness_response(&s.control.readiness())
}

async fn status(_: Operator, s: web::Data<State>) -> HttpResponse {
    HttpResponse::Ok().json(s.control.readiness())
}

async fn stages(_: Operator, s: web::Data<State>) -> HttpResponse {
    HttpResponse::Ok().json(json!({ "stages": s.control.stages() }))
}

async fn stage(
    _: Operator,
    s: web::Data<State>,
    name: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(s.control.stage(&name)?))
}

async fn pause(
    _: Operator,
    s: web::Data<State>,
    name: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(s.control.pause_stage(&name).await?))
}

async fn resume(
    _: Operator,
    s: web::Data<State>,
    name: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(s.control.resume_stage(&name).await?))
}

/// `PUT /stages/{name}/concurrency`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Concurrency {
    /// `null`: back to autoscaling.
    workers: Option<usize>,
}

async fn concurrency(
    _: Operator,
    s: web::Data<State>,
    name: web::Path<String>,
    body: web::Json<Concurrency>,
) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(s.control.set_concurrency(&name, body.workers).await?))
}

async fn publisher(_: Operator, s: web::Data<State>) -> HttpResponse {
    HttpResponse::Ok().json(s.control.publisher())
}

/// `PUT /publisher/rate`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Rate {
    rate: u32,
    #[serde(default)]
    burst: Option<u32>,
}

async fn rate(_: Operator, s: web::Data<State>, body: web::Json<Rate>) -> HttpResponse {
    HttpResponse::Ok().json(s.control.set_publish_rate(body.rate, body.burst))
}
