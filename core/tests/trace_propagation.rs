//! A `traceparent` injected on publish makes the publishing span the parent
//! of the handler's span on the consumer side.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use surety_core::consumer::{Incoming, Worker, handler_fn};
use surety_core::memory::MemoryTransport;
use surety_core::metrics::Metrics;
use surety_core::{Envelope, Instrumented, Publisher, Subscriber};
use tracing_subscriber::layer::SubscriberExt;

/// Routes this thread's `tracing` spans to OpenTelemetry, exported in memory.
fn capture_spans() -> (
    InMemorySpanExporter,
    SdkTracerProvider,
    tracing::subscriber::DefaultGuard,
) {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("surety-test")));
    let guard = tracing::subscriber::set_default(subscriber);
    (exporter, provider, guard)
}

fn span<'a>(spans: &'a [SpanData], name: &str) -> &'a SpanData {
    spans
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no span named {name:?} in {:?}", names(spans)))
}

fn names(spans: &[SpanData]) -> Vec<String> {
    spans.iter().map(|s| s.name.to_string()).collect()
}

#[tokio::test]
async fn handler_span_is_a_child_of_the_publish_span() {
    let (exporter, provider, _guard) = capture_spans();

    let transport = MemoryTransport::new();
    let deliveries = transport.subscribe("orders", "billing").await.unwrap();
    let publisher = Instrumented::new(transport.clone(), "memory", Metrics::default());

    // Publish inside an application span, as a service would.
    let envelope = Envelope::builder("/shop", "order.placed").build();
    {
        let _checkout = tracing::info_span!("checkout").entered();
        publisher.publish("orders", envelope).await.unwrap();
    }

    let (seen_tx, mut seen) = tokio::sync::mpsc::channel(1);
    let handler = handler_fn(move |msg: Incoming| {
        let seen_tx = seen_tx.clone();
        async move {
            // Work the handler does is traced under the consumer's span.
            tracing::info_span!("charge card").in_scope(|| {});
            seen_tx.send(msg.envelope.headers.clone()).await.ok();
            Ok::<_, std::convert::Infallible>(())
        }
    });
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn(Worker::new(handler).run(deliveries, async {
        stopped.await.ok();
    }));
    let headers = tokio::time::timeout(std::time::Duration::from_secs(10), seen.recv())
        .await
        .expect("handled within the deadline")
        .expect("handler ran");
    stop.send(()).unwrap();
    assert_eq!(worker.await.unwrap().acked, 1);
    provider.force_flush().unwrap();

    let spans = exporter.get_finished_spans().unwrap();
    let checkout = span(&spans, "checkout");
    let send = span(&spans, "send orders");
    let process = span(&spans, "process orders");
    let charge = span(&spans, "charge card");

    // The traceparent on the wire names the publish span.
    let traceparent = headers.traceparent().expect("traceparent injected");
    assert_eq!(
        traceparent,
        format!(
            "00-{}-{}-01",
            send.span_context.trace_id(),
            send.span_context.span_id()
        )
    );

    // One trace from the application span to the handler's own work.
    assert_eq!(send.parent_span_id, checkout.span_context.span_id());
    assert_eq!(
        process.span_context.trace_id(),
        send.span_context.trace_id()
    );
    assert_eq!(process.parent_span_id, send.span_context.span_id());
    assert_eq!(charge.parent_span_id, process.span_context.span_id());
    assert_eq!(
        charge.span_context.trace_id(),
        checkout.span_context.trace_id()
    );
}

#[tokio::test]
async fn without_a_traceparent_the_handler_starts_a_new_trace() {
    let (exporter, provider, _guard) = capture_spans();

    let transport = MemoryTransport::new();
    let deliveries = transport.subscribe("orders", "billing").await.unwrap();
    // Published without instrumentation: no trace headers.
    transport
        .publish("orders", Envelope::builder("/shop", "order.placed").build())
        .await
        .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (done_tx, mut done) = tokio::sync::mpsc::channel(1);
    let handler = handler_fn(move |_msg: Incoming| {
        let done_tx = done_tx.clone();
        async move {
            done_tx.send(()).await.ok();
            Ok::<_, std::convert::Infallible>(())
        }
    });
    let worker = tokio::spawn(Worker::new(handler).run(deliveries, async {
        stopped.await.ok();
    }));
    tokio::time::timeout(std::time::Duration::from_secs(10), done.recv())
        .await
        .expect("handled within the deadline");
    stop.send(()).unwrap();
    worker.await.unwrap();
    provider.force_flush().unwrap();
    let spans = exporter.get_finished_spans().unwrap();
    let process = span(&spans, "process orders");
    assert_eq!(
        process.parent_span_id,
        opentelemetry::trace::SpanId::INVALID
    );
}
