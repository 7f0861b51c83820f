//! Trace context survives the trip through Kafka: the handler's `process`
//! span is a child of the `send` span of the publish that produced the
//! message, in the same trace as the application span around the publish.

mod common;

use std::time::Duration;

use surety_core::{Close, Envelope};
use surety_kafka::{KafkaTransport, SYSTEM};
use surety_testkit::trace::{SpanCapture, assert_propagated, round_trip};

// current_thread: the subscriber installed with `set_default` sees every
// span, the worker's and the poll loop's included.
#[tokio::test(flavor = "current_thread")]
async fn process_span_is_a_child_of_the_send_span() {
    let Some(brokers) = common::brokers() else {
        return;
    };
    let capture = SpanCapture::install();

    let kafka = KafkaTransport::connect(common::config(&brokers))
        .await
        .expect("connect");
    let topic = common::unique("trace");
    let _cleanup = common::delete_on_drop(&brokers, &[&topic]);
    let envelope = Envelope::builder("/shop", "order.placed")
        .partition_key("o-1")
        .build();
    let trip = round_trip(
        &kafka,
        SYSTEM,
        &topic,
        &common::unique("billing"),
        envelope,
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(trip.report.acked, 1);
    kafka.close().await.expect("close");

    assert_eq!(trip.incoming.info.system, "kafka");
    assert_eq!(trip.incoming.info.partition, Some(0));
    // The traceparent that crossed the broker names the send span, and the
    // process span is its child, in the application span's trace.
    let spans = capture.finished_spans();
    assert_propagated(&spans, &topic, trip.incoming.envelope.headers.traceparent());
}
