//! Surety quickstart: publish, handle, fail and retry messages on the
//! in-memory transport, with no broker and no database.
//!
//! Three orders go through the core consumer pipeline
//! (decode -> handle -> classify -> ack / requeue / reject):
//!
//! - `o-1` is handled on its first attempt and acknowledged;
//! - `o-2` fails with a [`Transient`] error on its first attempt (the
//!   inventory service is busy), is requeued, and is handled on attempt 2;
//! - the third message's payload is not a valid `OrderPlaced`, so decoding
//!   fails, it is classified as *poison* and rejected before the handler runs.
//!
//! Run it with `cargo run -p surety-quickstart`; set `RUST_LOG=surety_core=debug`
//! to also see the worker's own logs on stderr. The program exits non-zero if
//! the outcomes above did not happen.

use std::error::Error;
use std::process::ExitCode;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use surety_core::consumer::{Handler, Incoming, Worker, WorkerReport, typed};
use surety_core::memory::{self, MemoryTransport};
use surety_core::metrics::Metrics;
use surety_core::prometheus_client::{encoding::text::encode, registry::Registry};
use surety_core::tower::{ServiceExt, service_fn};
use surety_core::{
    Classify, Envelope, ErrorClass, Instrumented, Message, Publisher, Subscriber, Transient,
};

/// Where orders are published, and the consumer group that fulfils them.
const TOPIC: &str = "orders";
const GROUP: &str = "fulfilment";
/// Who produces the messages (the CloudEvents `source`).
const SOURCE: &str = "/shop/checkout";
/// After this many deliveries a message that still fails transiently is rejected.
const MAX_DELIVERIES: u32 = 3;

/// The event our service consumes. `Message` gives it a stable type name, so
/// `Envelope::message` can fill in the envelope's `type` and schema version.
#[derive(Debug, Serialize, Deserialize)]
struct OrderPlaced {
    order_id: String,
    sku: String,
    quantity: u32,
}

impl Message for OrderPlaced {
    const TYPE: &'static str = "com.example.shop.order.placed";
}

#[tokio::main]
async fn main() -> ExitCode {
    // The worker logs through `tracing`; keep stdout for the story below
    // unless RUST_LOG asks for more.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "error".into()),
        )
        .with_writer(std::io::stderr)
        .init();

    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("quickstart failed: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), Box<dyn Error>> {
    // The embedded transport behaves like a small broker; metrics go into a
    // registry we own (there is no global one).
    let transport = MemoryTransport::new();
    let mut registry = Registry::default();
    let metrics = Metrics::register(&mut registry);

    // Join the consumer group first so the group's queue exists, then publish
    // through a publisher that traces and counts every publish.
    let deliveries = transport.subscribe(TOPIC, GROUP).await?;
    let publisher = Instrumented::new(transport.clone(), memory::SYSTEM, metrics.clone());

    println!("== publishing to {TOPIC:?}");
    for (order_id, sku, quantity) in [("o-1", "SKU-RED-MUG", 2), ("o-2", "SKU-BLUE-CUP", 1)] {
        let order = OrderPlaced {
            order_id: order_id.into(),
            sku: sku.into(),
            quantity,
        };
        let envelope = Envelope::message(SOURCE, &order)?
            .subject(order_id) // what the message is about, for logs and DLQ tools
            .partition_key(order_id) // messages of one order stay in order
            .build();
        println!("published order {order_id} as message {}", envelope.id);
        publisher.publish(TOPIC, envelope).await?;
    }
    // A producer bug: `quantity` is a string. The envelope is fine, the payload
    // is not an `OrderPlaced`, so it can never be handled: it is poison.
    let poison = Envelope::builder(SOURCE, OrderPlaced::TYPE)
        .subject("o-3")
        .payload(r#"{"order_id":"o-3","sku":"SKU-GREEN-BOWL","quantity":"three"}"#)
        .build();
    let poison_id = poison.id.clone();
    println!("published a malformed order as message {poison_id}");
    publisher.publish(TOPIC, poison).await?;

    // The handler is plain business logic on a decoded `OrderPlaced`. Its
    // error type says what should happen: `Transient` means "try again later",
    // `Permanent` would mean "never", and decode failures are poison.
    let handle_order = typed(|order: OrderPlaced, msg: Incoming| async move {
        // Simulate a flaky dependency: the inventory service is busy the
        // first time order o-2 asks for stock.
        if order.order_id == "o-2" && msg.attempt == 1 {
            return Err(Transient::new("inventory service busy"));
        }
        println!(
            "handled   order {} (attempt {}): reserved {} x {}",
            order.order_id, msg.attempt, order.quantity, order.sku
        );
        Ok(())
    });

    // Run the handler, wrapped so we can print the failures the pipeline
    // sees, until we ask the worker to stop.
    println!("== consuming as group {GROUP:?}");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn(
        Worker::new(print_failures(handle_order))
            .max_deliveries(MAX_DELIVERIES)
            .metrics(metrics.clone())
            .run(deliveries, async {
                stopped.await.ok();
            }),
    );

    // Wait until every message is settled: nothing pending, nothing in flight.
    let settled = tokio::time::timeout(Duration::from_secs(10), async {
        let mut poll = tokio::time::interval(Duration::from_millis(5));
        while transport.depth(TOPIC, GROUP) > 0 {
            poll.tick().await;
        }
    })
    .await;
    // Graceful stop: the worker finishes and settles whatever is in flight.
    stop.send(()).ok();
    let report = worker.await?;
    if settled.is_err() {
        return Err(format!(
            "messages still unsettled after 10 s ({} left); worker report: {report:?}",
            transport.depth(TOPIC, GROUP)
        )
        .into());
    }

    println!("== results");
    println!("worker report: {report:?}");

    // Rejected messages stay with the group, like a broker's dead-letter queue.
    let rejected = transport.rejected(TOPIC, GROUP);
    println!(
        "rejected messages kept by the transport: {}",
        rejected.len()
    );
    for envelope in &rejected {
        println!(
            "  {} type={} subject={} payload={}",
            envelope.id,
            envelope.event_type,
            envelope.subject.as_deref().unwrap_or("-"),
            String::from_utf8_lossy(&envelope.payload)
        );
    }

    // The core metrics, as Prometheus would scrape them (counts only; the
    // duration histograms' buckets and sums are left out for brevity).
    let mut text = String::new();
    encode(&mut text, &registry)?;
    let mut lines: Vec<&str> = text
        .lines()
        .filter(|line| {
            line.starts_with("surety_messages_published_total")
                || line.starts_with("surety_messages_consumed_total")
                || line.starts_with("surety_handler_duration_seconds_count")
        })
        .collect();
    lines.sort_unstable();
    println!("metrics:");
    for line in lines {
        println!("  {line}");
    }

    check(&report, &rejected, &poison_id)
}

/// Wraps a handler in a `tower` service that prints every failure together
/// with what the worker will do about it.
///
/// A poison message never reaches the handler's own code: `typed` fails to
/// decode it first. A wrapper around the handler still sees that failure,
/// because decoding is part of the `typed` service. The same shape is how
/// layers like deduplication and dead-lettering plug in.
fn print_failures<H: Handler>(handler: H) -> impl Handler {
    service_fn(move |msg: Incoming| {
        let handler = handler.clone();
        async move {
            let (id, attempt) = (msg.envelope.id.clone(), msg.attempt);
            let order = msg.envelope.subject.clone().unwrap_or_else(|| id.clone());
            let result = handler.oneshot(msg).await;
            if let Err(err) = &result {
                match err.class() {
                    ErrorClass::Poison => println!(
                        "rejected  message {id} as poison before its handler ran: {}",
                        err.inner()
                    ),
                    class => {
                        let next = if class.is_retryable() && attempt < MAX_DELIVERIES {
                            "will retry"
                        } else {
                            "rejected"
                        };
                        println!(
                            "failed    order {order} attempt {attempt}: {} ({}) -> {next}",
                            err.inner(),
                            class.as_str()
                        );
                    }
                }
            }
            result
        }
    })
}

/// The output above is a promise: fail loudly if it did not come true.
fn check(
    report: &WorkerReport,
    rejected: &[Envelope],
    poison_id: &str,
) -> Result<(), Box<dyn Error>> {
    // o-1 and o-2 acked, o-2's first attempt requeued, the poison rejected.
    let expected = (2, 1, 1);
    let actual = (report.acked, report.requeued, report.rejected);
    if actual != expected {
        return Err(
            format!("expected (acked, requeued, rejected) = {expected:?}, got {actual:?}").into(),
        );
    }
    let rejected_ids: Vec<&str> = rejected.iter().map(|e| e.id.as_str()).collect();
    if rejected_ids != [poison_id] {
        return Err(format!(
            "expected only the poison message {poison_id} to be rejected, got {rejected_ids:?}"
        )
        .into());
    }
    println!("ok: o-1 handled on attempt 1, o-2 retried and handled on attempt 2, poison rejected");
    Ok(())
}
