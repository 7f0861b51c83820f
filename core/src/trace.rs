//! Trace propagation through message headers.
//!
//! Surety carries W3C Trace Context (`traceparent`, `tracestate`) in
//! [`Headers`] through every hop, using OpenTelemetry's
//! [`TraceContextPropagator`]. Publishing inside a `tracing` span bridged to
//! OpenTelemetry (by `tracing-opentelemetry`) injects that span's context; the
//! consumer's [`process_span`] takes it as parent, so one trace spans producer
//! and consumer.
//!
//! Without an OpenTelemetry layer installed nothing is injected and the
//! spans are plain `tracing` spans.

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::envelope::Envelope;
use crate::headers::{Headers, keys};
use crate::port::DeliveryInfo;

pub use opentelemetry::Context;

impl Injector for Headers {
    fn set(&mut self, key: &str, value: String) {
        self.insert(key, value);
    }
}

impl Extractor for Headers {
    fn get(&self, key: &str) -> Option<&str> {
        Headers::get(self, key)
    }

    fn keys(&self) -> Vec<&str> {
        self.iter().map(|(k, _)| k).collect()
    }
}

/// Writes the trace context of `cx` into `headers`, if `cx` has a valid span.
pub fn inject(cx: &Context, headers: &mut Headers) {
    if cx.span().span_context().is_valid() {
        TraceContextPropagator::new().inject_context(cx, headers);
    }
}

/// Writes the context of the current `tracing` span into `headers`, if it is
/// bridged to OpenTelemetry. Existing trace headers are replaced only when
/// there is a current context to write.
pub fn inject_current(headers: &mut Headers) {
    inject(&Span::current().context(), headers);
}

/// Reads the trace context carried by `headers` (empty when there is none or
/// it is malformed: a bad `traceparent` never fails a message).
pub fn extract(headers: &Headers) -> Context {
    TraceContextPropagator::new().extract(headers)
}

/// Whether `headers` carry a valid remote span context.
pub fn has_remote_parent(headers: &Headers) -> bool {
    headers.contains(keys::TRACEPARENT) && extract(headers).span().span_context().is_valid()
}

/// A producer span for publishing `envelope` to `topic`, following the
/// OpenTelemetry messaging conventions (`send {topic}`).
pub fn publish_span(system: &'static str, topic: &str, envelope: &Envelope) -> Span {
    tracing::info_span!(
        "publish",
        otel.name = format!("send {topic}"),
        otel.kind = "producer",
        messaging.system = system,
        messaging.operation.type = "send",
        messaging.destination.name = topic,
        messaging.message.id = %envelope.id,
        messaging.message.conversation_id = envelope.correlation_id.as_deref(),
        cloudevents.event_type = %envelope.event_type,
    )
}

/// A consumer span for handling `envelope`, a child of the producer's span
/// when the headers carry one (`process {topic}`).
pub fn process_span(info: &DeliveryInfo, envelope: &Envelope) -> Span {
    let span = tracing::info_span!(
        "process",
        otel.name = format!("process {}", info.topic),
        otel.kind = "consumer",
        messaging.system = info.system,
        messaging.operation.type = "process",
        messaging.destination.name = %info.topic,
        messaging.consumer.group.name = %info.group,
        messaging.message.id = %envelope.id,
        messaging.message.conversation_id = envelope.correlation_id.as_deref(),
        cloudevents.event_type = %envelope.event_type,
    );
    let parent = extract(&envelope.headers);
    if parent.span().span_context().is_valid() {
        // Only fails when no OpenTelemetry layer is installed, in which case
        // there is nothing to link.
        let _ = span.set_parent(parent);
    }
    span
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_traceparent_yields_no_parent() {
        let mut h = Headers::new();
        h.insert(keys::TRACEPARENT, "00-zzzz-not-a-trace");
        assert!(!has_remote_parent(&h));
    }

    #[test]
    fn valid_traceparent_round_trips() {
        let mut h = Headers::new();
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        h.insert(keys::TRACEPARENT, tp);
        assert!(has_remote_parent(&h));
        let cx = extract(&h);
        let mut out = Headers::new();
        inject(&cx, &mut out);
        assert_eq!(out.traceparent(), Some(tp));
    }
}
