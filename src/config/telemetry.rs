//! `[telemetry]`: OpenTelemetry trace export.

use super::*;

/// `[telemetry]`: spans for consume, process and publish (with the
/// OpenTelemetry messaging conventions), linked across hops through the W3C
/// `traceparent`/`tracestate` headers, exported over OTLP/HTTP (protobuf).
/// Off by default: then no span is built at all, and the trace headers of
/// incoming messages pass through to the outputs unchanged.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// Whether spans are built and exported. Default `false`.
    #[serde(default)]
    pub enabled: bool,
    /// The OTLP/HTTP traces endpoint (a collector's, or an agent's). Default
    /// `http://127.0.0.1:4318/v1/traces`.
    #[serde(default = "default_endpoint")]
    pub endpoint: String,
    /// Share of new traces sampled, from `0` to `1`; a message that arrives
    /// with a trace context follows its parent's decision. Default `1`.
    #[serde(default = "default_sampling_ratio")]
    pub sampling_ratio: f64,
    /// `service.name` of the exported spans. Default `flowgate`.
    #[serde(default = "default_service_name")]
    pub service_name: String,
}

fn default_endpoint() -> String {
    "http://127.0.0.1:4318/v1/traces".into()
}

fn default_sampling_ratio() -> f64 {
    1.0
}

fn default_service_name() -> String {
    "flowgate".into()
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            endpoint: default_endpoint(),
            sampling_ratio: default_sampling_ratio(),
            service_name: default_service_name(),
        }
    }
}
