//! Traces through the outbox (OpenTelemetry).
//!
//! A row's W3C trace context (its `traceparent` and `tracestate` headers) travels with its
//! message unchanged. When `OTEL_EXPORTER_OTLP_ENDPOINT` or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set, [`Telemetry::from_env`] exports spans over
//! OTLP/HTTP (protobuf), and the crate records:
//!
//! - in the relay, a PRODUCER span per row from its publish to its confirm, a child of the
//!   row's context and linked to it ([`PublishSpan`]);
//! - in the inbox, a CONSUMER span around the handler, a child of the message's context and
//!   linked to it, so the handler's own spans and writes nest under the producer's trace;
//! - in [`enqueue`](crate::enqueue), the current span's context as the row's `traceparent`,
//!   unless the caller set one.
//!
//! With no endpoint set nothing is exported and the relay builds no span.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{Link, SpanKind, Status, TraceContextExt, Tracer, TracerProvider as _};
use opentelemetry::{Context, KeyValue, global};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use serde_json::{Map, Value};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::broker::PublishError;
use crate::message::OutboxRow;

/// Set once spans are exported: the relay builds its publish spans only then.
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// The header names of the W3C trace context.
const TRACE_HEADERS: [&str; 2] = ["traceparent", "tracestate"];

/// Span export over OTLP, configured by the standard `OTEL_*` variables; flushed and shut
/// down when dropped.
pub struct Telemetry {
    /// The provider whose batch exporter sends the spans.
    provider: SdkTracerProvider,
}

impl Telemetry {
    /// Exports spans when an OTLP endpoint is set (`None` otherwise), naming the service
    /// `service_name` unless `OTEL_SERVICE_NAME` does. The exporter's HTTP client runs on
    /// a thread of its own, inside or outside an async runtime.
    pub fn from_env(service_name: &str) -> Result<Option<Telemetry>, String> {
        if !set("OTEL_EXPORTER_OTLP_ENDPOINT") && !set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
            return Ok(None);
        }
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .build();
        Self::start(exporter, service_name).map(Some)
    }

    /// Exports spans to the OTLP/HTTP traces URL `url` (such as
    /// `http://127.0.0.1:4318/v1/traces`), whatever the environment says.
    pub fn to_url(url: &str, service_name: &str) -> Result<Telemetry, String> {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(url)
            .build();
        Self::start(exporter, service_name)
    }

    fn start(
        exporter: Result<opentelemetry_otlp::SpanExporter, opentelemetry_otlp::ExporterBuildError>,
        service_name: &str,
    ) -> Result<Telemetry, String> {
        let exporter = exporter.map_err(|e| format!("OTEL_EXPORTER_OTLP_ENDPOINT: {e}"))?;
        let mut resource = opentelemetry_sdk::Resource::builder();
        if !set("OTEL_SERVICE_NAME") {
            resource = resource.with_service_name(service_name.to_owned());
        }
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource.build())
            .build();
        global::set_tracer_provider(provider.clone());
        global::set_text_map_propagator(TraceContextPropagator::new());
        EXPORTING.store(true, Ordering::Relaxed);
        Ok(Telemetry { provider })
    }

    /// A `tracing` layer that exports the spans of `tracing` (the inbox's, the handler's).
    pub fn layer<S>(&self) -> impl tracing_subscriber::Layer<S> + use<S>
    where
        S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
    {
        tracing_opentelemetry::layer().with_tracer(self.provider.tracer("outbox"))
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        EXPORTING.store(false, Ordering::Relaxed);
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!(error = %e, "spans not exported at exit");
        }
    }
}

/// Whether the variable `name` is set to something.
fn set(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| !v.trim().is_empty())
}

/// The trace context carried by a message's headers (empty if none or malformed).
pub(crate) fn context_from(traceparent: Option<&str>, tracestate: Option<&str>) -> Context {
    let carrier: HashMap<String, String> = TRACE_HEADERS
        .into_iter()
        .zip([traceparent, tracestate])
        .filter_map(|(name, value)| Some((name.to_owned(), value?.to_owned())))
        .collect();
    TraceContextPropagator::new().extract(&carrier)
}

/// Sets the row's `traceparent` (and `tracestate`) from the current span, unless it has one.
pub(crate) fn fill_trace_headers(headers: &mut Map<String, Value>) {
    if headers.contains_key("traceparent") {
        return;
    }
    let current = tracing::Span::current().context();
    if !current.span().span_context().is_valid() {
        return;
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&current, &mut carrier);
    for (name, value) in carrier {
        headers.insert(name, Value::String(value));
    }
}

/// The PRODUCER span of one row's publish, ended by its confirm.
pub(crate) struct PublishSpan(global::BoxedSpan);

impl PublishSpan {
    /// Starts the span of `row`'s publish, a child of the row's trace context and linked to
    /// it; `None` unless exporting.
    pub(crate) fn start(row: &OutboxRow) -> Option<Self> {
        if !EXPORTING.load(Ordering::Relaxed) {
            return None;
        }
        let headers: Map<String, Value> = serde_json::from_str(&row.headers).unwrap_or_default();
        let header = |name| headers.get(name).and_then(Value::as_str);
        let parent = context_from(header("traceparent"), header("tracestate"));
        let linked = parent.span().span_context().clone();
        let destination = match row.exchange.as_str() {
            "" => "amq.default",
            exchange => exchange,
        };
        let tracer = global::tracer("outbox");
        let mut span = tracer
            .span_builder(format!("publish {destination}"))
            .with_kind(SpanKind::Producer)
            .with_attributes([
                KeyValue::new("messaging.system", "rabbitmq"),
                KeyValue::new("messaging.operation.type", "send"),
                KeyValue::new("messaging.operation.name", "publish"),
                KeyValue::new("messaging.destination.name", destination.to_owned()),
                KeyValue::new(
                    "messaging.rabbitmq.destination.routing_key",
                    row.routing_key.clone(),
                ),
                KeyValue::new("messaging.message.id", row.message_id.clone()),
                KeyValue::new("outbox.row_id", row.id),
                KeyValue::new("outbox.attempt", i64::from(row.attempts) + 1),
            ]);
        if linked.is_valid() {
            span = span.with_links(vec![Link::with_context(linked)]);
        }
        Some(PublishSpan(span.start_with_context(&tracer, &parent)))
    }

    /// Ends the span with the confirm's outcome (`ack` or the failure's reason).
    pub(crate) fn end(self, result: &Result<(), PublishError>) {
        use opentelemetry::trace::Span as _;
        let mut span = self.0;
        let outcome = result.as_ref().err().map_or("ack", PublishError::reason);
        span.set_attribute(KeyValue::new("outbox.confirm", outcome));
        if let Err(e) = result {
            span.set_status(Status::error(e.to_string()));
        }
        span.end();
    }
}

/// The inbox's CONSUMER span around one message's handler: a child of the message's trace
/// context and linked to it.
pub(crate) fn process_span(
    consumer: &str,
    message_id: &str,
    routing_key: &str,
    traceparent: Option<&str>,
    tracestate: Option<&str>,
) -> tracing::Span {
    let span = tracing::info_span!(
        "process",
        otel.name = %format!("process {consumer}"),
        otel.kind = "consumer",
        messaging.system = "rabbitmq",
        messaging.operation.type = "process",
        messaging.consumer.group.name = %consumer,
        messaging.message.id = %message_id,
        messaging.rabbitmq.destination.routing_key = %routing_key,
    );
    let parent = context_from(traceparent, tracestate);
    let linked = parent.span().span_context().clone();
    if linked.is_valid() && span.set_parent(parent).is_ok() {
        span.add_link(linked);
    }
    span
}
