//! Logs, traces and metrics. Logs go to a sink the caller picks (stderr in the binary, a buffer
//! in tests). Spans and metrics also go to an OpenTelemetry collector over OTLP/gRPC when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set (or the signal's own `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`
//! / `OTEL_EXPORTER_OTLP_METRICS_ENDPOINT`); the exporters read the other standard `OTEL_*`
//! variables themselves (headers, timeout, compression, sampler, export interval, resource
//! attributes). `RUST_LOG` picks the spans for logs and export alike: at the default `info`,
//! every RPC, use case, database call and provider call has one.
//!
//! Neither spans nor metrics hold a secret: tokens, refresh tokens and caller JWTs are skipped at
//! every instrumented function, and the black-box tests read what a collector receives to prove
//! it.

use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context as _;
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// The filter when `RUST_LOG` is not set.
pub const DEFAULT_FILTER: &str = "info,sqlx=warn,h2=warn,tower=warn,hyper=warn";

/// The instrumentation scope of the vault's spans and metrics.
pub const SCOPE: &str = "vault-server";

const ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
const TRACES_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT";
const METRICS_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT";

/// Set once spans are exported; the per-RPC span then carries OpenTelemetry fields and joins
/// the caller's trace.
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// What [`init`] installed. Call [`Telemetry::shutdown`] before the process exits so the last
/// spans and metric points reach the collector.
#[must_use = "dropping it without shutdown loses the last spans and metric points"]
#[derive(Debug, Default)]
pub struct Telemetry {
    tracer_provider: Option<SdkTracerProvider>,
    meter_provider: Option<SdkMeterProvider>,
}

impl Telemetry {
    /// True when spans are exported over OTLP.
    pub fn exporting_spans(&self) -> bool {
        self.tracer_provider.is_some()
    }

    /// True when metrics are exported over OTLP.
    pub fn exporting_metrics(&self) -> bool {
        self.meter_provider.is_some()
    }

    /// Exports what is still buffered and stops the exporters. Blocks (up to the exporters'
    /// timeout), so call it outside async code.
    pub fn shutdown(self) {
        if let Some(provider) = self.tracer_provider {
            EXPORTING.store(false, Ordering::Relaxed);
            if let Err(err) = provider.shutdown() {
                eprintln!("warning: could not flush OpenTelemetry spans: {err}");
            }
        }
        if let Some(Err(err)) = self.meter_provider.map(|provider| provider.shutdown()) {
            eprintln!("warning: could not flush OpenTelemetry metrics: {err}");
        }
    }
}

/// Installs the global subscriber: logs to `sink`, filtered by `RUST_LOG` or else
/// `default_filter`, colours only when `ansi` (a terminal) and `NO_COLOR` is unset; and, when an
/// OTLP endpoint is set, span and metric export (metrics through the global meter provider, which
/// instruments made afterwards use). Export needs a Tokio runtime entered by the caller: the
/// exporters' channels run on it.
///
/// A malformed `OTEL_*` setting is an error naming the variable. If a subscriber is already
/// installed (tests), nothing changes and nothing is exported.
pub fn init<W>(sink: W, default_filter: &str, ansi: bool) -> anyhow::Result<Telemetry>
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    // One global filter for both sinks. (Per-layer filters were tried: with callsites whose
    // interest is cached as `always`, tracing-subscriber intermittently withheld spans from the
    // exporting layer, and the trace broke apart.)
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(sink)
        .with_target(false)
        .with_ansi(ansi && std::env::var_os("NO_COLOR").is_none());

    let enabled = !std::env::var("OTEL_SDK_DISABLED")
        .is_ok_and(|value| value.trim().eq_ignore_ascii_case("true"));
    let tracer_provider = if enabled && (is_set(ENDPOINT) || is_set(TRACES_ENDPOINT)) {
        Some(tracer_provider()?)
    } else {
        None
    };
    let meter_provider = if enabled && (is_set(ENDPOINT) || is_set(METRICS_ENDPOINT)) {
        Some(meter_provider()?)
    } else {
        None
    };
    let spans = tracer_provider
        .as_ref()
        .map(|provider| tracing_opentelemetry::layer().with_tracer(provider.tracer(SCOPE)));

    let telemetry = Telemetry {
        tracer_provider,
        meter_provider,
    };
    if tracing_subscriber::registry()
        .with(filter)
        .with(logs)
        .with(spans)
        .try_init()
        .is_err()
    {
        telemetry.shutdown();
        return Ok(Telemetry::default());
    }
    EXPORTING.store(telemetry.exporting_spans(), Ordering::Relaxed);
    if let Some(provider) = &telemetry.meter_provider {
        opentelemetry::global::set_meter_provider(provider.clone());
    }
    Ok(telemetry)
}

fn is_set(name: &str) -> bool {
    std::env::var(name).is_ok_and(|value| !value.trim().is_empty())
}

/// The service this process is, for both signals. The SDK reads `OTEL_SERVICE_NAME` and
/// `OTEL_RESOURCE_ATTRIBUTES`; the service is named if they do not.
fn resource() -> Resource {
    let mut resource = Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(SCOPE);
    }
    resource
        .with_attribute(opentelemetry::KeyValue::new(
            "service.version",
            env!("CARGO_PKG_VERSION"),
        ))
        .build()
}

fn exporter_error(signal: &str, variable: &str) -> String {
    format!(
        "{ENDPOINT} / {variable}: cannot build the OTLP {signal} exporter (only the grpc protocol \
         is built in)"
    )
}

fn tracer_provider() -> anyhow::Result<SdkTracerProvider> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_protocol(opentelemetry_otlp::Protocol::Grpc)
        .build()
        .with_context(|| exporter_error("span", TRACES_ENDPOINT))?;
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource())
        .build())
}

fn meter_provider() -> anyhow::Result<SdkMeterProvider> {
    let exporter = opentelemetry_otlp::MetricExporter::builder()
        .with_tonic()
        .with_protocol(opentelemetry_otlp::Protocol::Grpc)
        .build()
        .with_context(|| exporter_error("metric", METRICS_ENDPOINT))?;
    Ok(SdkMeterProvider::builder()
        .with_reader(PeriodicReader::builder(exporter).build())
        .with_resource(resource())
        .build())
}

/// The span every RPC runs in. When spans are exported it is a server span named by the method
/// and, given a W3C `traceparent` header, a child of the caller's span.
pub fn rpc_span<B>(request: &http::Request<B>) -> tracing::Span {
    let path = request.uri().path();
    if !EXPORTING.load(Ordering::Relaxed) {
        return tracing::info_span!("rpc", path = %path);
    }
    let span = tracing::info_span!(
        "rpc",
        path = %path,
        otel.name = %path.trim_start_matches('/'),
        otel.kind = "server",
        rpc.system = "grpc",
    );
    // The caller's context alone: whatever this worker thread has attached is not our parent.
    let parent = TraceContextPropagator::new().extract_with_context(
        &opentelemetry::Context::new(),
        &HeaderExtractor(request.headers()),
    );
    // Fails only when the span is disabled; a trace without the caller's parent is still whole.
    // Fails only when the span is disabled; a trace without the caller's parent is still whole.
    let _ = span.set_parent(parent);
    span
}

/// The trace id of the current span, when spans are exported (hex, as trace backends show it).
pub fn current_trace_id() -> Option<String> {
    use opentelemetry::trace::TraceContextExt as _;
    if !EXPORTING.load(Ordering::Relaxed) {
        return None;
    }
    let context = tracing::Span::current().context();
    let span = context.span();
    let span_context = span.span_context();
    span_context
        .is_valid()
        .then(|| span_context.trace_id().to_string())
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// An error and its causes on one line, `outer: inner: root`, for logs and startup messages.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut message = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}
