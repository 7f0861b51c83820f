//! Trace context survives the trip through Kafka: the handler's `process`
//! span is a child of the `send` span of the publish that produced the
//! message, in the same trace as the application span around the publish.

mod common;

use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use surety_core::consumer::{Incoming, Worker, handler_fn};
use surety_core::metrics::Metrics;
use surety_core::{Close, Envelope, Instrumented, Publisher, Subscriber};
use surety_kafka::{KafkaTransport, SYSTEM};
use tracing::Instrument;
use tracing_subscriber::layer::SubscriberExt;

fn span<'a>(spans: &'a [SpanData], name: &str) -> &'a SpanData {
    spans.iter().find(|s| s.name == name).unwrap_or_else(|| {
        let names: Vec<_> = spans.iter().map(|s| s.name.to_string()).collect();
        panic!("no span named {name:?} in {names:?}")
    })
}

// current_thread: the subscriber installed with `set_default` sees every
// span, the worker's and the poll loop's included.
#[tokio::test(flavor = "current_thread")]
async fn process_span_is_a_child_of_the_send_span() {
    let Some(brokers) = common::brokers() else {
        return;
    };
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("surety-kafka-test")));
    let _guard = tracing::subscriber::set_default(subscriber);

    let kafka = KafkaTransport::connect(common::config(&brokers))
        .await
        .expect("connect");
    let topic = common::unique("trace");
    let deliveries = kafka
        .subscribe(&topic, &common::unique("billing"))
        .await
        .expect("subscribe");
    let publisher = Instrumented::new(kafka.clone(), SYSTEM, Metrics::default());
    // Publish inside an application span, as a service would.
    let envelope = Envelope::builder("/shop", "order.placed")
        .partition_key("o-1")
        .build();
    publisher
        .publish(&topic, envelope)
        .instrument(tracing::info_span!("checkout"))
        .await
        .expect("publish confirmed");

    let (seen_tx, mut seen) = tokio::sync::mpsc::channel(1);
    let handler = handler_fn(move |msg: Incoming| {
        let seen_tx = seen_tx.clone();
        async move {
            tracing::info_span!("charge card").in_scope(|| {});
            seen_tx.send(msg).await.ok();
            Ok::<_, std::convert::Infallible>(())
        }
    });
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn(Worker::new(handler).run(deliveries, async {
        stopped.await.ok();
    }));
    let incoming = tokio::time::timeout(Duration::from_secs(20), seen.recv())
        .await
        .expect("handled within the deadline")
        .expect("handler ran");
    stop.send(()).ok();
    assert_eq!(worker.await.expect("worker").acked, 1);
    kafka.close().await.expect("close");
    provider.force_flush().expect("flush spans");

    assert_eq!(incoming.info.system, "kafka");
    assert_eq!(incoming.info.partition, Some(0));
    let spans = exporter.get_finished_spans().expect("spans");
    let checkout = span(&spans, "checkout");
    let send = span(&spans, &format!("send {topic}"));
    let process = span(&spans, &format!("process {topic}"));
    let charge = span(&spans, "charge card");

    // The traceparent that crossed the broker names the send span.
    let traceparent = incoming
        .envelope
        .headers
        .traceparent()
        .expect("traceparent header delivered");
    assert_eq!(
        traceparent,
        format!(
            "00-{}-{}-01",
            send.span_context.trace_id(),
            send.span_context.span_id()
        )
    );
    assert_eq!(send.parent_span_id, checkout.span_context.span_id());
    assert_eq!(process.parent_span_id, send.span_context.span_id());
    assert_eq!(
        process.span_context.trace_id(),
        checkout.span_context.trace_id()
    );
    assert_eq!(charge.parent_span_id, process.span_context.span_id());
}
