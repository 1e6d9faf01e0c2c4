//! OpenTelemetry trace export (`[telemetry]`): the tracer provider with its
//! OTLP/HTTP exporter, and the `tracing` layer that turns the engine's spans
//! (see [`trace`](crate::trace)) into OpenTelemetry spans.
//!
//! The daemon sets it up from its config ([`crate::log::init`]). A host
//! embedding the engine does the same with [`crate::log::init`], or composes
//! its own subscriber:
//!
//! ```no_run
//! use tracing_subscriber::layer::SubscriberExt;
//! # fn main() -> Result<(), flowgate::Error> {
//! let config = flowgate::Config::load("flowgate.toml".as_ref())?;
//! let telemetry = flowgate::Telemetry::start(&config.telemetry)?;
//! let subscriber = tracing_subscriber::registry()
//!     .with(telemetry.layer())
//!     .with(tracing_subscriber::fmt::layer());
//! tracing::subscriber::set_global_default(subscriber).expect("the only subscriber");
//! // ... run the engine; once it has stopped:
//! telemetry.shutdown();
//! # Ok(()) }
//! ```
//!
//! [`Telemetry::layer`] is what turns span building on
//! ([`trace::set_enabled`](crate::trace::set_enabled)); without it (export
//! off) the hot path builds no span.

use crate::config::TelemetryConfig;
use crate::Error;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use tracing::Subscriber;
use tracing_subscriber::registry::LookupSpan;

/// The instrumentation scope of the engine's spans.
const SCOPE: &str = "flowgate";

/// The trace pipeline of one process: nothing when `[telemetry]` is off.
#[derive(Clone, Debug)]
pub struct Telemetry {
    /// The provider batching and exporting spans; `None` with export off.
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Builds the exporter and the provider when `cfg.enabled` (nothing is
    /// sent before the first span). Safe to call inside or outside a tokio
    /// runtime: the exporter's blocking HTTP client and the batch processor
    /// run on threads of their own.
    pub fn start(cfg: &TelemetryConfig) -> Result<Self, Error> {
        if !cfg.enabled {
            return Ok(Self::off());
        }
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(cfg.endpoint.clone())
            .build()
            .map_err(|e| Error::Telemetry(Box::new(e)))?;
        let sampler =
            Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(cfg.sampling_ratio)));
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_sampler(sampler)
            .with_resource(
                Resource::builder()
                    .with_service_name(cfg.service_name.clone())
                    .build(),
            )
            .build();
        Ok(Self {
            provider: Some(provider),
        })
    }

    /// No export.
    pub fn off() -> Self {
        Self { provider: None }
    }

    /// Whether spans are exported.
    pub fn is_enabled(&self) -> bool {
        self.provider.is_some()
    }

    /// The `tracing` layer exporting the engine's spans (`None` with export
    /// off, which `tracing_subscriber` accepts as a layer that does nothing).
    /// Taking it turns span building on: install it.
    pub fn layer<S>(&self) -> Option<tracing_opentelemetry::OpenTelemetryLayer<S, SdkTracer>>
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
    {
        let provider = self.provider.as_ref()?;
        flowgate_actors::trace::set_enabled(true);
        // Only the spans' own fields: no source location, thread or busy
        // time attributes on every message's spans.
        Some(
            tracing_opentelemetry::layer()
                .with_tracer(provider.tracer(SCOPE))
                .with_location(false)
                .with_threads(false)
                .with_tracked_inactivity(false),
        )
    }

    /// Exports what is still batched and stops the exporter; call it once
    /// the engine has drained. Spans ended later are dropped. Blocks for at
    /// most the exporter's timeout; does nothing with export off.
    pub fn shutdown(&self) {
        let Some(provider) = self.provider.clone() else {
            return;
        };
        flowgate_actors::trace::set_enabled(false);
        // The provider's shutdown blocks on the batch thread: keep it off
        // any async runtime thread the caller may be on.
        let done = std::thread::spawn(move || provider.shutdown()).join();
        match done {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "trace export: shutdown failed"),
            Err(_) => tracing::warn!("trace export: shutdown panicked"),
        }
    }
}
