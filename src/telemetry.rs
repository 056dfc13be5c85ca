//! Logs and traces. `tracing` everywhere; logs to stderr (`--log-format pretty|json`); when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set, spans are also exported over OTLP/gRPC (batched),
//! with W3C trace context as the propagation format. Secrets never reach a span: fields are
//! IDs, paths and reasons.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Keeps the exporter alive; [`Telemetry::shutdown`] flushes what is batched.
pub struct Telemetry(Option<SdkTracerProvider>);

impl Telemetry {
    pub fn shutdown(self) {
        if let Some(p) = self.0
            && let Err(e) = p.shutdown()
        {
            eprintln!("meshid: flushing traces: {e}");
        }
    }
}

/// Set up logging (and OTLP export when configured). Call inside the tokio runtime: the OTLP
/// gRPC client needs it.
pub fn init(json: bool, filter: &str, service: &'static str) -> Telemetry {
    let filter = tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|e| {
        eprintln!("meshid: bad --log filter {filter:?} ({e}); using info");
        tracing_subscriber::EnvFilter::new("info")
    });
    let provider = std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT").and_then(|_| {
        match opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build()
        {
            Ok(exporter) => {
                let name =
                    std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| service.to_owned());
                let resource = opentelemetry_sdk::Resource::builder()
                    .with_service_name(name)
                    .build();
                Some(
                    SdkTracerProvider::builder()
                        .with_batch_exporter(exporter)
                        .with_resource(resource)
                        .build(),
                )
            }
            Err(e) => {
                eprintln!("meshid: OTLP exporter not started: {e}");
                None
            }
        }
    });
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    let otel = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer("meshid")));
    let stderr = std::io::stderr;
    tracing_subscriber::registry()
        .with(filter)
        .with(json.then(|| tracing_subscriber::fmt::layer().json().with_writer(stderr)))
        .with((!json).then(|| tracing_subscriber::fmt::layer().with_writer(stderr)))
        .with(otel)
        .init();
    Telemetry(provider)
}

/// Make `span` a child of the caller's W3C trace context, when the request carries one (a
/// request without `traceparent` starts a new trace, and costs nothing here).
pub fn continue_trace(span: &tracing::Span, headers: &http::HeaderMap) {
    if span.is_disabled() || !headers.contains_key("traceparent") {
        return;
    }
    let parent =
        opentelemetry::global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(headers)));
    let _ = tracing_opentelemetry::OpenTelemetrySpanExt::set_parent(span, parent);
}

/// W3C trace context from request headers, as the parent of a span.
pub struct HeaderExtractor<'a>(pub &'a http::HeaderMap);

impl opentelemetry::propagation::Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// The W3C trace ID (32 hex digits) of a request: the one its `traceparent` carries, else the
/// one its span started when spans are exported; `None` when there is neither.
pub fn trace_id(span: &tracing::Span, headers: &http::HeaderMap) -> Option<String> {
    if let Some(id) = headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split('-').nth(1))
        .filter(|id| {
            id.len() == 32
                && id
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
                && id.bytes().any(|b| b != b'0')
        })
    {
        return Some(id.to_owned());
    }
    if span.is_disabled() {
        return None;
    }
    use opentelemetry::trace::TraceContextExt as _;
    let context = tracing_opentelemetry::OpenTelemetrySpanExt::context(span);
    let id = context.span().span_context().trace_id();
    (id != opentelemetry::trace::TraceId::INVALID).then(|| id.to_string())
}
