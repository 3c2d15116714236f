//! W3C trace context across Weir's hold.
//!
//! A producer that traces its jobs puts a `traceparent` (and maybe `tracestate`) header on them.
//! When tracing is on, Weir records one span per such job, "weir hold", child of the producer's
//! span, from the job's enqueue to its release, and rewrites the released job's `traceparent` to
//! that span, so the worker's span becomes a child of the hold and the trace shows where the time
//! went. Headers are read and written through OpenTelemetry's [`TraceContextPropagator`], with an
//! adapter over async-nats' [`HeaderMap`].
//!
//! Tracing is on only when `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`)
//! is set: spans go out over OTLP/HTTP from a batch processor thread. Otherwise [`Tracing::hold`]
//! is a branch on a `None` and the headers pass through untouched. Like [`crate::metrics`], no
//! global provider is set: each [`Tracing`] owns its own.
//!
//! ```no_run
//! # fn example(headers: &mut async_nats::HeaderMap) -> Result<(), weir::trace::TraceError> {
//! let tracing = weir::trace::Tracing::install("weir")?;
//! // At release, before publishing:
//! let released_ms = weir::release::unix_ms();
//! tracing.hold(headers, "sms", "customer-42", released_ms - 1_500, released_ms);
//! # tracing.shutdown();
//! # Ok(())
//! # }
//! ```

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use async_nats::header::{HeaderMap, HeaderName};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanKind, TraceContextExt, Tracer, TracerProvider};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use opentelemetry_sdk::Resource;

/// The span Weir records per traced job.
pub const HOLD_SPAN: &str = "weir hold";

const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// Why tracing could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("cannot set up the OTLP span exporter: {0}")]
pub struct TraceError(#[from] opentelemetry_otlp::ExporterBuildError);

/// Weir's tracer, or nothing when tracing is off. Cheap to clone.
#[derive(Clone, Default)]
pub struct Tracing {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    propagator: TraceContextPropagator,
}

impl std::fmt::Debug for Tracing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracing")
            .field("enabled", &self.is_enabled())
            .finish()
    }
}

impl Tracing {
    /// On, exporting over OTLP/HTTP, when an OTLP endpoint is set in the environment; off
    /// otherwise.
    pub fn install(service_name: &str) -> Result<Tracing, TraceError> {
        let set = |n: &str| std::env::var_os(n).is_some_and(|v| !v.is_empty());
        if !set("OTEL_EXPORTER_OTLP_ENDPOINT") && !set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
            return Ok(Tracing::disabled());
        }
        use opentelemetry_otlp::{Protocol, WithExportConfig};
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .build()?;
        let provider = SdkTracerProvider::builder()
            .with_resource(
                Resource::builder()
                    .with_service_name(service_name.to_string())
                    .build(),
            )
            .with_batch_exporter(exporter)
            .build();
        Ok(Tracing::with_provider(provider))
    }

    /// Off: [`Tracing::hold`] does nothing.
    pub fn disabled() -> Tracing {
        Tracing { inner: None }
    }

    /// On, with a provider built elsewhere (tests use an in-memory exporter).
    pub fn with_provider(provider: SdkTracerProvider) -> Tracing {
        let tracer = provider.tracer("weir");
        Tracing {
            inner: Some(Arc::new(Inner {
                provider,
                tracer,
                propagator: TraceContextPropagator::new(),
            })),
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// Records the hold of one job, from `enqueued_ms` to `released_ms` (Unix ms), as a child of
    /// the producer's span in `headers`, and points `headers`' `traceparent` at it. Returns whether
    /// it did: not when tracing is off, the job carries no `traceparent`, or it is not valid (the
    /// headers are then left as they were).
    pub fn hold(
        &self,
        headers: &mut HeaderMap,
        dest: &str,
        key: &str,
        enqueued_ms: u64,
        released_ms: u64,
    ) -> bool {
        let Some(inner) = &self.inner else {
            return false;
        };
        if headers.get(TRACEPARENT).is_none() {
            return false;
        }
        let parent = inner.propagator.extract(&NatsHeaders(headers));
        if !parent.span().span_context().is_valid() {
            return false;
        }
        let start = UNIX_EPOCH + Duration::from_millis(enqueued_ms);
        let end = UNIX_EPOCH + Duration::from_millis(released_ms.max(enqueued_ms));
        let span = inner
            .tracer
            .span_builder(HOLD_SPAN)
            .with_kind(SpanKind::Consumer)
            .with_start_time(start)
            .with_attributes([
                KeyValue::new("messaging.system", "nats"),
                KeyValue::new("messaging.destination.name", dest.to_string()),
                KeyValue::new("weir.key", key.to_string()),
            ])
            .start_with_context(&inner.tracer, &parent);
        let cx = Context::new().with_span(span);
        inner
            .propagator
            .inject_context(&cx, &mut NatsHeadersMut(headers));
        cx.span().end_with_timestamp(end);
        true
    }

    /// Exports what is batched and stops (blocks up to the exporter's timeout). Idempotent.
    pub fn shutdown(&self) {
        if let Some(inner) = &self.inner {
            if let Err(e) = inner.provider.shutdown() {
                tracing::debug!(error = %e, "tracing shutdown");
            }
        }
    }
}

/// Reads a NATS header map for the propagator.
struct NatsHeaders<'a>(&'a HeaderMap);

impl Extractor for NatsHeaders<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        let value = match key {
            "traceparent" => self.0.get(TRACEPARENT),
            "tracestate" => self.0.get(TRACESTATE),
            other => self.0.get(HeaderName::try_from(other).ok()?),
        };
        value.map(|v| v.as_str())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| k.as_ref()).collect()
    }
}

/// Writes a NATS header map for the propagator. An empty `tracestate` is not written.
struct NatsHeadersMut<'a>(&'a mut HeaderMap);

impl Injector for NatsHeadersMut<'_> {
    fn set(&mut self, key: &str, value: String) {
        if value.is_empty() || value.contains(['\r', '\n']) {
            return;
        }
        match key {
            "traceparent" => self.0.insert(TRACEPARENT, value),
            "tracestate" => self.0.insert(TRACESTATE, value),
            other => {
                if let Ok(name) = HeaderName::try_from(other) {
                    self.0.insert(name, value)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{SpanId, TraceId};
    use opentelemetry_sdk::trace::InMemorySpanExporter;
    use std::time::SystemTime;

    fn unix_ms_of(t: SystemTime) -> u64 {
        t.duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
    }

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn traced() -> (Tracing, InMemorySpanExporter) {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        (Tracing::with_provider(provider), exporter)
    }

    #[test]
    fn a_valid_traceparent_gets_a_hold_span_and_is_rewritten() {
        let (t, exporter) = traced();
        let mut h = HeaderMap::new();
        h.insert("traceparent", PARENT);
        h.insert("tracestate", "vendor=abc");
        h.insert("X-Other", "kept");
        assert!(t.hold(&mut h, "sms", "acme", 1_700_000_000_000, 1_700_000_002_500));
        let spans = exporter.get_finished_spans().expect("spans");
        assert_eq!(spans.len(), 1);
        let s = &spans[0];
        assert_eq!(s.name, HOLD_SPAN);
        assert_eq!(s.span_kind, SpanKind::Consumer);
        let trace_id = TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap();
        assert_eq!(s.span_context.trace_id(), trace_id);
        assert_eq!(
            s.parent_span_id,
            SpanId::from_hex("00f067aa0ba902b7").unwrap()
        );
        assert_eq!(unix_ms_of(s.start_time), 1_700_000_000_000);
        assert_eq!(unix_ms_of(s.end_time), 1_700_000_002_500);
        let attr = |k: &str| {
            s.attributes
                .iter()
                .find(|kv| kv.key.as_str() == k)
                .map(|kv| kv.value.to_string())
        };
        assert_eq!(attr("messaging.system").as_deref(), Some("nats"));
        assert_eq!(attr("messaging.destination.name").as_deref(), Some("sms"));
        assert_eq!(attr("weir.key").as_deref(), Some("acme"));
        // The released job now points at the hold span, same trace, tracestate kept.
        let expected = format!("00-{}-{}-01", trace_id, s.span_context.span_id());
        assert_eq!(h.get("traceparent").unwrap().as_str(), expected);
        assert_eq!(h.get("tracestate").unwrap().as_str(), "vendor=abc");
        assert_eq!(h.get("X-Other").unwrap().as_str(), "kept");
    }

    #[test]
    fn garbage_or_absent_traceparent_leaves_headers_alone() {
        let (t, exporter) = traced();
        for bad in [
            "garbage",
            "00-00000000000000000000000000000000-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "",
        ] {
            let mut h = HeaderMap::new();
            h.insert("traceparent", bad);
            h.insert("tracestate", "vendor=abc");
            let before = h.clone();
            assert!(!t.hold(&mut h, "sms", "acme", 1, 2), "{bad:?}");
            assert_eq!(h, before);
        }
        let mut h = HeaderMap::new();
        h.insert("X-Other", "kept");
        assert!(!t.hold(&mut h, "sms", "acme", 1, 2));
        assert!(h.get("traceparent").is_none());
        assert!(exporter.get_finished_spans().unwrap().is_empty());
    }

    #[test]
    fn disabled_tracing_passes_headers_through() {
        let t = Tracing::disabled();
        let mut h = HeaderMap::new();
        h.insert("traceparent", PARENT);
        let before = h.clone();
        assert!(!t.hold(&mut h, "sms", "acme", 1, 2));
        assert_eq!(h, before);
        t.shutdown();
    }
}
