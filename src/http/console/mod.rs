//! The operator's console: `/ui` on the management listener (`[management]
//! bind`; nothing is served without one, and `management.console = false`
//! leaves it out).
//!
//! | route | page |
//! |---|---|
//! | `GET /ui/login`, `POST /ui/login` | sign in with a management token |
//! | `POST /ui/logout` | sign out |
//! | `GET /ui/pipeline` (`/ui`) | the topology graph, every stage (rate, in flight / prefetch, workers, pause causes, input depth vs watermarks), the publisher (breaker, spool), and the controls |
//! | `GET /ui/pipeline/live` | the live part alone (htmx refreshes it every second) |
//! | `POST /ui/stages/{name}/pause`, `/resume`, `/concurrency`, `POST /ui/publisher/rate` | the same calls as `flowgate ctl` |
//! | `GET /ui/dlq` | every configured DLQ and its depth |
//! | `GET /ui/dlq/{queue}` | its dead letters: filters by reason and stage, search by message id or body text, pages |
//! | `GET /ui/dlq/{queue}/m/{id}` | one dead letter: properties, headers, body |
//! | `POST /ui/dlq/{queue}/confirm`, `/apply` | replay, replay elsewhere or delete one, a selection, or a filter's matches, after a confirmation |
//! | `GET /ui/assets/{file}` | the stylesheet and the vendored htmx |
//!
//! Security: the login takes the management API's bearer tokens and opens a
//! session (cookie `flowgate_session`: HttpOnly, SameSite=Strict, path
//! `/ui`); every change is a POST that must carry the session's CSRF token
//! (form field `csrf` or header `x-csrf-token`) and, when the browser sends
//! one, an `Origin` matching the `Host` — else 403. Every change is logged
//! with the token's name. Pages are served with a strict Content Security
//! Policy (scripts and styles from `/ui/assets` only), `no-store`, and
//! cannot be framed; everything read from a queue is escaped, and shown
//! with its control characters made visible (see [`crate::dlq::view`]).

mod graph;
mod pages;
mod session;

use crate::config::{Config, QueueKind, Tokens};
use crate::control::{Control, ControlError};
use crate::dlq::{self, Action, Filter};
use crate::ingress::Ingress;
use actix_web::dev::Payload;
use actix_web::http::{header, StatusCode};
use actix_web::{web, FromRequest, HttpRequest, HttpResponse, ResponseError};
use flowgate_actors::Metrics;
use futures::future::LocalBoxFuture;
use maud::Markup;
use pages::Tab;
use session::{Sessions, Who};
use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The largest request body a console form may send.
const MAX_FORM: usize = 64 * 1024;
/// Rate samples kept per stage (one per page refresh at most every 250 ms).
const RATE_SAMPLES: usize = 32;
/// The rate is measured over about this long.
const RATE_WINDOW: Duration = Duration::from_secs(5);

/// The console's static files: name, content type, contents.
const ASSETS: [(&str, &str, &str); 2] = [
    (
        "htmx-2.0.4.min.js",
        "text/javascript; charset=utf-8",
        include_str!("assets/htmx-2.0.4.min.js"),
    ),
    (
        "console.css",
        "text/css; charset=utf-8",
        include_str!("assets/console.css"),
    ),
];

/// The Content Security Policy of every console response.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// What the console's handlers need.
pub(crate) struct Console {
    control: Control,
    tokens: Tokens,
    config: Config,
    ingress: Ingress,
    metrics: Metrics,
    sessions: Sessions,
    /// Per stage: (when, deliveries taken so far), newest last.
    samples: Mutex<BTreeMap<String, VecDeque<(Instant, u64)>>>,
    /// The console's own broker connection (DLQ reads and actions), opened
    /// on first use and again after it broke.
    amqp: tokio::sync::Mutex<Option<std::sync::Arc<lapin::Connection>>>,
    /// The DLQs' indexes, and one read or action at a time per DLQ (two at
    /// once would each see the queue without the messages the other holds).
    indexes: dlq::Indexes,
}

impl Console {
    /// The console's state.
    pub(crate) fn new(
        control: Control,
        tokens: Tokens,
        config: Config,
        ingress: Ingress,
        metrics: Metrics,
    ) -> Self {
        let saved_in = config.management.dlq_index_dir.clone();
        Console {
            control,
            tokens,
            config,
            ingress,
            metrics,
            sessions: Sessions::default(),
            samples: Mutex::new(BTreeMap::new()),
            amqp: tokio::sync::Mutex::new(None),
            indexes: dlq::Indexes::new().saved_in(saved_in),
        }
    }

    async fn conn(&self) -> Result<std::sync::Arc<lapin::Connection>, String> {
        let mut c = self.amqp.lock().await;
        if let Some(conn) = c.as_ref() {
            if conn.status().connected() {
                return Ok(conn.clone());
            }
        }
        let mut cfg = self.config.clone();
        cfg.amqp.connection_name = format!("{}-console", cfg.amqp.connection_name);
        let conn = std::sync::Arc::new(dlq::connect(&cfg).await.map_err(|e| e.to_string())?);
        *c = Some(conn.clone());
        Ok(conn)
    }

    /// Deliveries per second the stage took over the last [`RATE_WINDOW`].
    fn rate(&self, stage: &str) -> Option<f64> {
        let now = Instant::now();
        let taken = self.metrics.counter(Metrics::CONSUMED, &[stage]);
        let mut all = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        let s = all.entry(stage.to_owned()).or_default();
        if s.back()
            .is_none_or(|(t, _)| now.duration_since(*t) >= Duration::from_millis(250))
        {
            s.push_back((now, taken));
        }
        while s.len() > RATE_SAMPLES
            || s.front()
                .is_some_and(|(t, _)| now.duration_since(*t) > RATE_WINDOW * 2)
        {
            s.pop_front();
        }
        let (t0, n0) = s
            .iter()
            .find(|(t, _)| now.duration_since(*t) <= RATE_WINDOW)
            .copied()?;
        let dt = now.duration_since(t0).as_secs_f64();
        (dt >= 0.5).then(|| taken.saturating_sub(n0) as f64 / dt)
    }
}

/// A refused console request.
#[derive(Debug, thiserror::Error)]
enum ConsoleError {
    #[error("sign in first")]
    SignIn { htmx: bool },
    #[error("forbidden: {0}")]
    Forbidden(&'static str),
    #[error("{0}")]
    BadRequest(String),
    #[error(transparent)]
    Control(#[from] ControlError),
}

impl ResponseError for ConsoleError {
    fn status_code(&self) -> StatusCode {
        match self {
            ConsoleError::SignIn { .. } => StatusCode::SEE_OTHER,
            ConsoleError::Forbidden(_) => StatusCode::FORBIDDEN,
            ConsoleError::BadRequest(_) | ConsoleError::Control(ControlError::Invalid(_)) => {
                StatusCode::BAD_REQUEST
            }
            ConsoleError::Control(ControlError::UnknownStage(_)) => StatusCode::NOT_FOUND,
            ConsoleError::Control(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn error_response(&self) -> HttpResponse {
        match self {
            // htmx follows a redirect inside the page: tell it to leave.
            ConsoleError::SignIn { htmx: true } => HttpResponse::Unauthorized()
                .insert_header(("HX-Redirect", "/ui/login"))
                .finish(),
            ConsoleError::SignIn { htmx: false } => HttpResponse::SeeOther()
                .insert_header((header::LOCATION, "/ui/login"))
                .finish(),
            other => html(
                other.status_code(),
                pages::layout(
                    "Refused",
                    Tab::None,
                    None,
                    maud::html! { h1 { (other.status_code().as_u16()) } p.error #refused { (other.to_string()) } },
                ),
            ),
        }
    }
}

/// An HTML answer with the console's security headers.
fn html(status: StatusCode, page: Markup) -> HttpResponse {
    let mut r = HttpResponse::build(status);
    secure(&mut r);
    r.content_type("text/html; charset=utf-8")
        .body(page.into_string())
}

fn secure(r: &mut actix_web::HttpResponseBuilder) {
    r.insert_header((header::CONTENT_SECURITY_POLICY, CSP))
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .insert_header((header::X_FRAME_OPTIONS, "DENY"))
        // Not `no-referrer`: with it a browser sends `Origin: null` on a
        // form POST, and the origin check could not tell it from a forgery.
        .insert_header((header::REFERRER_POLICY, "same-origin"))
        .insert_header((header::CACHE_CONTROL, "no-store"));
}

fn see_other(to: &str) -> HttpResponse {
    HttpResponse::SeeOther()
        .insert_header((header::LOCATION, to))
        .finish()
}

fn cookie_value<'a>(req: &'a HttpRequest, name: &str) -> Option<&'a str> {
    req.headers()
        .get_all(header::COOKIE)
        .filter_map(|v| v.to_str().ok())
        .find_map(|h| session::cookie(h, name))
}

fn state(req: &HttpRequest) -> Option<&web::Data<Console>> {
    req.app_data::<web::Data<Console>>()
}

/// A signed-in viewer: an extractor, so a page cannot forget the check.
struct Viewer(Who);

impl FromRequest for Viewer {
    type Error = ConsoleError;
    type Future = std::future::Ready<Result<Self, ConsoleError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let who = state(req)
            .zip(cookie_value(req, session::COOKIE))
            .and_then(|(s, id)| s.sessions.get(id));
        let htmx = req.headers().contains_key("hx-request");
        std::future::ready(who.map(Viewer).ok_or(ConsoleError::SignIn { htmx }))
    }
}

/// A form's fields, in order (a name may repeat: checkboxes).
struct FormData(Vec<(String, String)>);

impl FormData {
    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.is_empty())
    }

    fn all(&self, name: &str) -> Vec<String> {
        self.0
            .iter()
            .filter(|(k, v)| k == name && !v.is_empty())
            .map(|(_, v)| v.clone())
            .collect()
    }
}

/// True unless the browser sent an `Origin` that is not this host's.
fn same_origin(req: &HttpRequest) -> bool {
    let Some(origin) = req.headers().get(header::ORIGIN) else {
        return true;
    };
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default();
    origin
        .to_str()
        .ok()
        .and_then(|o| o.split_once("://"))
        .is_some_and(|(_, rest)| rest == host)
}

/// A change (a POST) by a signed-in operator that carried the session's
/// CSRF token and came from this origin; 403 otherwise. An extractor, so
/// a change cannot forget the check.
struct Change {
    who: Who,
    form: FormData,
}

impl FromRequest for Change {
    type Error = actix_web::Error;
    type Future = LocalBoxFuture<'static, Result<Self, Self::Error>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let who = state(req)
            .zip(cookie_value(req, session::COOKIE))
            .and_then(|(s, id)| s.sessions.get(id));
        let htmx = req.headers().contains_key("hx-request");
        let origin_ok = same_origin(req);
        let header_token = req
            .headers()
            .get("x-csrf-token")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = web::Bytes::from_request(req, payload);
        Box::pin(async move {
            let who = who.ok_or(ConsoleError::SignIn { htmx })?;
            let body = body.await?;
            let form = FormData(
                url::form_urlencoded::parse(&body)
                    .map(|(k, v)| (k.into_owned(), v.into_owned()))
                    .collect(),
            );
            let presented = header_token.or_else(|| form.get("csrf").map(str::to_owned));
            let token_ok =
                presented.is_some_and(|t| session::same(t.as_bytes(), who.csrf.as_bytes()));
            if !token_ok {
                tracing::warn!(by = %who.name, "console: a change without the session's CSRF token refused");
                return Err(ConsoleError::Forbidden("missing or wrong CSRF token").into());
            }
            if !origin_ok {
                tracing::warn!(by = %who.name, "console: a change from another origin refused");
                return Err(ConsoleError::Forbidden("the request came from another origin").into());
            }
            Ok(Change { who, form })
        })
    }
}

/// Registers the console's routes (on the management listener).
pub(crate) fn routes(cfg: &mut web::ServiceConfig, console: web::Data<Console>) {
    cfg.app_data(console)
        .app_data(web::PayloadConfig::new(MAX_FORM))
        .route("/ui", web::get().to(|| async { see_other("/ui/pipeline") }))
        .route(
            "/ui/",
            web::get().to(|| async { see_other("/ui/pipeline") }),
        )
        .route("/ui/login", web::get().to(login_form))
        .route("/ui/login", web::post().to(login))
        .route("/ui/logout", web::post().to(logout))
        .route("/ui/assets/{file}", web::get().to(asset))
        .route("/ui/pipeline", web::get().to(pipeline))
        .route("/ui/pipeline/live", web::get().to(live))
        .route("/ui/stages/{name}/pause", web::post().to(pause))
        .route("/ui/stages/{name}/resume", web::post().to(resume))
        .route("/ui/stages/{name}/concurrency", web::post().to(concurrency))
        .route("/ui/publisher/rate", web::post().to(rate))
        .route("/ui/dlq", web::get().to(dlq_index))
        .route("/ui/dlq/{queue}", web::get().to(dlq_list))
        .route("/ui/dlq/{queue}/m/{id}", web::get().to(dlq_message))
        .route("/ui/dlq/{queue}/confirm", web::post().to(dlq_confirm))
        .route("/ui/dlq/{queue}/apply", web::post().to(dlq_apply));
}

async fn asset(file: web::Path<String>) -> HttpResponse {
    match ASSETS.iter().find(|(n, _, _)| *n == file.as_str()) {
        Some((_, ct, body)) => {
            let mut r = HttpResponse::Ok();
            secure(&mut r);
            r.insert_header((header::CACHE_CONTROL, "max-age=3600"))
                .content_type(*ct)
                .body(*body)
        }
        None => HttpResponse::NotFound().finish(),
    }
}

async fn login_form(req: HttpRequest) -> HttpResponse {
    login_page(&req, StatusCode::OK, None)
}

/// The login form with a fresh login-CSRF cookie.
fn login_page(_req: &HttpRequest, status: StatusCode, error: Option<&str>) -> HttpResponse {
    let Some(token) = session::random_hex() else {
        return HttpResponse::ServiceUnavailable().body("no randomness for a login form");
    };
    let mut r = HttpResponse::build(status);
    secure(&mut r);
    r.insert_header((
        header::SET_COOKIE,
        session::set_cookie(session::LOGIN_COOKIE, &token),
    ))
    .content_type("text/html; charset=utf-8")
    .body(pages::login(&token, error).into_string())
}

async fn login(req: HttpRequest, s: web::Data<Console>, body: web::Bytes) -> HttpResponse {
    let form = FormData(
        url::form_urlencoded::parse(&body)
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect(),
    );
    let csrf_ok = match (cookie_value(&req, session::LOGIN_COOKIE), form.get("csrf")) {
        (Some(c), Some(f)) => session::same(c.as_bytes(), f.as_bytes()),
        _ => false,
    };
    if !csrf_ok {
        return ConsoleError::Forbidden("missing or wrong CSRF token").error_response();
    }
    if !same_origin(&req) {
        return ConsoleError::Forbidden("the request came from another origin").error_response();
    }
    let token = form.get("token").unwrap_or_default().trim();
    let Some(name) = s.tokens.identify(token.as_bytes()) else {
        tracing::warn!("console: a sign-in with a token that is not accepted");
        return login_page(
            &req,
            StatusCode::UNAUTHORIZED,
            Some("That token is not accepted."),
        );
    };
    let Some(id) = s.sessions.open(name) else {
        return HttpResponse::ServiceUnavailable().body("no randomness for a session");
    };
    tracing::info!(by = %name, "console: signed in");
    HttpResponse::SeeOther()
        .insert_header((header::LOCATION, "/ui/pipeline"))
        .append_header((
            header::SET_COOKIE,
            session::set_cookie(session::COOKIE, &id),
        ))
        .append_header((
            header::SET_COOKIE,
            session::set_cookie(session::LOGIN_COOKIE, ""),
        ))
        .finish()
}

async fn logout(req: HttpRequest, c: Change, s: web::Data<Console>) -> HttpResponse {
    if let Some(id) = cookie_value(&req, session::COOKIE) {
        s.sessions.close(id);
    }
    tracing::info!(by = %c.who.name, "console: signed out");
    HttpResponse::SeeOther()
        .insert_header((header::LOCATION, "/ui/login"))
        .insert_header((header::SET_COOKIE, session::set_cookie(session::COOKIE, "")))
        .finish()
}

/// The live part of the pipeline page.
fn live_part(s: &Console) -> Markup {
    let stages = s.control.stages();
    let depths = s.ingress.queue_depths();
    let views: Vec<pages::StageView> = stages
        .iter()
        .map(|st| pages::StageView {
            rate: s.rate(&st.name),
            depth: depths.get(&st.queue).copied(),
            watermark: s
                .config
                .queue_of(&st.queue)
                .and_then(|q| q.watermark)
                .map(|w| (w.high, w.low)),
            status: st.clone(),
        })
        .collect();
    let mut g = graph::Graph::of(&s.config);
    for n in &mut g.nodes {
        match n.kind {
            graph::Kind::Stage => {
                if let Some(v) = views.iter().find(|v| v.status.name == n.name) {
                    let st = &v.status;
                    n.class = format!("{:?}", st.state).to_lowercase();
                    n.lines = vec![
                        format!("{:?} · {}", st.state, pages::rate_text(v.rate)).to_lowercase(),
                        format!(
                            "in flight {}/{} · workers {}",
                            st.in_flight, st.prefetch, st.workers
                        ),
                    ];
                    if !st.paused.is_empty() {
                        n.lines.push(format!("paused: {}", st.paused.join(", ")));
                    }
                } else {
                    // A stage on a partitioned queue runs as `<stage>.<p>`.
                    let prefix = format!("{}.", n.name);
                    let parts: Vec<&str> = views
                        .iter()
                        .filter_map(|v| v.status.name.strip_prefix(&prefix))
                        .filter(|p| p.parse::<u16>().is_ok())
                        .collect();
                    if !parts.is_empty() {
                        n.lines
                            .push(format!("partitions here: {}", parts.join(", ")));
                    }
                }
            }
            graph::Kind::Queue => {
                let wm = s.config.queue(&n.name).and_then(|q| q.watermark);
                let partitions = s
                    .config
                    .queue(&n.name)
                    .filter(|q| q.partitions.is_some())
                    .map(|q| q.broker_queues());
                if let Some(parts) = partitions {
                    // Each partition has its own depth and watermark.
                    let each: Vec<u64> = parts
                        .iter()
                        .filter_map(|p| depths.get(p).copied())
                        .collect();
                    if !each.is_empty() {
                        let sum: u64 = each.iter().sum();
                        n.lines
                            .push(format!("depth {sum} in {} partitions", parts.len()));
                        if wm.is_some_and(|w| each.iter().any(|d| *d >= w.high)) {
                            n.class = "above".into();
                        }
                    }
                } else if let Some(d) = depths.get(&n.name) {
                    n.lines.push(match wm {
                        Some(w) => format!("depth {d} (high {}, low {})", w.high, w.low),
                        None => format!("depth {d}"),
                    });
                    if wm.is_some_and(|w| *d >= w.high) {
                        n.class = "above".into();
                    }
                }
            }
            graph::Kind::Dlq => {
                n.href = Some(format!("/ui/dlq/{}", pages::seg(&n.name)));
                n.lines.push("dead letters →".into());
            }
            graph::Kind::Exchange => {
                if let Some(e) = s.config.exchanges.iter().find(|e| e.name == n.name) {
                    n.lines
                        .push(format!("{:?} exchange", e.kind).to_lowercase());
                }
            }
        }
    }
    pages::live(&g, &views, &s.control.publisher())
}

async fn pipeline(
    Viewer(who): Viewer,
    s: web::Data<Console>,
    q: web::Query<BTreeMap<String, String>>,
) -> HttpResponse {
    let body = pages::pipeline(
        live_part(&s),
        &s.control.stages(),
        &s.control.publisher(),
        &who.csrf,
        q.get("done").map(String::as_str),
    );
    html(
        StatusCode::OK,
        pages::layout(
            "Pipeline",
            Tab::Pipeline,
            Some((&who.name, &who.csrf)),
            body,
        ),
    )
}

async fn live(_: Viewer, s: web::Data<Console>) -> HttpResponse {
    html(StatusCode::OK, live_part(&s))
}

/// Back to the pipeline page with what was done.
fn back_to_pipeline(text: &str) -> HttpResponse {
    see_other(&format!(
        "/ui/pipeline?{}",
        url::form_urlencoded::Serializer::new(String::new())
            .append_pair("done", text)
            .finish()
    ))
}

async fn pause(
    c: Change,
    s: web::Data<Console>,
    name: web::Path<String>,
) -> Result<HttpResponse, ConsoleError> {
    s.control.pause_stage(&name).await?;
    tracing::info!(by = %c.who.name, stage = %name, "console: stage paused");
    Ok(back_to_pipeline(&format!("Stage {name} paused.")))
}

async fn resume(
    c: Change,
    s: web::Data<Console>,
    name: web::Path<String>,
) -> Result<HttpResponse, ConsoleError> {
    s.control.resume_stage(&name).await?;
    tracing::info!(by = %c.who.name, stage = %name, "console: stage resumed");
    Ok(back_to_pipeline(&format!("Stage {name} resumed.")))
}

async fn concurrency(
    c: Change,
    s: web::Data<Console>,
    name: web::Path<String>,
) -> Result<HttpResponse, ConsoleError> {
    let workers = match c.form.get("mode") {
        Some("auto") => None,
        _ => Some(
            c.form
                .get("workers")
                .and_then(|w| w.parse::<usize>().ok())
                .ok_or_else(|| ConsoleError::BadRequest("workers must be a number".into()))?,
        ),
    };
    s.control.set_concurrency(&name, workers).await?;
    tracing::info!(by = %c.who.name, stage = %name, ?workers, "console: stage concurrency set");
    Ok(back_to_pipeline(&match workers {
        Some(n) => format!("Stage {name}: {n} workers, pinned."),
        None => format!("Stage {name}: workers back to autoscaling."),
    }))
}

async fn rate(c: Change, s: web::Data<Console>) -> Result<HttpResponse, ConsoleError> {
    let num = |k: &str| -> Result<Option<u32>, ConsoleError> {
        c.form
            .get(k)
            .map(|v| {
                v.parse::<u32>()
                    .map_err(|_| ConsoleError::BadRequest(format!("{k} must be a number")))
            })
            .transpose()
    };
    let rate = num("rate")?.unwrap_or(0);
    let burst = num("burst")?;
    let p = s.control.set_publish_rate(rate, burst);
    tracing::info!(by = %c.who.name, rate = p.rate, burst = p.burst, "console: publish rate set");
    Ok(back_to_pipeline(&format!(
        "Publish rate {} (burst {}).",
        if p.rate == 0 {
            "unlimited".to_owned()
        } else {
            format!("{}/s", p.rate)
        },
        p.burst
    )))
}

/// The configured DLQ named `queue` (the console reads no other queue).
fn configured_dlq(s: &Console, queue: &str) -> Result<(), ConsoleError> {
    s.config
        .queues
        .iter()
        .any(|q| q.dead_letter_queue().as_deref() == Some(queue))
        .then_some(())
        .ok_or_else(|| {
            ConsoleError::BadRequest(format!("`{queue}` is not a configured dead-letter queue"))
        })
}

fn kind_name(k: QueueKind) -> &'static str {
    match k {
        QueueKind::Classic => "classic",
        QueueKind::Quorum => "quorum",
    }
}

async fn dlq_index(Viewer(who): Viewer, s: web::Data<Console>) -> HttpResponse {
    let conn = s.conn().await;
    let mut rows = Vec::new();
    let mut warmed = 0;
    for q in &s.config.queues {
        let Some(dlq_name) = q.dead_letter_queue() else {
            continue;
        };
        let depth = match &conn {
            Ok(c) => match c.create_channel().await {
                Ok(ch) => {
                    let d = dlq::depth(&ch, &dlq_name).await.map_err(|e| e.to_string());
                    let _ = ch.close(200, "depth read".into()).await;
                    d
                }
                Err(e) => Err(e.to_string()),
            },
            Err(e) => Err(e.clone()),
        };
        let kind = q.dead_letter_queue_kind();
        if let (Ok(c), QueueKind::Classic, Ok(d)) = (&conn, kind, &depth) {
            // Most likely browsed next: start reading it into its index.
            if *d > 0 && warmed < dlq::INDEXES_KEPT {
                warmed += 1;
                if let Err(e) = s.indexes.warm(c, &dlq_name).await {
                    tracing::debug!(queue = %dlq_name, "console: no index warmed: {e}");
                }
            }
        }
        rows.push(pages::DlqRow {
            queue: q.name.clone(),
            dlq: dlq_name,
            kind: kind_name(kind),
            depth,
        });
    }
    html(
        StatusCode::OK,
        pages::layout(
            "Dead letters",
            Tab::DeadLetters,
            Some((&who.name, &who.csrf)),
            pages::dlq_index(&rows),
        ),
    )
}

/// Page size of the dead-letter lists.
const PAGE_SIZE: usize = 50;

fn filter_of(q: &BTreeMap<String, String>) -> Filter {
    let get = |k: &str| {
        q.get(k)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    };
    Filter {
        reason: get("reason"),
        stage: get("stage"),
        search: get("search"),
        ids: Vec::new(),
    }
}

async fn dlq_list(
    Viewer(who): Viewer,
    s: web::Data<Console>,
    queue: web::Path<String>,
    q: web::Query<BTreeMap<String, String>>,
) -> Result<HttpResponse, ConsoleError> {
    configured_dlq(&s, &queue)?;
    let filter = filter_of(&q);
    let page_no = q
        .get("page")
        .and_then(|p| p.parse::<usize>().ok())
        .unwrap_or(1)
        .clamp(1, 100_000);
    let reread = q.contains_key("reread");
    let page = match s.conn().await {
        Ok(conn) => s
            .indexes
            .page(
                &conn,
                &queue,
                &filter,
                (page_no - 1) * PAGE_SIZE,
                PAGE_SIZE,
                reread,
            )
            .await
            .map_err(|e| e.to_string()),
        Err(e) => Err(e),
    };
    Ok(html(
        StatusCode::OK,
        pages::layout(
            "Dead letters",
            Tab::DeadLetters,
            Some((&who.name, &who.csrf)),
            pages::dlq_list(&page, &queue, &filter, page_no, &who.csrf),
        ),
    ))
}

async fn dlq_message(
    Viewer(who): Viewer,
    s: web::Data<Console>,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ConsoleError> {
    let (queue, id) = path.into_inner();
    configured_dlq(&s, &queue)?;
    let shown = match s.conn().await {
        Ok(conn) => {
            let _one = s.indexes.lock(&queue).await;
            dlq::show(&conn, &queue, &id)
                .await
                .map_err(|e| e.to_string())
        }
        Err(e) => Err(e),
    };
    Ok(html(
        StatusCode::OK,
        pages::layout(
            "Dead letter",
            Tab::DeadLetters,
            Some((&who.name, &who.csrf)),
            pages::dlq_message(&queue, &id, &shown, &who.csrf),
        ),
    ))
}

/// The action and the dead letters a confirm/apply form names.
fn action_of(form: &FormData) -> Result<(Action, Filter, String), ConsoleError> {
    let action = match form.get("action") {
        Some("replay") => Action::Replay,
        Some("delete") => Action::Delete,
        Some("replay_to") => {
            let exchange = form.get("exchange").unwrap_or_default().to_owned();
            let routing_key = form.get("routing_key").unwrap_or_default().to_owned();
            if exchange.is_empty() && routing_key.is_empty() {
                return Err(ConsoleError::BadRequest(
                    "name an exchange and a routing key to replay to".into(),
                ));
            }
            Action::ReplayTo {
                exchange,
                routing_key,
            }
        }
        _ => return Err(ConsoleError::BadRequest("no action chosen".into())),
    };
    let (filter, scope) = match form.get("scope") {
        Some("selection") => {
            let ids = form.all("ids");
            if ids.is_empty() {
                return Err(ConsoleError::BadRequest("nothing selected".into()));
            }
            let n = ids.len();
            (
                Filter {
                    ids,
                    ..Filter::default()
                },
                format!("{n} selected dead letter{}", if n == 1 { "" } else { "s" }),
            )
        }
        Some("filter") => {
            let get = |k: &str| form.get(k).map(str::to_owned);
            let f = Filter {
                reason: get("reason"),
                stage: get("stage"),
                search: get("search"),
                ids: Vec::new(),
            };
            let scope = f.describe();
            (f, scope)
        }
        _ => return Err(ConsoleError::BadRequest("no scope chosen".into())),
    };
    Ok((action, filter, scope))
}

async fn dlq_confirm(
    c: Change,
    s: web::Data<Console>,
    queue: web::Path<String>,
) -> Result<HttpResponse, ConsoleError> {
    configured_dlq(&s, &queue)?;
    let (action, filter, scope_text) = action_of(&c.form)?;
    let matched = match s.conn().await {
        Ok(conn) => {
            let _one = s.indexes.lock(&queue).await;
            dlq::count(&conn, &queue, &filter)
                .await
                .map_err(|e| e.to_string())
        }
        Err(e) => Err(e),
    };
    let fields = c
        .form
        .0
        .iter()
        .filter(|(k, v)| k != "csrf" && !v.is_empty())
        .cloned()
        .collect();
    let pending = pages::Pending {
        queue: &queue,
        action_text: action.describe(),
        scope_text,
        matched,
        fields,
    };
    Ok(html(
        StatusCode::OK,
        pages::layout(
            "Confirm",
            Tab::DeadLetters,
            Some((&c.who.name, &c.who.csrf)),
            pages::confirm(&pending, &c.who.csrf),
        ),
    ))
}

async fn dlq_apply(
    c: Change,
    s: web::Data<Console>,
    queue: web::Path<String>,
) -> Result<HttpResponse, ConsoleError> {
    configured_dlq(&s, &queue)?;
    let (action, filter, _) = action_of(&c.form)?;
    let report = match s.conn().await {
        Ok(conn) => s
            .indexes
            .apply(&conn, &queue, &filter, &action, &c.who.name)
            .await
            .map_err(|e| e.to_string()),
        Err(e) => Err(e),
    };
    Ok(html(
        StatusCode::OK,
        pages::layout(
            "Done",
            Tab::DeadLetters,
            Some((&c.who.name, &c.who.csrf)),
            pages::done(&queue, &action.describe(), &report),
        ),
    ))
}
