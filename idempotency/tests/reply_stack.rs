//! Command/reply through the whole stack: a handler that replies, wrapped
//! by the dead-letter and idempotency layers, run by a worker that emits
//! its outputs. A duplicate request gets the stored reply emitted again
//! (same message id); an emit that is not confirmed leaves the request
//! unacknowledged, and its redelivery emits the reply without running the
//! handler again. On the in-memory transport and on RabbitMQ.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use futures::StreamExt;
use surety_core::consumer::{Incoming, Worker, typed};
use surety_core::memory::MemoryTransport;
use surety_core::metrics::Metrics;
use surety_core::prometheus_client::encoding::text::encode;
use surety_core::prometheus_client::registry::Registry;
use surety_core::tower::ServiceBuilder;
use surety_core::{
    Close, Confirmation, DeliveryStream, Envelope, Message, Publisher, Subscriber, TransportError,
    TransportErrorKind,
};
use surety_dlq::{DlqLayer, RetryPolicy, store::MemoryDlqStore as DlqMemory};
use surety_idempotency::{IdempotencyLayer, MemoryDedupStore};
use surety_rabbitmq::{RabbitConfig, RabbitTransport};
use surety_testkit::services::{amqp_url, require};
use surety_testkit::wait::eventually_every;

const WAIT: Duration = Duration::from_secs(20);

#[derive(serde::Serialize, serde::Deserialize)]
struct Capture {
    order_id: String,
}
impl Message for Capture {
    const TYPE: &'static str = "payment.capture";
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Captured {
    order_id: String,
}
impl Message for Captured {
    const TYPE: &'static str = "payment.captured";
}

/// A publisher that fails every send while `down` is set.
#[derive(Clone)]
struct Switchable<P> {
    inner: P,
    down: Arc<AtomicBool>,
}

impl<P: Publisher> Publisher for Switchable<P> {
    async fn send(&self, topic: &str, envelope: Envelope) -> surety_core::Result<Confirmation> {
        if self.down.load(Ordering::SeqCst) {
            return Err(TransportError::new(
                TransportErrorKind::Connection,
                "the broker is unreachable",
            ));
        }
        self.inner.send(topic, envelope).await
    }
}

/// How the scenario makes one emit fail.
enum FailEmit {
    /// The output publisher is down, then comes back.
    SinkDown(Arc<AtomicBool>),
    /// The reply topic has no queue yet (RabbitMQ returns the publish as
    /// unroutable), then one is bound.
    Unroutable,
}

fn requeued(registry: &Registry) -> u64 {
    let mut text = String::new();
    encode(&mut text, registry).unwrap();
    text.lines()
        .filter(|l| l.starts_with("surety_messages_consumed_total") && l.contains("requeued"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

async fn next(stream: &mut DeliveryStream) -> Envelope {
    let delivery = tokio::time::timeout(WAIT, stream.next())
        .await
        .expect("a delivery in time")
        .expect("stream open")
        .expect("a delivery");
    let env = delivery.envelope().clone();
    delivery.ack().await.unwrap();
    env
}

async fn scenario<T, P>(transport: T, sink: P, fail: FailEmit, run: &str)
where
    T: Publisher + Subscriber + Close + Clone + 'static,
    P: Publisher + 'static,
{
    let commands = format!("surety-idempotency-test.{run}.payments");
    let replies = format!("surety-idempotency-test.{run}.replies");
    let late = format!("surety-idempotency-test.{run}.late-replies");
    let deliveries = transport
        .subscribe(&commands, "payment-service")
        .await
        .unwrap();
    let mut reply_stream = transport.subscribe(&replies, "checkout").await.unwrap();

    let runs = Arc::new(AtomicU32::new(0));
    let capture = {
        let runs = Arc::clone(&runs);
        typed(move |cmd: Capture, msg: Incoming| {
            let runs = Arc::clone(&runs);
            async move {
                runs.fetch_add(1, Ordering::SeqCst);
                msg.envelope.reply(
                    "/payments",
                    &Captured {
                        order_id: cmd.order_id,
                    },
                )
            }
        })
    };
    let dead_letters = DlqMemory::new();
    let stack = ServiceBuilder::new()
        .layer(
            DlqLayer::new("payments")
                .policy(RetryPolicy::in_place(3))
                .store(dead_letters.clone()),
        )
        .layer(IdempotencyLayer::new(MemoryDedupStore::new()))
        .service(capture);
    let mut registry = Registry::default();
    let metrics = Metrics::register(&mut registry);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn(
        Worker::new(stack)
            .emit_to(sink)
            .metrics(metrics)
            .max_retry_after(Duration::from_millis(20))
            .run(deliveries, async {
                stopped.await.ok();
            }),
    );

    // The same request, delivered twice: one run, the same reply twice.
    let request = Envelope::message(
        "/checkout",
        &Capture {
            order_id: "o-1".into(),
        },
    )
    .unwrap()
    .reply_to(&replies)
    .partition_key("o-1")
    .build();
    transport.publish(&commands, request.clone()).await.unwrap();
    transport.publish(&commands, request.clone()).await.unwrap();
    let first = next(&mut reply_stream).await;
    let again = next(&mut reply_stream).await;
    assert_eq!(first.id, again.id, "the stored reply is emitted again");
    assert_eq!(first.causation_id.as_deref(), Some(request.id.as_str()));
    assert_eq!(first.event_type, Captured::TYPE);
    assert_eq!(runs.load(Ordering::SeqCst), 1);

    // A reply that cannot be emitted leaves the request unacknowledged.
    let late_request = Envelope::message(
        "/checkout",
        &Capture {
            order_id: "o-2".into(),
        },
    )
    .unwrap()
    .reply_to(&late)
    .partition_key("o-2")
    .build();
    if let FailEmit::SinkDown(down) = &fail {
        down.store(true, Ordering::SeqCst);
    }
    transport
        .publish(&commands, late_request.clone())
        .await
        .unwrap();
    eventually_every(
        WAIT,
        Duration::from_millis(10),
        "the request requeued",
        || async { requeued(&registry) >= 1 },
    )
    .await;
    assert_eq!(
        runs.load(Ordering::SeqCst),
        2,
        "the handler ran once for o-2"
    );
    // Once the reply can go out, the redelivered request emits it, and the
    // handler does not run again: its reply was stored.
    let mut late_stream = match &fail {
        FailEmit::SinkDown(down) => {
            let stream = transport.subscribe(&late, "checkout").await.unwrap();
            down.store(false, Ordering::SeqCst);
            stream
        }
        FailEmit::Unroutable => transport.subscribe(&late, "checkout").await.unwrap(),
    };
    let late_reply = next(&mut late_stream).await;
    assert_eq!(
        late_reply.causation_id.as_deref(),
        Some(late_request.id.as_str())
    );
    assert_eq!(
        runs.load(Ordering::SeqCst),
        2,
        "the redelivery did not run the handler"
    );

    stop.send(()).ok();
    let report = worker.await.unwrap();
    assert_eq!(report.handled, 1, "o-1's first delivery");
    assert_eq!(report.duplicates, 2, "o-1's copy and o-2's redelivery");
    assert!(report.requeued >= 1, "{report:?}");
    assert_eq!(report.dead_lettered + report.rejected, 0, "{report:?}");
    assert_eq!(dead_letters.all().len(), 0);
    transport.close().await.unwrap();
}

#[tokio::test]
async fn reply_stack_on_the_in_memory_transport() {
    let transport = MemoryTransport::new();
    let down = Arc::new(AtomicBool::new(false));
    let sink = Switchable {
        inner: transport.clone(),
        down: Arc::clone(&down),
    };
    scenario(transport, sink, FailEmit::SinkDown(down), "memory").await;
}

#[tokio::test]
async fn reply_stack_on_rabbitmq() {
    let Some(url) = require(amqp_url()) else {
        return;
    };
    let transport = RabbitTransport::connect(RabbitConfig::new(&url))
        .await
        .expect("connects to RabbitMQ");
    let run = format!("rabbit-{}", uuid::Uuid::now_v7());
    let _cleanup = surety_testkit::rabbitmq::Cleanup::new(url.clone())
        .prefix(format!("surety-idempotency-test.{run}"));
    scenario(transport.clone(), transport, FailEmit::Unroutable, &run).await;
}
