//! Trace context survives the trip through RabbitMQ: the handler's span is a
//! child of the publishing span (compare core/tests/trace_propagation.rs).

mod common;

use common::{config, connect, unique, url};
use surety_core::{Close, Envelope};
use surety_testkit::trace::{SpanCapture, assert_propagated, round_trip};

#[tokio::test(flavor = "current_thread")]
async fn the_process_span_is_a_child_of_the_send_span() {
    let Some(url) = url() else { return };
    let capture = SpanCapture::install();

    let transport = connect(config(&url)).await;
    let topic = unique("traced");
    let _cleanup = common::cleanup(&url, &topic, &["billing"]);
    let trip = round_trip(
        &transport,
        surety_rabbitmq::SYSTEM,
        &topic,
        "billing",
        Envelope::builder("/shop", "order.placed").build(),
        common::WAIT,
    )
    .await;
    assert_eq!(trip.report.acked, 1);
    assert_eq!(trip.incoming.info.system, "rabbitmq");
    transport.close().await.unwrap();

    // The traceparent that crossed the broker names the send span, and the
    // process span is its child.
    let spans = capture.finished_spans();
    assert_propagated(&spans, &topic, trip.incoming.envelope.headers.traceparent());
}
