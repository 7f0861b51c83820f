//! Trace propagation checks: capture the spans a test produces and run the
//! publish → consume round trip every transport's trace test makes.
//!
//! A transport propagates trace context when the `traceparent` header that
//! [`Instrumented`] injects on publish survives the trip, so that the
//! consumer's `process {topic}` span is a child of the publisher's
//! `send {topic}` span, itself a child of the application span around the
//! publish, and the handler's own spans are children of `process`.
//!
//! - [`SpanCapture`] routes this thread's `tracing` spans to OpenTelemetry
//!   and keeps the finished ones in memory.
//! - [`round_trip`] subscribes, publishes one envelope through
//!   [`Instrumented`] inside an [`APPLICATION_SPAN`], and has a [`Worker`]
//!   handle it with a handler that opens a [`HANDLER_SPAN`];
//!   [`consume_one`] is its consuming half.
//! - [`assert_propagated`] checks the parent links and the `traceparent`.
//!
//! [`SpanCapture`] installs its subscriber for the current thread only: run
//! the test on a current-thread runtime (`#[tokio::test]`, or
//! `flavor = "current_thread"`), so that the worker's spans are seen too.
//!
//! ```
//! use std::time::Duration;
//! use surety_core::{Envelope, memory::MemoryTransport};
//! use surety_testkit::trace::{SpanCapture, assert_propagated, round_trip};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let capture = SpanCapture::install();
//! let transport = MemoryTransport::new();
//! let envelope = Envelope::builder("/shop", "order.placed").build();
//! let trip = round_trip(&transport, "memory", "orders", "billing", envelope, Duration::from_secs(10)).await;
//! assert_eq!(trip.report.acked, 1);
//!
//! let spans = capture.finished_spans();
//! assert_propagated(&spans, "orders", trip.incoming.envelope.headers.traceparent());
//! # }
//! ```

use std::convert::Infallible;
use std::fmt;
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use surety_core::consumer::{Incoming, Worker, WorkerReport, handler_fn};
use surety_core::metrics::Metrics;
use surety_core::{DeliveryStream, Envelope, Instrumented, Publisher, Subscriber};
use tracing::Instrument as _;
use tracing::subscriber::DefaultGuard;
use tracing_subscriber::layer::SubscriberExt as _;

/// The application span [`round_trip`] publishes inside, as a service
/// would: the parent of the `send {topic}` span.
pub const APPLICATION_SPAN: &str = "checkout";

/// The span the handler of [`consume_one`] opens for its own work: a child
/// of the `process {topic}` span.
pub const HANDLER_SPAN: &str = "charge card";

/// Routes the current thread's `tracing` spans to OpenTelemetry, exported
/// in memory, until it is dropped.
///
/// The subscriber (a `tracing-opentelemetry` layer over a registry) is
/// installed with [`tracing::subscriber::set_default`], so it sees the spans
/// of this thread only: use a current-thread runtime.
pub struct SpanCapture {
    exporter: InMemorySpanExporter,
    provider: SdkTracerProvider,
    _guard: DefaultGuard,
}

impl SpanCapture {
    /// Installs the subscriber for the current thread.
    pub fn install() -> Self {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("surety-testkit")));
        let guard = tracing::subscriber::set_default(subscriber);
        Self {
            exporter,
            provider,
            _guard: guard,
        }
    }

    /// Flushes the provider and returns every span finished so far.
    ///
    /// # Panics
    ///
    /// When flushing or reading the exporter fails.
    pub fn finished_spans(&self) -> Vec<SpanData> {
        if let Err(e) = self.provider.force_flush() {
            panic!("flush spans: {e}");
        }
        self.exporter
            .get_finished_spans()
            .unwrap_or_else(|e| panic!("finished spans: {e}"))
    }
}

impl fmt::Debug for SpanCapture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpanCapture").finish_non_exhaustive()
    }
}

/// The span named `name` in `spans` (the first, if there are several).
///
/// # Panics
///
/// When there is none; the message lists the names there are.
pub fn span<'a>(spans: &'a [SpanData], name: &str) -> &'a SpanData {
    spans.iter().find(|s| s.name == name).unwrap_or_else(|| {
        let names: Vec<_> = spans.iter().map(|s| s.name.to_string()).collect();
        panic!("no span named {name:?} in {names:?}")
    })
}

/// What [`round_trip`] and [`consume_one`] saw.
#[derive(Debug)]
#[non_exhaustive]
pub struct RoundTrip {
    /// The message as the handler got it: its headers carry what crossed
    /// the transport, its [`info`](Incoming::info) where it came from.
    pub incoming: Incoming,
    /// What the worker did; it was stopped after the handler ran.
    pub report: WorkerReport,
}

/// Subscribes `group` to `topic` on `transport`, publishes `envelope`
/// through [`Instrumented`] (messaging system `system`) inside an
/// [`APPLICATION_SPAN`], then [`consume_one`]s it.
///
/// Install a [`SpanCapture`] first to see the spans.
///
/// # Panics
///
/// When subscribing or publishing fails, or as [`consume_one`] does.
pub async fn round_trip<T>(
    transport: &T,
    system: &'static str,
    topic: &str,
    group: &str,
    envelope: Envelope,
    deadline: Duration,
) -> RoundTrip
where
    T: Publisher + Subscriber + Clone,
{
    let deliveries = transport
        .subscribe(topic, group)
        .await
        .unwrap_or_else(|e| panic!("subscribe: {e}"));
    let publisher = Instrumented::new(transport.clone(), system, Metrics::default());
    if let Err(e) = publisher
        .publish(topic, envelope)
        .instrument(tracing::info_span!(APPLICATION_SPAN))
        .await
    {
        panic!("publish confirmed: {e}");
    }
    consume_one(deliveries, deadline).await
}

/// Runs a [`Worker`] on `deliveries` until its handler has run once, then
/// stops it. The handler opens a [`HANDLER_SPAN`] and succeeds.
///
/// # Panics
///
/// When the handler does not run within `deadline`, or the worker panics.
pub async fn consume_one(deliveries: DeliveryStream, deadline: Duration) -> RoundTrip {
    let (seen_tx, mut seen) = tokio::sync::mpsc::channel(1);
    let handler = handler_fn(move |msg: Incoming| {
        let seen_tx = seen_tx.clone();
        async move {
            // Work the handler does is traced under the consumer's span.
            tracing::info_span!(HANDLER_SPAN).in_scope(|| {});
            seen_tx.send(msg).await.ok();
            Ok::<_, Infallible>(())
        }
    });
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn(Worker::new(handler).run(deliveries, async {
        stopped.await.ok();
    }));
    let incoming = match tokio::time::timeout(deadline, seen.recv()).await {
        Ok(Some(incoming)) => incoming,
        Ok(None) => panic!("handler ran: the worker stopped first"),
        Err(_) => panic!("handled within the deadline ({deadline:?})"),
    };
    stop.send(()).ok();
    let report = worker
        .await
        .unwrap_or_else(|e| panic!("the worker does not panic: {e}"));
    RoundTrip { incoming, report }
}

/// Asserts that `spans` hold one trace from the [`APPLICATION_SPAN`] to the
/// [`HANDLER_SPAN`] through `send {topic}` and `process {topic}`, and that
/// `traceparent` (the header the consumer got) names the send span.
///
/// # Panics
///
/// When a span is missing, `traceparent` is `None` or names another span,
/// or a parent link or trace id is not the expected one.
pub fn assert_propagated(spans: &[SpanData], topic: &str, traceparent: Option<&str>) {
    let application = span(spans, APPLICATION_SPAN);
    let send = span(spans, &format!("send {topic}"));
    let process = span(spans, &format!("process {topic}"));
    let handler = span(spans, HANDLER_SPAN);

    // The traceparent that crossed the transport names the send span.
    assert_eq!(
        traceparent.unwrap_or_else(|| panic!("traceparent delivered: no traceparent header")),
        format!(
            "00-{}-{}-01",
            send.span_context.trace_id(),
            send.span_context.span_id()
        ),
        "the traceparent names the send span"
    );
    // One trace from the application span to the handler's own work.
    assert_eq!(send.parent_span_id, application.span_context.span_id());
    assert_eq!(
        process.span_context.trace_id(),
        send.span_context.trace_id()
    );
    assert_eq!(
        process.span_context.trace_id(),
        application.span_context.trace_id()
    );
    assert_eq!(process.parent_span_id, send.span_context.span_id());
    assert_eq!(handler.parent_span_id, process.span_context.span_id());
    assert_eq!(
        handler.span_context.trace_id(),
        application.span_context.trace_id()
    );
}
