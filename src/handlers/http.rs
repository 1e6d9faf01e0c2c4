//! The `http` handler: each delivery is POSTed to a service written in any
//! language, and the answer decides the message's fate.
//!
//! # The request
//!
//! `POST <url>` with the body as it is, and these headers (values from a
//! delivery are percent-encoded: every byte outside `!`..`~`, and `%`
//! itself, becomes `%XX`, so `urllib.parse.unquote` gives the text back):
//!
//! | header | from |
//! |---|---|
//! | `content-type` | the `content_type` property (`application/octet-stream` without a valid one) |
//! | `content-encoding` | the `content_encoding` property |
//! | `x-amqp-message-id`, `-correlation-id`, `-reply-to`, `-type`, `-app-id`, `-user-id`, `-expiration` | the property of that name |
//! | `x-amqp-timestamp`, `-priority`, `-delivery-mode` | the property, as a decimal number |
//! | `x-amqp-exchange`, `-routing-key`, `-queue`, `-stage`, `-redelivered` | where the delivery came from (`true`/`false`) |
//! | `x-amqp-header-<name>` | each AMQP header with a string, number or boolean value (name lowercased) |
//! | `x-amqp-headers-dropped` | how many AMQP headers were not mapped (present when > 0) |
//!
//! An AMQP header is not mapped (and counted as dropped) when its value is a
//! table, array, byte array or void, when its name is longer than
//! [`MAX_MAPPED_NAME`] bytes or holds a byte other than an ASCII letter,
//! digit, `-`, `_` or `.`, when its encoded value is longer than
//! [`MAX_MAPPED_VALUE`] bytes, when two names are equal but for case, or
//! past the first [`MAX_MAPPED_HEADERS`].
//!
//! # The answer
//!
//! * **2xx**: ack. A JSON answer (`content-type` `application/json` or
//!   `…+json`, non-empty) may carry outputs, published and confirmed
//!   before the ack:
//!   `{"outputs": [{"exchange": "shop", "routing_key": "order.priced",
//!   "body": {...}, "message_id": "o-1", "content_type": "...",
//!   "headers": {"x-k": "v"}}]}`. Each output starts from the input's
//!   properties; `exchange` and `routing_key` default to the stage's
//!   `output`; a string `body` is sent as its UTF-8 bytes, any other JSON
//!   value as JSON (content type `application/json` unless given); header
//!   values are strings, integers, floats or booleans. An answer that is
//!   not this document, or longer than `max_response_bytes`, dead-letters
//!   the input as `invalid-output` (so does an exchange or routing key
//!   over 255 bytes).
//! * **429 / 503**: slow down. The handler waits `Retry-After` seconds
//!   (an integer or decimal; without one, its own backoff from 100 ms,
//!   doubling), at most `retry_after_max` per answer, and tries again,
//!   holding the delivery and so its credit: the stage stops pulling and
//!   the queue grows in the broker. Every request of the stage waits out
//!   the pause, not only the answered one. After `slow_down_limit` the
//!   delivery goes through the retry ladder instead.
//! * **other 4xx**: dead-letter; the reason header is `http <status>`
//!   followed by the start of the answer's text (the metric label stays
//!   `handler`).
//! * **5xx, other statuses, timeouts, connection errors**: retry through
//!   the stage's ladder (`Outcome::Retry`).
//!
//! # Batches
//!
//! A stage with `batch = { size, timeout }` sends one request per batch:
//! `POST <url>` with `content-type: application/json`,
//! `x-flowgate-batch-size: <n>`, the stage's `http.headers`, and the body
//! `{"entries": [{"entry_id": "0", "headers": {...}, "body": "..."}, ...]}`
//! — `headers` are the request headers above for that delivery, as a JSON
//! object; `body` is the delivery's body as text when it is UTF-8, else
//! `body_base64` holds it in standard base64. Entry ids are the positions
//! `"0"`..`"n-1"`.
//!
//! 429/503, other 4xx, 5xx and timeouts mean what they mean for one
//! delivery, for every entry of the batch. A 2xx without a JSON body acks
//! them all. A 2xx JSON answer says each entry's fate:
//! `{"statuses": [{"entry_id": "0", "status": "ack", "outputs": [...]},
//! {"entry_id": "1", "status": "dead_letter", "reason": "no such sku"},
//! {"entry_id": "2", "status": "retry", "reason": "db busy"}]}` — outputs
//! as in the one-delivery answer; `reason` becomes the dead letter's
//! reason header (or the retry's). An entry the answer does not mention is
//! retried as `missing-batch-result`; unknown or repeated entry ids are
//! ignored; an entry with invalid outputs alone is dead-lettered as
//! `invalid-output`; an answer that is not this document dead-letters the
//! batch as `invalid-output`.

use super::OutputDraft;
use crate::config::{
    HttpStageConfig, StageConfig, Target, HTTP_MAPPED_PREFIX, HTTP_RESERVED_HEADERS,
};
use bytes::{Bytes, BytesMut};
use flowgate_actors::envelope;
use flowgate_actors::{Delivery, Handler, HandlerError, Outcome, Output};
use lapin::types::{AMQPValue, LongString};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_ENCODING, CONTENT_TYPE};
use reqwest::StatusCode;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio::time::Instant;

/// Most AMQP headers mapped to `x-amqp-header-*` per request.
pub(crate) const MAX_MAPPED_HEADERS: usize = 64;
/// Longest AMQP header name mapped, in bytes.
pub(crate) const MAX_MAPPED_NAME: usize = 128;
/// Longest mapped (encoded) header value, in bytes.
pub(crate) const MAX_MAPPED_VALUE: usize = 4096;
/// Most bytes of an error answer's text put into the dead-letter reason.
const MAX_REASON_TEXT: usize = 200;
/// The first slow-down wait when an answer has no usable `Retry-After`.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// The content type of a delivery without a valid one.
const DEFAULT_CONTENT_TYPE: &str = "application/octet-stream";

/// POSTs each delivery to a service and turns its answer into an outcome.
pub(crate) struct Http {
    /// Pooled connections to the service (at most `max_concurrency` idle).
    client: reqwest::Client,
    url: reqwest::Url,
    timeout: Duration,
    /// Bounds the requests in flight (`max_concurrency`), whatever the
    /// stage's concurrency.
    in_flight: Semaphore,
    /// The stage's `http.headers`, checked at start-up.
    extra_headers: HeaderMap,
    retry_after_max: Duration,
    slow_down_limit: Duration,
    max_response_bytes: usize,
    /// Where outputs go when the answer names no exchange or routing key.
    default_target: Option<Target>,
    /// No request leaves before this instant: set by a 429/503 answer, so
    /// the whole stage slows down, not only the request that was answered.
    paused_until: Mutex<Option<Instant>>,
}

impl Http {
    /// From a stage's config (`http`, `output`).
    pub(crate) fn from_stage(s: &StageConfig) -> Result<Self, super::FactoryError> {
        let h = s
            .http
            .as_ref()
            .ok_or("the `http` handler needs an http table")?;
        Self::new(h, s.output.clone())
    }

    fn new(
        h: &HttpStageConfig,
        default_target: Option<Target>,
    ) -> Result<Self, super::FactoryError> {
        let mut extra_headers = HeaderMap::new();
        for (name, value) in &h.headers {
            let name = HeaderName::from_bytes(name.as_bytes())?;
            if HTTP_RESERVED_HEADERS.contains(&name.as_str())
                || name.as_str().starts_with(HTTP_MAPPED_PREFIX)
            {
                return Err(format!("header `{name}` is written by the engine").into());
            }
            extra_headers.insert(name, HeaderValue::from_str(value)?);
        }
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(h.max_concurrency as usize)
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(h.timeout)
            .build()?;
        Ok(Self {
            client,
            url: reqwest::Url::parse(&h.url)?,
            timeout: h.timeout,
            in_flight: Semaphore::new(h.max_concurrency as usize),
            extra_headers,
            retry_after_max: h.retry_after_max,
            slow_down_limit: h.slow_down_limit,
            max_response_bytes: usize::try_from(h.max_response_bytes).unwrap_or(usize::MAX),
            default_target,
            paused_until: Mutex::new(None),
        })
    }

    /// Waits until no slow-down pause is in force.
    async fn wait_out_pause(&self) {
        loop {
            let until = *self.paused_until.lock().unwrap_or_else(|p| p.into_inner());
            match until {
                Some(t) if t > Instant::now() => tokio::time::sleep_until(t).await,
                _ => return,
            }
        }
    }

    /// Pauses every request of the stage for `wait` (or longer, if a
    /// longer pause is already in force).
    fn pause_for(&self, wait: Duration) {
        let until = Instant::now() + wait;
        let mut p = self.paused_until.lock().unwrap_or_else(|p| p.into_inner());
        if p.is_none_or(|t| t < until) {
            *p = Some(until);
        }
    }

    /// One request and what its answer means.
    async fn attempt(&self, d: &Delivery) -> Answer<Outcome> {
        let request = self
            .client
            .post(self.url.clone())
            .timeout(self.timeout)
            .headers(self.extra_headers.clone())
            .headers(request_headers(d))
            .body(d.body.clone());
        let reply = match self.exchange(request).await {
            Ok(reply) => reply,
            Err(early) => return early,
        };
        Answer::Done(if !reply.status.is_success() {
            reply.refused()
        } else if reply.has_document() {
            match parse_outputs(d, &reply.body, self.default_target.as_ref()) {
                Ok(outputs) => Outcome::ack_with(outputs),
                Err(e) => Outcome::invalid_output(format!("http {}: {e}", reply.status.as_u16())),
            }
        } else {
            Outcome::ack()
        })
    }

    /// Sends `request` (one of at most `max_concurrency` in flight) and
    /// reads its answer, bounded; `Err` is what the exchange means when
    /// there is no answer to read (the request failed, a 429/503, an
    /// answer too long or cut off) — the same for one delivery or a batch.
    async fn exchange(&self, request: reqwest::RequestBuilder) -> Result<Reply, Answer<Outcome>> {
        // The semaphore is never closed: acquire cannot fail.
        let _permit = self.in_flight.acquire().await;
        let resp = match request.send().await {
            Ok(r) => r,
            Err(e) => return Err(Answer::Done(Outcome::retry(self.failure("request", e)))),
        };
        let status = resp.status();
        if status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE {
            return Err(Answer::SlowDown {
                status,
                retry_after: retry_after(resp.headers()),
            });
        }
        let json = is_json(resp.headers());
        let body = match read_bounded(resp, self.max_response_bytes).await {
            Ok(b) => b,
            Err(BodyError::Http(e)) => {
                return Err(Answer::Done(Outcome::retry(
                    self.failure("reading the answer", e),
                )))
            }
            Err(BodyError::TooLong) if status.is_success() => {
                return Err(Answer::Done(Outcome::invalid_output(format!(
                    "http {}: the answer is longer than {} bytes",
                    status.as_u16(),
                    self.max_response_bytes
                ))))
            }
            Err(BodyError::TooLong) => Bytes::new(),
        };
        Ok(Reply { status, json, body })
    }

    /// Why a request failed, without the URL (it may hold credentials).
    fn failure(&self, what: &str, e: reqwest::Error) -> String {
        if e.is_timeout() {
            format!("http timeout: no full answer within {:?}", self.timeout)
        } else if e.is_connect() {
            format!("http {what} failed: cannot connect to the service")
        } else {
            let e = e.without_url();
            let cause = std::error::Error::source(&e)
                .map(|c| format!(" ({c})"))
                .unwrap_or_default();
            format!("http {what} failed: {e}{cause}")
        }
    }
}

/// What one request's answer means: `T` is the delivery's outcome (one
/// delivery) or the batch's outcomes.
enum Answer<T> {
    /// The outcome(s).
    Done(T),
    /// 429/503: wait and try again.
    SlowDown {
        status: StatusCode,
        retry_after: Option<Duration>,
    },
}

impl Http {
    /// Sends with `attempt` until answered, waiting out 429/503 answers
    /// (capped by `retry_after_max` each, `slow_down_limit` in all); `Err`
    /// is the retry reason once the limit is passed.
    async fn until_answered<T, F>(&self, stage: &str, attempt: impl Fn() -> F) -> Result<T, String>
    where
        F: std::future::Future<Output = Answer<T>>,
    {
        let started = Instant::now();
        let mut backoff = FIRST_BACKOFF;
        loop {
            self.wait_out_pause().await;
            match attempt().await {
                Answer::Done(done) => return Ok(done),
                Answer::SlowDown {
                    status,
                    retry_after,
                } => {
                    let wait = retry_after.unwrap_or(backoff).min(self.retry_after_max);
                    backoff = (backoff * 2).min(self.retry_after_max);
                    if started.elapsed() + wait > self.slow_down_limit {
                        return Err(format!(
                            "http {}: still asked to slow down after {:?}",
                            status.as_u16(),
                            started.elapsed()
                        ));
                    }
                    tracing::debug!(%stage, status = status.as_u16(), ?wait, "http service asks to slow down");
                    self.pause_for(wait);
                }
            }
        }
    }

    /// One request carrying a whole batch (see the module docs) and what
    /// its answer means for each delivery.
    async fn attempt_batch(&self, batch: &[Delivery]) -> Answer<Vec<Outcome>> {
        let n = batch.len();
        let all = |o: Outcome| Answer::Done(vec![o; n]);
        let request = match serde_json::to_vec(&batch_request(batch)) {
            Ok(r) => r,
            // A document of strings and maps always serializes.
            Err(e) => return all(Outcome::retry(format!("http batch: {e}"))),
        };
        let request = self
            .client
            .post(self.url.clone())
            .timeout(self.timeout)
            .headers(self.extra_headers.clone())
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .header(BATCH_SIZE_HEADER, HeaderValue::from(n))
            .body(request);
        let reply = match self.exchange(request).await {
            Ok(reply) => reply,
            Err(early) => return early.map(|o| vec![o; n]),
        };
        if !reply.status.is_success() {
            return all(reply.refused());
        }
        if !reply.has_document() {
            return all(Outcome::ack());
        }
        Answer::Done(
            parse_statuses(batch, &reply.body, self.default_target.as_ref()).unwrap_or_else(|e| {
                vec![Outcome::invalid_output(format!("http {}: {e}", reply.status.as_u16())); n]
            }),
        )
    }
}

/// A service's answer, read.
struct Reply {
    status: StatusCode,
    /// The answer says it is JSON.
    json: bool,
    body: Bytes,
}

impl Reply {
    /// A JSON answer with something in it (outputs or statuses to read).
    fn has_document(&self) -> bool {
        self.json && !self.body.iter().all(u8::is_ascii_whitespace)
    }

    /// What a non-2xx answer means: a 4xx is the message's own fault (dead
    /// letter), anything else the service's (retry).
    fn refused(&self) -> Outcome {
        let reason = status_reason(self.status, &self.body);
        if self.status.is_client_error() {
            Outcome::dead_letter(reason)
        } else {
            Outcome::retry(reason)
        }
    }
}

impl<T> Answer<T> {
    fn map<U>(self, f: impl FnOnce(T) -> U) -> Answer<U> {
        match self {
            Answer::Done(t) => Answer::Done(f(t)),
            Answer::SlowDown {
                status,
                retry_after,
            } => Answer::SlowDown {
                status,
                retry_after,
            },
        }
    }
}

#[async_trait::async_trait]
impl Handler for Http {
    async fn handle(&self, d: &Delivery) -> Result<Outcome, HandlerError> {
        Ok(self
            .until_answered(&d.stage, || self.attempt(d))
            .await
            .unwrap_or_else(Outcome::retry))
    }

    /// A stage with `batch`: one request per batch, a JSON document of
    /// entries; the answer says each entry's fate (see the module docs).
    async fn handle_batch(&self, batch: Vec<Delivery>) -> Vec<Result<Outcome, HandlerError>> {
        let Some(stage) = batch.first().map(|d| d.stage.clone()) else {
            return Vec::new();
        };
        let outcomes = match self
            .until_answered(&stage, || self.attempt_batch(&batch))
            .await
        {
            Ok(outcomes) => outcomes,
            Err(reason) => vec![Outcome::retry(reason); batch.len()],
        };
        outcomes.into_iter().map(Ok).collect()
    }
}

/// The header of a batch request that says how many entries it holds.
const BATCH_SIZE_HEADER: &str = flowgate_actors::envelope::BATCH_SIZE;

/// The request document of a batch: `{"entries": [{"entry_id": "0",
/// "headers": {...}, "body": "..." | "body_base64": "..."}, ...]}`.
fn batch_request(batch: &[Delivery]) -> serde_json::Value {
    use base64::Engine as _;
    let entries = batch
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let headers: serde_json::Map<String, serde_json::Value> = request_headers(d)
                .iter()
                .map(|(k, v)| {
                    // Every mapped value is printable ASCII (percent-encoded).
                    let text = String::from_utf8_lossy(v.as_bytes()).into_owned();
                    (k.as_str().to_owned(), serde_json::Value::String(text))
                })
                .collect();
            let mut entry = serde_json::Map::new();
            entry.insert("entry_id".into(), i.to_string().into());
            entry.insert("headers".into(), headers.into());
            match std::str::from_utf8(&d.body) {
                Ok(text) => entry.insert("body".into(), text.into()),
                Err(_) => entry.insert(
                    "body_base64".into(),
                    base64::engine::general_purpose::STANDARD
                        .encode(&d.body)
                        .into(),
                ),
            };
            serde_json::Value::Object(entry)
        })
        .collect();
    serde_json::json!({ "entries": serde_json::Value::Array(entries) })
}

/// The answer to a batch: `{"statuses": [...]}` (other keys ignored).
#[derive(Deserialize)]
struct BatchAnswerDoc {
    statuses: Vec<EntryStatusDoc>,
}

/// One entry's fate in a batch answer.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EntryStatusDoc {
    entry_id: String,
    status: EntryStatus,
    reason: Option<String>,
    #[serde(default)]
    outputs: Vec<OutputDoc>,
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum EntryStatus {
    Ack,
    Retry,
    DeadLetter,
}

/// Each delivery's outcome from a 2xx batch answer, or why the answer is
/// not the documented one. An entry the answer does not mention is
/// retried ([`envelope::MISSING_BATCH_RESULT`]); unknown or repeated entry
/// ids are ignored; an entry whose outputs are invalid is dead-lettered
/// as `invalid-output` alone.
fn parse_statuses(
    batch: &[Delivery],
    body: &[u8],
    default_target: Option<&Target>,
) -> Result<Vec<Outcome>, String> {
    let doc: BatchAnswerDoc = serde_json::from_slice(body)
        .map_err(|e| format!("the answer is not a batch statuses document: {e}"))?;
    let mut outcomes: Vec<Option<Outcome>> = vec![None; batch.len()];
    let mut ignored = 0usize;
    for st in doc.statuses {
        let free = |i: &usize| outcomes.get(*i).is_some_and(Option::is_none);
        let Some(i) = st.entry_id.parse::<usize>().ok().filter(free) else {
            ignored += 1;
            continue;
        };
        let reason = |default: &str| {
            let text = st.reason.clone().unwrap_or_else(|| default.to_owned());
            envelope::truncate(text, MAX_REASON_TEXT)
        };
        let outcome = match st.status {
            EntryStatus::Retry => Outcome::retry(reason("http batch: retry")),
            EntryStatus::DeadLetter => Outcome::dead_letter(reason("http batch: dead_letter")),
            EntryStatus::Ack => {
                let outputs: Result<Vec<Output>, String> = st
                    .outputs
                    .into_iter()
                    .enumerate()
                    .map(|(k, o)| {
                        output(&batch[i], o, default_target).map_err(|e| format!("output {k}: {e}"))
                    })
                    .collect();
                match outputs {
                    Ok(outputs) => Outcome::ack_with(outputs),
                    Err(e) => Outcome::invalid_output(format!("http batch entry {i}: {e}")),
                }
            }
        };
        outcomes[i] = Some(outcome);
    }
    if ignored > 0 {
        tracing::warn!(
            ignored,
            "http batch answer: statuses with unknown or repeated entry ids ignored"
        );
    }
    let n = batch.len();
    Ok(outcomes
        .into_iter()
        .enumerate()
        .map(|(i, o)| {
            o.unwrap_or_else(|| {
                Outcome::retry(format!(
                    "{}: the http batch answer has no status for entry {i} of {n}",
                    envelope::MISSING_BATCH_RESULT
                ))
            })
        })
        .collect())
}

/// `http <status>` and the start of the answer's text, for a reason header.
fn status_reason(status: StatusCode, body: &[u8]) -> String {
    let text: String = String::from_utf8_lossy(body)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let text = envelope::truncate(text.trim().to_owned(), MAX_REASON_TEXT);
    if text.is_empty() {
        format!("http {}", status.as_u16())
    } else {
        format!("http {}: {text}", status.as_u16())
    }
}

/// `Retry-After` as a delay (seconds, integer or decimal); `None` when
/// absent or not a number (an HTTP date is not honoured).
fn retry_after(h: &HeaderMap) -> Option<Duration> {
    let v = h.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?;
    let secs: f64 = v.trim().parse().ok()?;
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs.min(86_400.0)))
}

fn is_json(h: &HeaderMap) -> bool {
    h.get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|m| m.trim().to_ascii_lowercase())
        .is_some_and(|m| m == "application/json" || m.ends_with("+json"))
}

enum BodyError {
    Http(reqwest::Error),
    TooLong,
}

/// The answer's body, at most `max` bytes.
async fn read_bounded(mut resp: reqwest::Response, max: usize) -> Result<Bytes, BodyError> {
    if resp.content_length().is_some_and(|n| n > max as u64) {
        return Err(BodyError::TooLong);
    }
    let mut buf = BytesMut::new();
    while let Some(chunk) = resp.chunk().await.map_err(BodyError::Http)? {
        if buf.len() + chunk.len() > max {
            return Err(BodyError::TooLong);
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

/// `%XX` for every byte outside `!`..`~` and for `%` itself.
fn encode_value(s: &[u8]) -> String {
    let mut out = String::with_capacity(s.len());
    for &b in s {
        if b.is_ascii_graphic() && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A mapped header: `x-amqp-<suffix>` with an encoded value.
fn put(map: &mut HeaderMap, suffix: &str, value: &[u8]) -> bool {
    let encoded = encode_value(value);
    if encoded.len() > MAX_MAPPED_VALUE {
        return false;
    }
    match (
        HeaderName::from_bytes(format!("{HTTP_MAPPED_PREFIX}{suffix}").as_bytes()),
        HeaderValue::from_str(&encoded),
    ) {
        (Ok(n), Ok(v)) if !map.contains_key(&n) => {
            map.insert(n, v);
            true
        }
        _ => false,
    }
}

/// An AMQP header value as text, when it is a string, number or boolean.
fn header_text(v: &AMQPValue) -> Option<Vec<u8>> {
    Some(match v {
        AMQPValue::LongString(s) => s.as_bytes().to_vec(),
        AMQPValue::ShortString(s) => s.as_str().as_bytes().to_vec(),
        AMQPValue::Boolean(b) => b.to_string().into_bytes(),
        AMQPValue::Float(f) => f.to_string().into_bytes(),
        AMQPValue::Double(f) => f.to_string().into_bytes(),
        v => flowgate_actors::envelope::header_int(v)?
            .to_string()
            .into_bytes(),
    })
}

/// The request headers of a delivery (see the module docs).
pub(crate) fn request_headers(d: &Delivery) -> HeaderMap {
    let p = &d.properties;
    let mut h = HeaderMap::new();
    let content_type = p
        .content_type()
        .as_ref()
        .and_then(|c| HeaderValue::from_str(c.as_str()).ok())
        .unwrap_or(HeaderValue::from_static(DEFAULT_CONTENT_TYPE));
    h.insert(CONTENT_TYPE, content_type);
    if let Some(v) = p
        .content_encoding()
        .as_ref()
        .and_then(|c| HeaderValue::from_str(c.as_str()).ok())
    {
        h.insert(CONTENT_ENCODING, v);
    }
    let strings = [
        ("message-id", p.message_id()),
        ("correlation-id", p.correlation_id()),
        ("reply-to", p.reply_to()),
        ("type", p.kind()),
        ("app-id", p.app_id()),
        ("user-id", p.user_id()),
        ("expiration", p.expiration()),
    ];
    for (name, v) in strings {
        if let Some(v) = v {
            put(&mut h, name, v.as_str().as_bytes());
        }
    }
    let numbers = [
        ("timestamp", p.timestamp().map(|t| t.to_string())),
        ("priority", p.priority().map(|t| t.to_string())),
        ("delivery-mode", p.delivery_mode().map(|t| t.to_string())),
    ];
    for (name, v) in numbers {
        if let Some(v) = v {
            put(&mut h, name, v.as_bytes());
        }
    }
    put(&mut h, "exchange", d.exchange.as_bytes());
    put(&mut h, "routing-key", d.routing_key.as_bytes());
    put(&mut h, "queue", d.queue.as_bytes());
    put(&mut h, "stage", d.stage.as_bytes());
    put(
        &mut h,
        "redelivered",
        if d.redelivered { b"true" } else { b"false" },
    );
    let mut dropped = 0usize;
    let mut mapped = 0usize;
    if let Some(table) = p.headers() {
        for (k, v) in table.inner() {
            let name = k.as_str().to_ascii_lowercase();
            let ok_name = !name.is_empty()
                && name.len() <= MAX_MAPPED_NAME
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
            let done = mapped < MAX_MAPPED_HEADERS
                && ok_name
                && header_text(v).is_some_and(|t| put(&mut h, &format!("header-{name}"), &t));
            if done {
                mapped += 1;
            } else {
                dropped += 1;
            }
        }
    }
    if dropped > 0 {
        put(&mut h, "headers-dropped", dropped.to_string().as_bytes());
    }
    h
}

/// The documented answer: `{"outputs": [...]}` (other keys ignored).
#[derive(Deserialize)]
struct AnswerDoc {
    #[serde(default)]
    outputs: Vec<OutputDoc>,
}

/// One output of an answer.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OutputDoc {
    exchange: Option<String>,
    routing_key: Option<String>,
    body: serde_json::Value,
    message_id: Option<String>,
    content_type: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, serde_json::Value>,
}

/// The outputs of a 2xx JSON answer, or why it is not the documented one.
fn parse_outputs(
    d: &Delivery,
    body: &[u8],
    default_target: Option<&Target>,
) -> Result<Vec<Output>, String> {
    let doc: AnswerDoc = serde_json::from_slice(body)
        .map_err(|e| format!("the answer is not an outputs document: {e}"))?;
    doc.outputs
        .into_iter()
        .enumerate()
        .map(|(i, o)| output(d, o, default_target).map_err(|e| format!("output {i}: {e}")))
        .collect()
}

fn output(d: &Delivery, o: OutputDoc, default_target: Option<&Target>) -> Result<Output, String> {
    let (body, json_type) = match o.body {
        serde_json::Value::String(s) => (Bytes::from(s), false),
        serde_json::Value::Null => return Err("no body".into()),
        v => (
            // Serializing a parsed JSON value cannot fail.
            Bytes::from(serde_json::to_vec(&v).map_err(|e| e.to_string())?),
            true,
        ),
    };
    let mut headers = Vec::with_capacity(o.headers.len());
    for (k, v) in o.headers {
        let value = match v {
            serde_json::Value::String(s) => AMQPValue::LongString(LongString::from(s)),
            serde_json::Value::Bool(b) => AMQPValue::Boolean(b),
            serde_json::Value::Number(n) => match n.as_i64() {
                Some(i) => AMQPValue::LongLongInt(i),
                None => AMQPValue::Double(n.as_f64().ok_or("header {k}: not a number")?),
            },
            _ => {
                return Err(format!(
                    "header `{k}`: values are strings, numbers or booleans"
                ))
            }
        };
        headers.push((k, value));
    }
    OutputDraft {
        exchange: o.exchange,
        routing_key: o.routing_key,
        body,
        message_id: o.message_id,
        content_type: o
            .content_type
            .or_else(|| json_type.then(|| "application/json".to_owned())),
        headers,
    }
    .build(d, default_target)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{FieldTable, ShortString};
    use lapin::BasicProperties;

    fn delivery(props: BasicProperties) -> Delivery {
        Delivery {
            body: Bytes::from_static(b"{}"),
            properties: props,
            redelivered: false,
            exchange: "shop".into(),
            routing_key: "order.new".into(),
            queue: "priced".into(),
            stage: "price".into(),
        }
    }

    fn target() -> Target {
        Target {
            exchange: "shop".into(),
            routing_key: "order.priced".into(),
        }
    }

    #[test]
    fn properties_and_headers_become_bounded_sanitized_http_headers() {
        let mut t = FieldTable::default();
        t.insert(
            ShortString::from("Tenant"),
            AMQPValue::LongString("a\r\nb é%".into()),
        );
        t.insert(
            ShortString::from("tenant"),
            AMQPValue::LongString("dup".into()),
        );
        t.insert(ShortString::from("n"), AMQPValue::LongInt(7));
        t.insert(ShortString::from("bad name"), AMQPValue::Boolean(true));
        t.insert(
            ShortString::from("table"),
            AMQPValue::FieldTable(FieldTable::default()),
        );
        t.insert(
            ShortString::from("huge"),
            AMQPValue::LongString("x".repeat(MAX_MAPPED_VALUE + 1).into()),
        );
        let p = BasicProperties::default()
            .with_message_id("m 1".into())
            .with_content_type("application/json".into())
            .with_headers(t);
        let h = request_headers(&delivery(p));
        assert_eq!(h["content-type"], "application/json");
        assert_eq!(h["x-amqp-message-id"], "m%201");
        assert_eq!(h["x-amqp-routing-key"], "order.new");
        assert_eq!(h["x-amqp-redelivered"], "false");
        assert_eq!(h["x-amqp-header-n"], "7");
        let tenant = h["x-amqp-header-tenant"].to_str().unwrap();
        assert!(
            tenant == "a%0D%0Ab%20%C3%A9%25" || tenant == "dup",
            "{tenant}"
        );
        // the case duplicate, the bad name, the table and the huge value
        assert_eq!(h["x-amqp-headers-dropped"], "4");
        let many: FieldTable = {
            let mut t = FieldTable::default();
            for i in 0..(MAX_MAPPED_HEADERS + 5) {
                t.insert(ShortString::from(format!("h{i}")), AMQPValue::LongInt(1));
            }
            t
        };
        let h = request_headers(&delivery(BasicProperties::default().with_headers(many)));
        assert_eq!(h["content-type"], DEFAULT_CONTENT_TYPE);
        assert_eq!(h["x-amqp-headers-dropped"], "5");
    }

    #[test]
    fn an_outputs_document_becomes_outputs() {
        let d = delivery(BasicProperties::default().with_message_id("in-1".into()));
        let body = br#"{"outputs":[
            {"body":{"total":3},"headers":{"x-n":2,"x-s":"v","x-b":true}},
            {"exchange":"other","routing_key":"k","body":"text","message_id":"out-2"}
        ],"status":"ok"}"#;
        let outs = parse_outputs(&d, body, Some(&target())).unwrap();
        assert_eq!(outs.len(), 2);
        assert_eq!(
            (outs[0].exchange.as_str(), outs[0].routing_key.as_str()),
            ("shop", "order.priced")
        );
        assert_eq!(&outs[0].body[..], br#"{"total":3}"#);
        assert_eq!(
            outs[0].properties.content_type().as_ref().unwrap().as_str(),
            "application/json"
        );
        assert_eq!(
            outs[0].properties.message_id().as_ref().unwrap().as_str(),
            "in-1"
        );
        let hdr = outs[0].properties.headers().as_ref().unwrap();
        assert_eq!(hdr.inner().get("x-n"), Some(&AMQPValue::LongLongInt(2)));
        assert_eq!(outs[1].exchange, "other");
        assert_eq!(&outs[1].body[..], b"text");
        assert_eq!(
            outs[1].properties.message_id().as_ref().unwrap().as_str(),
            "out-2"
        );
        assert!(parse_outputs(&d, br#"{"status":"ok"}"#, None)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn a_batch_answer_gives_each_entry_its_own_fate() {
        let batch: Vec<Delivery> = (0..5)
            .map(|i| {
                let mut d = delivery(BasicProperties::default());
                d.body = Bytes::from(if i == 4 {
                    vec![0xff, 0xfe]
                } else {
                    b"{}".to_vec()
                });
                d
            })
            .collect();
        let request = batch_request(&batch);
        let entries = request["entries"].as_array().unwrap();
        assert_eq!(entries.len(), 5);
        assert_eq!(entries[1]["entry_id"], "1");
        assert_eq!(entries[1]["body"], "{}");
        assert_eq!(
            entries[1]["headers"]["x-amqp-queue"],
            batch[1].queue.as_str()
        );
        assert_eq!(
            entries[4]["body_base64"], "//4=",
            "a body that is not UTF-8"
        );
        // 0 acked with an output, 1 dead-lettered, 2 retried, 3 missing,
        // 4 with an invalid output; "9" and a repeated "1" are ignored.
        let answer = br#"{"statuses": [
            {"entry_id": "0", "status": "ack", "outputs": [{"body": "zero"}]},
            {"entry_id": "1", "status": "dead_letter", "reason": "no such sku"},
            {"entry_id": "1", "status": "ack"},
            {"entry_id": "2", "status": "retry", "reason": "db busy"},
            {"entry_id": "9", "status": "ack"},
            {"entry_id": "4", "status": "ack", "outputs": [{"body": "x", "routing_key": null, "exchange": null}]}
        ]}"#;
        let out = parse_statuses(&batch, answer, Some(&target())).unwrap();
        assert_eq!(out.len(), 5);
        assert!(
            matches!(&out[0], Outcome::Ack { outputs } if outputs.len() == 1 && outputs[0].body == "zero"),
            "{:?}",
            out[0]
        );
        assert!(
            matches!(&out[1], Outcome::DeadLetter { reason, .. } if reason == "no such sku"),
            "{:?}",
            out[1]
        );
        assert!(
            matches!(&out[2], Outcome::Retry { reason } if reason == "db busy"),
            "{:?}",
            out[2]
        );
        assert!(
            matches!(&out[3], Outcome::Retry { reason } if reason.starts_with(envelope::MISSING_BATCH_RESULT)),
            "{:?}",
            out[3]
        );
        let no_target = parse_statuses(&batch, answer, None).unwrap();
        assert!(
            matches!(&out[4], Outcome::Ack { outputs } if outputs.len() == 1),
            "{:?}",
            out[4]
        );
        assert!(
            matches!(&no_target[4], Outcome::InvalidOutput { reason } if reason.contains("entry 4")),
            "an output with no exchange and no stage output: {:?}",
            no_target[4]
        );
        assert!(
            matches!(&no_target[1], Outcome::DeadLetter { .. }),
            "only the invalid entry: {:?}",
            no_target[1]
        );
        assert!(parse_statuses(&batch, br#"{"outputs": []}"#, None).is_err());
        assert!(parse_statuses(
            &batch,
            br#"{"statuses": [{"entry_id": "0", "status": "maybe"}]}"#,
            None
        )
        .is_err());
    }

    #[test]
    fn a_malformed_outputs_document_is_an_error_not_a_panic() {
        let d = delivery(BasicProperties::default());
        let long = "k".repeat(300);
        for bad in [
            "not json".to_owned(),
            r#"{"outputs":{}}"#.to_owned(),
            r#"{"outputs":[{"body":"x"}]}"#.to_owned(), // no target anywhere
            r#"{"outputs":[{"exchange":"e","routing_key":"k"}]}"#.to_owned(),
            r#"{"outputs":[{"exchange":"e","routing_key":"k","body":"x","extra":1}]}"#.to_owned(),
            format!(
                r#"{{"outputs":[{{"exchange":"e","routing_key":"k","body":"x","message_id":"{long}"}}]}}"#
            ),
            format!(
                r#"{{"outputs":[{{"exchange":"e","routing_key":"k","body":"x","headers":{{"{long}":"v"}}}}]}}"#
            ),
            r#"{"outputs":[{"exchange":"e","routing_key":"k","body":"x","headers":{"h":[1]}}]}"#
                .to_owned(),
        ] {
            assert!(parse_outputs(&d, bad.as_bytes(), None).is_err(), "{bad}");
        }
        // Long exchange names and routing keys are the stage's to refuse
        // (it dead-letters them as `invalid-output` before publishing).
        let doc =
            format!(r#"{{"outputs":[{{"exchange":"e","routing_key":"{long}","body":"x"}}]}}"#);
        assert_eq!(
            parse_outputs(&d, doc.as_bytes(), None).unwrap()[0].routing_key,
            long
        );
    }

    /// A tiny keep-alive HTTP server answering request `n` (from 0) with
    /// `answer(n)`; returns its URL and the request counter.
    async fn server(
        answer: fn(usize) -> &'static str,
    ) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        let count = std::sync::Arc::new(AtomicUsize::new(0));
        let c = count.clone();
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                let c = c.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                            match sock.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                            continue;
                        };
                        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                        let len: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .map_or(0, |v| v.trim().parse().unwrap());
                        while buf.len() < end + 4 + len {
                            match sock.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        buf.drain(..end + 4 + len);
                        let n = c.fetch_add(1, Ordering::SeqCst);
                        if sock.write_all(answer(n).as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (url, count)
    }

    fn handler(url: &str, f: impl FnOnce(&mut HttpStageConfig)) -> Http {
        let mut cfg = HttpStageConfig::new(url);
        f(&mut cfg);
        Http::new(&cfg, Some(target())).unwrap()
    }

    const BUSY_FOR_AN_HOUR: &str =
        "HTTP/1.1 503 Service Unavailable\r\nretry-after: 3600\r\ncontent-length: 0\r\n\r\n";
    const OK_JSON: &str = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 26\r\n\r\n{\"outputs\":[{\"body\":\"x\"}]}";

    #[tokio::test]
    async fn slow_down_waits_capped_then_tries_again_until_the_service_recovers() {
        let (url, count) = server(|n| if n < 3 { BUSY_FOR_AN_HOUR } else { OK_JSON }).await;
        let h = handler(&url, |c| c.retry_after_max = Duration::from_millis(5));
        // Retry-After says an hour; the cap makes it 5 ms per answer (the
        // outer bound only keeps a broken cap from hanging the test).
        let out = tokio::time::timeout(
            Duration::from_secs(60),
            h.handle(&delivery(BasicProperties::default())),
        )
        .await
        .expect("the cap bounds each wait")
        .unwrap();
        let Outcome::Ack { outputs } = out else {
            panic!("{out:?}")
        };
        assert_eq!(outputs.len(), 1);
        assert_eq!(
            count.load(std::sync::atomic::Ordering::SeqCst),
            4,
            "three 503s, then the answer"
        );
    }

    #[tokio::test]
    async fn slow_down_past_its_limit_goes_through_the_retry_ladder() {
        let (url, count) = server(|_| BUSY_FOR_AN_HOUR).await;
        let h = handler(&url, |c| {
            c.retry_after_max = Duration::from_millis(5);
            c.slow_down_limit = Duration::from_millis(50);
        });
        let out = tokio::time::timeout(
            Duration::from_secs(60),
            h.handle(&delivery(BasicProperties::default())),
        )
        .await
        .expect("the limit ends the slow-down")
        .unwrap();
        let Outcome::Retry { reason } = out else {
            panic!("{out:?}")
        };
        assert!(reason.starts_with("http 503"), "{reason}");
        assert!(
            count.load(std::sync::atomic::Ordering::SeqCst) >= 2,
            "it tried again"
        );
    }

    #[test]
    fn retry_after_is_seconds_and_error_reasons_carry_the_status() {
        let mut h = HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert("retry-after", HeaderValue::from_static("2"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(2)));
        h.insert("retry-after", HeaderValue::from_static("0.25"));
        assert_eq!(retry_after(&h), Some(Duration::from_millis(250)));
        h.insert(
            "retry-after",
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(retry_after(&h), None);
        assert_eq!(
            status_reason(StatusCode::UNPROCESSABLE_ENTITY, b""),
            "http 422"
        );
        assert_eq!(
            status_reason(StatusCode::UNPROCESSABLE_ENTITY, b" unknown\nsku "),
            "http 422: unknown sku"
        );
        assert!(status_reason(StatusCode::BAD_REQUEST, &[b'x'; 1000]).len() < 220);
    }
}
