//! A `traceparent` injected on publish makes the publishing span the parent
//! of the handler's span on the consumer side.

use std::time::Duration;

use surety_core::memory::MemoryTransport;
use surety_core::{Envelope, Publisher, Subscriber};
use surety_testkit::trace::{SpanCapture, assert_propagated, consume_one, round_trip, span};

#[tokio::test]
async fn handler_span_is_a_child_of_the_publish_span() {
    let capture = SpanCapture::install();

    let transport = MemoryTransport::new();
    // Publish inside an application span, as a service would; the handler
    // traces its own work under the consumer's span.
    let envelope = Envelope::builder("/shop", "order.placed").build();
    let trip = round_trip(
        &transport,
        "memory",
        "orders",
        "billing",
        envelope,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(trip.report.acked, 1);

    // The traceparent on the wire names the publish span, and one trace
    // runs from the application span to the handler's own work.
    let spans = capture.finished_spans();
    assert_propagated(
        &spans,
        "orders",
        trip.incoming.envelope.headers.traceparent(),
    );
}

#[tokio::test]
async fn without_a_traceparent_the_handler_starts_a_new_trace() {
    let capture = SpanCapture::install();

    let transport = MemoryTransport::new();
    let deliveries = transport.subscribe("orders", "billing").await.unwrap();
    // Published without instrumentation: no trace headers.
    transport
        .publish("orders", Envelope::builder("/shop", "order.placed").build())
        .await
        .unwrap();
    consume_one(deliveries, Duration::from_secs(10)).await;
    let spans = capture.finished_spans();
    let process = span(&spans, "process orders");
    assert_eq!(
        process.parent_span_id,
        opentelemetry::trace::SpanId::INVALID
    );
}
