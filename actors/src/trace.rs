//! W3C trace context (`traceparent`, `tracestate`) in AMQP headers, and the
//! spans of the hot path, with the OpenTelemetry messaging conventions.
//!
//! Propagation is OpenTelemetry's [`TraceContextPropagator`] over an AMQP
//! header carrier ([`TraceHeaders`] reads, an injector writes). Headers come
//! from producers the engine does not control: a value that is not a
//! well-formed W3C `traceparent`, or is longer than the format allows, is
//! ignored (the span starts a new trace); nothing here panics on input.
//!
//! Spans exist only while export is on ([`set_enabled`], flipped by the
//! engine's telemetry setup when it installs the OpenTelemetry layer): with
//! export off, every span constructor returns [`Span::none`] after one
//! relaxed atomic load, so the hot path builds no span and formats nothing.
//! Incoming trace headers are then passed through to outputs unchanged
//! (validated), so a downstream service that traces still sees the trace.

use crate::message::{set_header, Output};
use lapin::types::{AMQPValue, LongString};
use lapin::BasicProperties;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use std::sync::atomic::{AtomicBool, Ordering};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

pub use crate::envelope::{TRACEPARENT, TRACESTATE};
/// `messaging.system` of every span.
pub const MESSAGING_SYSTEM: &str = "rabbitmq";

/// Longest `traceparent` accepted: version 00 is exactly 55 bytes; a later
/// version may append fields, bounded here.
const MAX_TRACEPARENT_BYTES: usize = 128;
/// Longest `tracestate` accepted: W3C allows 32 members of at most 256
/// bytes, and asks vendors to propagate at least 512 bytes.
const MAX_TRACESTATE_BYTES: usize = 512;
/// Longest message id written into a span or a log line, in bytes.
const MAX_LOGGED_ID_BYTES: usize = 128;

/// Whether spans are built (export on). Off by default.
static ENABLED: AtomicBool = AtomicBool::new(false);

/// Turns span building on or off for the whole process. The engine's
/// telemetry setup calls it when it installs the OpenTelemetry layer; a host
/// composing its own subscriber does the same.
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Whether spans are built: the one cheap check of the hot path.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// The trace headers of a message, as far as they are well formed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TraceHeaders {
    traceparent: Option<String>,
    tracestate: Option<String>,
}

impl TraceHeaders {
    /// Reads them from AMQP properties.
    pub fn of(props: &BasicProperties) -> Self {
        let get = |name: &str| {
            props
                .headers()
                .as_ref()
                .and_then(|h| h.inner().get(name))
                .and_then(crate::envelope::header_string)
        };
        Self::new(get(TRACEPARENT).as_deref(), get(TRACESTATE).as_deref())
    }

    /// From raw values (e.g. HTTP request headers). An ill-formed
    /// `traceparent` is dropped, and a `tracestate` without one too.
    pub fn new(traceparent: Option<&str>, tracestate: Option<&str>) -> Self {
        let traceparent = traceparent.map(str::trim).filter(|t| well_formed(t));
        let tracestate = tracestate
            .map(str::trim)
            .filter(|s| traceparent.is_some() && !s.is_empty() && s.len() <= MAX_TRACESTATE_BYTES)
            .filter(|s| s.bytes().all(|b| (0x20..0x7f).contains(&b)));
        Self {
            traceparent: traceparent.map(str::to_owned),
            tracestate: tracestate.map(str::to_owned),
        }
    }

    /// A new root: random trace and span ids, sampled. For a gateway that
    /// starts a trace id for every message even with export off (with export
    /// on, [`publish_span_from`] with no headers starts a real one instead).
    pub fn new_root() -> Self {
        let trace_id = fastrand::u128(1..);
        let span_id = fastrand::u64(1..);
        Self {
            traceparent: Some(format!("00-{trace_id:032x}-{span_id:016x}-01")),
            tracestate: None,
        }
    }

    /// The `traceparent` value, if a well-formed one was present.
    pub fn traceparent(&self) -> Option<&str> {
        self.traceparent.as_deref()
    }

    /// The `tracestate` value, if present with a valid `traceparent`.
    pub fn tracestate(&self) -> Option<&str> {
        self.tracestate.as_deref()
    }

    /// The remote parent context these headers describe (an empty context,
    /// so a new trace, when there is none or it is invalid).
    pub fn context(&self) -> opentelemetry::Context {
        TraceContextPropagator::new().extract(self)
    }

    /// Writes these headers onto `props` as they are, unless `props`
    /// already carries a valid `traceparent` (export off: pass-through).
    /// Ill-formed trace headers on `props` (a hostile input copied by a
    /// handler) are removed.
    pub fn copy_to(&self, props: &mut BasicProperties) {
        if TraceHeaders::of(props).traceparent.is_some() {
            return;
        }
        let has = |name: &str| {
            props
                .headers()
                .as_ref()
                .is_some_and(|h| h.contains_key(name))
        };
        if has(TRACEPARENT) || has(TRACESTATE) {
            *props = crate::envelope::without(std::mem::take(props), &[TRACEPARENT, TRACESTATE]);
        }
        let Some(tp) = &self.traceparent else { return };
        HeaderInjector(props).set(TRACEPARENT, tp.clone());
        if let Some(ts) = &self.tracestate {
            HeaderInjector(props).set(TRACESTATE, ts.clone());
        }
    }
}

/// The W3C shape: `vv-<32 hex>-<16 hex>-ff`, lower-case hex, version `ff`
/// forbidden, ids not all zeros; a later version may append `-...` fields.
fn well_formed(t: &str) -> bool {
    let b = t.as_bytes();
    let hex = |s: &[u8]| {
        s.iter()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c))
    };
    if b.len() < 55 || b.len() > MAX_TRACEPARENT_BYTES {
        return false;
    }
    let shape = hex(&b[0..2])
        && b[2] == b'-'
        && hex(&b[3..35])
        && b[35] == b'-'
        && hex(&b[36..52])
        && b[52] == b'-'
        && hex(&b[53..55]);
    let zero = |s: &[u8]| s.iter().all(|c| *c == b'0');
    if !shape || &b[0..2] == b"ff" || zero(&b[3..35]) || zero(&b[36..52]) {
        return false;
    }
    if &b[0..2] == b"00" {
        b.len() == 55
    } else {
        b.len() == 55 || b[55] == b'-'
    }
}

impl Extractor for TraceHeaders {
    fn get(&self, key: &str) -> Option<&str> {
        match key {
            TRACEPARENT => self.traceparent(),
            TRACESTATE => self.tracestate(),
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        vec![TRACEPARENT, TRACESTATE]
    }
}

/// Writes the propagator's headers into AMQP properties; only the two
/// trace header names are ever written, and an empty value removes one.
struct HeaderInjector<'a>(&'a mut BasicProperties);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        let name = match key {
            TRACEPARENT => TRACEPARENT,
            TRACESTATE => TRACESTATE,
            _ => return,
        };
        if value.is_empty() {
            *self.0 = crate::envelope::without(self.0.clone(), &[name]);
        } else {
            // The names are the constants above, far below 255 bytes.
            set_header(self.0, name, AMQPValue::LongString(LongString::from(value)));
        }
    }
}

/// Writes the context of `span` into `props` (replacing any trace headers
/// there): whoever consumes the message becomes the span's child. Nothing
/// happens for a disabled span.
pub fn inject(span: &Span, props: &mut BasicProperties) {
    if span.is_disabled() {
        return;
    }
    TraceContextPropagator::new().inject_context(&span.context(), &mut HeaderInjector(props));
}

/// A message id as it may appear in a span or a log line: control
/// characters escaped, cut to a bound, so a producer cannot forge lines.
pub fn loggable_id(id: &str) -> String {
    let escaped: String = id.escape_debug().collect();
    crate::envelope::truncate(escaped, MAX_LOGGED_ID_BYTES)
}

/// The `process` span of one delivery (a consumer span, the child of the
/// span that published it). [`Span::none`] with export off.
pub fn process_span(
    stage: &str,
    queue: &str,
    routing_key: &str,
    props: &BasicProperties,
    body_size: usize,
) -> Span {
    if !enabled() {
        return Span::none();
    }
    let message_id = span_message_id(props);
    let span = tracing::info_span!(
        "process",
        otel.name = %format_args!("process {queue}"),
        otel.kind = "consumer",
        messaging.system = MESSAGING_SYSTEM,
        messaging.operation.type = "process",
        messaging.operation.name = "process",
        messaging.destination.name = queue,
        messaging.rabbitmq.destination.routing_key = routing_key,
        messaging.message.body.size = body_size as u64,
        messaging.message.id = message_id.as_deref(),
        stage = stage,
        message_id = message_id.as_deref(),
    );
    // No layer (a host that turned spans on without installing it): the
    // span still carries its fields for the logs.
    let _ = span.set_parent(TraceHeaders::of(props).context());
    span
}

/// The `publish` span of one output (a producer span, the child of the
/// current span), whose context is written into the output's headers.
/// [`Span::none`] with export off, and the output is left alone.
pub fn publish_span(out: &mut Output) -> Span {
    if !enabled() {
        return Span::none();
    }
    publish_span_under(None, out)
}

/// The message id as a span field: escaped and capped ([`loggable_id`]).
fn span_message_id(props: &BasicProperties) -> Option<String> {
    props
        .message_id()
        .as_ref()
        .map(|id| loggable_id(id.as_str()))
}

/// The `publish` span, under `parent` when given (else the current span).
fn publish_span_under(parent: Option<&TraceHeaders>, out: &mut Output) -> Span {
    let exchange = if out.exchange.is_empty() {
        "amq.default"
    } else {
        out.exchange.as_str()
    };
    let message_id = span_message_id(&out.properties);
    let span = tracing::info_span!(
        "publish",
        otel.name = %format_args!("publish {exchange}"),
        otel.kind = "producer",
        messaging.system = MESSAGING_SYSTEM,
        messaging.operation.type = "publish",
        messaging.operation.name = "publish",
        messaging.destination.name = exchange,
        messaging.rabbitmq.destination.routing_key = out.routing_key.as_str(),
        messaging.message.body.size = out.body.len() as u64,
        messaging.message.id = message_id.as_deref(),
        message_id = message_id.as_deref(),
    );
    if let Some(parent) = parent {
        // Before the context is first read below; without a layer, no-op.
        let _ = span.set_parent(parent.context());
    }
    inject(&span, &mut out.properties);
    span
}

/// [`publish_span`] for a message entering the pipeline with the trace
/// headers of its producer (e.g. an HTTP request's): its span continues that
/// trace, or starts a new one when there are none. With export off the
/// headers are passed through as they are.
pub fn publish_span_from(parent: &TraceHeaders, out: &mut Output) -> Span {
    if !enabled() {
        parent.copy_to(&mut out.properties);
        return Span::none();
    }
    publish_span_under(Some(parent), out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const TP: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    fn props_with(tp: &str) -> BasicProperties {
        let mut p = BasicProperties::default();
        set_header(&mut p, TRACEPARENT, AMQPValue::LongString(tp.into()));
        set_header(&mut p, TRACESTATE, AMQPValue::LongString("a=1".into()));
        p
    }

    #[test]
    fn a_valid_traceparent_is_read_with_its_state() {
        let h = TraceHeaders::of(&props_with(TP));
        assert_eq!(h.traceparent(), Some(TP));
        assert_eq!(h.tracestate(), Some("a=1"));
        use opentelemetry::trace::TraceContextExt;
        let cx = h.context();
        let sc = cx.span().span_context().clone();
        assert!(sc.is_valid() && sc.is_remote());
        assert_eq!(
            sc.trace_id().to_string(),
            "0af7651916cd43dd8448eb211c80319c"
        );
        assert_eq!(sc.trace_state().header(), "a=1");
    }

    #[test]
    fn hostile_traceparents_are_ignored() {
        for bad in [
            "garbage",
            "00-1-2-01",
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            &format!(
                "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-{}",
                "x".repeat(200)
            ),
        ] {
            use opentelemetry::trace::TraceContextExt;
            let h = TraceHeaders::of(&props_with(bad));
            let cx = h.context();
            assert!(!cx.span().span_context().is_valid(), "{bad}");
            assert_eq!(h.tracestate(), None, "no state without a parent: {bad}");
        }
        let long_state = "a=".to_owned() + &"b".repeat(MAX_TRACESTATE_BYTES);
        assert_eq!(
            TraceHeaders::new(Some(TP), Some(&long_state)).tracestate(),
            None
        );
        assert_eq!(
            TraceHeaders::new(Some(TP), Some("a=1\nb=2")).tracestate(),
            None
        );
    }

    #[test]
    fn export_off_builds_no_span_and_passes_headers_through() {
        // Export is off unless the engine's telemetry turns it on, and no
        // test in this crate does; a subscriber that wants every span is
        // installed, so only the gate can make these spans disabled.
        let _sub = tracing::subscriber::set_default(tracing_subscriber::registry());
        assert!(!enabled());
        let props = props_with(TP);
        assert!(process_span("s", "q", "k", &props, 3).is_disabled());
        let mut out = Output::new("x", "k", bytes::Bytes::from_static(b"b"));
        assert!(publish_span(&mut out).is_disabled());
        assert!(out.properties.headers().is_none(), "left alone");
        let span = publish_span_from(&TraceHeaders::of(&props), &mut out);
        assert!(span.is_disabled());
        assert_eq!(TraceHeaders::of(&out.properties), TraceHeaders::of(&props));
        // An output that has its own trace headers keeps them.
        let other = "00-11111111111111111111111111111111-2222222222222222-01";
        let mut own = props_with(other);
        TraceHeaders::of(&props).copy_to(&mut own);
        assert_eq!(TraceHeaders::of(&own).traceparent(), Some(other));
        // A sanity check that the subscriber does take spans otherwise.
        assert!(!tracing::info_span!("probe").is_disabled());
    }

    #[test]
    fn a_new_root_is_well_formed_and_new() {
        let (a, b) = (TraceHeaders::new_root(), TraceHeaders::new_root());
        let tp = a.traceparent().unwrap();
        assert_eq!(TraceHeaders::new(Some(tp), None), a, "reads back");
        assert_ne!(a, b);
    }

    #[test]
    fn a_message_id_cannot_forge_log_lines() {
        let id = loggable_id(&format!("x\n{{\"level\":\"ERROR\"}}\r{}", "y".repeat(500)));
        assert!(!id.contains('\n') && !id.contains('\r'));
        assert!(id.len() <= MAX_LOGGED_ID_BYTES + '…'.len_utf8());
    }

    proptest! {
        #[test]
        fn any_header_value_is_read_without_panic(tp in ".{0,140}", ts in ".{0,600}") {
            let h = TraceHeaders::new(Some(&tp), Some(&ts));
            let _ = h.context();
            prop_assert!(h.traceparent().is_none_or(|t| t.len() <= MAX_TRACEPARENT_BYTES));
            prop_assert!(h.tracestate().is_none_or(|s| s.len() <= MAX_TRACESTATE_BYTES));
        }
    }
}
