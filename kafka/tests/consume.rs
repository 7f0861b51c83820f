//! Consumer behaviour against the real broker: poison records, nack,
//! backpressure and graceful shutdown.

mod common;

use std::time::Duration;

use futures::StreamExt;
use surety_core::consumer::{Handler, Incoming, Worker, WorkerReport, handler_fn, typed};
use surety_core::envelope::UNDECODABLE_TYPE;
use surety_core::{Close, DeliveryStream, Envelope, Publisher, Subscriber};
use surety_kafka::rdkafka::ClientConfig;
use surety_kafka::rdkafka::message::{Header, OwnedHeaders};
use surety_kafka::rdkafka::producer::{FutureProducer, FutureRecord};
use surety_kafka::{KafkaConfig, KafkaMetrics, KafkaTransport};
use surety_testkit::wait::eventually;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const LIMIT: Duration = Duration::from_secs(20);

/// A transport connected with `config`, a fresh topic named after `prefix`
/// and a fresh consumer group.
async fn connect(config: KafkaConfig, prefix: &str) -> (KafkaTransport, String, String) {
    let kafka = KafkaTransport::connect(config).await.expect("connect");
    (kafka, common::unique(prefix), common::unique("group"))
}

/// Nothing more comes to `stream` (a subscription to the one-partition
/// `topic`): a marker published now is the next delivery, since anything
/// still to come lies at a lower offset. No waiting period to guess.
async fn nothing_before_marker(kafka: &KafkaTransport, topic: &str, stream: &mut DeliveryStream) {
    let marker = Envelope::builder("/test", "test.marker").build();
    kafka
        .publish(topic, marker.clone())
        .await
        .expect("publish the marker");
    let delivery = common::next(stream, LIMIT).await;
    assert_eq!(
        delivery.envelope().id,
        marker.id,
        "expected nothing before the marker, got {:?} at offset {:?}",
        delivery.envelope(),
        delivery.info().offset
    );
    delivery.ack().await.expect("ack the marker");
}

/// Everything `group` was given is settled for good: a new member of the
/// group starts after it (with a marker published now).
async fn assert_nothing_left(kafka: &KafkaTransport, topic: &str, group: &str) {
    let mut rejoined = kafka.subscribe(topic, group).await.expect("rejoin");
    nothing_before_marker(kafka, topic, &mut rejoined).await;
}

/// Runs `worker` on `deliveries` until the returned sender fires.
fn spawn_worker<H: Handler>(
    worker: Worker<H>,
    deliveries: DeliveryStream,
) -> (oneshot::Sender<()>, JoinHandle<WorkerReport>) {
    let (stop, stopped) = oneshot::channel::<()>();
    let handle = tokio::spawn(worker.run(deliveries, async {
        stopped.await.ok();
    }));
    (stop, handle)
}

async fn publish_n(
    kafka: &KafkaTransport,
    topic: &str,
    n: usize,
    key: Option<&str>,
) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..n {
        let mut builder = Envelope::builder("/test", "test.message").payload(i.to_string());
        if let Some(key) = key {
            builder = builder.partition_key(key);
        }
        let env = builder.build();
        ids.push(env.id.clone());
        kafka.publish(topic, env).await.expect("published");
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_records_are_delivered_as_poison_never_dropped() {
    common::init_tracing();
    let Some(brokers) = common::brokers() else {
        return;
    };
    let (kafka, topic, group) = connect(common::config(&brokers), "foreign").await;
    let _cleanup = common::delete_on_drop(&brokers, &[&topic]);
    let deliveries = kafka.subscribe(&topic, &group).await.expect("subscribe");

    // A producer that knows nothing of envelopes.
    let raw: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .expect("raw producer");
    let plain = FutureRecord::<(), _>::to(&topic).payload("not an envelope");
    raw.send(plain, LIMIT).await.expect("plain record");
    let binary = [0xffu8, 0xfe];
    let bad_header =
        FutureRecord::<(), _>::to(&topic)
            .payload("x")
            .headers(OwnedHeaders::new().insert(Header {
                key: "ce_id",
                value: Some(&binary[..]),
            }));
    raw.send(bad_header, LIMIT)
        .await
        .expect("record with binary header");

    // A typed handler never sees them; the worker rejects them as poison.
    let (seen_tx, mut seen) = tokio::sync::mpsc::channel(4);
    let tap = deliveries.inspect(move |d| {
        if let Ok(d) = d {
            seen_tx
                .try_send((d.envelope().clone(), d.info().clone()))
                .ok();
        }
    });
    #[derive(serde::Serialize, serde::Deserialize)]
    struct Anything(serde_json::Value);
    impl surety_core::Message for Anything {
        const TYPE: &'static str = "test.anything";
    }
    let handler = typed(|_: Anything, _: Incoming| async move {
        panic!("the handler must not run for poison");
        #[allow(unreachable_code)]
        Ok::<_, std::convert::Infallible>(())
    });
    let (stop, worker) = spawn_worker(Worker::new(handler), tap.boxed());
    let mut envelopes = Vec::new();
    for _ in 0..2 {
        envelopes.push(
            tokio::time::timeout(LIMIT, seen.recv())
                .await
                .expect("delivered in time")
                .expect("tap open"),
        );
    }
    let (first, info) = &envelopes[0];
    assert_eq!(first.event_type, UNDECODABLE_TYPE);
    assert_eq!(
        first.id,
        format!("{topic}/0/{}", info.offset.expect("offset"))
    );
    assert_eq!(first.source, format!("kafka://{topic}"));
    assert_eq!(first.payload, "not an envelope");
    assert!(
        first
            .decode_error()
            .expect("decode error")
            .contains("ce_id")
    );
    let (second, _) = &envelopes[1];
    assert_eq!(second.event_type, UNDECODABLE_TYPE);
    assert!(
        second
            .decode_error()
            .expect("decode error")
            .contains("UTF-8"),
        "{:?}",
        second.decode_error()
    );
    assert_eq!(second.payload, "x");

    // Both were handed to the worker (the tap runs inside the stream the
    // worker polls); a graceful stop settles them.
    stop.send(()).ok();
    let report = worker.await.expect("worker");
    assert_eq!(report.rejected, 2, "{report:?}");
    assert_eq!(report.acked, 0, "{report:?}");

    // Rejected is final: the group does not see them again.
    assert_nothing_left(&kafka, &topic, &group).await;
    kafka.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nack_redelivers_the_nacked_message_only() {
    common::init_tracing();
    let Some(brokers) = common::brokers() else {
        return;
    };
    let (kafka, topic, group) = connect(common::config(&brokers), "nack").await;
    let _cleanup = common::delete_on_drop(&brokers, &[&topic]);
    let mut stream = kafka.subscribe(&topic, &group).await.expect("subscribe");
    let ids = publish_n(&kafka, &topic, 3, None).await;

    let first = common::next(&mut stream, LIMIT).await;
    let second = common::next(&mut stream, LIMIT).await;
    let third = common::next(&mut stream, LIMIT).await;
    assert_eq!(first.envelope().id, ids[0]);
    assert!(!first.info().redelivered);
    assert_eq!(first.info().delivery_count, None);
    third.ack().await.expect("ack out of order");
    first.nack(true).await.expect("nack");

    let again = common::next(&mut stream, LIMIT).await;
    assert_eq!(again.envelope().id, ids[0]);
    assert_eq!(again.info().offset, Some(0));
    assert!(again.info().redelivered);
    assert_eq!(again.info().delivery_count, Some(2));
    assert_eq!(again.attempt(), 2);
    // The second message is still being handled, the third is done: neither
    // comes again.
    nothing_before_marker(&kafka, &topic, &mut stream).await;
    again.ack().await.expect("ack");
    second.ack().await.expect("ack");

    drop(stream);
    assert_nothing_left(&kafka, &topic, &group).await;
    kafka.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_pauses_and_loses_nothing() {
    common::init_tracing();
    let Some(brokers) = common::brokers() else {
        return;
    };
    let metrics = KafkaMetrics::default();
    let (kafka, topic, group) = connect(
        common::config(&brokers)
            .consumer_buffer(2)
            .metrics(metrics.clone()),
        "slow",
    )
    .await;
    let _cleanup = common::delete_on_drop(&brokers, &[&topic]);
    let ids = publish_n(&kafka, &topic, 60, Some("one-key")).await;
    let mut stream = kafka.subscribe(&topic, &group).await.expect("subscribe");

    // The consumer fetches far more than two messages at a time: it pauses.
    eventually(LIMIT, "the consumer to pause", || async {
        (metrics.consumer_pauses(&topic, &group) > 0).then_some(())
    })
    .await;
    let mut received = Vec::new();
    while received.len() < ids.len() {
        let delivery = common::next(&mut stream, LIMIT).await;
        received.push(delivery.envelope().id.clone());
        delivery.ack().await.expect("ack");
    }
    assert_eq!(received, ids, "every message once, in order");
    nothing_before_marker(&kafka, &topic, &mut stream).await;
    kafka.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_worker_shutdown_settles_in_flight_deliveries() {
    common::init_tracing();
    let Some(brokers) = common::brokers() else {
        return;
    };
    let (kafka, topic, group) = connect(common::config(&brokers), "drain").await;
    let _cleanup = common::delete_on_drop(&brokers, &[&topic]);
    let deliveries = kafka.subscribe(&topic, &group).await.expect("subscribe");

    let (started_tx, mut started) = tokio::sync::mpsc::channel(1);
    let release = std::sync::Arc::new(tokio::sync::Notify::new());
    let gate = release.clone();
    let handler = handler_fn(move |_msg: Incoming| {
        let (started_tx, gate) = (started_tx.clone(), gate.clone());
        async move {
            started_tx.send(()).await.ok();
            gate.notified().await;
            Ok::<_, std::convert::Infallible>(())
        }
    });
    let (stop, worker) = spawn_worker(Worker::new(handler).shutdown_grace(LIMIT), deliveries);
    publish_n(&kafka, &topic, 1, None).await;
    tokio::time::timeout(LIMIT, started.recv())
        .await
        .expect("handler started");
    // Shut down while the handler runs: the worker drops the stream, the
    // subscription waits for the delivery to be settled before leaving.
    stop.send(()).ok();
    release.notify_one();
    let report = worker.await.expect("worker");
    assert_eq!(report.acked, 1, "{report:?}");
    assert_eq!(report.settle_failures, 0, "{report:?}");
    assert_nothing_left(&kafka, &topic, &group).await;
    kafka.close().await.expect("close");
}
