//! Surety quickstart: publish, handle, fail and retry messages on the
//! in-memory transport, with no broker and no database.
//!
//! Three orders go through the core consumer pipeline
//! (dispatch by type -> decode -> handle -> classify -> emit -> ack / requeue
//! / reject), run by a [`Host`] with two consumers:
//!
//! - `o-1` is handled on its first attempt; its handler emits a
//!   `StockReserved` event, published (and confirmed) before the order is
//!   acknowledged, which the notifications consumer then handles;
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
use surety_core::consumer::{Handler, Incoming, Output, Router, Worker, WorkerReport, typed};
use surety_core::host::Host;
use surety_core::memory::{self, MemoryTransport};
use surety_core::metrics::Metrics;
use surety_core::prometheus_client::{encoding::text::encode, registry::Registry};
use surety_core::tower::{ServiceExt, service_fn};
use surety_core::{Classify, Envelope, ErrorClass, Instrumented, Message, Publisher, Transient};

/// Where orders are published, and the consumer group that fulfils them.
const TOPIC: &str = "orders";
const GROUP: &str = "fulfilment";
/// Where fulfilment publishes what it did, and who listens.
const EVENTS: &str = "orders.events";
const NOTIFY: &str = "notifications";
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

/// What fulfilment emits once stock is reserved.
#[derive(Debug, Serialize, Deserialize)]
struct StockReserved {
    order_id: String,
    quantity: u32,
}

impl Message for StockReserved {
    const TYPE: &'static str = "com.example.shop.stock.reserved";
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

    // Publish through a publisher that traces and counts every publish.
    let publisher = Instrumented::new(transport.clone(), memory::SYSTEM, metrics.clone());

    // The fulfilment handler is plain business logic on a decoded
    // `OrderPlaced`; the router sends each message type to its handler (an
    // unknown type is rejected, never decoded as the wrong struct). Its error
    // type says what should happen: `Transient` means "try again later",
    // `Permanent` would mean "never", and decode failures are poison. What it
    // returns is published before the order is acknowledged.
    let fulfilment = Router::new().on(|order: OrderPlaced, msg: Incoming| async move {
        // Simulate a flaky dependency: the inventory service is busy the
        // first time order o-2 asks for stock.
        if order.order_id == "o-2" && msg.attempt == 1 {
            return Err(Transient::new("inventory service busy"));
        }
        println!(
            "handled   order {} (attempt {}): reserved {} x {}",
            order.order_id, msg.attempt, order.quantity, order.sku
        );
        let reserved = StockReserved {
            order_id: order.order_id.clone(),
            quantity: order.quantity,
        };
        let event = Envelope::message(SOURCE, &reserved)
            .map_err(Transient::new)?
            .caused_by(&msg.envelope)
            .partition_key(order.order_id)
            .build();
        Ok(Output::new(EVENTS, event))
    });
    let notifications = typed(|reserved: StockReserved, _msg: Incoming| async move {
        println!(
            "notified  customer of order {}: {} item(s) reserved",
            reserved.order_id, reserved.quantity
        );
        Ok::<_, std::convert::Infallible>(())
    });

    // One host runs both consumers under one shutdown signal, subscribing
    // for them and reporting readiness.
    let host = Host::new()
        .grace(Duration::from_secs(5))
        .consume(
            transport.clone(),
            TOPIC,
            GROUP,
            Worker::new(print_failures(fulfilment))
                .emit_to(publisher.clone())
                .max_deliveries(MAX_DELIVERIES)
                .metrics(metrics.clone()),
        )
        .consume(
            transport.clone(),
            EVENTS,
            NOTIFY,
            Worker::new(notifications).metrics(metrics.clone()),
        );
    let health = host.health();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(host.run(async {
        stopped.await.ok();
    }));
    tokio::time::timeout(Duration::from_secs(10), async {
        while !health.is_ready() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .map_err(|_| format!("the host did not become ready: {health:?}"))?;
    println!("== host ready: {health:?}");

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

    // Wait until every message is settled: three orders and two events.
    let settled = tokio::time::timeout(Duration::from_secs(10), async {
        let mut poll = tokio::time::interval(Duration::from_millis(5));
        loop {
            let handled = metrics_count(&registry, "outcome=\"handled\"");
            if transport.depth(TOPIC, GROUP) == 0
                && transport.depth(EVENTS, NOTIFY) == 0
                && handled >= 4
            {
                break;
            }
            poll.tick().await;
        }
    })
    .await;
    // Graceful stop: the workers finish and settle whatever is in flight.
    stop.send(()).ok();
    let report = running.await?;
    if settled.is_err() {
        return Err(format!(
            "messages still unsettled after 10 s ({} left); host report: {report:?}",
            transport.depth(TOPIC, GROUP) + transport.depth(EVENTS, NOTIFY)
        )
        .into());
    }
    let worker_report = |name: &str| {
        report
            .workers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, r)| *r)
            .unwrap_or_default()
    };
    let report = worker_report(&format!("{TOPIC}/{GROUP}"));
    let notified = worker_report(&format!("{EVENTS}/{NOTIFY}"));

    println!("== results");
    println!("fulfilment:    {report:?}");
    println!("notifications: {notified:?}");

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

    check(&report, &notified, &rejected, &poison_id)
}

/// The sum of the counters in the registry's text whose line contains
/// `label` (a crude scrape, enough to know when everything settled).
fn metrics_count(registry: &Registry, label: &str) -> u64 {
    let mut text = String::new();
    if encode(&mut text, registry).is_err() {
        return 0;
    }
    text.lines()
        .filter(|l| l.starts_with("surety_messages_consumed_total") && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
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
    notified: &WorkerReport,
    rejected: &[Envelope],
    poison_id: &str,
) -> Result<(), Box<dyn Error>> {
    // o-1 and o-2 handled, o-2's first attempt requeued, the poison rejected.
    let expected = (2, 1, 1);
    let actual = (report.handled, report.requeued, report.rejected);
    if actual != expected {
        return Err(format!(
            "expected (handled, requeued, rejected) = {expected:?}, got {actual:?}"
        )
        .into());
    }
    if notified.handled != 2 {
        return Err(format!("expected both StockReserved events handled, got {notified:?}").into());
    }
    let rejected_ids: Vec<&str> = rejected.iter().map(|e| e.id.as_str()).collect();
    if rejected_ids != [poison_id] {
        return Err(format!(
            "expected only the poison message {poison_id} to be rejected, got {rejected_ids:?}"
        )
        .into());
    }
    println!(
        "ok: o-1 handled on attempt 1, o-2 retried and handled on attempt 2, both events delivered, poison rejected"
    );
    Ok(())
}
