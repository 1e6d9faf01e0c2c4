//! The process's log (`[log]`): text or JSON lines on stderr, next to the
//! trace export of [`Telemetry`].
//!
//! A JSON line is one object: `timestamp`, `level`, `target`, the event's
//! fields (`message` among them), the fields of the spans it happened in
//! (`stage`, `message_id` on a delivery's span), and `trace_id`/`span_id`
//! of the innermost exported span. Values are JSON-escaped, so a producer's
//! message id cannot break a line; the engine also escapes and bounds it
//! before it reaches a span ([`trace::loggable_id`](crate::trace::loggable_id)).

use crate::config::{Config, LogFormat};
use crate::{Error, Telemetry};
use serde_json::{Map, Value};
use std::fmt;
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{FormatEvent, JsonFields, Writer};
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormattedFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer as _;

/// The level filter when `RUST_LOG` is not set.
const DEFAULT_FILTER: &str = "info,lapin=warn";

/// Installs the process's global subscriber from `cfg`: `[log] format` on
/// stderr, filtered by `RUST_LOG`, and the `[telemetry]` export. Returns
/// the telemetry to [`shut down`](Telemetry::shutdown) after the engine
/// stops. Fails if the exporter cannot be built or a global subscriber is
/// already installed.
pub fn init(cfg: &Config) -> Result<Telemetry, Error> {
    let telemetry = Telemetry::start(&cfg.telemetry)?;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    // Spans and events below `info` are never exported: lapin's debug
    // events would otherwise be built on every frame.
    let export = telemetry
        .layer()
        .with_filter(tracing_subscriber::filter::LevelFilter::INFO);
    let registry = tracing_subscriber::registry().with(export);
    let installed = match cfg.log.format {
        LogFormat::Text => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_target(false)
                    .with_ansi(ansi)
                    .with_writer(std::io::stderr)
                    .with_filter(filter),
            )
            .try_init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .fmt_fields(JsonFields::new())
                    .event_format(JsonLines)
                    .with_writer(std::io::stderr)
                    .with_filter(filter),
            )
            .try_init(),
    };
    installed.map_err(|e| Error::Telemetry(Box::new(e)))?;
    Ok(telemetry)
}

/// The JSON line format (see the module's doc).
#[derive(Clone, Copy, Debug, Default)]
pub struct JsonLines;

impl<S> FormatEvent<S, JsonFields> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, JsonFields>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut line = Map::new();
        let mut ts = String::new();
        SystemTime.format_time(&mut Writer::new(&mut ts))?;
        line.insert("timestamp".into(), Value::String(ts));
        let meta = event.metadata();
        line.insert("level".into(), Value::String(meta.level().to_string()));
        line.insert("target".into(), Value::String(meta.target().to_owned()));
        let mut ids = None;
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                let ext = span.extensions();
                if let Some(fields) = ext.get::<FormattedFields<JsonFields>>() {
                    if let Ok(Value::Object(m)) = serde_json::from_str::<Value>(fields) {
                        line.extend(m);
                    }
                }
                if let Some(otel) = ext.get::<tracing_opentelemetry::OtelData>() {
                    if let (Some(t), Some(s)) = (otel.trace_id(), otel.span_id()) {
                        ids = Some((t, s));
                    }
                }
            }
        }
        if let Some((trace_id, span_id)) = ids {
            line.insert("trace_id".into(), Value::String(trace_id.to_string()));
            line.insert("span_id".into(), Value::String(span_id.to_string()));
        }
        event.record(&mut JsonVisitor(&mut line));
        let text = serde_json::to_string(&line).map_err(|_| fmt::Error)?;
        writeln!(writer, "{text}")
    }
}

/// Collects an event's fields into the line (later fields win).
struct JsonVisitor<'a>(&'a mut Map<String, Value>);

impl Visit for JsonVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0
            .insert(field.name().into(), Value::String(value.into()));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0
            .insert(field.name().into(), Value::String(format!("{value:?}")));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn json_lines_carry_span_fields_and_escape_values() {
        let buf = Buf::default();
        let w = buf.clone();
        let sub = tracing_subscriber::registry().with(
            tracing_subscriber::fmt::layer()
                .fmt_fields(JsonFields::new())
                .event_format(JsonLines)
                .with_writer(move || w.clone()),
        );
        tracing::subscriber::with_default(sub, || {
            let span = tracing::info_span!("process", stage = "s1", message_id = "a\n{\"x\":1}");
            let _g = span.enter();
            tracing::info!(n = 3, "handled\nforged");
        });
        let out = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<_> = out.lines().collect();
        assert_eq!(lines.len(), 1, "{out}");
        let v: Value = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(v["stage"], "s1");
        assert_eq!(v["message_id"], "a\n{\"x\":1}");
        assert_eq!(v["message"], "handled\nforged");
        assert_eq!(v["n"], 3);
        assert_eq!(v["level"], "INFO");
    }
}
