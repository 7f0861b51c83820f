//! Trace context survives the trip through RabbitMQ: the handler's span is a
//! child of the publishing span (compare core/tests/trace_propagation.rs).

mod common;

use common::{config, connect, unique, url};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use surety_core::consumer::{Incoming, Worker, handler_fn};
use surety_core::metrics::Metrics;
use surety_core::{Close, Envelope, Instrumented, Publisher, Subscriber};
use tracing_subscriber::layer::SubscriberExt;

fn span<'a>(spans: &'a [SpanData], name: &str) -> &'a SpanData {
    spans
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no span named {name:?}"))
}

#[tokio::test(flavor = "current_thread")]
async fn the_process_span_is_a_child_of_the_send_span() {
    let Some(url) = url() else { return };
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("surety-test")));
    let _guard = tracing::subscriber::set_default(subscriber);

    let transport = connect(config(&url)).await;
    let topic = unique("traced");
    let deliveries = transport.subscribe(&topic, "billing").await.unwrap();
    let publisher = Instrumented::new(
        transport.clone(),
        surety_rabbitmq::SYSTEM,
        Metrics::default(),
    );
    {
        let _checkout = tracing::info_span!("checkout").entered();
        publisher
            .publish(&topic, Envelope::builder("/shop", "order.placed").build())
            .await
            .unwrap();
    }

    let (seen_tx, mut seen) = tokio::sync::mpsc::channel(1);
    let handler = handler_fn(move |msg: Incoming| {
        let seen_tx = seen_tx.clone();
        async move {
            tracing::info_span!("charge card").in_scope(|| {});
            seen_tx
                .send((msg.envelope.headers.clone(), msg.info.system))
                .await
                .ok();
            Ok::<_, std::convert::Infallible>(())
        }
    });
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn(Worker::new(handler).run(deliveries, async {
        stopped.await.ok();
    }));
    let (headers, system) = tokio::time::timeout(common::WAIT, seen.recv())
        .await
        .expect("handled within the deadline")
        .expect("handler ran");
    stop.send(()).unwrap();
    assert_eq!(worker.await.unwrap().acked, 1);
    assert_eq!(system, "rabbitmq");
    transport.close().await.unwrap();
    provider.force_flush().unwrap();

    let spans = exporter.get_finished_spans().unwrap();
    let checkout = span(&spans, "checkout");
    let send = span(&spans, &format!("send {topic}"));
    let process = span(&spans, &format!("process {topic}"));
    let charge = span(&spans, "charge card");

    // The traceparent that crossed the broker names the send span.
    assert_eq!(
        headers
            .traceparent()
            .expect("traceparent crossed the broker"),
        format!(
            "00-{}-{}-01",
            send.span_context.trace_id(),
            send.span_context.span_id()
        )
    );
    assert_eq!(send.parent_span_id, checkout.span_context.span_id());
    assert_eq!(
        process.span_context.trace_id(),
        send.span_context.trace_id()
    );
    assert_eq!(process.parent_span_id, send.span_context.span_id());
    assert_eq!(charge.parent_span_id, process.span_context.span_id());
}
